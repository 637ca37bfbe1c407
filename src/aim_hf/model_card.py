"""The README.md model card saved and pushed with every AiM pipeline.

The hub reads its metadata (license, library, task, paper, FID in the model-index) and shows its
usage snippet, which loads the pipeline from the repo it was written for.
"""

from __future__ import annotations

import json
import math
import re
from typing import TYPE_CHECKING

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from .configuration_aim import PRESETS
from .labels import IMAGENET_CLASSES
from .tokenizer import downsampling_factor

if TYPE_CHECKING:
    from .pipeline_aim import AiMPipeline

PAPER_ID = "2408.12245"
PAPER_URL = f"https://arxiv.org/abs/{PAPER_ID}"
# FID on ImageNet 256x256 from the paper, for the released weights (SPEC §2).
PAPER_FID = {"AiM-B": 3.52, "AiM-L": 2.83, "AiM-XL": 2.56}
ORIGINAL_LICENSE = "mit"  # hp-l33/AiM's, for its released weights
ORIGINAL_REPOS = {"AiM-B": "hp-l33/aim-base", "AiM-L": "hp-l33/aim-large", "AiM-XL": "hp-l33/aim-xlarge"}
# The hub has no class-conditional task; class-conditional ImageNet generators are filed under
# unconditional generation (there is no free-text prompt, so text-to-image would mislead).
PIPELINE_TAG = "unconditional-image-generation"
LIBRARY_NAME = "aim-hf"
TAGS = ["aim", "mamba", "mamba2", "autoregressive", "class-conditional", "image-generation", "diffusers"]
IMAGENET_DATASET = "ILSVRC/imagenet-1k"

_CITATION = """@misc{li2024scalableautoregressiveimagegeneration,
  title={Scalable Autoregressive Image Generation with Mamba},
  author={Haopeng Li and Jinyue Yang and Kexin Wang and Xuerui Qiu and Yuhong Chou and Xin Li and Guoqi Li},
  year={2024},
  eprint={2408.12245},
  archivePrefix={arXiv},
  primaryClass={cs.CV},
  url={https://arxiv.org/abs/2408.12245},
}"""


def released_preset(pipeline: AiMPipeline) -> str | None:
    """The paper size ("AiM-B", "AiM-L", "AiM-XL") whose released weights this pipeline holds, if any:
    converted original weights (original decode positions) of an ImageNet-256 shape."""
    config = pipeline.aim.config
    if not config.original_decode_positions or (config.vocab_size, config.num_classes, config.num_tokens) != (
        16384,
        1000,
        256,
    ):
        return None
    for name in PAPER_FID:
        preset = PRESETS[name]
        if (preset["hidden_size"], preset["num_hidden_layers"]) == (
            config.hidden_size,
            config.num_hidden_layers,
        ):
            return name
    return None


def example_labels(pipeline: AiMPipeline) -> list[str | int]:
    """Class labels for the usage snippet: two ImageNet names, else the model's first class."""
    names = pipeline.class_names
    if names is None:
        return [0]
    if names is IMAGENET_CLASSES:
        return ["golden retriever", "volcano"]
    first = names[0]
    return [first if isinstance(first, str) else first[0]]


def check_card_args(license: str | None, base_model: str | None) -> None:
    """Refuse what the hub's card metadata cannot hold, before anything is saved or uploaded."""
    if license is not None and not (
        isinstance(license, str) and re.fullmatch(r"[a-z0-9][a-z0-9.\-]*", license)
    ):
        raise ValueError(
            f"license must be a hub license id (lowercase) such as 'mit' or 'apache-2.0', got {license!r}"
        )
    if base_model is not None:
        try:
            validate_repo_id(base_model)
        except HFValidationError:
            raise ValueError(
                f"base_model must be a hub repo id such as 'hp-l33/aim-base', got {base_model!r}"
            ) from None


def make_model_card(
    pipeline: AiMPipeline,
    repo_id: str,
    constant: str | None = None,
    license: str | None = None,
    base_model: str | None = None,
    variant: str | None = None,
) -> ModelCard:
    """The card of ``pipeline`` published as ``repo_id`` (a hub repo id or a local path); the
    usage snippet loads from ``constant`` instead where given, a module's constant naming the
    folder (``"aim_hf.cli.DEFAULT_MODEL"``) for a pipeline shipped inside a package.

    ``license`` (a hub license id) is the weights' owner's to choose: by default the original's
    MIT for converted released weights, and none for others. ``base_model`` is the hub repo these
    weights were fine-tuned from (the card then claims none of the original's figures). The
    snippet loads ``variant`` where the repo holds only that variant's weights."""
    check_card_args(license, base_model)
    config = pipeline.aim.config
    # fine-tuned weights are no longer the release the paper evaluated
    preset = released_preset(pipeline) if base_model is None else None
    imagenet = pipeline.class_names is IMAGENET_CLASSES  # not a model of 1000 classes of its own
    eval_results = None
    if preset is not None:
        eval_results = [
            EvalResult(
                task_type=PIPELINE_TAG,
                task_name="Class-conditional image generation",
                dataset_type=IMAGENET_DATASET,
                dataset_name="ImageNet 256x256",
                metric_type="FID",
                metric_name="FID (50k samples, ADM evaluation suite)",
                metric_value=PAPER_FID[preset],
                source_name="AiM paper",
                source_url=PAPER_URL,
            )
        ]
    data = ModelCardData(
        license=license or (ORIGINAL_LICENSE if preset is not None else None),
        base_model=base_model,
        library_name=LIBRARY_NAME,
        pipeline_tag=PIPELINE_TAG,
        tags=[*TAGS, f"arxiv:{PAPER_ID}"] + (["imagenet"] if imagenet else []),
        datasets=[IMAGENET_DATASET] if imagenet else None,
        model_name=preset or "AiM",
        eval_results=eval_results,
    )
    side = math.isqrt(config.num_tokens)
    image_size = side * downsampling_factor(pipeline.vqvae)
    millions = sum(p.numel() for p in pipeline.aim.parameters()) / 1e6
    title = f"{preset} (AiM)" if preset else "AiM"
    sections = [
        f"# {title}: class-conditional image generation with Mamba",
        f"An [AiM]({PAPER_URL}) pipeline of the `aim_hf` package (original code: "
        f"[hp-l33/AiM](https://github.com/hp-l33/AiM)): a Mamba2 stack of "
        f"{config.num_hidden_layers} layers, width {config.hidden_size} ({millions:.1f}M parameters) predicts "
        f"the {side}x{side} codes of a {config.vocab_size}-entry VQ codebook one at a time, conditioned on "
        f"one of {config.num_classes} classes{' (ImageNet-1k)' if imagenet else ''}; a VQ decoder turns them "
        f"into {image_size}x{image_size} images. Classifier-free guidance defaults to "
        f"{config.default_guidance_scale}.",
        "## Usage",
        _snippet(repo_id, example_labels(pipeline), constant, variant),
        'Class labels are ids or class names; `output_type` is `"pil"`, `"np"` or `"pt"`; '
        "`generator` may be one `torch.Generator` per image.",
    ]
    if base_model is not None:
        sections += ["## Training", f"Fine-tuned from [{base_model}](https://huggingface.co/{base_model})."]
    if preset is not None:
        sections += [
            "## Original weights",
            f"Converted from the original release ({ORIGINAL_REPOS[preset]}, hp-l33/aim) with the "
            "LlamaGen VQ-f16 tokenizer. Decoding reproduces the original's position ids (code k is fed "
            "with position k+1), with which the weights were evaluated.",
            "## Evaluation",
            f"FID {PAPER_FID[preset]} on ImageNet 256x256 (paper: 50,000 samples, ADM evaluation suite, "
            f"temperature 1, no top-k/top-p, guidance {config.default_guidance_scale}).",
        ]
    sections += ["## Citation", f"```bibtex\n{_CITATION}\n```"]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


def _snippet(repo_id: str, labels: list[str | int], constant: str | None, variant: str | None) -> str:
    """Python that loads and runs the pipeline, quoted as ruff/black would (JSON strings are Python)."""
    source, imports = json.dumps(repo_id, ensure_ascii=False), ""
    options = f", variant={json.dumps(variant)}" if variant is not None else ""
    if constant is not None:
        module, source = constant.rsplit(".", 1)
        imports = f"from {module} import {source}\n"
    return (
        "```python\n"
        "import torch\n"
        f"from aim_hf import AiMPipeline\n{imports}\n"
        f"pipe = AiMPipeline.from_pretrained({source}{options})\n"
        f"images = pipe({json.dumps(labels, ensure_ascii=False)}, generator=torch.Generator().manual_seed(0)).images\n"
        'images[0].save("aim.png")\n'
        "```"
    )
