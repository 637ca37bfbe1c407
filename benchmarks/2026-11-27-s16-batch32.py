"""Session 16: batch 32 (64 rows with guidance), the dual cache (the default from 64 rows) against
the recurrent state through ``FusedStep`` widened to 64 rows, token loop.

Variants:

    dual       the default (``decode_cache="auto"`` takes the dual form from 64 rows)
    recurrent  the recurrent state through the compiled blocks with cuBLAS (``FusedStep`` stops at 32)
    fused2x32  ``FusedStep`` up to 64 rows, two programs of 32 rows (each reads the weights)
    fused64    ``FusedStep`` up to 64 rows, one program of 64 rows on the tensor cores (blocks of
               128 inputs, in_proj 8 warps, out_proj 4: at 64 rows the float32 input block of the
               32-row launch would not fit the registers)

Median of 5 generations after a first call that compiles and captures, a fresh CUDA-graph decoder
each item, batch 16 as shipped first and again last (drift):

    python benchmarks/2026-11-27-s16-batch32.py --presets AiM-B AiM-XL --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

sys.path.insert(0, "scripts")
sys.path.insert(0, "src")
from benchmark import random_model, time_call  # noqa: E402

from aim_hf import AiMConfig, triton_gemv  # noqa: E402

SHIPPED_LAUNCH, SHIPPED_ROWS = triton_gemv._launch, triton_gemv.default_rows
VARIANTS = ("dual", "recurrent", "fused2x32", "fused64")


def use(variant: str) -> None:
    wide = variant.startswith("fused")
    triton_gemv.supported.__defaults__ = (64 if wide else triton_gemv.MAX_ROWS,)
    triton_gemv.TENSOR_CORE_ROWS = (16, 32, 64) if variant == "fused64" else (16, 32)

    def default_rows(rows: int, outputs: int, inputs: int) -> int:
        return 64 if variant == "fused64" and rows > 32 else SHIPPED_ROWS(rows, outputs, inputs)

    def launch(x, weight, out, **kwargs):
        if variant == "fused64" and x.shape[0] > 32:
            widens = weight.shape[0] >= weight.shape[1]
            kwargs |= {"block_k": 128, "num_warps": 8 if widens else 4}
        return SHIPPED_LAUNCH(x, weight, out, **kwargs)

    triton_gemv.default_rows = default_rows
    triton_gemv._launch = launch


def token_loop(model, batch: int, variant: str, repeats: int = 5) -> float:
    use(variant)
    model.config.decode_cache = "dual" if variant == "dual" else "recurrent"
    model._graph_decoder = None
    labels = list(range(batch))
    time_call(model.generate, labels, guidance_scale=2.0)  # compile and capture
    fused = model._graph_decoder.fused is not None
    assert fused == (variant.startswith("fused") or batch <= 16), (batch, variant, fused)
    times = sorted(time_call(model.generate, labels, guidance_scale=2.0)[0] for _ in range(repeats))
    return times[repeats // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["AiM-B", "AiM-XL"])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--json")
    args = parser.parse_args()
    device = torch.cuda.get_device_name()
    print(device, flush=True)
    results = []
    items = [(16, "recurrent"), *[(32, v) for v in args.variants], (16, "recurrent")]
    for preset in args.presets:
        model = random_model(AiMConfig.from_preset(preset), torch.bfloat16)
        for batch, variant in items:
            seconds = token_loop(model, batch, variant)
            results.append({"preset": preset, "batch": batch, "variant": variant, "seconds": seconds})
            print(f"{preset} batch {batch:2d} {variant:9s} {seconds:.4f} s {batch / seconds:7.1f} img/s", flush=True)
        del model
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
