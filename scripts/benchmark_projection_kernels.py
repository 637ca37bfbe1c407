"""The small-row projections (triton_gemv: linear, and norm_linear / norm_linear_residual with
the norms folded in) alone, against cuBLAS (F.linear), which the compiled step runs without them.

For each preset's in_proj and out_proj and each row count (2 = batch 1 with guidance) it times
both over several launch configurations, each replayed in a CUDA graph
(``triton.testing.do_bench_cudagraph``, as in the decoder), and reports the weights' bytes over the
time against the copy bandwidth measured in the same run. As in a decoding step, the weights come
from memory, not from L2: each timed graph runs the projection over as many copies of the weights
as fill ``--stack-bytes`` (one per layer, like the model), back to back, with programmatic
dependent launch on and off. Prints a table, writes JSON.

    python scripts/benchmark_projection_kernels.py --presets AiM-B AiM-XL --rows 2 4
"""

from __future__ import annotations

import argparse
import functools
import itertools

import torch
import torch.nn.functional as F
import triton.testing
from benchmark import copy_bandwidth, write_result  # scripts/ is on the path when run as a script

from aim_hf import AiMConfig
from aim_hf.cli import file_path
from aim_hf.triton_gemv import linear, norm_linear, norm_linear_residual


def time_projection(
    preset: str, name: str, n: int, width: int, rows: int, args: argparse.Namespace, bandwidth: float
) -> list[dict]:
    """One projection (n outputs of ``width`` inputs) under every launch configuration."""
    x = torch.randn(rows, width, device="cuda", dtype=torch.bfloat16)
    nbytes = n * width * x.element_size()
    weights = [
        torch.randn(n, width, device="cuda", dtype=torch.bfloat16) / width**0.5
        for _ in range(max(1, args.stack_bytes // nbytes))
    ]
    stream = torch.randn(rows, width, device="cuda")  # float32 input of the folded norms
    scale, other = torch.randn(rows, width, device="cuda"), torch.randn(rows, n, device="cuda")
    squares = stream.pow(2).view(rows, -1, 64).sum(-1)  # the statistic in parts, as ssm_update_gated gives it
    runs = [("cuBLAS", lambda weight: F.linear(x, weight))]
    for block_n, block_k, warps, stages, pdl, rows_per_program in itertools.product(
        args.block_n, args.block_k, args.num_warps, args.stages, args.pdl, args.rows_per_program
    ):
        launch = {
            "block_n": block_n or None, "block_k": block_k or None, "num_warps": warps or None,
            "stages": None if stages < 0 else stages, "pdl": pdl == "on", "rows_per_program": rows_per_program,
        }  # fmt: skip
        runs.append((launch, functools.partial(linear, x, **launch)))
        if name == "in_proj":  # norm_linear: the norm and adaLN folded in
            fused = functools.partial(norm_linear, stream, scale, other, eps=1e-5, **launch)
        else:  # norm_linear_residual: the gated norm and the residual add folded in
            fused = functools.partial(norm_linear_residual, x, squares, residual=other, gate=other, eps=1e-5, **launch)  # fmt: skip
        runs.append(({"folded norm": True, **launch}, fused))
    results = []
    for launch, fn in runs:
        fn(weights[0])  # compile outside the graph
        seconds = triton.testing.do_bench_cudagraph(lambda fn=fn: [fn(w) for w in weights], rep=50)
        seconds /= 1e3 * len(weights)
        row = {
            "preset": preset, "rows": rows, "projection": name, "launch": str(launch),
            "microseconds": seconds * 1e6, "weight_bytes": nbytes, "copies": len(weights),
            "fraction_of_copy_bandwidth": nbytes / seconds / bandwidth,
        }  # fmt: skip
        results.append(row)
        print(
            f"{preset:7s} rows {rows:2d} {name:8s} {str(launch):75s} {row['microseconds']:7.1f} us "
            f"({row['fraction_of_copy_bandwidth']:.2f} of copy)",
            flush=True,
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", nargs="+", default=["AiM-B", "AiM-XL"])
    parser.add_argument(
        "--rows", nargs="+", type=int, default=[2, 4], help="sequences (2 per image with CFG)"
    )
    parser.add_argument("--block-n", nargs="+", type=int, default=[0, 2, 4, 8, 16], help="0: the default")
    parser.add_argument("--block-k", nargs="+", type=int, default=[0, 512], help="0: the default")
    parser.add_argument("--num-warps", nargs="+", type=int, default=[0], help="0: the default")
    parser.add_argument(
        "--stages", nargs="+", type=int, default=[-1],
        help="-1: the default; 0: one block ahead by hand; 2 or more: Triton's pipeline",
    )  # fmt: skip
    parser.add_argument(
        "--pdl", nargs="+", choices=["off", "on"], default=["off", "on"], help="programmatic dependent launch"
    )
    parser.add_argument(
        "--rows-per-program", nargs="+", type=int, default=[2], help="rows a GEMV program takes: 1, 2 or 4"
    )
    parser.add_argument(
        "--stack-bytes", type=int, default=512 << 20, help="weights a timed graph streams (well past L2)"
    )
    parser.add_argument("--json", type=file_path, default="benchmark_projection_kernels.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("the kernel benchmark needs a CUDA GPU")
    bandwidth = copy_bandwidth()
    results = []
    with torch.no_grad():
        for preset, rows in itertools.product(args.presets, args.rows):
            config = AiMConfig.from_preset(preset)
            d, k = config.hidden_size, config.intermediate_size
            n_in = 2 * k + 2 * config.n_groups * config.state_size + config.num_heads
            results += time_projection(preset, "in_proj", n_in, d, rows, args, bandwidth)
            results += time_projection(preset, "out_proj", d, k, rows, args, bandwidth)
    write_result(args.json, "benchmark_projection_kernels.py", results, copy_bandwidth_gb_s=bandwidth / 1e9)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
