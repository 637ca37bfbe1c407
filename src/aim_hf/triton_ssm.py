"""The decoding step's conv and SSM as Triton kernels, one launch each per layer.

A decoding step is bound by launches at small batch and by the SSM's memory at large batch.
Inductor split the pure step (``mamba2.conv_step`` + ``ssm_step``) into about ten small kernels
and ran the state update at a third of the memory bandwidth (BENCHMARKS.md). Here:

- ``conv_update``: shift of the conv window, the depthwise conv, bias and SiLU for every channel.
- ``ssm_update``: the recurrent form; softplus of dt, a (head_dim-block x state) tile of the state
  updated in registers, stored once in the state's dtype and reduced against C;
  ``ssm_update_gated`` also applies the D skip, the gate and the gated norm's weight, and returns
  the norm's statistic in parts.
- ``ssm_dual_update``: the dual form; appends this position to the history and sums over the
  past positions, which are only read (about half the bytes of the state for 256 tokens).

Each has the contract of its pure reference in ``mamba2`` and computes in float32. They run on
CUDA, also inside the compiled step of the CUDA-graph decoder, and on the CPU under Triton's
interpreter (``TRITON_INTERPRET=1``) for the tests.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .mamba2 import LayerCache

try:
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:
    TRITON_AVAILABLE = False

if TRITON_AVAILABLE:

    @triton.jit
    def _softplus(v):
        return tl.where(v > 20.0, v, tl.log(1.0 + tl.exp(v)))  # torch's threshold

    @triton.jit
    def _conv_update_kernel(
        xbc_ptr, conv_ptr, w_ptr, bias_ptr, out_ptr, channels,
        x_b, x_c, s_b, s_c, s_k, w_c, w_k, o_b, o_c,
        K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, HAS_BIAS: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)  # 64-bit offsets: a layer's cache can pass 2^31 elements
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        k = tl.arange(0, BLOCK_K)
        valid = (c < channels)[:, None] & (k < K)[None, :]
        window = c[:, None] * s_c + k[None, :] * s_k + row * s_b
        older = tl.load(conv_ptr + window + s_k, mask=valid & (k < K - 1)[None, :], other=0.0)
        w = tl.load(w_ptr + c[:, None] * w_c + k[None, :] * w_k, mask=valid, other=0.0)
        new = tl.load(xbc_ptr + row * x_b + c * x_c, mask=c < channels, other=0.0)
        window_values = tl.where((k == K - 1)[None, :], new[:, None], older)
        tl.debug_barrier()  # every read of the old window before any write of the new one
        tl.store(conv_ptr + window, window_values, mask=valid)
        acc = tl.sum(window_values.to(tl.float32) * w.to(tl.float32), axis=1)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + c, mask=c < channels, other=0.0).to(tl.float32)
        out = acc / (1.0 + tl.exp(-acc))
        tl.store(out_ptr + row * o_b + c * o_c, out.to(out_ptr.dtype.element_ty), mask=c < channels)

    @triton.jit
    def _ssm_update_kernel(
        state_ptr, x_ptr, dt_ptr, dt_bias_ptr, a_log_ptr, b_ptr, c_ptr, y_ptr, d_ptr, z_ptr, nw_ptr, sq_ptr,
        heads, heads_per_group, P, N,
        s_b, s_h, s_p, s_n, x_b, x_h, x_p, dt_b, dt_h, b_b, b_g, b_n, c_b, c_g, c_n, y_b, y_h, y_p,
        z_b, z_h, z_p, sq_b,
        BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, GATED: tl.constexpr, PDL: tl.constexpr, EARLY: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0).to(tl.int64)
        batch, head = pid // heads, pid % heads
        group = head // heads_per_group
        p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        n = tl.arange(0, BLOCK_N)
        rows, cols = p < P, n < N
        # the state and the weights before the wait (PDL): written two or more kernels earlier
        offsets = batch * s_b + head * s_h + p[:, None] * s_p + n[None, :] * s_n
        tile = rows[:, None] & cols[None, :]
        state = tl.load(state_ptr + offsets, mask=tile, other=0.0).to(tl.float32)
        dt_bias = tl.load(dt_bias_ptr + head).to(tl.float32)
        A = tl.exp(tl.load(a_log_ptr + head).to(tl.float32))
        if PDL:
            if EARLY:  # out_proj reads before its wait only what the kernel three back wrote (pdl_launch)
                tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
            if not EARLY:
                tl.extra.cuda.gdc_launch_dependents()
        dt = _softplus(tl.load(dt_ptr + batch * dt_b + head * dt_h).to(tl.float32) + dt_bias)
        decay = tl.exp(-dt * A)
        x = tl.load(x_ptr + batch * x_b + head * x_h + p * x_p, mask=rows, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + batch * b_b + group * b_g + n * b_n, mask=cols, other=0.0).to(tl.float32)
        c = tl.load(c_ptr + batch * c_b + group * c_g + n * c_n, mask=cols, other=0.0).to(tl.float32)
        state = state * decay + (dt * x)[:, None] * b[None, :]
        tl.store(state_ptr + offsets, state.to(state_ptr.dtype.element_ty), mask=tile)
        y = tl.sum(state * c[None, :], axis=1)
        if GATED:  # the D skip and the gate of the norm that follows: (y + D x) * silu(z)
            z = tl.load(z_ptr + batch * z_b + head * z_h + p * z_p, mask=rows, other=0.0).to(tl.float32)
            y = (y + tl.load(d_ptr + head).to(tl.float32) * x) * (z / (1.0 + tl.exp(-z)))
            # the norm's statistic in parts (one a program, summed by out_proj) and its weight
            tl.store(
                sq_ptr + batch * sq_b + head * tl.num_programs(1) + tl.program_id(1), tl.sum(y * y, axis=0)
            )
            y *= tl.load(nw_ptr + head * P + p, mask=rows, other=0.0).to(tl.float32)
        tl.store(y_ptr + batch * y_b + head * y_h + p * y_p, y.to(y_ptr.dtype.element_ty), mask=rows)

    @triton.jit
    def _ssm_dual_update_kernel(
        xs_ptr, bs_ptr, dts_ptr, ld_ptr, length_ptr, x_ptr, dt_ptr, dt_bias_ptr, a_log_ptr, b_ptr, c_ptr, y_ptr,
        heads_per_group, P, N, capacity,
        xs_b, xs_t, xs_h, xs_p, bs_b, bs_t, bs_g, bs_n, d_b, d_t, d_h,
        x_b, x_h, x_p, dt_b, dt_h, b_b, b_g, b_n, c_b, c_g, c_n, y_b, y_h, y_p,
        BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
    ):  # fmt: skip
        # the head blocks of a row are neighbours in launch order: B of the row's past positions,
        # which every head block of a group reads, comes from L2 after the first
        row = tl.program_id(1).to(tl.int64)
        first = tl.program_id(0) * BLOCK_H
        h = first + tl.arange(0, BLOCK_H)  # BLOCK_H divides heads_per_group: one group per program
        group = first // heads_per_group
        p = tl.arange(0, BLOCK_P)
        n = tl.arange(0, BLOCK_N)
        pm, nm = p < P, n < N
        t = tl.load(length_ptr)
        dt = _softplus(tl.load(dt_ptr + row * dt_b + h * dt_h).to(tl.float32) + tl.load(dt_bias_ptr + h))
        previous = tl.load(ld_ptr + row * d_b + tl.maximum(t - 1, 0) * d_t + h * d_h)
        log_decay = tl.where(t > 0, previous, 0.0) - dt * tl.exp(tl.load(a_log_ptr + h).to(tl.float32))
        x_tile = h[:, None] * x_h + p[None, :] * x_p
        x = tl.load(x_ptr + row * x_b + x_tile, mask=pm[None, :], other=0.0)
        b = tl.load(b_ptr + row * b_b + group * b_g + n * b_n, mask=nm, other=0.0)
        c = tl.load(c_ptr + row * c_b + group * c_g + n * c_n, mask=nm, other=0.0).to(tl.float32)
        # append position t (never past the history's end); the sum below reads only positions
        # before it, so no program reads what another writes in this launch
        inside = tl.full((BLOCK_H,), 1, tl.int1) & (t < capacity)  # (BLOCK_H,): per head
        tl.store(
            xs_ptr + row * xs_b + t * xs_t + h[:, None] * xs_h + p[None, :] * xs_p,
            x.to(xs_ptr.dtype.element_ty), mask=inside[:, None] & pm[None, :],
        )  # fmt: skip
        tl.store(dts_ptr + row * d_b + t * d_t + h * d_h, dt, mask=inside)
        tl.store(ld_ptr + row * d_b + t * d_t + h * d_h, log_decay, mask=inside)
        if first % heads_per_group == 0:
            b_out = bs_ptr + row * bs_b + t * bs_t + group * bs_g + n * bs_n
            tl.store(
                b_out,
                b.to(bs_ptr.dtype.element_ty),
                mask=nm & (tl.full((BLOCK_N,), 1, tl.int1) & (t < capacity)),
            )
        x = x.to(xs_ptr.dtype.element_ty).to(tl.float32)  # as stored, like the past positions
        b = b.to(bs_ptr.dtype.element_ty).to(tl.float32)
        y = (tl.sum(b * c, axis=0) * dt)[:, None] * x
        # a thread holds every past position of its (head, head_dim) elements: with one warp per
        # four heads, the sum over positions stays inside each thread at every loop step
        for start in range(0, t, BLOCK_T):
            s = start + tl.arange(0, BLOCK_T)
            sm = s < t
            past_b = tl.load(
                bs_ptr + row * bs_b + s[:, None] * bs_t + group * bs_g + n[None, :] * bs_n,
                mask=sm[:, None] & nm[None, :], other=0.0,
            ).to(tl.float32)  # fmt: skip
            scores = tl.sum(past_b * c[None, :], axis=1)  # (BLOCK_T,)
            sh = row * d_b + s[:, None] * d_t + h[None, :] * d_h
            past_ld = tl.load(ld_ptr + sh, mask=sm[:, None], other=0.0)
            past_dt = tl.load(dts_ptr + sh, mask=sm[:, None], other=0.0)
            w = scores[:, None] * tl.exp(log_decay[None, :] - past_ld) * past_dt  # (BLOCK_T, BLOCK_H)
            past_x = tl.load(
                xs_ptr + row * xs_b + s[:, None, None] * xs_t + h[None, :, None] * xs_h + p[None, None, :] * xs_p,
                mask=sm[:, None, None] & pm[None, None, :], other=0.0,
            ).to(tl.float32)  # fmt: skip
            y += tl.sum(w[:, :, None] * past_x, axis=0)
        tl.store(y_ptr + row * y_b + h[:, None] * y_h + p[None, :] * y_p, y, mask=pm[None, :])


def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch: Hopper and later (compute capability 9), and a Triton that
    has it (``gdc_wait``, Triton 3.3 and later)."""
    return (
        TRITON_AVAILABLE
        and hasattr(tl.extra.cuda, "gdc_wait")
        and device.type == "cuda"
        and torch.cuda.get_device_capability(device)[0] >= 9
    )


def pdl_launch(pdl: bool) -> dict:
    """The launch option of a kernel that may start before the previous one ends (programmatic
    dependent launch). Each such kernel here lets the next one start only after its own
    ``gdc_wait``, so it starts once the kernel two back has ended: before its wait it may read
    what that one or earlier ones wrote (weights, caches of the previous step, the residual
    stream before the last kernel), and it writes nothing. The one exception,
    ``ssm_update_gated(..., early=True)``, lets its successor (out_proj) start before its own wait,
    so once the kernel three back (the previous out_proj) has ended; out_proj reads before its wait
    only its weights, the adaLN terms and the residual stream that that kernel wrote."""
    return {"launch_pdl": True} if pdl else {}


def supported(tensor: torch.Tensor) -> bool:
    """Triton present and half or single precision (float64 stays on the pure path)."""
    return TRITON_AVAILABLE and tensor.dtype in (torch.float32, torch.bfloat16, torch.float16)


def conv_update(
    xbc: torch.Tensor, conv: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Same contract as ``mamba2.conv_step``."""
    rows, channels = xbc.shape
    k = conv.shape[-1]
    out = torch.empty_like(xbc)
    block_c = 128
    _conv_update_kernel[(rows, triton.cdiv(channels, block_c))](
        xbc, conv, weight, bias if bias is not None else weight, out, channels,
        *xbc.stride(), *conv.stride(), *weight.stride(), *out.stride(),
        K=k, BLOCK_K=triton.next_power_of_2(k), BLOCK_C=block_c, HAS_BIAS=bias is not None,
    )  # fmt: skip
    return out


def _ssm_update(
    state,
    x,
    dt,
    dt_bias,
    A_log,
    B,
    C,
    gating: tuple | None,
    pdl: bool,
    block_p: int,
    num_warps: int,
    early: bool,
):
    b, h, p, n = state.shape
    block_p = min(block_p, triton.next_power_of_2(p))
    grid = (b * h, triton.cdiv(p, block_p))
    if gating is None:
        y = torch.empty(b, h, p, dtype=torch.float32, device=state.device)
        D, z, norm_weight, squares = A_log, x, A_log, y  # placeholders, not read
    else:
        D, z, norm_weight = gating
        y = torch.empty(b, h, p, dtype=norm_weight.dtype, device=state.device)
        squares = torch.empty(b, grid[0] // b * grid[1], dtype=torch.float32, device=state.device)
    _ssm_update_kernel[grid](
        state, x, dt, dt_bias, A_log, B, C, y, D, z, norm_weight, squares,
        h, h // B.shape[1], p, n,
        *state.stride(), *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *y.stride(), *z.stride(),
        squares.stride(0),
        BLOCK_P=block_p, BLOCK_N=triton.next_power_of_2(n), GATED=gating is not None, PDL=pdl, EARLY=early,
        num_warps=num_warps, **pdl_launch(pdl),
    )  # fmt: skip
    return y, squares


def ssm_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    dt_bias: torch.Tensor,
    A_log: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
) -> torch.Tensor:
    """Same contract as ``mamba2.ssm_step``."""
    return _ssm_update(
        state, x, dt, dt_bias, A_log, B, C, None, pdl=False, block_p=16, num_warps=4, early=False
    )[0]


def ssm_update_gated(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    dt_bias: torch.Tensor,
    A_log: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    z: torch.Tensor,
    norm_weight: torch.Tensor,
    pdl: bool = False,
    block_p: int = 8,
    num_warps: int = 1,
    early: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The state update of ``ssm_update`` with what follows it up to the gated RMSNorm (one group),
    for ``triton_gemv.norm_linear_residual``: ``g = (y + D x) * silu(z)`` with D (h,) and
    z (b, h, p), returned as ``g * norm_weight`` (b, h, p) in the norm weight's dtype, and the
    norm's statistic in parts, (b, parts) float32 sums of ``g**2`` over disjoint channel blocks:
    out_proj then reads the gated input once, in half the bytes for bf16. A program updates
    ``block_p`` rows of a head's (head_dim x state) tile with ``num_warps`` warps: 8 and 1 were
    fastest in AiM-B, -L and -XL's batch-1 steps on an H100 (its only use, in ``FusedStep``), and
    at batch 16 too (4-5% faster than 16 rows and 4 warps for AiM-B and AiM-XL).
    ``early`` (with ``pdl``): the next kernel may launch before this one's wait, so that out_proj's
    weights stream while in_proj ends; by default from 32 heads: at batch 1 AiM-XL was 3% faster,
    AiM-L 1%, AiM-1B unchanged, and AiM-B (24 heads) 0.8% slower (BENCHMARKS.md)."""
    early = state.shape[1] >= 32 if early is None else early
    return _ssm_update(
        state, x, dt, dt_bias, A_log, B, C, (D, z, norm_weight), pdl, block_p, num_warps, early
    )


def ssm_dual_update(
    cache: LayerCache,
    x: torch.Tensor,
    dt: torch.Tensor,
    dt_bias: torch.Tensor,
    A_log: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    block_t: int = 16,
    block_h: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 3,
) -> torch.Tensor:
    """Same contract as ``mamba2.ssm_dual_step``. Launch knobs: ``block_t`` past positions per
    loop step, ``block_h`` heads per program (at most 4 by default, a divisor of a group's heads),
    ``num_warps`` (default one per four heads, which keeps the sum over positions inside each
    thread) and ``num_stages`` (software pipelining of the loop's loads). The defaults were
    fastest for AiM-B and AiM-XL at 512 rows on an H100: 4 heads and 16 positions a program,
    one warp, 0.79-0.86 of the copy bandwidth (BENCHMARKS.md, scripts/benchmark_ssm_kernels.py)."""
    b, h, p = x.shape
    g, n = B.shape[1:]
    if cache.dts.stride() != cache.log_decays.stride():
        raise ValueError("the dual history's dts and log_decays must share one layout")
    block_h = block_h or math.gcd(h // g, 4)
    if (h // g) % block_h:
        raise ValueError(f"block_h={block_h} must divide the {h // g} heads of a group")
    num_warps = num_warps or max(1, block_h // 4)
    y = torch.empty(b, h, p, dtype=torch.float32, device=x.device)
    _ssm_dual_update_kernel[(h // block_h, b)](
        cache.xs, cache.Bs, cache.dts, cache.log_decays, cache.length, x, dt, dt_bias, A_log, B, C, y,
        h // g, p, n, cache.xs.shape[1],
        *cache.xs.stride(), *cache.Bs.stride(), *cache.dts.stride(),
        *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *y.stride(),
        BLOCK_H=block_h, BLOCK_P=triton.next_power_of_2(p), BLOCK_N=triton.next_power_of_2(n), BLOCK_T=block_t,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return y
