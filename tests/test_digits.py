"""The digits dataset, the classifier and Frechet distance that score generated digits, and reduced
runs of scripts/train_vq.py and scripts/evaluate_digits.py."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, load_script
from datasets import DatasetDict
from diffusers import VQModel
from PIL import Image
from scipy.linalg import sqrtm

from aim_hf import AiMConfig, AiMForImageGeneration, AiMPipeline
from aim_hf.digits import DigitClassifier, digits_tensors, frechet_distance, load_digits_dataset
from aim_hf.tokenizer import encode_images


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    return digits_tensors(load_digits_dataset(32))


def test_dataset_images_and_labels(digits):
    dataset = load_digits_dataset(32)
    assert len(dataset) == 1797
    assert dataset.features["label"].names == [str(i) for i in range(10)]
    assert dataset[0]["image"].mode == "RGB" and dataset[0]["image"].size == (32, 32)
    images, labels = digits
    assert images.shape == (1797, 3, 32, 32)
    assert torch.equal(
        torch.bincount(labels), torch.tensor([178, 182, 177, 183, 181, 182, 181, 179, 174, 180])
    )
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])
    # White digit on black: corners are background, the strokes reach full white.
    assert images[:, :, 0, 0].max() < 0.05 and images.amax(dim=(1, 2, 3)).min() > 0.9


def test_dataset_is_deterministic():
    first, second = load_digits_dataset(16), load_digits_dataset(16)
    assert torch.equal(digits_tensors(first)[0], digits_tensors(second)[0])
    assert first["label"] == second["label"]


def test_classifier_reads_held_out_digits(digits):
    images, labels = digits
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, test = order[:1400], order[1400:]
    classifier = DigitClassifier().fit(images[train], labels[train])
    assert (classifier.predict(images[test]) == labels[test].numpy()).mean() > 0.9
    features = classifier.features(images[test])
    assert features.shape == (len(test), 64) and features.dtype == np.float64 and features.min() >= 0
    # Any size and channel count: only the 8x8 grayscale content counts.
    gray_small = torch.nn.functional.avg_pool2d(images[test, :1], 2)
    assert (classifier.predict(gray_small) == labels[test].numpy()).mean() > 0.9


def whitened(n: int, d: int, seed: int) -> np.ndarray:
    """n samples whose sample mean is exactly 0 and sample covariance exactly the identity."""
    x = np.random.default_rng(seed).standard_normal((n, d))
    x -= x.mean(axis=0)
    return x @ np.linalg.inv(np.linalg.cholesky(np.cov(x, rowvar=False))).T


def test_frechet_distance_closed_forms():
    a = whitened(500, 6, seed=0)
    assert abs(frechet_distance(a, a)) < 1e-9
    shift = np.arange(6.0)
    assert frechet_distance(a, a + shift) == pytest.approx(shift @ shift, rel=1e-10)
    # Diagonal covariances I and diag(s^2): |m|^2 + sum (1 - s)^2.
    scale = np.array([0.5, 1.0, 2.0, 3.0, 0.1, 1.5])
    expected = shift @ shift + np.sum((1 - scale) ** 2)
    assert frechet_distance(a, a * scale + shift) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_matches_sqrtm_and_handles_rank_deficiency():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((400, 5)) @ rng.standard_normal((5, 5))
    b = rng.standard_normal((300, 5)) @ rng.standard_normal((5, 5)) + 0.3
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    diff = a.mean(axis=0) - b.mean(axis=0)
    expected = diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(sqrtm(cov_a @ cov_b)).real
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    # Dead features (constant columns, as dead ReLU units give) make both covariances singular;
    # they add nothing to the distance.
    with_dead = [np.hstack([x, np.zeros((len(x), 3))]) for x in (a, b)]
    assert frechet_distance(*with_dead) == pytest.approx(expected, abs=1e-6)


def test_train_vq_reduced_run(tmp_path):
    load_digits_dataset(16).select(range(64)).save_to_disk(tmp_path / "images")
    output = tmp_path / "vq"
    argv = [
        "--dataset", str(tmp_path / "images"), "--resolution", "16", "--block-out-channels", "8", "16",
        "--codebook-size", "16", "--embed-dim", "4", "--steps", "40", "--batch-size", "16",
        "--restart-every", "10", "--log-every", "20",
    ]  # fmt: skip
    metrics = load_script("train_vq").main(
        [*argv, "--output", str(output), "--preview", str(tmp_path / "preview.png")]
    )
    again = load_script("train_vq").main([*argv, "--output", str(tmp_path / "again")])
    assert again["losses"] == metrics["losses"]  # deterministic for a given --seed, as its docstring says
    losses = metrics["losses"]
    assert len(losses) == 40 and np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    # better than drawing every digit as the mean digit (0.055 here; the run gives 0.021), and the
    # restarts (every 10 steps) put the whole codebook to use
    images = digits_tensors(load_digits_dataset(16).select(range(64)))[0]
    mean_image = (images - images.mean(0, keepdim=True)).square().mean().item()
    assert metrics["mse"] < 0.6 * mean_image and metrics["codes_used"] == 16
    vq = VQModel.from_pretrained(output)
    codes = encode_images(vq, digits_tensors(load_digits_dataset(16).select(range(4)))[0] * 2 - 1)
    assert codes.shape == (4, 64) and codes.max() < 16
    # the first 20 images over their reconstructions, whatever the batch size: 2 rows of 10 (x4 pixels)
    preview = np.asarray(Image.open(tmp_path / "preview.png"))
    assert preview.shape[:2] == (4 * 16 * 4, 10 * 16 * 4)
    assert preview[2 * 64 : 3 * 64, 9 * 64 :].any()  # image 19 (a digit: some pixels lit)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    with pytest.raises(SystemExit, match="--batch-size 128 x 1 process"):  # 64 images: no full batch
        load_script("train_vq").main(
            ["--dataset", str(tmp_path / "images"), "--resolution", "16", "--batch-size", "128",
             "--output", str(tmp_path / "vq2")]
        )  # fmt: skip
    assert not (tmp_path / "vq2").exists()
    DatasetDict({"train": load_digits_dataset(16).select(range(4))}).save_to_disk(tmp_path / "splits")
    with pytest.raises(SystemExit, match=r"splits holds splits \['train'\]; pass the folder of one split"):
        load_script("train_vq").main(
            ["--dataset", str(tmp_path / "splits"), "--output", str(tmp_path / "vq3")]
        )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "-5"], "--steps: must be a positive integer, got -5"),  # saved an untrained tokenizer
        (["--restart-every", "-1"], "--restart-every must be >= 0"),  # restarted codes at every step
        (["--resolution", "0"], "--resolution: must be a positive integer, got 0"),
        (["--batch-size", "0"], "--batch-size: must be a positive integer, got 0"),
        (["--codebook-size", "0"], "--codebook-size: must be a positive integer, got 0"),
        (["--lr", "nan"], "--lr must be a finite number > 0"),
        (["--preview", "{tmp}/missing/p.png"], "its folder does not exist"),  # failed after training
        # a folder of other files was replaced by the tokenizer, its files lost
        (["--output", "{tmp}/notes"], "exists and is not a VQModel folder; it would be replaced"),
    ],
)
def test_train_vq_rejects_bad_arguments_before_work(tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path) for a in argv]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        load_script("train_vq").main(["--digits", "--output", str(tmp_path / "vq"), *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "vq").exists() and (tmp_path / "notes" / "notes.txt").read_text() == "mine"


def tiny_digits_pipeline() -> AiMPipeline:
    """Random AiM over a random two-level VQ: 4x4 codes, 8x8 images, 10 classes."""
    torch.manual_seed(0)
    config = AiMConfig(
        vocab_size=16, num_classes=10, num_tokens=16, hidden_size=32, num_hidden_layers=2, adaln_groups=2,
        state_size=8, head_dim=8, chunk_size=4, default_guidance_scale=1.5,
    )  # fmt: skip
    vq = VQModel(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), norm_num_groups=8, latent_channels=4, vq_embed_dim=4,
        num_vq_embeddings=16, lookup_from_codebook=True, sample_size=8,
    )  # fmt: skip
    return AiMPipeline(aim=AiMForImageGeneration(config).eval(), vqvae=vq.eval())


def test_evaluate_digits_reduced_run(tmp_path):
    tiny_digits_pipeline().save_pretrained(tmp_path / "pipeline")
    output = tmp_path / "eval.json"
    results = load_script("evaluate_digits").main(
        ["--model", str(tmp_path / "pipeline"), "--samples-per-class", "3", "--batch-size", "16",
         "--output", str(output)]
    )  # fmt: skip
    assert json.loads(output.read_text()) == results
    assert results["guidance_scale"] == 1.5
    rows = results["rows"]
    assert list(rows) == ["real (held out)", "trained", "random init"]
    assert rows["trained"]["samples"] == rows["random init"]["samples"] == 30
    assert rows["real (held out)"]["class_consistency"] > 0.9
    for row in rows.values():
        assert 0 <= row["class_consistency"] <= 1 and row["frechet_distance"] >= 0
        assert len(row["per_class_consistency"]) == 10
    # Random weights draw no digits: far from the real ones in the classifier's feature space.
    assert rows["random init"]["frechet_distance"] > 5 * rows["real (held out)"]["frechet_distance"]


@pytest.mark.parametrize(
    "script, argv, message",
    [
        ("evaluate_digits", ["--model", "{tmp}/no-model"], "error: "),
        ("train_vq", ["--dataset", "{tmp}/no-data", "--output", "{tmp}/vq"], "error: "),
    ],
)
def test_digit_scripts_report_errors_in_one_line(tmp_path, script, argv, message):
    """As the other scripts do: "error: ..." and status 1, not a traceback."""
    argv = [a.format(tmp=tmp_path) for a in argv]
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts" / f"{script}.py"), *argv],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 1 and run.stderr.startswith(message) and "Traceback" not in run.stderr
    assert not (tmp_path / "vq").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--samples-per-class", "0"], "must be a positive integer, got 0"),
        (["--batch-size", "-3"], "must be a positive integer, got -3"),
        (["--guidance-scale", "-1"], "must be a finite number >= 0"),
        (["--output", "{tmp}/missing/eval.json"], "must be a file in an existing folder"),
        (["--output", "{tmp}"], "must be a file in an existing folder"),
    ],
)
def test_evaluate_digits_rejects_bad_arguments_before_work(tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        load_script("evaluate_digits").main(["--model", str(tmp_path / "no-model"), *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--min-consistency", "95"], "--min-consistency is a share in (0, 1] (0.95, not 95), got 95.0"),
        (["--guidance-scales", "1.5", "-1"], "--guidance-scales: must be a finite number >= 0"),
        (["--grid", "no-such-folder/grid.png"], "--grid no-such-folder/grid.png: its folder does not exist"),
        (["--steps", "0"], "--steps: must be a positive integer, got 0"),
        (["--learning-rate", "inf"], "--learning-rate must be a finite number > 0"),
    ],
)
def test_build_digits_model_checks_its_arguments_first(capsys, argv, message):
    """The build reached these after about 20 minutes (a bad scale as a traceback there, a
    percentage as min-consistency silently took the fallback, the grid failed after the model
    had been saved over the shipped one)."""
    with pytest.raises(SystemExit) as exit_info:
        load_script("build_digits_model").parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
