"""scripts/benchmark.py on the CPU: the floor every "x floor" in BENCHMARKS.md divides by, worked
out here from the config's sizes, and the refusals of bad arguments (the timings need a GPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from test_data import load_script

from aim_hf import AiMForImageGeneration


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
def test_floor_counts_the_weights_and_the_cache_bytes_of_each_step(dtype):
    """255 steps for 256 tokens; each reads the weights but the two embedding tables (one row of
    each is gathered), plus the state read and written, or the dual history up to the position
    (x, B in the weights' dtype, dt and the log-decay in float32) and one position appended."""
    config = tiny_config(num_tokens=256)
    model = AiMForImageGeneration(config).to(dtype)
    bandwidth, rows = 1e9, 6
    floors = load_script("benchmark").floor_seconds(model, rows, bandwidth)

    size = dtype.itemsize
    skipped = model.model.embed_positions.weight.numel() + model.model.embed_classes.weight.numel()
    weights = (sum(p.numel() for p in model.parameters()) - skipped) * size
    layers, heads, state = config.num_hidden_layers, config.num_heads, config.state_size
    state_row = layers * heads * config.head_dim * state * size
    position_row = layers * ((heads * config.head_dim + config.n_groups * state) * size + 2 * heads * 4)
    steps = 255
    recurrent = steps * (weights + 2 * rows * state_row) / bandwidth
    dual = (steps * weights + rows * position_row * (steps * (steps + 1) // 2 + steps)) / bandwidth
    assert floors["recurrent"] == pytest.approx(recurrent, rel=1e-12)
    assert floors["dual"] == pytest.approx(dual, rel=1e-12)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch-sizes", "0"], "must be a positive integer, got 0"),
        (["--baseline-batch-sizes", "-4"], "must be a positive integer, got -4"),
        (["--repeats", "0"], "must be a positive integer, got 0"),
        (["--presets", "AiM-S"], "invalid choice: 'AiM-S'"),
        (["--caches", "ring"], "invalid choice: 'ring'"),
        (["--guidance-scale", "-1"], "must be a finite number >= 0"),
    ],
    ids=[
        "zero-batch",
        "negative-baseline",
        "zero-repeats",
        "unknown-preset",
        "unknown-cache",
        "negative-guidance",
    ],
)
def test_benchmark_rejects_bad_arguments(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        load_script("benchmark").main([*argv, "--json", str(tmp_path / "bench.json")])
    assert message in capsys.readouterr().err and not (tmp_path / "bench.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_benchmark_refuses_to_run_without_cuda(tmp_path, capsys):
    with pytest.raises(SystemExit):
        load_script("benchmark").main(["--presets", "AiM-B", "--json", str(tmp_path / "b.json")])
    assert "needs a CUDA GPU; none is visible here" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()
