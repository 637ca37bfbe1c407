"""Original checkpoints -> AiMForImageGeneration, checked against the independent float64 reference."""

import argparse
import json

import pytest
import torch
from conftest import rel_err
from reference_aim import random_original_state_dict, ref_config, reference_forward_logits
from safetensors.torch import save_file

from aim_hf.conversion import load_original, regroup_adaln

# float64 on both sides; the paths differ only in summation order (chunked scan vs loop), so the
# relative error is a few ulps times the depth, far below 1e-10; real mistakes are >= 1e-3.
RTOL = 1e-10

VARIANTS = {
    "group": dict(adaln_group=True, num_groups=2),
    "per-layer": dict(adaln_group=False),
    "groups=layers": dict(adaln_group=True, num_groups=4),
    "single": dict(adaln_group=True, num_groups=1),
}


def check_same_logits(model, sd, cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, cfg["vocab_size"], (3, cfg["num_tokens"]), generator=g)
    labels = torch.tensor([0, 2, cfg["num_classes"] - 1])
    ours = model(codes, labels).logits
    ref = reference_forward_logits(sd, cfg, codes, labels)
    assert rel_err(ours, ref) < RTOL


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_state_dict_matches_reference(variant):
    cfg = ref_config(**VARIANTS[variant])
    sd = random_original_state_dict(cfg, seed=3)
    model = load_original(sd, dtype=torch.float64)
    assert model.config.original_decode_positions
    assert model.config.adaln_groups == (cfg["num_groups"] if cfg["adaln_group"] else cfg["n_layer"])
    check_same_logits(model, sd, cfg)


def test_hub_mixin_folder(tmp_path):
    """hp-l33/aim-* layout: config.json + model.safetensors with "mamba."/"vqvae." keys."""
    cfg = ref_config(adaln_group=True, num_groups=2)
    sd = random_original_state_dict(cfg, seed=1)
    stored = {f"mamba.{k}": v.float() for k, v in sd.items() if k != "lm_head.weight"}
    stored["vqvae.quantize.embedding.weight"] = torch.randn(7, 8)
    save_file(stored, tmp_path / "model.safetensors")
    original_config = {
        "d_model": 32, "n_layer": 4, "vocab_size": 37, "ssm_cfg": {"layer": "Mamba2"}, "num_classes": 5,
        "num_tokens": 16, "adaln_group": True, "num_groups": 2, "token_drop": 0.1, "unknown_key": 1,
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(original_config))
    model = load_original(tmp_path, dtype=torch.float64)
    check_same_logits(model, {k: v.float().double() for k, v in sd.items()}, cfg)


def test_pickle_release_file(tmp_path):
    """hp-l33/aim's aim_*.bin: a pickle of stage 2 alone in half precision, maybe nested."""
    cfg = ref_config(adaln_group=False)
    sd = random_original_state_dict(cfg, seed=2)
    half = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    torch.save({"state_dict": half}, tmp_path / "aim_b.bin")
    model = load_original(tmp_path / "aim_b.bin", dtype=torch.float64)
    check_same_logits(model, {k: v.double() for k, v in half.items()}, cfg)


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16])
def test_half_precision_tables_fold_exactly(stored):
    """One adaLN group per layer with tables: each table is folded into its group's bias. Summed in
    the stored half precision it was off by 2e-3 (bf16) against the float64 reference of the same
    stored weights; regrouping to one group per layer likewise."""
    cfg = ref_config(adaln_group=True, num_groups=4)
    sd = {k: v.to(stored) for k, v in random_original_state_dict(cfg, seed=3).items()}
    wide = {k: v.double() for k, v in sd.items()}
    check_same_logits(load_original(sd, dtype=torch.float64), wide, cfg)
    cfg2 = ref_config(adaln_group=True, num_groups=2)
    sd2 = {k: v.to(stored) for k, v in random_original_state_dict(cfg2, seed=4).items()}
    regrouped = regroup_adaln(load_original(sd2, dtype=torch.float64), 4)
    check_same_logits(regrouped, {k: v.double() for k, v in sd2.items()}, cfg2)


def test_converted_model_does_not_share_the_callers_tensors():
    """A state dict passed in is copied: two models of one dict were the same parameters, and
    training one rewrote the dict."""
    sd = random_original_state_dict(ref_config(), seed=5)
    before = {k: v.clone() for k, v in sd.items()}
    model = load_original(sd, dtype=torch.float64)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1)
    assert all(torch.equal(sd[k], before[k]) for k in sd)


def test_lm_head_stored_instead_of_embedding():
    cfg = ref_config()
    sd = random_original_state_dict(cfg, seed=4)
    del sd["backbone.embeddings.word_embeddings.weight"]
    model = load_original(sd, dtype=torch.float64)
    assert torch.equal(model.model.embed_tokens.weight, sd["lm_head.weight"])
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_config_mismatch_is_reported(tmp_path):
    cfg = ref_config()
    sd = random_original_state_dict(cfg)
    with pytest.raises(ValueError, match="config.json says d_model=64 but the weights have 32"):
        load_original(sd, original_config={"d_model": 64})


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda sd: sd.pop("backbone.layers.1.mixer.D"), "missing weights for 'model.layers.1.mixer.D'"),
        (
            lambda sd: sd.update({"backbone.norm_f.weight": torch.ones(5)}),
            r"'model.norm_f.weight' has shape \(5,\)",
        ),
        (
            lambda sd: sd.update({"backbone.extra.weight": torch.ones(5)}),
            "unexpected key 'backbone.extra.weight'",
        ),
        (lambda sd: sd.pop("backbone.cls_embed.embedding_table.weight"), "missing key 'backbone.cls_embed"),
        (  # an out_proj bias where in_proj has none: the weights were dropped silently
            lambda sd: sd.update(
                {f"backbone.layers.{i}.mixer.out_proj.bias": torch.ones(32) for i in range(4)}
            ),
            r"weights 'model.layers.0.mixer.out_proj.bias' and 3 more have no place .*use_bias=False",
        ),
    ],
)
def test_bad_state_dict(edit, match):
    sd = random_original_state_dict(ref_config())
    edit(sd)
    with pytest.raises(ValueError, match=match):
        load_original(sd)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        load_original(tmp_path / "missing.bin")
    truncated = tmp_path / "broken.safetensors"
    save_file({"a": torch.ones(100)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(ValueError, match="broken.safetensors"):
        load_original(truncated)

    unsafe = tmp_path / "unsafe.bin"
    torch.save({"model": argparse.Namespace(weight=torch.ones(2))}, unsafe)
    with pytest.raises(ValueError, match="unsafe.bin"):  # weights_only=True refuses arbitrary objects
        load_original(unsafe)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_original(tmp_path / "empty")
    release = tmp_path / "release"  # hp-l33/aim holds a file per size: it took the first silently
    release.mkdir()
    sd = random_original_state_dict(ref_config(), seed=6)
    for name in ("aim_b.bin", "aim_xl.bin"):
        torch.save(sd, release / name)
    with pytest.raises(
        ValueError, match=r"holds several checkpoints \(aim_b.bin, aim_xl.bin\); pass one file"
    ):
        load_original(release)
    (tmp_path / "empty" / "config.json").write_text("{d_model: 32")
    torch.save(sd, tmp_path / "empty" / "aim.bin")
    with pytest.raises(ValueError, match=r"could not read .*config.json as JSON"):
        load_original(tmp_path / "empty")


def test_state_dict_nested_beside_other_tensors(tmp_path):
    """{"state_dict": weights, "global_step": tensor(5)}: the outer mapping holds a tensor, and was
    taken for the state dict ("missing key ...")."""
    cfg = ref_config()
    sd = random_original_state_dict(cfg, seed=7)
    torch.save({"state_dict": sd, "global_step": torch.tensor(5)}, tmp_path / "trainer.pt")
    check_same_logits(load_original(tmp_path / "trainer.pt", dtype=torch.float64), sd, cfg)


def test_regroup_refuses_bad_group_counts():
    model = load_original(random_original_state_dict(ref_config(adaln_group=True, num_groups=2)))
    for groups in (0, -2, 2.0, "4"):
        with pytest.raises(ValueError, match=f"groups must be a positive integer, got {groups!r}"):
            regroup_adaln(model, groups)


def test_legacy_names_and_longer_position_table():
    """Earlier original checkpoints: adaLN_parameters / shared_adaln names, a longer position table."""
    cfg = ref_config(adaln_group=True, num_groups=2)
    sd = random_original_state_dict(cfg, seed=6)
    legacy = {}
    for key, value in sd.items():
        key = key.replace("scale_shift_table", "adaLN_parameters").replace("adaln_group", "shared_adaln")
        legacy[key] = value
    positions = legacy["backbone.embeddings.position_embeddings.weight"]
    legacy["backbone.embeddings.position_embeddings.weight"] = torch.cat([positions, torch.randn(8, 32)])
    model = load_original(legacy, original_config={"num_tokens": 16}, dtype=torch.float64)
    assert model.config.num_tokens == 16
    check_same_logits(model, sd, cfg)
