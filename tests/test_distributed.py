"""DDP training is one-process training with the same global batch: scripts/train.py launched with
``torch.distributed.run`` on two processes (per-process batch B) logs the same losses and gradient
norms, step by step, and ends with the same weights as plain ``python scripts/train.py`` (one
process) with batch 2B.

Why the global batches agree: Trainer's sampler (accelerate's SeedableRandomSampler, seeded by
--seed) draws the same permutation in every process and in the one-process run; accelerate's
BatchSamplerShard then gives rank r the B-sized batches r, r + 2, r + 4, ... of it, so the two ranks'
micro-batches together are the 2B consecutive examples that form the one-process micro-batch. The
loss is a mean over equally many tokens per rank and DDP averages the gradients, so each step sees
the mean over the same 2B examples either way; label dropout is 0, so no random draw can differ.

On the CPU this runs with gloo (the stand-in for the GPU check); on a machine with two GPUs the
``gpu`` case runs the same two launches with NCCL:

    OMP_NUM_THREADS=1 python -m pytest tests/test_distributed.py -m gpu -s

The same comparison with FSDP2 (``--fsdp``) needs two GPUs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file
from test_training import train_args, workdir  # noqa: F401 (fixture)

BATCH = 2  # per process; with train_args' 2 micro-batches a step takes 8 of workdir's 24 rows
STEPS = 6  # two epochs: the second epoch's reshuffle is compared too

# Tolerances, relative for the logged loss and gradient norm, absolute for the weights (which are
# O(1)). CPU, float32: the two runs differ only in summation order (each rank's mean, averaged by the
# all-reduce, vs one mean over the batch), a few float32 ulps (1.2e-7) per reduction. Measured over
# these 6 steps: loss 2.2e-7, grad norm 7e-8 relative, weights 5e-7 (AdamW divides each gradient by
# its own running size, so a rounding difference in a small gradient moves its weight by up to lr
# times its relative size); the bounds are about ten times that. Another shuffle (--data_seed) for
# the two-process run alone changed the losses by 2e-4 to 2e-2, and a gradient summed instead of
# averaged doubles the gradient norm. GPU: a batch of B vs 2B picks other cuBLAS kernels and the
# embedding backward adds atomically, still float32 rounding but more of it. Measured on two H100s
# with NCCL (2026-11-26, benchmarks/2026-11-26-h100x2-ddp.log): loss 1.0e-7, grad norm 6.9e-8,
# weights 2.2e-6; the bounds are again about ten times that.
TOLERANCE = {"cpu": (2e-6, 5e-6), "cuda": (1e-6, 2e-5)}


def launch(root: Path, output: Path, processes: int, batch: int, device: str, *extra: str) -> list[dict]:
    """scripts/train.py as documented: ``python`` for one process, ``torch.distributed.run`` for
    more; the training logs of its last checkpoint."""
    args = train_args(root, output, "--class_dropout_prob", "0", *extra)
    for flag, value in (
        ("--max_steps", STEPS),
        ("--save_steps", STEPS),
        ("--per_device_train_batch_size", batch),
    ):
        args[args.index(flag) + 1] = str(value)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if device == "cuda":
        args.remove("--use_cpu")
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, range(processes)))  # no DataParallel on one
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = [
        sys.executable,
        *(launcher if processes > 1 else []),
        str(REPO / "scripts" / "train.py"),
        *args,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    state = json.loads((output / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    return [e for e in state["log_history"] if "loss" in e]


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"),
            ],
        ),
    ],
)
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(workdir, tmp_path, device):  # noqa: F811
    one = launch(workdir, tmp_path / "one", 1, 2 * BATCH, device)
    two = launch(workdir, tmp_path / "two", 2, BATCH, device)
    assert_same_training(one, two, tmp_path, device)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_process_fsdp_matches_one_process(workdir, tmp_path):  # noqa: F811
    """FSDP2 through Trainer (``--fsdp`` with the settings in fsdp_config; ``--fsdp full_shard`` is
    deprecated in transformers 5; the model names AiMBlock as its shard unit):
    sharded parameters, gradients and AdamW state, then the weights gathered by train.py, the same
    as one unsharded process with the same global batch. GPU only: accelerate turns FSDP on only
    for GPU backends and silently trains plain DDP on the CPU, so the test also checks that the
    checkpoint was written by FSDP."""
    fsdp = tmp_path / "fsdp.json"
    fsdp.write_text(json.dumps({"version": 2}))
    one = launch(workdir, tmp_path / "one", 1, 2 * BATCH, "cuda")
    two = launch(workdir, tmp_path / "two", 2, BATCH, "cuda", "--fsdp", "--fsdp_config", str(fsdp))
    assert any("fsdp" in path.name for path in (tmp_path / "two" / f"checkpoint-{STEPS}").iterdir())
    assert_same_training(one, two, tmp_path, "cuda")


def assert_same_training(one: list[dict], two: list[dict], runs: Path, device: str) -> None:
    """Same steps, logged losses and gradient norms within the tolerances, same final weights."""
    # the same steps over the same fraction of the data: two processes shared each global batch
    assert [(e["step"], e["epoch"]) for e in two] == [(e["step"], e["epoch"]) for e in one]
    assert [e["step"] for e in one] == list(range(1, STEPS + 1)) and one[-1]["epoch"] == 2
    logged, weights = TOLERANCE[device]
    for key in ("loss", "grad_norm"):
        expected, got = np.array([e[key] for e in one]), np.array([e[key] for e in two])
        worst = np.max(np.abs(got - expected) / np.abs(expected))
        print(f"{device} {key}: largest relative difference {worst:.2e}")
        assert worst < logged, f"{key}: one process {expected}, two {got}"
    final = [load_file(runs / run / "model" / "model.safetensors") for run in ("one", "two")]
    assert final[0].keys() == final[1].keys()
    worst = max((final[0][k] - final[1][k]).abs().max().item() for k in final[0])
    print(f"{device} weights: largest difference {worst:.2e}")
    assert worst < weights
