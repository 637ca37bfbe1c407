"""aim-generate: grids from the embedded digits model, class selection, seeds, and a clear error
(exit status 2, nothing written) for every bad argument."""

from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import subprocess
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from test_digits import tiny_digits_pipeline
from test_hub import hub_cache  # noqa: F401 (fixture)

from aim_hf.cli import DEFAULT_MODEL, MAX_DEFAULT_CLASSES, class_labels, main
from aim_hf.labels import get_label_ids
from aim_hf.training import resize_class_embedding

SIDE = 32  # the embedded model draws 32x32 digits


def cells(path, rows: int, cols: int) -> np.ndarray:
    """The grid's images, (rows, cols, H, W, 3)."""
    grid = np.asarray(PIL.Image.open(path).convert("RGB"))
    assert grid.shape == (rows * SIDE, cols * SIDE, 3)
    return grid.reshape(rows, SIDE, cols, SIDE, 3).transpose(0, 2, 1, 3, 4)


def test_grid_of_one_class(tmp_path, capsys):
    output = tmp_path / "digits.png"
    main(["--class", "3", "--num-images", "2", "--seed", "0", "--output", str(output)])
    assert cells(output, 1, 2).max() > 200  # white strokes were drawn
    captured = capsys.readouterr()
    assert "64/64" in captured.err  # the pipeline's progress bar over the 64 codes
    assert f"wrote {output}" in captured.out and "guidance" in captured.out
    assert [p.name for p in tmp_path.iterdir()] == ["digits.png"]  # no temporary file left


def test_classes_by_id_comma_list_and_repeat(tmp_path):
    output = tmp_path / "grid.png"
    main(["--class", " 1,2", "--class", "7", "--num-images", "1", "--seed", "5", "--output", str(output)])
    by_list = cells(output, 3, 1)
    for row, digit in enumerate((1, 2, 7)):
        main(["--class", str(digit), "--num-images", "1", "--seed", str(5 + row), "--output", str(output)])
        assert np.array_equal(cells(output, 1, 1)[0, 0], by_list[row, 0])


def test_class_names_with_commas():
    """A model's own class names (id2label, e.g. image-folder names) may hold a comma: a --class
    value that is a whole name is one class (it was split, and the error suggested the very name
    it could not take)."""
    names = ["crane, bird", "crane", "bird"]
    pipe = SimpleNamespace(
        aim=SimpleNamespace(config=SimpleNamespace(num_classes=3)),
        get_label_ids=lambda labels: get_label_ids(labels, names),
    )
    parser = argparse.ArgumentParser()
    assert class_labels(["crane, bird", "2,crane", " bird "], pipe, parser) == [0, 2, 1, 2]


def test_image_i_uses_seed_plus_i(tmp_path):
    """Every image has its own generator, so it depends on its seed alone, not on the batch."""
    pair, single = tmp_path / "pair.png", tmp_path / "single.png"
    main(["--class", "0", "--num-images", "2", "--seed", "10", "--output", str(pair)])
    main(["--class", "0", "--num-images", "1", "--seed", "11", "--output", str(single)])
    assert np.array_equal(cells(pair, 1, 2)[0, 1], cells(single, 1, 1)[0, 0])
    assert not np.array_equal(cells(pair, 1, 2)[0, 0], cells(pair, 1, 2)[0, 1])


def test_every_class_by_default_and_resize(tmp_path):
    output = tmp_path / "all.png"
    main(
        [
            "--num-images",
            "1",
            "--seed",
            "0",
            "--resize",
            "8",
            "--guidance-scale",
            "1",
            "--output",
            str(output),
        ]
    )
    assert PIL.Image.open(output).size == (8, 10 * 8)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--class", "eleven"],
            "--class: unknown class name 'eleven' (classes: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9)",
        ),
        (["--class", "10"], "out of range"),
        (["--class", "1,,2"], "empty class label"),
        (["--num-images", "0"], "--num-images: must be a positive integer"),
        (["--num-images", "two"], "--num-images: invalid positive_int value"),
        (["--guidance-scale", "-1"], "--guidance-scale: must be a finite number >= 0"),
        (["--guidance-scale", "nan"], "--guidance-scale: must be a finite number >= 0"),
        (["--guidance-scale", "1e31"], "--guidance-scale: must be a finite number >= 0 (at most 1e+30"),
        (["--seed", "-1"], "--seed: must be an integer in [0, 2^63)"),
        (["--device", "nonsense"], "--device nonsense"),
        (["--resize", "0"], "--resize: must be a positive integer"),
        (["--output", "{tmp}/grid.jpg"], "--output must name a .png file"),
        (["--output", "{tmp}/missing/grid.png"], "does not exist"),
        (["--model", "{tmp}/no-model"], "cannot load an AiMPipeline"),
        (["--frobnicate"], "unrecognized arguments"),
    ],
)
def test_bad_arguments(tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path) for a in argv]
    if "--output" not in argv:
        argv += ["--output", str(tmp_path / "grid.png")]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "aim-generate: error: " in error and message in error
    assert list(tmp_path.iterdir()) == []


def test_output_naming_a_folder_is_refused(tmp_path, capsys):
    folder = tmp_path / "grid.png"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious")
    with pytest.raises(SystemExit):
        main(["--num-images", "1", "--output", str(folder)])
    assert "is a folder" in capsys.readouterr().err
    assert (folder / "notes.txt").read_text() == "precious"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_absent_cuda_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--device", "cuda", "--output", str(tmp_path / "grid.png")])
    assert "--device cuda" in capsys.readouterr().err


def test_class_required_for_many_classes(tmp_path, capsys):
    pipe = tiny_digits_pipeline()
    resize_class_embedding(pipe.aim, MAX_DEFAULT_CLASSES + 1)
    pipe.save_pretrained(tmp_path / "pipeline")
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path / "pipeline"), "--output", str(tmp_path / "grid.png")])
    assert f"--class is required: the model has {MAX_DEFAULT_CLASSES + 1} classes" in capsys.readouterr().err


@pytest.mark.usefixtures("hub_cache")
def test_uncached_hub_id_offline_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--model", "nobody/no-such-aim", "--output", str(tmp_path / "grid.png")])
    assert "--model nobody/no-such-aim: cannot load an AiMPipeline" in capsys.readouterr().err


def test_console_script(tmp_path):
    (entry_point,) = importlib.metadata.entry_points(group="console_scripts", name="aim-generate")
    assert entry_point.value == "aim_hf.cli:main"
    assert DEFAULT_MODEL.is_dir()
    script = shutil.which("aim-generate")
    if script is None:
        pytest.skip("aim-generate is not on PATH (package not installed in this environment)")
    output = tmp_path / "seven.png"
    run = subprocess.run(
        [script, "--class", "7", "--num-images", "1", "--seed", "0", "--output", str(output)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "wrote" in run.stdout and output.is_file()
