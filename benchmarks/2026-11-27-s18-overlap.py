"""Bulk sampling: VQ decode of batch k on a side stream while the token loop of batch k+1 runs.

    python benchmarks/2026-11-27-s18-overlap.py --presets AiM-B AiM-XL --batch-sizes 64 256 --batches 4
"""

import argparse
import json
import sys
import time

import torch
from diffusers import VQModel

sys.path.insert(0, "scripts")
from benchmark import random_model  # noqa: E402

from aim_hf import AiMConfig  # noqa: E402
from aim_hf.tokenizer import decode_codes, llamagen_vq_config  # noqa: E402


def sequential(model, vq, labels, n):
    out = []
    for _ in range(n):
        codes = model.generate(labels, guidance_scale=2.0)
        out.append(decode_codes(vq, codes).cpu())
    return out


def overlapped(model, vq, labels, n):
    """decode(k - 1) is enqueued on a side stream before generate(k), then its images copied back."""
    side = torch.cuda.Stream()
    main = torch.cuda.current_stream()
    out, pending = [], None
    for k in range(n + 1):
        images = None
        if pending is not None:
            prev, event = pending
            side.wait_event(event)
            with torch.cuda.stream(side):
                prev.record_stream(side)
                images = decode_codes(vq, prev)
        pending = None
        if k < n:
            codes = model.generate(labels, guidance_scale=2.0)
            pending = (codes, main.record_event())
        if images is not None:
            with torch.cuda.stream(side):
                out.append(images.cpu())
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", nargs="+", default=["AiM-B", "AiM-XL"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 256])
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--json")
    args = parser.parse_args()
    with torch.device("cuda"):
        vq = VQModel(**llamagen_vq_config()).to(torch.bfloat16).eval()
    rows = []
    for preset in args.presets:
        model = random_model(AiMConfig.from_preset(preset), torch.bfloat16)
        for b in args.batch_sizes:
            labels = list(range(b))
            torch.manual_seed(0)
            ref = sequential(model, vq, labels, 1)  # warm-up: capture, cudnn
            overlapped(model, vq, labels, 1)
            times = {}
            for name, fn in [("sequential", sequential), ("overlapped", overlapped)] * 2:
                torch.cuda.synchronize()
                t = time.perf_counter()
                images = fn(model, vq, labels, args.batches)
                torch.cuda.synchronize()
                times.setdefault(name, []).append(time.perf_counter() - t)
                assert len(images) == args.batches and images[0].shape == ref[0].shape
            row = {"preset": preset, "batch": b, "batches": args.batches}
            for name, ts in times.items():
                row[name + "_s"] = min(ts)
                row[name + "_images_per_s"] = b * args.batches / min(ts)
            rows.append(row)
            print(f"{preset:7s} b{b:4d} x{args.batches}: sequential {row['sequential_s']:.3f} s "
                  f"({row['sequential_images_per_s']:.1f} img/s), overlapped {row['overlapped_s']:.3f} s "
                  f"({row['overlapped_images_per_s']:.1f} img/s) [{', '.join(f'{t:.3f}' for ts in times.values() for t in ts)}]",
                  flush=True)
        del model
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                       "argv": sys.argv, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
