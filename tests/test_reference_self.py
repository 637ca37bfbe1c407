"""Self-checks of the float64 reference in tests/reference_aim.py (CPU, tiny sizes)."""

import math

import pytest
import reference_aim as R
import torch
import torch.nn.functional as F

DT = torch.float64


def _inputs(cfg, B=2, T=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    T = cfg["num_tokens"] if T is None else T
    codes = torch.randint(0, cfg["vocab_size"], (B, T), generator=g)
    labels = torch.randint(0, cfg["num_classes"], (B,), generator=g)
    return codes, labels


CONFIGS = {
    "group": dict(adaln_group=True, num_groups=2),
    "perlayer": dict(adaln_group=False, num_groups=4),
    "ngroups2": dict(adaln_group=True, num_groups=1, ngroups=2, d_state=4, headdim=16, n_layer=2),
}


@pytest.fixture(params=list(CONFIGS))
def cfg(request):
    return R.ref_config(**CONFIGS[request.param])


def test_state_dict_shapes_and_nonzero(cfg):
    sd = R.random_original_state_dict(cfg, seed=0)
    d, L = cfg["d_model"], cfg["n_layer"]
    di = cfg["expand"] * d
    H = di // cfg["headdim"]
    GN = cfg["ngroups"] * cfg["d_state"]
    exp = {
        "backbone.embeddings.word_embeddings.weight": (cfg["vocab_size"], d),
        "backbone.embeddings.position_embeddings.weight": (cfg["num_tokens"] + 1, d),
        "backbone.cls_embed.embedding_table.weight": (cfg["num_classes"] + 1, d),
        "backbone.norm_f.weight": (d,),
        "backbone.final_layer.norm_final.weight": (d,),
        "backbone.final_layer.adaLN_modulation.1.weight": (2 * d, d),
        "backbone.final_layer.adaLN_modulation.1.bias": (2 * d,),
        "lm_head.weight": (cfg["vocab_size"], d),
    }
    for i in range(L):
        p = f"backbone.layers.{i}."
        exp[p + "norm.weight"] = (d,)
        exp[p + "mixer.in_proj.weight"] = (2 * di + 2 * GN + H, d)
        exp[p + "mixer.conv1d.weight"] = (di + 2 * GN, 1, cfg["d_conv"])
        exp[p + "mixer.conv1d.bias"] = (di + 2 * GN,)
        exp[p + "mixer.dt_bias"] = (H,)
        exp[p + "mixer.A_log"] = (H,)
        exp[p + "mixer.D"] = (H,)
        exp[p + "mixer.norm.weight"] = (di,)
        exp[p + "mixer.out_proj.weight"] = (d, di)
        if cfg["adaln_group"]:
            exp[p + "scale_shift_table"] = (1, 3, d)
        else:
            exp[p + "adaLN_modulation.1.weight"] = (3 * d, d)
            exp[p + "adaLN_modulation.1.bias"] = (3 * d,)
    if cfg["adaln_group"]:
        G = cfg["num_groups"]
        exp["backbone.adaln_group.1.weight"] = (G * 3 * d, d)
        exp["backbone.adaln_group.1.bias"] = (G * 3 * d,)
    assert set(sd) == set(exp)
    for k, shape in exp.items():
        assert tuple(sd[k].shape) == shape, k
        assert sd[k].dtype == DT, k
        assert (sd[k] != 0).all(), k
    assert torch.equal(sd["lm_head.weight"], sd["backbone.embeddings.word_embeddings.weight"])
    for i in range(L):
        A = -torch.exp(sd[f"backbone.layers.{i}.mixer.A_log"])
        assert (A <= -0.5).all() and (A >= -4.0).all()
    # different seeds give different weights, same seed the same
    sd2 = R.random_original_state_dict(cfg, seed=0)
    sd3 = R.random_original_state_dict(cfg, seed=1)
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert not torch.equal(sd["lm_head.weight"], sd3["lm_head.weight"])


def test_activation_magnitudes():
    cfg = R.ref_config()
    sd = R.random_original_state_dict(cfg, seed=0)
    codes, labels = _inputs(cfg)
    # dt actually seen by the SSM stays in a sane range
    c = sd["backbone.cls_embed.embedding_table.weight"][labels]
    tok = sd["backbone.embeddings.word_embeddings.weight"][codes[:, :-1]]
    tok = tok + sd["backbone.embeddings.position_embeddings.weight"][: codes.shape[1] - 1]
    hidden = torch.cat([c[:, None], tok], 1)
    shift, scale, gate = R.layer_modulations(sd, cfg, c)[0]
    h = R.rms_norm(hidden, sd["backbone.layers.0.norm.weight"]) * (1 + scale[:, None]) + shift[:, None]
    dt_raw = (h @ sd["backbone.layers.0.mixer.in_proj.weight"].T)[..., -8:]
    dt = F.softplus(dt_raw + sd["backbone.layers.0.mixer.dt_bias"])
    assert dt.min() > 0.005 and dt.max() < 0.6
    logits = R.reference_forward_logits(sd, cfg, codes, labels)
    assert torch.isfinite(logits).all()
    p = logits.softmax(-1)
    assert p.max() < 0.9  # softmax not saturated
    assert 0.3 < logits.std() < 5.0


def test_causality(cfg):
    sd = R.random_original_state_dict(cfg, seed=2)
    codes, labels = _inputs(cfg, T=10)
    base = R.reference_forward_logits(sd, cfg, codes, labels)
    for t in (0, 4, 8):
        c2 = codes.clone()
        c2[:, t] = (c2[:, t] + 1) % cfg["vocab_size"]
        out = R.reference_forward_logits(sd, cfg, c2, labels)
        assert torch.equal(out[:, : t + 1], base[:, : t + 1])
        assert (out[:, t + 1] - base[:, t + 1]).abs().max() > 1e-6
    # the last code never influences anything
    c2 = codes.clone()
    c2[:, -1] = (c2[:, -1] + 1) % cfg["vocab_size"]
    assert torch.equal(R.reference_forward_logits(sd, cfg, c2, labels), base)
    # the label influences every position
    out = R.reference_forward_logits(sd, cfg, codes, (labels + 1) % cfg["num_classes"])
    assert ((out - base).abs().amax(dim=(0, 2)) > 1e-6).all()


def test_prefix_consistency():
    cfg = R.ref_config()
    sd = R.random_original_state_dict(cfg, seed=3)
    codes, labels = _inputs(cfg)
    full = R.reference_forward_logits(sd, cfg, codes, labels)
    for T in (1, 2, 7):
        part = R.reference_forward_logits(sd, cfg, codes[:, :T], labels)
        assert part.shape == (2, T, cfg["vocab_size"])
        torch.testing.assert_close(part, full[:, :T], rtol=0, atol=1e-12)


def test_forward_equals_decode(cfg):
    sd = R.random_original_state_dict(cfg, seed=4)
    codes, labels = _inputs(cfg, B=3)
    fwd = R.reference_forward_logits(sd, cfg, codes, labels)
    dec = R.reference_decode_logits(sd, cfg, codes, labels, 1.0, False)
    assert fwd.shape == dec.shape == (3, cfg["num_tokens"], cfg["vocab_size"])
    assert (fwd - dec).abs().max() < 1e-10
    # the null class is a valid label too
    null = torch.full_like(labels, cfg["num_classes"])
    fwd0 = R.reference_forward_logits(sd, cfg, codes, null)
    dec0 = R.reference_decode_logits(sd, cfg, codes, labels, 0.0, False)
    assert (fwd0 - dec0).abs().max() < 1e-10


def test_original_positions():
    cfg = R.ref_config()
    sd = R.random_original_state_dict(cfg, seed=5)
    codes, labels = _inputs(cfg)
    shifted = R.reference_decode_logits(sd, cfg, codes, labels, 1.0, True)
    plain = R.reference_decode_logits(sd, cfg, codes, labels, 1.0, False)
    assert torch.equal(shifted[:, 0], plain[:, 0])  # step 0 has no position
    assert ((shifted[:, 1:] - plain[:, 1:]).abs().amax(dim=(0, 2)) > 1e-6).all()
    # the quirk = forward with the position table moved up one row
    sd2 = dict(sd)
    pos = sd["backbone.embeddings.position_embeddings.weight"]
    sd2["backbone.embeddings.position_embeddings.weight"] = torch.cat([pos[1:], pos[:1]])
    fwd = R.reference_forward_logits(sd2, cfg, codes, labels)
    assert (fwd - shifted).abs().max() < 1e-10
    # and the last table row is used with original positions only
    sd3 = dict(sd)
    pos3 = pos.clone()
    pos3[cfg["num_tokens"]] += 1.0
    sd3["backbone.embeddings.position_embeddings.weight"] = pos3
    assert torch.equal(R.reference_decode_logits(sd3, cfg, codes, labels, 1.0, True), shifted)
    assert torch.equal(R.reference_decode_logits(sd3, cfg, codes, labels, 1.0, False), plain)


def test_cfg_combination():
    cfg = R.ref_config(n_layer=2)
    sd = R.random_original_state_dict(cfg, seed=6)
    codes, labels = _inputs(cfg, T=6)
    cond = R.reference_forward_logits(sd, cfg, codes, labels)
    uncond = R.reference_forward_logits(sd, cfg, codes, torch.full_like(labels, cfg["num_classes"]))
    for s in (1.75, 5.0):
        dec = R.reference_decode_logits(sd, cfg, codes, labels, s, False)
        assert (dec - (uncond + (cond - uncond) * s)).abs().max() < 1e-9


def _group_to_per_layer(sd, cfg):
    """Group model -> equivalent per-layer adaLN model (bias absorbs the layer's table)."""
    d, G = cfg["d_model"], cfg["num_groups"]
    w = sd["backbone.adaln_group.1.weight"].view(G, 3 * d, d)
    b = sd["backbone.adaln_group.1.bias"].view(G, 3 * d)
    out = {k: v for k, v in sd.items() if not k.startswith("backbone.adaln_group")}
    for i in range(cfg["n_layer"]):
        p = f"backbone.layers.{i}."
        table = out.pop(p + "scale_shift_table").reshape(3 * d)
        out[p + "adaLN_modulation.1.weight"] = w[i % G].clone()
        out[p + "adaLN_modulation.1.bias"] = b[i % G] + table
    return out, dict(cfg, adaln_group=False)


def _per_layer_to_group(sd, cfg):
    """Per-layer model -> group model with G = n_layer and zero tables (SPEC section 5)."""
    d, L = cfg["d_model"], cfg["n_layer"]
    out = {k: v for k, v in sd.items() if "adaLN_modulation" not in k or "final_layer" in k}
    out["backbone.adaln_group.1.weight"] = torch.cat(
        [sd[f"backbone.layers.{i}.adaLN_modulation.1.weight"] for i in range(L)]
    )
    out["backbone.adaln_group.1.bias"] = torch.cat(
        [sd[f"backbone.layers.{i}.adaLN_modulation.1.bias"] for i in range(L)]
    )
    for i in range(L):
        out[f"backbone.layers.{i}.scale_shift_table"] = torch.zeros(1, 3, d, dtype=DT)
    return out, dict(cfg, adaln_group=True, num_groups=L)


def test_per_layer_equals_group_with_G_eq_n_layer():
    # group model with G = n_layer (non-zero tables) -> per-layer adaLN
    cfg = R.ref_config(n_layer=3, adaln_group=True, num_groups=3)
    sd = R.random_original_state_dict(cfg, seed=7)
    codes, labels = _inputs(cfg, T=8)
    ref = R.reference_forward_logits(sd, cfg, codes, labels)
    sd_pl, cfg_pl = _group_to_per_layer(sd, cfg)
    out = R.reference_forward_logits(sd_pl, cfg_pl, codes, labels)
    assert (out - ref).abs().max() < 1e-12
    # per-layer -> stacked group with zero tables
    cfg2 = R.ref_config(n_layer=3, adaln_group=False)
    sd2 = R.random_original_state_dict(cfg2, seed=8)
    ref2 = R.reference_forward_logits(sd2, cfg2, codes, labels)
    sd_g, cfg_g = _per_layer_to_group(sd2, cfg2)
    out2 = R.reference_forward_logits(sd_g, cfg_g, codes, labels)
    assert (out2 - ref2).abs().max() < 1e-12
    dec = R.reference_decode_logits(sd_g, cfg_g, codes, labels, 2.0, True)
    dec_ref = R.reference_decode_logits(sd2, cfg2, codes, labels, 2.0, True)
    assert (dec - dec_ref).abs().max() < 1e-12


def test_group_expansion_and_interleaving():
    cfg = R.ref_config(n_layer=4, adaln_group=True, num_groups=2)
    sd = R.random_original_state_dict(cfg, seed=9)
    codes, labels = _inputs(cfg, T=8)
    ref = R.reference_forward_logits(sd, cfg, codes, labels)
    d = cfg["d_model"]
    # G=2 -> G=4 by copying group j % 2 into new group j
    w = sd["backbone.adaln_group.1.weight"].view(2, 3 * d, d)
    b = sd["backbone.adaln_group.1.bias"].view(2, 3 * d)
    sd4 = dict(sd)
    sd4["backbone.adaln_group.1.weight"] = torch.cat([w[j % 2] for j in range(4)])
    sd4["backbone.adaln_group.1.bias"] = torch.cat([b[j % 2] for j in range(4)])
    out = R.reference_forward_logits(sd4, dict(cfg, num_groups=4), codes, labels)
    assert (out - ref).abs().max() < 1e-12
    # contiguous assignment (layer i -> group i // 2) would be a different model
    sd_c = dict(sd)
    sd_c["backbone.adaln_group.1.weight"] = torch.cat([w[j // 2] for j in range(4)])
    sd_c["backbone.adaln_group.1.bias"] = torch.cat([b[j // 2] for j in range(4)])
    out_c = R.reference_forward_logits(sd_c, dict(cfg, num_groups=4), codes, labels)
    assert (out_c - ref).abs().max() > 1e-6
    # direct check of the modulation of each layer
    c = sd["backbone.cls_embed.embedding_table.weight"][labels]
    mods = R.layer_modulations(sd, cfg, c)
    full = F.silu(c) @ sd["backbone.adaln_group.1.weight"].T + sd["backbone.adaln_group.1.bias"]
    for i in range(4):
        table = sd[f"backbone.layers.{i}.scale_shift_table"][0]
        j = i % 2
        for r, name in enumerate(("shift", "scale", "gate")):
            expect = full[:, (3 * j + r) * d : (3 * j + r + 1) * d] + table[r]
            assert torch.allclose(mods[i][r], expect, rtol=0, atol=1e-14), (i, name)
    # G = 1: adaLN-single, every layer differs only by its table
    cfg1 = R.ref_config(n_layer=3, adaln_group=True, num_groups=1)
    sd1 = R.random_original_state_dict(cfg1, seed=10)
    m1 = R.layer_modulations(sd1, cfg1, c)
    for i in range(3):
        t = sd1[f"backbone.layers.{i}.scale_shift_table"][0]
        t0 = sd1["backbone.layers.0.scale_shift_table"][0]
        for r in range(3):
            assert torch.allclose(m1[i][r] - t[r], m1[0][r] - t0[r], rtol=0, atol=1e-14)


def test_ssm_closed_form_one_and_two_steps():
    g = torch.Generator().manual_seed(11)
    B, H, P, N = 2, 3, 4, 5
    x = torch.randn(B, 2, H, P, generator=g, dtype=DT)
    dt = torch.rand(B, 2, H, generator=g, dtype=DT) * 0.5 + 0.01
    A = -(torch.rand(H, generator=g, dtype=DT) * 3.5 + 0.5)
    Bm = torch.randn(B, 2, H, N, generator=g, dtype=DT)
    Cm = torch.randn(B, 2, H, N, generator=g, dtype=DT)
    D = torch.rand(H, generator=g, dtype=DT) + 0.5
    y = R.ssm_scan(x, dt, A, Bm, Cm, D)
    for b in range(B):
        for h in range(H):
            bc00 = float(Bm[b, 0, h] @ Cm[b, 0, h])
            bc01 = float(Bm[b, 0, h] @ Cm[b, 1, h])
            bc11 = float(Bm[b, 1, h] @ Cm[b, 1, h])
            d0, d1, a = float(dt[b, 0, h]), float(dt[b, 1, h]), float(A[h])
            y0 = d0 * bc00 * x[b, 0, h] + D[h] * x[b, 0, h]
            y1 = math.exp(d1 * a) * d0 * bc01 * x[b, 0, h] + d1 * bc11 * x[b, 1, h] + D[h] * x[b, 1, h]
            torch.testing.assert_close(y[b, 0, h], y0, rtol=0, atol=1e-13)
            torch.testing.assert_close(y[b, 1, h], y1, rtol=0, atol=1e-13)


def test_ssm_scan_equals_quadratic_form():
    g = torch.Generator().manual_seed(12)
    B, T, H, P, N = 2, 9, 2, 3, 4
    x = torch.randn(B, T, H, P, generator=g, dtype=DT)
    dt = torch.rand(B, T, H, generator=g, dtype=DT) * 0.5 + 0.01
    A = -(torch.rand(H, generator=g, dtype=DT) * 3.5 + 0.5)
    Bm = torch.randn(B, T, H, N, generator=g, dtype=DT)
    Cm = torch.randn(B, T, H, N, generator=g, dtype=DT)
    D = torch.rand(H, generator=g, dtype=DT) + 0.5
    y = R.ssm_scan(x, dt, A, Bm, Cm, D)
    # y_t = sum_{s<=t} exp(A * sum_{r=s+1..t} dt_r) dt_s (C_t . B_s) x_s + D x_t
    cs = torch.cumsum(dt, dim=1)  # (B, T, H)
    seg = cs[:, :, None, :] - cs[:, None, :, :]  # (B, t, s, H)
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))[None, :, :, None]
    L = torch.where(mask, torch.exp(seg * A), torch.zeros_like(seg))
    CB = torch.einsum("bthn,bshn->btsh", Cm, Bm)
    yq = torch.einsum("btsh,bsh,bshp->bthp", L * CB, dt, x) + D[None, None, :, None] * x
    torch.testing.assert_close(y, yq, rtol=0, atol=1e-12)


def test_conv_matches_torch_conv1d():
    g = torch.Generator().manual_seed(13)
    B, T, C, K = 2, 7, 5, 4
    x = torch.randn(B, T, C, generator=g, dtype=DT)
    w = torch.randn(C, 1, K, generator=g, dtype=DT)
    b = torch.randn(C, generator=g, dtype=DT)
    out = R.causal_depthwise_conv(x, w, b)
    expect = F.conv1d(x.transpose(1, 2), w, b, padding=K - 1, groups=C)[..., :T].transpose(1, 2)
    torch.testing.assert_close(out, expect, rtol=0, atol=1e-13)


def test_gated_rms_norm_groups():
    g = torch.Generator().manual_seed(14)
    y = torch.randn(3, 8, generator=g, dtype=DT)
    z = torch.randn(3, 8, generator=g, dtype=DT)
    w = torch.randn(8, generator=g, dtype=DT)
    out = R.gated_rms_norm(y, z, w, ngroups=2)
    gz = y * z * torch.sigmoid(z)
    for k in range(2):
        part = gz[:, 4 * k : 4 * k + 4]
        expect = part / torch.sqrt(part.pow(2).mean(-1, keepdim=True) + 1e-5) * w[4 * k : 4 * k + 4]
        torch.testing.assert_close(out[:, 4 * k : 4 * k + 4], expect, rtol=0, atol=1e-14)
    one = R.gated_rms_norm(y, z, w, ngroups=1)
    assert not torch.allclose(one, out)


def test_every_parameter_is_used_and_lm_head_source():
    cfg = R.ref_config(n_layer=2)
    sd = R.random_original_state_dict(cfg, seed=15)
    codes, labels = _inputs(cfg, T=6)
    base = R.reference_forward_logits(sd, cfg, codes, labels)
    g = torch.Generator().manual_seed(16)
    for k in sd:
        sd2 = dict(sd)
        sd2[k] = sd[k] + 0.05 * torch.randn(sd[k].shape, generator=g, dtype=DT)
        out = R.reference_forward_logits(sd2, cfg, codes, labels)
        assert (out - base).abs().max() > 1e-8, k
    # without lm_head.weight the tied word embedding is the head
    sd_no = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    assert torch.equal(R.reference_forward_logits(sd_no, cfg, codes, labels), base)
    # float32 inputs are promoted to float64
    sd32 = {k: v.float() for k, v in sd.items()}
    out32 = R.reference_forward_logits(sd32, cfg, codes, labels)
    assert out32.dtype == DT and (out32 - base).abs().max() < 1e-4


def test_filter_basic():
    g = torch.Generator().manual_seed(17)
    logits = torch.randn(3, 4, 50, generator=g, dtype=DT) * 2
    p = R.reference_sample_filter(logits, 1.0, 0, 1.0)
    assert p.dtype == DT and p.shape == logits.shape
    torch.testing.assert_close(p, logits.softmax(-1), rtol=0, atol=1e-15)
    torch.testing.assert_close(
        R.reference_sample_filter(logits, 0.5, 0, 1.0), (logits * 2).softmax(-1), rtol=0, atol=1e-15
    )
    am = logits.argmax(-1, keepdim=True)
    onehot = torch.zeros_like(logits).scatter(-1, am, 1.0)
    for kw in (dict(top_k=1), dict(top_p=1e-9), dict(top_p=0.0), dict(top_k=5, top_p=1e-9)):
        q = R.reference_sample_filter(logits, 0.7, **kw)
        assert torch.equal(q, onehot), kw
    # top-k: exactly k survivors (no ties), renormalised softmax over them
    q = R.reference_sample_filter(logits, 1.0, 7, 1.0)
    assert ((q > 0).sum(-1) == 7).all()
    torch.testing.assert_close(q.sum(-1), torch.ones(3, 4, dtype=DT), rtol=0, atol=1e-14)
    top = logits.topk(7, dim=-1)
    expect = torch.zeros_like(logits).scatter(-1, top.indices, top.values.softmax(-1))
    torch.testing.assert_close(q, expect, rtol=0, atol=1e-15)
    # top_k >= vocab is off
    torch.testing.assert_close(R.reference_sample_filter(logits, 1.0, 50, 1.0), p, rtol=0, atol=1e-15)


def test_filter_top_p_hand_example():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3], dtype=DT)
    logits = probs.log()
    keep2 = R.reference_sample_filter(logits, 1.0, 0, 0.75)
    torch.testing.assert_close(keep2, torch.tensor([0, 0.625, 0, 0.375], dtype=DT), rtol=0, atol=1e-15)
    keep3 = R.reference_sample_filter(logits, 1.0, 0, 0.85)
    torch.testing.assert_close(keep3, torch.tensor([0, 0.5, 0.15, 0.3], dtype=DT) / 0.95, rtol=0, atol=1e-15)
    keep1 = R.reference_sample_filter(logits, 1.0, 0, 0.4)
    assert torch.equal(keep1, torch.tensor([0, 1.0, 0, 0], dtype=DT))
    # top-k first, then top-p on the renormalised distribution: {0.5, 0.3} -> {0.625, 0.375}
    both = R.reference_sample_filter(logits, 1.0, 2, 0.6)
    assert torch.equal(both, torch.tensor([0, 1.0, 0, 0], dtype=DT))
    both = R.reference_sample_filter(logits, 1.0, 2, 0.7)
    torch.testing.assert_close(both, torch.tensor([0, 0.625, 0, 0.375], dtype=DT), rtol=0, atol=1e-15)
    with pytest.raises(ValueError):
        R.reference_sample_filter(logits, 0.0, 0, 1.0)


def test_single_step_forward_written_out():
    """T = 1 (class token only) computed inline from SPEC sections 2-3, per-layer adaLN."""
    cfg = R.ref_config(n_layer=2, adaln_group=False)
    sd = R.random_original_state_dict(cfg, seed=18)
    _, labels = _inputs(cfg, T=1)
    d, di, H, P, N, K = 32, 64, 8, 8, 8, 4
    c = sd["backbone.cls_embed.embedding_table.weight"][labels]
    sc = c * torch.sigmoid(c)

    def rms(v, w):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    hidden, residual = c, None
    for i in range(2):
        p = f"backbone.layers.{i}."
        mod = sc @ sd[p + "adaLN_modulation.1.weight"].T + sd[p + "adaLN_modulation.1.bias"]
        shift, scale, gate = mod[:, :d], mod[:, d : 2 * d], mod[:, 2 * d :]
        residual = hidden if residual is None else hidden + residual
        h = rms(residual, sd[p + "norm.weight"]) * (1 + scale) + shift
        proj = h @ sd[p + "mixer.in_proj.weight"].T
        z, xbc, dtr = proj[:, :di], proj[:, di : 2 * di + 2 * N], proj[:, 2 * di + 2 * N :]
        # only the newest tap of the causal kernel sees a non-padding input
        xbc = xbc * sd[p + "mixer.conv1d.weight"][:, 0, K - 1] + sd[p + "mixer.conv1d.bias"]
        xbc = xbc * torch.sigmoid(xbc)
        x, Bv, Cv = xbc[:, :di].view(-1, H, P), xbc[:, di : di + N], xbc[:, di + N :]
        dt = F.softplus(dtr + sd[p + "mixer.dt_bias"])  # (B, H)
        # one step from a zero state: y = dt * (B . C) * x + D * x
        y = (dt * (Bv * Cv).sum(-1, keepdim=True))[..., None] * x + sd[p + "mixer.D"][:, None] * x
        y = y.reshape(-1, di) * F.silu(z)
        y = rms(y, sd[p + "mixer.norm.weight"])
        hidden = gate * (y @ sd[p + "mixer.out_proj.weight"].T)
    residual = hidden + residual
    fm = sc @ sd["backbone.final_layer.adaLN_modulation.1.weight"].T
    fm = fm + sd["backbone.final_layer.adaLN_modulation.1.bias"]
    h = rms(residual, sd["backbone.norm_f.weight"])
    h = rms(h, sd["backbone.final_layer.norm_final.weight"]) * (1 + fm[:, d:]) + fm[:, :d]
    expect = h @ sd["backbone.embeddings.word_embeddings.weight"].T
    codes = torch.zeros(2, 1, dtype=torch.long)
    out = R.reference_forward_logits(sd, cfg, codes, labels)
    torch.testing.assert_close(out[:, 0], expect, rtol=0, atol=1e-12)
    dec = R.reference_decode_logits(sd, cfg, codes, labels, 1.0, True)
    torch.testing.assert_close(dec[:, 0], expect, rtol=0, atol=1e-12)
