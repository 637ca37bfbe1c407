"""Where ``generate``'s time goes beyond the decoding steps: the class-token pass (or the prefix
pass), the 255 replays of the step graph (their GPU time from CUDA events and the host's time to
enqueue them) and the rest, for batch 1 with guidance.

    python scripts/profile_generate.py --presets AiM-XL AiM-B
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from benchmark import random_model, time_call  # scripts/ is on the path when run as a script

from aim_hf import AiMConfig


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", nargs="+", default=["AiM-XL", "AiM-B"])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("the profile needs a CUDA GPU")
    for preset in args.presets:
        model = random_model(AiMConfig.from_preset(preset), torch.bfloat16)
        steps = model.config.num_tokens - 1
        model.generate([0], guidance_scale=2.0)  # compile and capture
        decoder = model._graph_decoder
        labels = torch.tensor([0], device="cuda")
        prefix = torch.zeros(1, 0, dtype=torch.long, device="cuda")
        uniforms = torch.rand(1, model.config.num_tokens, dtype=torch.float64, device="cuda")
        generate, begin, replays, enqueue, gpu = [], [], [], [], []
        for _ in range(args.repeats):
            generate.append(time_call(model.generate, [0], guidance_scale=2.0)[0])
            begin.append(time_call(decoder.begin, labels, prefix, uniforms)[0])
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            for _ in range(steps):
                decoder.graph.replay()
            end.record()
            enqueue.append(time.perf_counter() - t0)
            torch.cuda.synchronize()
            replays.append(time.perf_counter() - t0)
            gpu.append(start.elapsed_time(end) / 1e3)
        m = statistics.median
        print(
            f"{preset}: generate {m(generate):.4f} s | class-token pass {m(begin) * 1e3:.1f} ms | "
            f"{steps} replays {m(replays):.4f} s (GPU {m(gpu):.4f} s, enqueued in {m(enqueue) * 1e3:.1f} ms) | "
            f"{m(gpu) / steps * 1e6:.0f} us a step",
            flush=True,
        )
        del model, decoder
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
