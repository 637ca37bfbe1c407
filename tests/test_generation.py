"""Cached decoding, guidance, sampling filters, reproducibility and completion."""

import copy
import math
import pickle
import threading
import types

import numpy as np
import pytest
import torch
from conftest import fake_cuda_memory, randomize, rel_err, tiny_config
from reference_aim import (
    random_original_state_dict,
    ref_config,
    reference_decode_logits,
    reference_sample_filter,
)

from aim_hf import AiMForImageGeneration
from aim_hf.conversion import load_original
from aim_hf.modeling_aim import AiMCache
from aim_hf.sampling import filter_logits, sample_inverse_cdf

# float64 on both sides: decoding and the forward differ only in summation order (recurrent step
# vs chunked scan), a few ulps per layer; 1e-10 is far above that and far below any real bug.
RTOL = 1e-10


def teacher_forced_decode(model, codes, labels, guidance_scale, start=0):
    """Run the cached decoding loop feeding ``codes``; returns the logits of every decoded step."""
    logits = []

    def choose(t, step_logits):
        logits.append(step_logits)
        return codes[:, t]

    out = model.decode(labels, codes[:, :start], guidance_scale, choose)
    assert torch.equal(out, codes)
    return torch.stack(logits, 1)


@pytest.mark.parametrize("form", ["recurrent", "dual"])
def test_cached_steps_equal_forward(tiny_model, form, monkeypatch):
    """Both forms of the decoding cache: steps from the recurrent state or from the dual form's
    history give the forward's logits."""
    monkeypatch.setattr(tiny_model.config, "decode_cache", form)
    calls = count_calls(monkeypatch, "ssm_dual_step")
    codes = torch.randint(0, 37, (3, 16))
    labels = torch.tensor([0, 3, 4])
    forward = tiny_model(codes, labels).logits
    assert rel_err(teacher_forced_decode(tiny_model, codes, labels, 1.0), forward) < RTOL
    # completion: the prefix pass fills the cache, the remaining steps still match the forward
    assert rel_err(teacher_forced_decode(tiny_model, codes, labels, 1.0, start=5), forward[:, 5:]) < RTOL
    # the longest prefix fills every position of the cache but the last code's
    assert rel_err(teacher_forced_decode(tiny_model, codes, labels, 1.0, start=15), forward[:, 15:]) < RTOL
    layers, steps = tiny_model.config.num_hidden_layers, 15 + 10 + 0  # decoded from 0, 5 and 15
    assert calls == ([layers * steps] if form == "dual" else [0])


@pytest.mark.parametrize("form", ["recurrent", "dual"])
def test_class_token_as_a_step_on_a_reset_cache_equals_the_forward(tiny_model, form):
    """What the graph decoder's start graph runs: the class embedding as a step on a reset cache
    (stale values in it) gives the forward's hidden state of the class token and the same cache."""
    model, labels = tiny_model.model, torch.tensor([0, 3, 4])
    caches = [AiMCache(tiny_model.config, 3, tiny_model.dtype, "cpu", form) for _ in range(2)]
    for tensor in caches[1].tensors.values():
        tensor.normal_()
    caches[1].length.fill_(7)
    with torch.no_grad():
        forward = model(torch.zeros(3, 0, dtype=torch.long), labels, cache=caches[0])[:, -1]
        c, groups, final = model.condition(labels)
        caches[1].reset()
        step = model.step(None, None, model.layer_modulations(groups), final, caches[1], inputs_embeds=c)
    assert rel_err(step, forward) < RTOL
    assert torch.equal(caches[1].length, caches[0].length) and caches[0].length.item() == 1
    for name, tensor in caches[0].tensors.items():  # the dual history: only position 0 is written
        seen = tensor if name in ("conv", "state") else tensor[:, :, :1]
        mine = caches[1].tensors[name] if name in ("conv", "state") else caches[1].tensors[name][:, :, :1]
        assert rel_err(mine, seen) < RTOL, name


@pytest.mark.parametrize("form", ["recurrent", "dual"])
@pytest.mark.parametrize("start", [0, 5])
def test_graph_decoder_logic_equals_the_eager_loop(tiny_model, monkeypatch, form, start):
    """The CUDA-graph decoder's start, prefix pass and steps, run eagerly on the CPU (what its
    graphs replay): the same codes as the eager loop with the same uniforms, in float64."""
    from aim_hf import fast_decode

    monkeypatch.setattr(fast_decode, "compiled", lambda fn: fn)
    g = torch.Generator().manual_seed(start)
    labels, scale, n = torch.tensor([1, 4]), 2.0, tiny_model.config.num_tokens
    uniforms = torch.rand(2, n, dtype=torch.float64, generator=g)
    prefix = torch.randint(0, 37, (2, start), generator=g)

    def choose(t, logits):
        return sample_inverse_cdf(filter_logits(logits, 1.0, 0, 1.0), uniforms[:, t])

    eager = tiny_model.decode(labels, prefix, scale, choose)
    decoder = fast_decode.CUDAGraphDecoder(tiny_model, 2, scale, 1.0, 0, 1.0, form)
    assert decoder.fused is None  # float64 weights: the compiled blocks (FusedStep: test_triton_gemv)
    decoder.codes.fill_(-1)
    decoder.start_graph = types.SimpleNamespace(replay=decoder.start)  # what the start graph replays
    decoder.begin(labels, prefix, uniforms[:, start:])
    for _ in range(start + 1, n):
        decoder.step()
    assert torch.equal(decoder.codes, eager)


def count_calls(monkeypatch, name: str) -> list[int]:
    """Counts the calls of ``aim_hf.mamba2.<name>`` (a one-element list, updated in place)."""
    import aim_hf.mamba2

    calls, original = [0], getattr(aim_hf.mamba2, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(aim_hf.mamba2, name, counted)
    return calls


@pytest.mark.parametrize("original_positions", [True, False])
@pytest.mark.parametrize("guidance_scale", [1.0, 1.75])
@pytest.mark.parametrize("form", ["recurrent", "dual"])
def test_decoding_matches_reference(original_positions, guidance_scale, form):
    cfg = ref_config(adaln_group=True, num_groups=2)
    sd = random_original_state_dict(cfg, seed=5)
    model = load_original(sd, dtype=torch.float64)
    model.config.original_decode_positions = original_positions
    model.config.decode_cache = form
    codes = torch.randint(0, 37, (2, 16))
    labels = torch.tensor([1, 4])
    ours = teacher_forced_decode(model, codes, labels, guidance_scale)
    ref = reference_decode_logits(sd, cfg, codes, labels, guidance_scale, original_positions)
    assert rel_err(ours, ref) < RTOL


def test_greedy_and_tiny_top_p_follow_the_argmax(tiny_model):
    labels = [0, 1, 2, 3]
    greedy = tiny_model.generate(labels, guidance_scale=1.0, top_k=1)
    logits = tiny_model(greedy, torch.tensor(labels)).logits
    assert torch.equal(logits.argmax(-1), greedy)
    assert torch.equal(tiny_model.generate(labels, guidance_scale=1.0, top_p=1e-9), greedy)
    guided = tiny_model.generate(labels, guidance_scale=3.0, top_k=1)
    cond = tiny_model(guided, torch.tensor(labels)).logits
    uncond = tiny_model(guided, torch.full((4,), 5)).logits
    assert torch.equal((uncond + 3.0 * (cond - uncond)).argmax(-1), guided)


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (1.0, 10, 0.5)]
)
def test_filter_matches_reference(temperature, top_k, top_p):
    logits = torch.randn(6, 37, dtype=torch.float64, generator=torch.Generator().manual_seed(top_k))
    ours = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
    assert rel_err(ours, reference_sample_filter(logits, temperature, top_k, top_p)) < 1e-12


def test_temperature_changes_entropy():
    logits = torch.randn(4, 37, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def entropy(t):
        p = filter_logits(logits, temperature=t).softmax(-1)
        return -(p * p.log()).sum(-1)

    low, one, high = entropy(0.5), entropy(1.0), entropy(2.0)
    assert (low < one).all() and (one < high).all() and (high < math.log(37)).all()


def test_inverse_cdf_sampling_has_the_right_distribution():
    probs = torch.tensor([0.5, 0.0, 0.3, 0.2, 0.0], dtype=torch.float64)
    n = 20000
    u = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    draws = sample_inverse_cdf(probs.log().expand(n, -1), u)
    freq = torch.bincount(draws, minlength=5).double() / n
    assert freq[1] == 0 and freq[4] == 0  # zero-probability codes are never drawn
    assert (freq - probs).abs().max() < 4 * math.sqrt(0.25 / n)  # four standard deviations
    edge = sample_inverse_cdf(probs.log()[None], torch.tensor([1 - 2**-53], dtype=torch.float64))
    assert edge.item() == 3


def test_same_seed_same_codes_and_per_image_generators(tiny_model):
    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    batch = tiny_model.generate([1, 2, 3], guidance_scale=1.5, generator=gens([10, 11, 12]))
    again = tiny_model.generate([1, 2, 3], guidance_scale=1.5, generator=gens([10, 11, 12]))
    assert torch.equal(batch, again)
    alone = tiny_model.generate([2], guidance_scale=1.5, generator=gens([11]))
    assert torch.equal(alone[0], batch[1])  # an image does not depend on the rest of the batch
    other = tiny_model.generate([1, 2, 3], guidance_scale=1.5, generator=gens([20, 21, 22]))
    assert not torch.equal(other, batch)
    one_gen = tiny_model.generate([1, 2], generator=torch.Generator().manual_seed(0))
    assert torch.equal(one_gen, tiny_model.generate([1, 2], generator=torch.Generator().manual_seed(0)))


def test_numpy_settings_act_as_python_numbers(tiny_model):
    """Settings from NumPy (a sweep over np.linspace, a config loaded with NumPy) are numbers too."""
    settings = dict(guidance_scale=1.5, temperature=0.75, top_k=20, top_p=0.875)  # exact in float32
    expected = tiny_model.generate([1, 2], generator=torch.Generator().manual_seed(0), **settings)
    numpy_settings = {k: (np.int64(v) if isinstance(v, int) else np.float32(v)) for k, v in settings.items()}
    codes = tiny_model.generate([1, 2], generator=torch.Generator().manual_seed(0), **numpy_settings)
    assert torch.equal(codes, expected)


def test_both_cache_forms_generate_the_same_codes(tiny_model, monkeypatch):
    """``generate`` end to end with the dual cache: in float64 its logits equal the recurrent
    form's to ~1e-15, so the same uniforms draw the same codes (guidance and a prefix included)."""

    calls = count_calls(monkeypatch, "ssm_dual_step")

    def run(form):
        monkeypatch.setattr(tiny_model.config, "decode_cache", form)
        gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
        return tiny_model.generate(
            [1, 4], guidance_scale=1.5, generator=gens, prefix=torch.tensor([[3, 7], [0, 1]])
        )

    recurrent = run("recurrent")
    assert calls == [0]
    dual = run("dual")
    assert calls[0] == tiny_model.config.num_hidden_layers * (16 - 2 - 1)  # steps after the prefix
    assert torch.equal(recurrent, dual) and torch.equal(dual[:, :2], torch.tensor([[3, 7], [0, 1]]))


def test_chunked_batches_give_the_same_codes(tiny_model):
    labels = [0, 1, 2, 3, 4]
    whole = tiny_model.generate(labels, guidance_scale=1.5, generator=torch.Generator().manual_seed(3))
    chunked = tiny_model.generate(
        labels, guidance_scale=1.5, generator=torch.Generator().manual_seed(3), max_batch_size=2
    )
    assert torch.equal(whole, chunked)
    numpy_int = tiny_model.generate(
        labels, guidance_scale=1.5, generator=torch.Generator().manual_seed(3), max_batch_size=np.int64(2)
    )
    assert torch.equal(numpy_int, whole)
    with pytest.raises(ValueError, match="max_batch_size must be a positive integer, got 0"):
        tiny_model.generate(labels, max_batch_size=0)
    with pytest.raises(ValueError, match="max_batch_size must be a positive integer, got 0"):
        tiny_model.generate(
            [0], prefix=torch.zeros(1, 16, dtype=torch.long), max_batch_size=0
        )  # nothing to draw


def test_prefix_completion(tiny_model):
    prefix = torch.randint(0, 37, (2, 6))
    out = tiny_model.generate(
        [0, 1], guidance_scale=2.0, prefix=prefix, generator=torch.Generator().manual_seed(0)
    )
    assert out.shape == (2, 16) and torch.equal(out[:, :6], prefix)
    full = torch.randint(0, 37, (2, 16))
    assert torch.equal(tiny_model.generate([0, 1], prefix=full), full)


def test_callback_sees_every_step(tiny_model):
    seen = []
    tiny_model.generate([0], prefix=torch.zeros(1, 3, dtype=torch.long), callback=seen.append)
    assert seen == list(range(3, 16))


def test_guidance_one_skips_the_unconditional_half():
    model = randomize(AiMForImageGeneration(tiny_config()).double()).eval()
    batches = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, i, o: batches.append(o.shape[0]))
    model.generate([0, 1, 2], guidance_scale=1.0)
    model.generate([0, 1, 2], guidance_scale=2.0)
    hook.remove()
    assert set(batches[:16]) == {3} and set(batches[16:]) == {6}


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(class_labels=[5]), r"class label 5 is outside \[0, 5\)"),
        (dict(class_labels=[-1]), "class label -1"),
        (dict(class_labels=[]), "empty"),
        (dict(class_labels=[0.5]), "must be integers"),
        (dict(class_labels=torch.tensor([[0], [1]])), r"one label per image \(1-D\), got shape \(2, 1\)"),
        (
            dict(class_labels=[0], guidance_scale=-1.0),
            r"guidance_scale must be a finite number >= 0 \(at most 1e\+30\), got -1.0",
        ),
        (dict(class_labels=[0], guidance_scale=1e300), "guidance_scale.*got 1e[+]300"),
        (dict(class_labels=[0], guidance_scale=float("nan")), "guidance_scale"),
        (dict(class_labels=[0], guidance_scale=float("inf")), "guidance_scale"),
        (dict(class_labels=[0], temperature=0.0), "temperature must be a finite number > 0, got 0.0"),
        (
            dict(class_labels=[0], temperature=1e-40),
            "temperature=1e-40 with guidance_scale=2.0 scales the logits",
        ),
        (
            dict(class_labels=[0], temperature=1e-8, guidance_scale=1e30),
            "temperature=1e-08 with guidance_scale",
        ),
        (dict(class_labels=[0], temperature=float("inf")), "temperature must be a finite number"),
        (dict(class_labels=[0], guidance_scale=True), "guidance_scale must be a finite number"),
        (dict(class_labels=[0], top_p=True), "top_p must be in"),
        (dict(class_labels=[0], top_k=-1), r"top_k must be an integer in \[0, 37\]"),
        (dict(class_labels=[0], top_k=38), "got 38"),
        (dict(class_labels=[0], top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(class_labels=[0], top_p=1.5), "got 1.5"),
        (
            dict(class_labels=[0], prefix=torch.zeros(1, 17, dtype=torch.long)),
            "17 codes per image; at most 16",
        ),
        (dict(class_labels=[0], prefix=torch.full((1, 3), 37)), r"code 37, outside the codebook \[0, 37\)"),
        (dict(class_labels=[0, 1], prefix=torch.zeros(1, 3, dtype=torch.long)), "1 rows for 2 class labels"),
        (dict(class_labels=[0, 1], generator=[torch.Generator()]), "1 generators for a batch of 2"),
    ],
)
def test_bad_generation_input(tiny_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_model.generate(**kwargs)


def test_generate_checks_the_config_and_where_the_weights_are(tiny_model):
    """A setting changed after loading is checked before use (an int8 state ran and decoded other
    codes), and a model split or offloaded by a device_map (weights on the meta device or on two
    devices) is refused: decoding reads weights outside forward, where accelerate never moves them."""
    model = copy.deepcopy(tiny_model)
    model.config.state_dtype = "int8"
    with pytest.raises(ValueError, match="state_dtype must be None or one of"):
        model.generate([0])
    model = copy.deepcopy(tiny_model)
    model.model.norm_f.weight = torch.nn.Parameter(torch.empty_like(model.model.norm_f.weight, device="meta"))
    model.hf_device_map = {
        "model.embed_tokens": "cpu",
        "model.norm_f": "disk",
    }  # as from_pretrained leaves it
    with pytest.raises(
        ValueError, match=r"every weight on one device, got \['cpu', 'meta'\].*without device_map"
    ):
        model.generate([0])


def test_graph_decoder_is_not_copied_and_is_freed_by_a_move(tiny_model):
    """A model that sampled on CUDA keeps its CUDA-graph decoder: deepcopy and pickle failed on
    its graphs, and .cpu() (an offload hook) left its cache and graphs on the GPU."""
    model = copy.deepcopy(tiny_model)
    model._graph_decoder = threading.Lock()  # stands for the graphs, which cannot be copied either
    clone = copy.deepcopy(model)
    assert getattr(clone, "_graph_decoder", None) is None and model._graph_decoder is not None
    pickle.dumps(model)
    model.to(torch.float64)
    assert model._graph_decoder is None


def test_training_mode_samples_alike(tiny_model):
    """generate of a model in training mode, gradient checkpointing on, gives the eval codes."""
    model = copy.deepcopy(tiny_model).train()
    model.gradient_checkpointing_enable()
    expected = tiny_model.generate([0, 3], generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.generate([0, 3], generator=torch.Generator().manual_seed(0)), expected)
    assert model.training


def test_memory_held_by_the_allocator_counts_as_free(tiny_model, monkeypatch):
    """What PyTorch's caching allocator holds unused (a VQ decode of 256 images leaves ~25 GiB) is
    free for the next generate: counted only by the device, it split later batches into chunks,
    each size a new graph capture."""
    gib = 2**30

    def fits(device_free: int, reserved: int, allocated: int) -> int:
        fake_cuda_memory(monkeypatch, device_free, reserved, allocated)
        return tiny_model.max_batch_size_for(guided=True)

    all_free = fits(8 * gib, 0, 0)
    assert all_free > 1000
    assert fits(2 * gib, 6 * gib, 0) == all_free  # 6 GiB freed into the allocator's cache
    assert fits(2 * gib, 6 * gib, 4 * gib) == fits(4 * gib, 0, 0)  # 4 GiB of it in use


@pytest.mark.parametrize("form", ["recurrent", "dual"])
def test_compiled_step_equals_the_eager_step(form):
    """The CUDA-graph decoder's compiled functions (fullgraph, Inductor options) on the CPU, where
    the block takes the pure step: one decoding step through them equals the eager step (float32:
    fused and reordered sums, 1e-5 relative) and leaves the same cache; the step's embeddings
    and the index of the code it draws are exact."""
    import shutil

    from aim_hf.fast_decode import compiled, finish, step_embeds
    from aim_hf.modeling_aim import AiMCache, block_step

    if shutil.which("g++") is None:
        pytest.skip("Inductor's CPU backend needs a C++ compiler")
    model = randomize(AiMForImageGeneration(tiny_config())).eval()
    labels, codes = (
        torch.tensor([0, 3]),
        torch.randint(0, 37, (2, 5), generator=torch.Generator().manual_seed(0)),
    )
    caches = [AiMCache(model.config, 2, torch.float32, "cpu", form) for _ in range(2)]
    with torch.no_grad():
        _, groups, final = model.model.condition(labels)
        modulations = model.model.layer_modulations(groups)
        token, position = torch.tensor([1, 2]), torch.tensor([5, 5])
        outputs = []
        for cache, run_block in zip(caches, [block_step, compiled(block_step)], strict=True):
            model.model(codes, labels, cache=cache)
            outputs.append(model.model.step(token, position, modulations, final, cache, run_block))
        stream = torch.randn(2, model.config.hidden_size, generator=torch.Generator().manual_seed(1)) * 3
        finished = compiled(finish)(model.model, stream, final)
        tables = (model.model.embed_tokens.weight, model.model.embed_positions.weight)
        embeds, t = compiled(step_embeds)(tables, codes, torch.tensor(3), 1, True, torch.float64)
    eager, through_compiled = outputs
    assert ((through_compiled - eager).norm() / eager.norm()).item() < 1e-5
    expected = model.model.finish(stream, final)
    assert ((finished - expected).norm() / expected.norm()).item() < 1e-5
    assert embeds.dtype == torch.float64 and t.tolist() == [3]
    tokens = codes[:, 2].repeat(2)  # code t = 2 (3 in the cache), both halves
    assert torch.equal(embeds, model.model.embed(tokens, torch.full((4,), 3)).double())
    for name, tensor in caches[0].tensors.items():
        assert torch.allclose(caches[1].tensors[name], tensor, rtol=1e-5, atol=1e-6), name
