"""VQ decode of AiM's codes on the GPU: memory layouts, cuDNN autotuning, torch.compile.

    python benchmarks/2026-11-27-s18-vq-layouts.py --compile --json OUT.json
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
    fn()
    torch.cuda.synchronize()
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
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    vq = VQModel(**llamagen_vq_config()).eval()
    with torch.no_grad():
        for p in vq.parameters():
            if not p.any():
                p.normal_(std=0.02)
    ref = VQModel(**llamagen_vq_config()).eval().double().cuda()
    ref.load_state_dict(vq.state_dict())
    vq = vq.to("cuda", torch.bfloat16)
    vq_cl = VQModel(**llamagen_vq_config()).eval().to("cuda", torch.bfloat16)
    vq_cl.load_state_dict(vq.state_dict())
    vq_cl = vq_cl.to(memory_format=torch.channels_last)

    def latent_cl(model, codes):
        shape = (codes.shape[0], 16, 16, 8)
        latent = model.quantize.get_codebook_entry(codes.reshape(-1), shape)
        latent = latent.contiguous(memory_format=torch.channels_last)
        return model.decoder(model.post_quant_conv(latent))

    variants = {
        "nchw (shipped)": lambda c: decode_codes(vq, c),
        "latent channels_last": lambda c: latent_cl(vq, c),
        "weights+latent channels_last": lambda c: latent_cl(vq_cl, c),
    }

    def bench_cudnn(c):
        with torch.backends.cudnn.flags(enabled=True, benchmark=True):
            return latent_cl(vq_cl, c)

    variants["weights+latent channels_last, cudnn.benchmark"] = bench_cudnn

    if args.compile:
        compiled = VQModel(**llamagen_vq_config()).eval().to("cuda", torch.bfloat16)
        compiled.load_state_dict(vq.state_dict())
        compiled = compiled.to(memory_format=torch.channels_last)
        compiled.decoder = torch.compile(compiled.decoder, dynamic=False)
        variants["compiled decoder, channels_last"] = lambda c: latent_cl(compiled, c)

    # accuracy against float64 on 4 images
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(16384, (4, 256), generator=gen).cuda()
    with torch.no_grad():
        expected = decode_codes(ref, codes)
        errors = {}
        for name, fn in variants.items():
            got = fn(codes).double()
            errors[name] = ((got - expected).norm() / expected.norm()).item()
            print(f"{name:50s} rel L2 error vs float64 {errors[name]:.2e}", flush=True)

    rows = []
    print(f"{'variant':50s} " + " ".join(f"b{b:>4d} s (img/s)" for b in args.batch_sizes), flush=True)
    for name, fn in variants.items():
        row = {"variant": name, "error_vs_float64": errors[name]}
        cells = []
        for b in args.batch_sizes:
            codes = torch.randint(16384, (b, 256), generator=gen).cuda()
            torch.cuda.reset_peak_memory_stats()
            with torch.no_grad():
                t0 = time.perf_counter()
                fn(codes)
                torch.cuda.synchronize()
                first = time.perf_counter() - t0
                s = timed(lambda: fn(codes), args.repeats)
            row[f"b{b}"] = {"seconds": s, "images_per_s": b / s, "first_call_s": first,
                            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
            cells.append(f"{s:.4f} ({b / s:7.1f})")
        print(f"{name:50s} " + " ".join(cells), flush=True)
        rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "cudnn": torch.backends.cudnn.version(), "argv": sys.argv, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
