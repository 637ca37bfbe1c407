"""The stage-2 model: config, presets, the Mamba2 scan, save/load, training."""

import functools

import numpy as np
import pytest
import torch
from conftest import randomize, rel_err, tiny_config
from transformers import AutoConfig, AutoModel, PreTrainedConfig

from aim_hf import AiMConfig, AiMForImageGeneration
from aim_hf.conversion import regroup_adaln
from aim_hf.mamba2 import LayerCache, ssd_chunk_scan, ssm_dual_step, ssm_step
from aim_hf.modeling_aim import AiMCache, AiMOutput

# float64 everywhere: rounding is ~1e-16 per operation, so 1e-10 leaves room for a few thousand
# accumulated operations and still catches any real mistake (those are O(1e-2) or larger).
RTOL = 1e-10


@pytest.mark.parametrize(
    "name,millions", [("AiM-B", 147.62), ("AiM-L", 349.76), ("AiM-XL", 763.29), ("AiM-1B", 1335.94)]
)
def test_preset_parameter_counts(name, millions):
    with torch.device("meta"):
        model = AiMForImageGeneration(AiMConfig.from_preset(name))
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == millions


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"hidden_size": 36, "head_dim": 64}, "not divisible by head_dim"),
        ({"adaln_groups": 0}, "adaln_groups must be a positive integer"),
        ({"num_hidden_layers": 6, "adaln_groups": 4}, "must divide"),
        ({"state_dtype": "int8"}, "state_dtype"),
        ({"class_dropout_prob": 1.5}, "class_dropout_prob"),
        (
            {"decode_cache": "attention"},
            r"decode_cache must be one of \('auto', 'recurrent', 'dual'\), got 'attention'",
        ),
        ({"default_guidance_scale": -1.0}, r"default_guidance_scale must be a finite number >= 0 .*got -1.0"),
        ({"default_guidance_scale": float("nan")}, "default_guidance_scale"),
        ({"class_dropout_prob": None}, "class_dropout_prob must be in"),  # were TypeErrors
        ({"class_dropout_prob": "0.1"}, "class_dropout_prob must be in"),
        # derived values: transformers set them after dumping the config, then an AttributeError
        ({"num_heads": 8}, r"\['num_heads'\] are derived .* set those instead"),
        ({"intermediate_size": 64, "null_class": 3}, r"\['intermediate_size', 'null_class'\] are derived"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**kwargs)


def test_numpy_guidance_is_a_plain_number_in_the_config(tmp_path):
    config = tiny_config(default_guidance_scale=np.float32(1.5))
    assert type(config.default_guidance_scale) is float and config.default_guidance_scale == 1.5
    config.save_pretrained(tmp_path)
    assert AiMConfig.from_pretrained(tmp_path).default_guidance_scale == 1.5


def test_return_dict_and_embeddings_as_transformers_models_have_them():
    """forward falls back on config.return_dict, as transformers models do (it was ignored); the
    embedding accessors are transformers' own (EmbeddingAccessMixin), no copies of them."""
    model = AiMForImageGeneration(tiny_config(return_dict=False))
    codes = torch.randint(0, 37, (2, 4))
    out = model(input_ids=codes, class_labels=torch.tensor([0, 1]), labels=codes)
    assert isinstance(out, tuple) and len(out) == 2 and out[0].dim() == 0 and out[1].shape == (2, 4, 37)
    assert isinstance(model(input_ids=codes, class_labels=torch.tensor([0, 1]), return_dict=True), AiMOutput)
    assert model.get_input_embeddings() is model.model.embed_tokens
    assert model.get_output_embeddings() is model.lm_head
    new = torch.nn.Embedding(37, model.config.hidden_size)
    model.set_input_embeddings(new)
    assert model.model.embed_tokens is new


def test_validate_runs_the_checks_of_transformers_too(monkeypatch):
    """AiMConfig.validate overrides the one transformers calls before saving: it must still run
    transformers' own checks of the common settings (output_attentions, token ids, ...)."""
    config, seen = tiny_config(), []
    monkeypatch.setattr(PreTrainedConfig, "validate", lambda self: seen.append(self), raising=False)
    config.validate()
    assert seen == [config]


def test_overrides_of_a_saved_config_are_checked(tmp_path):
    """transformers sets from_pretrained's overrides after __init__: an int8 state was used (and
    decoded other codes), class_dropout_prob=2 dropped every label, and save_pretrained wrote a
    config that from_pretrained then refused."""
    AiMForImageGeneration(tiny_config()).save_pretrained(tmp_path)
    for override, match in [
        ({"state_dtype": "int8"}, "state_dtype must be None or one of"),
        ({"adaln_groups": 3}, "adaln_groups=3 must divide num_hidden_layers=4"),
        ({"class_dropout_prob": 2.0}, "class_dropout_prob must be in"),
    ]:
        with pytest.raises(ValueError, match=match):
            AiMConfig.from_pretrained(tmp_path, **override)
        with pytest.raises(ValueError, match=match):
            AiMForImageGeneration.from_pretrained(tmp_path, **override)
    assert AiMConfig.from_pretrained(tmp_path, state_dtype="bfloat16").state_dtype == "bfloat16"
    config = tiny_config()
    config.state_dtype = "int8"
    with pytest.raises(ValueError, match="state_dtype"):
        config.save_pretrained(tmp_path / "bad")
    assert not (tmp_path / "bad" / "config.json").exists()


def test_cache_forms_and_sizes():
    """The dual history's size per row, the "auto" choice (recurrent off CUDA) and a bad form."""
    config = tiny_config()
    dual = AiMCache.row_bytes(config, torch.bfloat16, "dual")
    t, layers = config.num_tokens + 1, config.num_hidden_layers
    assert dual["xs"] == layers * t * config.intermediate_size * 2
    assert dual["log_decays"] == dual["dts"] == layers * t * config.num_heads * 4  # float32 for bf16
    assert AiMCache(config, 3, torch.float32, "cpu", "dual").nbytes() == 3 * sum(
        AiMCache.row_bytes(config, torch.float32, "dual").values()
    )
    model = AiMForImageGeneration(config)
    assert model.cache_form(512, torch.device("cpu")) == "recurrent"
    cuda = torch.device("cuda")  # the choice only; nothing is allocated
    assert [model.cache_form(rows, cuda) for rows in (2, 63, 64, 512)] == ["recurrent"] * 2 + ["dual"] * 2
    model.config.use_triton_kernels = False
    assert model.cache_form(512, cuda) == "recurrent"
    model.config.decode_cache = "dual"
    assert model.cache_form(1, torch.device("cpu")) == "dual"
    with pytest.raises(ValueError, match="unknown cache form 'ring'; allowed: \\('recurrent', 'dual'\\)"):
        AiMCache(config, 1, torch.float32, "cpu", "ring")


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown AiM preset 'AiM-S'.*AiM-B"):
        AiMConfig.from_preset("AiM-S")


def sequential_scan(x, dt, A, B, C, state=None):
    """The recurrence of SPEC §2 one step at a time, in float64."""
    b, length, h, p = x.shape
    g = B.shape[2]
    state = torch.zeros(b, h, p, B.shape[-1], dtype=torch.float64) if state is None else state.clone()
    ys = []
    for t in range(length):
        for head in range(h):
            grp = head // (h // g)
            decay = torch.exp(dt[:, t, head] * A[head])[:, None, None]
            state[:, head] = (
                decay * state[:, head]
                + dt[:, t, head, None, None] * x[:, t, head, :, None] * B[:, t, grp, None, :]
            )
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t].repeat_interleave(h // g, dim=1)))
    return torch.stack(ys, 1), state


@pytest.mark.parametrize("chunk_size,length,groups", [(4, 13, 1), (8, 8, 2), (16, 5, 1), (3, 12, 2)])
def test_chunked_scan_matches_sequential(chunk_size, length, groups):
    g = torch.Generator().manual_seed(chunk_size * 100 + length)
    b, h, p, n = 2, 4, 3, 5
    x = torch.randn(b, length, h, p, generator=g, dtype=torch.float64)
    dt = torch.rand(b, length, h, generator=g, dtype=torch.float64) * 0.5 + 0.01
    A = -(torch.rand(h, generator=g, dtype=torch.float64) * 3 + 0.5)
    B = torch.randn(b, length, groups, n, generator=g, dtype=torch.float64)
    C = torch.randn(b, length, groups, n, generator=g, dtype=torch.float64)
    init = torch.randn(b, h, p, n, generator=g, dtype=torch.float64)
    y, final = ssd_chunk_scan(x, dt, A, B, C, chunk_size, initial_state=init)
    y_ref, final_ref = sequential_scan(x, dt, A, B, C, init)
    assert rel_err(y, y_ref) < RTOL
    assert rel_err(final, final_ref) < RTOL
    # the single-step update is the same recurrence (it takes dt before softplus)
    raw, bias = torch.log(torch.expm1(dt)) - 0.25, torch.full((h,), 0.25, dtype=torch.float64)
    state = init.clone()
    ys = [ssm_step(state, x[:, t], raw[:, t], bias, torch.log(-A), B[:, t], C[:, t]) for t in range(length)]
    assert rel_err(torch.stack(ys, 1), y_ref) < RTOL
    assert rel_err(state, final_ref) < RTOL


@pytest.mark.parametrize("prefill,groups", [(0, 1), (1, 2), (5, 1)])
def test_dual_step_matches_sequential(prefill, groups):
    """The dual form from its history (filled by a prefix, then one step at a time) gives the
    recurrence's outputs, float64 to 1e-10, and each step appends exactly one position."""
    g = torch.Generator().manual_seed(prefill)
    b, length, capacity, h, p, n = 2, 9, 12, 4, 3, 5
    x = torch.randn(b, length, h, p, generator=g, dtype=torch.float64)
    dt = torch.rand(b, length, h, generator=g, dtype=torch.float64) * 0.5 + 0.01
    A = -(torch.rand(h, generator=g, dtype=torch.float64) * 3 + 0.5)
    B = torch.randn(b, length, groups, n, generator=g, dtype=torch.float64)
    C = torch.randn(b, length, groups, n, generator=g, dtype=torch.float64)
    y_ref, _ = sequential_scan(x, dt, A, B, C)
    new = functools.partial(torch.zeros, dtype=torch.float64)
    cache = LayerCache(
        conv=new(b, 1, 1), length=torch.tensor(prefill), xs=new(b, capacity, h, p),
        Bs=new(b, capacity, groups, n), dts=new(b, capacity, h), log_decays=new(b, capacity, h),
    )  # fmt: skip
    cache.xs[:, :prefill], cache.Bs[:, :prefill], cache.dts[:, :prefill] = (
        x[:, :prefill],
        B[:, :prefill],
        dt[:, :prefill],
    )
    cache.log_decays[:, :prefill] = torch.cumsum(dt[:, :prefill] * A, dim=1)
    raw, bias = torch.log(torch.expm1(dt)), torch.zeros(h, dtype=torch.float64)
    for t in range(prefill, length):
        y = ssm_dual_step(cache, x[:, t], raw[:, t], bias, torch.log(-A), B[:, t], C[:, t])
        cache.length.add_(1)
        assert rel_err(y, y_ref[:, t]) < RTOL
    assert rel_err(cache.xs[:, :length], x) < RTOL and not cache.xs[:, length:].any()
    assert rel_err(cache.log_decays[:, :length], torch.cumsum(dt * A, dim=1)) < RTOL


def test_half_precision_scan_accumulates_in_float32():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 64, 2, 4, generator=g)
    dt = torch.rand(1, 64, 2, generator=g) * 0.1
    A = -torch.ones(2)
    B, C = torch.randn(1, 64, 1, 8, generator=g), torch.randn(1, 64, 1, 8, generator=g)
    y, state = ssd_chunk_scan(x.bfloat16(), dt.bfloat16(), A, B.bfloat16(), C.bfloat16(), 16)
    assert y.dtype == torch.float32 and state.dtype == torch.float32
    y64, _ = sequential_scan(
        *(t.bfloat16().double() for t in (x, dt)), A.double(), B.bfloat16().double(), C.bfloat16().double()
    )
    assert rel_err(y.double(), y64) < 1e-5  # float32 accumulation of the same bf16 inputs


def test_forward_shapes_and_loss(tiny_model):
    codes = torch.randint(0, 37, (3, 16))
    out = tiny_model(codes, torch.tensor([0, 1, 4]), labels=codes)
    assert out.logits.shape == (3, 16, 37)
    expected = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), codes.flatten())
    assert torch.allclose(out.loss, expected)
    # causal: logits at t depend only on codes before t
    changed = codes.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 37
    logits2 = tiny_model(changed, torch.tensor([0, 1, 4])).logits
    assert torch.equal(out.logits[:, :10], logits2[:, :10])
    assert not torch.allclose(out.logits[:, 10:], logits2[:, 10:])


def test_label_dropout_only_in_training(tiny_model):
    tiny_model.config.class_dropout_prob = 0.5
    codes = torch.randint(0, 37, (64, 4))
    labels = torch.zeros(64, dtype=torch.long)
    a, b = tiny_model(codes, labels).logits, tiny_model(codes, labels).logits
    assert torch.equal(a, b)  # eval: deterministic, no dropout
    tiny_model.train()
    torch.manual_seed(0)
    dropped = tiny_model(codes, labels).logits
    null = tiny_model(codes, torch.full_like(labels, 5)).logits
    same_as_null = (dropped[:, 0] - null[:, 0]).abs().amax(-1) < 1e-12
    assert 10 < same_as_null.sum() < 54  # about half the labels were replaced by the null class


def test_tied_embedding_and_save_load(tmp_path, tiny_model):
    assert tiny_model.lm_head.weight.data_ptr() == tiny_model.model.embed_tokens.weight.data_ptr()
    tiny_model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AiMForImageGeneration.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    codes = torch.randint(0, 37, (2, 16))
    labels = torch.tensor([1, 3])
    assert torch.equal(loaded(codes, labels).logits, tiny_model(codes, labels).logits)
    auto = AutoModel.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert isinstance(auto, AiMForImageGeneration)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), AiMConfig)
    assert torch.equal(auto(codes, labels).logits, tiny_model(codes, labels).logits)


@pytest.mark.parametrize("start,new", [(1, 2), (1, 4), (2, 4)])
def test_regroup_adaln_is_exact(start, new):
    model = randomize(AiMForImageGeneration(tiny_config(adaln_groups=start)).double(), seed=start).eval()
    regrouped = regroup_adaln(model, new)
    assert regrouped.config.adaln_groups == new
    assert hasattr(regrouped.model.layers[0], "adaln_table") == (new < 4)
    codes = torch.randint(0, 37, (2, 16))
    labels = torch.tensor([0, 2])
    assert rel_err(regrouped(codes, labels).logits, model(codes, labels).logits) < RTOL
    with pytest.raises(ValueError, match="multiple of"):
        regroup_adaln(model, 3)


def test_training_step_reduces_loss():
    torch.manual_seed(0)
    model = AiMForImageGeneration(tiny_config(class_dropout_prob=0.1)).train()
    codes = torch.randint(0, 37, (8, 16))
    labels = torch.randint(0, 5, (8,))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = model(codes, labels, labels=codes).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


@pytest.mark.parametrize("groups", [2, 4], ids=["layer-tables", "no-layer-tables"])
def test_gradient_checkpointing_same_gradients(groups):
    """Also where a block's returned gate is a view of its checkpointed input (G = layers)."""
    torch.manual_seed(0)
    model = randomize(AiMForImageGeneration(tiny_config(adaln_groups=groups)).double()).train()
    codes = torch.randint(0, 37, (2, 16))
    labels = torch.tensor([0, 1])

    def grads():
        model.zero_grad()
        model(codes, labels, labels=codes).loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    plain = grads()
    model.activation_checkpointing_enable()
    assert model.model.layers[0].gradient_checkpointing
    checkpointed = grads()
    assert rel_err(checkpointed, plain) < RTOL


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda m: m(torch.randint(0, 37, (2, 17)), torch.tensor([0, 1])), "at most 16"),
        (lambda m: m(torch.full((2, 4), 37), torch.tensor([0, 1])), "code 37, outside the codebook"),
        (lambda m: m(torch.rand(2, 4), torch.tensor([0, 1])), "integer tensor"),
        (lambda m: m(torch.zeros(2, 4, dtype=torch.long), torch.tensor([0, 7])), "class label 7 is outside"),
        (
            lambda m: m(torch.zeros(2, 4, dtype=torch.long), torch.tensor([0])),
            "1 class labels for a batch of 2",
        ),
        (lambda m: m(torch.zeros(0, 4, dtype=torch.long), torch.tensor([])), "empty batch"),
        (lambda m: m(torch.zeros(2, 0, dtype=torch.long), torch.tensor([0, 1])), "input_ids holds no codes"),
        (lambda m: m(torch.zeros(2, 4, dtype=torch.bool), torch.tensor([0, 1])), "integer tensor"),
        (
            lambda m: m(torch.zeros(2, 4, dtype=torch.long), torch.tensor([0, 1]), labels=torch.zeros(2, 3)),
            r"labels must be an integer tensor shaped like input_ids \(2, 4\), got \(2, 3\)",
        ),
        (
            lambda m: m(torch.zeros(2, 4, dtype=torch.long), torch.tensor([0, 1]), labels=torch.zeros(2, 4)),
            "labels must be an integer tensor",
        ),
        (
            lambda m: m(
                torch.zeros(2, 4, dtype=torch.long), torch.tensor([0, 1]), labels=torch.full((2, 4), 37)
            ),
            r"labels hold 37, outside the codebook \[0, 37\) \(and not -100",
        ),
    ],
)
def test_forward_bad_input(tiny_model, call, match):
    with pytest.raises(ValueError, match=match):
        call(tiny_model)


def test_forward_takes_any_integer_codes_and_ignores_minus_100(tiny_model):
    """int16/int32 codes (a datasets column's type) gave errors from the embedding and the loss;
    targets of -100 are skipped by the loss, as in transformers' language models."""
    codes = torch.randint(0, 37, (3, 16))
    labels = torch.tensor([0, 1, 4])
    reference = tiny_model(codes, labels, labels=codes)
    for dtype in (torch.int16, torch.int32):
        out = tiny_model(codes.to(dtype), labels, labels=codes.to(dtype))
        assert torch.equal(out.logits, reference.logits) and torch.equal(out.loss, reference.loss)
    targets = codes.clone()
    targets[:, 8:] = -100
    loss = tiny_model(codes, labels, labels=targets).loss
    expected = torch.nn.functional.cross_entropy(
        reference.logits[:, :8].flatten(0, 1), codes[:, :8].flatten()
    )
    assert torch.allclose(loss, expected)
