"""FusedStep with out_proj launched before or after the state update's wait: the same values,
bit for bit, over 20 steps from a random cache (AiM-XL: 48 heads, AiM-B: 24); and against float64."""
import sys, functools, torch
sys.path.insert(0, "scripts")
from benchmark import random_model
from aim_hf import AiMConfig, fast_decode
from aim_hf.fast_decode import FusedStep
from aim_hf.modeling_aim import AiMCache

gated = fast_decode.triton_ssm.ssm_update_gated
for preset in sys.argv[1:]:
    config = AiMConfig.from_preset(preset)
    model = random_model(config, torch.bfloat16)
    rows = 2
    labels = torch.tensor([3, config.num_classes], device="cuda")
    g = torch.Generator("cuda").manual_seed(1)
    start = AiMCache(config, rows, model.dtype, "cuda")
    for t in start.tensors.values():
        t.copy_(torch.randn(t.shape, generator=g, device="cuda") * 0.5)
    outs = {}
    with torch.no_grad():
        _, groups, final = model.model.condition(labels)
        mods = model.model.layer_modulations(groups)
        for early in (False, True, False, True):
            fast_decode.triton_ssm.ssm_update_gated = functools.partial(gated, early=early)
            step = FusedStep(model, rows)
            step.prepare(mods)
            cache = AiMCache(config, rows, model.dtype, "cuda")
            for k, t in cache.tensors.items():
                t.copy_(start.tensors[k])
            cache.length.fill_(10)
            torch.manual_seed(0)
            seq = []
            for i in range(20):
                token = torch.randint(0, config.vocab_size, (rows,), device="cuda")
                position = torch.full((rows,), 10 + i, device="cuda")
                seq.append(step(model.model.embed(token, position), final, cache).clone())
            torch.cuda.synchronize()
            seq = torch.stack(seq)
            if early in outs:
                print(preset, "early", early, "repeat equal", torch.equal(outs[early], seq), flush=True)
            outs.setdefault(early, seq)
            fast_decode.triton_ssm.ssm_update_gated = gated
    print(preset, "early vs not: bitwise equal", torch.equal(outs[False], outs[True]),
          "max rel", ((outs[True] - outs[False]).norm() / outs[False].norm()).item(), flush=True)
    del model; torch.cuda.empty_cache()
