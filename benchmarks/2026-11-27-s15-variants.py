"""Session 15: how a decoding step's projections take their rows, token loop at batches 1-16.

Each item ``batch:variant``; the variants, over ``FusedStep`` as shipped (bf16 operands straight
into ``tl.dot`` from this session):

    shipped   the defaults: 1-2 rows in multiply-adds, 3-16 all in one tensor-core program
    cublas    the compiled blocks with cuBLAS (``config.use_projection_kernels = False``)
    fma2      both projections in programs of 2 rows, multiply-adds (row groups that share no rows)
    fma2-in   in_proj so, out_proj as shipped
    fma2-out  out_proj so, in_proj as shipped
    dot16     both on the tensor cores (16 rows a program) at any row count
    max32     ``FusedStep`` up to 32 rows (batch 16), 32 rows a program (shipped later this session)
    dual      the dual cache, the compiled step, mamba2's lone projections by cuBLAS above 2 rows
    dual-lone the same with the lone projections on the tensor cores up to ``MAX_ROWS`` rows

Median of 5 generations after a first call that compiles and captures, a fresh CUDA-graph
decoder each item, the first item again at the end (drift):

    python benchmarks/2026-11-27-s15-variants.py --presets AiM-B AiM-XL --items 1:shipped 1:dot16 2:shipped 2:fma2
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

SHIPPED = triton_gemv._launch
ROWS = {  # variant: rows a program of (in_proj, out_proj); None: the default
    "shipped": (None, None), "cublas": (None, None), "max32": (None, None),
    "fma2": (2, 2), "fma2-in": (2, None), "fma2-out": (None, 2), "dot16": (16, 16),
    "dual": (None, None), "dual-lone": (None, None),
}  # fmt: skip


def use(variant: str) -> None:
    triton_gemv.supported.__defaults__ = (32 if variant == "max32" else triton_gemv.MAX_ROWS,)
    triton_gemv.LONE_ROWS = triton_gemv.MAX_ROWS if variant == "dual-lone" else 2
    in_rows, out_rows = ROWS[variant]

    def launch(x, weight, out, **kwargs):
        if kwargs.get("rows_per_program") is None:
            kwargs["rows_per_program"] = out_rows if kwargs.get("residual") is not None else in_rows
        return SHIPPED(x, weight, out, **kwargs)

    triton_gemv._launch = launch


def token_loop(model, batch: int, variant: str, repeats: int = 5) -> float:
    use(variant)
    model.config.use_projection_kernels = variant != "cublas"
    model.config.decode_cache = "dual" if variant.startswith("dual") else "recurrent"
    model._graph_decoder = None
    labels = list(range(batch))
    time_call(model.generate, labels, guidance_scale=2.0)  # compile and capture
    fused = model._graph_decoder.fused is not None
    assert fused == (variant not in ("cublas", "dual", "dual-lone")), (batch, variant, fused)
    times = sorted(time_call(model.generate, labels, guidance_scale=2.0)[0] for _ in range(repeats))
    return times[repeats // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["AiM-B", "AiM-XL"])
    parser.add_argument("--items", nargs="+", required=True, help="batch:variant")
    parser.add_argument("--json")
    args = parser.parse_args()
    items = [(int(b), v) for b, v in (item.split(":") for item in args.items)]
    for _, variant in items:
        if variant not in ROWS:
            raise SystemExit(f"unknown variant {variant!r}; allowed: {', '.join(ROWS)}")
    device = torch.cuda.get_device_name()
    print(device, flush=True)
    results = []
    for preset in args.presets:
        model = random_model(AiMConfig.from_preset(preset, decode_cache="recurrent"), torch.bfloat16)
        for batch, variant in [*items, items[0]]:
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
