"""Session 14: the tensor-core projections with bf16 operands straight into ``tl.dot`` instead of
both converted to float32 and taken as TF32 (``triton_gemv._dot``; the shipped form exists because
Triton's interpreter gets a bf16 dot wrong, triton-lang/triton#11584). The conversion puts the
weights through registers and back into the dot's layout each block; bf16 operands can go from
shared memory to the tensor cores directly.

One process a form (the kernel compiles its ``_dot`` at first launch), token loop at batch 4:

    python benchmarks/2026-11-27-s14-bf16-dot.py shipped AiM-B AiM-XL
    python benchmarks/2026-11-27-s14-bf16-dot.py bf16 AiM-B AiM-XL
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, "scripts")
sys.path.insert(0, "src")
from benchmark import random_model, time_call  # noqa: E402

from aim_hf import AiMConfig, triton_gemv  # noqa: E402


@triton.jit
def _dot_bf16(x, w, acc, IEEE: tl.constexpr):
    if IEEE:
        acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
    else:
        acc = tl.dot(x.to(w.dtype), tl.trans(w), acc)
    return acc


def main(form: str, presets: list[str]) -> None:
    if form == "bf16":
        triton_gemv._dot = _dot_bf16
    print(torch.cuda.get_device_name(), form, flush=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(8, 1536, device="cuda", generator=g).bfloat16()
    w = (torch.randn(6448, 1536, device="cuda", generator=g) / 40).bfloat16()
    out = triton_gemv.linear(x, w, out_dtype=torch.float32)
    exact = x.double() @ w.double().T
    print("linear 8 rows vs float64", ((out.double() - exact).norm() / exact.norm()).item(), flush=True)
    assert torch.allclose(out, F.linear(x.float(), w.float()), rtol=1e-3, atol=1e-3)
    for preset in presets:
        model = random_model(AiMConfig.from_preset(preset, decode_cache="recurrent"), torch.bfloat16)
        labels = [0, 1, 2, 3]
        time_call(model.generate, labels, guidance_scale=2.0)
        assert model._graph_decoder.fused is not None
        times = sorted(time_call(model.generate, labels, guidance_scale=2.0)[0] for _ in range(5))
        print(preset, "batch 4", form, "token loop", round(times[2], 4), "s", flush=True)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
