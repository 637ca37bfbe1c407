"""out_proj at AiM-XL's and AiM-B's shapes with the default launch against float64."""
import os, sys, torch
from aim_hf.triton_gemv import norm_linear_residual, default_launch
dev = os.environ.get("DEV", "cuda")
g = torch.Generator().manual_seed(0)
for n, k in [(1536, 3072), (768, 1536), (64, 96)]:
    x = torch.randn(2, k, generator=g).to(dev, torch.bfloat16)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dev, torch.bfloat16)
    res, gate = torch.randn(2, n, generator=g).to(dev), torch.randn(2, n, generator=g).to(dev)
    sq = torch.rand(2, 5, generator=g).to(dev) * k
    nxt = torch.rand(2, n, generator=g).to(dev)
    ref = res.double() + gate.double() * (x.double() @ w.double().T) / torch.sqrt(sq.double().sum(-1, keepdim=True) / k + 1e-5)
    out, scaled, parts = norm_linear_residual(x, sq, w, res, gate, 1e-5, nxt)
    e = ((out.double() - ref).norm() / ref.norm()).item()
    print(n, k, default_launch(1, n, k), "rel", f"{e:.1e}", "parts", f"{((parts.sum(-1).double() - ref.pow(2).sum(-1)).abs() / ref.pow(2).sum(-1)).max().item():.1e}")
    assert e < 1e-5
