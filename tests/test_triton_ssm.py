"""The Triton state update (triton_ssm) against the pure step: on the CPU through Triton's
interpreter (in a subprocess, since TRITON_INTERPRET is read when kernels are defined), on the GPU
directly."""

import os
import subprocess
import sys

import pytest
import torch

from aim_hf.mamba2 import ssm_step

pytest.importorskip("triton")  # installed with the test extra; the skip only guards odd setups

# Both compute in float32 from the same inputs; only the order of the sum over the state size
# differs, so outputs agree to a few float32 ulps (1e-5 relative), and a stored bf16 state to one
# bf16 rounding step (at most 2^-7 relative: 8 significant bits), as the two paths may round the
# same float32 value differently (Triton's interpreter truncates, torch rounds to nearest).
CHECK = """
import torch
from aim_hf.mamba2 import ssm_step
from aim_hf.triton_ssm import ssm_update, supported

def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()

g = torch.Generator().manual_seed(0)
device = "{device}"
for b, h, p, n, groups, dtype in [(3, 4, 8, 8, 1, torch.float32), (2, 6, 20, 16, 2, torch.float32),
                                  (2, 4, 64, 128, 1, torch.bfloat16)]:
    state = torch.randn(b, h, p, n, generator=g).to(device=device, dtype=dtype)
    x = torch.randn(b, h, p, generator=g).to(device)
    dt = (torch.rand(b, h, generator=g) * 0.5).to(device)
    A = (-torch.rand(h, generator=g) * 3 - 0.5).to(device)
    B, C = (torch.randn(b, groups, n, generator=g).to(device) for _ in range(2))
    x_view = torch.randn(b, h, 2 * p, generator=g).to(device)[..., ::2]  # strided, like split views
    x_view.copy_(x)
    ref_state, state = state.clone(), state.clone()
    assert supported(state, x)
    y_ref = ssm_step(ref_state, x, dt, A, B, C)
    y = ssm_update(state, x_view, dt, A, B, C)
    assert y.dtype == torch.float32 and rel(y, y_ref) < 1e-5, rel(y, y_ref)
    assert rel(state, ref_state) < (1e-6 if dtype == torch.float32 else 2**-7), rel(state, ref_state)
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
    state = torch.zeros(1, 8, 8, 8)
    assert not mixer.use_triton(state, torch.zeros(1, 8, 8))
    assert ssm_step is not None
