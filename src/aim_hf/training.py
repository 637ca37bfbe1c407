"""Training AiM with ``transformers.Trainer``: the original's weight-decay rule, a tokens-per-second
log for benchmarks, loading a model to start from, and resizing the class embedding to fine-tune
on another label set."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from .configuration_aim import AiMConfig
from .conversion import load_original
from .files import atomic_path, changed_settings
from .modeling_aim import AiMForImageGeneration

__all__ = [
    "AiMTrainer",
    "last_complete_checkpoint",
    "load_aim",
    "plain_parameter_name",
    "resize_class_embedding",
]

# Name parts that DDP, FSDP1, activation checkpointing and torch.compile insert into parameter names.
_WRAPPER_PARTS = re.compile(r"(^module\.|_fsdp_wrapped_module\.|_checkpoint_wrapped_module\.|_orig_mod\.)")


def plain_parameter_name(name: str) -> str:
    """A parameter's name in the unwrapped model."""
    return _WRAPPER_PARTS.sub("", name)


class AiMTrainer(Trainer):
    """``Trainer`` with AiM's weight-decay rule and a ``tokens_per_second`` entry in its logs.

    AiM (like LlamaGen) decays exactly the parameters with two or more dimensions. Trainer's
    default rule goes by name and would also decay Mamba's ``A_log`` and ``D`` and ``norm_f``,
    so the rule is replaced. The matrices are recorded before any wrapping, because FSDP1
    flattens parameters and only their names survive.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.matrix_names = {name for name, p in self.model.named_parameters() if p.dim() >= 2}
        self._log_window: tuple[float, int] | None = None

    def save_final_model(self, directory: str | os.PathLike) -> None:
        """``save_pretrained`` of the trained model into ``directory`` (written under a temporary
        name, then renamed), from every process: FSDP's shards are gathered on all of them, and
        process zero writes. A gathered state dict holds tied weights (``lm_head.weight``) as
        copies, which ``save_pretrained`` would keep; an unsharded save has them once, so they
        are dropped here (only where the config ties them: an untied ``lm_head`` is its own)."""
        state_dict = self.accelerator.get_state_dict(self.model)
        if self.is_world_process_zero():
            model = self.accelerator.unwrap_model(self.model)
            for tied in model.all_tied_weights_keys:  # transformers': empty where the config unties them
                state_dict.pop(tied, None)
            with atomic_path(directory) as tmp:
                model.save_pretrained(tmp, state_dict=state_dict)
        self.accelerator.wait_for_everyone()

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        return [
            name for name, _ in model.named_parameters() if plain_parameter_name(name) in self.matrix_names
        ]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds tokens/s over the steps since the previous training log (from the second log on, so
        start-up and compilation are left out), counted over all processes."""
        if "loss" in logs:
            now, step = time.perf_counter(), self.state.global_step
            if self._log_window is not None and step > self._log_window[1]:
                args = self.args
                samples = (
                    (step - self._log_window[1]) * args.train_batch_size * args.gradient_accumulation_steps
                )
                tokens = samples * args.world_size * self.model.config.num_tokens
                logs["tokens_per_second"] = tokens / (now - self._log_window[0])
            self._log_window = (now, step)
        super().log(logs, start_time)


def _finished_step(checkpoint: Path) -> int | None:
    """N for a ``checkpoint-N`` folder whose trainer_state.json (Trainer writes it last, in place)
    was written in full; None for any other path."""
    step = checkpoint.name.removeprefix("checkpoint-")
    if not step.isdigit():
        return None
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):  # missing, or empty/cut short by a kill while it was written
        return None
    return int(step) if isinstance(state, dict) and state.get("global_step") == int(step) else None


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest ``checkpoint-N`` that Trainer finished writing (its trainer_state.json is written
    last), so a run killed while saving resumes from the checkpoint before."""
    folder = Path(output_dir)
    steps = [s for s in map(_finished_step, folder.glob("checkpoint-*")) if s is not None]
    return str(folder / f"checkpoint-{max(steps)}") if steps else None


# What a checkpoint's weights must match in the model a resume builds
SHAPE_FIELDS = ("vocab_size", "num_classes", "num_tokens", "hidden_size", "num_hidden_layers",
                "adaln_groups", "state_size", "expand", "head_dim", "n_groups", "conv_kernel")  # fmt: skip


def check_resume(checkpoint: str | os.PathLike, args: TrainingArguments, config: AiMConfig) -> None:
    """Refuse a resume that would not continue the run: Trainer restores the optimizer and the
    learning-rate schedule from the checkpoint, so a changed ``--learning_rate`` or batch size
    would be ignored or mixed in silently, a checkpoint without optimizer state (saved with
    ``--save_only_model``) would restart AdamW's moments, and a model of another shape
    (``--num_classes``) would fail in ``load_state_dict`` with PyTorch's size mismatches."""
    folder = Path(checkpoint)
    saved = json.loads((folder / "config.json").read_text())
    shape = changed_settings(
        {k: saved.get(k) for k in SHAPE_FIELDS}, {k: getattr(config, k) for k in SHAPE_FIELDS}
    )
    if shape:
        raise ValueError(f"{folder} holds a model of another shape ({shape}); resume with the same flags")
    if not (folder / "optimizer.pt").is_file() or not (folder / "scheduler.pt").is_file():
        raise ValueError(
            f"{folder} holds no optimizer state (saved with --save_only_model?): resuming from it would "
            f"not continue the run; start a new one from its weights with --init_from {folder}"
        )
    schedule = torch.load(folder / "scheduler.pt", weights_only=True)
    state = json.loads((folder / "trainer_state.json").read_text())
    then = {"learning_rate": schedule["base_lrs"][0], "per-device batch": state.get("train_batch_size")}
    now = {"learning_rate": args.learning_rate, "per-device batch": args.train_batch_size}
    details = changed_settings({k: v for k, v in then.items() if v is not None}, now)
    if details:
        raise ValueError(
            f"{folder} was trained with other settings ({details}): a resume continues the run as it was; "
            f"resume with the same flags, or start a new run with --init_from {folder}"
        )


def load_aim(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> AiMForImageGeneration:
    """An AiM model from a folder saved by ``save_pretrained``, a pipeline folder (its AiM
    component), or an original checkpoint (``aim_b.bin``, a hub-mixin folder; see ``load_original``)."""
    path = Path(path)
    index = path / "model_index.json"
    if index.is_file():
        components = json.loads(index.read_text())
        names = [k for k, v in components.items() if isinstance(v, list) and v[-1] == "AiMForImageGeneration"]
        if not names:
            raise ValueError(f"{index} names no AiMForImageGeneration component")
        path = path / names[0]
    config = path / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("model_type") == "aim":
        return AiMForImageGeneration.from_pretrained(path, dtype=dtype)
    if not path.exists():
        raise FileNotFoundError(f"no AiM model at {path}")
    return load_original(path, dtype=dtype)


@torch.no_grad()
def resize_class_embedding(model: AiMForImageGeneration, num_classes: int) -> None:
    """Give ``model`` ``num_classes`` classes, in place, for fine-tuning on another label set.

    Classes present before and after keep their rows, the null (guidance) row moves to the new
    last index, and new classes start at the mean of the old class rows: an average class, from
    which each moves away as its own images train it."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    old_classes = model.config.num_classes
    old = model.model.embed_classes.weight
    new = nn.Embedding(num_classes + 1, old.shape[1], device=old.device, dtype=old.dtype)
    kept = min(old_classes, num_classes)
    new.weight[:kept] = old[:kept]
    new.weight[kept:num_classes] = old[:old_classes].mean(0)
    new.weight[num_classes] = old[old_classes]
    model.model.embed_classes = new
    model.config.num_classes = num_classes
    # the old names would name other classes (or too few): transformers' placeholders, which the
    # pipeline reads as "no names", until the new data's names are set
    model.config.id2label = {i: f"LABEL_{i}" for i in range(num_classes)}
    model.config.label2id = {f"LABEL_{i}": i for i in range(num_classes)}
