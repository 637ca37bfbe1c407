"""Images -> codes -> training -> sampling on CPU with a tiny VQ and a tiny AiM: the loss falls,
resuming from a checkpoint repeats the uninterrupted run exactly, fine-tuning resizes the class
embedding, the optimizer decays exactly the >= 2-D weights, and sample_fid.py writes the ADM .npz,
resumes per image and hands torch-fidelity the right inputs."""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import load_script, randomize, tiny_config
from safetensors.torch import load_file
from test_data import IMAGE_SIZE, make_images, make_vq, prepare_args
from transformers import Trainer, TrainingArguments

from aim_hf import AiMConfig, AiMForImageGeneration
from aim_hf.training import AiMTrainer, last_complete_checkpoint, plain_parameter_name, resize_class_embedding

train_script = load_script("train")
sample_script = load_script("sample_fid")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A tiny VQ, 12 images of 3 classes, their codes with flips (24 rows) and a tiny model config."""
    root = tmp_path_factory.mktemp("e2e")
    vq, images = make_vq(root / "vq"), make_images(root / "images")
    assert (
        load_script("prepare_codes").main(prepare_args(images, vq, root / "codes", "--augment", "flip")) == 0
    )
    tiny_config(vocab_size=16, class_dropout_prob=0.1).to_json_file(root / "tiny.json")
    return root


def train_args(root: Path, output: Path, *extra: str) -> list[str]:
    return [
        "--dataset", str(root / "codes"), "--config", str(root / "tiny.json"), "--output_dir", str(output),
        "--max_steps", "20", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
        "--learning_rate", "3e-3", "--logging_steps", "1", "--save_steps", "10", "--seed", "3",
        "--use_cpu", "--disable_tqdm", "true", *extra,
    ]  # fmt: skip


def without_config(args: list[str]) -> list[str]:
    i = args.index("--config")
    return args[:i] + args[i + 2 :]


def losses(log_history: list[dict], after: int = 0) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for e in log_history if "loss" in e and e["step"] > after]


@pytest.fixture(scope="module")
def trained(workdir) -> list[dict]:
    """20 optimizer steps (2 micro-batches each, label dropout 0.1), checkpoints at 10 and 20."""
    return train_script.main(train_args(workdir, workdir / "run")).state.log_history


def test_loss_falls_and_throughput_is_logged(workdir, trained):
    values = [loss for _, loss in losses(trained)]
    assert len(values) == 20
    assert np.mean(values[-5:]) < np.mean(values[:5]) - 0.2
    speeds = [e["tokens_per_second"] for e in trained if "tokens_per_second" in e]
    assert len(speeds) == 19 and min(speeds) > 0  # every training log after the first
    config = json.loads((workdir / "run" / "model" / "config.json").read_text())
    assert (config["num_classes"], config["num_tokens"], config["vocab_size"]) == (3, 16, 16)


def test_resume_repeats_the_uninterrupted_run(workdir, trained):
    """A run killed after checkpoint-10 (and while writing checkpoint-15) and resumed with
    --resume_from_checkpoint latest gives the same losses and weights: same batches, same label dropout."""
    output = workdir / "resumed"
    shutil.copytree(workdir / "run" / "checkpoint-10", output / "checkpoint-10")
    (output / "checkpoint-15").mkdir()
    (output / "checkpoint-15" / "model.safetensors").write_bytes(b"half written")
    assert last_complete_checkpoint(output) == str(output / "checkpoint-10")

    trainer = train_script.main(train_args(workdir, output, "--resume_from_checkpoint", "latest"))
    assert losses(trainer.state.log_history, after=10) == losses(trained, after=10)
    before, after = (load_file(workdir / run / "model" / "model.safetensors") for run in ("run", "resumed"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_resume_refuses_what_would_not_continue_the_run(workdir, tmp_path):
    """Trainer restores the optimizer and the schedule: a resume with another --learning_rate kept
    the old one silently, one from a --save_only_model checkpoint restarted AdamW's moments (no
    longer the uninterrupted run), and --push_to_hub pushed bare checkpoints, never the final model."""
    output = tmp_path / "run"
    short = ("--max_steps", "2", "--save_steps", "2")
    train_script.main(train_args(workdir, output, *short))
    with pytest.raises(
        ValueError, match=r"other settings \(learning_rate: 0.003 then, 0.001 now\).*--init_from"
    ):
        train_script.main(
            train_args(workdir, output, "--learning_rate", "1e-3", "--resume_from_checkpoint", "latest")
        )
    with pytest.raises(ValueError, match=r"another shape \(num_classes: 3 then, 5 now\)"):
        train_script.main(
            train_args(workdir, output, "--num_classes", "5", "--resume_from_checkpoint", "latest")
        )
    with pytest.raises(ValueError, match=r"per-device batch: 4 then, 2 now"):
        train_script.main(
            train_args(
                workdir, output, "--per_device_train_batch_size", "2", "--resume_from_checkpoint", "latest"
            )
        )
    train_script.main(train_args(workdir, tmp_path / "light", *short, "--save_only_model", "true"))
    with pytest.raises(ValueError, match="holds no optimizer state .*--save_only_model"):
        train_script.main(train_args(workdir, tmp_path / "light", "--resume_from_checkpoint", "latest"))
    with pytest.raises(ValueError, match="--push_to_hub is not supported: a hub repo holds a pipeline"):
        train_script.main(
            train_args(workdir, tmp_path / "hub", "--push_to_hub", "true", "--hub_model_id", "me/x")
        )
    assert not (tmp_path / "hub").exists()


def test_an_eval_dataset_is_evaluated_without_an_eval_strategy(workdir, tmp_path):
    """An --eval_dataset without --eval_strategy was loaded and checked, then never evaluated: it
    is evaluated once, after training."""
    trainer = train_script.main(
        train_args(
            workdir,
            tmp_path / "run",
            "--max_steps",
            "2",
            "--save_steps",
            "2",
            "--eval_dataset",
            str(workdir / "codes"),
        )
    )
    assert [e["step"] for e in trainer.state.log_history if "eval_loss" in e] == [2]


def test_activation_checkpointing_gives_the_same_steps(workdir, trained):
    output = workdir / "checkpointed"
    args = train_args(workdir, output, "--activation_checkpointing", "--save_strategy", "no")
    args[args.index("--max_steps") + 1] = "2"
    got = losses(train_script.main(args).state.log_history)
    expected = losses(trained)[:2]
    assert [s for s, _ in got] == [1, 2] and np.allclose(
        [v for _, v in got], [v for _, v in expected], atol=1e-5
    )


def test_finetune_from_saved_model_to_more_classes(workdir, trained):
    """--init_from with --num_classes 5: old rows kept, null row moved, new rows at the mean (a
    zero learning rate leaves the resized embedding as it was initialised)."""
    output = workdir / "finetuned"
    args = train_args(workdir, output, "--init_from", str(workdir / "run" / "model"), "--num_classes", "5")
    args[args.index("--max_steps") + 1], args[args.index("--learning_rate") + 1] = "1", "0"
    train_script.main(args)
    old = load_file(workdir / "run" / "model" / "model.safetensors")["model.embed_classes.weight"]
    new = load_file(output / "model" / "model.safetensors")["model.embed_classes.weight"]
    assert new.shape == (6, old.shape[1])
    assert torch.equal(new[:3], old[:3]) and torch.equal(new[5], old[3])
    assert torch.allclose(new[3], old[:3].mean(0)) and torch.allclose(new[4], old[:3].mean(0))
    assert json.loads((output / "model" / "config.json").read_text())["num_classes"] == 5


def test_finetune_on_other_named_classes_needs_num_classes(workdir, trained, tmp_path):
    """--init_from a model of 3 classes on a dataset of 4 named ones: without --num_classes it
    trained the old classes and kept their names; with it, the new names replace the old."""
    codes = datasets.load_from_disk(str(workdir / "codes"))
    names = ["circle", "square", "triangle", "star"]
    codes.cast_column("label", datasets.ClassLabel(names=names)).save_to_disk(str(tmp_path / "shapes"))
    base = tmp_path / "base"
    model = AiMForImageGeneration.from_pretrained(workdir / "run" / "model")
    model.config.id2label = {0: "red", 1: "green", 2: "blue"}
    model.save_pretrained(base)
    args = train_args(
        workdir, tmp_path / "out", "--init_from", str(base), "--dataset", str(tmp_path / "shapes")
    )
    args[args.index("--max_steps") + 1] = "1"
    with pytest.raises(
        ValueError,
        match=r"the dataset has 4 classes \(circle, square, triangle, star\) and the --init_from model 3; pass --num_classes 4",
    ):
        train_script.main(args)
    train_script.main([*args, "--num_classes", "4"])
    config = AiMForImageGeneration.from_pretrained(tmp_path / "out" / "model").config
    assert config.id2label == dict(enumerate(names))
    resized = AiMForImageGeneration.from_pretrained(base)
    resize_class_embedding(resized, 5)  # on data without names: no stale names of the old classes
    assert resized.config.id2label == {i: f"LABEL_{i}" for i in range(5)}


def test_class_names_of_the_dataset_go_into_the_config(workdir, tmp_path):
    codes = datasets.load_from_disk(str(workdir / "codes"))
    names = ["red", "green", "blue"]
    codes.cast_column("label", datasets.ClassLabel(names=names)).save_to_disk(str(tmp_path / "named"))
    args = train_args(workdir, tmp_path / "out")
    args[args.index("--dataset") + 1], args[args.index("--max_steps") + 1] = str(tmp_path / "named"), "1"
    train_script.main(args)
    config = AiMForImageGeneration.from_pretrained(tmp_path / "out" / "model").config
    assert config.id2label == {0: "red", 1: "green", 2: "blue"} and config.label2id["blue"] == 2
    wordnet = [f"n{i:08d}" for i in range(1000)]
    imagenet = AiMConfig(num_classes=1000)
    train_script.name_classes(imagenet, datasets.ClassLabel(names=wordnet))
    assert imagenet.id2label == AiMConfig(num_classes=1000).id2label  # left to the pipeline's ImageNet names
    subset = AiMConfig(num_classes=2)  # a subset has no readable names but its ids (it had none)
    train_script.name_classes(subset, datasets.ClassLabel(names=["n01440764", "n01443537"]))
    assert subset.id2label == {0: "n01440764", 1: "n01443537"}


def test_accumulated_uneven_batches_weigh_every_code_alike(tmp_path):
    """Trainer passes num_items_in_batch: micro-batches of 3 and 1 rows accumulated into one step
    give the step of one batch of 4 (the loss over all codes; it was the mean of the two
    micro-batch means, which weighs the lone row three times as much). Masked (-100) codes count
    for nothing. float32, the two differ in summation order only: 1e-5 of the weight change."""
    config = tiny_config(class_dropout_prob=0.0)
    torch.manual_seed(0)
    codes = torch.randint(0, config.vocab_size, (4, config.num_tokens))
    codes[3, 5:] = -100  # a row whose last codes are masked (the model never sees -100 as input)
    rows = datasets.Dataset.from_dict({"codes": codes.clamp(min=0).tolist(), "targets": codes.tolist(),
                                       "label": [0, 1, 2, 3]})  # fmt: skip

    def collate(batch):
        return {
            "input_ids": torch.tensor([r["codes"] for r in batch]),
            "class_labels": torch.tensor([r["label"] for r in batch]),
            "labels": torch.tensor([r["targets"] for r in batch]),
        }

    def step(batch: int, accumulation: int) -> dict[str, torch.Tensor]:
        model = randomize(AiMForImageGeneration(config), seed=1)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        args = TrainingArguments(
            output_dir=str(tmp_path / f"b{batch}"), per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd", learning_rate=1.0,
            lr_scheduler_type="constant", use_cpu=True, report_to=[], save_strategy="no",
            remove_unused_columns=False, disable_tqdm=True, seed=0,
        )  # fmt: skip
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
        assert trainer.model_accepts_loss_kwargs
        trainer.train()
        return {k: v - before[k] for k, v in model.state_dict().items()}

    whole, accumulated = step(4, 1), step(3, 2)
    change = torch.cat([d.flatten() for d in whole.values()])
    difference = torch.cat([accumulated[k].flatten() - d.flatten() for k, d in whole.items()])
    assert change.norm() > 0 and (difference.norm() / change.norm()).item() < 1e-5


def test_resize_class_embedding_shrinks_and_keeps_the_null_row():
    model = AiMForImageGeneration(tiny_config())
    old = model.model.embed_classes.weight.detach().clone()
    resize_class_embedding(model, 2)
    assert model.config.num_classes == 2 and model.config.null_class == 2
    assert torch.equal(model.model.embed_classes.weight[:2], old[:2])
    assert torch.equal(model.model.embed_classes.weight[2], old[5])
    model(torch.zeros(1, 16, dtype=torch.long), torch.tensor([1]))  # the resized model runs
    with pytest.raises(ValueError, match="class label 2 is outside"):
        model.generate([2])
    with pytest.raises(ValueError, match="num_classes must be a positive integer, got 0"):
        resize_class_embedding(model, 0)


def test_weight_decay_applies_to_exactly_the_matrices(tmp_path):
    _, args = train_script.parse_args(
        ["--dataset", str(tmp_path), "--output_dir", str(tmp_path), "--use_cpu"]
    )
    assert (args.adam_beta1, args.adam_beta2, args.weight_decay) == (0.9, 0.95, 0.05)
    model = AiMForImageGeneration(tiny_config())
    optimizer = AiMTrainer(model=model, args=args).create_optimizer()
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.05 for p in g["params"]}
    plain = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    params = dict(model.named_parameters())
    assert decayed == {id(p) for p in params.values() if p.dim() >= 2}
    assert plain == {id(p) for p in params.values() if p.dim() < 2}
    # Trainer's name-based default would decay these vectors and spare none of the matrices listed
    assert {
        id(params[n]) for n in ("model.layers.0.mixer.A_log", "model.layers.0.mixer.D", "model.norm_f.weight")
    } <= plain
    assert (
        id(params["model.layers.0.adaln_table"]) in decayed
        and id(params["model.embed_classes.weight"]) in decayed
    )
    assert optimizer.defaults["betas"] == (0.9, 0.95)
    assert plain_parameter_name(
        "module._fsdp_wrapped_module.model.layers.0._checkpoint_wrapped_module.norm.weight"
    ) == ("model.layers.0.norm.weight")


def test_train_rejects_bad_input_before_training(workdir, tmp_path):
    output = tmp_path / "run"
    with pytest.raises(ValueError, match="no codes column 'tokens'.*--codes_column"):
        train_script.main(train_args(workdir, output, "--codes_column", "tokens"))
    small = tmp_path / "small.json"
    tiny_config(vocab_size=8).to_json_file(small)
    with pytest.raises(ValueError, match=r"outside the codebook \[0, 8\)"):
        train_script.main(train_args(workdir, output, "--config", str(small)))
    with pytest.raises(ValueError, match=r"labels range over \[0, 2\], outside \[0, num_classes=2\)"):
        train_script.main(train_args(workdir, output, "--num_classes", "2"))
    with pytest.raises(ValueError, match="unknown --preset 'AiM-XXL'; allowed"):
        train_script.main(without_config(train_args(workdir, output, "--preset", "AiM-XXL")))
    with pytest.raises(FileNotFoundError, match="--init_from .*nowhere does not exist"):
        train_script.main(train_args(workdir, output, "--init_from", str(tmp_path / "nowhere")))
    rows = len(datasets.load_from_disk(str(workdir / "codes")))  # it saved an untrained model, 0 steps
    with pytest.raises(
        ValueError, match=f"--dataloader_drop_last with {rows} rows and batches of {rows + 1}"
    ):
        train_script.main(
            train_args(
                workdir,
                output,
                "--per_device_train_batch_size",
                str(rows + 1),
                "--dataloader_drop_last",
                "true",
            )
        )
    with pytest.raises(ValueError, match="--remove_unused_columns must stay False"):
        train_script.main(train_args(workdir, output, "--remove_unused_columns", "true"))
    codes = datasets.load_from_disk(str(workdir / "codes"))
    names = codes.cast_column("label", datasets.Value("string")).map(
        lambda row: {"label": "x" + row["label"]}
    )
    names.save_to_disk(str(tmp_path / "names"))  # a model is built from it only once it is checked
    with pytest.raises(ValueError, match="label column 'label' has type Value.*allowed: ClassLabel"):
        train_script.main(train_args(workdir, output, "--dataset", str(tmp_path / "names")))
    assert not output.exists()


# ---------------------------------------------------------------- sample_fid.py


def sample_args(root: Path, *extra: str) -> list[str]:
    return [
        "--model", str(root / "run" / "model"), "--vqvae", str(root / "vq"), "--output", str(root / "samples"),
        "--num-images", "5", "--batch-size", "2", "--base-seed", "7", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def sampled(workdir, trained) -> Path:
    assert sample_script.main(sample_args(workdir)) == {}
    return workdir / "samples"


def test_samples_npz_and_per_image_resume(sampled):
    archive = np.load(sampled.with_name("samples.npz"))
    assert list(archive.keys()) == ["arr_0"]
    images = archive["arr_0"]
    assert images.shape == (5, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.uint8
    pngs = sorted(p.name for p in sampled.glob("*.png"))
    assert pngs == [f"{i:06d}.png" for i in range(5)]

    # Lose two images (as a killed run would), resample with another batch split: same images.
    kept = {i: (sampled / f"{i:06d}.png").read_bytes() for i in (1, 3)}
    for i in kept:
        (sampled / f"{i:06d}.png").unlink()
    (sampled / ".000004.png.tmp-999999").write_bytes(b"half a png")
    sample_script.main(sample_args(sampled.parent, "--batch-size", "3"))
    assert all((sampled / f"{i:06d}.png").read_bytes() == data for i, data in kept.items())
    assert np.array_equal(np.load(sampled.with_name("samples.npz"))["arr_0"], images)
    assert not list(sampled.glob(".*"))
    with pytest.raises(ValueError, match="other settings.*top_k: 0 then, 5 now"):
        sample_script.main(sample_args(sampled.parent, "--top-k", "5"))


def test_samples_of_a_model_retrained_in_place_are_not_mixed(workdir, sampled, tmp_path):
    """The model was known by its path only: training on into the same folder and sampling more
    images into the same --output mixed the two models' images in one .npz."""
    model = tmp_path / "model"
    shutil.copytree(workdir / "run" / "model", model)
    args = [*sample_args(workdir, "--model", str(model)), "--output", str(tmp_path / "samples")]
    sample_script.main([*args, "--num-images", "2"])
    retrained = AiMForImageGeneration.from_pretrained(model)
    with torch.no_grad():
        retrained.lm_head.weight.mul_(1.5)
    retrained.save_pretrained(model)
    with pytest.raises(ValueError, match="other settings .*weights: '[0-9a-f]{64}' then, '[0-9a-f]{64}' now"):
        sample_script.main(args)


def test_metrics_use_local_weights_and_the_reference(sampled, tmp_path, monkeypatch):
    calls = []

    def calculate_metrics(**kwargs):
        calls.append(kwargs)
        return {"inception_score_mean": 1.5, "frechet_inception_distance": 12.0}

    monkeypatch.setitem(
        sys.modules, "torch_fidelity", types.SimpleNamespace(calculate_metrics=calculate_metrics)
    )
    weights, reference = tmp_path / "inception.pth", tmp_path / "ref.npz"
    weights.write_bytes(b"weights")
    np.savez(reference, arr_0=np.full((3, 16, 16, 3), 9, dtype=np.uint8))
    extra = ("--inception-weights", str(weights), "--reference", str(reference))
    metrics = sample_script.main(sample_args(sampled.parent, *extra))

    assert metrics["frechet_inception_distance"] == 12.0
    assert json.loads((sampled / "metrics.json").read_text()) == metrics
    (call,) = calls
    assert call["feature_extractor_weights_path"] == str(weights) and call["datasets_download"] is False
    assert call["isc"] and call["fid"] and call["cache"] is False
    generated, ref = call["input1"], call["input2"]
    assert len(generated) == 5 and generated[0].dtype == torch.uint8 and generated[0].shape == (3, 8, 8)
    assert torch.equal(
        generated[2].permute(1, 2, 0), torch.from_numpy(np.load(sampled.with_name("samples.npz"))["arr_0"][2])
    )
    assert len(ref) == 3 and ref[0].shape == (3, 16, 16) and int(ref[0][0, 0, 0]) == 9
    assert metrics["num_images"] == 5
    sample_script.main(sample_args(sampled.parent))  # the same images, no metrics asked: kept
    assert json.loads((sampled / "metrics.json").read_text()) == metrics
    sample_script.main(sample_args(sampled.parent, "--num-images", "6"))  # another set: they go
    assert not (sampled / "metrics.json").exists()


def test_a_failed_png_write_stops_sampling(workdir, trained, tmp_path, monkeypatch):
    """PNGs are written on threads beside sampling; an error there is not lost with its thread."""
    write_png = sample_script.write_png

    def failing(path, pixels):
        if path.name == "000002.png":
            raise OSError(f"disk full writing {path.name}")
        write_png(path, pixels)

    monkeypatch.setattr(sample_script, "write_png", failing)
    with pytest.raises(OSError, match="disk full writing 000002.png"):
        sample_script.main(sample_args(workdir, "--output", str(tmp_path / "s"), "--png-workers", "2"))
    assert not (tmp_path / "s" / "000002.png").exists() and not (tmp_path / "s.npz").exists()


def test_sample_fid_rejects_bad_arguments_before_sampling(workdir, trained, tmp_path, capsys):
    def refused(message: str, *extra: str) -> None:
        with pytest.raises(SystemExit) as exit_info:
            sample_script.main(sample_args(workdir, "--output", str(tmp_path / "s"), *extra))
        assert exit_info.value.code == 2 and message in capsys.readouterr().err

    refused("--num-images: must be a positive integer, got 0", "--num-images", "0")
    refused("--png-workers: must be a positive integer, got 0", "--png-workers", "0")
    (tmp_path / "s.npz").write_bytes(b"an earlier run's arrays")
    # it was a FileExistsError from mkdir, after loading the model
    refused("is a file; it names the folder of PNGs", "--output", str(tmp_path / "s.npz"))
    assert (tmp_path / "s.npz").read_bytes() == b"an earlier run's arrays"
    (tmp_path / "s.npz").unlink()
    refused("--reference needs --inception-weights", "--reference", str(tmp_path))
    # sampling settings and the tokenizer's path: they were checked after loading the model
    refused("top_p must be in (0, 1] (1 disables it), got 1.5", "--top-p", "1.5")
    refused("temperature must be a finite number > 0, got 0.0", "--temperature", "0")
    refused(f"--vqvae {tmp_path / 'nowhere'} does not exist", "--vqvae", str(tmp_path / "nowhere"))
    assert not (tmp_path / "s").exists()


def test_final_save_keeps_tied_weights_once(tmp_path, monkeypatch):
    """FSDP's gathered state dict holds the tied output weight as a copy of the code embedding;
    the final save drops it as an unsharded save does, and the saved model loads tied."""
    _, args = train_script.parse_args(
        ["--dataset", str(tmp_path), "--output_dir", str(tmp_path), "--use_cpu"]
    )
    model = randomize(AiMForImageGeneration(tiny_config()))
    trainer = AiMTrainer(model=model, args=args)
    gathered = {k: v.clone() for k, v in model.state_dict().items()}  # separate tensors, as gathered
    assert "lm_head.weight" in gathered
    monkeypatch.setattr(trainer.accelerator, "get_state_dict", lambda _: dict(gathered))
    trainer.save_final_model(tmp_path / "model")
    saved = load_file(tmp_path / "model" / "model.safetensors")
    assert "lm_head.weight" not in saved and "model.embed_tokens.weight" in saved
    loaded = AiMForImageGeneration.from_pretrained(tmp_path / "model")
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_final_save_keeps_an_untied_output_layer(tmp_path):
    _, args = train_script.parse_args(
        ["--dataset", str(tmp_path), "--output_dir", str(tmp_path), "--use_cpu"]
    )
    model = randomize(AiMForImageGeneration(tiny_config(tie_word_embeddings=False)))
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    AiMTrainer(model=model, args=args).save_final_model(tmp_path / "model")
    loaded = AiMForImageGeneration.from_pretrained(tmp_path / "model")
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
