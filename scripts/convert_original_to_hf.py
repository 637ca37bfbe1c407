#!/usr/bin/env python
"""Convert an original AiM checkpoint into an AiMPipeline folder (safetensors and a model card).

Sources, as a hub repo id or a local folder: hp-l33/aim-base, hp-l33/aim-large, hp-l33/aim-xlarge
(config.json + model.safetensors with the tokenizer inside) and hp-l33/aim (aim_b.bin, aim_l.bin,
aim_xl.bin, with the tokenizer from FoundationVision/LlamaGen or --vq). The saved folder is loaded
back and its logits compared with those of the original state dict loaded directly in float32, on
the same random codes: a check of saving, the dtype and loading (the renaming of the weights is
tested against an independent float64 reference in tests/test_conversion.py); the conversion
fails if the maximum relative error exceeds the tolerance.

    python scripts/convert_original_to_hf.py hp-l33/aim-xlarge aim-xl --push-to-hub me/aim-xl
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from huggingface_hub import create_repo, upload_folder

from aim_hf import AiMForImageGeneration, AiMPipeline, hub
from aim_hf.cli import DTYPES
from aim_hf.conversion import read_state_dict
from aim_hf.files import atomic_path

# Relative logit error allowed after storing the weights in each dtype (the check runs in float32).
TOLERANCES = {"float32": 1e-6, "bfloat16": 5e-2, "float16": 5e-3}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="hub repo id or local folder of an original AiM checkpoint")
    parser.add_argument("output_dir", help="folder to write the pipeline to")
    parser.add_argument(
        "--model-size",
        choices=sorted(hub.RELEASE_FILES),
        help="hp-l33/aim only: which release file to convert (default: the largest available)",
    )
    parser.add_argument(
        "--vq",
        metavar="FILE",
        help="LlamaGen VQ checkpoint (.pt or .safetensors) to use instead of the source's tokenizer",
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the saved weights"
    )
    parser.add_argument("--revision", help="hub revision of the source")
    parser.add_argument("--cache-dir", help="hub cache folder")
    parser.add_argument(
        "--tolerance",
        type=float,
        help=f"largest allowed max relative logit error (default per dtype: {TOLERANCES})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random codes of the check")
    parser.add_argument(
        "--push-to-hub",
        metavar="REPO",
        help="upload the converted pipeline to this hub repo (created first: without a login it fails before converting)",
    )
    parser.add_argument("--private", action="store_true", help="create the hub repo as private")
    args = parser.parse_args(argv)
    if args.tolerance is not None and not args.tolerance > 0:
        parser.error(f"--tolerance must be > 0, got {args.tolerance}")
    if args.vq is not None and not Path(args.vq).is_file():  # before a multi-GB checkpoint is loaded
        parser.error(f"--vq {args.vq} is not a file")
    return args


def load_original_directly(source: hub.Source, model_size: str | None) -> AiMForImageGeneration:
    """The original stage-2 weights loaded straight from their file, in float32."""
    layout = hub.detect_format(source)
    if layout == "pipeline":
        raise ValueError(f"{source.location} is already a converted pipeline (it has {hub.PIPELINE_INDEX})")
    return hub.load_original_model(source, layout, model_size)


@torch.no_grad()
def max_relative_error(
    converted: AiMForImageGeneration, original: AiMForImageGeneration, seed: int, batch: int = 2
) -> float:
    """max |converted - original| / max |original| over the logits of the same random codes and labels."""
    config = original.config
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(config.vocab_size, (batch, config.num_tokens), generator=generator)
    labels = torch.randint(config.num_classes, (batch,), generator=generator)
    expected = original(codes, labels).logits
    actual = converted.float()(codes, labels).logits
    return ((actual - expected).abs().max() / expected.abs().max()).item()


class CheckFailed(Exception):
    """The converted logits differ from the original's by more than the tolerance."""


def check_output_dir(path: Path) -> None:
    """Refuse to replace a folder that is not an earlier conversion (its other files would go), or
    the folder this process runs in (``path`` resolved: a link is followed to its folder)."""
    if path == Path.cwd() or path in Path.cwd().parents:
        raise ValueError(f"output_dir {path} is the current folder or holds it; give a folder inside it")
    if path.exists() and not (
        path.is_dir() and (not any(path.iterdir()) or (path / hub.PIPELINE_INDEX).is_file())
    ):
        raise ValueError(
            f"output_dir {path} exists and is not a pipeline folder (no {hub.PIPELINE_INDEX});"
            " give a new or empty folder, or an earlier conversion to replace"
        )


def convert(args: argparse.Namespace, tolerance: float, card_name: str) -> float:
    """Convert, save (the model card's snippet loading ``card_name``), check; returns the max
    relative error of the logits.

    The pipeline is saved under a temporary name and renamed onto ``output_dir`` only when the
    check passes, so a failed conversion leaves no folder (and an earlier one in place)."""
    output_dir = Path(args.output_dir).resolve()
    check_output_dir(output_dir)
    source = hub.Source(args.source, cache_dir=args.cache_dir, revision=args.revision)
    original = load_original_directly(source, args.model_size)
    vqvae = hub.load_tokenizer(read_state_dict(args.vq), args.vq, original.config) if args.vq else None
    pipe = AiMPipeline.from_pretrained(
        args.source,
        model_size=args.model_size,
        vqvae=vqvae,
        dtype=DTYPES[args.dtype],
        cache_dir=args.cache_dir,
        revision=args.revision,
    )
    with atomic_path(output_dir) as staging:
        pipe.save_pretrained(staging, repo_id=card_name)
        del pipe
        converted = AiMPipeline.from_pretrained(staging).aim
        error = max_relative_error(converted, original, args.seed)
        print(f"converted vs original logits: max relative error {error:.3e}")
        if not error <= tolerance:
            raise CheckFailed(f"max relative error {error:.3e} exceeds the tolerance {tolerance:.1e}")
    print(f"saved {args.output_dir}")
    return error


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    repo_id = None
    if args.push_to_hub:  # first: a missing login fails before the work, and the card gets the full id
        repo_id = create_repo(args.push_to_hub, private=args.private, exist_ok=True).repo_id
    try:
        convert(args, args.tolerance or TOLERANCES[args.dtype], repo_id or args.output_dir)
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    except CheckFailed as err:
        print(f"FAILED: {err}; nothing saved", file=sys.stderr)
        return 1
    if repo_id is not None:
        upload_folder(repo_id=repo_id, folder_path=args.output_dir, commit_message=f"Convert {args.source}")
        print(f"pushed to https://huggingface.co/{repo_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
