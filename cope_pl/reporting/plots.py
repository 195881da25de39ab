"""PNG figures for a report (matplotlib, no display): the metric vs evaluation context length (paper Figure 3),
error per test set, learning curves, and loss by token position.

Every figure has one panel per data set (or other non-encoding row key, e.g. the training length), so tasks
with different scales never share an axis, and one series per encoding, styled alike in every figure. A value
that is missing or not applicable is drawn as a labelled gap, never as zero.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pandas as pd

from cope_pl.reporting.collect import load_curves
from cope_pl.reporting.style import (
    encoding_styles,
    frame_panels,
    is_perplexity,
    keep_scale_honest,
    metric_label,
    natural,
    panels_of,
    plain_axis,
    pyplot,
    train_length_line,
)
from cope_pl.reporting.tables import Table, varying


def panel_grid(count: int, rows: int = 1, width: float = 5.0, height: float = 3.6):
    """(figure, axes[row][panel]) for `count` panels per row of metrics."""
    plt = pyplot()
    size = (width * max(count, 1), height * rows)
    fig, axes = plt.subplots(rows, max(count, 1), figsize=size, squeeze=False, layout="constrained")
    return fig, axes


def finish(fig, axes, path: Path, title: str, handles: dict | None = None) -> Path:
    """Title above the panels, the shared legend (encodings only) under them, then save; the constrained layout of
    `panel_grid` leaves room for exactly those."""
    plt = pyplot()
    if handles:
        # As many columns as the figure's width holds at the longest name (8-pt characters plus the marker).
        fits = int(fig.get_figwidth() / (0.075 * max(len(str(name)) for name in handles) + 0.55))
        fig.legend(handles.values(), handles.keys(), loc="outside lower center",
                   ncol=max(1, min(len(handles), 6, fits)), fontsize=8, frameon=False)  # fmt: skip
    heading = fig.suptitle(textwrap.fill(title, int(14 * fig.get_figwidth())), fontsize=9)  # ~14 characters/inch
    for _ in range(2):  # lay out, then centre the heading over the panels (not the page) and wrap it to their width
        fig.draw_without_rendering()
        boxes = [ax.get_position() for row in axes for ax in row if ax.get_visible()]
        left, right = min(b.x0 for b in boxes), max(b.x1 for b in boxes)
        heading.set_x((left + right) / 2)
        heading.set_text(textwrap.fill(title, int(14 * (right - left) * fig.get_figwidth())))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_extrapolation(table: Table, path: Path, metric: str, train_len: dict[str, int] | None = None) -> Path:
    """Per panel, one line per encoding: the mean over seeds at the evaluated lengths only (markers at their true
    lengths; coinciding series differ by marker and line style), with a ±std band where there are 2+ seeds.

    The y-limits come from the means: a wide band (runs of very different quality) is cut at the axis and said to
    be, rather than squeezing every line into a corner. train_len: row label -> the length its runs were trained
    at (a labelled vertical line per panel).
    """
    ylabel, factor = metric_label(metric)
    log = is_perplexity(metric)
    lengths = [int(c) for c in table.columns]
    panels = panels_of(table.rows, table.row_name)
    styles = encoding_styles(name for rows in panels.values() for name, _ in rows)
    fig, axes = panel_grid(len(panels))
    handles = {}
    clipped = False
    for ax, (title, rows) in zip(axes[0], panels.items()):
        values, absent, bands = [], [], []
        for name, row in rows:
            points = [(int(c), table.mean[(row, c)] * factor, table.spread((row, c)) * factor, table.n[(row, c)])
                      for c in table.columns if table.n.get((row, c))]  # fmt: skip
            gaps = [c for c in table.columns if not table.n.get((row, c))]
            absent += [f"{name} at {', '.join(gaps)}"] if gaps else []
            if not points:
                continue
            x, y, s, n = zip(*points)
            style = styles[name]
            (line,) = ax.plot(x, y, label=name, fillstyle="none", markersize=6, **style)
            if max(n) >= 2:  # one run has no spread to show
                lower = [max(a - b, 1e-12 if log else 0.0) for a, b in zip(y, s)]  # no metric is negative
                upper = [a + b for a, b in zip(y, s)]
                ax.fill_between(x, lower, upper, alpha=0.12, color=style["color"], linewidth=0)
                bands += [lower, upper]
            handles.setdefault(name, line)
            values += list(y)
        for length in sorted({train_len[r] for _, r in rows if r in (train_len or {})}):
            train_length_line(ax, length)
        if log:
            ax.set_yscale("log")
        fit_limits(ax, values, [v for band in bands for v in band], log)
        keep_scale_honest(ax, values, log)
        low, high = ax.get_ylim()
        clipped |= any(v < low or v > high for band in bands for v in band)
        plain_axis(ax.yaxis, log=log, values=values)
        ax.set_xticks(lengths, [str(t) for t in lengths])
        ax.set_xlabel("evaluation context length (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        if absent:
            note = textwrap.fill("no result (n/a or missing): " + "; ".join(absent), 80)
            ax.annotate(note, (0, 0), xytext=(0, -34), xycoords="axes fraction", textcoords="offset points",
                        fontsize=7, color="dimgrey", va="top")  # fmt: skip
    seeds = seed_note(table, "band")
    note = f" ({seeds}{'; bands cut at the axis' if clipped else ''})" if seeds else ""
    return finish(fig, axes, path, table.title + note, handles)


def fit_limits(ax, means: list[float], band: list[float], log: bool, reach: float = 0.5) -> None:
    """y-limits around the means with a margin, widened for the bands by at most `reach` of the means' span (in
    log space on a log axis): a wider band is cut at the axis."""
    import math

    finite = [v for v in means if math.isfinite(v) and (v > 0 or not log)]
    if not finite:
        return
    t = (lambda v: math.log(v)) if log else (lambda v: v)
    inv = math.exp if log else (lambda v: v)
    low, high = t(min(finite)), t(max(finite))
    span = max(high - low, 1e-9 if log else 1e-9 * max(abs(low), 1.0))
    edges = [t(v) for v in band if math.isfinite(v) and (v > 0 or not log)]
    lo = max(min(edges, default=low), low - reach * span)
    hi = min(max(edges, default=high), high + reach * span)
    margin = 0.08 * (hi - lo or span)
    ax.set_ylim(inv(lo - margin), inv(hi + margin))


def seed_note(table: Table, spread: str) -> str:
    """'mean over 3 seeds, band ±1 std' (spread: how the std is drawn), or 'one run each, no spread'."""
    counts = sorted({n for n in table.n.values() if n})
    if not counts:
        return ""
    if counts == [1]:
        return "one run each, no spread"
    seeds = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return f"mean over {seeds} seeds, {spread} ±1 std"


def plot_bars(table: Table, path: Path, metric: str) -> Path:
    """Per panel, grouped bars: one group per test set, one bar per encoding (std as error bars where 2+ seeds);
    a cell without results gets a hatched 'missing' / 'n/a' marker instead of a bar. Values are shown on the
    table's scale (an error table in fractions gives bars in fractions, one with scale 100 in %)."""
    ylabel, factor = table_label(table, metric)
    panels = panels_of(table.rows, table.row_name)
    styles = encoding_styles(name for rows in panels.values() for name, _ in rows)
    fig, axes = panel_grid(len(panels), width=max(4.5, 1.4 * len(table.columns)))
    handles = {}
    for ax, (title, rows) in zip(axes[0], panels.items()):
        columns = [c for c in table.columns if any(table.n.get((r, c)) for _, r in rows)] or table.columns
        width = 0.8 / max(len(rows), 1)
        for i, (name, row) in enumerate(rows):
            offset = (i - (len(rows) - 1) / 2) * width
            present = [(j, c) for j, c in enumerate(columns) if table.n.get((row, c))]
            if present:
                x = [j + offset for j, _ in present]
                y = [table.mean[(row, c)] * factor for _, c in present]
                err = [table.spread((row, c)) * factor for _, c in present]
                spread = {"yerr": err, "capsize": 2} if any(table.n[(row, c)] >= 2 for _, c in present) else {}
                bars = ax.bar(x, y, width, label=name, color=styles[name]["color"], **spread)
                ax.bar_label(bars, fmt=f"%.{table.digits}f", fontsize=7, padding=1)  # as the table prints it
                handles.setdefault(name, bars)
            for j, c in enumerate(columns):
                if not table.n.get((row, c)):
                    missing_marker(ax, j + offset, width, "n/a" if (row, c) in table.not_applicable else "missing")
        ax.set_xticks(range(len(columns)), columns)
        ax.set_xlabel("test set")
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.1)  # room for the value labels
        plain_axis(ax.yaxis)
        ax.set_title(title, fontsize=9)
    seeds = seed_note(table, "error bars")
    return finish(fig, axes, path, table.title + (f" ({seeds})" if seeds else ""), handles)


def table_label(table: Table, metric: str) -> tuple[str, float]:
    """metric_label, but in the units the table prints: a percent label only for a table scaled by 100."""
    ylabel, factor = metric_label(metric)
    if factor == 100 and table.scale != 100:
        return ylabel.replace("(%)", "(fraction)"), 1.0
    return ylabel, factor


def missing_marker(ax, x: float, width: float, text: str) -> None:
    """A hatched full-height column with a label where a bar would be: no result, not a value of zero."""
    from matplotlib.transforms import blended_transform_factory

    ax.axvspan(x - width / 2, x + width / 2, facecolor="none", edgecolor="silver", hatch="///", linewidth=0)
    transform = blended_transform_factory(ax.transData, ax.transAxes)
    ax.text(x, 0.5, text, transform=transform, rotation=90, ha="center", va="center", fontsize=7,
            bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})  # fmt: skip


def seed_band(frames: list[pd.DataFrame], x: str, y: str) -> pd.DataFrame:
    """Per x: mean, min and max of y over the given per-seed frames."""
    joined = pd.concat(frames, ignore_index=True)
    return joined.groupby(x)[y].agg(["mean", "min", "max"])


def labelled_groups(runs: pd.DataFrame, row_keys: list[str]):
    """(panel title, encoding) -> the runs of that series, and the sorted panel titles."""
    keys = varying(runs, row_keys)
    panel, legend = frame_panels(runs, keys)
    titles = runs[panel].astype(str).agg(" / ".join, axis=1) if panel else pd.Series("", index=runs.index)
    names = runs[legend].astype(str) if legend else pd.Series("", index=runs.index)
    groups = {key: group for key, group in runs.groupby([titles, names], sort=True)}
    return groups, sorted(set(titles), key=natural)


def plot_learning_curves(
    runs: pd.DataFrame, row_keys: list[str], path: Path, tags=("val/error", "val/loss"), title: str = ""
) -> Path:
    """One row per validation metric, one panel per data set, one line per encoding: the mean over seeds against
    the training step, with a min-to-max band where a series has 2+ seeds. The loss row also carries each
    encoding's training loss (`train/loss`) as a thin line of its colour, so over- and underfitting show. A
    panel's y-range is never narrower than keep_scale_honest allows (a short run's single point is no cliff)."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    ok = runs[runs["status"] == "ok"]
    groups, titles = labelled_groups(ok, row_keys)
    wanted = (*tags, TRAIN_LOSS)
    curves = {key: [load_curves(d, wanted) for d in group["run_dir"]] for key, group in groups.items()}
    logged = {t for cs in curves.values() for c in cs for t in c["tag"]}
    # Tasks with named evaluation sets get a column per set (their plain tag is an alias of the first set).
    sets = sorted({t.split("@", 1)[1] for t in logged if "@" in t}, key=lambda n: (n != "in_dist", n))
    present = [t for t in tags if t in logged or any(x.startswith(t + "@") for x in logged)] or list(tags)
    columns = [(panel, s) for panel in titles for s in (sets or [""])]
    styles = encoding_styles(name for _, name in groups)
    fig, axes = panel_grid(len(columns), rows=len(present), width=4.2 if sets else 5.0)
    handles: dict = {}
    seeds: set[int] = set()
    train_drawn = False
    for r, base in enumerate(present):
        ylabel, factor = metric_label(base)
        for p, (panel, set_name) in enumerate(columns):
            tag = f"{base}@{set_name}" if set_name else base
            ax = axes[r][p]
            values: list[float] = []
            with_train = False
            val_steps: set[int] = set()  # ticks at the validation points, not at training-loss ones
            for (group_title, name), frames in curves.items():
                if group_title != panel:
                    continue
                if base.endswith("/loss") and (train := [f[f["tag"] == TRAIN_LOSS] for f in frames]):
                    train = [f for f in train if len(f)]
                    if train:
                        mean = seed_band(train, "step", "value")["mean"]
                        ax.plot(mean.index, mean, color=styles[name]["color"], linewidth=0.8, alpha=0.45)
                        values += list(mean)
                        with_train = train_drawn = True
                frames = [f[f["tag"] == tag] for f in frames if (f["tag"] == tag).any()]
                if not frames:
                    continue
                band = seed_band(frames, "step", "value") * factor
                style = {**styles[name], "marker": styles[name]["marker"] if len(band) <= 12 else None}
                (line,) = ax.plot(band.index, band["mean"], label=name, **style)
                seeds.add(len(frames))
                if len(frames) >= 2:
                    ax.fill_between(band.index, band["min"], band["max"], alpha=0.15, color=style["color"], linewidth=0)
                handles.setdefault(name, line)
                values += list(band["mean"])
                val_steps |= {int(x) for x in band.index}
            steps = sorted(val_steps)
            if 0 < len(steps) <= 6:
                ax.set_xticks(steps)
            else:
                ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))  # labels that do not collide
            keep_scale_honest(ax, values, log=False)
            ax.set_xlabel("training step")
            ax.set_ylabel(ylabel.replace("val loss", "val and training loss") if with_train else ylabel)
            ax.set_title(" · ".join(x for x in (panel, set_name) if x), fontsize=9)
            plain_axis(ax.yaxis)
            if not values:
                ax.text(0.5, 0.5, f"no {tag} logged", transform=ax.transAxes, ha="center", color="dimgrey")
    if train_drawn:
        handles["training loss (thin line)"] = Line2D([], [], color="grey", linewidth=0.8, alpha=0.6)
    title = f"{title}: learning curves" if title else "learning curves"
    if seeds == {1}:
        spread = "one run each, no band"
    else:
        counts = "-".join(str(n) for n in sorted({min(seeds), max(seeds)})) if seeds else "0"
        spread = f"mean over {counts} seeds, band: min to max" + (" where 2+ seeds" if 1 in seeds else "")
    return finish(fig, axes, path, f"{title} on the validation sets ({spread})", handles)


TRAIN_LOSS = "train/loss"


def plot_loss_by_position(
    positions: pd.DataFrame, row_keys: list[str], path: Path, all_lengths: bool = True, log_x: bool = False,
    title: str = "",
) -> Path:  # fmt: skip
    """Loss vs token position (bucket midpoint), one line per encoding (mean over seeds, min-to-max band where
    2+ seeds). One panel per data set / training length and evaluated length: every length, or the longest only
    without all_lengths. Each x label says the bucket width and how many scored tokens a bucket holds per run."""
    frame = positions.copy()
    if "stride" in frame and frame["stride"].isna().any():  # one evaluation per length: the plain windows
        frame = frame[frame["stride"].isna()].copy()
    frame["midpoint"] = (frame["bucket_start"] + frame["bucket_end"]) / 2
    # Here seq_len is the evaluated length (a panel of its own); runs are told apart by their training length.
    frame["train_len"] = "train " + pd.to_numeric(frame["train_seq_len"], errors="coerce").astype("Int64").astype(str)
    row_keys = ["train_len" if key == "seq_len" else key for key in row_keys]
    sets = frame["set"].fillna("").astype(str)
    groups, titles = labelled_groups(frame.assign(set=sets), [*row_keys, "set"] if sets.nunique() > 1 else row_keys)
    panels = []
    for panel in titles:
        in_panel = [g for (t, _), g in groups.items() if t == panel]
        lengths = sorted(set().union(*(set(g["seq_len"].astype(int)) for g in in_panel)))
        panels += [(panel, length) for length in (lengths if all_lengths else lengths[-1:])]
    styles = encoding_styles(name for _, name in groups)
    fig, axes = panel_grid(len(panels))
    handles = {}
    ylabel, _ = metric_label("test/loss")
    seeds: set[int] = set()
    for ax, (panel, length) in zip(axes[0], panels):
        train_lens, widths, tokens, drawn = set(), set(), [], []
        for (group_title, name), group in groups.items():
            rows = group[group["seq_len"].astype(int) == length]
            if group_title != panel or rows.empty:
                continue
            by_run = [part for _, part in rows.groupby("run_dir")] if "run_dir" in rows else [rows]
            band = seed_band(by_run, "midpoint", "loss")
            drawn += list(band["mean"])
            (line,) = ax.plot(band.index, band["mean"], label=name, markersize=4, fillstyle="none", **styles[name])
            if len(by_run) >= 2:
                ax.fill_between(band.index, band["min"], band["max"], alpha=0.15, color=styles[name]["color"],
                                linewidth=0)  # fmt: skip
            seeds.add(len(by_run))
            handles.setdefault(name, line)
            widths |= set((rows["bucket_end"] - rows["bucket_start"]).astype(int))
            if "tokens" in rows:
                tokens += list(pd.to_numeric(rows["tokens"], errors="coerce").dropna().astype(int))
            train_lens |= set(pd.to_numeric(rows["train_seq_len"], errors="coerce").dropna().astype(int))
        for train in sorted(train_lens):
            train_length_line(ax, train)
        if log_x:
            ax.set_xscale("log")
        plain_axis(ax.xaxis, log=log_x, values=[max(length, 1), 1])
        keep_scale_honest(ax, drawn, log=False)  # per-bucket noise is no cliff
        plain_axis(ax.yaxis)
        ax.set_xlabel("token position (bucket midpoint)\n" + bucket_note(widths, tokens), fontsize=9)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{panel}, evaluated at {length} tokens".lstrip(", "), fontsize=9)
    title = title or "loss by token position"
    if seeds == {1}:
        spread = "one run each, no band"
    else:
        spread = f"mean over {'-'.join(str(n) for n in sorted({min(seeds), max(seeds)}))} seeds, band: min to max"
    return finish(fig, axes, path, f"{title} ({spread})", handles)


def bucket_note(widths: set[int], tokens: list[int]) -> str:
    """'16-token buckets, 1,184-1,200 scored tokens each per run': how much each point averages over."""
    width = "-".join(str(w) for w in sorted({min(widths), max(widths)})) + "-token buckets" if widths else "buckets"
    if not tokens:
        return width
    low, high = min(tokens), max(tokens)
    count = f"{low:,}" if low == high else f"{low:,}-{high:,}"
    return f"{width}, {count} scored tokens each per run"


PASSKEY_METRICS = {
    "accuracy": "exact-match accuracy (every key digit right)",
    "digit_accuracy": "per-digit accuracy (share of key digits right; chance 0.1)",
}


def accuracy_text(value: float) -> str:
    """Two decimals, but never '1.00' for an imperfect score nor '0.00' for a non-zero one."""
    if 0 < value < 0.005:
        return "<0.01"
    if 0.995 <= value < 1:
        return ">0.99"
    return f"{value:.2f}"


def passkey_cells(frame: pd.DataFrame, metric: str) -> dict[tuple[float, int], tuple[float | None, int, str]]:
    """(depth, length) -> (mean over seeds or None, seeds with a value, status text when there is none)."""
    cells = {}
    for (depth, length), group in frame.groupby(["depth", "seq_len"]):
        ok = pd.to_numeric(group.loc[group["status"] == "ok", metric], errors="coerce").dropna()
        status = "" if len(ok) else ("n/a" if (group["status"] == "n/a").any() else str(group["status"].iloc[0]))
        cells[(float(depth), int(length))] = (float(ok.mean()) if len(ok) else None, len(ok), status)
    return cells


def plot_passkey(
    frame: pd.DataFrame,
    row_keys: list[str],
    path: Path,
    metric: str = "accuracy",
    title: str = "",
    runs: pd.DataFrame | None = None,
) -> Path:
    """Needle-in-a-haystack heatmaps: one panel per encoding (per other row key too, e.g. the training length),
    evaluated length across, needle depth down, colour = mean accuracy over seeds on a fixed 0..1 scale. A
    length the encoding cannot represent is a grey hatched "n/a" cell, a cell without results "missing". A panel
    with fewer runs than `runs` (every run, missing ones included) expects says so in its title, e.g. (2/3 runs);
    a cell averaged over fewer of the panel's runs than the others says so, e.g. (1/2)."""
    import matplotlib as mpl
    from matplotlib.patches import Rectangle

    plt = pyplot()
    frame = frame.copy()
    frame["seq_len"] = pd.to_numeric(frame["seq_len"], errors="coerce").astype(int)
    frame["depth"] = pd.to_numeric(frame["depth"], errors="coerce")
    frame["train_len"] = "train " + pd.to_numeric(frame["train_seq_len"], errors="coerce").astype("Int64").astype(str)
    row_keys = ["train_len" if key == "seq_len" else key for key in row_keys]
    groups, titles = labelled_groups(frame, row_keys)
    expected = {}
    if runs is not None and "run_dir" in runs:
        runs = runs.assign(
            train_len="train " + pd.to_numeric(runs["seq_len"], errors="coerce").astype("Int64").astype(str)
        )
        run_groups, _ = labelled_groups(runs, row_keys)
        expected = {key: group["run_dir"].nunique() for key, group in run_groups.items()}
    panels = [(t, name) for t in titles for (g, name) in sorted(groups, key=lambda k: natural(k[1])) if g == t]
    lengths = sorted(frame["seq_len"].unique())
    depths = sorted(frame["depth"].dropna().unique())
    ncols = min(len(panels), 3)
    nrows = -(-len(panels) // ncols)
    width = max(3.2, 0.75 * len(lengths) + 1.6)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(max(width * ncols + 1.2, 6.5), 0.42 * len(depths) * nrows + 1.7 * nrows + 0.9),
        squeeze=False, layout="constrained",
    )  # fmt: skip
    cmap = mpl.colormaps["viridis"].with_extremes(bad="lightgrey")
    norm = mpl.colors.Normalize(vmin=0.0, vmax=1.0)
    have = {key: (g["run_dir"].nunique() if "run_dir" in g else 1) for key, g in groups.items()}
    counts = set(have.values())
    seeds = counts.pop() if len(counts) == 1 else None  # None: panels average different numbers of runs
    shown: set[str] = set()  # what the note under the title explains
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for k, (ax, (panel, name)) in enumerate(zip(axes.flat, panels)):
        group = groups[(panel, name)]
        runs_here = have[(panel, name)]
        cells = passkey_cells(group, metric)
        grid = [[cells.get((d, n), (None, 0, "missing"))[0] for n in lengths] for d in depths]
        values = pd.DataFrame(grid, dtype=float).to_numpy()
        ax.imshow(values, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
        for i, depth in enumerate(depths):
            for j, length in enumerate(lengths):
                value, n, status = cells.get((depth, length), (None, 0, "missing"))
                if value is None:
                    face = "lightgrey" if status == "n/a" else "white"
                    shown.add("n/a" if status == "n/a" else "missing")
                    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor=face, edgecolor="grey", hatch="///",
                                           linewidth=0))  # fmt: skip
                    ax.text(j, i, status or "missing", ha="center", va="center", fontsize=7, color="black",
                            bbox={"facecolor": face, "edgecolor": "none", "pad": 0.5})  # fmt: skip
                    continue
                text = accuracy_text(value) + (f"\n({n}/{runs_here})" if n < runs_here else "")
                colour = "white" if value < 0.55 else "black"  # readable on viridis' dark and light ends
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color=colour)
        train = pd.to_numeric(group["train_seq_len"], errors="coerce").dropna()
        train_len = int(train.max()) if len(train) else None
        labels = [f"{n}\n{n / train_len:g}×" if train_len else str(n) for n in lengths]
        ax.set_xticks(range(len(lengths)), labels, fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{100 * d:g}" for d in depths], fontsize=7)
        if train_len in lengths and lengths[-1] > train_len:  # where extrapolation starts
            ax.axvline(lengths.index(train_len) + 0.5, color="red", linestyle="--", linewidth=1.2)
            shown.add("train")
        if k + ncols >= len(panels):  # no panel below: label the x axis
            ax.set_xlabel("evaluated length (tokens, × training length)", fontsize=8)
        if k % ncols == 0:
            ax.set_ylabel("needle depth (% of filler before the key)", fontsize=8)
        wanted = expected.get((panel, name), runs_here)
        count = f" ({runs_here}/{wanted} runs)" if runs_here < wanted else ""
        count = count or ("" if seeds else f" ({runs_here} run{'s' * (runs_here != 1)})")
        ax.set_title(" · ".join(x for x in (panel, name) if x) + count, fontsize=9)
    colourbar = fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=cmap), ax=list(axes.flat[: len(panels)]),
                             shrink=0.9, ticks=[0, 0.25, 0.5, 0.75, 1.0])  # fmt: skip
    colourbar.set_label(PASSKEY_METRICS.get(metric, metric), fontsize=8)
    colourbar.ax.tick_params(labelsize=7)
    what = PASSKEY_METRICS.get(metric, metric).split(" (")[0]
    suffix = "one seed" if seeds == 1 else f"mean over {seeds} seeds" if seeds else "mean over each panel's runs"
    heading = f"{title}: passkey {what}" if title else f"passkey {what}"
    notes = {
        "train": "right of the red dashed line: longer than the training length",
        "n/a": "grey hatched: n/a (the encoding cannot represent the length)",
        "missing": "white hatched: no result",
    }
    note = "; ".join(text for key, text in notes.items() if key in shown)
    chars = int(14 * fig.get_figwidth())  # about 14 characters per inch
    heading = textwrap.fill(f"{heading} by length and depth ({suffix})", chars)
    fig.suptitle(heading + (f"\n{textwrap.fill(note, chars)}" if note else ""), fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
