"""Where a decoding step spends its GPU time: the compiled step of the CUDA-graph decoder, run
outside the graph under torch.profiler, kernels sorted by total CUDA time.

    python scripts/profile_step.py --preset AiM-B --batch 256 --cache dual
"""

from __future__ import annotations

import argparse

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
            decoder.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
