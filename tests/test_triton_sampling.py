"""The fused draw (triton_sampling) against sampling.py's guide, temperature and inverse-CDF draw:
on the CPU through Triton's interpreter (in a subprocess), on the GPU directly."""

import pytest
import torch
from test_triton_ssm import run_in_interpreter

pytest.importorskip("triton")

# The guided logits are the same float32 operations as sampling.guide (up to a fused multiply-add:
# one float32 rounding, 2^-24 relative); the masses are float64 in both, summed in another order,
# so a code can differ only where a uniform falls within ~1e-15 of a boundary: never, for these
# few hundred draws, so the codes must be equal. Top-k's set is exact; top-p's mass is summed in
# float32 in another order than filter_logits', so its set could differ only where a code's mass
# above lies within ~1e-7 of top_p: not for these draws either.
CHECK = """
import torch
from aim_hf.sampling import filter_logits, guide, sample_inverse_cdf
from aim_hf.triton_sampling import draw

g = torch.Generator().manual_seed(0)
device = "{device}"
for batch, vocab, dtype, scale, temperature in [(3, 5000, torch.bfloat16, 2.0, 1.0), (2, 300, torch.float32, None, 0.7),
                                                (1, 4096, torch.float32, 1.75, 1.3), (64, 2049, torch.bfloat16, 4.0, 1.0)]:
    rows = 2 * batch if scale is not None else batch
    logits = (3 * torch.randn(rows, vocab, generator=g)).to(device, dtype)
    uniforms = torch.rand(batch, 7, generator=g, dtype=torch.float64).to(device)
    uniforms[0, 5] = 1 - 2**-53  # the largest uniform: the last code with mass, never past it
    # the default block, several a row, and top-k / top-p (thresholds by bisection, no sort)
    for step, block, top_k, top_p in [(0, None, 0, 1.0), (5, None, 0, 1.0), (5, 1024, 0, 1.0), (1, None, 1, 1.0),
                                      (2, None, 37, 1.0), (3, None, 0, 0.8), (4, 1024, 200, 0.9)]:
        t = torch.tensor([step], device=device)
        codes = torch.full((batch, 7), -1, dtype=torch.long, device=device)
        guided = torch.zeros(batch, vocab, device=device)
        draw(logits, uniforms, t, codes, guided, scale, temperature, top_k, top_p, block=block)
        ref_guided = guide(logits, scale) if scale is not None else logits.float()
        ref = sample_inverse_cdf(filter_logits(ref_guided, temperature, top_k, top_p), uniforms[:, step])
        err = ((guided.double() - ref_guided.double()).abs().max() / ref_guided.double().abs().max()).item()
        assert err < 2**-22, (batch, vocab, err)
        assert torch.equal(codes[:, step], ref), (batch, vocab, step, top_k, top_p, codes[:, step], ref)
        others = [s for s in range(7) if s != step]
        assert (codes[:, others] == -1).all()  # only step t written
print("ok")
"""


def test_draw_matches_sampling_in_interpreter():
    run_in_interpreter(CHECK.format(device="cpu"), timeout=300)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_draw_matches_sampling_on_gpu():
    exec(CHECK.format(device="cuda"), {})
