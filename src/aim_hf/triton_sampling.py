"""A decoding step's draw in one kernel: guidance, temperature and the inverse-CDF draw.

Without top-k or top-p (AiM's default sampling) the draw in PyTorch is about ten small kernels a
step (the guidance, its copy for inspection, the float64 softmax, the cumulative sum, the
search, the gathers of the step's uniform and the write of the code): 40-50 us of AiM-B's
380 us step at batch 1 (BENCHMARKS.md). Here one program per image reads both halves of the
logits, writes the guided logits and the code, and reads the step index from the device, so
the CUDA graph replays it as it is. Same draw as ``sampling.sample_inverse_cdf`` of
``filter_logits(guide(logits), temperature)``: the same float32 logits and float64 masses; only
the order of the float64 sums differs (the code moves only if the uniform falls within about
1e-16 of a boundary).
"""

from __future__ import annotations

import torch

from . import triton_ssm
from .triton_ssm import TRITON_AVAILABLE

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _draw_kernel(
        logits_ptr, uniforms_ptr, t_ptr, codes_ptr, guided_ptr, vocab, batch, scale, temperature,
        l_b, l_v, u_b, u_t, c_b, c_t, g_b, g_v,
        GUIDED: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        t = tl.load(t_ptr)
        top = tl.full((), float("-inf"), tl.float32)  # the largest logit / temperature
        for start in range(0, vocab, BLOCK):
            v = start + tl.arange(0, BLOCK)
            logit = tl.load(logits_ptr + row * l_b + v * l_v, mask=v < vocab, other=0.0).to(tl.float32)
            if GUIDED:  # the batch is [conditional; unconditional], as sampling.guide
                uncond = tl.load(logits_ptr + (row + batch) * l_b + v * l_v, mask=v < vocab, other=0.0)
                uncond = uncond.to(tl.float32)
                logit = uncond + (logit - uncond) * scale
            tl.store(guided_ptr + row * g_b + v * g_v, logit, mask=v < vocab)
            top = tl.maximum(top, tl.max(tl.where(v < vocab, logit / temperature, float("-inf")), axis=0))
        tl.debug_barrier()  # the guided logits written above are read back by other threads
        total = tl.zeros((), tl.float64)
        for start in range(0, vocab, BLOCK):
            total = tl.max(_cdf(guided_ptr + row * g_b, g_v, start, vocab, temperature, top, total, BLOCK), axis=0)
        target = tl.load(uniforms_ptr + row * u_b + t * u_t).to(tl.float64) * total
        # The code is the first whose cumulative mass passes the target; should u * total round up
        # to the total, the first to reach it (the last with mass), never a code past it.
        passed = tl.zeros((), tl.int64)
        reached = tl.zeros((), tl.int64)
        carry = tl.zeros((), tl.float64)
        for start in range(0, vocab, BLOCK):
            cdf = _cdf(guided_ptr + row * g_b, g_v, start, vocab, temperature, top, carry, BLOCK)
            valid = start + tl.arange(0, BLOCK) < vocab
            passed += tl.sum(((cdf <= target) & valid).to(tl.int64), axis=0)
            reached += tl.sum(((cdf < total) & valid).to(tl.int64), axis=0)
            carry = tl.max(cdf, axis=0)
        tl.store(codes_ptr + row * c_b + t * c_t, tl.minimum(passed, reached))

    @triton.jit
    def _cdf(guided_ptr, g_v, start, vocab, temperature, top, carry, BLOCK: tl.constexpr):
        """The cumulative unnormalised mass of one block of codes, after ``carry``; one function
        for both passes, so that the last value equals the total exactly."""
        v = start + tl.arange(0, BLOCK)
        logit = tl.load(guided_ptr + v * g_v, mask=v < vocab, other=float("-inf"))
        return tl.cumsum(tl.exp((logit / temperature).to(tl.float64) - top.to(tl.float64)), axis=0) + carry


def supported(head: torch.Tensor, top_k: int, top_p: float) -> bool:
    """For logits from ``head`` (the (vocab, d) weight of lm_head): on CUDA with Triton, in half or
    single precision (float64 logits are guided in float64: ``sampling``), and without top-k or
    top-p (those stay on ``sampling`` too)."""
    vocab = head.shape[0]
    return head.is_cuda and triton_ssm.supported(head) and not 0 < top_k < vocab and top_p >= 1.0


def draw(
    logits: torch.Tensor,
    uniforms: torch.Tensor,
    t: torch.Tensor,
    codes: torch.Tensor,
    guided: torch.Tensor,
    guidance_scale: float | None,
    temperature: float,
    block: int | None = None,
    num_warps: int | None = None,
) -> None:
    """``codes[:, t] = sample_inverse_cdf(guide(logits) / temperature, uniforms[:, t])`` and
    ``guided = guide(logits)`` (float32), in place. logits (2 x batch, vocab) with guidance
    (``guidance_scale`` not None), else (batch, vocab); uniforms (batch, steps) and codes
    (batch, steps) indexed by the step t, a (1,) integer tensor on the device. ``block``: codes a
    pass (default up to 8192), ``num_warps`` (default a warp per 512 codes, up to 16): fastest for
    AiM's 16384 codes at batch 1-256 on an H100 (scripts/benchmark_draw.py)."""
    batch, vocab = codes.shape[0], logits.shape[-1]
    block = block or min(8192, triton.next_power_of_2(vocab))
    num_warps = num_warps or max(1, min(16, block // 512))
    _draw_kernel[(batch,)](
        logits, uniforms, t, codes, guided, vocab, batch,
        1.0 if guidance_scale is None else guidance_scale, temperature,
        *logits.stride(), *uniforms.stride(), *codes.stride(), *guided.stride(),
        GUIDED=guidance_scale is not None, BLOCK=block, num_warps=num_warps,
    )  # fmt: skip
