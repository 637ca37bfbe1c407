#!/usr/bin/env python
"""Score an AiMPipeline trained on scikit-learn's digits: does it draw the digit it is asked for,
and do its digits look like real ones?

A classifier (``aim_hf.digits.DigitClassifier``) is trained on a seeded 80% of the real digits.
For each model, ``--samples-per-class`` images of every digit are generated and scored:

- class consistency: the share of samples that the classifier reads as the asked digit;
- Frechet distance between the classifier's hidden features of the samples and of the real
  digits it was trained on (lower is better).

Two rows put the numbers in scale: the held-out 20% of the real digits (what a perfect generator
would score, with the bias of a smaller sample) and the same architecture with random weights.
Prints a table and optionally writes the numbers as JSON.

Example:
    python scripts/evaluate_digits.py --model path/to/pipeline --samples-per-class 100 --output eval.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from aim_hf import AiMForImageGeneration, AiMPipeline, cli
from aim_hf.digits import DigitClassifier, digits_tensors, frechet_distance, load_digits_dataset
from aim_hf.files import atomic_path

NUM_DIGITS = 10
HELD_OUT = 0.2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="an AiMPipeline folder trained on the digits")
    parser.add_argument("--samples-per-class", type=cli.positive_int, default=100)
    parser.add_argument(
        "--guidance-scale", type=cli.guidance_scale, help="default: the model's default_guidance_scale"
    )
    parser.add_argument("--batch-size", type=cli.positive_int, default=250)
    parser.add_argument("--seed", type=int, default=0, help="sample i uses seed + i; also seeds the split")
    parser.add_argument("--output", help="JSON file for the results")
    args = parser.parse_args(argv)
    if args.output is not None:
        output = Path(args.output)
        if output.is_dir() or not output.parent.is_dir():
            parser.error(f"--output {args.output}: must be a file in an existing folder")
    return args


def generate(
    pipe: AiMPipeline, labels: list[int], guidance_scale: float, seed: int, batch_size: int
) -> Tensor:
    """Images (N, 3, H, W) in [0, 1]; image i depends only on its label and generator seed + i."""
    batches = []
    for start in range(0, len(labels), batch_size):
        chunk = labels[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        output = pipe(
            class_labels=chunk, guidance_scale=guidance_scale, generator=generators, output_type="pt"
        )
        batches.append(output.images)
    return torch.cat(batches)


def score(
    classifier: DigitClassifier, images: Tensor, labels: np.ndarray, reference: np.ndarray
) -> dict[str, Any]:
    """Class consistency (overall and per digit) and Frechet distance to the reference features."""
    correct = classifier.predict(images) == labels
    return {
        "samples": len(labels),
        "class_consistency": float(correct.mean()),
        "per_class_consistency": [float(correct[labels == d].mean()) for d in range(NUM_DIGITS)],
        "frechet_distance": frechet_distance(classifier.features(images), reference),
    }


def random_init_pipeline(pipe: AiMPipeline, seed: int) -> AiMPipeline:
    """The same AiM architecture with freshly initialised weights, and the same tokenizer."""
    torch.manual_seed(seed)
    aim = AiMForImageGeneration(pipe.aim.config).to(device=pipe.aim.device, dtype=pipe.aim.dtype).eval()
    return AiMPipeline(aim=aim, vqvae=pipe.vqvae)


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    pipe = AiMPipeline.from_pretrained(args.model)
    if pipe.aim.config.num_classes != NUM_DIGITS:
        raise SystemExit(f"error: {args.model} has {pipe.aim.config.num_classes} classes, not the 10 digits")
    guidance = pipe.aim.config.default_guidance_scale if args.guidance_scale is None else args.guidance_scale
    labels = np.repeat(np.arange(NUM_DIGITS), args.samples_per_class)

    models = {"trained": pipe, "random init": random_init_pipeline(pipe, args.seed)}
    samples, seconds = {}, {}
    for name, model in models.items():
        model.set_progress_bar_config(disable=True)
        start = time.perf_counter()
        samples[name] = generate(model, labels.tolist(), guidance, args.seed, args.batch_size)
        seconds[name] = time.perf_counter() - start

    real_images, real_labels = digits_tensors(load_digits_dataset(samples["trained"].shape[-1]))
    order = torch.randperm(len(real_labels), generator=torch.Generator().manual_seed(args.seed))
    held_out, train = order[: round(HELD_OUT * len(order))], order[round(HELD_OUT * len(order)) :]
    classifier = DigitClassifier(seed=args.seed).fit(real_images[train], real_labels[train])
    reference = classifier.features(real_images[train])

    rows = {
        "real (held out)": score(classifier, real_images[held_out], real_labels[held_out].numpy(), reference)
    }
    for name, images in samples.items():
        rows[name] = score(classifier, images, labels, reference) | {"generation_seconds": seconds[name]}
    return {
        "model": args.model,
        "guidance_scale": guidance,
        "samples_per_class": args.samples_per_class,
        "seed": args.seed,
        "reference_real_digits": len(train),
        "rows": rows,
    }


def print_table(results: dict[str, Any]) -> None:
    print(
        f"{results['model']}: guidance {results['guidance_scale']}, "
        f"reference {results['reference_real_digits']} real digits"
    )
    print(f"{'':18}{'samples':>8}{'class consistency':>19}{'Frechet distance':>18}")
    for name, row in results["rows"].items():
        print(
            f"{name:18}{row['samples']:>8}{row['class_consistency']:>19.3f}{row['frechet_distance']:>18.3f}"
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    results = evaluate(args)
    print_table(results)
    if args.output:
        with atomic_path(args.output) as tmp:
            tmp.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
