"""The benchmark scripts on the CPU: scripts/benchmark.py's floor, which every "x floor" in
BENCHMARKS.md divides by, worked out here from the config's sizes; scripts/benchmark.py and
scripts/benchmark_training.py (issue #6's throughput benchmark) refuse bad arguments and a machine
without CUDA before any work (their timings need a GPU)."""

from __future__ import annotations

import json

import PIL.Image
import pytest
import torch
from conftest import load_script, tiny_config

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
    "script, argv, message",
    [
        ("benchmark", ["--batch-sizes", "0"], "must be a positive integer, got 0"),
        ("benchmark", ["--baseline-batch-sizes", "-4"], "must be a positive integer, got -4"),
        ("benchmark", ["--repeats", "0"], "must be a positive integer, got 0"),
        ("benchmark", ["--presets", "AiM-S"], "invalid choice: 'AiM-S'"),
        ("benchmark", ["--caches", "ring"], "invalid choice: 'ring'"),
        ("benchmark", ["--guidance-scale", "-1"], "must be a finite number >= 0"),
        ("benchmark_training", ["--batch-sizes", "AiM-Q=8"], "'AiM-Q=8': expected PRESET=N with PRESET in"),
        ("benchmark_training", ["--batch-sizes", "AiM-B=0"], "'AiM-B=0': expected PRESET=N"),
        ("benchmark_training", ["--steps", "0"], "must be a positive integer, got 0"),
        ("benchmark_training", ["--mixers", "triton"], "invalid choice: 'triton'"),
        ("benchmark_training", ["--presets", "AiM-S"], "invalid choice: 'AiM-S'"),
    ],
    ids=[
        "zero-batch",
        "negative-baseline",
        "zero-repeats",
        "unknown-preset",
        "unknown-cache",
        "negative-guidance",
        "training-unknown-preset-batch",
        "training-zero-batch",
        "training-zero-steps",
        "training-unknown-mixer",
        "training-unknown-preset",
    ],
)
def test_benchmarks_reject_bad_arguments(script, argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        load_script(script).main([*argv, "--json", str(tmp_path / "bench.json")])
    assert message in capsys.readouterr().err and not (tmp_path / "bench.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize(
    "script, argv", [("benchmark", ["--presets", "AiM-B"]), ("benchmark_training", ["--mixers", "pytorch"])]
)
def test_benchmarks_refuse_to_run_without_cuda(script, argv, tmp_path, capsys):
    with pytest.raises(SystemExit):
        load_script(script).main([*argv, "--json", str(tmp_path / "b.json")])
    assert "needs a CUDA GPU; none is visible here" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()


def test_plot_takes_every_preset(tmp_path):
    """scripts/plot_benchmark.py ordered the panels by the original's presets and failed on AiM-1B,
    which scripts/benchmark.py measures (and which the original has no figures for)."""
    rows = [
        {"preset": preset, "mode": "graph-auto", "batch": batch, "images_per_s": rate * batch}
        for preset, rate in (("AiM-1B", 1.0), ("AiM-B", 4.0))
        for batch in (1, 16)
    ]
    result = tmp_path / "r.json"
    result.write_text(json.dumps({"device": "H100", "date": "2026-11-28", "rows": rows}))
    load_script("plot_benchmark").main([str(tmp_path / "plot.png"), str(result)])
    with PIL.Image.open(tmp_path / "plot.png") as image:
        assert image.format == "PNG" and image.size[0] > image.size[1]  # two panels side by side


@pytest.mark.parametrize("script", ["benchmark", "benchmark_training", "plot_benchmark"])
def test_result_paths_are_checked_before_any_work(script, tmp_path, capsys):
    """--json (or the plot) naming a folder was replaced by the file after the whole run (its files
    lost), and a missing folder failed only then."""
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "old.json").write_text("{}")
    for path, message in [
        (folder, "is a folder; name a file"),
        (tmp_path / "no" / "b.json", "its folder does not exist"),
    ]:
        argv = [str(path), str(folder / "old.json")] if script == "plot_benchmark" else ["--json", str(path)]
        with pytest.raises(SystemExit) as exit_info:
            load_script(script).main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert (folder / "old.json").read_text() == "{}"
