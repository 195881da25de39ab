"""What every report figure shares: the Agg backend, axis labels with units, plain tick numbers (never an
offset such as `+2.161e2`), one marker and line style per encoding, and the labelled training-length line."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import pandas as pd

MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "*"]
LINESTYLES = ["-", "--", "-.", ":"]
ENCODING_KEY = "position"
MISSING_TEXT = "n/a"


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; works without a display
    import matplotlib.pyplot as plt

    return plt


def metric_label(metric: str) -> tuple[str, float]:
    """'test/error' -> ('test error (%)', 100): the axis label with its unit and the factor raw values need."""
    stage, _, name = metric.rpartition("/")
    name, _, eval_set = name.partition("@")
    prefix = " ".join(p for p in (stage, eval_set) if p)
    labels = {
        "error": ("error (%)", 100.0),
        "seq_error": ("sequence error (%)", 100.0),
        "ppl": ("perplexity (per token)", 1.0),
        "word_ppl": ("perplexity (per word)", 1.0),
        "loss": ("loss (nats per token)", 1.0),
    }
    label, factor = labels.get(name, (name, 1.0))
    return (f"{prefix} {label}".strip(), factor)


def is_perplexity(metric: str) -> bool:
    return metric.rpartition("/")[2].split("@")[0] in ("ppl", "word_ppl")


def plain_formatter():
    """Tick labels as plain decimals, with just enough digits to tell neighbouring ticks apart."""
    from matplotlib.ticker import Formatter

    class Plain(Formatter):
        digits = 0

        def set_locs(self, locs):
            super().set_locs(locs)
            scale = max((abs(v) for v in locs), default=1.0) or 1.0
            exact = (d for d in range(7) if all(abs(round(v, d) - v) <= 1e-9 * scale for v in locs))
            self.digits = next(exact, 6)

        def __call__(self, value, pos=None):
            return f"{value:.{self.digits}f}"

    return Plain()


def plain_axis(axis, log: bool = False, values: Iterable[float] = ()) -> None:
    """No offset or scientific notation on this axis; on a log axis, labelled ticks even in a narrow range."""
    from matplotlib.ticker import LogLocator, MaxNLocator, NullFormatter

    if log:
        axis.set_minor_formatter(NullFormatter())
        finite = [v for v in values if v > 0 and math.isfinite(v)]
        wide = finite and max(finite) / min(finite) > 10
        axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)) if wide else MaxNLocator(nbins=6))
    axis.set_major_formatter(plain_formatter())


def encoding_styles(encodings: Iterable[str]) -> dict[str, dict]:
    """One colour, marker and line style per encoding, fixed by sorted name so every figure agrees."""
    plt = pyplot()
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {
        name: {
            "color": colours[i % len(colours)],
            "marker": MARKERS[i % len(MARKERS)],
            "linestyle": LINESTYLES[i % len(LINESTYLES)],
        }
        for i, name in enumerate(sorted(set(encodings)))
    }


def train_length_line(ax, length: int) -> None:
    """A vertical line at the training length, labelled on the plot itself (kept out of the legend)."""
    from matplotlib.transforms import blended_transform_factory

    ax.axvline(length, color="grey", linestyle=":", linewidth=1.2, label=f"train length {length}")
    transform = blended_transform_factory(ax.transData, ax.transAxes)
    ax.text(length, 0.98, f" train length {length}", transform=transform, fontsize=7, color="dimgrey", va="top")


def panel_keys(keys: list[str]) -> tuple[list[str], str | None]:
    """Row keys -> (keys that make panels, the key that names the legend entries)."""
    if ENCODING_KEY in keys:
        return [k for k in keys if k != ENCODING_KEY], ENCODING_KEY
    return keys[:-1], (keys[-1] if keys else None)


def split_label(row_name: str, row: str) -> dict[str, str]:
    """A table row label 'train64 / cope' with row_name 'train_len / position' -> {key: value}."""
    return dict(zip(row_name.split(" / "), row.split(" / ")))


def panels_of(labels: Iterable[str], row_name: str) -> dict[str, list[tuple[str, str]]]:
    """Table rows grouped into panels: {panel title: [(legend name, row label), ...]}, in row order."""
    keys = row_name.split(" / ")
    panel, legend = panel_keys(keys)
    groups: dict[str, list[tuple[str, str]]] = {}
    labels = list(labels)
    order = {name: i for i, name in enumerate(dict.fromkeys(split_label(row_name, r).get(legend, r) for r in labels))}
    for row in labels:
        values = split_label(row_name, row)
        title = " / ".join(values[k] for k in panel)
        groups.setdefault(title, []).append((values.get(legend, row) if legend else row, row))
    return {title: sorted(groups[title], key=lambda entry: order[entry[0]]) for title in sorted(groups, key=natural)}


def natural(text: str) -> list:
    """Sort key that puts 'train64' before 'train128'."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(text))]


def frame_panels(frame: pd.DataFrame, keys: list[str]) -> tuple[list[str], str | None]:
    """Like panel_keys, for a DataFrame: only keys it has, and the encoding column when it has one."""
    present = [k for k in keys if k in frame]
    if ENCODING_KEY in frame and ENCODING_KEY not in present:
        present.append(ENCODING_KEY)
    return panel_keys(present)


def keep_scale_honest(ax, values: Iterable[float], log: bool, min_ratio: float = 1.25) -> None:
    """Widen a y-axis whose data span is tiny, so that a difference of 0.01 % does not fill the panel and read
    as a cliff: a log axis spans at least a factor of min_ratio, a linear one at least min_ratio - 1 of its
    centre (and one unit)."""
    finite = [v for v in values if math.isfinite(v) and (v > 0 or not log)]
    if not finite:
        return
    low, high = min(finite), max(finite)
    if log and high / low < min_ratio:
        centre = math.sqrt(low * high)
        ax.set_ylim(centre / math.sqrt(min_ratio), centre * math.sqrt(min_ratio))
    elif not log and high - low < max((min_ratio - 1) * abs(low + high) / 2, 1.0):
        half = max((min_ratio - 1) * abs(low + high) / 2, 1.0) / 2
        centre = (low + high) / 2
        ax.set_ylim(centre - half, centre + half)
