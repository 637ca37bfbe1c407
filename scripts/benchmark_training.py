"""Training throughput on one GPU: presets x mixer path (pure-PyTorch chunked scan, mamba-ssm kernels)
x precision (bf16 autocast, float32) x activation checkpointing.

Each row times what a step of scripts/train.py does, without data loading: forward and loss on random
codes and labels, backward, gradient clipping and the AdamW step of AiMTrainer (its optimizer, decay
groups and defaults, float32 master weights as with --bf16). After --warmup-steps (the first runs
mamba-ssm's Triton autotuning), --steps steps are timed one by one between torch.cuda.synchronize
calls; tokens/s is batch x num_tokens over the median step time, as train.py's tokens_per_second
counts tokens. A row that runs out of memory is recorded as such.

    python scripts/benchmark_training.py --json benchmarks/training.json
    python scripts/benchmark_training.py --presets AiM-B --batch-sizes AiM-B=256 --checkpointing on \\
        --mixers kernels --precisions bf16 fp32

Default batches (per GPU) fit the pure-PyTorch path on an 80 GB card without checkpointing: under
bf16 autocast it saves about 1.0 GiB of activations per AiM-B sample and 2.6 GiB per AiM-L sample
(counted on the CPU with saved-tensor hooks; 0.05 and 0.11 GiB with checkpointing).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import random_model, write_result  # noqa: E402
from train import AIM_DEFAULTS  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

from aim_hf import PRESETS, AiMConfig  # noqa: E402
from aim_hf.cli import file_path, positive_int  # noqa: E402
from aim_hf.mamba2 import KERNELS_AVAILABLE  # noqa: E402
from aim_hf.training import AiMTrainer  # noqa: E402

DEFAULT_BATCH = {"AiM-B": 32, "AiM-L": 16, "AiM-XL": 8, "AiM-1B": 4}
PRECISIONS = {"bf16": torch.bfloat16, "fp32": None}


def batch_size(text: str) -> tuple[str, int]:
    """``PRESET=N`` -> (preset, N)."""
    preset, _, value = text.partition("=")
    if preset not in PRESETS or not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected PRESET=N with PRESET in {sorted(PRESETS)} and N a positive integer"
        )
    return preset, int(value)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", nargs="+", choices=sorted(PRESETS), default=["AiM-B", "AiM-L"])
    parser.add_argument(
        "--batch-sizes", nargs="+", type=batch_size, default=[], metavar="PRESET=N",
        help=f"per-GPU batch of a preset (default {DEFAULT_BATCH})",
    )  # fmt: skip
    parser.add_argument("--mixers", nargs="+", choices=["pytorch", "kernels"], default=["pytorch", "kernels"])
    parser.add_argument("--precisions", nargs="+", choices=sorted(PRECISIONS), default=["bf16"])
    parser.add_argument("--checkpointing", nargs="+", choices=["off", "on"], default=["off"])
    parser.add_argument("--warmup-steps", type=positive_int, default=5)
    parser.add_argument("--steps", type=positive_int, default=20)
    parser.add_argument("--json", type=file_path, default="benchmark_training.json")
    args = parser.parse_args(argv)
    args.batch_sizes = {**DEFAULT_BATCH, **dict(args.batch_sizes)}
    if not torch.cuda.is_available():
        parser.error("the training benchmark times CUDA steps and needs a CUDA GPU; none is visible here")
    if "kernels" in args.mixers and not KERNELS_AVAILABLE:
        parser.error(
            "mamba-ssm or causal-conv1d is not installed: pip install -e '.[kernels]', or --mixers pytorch"
        )
    return args


def timed_step(model, optimizer, codes, labels, dtype, max_grad_norm: float) -> float:
    """Seconds of one training step, from the GPU idle to the GPU idle."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    autocast = (
        torch.autocast(codes.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    )
    with autocast:
        loss = model(codes, labels, labels=codes).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def run_row(preset: str, batch: int, mixer: str, precision: str, checkpointing: bool, args) -> dict:
    """Time one configuration on a fresh model and optimizer."""
    model = random_model(AiMConfig.from_preset(preset), torch.float32).train()
    model.config.use_mamba_kernels = mixer == "kernels"
    if checkpointing:
        model.activation_checkpointing_enable()
    with tempfile.TemporaryDirectory() as tmp:
        training = TrainingArguments(output_dir=tmp, report_to="none", **AIM_DEFAULTS)
        optimizer = AiMTrainer(model=model, args=training).create_optimizer()
    config, device = model.config, model.device
    g = torch.Generator(device=device).manual_seed(0)
    codes = torch.randint(0, config.vocab_size, (batch, config.num_tokens), device=device, generator=g)
    labels = torch.randint(0, config.num_classes, (batch,), device=device, generator=g)
    torch.cuda.reset_peak_memory_stats()
    step = (model, optimizer, codes, labels, PRECISIONS[precision], training.max_grad_norm)
    warmup = [timed_step(*step) for _ in range(args.warmup_steps)]
    times = [timed_step(*step) for _ in range(args.steps)]
    median = statistics.median(times)
    return {
        "first_step_s": warmup[0],
        "step_s": median,
        "step_s_all": times,
        "tokens_per_s": batch * config.num_tokens / median,
        "samples_per_s": batch / median,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "mamba_kernels_used": model.model.layers[0].mixer.use_kernels(codes),  # the path really taken
        "optimizer": type(optimizer).__name__ + (" (fused)" if optimizer.defaults.get("fused") else ""),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def describe(row: dict) -> str:
    name = f"{row['preset']} batch {row['batch']} {row['mixer']} {row['precision']} checkpointing {row['checkpointing']}"
    if "error" in row:
        return f"{name}: {row['error']}"
    return (
        f"{name}: step {row['step_s']:.3f} s, {row['tokens_per_s']:.0f} tokens/s, "
        f"peak {row['peak_memory_gib']:.1f} GiB (first step {row['first_step_s']:.1f} s)"
    )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    rows = []
    for preset, mixer, precision, checkpointing in itertools.product(
        args.presets, args.mixers, args.precisions, args.checkpointing
    ):
        row = {
            "preset": preset, "batch": args.batch_sizes[preset], "mixer": mixer, "precision": precision,
            "checkpointing": checkpointing == "on",
        }  # fmt: skip
        try:
            row.update(run_row(preset, row["batch"], mixer, precision, row["checkpointing"], args))
        except torch.cuda.OutOfMemoryError:
            row["error"] = "out of memory"
        gc.collect()
        torch.cuda.empty_cache()
        rows.append(row)
        print(describe(row), flush=True)
    result = write_result(
        args.json, "benchmark_training.py", rows, argv, torch=torch.__version__,
        mamba_kernels_installed=KERNELS_AVAILABLE, warmup_steps=args.warmup_steps, steps=args.steps,
    )  # fmt: skip
    print(f"\n{result['device']}, {result['date']}, median of {args.steps} steps after {args.warmup_steps}")
    print(
        f"{'preset':8s}{'batch':>6s}{'mixer':>9s}{'prec':>6s}{'ckpt':>6s}{'step s':>9s}{'tokens/s':>11s}{'GiB':>7s}"
    )
    for r in rows:
        head = f"{r['preset']:8s}{r['batch']:6d}{r['mixer']:>9s}{r['precision']:>6s}{'on' if r['checkpointing'] else 'off':>6s}"
        if "error" in r:
            print(f"{head}  {r['error']}")
        else:
            print(f"{head}{r['step_s']:9.3f}{r['tokens_per_s']:11.0f}{r['peak_memory_gib']:7.1f}")
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
