"""Codes datasets: the image views that get tokenised, checks of image and codes datasets, the
collator that feeds them to ``transformers.Trainer``, and the loaders of the scripts' models.

A codes dataset (``scripts/prepare_codes.py`` writes one) has a ``codes`` column of int16 VQ
indices, ``num_tokens`` per row in raster order, and a ``label`` column of class ids. Each
augmented view of an image is its own row, so training needs no randomness beyond the sampler's.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from diffusers import VQModel
from PIL import Image

from .tokenizer import load_llamagen_vq

__all__ = [
    "AUGMENTATIONS",
    "CodesCollator",
    "center_crop",
    "check_codes_columns",
    "check_codes_dataset",
    "check_image_dataset",
    "image_views",
    "load_vq",
    "num_classes_of",
    "require_column",
    "views_to_tensor",
    "weights_digest",
]

# Views per image: "none" is one center crop, "flip" adds its mirror image, "ten-crop" is
# LlamaGen's: the four corners and the center of a slightly larger center crop, and of its mirror.
AUGMENTATIONS: dict[str, int] = {"none": 1, "flip": 2, "ten-crop": 10}


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB with 8 bits a channel. 16-bit grayscale (PIL's "I;16" modes, as 16-bit PNGs open, and
    "I" holding values above 255, as 16-bit PGMs and TIFFs open) is scaled down first: PIL's own
    conversion clips it at 255, turning most such images white."""
    if image.mode == "F":
        raise ValueError(
            "floating-point images (PIL mode 'F') are not supported; convert them to 8 or 16 bits"
        )
    if image.mode.startswith("I"):
        pixels = np.asarray(image, dtype=np.float64)
        top = pixels.max(initial=0)
        if top > 65535:
            raise ValueError(f"integer image with values up to {top:.0f}; allowed: 8 or 16 bits")
        if image.mode.startswith("I;16") or top > 255:
            pixels = pixels / 257
        image = Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8))
    return image.convert("RGB")


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize the short side to ``size`` and take the central square (ADM's preprocessing: halve
    with a box filter while the image is at least twice too large, then bicubic)."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.Resampling.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def _five_crops(image: Image.Image, size: int) -> list[Image.Image]:
    """Top-left, top-right, bottom-left, bottom-right and center squares of side ``size``."""
    w, h = image.size
    corners = [(0, 0), (w - size, 0), (0, h - size), (w - size, h - size)]
    corners.append((int(round((w - size) / 2)), int(round((h - size) / 2))))
    return [image.crop((x, y, x + size, y + size)) for x, y in corners]


def image_views(
    image: Image.Image, size: int, augment: str = "none", crop_range: float = 1.1
) -> list[Image.Image]:
    """The RGB views of one image that become rows of a codes dataset (``AUGMENTATIONS[augment]``).

    ten-crop first center-crops to ``int(size * crop_range)`` (LlamaGen's size: 281 for 256) so
    the five crops differ."""
    if augment not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augment!r}; allowed: {sorted(AUGMENTATIONS)}")
    image = _to_rgb(image)
    if augment == "ten-crop":
        large = center_crop(image, int(size * crop_range))
        return _five_crops(large, size) + _five_crops(large.transpose(Image.Transpose.FLIP_LEFT_RIGHT), size)
    view = center_crop(image, size)
    if augment == "flip":
        return [view, view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    return [view]


def views_to_tensor(views: Sequence[Image.Image]) -> torch.Tensor:
    """RGB images -> float tensor (n, 3, H, W) in [-1, 1], the VQ encoder's input."""
    array = np.stack([np.asarray(v, dtype=np.uint8) for v in views])
    return torch.from_numpy(array).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def require_column(dataset: datasets.Dataset, column: str, role: str, flag: str) -> None:
    """Raise a ValueError naming the missing column, the columns there are and the flag to set."""
    if column not in dataset.column_names:
        raise ValueError(
            f"the dataset has no {role} column {column!r} (columns: {dataset.column_names}); "
            f"name the right one with {flag}"
        )


def _check_label_feature(dataset: datasets.Dataset, label_column: str) -> None:
    feature = dataset.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return
    if not (isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))):
        raise ValueError(
            f"label column {label_column!r} has type {feature}; allowed: ClassLabel or an integer Value"
        )


def check_image_dataset(dataset: datasets.Dataset, image_column: str, label_column: str) -> None:
    """Raise a ValueError unless ``dataset`` has an image column and an integer label column."""
    require_column(dataset, image_column, "image", "--image-column")
    require_column(dataset, label_column, "label", "--label-column")
    feature = dataset.features[image_column]
    if not isinstance(feature, datasets.Image) or not feature.decode:
        raise ValueError(
            f"image column {image_column!r} has type {feature}; allowed: datasets.Image (decoded, the default)"
        )
    _check_label_feature(dataset, label_column)
    if len(dataset) == 0:
        raise ValueError("the image dataset has no rows")
    labels = _column(dataset, label_column)
    if labels.null_count or pc.min(labels).as_py() < 0:  # e.g. -1, the unlabelled rows of hub test splits
        raise ValueError(
            f"label column {label_column!r} holds {labels.null_count} missing and "
            f"{pc.sum(pc.less(labels, 0)).as_py() or 0} negative labels; every row needs a class id >= 0"
        )


def _column(dataset: datasets.Dataset, name: str) -> pa.ChunkedArray:
    """The Arrow column of the dataset's rows: after ``select``/``filter``/``shuffle`` only those
    (``dataset.data`` is the whole table underneath)."""
    return dataset.with_format("arrow")[name]


def num_classes_of(dataset: datasets.Dataset, label_column: str = "label") -> int:
    """The number of classes: the ClassLabel's, else the largest label plus one."""
    feature = dataset.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return feature.num_classes
    return int(pc.max(_column(dataset, label_column)).as_py()) + 1


def check_codes_columns(
    dataset: datasets.Dataset, codes_column: str = "codes", label_column: str = "label"
) -> None:
    """Raise a ValueError unless the dataset has rows, a column of integer lists (the codes) and an
    integer label column, none of them with missing values: what a model can be built from."""
    require_column(dataset, codes_column, "codes", "--codes_column")
    require_column(dataset, label_column, "label", "--label_column")
    if len(dataset) == 0:
        raise ValueError("the codes dataset has no rows")
    _check_label_feature(dataset, label_column)
    codes = _column(dataset, codes_column)
    lists = (
        pa.types.is_list(codes.type)
        or pa.types.is_large_list(codes.type)
        or pa.types.is_fixed_size_list(codes.type)
    )
    if not (lists and pa.types.is_integer(codes.type.value_type)):
        raise ValueError(
            f"codes column {codes_column!r} has type {dataset.features[codes_column]}; allowed: a list of "
            "integers per row (float codes would be truncated)"
        )
    nulls = codes.null_count + pc.list_flatten(codes).null_count  # rows, then codes within rows
    if nulls:
        raise ValueError(f"codes column {codes_column!r} holds {nulls} missing values (null)")
    labels = _column(dataset, label_column)
    if labels.null_count:
        raise ValueError(f"label column {label_column!r} holds {labels.null_count} missing values (null)")


def check_codes_dataset(
    dataset: datasets.Dataset,
    num_tokens: int,
    vocab_size: int,
    num_classes: int,
    codes_column: str = "codes",
    label_column: str = "label",
) -> None:
    """Raise a ValueError unless every row holds ``num_tokens`` codes in [0, vocab_size) and a label
    in [0, num_classes); checked on the Arrow columns, so it takes seconds even for ImageNet."""
    check_codes_columns(dataset, codes_column, label_column)
    codes = _column(dataset, codes_column)
    lengths = pc.min_max(pc.list_value_length(codes)).as_py()
    if lengths["min"] != num_tokens or lengths["max"] != num_tokens:
        raise ValueError(
            f"codes column {codes_column!r} has {lengths['min']}..{lengths['max']} codes per row; "
            f"the model takes num_tokens={num_tokens}"
        )
    low, high = pc.min_max(pc.list_flatten(codes)).as_py().values()
    if low < 0 or high >= vocab_size:
        raise ValueError(f"codes range over [{low}, {high}], outside the codebook [0, {vocab_size})")
    low, high = pc.min_max(_column(dataset, label_column)).as_py().values()
    if low < 0 or high >= num_classes:
        raise ValueError(f"labels range over [{low}, {high}], outside [0, num_classes={num_classes})")


@dataclass
class CodesCollator:
    """Rows of a codes dataset -> the keyword arguments of ``AiMForImageGeneration.forward``."""

    codes_column: str = "codes"
    label_column: str = "label"

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        codes = torch.from_numpy(np.stack([np.asarray(r[self.codes_column]) for r in rows]).astype(np.int64))
        labels = torch.tensor([int(r[self.label_column]) for r in rows], dtype=torch.long)
        return {"input_ids": codes, "class_labels": labels, "labels": codes}


def load_vq(path: str | os.PathLike) -> VQModel:
    """The VQ tokenizer from a diffusers ``VQModel`` folder, a pipeline folder (its ``vqvae``), a
    LlamaGen checkpoint (``vq_ds16_c2i.pt``) or an original AiM file/folder holding ``vqvae.*`` keys."""
    path = Path(path)
    if path.is_dir() and (path / "vqvae" / "config.json").is_file():
        path = path / "vqvae"
    config = path / "config.json"
    if path.is_dir() and config.is_file() and json.loads(config.read_text()).get("_class_name") == "VQModel":
        return VQModel.from_pretrained(path).eval()
    if path.is_dir() and (path / "model.safetensors").is_file():
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(
            f"no VQ tokenizer at {path}: expected a diffusers VQModel folder, a pipeline folder with "
            "vqvae/, or a LlamaGen/AiM checkpoint file (.pt, .bin, .safetensors)"
        )
    return load_llamagen_vq(path)


def weights_digest(*models: torch.nn.Module) -> str:
    """SHA-256 of the weights as loaded: what a resumed script compares, since a model retrained
    into the same folder is another model under the same path."""
    digest = hashlib.sha256()
    for model in models:
        for name, tensor in model.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
