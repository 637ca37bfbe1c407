"""Session 15: the dual-cache failure of session 14 with mamba2's lone projections on the tensor
cores. ``triton_gemv.linear`` eager and compiled against float64 and cuBLAS, then the dual-cache
teacher-forcing tests of tests/test_gpu.py with ``LONE_ROWS = 16`` (the bf16-operand patch
applied). From the repository root: ``python benchmarks/2026-11-27-s15-lone.py``."""
import sys

import pytest
import torch
import torch.nn.functional as F

from aim_hf import triton_gemv


def check():
    g = torch.Generator(device="cuda").manual_seed(0)
    fn = torch.compile(lambda x, w: triton_gemv.linear(x, w), fullgraph=True, dynamic=False)
    torch._dynamo.config.recompile_limit = 64
    for dtype in (torch.float32, torch.bfloat16):
        for m, k, n in ((8, 768, 3352), (8, 1536, 768), (4, 768, 3352), (16, 1536, 768), (2, 768, 3352)):
            x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
            w = (torch.randn(n, k, device="cuda", generator=g) / k**0.5).to(dtype)
            exact = F.linear(x.double(), w.double())
            err = lambda y: ((y.double() - exact).norm() / exact.norm()).item()  # noqa: E731, B023 (used at once)
            print(dtype, m, k, n, "eager", err(triton_gemv.linear(x, w)), "compiled", err(fn(x, w)),
                  "cublas", err(F.linear(x, w)), flush=True)


check()
triton_gemv.LONE_ROWS = 16
sys.exit(pytest.main(["-q", "-m", "gpu", "--tb=short", "-p", "no:cacheprovider", "tests/test_gpu.py",
                      "-k", "teacher_forcing and dual"]))
