"""A decoding step's projections for a few rows: a matrix-vector product per row, optionally
with the RMSNorm before it and the residual add after it folded in.

At batch 1 (2 rows with guidance) a step reads each layer's weights once; cuBLAS runs AiM-XL's
out_proj as a split-K product and a reduction, two launches at about 0.36 of the memory bandwidth
(BENCHMARKS.md). Here one launch: a program owns a block of a few outputs for every row, streams
that block of the weights along the inputs (each weight read once) and sums the products at the
end. A kernel this short is bound by how many loads are in flight, not by arithmetic: a program
keeps one block ahead by hand (its first read before the previous kernel ends, with
programmatic dependent launch), or two ahead through Triton's software pipeline in shared memory,
which frees the registers that limited how many programs an SM holds, or reads all its weights
in one block before the previous kernel ends (``default_launch`` picks, by the projection's
shape). Up to 2 rows a program takes them in float32 multiply-adds (one row a program was 0.44
against 0.55 of the bandwidth for AiM-XL's out_proj at 2 rows, and four a program made AiM-B's
batch-2 step slower); from 3 to ``MAX_ROWS`` rows one program takes them all, padded to 16 or
32, on the tensor cores (``tl.dot``, the input rounded to the weights' dtype), so that the
weights are still read once (``default_rows`` has the one exception).
"""

from __future__ import annotations

import math

import torch

from . import triton_ssm

try:
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:
    TRITON_AVAILABLE = False

MAX_ROWS = 32  # batch 16 with guidance
LONE_ROWS = 2  # a projection outside FusedStep (mamba2's step): above, cuBLAS was as fast (BENCHMARKS.md)
TENSOR_CORE_ROWS = (16, 32)  # rows a program on the tensor cores (tl.dot needs 16 or more)


def default_rows(rows: int, outputs: int, inputs: int) -> int:
    """Rows a program for a projection of ``rows`` rows: 1-2 in multiply-adds, and 3-4 too where
    it narrows (out_proj: two 2-row programs, 4-5% faster at batch 2 than one on the tensor
    cores for AiM-B and -XL; in_proj so too, which then reads its weights twice, made AiM-XL 48%
    slower, BENCHMARKS.md); else all in one program on the tensor cores, padded to 16 or 32."""
    if rows <= 2 or (rows <= 4 and outputs < inputs):
        return 2
    return 16 if rows <= 16 else 32


def default_launch(row_groups: int, outputs: int, inputs: int, rows: int = 2) -> dict:
    """Blocks, pipeline, warps and when the next kernel may launch, for a projection of this shape
    with ``rows`` rows a program: fastest in decoding steps of AiM-B, -L, -XL and -1B at 2 rows on
    an H100 (BENCHMARKS.md).

    On the tensor cores (``rows`` 16 or 32), blocks of 256 inputs (512 for one that narrows)
    through Triton's pipeline: in_proj about 200 programs of 16 or 32 outputs and four warps
    (each program reads all rows of the input: for AiM-XL at 32 rows 98 KB a program, 40 MB
    over 403 programs of 16 outputs against 20 MB of weights; 32 outputs were 8% faster than 16
    for AiM-XL at batch 16 and 4% slower for AiM-B), out_proj programs of 16 outputs and two
    warps (2-4% faster than four; BENCHMARKS.md).

    One that widens (in_proj) gets about 800 programs (1600 from 12M weights: AiM-1B; over the
    ``row_groups``, programs that share no rows) of one warp, streaming blocks of 256 inputs
    through Triton's pipeline, two ahead. One that narrows (out_proj) from up to 3072 inputs
    (AiM-B, -L, -XL) gets programs of four outputs and four warps that read all their weights in
    one block before the wait (``block_k`` covers the inputs), while the state update runs; from
    more (AiM-1B: 512 such programs do not fit in one wave, measured slower) about 400 programs of
    two warps with blocks of 1024 inputs, one ahead by hand. ``early``: the next kernel (PDL) may
    launch as soon as this one starts, else when its products are summed; early paid for in_proj
    below 12M weights (AiM-B, -L, -XL: its state update then reads the state sooner) and cost
    elsewhere (the waiting programs hold SM slots this one needs)."""
    padded = 1 << (inputs - 1).bit_length()
    if rows in TENSOR_CORE_ROWS:
        if outputs >= inputs:
            block_n = 1 << max(4, min(6, round(math.log2(outputs / 200))))
            return {
                "block_n": block_n,
                "block_k": min(256, padded),
                "stages": 3,
                "num_warps": 4,
                "early": True,
            }
        return {"block_n": 16, "block_k": min(512, padded), "stages": 3, "num_warps": 2, "early": False}
    if outputs < inputs and inputs <= 3072:
        return {"block_n": 4, "block_k": padded, "stages": 0, "num_warps": 4, "early": False}
    widens = outputs >= inputs
    large = widens and outputs * inputs >= 12_000_000  # AiM-1B's in_proj
    programs, block_k = (1600 if large else 800, 256) if widens else (400, 1024)
    block_n = 1 << max(1, min(5, round(math.log2(max(1.0, row_groups * outputs / programs)))))
    return {
        "block_n": block_n,
        "block_k": min(block_k, padded),
        "stages": 3 if widens else 0,
        "num_warps": 1 if widens else 2,
        "early": widens and not large,
    }


if TRITON_AVAILABLE:

    @triton.jit
    def _inputs(x_ptr, u_ptr, r, k, M, K, x_m, x_k, u_m, u_k, squares, NORM, PARTS, SCALE):
        """A block of the rows' inputs in float32, times the norm's scale; the squares summed in."""
        inputs = (r < M) & (k < K)[None, :]
        x = tl.load(x_ptr + r * x_m + k[None, :] * x_k, mask=inputs, other=0.0).to(tl.float32)
        if NORM and PARTS == 0:  # the rows' statistic from the same reads as the products
            squares += x * x
        if SCALE:
            x *= tl.load(u_ptr + r * u_m + k[None, :] * u_k, mask=inputs, other=0.0).to(tl.float32)
        return x, squares

    @triton.jit
    def _dot(x, w, acc, PRECISION: tl.constexpr):
        """acc + x (rows, k) times w (n, k) transposed on the tensor cores, summed in float32:
        "ieee" for float32 weights (full float32, not TF32); "native" x rounded to the weights'
        dtype and both straight into the tensor cores; "tf32" the same values taken as TF32, which
        holds bf16 and fp16 exactly, under Triton's interpreter (the CPU tests), which multiplies
        a bf16 ``tl.dot``'s bit patterns (triton-lang/triton#11584)."""
        if PRECISION == "ieee":
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        elif PRECISION == "native":
            acc = tl.dot(x.to(w.dtype), tl.trans(w), acc)
        else:
            acc = tl.dot(
                x.to(w.dtype).to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="tf32"
            )
        return acc

    @triton.jit
    def _gemv_kernel(
        x_ptr, u_ptr, w_ptr, c_ptr, res_ptr, gate_ptr, sq_ptr, out_ptr, M, N, K, eps, parts,
        x_m, x_k, u_m, u_k, w_n, w_k, c_m, c_n, r_m, r_n, g_m, g_n, sq_m, o_m, o_n,
        win_ptr, tap_ptr, tb_ptr, first, channels, v_b, v_c, v_k, t_c, t_k,
        nu_ptr, nx_ptr, nsq_ptr, nu_m, nu_n, nx_m, nx_n, nsq_m,
        ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PARTS: tl.constexpr,
        NORM: tl.constexpr, SCALE: tl.constexpr, BIAS: tl.constexpr, RESIDUAL: tl.constexpr, PDL: tl.constexpr,
        STAGES: tl.constexpr, EARLY: tl.constexpr, ONE_BLOCK: tl.constexpr, TAPS: tl.constexpr, BLOCK_T: tl.constexpr, TAP_BIAS: tl.constexpr,
        NEXT: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.arange(0, BLOCK_K)
        r, c = rows[:, None], n[None, :]  # a (rows x outputs) tile
        outputs = (r < M) & (c < N)
        w_block = w_ptr + n[:, None] * w_n + k[None, :] * w_k
        if STAGES == 0:  # one block ahead by hand, the first before the wait; else Triton's pipeline
            w = tl.load(w_block, mask=(n < N)[:, None] & (k < K)[None, :], other=0.0)
        # Before the wait (PDL): the first block of weights (by hand) and the epilogue's operands,
        # written two or more kernels earlier (see triton_ssm.pdl_launch).
        if BIAS:
            bias = tl.load(c_ptr + r * c_m + c * c_n, mask=outputs, other=0.0).to(tl.float32)
        if RESIDUAL:
            gate = tl.load(gate_ptr + r * g_m + c * g_n, mask=outputs, other=0.0).to(tl.float32)
            residual = tl.load(res_ptr + r * r_m + c * r_n, mask=outputs, other=0.0).to(tl.float32)
        if NEXT:
            next_scale = tl.load(nu_ptr + r * nu_m + c * nu_n, mask=outputs, other=0.0).to(tl.float32)
        if TAPS:  # the conv's window (rows, outputs, taps) of the channels among these outputs
            conv = (n >= first) & (n < first + channels)
            j = tl.where(conv, n - first, 0)
            t = tl.arange(0, BLOCK_T)[None, None, :]
            in_window = ((r < M) & conv[None, :])[:, :, None] & (t < TAPS)
            window = win_ptr + r[:, :, None].to(tl.int64) * v_b + j[None, :, None] * v_c + t * v_k
            older = tl.load(window + v_k, mask=in_window & (t < TAPS - 1), other=0.0)
            taps = tl.load(tap_ptr + j[None, :, None] * t_c + t * t_k, mask=in_window, other=0.0).to(
                tl.float32
            )
            if TAP_BIAS:
                tap_bias = tl.load(tb_ptr + j[None, :], mask=conv[None, :], other=0.0).to(tl.float32)
        if PDL:
            tl.extra.cuda.gdc_wait()
            if EARLY:
                tl.extra.cuda.gdc_launch_dependents()
        squares = tl.zeros((ROWS, BLOCK_K), dtype=tl.float32)
        if ONE_BLOCK:  # the program's whole block of weights was read before the wait
            x, squares = _inputs(x_ptr, u_ptr, r, k, M, K, x_m, x_k, u_m, u_k, squares, NORM, PARTS, SCALE)
            if DOT:
                out = _dot(x, w, tl.zeros((ROWS, BLOCK_N), dtype=tl.float32), PRECISION)
            else:
                out = tl.sum(w.to(tl.float32)[None, :, :] * x[:, None, :], axis=2)
        else:
            if DOT:
                acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
            else:
                acc = tl.zeros((ROWS, BLOCK_N, BLOCK_K), dtype=tl.float32)  # summed once, after the loop
            for start in tl.range(0, K, BLOCK_K, num_stages=max(STAGES, 1)):
                k = start + tl.arange(0, BLOCK_K)
                if STAGES == 0:
                    following = (n < N)[:, None] & (k + BLOCK_K < K)[None, :]
                    w_next = tl.load(w_block + (start + BLOCK_K) * w_k, mask=following, other=0.0)
                else:
                    w = tl.load(w_block + start * w_k, mask=(n < N)[:, None] & (k < K)[None, :], other=0.0)
                x, squares = _inputs(
                    x_ptr, u_ptr, r, k, M, K, x_m, x_k, u_m, u_k, squares, NORM, PARTS, SCALE
                )
                if DOT:
                    acc = _dot(x, w, acc, PRECISION)
                else:
                    acc += w.to(tl.float32)[None, :, :] * x[:, None, :]
                if STAGES == 0:
                    w = w_next
            if DOT:
                out = acc
            else:
                out = tl.sum(acc, axis=2)
        if PDL and not EARLY:
            tl.extra.cuda.gdc_launch_dependents()
        if NORM:  # the norm's 1/rms is a per-row factor: applied to the products, not the inputs
            if PARTS:  # the statistic summed from the parts the previous kernel wrote
                part = tl.arange(0, PARTS)[None, :]
                total = tl.sum(
                    tl.load(sq_ptr + r * sq_m + part, mask=(r < M) & (part < parts), other=0.0), axis=1
                )
            else:
                total = tl.sum(squares, axis=1)
            out = out / tl.sqrt(total / K + eps)[:, None]
        if BIAS:
            out += bias
        if RESIDUAL:
            out = residual + gate * out
        if NEXT:  # the next in_proj's input, scaled, and this block's part of its norm's statistic
            tl.store(
                nx_ptr + r * nx_m + c * nx_n, (out * next_scale).to(nx_ptr.dtype.element_ty), mask=outputs
            )
            square_sum = tl.sum(tl.where(outputs, out * out, 0.0), axis=1)
            tl.store(nsq_ptr + rows * nsq_m + tl.program_id(1), square_sum, mask=rows < M)
        if TAPS:  # the conv step and its SiLU, on the outputs rounded to their dtype (as conv_step)
            newest = out.to(out_ptr.dtype.element_ty).to(win_ptr.dtype.element_ty)
            window_values = tl.where(t == TAPS - 1, newest[:, :, None], older)
            tl.debug_barrier()  # every read of the old window before any write of the new one
            tl.store(window, window_values, mask=in_window)
            conv_out = tl.sum(window_values.to(tl.float32) * taps, axis=2)
            if TAP_BIAS:
                conv_out += tap_bias
            out = tl.where(conv[None, :], conv_out / (1.0 + tl.exp(-conv_out)), out)
        tl.store(out_ptr + r * o_m + c * o_n, out.to(out_ptr.dtype.element_ty), mask=outputs)

    # Under Triton's interpreter (TRITON_INTERPRET, any value Triton takes) triton.jit makes no JITFunction.
    COMPILED = isinstance(_gemv_kernel, triton.runtime.JITFunction)


def _dot_precision(weight: torch.Tensor) -> str:
    """How ``_dot`` multiplies (see there): half-precision operands go to the tensor cores as they
    are on a GPU (11-13% faster at batch 4 than as TF32, BENCHMARKS.md) and as TF32 under the
    interpreter."""
    if weight.dtype == torch.float32:
        return "ieee"
    return "native" if COMPILED else "tf32"


def supported(rows: int, weight: torch.Tensor, max_rows: int = MAX_ROWS) -> bool:
    """At most ``max_rows`` rows (``MAX_ROWS`` in ``FusedStep``, ``LONE_ROWS`` for a projection
    alone), and weights the Triton kernels take (``triton_ssm.supported``)."""
    return rows <= max_rows and triton_ssm.supported(weight)


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    out: torch.Tensor,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    squares: torch.Tensor | None = None,
    eps: float | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    stages: int | None = None,
    pdl: bool = False,
    rows_per_program: int | None = None,
    early: bool | None = None,
    conv: tuple | None = None,
    next_scale: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m, k = x.shape
    n = weight.shape[0]
    if rows_per_program is None:
        rows_per_program = default_rows(m, n, k)
    if rows_per_program not in (1, 2, 4, *TENSOR_CORE_ROWS):
        raise ValueError(f"rows_per_program must be 1, 2, 4, 16 or 32, got {rows_per_program!r}")
    dot = rows_per_program in TENSOR_CORE_ROWS
    rows = rows_per_program if dot else min(rows_per_program, triton.next_power_of_2(m))
    given = {"block_n": block_n, "block_k": block_k, "num_warps": num_warps, "stages": stages, "early": early}
    launch = default_launch(triton.cdiv(m, rows), n, k, rows) | {
        key: v for key, v in given.items() if v is not None
    }
    scale = scale.expand(m, k) if scale is not None else None  # a shared vector: row stride 0
    unread = x  # placeholder for the pointers a launch does not read
    window, taps, tap_bias, first = conv if conv is not None else (unread, unread, None, 0)
    grid = (triton.cdiv(m, rows), triton.cdiv(n, launch["block_n"]))
    following = next_scale is not None
    if following:  # the next in_proj's scaled input and its statistic, a part a program
        next_scale = next_scale.expand(m, n)
        next_input = torch.empty(m, n, dtype=weight.dtype, device=x.device)
        next_squares = torch.empty(m, grid[1], dtype=torch.float32, device=x.device)
    else:
        next_scale = next_input = next_squares = out  # placeholders, not read
    _gemv_kernel[grid](
        x, unread if scale is None else scale, weight, unread if bias is None else bias,
        unread if residual is None else residual, unread if gate is None else gate,
        unread if squares is None else squares, out,
        m, n, k, 0.0 if eps is None else eps, 0 if squares is None else squares.shape[1],
        *x.stride(), *(x.stride() if scale is None else scale.stride()), *weight.stride(),
        *(out.stride() if bias is None else bias.stride()),
        *(out.stride() if residual is None else residual.stride()),
        *(out.stride() if gate is None else gate.stride()), 0 if squares is None else squares.stride(0),
        *out.stride(),
        window, taps, unread if tap_bias is None else tap_bias, first, taps.shape[0] if conv else 0,
        *(window.stride() if conv else (0, 0, 0)), *(taps.stride() if conv else (0, 0)),
        next_scale, next_input, next_squares, *next_scale.stride(), *next_input.stride(), next_squares.stride(0),
        ROWS=rows, BLOCK_N=launch["block_n"], BLOCK_K=launch["block_k"],
        PARTS=0 if squares is None else triton.next_power_of_2(squares.shape[1]), NORM=eps is not None, SCALE=scale is not None,
        BIAS=bias is not None, RESIDUAL=residual is not None, PDL=pdl,
        STAGES=launch["stages"], num_warps=launch["num_warps"],
        TAPS=window.shape[-1] if conv else 0, BLOCK_T=triton.next_power_of_2(window.shape[-1]) if conv else 1,
        TAP_BIAS=tap_bias is not None, EARLY=launch["early"], NEXT=following,
        DOT=dot, PRECISION=_dot_precision(weight),
        ONE_BLOCK=launch["stages"] == 0 and launch["block_k"] >= k,
        **triton_ssm.pdl_launch(pdl),
    )  # fmt: skip
    return (out, next_input, next_squares) if following else out


def linear(
    x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype | None = None, **launch
) -> torch.Tensor:
    """``F.linear(x, weight)`` (no bias) for x (m, k) with m <= ``MAX_ROWS``, summed in float32 and
    rounded once to ``out_dtype`` (default: the weight's dtype, as cuBLAS does). ``launch``: ``block_n``, ``block_k``,
    ``num_warps``, ``stages`` (0: one block ahead by hand; 2 or more: Triton's pipeline) and
    ``early`` (the default of each from ``default_launch``), ``pdl`` (``pdl_supported``: launched
    while the previous kernel finishes) and ``rows_per_program`` (1, 2 or 4 in multiply-adds, 16
    or 32 on the tensor cores; default ``default_rows``)."""
    out = torch.empty(x.shape[0], weight.shape[0], dtype=out_dtype or weight.dtype, device=x.device)
    return _launch(x, weight, out, **launch)


def norm_linear(
    x: torch.Tensor,
    scale: torch.Tensor | None,
    bias: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    conv: tuple | None = None,
    squares: torch.Tensor | None = None,
    **launch,
) -> torch.Tensor:
    """``rmsnorm(x) * scale`` through ``weight``, plus ``bias``, in one pass over x: in_proj of
    ``modulate(rmsnorm(x) * norm_weight, shift, scale)`` with ``scale = norm_weight * (1 + scale)``
    and ``bias = in_proj(shift)``, both fixed for a generation. x (m, k) float32; scale (m, k)
    or (k,); bias (m, n); the output in the weight's dtype.

    ``conv = (window, taps, tap_bias, first)``: the outputs ``first`` to ``first + channels`` also
    take the depthwise conv step and SiLU (``mamba2.conv_step``: window (m, channels, width)
    updated in place, taps (channels, width), tap_bias (channels,) or None), so that in_proj's
    xBC comes out convolved and the conv needs no kernel of its own.

    ``squares`` (m, parts): x comes scaled already, ``x * scale`` in the weight's dtype, with
    partial sums of the unscaled x**2 whose total is the norm's statistic (from the previous
    out_proj, ``norm_linear_residual(..., next_scale=scale)``), and ``scale`` is None. Each
    program reads the whole input: one vector in bf16 is a quarter of the float32 stream and its
    scale, which were as many bytes as the weights for AiM-XL's in_proj; the batch-1 loop was 2-5%
    faster for AiM-B, -L and -XL (BENCHMARKS.md)."""
    if (scale is None) == (squares is None):
        given = "neither" if scale is None else "both"
        raise ValueError(f"norm_linear takes scale (x unscaled) or squares (x scaled), got {given}")
    out = torch.empty(x.shape[0], weight.shape[0], dtype=weight.dtype, device=x.device)
    return _launch(x, weight, out, scale=scale, bias=bias, squares=squares, eps=eps, conv=conv, **launch)


def norm_linear_residual(
    x: torch.Tensor,
    squares: torch.Tensor,
    weight: torch.Tensor,
    residual: torch.Tensor,
    gate: torch.Tensor,
    eps: float,
    next_scale: torch.Tensor | None = None,
    **launch,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``residual + gate * linear(rmsnorm(g) * norm_weight, weight)`` in float32: out_proj of the
    gated RMSNorm (one group) with the block's residual add, from what ``ssm_update_gated``
    returns: x = g * norm_weight (m, k) and ``squares`` (m, parts), partial sums of g**2 whose
    total is the norm's statistic. residual and gate (m, n).

    ``next_scale`` (m, n) or (n,), the next layer's in_proj scale: returns (out, out * next_scale
    in the weight's dtype, the partial sums of out**2 (m, parts)), the input of
    ``norm_linear(..., squares=...)``."""
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32, device=x.device)
    return _launch(
        x,
        weight,
        out,
        residual=residual,
        gate=gate,
        squares=squares,
        eps=eps,
        next_scale=next_scale,
        **launch,
    )
