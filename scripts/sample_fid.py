"""Sample images for FID: a PNG folder, the ADM-suite .npz, and FID/IS with torch-fidelity.

    accelerate launch scripts/sample_fid.py --model runs/aim-b/model --vqvae vq-f16 \\
        --output samples/aim-b --num-images 50000 --guidance-scale 2.0

Image i has class i % num_classes and its own generator seeded base_seed + i, so it does not
depend on how the images are split over processes and batches (exactly on the CPU; on a GPU the
kernels of other batch sizes round differently and may flip a draw near a boundary between two
codes: README, Reproducibility). Each process (one per GPU under
``accelerate launch``) samples its share of the images not yet in OUTPUT/ and writes each PNG
atomically, so a rerun after an interruption only samples what is missing. Then OUTPUT.npz gets
``arr_0`` (uint8, N x H x W x 3) for the ADM evaluation suite. With --inception-weights (a local
torch-fidelity Inception file; nothing is downloaded), Inception Score and, with --reference (an
ADM reference .npz or an image folder), FID are computed and saved to OUTPUT/metrics.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from PIL import Image
from tqdm.auto import tqdm

from aim_hf.cli import DTYPES, positive_int
from aim_hf.data import load_vq, weights_digest
from aim_hf.files import atomic_path, changed_settings, remove_temporaries
from aim_hf.pipeline_aim import AiMPipeline
from aim_hf.sampling import check_sampling_args
from aim_hf.training import load_aim

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", required=True, help="AiM folder (with --vqvae), pipeline folder or original checkpoint"
    )
    p.add_argument(
        "--vqvae",
        default=None,
        help="VQ tokenizer (VQModel or pipeline folder, LlamaGen .pt) for a bare AiM model",
    )
    p.add_argument("--output", required=True, help="PNG folder; OUTPUT.npz is written beside it")
    p.add_argument("--num-images", type=positive_int, default=50000)
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per generate call and process")
    p.add_argument("--base-seed", type=int, default=0, help="image i is sampled with seed base_seed + i")
    p.add_argument("--guidance-scale", type=float, default=None, help="default: the model's")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the AiM model")
    p.add_argument(
        "--inception-weights", default=None, help="torch-fidelity Inception weights file (no download)"
    )
    p.add_argument("--reference", default=None, help="reference images for FID: ADM .npz or image folder")
    p.add_argument("--metrics-batch-size", type=positive_int, default=100)
    p.add_argument(
        "--png-workers", type=positive_int, default=4, help="threads encoding PNGs beside sampling"
    )
    args = p.parse_args(argv)
    if Path(args.output).exists() and not Path(args.output).is_dir():
        p.error(f"--output {args.output} is a file; it names the folder of PNGs (OUTPUT.npz goes beside it)")
    if args.reference is not None and args.inception_weights is None:
        p.error("--reference needs --inception-weights (a local Inception file: metrics never download one)")
    for name in ("inception_weights", "reference"):
        value = getattr(args, name)
        if value is not None and not Path(value).exists():
            p.error(f"--{name.replace('_', '-')} {value} does not exist")
    if args.vqvae is not None and not Path(args.vqvae).exists():
        p.error(f"--vqvae {args.vqvae} does not exist")
    guidance = 1.0 if args.guidance_scale is None else args.guidance_scale
    try:  # top_k against the codebook once the model is loaded
        check_sampling_args(guidance, args.temperature, args.top_k, args.top_p, vocab_size=sys.maxsize)
    except ValueError as err:
        p.error(str(err))
    if args.inception_weights is not None:
        try:
            import torch_fidelity  # noqa: F401
        except ImportError:
            p.error("--inception-weights needs torch-fidelity: pip install torch-fidelity")
    return args


def load_pipeline(args: argparse.Namespace) -> AiMPipeline:
    if args.vqvae is not None:
        return AiMPipeline(aim=load_aim(args.model), vqvae=load_vq(args.vqvae))
    return AiMPipeline.from_pretrained(args.model)


def png_path(folder: Path, index: int) -> Path:
    return folder / f"{index:06d}.png"


def check_settings(folder: Path, settings: dict) -> None:
    """Images already in ``folder`` must come from the same model and sampling settings (a setting
    that a folder of an earlier version did not record is not compared)."""
    saved = json.loads((folder / "sampling.json").read_text())
    details = changed_settings(saved, settings)
    if details:
        raise ValueError(
            f"{folder} holds images sampled with other settings ({details}); use another --output"
        )


def write_npz(paths: list[Path], target: Path) -> None:
    """The images as ``arr_0`` (uint8, N x H x W x 3) of an .npz, streamed one image at a time so that
    50,000 images never sit in memory together."""
    first = np.asarray(Image.open(paths[0]).convert("RGB"))
    header = {"descr": "|u1", "fortran_order": False, "shape": (len(paths), *first.shape)}
    with (
        atomic_path(target) as tmp,
        zipfile.ZipFile(tmp, "w", allowZip64=True) as archive,
        archive.open("arr_0.npy", "w", force_zip64=True) as stream,
    ):
        np.lib.format.write_array_header_1_0(stream, header)
        for path in paths:
            image = np.asarray(Image.open(path).convert("RGB"), dtype=np.uint8)
            if image.shape != first.shape:
                raise ValueError(f"{path} has shape {image.shape}, unlike {paths[0]} ({first.shape})")
            stream.write(image.tobytes())


class ImageFiles(torch.utils.data.Dataset):
    """Image files as uint8 tensors (3, H, W), torch-fidelity's input."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.array(Image.open(self.paths[index]).convert("RGB"))).permute(2, 0, 1)


class ArrayImages(torch.utils.data.Dataset):
    """Images of an (N, H, W, 3) uint8 array, e.g. an ADM reference batch, as (3, H, W) tensors."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.array[index])).permute(2, 0, 1)


def reference_images(path: Path) -> torch.utils.data.Dataset:
    if path.is_dir():
        return ImageFiles(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
    with np.load(path) as archive:
        return ArrayImages(archive["arr_0"])


def compute_metrics(paths: list[Path], args: argparse.Namespace) -> dict[str, float]:
    """Inception Score, and FID against --reference, from the local Inception weights."""
    import torch_fidelity

    inputs = {"input1": ImageFiles(paths)}
    if args.reference is not None:
        inputs["input2"] = reference_images(Path(args.reference))
    return torch_fidelity.calculate_metrics(
        **inputs,
        isc=True,
        fid=args.reference is not None,
        feature_extractor_weights_path=args.inception_weights,
        cuda=torch.cuda.is_available(),
        batch_size=args.metrics_batch_size,
        cache=False,
        datasets_download=False,
        verbose=False,
    )


def write_png(path: Path, pixels: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")


def sample(pipe: AiMPipeline, indices: list[int], folder: Path, args: argparse.Namespace, show: bool) -> None:
    """Sample and save the images ``indices``, ``args.batch_size`` at a time.

    A batch's PNGs are encoded on ``args.png_workers`` threads (zlib releases the GIL) while the
    GPU samples the next batch: encoding 256 images takes seconds on one core, as long as sampling
    them. At most one batch is being written at a time, and a failed write stops the run."""
    num_classes, device = pipe.aim.config.num_classes, pipe.aim.device
    batches = [indices[i : i + args.batch_size] for i in range(0, len(indices), args.batch_size)]
    writing: list[Future] = []
    with ThreadPoolExecutor(max_workers=args.png_workers) as pool:
        for batch in tqdm(batches, desc="batches", disable=not show):
            generators = [torch.Generator(device).manual_seed(args.base_seed + i) for i in batch]
            images = pipe(
                [i % num_classes for i in batch],
                guidance_scale=args.guidance_scale,
                temperature=args.temperature,
                top_k=args.top_k,
                top_p=args.top_p,
                generator=generators,
                output_type="pt",
            ).images
            pixels = images.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            for done in writing:
                done.result()
            writing = [pool.submit(write_png, png_path(folder, i), array) for i, array in zip(batch, pixels)]
        for done in writing:
            done.result()


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    state = PartialState(cpu=not torch.cuda.is_available())  # CPU processes: gloo, as prepare_codes
    pipe = load_pipeline(args)
    weights = weights_digest(pipe.aim, pipe.vqvae)  # as loaded, before the cast to --dtype
    guidance = (
        args.guidance_scale if args.guidance_scale is not None else pipe.aim.config.default_guidance_scale
    )
    check_sampling_args(guidance, args.temperature, args.top_k, args.top_p, pipe.aim.config.vocab_size)
    pipe.aim.to(DTYPES[args.dtype])
    pipe.to(state.device)
    pipe.set_progress_bar_config(disable=True)

    folder = Path(os.path.abspath(args.output))  # "." has no name to put .npz after
    npz = folder.with_name(folder.name + ".npz")
    settings = {
        # a hub id as given (resolved, it named a folder of the current directory)
        "model": str(Path(args.model).resolve()) if Path(args.model).exists() else args.model,
        "vqvae": str(Path(args.vqvae).resolve()) if args.vqvae else None,
        "weights": weights,
        "base_seed": args.base_seed,
        "guidance_scale": guidance,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "dtype": args.dtype,
    }
    if state.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        remove_temporaries(folder)
        remove_temporaries(folder.parent, npz.name)  # a run killed while writing the .npz
        if not (folder / "sampling.json").is_file():
            with atomic_path(folder / "sampling.json") as tmp:
                tmp.write_text(json.dumps(settings, indent=1))
    state.wait_for_everyone()
    check_settings(folder, settings)
    missing = [i for i in range(args.num_images) if not png_path(folder, i).is_file()]
    state.wait_for_everyone()  # every process has listed the folder before any writes to it
    sample(
        pipe, missing[state.process_index :: state.num_processes], folder, args, state.is_local_main_process
    )
    state.wait_for_everyone()

    metrics: dict[str, float] = {}
    if state.is_main_process:
        paths = [png_path(folder, i) for i in range(args.num_images)]
        write_npz(paths, npz)
        saved = folder / "metrics.json"
        if args.inception_weights is not None:
            metrics = {"num_images": len(paths), **compute_metrics(paths, args)}
            with atomic_path(saved) as tmp:
                tmp.write_text(json.dumps(metrics, indent=1))
            print(json.dumps(metrics, indent=1))
        elif saved.is_file() and json.loads(saved.read_text()).get("num_images") != len(paths):
            saved.unlink()  # the metrics of another number of images than the .npz now holds
    state.wait_for_everyone()
    return metrics


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
