"""The draw of a decoding step alone: guidance, temperature, top-k / top-p and the inverse-CDF
draw as ``sampling.py`` runs it in PyTorch (about ten kernels, and a sort of the vocabulary for
top-p alone) against the one-kernel draw (``triton_sampling.draw``) over its block sizes and
warps, each replayed in a CUDA graph as in the decoder (``triton.testing.do_bench_cudagraph``).
Random bf16 logits of AiM's 16384 codes, guidance on. Records whether both draw the same codes
(``same_codes``; the GPU tests assert it); prints a table, writes JSON.

    python scripts/benchmark_draw.py --batch-sizes 1 16 256 --filters 0,1 0,0.9 100,1
"""

from __future__ import annotations

import argparse
import functools
import itertools

import torch
import triton.testing
from benchmark import write_result  # scripts/ is on the path when run as a script

from aim_hf.cli import file_path
from aim_hf.sampling import filter_logits, guide, sample_inverse_cdf
from aim_hf.triton_sampling import draw, filtered


def time_batch(batch: int, top_k: int, top_p: float, args: argparse.Namespace) -> list[dict]:
    """Both draws at one batch size and filter, every launch setting of the kernel."""
    logits = (3 * torch.randn(2 * batch, args.vocab, device="cuda")).bfloat16()
    uniforms = torch.rand(batch, 256, device="cuda", dtype=torch.float64)
    codes = torch.zeros(batch, 256, dtype=torch.long, device="cuda")
    guided = torch.zeros(batch, args.vocab, device="cuda")
    t = torch.tensor([5], device="cuda")
    arrivals = torch.zeros(batch, dtype=torch.int32, device="cuda")  # kept, as the decoder keeps it

    def eager() -> None:
        g = guide(logits, 2.0)
        guided.copy_(g)
        code = sample_inverse_cdf(filter_logits(g, 1.0, top_k, top_p), uniforms.index_select(1, t).squeeze(1))
        codes.index_copy_(1, t, code[:, None])

    runs = [("sampling.py (PyTorch)", eager)]
    splits_tried = [1] if filtered(args.vocab, top_k, top_p) else args.splits
    for block, warps, splits in itertools.product(args.blocks, args.num_warps, splits_tried):
        launch = {"block": block or None, "num_warps": warps or None, "splits": splits or None}
        kernel = functools.partial(
            draw, logits, uniforms, t, codes, guided, 2.0, 1.0, top_k, top_p, arrivals=arrivals, **launch
        )
        runs.append((f"one kernel {launch}", kernel))
    eager()
    reference = codes[:, 5].clone()
    results = []
    for name, fn in runs:
        codes.zero_()
        fn()
        same = bool(torch.equal(codes[:, 5], reference))
        microseconds = triton.testing.do_bench_cudagraph(fn, rep=50) * 1e3
        results.append(
            {"batch": batch, "top_k": top_k, "top_p": top_p, "variant": name, "microseconds": microseconds,
             "same_codes": same}
        )  # fmt: skip
        print(
            f"batch {batch:4d}  top-k {top_k:4d} top-p {top_p:4.2f}  {name:52s} {microseconds:7.1f} us  same codes: {same}",
            flush=True,
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16, 256])
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument(
        "--blocks", nargs="+", type=int, default=[0, 2048, 4096, 16384], help="0: the default"
    )
    parser.add_argument("--num-warps", nargs="+", type=int, default=[0, 8, 32], help="0: the default")
    parser.add_argument(
        "--splits",
        nargs="+",
        type=int,
        default=[0, 1],
        help="programs a row without filters (0: the default)",
    )
    parser.add_argument("--filters", nargs="+", default=["0,1"], help="top_k,top_p pairs (0,1: no filter)")
    parser.add_argument("--json", type=file_path, default="benchmark_draw.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("the draw benchmark needs a CUDA GPU")
    try:
        filters = [(int(k), float(p)) for k, p in (f.split(",") for f in args.filters)]
    except ValueError:
        parser.error(f"--filters takes top_k,top_p pairs such as 0,0.9; got {args.filters}")
    results = [row for k, p in filters for batch in args.batch_sizes for row in time_batch(batch, k, p, args)]
    write_result(args.json, "benchmark_draw.py", results)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
