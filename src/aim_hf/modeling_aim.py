"""AiM: a class-conditional Mamba2 stack with adaLN-group that predicts VQ codes one at a time."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from diffusers.utils.accelerate_utils import apply_forward_hook
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from . import triton_ssm
from .configuration_aim import CACHE_FORMS, AiMConfig
from .mamba2 import GatedRMSNorm, LayerCache, Mamba2Mixer, compute_dtype
from .memory import free_memory
from .sampling import check_sampling_args, draw_uniforms, filter_logits, guide, sample_inverse_cdf

if TYPE_CHECKING:
    from .fast_decode import CUDAGraphDecoder


@dataclass
class AiMOutput(ModelOutput):
    """``loss`` (cross-entropy against ``labels``) and ``logits`` (batch, length, vocab_size)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class AiMRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(compute_dtype(x.dtype))
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x * self.weight.to(x.dtype)).to(self.weight.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: ``x * (1 + scale) + shift`` with (batch, d) parameters for (batch, [length,] d) x."""
    if x.dim() == 3:
        shift, scale = shift.unsqueeze(1), scale.unsqueeze(1)
    return x * (1 + scale) + shift


DUAL_FROM_ROWS = 64  # see AiMForImageGeneration.cache_form
IGNORE_INDEX = -100  # a target the loss skips, as in transformers' language models


def _integer_tensor(value: object) -> bool:
    return isinstance(value, torch.Tensor) and not value.dtype.is_floating_point and value.dtype != torch.bool


class AiMCache:
    """Everything decoding keeps for one batch, every layer stacked: allocated once per generation
    by the eager loop, kept across calls of the same shapes by the CUDA-graph decoder.

    ``form`` is the SSM's memory (``mamba2.LayerCache``): "recurrent", the state (b, h, p, n) per
    layer, or "dual", the history of the quadratic form for ``config.num_tokens + 1`` positions.
    """

    def __init__(
        self,
        config: AiMConfig,
        batch_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
        form: str = "recurrent",
    ):
        if form not in CACHE_FORMS:
            raise ValueError(f"unknown cache form {form!r}; allowed: {CACHE_FORMS}")
        self.form = form
        self.length = torch.zeros((), dtype=torch.long, device=device)
        shapes = self.shapes(config, batch_size, form)
        dtypes = self.dtypes(config, dtype, form)
        self.tensors = {
            name: torch.zeros(shape, dtype=dtypes[name], device=device) for name, shape in shapes.items()
        }

    @staticmethod
    def shapes(config: AiMConfig, batch_size: int, form: str) -> dict[str, tuple[int, ...]]:
        """Shapes of the cache's tensors (the fields of ``LayerCache``), every layer stacked."""
        n, b, h, p = config.num_hidden_layers, batch_size, config.num_heads, config.head_dim
        conv_dim = config.intermediate_size + 2 * config.n_groups * config.state_size
        shapes = {"conv": (n, b, conv_dim, config.conv_kernel)}
        if form == "recurrent":
            return {**shapes, "state": (n, b, h, p, config.state_size)}
        t = config.num_tokens + 1  # the class token and every code (generation feeds all but the last)
        return {
            **shapes,
            "xs": (n, b, t, h, p),
            "Bs": (n, b, t, config.n_groups, config.state_size),
            "dts": (n, b, t, h),
            "log_decays": (n, b, t, h),
        }

    @staticmethod
    def dtypes(config: AiMConfig, dtype: torch.dtype, form: str) -> dict[str, torch.dtype]:
        """The weights' dtype, but the recurrent state in ``config.state_dtype`` when set, and dt
        and the log-decays in the compute dtype (float32 for half-precision weights)."""
        state = (
            dtype
            if config.state_dtype is None or dtype == torch.float64
            else getattr(torch, config.state_dtype)
        )
        exact = compute_dtype(dtype)
        return {"conv": dtype, "state": state, "xs": dtype, "Bs": dtype, "dts": exact, "log_decays": exact}

    @classmethod
    def row_bytes(cls, config: AiMConfig, dtype: torch.dtype, form: str = "recurrent") -> dict[str, int]:
        """Bytes of each of the cache's tensors for one row (one sequence)."""
        dtypes = cls.dtypes(config, dtype, form)
        return {
            name: math.prod(shape) * dtypes[name].itemsize
            for name, shape in cls.shapes(config, 1, form).items()
        }

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def layer(self, i: int) -> LayerCache:
        return LayerCache(length=self.length, **{name: t[i] for name, t in self.tensors.items()})

    def reset(self) -> None:
        """Empty: no position seen, a zero conv window and state. The dual history needs no
        clearing, since only its first ``length`` positions are read."""
        self.length.zero_()
        for name in ("conv", "state"):
            if name in self.tensors:
                self.tensors[name].zero_()


class AiMBlock(GradientCheckpointingLayer):
    """Residual add (of the previous block's gated output), RMSNorm, adaLN modulation, Mamba2 mixer."""

    def __init__(self, config: AiMConfig):
        super().__init__()
        self.norm = AiMRMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mixer = Mamba2Mixer(config)
        if config.has_layer_tables:
            self.adaln_table = nn.Parameter(torch.zeros(1, 3, config.hidden_size))

    def forward(
        self,
        hidden_states: torch.Tensor,
        gate: torch.Tensor | None,
        residual: torch.Tensor | None,
        modulation: torch.Tensor,
        cache: LayerCache | None = None,
        step: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``hidden_states`` and ``gate`` are the previous block's mixer output and gate (for the
        first block: the embeddings and None); ``modulation`` (batch, 3, d) is this layer's adaLN
        group, to which the block adds its own table here, inside its forward, where FSDP has
        gathered it; ``step`` decodes one token, with the table already added
        (``AiMModel.layer_modulations``, once per generation). Returns this block's mixer output,
        its gate and the residual stream. The gate is applied by the next block, at the residual
        add, so that a compiled decoding step fuses it with the norm instead of launching a kernel
        for it alone after the output projection."""
        if residual is None:  # the residual stream stays in float32
            residual = hidden_states.to(compute_dtype(self.norm.weight.dtype))
        else:
            residual = residual + gate * hidden_states
        if hasattr(self, "adaln_table") and not step:
            modulation = modulation + self.adaln_table
        shift, scale, gate = modulation.unbind(1)
        hidden_states = modulate(self.norm(residual), shift, scale)
        if step:
            hidden_states = self.mixer.step(hidden_states, cache)
        else:
            hidden_states = self.mixer(hidden_states, cache)
        gate = gate.unsqueeze(1) if hidden_states.dim() == 3 else gate
        return hidden_states, gate, residual


def block_step(
    layer: AiMBlock,
    hidden_states: torch.Tensor,
    gate: torch.Tensor | None,
    residual: torch.Tensor | None,
    modulation: torch.Tensor,
    cache: LayerCache,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One block's decoding step, as a plain function so that one compiled copy serves every layer."""
    return layer(hidden_states, gate, residual, modulation, cache, step=True)


class AiMPreTrainedModel(PreTrainedModel):
    config_class = AiMConfig
    config: AiMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["AiMBlock"]

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, AiMModel):
            # adaLN starts at zero modulation (DiT): every block begins as identity
            init.zeros_(module.adaln.weight)
            init.zeros_(module.adaln.bias)
            init.zeros_(module.final_adaln.weight)
            init.zeros_(module.final_adaln.bias)
        elif isinstance(module, Mamba2Mixer):
            # Mamba2's initialisation: dt log-uniform in [1e-3, 1e-1], A in [1, 16], D = 1
            h = module.num_heads
            dt = torch.exp(torch.rand(h) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
            init.copy_(module.dt_bias, dt + torch.log(-torch.expm1(-dt)))
            init.copy_(module.A_log, torch.log(torch.empty(h).uniform_(1, 16)))
            init.ones_(module.D)
            init.normal_(module.in_proj.weight, std=std)
            init.normal_(module.out_proj.weight, std=std / math.sqrt(2 * self.config.num_hidden_layers))
            init.kaiming_uniform_(module.conv1d.weight, a=math.sqrt(5))
            if module.conv1d.bias is not None:
                init.zeros_(module.conv1d.bias)
        elif isinstance(module, AiMBlock) and hasattr(module, "adaln_table"):
            init.normal_(module.adaln_table, std=1 / math.sqrt(self.config.hidden_size))
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, std=std)
        elif isinstance(module, (AiMRMSNorm, GatedRMSNorm)):
            init.ones_(module.weight)


class AiMModel(AiMPreTrainedModel):
    """The Mamba2 stack: embeddings, class conditioning, blocks and the final adaLN layer."""

    def __init__(self, config: AiMConfig):
        super().__init__(config)
        d = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, d)
        self.embed_positions = nn.Embedding(config.num_tokens + 1, d)
        self.embed_classes = nn.Embedding(config.num_classes + 1, d)  # the last row is the null class
        self.adaln = nn.Linear(d, config.adaln_groups * 3 * d)
        self.layers = nn.ModuleList(AiMBlock(config) for _ in range(config.num_hidden_layers))
        self.norm_f = AiMRMSNorm(d, config.layer_norm_epsilon)
        self.final_norm = AiMRMSNorm(d, config.layer_norm_epsilon)
        self.final_adaln = nn.Linear(d, 2 * d)
        self.post_init()

    def condition(self, class_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Class embedding (b, d), adaLN groups (b, G, 3, d) and final (shift, scale) (b, 2, d)."""
        c = self.embed_classes(class_labels)
        groups = self.adaln(F.silu(c)).unflatten(-1, (self.config.adaln_groups, 3, -1))
        final = self.final_adaln(F.silu(c)).unflatten(-1, (2, -1))
        return c, groups, final

    def layer_modulations(self, groups: torch.Tensor) -> torch.Tensor:
        """Each layer's adaLN (shift, scale, gate) (L, b, 3, d): its group's (layer i is in group
        i % G) plus its own table. Both depend on the class only, so decoding adds them once per
        generation instead of once a layer in every step."""
        config = self.config
        layer_groups = torch.arange(config.num_hidden_layers, device=groups.device) % config.adaln_groups
        modulations = groups.index_select(1, layer_groups).transpose(0, 1)
        if config.has_layer_tables:
            modulations = modulations + torch.stack([layer.adaln_table for layer in self.layers])
        return modulations

    def decode_positions(self, start: int, length: int, device: torch.device) -> torch.Tensor:
        """Position ids of codes start..start+length-1 in decoding: those of training, or shifted by
        one as in the original's decoding (``config.original_decode_positions``)."""
        offset = int(self.config.original_decode_positions)
        return torch.arange(start + offset, start + offset + length, device=device)

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The input embeddings of codes at positions (the class token has its own: ``condition``)."""
        return self.embed_tokens(tokens) + self.embed_positions(positions)

    def forward(
        self,
        tokens: torch.Tensor,
        class_labels: torch.Tensor,
        cache: AiMCache | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states (b, 1 + m, d) for the class token followed by ``tokens`` (b, m).

        With a ``cache`` (empty) the decoding state after the last position is written into it.
        ``positions`` are those of ``tokens`` (default ``0..m-1``, training's convention)."""
        c, groups, final = self.condition(class_labels)
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
        hidden_states = torch.cat([c.unsqueeze(1), self.embed(tokens, positions)], dim=1)
        gate = residual = None
        for i, layer in enumerate(self.layers):
            layer_cache = cache.layer(i) if cache is not None else None
            hidden_states, gate, residual = layer(
                hidden_states, gate, residual, groups[:, i % self.config.adaln_groups], layer_cache
            )
        if cache is not None:
            cache.length.fill_(hidden_states.shape[1])
        return self.finish(residual + gate * hidden_states, final)

    def finish(self, stream: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
        """The final norms and adaLN of the residual stream after the last block."""
        h = self.norm_f(stream)
        shift, scale = final.unbind(1)
        return modulate(self.final_norm(h), shift, scale)

    def step(
        self,
        token: torch.Tensor | None,
        position: torch.Tensor | None,
        modulations: torch.Tensor,
        final: torch.Tensor,
        cache: AiMCache,
        run_block: Callable = block_step,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One decoding step: ``token`` (b,) at ``position`` -> hidden state (b, d); ``modulations``
        from ``layer_modulations``, ``final`` from ``condition``. ``run_block`` runs one block's
        step (the CUDA-graph decoder passes a compiled one). ``inputs_embeds`` (b, d) instead of
        ``token`` and ``position``: the class embedding, whose step on an empty cache is the
        forward of the class token alone."""
        hidden_states = self.embed(token, position) if inputs_embeds is None else inputs_embeds
        gate = residual = None
        for i, layer in enumerate(self.layers):
            hidden_states, gate, residual = run_block(
                layer, hidden_states, gate, residual, modulations[i], cache.layer(i)
            )
        cache.length.add_(1)
        return self.finish(residual + gate * hidden_states, final)


class AiMForImageGeneration(AiMPreTrainedModel):
    """AiM with its output head (tied to the code embedding): teacher-forced training and generation.

    ``forward(input_ids, class_labels, labels)`` predicts every code of ``input_ids`` (b, T) from the
    class and the codes before it, so ``transformers.Trainer`` trains it as it is.
    ``generate(class_labels, ...)`` samples new images' codes.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # Trainer passes num_items_in_batch: the loss is then over every counted code of the
    # accumulated (and, in DDP, global) batch, not a mean of micro-batch means
    accepts_loss_kwargs = True

    def __init__(self, config: AiMConfig):
        super().__init__(config)
        self.model = AiMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        class_labels: torch.Tensor,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> AiMOutput | tuple:
        """Teacher forcing: position 0 (the class) predicts code 0, position t code t.

        In training, each label is replaced by the null class with probability
        ``config.class_dropout_prob``, which teaches the unconditional model used for guidance.
        The loss is the mean cross-entropy over the codes of ``labels`` (those of -100 left out),
        or their sum over ``num_items_in_batch`` (Trainer's count over an accumulated batch)."""
        self.check_codes(input_ids, "input_ids", max_length=self.config.num_tokens)
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids holds no codes; teacher forcing predicts at least one")
        if labels is not None:
            self.check_targets(labels, input_ids.shape)
        input_ids = input_ids.long()
        class_labels = self.check_labels(class_labels, input_ids.shape[0]).to(input_ids.device)
        if self.training and self.config.class_dropout_prob > 0:
            drop = torch.rand(class_labels.shape, device=class_labels.device) < self.config.class_dropout_prob
            class_labels = class_labels.masked_fill(drop, self.config.null_class)
        hidden_states = self.model(input_ids[:, :-1], class_labels)
        logits = self.lm_head(hidden_states.to(self.lm_head.weight.dtype))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits.to(compute_dtype(logits.dtype)).flatten(0, 1),
                labels.flatten().to(logits.device, torch.long),
                ignore_index=IGNORE_INDEX,
                reduction="mean" if num_items_in_batch is None else "sum",
            )
            if num_items_in_batch is not None:
                loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device)
        output = AiMOutput(loss=loss, logits=logits)
        return (
            output if (self.config.return_dict if return_dict is None else return_dict) else output.to_tuple()
        )

    # ---- input checks ----
    def check_codes(self, codes: torch.Tensor, name: str, max_length: int) -> None:
        if not _integer_tensor(codes) or codes.dim() != 2:
            shape = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
            raise ValueError(f"{name} must be an integer tensor of shape (batch, length), got {shape}")
        if codes.shape[0] == 0:
            raise ValueError(f"{name} is an empty batch")
        if codes.shape[1] > max_length:
            raise ValueError(f"{name} has {codes.shape[1]} codes per image; at most {max_length} allowed")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.config.vocab_size):
            bad = codes[(codes < 0) | (codes >= self.config.vocab_size)][0].item()
            raise ValueError(f"{name} holds code {bad}, outside the codebook [0, {self.config.vocab_size})")

    def check_targets(self, labels: torch.Tensor, shape: torch.Size) -> None:
        """The loss's targets: codes shaped like ``input_ids``, or IGNORE_INDEX where none counts."""
        if not _integer_tensor(labels) or labels.shape != shape:
            got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(
                f"labels must be an integer tensor shaped like input_ids {tuple(shape)}, got {got}"
            )
        bad = labels[(labels != IGNORE_INDEX) & ((labels < 0) | (labels >= self.config.vocab_size))]
        if bad.numel():
            raise ValueError(
                f"labels hold {bad[0].item()}, outside the codebook [0, {self.config.vocab_size}) "
                f"(and not {IGNORE_INDEX}, which the loss ignores)"
            )

    def check_labels(
        self, class_labels: int | Sequence[int] | torch.Tensor, batch_size: int | None = None
    ) -> torch.Tensor:
        """Class labels as a 1-D long tensor, each in [0, num_classes) (the null class is allowed in
        teacher forcing, where label dropout produces it)."""
        try:
            labels = torch.as_tensor(class_labels)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"class_labels must be integers, got {class_labels!r}") from err
        labels = labels.reshape(1) if labels.dim() == 0 else labels
        if labels.numel() == 0:
            raise ValueError("class_labels is empty: at least one image must be asked for")
        if labels.dim() != 1:
            raise ValueError(
                f"class_labels must be one label per image (1-D), got shape {tuple(labels.shape)}"
            )
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"class_labels must be integers, got dtype {labels.dtype}")
        allowed = self.config.num_classes + (1 if batch_size is not None else 0)
        if labels.min() < 0 or labels.max() >= allowed:
            bad = labels[(labels < 0) | (labels >= allowed)][0].item()
            raise ValueError(f"class label {bad} is outside [0, {allowed})")
        if batch_size is not None and labels.numel() != batch_size:
            raise ValueError(f"got {labels.numel()} class labels for a batch of {batch_size}")
        return labels.long()

    # ---- generation ----
    @apply_forward_hook  # an offload hook (enable_model_cpu_offload) moves the model in for generate too
    @torch.no_grad()
    def generate(
        self,
        class_labels: int | Sequence[int] | torch.Tensor,
        guidance_scale: float | None = None,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        prefix: torch.Tensor | None = None,
        callback: Callable[[int], None] | None = None,
        max_batch_size: int | None = None,
    ) -> torch.Tensor:
        """Sample the codes (b, num_tokens) of one image per class label.

        guidance_scale: classifier-free guidance on logits, ``uncond + s * (cond - uncond)``;
            1 skips the unconditional half. Defaults to ``config.default_guidance_scale``.
        temperature, top_k (0 = off, 1 = greedy), top_p (1 = off): sampling filters.
        generator: a torch.Generator, or one per image so that an image does not depend on the
            rest of the batch.
        prefix: (b, k) codes to continue (e.g. the top rows of an encoded image).
        callback: called with the index of each code after it is sampled (progress bars); for
            a batch split into chunks, during the first chunk.
        max_batch_size: images decoded at once; larger batches run in chunks, with the same
            results since every image's uniforms are drawn before the split. Default: on CUDA,
            what fits in the device's free memory (``max_batch_size_for``); on the CPU, all.
        """
        config = self.config
        guidance_scale = config.default_guidance_scale if guidance_scale is None else guidance_scale
        guidance_scale, temperature, top_k, top_p = check_sampling_args(
            guidance_scale, temperature, top_k, top_p, config.vocab_size
        )
        config.validate()  # settings changed since loading (config.state_dtype = ...) are used here
        labels = self.check_labels(class_labels)
        batch = labels.numel()
        device = self.weights_device()
        labels = labels.to(device)
        if prefix is None:
            prefix = torch.zeros(batch, 0, dtype=torch.long, device=device)
        self.check_codes(prefix, "prefix", max_length=config.num_tokens)
        if prefix.shape[0] != batch:
            raise ValueError(f"prefix has {prefix.shape[0]} rows for {batch} class labels")
        prefix = prefix.to(device=device, dtype=torch.long)
        start = prefix.shape[1]
        uniforms = draw_uniforms(generator, batch, config.num_tokens - start, device)
        if max_batch_size is not None and (
            isinstance(max_batch_size, bool)
            or not isinstance(max_batch_size, numbers.Integral)
            or max_batch_size < 1
        ):
            raise ValueError(f"max_batch_size must be a positive integer, got {max_batch_size!r}")
        if start == config.num_tokens:
            return prefix
        guided = guidance_scale != 1.0
        if max_batch_size is None:
            max_batch_size = self.max_batch_size_for(guided) if device.type == "cuda" else batch
        max_batch_size = int(max_batch_size)
        settings = (guidance_scale, temperature, top_k, top_p)
        chunks = [
            self._sample(labels[i : i + max_batch_size], prefix[i : i + max_batch_size],
                         uniforms[i : i + max_batch_size], settings, callback if i == 0 else None)
            for i in range(0, batch, max_batch_size)
        ]  # fmt: skip
        return torch.cat(chunks)

    def weights_device(self) -> torch.device:
        """The one device decoding runs on: its steps read weights outside ``forward``, where
        accelerate's hooks of a model split or offloaded by a ``device_map`` never move them."""
        if getattr(self, "hf_device_map", None) is not None:  # dispatched by accelerate (0.5 ms to look)
            devices = {p.device for p in self.parameters()}
            if len(devices) != 1 or next(iter(devices)).type == "meta":
                raise ValueError(
                    f"generate needs every weight on one device, got {sorted(map(str, devices))} (a device_map "
                    "that splits or offloads the model): load it without device_map, or use "
                    "AiMPipeline.enable_model_cpu_offload()"
                )
        return self.lm_head.weight.device

    def __getstate__(self) -> dict:
        """Copies and pickles leave the CUDA-graph decoder out (graphs cannot be copied; a copy
        captures its own)."""
        state = dict(super().__getstate__())
        state.pop("_graph_decoder", None)
        return state

    def _apply(self, fn, *args, **kwargs):
        """A move or cast (``.to``, ``.cpu()``, offload hooks) frees the CUDA-graph decoder, whose
        cache and graphs belong to the old weights and would stay on the GPU."""
        self._graph_decoder = None
        return super()._apply(fn, *args, **kwargs)

    def _sample(
        self,
        labels: torch.Tensor,
        prefix: torch.Tensor,
        uniforms: torch.Tensor,
        settings: tuple[float, float, int, float],
        callback: Callable[[int], None] | None,
    ) -> torch.Tensor:
        """One chunk of ``generate``: the CUDA-graph decoder on CUDA, the eager loop elsewhere."""
        guidance_scale, temperature, top_k, top_p = settings
        start = prefix.shape[1]
        if labels.device.type == "cuda" and self.config.use_cuda_graphs:
            decoder = self.graph_decoder(labels.numel(), *settings)
            return decoder.run(labels, prefix, uniforms, callback)

        def choose(t: int, logits: torch.Tensor) -> torch.Tensor:
            token = sample_inverse_cdf(
                filter_logits(logits, temperature, top_k, top_p), uniforms[:, t - start]
            )
            if callback is not None:
                callback(t)
            return token

        return self.decode(labels, prefix, guidance_scale, choose)

    def max_batch_size_for(self, guided: bool) -> int:
        """How many images fit in the free memory of the model's CUDA device: the decoding cache
        (in the form it will take) and the per-row logits work of each image, within 80% of what
        is free (``memory.free_memory``: what PyTorch's allocator holds unused counts as free)."""
        config = self.config
        rows = 2 if guided else 1
        work = (  # logits, prefix pass, each layer's adaLN (AiMModel.layer_modulations)
            config.vocab_size * 32
            + config.num_tokens * config.intermediate_size * 4 * 8
            + config.num_hidden_layers * 3 * config.hidden_size * 4
        )
        free = free_memory(self.device)
        decoder = getattr(self, "_graph_decoder", None)
        if decoder is not None:  # its cache is freed or reused by the next call
            free += decoder.cache.nbytes()

        def fitting(form: str) -> int:
            return int(0.8 * free) // (
                rows * (sum(AiMCache.row_bytes(config, self.dtype, form).values()) + work)
            )

        images = fitting("recurrent")
        if self.cache_form(rows * images, self.device) == "dual":  # about twice the memory a row
            dual = fitting("dual")
            forced = config.decode_cache == "dual"
            # "auto" takes the recurrent form below DUAL_FROM_ROWS rows: a larger chunk may fit so
            images = (
                dual if forced or rows * dual >= DUAL_FROM_ROWS else min(images, (DUAL_FROM_ROWS - 1) // rows)
            )
        return max(1, images)

    def cache_form(self, rows: int, device: torch.device) -> str:
        """``config.decode_cache``; "auto" picks the dual form where it measured faster: in the
        CUDA-graph decoder with the Triton kernels, from ``DUAL_FROM_ROWS`` rows (H100,
        BENCHMARKS.md: at 64 rows 13-16% faster for AiM-XL and within -2%..+6% for AiM-B, 15-48%
        faster at 128-512 rows; 5-17% slower at 32 rows and 31-36% at 2). The eager loop keeps
        the recurrent form and mamba-ssm's kernels."""
        config = self.config
        if config.decode_cache != "auto":
            return config.decode_cache
        graphs = torch.device(device).type == "cuda" and config.use_cuda_graphs
        if graphs and config.use_triton_kernels and triton_ssm.supported(self.lm_head.weight):
            return "dual" if rows >= DUAL_FROM_ROWS else "recurrent"
        return "recurrent"

    def graph_decoder(
        self, batch: int, guidance_scale: float, temperature: float, top_k: int, top_p: float
    ) -> CUDAGraphDecoder:
        """The CUDA-graph decoder for this setting; one is kept (its cache can be large) and
        rebuilt when the batch, the sampling settings, the config (e.g. ``state_dtype``,
        ``original_decode_positions``), the cache form or the weights' storage change."""
        from .fast_decode import CUDAGraphDecoder

        # the graph reads the weights where they were at capture: any move or cast means a new one
        weights = tuple(p.data_ptr() for p in self.parameters())
        form = self.cache_form(2 * batch if guidance_scale != 1.0 else batch, self.device)
        config = self.config.to_json_string(use_diff=False)
        key = (batch, guidance_scale, temperature, top_k, top_p, form, config, weights)
        decoder = getattr(self, "_graph_decoder", None)
        if decoder is None or decoder.key != key:
            self._graph_decoder = None  # free the old cache first
            decoder = CUDAGraphDecoder(self, batch, guidance_scale, temperature, top_k, top_p, form)
            decoder.key = key
            self._graph_decoder = decoder
        return decoder

    def guided_labels(self, class_labels: torch.Tensor) -> torch.Tensor:
        """The rows of classifier-free guidance: [conditional; unconditional (the null class)]."""
        return torch.cat([class_labels, torch.full_like(class_labels, self.config.null_class)])

    def prefill(self, labels: torch.Tensor, prefix: torch.Tensor, cache: AiMCache) -> torch.Tensor:
        """The pass over the class token and the prefix (b, k) that fills the empty ``cache``, for
        ``labels`` of b rows or, guided, 2b (both halves are fed the same codes): the logits of the
        first new code (rows, vocab_size)."""
        positions = self.model.decode_positions(0, prefix.shape[1], prefix.device)
        rows = prefix.repeat(labels.numel() // prefix.shape[0], 1)
        hidden = self.model(rows, labels, cache=cache, positions=positions)
        return self.lm_head(hidden[:, -1].to(self.lm_head.weight.dtype))

    @torch.no_grad()
    def decode(
        self,
        class_labels: torch.Tensor,
        prefix: torch.Tensor,
        guidance_scale: float,
        choose: Callable[[int, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """The cached decoding loop behind ``generate``: one pass over the class token and the prefix
        fills the decoding cache (``cache_form``), then one step per code. ``choose(t, logits)``
        picks code ``t`` (b,) from the guided logits (b, vocab_size); returns the codes
        (b, num_tokens)."""
        config = self.config
        start = prefix.shape[1]
        guided = guidance_scale != 1.0
        labels = self.guided_labels(class_labels) if guided else class_labels
        device = prefix.device
        cache = AiMCache(config, labels.numel(), self.dtype, device, self.cache_form(labels.numel(), device))
        logits = self.prefill(labels, prefix, cache)
        _, groups, final = self.model.condition(labels)
        modulations = self.model.layer_modulations(groups)
        codes = [prefix]
        for t in range(start, config.num_tokens):
            step_logits = guide(logits, guidance_scale) if guided else logits.to(compute_dtype(logits.dtype))
            token = choose(t, step_logits)
            codes.append(token[:, None])
            if t + 1 < config.num_tokens:
                token = token.repeat(2) if guided else token
                position = self.model.decode_positions(t, 1, device).expand(token.shape[0])
                hidden = self.model.step(token, position, modulations, final, cache)
                logits = self.lm_head(hidden.to(self.lm_head.weight.dtype))
        return torch.cat(codes, dim=1)
