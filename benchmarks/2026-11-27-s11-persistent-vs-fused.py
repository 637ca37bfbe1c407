"""PersistentStep against FusedStep: one model, same inputs and caches (values), then batch-1 generate times."""
import sys, time, torch
sys.path.insert(0, "scripts")
from benchmark import random_model
from aim_hf import AiMConfig
from aim_hf.fast_decode import FusedStep
from aim_hf.persistent_step import PersistentStep
from aim_hf.modeling_aim import AiMCache

def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()

presets = sys.argv[1:] or ["AiM-XL", "AiM-B"]
for preset in presets:
    model = random_model(AiMConfig.from_preset(preset), torch.bfloat16)
    cfg = model.config
    rows = 2
    torch.manual_seed(0)
    mods = torch.randn(cfg.num_hidden_layers, rows, 3, cfg.hidden_size, device="cuda").bfloat16() * 0.1
    final = torch.randn(rows, 2, cfg.hidden_size, device="cuda").bfloat16() * 0.1
    steps = {}
    for cls in (FusedStep, PersistentStep):
        s = cls(model, rows)
        s.prepare(mods)
        cache = AiMCache(cfg, rows, model.dtype, "cuda")
        g = torch.Generator("cuda").manual_seed(1)
        for t in cache.tensors.values():
            t.copy_(torch.randn(t.shape, generator=g, device="cuda") * 0.5)
        outs = []
        torch.manual_seed(2)
        for i in range(3):
            x = torch.randn(rows, cfg.hidden_size, device="cuda")
            with torch.no_grad():
                outs.append(s(x, final, cache).clone())
        torch.cuda.synchronize()
        steps[cls.__name__] = (outs, {k: v.clone() for k, v in cache.tensors.items()}, s)
    (fo, fc, _), (po, pc, ps) = steps["FusedStep"], steps["PersistentStep"]
    print(preset, "layout", ps.layout, flush=True)
    print(preset, "hidden rel err per step", [f"{rel(p, f):.2e}" for p, f in zip(po, fo)],
          "state", f"{rel(pc['state'], fc['state']):.2e}", "conv", f"{rel(pc['conv'], fc['conv']):.2e}",
          "error flag", int(ps.sync[2]), flush=True)
    # timing
    codes = {}
    for flag in (False, True, False, True):
        model.config.use_persistent_step = flag
        model._graph_decoder = None
        torch.cuda.empty_cache()
        run = lambda: model.generate([1], guidance_scale=2.0, generator=torch.Generator("cuda").manual_seed(0))
        t0 = time.perf_counter(); c = run(); torch.cuda.synchronize(); first = time.perf_counter() - t0
        ts = []
        for _ in range(7):
            t0 = time.perf_counter(); run(); torch.cuda.synchronize(); ts.append(time.perf_counter() - t0)
        codes.setdefault(flag, c)
        kind = type(model._graph_decoder.fused).__name__
        same = (c == codes[False]).float().mean().item()
        print(preset, kind, "generate s", round(sorted(ts)[3], 4), "min", round(min(ts), 4),
              "first", round(first, 2), "codes equal to FusedStep's", f"{same:.3f}", flush=True)
    del model; torch.cuda.empty_cache()
