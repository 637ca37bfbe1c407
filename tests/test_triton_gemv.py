"""The small-row matrix-vector products (triton_gemv) against F.linear and float64 references of
the norms they fold in: on the CPU through Triton's interpreter (in a subprocess), on the GPU
directly."""

import pytest
import torch
from test_triton_ssm import run_in_interpreter

pytest.importorskip("triton")

# Both sum the products in float32 (cuBLAS and torch's CPU matmul too) and round once to the
# weights' dtype; only the order of the sums differs: a few float32 ulps over up to 300 terms
# (1e-5 relative), or in bf16 one rounding step of the output, at most 2^-7 relative (8
# significant bits; Triton's interpreter truncates where torch rounds to nearest).
CHECK = """
import torch
import torch.nn.functional as F
from aim_hf.mamba2 import conv_step
from aim_hf.triton_gemv import linear, norm_linear, norm_linear_residual

def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()

g = torch.Generator().manual_seed(0)
device = "{device}"
for m, k, n, dtype, blocks in [(2, 96, 200, torch.float32, {{}}), (3, 160, 70, torch.bfloat16, {{}}),
                               # 4 rows narrowing: two programs of 2 rows (default_rows)
                               (4, 300, 33, torch.float32, {{}}), (1, 160, 40, torch.float32, dict(block_n=16, block_k=64)),
                               (3, 96, 50, torch.float32, dict(rows_per_program=1)),
                               (3, 96, 50, torch.float32, dict(rows_per_program=4)),
                               (2, 300, 70, torch.float32, dict(block_k=64, stages=3)),
                               (2, 300, 70, torch.float32, dict(block_k=64, stages=0, num_warps=2, early=False)),
                               (2, 300, 70, torch.float32, dict(block_k=512, stages=0, num_warps=4)),
                               # 3 to 32 rows: one program for all, on the tensor cores
                               (5, 96, 50, torch.float32, {{}}), (20, 160, 70, torch.bfloat16, {{}}),
                               (3, 96, 50, torch.float32, dict(rows_per_program=16)),
                               (6, 300, 40, torch.float32, dict(block_k=64, stages=0)),
                               (32, 300, 70, torch.bfloat16, dict(block_k=512, stages=0, num_warps=4))]:
    wide = torch.randn(m, 2 * k, generator=g).to(device, dtype)
    x = wide[:, ::2]  # a strided view, like the mixer's inputs
    weight = (torch.randn(n, k, generator=g) / k**0.5).to(device, dtype)
    ref = F.linear(x.float(), weight.float()).to(dtype)
    out = linear(x, weight, **blocks)
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    assert out.dtype == dtype and out.shape == (m, n) and rel(out, ref) < tol, (m, k, n, dtype, rel(out, ref))
    # kept in float32: only the order of the float32 sums differs from float64 (products of bf16 are exact)
    out = linear(x, weight, out_dtype=torch.float32, **blocks)
    exact = x.double() @ weight.double().T
    assert out.dtype == torch.float32 and rel(out, exact) < 1e-5, ("out_dtype", m, k, n, dtype, rel(out, exact))

    # the norm folded in: in_proj of the modulated RMSNorm, out_proj of the gated one + residual add
    stream = torch.randn(m, k, generator=g).to(device) * 3  # float32, like the residual stream
    scale = (1 + 0.3 * torch.randn(m, k, generator=g)).to(device, dtype)
    bias = torch.randn(m, n, generator=g).to(device, dtype)
    normed = stream.double() * torch.rsqrt(stream.double().pow(2).mean(-1, keepdim=True) + 1e-5)
    ref = (normed * scale.double()) @ weight.double().T + bias.double()
    out = norm_linear(stream, scale, bias, weight, 1e-5, **blocks)
    assert out.dtype == dtype and rel(out, ref) < tol, ("norm_linear", m, k, n, dtype, rel(out, ref))
    # and the conv step folded in for outputs first..first+channels (conv_step on the rounded outputs)
    first, channels = n // 4, n // 2
    window = torch.randn(m, channels, 4, generator=g).to(device, dtype)
    taps, tap_bias = torch.randn(channels, 4, generator=g).to(device, dtype), torch.randn(channels, generator=g).to(device, dtype)
    expected_window = window.clone()
    ref = norm_linear(stream, scale, bias, weight, 1e-5, **blocks)
    ref[:, first:first + channels] = conv_step(ref[:, first:first + channels], expected_window, taps, tap_bias)
    out = norm_linear(stream, scale, bias, weight, 1e-5, (window, taps, tap_bias, first), **blocks)
    assert rel(out, ref) < tol and rel(window, expected_window) < tol, ("conv", m, k, n, dtype, rel(out, ref), rel(window, expected_window))
    vector, residual, gate = scale[0], torch.randn(m, n, generator=g).to(device), bias
    ref = residual.double() + gate.double() * ((normed * vector.double()) @ weight.double().T)
    squares = torch.stack([part.pow(2).sum(-1) for part in stream.chunk(3, dim=-1)], -1)  # the statistic in 3 parts
    out = norm_linear_residual((stream * vector).to(dtype), squares, weight, residual, gate, 1e-5, **blocks)
    assert out.dtype == torch.float32 and rel(out, ref) < tol, ("norm_linear_residual", m, k, n, dtype, rel(out, ref))
    # out_proj also writing the next in_proj's input (out times its scale, in the weights' dtype, and
    # the statistic of out in parts), and that in_proj from it, against float64 from out
    next_scale = (1 + 0.3 * torch.randn(m, n, generator=g)).to(device)
    next_weight = (torch.randn(24, n, generator=g) / n**0.5).to(device, dtype)
    next_bias = torch.randn(m, 24, generator=g).to(device)
    same, scaled, parts = norm_linear_residual(
        (stream * vector).to(dtype), squares, weight, residual, gate, 1e-5, next_scale, **blocks
    )
    assert torch.equal(same, out) and scaled.dtype == dtype and parts.shape[0] == m
    assert rel(parts.sum(-1), out.double().pow(2).sum(-1)) < 1e-5, ("parts", m, k, n, dtype)
    normed = out.double() * torch.rsqrt(out.double().pow(2).mean(-1, keepdim=True) + 1e-5)
    ref = (normed * next_scale.double()) @ next_weight.double().T + next_bias.double()
    out = norm_linear(scaled, None, next_bias, next_weight, 1e-5, squares=parts, **blocks)
    assert rel(out, ref) < tol, ("norm_linear from parts", m, k, n, dtype, rel(out, ref))
print("ok")
"""


def test_linear_matches_torch_in_interpreter():
    run_in_interpreter(CHECK.format(device="cpu"), timeout=300)


TENSOR_CORES = """
import torch
from aim_hf import triton_gemv

assert not triton_gemv.COMPILED
x, weight = torch.randn(5, 64).bfloat16(), torch.randn(40, 64).bfloat16()
out = triton_gemv.linear(x, weight, out_dtype=torch.float32)  # 16 rows a program, tl.dot
exact = x.double() @ weight.double().T
assert ((out.double() - exact).norm() / exact.norm()).item() < 1e-5
print("ok")
"""


def test_tensor_cores_under_any_interpreter_setting():
    """The bf16 tl.dot is wrong under Triton's interpreter (triton-lang/triton#11584), so there the
    products go as TF32: told by the kernel Triton made, for every value of TRITON_INTERPRET that
    Triton takes ("true" too), float32 accuracy (bf16 products are exact in float32)."""
    run_in_interpreter(TENSOR_CORES, timeout=120, interpret="true")


def test_default_rows():
    """Multiply-adds up to 2 rows, and at 3-4 for a projection that narrows (AiM-XL's out_proj,
    1536 x 3072); else one tensor-core program of 16 or 32 rows (AiM-XL's in_proj, 6448 x 1536)."""
    from aim_hf.triton_gemv import MAX_ROWS, default_rows

    rows = (1, 2, 3, 4, 5, 16, 17, 32)
    assert [default_rows(m, 1536, 3072) for m in rows] == [2, 2, 2, 2, 16, 16, 32, 32]
    assert [default_rows(m, 6448, 1536) for m in rows] == [2, 2, 16, 16, 16, 16, 32, 32]
    # every row count FusedStep takes fits one tensor-core program (the weights read once)
    assert all(default_rows(m, 6448, 1536) >= m for m in range(3, MAX_ROWS + 1))


def test_bad_rows_per_program():
    from aim_hf.triton_gemv import linear

    with pytest.raises(ValueError, match="rows_per_program must be 1, 2, 4, 16 or 32, got 3"):
        linear(torch.ones(2, 8), torch.ones(4, 8), rows_per_program=3)


def test_norm_linear_takes_a_scale_or_the_statistic():
    from aim_hf.triton_gemv import norm_linear

    x, weight, bias = torch.ones(2, 8), torch.ones(4, 8), torch.zeros(2, 4)
    with pytest.raises(ValueError, match="scale .x unscaled. or squares .x scaled., got neither"):
        norm_linear(x, None, bias, weight, 1e-5)
    with pytest.raises(ValueError, match="got both"):
        norm_linear(x, torch.ones(8), bias, weight, 1e-5, squares=torch.ones(2, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_linear_matches_torch_on_gpu():
    exec(CHECK.format(device="cuda"), {})


FUSED = """
import functools
import sys
import torch
sys.path.insert(0, "tests")
from conftest import randomize, tiny_config
from aim_hf import AiMForImageGeneration, fast_decode, triton_gemv
from aim_hf.fast_decode import FusedStep
from aim_hf.modeling_aim import AiMCache

def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()

triton_gemv.default_launch = lambda *shape: dict(block_n=32, block_k=64, stages=0, num_warps=4, early=True)  # few programs: the interpreter runs them one by one
g = torch.Generator().manual_seed(0)
device = "{device}"
if device == "cpu":  # Inductor's CPU build of the compiled finish is tested in test_generation
    fast_decode.compiled = lambda fn: fn
model = randomize(AiMForImageGeneration(tiny_config())).eval().to(device)
assert FusedStep.supported(model, 2, "recurrent") and FusedStep.supported(model, 32, "recurrent")
assert not FusedStep.supported(model, 33, "recurrent") and not FusedStep.supported(model, 2, "dual")
gated = fast_decode.triton_ssm.ssm_update_gated
# 2 rows in multiply-adds, 6 on the tensor cores, 4 both (out_proj in two 2-row programs); out_proj
# launched after or before the state update's wait (PDL)
for rows, early in [(2, False), (2, True), (6, None), (4, None)] if device == "cuda" else [(2, None), (6, None), (4, None)]:
    fast_decode.triton_ssm.ssm_update_gated = functools.partial(gated, early=early)
    labels = torch.arange(rows, device=device) % 5
    codes = torch.randint(0, 37, (rows, 5), generator=g).to(device)
    caches = [AiMCache(model.config, rows, torch.float32, device, "recurrent") for _ in range(2)]
    with torch.no_grad():
        _, groups, final = model.model.condition(labels)
        modulations = model.model.layer_modulations(groups)
        fused = FusedStep(model, rows)
        fused.prepare(modulations)
        for cache in caches:
            model.model(codes, labels, cache=cache)
        for t in range(5, 9):
            token = torch.randint(0, 37, (rows,), generator=g).to(device)
            position = torch.full((rows,), t, device=device)
            eager = model.model.step(token, position, modulations, final, caches[0])
            out = fused(model.model.embed(token, position), final, caches[1])
            assert rel(out, eager) < 1e-5, (rows, early, t, rel(out, eager))
        for name, tensor in caches[0].tensors.items():
            assert rel(caches[1].tensors[name], tensor) < 1e-5, (rows, early, name)
        assert torch.equal(caches[0].length, caches[1].length)
fast_decode.triton_ssm.ssm_update_gated = gated
print("ok")
"""


def test_fused_step_matches_the_step_in_interpreter():
    """Four steps of FusedStep (the norms folded into the projections, the gate into the state
    update) equal AiMModel.step and leave the same cache, in float32 (1e-5 relative: the same
    sums in another order, and no bf16 rounding anywhere in float32)."""
    run_in_interpreter(FUSED.format(device="cpu"), timeout=600)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_step_matches_the_step_on_gpu():
    exec(FUSED.format(device="cuda"), {})
