"""Sampling of codes from logits: guidance, temperature, top-k, top-p and inverse-CDF draws.

Draws use uniforms supplied by the caller, so that each image can take its randomness from its
own generator and does not depend on the rest of the batch.
"""

from __future__ import annotations

import math
import numbers

import torch

# Logits are guided and divided by the temperature in float32. While the guidance scale and the
# factor max(guidance_scale, 1) / temperature stay within this bound they stay finite for any logit
# a model gives (|logit| up to 1e8); past it they overflow, and every draw would take the last code.
MAX_LOGIT_SCALE = 1e30


def check_sampling_args(
    guidance_scale: float, temperature: float, top_k: int, top_p: float, vocab_size: int
) -> tuple[float, float, int, float]:
    """The settings as Python numbers (NumPy scalars are accepted); a ValueError names the first
    bad one and its allowed range."""
    if not is_real(guidance_scale) or not 0 <= guidance_scale <= MAX_LOGIT_SCALE:
        raise ValueError(
            f"guidance_scale must be a finite number >= 0 (at most {MAX_LOGIT_SCALE:g}), got {guidance_scale!r}"
        )
    if not is_real(temperature) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if max(guidance_scale, 1.0) / temperature > MAX_LOGIT_SCALE:
        raise ValueError(
            f"temperature={temperature!r} with guidance_scale={guidance_scale!r} scales the logits by more "
            f"than {MAX_LOGIT_SCALE:g}, past float32's range (top_k=1 draws the most likely code)"
        )
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or not 0 <= top_k <= vocab_size:
        raise ValueError(f"top_k must be an integer in [0, {vocab_size}] (0 disables it), got {top_k!r}")
    if not is_real(top_p) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {top_p!r}")
    return float(guidance_scale), float(temperature), int(top_k), float(top_p)


def is_real(value: object) -> bool:
    """A real number (NumPy's too), not a bool, which Python counts as one."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def guide(logits: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance on logits: the batch is [conditional; unconditional]."""
    cond, uncond = logits.to(torch.promote_types(logits.dtype, torch.float32)).chunk(2)
    return uncond + (cond - uncond) * guidance_scale


def filter_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """Temperature, then top-k, then top-p (the smallest set of most likely codes whose mass
    reaches top_p, never empty); filtered-out codes get -inf.

    Both filters keep the codes at or above a threshold logit. With top-k the threshold comes from
    the k largest logits alone (already sorted by ``topk``), so only top-p without top-k sorts the
    whole vocabulary."""
    logits = logits / temperature
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        candidates = torch.topk(logits, top_k, dim=-1).values
    elif top_p < 1.0:
        candidates = torch.sort(logits, dim=-1, descending=True).values
    else:
        return logits
    if top_p < 1.0:
        probs = candidates.softmax(-1)
        beyond = probs.cumsum(-1) - probs >= top_p  # the more likely codes already reach top_p
        candidates = candidates.masked_fill(beyond, math.inf)
    threshold = candidates.min(dim=-1, keepdim=True).values
    return logits.masked_fill(logits < threshold, -math.inf)


def sample_inverse_cdf(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One code per row: the first code whose cumulative probability exceeds the row's uniform.

    Computed in float64 so that ``u * total`` never reaches the total and a zero-probability
    code is never chosen."""
    probs = logits.double().softmax(-1)
    cdf = probs.cumsum(-1)
    target = uniforms.double().unsqueeze(-1) * cdf[..., -1:]
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=logits.shape[-1] - 1)


def draw_uniforms(
    generator: torch.Generator | list[torch.Generator] | None,
    batch_size: int,
    steps: int,
    device: torch.device,
) -> torch.Tensor:
    """Uniforms (batch, steps) in [0, 1): one row per image from its own generator when a list is
    given (as in diffusers), so that an image is the same whatever else is in the batch."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch_size:
            raise ValueError(f"got a list of {len(generator)} generators for a batch of {batch_size} images")
        _check_generators(generator)
        rows = [torch.rand(steps, generator=g, device=g.device, dtype=torch.float64) for g in generator]
        return torch.stack(rows).to(device)
    if generator is not None:
        _check_generators([generator])
    gen_device = generator.device if generator is not None else device
    return torch.rand(batch_size, steps, generator=generator, device=gen_device, dtype=torch.float64).to(
        device
    )


def _check_generators(generators: list) -> None:
    for g in generators:
        if not isinstance(g, torch.Generator):
            raise ValueError(
                f"generator must be a torch.Generator or a list of them, one per image; got {type(g).__name__}"
            )
