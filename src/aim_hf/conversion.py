"""Loading the original AiM checkpoints and exact re-parametrisations of adaLN.

The original code (hp-l33/AiM) names its stage-2 weights ``backbone.*`` / ``lm_head.weight``
(SPEC §5). ``load_original`` maps them to :class:`AiMForImageGeneration`, infers the config from
the shapes (and the original config.json where there is one) and turns AiM-B's per-layer adaLN
into the grouped form with one group per layer, which computes the same function.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from .configuration_aim import PRESETS, AiMConfig
from .modeling_aim import AiMForImageGeneration

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

_RENAMES = {
    "backbone.embeddings.word_embeddings.weight": "model.embed_tokens.weight",
    "backbone.embeddings.position_embeddings.weight": "model.embed_positions.weight",
    "backbone.cls_embed.embedding_table.weight": "model.embed_classes.weight",
    "backbone.adaln_group.1.weight": "model.adaln.weight",
    "backbone.adaln_group.1.bias": "model.adaln.bias",
    "backbone.norm_f.weight": "model.norm_f.weight",
    "backbone.final_layer.norm_final.weight": "model.final_norm.weight",
    "backbone.final_layer.adaLN_modulation.1.weight": "model.final_adaln.weight",
    "backbone.final_layer.adaLN_modulation.1.bias": "model.final_adaln.bias",
}
_LAYER_KEY = re.compile(r"backbone\.layers\.(\d+)\.(.+)")
_MIXER_PARAMS = {
    "in_proj.weight", "in_proj.bias", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D",
    "norm.weight", "out_proj.weight", "out_proj.bias",
}  # fmt: skip


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or a torch pickle (loaded with ``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        if path.suffix in PICKLE_SUFFIXES:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise ValueError(
                f"{path}: unknown checkpoint format; expected .safetensors or one of {PICKLE_SUFFIXES}"
            )
    except ValueError:
        raise
    except Exception as err:  # corrupt or unsafe files: say which file
        raise ValueError(f"could not read checkpoint {path}: {err}") from err
    return unwrap_state_dict(obj, str(path))


def unwrap_state_dict(obj: object, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensor mapping inside a checkpoint that may nest it under "state_dict" or "model"."""
    while isinstance(obj, Mapping):  # {"state_dict": {...}, "global_step": tensor(5)} holds it one down
        inner = next(
            (obj[k] for k in ("state_dict", "model", "module") if isinstance(obj.get(k), Mapping)), None
        )
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{source} does not hold a state dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


# Names used by earlier versions of the original code, which its own loader renamed on the fly.
_LEGACY_NAMES = (("vq_vae.", "vqvae."), ("shared_adaln", "adaln_group"), ("adaln_single", "adaln_group"),
                 ("adaLN_parameters", "scale_shift_table"))  # fmt: skip


def stage2_part(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The stage-2 weights without their "mamba." prefix and with the original's legacy names
    brought up to date; the tokenizer's ("vqvae.") are left to ``tokenizer.tokenizer_part``."""
    stage2 = {}
    for key, value in state_dict.items():
        for old, new in _LEGACY_NAMES:
            key = key.replace(old, new)
        if not key.startswith("vqvae."):
            stage2[key.removeprefix("mamba.")] = value
    return stage2


def _require(sd: Mapping[str, torch.Tensor], key: str, source: str) -> torch.Tensor:
    if key not in sd:
        raise ValueError(f"{source}: missing key {key!r} (original AiM stage-2 keys are listed in SPEC §5)")
    return sd[key]


def infer_config(
    sd: Mapping[str, torch.Tensor], original_config: Mapping | None = None, source: str = "checkpoint"
) -> AiMConfig:
    """An AiMConfig from the shapes of an original stage-2 state dict (and its config.json)."""
    original_config = dict(original_config or {})
    ssm_cfg = dict(original_config.get("ssm_cfg") or {})
    word = sd.get("backbone.embeddings.word_embeddings.weight", sd.get("lm_head.weight"))
    if word is None:
        raise ValueError(
            f"{source}: missing key 'backbone.embeddings.word_embeddings.weight' (or 'lm_head.weight')"
        )
    vocab_size, d = word.shape
    layers = sorted({int(m.group(1)) for k in sd if (m := _LAYER_KEY.match(k))})
    if not layers or layers != list(range(len(layers))):
        raise ValueError(f"{source}: expected layers backbone.layers.0..N-1, found indices {layers[:5]}...")
    n_layer = len(layers)
    if "backbone.adaln_group.1.weight" in sd:
        groups = sd["backbone.adaln_group.1.weight"].shape[0] // (3 * d)
    elif "backbone.layers.0.adaLN_modulation.1.weight" in sd:
        groups = n_layer
    else:
        raise ValueError(
            f"{source}: found neither 'backbone.adaln_group.1.weight' nor per-layer adaLN weights"
        )
    positions = _require(sd, "backbone.embeddings.position_embeddings.weight", source)
    nheads = _require(sd, "backbone.layers.0.mixer.A_log", source).shape[0]
    d_inner = _require(sd, "backbone.layers.0.mixer.norm.weight", source).shape[0]
    conv = _require(sd, "backbone.layers.0.mixer.conv1d.weight", source)
    n_groups = int(ssm_cfg.get("ngroups", 1))
    fields = {
        "vocab_size": vocab_size,
        "hidden_size": d,
        "num_hidden_layers": n_layer,
        "adaln_groups": groups,
        # older checkpoints carry a longer position table, which the original cut to num_tokens + 1
        "num_tokens": int(original_config.get("num_tokens", min(positions.shape[0] - 1, 256))),
        "num_classes": _require(sd, "backbone.cls_embed.embedding_table.weight", source).shape[0] - 1,
        "expand": d_inner // d,
        "head_dim": d_inner // nheads,
        "n_groups": n_groups,
        "state_size": (conv.shape[0] - d_inner) // (2 * n_groups),
        "conv_kernel": conv.shape[-1],
        "chunk_size": int(ssm_cfg.get("chunk_size", 256)),
        "use_conv_bias": "backbone.layers.0.mixer.conv1d.bias" in sd,
        "use_bias": "backbone.layers.0.mixer.in_proj.bias" in sd,
        "original_decode_positions": True,
        "class_dropout_prob": float(original_config.get("token_drop", 0.1)),
    }
    for ours, theirs in (
        ("hidden_size", "d_model"),
        ("num_hidden_layers", "n_layer"),
        ("vocab_size", "vocab_size"),
    ):
        if theirs in original_config and int(original_config[theirs]) != fields[ours]:
            raise ValueError(
                f"{source}: config.json says {theirs}={original_config[theirs]} but the weights have {fields[ours]}"
            )
    for preset in PRESETS.values():  # the paper's evaluation guidance for the released sizes
        if (preset["hidden_size"], preset["num_hidden_layers"]) == (d, n_layer):
            fields["default_guidance_scale"] = preset["default_guidance_scale"]
    return AiMConfig(**fields)


def convert_original_state_dict(
    sd: Mapping[str, torch.Tensor], config: AiMConfig, source: str = "checkpoint"
) -> dict:
    """Original stage-2 keys -> this package's keys, stacking per-layer adaLN into one group per
    layer and folding per-layer tables into the group bias when groups == layers."""
    d = config.hidden_size
    out: dict[str, torch.Tensor] = {}
    per_layer_w, per_layer_b, tables = {}, {}, {}
    for key, value in sd.items():
        if key in _RENAMES:
            out[_RENAMES[key]] = value
        elif key == "lm_head.weight":
            continue  # tied to the code embedding
        elif m := _LAYER_KEY.match(key):
            i, rest = int(m.group(1)), m.group(2)
            if rest == "norm.weight":
                out[f"model.layers.{i}.norm.weight"] = value
            elif rest.startswith("mixer.") and rest[len("mixer.") :] in _MIXER_PARAMS:
                out[f"model.layers.{i}.{rest}"] = value
            elif rest == "adaLN_modulation.1.weight":
                per_layer_w[i] = value
            elif rest == "adaLN_modulation.1.bias":
                per_layer_b[i] = value
            elif rest == "scale_shift_table":
                tables[i] = value
            else:
                raise ValueError(f"{source}: unexpected key {key!r}")
        else:
            raise ValueError(f"{source}: unexpected key {key!r}")
    positions = out["model.embed_positions.weight"]
    out["model.embed_positions.weight"] = positions[: config.num_tokens + 1]
    if "model.embed_tokens.weight" not in out:
        out["model.embed_tokens.weight"] = _require(sd, "lm_head.weight", source)
    n = config.num_hidden_layers
    if per_layer_w:
        if len(per_layer_w) != n or len(per_layer_b) != n:
            raise ValueError(f"{source}: per-layer adaLN weights found for {len(per_layer_w)} of {n} layers")
        out["model.adaln.weight"] = torch.cat([per_layer_w[i] for i in range(n)])
        out["model.adaln.bias"] = torch.cat([per_layer_b[i] for i in range(n)])
    if tables:
        if config.has_layer_tables:
            out.update({f"model.layers.{i}.adaln_table": t for i, t in tables.items()})
        else:  # one group per layer: the table is a constant added to that group's output
            # summed in float64, rounded once when loaded: bf16 weights summed in bf16 were off by 2e-3
            bias = out["model.adaln.bias"].view(n, 3 * d).to(torch.float64, copy=True)
            for i, t in tables.items():
                bias[i] += t.reshape(3 * d)
            out["model.adaln.bias"] = bias.flatten()
    return out


def regroup_adaln(model: AiMForImageGeneration, groups: int) -> AiMForImageGeneration:
    """The same model with ``groups`` adaLN groups, a multiple of the current G that divides the
    layer count: group j copies group j % G, so every layer keeps its parameters exactly."""
    config = model.config
    g, n, d = config.adaln_groups, config.num_hidden_layers, config.hidden_size
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive integer, got {groups!r}")
    if groups % g or n % groups:
        raise ValueError(
            f"cannot regroup {g} adaLN groups into {groups}: it must be a multiple of {g} that divides {n} layers"
        )
    sd = model.state_dict()
    weight = sd["model.adaln.weight"].view(g, 3 * d, d)
    bias = sd["model.adaln.bias"].view(g, 3 * d)
    index = torch.arange(groups) % g
    weight, bias = weight[index].clone(), bias[index].clone()
    new_config = AiMConfig(**{**config.to_diff_dict(), "adaln_groups": groups})
    if config.has_layer_tables and not new_config.has_layer_tables:
        bias = bias.double()  # one rounding into the model's dtype, as in conversion
        for i in range(n):
            bias[i] += sd.pop(f"model.layers.{i}.adaln_table").reshape(3 * d)
    sd["model.adaln.weight"], sd["model.adaln.bias"] = weight.flatten(0, 1), bias.flatten()
    with torch.device("meta"):  # no random initialisation: every weight comes from the old model
        new = AiMForImageGeneration(new_config)
    new.load_state_dict({k: v.clone() for k, v in sd.items()}, strict=True, assign=True)
    new.tie_weights()
    return new.train(model.training)


def load_original(
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    original_config: Mapping | None = None,
    dtype: torch.dtype = torch.float32,
) -> AiMForImageGeneration:
    """An AiMForImageGeneration holding original AiM weights.

    ``source`` is a state dict (keys with or without "mamba."; "vqvae." keys are ignored), a
    .bin/.pt/.safetensors file, or an original hub-mixin folder (config.json + model.safetensors).
    The config is inferred from the shapes and ``original_config`` / the folder's config.json, and
    sets ``original_decode_positions`` so that decoding matches the original's.
    """
    name = "state dict"
    caller_owned = isinstance(source, Mapping)
    if not caller_owned:
        path = Path(source)
        name = str(path)
        if path.is_dir():
            config_file = path / "config.json"
            if original_config is None and config_file.is_file():
                try:
                    original_config = json.loads(config_file.read_text())
                except ValueError as err:
                    raise ValueError(f"could not read {config_file} as JSON: {err}") from None
            pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
            files = [f for f in (path / "model.safetensors", path / "pytorch_model.bin") if f.is_file()]
            if not files and len(pickles) > 1:  # e.g. hp-l33/aim's aim_b.bin, aim_xl.bin, ...
                raise ValueError(
                    f"{path} holds several checkpoints ({', '.join(p.name for p in pickles)}); pass one file"
                )
            found = next(iter(files + pickles), None)
            if found is None:
                raise FileNotFoundError(f"{path}: no model.safetensors or .bin checkpoint in this folder")
            path, name = found, str(found)
        source = read_state_dict(path)
    stage2 = stage2_part(source)
    config = infer_config(stage2, original_config, name)
    converted = convert_original_state_dict(stage2, config, name)
    with torch.device("meta"):
        model = AiMForImageGeneration(config)
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key == "lm_head.weight":
            continue
        if key not in converted:
            raise ValueError(f"{name}: missing weights for {key!r}")
        if tuple(converted[key].shape) != tuple(tensor.shape):
            raise ValueError(
                f"{name}: {key!r} has shape {tuple(converted[key].shape)}, expected {tuple(tensor.shape)}"
            )
    unused = sorted(set(converted) - set(expected))
    if unused:  # e.g. an out_proj bias where in_proj has none: the config has no place for it
        raise ValueError(
            f"{name}: weights {unused[0]!r}"
            + (f" and {len(unused) - 1} more" if len(unused) > 1 else "")
            + f" have no place in the model its other weights describe (use_bias={config.use_bias})"
        )
    # a caller's state dict is copied: the model's parameters must not be the caller's tensors
    model.load_state_dict(
        {k: v.to(dtype, copy=caller_owned) for k, v in converted.items()}, strict=False, assign=True
    )
    model.tie_weights()
    return model.eval()
