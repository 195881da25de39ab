"""PNG figures for a report (matplotlib, no display): perplexity vs context length (paper Figure 3),
learning curves per encoding, and error per test set."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pandas as pd

from cope_pl.reporting.collect import load_curves
from cope_pl.reporting.tables import Table, row_labels, varying


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; works without a display
    import matplotlib.pyplot as plt

    return plt


def plot_extrapolation(table: Table, path: Path, ylabel: str, train_len: list[int] | None = None) -> Path:
    """One line per row of an extrapolation table (mean, with a ±std band over seeds)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in table.rows:
        points = [(int(c), table.mean[(row, c)], table.std[(row, c)]) for c in table.columns if table.n.get((row, c))]
        if not points:
            continue
        x, y, s = zip(*points)
        (line,) = ax.plot(x, y, marker="o", label=row)
        ax.fill_between(
            x, [a - b for a, b in zip(y, s)], [a + b for a, b in zip(y, s)], alpha=0.2, color=line.get_color()
        )
    for length in train_len or []:
        ax.axvline(length, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("evaluation context length (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(textwrap.fill(table.title, 70), fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_learning_curves(runs: pd.DataFrame, row_keys: list[str], path: Path, tags=("train/loss", "val/loss")) -> Path:
    """Per tag one panel; per encoding the mean curve over its seeds."""
    plt = pyplot()
    ok = runs[runs["status"] == "ok"]
    labels = row_labels(ok, varying(ok, row_keys))
    fig, axes = plt.subplots(1, len(tags), figsize=(5 * len(tags), 3.5), squeeze=False)
    for label in dict.fromkeys(labels):
        curves = pd.concat([load_curves(d, tags) for d in ok[labels == label]["run_dir"]], ignore_index=True)
        for ax, tag in zip(axes[0], tags):
            curve = curves[curves["tag"] == tag].groupby("step")["value"].mean()
            if len(curve):
                ax.plot(curve.index, curve.values, label=label)
    for ax, tag in zip(axes[0], tags):
        ax.set_title(tag)
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_bars(table: Table, path: Path, ylabel: str) -> Path:
    """Grouped bars: one group per column (test set), one bar per row (encoding), std as error bars."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(table.columns) * max(1, len(table.rows)) / 3), 3.5))
    width = 0.8 / max(len(table.rows), 1)
    for i, row in enumerate(table.rows):
        x = [j + i * width for j in range(len(table.columns))]
        y = [table.mean[(row, c)] * table.scale if table.n.get((row, c)) else 0.0 for c in table.columns]
        err = [table.std[(row, c)] * table.scale if table.n.get((row, c)) else 0.0 for c in table.columns]
        ax.bar(x, y, width, yerr=err, label=row, capsize=2)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(table.columns))], table.columns)
    ax.set_ylabel(ylabel)
    ax.set_title(textwrap.fill(table.title, 70), fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
