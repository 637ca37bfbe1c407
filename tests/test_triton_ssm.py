"""The Triton step kernels (triton_ssm: conv, recurrent and dual SSM updates) against their pure
references in mamba2: on the CPU through Triton's interpreter (in a subprocess, since
TRITON_INTERPRET is read when kernels are defined), on the GPU directly."""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")  # installed with the test extra; the skip only guards odd setups

# Both compute in float32 from the same inputs; only the order of the sums (over the state size, and
# over the past positions in the dual form) differs, so outputs agree to a few float32 ulps (1e-5
# relative, the sums have up to 40 terms), and a stored bf16 state or conv output to one
# bf16 rounding step (at most 2^-7 relative: 8 significant bits), as the two paths may round the
# same float32 value differently (Triton's interpreter truncates, torch rounds to nearest).
CHECK = """
import torch
from aim_hf.mamba2 import LayerCache, conv_step, ssm_dual_step, ssm_step
from aim_hf.triton_ssm import conv_update, ssm_dual_update, ssm_update, supported

def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()

def strided(t):  # a view with the layout of the mixer's split of in_proj's output
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]

g = torch.Generator().manual_seed(0)
device = "{device}"
cases = [(3, 4, 8, 8, 1, torch.float32), (2, 6, 20, 16, 2, torch.float32), (2, 4, 64, 128, 1, torch.bfloat16),
         (2, 6, 12, 10, 3, torch.float32)]
for b, h, p, n, groups, dtype in cases:
    new = lambda *shape: torch.randn(*shape, generator=g).to(device)
    x = new(b, h, p).to(dtype)
    dt, bias = new(b, h), new(h) * 0.5
    A_log = torch.log(torch.rand(h, generator=g) * 3 + 0.5).to(device)  # A = -exp(A_log)
    B, C = new(b, groups, n).to(dtype), new(b, groups, n).to(dtype)

    # conv window shift, conv, bias and SiLU (conv_dim = 2 p, kernel 4)
    xbc, conv, weight, cbias = new(b, 2 * p).to(dtype), new(b, 2 * p, 4).to(dtype), new(2 * p, 4).to(dtype), new(2 * p).to(dtype)
    ref_conv = conv.clone()
    out_ref = conv_step(xbc, ref_conv, weight, cbias)
    out = conv_update(strided(xbc), conv, weight, cbias)
    assert out.dtype == dtype and rel(out, out_ref) < (1e-6 if dtype == torch.float32 else 2**-7), rel(out, out_ref)
    assert torch.equal(conv, ref_conv)
    assert rel(conv_update(xbc, conv.clone(), weight, None), conv_step(xbc, conv.clone(), weight, None)) < 2**-7

    # the recurrent form
    state = new(b, h, p, n).to(dtype)
    ref_state, state = state.clone(), state.clone()
    assert supported(state)
    y_ref = ssm_step(ref_state, x, dt, bias, A_log, B, C)
    y = ssm_update(state, strided(x), dt, bias, A_log, B, C)
    assert y.dtype == torch.float32 and rel(y, y_ref) < 1e-5, rel(y, y_ref)
    assert rel(state, ref_state) < (1e-6 if dtype == torch.float32 else 2**-7), rel(state, ref_state)

    # the dual form: a history of 37 positions (more than two blocks of the kernel's loop)
    capacity, seen = 40, 37
    history = dict(xs=new(b, capacity, h, p).to(dtype), Bs=new(b, capacity, groups, n).to(dtype),
                   dts=new(b, capacity, h).abs() * 0.3, log_decays=-new(b, capacity, h).abs().cumsum(1) * 0.1)
    mine = LayerCache(conv=conv, length=torch.tensor(seen, device=device), **{{k: v.clone() for k, v in history.items()}})
    ref = LayerCache(conv=conv, length=torch.tensor(seen, device=device), **{{k: v.clone() for k, v in history.items()}})
    y_ref = ssm_dual_step(ref, x, dt, bias, A_log, B, C)
    y = ssm_dual_update(mine, strided(x), dt, bias, A_log, B, C)
    assert y.dtype == torch.float32 and rel(y, y_ref) < 1e-5, rel(y, y_ref)
    for name in ("xs", "Bs", "dts", "log_decays"):
        assert rel(getattr(mine, name), getattr(ref, name)) < 1e-6, name
print("ok")
"""


def test_triton_update_matches_pure_step_in_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", CHECK.format(device="cpu")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


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
