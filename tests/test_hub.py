"""Loading every checkpoint layout by hub id from an offline hub cache and from folders, the errors of
mismatched files, the model card and the conversion script. Tiny checkpoints are built here."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import load_script
from diffusers import VQModel
from huggingface_hub import ModelCard, constants
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_pipeline import build_pipeline, original_stage2, original_vq, seeded
from test_tokenizer import SMALL_CH, SMALL_CONFIG, SMALL_MULT, SMALL_Z, RefVQ

import aim_hf.hub
import aim_hf.pipeline_aim
from aim_hf import AiMConfig, AiMForImageGeneration, AiMPipeline
from aim_hf.conversion import load_original
from aim_hf.labels import IMAGENET_CLASSES
from aim_hf.model_card import make_model_card
from aim_hf.tokenizer import llamagen_vq_config, load_llamagen_vq

LABELS = [0, 3, 4]


# ---------------------------------------------------------------- tiny checkpoints and a hub cache


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache under tmp_path, offline. huggingface_hub reads its constants when imported,
    so they are patched as well as the environment."""
    cache = tmp_path / "hub-cache"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def add_to_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """Put the files of ``folder`` in the cache as huggingface_hub lays out a download: refs/main
    names a commit, snapshots/<commit>/ holds the files."""
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for path in folder.rglob("*"):
        if path.is_file():
            target = repo / "snapshots" / commit / path.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def write_hub_mixin(folder: Path, stage2: dict, vq: dict, vq_prefix: str = "vqvae.") -> Path:
    """hp-l33/aim-* layout: original config.json and one float32 model.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"mamba.{k}": v for k, v in stage2.items() if k != "lm_head.weight"}
    tensors.update({f"{vq_prefix}{k}": v for k, v in vq.items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors")
    config = {
        "d_model": 32, "n_layer": 4, "d_intermediate": 0, "vocab_size": 64, "ssm_cfg": {"layer": "Mamba2"},
        "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 1,
        "tie_embeddings": True, "num_classes": 5, "num_tokens": 16, "adaln_group": True, "num_groups": 2,
        "token_drop": 0.1, "mixer_drop": 0.0, "mlp_drop": 0.0,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def write_llamagen(folder: Path, vq: dict) -> Path:
    """FoundationVision/LlamaGen's tokenizer file: a pickle of {"model": state_dict}."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"model": vq}, folder / "vq_ds16_c2i.pt")
    return folder


def assert_same_generation(loaded: AiMPipeline, reference: AiMPipeline) -> None:
    """Same codes for the same seed, and the same decoded images."""
    for pipe in (loaded, reference):
        pipe.set_progress_bar_config(disable=True)
    codes = loaded.generate_codes(LABELS, generator=seeded(3))
    assert torch.equal(codes, reference.generate_codes(LABELS, generator=seeded(3)))
    assert torch.equal(loaded.decode(codes, "pt"), reference.decode(codes, "pt"))


@pytest.fixture(scope="module")
def stage2_l() -> dict:
    return original_stage2(seed=1, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def stage2_b() -> dict:
    return original_stage2(seed=2, dtype=torch.bfloat16, adaln_group=False)


# ---------------------------------------------------------------- each layout by hub id, offline


def test_hub_mixin_repo_from_offline_cache(tmp_path, hub_cache):
    stage2, vq = original_stage2(seed=4), original_vq()
    add_to_cache(hub_cache, "hp-l33/aim-base", write_hub_mixin(tmp_path / "orig", stage2, vq))
    loaded = AiMPipeline.from_pretrained("hp-l33/aim-base")
    assert loaded.aim.config.original_decode_positions and loaded.aim.dtype == torch.float32
    assert {k: loaded.vqvae.config[k] for k in SMALL_CONFIG} == SMALL_CONFIG  # inferred from the shapes
    assert_same_generation(loaded, build_pipeline(stage2, vq))


def test_release_repo_from_offline_cache(tmp_path, hub_cache, stage2_l, stage2_b):
    release = tmp_path / "release"
    release.mkdir()
    torch.save(stage2_b, release / "aim_b.bin")
    torch.save({"state_dict": stage2_l}, release / "aim_l.bin")
    add_to_cache(hub_cache, "hp-l33/aim", release)
    add_to_cache(hub_cache, "FoundationVision/LlamaGen", write_llamagen(tmp_path / "llamagen", original_vq()))

    largest = AiMPipeline.from_pretrained("hp-l33/aim")  # no XL here: L is the largest available
    assert largest.aim.config.adaln_groups == 2
    assert_same_generation(largest, build_pipeline(stage2_l))
    small = AiMPipeline.from_pretrained("hp-l33/aim", model_size="B")
    assert small.aim.config.adaln_groups == 4  # per-layer adaLN
    assert_same_generation(small, build_pipeline(stage2_b))

    with pytest.raises(
        FileNotFoundError, match=r"aim_xl\.bin is not available; sizes available: \['L', 'B'\]"
    ):
        AiMPipeline.from_pretrained("hp-l33/aim", model_size="XL")
    with pytest.raises(ValueError, match=r"model_size must be one of \['XL', 'L', 'B'\], got 'huge'"):
        AiMPipeline.from_pretrained("hp-l33/aim", model_size="huge")


def test_release_repo_with_given_tokenizer_needs_no_llamagen(tmp_path, hub_cache, stage2_b):
    release = tmp_path / "release"
    release.mkdir()
    torch.save(stage2_b, release / "aim_b.bin")
    add_to_cache(hub_cache, "hp-l33/aim", release)
    with pytest.raises(
        FileNotFoundError, match=r"vq_ds16_c2i\.pt of hub repo FoundationVision/LlamaGen is not"
    ):
        AiMPipeline.from_pretrained("hp-l33/aim")
    vqvae = load_llamagen_vq(original_vq(), SMALL_CONFIG)
    loaded = AiMPipeline.from_pretrained("hp-l33/aim", vqvae=vqvae, dtype=torch.float64)
    assert loaded.aim.dtype == torch.float64 and loaded.vqvae is vqvae
    # the release file's weights, against the same state dict loaded directly
    assert_same_generation(loaded, AiMPipeline(aim=load_original(stage2_b, dtype=torch.float64), vqvae=vqvae))


def test_saved_pipeline_from_offline_cache(tmp_path, hub_cache):
    reference = build_pipeline(original_stage2(seed=5))
    reference.save_pretrained(tmp_path / "saved")
    add_to_cache(hub_cache, "someone/aim-tiny", tmp_path / "saved")
    loaded = AiMPipeline.from_pretrained("someone/aim-tiny")
    assert_same_generation(loaded, reference)
    assert (
        loaded.name_or_path == "someone/aim-tiny"
    )  # was the snapshot's path, saved on into model_index.json


def test_cached_original_repo_when_the_hub_cannot_be_reached(tmp_path, hub_cache, monkeypatch):
    """Online but with no network (HF_HUB_OFFLINE unset): the probe for model_index.json, which an
    original repo's cache never holds, raised the connection error; hf_hub_download already falls
    back to the cache."""
    stage2, vq = original_stage2(seed=6), original_vq()
    add_to_cache(hub_cache, "hp-l33/aim-tiny", write_hub_mixin(tmp_path / "mixin", stage2, vq))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    closed = "http://127.0.0.1:9"  # downloads are refused at once, whatever the machine's network

    def unreachable(*args, **kwargs):
        raise ConnectionError(f"cannot reach {closed}")

    monkeypatch.setattr(aim_hf.hub, "file_exists", unreachable)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", closed + "/{repo_id}/resolve/{revision}/{filename}"
    )
    assert_same_generation(AiMPipeline.from_pretrained("hp-l33/aim-tiny"), build_pipeline(stage2, vq))


def test_tokenizer_file_with_prefixed_keys(tmp_path):
    """--vq / vqvae= files may hold the tokenizer under "vqvae." (AiM's combined checkpoints), as
    load_llamagen_vq accepts: the loader read the key names before taking the prefix off."""
    vq = original_vq()
    aim = build_pipeline().aim
    plain = aim_hf.hub.load_tokenizer(vq, "vq.pt", aim.config)
    prefixed = aim_hf.hub.load_tokenizer(
        {f"vqvae.{k}": v for k, v in vq.items()}, "mix.safetensors", aim.config
    )
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), prefixed.state_dict().values()))


def test_local_original_folders(tmp_path, stage2_b):
    stage2, vq = original_stage2(seed=6), original_vq()
    folder = write_hub_mixin(tmp_path / "mixin", stage2, vq)
    assert_same_generation(AiMPipeline.from_pretrained(folder), build_pipeline(stage2, vq))
    # early versions of the original named the tokenizer "vq_vae." (load_original took them; the pipeline did not)
    legacy = write_hub_mixin(tmp_path / "legacy", stage2, vq, vq_prefix="vq_vae.")
    assert_same_generation(AiMPipeline.from_pretrained(legacy), build_pipeline(stage2, vq))
    release = tmp_path / "release"
    release.mkdir()
    torch.save(stage2_b, release / "aim_b.bin")
    vqvae = load_llamagen_vq(vq, SMALL_CONFIG)
    assert_same_generation(AiMPipeline.from_pretrained(release, vqvae=vqvae), build_pipeline(stage2_b, vq))


def test_nothing_found(tmp_path, hub_cache):
    with pytest.raises(FileNotFoundError, match=r"no AiM checkpoint found in 'nobody/nothing'.*offline"):
        AiMPipeline.from_pretrained("nobody/nothing")
    with pytest.raises(FileNotFoundError, match="no AiM checkpoint found"):
        AiMPipeline.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="neither a local folder nor a valid hub repo id"):
        AiMPipeline.from_pretrained(str(tmp_path / "missing" / "folder"))


def test_bad_arguments_and_bare_models(tmp_path):
    folder = write_hub_mixin(tmp_path / "mixin", original_stage2(), original_vq())
    with pytest.raises(
        ValueError, match=r"unsupported arguments for an original AiM checkpoint: \['device_map'\]"
    ):
        AiMPipeline.from_pretrained(folder, device_map="cpu")
    with pytest.raises(ValueError, match="model_size='B' only chooses among hp-l33/aim's release files"):
        AiMPipeline.from_pretrained(folder, model_size="B")
    with pytest.raises(ValueError, match="vqvae must be a diffusers VQModel"):
        AiMPipeline.from_pretrained(folder, vqvae="vq.pt")
    pipe = build_pipeline()
    pipe.save_pretrained(tmp_path / "saved")
    with pytest.raises(ValueError, match="model_size only applies"):
        AiMPipeline.from_pretrained(tmp_path / "saved", model_size="B")
    assert_same_generation(
        AiMPipeline.from_pretrained(tmp_path / "saved", model_size=None), pipe
    )  # the default
    with pytest.raises(ValueError, match="is a bare AiMForImageGeneration, not a pipeline"):
        AiMPipeline.from_pretrained(tmp_path / "saved" / "aim")


# ---------------------------------------------------------------- mismatched and corrupt files


def _edit_hub_mixin(tmp_path: Path, edit) -> Path:
    folder = write_hub_mixin(tmp_path / "mixin", original_stage2(), original_vq())
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")
    return folder


@pytest.mark.parametrize(
    "edit,match",
    [
        (
            lambda t: t.pop("mamba.backbone.layers.1.mixer.D"),
            r"mixin/model\.safetensors: missing weights for 'model\.layers\.1\.mixer\.D'",
        ),
        (
            lambda t: t.update({"mamba.backbone.norm_f.weight": torch.ones(5)}),
            r"mixin/model\.safetensors: 'model\.norm_f\.weight' has shape \(5,\), expected \(32,\)",
        ),
        (
            lambda t: t.pop("vqvae.decoder.conv_blocks.1.res.2.norm2.bias"),
            r"mixin/model\.safetensors: .*missing weights for 'decoder\.up_blocks\.1\.resnets\.2\.norm2\.bias'",
        ),
        (
            lambda t: t.update(
                {"vqvae.decoder.conv_blocks.0.res.0.conv1.weight": torch.zeros(128, 128, 1, 1)}
            ),
            r"mixin/model\.safetensors: 'decoder\.conv_blocks\.0\.res\.0\.conv1\.weight': shape \(128, 128, 1, 1\)",
        ),
        (
            lambda t: t.pop("vqvae.quantize.embedding.weight"),
            r"mixin/model\.safetensors: missing key 'quantize\.embedding\.weight'",
        ),
    ],
    ids=["stage2-missing", "stage2-shape", "vq-missing", "vq-shape", "vq-no-codebook"],
)
def test_mismatched_original_weights_name_file_and_key(tmp_path, edit, match):
    with pytest.raises(ValueError, match=match):
        AiMPipeline.from_pretrained(_edit_hub_mixin(tmp_path, edit))


def test_codebook_must_match_vocab(tmp_path, hub_cache, stage2_b):
    torch.manual_seed(0)
    vq32 = RefVQ(SMALL_CH, SMALL_MULT, SMALL_Z, 32).state_dict()
    folder = write_hub_mixin(tmp_path / "mixin", original_stage2(), vq32)
    message = r"'quantize\.embedding\.weight' has 32 codes but the AiM model predicts vocab_size=64"
    with pytest.raises(ValueError, match=r"mixin/model\.safetensors: " + message):
        AiMPipeline.from_pretrained(folder)
    release = tmp_path / "release"
    release.mkdir()
    torch.save(stage2_b, release / "aim_b.bin")
    add_to_cache(hub_cache, "hp-l33/aim", release)
    add_to_cache(hub_cache, "FoundationVision/LlamaGen", write_llamagen(tmp_path / "llamagen", vq32))
    with pytest.raises(ValueError, match=r"vq_ds16_c2i\.pt: " + message):
        AiMPipeline.from_pretrained("hp-l33/aim")


def test_corrupt_release_file(tmp_path):
    (tmp_path / "aim_b.bin").write_bytes(b"not a pickle")
    vqvae = load_llamagen_vq(original_vq(), SMALL_CONFIG)
    with pytest.raises(ValueError, match=r"could not read checkpoint .*aim_b\.bin"):
        AiMPipeline.from_pretrained(tmp_path, vqvae=vqvae)


@pytest.fixture
def saved(tmp_path) -> Path:
    build_pipeline().save_pretrained(tmp_path / "saved")
    return tmp_path / "saved"


def _rewrite(path: Path, edit) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_variants_load_as_diffusers_names_them(tmp_path):
    """A variant saved in shards (transformers and diffusers name the index
    model.safetensors.index.fp16.json) loads; so does a folder where only some components have the
    variant (diffusers loads the plain files of the others)."""
    pipe = build_pipeline()
    sharded = tmp_path / "sharded"
    pipe.save_pretrained(sharded, variant="fp16", max_shard_size="20KB")
    assert (sharded / "aim" / "model.safetensors.index.fp16.json").is_file()
    assert_same_generation(AiMPipeline.from_pretrained(sharded, variant="fp16"), pipe)
    mixed = tmp_path / "mixed"
    pipe.save_pretrained(mixed, variant="fp16")
    vq = mixed / "vqvae"
    (vq / "diffusion_pytorch_model.fp16.safetensors").rename(vq / "diffusion_pytorch_model.safetensors")
    assert_same_generation(AiMPipeline.from_pretrained(mixed, variant="fp16"), pipe)
    (vq / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="looked for diffusion_pytorch_model.fp16.safetensors or"):
        AiMPipeline.from_pretrained(mixed, variant="fp16")


def test_plain_load_is_float32_beside_a_variant(tmp_path):
    """diffusers loads its models in float32 unless asked; transformers 5 alone takes aim/config.json's
    dtype, which an fp16 variant saved beside the float32 weights rewrites: the plain load gave a
    float16 AiM (its float32 weights cast down) beside a float32 VQ."""
    pipe = build_pipeline()
    pipe.save_pretrained(tmp_path / "p")
    build_pipeline().to(torch.float16).save_pretrained(tmp_path / "p", variant="fp16")
    plain = AiMPipeline.from_pretrained(tmp_path / "p")
    assert (plain.aim.dtype, plain.vqvae.dtype) == (torch.float32, torch.float32)
    assert_same_generation(plain, pipe)
    fp16 = AiMPipeline.from_pretrained(tmp_path / "p", variant="fp16", dtype=torch.float16)
    assert (fp16.aim.dtype, fp16.vqvae.dtype) == (torch.float16, torch.float16)
    # transformers alone reads the config's dtype: it still names the plain weights' float32
    assert AiMForImageGeneration.from_pretrained(tmp_path / "p" / "aim").dtype == torch.float32


@pytest.mark.parametrize("variant", ["", "a/b", "fp.16", 16])
def test_bad_variant_is_refused_before_anything_is_written(saved, variant):
    """An empty variant names model..safetensors, and the save then removed the plain weights as
    stale; a path separator failed inside safetensors."""
    before = {p: p.read_bytes() for p in saved.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=rf"variant must be None or a name of letters.*got {variant!r}"):
        build_pipeline().save_pretrained(saved, variant=variant)
    assert {p: p.read_bytes() for p in saved.rglob("*") if p.is_file()} == before
    with pytest.raises(ValueError, match="variant must be None"):
        AiMPipeline.from_pretrained(saved, variant=variant)


def test_saved_pipeline_missing_key(saved):
    _rewrite(saved / "aim" / "model.safetensors", lambda t: t.pop("model.norm_f.weight"))
    with pytest.raises(ValueError, match=r"aim/model\.safetensors: missing key 'model\.norm_f\.weight'"):
        AiMPipeline.from_pretrained(saved)


def test_saved_pipeline_wrong_shape_and_unexpected_key(saved):
    weights = saved / "vqvae" / "diffusion_pytorch_model.safetensors"
    _rewrite(weights, lambda t: t.update({"quantize.embedding.weight": torch.zeros(32, 8)}))
    with pytest.raises(
        ValueError,
        match=r"diffusion_pytorch_model\.safetensors: 'quantize\.embedding\.weight' has shape \(32, 8\), expected \(64, 8\)",
    ):
        AiMPipeline.from_pretrained(saved)
    _rewrite(
        weights, lambda t: t.update({"quantize.embedding.weight": torch.zeros(64, 8), "extra": torch.ones(1)})
    )
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.safetensors: unexpected key 'extra'"):
        AiMPipeline.from_pretrained(saved)


def test_saved_pipeline_with_foreign_tokenizer(saved):
    shutil.rmtree(saved / "vqvae")
    VQModel(
        **llamagen_vq_config(block_out_channels=(32,) * 5, latent_channels=64, num_vq_embeddings=32)
    ).save_pretrained(saved / "vqvae")
    with pytest.raises(
        ValueError, match=r"vqvae/config\.json \(num_vq_embeddings\) has 32 codes .* vocab_size=64"
    ):
        AiMPipeline.from_pretrained(saved)
    # a tokenizer passed in replaces the saved one and is not read
    vqvae = load_llamagen_vq(original_vq(), SMALL_CONFIG)
    assert AiMPipeline.from_pretrained(saved, vqvae=vqvae).vqvae is vqvae


def test_saved_pipeline_bad_config(saved):
    config_path = saved / "aim" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "adaln_groups": 3}))
    with pytest.raises(ValueError, match=r"aim/config\.json: AiMConfig\.adaln_groups=3 must divide"):
        AiMPipeline.from_pretrained(saved)


def test_saved_pipeline_truncated_file(saved):
    weights = saved / "aim" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"could not read .*aim/model\.safetensors"):
        AiMPipeline.from_pretrained(saved)


# ---------------------------------------------------------------- model card


def _python_block(text: str) -> str:
    (block,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    return block


def test_model_card_of_a_saved_pipeline(saved, tmp_path, monkeypatch):
    card = ModelCard.load(saved / "README.md")
    assert card.data.license is None  # the weights' owner chooses it (it said MIT for everyone's)
    assert card.data.base_model is None
    assert card.data.library_name == "aim-hf"
    assert card.data.pipeline_tag == "unconditional-image-generation"
    assert {"arxiv:2408.12245", "mamba", "class-conditional"} <= set(card.data.tags)
    assert card.data.eval_results is None  # not the paper's weights' shape: no FID claimed
    assert "https://arxiv.org/abs/2408.12245" in card.text
    snippet = _python_block(card.text)
    assert f'AiMPipeline.from_pretrained("{saved}")' in snippet
    monkeypatch.chdir(tmp_path)
    exec(snippet, {})  # the usage snippet works as written
    assert (tmp_path / "aim.png").is_file()


def test_model_card_of_released_weights():
    with torch.device("meta"):
        aim = AiMForImageGeneration(AiMConfig.from_preset("AiM-XL", original_decode_positions=True))
        vqvae = VQModel(**llamagen_vq_config())
    pipeline = SimpleNamespace(aim=aim, vqvae=vqvae, class_names=IMAGENET_CLASSES)
    card = make_model_card(pipeline, "someone/aim-xl")
    card = ModelCard(str(card))  # as the hub parses it
    (result,) = card.data.eval_results
    assert (result.metric_type, result.metric_value) == ("FID", 2.56)
    assert result.dataset_type == "ILSVRC/imagenet-1k" and result.dataset_name == "ImageNet 256x256"
    assert card.data.model_name == "AiM-XL" and card.data.datasets == ["ILSVRC/imagenet-1k"]
    assert (
        "763.3M parameters" in card.text
        and "256x256 images" in card.text
        and "hp-l33/aim-xlarge" in card.text
    )
    assert 'AiMPipeline.from_pretrained("someone/aim-xl")' in card.text and "golden retriever" in card.text
    # a model of the same shape trained with this package does not claim the paper's FID
    with torch.device("meta"):
        pipeline.aim = AiMForImageGeneration(AiMConfig.from_preset("AiM-XL"))
    assert make_model_card(pipeline, "someone/aim-xl").data.eval_results is None


def test_model_card_license_and_base_model(tmp_path):
    """A fine-tune of released weights names its base and its owner's license, and claims neither
    the paper's FID nor to be the converted release; bad values are refused before anything is saved."""
    with torch.device("meta"):
        aim = AiMForImageGeneration(AiMConfig.from_preset("AiM-B", original_decode_positions=True))
        vqvae = VQModel(**llamagen_vq_config())
    pipeline = SimpleNamespace(aim=aim, vqvae=vqvae, class_names=IMAGENET_CLASSES)
    released = ModelCard(str(make_model_card(pipeline, "someone/aim-b")))
    assert released.data.license == "mit" and released.data.eval_results is not None
    tuned = ModelCard(
        str(make_model_card(pipeline, "me/aim-b-ft", license="apache-2.0", base_model="hp-l33/aim-base"))
    )
    assert tuned.data.license == "apache-2.0" and tuned.data.base_model == "hp-l33/aim-base"
    assert tuned.data.eval_results is None and "Original weights" not in tuned.text
    assert "Fine-tuned from [hp-l33/aim-base](https://huggingface.co/hp-l33/aim-base)" in tuned.text

    pipe = build_pipeline()
    pipe.save_pretrained(tmp_path / "p", license="cc-by-4.0", base_model="me/aim-tiny")
    card = ModelCard.load(tmp_path / "p" / "README.md")
    assert (card.data.license, card.data.base_model) == ("cc-by-4.0", "me/aim-tiny")
    for bad, match in [
        (
            {"base_model": str(tmp_path / "p")},
            "base_model must be a hub repo id such as 'hp-l33/aim-base', got '/",
        ),
        (
            {"license": ""},
            r"license must be a hub license id \(lowercase\) such as 'mit' or 'apache-2.0', got ''",
        ),
        ({"license": "MIT"}, "license must be a hub license id .*got 'MIT'"),  # was written as given
    ]:
        with pytest.raises(ValueError, match=match):
            pipe.save_pretrained(tmp_path / "q", **bad)
        with pytest.raises(ValueError, match=match):
            pipe.push_to_hub("me/q", **bad)  # before the repo is created: no network is reached
    assert not (tmp_path / "q").exists()


def test_model_card_of_1000_named_classes_of_its_own(tmp_path, monkeypatch):
    """A model with 1000 classes of its own names is not an ImageNet model: the card's snippet
    runs with its names (it took "golden retriever") and claims no ImageNet dataset."""
    pipe = build_pipeline(original_stage2(num_classes=1000))
    pipe.aim.config.id2label = {i: f"style {i}" for i in range(1000)}
    card = make_model_card(pipe, str(tmp_path / "p"))
    assert card.data.datasets is None and "imagenet" not in card.data.tags and "ImageNet" not in card.text
    pipe.save_pretrained(tmp_path / "p")
    monkeypatch.chdir(tmp_path)
    exec(_python_block(card.text), {})
    assert (tmp_path / "aim.png").is_file()


def test_push_to_hub_uploads_pipeline_and_card(monkeypatch):
    uploaded = {}

    def fake_upload(repo_id, folder_path, **kwargs):
        root = Path(folder_path)
        uploaded.update(
            {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
        )
        uploaded["repo_id"] = repo_id
        return "https://huggingface.co/someone/aim-tiny/commit/0"

    monkeypatch.setattr(
        aim_hf.pipeline_aim, "create_repo", lambda repo_id, **_: SimpleNamespace(repo_id=repo_id)
    )
    monkeypatch.setattr(aim_hf.pipeline_aim, "upload_folder", fake_upload)
    assert build_pipeline().push_to_hub("someone/aim-tiny").endswith("/commit/0")
    assert uploaded["repo_id"] == "someone/aim-tiny"
    assert {"model_index.json", "aim/model.safetensors", "vqvae/diffusion_pytorch_model.safetensors"} <= set(
        uploaded
    )
    assert 'AiMPipeline.from_pretrained("someone/aim-tiny")' in uploaded["README.md"].decode()


def test_push_from_save_keeps_the_sharding_and_checks_first(tmp_path, monkeypatch):
    """save_pretrained(push_to_hub=True) uploads what it saved (the push re-saved without
    max_shard_size), and bad arguments are refused before the repo is created."""
    uploaded, calls = set(), []
    monkeypatch.setattr(
        aim_hf.pipeline_aim,
        "create_repo",
        lambda repo_id, **_: calls.append(repo_id) or SimpleNamespace(repo_id=repo_id),
    )
    monkeypatch.setattr(
        aim_hf.pipeline_aim,
        "upload_folder",
        lambda repo_id, folder_path, **_: uploaded.update(
            p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*.safetensors")
        ),
    )
    build_pipeline().save_pretrained(tmp_path / "p", max_shard_size="20KB", push_to_hub=True, repo_id="me/p")
    local = {p.relative_to(tmp_path / "p").as_posix() for p in (tmp_path / "p").rglob("*.safetensors")}
    assert uploaded == local and any("-of-" in name for name in local)
    for bad in (dict(safe_serialization=False), dict(variant="")):
        with pytest.raises(ValueError, match="safe_serialization|variant"):
            build_pipeline().push_to_hub("me/q", **bad)
    assert calls == ["me/p"]


def test_variants_alone_and_beside_plain_weights(tmp_path, monkeypatch):
    """A variant saved or pushed alone: the card's snippet loaded the plain weights, which are not
    there. A variant pushed to a repo that holds plain weights: it replaced aim/config.json (their
    dtype, which transformers loads the folder in) and the card; it now uploads neither."""
    pipe = build_pipeline().to(torch.float16)
    pipe.save_pretrained(tmp_path / "alone", variant="fp16")
    snippet = _python_block((tmp_path / "alone" / "README.md").read_text())
    assert f'AiMPipeline.from_pretrained("{tmp_path / "alone"}", variant="fp16")' in snippet
    monkeypatch.chdir(tmp_path)
    exec(snippet, {})
    with pytest.raises(FileNotFoundError, match=r"found model\.fp16\.safetensors: pass its variant="):
        AiMPipeline.from_pretrained(tmp_path / "alone")

    uploads = []
    monkeypatch.setattr(
        aim_hf.pipeline_aim, "create_repo", lambda repo_id, **_: SimpleNamespace(repo_id=repo_id)
    )
    monkeypatch.setattr(
        aim_hf.pipeline_aim,
        "upload_folder",
        lambda folder_path, ignore_patterns=None, **_: uploads.append(
            (ignore_patterns, _python_block((Path(folder_path) / "README.md").read_text()))
        ),
    )
    for plain in (False, True):
        monkeypatch.setattr(
            aim_hf.pipeline_aim,
            "file_exists",
            lambda repo_id, name, plain=plain, **_: plain and "model." in name,
        )
        pipe.push_to_hub("me/aim", variant="fp16")
    (alone, alone_card), (beside, _) = uploads
    assert alone is None and 'from_pretrained("me/aim", variant="fp16")' in alone_card
    assert beside == ["aim/config.json", "README.md"]


# ---------------------------------------------------------------- conversion script


@pytest.fixture(scope="module")
def script():
    return load_script("convert_original_to_hf")


def test_script_converts_hub_repo(tmp_path, hub_cache, script, capsys):
    stage2, vq = original_stage2(seed=8), original_vq()
    add_to_cache(hub_cache, "hp-l33/aim-large", write_hub_mixin(tmp_path / "orig", stage2, vq))
    out = tmp_path / "converted"
    assert script.main(["hp-l33/aim-large", str(out)]) == 0
    assert "max relative error 0.000e+00" in capsys.readouterr().out
    assert (out / "README.md").is_file() and not list(out.rglob("*.bin"))
    assert_same_generation(AiMPipeline.from_pretrained(out), build_pipeline(stage2, vq))


def test_script_release_in_bfloat16_and_push(tmp_path, script, capsys, monkeypatch, stage2_l):
    release = tmp_path / "release"
    release.mkdir()
    torch.save(stage2_l, release / "aim_l.bin")
    torch.save(original_stage2(seed=2, adaln_group=False), release / "aim_b.bin")  # float32: bf16 rounds it
    vq_file = write_llamagen(tmp_path / "llamagen", original_vq()) / "vq_ds16_c2i.pt"
    pushed = {}

    def create_repo(repo_id, **_):  # as the hub does: a name without a namespace goes to the user's
        return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"someone/{repo_id}")

    monkeypatch.setattr(script, "create_repo", create_repo)
    monkeypatch.setattr(script, "upload_folder", lambda **kwargs: pushed.update(kwargs))
    out = tmp_path / "converted"
    argv = [str(release), str(out), "--model-size", "B", "--vq", str(vq_file), "--dtype", "bfloat16"]
    assert script.main([*argv, "--push-to-hub", "aim-b"]) == 0
    error = float(re.search(r"max relative error (\S+)", capsys.readouterr().out).group(1))
    assert 0 < error < 5e-2  # float32 logits of bfloat16 weights
    with safe_open(str(out / "aim" / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.norm_f.weight").dtype == torch.bfloat16
    assert pushed["repo_id"] == "someone/aim-b" and Path(pushed["folder_path"]) == out
    assert 'from_pretrained("someone/aim-b")' in (out / "README.md").read_text()
    assert AiMPipeline.from_pretrained(out).aim.config.adaln_groups == 4  # B, not the larger L
    # A failed check saves nothing: the earlier conversion stays, no temporaries are left.
    before = {f: f.read_bytes() for f in out.rglob("*") if f.is_file()}
    assert script.main([*argv, "--tolerance", "1e-9"]) == 1
    assert "FAILED" in capsys.readouterr().err
    assert {f: f.read_bytes() for f in out.rglob("*") if f.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted", "llamagen", "release"]
    assert script.main([*argv[:1], str(tmp_path / "new"), *argv[2:], "--tolerance", "1e-9"]) == 1
    assert not (tmp_path / "new").exists()
    # a link to a folder: the conversion goes into the folder it points to
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert script.main([*argv[:1], str(tmp_path / "link"), *argv[2:]]) == 0
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / "model_index.json").is_file()


@pytest.mark.parametrize(
    "argv,status,message",
    [
        (["{saved}", "{out}"], 1, "is already a converted pipeline"),
        (["{tmp}/nothing-here", "{out}"], 1, "neither a local folder nor a valid hub repo id"),
        (["{tmp}", "{out}", "--model-size", "M"], 2, "invalid choice: 'M'"),
        (["{tmp}", "{out}", "--tolerance", "-1"], 2, "--tolerance must be > 0"),
        (["{saved}", "{tmp}"], 1, "exists and is not a pipeline folder"),
        (["{saved}", "."], 1, "is the current folder or holds it"),
        # read only after the whole original checkpoint had been loaded
        (["{saved}", "{out}", "--vq", "{tmp}/no-such-vq.pt"], 2, "no-such-vq.pt is not a file"),
    ],
)
def test_script_errors(tmp_path, saved, script, capsys, argv, status, message):
    """Bad input found while loading: "error: ..." and status 1; bad arguments: argparse's status 2."""
    argv = [a.format(saved=saved, out=tmp_path / "out", tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    if status == 1:  # sys.exit(message): Python prints it to stderr on the way out
        assert exit_info.value.code.startswith("error: ") and message in exit_info.value.code
    else:
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
