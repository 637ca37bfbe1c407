"""A decoding step's draw in one kernel: guidance, temperature, top-k, top-p and the inverse-CDF
draw.

Without top-k or top-p (AiM's default sampling) the draw in PyTorch is about ten small kernels a
step (the guidance, its copy for inspection, the float64 softmax, the cumulative sum, the
search, the gathers of the step's uniform and the write of the code): 40-50 us of AiM-B's
380 us step at batch 1 (BENCHMARKS.md). Here one launch reads both halves of the logits, writes
the guided logits and the code, and reads the step index from the device, so the CUDA graph
replays it as it is; without filters a row is split over several programs, and the last of them
to finish draws. Same draw as ``sampling.sample_inverse_cdf`` of
``filter_logits(guide(logits), temperature, top_k, top_p)``: the same float32 logits and float64
masses; only the order of the float64 sums (and a split row's rescaling of its parts) differs, so
the code moves only if the uniform falls within about 1e-16 of a boundary. Top-k and top-p keep
the codes at or above a threshold logit, as ``filter_logits`` does, but find it without sorting
the vocabulary: by bisection over the logits' order, counting (top-k) or summing the mass
(top-p) above a candidate, with the row in registers. Top-p's mass is summed in float32 in
another order than ``filter_logits``' cumulative sum, so the set differs only where a code's mass
above lies within float32 rounding of top_p; with ties at the k-th largest logit all of them
stay (``filter_logits`` keeps k of them for top-p's mass).
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
        logits_ptr, uniforms_ptr, t_ptr, codes_ptr, guided_ptr, tops_ptr, masses_ptr, arrivals_ptr,
        vocab, chunk, batch, scale, temperature, top_k, top_p, l_b, l_v, u_b, u_t, c_b, c_t, g_b, g_v,
        GUIDED: tl.constexpr, BLOCK: tl.constexpr, TOP_K: tl.constexpr, TOP_P: tl.constexpr, ROW: tl.constexpr,
        SPLITS: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        guided_row = guided_ptr + row * g_b
        part = tl.program_id(1)  # this program's codes: [lo, hi), the whole row without splits
        lo = part * chunk
        hi = tl.minimum(lo + chunk, vocab)
        t = tl.load(t_ptr)
        top = tl.full((), float("-inf"), tl.float32)  # the largest logit / temperature here
        for start in range(lo, hi, BLOCK):
            v = start + tl.arange(0, BLOCK)
            logit = tl.load(logits_ptr + row * l_b + v * l_v, mask=v < hi, other=0.0).to(tl.float32)
            if GUIDED:  # the batch is [conditional; unconditional], as sampling.guide
                uncond = tl.load(logits_ptr + (row + batch) * l_b + v * l_v, mask=v < hi, other=0.0)
                uncond = uncond.to(tl.float32)
                logit = uncond + (logit - uncond) * scale
            tl.store(guided_row + v * g_v, logit, mask=v < hi)
            top = tl.maximum(top, tl.max(tl.where(v < hi, logit / temperature, float("-inf")), axis=0))
        tl.debug_barrier()  # the guided logits written above are read back by other threads
        threshold = tl.full((), float("-inf"), tl.float32)  # codes below it are filtered out
        if TOP_K or TOP_P:  # the whole row in registers: thresholds by bisection, no sort
            v = tl.arange(0, ROW)
            logit = tl.load(guided_row + v * g_v, mask=v < vocab, other=float("-inf")) / temperature
            key = _order_key(logit)
            kept = v < vocab
            if TOP_K:  # the k-th largest logit: the least x with fewer than k logits above it
                at_least = _least_key(key, tl.where(kept, 1.0, 0.0), top_k * 1.0, _order_key(top))
                kept &= key >= at_least
            if TOP_P:  # the least kept logit x whose more likely codes hold less than top_p of the mass
                mass = tl.where(kept, tl.exp(logit - top), 0.0)
                at_least = _least_key(key, mass, top_p * tl.sum(mass, axis=0), _order_key(top))
                kept &= key >= at_least
            threshold = tl.min(tl.where(kept, logit, float("inf")), axis=0)
        mass = tl.zeros((), tl.float64)  # these codes' mass, relative to their own largest logit
        for start in range(lo, hi, BLOCK):
            cdf = _cdf(guided_row, g_v, start, hi, temperature, top, threshold, mass, BLOCK, SPLITS > 1)
            mass = tl.max(cdf, axis=0)
        if SPLITS == 1:
            total, carry, rescale = mass, tl.zeros((), tl.float64), tl.full((), 1.0, tl.float64)
            last = tl.full((), 1, tl.int1)
        else:  # the last program of the row to arrive draws, from every part's largest logit and mass
            tl.store(tops_ptr + row * SPLITS + part, top)
            tl.store(masses_ptr + row * SPLITS + part, mass)
            tl.debug_barrier()  # every thread's stores before the arrival, which releases them
            last = tl.atomic_add(arrivals_ptr + row, 1, sem="acq_rel") == SPLITS - 1
        if last:
            target = tl.load(uniforms_ptr + row * u_b + t * u_t).to(tl.float64)
            if SPLITS > 1:
                tl.store(arrivals_ptr + row, 0)  # zero again for the next draw
                # what other programs wrote is read from L2 (.cg), past any line this SM's L1 kept
                i = tl.arange(0, SPLITS)
                tops = tl.load(tops_ptr + row * SPLITS + i, cache_modifier=".cg")
                masses = tl.load(masses_ptr + row * SPLITS + i, cache_modifier=".cg")
                masses = tl.where(tops > float("-inf"), masses, 0.0)  # a part of -inf logits has none
                top = tl.max(tops, axis=0)
                rescales = tl.exp(tops.to(tl.float64) - top.to(tl.float64))  # to the row's largest logit
                # the parts' cumulative masses in order, one fma each, as the search below continues
                # its part's: so the last code with mass ends exactly at the total
                total = tl.zeros((), tl.float64)
                cumulative = tl.zeros((SPLITS,), tl.float64)
                for j in tl.static_range(SPLITS):
                    total = tl.fma(_element(masses, i, j), _element(rescales, i, j), total)
                    cumulative = tl.where(i == j, total, cumulative)
                target *= total
                # the part that holds the code, as the search below picks a code within it
                passed = tl.sum((cumulative <= target).to(tl.int32), axis=0)
                drawn = tl.minimum(passed, tl.sum((cumulative < total).to(tl.int32), axis=0))
                lo = drawn * chunk
                hi = tl.minimum(lo + chunk, vocab)
                carry = _element(cumulative, i, drawn - 1)  # 0 before the first part
                rescale = _element(rescales, i, drawn)
                top = _element(tops, i, drawn)
            else:
                target *= total
            # The code is the first whose cumulative mass passes the target; should u * total round up
            # to the total, the first to reach it (the last with mass), never a code past it.
            passed = tl.zeros((), tl.int64)
            reached = tl.zeros((), tl.int64)
            running = tl.zeros((), tl.float64)
            for start in range(lo, hi, BLOCK):
                part_cdf = _cdf(
                    guided_row, g_v, start, hi, temperature, top, threshold, running, BLOCK, SPLITS > 1
                )
                cdf = tl.fma(part_cdf, rescale, carry)
                valid = start + tl.arange(0, BLOCK) < hi
                passed += tl.sum(((cdf <= target) & valid).to(tl.int64), axis=0)
                reached += tl.sum(((cdf < total) & valid).to(tl.int64), axis=0)
                running = tl.max(part_cdf, axis=0)
            tl.store(codes_ptr + row * c_b + t * c_t, lo + tl.minimum(passed, reached))

    @triton.jit
    def _cdf(
        guided_ptr, g_v, start, end, temperature, top, threshold, carry, BLOCK: tl.constexpr, L2: tl.constexpr
    ):
        """The cumulative unnormalised mass of one block of codes before ``end`` (none below
        ``threshold``), after ``carry``; one function for both passes, so that the last value equals
        the total exactly. ``L2``: a split row, whose last program reads logits that other
        programs of the launch wrote: read from L2, past any line this SM's L1 kept."""
        v = start + tl.arange(0, BLOCK)
        if L2:
            logit = tl.load(guided_ptr + v * g_v, mask=v < end, other=float("-inf"), cache_modifier=".cg")
        else:
            logit = tl.load(guided_ptr + v * g_v, mask=v < end, other=float("-inf"))
        logit /= temperature
        mass = tl.where(logit >= threshold, tl.exp(logit.to(tl.float64) - top.to(tl.float64)), 0.0)
        return tl.cumsum(mass, axis=0) + carry

    @triton.jit
    def _element(values, index, wanted):
        """values[wanted] of a small vector (``index`` its arange), exactly; 0 where none is."""
        return tl.sum(tl.where(index == wanted, values, 0), axis=0)

    @triton.jit
    def _order_key(x):
        """float32 -> int32 in the same order (finite values and infinities; -0.0 as +0.0)."""
        bits = (x + 0.0).to(tl.int32, bitcast=True)
        return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)

    @triton.jit
    def _least_key(key, weight, limit, upper):
        """The least order key x with ``sum(weight[key > x]) < limit``, by bisection between the
        least key and ``upper`` (where the sum is 0). The sum only grows as x falls, and it
        changes only at the keys, so x is the key of a code; 32 halvings cover every int32."""
        lo = tl.min(key, axis=0).to(tl.int64)
        hi = upper.to(tl.int64)
        for _ in range(32):
            mid = lo + (hi - lo) // 2
            below_limit = tl.sum(tl.where(key > mid, weight, 0.0), axis=0) < limit
            hi = tl.where(below_limit, mid, hi)
            lo = tl.where(below_limit, lo, mid + 1)
        return hi


MAX_FILTERED_VOCAB = 16384  # top-k/top-p hold a row in registers: 32 logits a thread at 16 warps


def filtered(vocab: int, top_k: int, top_p: float) -> bool:
    """Whether top-k or top-p removes any code: then the draw keeps one program a row."""
    return 0 < top_k < vocab or top_p < 1.0


def supported(head: torch.Tensor, top_k: int, top_p: float) -> bool:
    """For logits from ``head`` (the (vocab, d) weight of lm_head): on CUDA with Triton, in half or
    single precision (float64 logits are guided in float64: ``sampling``); with top-k or top-p
    for up to ``MAX_FILTERED_VOCAB`` codes."""
    vocab = head.shape[0]
    fits = not filtered(vocab, top_k, top_p) or vocab <= MAX_FILTERED_VOCAB
    return head.is_cuda and triton_ssm.supported(head) and fits


def draw(
    logits: torch.Tensor,
    uniforms: torch.Tensor,
    t: torch.Tensor,
    codes: torch.Tensor,
    guided: torch.Tensor,
    guidance_scale: float | None,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    block: int | None = None,
    num_warps: int | None = None,
    splits: int | None = None,
    arrivals: torch.Tensor | None = None,
) -> None:
    """``codes[:, t] = sample_inverse_cdf(filter_logits(guide(logits), temperature, top_k, top_p),
    uniforms[:, t])`` and ``guided = guide(logits)`` (float32), in place. logits (2 x batch, vocab) with guidance
    (``guidance_scale`` not None), else (batch, vocab); uniforms (batch, steps) and codes
    (batch, steps) indexed by the step t, a (1,) integer tensor on the device.

    Without top-k or top-p a row's codes are split over ``splits`` programs (a power of two;
    default one per 2048 codes, up to 32): each sums its part's mass, and the last to finish
    draws from the parts' sums and searches its part, so a step waits on one short pass instead of
    three over the whole vocabulary (BENCHMARKS.md); a power of two, as the last program holds the
    parts' sums in one block. ``arrivals`` (batch,) int32 zeros, left zero, counts the finished
    parts (default: allocated per call with more than one part; the decoder keeps one).
    ``block``: codes a pass (default up to 8192, at most a part), ``num_warps`` (default a warp per
    512 codes, up to 16): fastest for AiM's 16384 codes at batch 1-256 on an H100
    (scripts/benchmark_draw.py)."""
    batch, vocab = codes.shape[0], logits.shape[-1]
    row = triton.next_power_of_2(vocab)
    with_filters = filtered(vocab, top_k, top_p)
    top_k = top_k if 0 < top_k < vocab else 0
    if with_filters and vocab > MAX_FILTERED_VOCAB:
        raise ValueError(f"top-k/top-p in the draw kernel take up to {MAX_FILTERED_VOCAB} codes, got {vocab}")
    if splits is None:
        splits = 1 if with_filters else min(32, triton.next_power_of_2(triton.cdiv(vocab, 2048)))
    if splits < 1 or splits & (splits - 1) or (with_filters and splits != 1):
        raise ValueError(f"splits must be a power of two, and 1 with top-k or top-p; got {splits}")
    chunk = triton.cdiv(vocab, splits)
    block = block or min(8192, triton.next_power_of_2(chunk))
    num_warps = num_warps or max(1, min(16, block // 512))
    if splits == 1:  # no parts' sums to pass on: placeholders, not read
        tops = masses = arrivals = guided
    else:
        tops = torch.empty(batch, splits, dtype=torch.float32, device=logits.device)
        masses = torch.empty(batch, splits, dtype=torch.float64, device=logits.device)
        if arrivals is None:
            arrivals = torch.zeros(batch, dtype=torch.int32, device=logits.device)
        if arrivals.shape != (batch,) or arrivals.dtype != torch.int32:
            got = f"{tuple(arrivals.shape)} {arrivals.dtype}"
            raise ValueError(f"arrivals must be (batch,) = ({batch},) int32 zeros, got {got}")
    _draw_kernel[(batch, splits)](
        logits, uniforms, t, codes, guided, tops, masses, arrivals, vocab, chunk, batch,
        1.0 if guidance_scale is None else guidance_scale, temperature, top_k, top_p,
        *logits.stride(), *uniforms.stride(), *codes.stride(), *guided.stride(),
        GUIDED=guidance_scale is not None, BLOCK=block, TOP_K=top_k > 0, TOP_P=top_p < 1.0, ROW=row,
        SPLITS=splits, num_warps=num_warps,
    )  # fmt: skip
