"""Speed of generation on the GPU: presets x batch sizes, CUDA-graph decoder vs eager baseline.

Prints a table and writes JSON. The token loop is timed from the call to ``generate`` until the
codes are on the device (synchronised), VQ decode separately, for the graph decoder with each
cache form asked for ("auto", the default: the form ``config.decode_cache="auto"`` picks for the
batch, which a user gets; the row's ``cache`` names it) and the eager loop. The floor is the
bytes a decoding step must move at least (the weights once, plus the recurrent state read and
written or the dual history read, whichever is less) over the copy bandwidth measured in the
same run.

    python scripts/benchmark.py --presets AiM-B AiM-XL --batch-sizes 1 16 64 256 --json bench.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from datetime import date

import torch

from aim_hf import AiMConfig, AiMForImageGeneration, triton_gemv
from aim_hf.cli import file_path, guidance_scale, positive_int
from aim_hf.configuration_aim import PRESETS
from aim_hf.files import atomic_path
from aim_hf.modeling_aim import AiMCache


def copy_bandwidth(gib: int = 4) -> float:
    """Bytes per second of a large device-to-device copy, counting read plus write."""
    src = torch.randn(gib * 2**28, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * gib * 2**30 / statistics.median(times)


def random_model(config: AiMConfig, dtype: torch.dtype, device: str = "cuda") -> AiMForImageGeneration:
    """Random weights everywhere (no all-zero adaLN: timings on zeros can flatter, and errors on
    zeros hide), scaled like trained ones."""
    with torch.device(device):
        model = AiMForImageGeneration(config)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.02)
    return model.to(dtype).eval()


def floor_seconds(model: AiMForImageGeneration, rows: int, bandwidth: float) -> dict[str, float]:
    """Least time of the token loop (255 steps) for each cache form: every step reads the weights
    once, plus the recurrent state read and written, or the dual history read up to the current
    position and one position appended."""
    config = model.config
    weights = sum(p.numel() for p in model.parameters()) - model.model.embed_positions.weight.numel()
    weights -= model.model.embed_classes.weight.numel()
    weights *= model.dtype.itemsize
    steps = config.num_tokens - 1
    state = AiMCache.row_bytes(config, model.dtype, "recurrent")["state"]
    history = AiMCache.row_bytes(config, model.dtype, "dual")
    capacity = AiMCache.shapes(config, 1, "dual")["xs"][2]
    position = sum(history[name] for name in ("xs", "Bs", "dts", "log_decays")) / capacity
    read_positions = sum(range(1, steps + 1))  # step k reads the k positions before it, appends one
    return {
        "recurrent": (steps * (weights + 2 * rows * state)) / bandwidth,
        "dual": (steps * weights + rows * position * (read_positions + steps)) / bandwidth,
    }


def write_result(path: str, script: str, rows: list[dict], argv: list[str] | None = None, **fields) -> dict:
    """A benchmark's JSON, written atomically: the card, the date, ``fields``, the command line
    of ``scripts/<script>`` (``argv``, default the process's) and the rows."""
    result = {
        "device": torch.cuda.get_device_name(),
        "date": date.today().isoformat(),
        **fields,
        "command": f"python scripts/{script} " + " ".join(sys.argv[1:] if argv is None else argv),
        "rows": rows,
    }
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    return result


def time_call(fn, *args, **kwargs) -> tuple[float, object]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    torch.cuda.synchronize()
    return time.perf_counter() - start, out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", nargs="+", choices=sorted(PRESETS), default=["AiM-B", "AiM-XL"])
    parser.add_argument("--batch-sizes", nargs="+", type=positive_int, default=[1, 16, 64, 256])
    parser.add_argument(
        "--baseline-batch-sizes", nargs="*", type=positive_int, default=[1, 64],
        help="batch sizes at which the eager baseline (no CUDA graph) is also timed",
    )  # fmt: skip
    parser.add_argument(
        "--caches", nargs="+", choices=["auto", "recurrent", "dual"], default=["auto"],
        help="cache forms of the graph decoder to time (config.decode_cache; auto: the default's pick)",
    )  # fmt: skip
    parser.add_argument(
        "--projection-kernels", nargs="+", choices=["on", "off"], default=["on"],
        help="config.use_projection_kernels (triton_gemv for up to triton_gemv.MAX_ROWS rows; off: cuBLAS)",
    )  # fmt: skip
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument(
        "--state-dtype", default=None, choices=["float32", "bfloat16"], help="default: the weights'"
    )
    parser.add_argument("--guidance-scale", type=guidance_scale, default=2.0)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument(
        "--vq", action="store_true", help="also time VQ decode (LlamaGen VQ-f16, random weights)"
    )
    parser.add_argument(
        "--compiled-vq", action="store_true",
        help="also time VQ decode with the decoder compiled in place (vq.decoder.compile()); implies --vq",
    )  # fmt: skip
    parser.add_argument("--json", type=file_path, default="benchmark.json")
    args = parser.parse_args(argv)
    args.vq = args.vq or args.compiled_vq
    if not torch.cuda.is_available():
        parser.error("the benchmark needs a CUDA GPU; none is visible here")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype)
    bandwidth = copy_bandwidth()
    decoders = {}
    if args.vq:
        from diffusers import VQModel

        from aim_hf.tokenizer import decode_codes, llamagen_vq_config

        with torch.device("cuda"):
            vq = VQModel(**llamagen_vq_config()).to(dtype).eval()
        decoders = {"vq": vq}
        if args.compiled_vq:
            decoders["vq_compiled"] = copy.deepcopy(vq)
            decoders["vq_compiled"].decoder.compile()
    rows = []
    for preset in args.presets:
        model = random_model(AiMConfig.from_preset(preset, state_dtype=args.state_dtype), dtype)
        for batch in args.batch_sizes:
            modes = [f"graph-{form}" for form in args.caches]
            sequences = batch * (2 if args.guidance_scale != 1 else 1)
            if "off" in args.projection_kernels and sequences <= triton_gemv.MAX_ROWS:
                modes += [f"graph-{form}-cublas" for form in args.caches]
            if "on" not in args.projection_kernels:
                modes = [mode for mode in modes if mode.endswith("-cublas")]
            modes += ["eager"] if batch in args.baseline_batch_sizes else []
            for mode in modes:
                model.config.use_cuda_graphs = mode != "eager"
                model.config.decode_cache = "recurrent" if mode == "eager" else mode.split("-")[1]
                model.config.use_projection_kernels = not mode.endswith("-cublas")
                cache = model.cache_form(sequences, "cuda") if mode != "eager" else "recurrent"
                call = (model.generate, list(range(batch)))
                kwargs = {"guidance_scale": args.guidance_scale}
                model._graph_decoder = None
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                first, codes = time_call(*call, **kwargs)
                times = [time_call(*call, **kwargs)[0] for _ in range(args.repeats)]
                loop = statistics.median(times)
                floors = floor_seconds(model, sequences, bandwidth)
                row = {
                    "preset": preset, "batch": batch, "mode": mode, "cache": cache, "dtype": args.dtype,
                    "state_dtype": args.state_dtype or args.dtype, "guidance_scale": args.guidance_scale,
                    "first_call_s": first, "token_loop_s": loop, "token_loop_all_s": times,
                    "images_per_s": batch / loop, "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
                    "floor_recurrent_s": floors["recurrent"], "floor_dual_s": floors["dual"],
                    "floor_s": min(floors.values()),
                }  # fmt: skip
                row["ratio_to_floor"] = loop / row["floor_s"]
                for name, decoder in decoders.items():  # the first call compiles a new batch size
                    row[f"{name}_first_call_s"] = time_call(decode_codes, decoder, codes)[0]
                    row[f"{name}_decode_s"] = time_call(decode_codes, decoder, codes)[0]
                    row[f"images_per_s_with_{name}"] = batch / (loop + row[f"{name}_decode_s"])
                rows.append(row)
                print(
                    f"{preset:7s} batch {batch:4d} {mode:14s} {cache:9s}: loop {loop:8.3f} s  {row['images_per_s']:8.1f} img/s  "
                    f"first {first:6.1f} s  floor {row['floor_s']:.3f} s (x{row['ratio_to_floor']:.1f})  "
                    f"peak {row['peak_memory_gib']:.1f} GiB",
                    flush=True,
                )
        model._graph_decoder = None
        torch.cuda.empty_cache()
    result = write_result(
        args.json, "benchmark.py", rows, argv, torch=torch.__version__, copy_bandwidth_gb_s=bandwidth / 1e9
    )
    print(f"\n{result['device']}, copy bandwidth {bandwidth / 1e9:.0f} GB/s, {result['date']}")
    header = ("preset", "batch", "mode", "cache", "loop s", "img/s", "x floor", "first s")
    header += tuple(f"{name} s" for name in decoders)
    print(f"{header[0]:8s}{header[1]:>6s}{header[2]:>20s}{''.join(f'{h:>14s}' for h in header[3:])}")
    for r in rows:
        decodes = "".join(f"{r[f'{name}_decode_s']:14.3f}" for name in decoders)
        print(
            f"{r['preset']:8s}{r['batch']:6d}{r['mode']:>20s}{r['cache']:>14s}{r['token_loop_s']:14.3f}"
            f"{r['images_per_s']:14.1f}{r['ratio_to_floor']:14.1f}{r['first_call_s']:14.1f}{decodes}"
        )


if __name__ == "__main__":
    main()
