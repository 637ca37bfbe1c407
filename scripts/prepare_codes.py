"""Tokenise an image dataset into a codes dataset for training AiM.

    accelerate launch scripts/prepare_codes.py --dataset /data/imagenet/train \\
        --tokenizer vq_ds16_c2i.pt --output data/imagenet256-codes --augment ten-crop

The source is any ``datasets`` image dataset with an image and an integer label column: a folder
of class subfolders (imagefolder), a folder written by ``save_to_disk``, or a hub dataset. Every
view of an image becomes one row ``{"codes": int16 (num_tokens,), "label": int}``.

Work is cut into shards of ``--shard-size`` source images. Each process (``accelerate launch``
starts one per GPU) takes every num_processes-th shard, encodes it in batches on its device and
writes it atomically to ``OUTPUT.work/``; shards already there are skipped, so after an
interruption the same command continues where it stopped, without lost or repeated rows. When all
shards exist, they are concatenated in order into OUTPUT and the work folder is removed.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import shutil
import sys
from pathlib import Path

import datasets
import numpy as np
import torch
from accelerate import PartialState
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from aim_hf.cli import DTYPES, positive_int
from aim_hf.data import (
    AUGMENTATIONS,
    check_image_dataset,
    image_views,
    load_vq,
    views_to_tensor,
    weights_digest,
)
from aim_hf.files import atomic_path, changed_settings, remove_temporaries
from aim_hf.tokenizer import downsampling_factor, encode_images

SETTINGS_FILE = "prepare_codes.json"  # the plan, kept in the finished dataset beside datasets' own files


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="image folder, save_to_disk folder, or hub dataset name")
    p.add_argument("--dataset-config", default=None, help="configuration name of a hub dataset")
    p.add_argument("--data-dir", default=None, help="data_dir passed to load_dataset (e.g. for imagefolder)")
    p.add_argument("--split", default="train")
    p.add_argument("--image-column", default="image")
    p.add_argument("--label-column", default="label")
    p.add_argument(
        "--tokenizer", required=True,
        help="VQModel or pipeline folder, LlamaGen VQ checkpoint (.pt, any size) or original AiM checkpoint",
    )  # fmt: skip
    p.add_argument("--output", required=True, help="folder the codes dataset is saved to (save_to_disk)")
    p.add_argument("--image-size", type=positive_int, default=256)
    p.add_argument("--augment", choices=sorted(AUGMENTATIONS), default="none")
    p.add_argument("--crop-range", type=float, default=1.1, help="ten-crop: crop from size*crop_range")
    p.add_argument("--batch-size", type=positive_int, default=64, help="source images per encoder batch")
    p.add_argument("--shard-size", type=positive_int, default=4096, help="source images per resumable shard")
    p.add_argument("--num-workers", type=int, default=4, help="image-decoding workers per process")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="VQ encoder dtype")
    p.add_argument(
        "--max-shards", type=positive_int, default=None, help="stop after this many shards per process"
    )
    args = p.parse_args(argv)
    if args.num_workers < 0:
        p.error(f"--num-workers must be >= 0, got {args.num_workers}")
    if not 1.0 <= args.crop_range < math.inf:
        p.error(f"--crop-range must be a finite number >= 1, got {args.crop_range}")
    return args


def load_images(args: argparse.Namespace) -> datasets.Dataset:
    """The source split, from a save_to_disk folder or through ``load_dataset``."""
    path = Path(args.dataset)
    if path.is_dir() and any((path / f).is_file() for f in ("state.json", "dataset_dict.json")):
        dataset = datasets.load_from_disk(str(path))
    else:
        load = functools.partial(
            datasets.load_dataset, args.dataset, args.dataset_config, data_dir=args.data_dir, split=args.split
        )
        dataset = load()
        if dataset.info.builder_name == "imagefolder" and args.label_column not in dataset.column_names:
            dataset = load(drop_labels=False)  # it leaves labels out of a folder of one class (or none)
    if isinstance(dataset, datasets.DatasetDict):
        if args.split not in dataset:
            raise ValueError(f"split {args.split!r} not found; allowed: {sorted(dataset)}")
        dataset = dataset[args.split]
    return dataset


class ShardViews(torch.utils.data.Dataset):
    """Rows of one shard -> (views (V, 3, H, W) in [-1, 1], label); runs in DataLoader workers."""

    def __init__(self, rows: datasets.Dataset, args: argparse.Namespace, first_row: int):
        self.rows = rows.select_columns([args.image_column, args.label_column])
        self.args = args
        self.first_row = first_row

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int | str]:
        """(views, label), or (None, what is wrong) for a file PIL cannot read: raised by
        ``encode_shard`` in the main process (a worker's error comes wrapped in its traceback)."""
        a = self.args
        try:
            row = self.rows[index]
            views = image_views(row[a.image_column], a.image_size, a.augment, a.crop_range)
        except (OSError, ValueError, SyntaxError) as err:  # what PIL raises for a broken file
            raw = self.rows.cast_column(a.image_column, datasets.Image(decode=False))[index][a.image_column]
            where = f" ({raw['path']})" if raw.get("path") else ""
            return None, f"could not read the image of row {self.first_row + index}{where}: {err}"
        return views_to_tensor(views), int(row[a.label_column])


def collate(
    items: list[tuple[torch.Tensor | None, int | str]],
) -> tuple[torch.Tensor | None, np.ndarray | str]:
    broken = [problem for views, problem in items if views is None]
    if broken:
        return None, broken[0]
    return torch.cat([views for views, _ in items]), np.array([label for _, label in items], dtype=np.int64)


def encode_shard(
    vq: torch.nn.Module, rows: datasets.Dataset, args: argparse.Namespace, codes_dtype: type, first_row: int
) -> tuple[np.ndarray, np.ndarray]:
    """Codes (rows*V, num_tokens) and labels (rows*V,), image-major then view order; ``first_row``
    is the shard's first row in the source, for errors."""
    loader = DataLoader(
        ShardViews(rows, args, first_row),
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        collate_fn=collate,
        pin_memory=vq.device.type == "cuda",
    )
    views = AUGMENTATIONS[args.augment]
    codes, labels = [], []
    for pixels, batch_labels in loader:
        if pixels is None:
            raise ValueError(batch_labels)
        codes.append(
            encode_images(vq, pixels.to(vq.device, non_blocking=True)).cpu().numpy().astype(codes_dtype)
        )
        labels.append(np.repeat(batch_labels, views))
    return np.concatenate(codes), np.concatenate(labels)


def settings(args: argparse.Namespace) -> dict:
    """What the rows depend on, as given on the command line (recorded in the finished dataset)."""
    dataset = Path(args.dataset)
    return {
        "dataset": str(dataset.resolve()) if dataset.exists() else args.dataset,
        "dataset_config": args.dataset_config,
        "data_dir": args.data_dir,
        "split": args.split,
        "image_column": args.image_column,
        "label_column": args.label_column,
        "image_size": args.image_size,
        "augment": args.augment,
        "crop_range": args.crop_range,
        "tokenizer": str(Path(args.tokenizer).resolve()),
        "dtype": args.dtype,
    }


def check_plan(folder: Path, saved: dict, plan: dict) -> None:
    """``folder`` must come from the same settings: shards of others would not fit together, and a
    finished dataset of others is not what this command asks for (a setting that an earlier
    version did not record is not compared)."""
    details = changed_settings(saved, plan)
    if details:
        raise ValueError(
            f"{folder} was made with other settings ({details}); "
            "rerun with the same settings or delete the folder"
        )


def shard_path(work: Path, index: int) -> Path:
    return work / f"shard-{index:06d}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output = Path(args.output).resolve()  # "." has no name to put the work folder beside
    work = output.with_name(output.name + ".work")
    # cpu: without a GPU, processes started by torchrun or accelerate launch find each other over gloo
    state = PartialState(cpu=not torch.cuda.is_available())
    if output.exists():
        if not (output / "state.json").is_file():
            raise ValueError(f"{output} exists and is not a codes dataset; choose another --output")
        recorded = (output / SETTINGS_FILE).is_file()  # not by versions before it was
        if recorded:
            check_plan(output, json.loads((output / SETTINGS_FILE).read_text()), settings(args))
        if work.exists() and state.is_main_process:
            shutil.rmtree(work)  # left by a run killed while deleting it, after OUTPUT was complete
        how = "with these settings" if recorded else "(its settings were not recorded)"
        print(f"{output} already exists {how}; nothing to do (delete it to tokenise again)")
        return 0
    datasets.disable_progress_bars()  # one bar over the shards instead of one per saved shard
    vq = load_vq(args.tokenizer)
    factor = downsampling_factor(vq)
    if args.image_size % factor:
        raise ValueError(
            f"--image-size {args.image_size} must be a multiple of the tokenizer's downsampling factor {factor}"
        )
    num_tokens = (args.image_size // factor) ** 2
    codes_dtype = np.int16 if vq.config.num_vq_embeddings <= 2**15 else np.int32
    with state.main_process_first():
        source = load_images(args)
    check_image_dataset(source, args.image_column, args.label_column)
    features = datasets.Features(
        {
            "codes": datasets.List(datasets.Value(np.dtype(codes_dtype).name), length=num_tokens),
            "label": source.features[args.label_column],
        }
    )

    plan = {
        **settings(args),
        "tokenizer_weights": weights_digest(vq),  # a tokenizer retrained at the same path is another
        "source": source._fingerprint,
        "num_rows": len(source),
        "shard_size": args.shard_size,
    }
    if state.is_main_process:
        work.mkdir(parents=True, exist_ok=True)
        remove_temporaries(work)
        remove_temporaries(output.parent, output.name)  # a run killed while saving OUTPUT
        if not (work / "plan.json").is_file():
            with atomic_path(work / "plan.json") as tmp:
                tmp.write_text(json.dumps(plan, indent=1))
    state.wait_for_everyone()
    check_plan(work, json.loads((work / "plan.json").read_text()), plan)

    num_shards = math.ceil(len(source) / args.shard_size)
    mine = range(state.process_index, num_shards, state.num_processes)
    todo = [k for k in mine if not shard_path(work, k).is_dir()][: args.max_shards]
    vq.to(state.device)
    if args.dtype != "float32":
        vq.to(DTYPES[args.dtype])
    for k in tqdm(todo, desc="shards", disable=not state.is_local_main_process):
        rows = source.select(range(k * args.shard_size, min(len(source), (k + 1) * args.shard_size)))
        codes, labels = encode_shard(vq, rows, args, codes_dtype, k * args.shard_size)
        shard = datasets.Dataset.from_dict({"codes": codes, "label": labels}, features=features)
        with atomic_path(shard_path(work, k)) as tmp:
            shard.save_to_disk(str(tmp))
    state.wait_for_everyone()

    if state.is_main_process:
        done = sum(shard_path(work, k).is_dir() for k in range(num_shards))
        if done < num_shards:
            print(f"{done} of {num_shards} shards are in {work}; run the same command again to continue")
        else:
            shards = [datasets.load_from_disk(str(shard_path(work, k))) for k in range(num_shards)]
            codes = datasets.concatenate_datasets(shards)
            with atomic_path(output) as tmp:
                codes.save_to_disk(str(tmp))
                (tmp / SETTINGS_FILE).write_text(json.dumps(plan, indent=1))
            shutil.rmtree(work)
            print(f"wrote {len(codes)} rows of {num_tokens} codes ({args.augment}) to {output}")
    state.wait_for_everyone()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
