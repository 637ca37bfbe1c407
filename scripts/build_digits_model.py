#!/usr/bin/env python
"""Build the package's embedded model, src/aim_hf/pretrained/aim-digits, from nothing but
scikit-learn's digits, with the package's own scripts and APIs, in one command:

    OMP_NUM_THREADS=2 python scripts/build_digits_model.py

1. images: the 1,797 digits upscaled to 32x32 (``aim_hf.digits.load_digits_dataset``), saved
   with ``save_to_disk``;
2. vq: ``scripts/train_vq.py --digits``, a VQModel that turns them into 8x8 = 64 codes of 128;
3. codes: ``scripts/prepare_codes.py``, every digit as its codes (no flips: a mirrored digit is
   not a digit);
4. aim: ``scripts/train.py`` (transformers.Trainer) trains a small AiM (``AIM_CONFIG``) on them;
5. guidance: ``scripts/evaluate_digits.py`` at each of ``--guidance-scales`` on a small sample
   (seed 1); the default guidance is the scale with the lowest Frechet distance among those
   whose class consistency reaches ``--min-consistency``;
6. pipeline: ``AiMPipeline`` with class names "0".."9" and that guidance, saved to ``--output``,
   then scored by ``evaluate_digits.py`` (100 samples per digit, seed 0), whose table goes into
   the model card; ``aim-generate`` draws ``--grid``.

Intermediate results go to ``--work``; a stage whose result is already there is skipped, and the
AiM stage resumes from its last checkpoint (every 100 steps), so a stopped build continues with
the same command (delete the folder to start afresh). The whole
build took 22.7 minutes on two shared CPU cores (AiM 15.5 of them) and is deterministic: a
rebuild gives the same weights. Needs the ``train`` and ``eval`` extras.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from datasets import load_from_disk

from aim_hf import AiMPipeline, cli
from aim_hf.data import load_vq
from aim_hf.digits import load_digits_dataset
from aim_hf.files import atomic_path
from aim_hf.model_card import make_model_card
from aim_hf.training import load_aim

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
IMAGE_SIZE = 32
# Small enough to train in about 15 minutes on two CPU cores (1.3M parameters); num_tokens and num_classes come
# from the codes dataset.
AIM_CONFIG: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 128,
    "num_hidden_layers": 8,
    "adaln_groups": 8,
    "state_size": 32,
    "head_dim": 32,
    "chunk_size": 64,
    "class_dropout_prob": 0.1,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", default="outputs/digits-build", help="folder for intermediate results")
    parser.add_argument("--output", default=str(cli.DEFAULT_MODEL), help="folder the AiMPipeline is saved to")
    parser.add_argument("--grid", default="docs/digits-grid.png", help="PNG grid of generated digits")
    parser.add_argument("--steps", type=cli.positive_int, default=1200, help="AiM training steps")
    parser.add_argument("--batch-size", type=cli.positive_int, default=64)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument(
        "--guidance-scales", type=cli.guidance_scale, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 4.0]
    )
    parser.add_argument(
        "--min-consistency", type=float, default=0.95, help="share of samples read as their digit, in (0, 1]"
    )
    parser.add_argument("--sweep-samples-per-class", type=cli.positive_int, default=30)
    parser.add_argument(
        "--samples-per-class", type=cli.positive_int, default=100, help="for the final evaluation"
    )
    args = parser.parse_args(argv)
    # checked here: the build takes about 20 minutes before it uses them
    if not 0 < args.min_consistency <= 1:
        parser.error(f"--min-consistency is a share in (0, 1] (0.95, not 95), got {args.min_consistency}")
    if not 0 < args.learning_rate < math.inf:
        parser.error(f"--learning-rate must be a finite number > 0, got {args.learning_rate}")
    if not (ROOT / args.grid).resolve().parent.is_dir():
        parser.error(f"--grid {args.grid}: its folder does not exist")
    return args


def run(*command: str) -> None:
    """Run a script in its own process with this interpreter, failing the build if it fails."""
    print("$", " ".join(command), flush=True)
    subprocess.run([sys.executable, *command], check=True, cwd=ROOT)


def stage(name: str, result: Path, action: Callable[[], object], timings: dict[str, float]) -> None:
    """Run ``action`` unless ``result`` exists already (a resumed build), timing it."""
    if result.exists():
        print(f"== {name}: {result} exists, skipped", flush=True)
        return
    print(f"== {name} -> {result}", flush=True)
    start = time.perf_counter()
    action()
    timings[name] = time.perf_counter() - start


def evaluate(model: Path, guidance: float, samples_per_class: int, seed: int, output: Path) -> dict[str, Any]:
    """evaluate_digits.py's results, computed once per output file."""
    if not output.exists():
        run(
            str(SCRIPTS / "evaluate_digits.py"), "--model", str(model), "--guidance-scale", str(guidance),
            "--samples-per-class", str(samples_per_class), "--seed", str(seed), "--output", str(output),
        )  # fmt: skip
    return json.loads(output.read_text())


def choose_guidance(sweep: list[dict[str, Any]], min_consistency: float) -> float:
    """The scale with the lowest Frechet distance among those that draw the asked digit often
    enough; without any, the most consistent one."""
    trained = [(r["guidance_scale"], r["rows"]["trained"]) for r in sweep]
    good = [(row["frechet_distance"], s) for s, row in trained if row["class_consistency"] >= min_consistency]
    if good:
        return min(good)[1]
    return max(trained, key=lambda item: item[1]["class_consistency"])[0]


@torch.no_grad()
def training_copies(pipe: AiMPipeline, codes: Path, samples_per_class: int) -> float:
    """The share of samples whose codes are exactly those of a training digit: how much the model
    repeats its 1,797 training images rather than drawing new ones. The samples are the evaluated
    ones (image i of digit d is number d * samples_per_class + i, with seed 0 + that number)."""
    training = {tuple(row) for row in load_from_disk(str(codes))["codes"]}
    labels = [d for d in range(pipe.aim.config.num_classes) for _ in range(samples_per_class)]
    generators = [torch.Generator().manual_seed(i) for i in range(len(labels))]
    pipe.set_progress_bar_config(desc="samples for the copy check")
    samples = pipe.generate_codes(labels, generator=generators).tolist()
    return sum(tuple(row) in training for row in samples) / len(samples)


def write_model_card(
    pipe: AiMPipeline, output: Path, results: dict[str, Any], sweep: list[dict[str, Any]], copies: float
) -> None:
    """The pipeline's usual card, with how this model was made and how well it draws digits
    before the citation."""
    # the package's own copy: the snippet names the installed package's folder, wherever it runs
    constant = "aim_hf.cli.DEFAULT_MODEL" if output == cli.DEFAULT_MODEL.resolve() else None
    # trained by this repository, under its license
    card = make_model_card(pipe, repo_id=os.path.relpath(output, ROOT), constant=constant, license="mit")
    rows = "\n".join(
        f"| {name} | {row['samples']} | {row['class_consistency']:.3f} | {row['frechet_distance']:.2f} |"
        for name, row in results["rows"].items()
    )
    sweep_rows = "\n".join(
        f"| {r['guidance_scale']} | {r['rows']['trained']['class_consistency']:.3f} | "
        f"{r['rows']['trained']['frechet_distance']:.2f} |"
        for r in sweep
    )
    section = (
        "## The embedded digits model\n\n"
        "Trained from scratch on scikit-learn's 1,797 handwritten digits (8x8, upscaled to 32x32) by "
        "`scripts/build_digits_model.py`: a VQModel tokenizer (64 codes of 128 per image) and this AiM. "
        "`aim-generate --class 3 --num-images 8 --output digits.png` draws with it.\n\n"
        f"### Evaluation (`scripts/evaluate_digits.py`, guidance {results['guidance_scale']}, "
        f"seed {results['seed']})\n\n"
        "Class consistency is the share of samples that a classifier trained on real digits reads as the "
        "asked digit; the Frechet distance is measured in that classifier's hidden features against "
        f"{results['reference_real_digits']} real digits (lower is better).\n\n"
        "| | samples | class consistency | Frechet distance |\n|---|---:|---:|---:|\n"
        f"{rows}\n\n"
        f"### Guidance scale (chosen on {sweep[0]['samples_per_class']} samples per digit, "
        f"seed {sweep[0]['seed']})\n\n"
        "| guidance | class consistency | Frechet distance |\n|---:|---:|---:|\n"
        f"{sweep_rows}\n\n"
        "### Memorisation\n\n"
        f"{copies:.0%} of the evaluated samples have exactly the codes of one of the 1,797 training digits "
        "(a small model trained for many epochs on a small dataset repeats much of it), which is also why "
        "their Frechet distance to the training digits can be lower than that of unseen real digits.\n\n"
    )
    card.text = card.text.replace("## Citation", section + "## Citation")
    with atomic_path(output / "README.md") as tmp:
        card.save(tmp)


def train_aim(work: Path, args: argparse.Namespace) -> None:
    config = work / "aim_config.json"
    with atomic_path(config) as tmp:
        tmp.write_text(json.dumps(AIM_CONFIG, indent=2) + "\n")
    run(
        str(SCRIPTS / "train.py"), "--dataset", str(work / "codes"), "--config", str(config),
        "--output_dir", str(work / "aim"), "--max_steps", str(args.steps),
        "--per_device_train_batch_size", str(args.batch_size), "--learning_rate", str(args.learning_rate),
        "--lr_scheduler_type", "cosine", "--warmup_steps", "50", "--logging_steps", "50",
        "--save_strategy", "steps", "--save_steps", "100", "--save_total_limit", "1",
        "--resume_from_checkpoint", "latest", "--report_to", "none", "--seed", "0",
    )  # fmt: skip


def save_images(path: Path) -> None:
    with atomic_path(path) as tmp:
        load_digits_dataset(IMAGE_SIZE).save_to_disk(str(tmp))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work, output = (ROOT / args.work).resolve(), (ROOT / args.output).resolve()
    work.mkdir(parents=True, exist_ok=True)
    images, vq, codes, aim = work / "images", work / "vq", work / "codes", work / "aim" / "model"
    timings: dict[str, float] = {}
    stage("images", images, lambda: save_images(images), timings)
    stage("vq", vq, lambda: run(str(SCRIPTS / "train_vq.py"), "--digits", "--output", str(vq)), timings)
    stage(
        "codes", codes,
        lambda: run(
            str(SCRIPTS / "prepare_codes.py"), "--dataset", str(images), "--tokenizer", str(vq),
            "--output", str(codes), "--image-size", str(IMAGE_SIZE), "--num-workers", "0",
        ),
        timings,
    )  # fmt: skip
    stage("aim", aim, lambda: train_aim(work, args), timings)

    pipe = AiMPipeline(aim=load_aim(aim).eval(), vqvae=load_vq(vq))
    config = pipe.aim.config
    config.id2label = {i: str(i) for i in range(config.num_classes)}
    config.label2id = {str(i): i for i in range(config.num_classes)}
    candidate = work / "pipeline"
    stage("pipeline", candidate / "model_index.json", lambda: pipe.save_pretrained(candidate), timings)

    start = time.perf_counter()
    sweep = [
        evaluate(candidate, scale, args.sweep_samples_per_class, 1, work / f"sweep-{scale}.json")
        for scale in args.guidance_scales
    ]
    config.default_guidance_scale = choose_guidance(sweep, args.min_consistency)
    print(f"== default guidance scale: {config.default_guidance_scale}", flush=True)
    timings["guidance"] = time.perf_counter() - start

    start = time.perf_counter()
    pipe.save_pretrained(output)
    results = evaluate(
        output, config.default_guidance_scale, args.samples_per_class, 0,
        work / f"evaluation-{config.default_guidance_scale}.json",
    )  # fmt: skip
    copies = training_copies(pipe, codes, args.samples_per_class)
    print(f"== {copies:.1%} of the samples copy a training digit's codes", flush=True)
    write_model_card(pipe, output, results, sweep, copies)
    cli.main(
        ["--model", str(output), "--num-images", "8", "--seed", "0", "--resize", "64", "--output", str(ROOT / args.grid)]
    )  # fmt: skip
    timings["evaluation"] = time.perf_counter() - start

    for name, seconds in timings.items():
        print(f"{name:12}{seconds / 60:6.1f} min")
    print(f"{'total':12}{sum(timings.values()) / 60:6.1f} min; the model is in {output}")


if __name__ == "__main__":
    main()
