"""The SSM step kernels alone: the recurrent update against the dual form's, at one position.

For each preset's layer shape and row count it times ``triton_ssm.ssm_update`` and
``triton_ssm.ssm_dual_update`` (several launch configurations) with ``triton.testing.do_bench``
and reports the bytes each must move, the achieved bandwidth and the ratio to the copy bandwidth
measured in the same run. Prints a table and writes JSON.

    python scripts/benchmark_ssm_kernels.py --presets AiM-B AiM-XL --rows 512 --position 128
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton.testing
from benchmark import copy_bandwidth, write_result  # scripts/ is on the path when run as a script

from aim_hf import AiMConfig
from aim_hf.cli import file_path
from aim_hf.mamba2 import LayerCache
from aim_hf.triton_ssm import ssm_dual_update, ssm_update


def layer_inputs(config: AiMConfig, rows: int, position: int, dtype: torch.dtype) -> dict:
    """Random inputs of one layer's step, with a dual history filled up to ``position``."""
    h, p, g, n, t = config.num_heads, config.head_dim, config.n_groups, config.state_size, config.num_tokens
    new = lambda *shape, dt=dtype: torch.randn(*shape, device="cuda", dtype=dt)  # noqa: E731
    dts = torch.rand(rows, t, h, device="cuda") * 0.1
    return {
        "x": new(rows, h, p), "dt": new(rows, h), "dt_bias": new(h, dt=torch.float32),
        "A_log": torch.rand(h, device="cuda").log(), "B": new(rows, g, n), "C": new(rows, g, n),
        "state": new(rows, h, p, n),
        "cache": LayerCache(
            conv=new(1, 1, 1), length=torch.tensor(position, device="cuda"), xs=new(rows, t, h, p),
            Bs=new(rows, t, g, n), dts=dts, log_decays=-dts.cumsum(1),
        ),
    }  # fmt: skip


def time_layer(
    config: AiMConfig, preset: str, rows: int, args: argparse.Namespace, bandwidth: float
) -> list[dict]:
    """One table row per kernel and launch configuration."""
    inputs = layer_inputs(config, rows, args.position, torch.bfloat16)
    x, dt, bias, A_log, B, C = (inputs[k] for k in ("x", "dt", "dt_bias", "A_log", "B", "C"))
    cache, state = inputs["cache"], inputs["state"]
    per_position = sum(
        t[:, 0].numel() * t.element_size() for t in (cache.xs, cache.Bs, cache.dts, cache.log_decays)
    )
    runs = [
        (
            "recurrent",
            {},
            2 * state.numel() * state.element_size(),
            lambda: ssm_update(state, x, dt, bias, A_log, B, C),
        )
    ]
    sweep = itertools.product(args.block_t, args.block_h, args.num_warps, args.num_stages)
    for block_t, block_h, warps, stages in sweep:
        launch = {"block_t": block_t, "num_stages": stages}
        launch |= {"block_h": block_h} if block_h else {}
        launch |= {"num_warps": warps} if warps else {}
        if block_h and config.num_heads // config.n_groups % block_h:
            continue
        runs.append(
            ("dual", launch, (args.position + 1) * per_position,
             lambda launch=launch: ssm_dual_update(cache, x, dt, bias, A_log, B, C, **launch))
        )  # fmt: skip
    rows_out = []
    for form, launch, nbytes, fn in runs:
        cache.length.fill_(args.position)
        seconds = triton.testing.do_bench(fn, warmup=25, rep=100) / 1e3
        row = {
            "preset": preset, "rows": rows, "position": args.position, "form": form, **launch,
            "microseconds": seconds * 1e6, "bytes": nbytes, "gb_per_s": nbytes / seconds / 1e9,
            "fraction_of_copy_bandwidth": nbytes / seconds / bandwidth,
        }  # fmt: skip
        rows_out.append(row)
        print(
            f"{preset:7s} rows {rows:4d} {form:9s} {str(launch):52s} {row['microseconds']:9.1f} us "
            f"{row['gb_per_s']:7.0f} GB/s ({row['fraction_of_copy_bandwidth']:.2f} of copy)",
            flush=True,
        )
    return rows_out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", nargs="+", default=["AiM-B", "AiM-XL"])
    parser.add_argument(
        "--rows", nargs="+", type=int, default=[512, 2], help="sequences (2 per image with CFG)"
    )
    parser.add_argument("--position", type=int, default=128, help="positions already in the history")
    parser.add_argument("--block-t", nargs="+", type=int, default=[8, 16, 32])
    parser.add_argument(
        "--block-h", nargs="+", type=int, default=[0, 4, 8, 16], help="0: the kernel's default"
    )
    parser.add_argument("--num-warps", nargs="+", type=int, default=[0], help="0: the kernel's default")
    parser.add_argument("--num-stages", nargs="+", type=int, default=[2, 3])
    parser.add_argument("--json", type=file_path, default="benchmark_ssm_kernels.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("the kernel benchmark needs a CUDA GPU")
    bandwidth = copy_bandwidth()
    results = []
    for preset, rows in itertools.product(args.presets, args.rows):
        results += time_layer(AiMConfig.from_preset(preset), preset, rows, args, bandwidth)
    write_result(args.json, "benchmark_ssm_kernels.py", results, copy_bandwidth_gb_s=bandwidth / 1e9)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
