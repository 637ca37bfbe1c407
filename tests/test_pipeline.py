"""AiMPipeline on tiny models: generation against the model itself, outputs, labels, checks, save/load."""

from __future__ import annotations

import io
import json

import numpy as np
import PIL.Image
import pytest
import torch
from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module
from diffusers import ImagePipelineOutput, VQModel
from reference_aim import random_original_state_dict, ref_config
from test_tokenizer import SMALL_CONFIG, _small_ref_state_dict

from aim_hf import AiMPipeline
from aim_hf.conversion import load_original
from aim_hf.tokenizer import decode_codes, llamagen_vq_config, load_llamagen_vq

VOCAB = SMALL_CONFIG["num_vq_embeddings"]  # the small VQ has 64 codes, 4x4 per 64x64 image
NUM_TOKENS = 16


def original_stage2(seed: int = 0, dtype: torch.dtype = torch.float32, **config) -> dict[str, torch.Tensor]:
    """An original AiM stage-2 state dict that fits the small LlamaGen VQ tokenizer."""
    cfg = ref_config(vocab_size=VOCAB, num_tokens=NUM_TOKENS, **config)
    return {k: v.to(dtype) for k, v in random_original_state_dict(cfg, seed=seed).items()}


def original_vq() -> dict[str, torch.Tensor]:
    """A small LlamaGen VQ state dict with original key names."""
    return _small_ref_state_dict()


def build_pipeline(stage2: dict | None = None, vq: dict | None = None) -> AiMPipeline:
    """The pipeline built directly from original state dicts, the reference for loaded ones."""
    stage2 = original_stage2() if stage2 is None else stage2
    vq = original_vq() if vq is None else vq
    return AiMPipeline(aim=load_original(stage2), vqvae=load_llamagen_vq(vq, SMALL_CONFIG))


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pipe() -> AiMPipeline:
    pipeline = build_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_codes_are_the_models_and_images_their_decoding(pipe):
    codes = pipe.generate_codes([3, 1], num_images_per_label=2, generator=seeded(5))
    expected = pipe.aim.generate(torch.tensor([3, 3, 1, 1]), generator=seeded(5))
    assert codes.shape == (4, NUM_TOKENS) and torch.equal(codes, expected)
    # guidance_scale=None is the model's default, not "no guidance"
    default = pipe.aim.config.default_guidance_scale
    assert torch.equal(pipe.generate_codes([3, 1], 2, guidance_scale=default, generator=seeded(5)), codes)
    out = pipe([3, 1], num_images_per_label=2, generator=seeded(5), output_type="pt")
    decoded = decode_codes(pipe.vqvae, codes)
    assert torch.equal(out.images, (decoded / 2 + 0.5).clamp(0, 1))


def test_generator_per_image(pipe):
    generators = [seeded(s) for s in (1, 2, 3)]
    codes = pipe.generate_codes([0, 4, 2], generator=generators)
    alone = pipe.generate_codes([4], generator=seeded(2))
    assert torch.equal(codes[1], alone[0])


def test_output_types(pipe):
    pt = pipe(2, generator=seeded(0), output_type="pt")
    assert isinstance(pt, ImagePipelineOutput)
    assert pt.images.shape == (1, 3, 64, 64) and pt.images.dtype == torch.float32
    assert 0 <= pt.images.min() and pt.images.max() <= 1
    array = pipe(2, generator=seeded(0), output_type="np").images
    assert isinstance(array, np.ndarray) and array.shape == (1, 64, 64, 3) and array.dtype == np.float32
    np.testing.assert_array_equal(array, pt.images.permute(0, 2, 3, 1).numpy())
    (image,) = pipe(2, generator=seeded(0)).images
    assert isinstance(image, PIL.Image.Image) and image.size == (64, 64) and image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), (array[0] * 255).round().astype(np.uint8))
    (images,) = pipe(2, generator=seeded(0), output_type="np", return_dict=False)
    np.testing.assert_array_equal(images, array)


def test_progress_bar_counts_decoding_steps(pipe):
    log = io.StringIO()
    pipe.set_progress_bar_config(file=log, disable=False)
    try:
        pipe.generate_codes(0, generator=seeded(0))
    finally:
        pipe.set_progress_bar_config(disable=True)
    assert f"{NUM_TOKENS}/{NUM_TOKENS}" in log.getvalue()


def test_generate_runs_the_offload_hook():
    """enable_model_cpu_offload moves a component onto the GPU in a hook on its forward; sampling
    calls generate, not forward, so generate must run the hook too (as VQModel.decode does)."""

    class Counting(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Counting.calls += 1
            return args, kwargs

    pipe = build_pipeline()
    pipe.set_progress_bar_config(disable=True)
    add_hook_to_module(pipe.aim, Counting())
    codes = pipe.generate_codes([1, 2], generator=seeded(0))
    assert Counting.calls == 1
    remove_hook_from_module(pipe.aim)
    assert torch.equal(codes, pipe.generate_codes([1, 2], generator=seeded(0)))


def test_class_names_from_id2label():
    stage2 = original_stage2()
    named = build_pipeline(stage2)
    named.aim.config.id2label = {i: name for i, name in enumerate(["cat", "dog", "ox", "eel", "bee"])}
    assert named.class_names == ["cat", "dog", "ox", "eel", "bee"]
    assert named.get_label_ids(["Dog", 4, "bee"]) == [1, 4, 4]
    named.set_progress_bar_config(disable=True)
    plain = build_pipeline(stage2)
    plain.set_progress_bar_config(disable=True)
    assert torch.equal(
        named.generate_codes(["ox", "cat"], generator=seeded(0)),
        plain.generate_codes([2, 0], generator=seeded(0)),
    )
    with pytest.raises(ValueError, match=r"unknown class name 'dgo'.*'dog' -> 1"):
        named.get_label_ids("dgo")


def test_imagenet_names_for_1000_classes():
    imagenet = build_pipeline(original_stage2(num_classes=1000))
    assert imagenet.get_label_ids(["golden retriever", 980, "volcano"]) == [207, 980, 980]
    with pytest.raises(ValueError, match=r"unknown class name 'golden retreiver'.*golden retriever"):
        imagenet.get_label_ids("golden retreiver")


def test_models_without_class_names_take_ids(pipe):
    assert pipe.class_names is None
    placeholders = build_pipeline()
    placeholders.aim.config.id2label = {i: f"LABEL_{i}" for i in range(5)}  # transformers' defaults
    assert placeholders.class_names is None
    assert pipe.get_label_ids([0, "3", torch.tensor(4)]) == [0, 3, 4]
    with pytest.raises(
        ValueError, match=r"'cat' \(classes: 0, 1, 2, 3, 4\); this model has no class names \(num_classes=5"
    ):
        pipe.get_label_ids(["cat"])
    with pytest.raises(
        ValueError, match=r"^class id 5 is out of range \[0, 5\)$"
    ):  # an id: no advice to pass ids
        pipe.get_label_ids(5)
    with pytest.raises(ValueError, match=r"class labels must be names or ids, got b'\\x03'"):
        pipe.get_label_ids(b"\x03")  # bytes iterated as byte values: label 3


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(output_type="latent"), r"output_type must be one of \['pil', 'np', 'pt'\], got 'latent'"),
        (dict(num_images_per_label=0), "num_images_per_label must be an integer >= 1, got 0"),
        (dict(generator=0), "generator must be a torch.Generator or a list of them, one per image; got int"),
        (dict(generator=[seeded(0), None]), "generator must be a torch.Generator .*got NoneType"),
        (dict(num_images_per_label=1.5), "num_images_per_label must be an integer >= 1, got 1.5"),
        (
            dict(num_images_per_label=2, generator=[seeded(0)] * 3),
            r"got 3 generators for 4 images \(2 labels x num_images_per_label=2\)",
        ),
        (dict(guidance_scale=-1.0), "guidance_scale must be"),
    ],
)
def test_bad_call_arguments(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe([0, 1], **kwargs)


def test_numpy_counts_and_missing_components(pipe):
    """num_images_per_label takes NumPy integers as the other settings do; a component left out
    (diffusers' component=None) or a non-tensor to decode is a clear error, not an AttributeError."""
    assert torch.equal(
        pipe.generate_codes([0], num_images_per_label=np.int64(2), generator=seeded(1)),
        pipe.generate_codes([0], num_images_per_label=2, generator=seeded(1)),
    )
    with pytest.raises(ValueError, match="vqvae must be of type VQModel, got NoneType"):
        AiMPipeline(aim=pipe.aim, vqvae=None)
    with pytest.raises(ValueError, match="aim must be of type AiMForImageGeneration, got VQModel"):
        AiMPipeline(aim=pipe.vqvae, vqvae=pipe.vqvae)
    with pytest.raises(ValueError, match="codes must be a tensor of VQ codes"):
        pipe.decode(np.zeros((1, 16), np.int64))


def test_tokenizer_must_fit_the_model():
    stage2 = original_stage2()
    vq = VQModel(**llamagen_vq_config(block_out_channels=(32,) * 5, latent_channels=64, num_vq_embeddings=32))
    with pytest.raises(ValueError, match="vqvae has 32 codes but the AiM model predicts vocab_size=64"):
        AiMPipeline(aim=load_original(stage2), vqvae=vq)


def test_save_and_load_round_trip(tmp_path, pipe):
    folder = tmp_path / "pipe"
    pipe.save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "AiMPipeline"
    assert index["aim"] == ["aim_hf.modeling_aim", "AiMForImageGeneration"]
    assert index["vqvae"] == ["diffusers", "VQModel"]
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))
    assert files == [
        "README.md", "aim", "aim/config.json", "aim/model.safetensors", "model_index.json", "vqvae",
        "vqvae/config.json", "vqvae/diffusion_pytorch_model.safetensors",
    ]  # fmt: skip
    loaded = AiMPipeline.from_pretrained(folder)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.aim.config.original_decode_positions
    expected = pipe([1, 2], generator=seeded(7), output_type="pt").images
    assert torch.equal(loaded([1, 2], generator=seeded(7), output_type="pt").images, expected)
    # saving again over the folder replaces the files in place, and clears a killed save's staging
    (folder / ".saving-killed" / "aim").mkdir(parents=True)
    loaded.save_pretrained(folder)
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == files


def test_compiled_decoder_decodes_alike_and_saves(tmp_path):
    """The README's faster decoding, ``pipe.vqvae.decoder.compile()`` (Inductor; on the CPU here):
    the images agree with float64 as closely as the eager decoder's (float32, fused and reordered
    sums: 1e-5 relative), and the compiled pipeline saves the same weights under the same names."""
    import shutil

    if shutil.which("g++") is None:
        pytest.skip("Inductor's CPU backend needs a C++ compiler")
    pipe = build_pipeline()
    codes = torch.randint(0, VOCAB, (2, NUM_TOKENS), generator=seeded(3))
    reference = decode_codes(load_llamagen_vq(original_vq(), SMALL_CONFIG).double(), codes)
    eager = pipe.decode(codes, output_type="pt")
    pipe.vqvae.decoder.compile()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = pipe.decode(codes, output_type="pt")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # it did compile
    expected = (reference / 2 + 0.5).clamp(0, 1)
    for images in (eager, compiled):
        assert ((images.double() - expected).norm() / expected.norm()).item() < 1e-5
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = AiMPipeline.from_pretrained(tmp_path / "pipe")
    assert torch.equal(loaded.decode(codes, output_type="pt"), eager)


def test_saving_over_another_sharding_leaves_no_stale_weights(tmp_path, pipe):
    """A single model.safetensors left beside a new shard index would be loaded instead of it."""
    folder = tmp_path / "pipe"
    pipe.save_pretrained(folder)
    pipe.save_pretrained(folder, variant="fp16")  # another variant: kept
    changed = build_pipeline(original_stage2(seed=1))
    changed.save_pretrained(folder, max_shard_size="20KB")
    names = {p.name for p in (folder / "aim").iterdir()}
    assert "model.safetensors" not in names and "model.safetensors.index.json" in names
    assert "model.fp16.safetensors" in names
    loaded = AiMPipeline.from_pretrained(folder)
    assert torch.equal(loaded.aim.model.norm_f.weight, changed.aim.model.norm_f.weight)
    assert not torch.equal(loaded.aim.model.norm_f.weight, pipe.aim.model.norm_f.weight)
    pipe.save_pretrained(folder)  # and back: the shards go
    assert sorted(p.name for p in (folder / "aim").iterdir()) == [
        "config.json",
        "model.fp16.safetensors",
        "model.safetensors",
    ]


def test_save_refuses_pickles(tmp_path, pipe):
    with pytest.raises(ValueError, match="safetensors only"):
        pipe.save_pretrained(tmp_path, safe_serialization=False)
