"""VQ decode on the GPU, eager against the decoder compiled in place (nn.Module.compile).

    python benchmarks/2026-11-27-s18-vq-compile.py --json OUT.json [--autotune]
"""

import argparse
import json
import statistics
import sys
import time

import torch
from diffusers import VQModel

from aim_hf.tokenizer import decode_codes, llamagen_vq_config


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[16, 64, 256])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--autotune", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    base = VQModel(**llamagen_vq_config()).eval()
    with torch.no_grad():
        for p in base.parameters():
            if not p.any():
                p.normal_(std=0.02)
    ref = VQModel(**llamagen_vq_config()).eval().double().cuda()
    ref.load_state_dict(base.state_dict())
    gen = torch.Generator().manual_seed(1)
    check = torch.randint(16384, (4, 256), generator=gen).cuda()
    with torch.no_grad():
        expected = decode_codes(ref, check)
    del ref
    modes = {"eager": None, "compiled": {}}
    if args.autotune:
        modes["compiled max-autotune-no-cudagraphs"] = {"mode": "max-autotune-no-cudagraphs"}
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for mode, options in modes.items():
            vq = VQModel(**llamagen_vq_config()).eval()
            vq.load_state_dict(base.state_dict())
            vq = vq.to("cuda", dtype)
            if options is not None:
                torch._dynamo.reset()
                vq.decoder.compile(**options)
            row = {"dtype": dtype_name, "mode": mode}
            with torch.no_grad():
                t0 = time.perf_counter()
                got = decode_codes(vq, check).double()
                torch.cuda.synchronize()
                row["first_call_b4_s"] = time.perf_counter() - t0
                row["error_vs_float64"] = ((got - expected).norm() / expected.norm()).item()
                cells = []
                for b in args.batch_sizes:
                    codes = torch.randint(16384, (b, 256), generator=gen).cuda()
                    torch.cuda.reset_peak_memory_stats()
                    t0 = time.perf_counter()
                    decode_codes(vq, codes)
                    torch.cuda.synchronize()
                    first = time.perf_counter() - t0
                    s = timed(lambda: decode_codes(vq, codes), args.repeats)
                    row[f"b{b}"] = {"seconds": s, "images_per_s": b / s, "first_call_s": first,
                                    "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
                    cells.append(f"b{b} {s:.4f} s ({b / s:6.1f}/s, first {first:5.1f} s)")
            print(f"{dtype_name:9s} {mode:36s} err {row['error_vs_float64']:.2e} " + " | ".join(cells), flush=True)
            rows.append(row)
            del vq
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "date": time.strftime("%Y-%m-%d"), "argv": sys.argv, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
