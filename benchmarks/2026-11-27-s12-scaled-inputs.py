"""Session 12: the next in_proj's input written by out_proj (the stream times the next layer's
scale, in the weights' dtype, and its statistic in parts) against the step of ff5eb27, where every
in_proj reads the float32 stream and its float32 scale. Same process, alternating, a fresh graph
decoder per variant, median of 7 generations at batch 1. Values: one step of each on the same
random cache against AiMModel.step in float64.

Run from the repository root: `python benchmarks/2026-11-27-s12-scaled-inputs.py AiM-XL AiM-1B AiM-B AiM-L`
(run 2, on 4f7d2ac); with `--sweep` first, the in_proj launch variants of run 1 (on 6c2a497,
whose in_proj launch rule was ff5eb27's). `DEV=cpu TRITON_INTERPRET=1 ... tiny` checks the values
part on the CPU."""
import os, sys, time, torch
DEV = os.environ.get("DEV", "cuda")
sys.path.insert(0, "scripts")
from benchmark import random_model
from aim_hf import AiMConfig, fast_decode, triton_gemv, triton_ssm
from aim_hf.fast_decode import FusedStep
from aim_hf.modeling_aim import AiMCache

new_call = FusedStep.__call__
sync = torch.cuda.synchronize if DEV == 'cuda' else (lambda: None)
if DEV == 'cpu':
    sys.path.insert(0, 'tests')
    fast_decode.compiled = lambda fn: fn


def stream_call(self, inputs_embeds, final, cache):
    """The step at ff5eb27: every in_proj reads the float32 stream and its scale."""
    model, pdl = self.model.model, self.pdl
    stream = inputs_embeds.float()
    for i, layer in enumerate(model.layers):
        mixer, layer_cache = layer.mixer, cache.layer(i)
        conv = (layer_cache.conv, mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias, mixer.d_inner)
        zxbcdt = triton_gemv.norm_linear(
            stream, self.scales[i], self.shifts[i], mixer.in_proj.weight, layer.norm.eps, conv, pdl=pdl
        )
        z, xbc, dt = mixer._split(zxbcdt)
        x, B, C = mixer._split_xbc(xbc)
        gated, squares = triton_ssm.ssm_update_gated(
            layer_cache.state, x, dt, mixer.dt_bias, mixer.A_log, B, C, mixer.D, z.unflatten(-1, x.shape[1:]),
            mixer.norm.weight, pdl=pdl,
        )
        stream = triton_gemv.norm_linear_residual(
            gated.flatten(-2), squares, mixer.out_proj.weight, stream, self.gates[i], mixer.norm.eps, pdl=pdl
        )
    cache.length.add_(1)
    return fast_decode.compiled(fast_decode.finish)(model, stream, final)


base_launch = triton_gemv.default_launch


def widening(change):
    def launch(row_groups, outputs, inputs):
        d = base_launch(row_groups, outputs, inputs)
        return change(d, outputs * inputs) if outputs >= inputs else d
    return launch


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


SHIPPED = lambda d, size: d | {"early": size < 8_000_000}  # ff5eb27's in_proj launch
FLIPPED = lambda d, size: d | {"early": not d["early"]}
VARIANTS = [
    ("stream ff5eb27", stream_call, SHIPPED), ("scaled", new_call, None), ("scaled early-flipped", new_call, FLIPPED),
] * 2
if "--sweep" in sys.argv:  # run 1: the new step under in_proj launch variants
    sys.argv.remove("--sweep")
    VARIANTS = [
        ("stream", stream_call, None), ("scaled", new_call, None), ("stream", stream_call, None), ("scaled", new_call, None),
        ("scaled bn*2", new_call, lambda d, size: d | {"block_n": d["block_n"] * 2}),
        ("scaled bn/2", new_call, lambda d, size: d | {"block_n": max(2, d["block_n"] // 2)}),
        ("scaled warps2", new_call, lambda d, size: d | {"num_warps": 2}),
        ("scaled bk512", new_call, lambda d, size: d | {"block_k": min(512, d["block_k"] * 2)}),
        ("scaled stages4", new_call, lambda d, size: d | {"stages": 4}),
        ("scaled early", new_call, FLIPPED),
    ]

presets = sys.argv[1:] or ["AiM-XL", "AiM-B"]
for preset in presets:
    config = AiMConfig.from_preset(preset) if preset != "tiny" else __import__("conftest").tiny_config()
    model = random_model(config, torch.bfloat16, DEV)
    cfg, rows = model.config, 2
    # values: one step from the same random cache, each variant and AiMModel.step in float64
    torch.manual_seed(0)
    labels = torch.tensor([min(3, config.num_classes - 1), config.num_classes], device=DEV)  # a class and the null class
    token, position = torch.randint(0, config.vocab_size, (rows,), device=DEV), torch.full((rows,), config.num_tokens // 2, device=DEV)
    start = AiMCache(cfg, rows, model.dtype, DEV)
    g = torch.Generator(DEV).manual_seed(1)
    for t in start.tensors.values():
        t.copy_(torch.randn(t.shape, generator=g, device=DEV) * 0.5)
    start.length.fill_(config.num_tokens // 2)
    with torch.no_grad():
        exact = random_model(config, torch.float64, DEV)
        exact.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
        cache64 = AiMCache(cfg, rows, torch.float64, DEV)
        for k, t in cache64.tensors.items():
            t.copy_(start.tensors[k])
        _, groups, final = exact.model.condition(labels)
        ref = exact.model.step(token, position, exact.model.layer_modulations(groups), final, cache64)
        del exact
        _, groups, final = model.model.condition(labels)
        mods = model.model.layer_modulations(groups)
        for name, call in (("stream", stream_call), ("scaled", new_call)):
            FusedStep.__call__ = call
            step = FusedStep(model, rows)
            step.prepare(mods)
            cache = AiMCache(cfg, rows, model.dtype, DEV)
            for k, t in cache.tensors.items():
                t.copy_(start.tensors[k])
            out = step(model.model.embed(token, position), final, cache)
            eager = AiMCache(cfg, rows, model.dtype, DEV)
            for k, t in eager.tensors.items():
                t.copy_(start.tensors[k])
            print(preset, name, "hidden rel. to float64", f"{rel(out, ref):.2e}",
                  "state", f"{rel(cache.tensors['state'], cache64.tensors['state']):.2e}", flush=True)
        eager_out = model.model.step(token, position, mods, final, eager)
        print(preset, "AiMModel.step bf16 hidden rel. to float64", f"{rel(eager_out, ref):.2e}", flush=True)
    torch.cuda.empty_cache()
    codes = {}
    for name, call, change in VARIANTS if DEV == 'cuda' else []:  # the graph decoder needs CUDA
        FusedStep.__call__ = call
        triton_gemv.default_launch = widening(change) if change else base_launch
        model._graph_decoder = None
        torch.cuda.empty_cache()
        run = lambda: model.generate([1], guidance_scale=2.0, generator=torch.Generator(DEV).manual_seed(0))
        t0 = time.perf_counter(); c = run(); sync(); first = time.perf_counter() - t0
        ts = []
        for _ in range(7):
            t0 = time.perf_counter(); run(); sync(); ts.append(time.perf_counter() - t0)
        codes.setdefault(name.split()[0], c)
        same = (c == codes["stream"]).float().mean().item()
        n_in = model.model.layers[0].mixer.in_proj.weight.shape
        print(preset, f"{name:15s}", "in_proj launch", triton_gemv.default_launch(1, *n_in),
              "generate s", round(sorted(ts)[3], 4), "min", round(min(ts), 4), "first", round(first, 2),
              "codes = stream's", f"{same:.3f}", flush=True)
    FusedStep.__call__, triton_gemv.default_launch = new_call, base_launch
    del model
    torch.cuda.empty_cache()
