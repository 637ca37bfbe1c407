"""Kernel start/end times inside the graph replays of one batch-1 generation (torch profiler,
CUPTI), per layer relative to its in_proj's start: medians over the layers of steps 20-235."""
import statistics, sys, torch
sys.path.insert(0, "scripts")
from torch.profiler import profile, ProfilerActivity
from benchmark import random_model
from aim_hf import AiMConfig

tag = sys.argv[1]
for preset in sys.argv[2:]:
    model = random_model(AiMConfig.from_preset(preset), torch.bfloat16)
    layers = model.config.num_hidden_layers
    model.generate([1], guidance_scale=2.0); torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model.generate([1], guidance_scale=2.0); torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type.name == "CUDA" and e.time_range.elapsed_us() >= 0),
                     key=lambda e: e.time_range.start)
    kernels = [(e.name, e.time_range.start, e.time_range.end) for e in kernels]
    names = [k[0] for k in kernels]
    # a layer: _gemv_kernel (in_proj), _ssm_update_kernel, _gemv_kernel (out_proj)
    triples = [i for i in range(len(kernels) - 2) if "gemv" in names[i] and "ssm_update" in names[i + 1] and "gemv" in names[i + 2]]
    steps = len(triples) // layers
    print(tag, preset, "kernels", len(kernels), "layers seen", len(triples), "steps", steps, flush=True)
    phases = {k: [] for k in ("in_end", "ssm_start", "ssm_end", "out_start", "out_end", "next_in")}
    other = []
    for s in range(20, min(steps, 236)):
        block = triples[s * layers:(s + 1) * layers]
        for j, i in enumerate(block):
            t0 = kernels[i][1]
            phases["in_end"].append(kernels[i][2] - t0)
            phases["ssm_start"].append(kernels[i + 1][1] - t0); phases["ssm_end"].append(kernels[i + 1][2] - t0)
            phases["out_start"].append(kernels[i + 2][1] - t0); phases["out_end"].append(kernels[i + 2][2] - t0)
            if j + 1 < len(block):
                phases["next_in"].append(kernels[block[j + 1]][1] - t0)
        if s + 1 < steps:
            other.append(kernels[triples[(s + 1) * layers]][1] - kernels[block[-1] + 2][2])
    print(tag, preset, "median us from in_proj start:", {k: round(statistics.median(v), 2) for k, v in phases.items()},
          "between steps (last out_proj end -> next step's first in_proj)", round(statistics.median(other), 1), flush=True)
    step_ends = [kernels[triples[s * layers]][1] for s in range(steps)]
    print(tag, preset, "median step period us", round(statistics.median([b - a for a, b in zip(step_ends, step_ends[1:])]), 1), flush=True)
    del model; torch.cuda.empty_cache()
