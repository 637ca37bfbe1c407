"""``aim-generate``: class labels in, a PNG grid of generated images out.

    aim-generate --class 3 --num-images 8 --seed 0 --output digits.png

Without ``--model`` it draws with the digits model that ships inside the package (trained by
``scripts/build_digits_model.py``), so it works offline on a CPU. Each row of the grid is one
class, each column one image; with ``--seed`` image i uses its own generator seeded seed + i
(on the CPU), so on the CPU it is the same whatever the other images (on a GPU, README,
Reproducibility). Needs only the core dependencies.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers.utils import make_image_grid

from .files import atomic_path
from .pipeline_aim import AiMPipeline
from .sampling import MAX_LOGIT_SCALE

DEFAULT_MODEL = Path(__file__).resolve().parent / "pretrained" / "aim-digits"
# Without --class, models with at most this many classes draw every class.
MAX_DEFAULT_CLASSES = 16
# What the scripts' --dtype may name
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def file_path(text: str) -> str:
    """A file to write (scripts' --json): checked before the work, not after it."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; name a file")
    if not path.resolve().parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: its folder does not exist")
    return text


def seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2^63), got {value}")
    return value


def guidance_scale(text: str) -> float:
    value = float(text)
    if not 0 <= value <= MAX_LOGIT_SCALE:
        raise argparse.ArgumentTypeError(
            f"must be a finite number >= 0 (at most {MAX_LOGIT_SCALE:g}; 1 disables guidance), got {text}"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aim-generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        default=str(DEFAULT_MODEL),
        help="AiMPipeline folder or hub id (default: the embedded digits model)",
    )
    parser.add_argument(
        "--class",
        dest="classes",
        action="append",
        metavar="LABEL",
        help="class id or name; repeat it or give a comma list (default: every class of a model with "
        f"at most {MAX_DEFAULT_CLASSES})",
    )
    parser.add_argument("--num-images", type=positive_int, default=4, help="images per class (default: 4)")
    parser.add_argument("--seed", type=seed, help="image i uses seed + i (default: random)")
    parser.add_argument(
        "--guidance-scale", type=guidance_scale, help="classifier-free guidance (default: the model's)"
    )
    parser.add_argument("--device", help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--resize", type=positive_int, help="resize every image to this many pixels a side")
    parser.add_argument(
        "--output", default="aim-grid.png", help="PNG file for the grid (default: aim-grid.png)"
    )
    return parser


def check_device(name: str | None, parser: argparse.ArgumentParser) -> torch.device:
    """The device to run on; a clear error for a malformed or absent one."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:
        parser.error(f"--device {name}: {str(err).splitlines()[0]}")
    return device


def check_output(path: str, parser: argparse.ArgumentParser) -> Path:
    output = Path(path)
    if output.suffix.lower() != ".png":
        parser.error(f"--output must name a .png file, got {path}")
    if not output.parent.is_dir():
        parser.error(f"--output {path}: folder {output.parent} does not exist")
    if output.is_dir():
        parser.error(f"--output {path} is a folder; name a .png file")
    return output


def class_labels(values: list[str] | None, pipe: AiMPipeline, parser: argparse.ArgumentParser) -> list[int]:
    """Class ids for the --class values (names or ids, comma lists; a value that is a whole class
    name is taken as one, as ImageNet's "crane, bird"); every class by default."""
    num_classes = pipe.aim.config.num_classes
    if values is None:
        if num_classes > MAX_DEFAULT_CLASSES:
            parser.error(f"--class is required: the model has {num_classes} classes")
        return list(range(num_classes))
    ids = []
    for value in values:
        try:
            ids += pipe.get_label_ids([value.strip()])
            continue
        except ValueError:
            pass
        labels = [label.strip() for label in value.split(",")]
        if "" in labels:
            parser.error(f"--class: empty class label in {value!r}")
        try:
            ids += pipe.get_label_ids(labels)
        except ValueError as err:
            parser.error(f"--class: {err}")
    return ids


def main(argv: list[str] | None = None) -> None:
    cli = build_parser()
    args = cli.parse_args(argv)
    device = check_device(args.device, cli)
    output = check_output(args.output, cli)
    # Only the sampling bar: loading the embedded model takes no time worth a bar.
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    try:
        pipe = AiMPipeline.from_pretrained(args.model)
    except (OSError, ValueError) as err:
        cli.error(f"--model {args.model}: cannot load an AiMPipeline: {err}")
    labels = class_labels(args.classes, pipe, cli)
    pipe.to(device)
    count = len(labels) * args.num_images
    pipe.set_progress_bar_config(desc=f"sampling {count} images", unit="code")
    generator = (
        None if args.seed is None else [torch.Generator().manual_seed(args.seed + i) for i in range(count)]
    )
    images = pipe(labels, args.num_images, guidance_scale=args.guidance_scale, generator=generator).images
    grid = make_image_grid(images, rows=len(labels), cols=args.num_images, resize=args.resize)
    with atomic_path(output) as tmp:  # an interrupted run never leaves a truncated PNG
        grid.save(tmp, format="PNG")
    guidance = pipe.aim.config.default_guidance_scale if args.guidance_scale is None else args.guidance_scale
    classes = f"class{'es' if len(labels) > 1 else ''} {', '.join(map(str, labels))}"
    print(
        f"wrote {output}: {count} images of {classes}, a row of {args.num_images} per class "
        f"(guidance {guidance}, seed {args.seed})"
    )


if __name__ == "__main__":
    main()
