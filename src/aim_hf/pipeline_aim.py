"""AiMPipeline: class labels (ids or names) in, images out, as a diffusers pipeline.

``aim`` samples the VQ codes of each image, ``vqvae`` decodes them. ``from_pretrained`` also
reads the original AiM checkpoints (see :mod:`aim_hf.hub`), converting them in memory, and
``save_pretrained`` writes safetensors and a model card, each file under a temporary name first.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, VQModel
from huggingface_hub import create_repo, file_exists, upload_folder

from . import hub
from .labels import IMAGENET_CLASSES, ClassNameError, get_label_ids
from .model_card import check_card_args, make_model_card
from .modeling_aim import AiMForImageGeneration
from .tokenizer import decode_codes

OUTPUT_TYPES = ("pil", "np", "pt")
Labels = str | int | Sequence[str | int] | torch.Tensor


class AiMPipeline(DiffusionPipeline):
    """Class-conditional image generation with AiM.

    Components:
        aim: the autoregressive model that samples VQ codes from a class.
        vqvae: the VQ tokenizer whose codebook ``aim`` predicts (``num_vq_embeddings ==
            aim.config.vocab_size``).
    """

    model_cpu_offload_seq = "aim->vqvae"

    def __init__(self, aim: AiMForImageGeneration, vqvae: VQModel):
        super().__init__()
        for name, value, kind in (("aim", aim, AiMForImageGeneration), ("vqvae", vqvae, VQModel)):
            if not isinstance(value, kind):  # also None: the pipeline needs both
                raise ValueError(f"{name} must be of type {kind.__name__}, got {type(value).__name__}")
        hub.check_codebook(vqvae.config.num_vq_embeddings, aim.config.vocab_size, "vqvae")
        side = math.isqrt(aim.config.num_tokens)
        if side * side != aim.config.num_tokens:
            raise ValueError(
                f"aim.config.num_tokens={aim.config.num_tokens} is not a square grid of codes: the VQ "
                "decoder needs side x side codes"
            )
        self.register_modules(aim=aim, vqvae=vqvae)

    # ---- loading and saving ----
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> AiMPipeline:
        """A pipeline from a local folder or hub repo (from the hub cache when offline).

        Reads pipelines saved by this package (all of diffusers' ``from_pretrained`` arguments
        apply, e.g. ``dtype``, ``variant``, or a component such as ``vqvae=`` to replace) and the
        original AiM checkpoints: hp-l33/aim-base, -large, -xlarge and hp-l33/aim. For the originals
        the arguments are ``dtype`` (default float32), ``vqvae`` (a ``VQModel`` to use instead of
        the checkpoint's or LlamaGen's tokenizer), ``model_size`` ("B", "L" or "XL"; hp-l33/aim
        only, default the largest available) and ``cache_dir``, ``revision``, ``token``,
        ``local_files_only``, ``force_download``. Without ``dtype`` both components load in float32,
        as diffusers' models do (transformers alone would take the dtype written in aim/config.json).
        """
        location = os.fspath(pretrained_model_name_or_path)
        hub_args = {k: kwargs[k] for k in hub.HUB_ARGUMENTS if kwargs.get(k) is not None}
        source = hub.Source(location, **hub_args)
        layout = hub.detect_format(source)
        if layout != "pipeline":
            return cls._from_original(source, layout, kwargs)
        if kwargs.get("model_size") is not None:
            raise ValueError(
                f"model_size only applies to hp-l33/aim's release files; {location} is a pipeline"
            )
        variant = kwargs.get("variant")
        hub.check_variant(variant)
        folder = location if source.is_local else cls.download(location, variant=variant, **hub_args)
        passed = tuple(name for name in hub.COMPONENT_WEIGHTS if name in kwargs)
        hub.check_pipeline_folder(folder, variant, skip=passed)
        rest = {k: v for k, v in kwargs.items() if k not in (*hub.HUB_ARGUMENTS, "model_size")}
        if rest.get("dtype") is None and rest.get("torch_dtype") is None:
            rest["dtype"] = torch.float32
        pipe = super().from_pretrained(folder, **rest)
        pipe.register_to_config(_name_or_path=location)  # the repo id, not its snapshot's path
        return pipe

    @classmethod
    def _from_original(cls, source: hub.Source, layout: str, kwargs: dict) -> AiMPipeline:
        options = {k: v for k, v in kwargs.items() if k not in hub.HUB_ARGUMENTS}
        model_size = options.pop("model_size", None)
        vqvae = options.pop("vqvae", None)
        dtype, torch_dtype = options.pop("dtype", None), options.pop("torch_dtype", None)
        dtype = dtype or torch_dtype or torch.float32
        if options:
            raise ValueError(
                f"unsupported arguments for an original AiM checkpoint: {sorted(options)}; allowed: "
                f"{sorted(['model_size', 'vqvae', 'dtype', 'torch_dtype', *hub.HUB_ARGUMENTS])}"
            )
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype must be a torch.dtype, got {dtype!r}")
        if vqvae is not None and not isinstance(vqvae, VQModel):
            raise ValueError(f"vqvae must be a diffusers VQModel, got {type(vqvae).__name__}")
        aim, vqvae = hub.load_original_components(source, layout, model_size, vqvae, dtype)
        return cls(aim=aim, vqvae=vqvae)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
        push_to_hub: bool = False,
        repo_id: str | None = None,
        license: str | None = None,
        base_model: str | None = None,
        **kwargs,
    ) -> None:
        """Save the components as safetensors, model_index.json and a model card README.md.

        Everything is written to a temporary folder inside ``save_directory`` and renamed into
        place, model_index.json last, so no file is ever half-written. ``repo_id`` names the repo
        in the card's usage snippet (default: ``save_directory``); ``license`` and ``base_model``
        go into the card (:func:`~aim_hf.model_card.make_model_card`); with ``push_to_hub`` the
        pipeline is also uploaded there (``kwargs`` go to :meth:`push_to_hub`)."""
        _check_save_args(safe_serialization, variant)
        target = Path(save_directory)
        beside_plain = variant is not None and _has_plain_weights(lambda name: (target / name).is_file())
        # a variant saved alone is what the card's snippet must ask for; beside plain weights, not
        card = make_model_card(
            self, repo_id or os.fspath(save_directory), license=license, base_model=base_model,
            variant=None if beside_plain else variant,
        )  # fmt: skip
        target.mkdir(parents=True, exist_ok=True)
        for stale in target.glob(".saving-*"):  # staging left by a save that was killed
            shutil.rmtree(stale, ignore_errors=True)
        with tempfile.TemporaryDirectory(dir=target, prefix=".saving-") as staging:
            super().save_pretrained(staging, variant=variant, max_shard_size=max_shard_size)
            card.save(os.path.join(staging, "README.md"))
            for stale in _stale_weights(Path(staging), target, variant):
                stale.unlink()
            if beside_plain:
                _keep_plain_dtype(Path(staging), target)
            _move_into(Path(staging), target, last="model_index.json")
        if push_to_hub:
            self.push_to_hub(
                repo_id or target.name,
                variant=variant,
                max_shard_size=max_shard_size,
                license=license,
                base_model=base_model,
                **kwargs,
            )

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
        license: str | None = None,
        base_model: str | None = None,
    ) -> str:
        """Upload the pipeline and its model card (usage snippet loading ``repo_id``; ``license``
        and ``base_model`` as in :meth:`save_pretrained`) to the hub. A variant pushed to a repo
        that holds plain weights leaves its aim/config.json (their dtype: transformers loads a
        folder in it, which ``save_pretrained`` keeps in a folder too) and its model card as they are."""
        _check_save_args(safe_serialization, variant)
        check_card_args(license, base_model)
        repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        beside_plain = variant is not None and _has_plain_weights(
            lambda name: file_exists(repo_id, name, token=token)
        )
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(
                folder,
                variant=variant,
                max_shard_size=max_shard_size,
                repo_id=repo_id,
                license=license,
                base_model=base_model,
            )
            return upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=commit_message or "Upload AiMPipeline",
                token=token,
                create_pr=create_pr,
                ignore_patterns=["aim/config.json", "README.md"] if beside_plain else None,
            )

    # ---- class labels ----
    @property
    def class_names(self) -> list[str] | list[list[str]] | None:
        """One name (or list of synonyms) per class: the model config's ``id2label`` when it names
        every class (transformers' placeholders "LABEL_0", ... are not names), ImageNet-1k's names
        for 1000 classes, else None (ids only)."""
        config = self.aim.config
        id2label = {int(k): v for k, v in (config.id2label or {}).items()}
        placeholders = all(v == f"LABEL_{k}" for k, v in id2label.items())
        if sorted(id2label) == list(range(config.num_classes)) and not placeholders:
            return [id2label[i] for i in range(config.num_classes)]
        if config.num_classes == len(IMAGENET_CLASSES):
            return IMAGENET_CLASSES
        return None

    def get_label_ids(self, labels: Labels) -> list[int]:
        """Class ids for class names and/or ids, e.g. ``["golden retriever", 980]`` -> ``[207, 980]``.
        Unknown names raise a ValueError listing close matches."""
        if isinstance(labels, torch.Tensor):
            labels = labels.tolist()
        num_classes = self.aim.config.num_classes
        names = self.class_names
        try:
            return get_label_ids(labels, names or [str(i) for i in range(num_classes)])
        except ClassNameError as err:
            if names is not None:
                raise
            raise ValueError(
                f"{err}; this model has no class names (num_classes={num_classes} and no id2label in "
                "its config): pass class ids"
            ) from None

    # ---- generation ----
    @torch.no_grad()
    def generate_codes(
        self,
        class_labels: Labels,
        num_images_per_label: int = 1,
        guidance_scale: float | None = None,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """The VQ codes (num_images, num_tokens) of the images ``__call__`` would return; the images
        of one label are next to each other. Shows the progress bar over the decoding steps."""
        if (
            isinstance(num_images_per_label, bool)
            or not isinstance(num_images_per_label, numbers.Integral)
            or num_images_per_label < 1
        ):
            raise ValueError(f"num_images_per_label must be an integer >= 1, got {num_images_per_label!r}")
        num_images_per_label = int(num_images_per_label)
        ids = self.get_label_ids(class_labels)
        labels = torch.tensor(ids, dtype=torch.long).repeat_interleave(num_images_per_label)
        if isinstance(generator, (list, tuple)) and len(generator) != len(labels):
            raise ValueError(
                f"got {len(generator)} generators for {len(labels)} images ({len(ids)} labels x "
                f"num_images_per_label={num_images_per_label}); pass one generator per image or a single one"
            )
        with self.progress_bar(total=self.aim.config.num_tokens) as progress:
            return self.aim.generate(
                labels,
                guidance_scale=guidance_scale,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                generator=generator,
                callback=lambda _: progress.update(),
            )

    @torch.no_grad()
    def decode(
        self, codes: torch.Tensor, output_type: str = "pil"
    ) -> list[PIL.Image.Image] | np.ndarray | torch.Tensor:
        """Images of VQ codes (num_images, num_tokens) with pixel values in [0, 1]: a list of PIL
        images ("pil"), a float array (N, H, W, 3) ("np") or a float tensor (N, 3, H, W) ("pt").
        On a GPU the codes are decoded in chunks that fit its free memory (``decode_codes``)."""
        _check_output_type(output_type)
        # an offloaded tokenizer (enable_model_cpu_offload) waits on the CPU until decode moves it
        device = self._execution_device if hasattr(self.vqvae, "_hf_hook") else self.vqvae.device
        images = decode_codes(self.vqvae, codes, device)
        images = (images.float() / 2 + 0.5).clamp(0, 1).cpu()
        if output_type == "pt":
            return images
        array = images.permute(0, 2, 3, 1).numpy()
        return array if output_type == "np" else self.numpy_to_pil(array)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Labels,
        num_images_per_label: int = 1,
        guidance_scale: float | None = None,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Generate ``num_images_per_label`` images for each class label.

        Args:
            class_labels: class ids and/or names ("golden retriever"), one or a list.
            num_images_per_label: images per label; those of one label are adjacent.
            guidance_scale: classifier-free guidance; None uses the model's default
                (``aim.config.default_guidance_scale``), 1 disables it.
            temperature, top_k (0 = off), top_p (1 = off): sampling filters.
            generator: one ``torch.Generator``, or a list with one per image so that each image
                depends only on its own generator.
            output_type: "pil", "np" (float (N, H, W, 3) in [0, 1]) or "pt" (float (N, 3, H, W) in [0, 1]).
            return_dict: return an ``ImagePipelineOutput`` rather than a tuple.
        """
        _check_output_type(output_type)
        codes = self.generate_codes(
            class_labels, num_images_per_label, guidance_scale, temperature, top_k, top_p, generator
        )
        images = self.decode(codes, output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)


def _check_save_args(safe_serialization: bool, variant: str | None) -> None:
    if not safe_serialization:
        raise ValueError("AiMPipeline saves safetensors only; safe_serialization=False is not supported")
    hub.check_variant(variant)


def _check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {list(OUTPUT_TYPES)}, got {output_type!r}")


def _stale_weights(staging: Path, target: Path, variant: str | None) -> list[Path]:
    """The weight files of this variant in ``target`` that the new save does not write: those of
    a save sharded otherwise (or not at all) would stay beside the new ones, and loaders take a
    single file before a shard index. Other variants' files are kept."""
    stale = []
    for component, name in hub.COMPONENT_WEIGHTS.items():
        single, index = hub.weight_names(name, variant)
        stem = single.removesuffix(".safetensors")  # shards: STEM-00001-of-00002.safetensors
        pattern = re.compile(rf"{re.escape(stem)}(-\d+-of-\d+)?\.safetensors|{re.escape(index)}")
        written = {p.name for p in (staging / component).glob("*")}
        stale += [
            p for p in (target / component).glob("*") if pattern.fullmatch(p.name) and p.name not in written
        ]
    return stale


def _has_plain_weights(exists: Callable[[str], bool]) -> bool:
    """Whether the AiM component's plain (not variant) weights are there, one file or sharded;
    ``exists`` answers for a path inside the pipeline (a local folder or a hub repo)."""
    return any(exists(f"aim/{name}") for name in hub.weight_names(hub.COMPONENT_WEIGHTS["aim"], None))


def _keep_plain_dtype(staging: Path, target: Path) -> None:
    """A variant saved beside plain weights keeps the dtype that aim/config.json gives those:
    transformers loads a folder in its config's dtype, so an fp16 variant's config made a plain
    ``AiMForImageGeneration.from_pretrained(folder / "aim")`` cast the float32 weights to float16."""
    old, new = target / "aim" / "config.json", staging / "aim" / "config.json"
    if not (old.is_file() and new.is_file()):
        return
    kept, written = json.loads(old.read_text()), json.loads(new.read_text())
    if "dtype" in kept:
        written["dtype"] = kept["dtype"]
        new.write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")


def _move_into(staging: Path, target: Path, last: str) -> None:
    """Rename every file of ``staging`` to the same place under ``target``, ``last`` at the end."""
    files = sorted(p for p in staging.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.relative_to(staging).as_posix() == last)
    for path in files:
        destination = target / path.relative_to(staging)
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, destination)
