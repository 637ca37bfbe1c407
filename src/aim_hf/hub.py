"""Finding and loading AiM checkpoints in a local folder or a hub repo (from the cache when offline).

Three layouts are recognised:

* a pipeline saved by this package: ``model_index.json`` with ``aim/`` and ``vqvae/``;
* the original hub-mixin repos hp-l33/aim-base, -large, -xlarge: ``config.json`` with the original
  fields (``d_model``, ``n_layer``, ...) and ``model.safetensors`` holding stage 2 under "mamba."
  and the tokenizer under "vqvae.";
* the original release repo hp-l33/aim: ``aim_b.bin``, ``aim_l.bin``, ``aim_xl.bin`` (stage 2
  only); the tokenizer then comes from LlamaGen's repo (``vq_ds16_c2i.pt``).

Listing a repo needs the network, so files are looked up one known name at a time, which works
from the hub cache alone. Original checkpoints are converted in memory.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import VQModel
from huggingface_hub import constants, file_exists, hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from safetensors import SafetensorError, safe_open

from .configuration_aim import AiMConfig
from .conversion import load_original, read_state_dict
from .modeling_aim import AiMForImageGeneration
from .tokenizer import TOKENIZER_PREFIXES, infer_llamagen_vq_config, load_llamagen_vq, tokenizer_part

PIPELINE_INDEX = "model_index.json"
HUB_MIXIN_FILES = ("config.json", "model.safetensors")
# Sizes of the release repo, largest first: the default is the largest one available.
RELEASE_FILES = {"XL": "aim_xl.bin", "L": "aim_l.bin", "B": "aim_b.bin"}
LLAMAGEN_REPO = "FoundationVision/LlamaGen"
LLAMAGEN_VQ_FILE = "vq_ds16_c2i.pt"
# Keyword arguments of ``from_pretrained`` that say where and how to fetch files.
HUB_ARGUMENTS = ("cache_dir", "revision", "token", "local_files_only", "force_download")
# Weights of each pipeline component as ``save_pretrained`` writes them.
COMPONENT_WEIGHTS = {"aim": "model.safetensors", "vqvae": "diffusion_pytorch_model.safetensors"}
# What a variant may be called: it becomes part of file names (model.fp16.safetensors).
_VARIANT = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class Source:
    """A local folder or a hub repo id, with the arguments that reach the hub."""

    location: str
    cache_dir: str | os.PathLike | None = None
    revision: str | None = None
    token: str | bool | None = None
    local_files_only: bool = False
    force_download: bool = False

    @property
    def is_local(self) -> bool:
        return os.path.isdir(self.location)

    @property
    def offline(self) -> bool:
        return bool(self.local_files_only) or constants.is_offline_mode()

    def has(self, filename: str) -> bool:
        """Whether the folder or repo holds ``filename``, without downloading it: the hub cache
        answers first, the hub itself only when online."""
        if self.is_local:
            return (Path(self.location) / filename).is_file()
        try:
            cached = try_to_load_from_cache(
                self.location, filename, cache_dir=self.cache_dir, revision=self.revision
            )
        except HFValidationError as err:
            raise ValueError(
                f"{self.location!r} is neither a local folder nor a valid hub repo id ({err})"
            ) from None
        if isinstance(cached, str):
            return True
        if self.offline:
            return False
        try:
            return file_exists(self.location, filename, revision=self.revision, token=self.token)
        except HfHubHTTPError:  # the hub answered: a gated or private repo, a server error
            raise
        except Exception:
            # no answer (no network, DNS, timeout): the cache's, as hf_hub_download falls back to it
            return False

    def fetch(self, filename: str) -> Path:
        """The local path of ``filename``, downloaded (or taken from the cache) when on the hub."""
        if self.is_local:
            path = Path(self.location) / filename
            if not path.is_file():
                raise FileNotFoundError(f"{self.location}: no file {filename}")
            return path
        try:
            return Path(
                hf_hub_download(
                    self.location,
                    filename,
                    cache_dir=self.cache_dir,
                    revision=self.revision,
                    token=self.token,
                    local_files_only=self.offline,
                    force_download=self.force_download,
                )
            )
        except FileNotFoundError as err:  # offline and not in the cache
            raise FileNotFoundError(
                f"{filename} of hub repo {self.location} is not in the hub cache and the hub cannot be "
                f"reached (offline mode): {err}"
            ) from err

    def describe(self, filename: str) -> str:
        """How to name one of its files in messages."""
        if self.is_local:
            return str(Path(self.location) / filename)
        return f"{self.location}/{filename}"


def detect_format(source: Source) -> str:
    """Which layout ``source`` holds: "pipeline", "hub-mixin" or "release"."""
    if source.has(PIPELINE_INDEX):
        return "pipeline"
    if any(source.has(name) for name in RELEASE_FILES.values()):
        return "release"
    if all(source.has(name) for name in HUB_MIXIN_FILES):
        if _read_json(source.fetch("config.json")).get("model_type") == "aim":
            raise ValueError(
                f"{source.describe('config.json')} is a bare AiMForImageGeneration, not a pipeline: it has "
                "no tokenizer. Give it one: in Python AiMPipeline(aim=AiMForImageGeneration.from_pretrained"
                "(...), vqvae=...), in scripts/sample_fid.py --vqvae"
            )
        return "hub-mixin"  # the original config's fields are checked against the weights on loading
    raise FileNotFoundError(
        f"no AiM checkpoint found in {source.location!r}: looked for {PIPELINE_INDEX} (a saved pipeline), "
        f"{' + '.join(HUB_MIXIN_FILES)} (hp-l33/aim-base, -large, -xlarge) and "
        f"{', '.join(RELEASE_FILES.values())} (hp-l33/aim)"
        + (" in the hub cache, offline" if not source.is_local and source.offline else "")
    )


def release_file(source: Source, model_size: str | None) -> str:
    """The release file of ``model_size`` ("B", "L" or "XL"), or the largest one available."""
    if model_size is None:
        for name in RELEASE_FILES.values():
            if source.has(name):
                return name
        raise FileNotFoundError(f"{source.location}: none of {list(RELEASE_FILES.values())} is available")
    size = str(model_size).upper().removeprefix("AIM-")
    if size not in RELEASE_FILES:
        raise ValueError(f"model_size must be one of {list(RELEASE_FILES)}, got {model_size!r}")
    name = RELEASE_FILES[size]
    if not source.has(name):
        available = [s for s, f in RELEASE_FILES.items() if source.has(f)]
        raise FileNotFoundError(f"{source.describe(name)} is not available; sizes available: {available}")
    return name


def load_original_model(
    source: Source, layout: str, model_size: str | None = None, dtype: torch.dtype = torch.float32
) -> AiMForImageGeneration:
    """The stage-2 model of an original checkpoint whose ``layout`` (``detect_format``) is
    "hub-mixin" or "release", converted in memory."""
    if layout == "pipeline":
        raise ValueError(f"{source.location} is a saved pipeline, not an original AiM checkpoint")
    if layout == "hub-mixin":
        if model_size is not None:
            raise ValueError(
                f"model_size={model_size!r} only chooses among hp-l33/aim's release files; "
                f"{source.location} holds a single model"
            )
        config = _read_json(source.fetch("config.json"))
        return load_original(source.fetch("model.safetensors"), original_config=config, dtype=dtype)
    return load_original(source.fetch(release_file(source, model_size)), dtype=dtype)


def load_original_components(
    source: Source,
    layout: str,
    model_size: str | None = None,
    vqvae: VQModel | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[AiMForImageGeneration, VQModel]:
    """The stage-2 model and tokenizer of an original checkpoint (``load_original_model``).
    ``vqvae`` replaces the checkpoint's tokenizer (hub-mixin) or LlamaGen's (release)."""
    aim = load_original_model(source, layout, model_size, dtype)
    if vqvae is None and layout == "hub-mixin":
        weights = source.fetch("model.safetensors")
        vq_state = _tokenizer_part(weights)
        if not vq_state:
            raise ValueError(f"{weights} holds no tokenizer weights ('vqvae.' keys); pass vqvae=")
        vqvae = load_tokenizer(vq_state, str(weights), aim.config)
    elif vqvae is None:
        llamagen = Source(
            LLAMAGEN_REPO,
            cache_dir=source.cache_dir,
            token=source.token,
            local_files_only=source.local_files_only,
            force_download=source.force_download,
        )
        path = llamagen.fetch(LLAMAGEN_VQ_FILE)
        vqvae = load_tokenizer(read_state_dict(path), str(path), aim.config)
    return aim, vqvae if vqvae.dtype == dtype else vqvae.to(dtype)


def load_tokenizer(state_dict: Mapping[str, torch.Tensor], name: str, aim_config: AiMConfig) -> VQModel:
    """A LlamaGen VQ tokenizer for the model of ``aim_config``, as a ``VQModel`` whose config is read
    from the weights' shapes. Its codebook must have the model's ``vocab_size`` codes; the image
    size is set from the ``num_tokens`` grid. ``name`` (the file) prefixes every error."""
    state_dict = tokenizer_part(state_dict)  # keys read by their LlamaGen names
    config = infer_llamagen_vq_config(state_dict, name, grid_side=math.isqrt(aim_config.num_tokens))
    check_codebook(config["num_vq_embeddings"], aim_config.vocab_size, f"{name}: 'quantize.embedding.weight'")
    try:
        return load_llamagen_vq(dict(state_dict), config)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from err


def check_codebook(num_codes: int, vocab_size: int, what: str) -> None:
    """The tokenizer must have exactly the codes the model predicts."""
    if num_codes != vocab_size:
        raise ValueError(
            f"{what} has {num_codes} codes but the AiM model predicts vocab_size={vocab_size} codes: "
            "this tokenizer does not belong to this model"
        )


def check_pipeline_folder(
    folder: str | os.PathLike, variant: str | None = None, skip: tuple[str, ...] = ()
) -> None:
    """Raise a ValueError naming the file and key when a saved pipeline's weights do not fit its
    configs (missing, unexpected or mis-shaped tensors) or its tokenizer does not fit its model.

    Loaders would otherwise initialise missing weights at random with only a warning. Components
    named in ``skip`` (passed in by the caller instead of loaded) are not checked."""
    folder = Path(folder)
    configs = {}
    for component, weights_name in COMPONENT_WEIGHTS.items():
        if component in skip:
            continue
        config_path = folder / component / "config.json"
        configs[component] = _read_json(config_path)
        try:
            with torch.device("meta"):
                if component == "aim":
                    model = AiMForImageGeneration(AiMConfig.from_dict(configs[component]))
                    tied = set(model.all_tied_weights_keys)  # none where the config unties them
                else:
                    model = VQModel.from_config(configs[component])
                    tied = set()
        except (ValueError, TypeError) as err:
            raise ValueError(f"{config_path}: {err}") from err
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}
        _check_stored_shapes(_weight_files(folder / component, weights_name, variant), expected)
    if not skip:
        check_codebook(
            configs["vqvae"]["num_vq_embeddings"],
            configs["aim"]["vocab_size"],
            f"{folder / 'vqvae' / 'config.json'} (num_vq_embeddings)",
        )


def check_variant(variant: str | None) -> None:
    """A variant names files (``model.VARIANT.safetensors``): letters, digits, "_" and "-" only;
    an empty one would name ``model..safetensors`` and stand for none in some places only."""
    if variant is not None and not (isinstance(variant, str) and _VARIANT.fullmatch(variant)):
        raise ValueError(
            f"variant must be None or a name of letters, digits, '_' and '-' (e.g. 'fp16'), got {variant!r}"
        )


def weight_names(name: str, variant: str | None) -> tuple[str, str]:
    """The single file and the shard index of weights ``name`` in ``variant``, as transformers and
    diffusers name them (``model.fp16.safetensors``, ``model.safetensors.index.fp16.json``)."""
    if not variant:
        return name, f"{name}.index.json"
    return name.replace(".safetensors", f".{variant}.safetensors"), f"{name}.index.{variant}.json"


def _weight_files(folder: Path, name: str, variant: str | None) -> tuple[Path, list[Path]]:
    """One component's weights as (the file or shard index to name in errors, the safetensors files):
    the single file or the shards its index lists; with a ``variant``, its files where they were
    saved, else the plain ones, which diffusers then loads."""
    forms = [weight_names(name, variant)] + ([weight_names(name, None)] if variant else [])
    for single, index in forms:
        if (folder / single).is_file():
            return folder / single, [folder / single]
        if (folder / index).is_file():
            shards = _read_json(folder / index).get("weight_map", {}).values()
            return folder / index, sorted({folder / shard for shard in shards})
    wanted = f"{forms[0][0]} or {name}" if variant else name
    others = sorted(p.name for p in folder.glob(name.replace(".safetensors", ".*.safetensors")))
    raise FileNotFoundError(
        f"no weights in {folder}: looked for {wanted} (pipelines are saved as safetensors)"
        + (f"; found {', '.join(others)}: pass its variant= (e.g. variant='fp16')" if others else "")
    )


def _check_stored_shapes(weights: tuple[Path, list[Path]], expected: dict[str, tuple[int, ...]]) -> None:
    """The tensors' names and shapes, from the safetensors headers, against the model's."""
    label, files = weights
    stored = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                stored.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
        except (SafetensorError, OSError) as err:
            raise ValueError(f"could not read {path}: {err}") from err
    for key, shape in expected.items():
        if key not in stored:
            raise ValueError(f"{label}: missing key {key!r}")
        if stored[key] != shape:
            raise ValueError(f"{label}: {key!r} has shape {stored[key]}, expected {shape}")
    unexpected = sorted(set(stored) - set(expected))
    if unexpected:
        raise ValueError(
            f"{label}: unexpected key {unexpected[0]!r}" + (" and more" if len(unexpected) > 1 else "")
        )


def _tokenizer_part(weights: Path) -> Mapping[str, torch.Tensor]:
    """The tokenizer's tensors of an original hub-mixin safetensors file, without their prefix
    (read alone: the file holds the stage-2 model too)."""
    with safe_open(str(weights), framework="pt") as f:
        return tokenizer_part({k: f.get_tensor(k) for k in f.keys() if k.startswith(TOKENIZER_PREFIXES)})


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"missing {path}") from None
    except (OSError, ValueError) as err:
        raise ValueError(f"could not read {path} as JSON: {err}") from err
    if not isinstance(value, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return value
