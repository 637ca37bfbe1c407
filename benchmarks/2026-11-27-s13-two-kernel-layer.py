"""Session 13 draft, run in session 14 and dropped: a batch-1 layer in two kernels instead of three.

Result (H100, session 14, raw `benchmarks/2026-11-27-h100-s14-two-kernel.log`): correct, and about
twice as slow as the shipped three kernels at every split (AiM-XL 0.44-0.67 s against 0.24 s;
BENCHMARKS.md, "Batch 1: the layer in two kernels, tried and dropped").

The two cards say 56% of AiM-XL's batch-1 step on the H100 is a fixed chain of waits, not bytes
(BENCHMARKS.md, "Generation on an H200 and an H100"): three kernels a layer, each starting its
work when the one before it has ended. Here the state update and out_proj are one kernel, so a
layer has two waits:

- in_proj as shipped (`triton_gemv.norm_linear`, the norm, adaLN and conv folded in);
- `ssm_out`: program (h, q) updates head h's state (both rows), forms the
  gated output g of its 64 channels, and multiplies it by out_proj's columns of head h for the
  q-th block of outputs: a partial sum over one head. The last of a head's programs to arrive
  stores its new state (all compute it; an earlier store could overtake a later read). Its
  weights and the state are read before the PDL wait. Each program then counts itself in on its block's counter; the last of the H
  programs of block q sums the H partials in a fixed order (deterministic, unlike float
  atomics), divides by the gated norm's rms (from the programs' sums of g**2), adds the gated
  result into the residual stream in place, and writes the next in_proj's scaled bf16 input and
  its norm's statistic for that block, as `norm_linear_residual(..., next_scale=...)` does.

No grid barrier and no spinning: the last program of a block finds itself last. The state is
read by each of the Q programs of a head (Q x its bytes, mostly from L2).

Checked here: under Triton's interpreter, four steps of a tiny model (one block, several, a
masked tail) equal AiMModel.step to 2e-7 to 5e-7 relative in float32, as FusedStep does, and
leave the same cache. NOT yet run on a GPU. What the compiler says (Triton 3.9 here, sm_90,
pointers 16-byte aligned and unit strides as the launcher specialises them), AiM-XL's shapes:
256 outputs a program and 8 warps 182 registers a thread, 128 and 8 warps 163, 256 and 16 warps
104, 512 and 16 warps 102, no spills. Each is one program an SM (42-54K of the 64K registers):
AiM-XL's 288 programs at 256 outputs (48 heads x 6 blocks) are more than two waves, its 144 at
512 about one, and none fits beside in_proj's programs. Holding
the state (2 x 64 x 128) and the weights (256 x 64) in registers is what costs; out_proj's block
of weights in shared memory (Gluon or CUDA) would halve it. Expect the sweep below to be slower
unless that changes; it is here to measure, not yet a lead.

    TRITON_INTERPRET=1 python benchmarks/2026-11-27-s13-two-kernel-layer.py --check   # CPU: values
    python benchmarks/2026-11-27-s13-two-kernel-layer.py AiM-B AiM-XL                 # GPU: values, A/B
"""

from __future__ import annotations

import functools
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, "src")
from aim_hf import fast_decode, triton_gemv, triton_ssm  # noqa: E402
from aim_hf.fast_decode import FusedStep, compiled, finish  # noqa: E402
from aim_hf.modeling_aim import AiMCache  # noqa: E402

PDL_AVAILABLE = hasattr(tl.extra.cuda, "gdc_wait")


@triton.jit
def _head_row(state, r, h, p1, n1, M, P, N, x_ptr, dt_ptr, b_ptr, c_ptr, z_ptr, x_b, x_h, x_p, dt_b, dt_h,
              b_b, b_n, c_b, c_n, z_b, z_h, z_p, dt_bias, A, skip):  # fmt: skip
    """One row of a head: its new state (float32) and the gated output g = (y + D x) silu(z)."""
    valid = r < M
    dt = tl.load(dt_ptr + r * dt_b + h * dt_h, mask=valid, other=0.0).to(tl.float32) + dt_bias
    dt = triton_ssm._softplus(dt)
    x = tl.load(x_ptr + r * x_b + h * x_h + p1 * x_p, mask=(p1 * 0 + r < M) & (p1 < P), other=0.0).to(tl.float32)
    z = tl.load(z_ptr + r * z_b + h * z_h + p1 * z_p, mask=(p1 * 0 + r < M) & (p1 < P), other=0.0).to(tl.float32)
    b = tl.load(b_ptr + r * b_b + n1 * b_n, mask=(n1 * 0 + r < M) & (n1 < N), other=0.0).to(tl.float32)
    c = tl.load(c_ptr + r * c_b + n1 * c_n, mask=(n1 * 0 + r < M) & (n1 < N), other=0.0).to(tl.float32)
    new = state.to(tl.float32) * tl.exp(-dt * A) + (dt * x)[:, None] * b[None, :]
    y = tl.sum(new * c[None, :], axis=1)
    return new, (y + skip * x) * (z / (1.0 + tl.exp(-z)))


@triton.jit
def _ssm_out_kernel(
    state_ptr, x_ptr, dt_ptr, dt_bias_ptr, a_log_ptr, b_ptr, c_ptr, d_ptr, z_ptr, nw_ptr, w_ptr,
    part_ptr, sq_ptr, count_ptr, head_count_ptr, stream_ptr, gate_ptr, nu_ptr, nx_ptr, nsq_ptr,
    M, H, P, N, OUT, eps,
    s_b, s_h, s_p, s_n, x_b, x_h, x_p, dt_b, dt_h, b_b, b_n, c_b, c_n, z_b, z_h, z_p, w_n, w_k,
    st_b, g_b, nu_b, nu_n, nx_b, nsq_b,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_H: tl.constexpr, NEXT: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Two rows (batch 1 with guidance; M = 1 masks the second)."""
    ROWS: tl.constexpr = 2
    h = tl.program_id(0)
    q = tl.program_id(1)
    blocks = tl.num_programs(1)
    r1 = tl.arange(0, ROWS)
    p1 = tl.arange(0, BLOCK_P)
    n1 = tl.arange(0, BLOCK_N)
    o1 = q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    tile = (p1 < P)[:, None] & (n1 < N)[None, :]
    second = tile & (p1[:, None] * 0 + M > 1)  # (scalar masks as tensors: Triton's interpreter)
    offsets = h * s_h + p1[:, None] * s_p + n1[None, :] * s_n
    # before the wait: the state (written by this layer's kernel a step ago), weights, parameters
    state0 = tl.load(state_ptr + offsets, mask=tile, other=0.0)  # in their dtype until after the wait
    state1 = tl.load(state_ptr + s_b + offsets, mask=second, other=0.0)
    w = tl.load(w_ptr + o1[:, None] * w_n + (h * P + p1)[None, :] * w_k,
                mask=(o1 < OUT)[:, None] & (p1 < P)[None, :], other=0.0)  # fmt: skip
    dt_bias = tl.load(dt_bias_ptr + h).to(tl.float32)
    A = tl.exp(tl.load(a_log_ptr + h).to(tl.float32))
    skip = tl.load(d_ptr + h).to(tl.float32)
    norm_weight = tl.load(nw_ptr + h * P + p1, mask=p1 < P, other=0.0).to(tl.float32)
    # the last of the head's programs to have read the old state stores the new one (all compute
    # it; an earlier store could overwrite a state another program of the head has yet to read)
    tl.debug_barrier()
    read = tl.atomic_add(head_count_ptr + h, 1, sem="acq_rel")  # orders the reads above before it
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    last_reader = p1[:, None] * 0 + read == blocks - 1
    new0, g0 = _head_row(state0, 0, h, p1, n1, M, P, N, x_ptr, dt_ptr, b_ptr, c_ptr, z_ptr, x_b, x_h, x_p,
                         dt_b, dt_h, b_b, b_n, c_b, c_n, z_b, z_h, z_p, dt_bias, A, skip)  # fmt: skip
    tl.store(state_ptr + offsets, new0.to(state_ptr.dtype.element_ty), mask=tile & last_reader)
    new1, g1 = _head_row(state1, 1, h, p1, n1, M, P, N, x_ptr, dt_ptr, b_ptr, c_ptr, z_ptr, x_b, x_h, x_p,
                         dt_b, dt_h, b_b, b_n, c_b, c_n, z_b, z_h, z_p, dt_bias, A, skip)  # fmt: skip
    tl.store(state_ptr + s_b + offsets, new1.to(state_ptr.dtype.element_ty), mask=second & last_reader)
    if read == blocks - 1:
        tl.store(head_count_ptr + h, 0)
    # this head's part of out_proj for block q, and its part of the gated norm's statistic
    j = tl.arange(0, BLOCK_Q)
    own = (q * H + h) * ROWS
    partial0 = tl.sum(w.to(tl.float32) * (g0 * norm_weight)[None, :], axis=1)
    tl.store(part_ptr + own * BLOCK_Q + j, partial0)
    partial1 = tl.sum(w.to(tl.float32) * (g1 * norm_weight)[None, :], axis=1)
    tl.store(part_ptr + (own + 1) * BLOCK_Q + j, partial1)
    tl.store(sq_ptr + own, tl.sum(g0 * g0, axis=0))
    tl.store(sq_ptr + own + 1, tl.sum(g1 * g1, axis=0))
    tl.debug_barrier()  # every thread's stores before the count (released with it)
    arrived = tl.atomic_add(count_ptr + q, 1, sem="acq_rel")
    if arrived == H - 1:  # the last of block q's programs: sum the heads' parts in a fixed order
        acc = tl.zeros((ROWS, BLOCK_Q), dtype=tl.float32)
        squares = tl.zeros((ROWS,), dtype=tl.float32)
        for first in range(0, H, BLOCK_H):
            heads = first + tl.arange(0, BLOCK_H)
            hh = heads[:, None, None]
            parts = tl.load(
                part_ptr + (q * H + hh) * ROWS * BLOCK_Q + r1[None, :, None] * BLOCK_Q + j[None, None, :],
                mask=hh < H, other=0.0, cache_modifier=".cg",
            )  # fmt: skip
            acc += tl.sum(parts, axis=0)
            sq = tl.load(sq_ptr + (q * H + heads[:, None]) * ROWS + r1[None, :], mask=heads[:, None] < H,
                         other=0.0, cache_modifier=".cg")  # fmt: skip
            squares += tl.sum(sq, axis=0)
        rms = tl.sqrt(squares / (H * P) + eps)
        r2, o2 = r1[:, None], o1[None, :]
        out = (r2 < M) & (o2 < OUT)
        stream = tl.load(stream_ptr + r2 * st_b + o2, mask=out, other=0.0)
        gate = tl.load(gate_ptr + r2 * g_b + o2, mask=out, other=0.0).to(tl.float32)
        new = stream + gate * acc / rms[:, None]
        tl.store(stream_ptr + r2 * st_b + o2, new, mask=out)
        if NEXT:
            u = tl.load(nu_ptr + r2 * nu_b + o2 * nu_n, mask=out, other=0.0).to(tl.float32)
            tl.store(nx_ptr + r2 * nx_b + o2, (new * u).to(nx_ptr.dtype.element_ty), mask=out)
            tl.store(nsq_ptr + r1 * nsq_b + q, tl.sum(tl.where(out, new * new, 0.0), axis=1), mask=r1 < M)
        tl.store(count_ptr + q, 0)  # ready for the next layer


class TwoKernelStep(FusedStep):
    """FusedStep with the state update and out_proj in one kernel (`_ssm_out_kernel`)."""

    def __init__(self, model, rows: int, block_q: int | None = None, num_warps: int = 8):
        super().__init__(model, rows)
        config, device = model.config, model.device
        mixer = model.model.layers[0].mixer
        d, heads = config.hidden_size, mixer.num_heads
        self.block_q = block_q or min(256, triton.next_power_of_2(d))
        self.blocks = triton.cdiv(d, self.block_q)
        self.rows, self.num_warps = rows, num_warps
        self.stream = torch.zeros(rows, d, device=device)
        assert rows <= 2, rows  # the kernel's two rows: batch 1 with guidance
        self.parts = torch.empty(self.blocks, heads, 2, self.block_q, device=device)
        self.head_squares = torch.empty(self.blocks, heads, 2, device=device)
        self.counts = torch.zeros(self.blocks, dtype=torch.int32, device=device)
        self.head_counts = torch.zeros(heads, dtype=torch.int32, device=device)
        self.next_input = torch.empty(rows, d, dtype=mixer.in_proj.weight.dtype, device=device)
        self.next_squares = torch.empty(rows, self.blocks, device=device)

    def ssm_out(self, layer, state, x, dt, B, C, z, gate, next_scale) -> None:
        mixer = layer.mixer
        m, heads, p = x.shape
        n, d = B.shape[-1], self.stream.shape[1]
        w = mixer.out_proj.weight
        nu = next_scale if next_scale is not None else self.stream
        self.kernel = _ssm_out_kernel[(heads, self.blocks)](
            state, x, dt, mixer.dt_bias, mixer.A_log, B, C, mixer.D, z, mixer.norm.weight, w,
            self.parts, self.head_squares, self.counts, self.head_counts, self.stream, gate, nu, self.next_input, self.next_squares,
            m, heads, p, n, d, mixer.norm.eps,
            *state.stride(), *x.stride(), *dt.stride(), B.stride(0), B.stride(2), C.stride(0), C.stride(2),
            *z.stride(), *w.stride(), self.stream.stride(0), gate.stride(0), nu.stride(0), nu.stride(1),
            self.next_input.stride(0), self.next_squares.stride(0),
            BLOCK_P=triton.next_power_of_2(p), BLOCK_N=triton.next_power_of_2(n),
            BLOCK_Q=self.block_q, BLOCK_H=8, NEXT=next_scale is not None, PDL=self.pdl,
            num_warps=self.num_warps, **triton_ssm.pdl_launch(self.pdl),
        )  # fmt: skip

    def __call__(self, inputs_embeds: torch.Tensor, final: torch.Tensor, cache: AiMCache) -> torch.Tensor:
        model, pdl = self.model.model, self.pdl
        self.stream.copy_(inputs_embeds)
        inputs, scale, parts = self.stream, self.scales[0], None
        for i, layer in enumerate(model.layers):
            mixer, layer_cache = layer.mixer, cache.layer(i)
            conv = (layer_cache.conv, mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias, mixer.d_inner)
            zxbcdt = triton_gemv.norm_linear(
                inputs, scale, self.shifts[i], mixer.in_proj.weight, layer.norm.eps, conv, parts, pdl=pdl
            )
            z, xbc, dt = mixer._split(zxbcdt)
            x, B, C = mixer._split_xbc(xbc)
            following = self.scales[i + 1] if i + 1 < len(model.layers) else None
            self.ssm_out(layer, layer_cache.state, x, dt, B, C, z.unflatten(-1, x.shape[1:]), self.gates[i], following)
            inputs, scale, parts = self.next_input, None, self.next_squares
        cache.length.add_(1)
        return compiled(finish)(model, self.stream, final)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check(device: str = "cpu") -> None:
    """Four steps of TwoKernelStep against AiMModel.step and FusedStep in float32, tiny model."""
    sys.path.insert(0, "tests")
    from conftest import randomize, tiny_config

    from aim_hf import AiMForImageGeneration

    if device == "cpu":
        triton_gemv.default_launch = lambda *shape: dict(block_n=32, block_k=64, stages=0, num_warps=4, early=True)
        fast_decode.compiled = lambda fn: fn
    g = torch.Generator().manual_seed(0)
    for hidden, block_q in ((32, 16), (32, 32), (48, 16), (48, 32)):  # several blocks, one, a masked tail
        model = randomize(AiMForImageGeneration(tiny_config(hidden_size=hidden))).eval().to(device)
        labels = torch.tensor([0, 4], device=device)
        codes = torch.randint(0, 37, (2, 5), generator=g).to(device)
        caches = [AiMCache(model.config, 2, torch.float32, device, "recurrent") for _ in range(3)]
        with torch.no_grad():
            _, groups, final = model.model.condition(labels)
            modulations = model.model.layer_modulations(groups)
            steps = [FusedStep(model, 2), TwoKernelStep(model, 2, block_q=block_q, num_warps=4)]
            for step in steps:
                step.prepare(modulations)
            for cache in caches:
                model.model(codes, labels, cache=cache)
            for t in range(5, 9):
                token = torch.randint(0, 37, (2,), generator=g).to(device)
                position = torch.full((2,), t, device=device)
                eager = model.model.step(token, position, modulations, final, caches[0])
                embeds = model.model.embed(token, position)
                fused, two = steps[0](embeds, final, caches[1]), steps[1](embeds, final, caches[2])
                print(f"hidden {hidden} block_q {block_q} t {t}: two-kernel vs step {rel(two, eager):.1e}, "
                      f"fused vs step {rel(fused, eager):.1e}")  # fmt: skip
                assert rel(two, eager) < 1e-5, rel(two, eager)  # float32 sums in another order
            for name, tensor in caches[0].tensors.items():
                assert rel(caches[2].tensors[name], tensor) < 1e-5, name
            assert not steps[1].counts.any() and not steps[1].head_counts.any()  # the last programs reset them
    print("ok")


VARIANTS = [(512, 16), (256, 16), (256, 8), (128, 8)]  # (outputs a program, warps)


def gpu(presets: list[str]) -> None:
    """Values of the two-kernel step against FusedStep (bf16, 20 steps), then the token loop at
    batch 1 with FusedStep and with TwoKernelStep, alternated, median of 7 each."""
    sys.path.insert(0, "scripts")
    from benchmark import random_model, time_call

    from aim_hf import AiMConfig

    print(torch.cuda.get_device_name())
    shipped = fast_decode.FusedStep
    for preset in presets:
        model = random_model(AiMConfig.from_preset(preset), torch.bfloat16)
        labels = torch.tensor([1, model.config.num_classes], device="cuda")
        with torch.no_grad():
            _, groups, final = model.model.condition(labels)
            modulations = model.model.layer_modulations(groups)
            steps = [FusedStep(model, 2), TwoKernelStep(model, 2)]
            caches = [AiMCache(model.config, 2, torch.bfloat16, "cuda", "recurrent") for _ in steps]
            for step in steps:
                step.prepare(modulations)
            worst = 0.0
            for t in range(20):
                token = torch.randint(0, model.config.vocab_size, (2,), device="cuda")
                embeds = model.model.embed(token, torch.full((2,), t, device="cuda"))
                outs = [step(embeds, final, cache) for step, cache in zip(steps, caches)]
                worst = max(worst, rel(outs[1], outs[0]))
            print(preset, "two-kernel vs FusedStep, hidden state over 20 steps, worst", f"{worst:.1e}",
                  "registers", steps[1].kernel.n_regs, "spills", steps[1].kernel.n_spills)  # fmt: skip
        runs = [("fused", shipped)] + [
            (f"two-kernel {q}x{w}", functools.partial(TwoKernelStep, block_q=q, num_warps=w)) for q, w in VARIANTS
        ]
        for tag, cls in runs + runs[:2]:
            fast_decode.FusedStep = cls
            if cls is not shipped:
                cls.supported = shipped.supported  # the decoder asks the class it builds
            model._graph_decoder = None  # a fresh decoder with this step class
            time_call(model.generate, [1], guidance_scale=2.0)  # a fresh decoder: compile and capture
            times = [time_call(model.generate, [1], guidance_scale=2.0)[0] for _ in range(7)]
            print(preset, tag, "generate s", round(sorted(times)[3], 4), "min", round(min(times), 4), flush=True)
        fast_decode.FusedStep = shipped
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    if "--check" in sys.argv:
        check("cuda" if "--cuda" in sys.argv else "cpu")
    else:
        gpu(sys.argv[1:])
