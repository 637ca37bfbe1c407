"""Codes datasets: image views, dataset checks, the collator, and scripts/prepare_codes.py (output equal
to direct encoding, resumption after a stopped run equal to an uninterrupted one, bad input)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import REPO, load_script
from diffusers import VQModel
from PIL import Image

from aim_hf.data import (
    CodesCollator,
    center_crop,
    check_codes_dataset,
    check_image_dataset,
    image_views,
    num_classes_of,
    views_to_tensor,
)
from aim_hf.files import atomic_path
from aim_hf.tokenizer import encode_images, llamagen_vq_config

IMAGE_SIZE = 8  # a 4x4 grid of codes with the tiny VQ below


def make_vq(folder: Path) -> Path:
    """A tiny VQModel (2 levels: 8x8 images -> 4x4 codes from a 16-entry codebook) saved with save_pretrained."""
    torch.manual_seed(0)
    config = llamagen_vq_config(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1,
        latent_channels=8,
        num_vq_embeddings=16,
        vq_embed_dim=4,
        norm_num_groups=4,
        sample_size=IMAGE_SIZE,
    )
    VQModel(**config).save_pretrained(folder)
    return folder


def make_images(folder: Path, count: int = 12, classes: int = 3) -> Path:
    """An image dataset (save_to_disk) of class-coloured noisy gradients of assorted sizes."""
    rng = np.random.default_rng(0)
    images, labels = [], []
    for i in range(count):
        label = i % classes
        h, w = (10, 14, 16)[i % 3], (12, 10, 16)[i % 2]
        ramp = np.linspace(0, 1, w)[None, :, None]
        colour = np.eye(3)[label][None, None, :]
        pixels = 255 * (0.6 * colour * ramp + 0.4 * rng.random((h, w, 3)))
        images.append(Image.fromarray(pixels.astype(np.uint8)))
        labels.append(label)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=classes)}
    )
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).save_to_disk(
        str(folder)
    )
    return folder


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory) -> Path:
    return make_vq(tmp_path_factory.mktemp("vq") / "vq")


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("images") / "images")


def prepare_args(images: Path, vq: Path, output: Path, *extra: str) -> list[str]:
    return [
        "--dataset", str(images), "--tokenizer", str(vq), "--output", str(output),
        "--image-size", str(IMAGE_SIZE), "--shard-size", "5", "--batch-size", "2", "--num-workers", "0",
        *extra,
    ]  # fmt: skip


# ---------------------------------------------------------------- views


def test_center_crop_resizes_the_short_side_then_takes_the_middle():
    pixels = np.zeros((32, 64, 3), dtype=np.uint8)
    pixels[:, 16:48] = 255  # the middle half is white
    crop = center_crop(Image.fromarray(pixels), 16)
    assert crop.size == (16, 16)
    assert np.asarray(crop).min() == 255


def test_image_views_count_size_and_mirrors():
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8))
    for augment, count in (("none", 1), ("flip", 2), ("ten-crop", 10)):
        views = image_views(image, 8, augment)
        assert len(views) == count and all(v.size == (8, 8) and v.mode == "RGB" for v in views)
    plain, mirrored = image_views(image, 8, "flip")
    assert np.array_equal(np.asarray(mirrored), np.asarray(plain)[:, ::-1])
    ten = [np.asarray(v) for v in image_views(image, 8, "ten-crop", crop_range=1.5)]
    large = np.asarray(center_crop(image.convert("RGB"), 12))
    assert np.array_equal(ten[0], large[:8, :8]) and np.array_equal(ten[3], large[4:, 4:])
    assert np.array_equal(ten[4], large[2:10, 2:10])
    # crops 5..9 come from the mirror image: its top-left is the original's top-right, mirrored
    assert np.array_equal(ten[5], ten[1][:, ::-1])
    # the larger crop's side is truncated as LlamaGen's int(size * crop_range): 11.5 -> 11, not 12
    ten = [np.asarray(v) for v in image_views(image, 10, "ten-crop", crop_range=1.15)]
    assert np.array_equal(ten[3], np.asarray(center_crop(image.convert("RGB"), 11))[1:, 1:])
    with pytest.raises(ValueError, match="unknown augmentation 'rotate'.*allowed"):
        image_views(image, 8, "rotate")


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    levels = np.array([[0, 3000, 30000, 65535]], dtype=np.uint16).repeat(4, axis=0)
    Image.fromarray(levels).save(tmp_path / "deep.png")
    image = Image.open(tmp_path / "deep.png")
    assert image.mode == "I;16"
    (view,) = image_views(image, 4)
    assert np.asarray(view)[0, :, 0].tolist() == [0, 12, 117, 255]  # value / 257, rounded
    eight_bit = Image.fromarray((levels / 257).round().astype(np.uint8))
    assert np.array_equal(np.asarray(view), np.asarray(image_views(eight_bit, 4)[0]))


def test_32_bit_and_float_images():
    """PIL opens 16-bit PGMs and TIFFs as mode "I" (32-bit): they came out clipped to white. Values
    within 0-255 stay 8-bit; floating-point images are refused (they came out black)."""
    levels = np.array([[0, 3000, 30000, 65535]], dtype=np.int32).repeat(4, axis=0)
    (view,) = image_views(Image.fromarray(levels, mode="I"), 4)
    assert np.asarray(view)[0, :, 0].tolist() == [0, 12, 117, 255]
    small = np.array([[0, 7, 200, 255]], dtype=np.int32).repeat(4, axis=0)
    (view,) = image_views(Image.fromarray(small, mode="I"), 4)
    assert np.asarray(view)[0, :, 0].tolist() == [0, 7, 200, 255]
    with pytest.raises(ValueError, match="values up to 70000; allowed: 8 or 16 bits"):
        image_views(Image.fromarray(np.full((4, 4), 70000, dtype=np.int32), mode="I"), 4)
    with pytest.raises(ValueError, match="floating-point images .* not supported"):
        image_views(Image.fromarray(np.zeros((4, 4), dtype=np.float32), mode="F"), 4)


def test_views_to_tensor_range_and_layout():
    view = Image.fromarray(np.array([[[0, 255, 0]]], dtype=np.uint8))
    tensor = views_to_tensor([view])
    assert tensor.shape == (1, 3, 1, 1)
    assert tensor.flatten().tolist() == [-1.0, 1.0, -1.0]


# ---------------------------------------------------------------- checks and collator


def test_check_image_dataset_names_the_missing_or_bad_column(images_dir):
    dataset = datasets.load_from_disk(str(images_dir))
    check_image_dataset(dataset, "image", "label")
    with pytest.raises(ValueError, match=r"no image column 'img'.*\['image', 'label'\].*--image-column"):
        check_image_dataset(dataset, "img", "label")
    with pytest.raises(ValueError, match=r"no label column 'class'.*--label-column"):
        check_image_dataset(dataset, "image", "class")
    floats = datasets.Dataset.from_dict({"image": dataset["image"][:2], "label": [0.5, 1.0]}).cast_column(
        "image", datasets.Image()
    )
    with pytest.raises(ValueError, match="label column 'label' has type.*float.*allowed: ClassLabel"):
        check_image_dataset(floats, "image", "label")
    strings = datasets.Dataset.from_dict({"image": ["a.png"], "label": [0]})
    with pytest.raises(ValueError, match="image column 'image' has type.*allowed: datasets.Image"):
        check_image_dataset(strings, "image", "label")
    undecoded = dataset.cast_column("image", datasets.Image(decode=False))  # gave dicts to PIL later
    with pytest.raises(
        ValueError, match=r"has type Image\(.*decode=False.*allowed: datasets.Image \(decoded"
    ):
        check_image_dataset(undecoded, "image", "label")
    # -1 marks the unlabelled rows of hub test splits: they were encoded, and only train.py refused them
    unlabelled = dataset.select(range(4)).cast_column("label", datasets.Value("int64"))
    unlabelled = unlabelled.map(lambda row, i: {"label": -1 if i % 2 else row["label"]}, with_indices=True)
    with pytest.raises(ValueError, match="holds 0 missing and 2 negative labels; every row needs a class id"):
        check_image_dataset(unlabelled, "image", "label")


def codes_dataset(codes: list[list[int]], labels: list[int]) -> datasets.Dataset:
    features = datasets.Features(
        {"codes": datasets.List(datasets.Value("int16")), "label": datasets.Value("int64")}
    )
    return datasets.Dataset.from_dict({"codes": codes, "label": labels}, features=features)


def test_check_codes_dataset_rejects_each_kind_of_bad_row():
    good = codes_dataset([[0, 1, 2, 3], [3, 2, 1, 0]], [0, 4])
    check_codes_dataset(good, num_tokens=4, vocab_size=4, num_classes=5)
    assert num_classes_of(good) == 5
    with pytest.raises(ValueError, match="4..4 codes per row; the model takes num_tokens=16"):
        check_codes_dataset(good, num_tokens=16, vocab_size=4, num_classes=5)
    with pytest.raises(ValueError, match=r"codes range over \[0, 3\], outside the codebook \[0, 3\)"):
        check_codes_dataset(good, num_tokens=4, vocab_size=3, num_classes=5)
    with pytest.raises(ValueError, match=r"labels range over \[0, 4\], outside \[0, num_classes=4\)"):
        check_codes_dataset(good, num_tokens=4, vocab_size=4, num_classes=4)
    with pytest.raises(ValueError, match="no codes column 'tokens'"):
        check_codes_dataset(good, 4, 4, 5, codes_column="tokens")
    ragged = codes_dataset([[0, 1, 2, 3], [1, 2]], [0, 1])
    with pytest.raises(ValueError, match="2..4 codes per row"):
        check_codes_dataset(ragged, num_tokens=4, vocab_size=4, num_classes=5)


@pytest.mark.parametrize(
    "codes,labels,codes_type,match",
    [
        (
            [[0, 1, 2, 3], None],
            [0, 1],
            datasets.List(datasets.Value("int16")),
            "codes column 'codes' holds 1 missing",
        ),
        ([[0, 1, 2, 3], [0, None, 2, 3]], [0, 1], datasets.List(datasets.Value("int16")), "holds 1 missing"),
        (
            [[0, 1, 2, 3], [3, 2, 1, 0]],
            [0, None],
            datasets.List(datasets.Value("int16")),
            "label column 'label' holds 1",
        ),
        (
            [[0.9, 1, 2, 3], [3, 2, 1, 0]],
            [0, 1],
            datasets.List(datasets.Value("float64")),
            "allowed: a list of integers",
        ),
        ([1, 2], [0, 1], datasets.Value("int64"), "codes column 'codes' has type Value"),
    ],
)
def test_check_codes_dataset_rejects_nulls_and_non_integer_codes(codes, labels, codes_type, match):
    """Arrow's min/max skip nulls, and float codes passed the range check: nulls then failed in
    the collator after training had started, floats were truncated (10.9 -> 10) silently."""
    features = datasets.Features({"codes": codes_type, "label": datasets.Value("int64")})
    dataset = datasets.Dataset.from_dict({"codes": codes, "label": labels}, features=features)
    with pytest.raises(ValueError, match=match):
        check_codes_dataset(dataset, num_tokens=4, vocab_size=4, num_classes=5)


def test_checks_see_only_the_rows_left_by_select_and_filter():
    """select/filter/shuffle keep the whole Arrow table under an index mapping: the checks read the rows."""
    mixed = codes_dataset([[0, 1, 2, 3], [9, 9, 9], [3, 2, 1, 0]], [0, 7, 1])
    for kept in (mixed.select([0, 2]), mixed.filter(lambda row: row["label"] < 7), mixed.select([2, 0])):
        assert num_classes_of(kept) == 2
        check_codes_dataset(kept, num_tokens=4, vocab_size=4, num_classes=2)
    with pytest.raises(ValueError, match=r"labels range over \[0, 7\]"):
        check_codes_dataset(mixed.select([0, 1]).map(lambda row: {"codes": [0, 1, 2, 3]}), 4, 4, 2)


def test_collator_gives_the_model_inputs():
    rows = codes_dataset([[0, 1, 2, 3], [3, 2, 1, 0]], [0, 4]).with_format("numpy")
    batch = CodesCollator()([rows[0], rows[1]])
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].tolist() == [
        [0, 1, 2, 3],
        [3, 2, 1, 0],
    ]
    assert batch["labels"].tolist() == batch["input_ids"].tolist()
    assert batch["class_labels"].tolist() == [0, 4]


def test_atomic_path_leaves_nothing_on_failure_and_replaces_folders(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    for text in ("first", "second"):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "f").write_text(text)
    assert (target / "f").read_text() == "second" and [p.name for p in tmp_path.iterdir()] == ["out"]
    # a file never replaces a folder, nor a folder a file (a mistyped path lost a folder's files)
    with (
        pytest.raises(ValueError, match="out is a folder; it is not replaced by a file"),
        atomic_path(target) as tmp,
    ):
        tmp.write_text("a file")
    (tmp_path / "note").write_text("kept")
    with pytest.raises(ValueError, match="note is a file; it is not replaced by a folder"):
        with atomic_path(tmp_path / "note") as tmp:
            tmp.mkdir()
    assert (target / "f").read_text() == "second" and (tmp_path / "note").read_text() == "kept"
    (tmp_path / "note").unlink()
    # a rename that fails (a folder onto a link to a folder) leaves the target and no temporary
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OSError), atomic_path(tmp_path / "link") as tmp:
        tmp.mkdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "out", "real"]


# ---------------------------------------------------------------- prepare_codes.py


def test_prepare_codes_equals_direct_encoding(tmp_path, vq_dir, images_dir):
    prepare = load_script("prepare_codes")
    output = tmp_path / "codes"
    assert prepare.main(prepare_args(images_dir, vq_dir, output, "--augment", "flip")) == 0
    codes = datasets.load_from_disk(str(output))
    images = datasets.load_from_disk(str(images_dir))
    assert len(codes) == 2 * len(images)
    assert codes.features["codes"] == datasets.List(datasets.Value("int16"), length=16)
    assert codes.features["label"] == images.features["label"]
    assert not output.with_name("codes.work").exists()

    vq = VQModel.from_pretrained(vq_dir).eval()
    for i in (0, 7, 11):
        views = image_views(images[i]["image"], IMAGE_SIZE, "flip")
        expected = encode_images(vq, views_to_tensor(views))
        assert torch.equal(torch.tensor(codes[2 * i : 2 * i + 2]["codes"]), expected)
        assert codes[2 * i : 2 * i + 2]["label"] == [images[i]["label"]] * 2


def test_prepare_codes_from_image_folders(tmp_path, vq_dir, capsys, monkeypatch):
    """An image folder of one class got no label column from datasets' imagefolder (the error said
    to name a label column); a broken file stopped the run with PIL's error alone, naming no file."""
    folder = tmp_path / "photos" / "dogs"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    prepare = load_script("prepare_codes")
    args = prepare_args(tmp_path / "photos", vq_dir, tmp_path / "codes")
    assert prepare.main(args) == 0
    codes = datasets.load_from_disk(str(tmp_path / "codes"))
    assert codes.features["label"].names == ["dogs"] and codes["label"] == [0, 0, 0]

    (folder / "1.png").write_bytes((folder / "1.png").read_bytes()[:30])  # truncated
    for workers in ("0", "2"):  # from a worker it came wrapped in the worker's traceback
        with pytest.raises(ValueError, match=r"^could not read the image of row 1 \(.*dogs/1\.png\): "):
            prepare.main(
                [*prepare_args(tmp_path / "photos", vq_dir, tmp_path / "broken"), "--num-workers", workers]
            )

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty exists and is not a codes dataset; choose another --output"):
        prepare.main(prepare_args(tmp_path / "photos", vq_dir, tmp_path / "empty"))
    monkeypatch.chdir(tmp_path / "empty")  # "." was refused as "has an empty name"
    with pytest.raises(ValueError, match=f"{tmp_path / 'empty'} exists and is not a codes dataset"):
        prepare.main(prepare_args(tmp_path / "photos", vq_dir, Path(".")))


def test_prepare_codes_rerun_into_a_finished_dataset_checks_its_settings(
    tmp_path, vq_dir, images_dir, capsys
):
    """A finished dataset records what it was made with: the same command again has nothing to do,
    other settings are refused instead of passing off the old rows as what was asked for."""
    prepare = load_script("prepare_codes")
    output = tmp_path / "codes"
    args = prepare_args(images_dir, vq_dir, output)
    assert prepare.main(args) == 0
    before = sorted(p.name for p in output.iterdir())
    assert prepare.main([*args, "--shard-size", "3"]) == 0  # the rows do not depend on the shards
    assert "nothing to do" in capsys.readouterr().out
    with pytest.raises(
        ValueError, match=r"codes was made with other settings \(augment: 'none' then, 'flip' now\)"
    ):
        prepare.main([*args, "--augment", "flip"])
    with pytest.raises(ValueError, match="image_size: 8 then, 16 now"):
        prepare.main([*args, "--image-size", "16"])
    assert sorted(p.name for p in output.iterdir()) == before
    assert len(datasets.load_from_disk(str(output))) == len(datasets.load_from_disk(str(images_dir)))


def test_prepare_codes_resumes_a_stopped_run_exactly(tmp_path, vq_dir, images_dir):
    prepare = load_script("prepare_codes")
    reference = tmp_path / "reference"
    assert prepare.main(prepare_args(images_dir, vq_dir, reference, "--augment", "ten-crop")) == 0

    # First run: a separate process that stops after one of the three shards, as a job killed by
    # its time limit would; then the debris of a process killed while writing a shard.
    output = tmp_path / "codes"
    args = prepare_args(images_dir, vq_dir, output, "--augment", "ten-crop")
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "prepare_codes.py"), *args, "--max-shards", "1"],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    work = tmp_path / "codes.work"
    assert not output.exists() and sorted(p.name for p in work.glob("shard-*")) == ["shard-000000"]
    debris = work / ".shard-000001.tmp-999999"
    debris.mkdir()
    (debris / "data-00000-of-00001.arrow").write_bytes(b"half a shard")

    with pytest.raises(ValueError, match="other settings.*augment: 'ten-crop' then, 'flip' now"):
        prepare.main(prepare_args(images_dir, vq_dir, output, "--augment", "flip"))
    assert prepare.main(args) == 0
    resumed, expected = datasets.load_from_disk(str(output)), datasets.load_from_disk(str(reference))
    assert len(resumed) == len(expected) == 120
    assert resumed["codes"] == expected["codes"] and resumed["label"] == expected["label"]
    assert not work.exists()


def test_prepare_codes_rejects_bad_input_before_work(tmp_path, vq_dir, images_dir, capsys):
    prepare = load_script("prepare_codes")
    output = tmp_path / "codes"
    with pytest.raises(ValueError, match="no label column 'class'"):
        prepare.main(prepare_args(images_dir, vq_dir, output, "--label-column", "class"))
    with pytest.raises(
        ValueError, match="--image-size 9 must be a multiple of the tokenizer's downsampling factor 2"
    ):
        prepare.main(prepare_args(images_dir, vq_dir, output, "--image-size", "9"))
    with pytest.raises(FileNotFoundError, match="no VQ tokenizer"):
        prepare.main(prepare_args(images_dir, tmp_path / "nothing", output))
    for flags, message in [
        (["--shard-size", "0"], "--shard-size: must be a positive integer, got 0"),
        (
            ["--crop-range", "inf"],
            "--crop-range must be a finite number >= 1, got inf",
        ),  # it overflowed later
    ]:
        with pytest.raises(SystemExit) as exit_info:
            prepare.main(prepare_args(images_dir, vq_dir, output, *flags))
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_prepare_codes_resume_refuses_a_tokenizer_retrained_in_place(tmp_path, vq_dir, images_dir):
    """The tokenizer was known by its path only: retrained into the same folder between two runs,
    its codes and the old shards' would have been mixed in one dataset."""
    vq = tmp_path / "vq"
    shutil.copytree(vq_dir, vq)
    prepare = load_script("prepare_codes")
    args = prepare_args(images_dir, vq, tmp_path / "codes")
    assert prepare.main([*args, "--max-shards", "1"]) == 0
    retrained = VQModel.from_pretrained(vq)
    with torch.no_grad():
        retrained.quantize.embedding.weight.mul_(2)
    retrained.save_pretrained(vq)
    with pytest.raises(ValueError, match="other settings .*tokenizer_weights: '[0-9a-f]{64}' then"):
        prepare.main(args)


def test_prepare_codes_resume_refuses_other_columns(tmp_path, vq_dir, images_dir):
    """A second label column: a resumed run with --label-column switched would mix the two."""
    two_labels = datasets.load_from_disk(str(images_dir))
    two_labels.add_column("fine", list(range(len(two_labels)))).save_to_disk(str(tmp_path / "two"))
    prepare = load_script("prepare_codes")
    args = prepare_args(tmp_path / "two", vq_dir, tmp_path / "codes")
    assert prepare.main([*args, "--max-shards", "1"]) == 0
    with pytest.raises(ValueError, match="other settings.*label_column: 'label' then, 'fine' now"):
        prepare.main([*args, "--label-column", "fine"])


def test_prepare_codes_splits_shards_over_cpu_processes(tmp_path, vq_dir, images_dir):
    """Two processes from torchrun on a machine without a GPU each take their own shards (before,
    each saw itself alone and encoded every shard); the result equals one process's."""
    output = tmp_path / "codes"
    args = prepare_args(images_dir, vq_dir, output)
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(REPO / "scripts" / "prepare_codes.py"), *args, "--max-shards", "1"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    work = tmp_path / "codes.work"
    assert sorted(p.name for p in work.glob("shard-*")) == ["shard-000000", "shard-000001"]
    assert load_script("prepare_codes").main(args) == 0  # the third shard, then the dataset
    single = tmp_path / "single"
    assert load_script("prepare_codes").main(prepare_args(images_dir, vq_dir, single)) == 0
    together, alone = datasets.load_from_disk(str(output)), datasets.load_from_disk(str(single))
    assert together["codes"] == alone["codes"] and together["label"] == alone["label"]
