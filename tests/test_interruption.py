"""Killed, not stopped: scripts/prepare_codes.py, train.py and sample_fid.py each run as a subprocess
and get SIGKILL as soon as they have made visible progress (a finished shard, a complete checkpoint,
a PNG). The same command then finishes the job, and the result must equal an uninterrupted run's:
the same rows in the same order, bitwise the same weights and losses, the same PNG bytes and .npz.
No temporary or half-written file may remain.

A kill lands wherever the process happens to be, so besides the polled kill point each test adds the
debris of kill points that polling cannot hit on purpose (inside a rename-into-place, inside the
final save) and checks that the rerun clears it. If a run finishes before it can be killed, it is
repeated with more work; a run that cannot be killed mid-way fails the test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import REPO, load_script, tiny_config
from safetensors.torch import load_file
from test_data import make_images, prepare_args
from test_training import sample_script, train_args, train_script, workdir  # noqa: F401 (fixture)

from aim_hf import AiMForImageGeneration
from aim_hf.training import last_complete_checkpoint

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
ATTEMPTS = 3  # each attempt after the first has four times the work
DEAD = "999999"  # the process id in the names of debris: a process that no longer runs


def script(name: str) -> list[str]:
    return [sys.executable, str(REPO / "scripts" / f"{name}.py")]


def kill_at_first_progress(command: list[str], progress: Callable[[], bool], log: Path) -> bool:
    """Run ``command`` and SIGKILL it the moment ``progress()`` holds. True if it was killed, False if
    it exited (successfully) first."""
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=ENV, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        try:
            while process.poll() is None:
                if progress():
                    process.kill()  # SIGKILL: no handler, no cleanup, no flush
                    break
                if time.monotonic() > deadline:
                    pytest.fail(f"no progress in 120 s: {command}\n{log.read_text()[-3000:]}")
                time.sleep(0.005)
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
    if process.returncode == -signal.SIGKILL:
        return True
    assert process.returncode == 0, log.read_text()[-3000:]
    return False


def finish(command: list[str], log: Path) -> None:
    """Run the interrupted command again, to completion."""
    with log.open("wb") as out:
        run = subprocess.run(command, env=ENV, stdout=out, stderr=subprocess.STDOUT, timeout=300)
    assert run.returncode == 0, log.read_text()[-3000:]


def interrupt(
    make_command: Callable[[Path, int], list[str]],
    progress: Callable[[Path], bool],
    midway: Callable[[Path, int], bool],
    root: Path,
) -> tuple[Path, int, list[str]]:
    """Kill ``make_command(folder, work)`` at its first progress, with work 1, 4, 16 until the kill
    leaves it mid-way (``midway(folder, work)``: progress made and some left). Returns the folder,
    the work and the command."""
    for attempt in range(ATTEMPTS):
        folder, work = root / f"attempt{attempt}", 4**attempt
        folder.mkdir()
        command = make_command(folder, work)
        killed = kill_at_first_progress(command, partial(progress, folder), folder / "killed.log")
        if killed and midway(folder, work):
            return folder, work, command
    pytest.fail(f"could not kill {command[1]} mid-way in {ATTEMPTS} attempts: it got too far first")


def dot_files(folder: Path) -> list[str]:
    """Temporaries of atomic_path (.NAME.tmp-PID, .NAME.old-PID) and any other hidden debris."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*"))


# ---------------------------------------------------------------- prepare_codes.py


def test_prepare_codes_killed_after_a_shard_resumes_to_the_same_rows(tmp_path, workdir):  # noqa: F811
    def command(folder: Path, work: int) -> list[str]:
        images = make_images(folder / "images", count=48 * work)  # one shard per image
        args = prepare_args(images, workdir / "vq", folder / "out" / "codes", "--augment", "ten-crop")
        return [*script("prepare_codes"), *args, "--shard-size", "1"]

    def shards(folder: Path) -> list[Path]:
        return sorted((folder / "out" / "codes.work").glob("shard-*"))

    def midway(folder: Path, work: int) -> bool:
        return not (folder / "out" / "codes").exists() and 1 <= len(shards(folder)) < 48 * work

    folder, work, args = interrupt(command, lambda f: bool(shards(f)), midway, tmp_path)
    out = folder / "out"
    # what kills inside a shard's or the output's rename-into-place leave
    (out / "codes.work" / f".shard-999990.tmp-{DEAD}").mkdir()
    (out / f".codes.tmp-{DEAD}").mkdir()
    (out / f".codes.tmp-{DEAD}" / "data-00000-of-00001.arrow").write_bytes(b"half a dataset")
    finish(args, folder / "resumed.log")

    reference = tmp_path / "reference"
    reference_args = args[2:]
    reference_args[reference_args.index("--output") + 1] = str(reference)
    assert load_script("prepare_codes").main(reference_args) == 0
    resumed, expected = datasets.load_from_disk(str(out / "codes")), datasets.load_from_disk(str(reference))
    assert resumed.features == expected.features and len(resumed) == len(expected) == 480 * work
    assert resumed["codes"] == expected["codes"] and resumed["label"] == expected["label"]
    assert sorted(p.name for p in out.iterdir()) == ["codes"]  # no work folder, no temporaries
    assert dot_files(out) == []


def test_prepare_codes_clears_a_work_folder_a_kill_left_after_the_output(tmp_path, workdir):  # noqa: F811
    """Killed while deleting OUTPUT.work after OUTPUT was complete: the rerun deletes the rest."""
    shutil.copytree(workdir / "codes", tmp_path / "codes")
    (tmp_path / "codes.work" / "shard-000001").mkdir(parents=True)
    (tmp_path / "codes.work" / "shard-000001" / "state.json").write_text("{}")
    args = prepare_args(workdir / "images", workdir / "vq", tmp_path / "codes", "--augment", "flip")
    assert load_script("prepare_codes").main(args) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["codes"]


# ---------------------------------------------------------------- train.py


def checkpoint_steps(folder: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in folder.glob("checkpoint-*"))


def logged_losses(checkpoint: Path) -> list[tuple[int, float]]:
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return [(e["step"], e["loss"]) for e in history if "loss" in e]


def test_train_killed_after_a_checkpoint_resumes_to_the_same_weights(tmp_path, workdir):  # noqa: F811
    def command(folder: Path, work: int) -> list[str]:
        args = train_args(workdir, folder / "run", "--resume_from_checkpoint", "latest")
        args[args.index("--max_steps") + 1] = str(40 * work)
        return [*script("train"), *args]

    def progress(folder: Path) -> bool:
        return any((folder / "run").glob("checkpoint-*/trainer_state.json"))

    def midway(folder: Path, work: int) -> bool:
        latest = last_complete_checkpoint(folder / "run")
        return (
            latest is not None
            and not (folder / "run" / "model").exists()
            and int(Path(latest).name.split("-")[1]) < 40 * work
        )

    folder, work, args = interrupt(command, progress, midway, tmp_path)
    run, max_steps = folder / "run", 40 * work
    killed_at = int(Path(last_complete_checkpoint(run)).name.split("-")[1])
    # what kills inside the next checkpoint (before or while its trainer_state.json is written, the
    # last file Trainer writes) and inside the final save of OUTPUT_DIR/model leave
    half = run / f"checkpoint-{killed_at + 10}"
    shutil.rmtree(half, ignore_errors=True)
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"half written")
    (half / "trainer_state.json").write_text("")
    (run / f".model.tmp-{DEAD}").mkdir()
    (run / f".model.tmp-{DEAD}" / "model.safetensors").write_bytes(b"half written")
    assert last_complete_checkpoint(run) == str(run / f"checkpoint-{killed_at}")
    finish(args, folder / "resumed.log")

    reference_args = args[2:]
    reference_args[reference_args.index("--output_dir") + 1] = str(tmp_path / "reference")
    train_script.main(reference_args)
    expected = load_file(tmp_path / "reference" / "model" / "model.safetensors")
    resumed = load_file(run / "model" / "model.safetensors")
    assert resumed.keys() == expected.keys() and all(torch.equal(resumed[k], expected[k]) for k in expected)
    last = f"checkpoint-{max_steps}"
    assert logged_losses(run / last) == logged_losses(tmp_path / "reference" / last)
    assert len(logged_losses(run / last)) == max_steps
    # every checkpoint complete (the half one was written again), nothing temporary
    assert checkpoint_steps(run) == list(range(10, max_steps + 1, 10))
    for step in checkpoint_steps(run):
        state = json.loads((run / f"checkpoint-{step}" / "trainer_state.json").read_text())
        assert state["global_step"] == step
    assert dot_files(run) == []


# ---------------------------------------------------------------- sample_fid.py


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """An untrained tiny AiM for the tiny VQ (16 codes of a 16-entry codebook, 3 classes)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("aim") / "aim"
    AiMForImageGeneration(tiny_config(vocab_size=16, num_classes=3)).save_pretrained(folder)
    return folder


def test_sample_fid_killed_after_a_png_resumes_to_the_same_images(tmp_path, workdir, model_dir):  # noqa: F811
    def command(folder: Path, work: int) -> list[str]:
        return [
            *script("sample_fid"), "--model", str(model_dir), "--vqvae", str(workdir / "vq"),
            "--output", str(folder / "out" / "samples"), "--num-images", str(10 * work),
            "--batch-size", "1", "--base-seed", "7",
        ]  # fmt: skip

    def pngs(folder: Path) -> list[Path]:
        return sorted((folder / "out" / "samples").glob("*.png"))

    def midway(folder: Path, work: int) -> bool:
        return not (folder / "out" / "samples.npz").exists() and 1 <= len(pngs(folder)) < 10 * work

    folder, work, args = interrupt(command, lambda f: bool(pngs(f)), midway, tmp_path)
    out, samples = folder / "out", folder / "out" / "samples"
    # what kills inside a PNG's or the .npz's rename-into-place leave
    (samples / f".{len(pngs(folder)):06d}.png.tmp-{DEAD}").write_bytes(b"half a png")
    (out / f".samples.npz.tmp-{DEAD}").write_bytes(b"half an npz")
    finish(args, folder / "resumed.log")

    reference = tmp_path / "reference"
    reference_args = args[2:]
    reference_args[reference_args.index("--output") + 1] = str(reference / "samples")
    assert sample_script.main(reference_args) == {}
    names = sorted(p.name for p in (reference / "samples").iterdir())
    assert names == [f"{i:06d}.png" for i in range(10 * work)] + ["sampling.json"]
    assert sorted(p.name for p in samples.iterdir()) == names
    for name in names:
        assert (samples / name).read_bytes() == (reference / "samples" / name).read_bytes(), name
    with np.load(out / "samples.npz") as resumed, np.load(reference / "samples.npz") as expected:
        assert list(resumed.keys()) == list(expected.keys()) == ["arr_0"]
        assert resumed["arr_0"].dtype == np.uint8 and np.array_equal(resumed["arr_0"], expected["arr_0"])
    assert sorted(p.name for p in out.iterdir()) == ["samples", "samples.npz"]
    assert dot_files(out) == []
