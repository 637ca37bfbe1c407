"""The fused draw (triton_sampling) against sampling.py's guide, temperature and inverse-CDF draw:
on the CPU through Triton's interpreter (in a subprocess), on the GPU directly."""

import pytest
import torch
from test_triton_ssm import run_in_interpreter

pytest.importorskip("triton")

# The guided logits are the same float32 operations as sampling.guide (up to a fused multiply-add:
# one float32 rounding, 2^-24 relative); the masses are float64 in both, summed in another order
# (and rescaled per part when a row is split), so a code can differ only where a uniform falls
# within ~1e-15 of a boundary: the codes must be equal except there, which among these few hundred
# draws happens only at the largest uniform (1 - 2^-53, the last codes' masses below 1e-16 at
# guidance 4), checked then to lie within 1e-12 of the code's CDF interval. Top-k's set is exact;
# top-p's mass is summed in float32 in another order than filter_logits', so its set could differ
# only where a code's mass above lies within ~1e-7 of top_p: not for these draws either.
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
    uniforms[-1, 6] = 0.0  # the smallest: the first code with mass
    arrivals = torch.zeros(batch, dtype=torch.int32, device=device)  # reused: the kernel leaves it zero
    # the default block and parts, several blocks a row or a part, one part (the whole row in one
    # program), more parts than the default (some empty at 300 codes), and top-k / top-p
    # (thresholds by bisection, no sort; one part)
    for step, block, splits, top_k, top_p in [
        (0, None, None, 0, 1.0), (5, None, None, 0, 1.0), (5, 64, 4, 0, 1.0), (6, 1024, 1, 0, 1.0),
        (6, None, 32, 0, 1.0), (1, None, None, 1, 1.0), (2, None, None, 37, 1.0), (3, None, None, 0, 0.8),
        (4, 1024, None, 200, 0.9),
    ]:
        t = torch.tensor([step], device=device)
        codes = torch.full((batch, 7), -1, dtype=torch.long, device=device)
        guided = torch.zeros(batch, vocab, device=device)
        draw(logits, uniforms, t, codes, guided, scale, temperature, top_k, top_p, block=block, splits=splits,
             arrivals=arrivals)
        assert (arrivals == 0).all()
        ref_guided = guide(logits, scale) if scale is not None else logits.float()
        ref = sample_inverse_cdf(filter_logits(ref_guided, temperature, top_k, top_p), uniforms[:, step])
        err = ((guided.double() - ref_guided.double()).abs().max() / ref_guided.double().abs().max()).item()
        assert err < 2**-22, (batch, vocab, err)
        differ = (codes[:, step] != ref).nonzero().flatten().tolist()
        where = (batch, vocab, step, splits, top_k, top_p, differ)
        assert set(differ) <= {{0}} and (not differ or step == 5), where
        for row in differ:  # the largest uniform: a code with mass whose CDF interval holds it, up to rounding
            probs = filter_logits(ref_guided, temperature, top_k, top_p)[row].double().softmax(-1).cpu()
            cdf, code, u = probs.cumsum(-1), codes[row, step].item(), uniforms[row, step].item()
            below = cdf[code - 1].item() if code > 0 else 0.0
            assert 0 <= code < vocab and probs[code] > 0, (batch, vocab, row, code)
            assert below - 1e-12 <= u <= cdf[code].item() + 1e-12, (batch, vocab, row, code)
        others = [s for s in range(7) if s != step]
        assert (codes[:, others] == -1).all()  # only step t written
# parts whose logits are all -inf (codes masked out) hold no mass and are never drawn
logits = 3 * torch.randn(2, 4096, generator=g)
logits[0, 2048:] = float("-inf")
logits[1, :2048] = float("-inf")
logits, uniforms = logits.to(device), torch.rand(2, 1, generator=g, dtype=torch.float64).to(device)
for splits in (1, 2, 4):
    codes = torch.full((2, 1), -1, dtype=torch.long, device=device)
    guided = torch.zeros(2, 4096, device=device)
    draw(logits, uniforms, torch.tensor([0], device=device), codes, guided, None, 1.0, splits=splits)
    assert torch.equal(codes[:, 0], sample_inverse_cdf(logits, uniforms[:, 0])), (splits, codes)
print("ok")
"""


def test_draw_matches_sampling_in_interpreter():
    run_in_interpreter(CHECK.format(device="cpu"), timeout=300)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_draw_matches_sampling_on_gpu():
    exec(CHECK.format(device="cuda"), {})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_split_draw_reads_every_part_fresh_on_gpu():
    """Many rows, new logits every draw, the buffers reused: the last part of a row must read what
    the row's other parts wrote in the same launch. A first version drew codes past the vocabulary
    at batch 256 in the decoder and fails this test (BENCHMARKS.md); the draw benchmark, which
    replays the same logits, could not tell."""
    from aim_hf.sampling import guide, sample_inverse_cdf
    from aim_hf.triton_sampling import draw

    batch, vocab, steps = 256, 16384, 100
    g = torch.Generator("cuda").manual_seed(0)
    uniforms = torch.rand(batch, steps, generator=g, device="cuda", dtype=torch.float64)
    codes = torch.full((batch, steps), -1, dtype=torch.long, device="cuda")
    guided = torch.zeros(batch, vocab, device="cuda")
    arrivals = torch.zeros(batch, dtype=torch.int32, device="cuda")
    for step in range(steps):
        logits = (3 * torch.randn(2 * batch, vocab, generator=g, device="cuda")).bfloat16()
        draw(
            logits, uniforms, torch.tensor([step], device="cuda"), codes, guided, 2.0, 1.0, arrivals=arrivals
        )
        assert torch.equal(codes[:, step], sample_inverse_cdf(guide(logits, 2.0), uniforms[:, step])), step
    assert (arrivals == 0).all()


def test_draw_rejects_bad_arrivals():
    from aim_hf.triton_sampling import draw

    logits, uniforms = torch.zeros(2, 4096), torch.zeros(1, 4, dtype=torch.float64)
    codes, guided = torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4096)
    for arrivals in (torch.zeros(2, dtype=torch.int32), torch.zeros(1, dtype=torch.int64)):
        with pytest.raises(ValueError, match=r"arrivals must be \(batch,\) = \(1,\) int32 zeros, got"):
            draw(
                logits, uniforms, torch.zeros(1, dtype=torch.long), codes, guided, 2.0, 1.0, arrivals=arrivals
            )


@pytest.mark.parametrize(("splits", "top_k"), [(3, 0), (0, 0), (2, 50)])
def test_draw_rejects_bad_splits(splits, top_k):
    from aim_hf.triton_sampling import draw

    logits, uniforms = torch.zeros(2, 4096), torch.zeros(1, 4, dtype=torch.float64)
    codes, guided = torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4096)
    with pytest.raises(ValueError, match=f"got {splits}"):
        draw(
            logits, uniforms, torch.zeros(1, dtype=torch.long), codes, guided, 2.0, 1.0, top_k, splits=splits
        )
