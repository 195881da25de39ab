"""Read finished runs from disk into pandas DataFrames: one row per run, per eval-context length, per curve point.

Sources, in order of trust: each run's `results.json` (final metrics, model and data settings) and
`config.yaml` (seed, full config), `eval_context.json` (scores per context length),
`eval_context_positions.csv` (loss per token-position bucket at each length), `passkey.csv` (passkey
accuracy per length and depth, from `cope-pl passkey`), the sweep manifest
`sweep.json` (the swept keys of each cell, and which cells should exist), and the TensorBoard event files
(learning curves only). A run a sweep expects but that has no results is kept as a row with status
"missing" or "failed", so a table can say what it lacks instead of silently averaging fewer seeds.

Replicates are distinct seeds: other versions (`version_N`) of one run name with the same seeds are re-runs, and
`mark_superseded` keeps the newest finished one (`select_runs` first narrows the runs to what a report asks for).
"""

from __future__ import annotations

import fnmatch
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from cope_pl.results import fit_finished, read_results
from cope_pl.runs import (
    CONFIG_FILE,
    EVAL_CONTEXT_FILE,
    PASSKEY_FILE,
    POSITIONS_FILE,
    RESULTS_FILE,
    load_config,
    run_label,
    sweep_cell_dir,
    sweep_status_file,
    version_of,
)
from cope_pl.sweep import MANIFEST

# step: the step the fit trained to; val_step, test_step: the checkpoint steps its val/ and test/ metrics come from.
RUN_COLUMNS = ["sweep", "cell", "run", "run_dir", "status", "reason", "data", "position", "seed", "seq_len", "step"]
RUN_COLUMNS += ["val_step", "test_step", "data_seed"]


def find_manifests(root: Path) -> list[dict[str, Any]]:
    manifests = []
    for path in sorted(Path(root).rglob(MANIFEST)):
        manifest = json.loads(path.read_text())
        manifest["save_dir"] = str(path.parent)
        manifests.append(manifest)
    return manifests


def find_run_dirs(root: Path) -> list[Path]:
    """Directories that hold a run's config.yaml or results.json (checkpoint folders excluded)."""
    dirs = {p.parent for name in (RESULTS_FILE, CONFIG_FILE) for p in Path(root).rglob(name)}
    return sorted(d for d in dirs if d.name != "checkpoints")


def is_retest(results: dict[str, Any]) -> bool:
    """A directory that only tested another run's checkpoint (the old `cope-pl test --config ...` form made a
    new version_N): it trained nothing, so it is no replicate of anything."""
    return not fit_finished(results)


def run_row(run_dir: Path) -> dict[str, Any] | None:
    """One run: its settings and final metrics (status 'ok'), 'incomplete' without results.json, or None for
    a directory that only re-tested another run."""
    row: dict[str, Any] = {"run": run_label(run_dir), "run_dir": str(run_dir)}
    config = load_config(run_dir) if (run_dir / CONFIG_FILE).is_file() else {}
    row["seed"] = config.get("seed_everything")
    row["data_seed"] = ((config.get("data") or {}).get("init_args") or {}).get("seed")
    results_path = run_dir / RESULTS_FILE
    if not results_path.is_file():
        model = config.get("model") or {}
        data = config.get("data") or {}
        row.update(status="incomplete", reason="no results.json (training did not finish)")
        row.update(position=model.get("position"), data=str(data.get("class_path", "")).rsplit(".", 1)[-1])
        row["seq_len"] = (data.get("init_args") or {}).get("seq_len")
        return row
    results = read_results(results_path)
    if is_retest(results):
        return None
    steps = results.get("steps", {})
    row.update(status="ok", reason="", step=results.get("global_step"))
    row.update(val_step=steps.get("fit", steps.get("validation")), test_step=steps.get("test"))
    row.update(position=results["model"].get("position"), data=results["data"].get("class"))
    row["seq_len"] = results["data"].get("seq_len")
    row.update(results.get("metrics", {}))
    return row


def cell_reason(save_dir: Path, cell: str) -> tuple[str, str]:
    status_file = sweep_status_file(save_dir, cell)
    if status_file.is_file():
        status = json.loads(status_file.read_text())
        if status.get("status") == "failed":
            return "failed", f"failed at {status.get('step')} (log: {status.get('log', 'see status file')})"
    return "missing", "not run yet (no results.json)"


def load_runs(root: str | Path) -> pd.DataFrame:
    """Every run under root; runs of a sweep get its swept keys as columns, and absent cells a row."""
    root = Path(root)
    rows: dict[str, dict[str, Any]] = {}
    for run_dir in find_run_dirs(root):
        row = run_row(run_dir)
        if row is not None:
            rows[str(run_dir.resolve())] = row
    for manifest in find_manifests(root):
        save_dir = Path(manifest["save_dir"])
        for cell in manifest["cells"]:
            run_dir = sweep_cell_dir(save_dir, cell["name"])
            key = str(run_dir.resolve())
            row = rows.get(key)
            if row is None or row["status"] != "ok":
                status, reason = cell_reason(save_dir, cell["name"])
                row = {**(row or {}), "run": run_label(run_dir), "run_dir": str(run_dir)}
                row.update(status=status, reason=reason)
            keys = dict(cell["keys"])
            if "seed" in keys:  # the label "seed3" -> 3, like the seed read from config.yaml
                keys["seed"] = int(str(keys["seed"]).removeprefix("seed"))
            row.update(sweep=manifest["name"], cell=cell["name"], **keys)
            rows[key] = row
    frame = pd.DataFrame(list(rows.values()))
    for column in RUN_COLUMNS:
        if column not in frame:
            frame[column] = None
    metrics = sorted(c for c in frame.columns if c.startswith(("val/", "test/")))
    others = [c for c in frame.columns if c not in RUN_COLUMNS and c not in metrics]
    return frame[RUN_COLUMNS + others + metrics]


def select_runs(runs: pd.DataFrame, filters: list[str] | None) -> pd.DataFrame:
    """Runs whose columns match every `KEY=PATTERN` (shell-style: `position=cope*`, `step=600`)."""
    for text in filters or []:
        key, sep, pattern = text.partition("=")
        if not sep or key not in runs:
            raise ValueError(
                f"report filter {text!r}: give KEY=PATTERN with KEY a column of runs.csv ({', '.join(runs.columns)})"
            )
        runs = runs[[fnmatch.fnmatchcase(cell_text(v), pattern) for v in runs[key]]]
    return runs


def cell_text(value: Any) -> str:
    """A runs.csv value as a filter sees it: a step read as 600.0 is "600", an absent value ""."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def mark_superseded(runs: pd.DataFrame) -> pd.DataFrame:
    """Versions of one run name with the same seed and data seed are re-runs, not replicates: the newest finished
    version (the newest at all when none finished) stands; the others get status 'superseded'."""
    runs = runs.copy()
    versioned = runs[runs["run_dir"].map(lambda d: version_of(Path(d)) is not None)]
    keys = [
        versioned["run_dir"].map(lambda d: str(Path(d).resolve().parent)),
        versioned["seed"].map(cell_text),
        versioned["data_seed"].map(cell_text),
    ]
    for _, group in versioned.groupby(keys, sort=False, dropna=False):
        if len(group) < 2:
            continue
        order = group.assign(
            finished=group["status"] == "ok", version=group["run_dir"].map(lambda d: version_of(Path(d)))
        ).sort_values(["finished", "version"])
        newest = order.iloc[-1]
        for index in order.index[:-1]:
            runs.loc[index, "status"] = "superseded"
            runs.loc[index, "reason"] = f"re-run of the same name and seed; {newest['run']} is used"
    return runs


def grid_labels(run: pd.Series) -> dict[str, Any]:
    """What a per-length row inherits from its run: settings and swept keys, not metrics or the run's seq_len."""
    skip = ("status", "reason", "seq_len")
    return {k: v for k, v in run.items() if not str(k).startswith(("val/", "test/")) and k not in skip}


def label_rope_scaling(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows scored with RoPE scaling (`--rope-scaling yarn --rope-factor 4`) name it after the encoding,
    `rope+yarn×4`, so that tables and plots show them as rows of their own."""
    if "rope_scaling" not in frame:
        return frame
    scaling = frame["rope_scaling"].fillna("").astype(str)
    frame["rope_scaling"] = scaling
    if "position" in frame:
        frame["position"] = (
            frame["position"].astype(str).where(scaling == "", frame["position"].astype(str) + "+" + scaling)
        )
    return frame


def load_eval_context(runs: pd.DataFrame) -> pd.DataFrame:
    """Rows of every run's eval_context.json, with the run's swept keys and seed attached."""
    frames = []
    for _, run in runs.iterrows():
        path = Path(run["run_dir"]) / EVAL_CONTEXT_FILE
        if not path.is_file():
            continue
        frame = pd.DataFrame(json.loads(path.read_text())).drop(columns=["run", "position"], errors="ignore")
        for column, value in grid_labels(run).items():
            frame[column] = value
        frames.append(label_rope_scaling(frame))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def load_eval_context_positions(runs: pd.DataFrame) -> pd.DataFrame:
    """Rows of every run's eval_context_positions.csv (loss per position bucket), with the run's swept keys
    and seed attached; runs without the file are skipped."""
    frames = []
    for _, run in runs.iterrows():
        path = Path(run["run_dir"]) / POSITIONS_FILE
        if not path.is_file():
            continue
        frame = pd.read_csv(path, keep_default_na=False, na_values=[""]).drop(columns=["run", "position"])
        frame["set"] = frame["set"].fillna("").astype(str)
        for column, value in grid_labels(run).items():
            frame[column] = value
        frames.append(label_rope_scaling(frame))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def load_passkey(runs: pd.DataFrame) -> pd.DataFrame:
    """Rows of every run's passkey.csv (accuracy per length and depth), with the run's swept keys and seed
    attached; runs without the file are skipped."""
    frames = []
    for _, run in runs.iterrows():
        path = Path(run["run_dir"]) / PASSKEY_FILE
        if not path.is_file():
            continue
        frame = pd.read_csv(path, keep_default_na=False, na_values=[""]).drop(columns=["run", "position"])
        frame["reason"] = frame["reason"].fillna("").astype(str)
        for column, value in grid_labels(run).items():
            frame[column] = value
        frames.append(label_rope_scaling(frame))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def load_curves(run_dir: str | Path, tags: tuple[str, ...] = ("train/loss", "val/loss")) -> pd.DataFrame:
    """(tag, step, value) scalars from a run's TensorBoard event files; a tag also brings its per-set variants
    (`val/error` -> `val/error@in_dist`, ...)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points = []
    for events in sorted(Path(run_dir).glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        available = set(acc.Tags().get("scalars", []))
        for tag in sorted(a for a in available if a in tags or a.split("@")[0] in tags):
            points += [(tag, e.step, e.value) for e in acc.Scalars(tag)]
    return pd.DataFrame(points, columns=["tag", "step", "value"])
