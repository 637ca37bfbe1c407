"""Where a decoding step spends its GPU time: the step of the CUDA-graph decoder, run outside the
graph under torch.profiler, kernels sorted by total CUDA time; with ``--graph``, replays of the
captured graph itself, each kernel charged with the time from the previous kernel's end to its
own end (its marginal cost: kernels launched early overlap, so their durations add up to more
than the step).

    python scripts/profile_step.py --preset AiM-B --batch 256 --cache dual
    python scripts/profile_step.py --preset AiM-XL --batch 1 --graph
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from benchmark import random_model  # scripts/ is on the path when run as a script
from torch.profiler import ProfilerActivity, profile

from aim_hf import AiMConfig


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="AiM-B")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument(
        "--cache", choices=["auto", "recurrent", "dual"], default="auto", help="config.decode_cache"
    )
    parser.add_argument("--graph", action="store_true", help="profile replays of the captured graph")
    args = parser.parse_args()
    model = random_model(AiMConfig.from_preset(args.preset, decode_cache=args.cache), torch.bfloat16)
    labels = torch.arange(args.batch, device="cuda") % model.config.num_classes
    decoder = model.graph_decoder(args.batch, 2.0, 1.0, 0, 1.0)
    uniforms = torch.rand(args.batch, model.config.num_tokens, dtype=torch.float64, device="cuda")
    decoder.run(labels, uniforms.new_zeros(args.batch, 0, dtype=torch.long), uniforms)  # compile, capture
    print(f"cache form: {decoder.cache.form}; steps at the middle of the sequence")
    middle = model.config.num_tokens // 2
    decoder.cache.length.fill_(middle)  # feeds code middle - 1 at sequence position middle
    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            decoder.graph.replay() if args.graph else decoder.step()
        torch.cuda.synchronize()
    if args.graph:
        print_marginal_costs(prof, args.steps, args.rows)
    else:
        print(
            prof.key_averages().table(
                sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70
            )
        )


def print_marginal_costs(prof: profile, steps: int, rows: int) -> None:
    """Per kernel name: launches a step, mean duration and mean marginal cost (from the end of the
    kernel that ended before it to its own end), in microseconds; their sum is the step's span."""
    kernels = sorted(
        (e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
        key=lambda e: e.time_range.end,
    )
    count, duration, marginal = defaultdict(int), defaultdict(float), defaultdict(float)
    for before, kernel in zip(kernels, kernels[1:]):
        name = kernel.name[:70]
        count[name] += 1
        duration[name] += kernel.time_range.end - kernel.time_range.start
        marginal[name] += kernel.time_range.end - max(before.time_range.end, kernel.time_range.start)
    gaps = sum(max(0, k.time_range.start - b.time_range.end) for b, k in zip(kernels, kernels[1:]))
    span = kernels[-1].time_range.end - kernels[0].time_range.end
    print(
        f"{len(kernels)} kernels in {steps} steps, {span / steps:.1f} us a step, idle {gaps / steps:.1f} us a step"
    )
    print(f"{'kernel':72s}{'a step':>7s}{'duration us':>13s}{'marginal us':>13s}{'us a step':>11s}")
    for name in sorted(marginal, key=marginal.get, reverse=True)[:rows]:
        n = count[name]
        print(
            f"{name:72s}{n / steps:7.1f}{duration[name] / n:13.2f}{marginal[name] / n:13.2f}{marginal[name] / steps:11.1f}"
        )


if __name__ == "__main__":
    main()
