"""Median batch-1 generate time for presets, with whatever aim_hf is on PYTHONPATH."""

import sys
import time

import torch

sys.path.insert(0, "scripts")
from benchmark import random_model

from aim_hf import AiMConfig

tag = sys.argv[1]
for preset in sys.argv[2:]:
    model = random_model(AiMConfig.from_preset(preset), torch.bfloat16)
    model.generate([1], guidance_scale=2.0)
    torch.cuda.synchronize()
    ts = []
    for _ in range(7):
        t = time.perf_counter()
        model.generate([1], guidance_scale=2.0)
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    print(tag, preset, "generate s", round(sorted(ts)[3], 4), "min", round(min(ts), 4), flush=True)
    del model
    torch.cuda.empty_cache()
