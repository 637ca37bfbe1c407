"""How weight and state precision change AiM's logits and sampled codes over a whole generation.

AiM-B with random weights decodes 256 codes of a batch under teacher forcing (the same codes fed
to every variant), with classifier-free guidance. Each variant's guided logits at every step are
compared with a float64 run: relative L2 error per step, and the share of steps where drawing
with the same uniforms picks the same code. A free-running generation per variant reports where
its codes first leave the float64 ones. Prints a table and writes JSON.

    python scripts/numerics.py --json numerics.json
"""

from __future__ import annotations

import argparse
import json

import torch
from benchmark import random_model  # scripts/ is on the path when run as a script

from aim_hf import AiMConfig
from aim_hf.cli import file_path
from aim_hf.files import atomic_path
from aim_hf.sampling import sample_inverse_cdf

VARIANTS = {  # name: (weights dtype, state dtype, use_cuda_graphs, decode_cache)
    "fp32 weights, fp32 state": (torch.float32, "float32", False, "recurrent"),
    "bf16 weights, fp32 state": (torch.bfloat16, "float32", False, "recurrent"),
    "bf16 weights, bf16 state": (torch.bfloat16, "bfloat16", False, "recurrent"),
    "bf16 weights, dual history": (torch.bfloat16, None, False, "dual"),
    "bf16 weights, fp32 state, CUDA graph": (torch.bfloat16, "float32", True, "recurrent"),
}


def teacher_forced_logits(model, codes, labels, guidance_scale):
    steps = []

    def choose(t, logits):
        steps.append(logits.double())
        return codes[:, t]

    model.decode(labels, codes[:, :0], guidance_scale, choose)
    return torch.stack(steps, 1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="AiM-B")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--guidance-scale", type=float, default=2.0)
    parser.add_argument("--json", type=file_path, default="numerics.json")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    config = AiMConfig.from_preset(
        args.preset, use_mamba_kernels=False, use_cuda_graphs=False, decode_cache="recurrent"
    )
    model = random_model(config, torch.float64, device)
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, config.num_classes, (args.batch,), generator=g).to(device)
    uniforms = torch.rand(args.batch, config.num_tokens, dtype=torch.float64, generator=g).to(device)
    gens = [torch.Generator(device).manual_seed(i) for i in range(args.batch)]
    free_ref = model.generate(labels, guidance_scale=args.guidance_scale, generator=gens)
    codes = free_ref  # feed the float64 model's own samples: a realistic sequence
    ref = teacher_forced_logits(model, codes, labels, args.guidance_scale)
    ref_codes = sample_inverse_cdf(ref, uniforms)
    rows = []
    for name, (dtype, state_dtype, graphs, cache) in VARIANTS.items():
        model.config.state_dtype, model.config.use_cuda_graphs = state_dtype, graphs
        model.config.decode_cache = cache
        model.to(dtype)
        if graphs:  # the graph decoder samples itself: compare its free-running codes only
            logits = None
        else:
            logits = teacher_forced_logits(model, codes, labels, args.guidance_scale)
        gens = [torch.Generator(device).manual_seed(i) for i in range(args.batch)]
        free = model.generate(labels, guidance_scale=args.guidance_scale, generator=gens)
        differs = (free != free_ref).any(0).nonzero()
        row = {
            "variant": name,
            "first_free_running_divergence": int(differs[0]) if len(differs) else None,
            "free_running_equal_codes": (free == free_ref).double().mean().item(),
        }
        if logits is not None:
            err = (logits - ref).flatten(2).norm(dim=-1) / ref.flatten(2).norm(dim=-1)  # (batch, steps)
            row.update(
                max_rel_err=err.max().item(),
                median_rel_err=err.median().item(),
                rel_err_last_step=err[:, -1].median().item(),
                same_code_teacher_forced=(sample_inverse_cdf(logits, uniforms) == ref_codes)
                .double()
                .mean()
                .item(),
            )
        rows.append(row)
        print(row, flush=True)
        model.double()
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "preset": args.preset,
        "batch": args.batch,
        "guidance_scale": args.guidance_scale,
        "rows": rows,
    }
    with atomic_path(args.json) as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    print(f"\n{'variant':40s}{'median err':>12s}{'max err':>10s}{'same code':>11s}{'diverge@':>10s}")
    for r in rows:
        print(
            f"{r['variant']:40s}{r.get('median_rel_err', float('nan')):12.2e}{r.get('max_rel_err', float('nan')):10.2e}"
            f"{r.get('same_code_teacher_forced', float('nan')):11.4f}{str(r['first_free_running_divergence']):>10s}"
        )


if __name__ == "__main__":
    main()
