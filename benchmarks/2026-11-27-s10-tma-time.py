"""Batch-1 token loop with in_proj's weights by pointer loads (AIM_TMA=0) or TMA (1), same process; codes compared."""
import os, sys, time, torch
sys.path.insert(0, "scripts")
from benchmark import random_model
from aim_hf import AiMConfig
for preset in sys.argv[1:]:
    model = random_model(AiMConfig.from_preset(preset), torch.bfloat16)
    codes = {}
    for tma in ("0", "1", "0", "1"):
        os.environ["AIM_TMA"] = tma
        model._graph_decoder = None
        run = lambda: model.generate([1], guidance_scale=2.0, generator=torch.Generator("cuda").manual_seed(0))
        try:
            c = run(); torch.cuda.synchronize()
            ts = []
            for _ in range(7):
                t = time.perf_counter(); run(); torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
            codes.setdefault(tma, c)
            print(preset, "tma", tma, "generate s", round(sorted(ts)[3], 4), "same codes as tma 0:", torch.equal(c, codes["0"]) if "0" in codes else None, flush=True)
        except Exception as e:
            print(preset, "tma", tma, "FAILED", type(e).__name__, str(e)[:400], flush=True)
    del model; torch.cuda.empty_cache()
