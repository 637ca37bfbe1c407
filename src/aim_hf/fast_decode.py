"""Decoding on CUDA without host synchronisation: the whole step in one CUDA graph.

A decoding step of AiM is a few hundred small kernels; at small batch their launches, not the
GPU, set the pace. Here the blocks are compiled with ``torch.compile`` (one compiled block serves
every layer, since they share code and shapes), and one whole step — embedding, every layer, the
head, guidance, the filters and the draw, the write of the new code and the advance of the step
counter — is captured in a CUDA graph. The loop is then ``graph.replay()`` per code, with no
host synchronisation. Without a prefix the first pass, the class token alone, is a step on an
empty cache too, captured in a second graph with the generation's adaLN terms: an eager forward
of 48 layers took longer on the host (88 ms for AiM-XL) than 60 steps on the GPU. A decoder is
built once per batch shape and sampling setting and reused across calls, so only the first call
pays for compilation and capture.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import triton_gemv, triton_sampling, triton_ssm
from .modeling_aim import AiMCache, AiMForImageGeneration, AiMModel, block_step
from .sampling import filter_logits, guide, sample_inverse_cdf


@functools.cache
def compiled(fn: Callable) -> Callable:
    """``fn`` compiled once: a block's step (the layers share code and shapes, so they share the
    result), or the few operations around the layers, each one fused kernel instead of one per
    operation (about 20 a step). Each batch size, width and dtype is its own specialised graph,
    hence the higher limit. Without padding: Inductor pads the rows of in_proj's output for
    alignment, and then copies the slices that go to the Triton kernels back to the strides they
    were traced with (two kernels a layer, seen in the generated code)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(fn, fullgraph=True, dynamic=False, options={"comprehensive_padding": False})


def step_embeds(
    tables: tuple[torch.Tensor, torch.Tensor],
    codes: torch.Tensor,
    length: torch.Tensor,
    offset: int,
    guided: bool,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A step's input embeddings (``AiMModel.embed``): code t of each image (t = ``length - 1``: the
    cache holds the class token and codes 0..t-1), for both halves with guidance, at its decoding
    position, in ``dtype``; and t + 1 (1,), the code the step draws, taken before the step advances
    ``length``. The (code, position) embedding tables come as tensors, not through the module:
    Dynamo in torch 2.11 skips the checks of a module's parameters while the module's dicts are
    unchanged, so after ``model.to(dtype)`` it reran the graph traced for the old dtype
    (pytorch#163064; seen as wrong logits in tests/test_gpu.py)."""
    t = length.view(1) - 1
    token = codes.index_select(1, t).squeeze(1)
    token = token.repeat(2) if guided else token
    position = (t + offset).expand(token.shape[0])
    return (F.embedding(token, tables[0]) + F.embedding(position, tables[1])).to(dtype), t + 1


def finish(model: AiMModel, stream: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
    """``AiMModel.finish`` in the weights' dtype (``final``'s), the head's input. ``final`` has the
    model's dtype and device, so a cast or moved model fails the guards of ``compiled(finish)``
    (see ``step_embeds``)."""
    return model.finish(stream, final).to(final.dtype)


class FusedStep:
    """A decoding step of up to ``triton_gemv.MAX_ROWS`` rows (batch 16 with guidance) in three
    kernels a layer, for the recurrent cache with one SSM group: in_proj with the residual
    stream's RMSNorm and adaLN before it and the conv step after it folded in (``norm_linear``),
    the state update returning the gated norm's input times its weight and the norm's statistic
    in parts (``ssm_update_gated``), and out_proj with that norm and the residual add folded in
    (``norm_linear_residual``), which also writes the next in_proj's input: the new stream times
    that layer's scale, in the weights' dtype, with its norm's statistic in parts. The adaLN's
    shift and scale enter as ``u = norm weight * (1 + scale)`` and ``c = in_proj(shift)``,
    computed once per generation by ``prepare``. Same values as ``AiMModel.step`` up to float32
    rounding; in bf16 in_proj's input is rounded once (the stream times u, the 1/rms applied to
    the products), where ``AiMModel.step`` rounds the norm, the scale and the shift in turn. On
    Hopper the three are launched early (programmatic dependent launch): each reads its weights,
    and what kernels before the last one wrote, while the last one ends
    (``triton_ssm.pdl_launch``). From 3 rows the projections run on the tensor cores (but
    out_proj at 3-4 rows, ``triton_gemv.default_rows``): at batch 2 to 16 the token loop was
    9-45% faster than with the compiled blocks and cuBLAS on an H200 (BENCHMARKS.md)."""

    def __init__(self, model: AiMForImageGeneration, rows: int):
        config, device = model.config, model.device
        self.model = model
        n_in = model.model.layers[0].mixer.in_proj.weight.shape[0]
        layers, d = config.num_hidden_layers, config.hidden_size
        self.scales = torch.zeros(layers, rows, d, device=device)
        self.shifts = torch.zeros(layers, rows, n_in, device=device)
        self.gates = torch.zeros(layers, rows, d, device=device)
        self.pdl = triton_ssm.pdl_supported(device)

    @staticmethod
    def supported(model: AiMForImageGeneration, rows: int, form: str) -> bool:
        mixer = model.model.layers[0].mixer
        return (
            model.config.use_projection_kernels
            and form == "recurrent"
            and model.config.n_groups == 1
            and mixer.in_proj.bias is None
            and mixer.out_proj.bias is None
            and triton_gemv.supported(rows, mixer.in_proj.weight)
        )

    def prepare(self, modulations: torch.Tensor) -> None:
        """The adaLN of a generation: ``modulations`` (L, rows, 3, d) from ``layer_modulations``.
        ``in_proj(shift)`` in float32 by the step's own product kernel: ``shift @ weight.float().T``
        made a float32 copy of every in_proj each generation (3.6 ms of an AiM-XL image, BENCHMARKS.md)."""
        for i, layer in enumerate(self.model.model.layers):
            shift, scale, gate = modulations[i].unbind(1)
            weight = layer.mixer.in_proj.weight
            self.scales[i] = layer.norm.weight.float() * (1 + scale.float())
            self.shifts[i] = triton_gemv.linear(shift.to(weight.dtype), weight, out_dtype=torch.float32)
            self.gates[i] = gate

    def __call__(self, inputs_embeds: torch.Tensor, final: torch.Tensor, cache: AiMCache) -> torch.Tensor:
        """``AiMModel.step`` for the prepared generation, from the input embeddings (rows, d):
        hidden state (rows, d)."""
        model, pdl = self.model.model, self.pdl
        stream = inputs_embeds.float()
        inputs, scale, parts = stream, self.scales[0], None  # the first in_proj scales the stream itself
        for i, layer in enumerate(model.layers):
            mixer, layer_cache = layer.mixer, cache.layer(i)
            conv = (layer_cache.conv, mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias, mixer.d_inner)
            zxbcdt = triton_gemv.norm_linear(
                inputs, scale, self.shifts[i], mixer.in_proj.weight, layer.norm.eps, conv, parts, pdl=pdl
            )
            z, xbc, dt = mixer._split(zxbcdt)  # xbc convolved
            x, B, C = mixer._split_xbc(xbc)
            gated, squares = triton_ssm.ssm_update_gated(
                layer_cache.state, x, dt, mixer.dt_bias, mixer.A_log, B, C, mixer.D, z.unflatten(-1, x.shape[1:]),
                mixer.norm.weight, pdl=pdl,
            )  # fmt: skip
            out_proj, gate = mixer.out_proj.weight, self.gates[i]
            following = self.scales[i + 1] if i + 1 < len(model.layers) else None  # the next in_proj's scale
            result = triton_gemv.norm_linear_residual(
                gated.flatten(-2), squares, out_proj, stream, gate, mixer.norm.eps, following, pdl=pdl
            )
            stream, inputs, parts = result if following is not None else (result, None, None)
            scale = None
        cache.length.add_(1)
        return compiled(finish)(model, stream, final)


class CUDAGraphDecoder:
    """Generation for one (batch, guidance, filters, cache form) setting on one CUDA device.

    ``run(labels, prefix, uniforms)`` returns the codes (batch, num_tokens). Without a prefix the
    class token is a replay of the start graph; a prefix is an eager pass (its length varies).
    Every later step is a replay of the step graph.
    """

    def __init__(
        self,
        model: AiMForImageGeneration,
        batch: int,
        guidance_scale: float,
        temperature: float,
        top_k: int,
        top_p: float,
        form: str,
    ):
        config = model.config
        self.model = model
        self.guided = guidance_scale != 1.0
        self.settings = (guidance_scale, temperature, top_k, top_p)
        rows = 2 * batch if self.guided else batch
        device, dtype = model.device, model.dtype
        self.cache = AiMCache(config, rows, dtype, device, form)
        self.codes = torch.zeros(batch, config.num_tokens, dtype=torch.long, device=device)
        self.uniforms = torch.zeros(batch, config.num_tokens, dtype=torch.float64, device=device)
        self.offset = int(config.original_decode_positions)
        d = config.hidden_size
        self.modulations = torch.zeros(config.num_hidden_layers, rows, 3, d, dtype=dtype, device=device)
        self.final = torch.zeros(rows, 2, d, dtype=dtype, device=device)
        self.logits = torch.zeros(batch, config.vocab_size, dtype=torch.float32, device=device)  # last step's
        self.labels = torch.zeros(rows, dtype=torch.long, device=device)  # with the unconditional half
        self.fused = FusedStep(model, rows) if FusedStep.supported(model, rows, form) else None
        self.fused_draw = config.use_triton_kernels and triton_sampling.supported(
            model.lm_head.weight, top_k, top_p
        )
        self.arrivals = torch.zeros(batch, dtype=torch.int32, device=device)  # the draw's, kept zero
        self.graph: torch.cuda.CUDAGraph | None = None  # one step
        self.start_graph: torch.cuda.CUDAGraph | None = None  # the class token on an empty cache

    def sample(self, logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        """Guide, filter and draw; the guided logits stay in ``self.logits`` for inspection."""
        guidance_scale, temperature, top_k, top_p = self.settings
        logits = guide(logits, guidance_scale) if self.guided else logits.float()
        self.logits.copy_(logits)
        return sample_inverse_cdf(filter_logits(logits, temperature, top_k, top_p), uniforms)

    def hidden(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """A decoding step from the input embeddings (rows, d): the fused step or the compiled
        blocks."""
        model = self.model.model
        if self.fused is not None:
            return self.fused(inputs_embeds, self.final, self.cache)
        return model.step(
            None, None, self.modulations, self.final, self.cache, compiled(block_step), inputs_embeds
        )

    def draw(self, hidden: torch.Tensor, t: torch.Tensor) -> None:
        """Code t (a (1,) index) from the hidden state into ``codes``: one kernel
        (``triton_sampling``) where it applies, else ``sample``."""
        logits = self.model.lm_head(hidden.to(self.model.lm_head.weight.dtype))
        if self.fused_draw:
            guidance_scale, temperature, top_k, top_p = self.settings
            scale = guidance_scale if self.guided else None
            triton_sampling.draw(
                logits, self.uniforms, t, self.codes, self.logits, scale, temperature, top_k, top_p,
                arrivals=self.arrivals,
            )  # fmt: skip
            return
        code = self.sample(logits, self.uniforms.index_select(1, t).squeeze(1))
        self.codes.index_copy_(1, t, code[:, None])

    def step(self) -> None:
        """Feed code t, sample code t + 1 into ``codes``, advance the cache: all on the device."""
        dtype = torch.float32 if self.fused is not None else self.model.dtype  # the fused step's stream
        model = self.model.model
        tables = (model.embed_tokens.weight, model.embed_positions.weight)
        embeds, t = compiled(step_embeds)(
            tables, self.codes, self.cache.length, self.offset, self.guided, dtype
        )
        self.draw(self.hidden(embeds), t)

    def condition(self, labels: torch.Tensor) -> torch.Tensor:
        """The generation's adaLN terms from its labels (with the unconditional half), kept for
        the steps (and the fused step's folded form); returns the class embedding."""
        model = self.model.model
        c, groups, final = model.condition(labels)
        self.modulations.copy_(model.layer_modulations(groups))
        self.final.copy_(final)
        if self.fused is not None:
            self.fused.prepare(self.modulations)
        return c

    def start(self) -> None:
        """The class token on an empty cache, as a step: the generation's adaLN terms, the cache
        and code 0, from ``labels`` alone (an empty prefix), all on the device."""
        self.cache.reset()
        c = self.condition(self.labels)
        self.draw(self.hidden(c), self.cache.length.new_zeros(1))  # code 0

    def capture(self) -> None:
        """Compile and warm up outside the graphs, then capture the step and the start."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                self.start()
                self.step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph, self.start_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.step()
        with torch.cuda.graph(self.start_graph):
            self.start()

    @torch.no_grad()
    def begin(self, labels: torch.Tensor, prefix: torch.Tensor, uniforms: torch.Tensor) -> None:
        """Fill the cache with the class token and the prefix and draw the first new code: a
        replay of the start graph for an empty prefix, else an eager pass (the prefix length
        varies: not captured)."""
        start = prefix.shape[1]
        labels = self.model.guided_labels(labels) if self.guided else labels
        self.uniforms[:, start:] = uniforms
        self.codes[:, :start] = prefix
        if start == 0:
            self.labels.copy_(labels)
            self.start_graph.replay()
        else:
            self.prefill(labels, prefix)

    def prefill(self, labels: torch.Tensor, prefix: torch.Tensor) -> None:
        """The forward over the class token and the prefix (labels with the unconditional half):
        fills the cache and its length (the step counter) and draws the first new code."""
        start = prefix.shape[1]
        logits = self.model.prefill(labels, prefix, self.cache)
        self.condition(labels)
        self.codes[:, start] = self.sample(logits, self.uniforms[:, start])

    @torch.no_grad()
    def run(
        self,
        labels: torch.Tensor,
        prefix: torch.Tensor,
        uniforms: torch.Tensor,
        callback: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Codes (batch, num_tokens) continuing ``prefix`` with the given uniforms (batch, steps)."""
        if self.graph is None:
            self.capture()
        start = prefix.shape[1]
        self.begin(labels, prefix, uniforms)
        for t in range(start, self.model.config.num_tokens):
            if t > start:
                self.graph.replay()
            if callback is not None:
                callback(t)
        return self.codes.clone()
