"""The Triton step kernels (triton_ssm: conv, recurrent and dual SSM updates) against their pure
references in mamba2: on the CPU through Triton's interpreter (in a subprocess, since
TRITON_INTERPRET is read when kernels are defined), on the GPU directly."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO

pytest.importorskip("triton")  # installed with the test extra; the skip only guards odd setups

# Both compute in float32 from the same inputs; only the order of the sums (over the state size, and
# over the past positions in the dual form) differs, so outputs agree to a few float32 ulps (1e-5
# relative, the sums have up to 40 terms), and a stored bf16 state or conv output to one
# bf16 rounding step (at most 2^-7 relative: 8 significant bits), as the two paths may round the
# same float32 value differently (Triton's interpreter truncates, torch rounds to nearest).
CHECK = """
import torch
from aim_hf.mamba2 import LayerCache, conv_step, ssm_dual_step, ssm_step
from aim_hf.triton_ssm import conv_update, ssm_dual_update, ssm_update, ssm_update_gated, supported

def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()

def strided(t):  # a view with the layout of the mixer's split of in_proj's output
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]

g = torch.Generator().manual_seed(0)
device = "{device}"
cases = [(3, 4, 8, 8, 1, torch.float32), (2, 6, 20, 16, 2, torch.float32), (2, 4, 64, 128, 1, torch.bfloat16),
         (2, 6, 12, 10, 3, torch.float32), (2, 24, 8, 16, 2, torch.float16),
         (2, 16, 64, 128, 1, torch.bfloat16)]  # the last: AiM's head and state sizes, 16 heads a program
for b, h, p, n, groups, dtype in cases:
    new = lambda *shape: torch.randn(*shape, generator=g).to(device)
    x = new(b, h, p).to(dtype)
    dt, bias = new(b, h), new(h) * 0.5
    A_log = torch.log(torch.rand(h, generator=g) * 3 + 0.5).to(device)  # A = -exp(A_log)
    B, C = new(b, groups, n).to(dtype), new(b, groups, n).to(dtype)
    tol = 1e-6 if dtype == torch.float32 else 2**-7

    # conv window shift, conv, bias and SiLU (conv_dim = 2 p, kernel 4; 3 and 5 below)
    xbc, conv, weight, cbias = new(b, 2 * p).to(dtype), new(b, 2 * p, 4).to(dtype), new(2 * p, 4).to(dtype), new(2 * p).to(dtype)
    ref_conv = conv.clone()
    out_ref = conv_step(xbc, ref_conv, weight, cbias)
    out = conv_update(strided(xbc), conv, weight, cbias)
    assert out.dtype == dtype and rel(out, out_ref) < tol, rel(out, out_ref)
    assert torch.equal(conv, ref_conv)
    for k in (3, 5):
        window, w = new(b, 2 * p, k).to(dtype), new(2 * p, k).to(dtype)
        assert rel(conv_update(xbc, window.clone(), w, None), conv_step(xbc, window.clone(), w, None)) < tol

    # the recurrent form (x, dt, B and C as strided views, like the mixer's split of in_proj)
    state = new(b, h, p, n).to(dtype)
    ref_state, state = state.clone(), state.clone()
    assert supported(state) and not supported(state.double())
    y_ref = ssm_step(ref_state, x, dt, bias, A_log, B, C)
    y = ssm_update(state, strided(x), strided(dt), bias, A_log, strided(B), strided(C))
    assert y.dtype == torch.float32 and rel(y, y_ref) < 1e-5, rel(y, y_ref)
    assert rel(state, ref_state) < tol, rel(state, ref_state)
    # with the D skip and the gate folded in (the same update from the same state)
    D, z = new(h), new(b, h, p).to(dtype)
    norm_weight = new(h * p).to(dtype)
    gated, squares = ssm_update_gated(ref_state.clone(), x, dt, bias, A_log, B, C, D, strided(z), norm_weight)
    silu_z = torch.nn.functional.silu(z.float())
    gated_ref = (ssm_step(ref_state.clone(), x, dt, bias, A_log, B, C) + x.float() * D[:, None]) * silu_z
    scaled_ref = gated_ref * norm_weight.float().view(h, p)
    assert gated.dtype == dtype and rel(gated, scaled_ref) < max(tol, 1e-5), rel(gated, scaled_ref)
    squares_ref = gated_ref.pow(2).flatten(1).sum(-1)
    assert squares.dtype == torch.float32 and rel(squares.sum(-1), squares_ref) < 1e-5, rel(squares.sum(-1), squares_ref)

    # the dual form at the first position, inside and across loop blocks and at the last one
    capacity = 40
    history = dict(xs=new(b, capacity, h, p).to(dtype), Bs=new(b, capacity, groups, n).to(dtype),
                   dts=new(b, capacity, h).abs() * 0.3, log_decays=-new(b, capacity, h).abs().cumsum(1) * 0.1)
    def cache(seen):
        return LayerCache(conv=conv, length=torch.tensor(seen, device=device), **{{k: v.clone() for k, v in history.items()}})
    for seen, block_t, block_h in [(0, 8, None), (8, 8, None), (11, 16, 1), (37, 8, None), (39, 32, 1)]:
        mine, ref = cache(seen), cache(seen)
        y_ref = ssm_dual_step(ref, x, dt, bias, A_log, B, C)
        y = ssm_dual_update(mine, strided(x), strided(dt), bias, A_log, strided(B), strided(C), block_t=block_t, block_h=block_h)
        assert y.dtype == torch.float32 and rel(y, y_ref) < 1e-5, (seen, rel(y, y_ref))
        for name in ("xs", "Bs", "dts", "log_decays"):
            assert rel(getattr(mine, name), getattr(ref, name)) < 1e-6, (seen, name)
    full = cache(capacity)  # a full history: the output is computed, nothing is written past its end
    ssm_dual_update(full, x, dt, bias, A_log, B, C)
    assert all(torch.equal(getattr(full, k), v) for k, v in history.items())
print("ok")
"""


def run_in_interpreter(code: str, timeout: int, interpret: str = "1") -> None:
    """Runs ``code`` in a fresh Python under Triton's interpreter (``TRITON_INTERPRET=interpret``);
    it must print "ok"."""
    env = {**os.environ, "TRITON_INTERPRET": interpret, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_triton_update_matches_pure_step_in_interpreter():
    run_in_interpreter(CHECK.format(device="cpu"), timeout=300)


MODEL = """
import sys
import torch
sys.path.insert(0, "tests")
from conftest import randomize, tiny_config
from aim_hf import AiMForImageGeneration
from aim_hf.mamba2 import Mamba2Mixer

from aim_hf import triton_gemv

Mamba2Mixer.use_triton = lambda self, *tensors: True  # the kernels on CPU tensors, in the interpreter
products, linear = [0], triton_gemv.linear
def counted(*args):
    products[0] += 1
    return linear(*args)
triton_gemv.linear = counted  # the projections of a few rows are Triton kernels too
triton_gemv.default_launch = lambda *shape: dict(block_n=32, block_k=64, stages=0, num_warps=4, early=True)  # few programs: the interpreter runs them one by one
for groups, state, form in [(1, 8, "recurrent"), (2, 10, "dual"), (1, 8, "dual")]:
    torch.manual_seed(0)
    model = randomize(AiMForImageGeneration(tiny_config(decode_cache=form, n_groups=groups, state_size=state))).eval()
    codes, labels = torch.randint(0, 37, (2, 16)), torch.tensor([0, 3])  # 2 rows: the GEMVs take them
    forward = model(codes, labels).logits
    for start in (0, 5):
        steps = []
        out = model.decode(labels, codes[:, :start], 1.0, lambda t, logits: steps.append(logits) or codes[:, t])
        err = ((torch.stack(steps, 1) - forward[:, start:]).norm() / forward.norm()).item()
        assert torch.equal(out, codes) and err < 1e-5, (groups, state, form, start, err)
    assert products[0] > 0
    products[0] = 0
print("ok")
"""


def test_model_decodes_through_the_kernels_in_interpreter():
    """The mixer's wiring of the kernels (strided views of in_proj's split, the cache length, both
    forms, 1 and 2 SSM groups, a state size that is not a power of two): cached float32 decoding
    through them equals the forward to float32 rounding (1e-5 relative over all logits)."""
    run_in_interpreter(MODEL, timeout=600)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_update_matches_pure_step_on_gpu():
    exec(CHECK.format(device="cuda"), {})


def test_cpu_tensors_take_the_pure_step():
    """Outside the interpreter, the model never sends CPU tensors to the kernel."""
    from conftest import tiny_config

    from aim_hf.mamba2 import Mamba2Mixer

    mixer = Mamba2Mixer(tiny_config())
    assert not mixer.use_triton(torch.zeros(1, 8))


def test_dual_update_rejects_a_head_block_that_splits_a_group():
    from aim_hf.mamba2 import LayerCache
    from aim_hf.triton_ssm import ssm_dual_update

    b, t, h, p, n = 1, 4, 6, 8, 8
    cache = LayerCache(
        conv=torch.zeros(1), length=torch.tensor(0), xs=torch.zeros(b, t, h, p), Bs=torch.zeros(b, t, 1, n),
        dts=torch.zeros(b, t, h), log_decays=torch.zeros(b, t, h),
    )  # fmt: skip
    x, dt, B = torch.zeros(b, h, p), torch.zeros(b, h), torch.zeros(b, 1, n)
    with pytest.raises(ValueError, match="block_h=4 must divide the 6 heads"):
        ssm_dual_update(cache, x, dt, torch.zeros(h), torch.zeros(h), B, B, block_h=4)
