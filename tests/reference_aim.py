"""Independent, deliberately slow float64 reference of AiM stage 2 (see SPEC.md sections 2-5).

Everything here works directly on ORIGINAL state dicts (stage-2 keys exactly as SPEC section 5,
without any "mamba." prefix) and a plain dict config built by :func:`ref_config`.
All computation is done in float64 with explicit loops so that it is easy to check by eye:

* :func:`reference_forward_logits` - teacher-forced forward (SPEC section 3, no label dropout),
  computed layer by layer over the whole sequence.
* :func:`reference_decode_logits` - step-by-step recurrent decoding with CFG (SPEC section 4),
  computed time step by time step with a carried conv window and SSM state.
* :func:`reference_sample_filter` - temperature, top-k, top-p, renormalised probabilities.

The output head is ``lm_head.weight`` when present, else the (tied) word embedding matrix.
"""

from __future__ import annotations

import math

import torch

DTYPE = torch.float64
EPS = 1e-5

# ----------------------------------------------------------------------------------------------
# config and random weights
# ----------------------------------------------------------------------------------------------


def ref_config(
    d_model: int = 32,
    n_layer: int = 4,
    vocab_size: int = 37,
    num_classes: int = 5,
    num_tokens: int = 16,
    adaln_group: bool = True,
    num_groups: int = 2,
    d_state: int = 8,
    headdim: int = 8,
    expand: int = 2,
    d_conv: int = 4,
    ngroups: int = 1,
) -> dict:
    """Plain dict config (flat; the original keeps the mixer fields inside ssm_cfg)."""
    d_inner = expand * d_model
    assert d_inner % headdim == 0, "d_inner must be a multiple of headdim"
    nheads = d_inner // headdim
    assert nheads % ngroups == 0 and d_inner % ngroups == 0
    if adaln_group:
        assert num_groups >= 1
    return {
        "d_model": d_model,
        "n_layer": n_layer,
        "vocab_size": vocab_size,
        "num_classes": num_classes,
        "num_tokens": num_tokens,
        "adaln_group": bool(adaln_group),
        "num_groups": num_groups,
        "d_state": d_state,
        "headdim": headdim,
        "expand": expand,
        "d_conv": d_conv,
        "ngroups": ngroups,
        "rms_norm_eps": EPS,
    }


def _dims(cfg: dict) -> dict:
    d_model = cfg["d_model"]
    d_inner = cfg.get("expand", 2) * d_model
    headdim = cfg["headdim"]
    nheads = d_inner // headdim
    ngroups = cfg.get("ngroups", 1)
    d_state = cfg["d_state"]
    return {
        "d_model": d_model,
        "d_inner": d_inner,
        "headdim": headdim,
        "nheads": nheads,
        "ngroups": ngroups,
        "d_state": d_state,
        "d_conv": cfg.get("d_conv", 4),
        "conv_dim": d_inner + 2 * ngroups * d_state,
        "d_in_proj": 2 * d_inner + 2 * ngroups * d_state + nheads,
        "eps": cfg.get("rms_norm_eps", EPS),
    }


def random_original_state_dict(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random, non-zero float64 original stage-2 state dict with O(1) activations."""
    gen = torch.Generator().manual_seed(seed)
    dm = _dims(cfg)
    d = dm["d_model"]
    d_inner, nheads, conv_dim = dm["d_inner"], dm["nheads"], dm["conv_dim"]
    n_layer, vocab = cfg["n_layer"], cfg["vocab_size"]

    def randn(*shape, std=1.0, mean=0.0):
        return mean + std * torch.randn(*shape, generator=gen, dtype=DTYPE)

    def unif(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, generator=gen, dtype=DTYPE)

    def ada_bias(n_chunks):
        # (n_chunks * 3 * d,) ordered shift, scale, gate per chunk; gates centred at 0.5
        b = randn(n_chunks, 3, d, std=0.1)
        b[:, 2] += 0.5
        return b.reshape(-1)

    sd: dict[str, torch.Tensor] = {}
    for i in range(n_layer):
        p = f"backbone.layers.{i}."
        sd[p + "norm.weight"] = randn(d, mean=1.0, std=0.1)
        w_in = randn(dm["d_in_proj"], d, std=1.0 / math.sqrt(d))
        w_in[-nheads:] *= 0.3  # dt rows: keep softplus(dt_raw + dt_bias) in about [0.01, 0.5]
        sd[p + "mixer.in_proj.weight"] = w_in
        sd[p + "mixer.conv1d.weight"] = randn(conv_dim, 1, dm["d_conv"], std=0.5)
        sd[p + "mixer.conv1d.bias"] = randn(conv_dim, std=0.1)
        dt0 = torch.exp(unif(math.log(0.02), math.log(0.2), nheads))
        sd[p + "mixer.dt_bias"] = dt0 + torch.log(-torch.expm1(-dt0))  # inverse softplus
        sd[p + "mixer.A_log"] = torch.log(unif(0.5, 4.0, nheads))
        sd[p + "mixer.D"] = unif(0.5, 1.5, nheads)
        sd[p + "mixer.norm.weight"] = randn(d_inner, mean=1.0, std=0.1)
        sd[p + "mixer.out_proj.weight"] = randn(d, d_inner, std=1.0 / math.sqrt(d_inner))
        if cfg["adaln_group"]:
            table = randn(1, 3, d, std=0.1)
            sd[p + "scale_shift_table"] = table
        else:
            sd[p + "adaLN_modulation.1.weight"] = randn(3 * d, d, std=0.3 / math.sqrt(d))
            sd[p + "adaLN_modulation.1.bias"] = ada_bias(1)
    if cfg["adaln_group"]:
        G = cfg["num_groups"]
        sd["backbone.adaln_group.1.weight"] = randn(G * 3 * d, d, std=0.3 / math.sqrt(d))
        sd["backbone.adaln_group.1.bias"] = ada_bias(G)
    word = randn(vocab, d, std=1.0 / math.sqrt(d))
    sd["backbone.embeddings.word_embeddings.weight"] = word
    sd["backbone.embeddings.position_embeddings.weight"] = randn(
        cfg["num_tokens"] + 1, d, std=1.0 / math.sqrt(d)
    )
    sd["backbone.cls_embed.embedding_table.weight"] = randn(cfg["num_classes"] + 1, d, std=1.0)
    sd["backbone.norm_f.weight"] = randn(d, mean=1.0, std=0.1)
    sd["backbone.final_layer.norm_final.weight"] = randn(d, mean=1.0, std=0.1)
    sd["backbone.final_layer.adaLN_modulation.1.weight"] = randn(2 * d, d, std=0.3 / math.sqrt(d))
    sd["backbone.final_layer.adaLN_modulation.1.bias"] = randn(2 * d, std=0.1)
    sd["lm_head.weight"] = word.clone()  # tied: same values, separate storage
    return sd


# ----------------------------------------------------------------------------------------------
# small shared primitives
# ----------------------------------------------------------------------------------------------


def _w(sd: dict, key: str) -> torch.Tensor:
    return sd[key].to(DTYPE)


def _silu(x: torch.Tensor) -> torch.Tensor:
    return x / (1.0 + torch.exp(-x))


def _softplus(x: torch.Tensor) -> torch.Tensor:
    return torch.log1p(torch.exp(-x.abs())) + x.clamp(min=0)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dim."""
    return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps) * weight


def gated_rms_norm(y, z, weight, ngroups: int, eps: float = EPS) -> torch.Tensor:
    """RMSNormGated (norm after gate): (y * silu(z)) normed over ngroups contiguous groups."""
    g = y * _silu(z)
    n = g.shape[-1]
    gs = n // ngroups
    parts = []
    for k in range(ngroups):
        part = g[..., k * gs : (k + 1) * gs]
        parts.append(part / torch.sqrt((part * part).mean(dim=-1, keepdim=True) + eps))
    return torch.cat(parts, dim=-1) * weight


def _lm_head(sd: dict) -> torch.Tensor:
    if "lm_head.weight" in sd:
        return _w(sd, "lm_head.weight")
    return _w(sd, "backbone.embeddings.word_embeddings.weight")


def layer_modulations(sd: dict, cfg: dict, c: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Per layer (shift, scale, gate), each (B, d), from class embedding c (B, d)."""
    d, n_layer = cfg["d_model"], cfg["n_layer"]
    sc = _silu(c)
    out = []
    if cfg["adaln_group"]:
        G = cfg["num_groups"]
        w = _w(sd, "backbone.adaln_group.1.weight")
        b = _w(sd, "backbone.adaln_group.1.bias")
        g = (sc @ w.T + b).view(c.shape[0], G * 3, d)
        for i in range(n_layer):
            j = i % G  # interleaved assignment of groups to layers
            chunk = g[:, 3 * j : 3 * j + 3, :] + _w(sd, f"backbone.layers.{i}.scale_shift_table")
            out.append((chunk[:, 0], chunk[:, 1], chunk[:, 2]))
    else:
        for i in range(n_layer):
            w = _w(sd, f"backbone.layers.{i}.adaLN_modulation.1.weight")
            b = _w(sd, f"backbone.layers.{i}.adaLN_modulation.1.bias")
            m = sc @ w.T + b
            out.append((m[:, 0:d], m[:, d : 2 * d], m[:, 2 * d : 3 * d]))
    return out


def _final_head(sd: dict, cfg: dict, residual: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """norm_f, final adaLN (shift, scale), lm_head. residual (B, ..., d), c (B, d)."""
    d = cfg["d_model"]
    eps = cfg.get("rms_norm_eps", EPS)
    h = rms_norm(residual, _w(sd, "backbone.norm_f.weight"), eps)
    m = _silu(c) @ _w(sd, "backbone.final_layer.adaLN_modulation.1.weight").T
    m = m + _w(sd, "backbone.final_layer.adaLN_modulation.1.bias")
    shift, scale = m[:, :d], m[:, d:]
    if h.dim() == 3:
        shift, scale = shift[:, None, :], scale[:, None, :]
    h = rms_norm(h, _w(sd, "backbone.final_layer.norm_final.weight"), eps) * (1 + scale) + shift
    return h @ _lm_head(sd).T


# ----------------------------------------------------------------------------------------------
# mixer over a whole sequence (used by the forward)
# ----------------------------------------------------------------------------------------------


def causal_depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x (B, T, C), weight (C, 1, K), bias (C,): explicit window sum with K-1 zeros on the left."""
    Bsz, T, C = x.shape
    K = weight.shape[-1]
    out = torch.zeros_like(x)
    for t in range(T):
        acc = bias.expand(Bsz, C).clone()
        for k in range(K):
            src = t - (K - 1) + k
            if src >= 0:
                acc = acc + weight[:, 0, k] * x[:, src, :]
        out[:, t, :] = acc
    return out


def ssm_scan(x, dt, A, Bm, Cm, D) -> torch.Tensor:
    """Explicit recurrence.

    x (B, T, H, P), dt (B, T, H) (after softplus), A (H,), Bm/Cm (B, T, H, N) (already per head),
    D (H,). Returns y (B, T, H, P):
    state = exp(dt*A) * state + dt * outer(x_t, B_t); y_t = state @ C_t + D * x_t.
    """
    Bsz, T, H, P = x.shape
    N = Bm.shape[-1]
    state = torch.zeros(Bsz, H, P, N, dtype=DTYPE)
    ys = []
    for t in range(T):
        decay = torch.exp(dt[:, t] * A)  # (B, H)
        outer = x[:, t, :, :, None] * Bm[:, t, :, None, :]  # (B, H, P, N)
        state = decay[:, :, None, None] * state + dt[:, t, :, None, None] * outer
        y = (state * Cm[:, t, :, None, :]).sum(dim=-1) + D[None, :, None] * x[:, t]
        ys.append(y)
    return torch.stack(ys, dim=1)


def mixer_sequence(sd: dict, prefix: str, cfg: dict, h: torch.Tensor) -> torch.Tensor:
    """Mamba2 mixer on (B, T, d_model) -> (B, T, d_model). prefix e.g. 'backbone.layers.0.mixer.'."""
    dm = _dims(cfg)
    d_inner, H, P, G, N = dm["d_inner"], dm["nheads"], dm["headdim"], dm["ngroups"], dm["d_state"]
    Bsz, T, _ = h.shape
    zxbcdt = h @ _w(sd, prefix + "in_proj.weight").T
    z = zxbcdt[..., :d_inner]
    xBC = zxbcdt[..., d_inner : d_inner + dm["conv_dim"]]
    dt_raw = zxbcdt[..., d_inner + dm["conv_dim"] :]
    assert dt_raw.shape[-1] == H
    xBC = _silu(causal_depthwise_conv(xBC, _w(sd, prefix + "conv1d.weight"), _w(sd, prefix + "conv1d.bias")))
    x = xBC[..., :d_inner].reshape(Bsz, T, H, P)
    Bm = xBC[..., d_inner : d_inner + G * N].reshape(Bsz, T, G, N)
    Cm = xBC[..., d_inner + G * N :].reshape(Bsz, T, G, N)
    heads_per_group = H // G
    Bh = Bm.repeat_interleave(heads_per_group, dim=2)  # head h uses group h // heads_per_group
    Ch = Cm.repeat_interleave(heads_per_group, dim=2)
    dt = _softplus(dt_raw + _w(sd, prefix + "dt_bias"))
    A = -torch.exp(_w(sd, prefix + "A_log"))
    y = ssm_scan(x, dt, A, Bh, Ch, _w(sd, prefix + "D")).reshape(Bsz, T, d_inner)
    y = gated_rms_norm(y, z, _w(sd, prefix + "norm.weight"), G, dm["eps"])
    return y @ _w(sd, prefix + "out_proj.weight").T


# ----------------------------------------------------------------------------------------------
# forward (SPEC section 3)
# ----------------------------------------------------------------------------------------------


def reference_forward_logits(sd: dict, cfg: dict, codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Teacher-forced forward, no label dropout. codes (B, T) long, labels (B,) long.

    Inputs: [class token, word(codes[:, :T-1]) + position rows 0..T-2]. Returns (B, T, vocab).
    """
    Bsz, T = codes.shape
    assert 1 <= T <= cfg["num_tokens"]
    eps = cfg.get("rms_norm_eps", EPS)
    c = _w(sd, "backbone.cls_embed.embedding_table.weight")[labels]  # (B, d)
    word = _w(sd, "backbone.embeddings.word_embeddings.weight")
    pos = _w(sd, "backbone.embeddings.position_embeddings.weight")
    tok = word[codes[:, : T - 1]] + pos[0 : T - 1][None]
    hidden = torch.cat([c[:, None, :], tok], dim=1)  # (B, T, d)
    mods = layer_modulations(sd, cfg, c)
    residual = None
    for i in range(cfg["n_layer"]):
        residual = hidden if residual is None else hidden + residual
        h = rms_norm(residual, _w(sd, f"backbone.layers.{i}.norm.weight"), eps)
        shift, scale, gate = mods[i]
        h = h * (1 + scale[:, None, :]) + shift[:, None, :]
        hidden = gate[:, None, :] * mixer_sequence(sd, f"backbone.layers.{i}.mixer.", cfg, h)
    residual = hidden + residual
    return _final_head(sd, cfg, residual, c)


# ----------------------------------------------------------------------------------------------
# recurrent decoding (SPEC section 4), written independently of the sequence path
# ----------------------------------------------------------------------------------------------


def _mixer_step(sd: dict, prefix: str, cfg: dict, h: torch.Tensor, cache: dict) -> torch.Tensor:
    """One decoding step of the mixer. h (B, d_model). cache: 'window' (B, C, K), 'state' (B,H,P,N)."""
    dm = _dims(cfg)
    d_inner, H, P, G, N = dm["d_inner"], dm["nheads"], dm["headdim"], dm["ngroups"], dm["d_state"]
    C = dm["conv_dim"]
    zxbcdt = h @ _w(sd, prefix + "in_proj.weight").T
    z, xBC, dt_raw = zxbcdt[:, :d_inner], zxbcdt[:, d_inner : d_inner + C], zxbcdt[:, d_inner + C :]
    # conv: window holds the last K inputs, oldest first; starts as zeros (= causal left padding)
    window = torch.cat([cache["window"][:, :, 1:], xBC[:, :, None]], dim=2)
    cache["window"] = window
    conv_w = _w(sd, prefix + "conv1d.weight")[:, 0, :]  # (C, K)
    xBC = _silu((window * conv_w[None]).sum(dim=-1) + _w(sd, prefix + "conv1d.bias"))
    x = xBC[:, :d_inner]
    Bv = xBC[:, d_inner : d_inner + G * N]
    Cv = xBC[:, d_inner + G * N :]
    dt = _softplus(dt_raw + _w(sd, prefix + "dt_bias"))  # (B, H)
    A = -torch.exp(_w(sd, prefix + "A_log"))
    Dp = _w(sd, prefix + "D")
    state = cache["state"].clone()
    y = torch.zeros(h.shape[0], d_inner, dtype=DTYPE)
    heads_per_group = H // G
    for hd in range(H):
        grp = hd // heads_per_group
        x_h = x[:, hd * P : (hd + 1) * P]  # (B, P)
        B_h = Bv[:, grp * N : (grp + 1) * N]  # (B, N)
        C_h = Cv[:, grp * N : (grp + 1) * N]
        dt_h = dt[:, hd][:, None, None]
        state[:, hd] = torch.exp(dt_h * A[hd]) * state[:, hd] + dt_h * torch.einsum("bp,bn->bpn", x_h, B_h)
        y[:, hd * P : (hd + 1) * P] = torch.einsum("bpn,bn->bp", state[:, hd], C_h) + Dp[hd] * x_h
    cache["state"] = state
    y = gated_rms_norm(y, z, _w(sd, prefix + "norm.weight"), G, dm["eps"])
    return y @ _w(sd, prefix + "out_proj.weight").T


def reference_decode_logits(
    sd: dict,
    cfg: dict,
    codes: torch.Tensor,
    labels: torch.Tensor,
    guidance_scale: float,
    original_positions: bool,
) -> torch.Tensor:
    """Teacher-forced recurrent decoding with CFG. Returns guided logits (B, T, vocab), T = codes.shape[1].

    Batch doubled: [labels, null class (= num_classes)]. Step 0 feeds the class embedding alone; step
    k >= 1 feeds codes[:, k-1] with position id k (original_positions, the released weights' quirk)
    or k-1 (training-consistent). guided = uncond + (cond - uncond) * guidance_scale.
    """
    Bsz, T = codes.shape
    assert 1 <= T <= cfg["num_tokens"]
    dm = _dims(cfg)
    eps = dm["eps"]
    null = torch.full_like(labels, cfg["num_classes"])
    labels2 = torch.cat([labels, null])
    codes2 = torch.cat([codes, codes])
    c = _w(sd, "backbone.cls_embed.embedding_table.weight")[labels2]  # (2B, d)
    word = _w(sd, "backbone.embeddings.word_embeddings.weight")
    pos = _w(sd, "backbone.embeddings.position_embeddings.weight")
    mods = layer_modulations(sd, cfg, c)
    caches = [
        {
            "window": torch.zeros(2 * Bsz, dm["conv_dim"], dm["d_conv"], dtype=DTYPE),
            "state": torch.zeros(2 * Bsz, dm["nheads"], dm["headdim"], dm["d_state"], dtype=DTYPE),
        }
        for _ in range(cfg["n_layer"])
    ]
    out = []
    for k in range(T):
        if k == 0:
            hidden = c
        else:
            pid = k if original_positions else k - 1
            hidden = word[codes2[:, k - 1]] + pos[pid]
        residual = None
        for i in range(cfg["n_layer"]):
            residual = hidden if residual is None else hidden + residual
            h = rms_norm(residual, _w(sd, f"backbone.layers.{i}.norm.weight"), eps)
            shift, scale, gate = mods[i]
            h = h * (1 + scale) + shift
            hidden = gate * _mixer_step(sd, f"backbone.layers.{i}.mixer.", cfg, h, caches[i])
        residual = hidden + residual
        logits = _final_head(sd, cfg, residual, c)  # (2B, V)
        cond, uncond = logits[:Bsz], logits[Bsz:]
        out.append(uncond + (cond - uncond) * guidance_scale)
    return torch.stack(out, dim=1)


# ----------------------------------------------------------------------------------------------
# sampling filter
# ----------------------------------------------------------------------------------------------


def reference_sample_filter(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """Probabilities (float64, same shape as logits) after temperature, top-k, top-p.

    * temperature: logits / temperature (must be > 0).
    * top_k: 0 (or >= vocab) = off; else keep tokens whose logit >= the k-th largest logit
      (ties at the boundary are all kept).
    * top_p: >= 1 = off; else over the (top-k renormalised) probabilities sorted descending keep the
      smallest prefix whose cumulative probability >= top_p; always at least the most likely token.
    Result renormalised to sum to 1 over the last dim.
    """
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    x = logits.to(DTYPE) / temperature
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    V = shape[-1]
    result = torch.zeros_like(rows)
    for r in range(rows.shape[0]):
        row = rows[r].clone()
        if top_k and 0 < top_k < V:
            kth = torch.sort(row, descending=True).values[top_k - 1]
            row[row < kth] = -math.inf
        probs = torch.softmax(row, dim=-1)
        if top_p < 1.0:
            order = torch.sort(probs, descending=True, stable=True).indices.tolist()
            p_list = probs.tolist()
            keep = torch.zeros(V, dtype=torch.bool)
            cum = 0.0
            for n, idx in enumerate(order):
                if n > 0 and cum >= top_p:
                    break
                keep[idx] = True
                cum += p_list[idx]
            probs = torch.where(keep, probs, torch.zeros_like(probs))
            probs = probs / probs.sum()
        result[r] = probs
    return result.reshape(shape)


__all__ = [
    "ref_config",
    "random_original_state_dict",
    "reference_forward_logits",
    "reference_decode_logits",
    "reference_sample_filter",
    "layer_modulations",
    "mixer_sequence",
    "ssm_scan",
    "causal_depthwise_conv",
    "rms_norm",
    "gated_rms_norm",
]
