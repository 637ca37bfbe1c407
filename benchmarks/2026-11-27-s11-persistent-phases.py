"""Persistent step (any of the s11 patches applied) against FusedStep: the values over three steps, step times in a CUDA graph, phase marks of blocks 0, 131 and 95, no-loader bound, batch-1 generation."""
import sys, torch
sys.path.insert(0, "scripts")
from benchmark import random_model
from aim_hf import AiMConfig
from aim_hf.fast_decode import FusedStep
from aim_hf.persistent_step import PersistentStep
from aim_hf.modeling_aim import AiMCache

def step_time(s, cache, x, final, n=30):
    for _ in range(3):
        s(x, final, cache)
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(5):
            s(x, final, cache)
    g.replay(); torch.cuda.synchronize()
    e0.record()
    for _ in range(n):
        g.replay()
    e1.record(); torch.cuda.synchronize()
    return e0.elapsed_time(e1) / n / 5 * 1000  # us per step

for preset in [a for a in sys.argv[1:] if not a.startswith('-')]:
    model = random_model(AiMConfig.from_preset(preset), torch.bfloat16)
    cfg = model.config
    rows = 2
    mods = torch.randn(cfg.num_hidden_layers, rows, 3, cfg.hidden_size, device="cuda").bfloat16() * 0.1
    final = torch.randn(rows, 2, cfg.hidden_size, device="cuda").bfloat16() * 0.1
    x = torch.randn(rows, cfg.hidden_size, device="cuda")
    with torch.no_grad():
        # values: the same three steps from the same caches
        res = {}
        for cls in (FusedStep, PersistentStep):
            st = cls(model, rows); st.prepare(mods)
            cache = AiMCache(cfg, rows, model.dtype, "cuda")
            g = torch.Generator("cuda").manual_seed(1)
            for t in cache.tensors.values():
                t.copy_(torch.randn(t.shape, generator=g, device="cuda") * 0.5)
            outs = [st(x * (i + 1), final, cache).clone() for i in range(3)]
            torch.cuda.synchronize()
            res[cls.__name__] = (outs, cache.tensors["state"].clone(), cache.tensors["conv"].clone(), int(st.sync[2]) if hasattr(st, "sync") else 0)
        (fo, fs, fc, _), (po, ps_, pc, err) = res["FusedStep"], res["PersistentStep"]
        rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()
        print(preset, "values vs FusedStep: hidden", [f"{rel(a, b):.1e}" for a, b in zip(po, fo)],
              "state %.1e conv %.1e error flag %d" % (rel(ps_, fs), rel(pc, fc), err), flush=True)
        for name, make in [("fused", lambda: FusedStep(model, rows)),
                           ("persistent", lambda: PersistentStep(model, rows)),
                           ("persistent-t0", lambda: PersistentStep(model, rows, 8, {"TIMING": 0})),
                           ("persistent-t131", lambda: PersistentStep(model, rows, 8, {"TIMING": 131})),
                           ("persistent-t95", lambda: PersistentStep(model, rows, 8, {"TIMING": 95})),
                           ("persistent-no-loader", lambda: PersistentStep(model, rows, 8, {"NO_LOADER": 1}))]:
            s = make(); s.prepare(mods)
            cache = AiMCache(cfg, rows, model.dtype, "cuda")
            us = step_time(s, cache, x, final)
            line = f"{preset} {name}: step {us:.1f} us"
            if name.startswith("persistent-t"):
                s.timing.zero_(); s(x, final, cache); torch.cuda.synchronize()
                t = s.timing[1:].double()
                d = (t[:, 1:7] - t[:, 0:6]).mean(0) / 1000
                line += " | last slot start %.2f loop end %.2f synced %.2f epilogue %.2f" % ((t[:, 10] - t[:, 7]).mean() / 1000, (t[:, 11] - t[:, 7]).mean() / 1000, (t[:, 12] - t[:, 11]).mean() / 1000, (t[:, 2] - t[:, 12]).mean() / 1000)
                line += " | input %.2f slots %.2f" % ((t[:, 7] - t[:, 1]).mean() / 1000, (t[:, 2] - t[:, 7]).mean() / 1000)
                stage = (s.timing[1:, 0] - s.timing[:-1, 6]).double().mean() / 1000
                line += " | per layer us: waitA %.2f P1 %.2f waitB %.2f P2 %.2f waitC %.2f P3 %.2f stage %.2f | layer %.2f" % (
                    *d.tolist(), stage, ((s.timing[-1, 6] - s.timing[0, 0]).double() / 1000 / cfg.num_hidden_layers).item())
            print(line, flush=True)
    import time
    for flag in (False, True, False, True):
        model.config.use_persistent_step = flag
        model._graph_decoder = None
        run = lambda: model.generate([1], guidance_scale=2.0, generator=torch.Generator("cuda").manual_seed(0))
        run(); torch.cuda.synchronize()
        ts = []
        for _ in range(5):
            t0 = time.perf_counter(); run(); torch.cuda.synchronize(); ts.append(time.perf_counter() - t0)
        print(preset, type(model._graph_decoder.fused).__name__, "generate batch 1: %.4f s" % sorted(ts)[2], flush=True)
    del model; torch.cuda.empty_cache()
