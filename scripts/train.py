"""Train or fine-tune AiM on a codes dataset (scripts/prepare_codes.py) with transformers.Trainer.

    accelerate launch scripts/train.py --dataset data/imagenet256-codes --preset AiM-B \\
        --output_dir runs/aim-b --per_device_train_batch_size 64 --bf16 --max_steps 400000

Every ``TrainingArguments`` flag works (schedules, --gradient_accumulation_steps, --bf16,
--activation_checkpointing, --save_steps, --fsdp, ...). Defaults differ from Trainer's where AiM
differs: AdamW betas (0.9, 0.95), weight decay 0.05 on parameters with >= 2 dimensions only,
learning rate 1e-4 held constant. ``--resume_from_checkpoint latest`` continues from the newest
complete checkpoint in --output_dir (or starts afresh when there is none), with the same data
order and label dropout as an uninterrupted run. The final model is saved to OUTPUT_DIR/model.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
from transformers import HfArgumentParser, TrainingArguments, set_seed

from aim_hf import PRESETS, AiMConfig, AiMForImageGeneration
from aim_hf.data import CodesCollator, check_codes_columns, check_codes_dataset, num_classes_of
from aim_hf.files import remove_temporaries
from aim_hf.labels import IMAGENET_CLASSES
from aim_hf.training import (
    AiMTrainer,
    check_resume,
    last_complete_checkpoint,
    load_aim,
    resize_class_embedding,
)

AIM_DEFAULTS = {
    "learning_rate": 1e-4,
    "lr_scheduler_type": "constant",
    "adam_beta1": 0.9,
    "adam_beta2": 0.95,
    "weight_decay": 0.05,
    "logging_steps": 100,
    "remove_unused_columns": False,  # the collator turns "codes"/"label" into the model's inputs
    "prediction_loss_only": True,  # evaluation logits are (batch, tokens, vocab): never gather them
    "ddp_find_unused_parameters": False,  # every parameter gets a gradient: skip DDP's extra search
}


@dataclass
class ScriptArguments:
    dataset: str = field(metadata={"help": "codes dataset folder written by prepare_codes.py"})
    eval_dataset: str | None = field(default=None, metadata={"help": "codes dataset to evaluate the loss on"})
    codes_column: str = "codes"
    label_column: str = "label"
    preset: str = field(default="AiM-B", metadata={"help": f"model size for a new model: {sorted(PRESETS)}"})
    config: str | None = field(
        default=None, metadata={"help": "AiMConfig json for a new model (replaces --preset)"}
    )
    init_from: str | None = field(
        default=None,
        metadata={"help": "start from this AiM folder (save_pretrained) or original checkpoint (aim_b.bin)"},
    )
    num_classes: int | None = field(
        default=None,
        metadata={
            "help": "classes of the model (default: the dataset's for a new model, the model's with --init_from)"
        },
    )
    class_dropout_prob: float | None = field(
        default=None, metadata={"help": "label dropout (default: config's)"}
    )


def parse_args(argv: list[str] | None) -> tuple[ScriptArguments, TrainingArguments]:
    parser = HfArgumentParser((ScriptArguments, TrainingArguments))
    parser.set_defaults(**AIM_DEFAULTS)
    script, args = parser.parse_args_into_dataclasses(args=argv)
    if script.config is None and script.init_from is None and script.preset not in PRESETS:
        raise ValueError(f"unknown --preset {script.preset!r}; allowed: {sorted(PRESETS)}")
    for name in ("dataset", "eval_dataset", "config", "init_from"):
        value = getattr(script, name)
        if value is not None and not Path(value).exists():
            raise FileNotFoundError(f"--{name} {value} does not exist")
    if script.num_classes is not None and script.num_classes < 1:
        raise ValueError(f"--num_classes must be a positive integer, got {script.num_classes}")
    if script.class_dropout_prob is not None and not 0.0 <= script.class_dropout_prob < 1.0:
        raise ValueError(f"--class_dropout_prob must be in [0, 1), got {script.class_dropout_prob}")
    if args.remove_unused_columns:
        raise ValueError("--remove_unused_columns must stay False: it would drop the codes and label columns")
    if args.push_to_hub:  # Trainer would push bare checkpoints, never the final (or best) model
        raise ValueError(
            "--push_to_hub is not supported: a hub repo holds a pipeline (the model and its tokenizer); "
            "after training, AiMPipeline(aim=..., vqvae=load_vq(TOKENIZER)).push_to_hub(repo) (docs/training.md)"
        )
    return script, args


def build_model(script: ScriptArguments, train: datasets.Dataset) -> AiMForImageGeneration:
    """A new model sized by --preset/--config for this dataset, or the --init_from model with its
    class embedding resized to --num_classes."""
    if script.init_from is not None:
        model = load_aim(script.init_from)
        feature = train.features[script.label_column]
        named = isinstance(feature, datasets.ClassLabel) and feature.num_classes != model.config.num_classes
        if script.num_classes is None and named:  # a model of other classes, trained on these silently
            raise ValueError(
                f"the dataset has {feature.num_classes} classes ({', '.join(feature.names[:5])}"
                f"{', ...' if feature.num_classes > 5 else ''}) and the --init_from model "
                f"{model.config.num_classes}; pass --num_classes {feature.num_classes} to resize its class embedding"
            )
        if script.num_classes is not None and script.num_classes != model.config.num_classes:
            resize_class_embedding(model, script.num_classes)
    else:
        fields = (
            AiMConfig.from_json_file(script.config).to_dict()
            if script.config
            else dict(PRESETS[script.preset])
        )
        fields["num_tokens"] = len(train[0][script.codes_column])
        fields["num_classes"] = script.num_classes or num_classes_of(train, script.label_column)
        model = AiMForImageGeneration(AiMConfig(**fields))
    if script.class_dropout_prob is not None:
        model.config.class_dropout_prob = script.class_dropout_prob
    name_classes(model.config, train.features[script.label_column])
    return model.train()


def name_classes(config: AiMConfig, feature: object) -> None:
    """The dataset's class names into the config (``id2label``), so that the pipeline and
    aim-generate take them. Not all 1000 of ImageNet's WordNet ids (n01440764, ... from a folder of
    the training set): for 1000 classes the pipeline knows ImageNet's readable names in that order.
    A subset keeps its WordNet ids as names."""
    if not isinstance(feature, datasets.ClassLabel) or feature.num_classes != config.num_classes:
        return
    if feature.num_classes == len(IMAGENET_CLASSES) and all(
        re.fullmatch(r"n\d{8}", n) for n in feature.names
    ):
        return
    config.id2label = dict(enumerate(feature.names))
    config.label2id = {name: i for i, name in enumerate(feature.names)}


def load_codes(path: str, script: ScriptArguments) -> datasets.Dataset:
    dataset = datasets.load_from_disk(path)
    if isinstance(dataset, datasets.DatasetDict):
        raise ValueError(f"{path} holds splits {sorted(dataset)}; pass the folder of one split")
    check_codes_columns(dataset, script.codes_column, script.label_column)  # before a model is built from it
    return dataset


def model_inputs(dataset: datasets.Dataset, script: ScriptArguments, config: AiMConfig) -> datasets.Dataset:
    """The dataset checked against the model (before any step runs) and formatted for the collator."""
    check_codes_dataset(
        dataset,
        config.num_tokens,
        config.vocab_size,
        config.num_classes,
        script.codes_column,
        script.label_column,
    )
    return dataset.with_format("numpy", columns=[script.codes_column, script.label_column])


def main(argv: list[str] | None = None) -> AiMTrainer:
    script, args = parse_args(argv)
    if args.should_save:
        remove_temporaries(args.output_dir, "model")  # a run killed while saving OUTPUT_DIR/model
    set_seed(args.seed)  # the initial weights
    train = load_codes(script.dataset, script)
    batch = args.per_device_train_batch_size * args.world_size
    if args.dataloader_drop_last and len(train) < batch:
        raise ValueError(
            f"--dataloader_drop_last with {len(train)} rows and batches of {batch} drops every row: "
            "nothing would be trained"
        )
    model = build_model(script, train)
    train = model_inputs(train, script, model.config)
    evaluation = None
    if script.eval_dataset is not None:
        evaluation = model_inputs(load_codes(script.eval_dataset, script), script, model.config)
    trainer = AiMTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=CodesCollator(script.codes_column, script.label_column),
    )
    resume = args.resume_from_checkpoint
    if resume == "latest":
        resume = last_complete_checkpoint(args.output_dir)
    if resume is not None:
        check_resume(resume, args, model.config)
    trainer.train(resume_from_checkpoint=resume)
    if evaluation is not None and args.eval_strategy == "no":  # else the set is checked and never used
        trainer.evaluate()

    trainer.save_final_model(Path(args.output_dir) / "model")
    return trainer


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
