"""The digits model that ships inside the package: what it holds, that installs carry all of it,
and a reduced run of scripts/evaluate_digits.py on it (10 samples per digit)."""

from __future__ import annotations

import configparser
import json
import re
from fnmatch import fnmatchcase
from pathlib import Path

import pytest
from conftest import load_script
from huggingface_hub import ModelCard

from aim_hf import AiMPipeline
from aim_hf.cli import DEFAULT_MODEL
from aim_hf.model_card import make_model_card

PACKAGE = DEFAULT_MODEL.parents[1]  # src/aim_hf
SETUP_CFG = PACKAGE.parents[1] / "setup.cfg"
MAX_BYTES = 15 * 2**20


def model_files() -> list[Path]:
    return sorted(p for p in DEFAULT_MODEL.rglob("*") if p.is_file())


def test_folder_is_a_small_safetensors_pipeline():
    names = {p.relative_to(DEFAULT_MODEL).as_posix() for p in model_files()}
    assert names == {
        "README.md",
        "model_index.json",
        "aim/config.json",
        "aim/model.safetensors",
        "vqvae/config.json",
        "vqvae/diffusion_pytorch_model.safetensors",
    }
    assert sum(p.stat().st_size for p in model_files()) <= MAX_BYTES


def test_package_data_globs_cover_every_file():
    """setup.cfg's package_data decides what a (non-editable) install copies."""
    setup = configparser.ConfigParser()
    setup.read(SETUP_CFG)
    globs = [g.strip() for g in setup["options.package_data"]["aim_hf"].split(",")]

    def covered(parts: tuple[str, ...]) -> bool:
        return any(
            len(g.split("/")) == len(parts) and all(map(fnmatchcase, parts, g.split("/"))) for g in globs
        )

    uncovered = [p for p in model_files() if not covered(p.relative_to(PACKAGE).parts)]
    assert uncovered == []


def test_digit_names_and_guidance():
    pipe = AiMPipeline.from_pretrained(DEFAULT_MODEL)
    config = pipe.aim.config
    assert pipe.class_names == [str(i) for i in range(10)]
    assert (config.num_classes, config.num_tokens, config.vocab_size) == (10, 64, 128)
    assert pipe.vqvae.config.num_vq_embeddings == 128
    assert 1.0 <= config.default_guidance_scale <= 5.0
    assert (
        f"Classifier-free guidance defaults to {config.default_guidance_scale}."
        in (DEFAULT_MODEL / "README.md").read_text()
    )  # the card's sweep table lists every scale: the sentence must name this one


def test_card_snippet_runs_anywhere_and_is_the_scripts(tmp_path, monkeypatch):
    """The shipped card's usage snippet loads the installed package's copy (it named the path
    inside a source checkout), and it is what make_model_card writes with the arguments that
    build_digits_model.py passes it."""
    card = (DEFAULT_MODEL / "README.md").read_text()
    (snippet,) = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    pipe = AiMPipeline.from_pretrained(DEFAULT_MODEL)
    written = make_model_card(pipe, "elsewhere", constant="aim_hf.cli.DEFAULT_MODEL", license="mit")
    assert f"```python\n{snippet}```" in written.text
    assert ModelCard(card).data.license == written.data.license == "mit"
    monkeypatch.chdir(tmp_path)
    exec(snippet, {})
    assert (tmp_path / "aim.png").is_file()


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory) -> dict:
    output = tmp_path_factory.mktemp("evaluation") / "eval.json"
    results = load_script("evaluate_digits").main(
        [
            "--model",
            str(DEFAULT_MODEL),
            "--samples-per-class",
            "10",
            "--batch-size",
            "100",
            "--output",
            str(output),
        ]
    )
    assert json.loads(output.read_text()) == results
    return results


def test_draws_the_asked_digit(evaluation):
    trained = evaluation["rows"]["trained"]
    assert trained["samples"] == 100
    assert trained["class_consistency"] >= 0.8
    assert min(trained["per_class_consistency"]) >= 0.5
    assert evaluation["rows"]["random init"]["class_consistency"] < 0.5


def test_digits_look_real(evaluation):
    rows = evaluation["rows"]
    assert rows["trained"]["frechet_distance"] < rows["random init"]["frechet_distance"] / 5
