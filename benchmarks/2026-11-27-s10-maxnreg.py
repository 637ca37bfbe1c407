"""Batch-1 token loop with out_proj's one-block GEMV capped at N registers (Triton's maxnreg); 0: no cap."""

import sys
import time

import torch

sys.path.insert(0, "scripts")
from benchmark import random_model

from aim_hf import AiMConfig, triton_gemv

kernel = triton_gemv._gemv_kernel
seen = {}


class Capped:
    def __init__(self, cap):
        self.cap = cap

    def __getitem__(self, grid):
        launch = kernel[grid]

        def run(*a, **kw):
            one = kw.get("ONE_BLOCK")
            if one and self.cap:
                kw["maxnreg"] = self.cap
            compiled = launch(*a, **kw)
            if one and compiled is not None:
                seen[self.cap] = (getattr(compiled, "n_regs", None), getattr(compiled, "n_spills", None))
            return compiled

        return run


for preset in sys.argv[1:]:
    model = random_model(AiMConfig.from_preset(preset), torch.bfloat16)

    def timed(n=7):
        model.generate([1], guidance_scale=2.0)
        torch.cuda.synchronize()
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            model.generate([1], guidance_scale=2.0)
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t)
        return sorted(ts)[n // 2]

    for cap in (0, 168, 136, 128, 120, 96, 0, 136):
        triton_gemv._gemv_kernel = Capped(cap)
        model._graph_decoder = None
        try:
            s = timed()
            print(preset, "maxnreg", cap, "generate s", round(s, 4), "regs/spills", seen.get(cap), flush=True)
        except Exception as e:
            print(preset, "maxnreg", cap, "FAILED", type(e).__name__, str(e)[:300], flush=True)
    triton_gemv._gemv_kernel = kernel
    del model
    torch.cuda.empty_cache()
