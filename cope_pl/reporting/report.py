"""`cope-pl report RUNS [RUNS ...] --out reports/ [--filter KEY=PATTERN ...]`: tables and figures from every run
under the RUNS folders (those matching every filter, e.g. `--filter position=cope* --filter step=600`).

Runs are read into pandas (see `cope_pl.reporting.collect`), grouped by the swept keys (seeds averaged),
and written per sweep to `OUT/<sweep name>/` (runs outside any sweep go to `OUT/runs/`, or with several data
modules among them to `OUT/runs-<data>/`, e.g. `runs-flipflop/`): a CSV, Markdown
and LaTeX file per table, PNG figures, `missing.csv` for runs the sweep expects but that have no results,
and a README.md that shows it all. `OUT/runs.csv` holds every run, one row each. Replicates are distinct seeds:
other versions of a run name with the same seed are re-runs, superseded by the newest finished one (listed in
`superseded.csv` and the README, never averaged in).

Which tables a sweep gets is set by the `report:` section of its sweep file, for example

    report:
      title: Flip-Flop and Selective Copy (paper Table 2)
      rows: position                       # row key(s); default: the swept axes except seed
      tables:
        - {name: test_error, metric: test/error, scale: 100, digits: 1, lower_is_better: true,
           paper: {cope: {ood_dense: 4.9}}}   # reference numbers, shown as "(paper)" rows
      extrapolation: {metrics: [ppl, error]} # eval-context tables and Figure-3 plots (first: extrapolation.*)
      position_loss: {all_lengths: true, log_x: false}  # loss by token position: every length, or the longest
      passkey: {digits: 2}                 # passkey accuracy table (mean over depths) and heatmaps

Figures (PNG, one panel per data set or training length, one series per encoding): `extrapolation*.png`
(metric vs evaluated length), `error_by_set.png` (`ppl_by_set.png` for language models: perplexity, per word
where counted, per test set), `learning_curves.png` (validation error % and loss vs step, perplexity and loss
for language models, with the training loss),
`loss_by_position.png` (from each run's eval_context_positions.csv), `passkey.png` and
`passkey_digits.png` (from each run's passkey.csv: exact-match and per-digit accuracy, length x depth, one
heatmap per encoding) and any position maps found in a run's `position_maps/` folder (copied to
`position_maps/<run>/`).
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from cope_pl.reporting.collect import (
    find_manifests,
    load_eval_context,
    load_eval_context_positions,
    load_passkey,
    load_runs,
    mark_superseded,
    select_runs,
)
from cope_pl.reporting.plots import (
    plot_bars,
    plot_extrapolation,
    plot_learning_curves,
    plot_loss_by_position,
    plot_passkey,
)
from cope_pl.reporting.tables import Table, extrapolation_table, metric_table, passkey_table, row_labels, varying
from cope_pl.runs import POSITION_MAPS_DIR

DEFAULT_ROW_KEYS = ["data", "position", "seq_len"]


def default_tables(runs: pd.DataFrame) -> list[dict[str, Any]]:
    """test/ metrics when the runs were tested, else val/: error and perplexity, and word-level perplexity where
    the runs logged it (WikiText; code only when its data.word_count asks)."""
    stage = "test" if any(c.startswith("test/") for c in runs.columns) else "val"
    names = ["error", "ppl"] + (["word_ppl"] if counts_words(runs) else [])
    return [{"name": f"{stage}_{name}", "metric": f"{stage}/{name}", "lower_is_better": True} for name in names]


def counts_words(runs: pd.DataFrame) -> bool:
    """Runs whose data module counts words (WikiText; code when its data.word_count asks)."""
    return any(c.startswith(("test/word_ppl", "val/word_ppl")) for c in runs.columns)


def models_a_corpus(runs: pd.DataFrame) -> bool:
    """Language models of text or code (a token-array corpus, not a synthetic task): led by perplexity, since
    top-1 token error says little about them."""
    from cope_pl.data import TokenArrayDataModule

    def subclasses(cls: type) -> set[str]:
        return {n for sub in cls.__subclasses__() for n in {sub.__name__} | subclasses(sub)}

    corpora = subclasses(TokenArrayDataModule)
    return counts_words(runs) or ("data" in runs and runs["data"].isin(corpora).any())


def report_group(runs: pd.DataFrame, out: Path, spec: dict[str, Any], axes: list[str] | None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    superseded = runs[runs["status"] == "superseded"]
    runs = runs[runs["status"] != "superseded"]
    rows = spec.get("rows")
    row_keys = [rows] if isinstance(rows, str) else list(rows or [a for a in (axes or []) if a != "seed"])
    row_keys = row_keys or DEFAULT_ROW_KEYS
    title = spec.get("title") or (runs["sweep"].dropna().iloc[0] if runs["sweep"].notna().any() else "runs")
    written: list[Path] = []
    sections = [f"# {title}", "", f"{int((runs['status'] == 'ok').sum())} of {len(runs)} runs have results."]
    # The bar figure: error for tasks, perplexity for LMs (per word where the data counts words, as papers report).
    language_model = models_a_corpus(runs)
    headlines = ("/word_ppl", "/ppl") if counts_words(runs) else ("/ppl",) if language_model else ("/error",)
    candidates: dict[str, tuple[Table, str]] = {}
    for entry in spec.get("tables") or default_tables(runs):
        options = {k: entry[k] for k in ("scale", "digits", "paper") if k in entry}
        metric = entry["metric"]
        heading = f"{title}: {metric}" + (" in %" if entry.get("scale") == 100 else "")
        table = metric_table(runs, metric, row_keys, heading, entry.get("lower_is_better", True), **options)
        if table is None:
            continue
        written += table.write(out, entry.get("name", metric.replace("/", "_")))
        sections += ["", table.markdown()]
        ending = "/" + metric.rpartition("/")[2]
        if ending in headlines and ending not in candidates and len(table.columns) > 0:
            candidates[ending] = (table, metric)
    headline_table = next((candidates[h] for h in headlines if h in candidates), None)
    if headline_table is not None:
        name = "error_by_set" if headlines == ("/error",) else "ppl_by_set"
        written.append(plot_bars(headline_table[0], out / f"{name}.png", headline_table[1]))
        sections += ["", f"![{name.split('_')[0]} per test set]({name}.png)"]
    ec = load_eval_context(runs)
    if not ec.empty:
        ec.to_csv(out / "eval_context_rows.csv", index=False)
        extra = spec.get("extrapolation") or {}
        wanted = extra.get("metrics") or [extra.get("metric", "ppl")]
        # One table per test set (Flip-Flop's in_dist, ood_dense, ...), each titled with its set: the first set
        # keeps the plain file name, the others add theirs.
        sets = list(dict.fromkeys(ec["set"].fillna("")))
        lengths = train_lengths(ec, runs, row_keys)
        for metric in dict.fromkeys([*wanted, "word_ppl"]):
            if metric not in ec or pd.to_numeric(ec[metric], errors="coerce").isna().all():
                continue
            base = "extrapolation" if metric == wanted[0] else f"extrapolation_{metric}"
            for i, eval_set in enumerate(sets):
                of_set = f", {eval_set}" if eval_set else ""
                heading = f"{title}: {metric} by evaluation context length{of_set}"
                table = extrapolation_table(ec, runs, metric, row_keys, heading, eval_set=eval_set, digits=3)
                name = base if i == 0 else f"{base}_{re.sub(r'[^A-Za-z0-9_.-]', '_', eval_set or 'all')}"
                written += table.write(out, name)
                written.append(plot_extrapolation(table, out / f"{name}.png", f"test/{metric}", lengths))
                sections += ["", table.markdown(), f"![{metric} vs context length{of_set}]({name}.png)"]
    positions = load_eval_context_positions(runs)
    if not positions.empty:
        options = spec.get("position_loss") or {}
        path = out / "loss_by_position.png"
        plot_loss_by_position(
            positions, row_keys, path, bool(options.get("all_lengths", True)), bool(options.get("log_x")), title
        )
        written.append(path)
        sections += ["", "![loss by token position](loss_by_position.png)"]
    passkey = load_passkey(runs)
    if not passkey.empty:
        written += passkey_section(passkey, runs, row_keys, out, spec.get("passkey") or {}, title, sections)
    ok = runs[runs["status"] == "ok"]
    if len(ok):
        tags = ("val/ppl", "val/loss") if language_model else ("val/error", "val/loss")
        written.append(plot_learning_curves(runs, row_keys, out / "learning_curves.png", tags, title=title))
        sections += ["", "![learning curves](learning_curves.png)"]
    maps = copy_position_maps(ok, out / "position_maps")
    if maps:
        sections += ["", "## Position maps", ""]
        sections += [f"![{p.parent.name} {p.stem}]({p.relative_to(out).as_posix()})" for p in maps]
        written += maps
    missing = runs[runs["status"] != "ok"]
    if len(missing):
        missing[["run", "run_dir", "status", "reason"]].to_csv(out / "missing.csv", index=False)
        written.append(out / "missing.csv")
        sections += ["", "## Runs without results", ""]
        sections += [f"- {r.run}: {r.status} — {r.reason}" for r in missing.itertuples()]
    if len(superseded):
        superseded[["run", "run_dir", "step", "reason"]].to_csv(out / "superseded.csv", index=False)
        written.append(out / "superseded.csv")
        sections += ["", "## Superseded runs (re-runs of a run name and seed; not averaged in)", ""]
        sections += [f"- {r.run} (step {step_label(r.step)}): {r.reason}" for r in superseded.itertuples()]
    (out / "README.md").write_text("\n".join(sections) + "\n")
    return written + [out / "README.md"]


def step_label(step: Any) -> str:
    return "?" if pd.isna(step) else str(int(step))


def passkey_section(
    passkey: pd.DataFrame,
    runs: pd.DataFrame,
    row_keys: list[str],
    out: Path,
    options: dict[str, Any],
    title: str,
    sections: list[str],
) -> list[Path]:
    """passkey_rows.csv, the accuracy table by length (mean over depths) and the length x depth heatmaps."""
    passkey.to_csv(out / "passkey_rows.csv", index=False)
    written = [out / "passkey_rows.csv"]
    sections += ["", "## Passkey retrieval", ""]
    heading = f"{title}: passkey exact-match accuracy by evaluated length (mean over depths)"
    table = passkey_table(passkey, runs, "accuracy", row_keys, heading, digits=int(options.get("digits", 2)))
    if table is not None:
        written += table.write(out, "passkey")
        sections += [table.markdown()]
    for metric, name in (("accuracy", "passkey.png"), ("digit_accuracy", "passkey_digits.png")):
        written.append(plot_passkey(passkey, row_keys, out / name, metric, title, runs))
        sections += [f"![passkey {metric.replace('_', ' ')} by length and depth]({name})"]
    return written


def train_lengths(ec: pd.DataFrame, runs: pd.DataFrame, row_keys: list[str]) -> dict[str, int]:
    """Extrapolation table row label -> the training length of its runs."""
    labels = row_labels(ec, varying(runs, row_keys))
    lengths = pd.to_numeric(ec["train_seq_len"], errors="coerce")
    return {row: int(v) for row, v in lengths.groupby(labels).max().dropna().items()}


def copy_position_maps(runs: pd.DataFrame, out: Path) -> list[Path]:
    """PNGs from each run's position_maps/ folder (`cope-pl position-maps RUN`), copied to out/<run>/."""
    copied = []
    for run in runs.itertuples():
        maps_dir = Path(run.run_dir) / POSITION_MAPS_DIR
        for png in sorted(maps_dir.rglob("*.png")):
            target = out / str(run.run).replace("/", "_") / png.relative_to(maps_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            copied.append(Path(shutil.copyfile(png, target)))
    return copied


def build_report(
    runs_roots: str | Path | list[str | Path], out_dir: str | Path, filters: list[str] | None = None
) -> list[Path]:
    roots = [Path(r) for r in (runs_roots if isinstance(runs_roots, list) else [runs_roots])]
    out_dir = Path(out_dir)
    for root in roots:
        if not root.is_dir():
            raise FileNotFoundError(f"runs directory {root} does not exist; train first (make train / ablation)")
    frames = [load_runs(root) for root in roots]
    runs = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    runs = runs.drop_duplicates(subset="run_dir", keep="last", ignore_index=True)  # overlapping folders
    where = ", ".join(str(r) for r in roots)
    if runs.empty:
        raise FileNotFoundError(f"no runs under {where} (looked for results.json and config.yaml)")
    runs = select_runs(runs, filters)
    if runs.empty:
        raise ValueError(f"no runs under {where} match {' and '.join(filters or [])}; see runs.csv's values")
    runs = mark_superseded(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs.to_csv(out_dir / "runs.csv", index=False)
    written = [out_dir / "runs.csv"]
    manifests = {m["name"]: m for root in roots for m in find_manifests(root)}
    for name, group in runs.groupby(runs["sweep"].fillna(""), sort=True):
        manifest = manifests.get(name, {})
        for folder, part in report_parts(name, group):
            part = part.dropna(axis=1, how="all")
            for column in ("sweep", "status", "reason"):
                part[column] = part.get(column)
            written += report_group(
                part, out_dir / folder, manifest.get("report") or {"title": folder}, manifest.get("axes")
            )
    return written


def report_parts(sweep: str, runs: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """A sweep is one report. Runs outside any sweep are one report per data module (`runs-flipflop/`,
    `runs-wikitext/`) when there are several: their test sets and lengths differ, so one table would show each
    module's cells as missing in the other's columns."""
    if sweep:
        return [(sweep, runs)]
    data = runs["data"].fillna("").astype(str) if "data" in runs else pd.Series("", index=runs.index)
    if data.nunique() <= 1:
        return [("runs", runs)]
    short = data.str.replace(r"DataModule$", "", regex=True).str.lower().replace("", "unknown")
    return [(f"runs-{name}", part) for name, part in runs.groupby(short, sort=True)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cope-pl report", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "runs", nargs="*", default=[Path("runs")], type=Path, help="folders holding runs (default runs/)"
    )
    parser.add_argument("--out", default="reports", type=Path, help="output directory (default reports/)")
    parser.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="KEY=PATTERN",
        help="only runs whose runs.csv column KEY matches PATTERN (shell-style, e.g. position=cope*); repeatable",
    )
    args = parser.parse_args(argv)
    written = build_report(list(args.runs), args.out, args.filter)
    for path in written:
        print(path)
    print(f"Report written to {args.out}/ ({len(written)} files)")
