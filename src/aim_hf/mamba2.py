"""The Mamba2 mixer: a pure-PyTorch reference (CPU and GPU) and the mamba-ssm kernels where present.

Parameter names are those of mamba-ssm's ``Mamba2`` so original weights load unchanged. The pure
path is the reference: whole sequences go through a chunked scan (the SSD form); decoding steps
the conv window and either the recurrent state or the dual form's history (``LayerCache``). All
accumulate in float32 for half-precision inputs and keep float64 in float64. On CUDA a decoding
step of the recurrent state runs mamba-ssm's kernels where installed (the eager loop) and this
package's Triton kernels (``triton_ssm``) otherwise, the dual form and compiled steps always the
latter; each is tested against its reference here.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import triton_gemv, triton_ssm
from .configuration_aim import AiMConfig

try:  # optional GPU kernels
    from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    KERNELS_AVAILABLE = True
except ImportError:
    KERNELS_AVAILABLE = False


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half precision, the input's dtype otherwise (float64 stays float64)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def ssd_chunk_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba2's scan over a whole sequence, chunk by chunk.

    Computes ``state_t = exp(dt_t A) state_{t-1} + dt_t x_t B_t^T`` and ``y_t = state_t C_t``
    (the D skip is left to the caller). Inside a chunk it is the quadratic (attention-like) form;
    across chunks the state is carried, so any length works.

    Shapes: x (b, l, h, p), dt (b, l, h) after softplus, A (h,), B and C (b, l, g, n),
    initial_state (b, h, p, n). Returns y (b, l, h, p) and the final state (b, h, p, n), both in
    the compute dtype.
    """
    b, length, h, p = x.shape
    g, n = B.shape[-2:]
    dtype = compute_dtype(x.dtype)
    x, dt, A, B, C = (t.to(dtype) for t in (x, dt, A, B, C))
    # heads share B and C within a group
    B = B.repeat_interleave(h // g, dim=2)
    C = C.repeat_interleave(h // g, dim=2)
    pad = (-length) % chunk_size
    if pad:  # padded steps have dt = 0: no decay and no input, so the final state is unchanged
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    nc = (length + pad) // chunk_size
    x, dt, B, C = (t.reshape(b, nc, chunk_size, *t.shape[2:]) for t in (x, dt, B, C))

    log_decay = torch.cumsum(dt * A, dim=2)  # (b, c, q, h): log of the decay from chunk start to step
    # L[i, j] = exp(log_decay_i - log_decay_j) for j <= i, 0 above the diagonal
    diff = log_decay.unsqueeze(3) - log_decay.unsqueeze(2)  # (b, c, i, j, h)
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=x.device).tril()
    L = torch.exp(diff.masked_fill(~causal[:, :, None], -math.inf))
    scores = torch.einsum("bcihn,bcjhn->bcijh", C, B) * L * dt.unsqueeze(2)
    y = torch.einsum("bcijh,bcjhp->bcihp", scores, x)

    # state contributed by each chunk alone, then carried across chunks
    to_end = torch.exp(log_decay[:, :, -1:] - log_decay) * dt  # (b, c, q, h)
    chunk_states = torch.einsum("bcjh,bcjhp,bcjhn->bchpn", to_end, x, B)
    chunk_decay = torch.exp(log_decay[:, :, -1])  # (b, c, h)
    state = x.new_zeros(b, h, p, n) if initial_state is None else initial_state.to(dtype)
    entering = []
    for c in range(nc):
        entering.append(state)
        state = chunk_decay[:, c, :, None, None] * state + chunk_states[:, c]
    entering = torch.stack(entering, dim=1)  # (b, c, h, p, n)
    y = y + torch.einsum("bcihn,bchpn,bcih->bcihp", C, entering, torch.exp(log_decay))
    y = y.reshape(b, nc * chunk_size, h, p)[:, :length]
    return y, state


class LayerCache(NamedTuple):
    """One layer's part of a decoding cache (``modeling_aim.AiMCache``).

    ``conv`` (b, conv_dim, k) holds the last conv inputs; ``length`` (a 0-d long tensor on the
    device, one for all layers) counts the positions seen: the model's forward sets it and its
    step advances it after the last layer, so a mixer's step reads it but never moves it. The SSM's memory takes one of two forms: the recurrent
    ``state`` (b, h, p, n), read and written every step, or the history of the quadratic ("dual")
    form, written once per position and only read afterwards: ``xs`` (b, T, h, p), ``Bs``
    (b, T, g, n), ``dts`` (b, T, h) after softplus and ``log_decays`` (b, T, h), the running sum
    of ``dt * A``. For 256-token images the history moves about half the bytes of the state.
    """

    conv: torch.Tensor
    length: torch.Tensor
    state: torch.Tensor | None = None
    xs: torch.Tensor | None = None
    Bs: torch.Tensor | None = None
    dts: torch.Tensor | None = None
    log_decays: torch.Tensor | None = None


def softplus_dt(dt: torch.Tensor, dt_bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return F.softplus(dt.to(dtype) + dt_bias.to(dtype))


def conv_step(
    xbc: torch.Tensor, conv: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """One step of the depthwise causal conv and SiLU: appends xbc (b, c) to the window ``conv``
    (b, c, k) in place and returns the activation (b, c) in xbc's dtype, computed in float32."""
    conv.copy_(torch.cat([conv[..., 1:], xbc.unsqueeze(-1).to(conv.dtype)], dim=-1))
    dtype = compute_dtype(xbc.dtype)
    out = (conv.to(dtype) * weight.to(dtype)).sum(-1)
    if bias is not None:
        out = out + bias.to(dtype)
    return F.silu(out).to(xbc.dtype)


def ssm_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    dt_bias: torch.Tensor,
    A_log: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
) -> torch.Tensor:
    """One recurrent step, updating ``state`` (b, h, p, n) in place; returns y (b, h, p).

    x (b, h, p), dt (b, h) before softplus, dt_bias and A_log (h,) (``A = -exp(A_log)``), B and C
    (b, g, n): the mixer's parameters as they are, so that a compiled step launches no kernel to
    prepare them. Computed in float32 (or float64) whatever the state's storage dtype; the D skip
    is left to the caller.
    """
    h, g = x.shape[1], B.shape[1]
    dtype = torch.promote_types(compute_dtype(x.dtype), compute_dtype(state.dtype))
    x, B, C = x.to(dtype), B.to(dtype), C.to(dtype)
    dt = softplus_dt(dt, dt_bias, dtype)
    B = B.repeat_interleave(h // g, dim=1)
    C = C.repeat_interleave(h // g, dim=1)
    decay = torch.exp(-dt * torch.exp(A_log.to(dtype)))
    new = state.to(dtype) * decay[:, :, None, None] + (dt[:, :, None] * x)[..., None] * B[:, :, None, :]
    state.copy_(new)
    return (new * C[:, :, None, :]).sum(-1)  # a plain product-sum, which torch.compile fuses


def ssm_dual_step(
    cache: LayerCache,
    x: torch.Tensor,
    dt: torch.Tensor,
    dt_bias: torch.Tensor,
    A_log: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
) -> torch.Tensor:
    """The same step in the dual form: appends x, B, dt and the log-decay at ``cache.length`` to
    the history, then ``y = sum_s (C . B_s) exp(L_t - L_s) dt_s x_s`` over every position so far.
    Same arguments and result as ``ssm_step``; the reference for ``triton_ssm.ssm_dual_update``."""
    h, g = x.shape[1], B.shape[1]
    dtype = torch.promote_types(compute_dtype(x.dtype), cache.log_decays.dtype)
    dt = softplus_dt(dt, dt_bias, dtype)
    t = cache.length.view(1)
    previous = cache.log_decays.index_select(1, (t - 1).clamp(min=0)).squeeze(1) * (t > 0)
    log_decay = previous - dt * torch.exp(A_log.to(dtype))
    for history, value in zip(
        (cache.xs, cache.Bs, cache.dts, cache.log_decays), (x, B, dt, log_decay), strict=True
    ):
        history.index_copy_(1, t, value.unsqueeze(1).to(history.dtype))
    seen = torch.arange(cache.xs.shape[1], device=x.device) <= t  # (T,)
    scores = torch.einsum("bsgn,bgn->bsg", cache.Bs.to(dtype), C.to(dtype)).repeat_interleave(h // g, dim=2)
    decay = torch.exp(
        (log_decay[:, None] - cache.log_decays.to(dtype)).masked_fill(~seen[:, None], -math.inf)
    )
    weights = scores * decay * cache.dts.to(dtype)  # (b, T, h)
    return torch.einsum("bsh,bshp->bhp", weights, cache.xs.to(dtype))


class GatedRMSNorm(nn.Module):
    """RMSNorm of ``y * silu(z)`` over groups of channels (mamba-ssm's norm_before_gate=False)."""

    def __init__(self, hidden_size: int, group_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.group_size = group_size
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(y.dtype)
        y = y.to(dtype) * F.silu(z.to(dtype))
        grouped = y.unflatten(-1, (-1, self.group_size))
        grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.eps)
        return grouped.flatten(-2) * self.weight.to(dtype)


class Mamba2Mixer(nn.Module):
    """Mamba2's mixer: in_proj -> causal conv + SiLU -> SSM -> gated RMSNorm -> out_proj."""

    def __init__(self, config: AiMConfig):
        super().__init__()
        self.config = config
        d_inner = config.intermediate_size
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.n_groups = config.n_groups
        self.state_size = config.state_size
        self.d_inner = d_inner
        self.conv_dim = d_inner + 2 * config.n_groups * config.state_size
        self.in_proj = nn.Linear(
            config.hidden_size, d_inner + self.conv_dim + self.num_heads, bias=config.use_bias
        )
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            kernel_size=config.conv_kernel,
            groups=self.conv_dim,
            padding=config.conv_kernel - 1,
            bias=config.use_conv_bias,
        )
        self.dt_bias = nn.Parameter(torch.zeros(self.num_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_heads))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        self.norm = GatedRMSNorm(d_inner, d_inner // config.n_groups, config.layer_norm_epsilon)
        self.out_proj = nn.Linear(d_inner, config.hidden_size, bias=config.use_bias)

    def use_kernels(self, tensor: torch.Tensor) -> bool:
        """mamba-ssm's kernels on CUDA, except under torch.compile, which fuses the pure path itself."""
        return (
            KERNELS_AVAILABLE
            and self.config.use_mamba_kernels
            and tensor.is_cuda
            and not torch.compiler.is_compiling()
        )

    def use_triton(self, *tensors: torch.Tensor | None) -> bool:
        """This package's Triton step kernels (``triton_ssm``) on CUDA, compiled or not, when they
        support every given tensor's dtype (a float64 state stays on the pure step)."""
        return (
            self.config.use_triton_kernels
            and tensors[0].is_cuda
            and all(triton_ssm.supported(t) for t in tensors if t is not None)
        )

    def project(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """``layer(x)`` in a decoding step: ``triton_gemv`` for up to ``triton_gemv.LONE_ROWS``
        rows on CUDA (``config.use_projection_kernels``), cuBLAS otherwise."""
        if (
            self.config.use_projection_kernels
            and layer.bias is None
            and self.use_triton(x)
            and triton_gemv.supported(x.shape[0], layer.weight, triton_gemv.LONE_ROWS)
        ):
            return triton_gemv.linear(x, layer.weight)
        return layer(x)

    def _split(self, zxbcdt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.num_heads], dim=-1)

    def _split_xbc(self, xbc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gn = self.n_groups * self.state_size
        x, B, C = torch.split(xbc, [self.d_inner, gn, gn], dim=-1)
        return (
            x.unflatten(-1, (self.num_heads, self.head_dim)),
            B.unflatten(-1, (self.n_groups, self.state_size)),
            C.unflatten(-1, (self.n_groups, self.state_size)),
        )

    def forward(self, hidden_states: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        """A whole sequence (b, l, d). With a ``cache`` (a decoding cache, starting empty) the
        conv window and the SSM's memory after the last position are written into it."""
        b, length, _ = hidden_states.shape
        z, xbc, dt = self._split(self.in_proj(hidden_states))
        xbc_t = xbc.transpose(1, 2)
        if cache is not None:  # keep the last conv_kernel inputs, left-padded with zeros
            k = cache.conv.shape[-1]
            cache.conv.copy_(F.pad(xbc_t, (max(k - length, 0), 0))[..., -k:])
        dtype = compute_dtype(self.A_log.dtype)
        A = -torch.exp(self.A_log.to(dtype))
        want_state = cache is not None and cache.state is not None
        if self.use_kernels(hidden_states):
            xbc = causal_conv1d_fn(
                xbc_t.contiguous(), self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu"
            ).transpose(1, 2)
            x, B, C = self._split_xbc(xbc)
            out = mamba_chunk_scan_combined(
                x, dt, A, B, C, chunk_size=self.config.chunk_size, D=self.D, dt_bias=self.dt_bias,
                dt_softplus=True, return_final_states=want_state,
            )  # fmt: skip
            y, final = out if want_state else (out, None)
        else:
            xbc = F.silu(self.conv1d(xbc_t)[..., :length].transpose(1, 2))
            x, B, C = self._split_xbc(xbc)
            y, final = ssd_chunk_scan(
                x, softplus_dt(dt, self.dt_bias, dtype), A, B, C, self.config.chunk_size
            )
            y = y + x.to(y.dtype) * self.D.to(y.dtype)[:, None]
        if want_state:
            cache.state.copy_(final)
        elif cache is not None:  # the dual form's history of the first ``length`` positions
            dt = softplus_dt(dt, self.dt_bias, cache.log_decays.dtype)
            for history, value in zip(
                (cache.xs, cache.Bs, cache.dts, cache.log_decays),
                (x, B, dt, torch.cumsum(dt * A.to(dt.dtype), dim=1)),
                strict=True,
            ):
                history[:, :length] = value
        y = self.norm(y.flatten(-2), z)
        return self.out_proj(y.to(self.out_proj.weight.dtype))

    def step(self, hidden_states: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        """One decoding step (b, d) -> (b, d), updating the cache in place."""
        z, xbc, dt = self._split(self.project(self.in_proj, hidden_states))
        weight, bias = self.conv1d.weight.squeeze(1), self.conv1d.bias
        if self.use_kernels(hidden_states) and cache.state is not None:
            A = -torch.exp(self.A_log.to(compute_dtype(self.A_log.dtype)))
            xbc = causal_conv1d_update(xbc, cache.conv, weight, bias, activation="silu")
            x, B, C = self._split_xbc(xbc)
            p, n = self.head_dim, self.state_size
            y = selective_state_update(
                cache.state, x, dt[..., None].expand(-1, -1, p), A[:, None, None].expand(-1, p, n), B, C,
                self.D[:, None].expand(-1, p), dt_bias=self.dt_bias[:, None].expand(-1, p), dt_softplus=True,
            )  # fmt: skip
        else:
            triton = self.use_triton(hidden_states, cache.state)
            xbc = (triton_ssm.conv_update if triton else conv_step)(xbc, cache.conv, weight, bias)
            x, B, C = self._split_xbc(xbc)
            if cache.state is not None:
                update = triton_ssm.ssm_update if triton else ssm_step
                y = update(cache.state, x, dt, self.dt_bias, self.A_log, B, C)
            else:
                update = triton_ssm.ssm_dual_update if triton else ssm_dual_step
                y = update(cache, x, dt, self.dt_bias, self.A_log, B, C)
            y = y + x.to(y.dtype) * self.D.to(y.dtype)[:, None]
        y = self.norm(y.flatten(-2), z)
        return self.project(self.out_proj, y.to(self.out_proj.weight.dtype))
