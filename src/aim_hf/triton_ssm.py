"""The decoding step's SSM state update as one Triton kernel.

At large batch a decoding step is bound by the recurrent state, which it must read and write
once. Inductor's fusion of the pure step (``mamba2.ssm_step``) ran at about a third of the memory
bandwidth on an H100 (BENCHMARKS.md); this kernel updates a (head_dim-block x state_size) tile of
the state in registers, stores it once in the state's dtype and reduces it against C for the
output, computing in float32 like the pure step. It is used on CUDA, also inside the compiled
step of the CUDA-graph decoder; the pure step stays the reference.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:
    TRITON_AVAILABLE = False

if TRITON_AVAILABLE:

    @triton.jit
    def _ssm_update_kernel(
        state_ptr, x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, y_ptr,
        heads, heads_per_group,
        s_b, s_h, s_p, s_n, x_b, x_h, x_p, dt_b, dt_h, b_b, b_g, b_n, c_b, c_g, c_n, y_b, y_h, y_p,
        P: tl.constexpr, N: tl.constexpr, BLOCK_P: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        batch, head = pid // heads, pid % heads
        group = head // heads_per_group
        p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        n = tl.arange(0, N)
        rows = p < P
        dt = tl.load(dt_ptr + batch * dt_b + head * dt_h).to(tl.float32)
        decay = tl.exp(dt * tl.load(a_ptr + head).to(tl.float32))
        x = tl.load(x_ptr + batch * x_b + head * x_h + p * x_p, mask=rows, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + batch * b_b + group * b_g + n * b_n).to(tl.float32)
        c = tl.load(c_ptr + batch * c_b + group * c_g + n * c_n).to(tl.float32)
        offsets = batch * s_b + head * s_h + p[:, None] * s_p + n[None, :] * s_n
        state = tl.load(state_ptr + offsets, mask=rows[:, None], other=0.0).to(tl.float32)
        state = state * decay + (dt * x)[:, None] * b[None, :]
        tl.store(state_ptr + offsets, state.to(state_ptr.dtype.element_ty), mask=rows[:, None])
        y = tl.sum(state * c[None, :], axis=1)
        tl.store(y_ptr + batch * y_b + head * y_h + p * y_p, y, mask=rows)


def supported(state: torch.Tensor, x: torch.Tensor) -> bool:
    """Triton present, CUDA tensors (or the interpreter), half or single precision, and a state
    size that is a power of two (the kernel holds a whole row of the state)."""
    n = state.shape[-1]
    return (
        TRITON_AVAILABLE
        and state.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and x.dtype != torch.float64
        and n & (n - 1) == 0
    )


def ssm_update(
    state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> torch.Tensor:
    """Same contract as ``mamba2.ssm_step``: updates ``state`` (b, h, p, n) in place and returns
    y (b, h, p) in float32; x (b, h, p), dt (b, h) after softplus, A (h,), B and C (b, g, n)."""
    b, h, p, n = state.shape
    y = torch.empty(b, h, p, dtype=torch.float32, device=state.device)
    block_p = min(16, triton.next_power_of_2(p))
    grid = (b * h, triton.cdiv(p, block_p))
    _ssm_update_kernel[grid](
        state, x, dt, A, B, C, y,
        h, h // B.shape[1],
        *state.stride(), *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *y.stride(),
        P=p, N=n, BLOCK_P=block_p,
    )  # fmt: skip
    return y
