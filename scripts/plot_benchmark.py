"""Plot scripts/benchmark.py results: images per second against batch size, per preset, with the
original's figures from SPEC §8 (measured on an H200) beside them. Each input is a JSON file,
optionally with the modes to draw from it after a colon (default: every graph mode; "graph-auto",
the cache form the default picks for each batch, is drawn as plain "aim-hf"). Needs matplotlib.

    python scripts/plot_benchmark.py docs/benchmark.png \
        benchmarks/2026-11-26-h100-generation-v4.json:graph-recurrent,graph-dual
"""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

from aim_hf.cli import file_path  # noqa: E402
from aim_hf.configuration_aim import PRESETS  # noqa: E402
from aim_hf.files import atomic_path  # noqa: E402

# SPEC §8: the original's token loop on an H200 (bf16, guidance on), images per second
ORIGINAL_H200 = {
    "AiM-B": {1: 1.7, 4: 6.3, 16: 19.5, 64: 61.6, 256: 120.4},
    "AiM-L": {16: 13.8, 64: 34.2, 256: 52.4},
    "AiM-XL": {1: 0.95, 4: 3.6, 16: 11.6, 64: 25.8, 256: 36.7},
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("output", type=file_path)
    parser.add_argument("inputs", nargs="+", metavar="JSON[:MODE,...]")
    args = parser.parse_args(argv)
    lines = []  # (label: mode, device and date; rows)
    for spec in args.inputs:
        path, _, modes = spec.partition(":")
        result = json.loads(open(path).read())
        wanted = (
            modes.split(",") if modes else sorted({r["mode"] for r in result["rows"] if r["mode"] != "eager"})
        )
        for mode in wanted:
            rows = [r for r in result["rows"] if r["mode"] == mode]
            if not rows:
                parser.error(f"{path} has no rows of mode {mode!r}")
            name = "aim-hf" if mode == "graph-auto" else f"aim-hf {mode}"
            lines.append((f"{name} ({result['device']}, {result['date']})", rows))
    presets = sorted({r["preset"] for _, rows in lines for r in rows}, key=list(PRESETS).index)
    # one colour a (mode, device, date) in every panel; files of one device and date share it
    colors = {label: f"C{i}" for i, label in enumerate(dict.fromkeys(label for label, _ in lines))}
    plain = ticker.FuncFormatter(lambda value, _: f"{value:g}")
    fig, axes = plt.subplots(1, len(presets), figsize=(5 * len(presets), 4.6), squeeze=False)
    for ax, preset in zip(axes[0], presets):
        for label, rows in lines:
            mine = sorted((r["batch"], r["images_per_s"]) for r in rows if r["preset"] == preset)
            if mine:
                shown = label in ax.get_legend_handles_labels()[1]
                ax.plot(*zip(*mine), "o-", color=colors[label], label=None if shown else label)
        original = sorted(ORIGINAL_H200.get(preset, {}).items())
        if original:
            ax.plot(*zip(*original), "s--", color="0.4", label="original (H200, SPEC §8)")
        ax.set(xscale="log", yscale="log", xlabel="batch (images, guidance on)", ylabel="images / s",
               title=f"{preset}, bf16, 256 tokens")  # fmt: skip
        batches = sorted({b for line in ax.get_lines() for b in line.get_xdata()})
        ax.xaxis.set_major_locator(ticker.FixedLocator(batches))
        ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(plain)
            axis.set_minor_formatter(ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    legend = {}  # one legend for all panels, below them: inside, it hid points
    for ax in axes[0]:
        legend.update(zip(*reversed(ax.get_legend_handles_labels())))
    fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.1 + 0.03 * (len(legend) // 3), 1, 1))
    with atomic_path(args.output) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


if __name__ == "__main__":
    main()
