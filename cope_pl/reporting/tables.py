"""Paper-shaped tables from run DataFrames: one row per encoding (or swept setting), one column per test set
or context length, mean ± std over seeds, optional paper numbers as reference rows. Each row says its number of
seeds (n) and the training step its metrics come from. A best value is bold only when it wins beyond the seeds'
spread: every row of the column has at least two seeds and the best mean differs from each other row's by more
than the sum of their standard deviations (so never at n = 1, and never for a tie).

A cell whose runs are all missing says "missing"; one whose encoding cannot represent the length, or a test set
that the row's data does not have, says "n/a" (the reason goes under the table); a cell averaged over fewer seeds
than expected says so, e.g. (2/3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd


@dataclass
class Table:
    title: str
    row_name: str
    rows: list[str]
    columns: list[str]
    mean: dict[tuple[str, str], float]
    std: dict[tuple[str, str], float]
    n: dict[tuple[str, str], int]
    expected: dict[tuple[str, str], int]
    lower_is_better: bool = True
    scale: float = 1.0
    digits: int = 3
    not_applicable: dict[tuple[str, str], str] = field(default_factory=dict)
    paper: dict[str, dict[str, float]] = field(default_factory=dict)
    steps: dict[str, str] = field(default_factory=dict)  # row -> the training step(s) of its metrics

    def spread(self, key: tuple[str, str]) -> float:
        """The std of a cell for error bars: 0 where a single seed has none."""
        return self.std[key] if self.n.get(key, 0) > 1 else 0.0

    def best(self) -> dict[str, set[str]]:
        """Per column, the row that wins beyond the seeds' spread (see the module docstring), if any."""
        best = {}
        for col in self.columns:
            rows = [r for r in self.rows if self.n.get((r, col))]
            if len(rows) < 2 or any(self.n[(r, col)] < 2 for r in rows):
                continue
            sign = 1 if self.lower_is_better else -1
            top = min(rows, key=lambda r: sign * self.mean[(r, col)])
            margin = [
                sign * (self.mean[(r, col)] - self.mean[(top, col)]) - self.std[(r, col)] - self.std[(top, col)]
                for r in rows
                if r != top
            ]
            if all(m > 0 for m in margin):
                best[col] = {top}
        return best

    def row_n(self, row: str) -> str:
        """Seeds behind a row: one number, or the range when its cells differ."""
        counts = sorted({self.n.get((row, c), 0) for c in self.columns} - {0})
        if not counts:
            return "0"
        return str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"

    def cell(self, row: str, col: str) -> str:
        key = (row, col)
        if key in self.not_applicable:
            return "n/a"
        n, expected = self.n.get(key, 0), self.expected.get(key, 0)
        if n == 0:
            return "missing" if expected else ""
        mean = self.mean[key] * self.scale
        text = f"{mean:.{self.digits}f}"
        if n > 1:
            text += f" ± {self.std[key] * self.scale:.{self.digits}f}"
        return text + (f" ({n}/{expected})" if n < expected else "")

    def frame(self) -> pd.DataFrame:
        """Numbers for CSV: <column>_mean, <column>_std (empty for one seed), <column>_n, scaled like the printed
        table, and the row's step."""
        records = []
        for row in self.rows:
            record: dict[str, object] = {self.row_name: row}
            for col in self.columns:
                key = (row, col)
                several = self.n.get(key, 0) > 1
                record[f"{col}_mean"] = self.mean[key] * self.scale if self.n.get(key, 0) else math.nan
                record[f"{col}_std"] = self.std[key] * self.scale if several else math.nan
                record[f"{col}_n"] = self.n.get(key, 0)
            record["step"] = self.steps.get(row, "")
            records.append(record)
        for row, values in self.paper.items():
            record = {self.row_name: f"{row} (paper)"}
            record.update({f"{col}_mean": values.get(col, math.nan) for col in self.columns})
            records.append(record)
        return pd.DataFrame(records)

    def lines(self, bold: str, escape=lambda s: s) -> list[list[str]]:
        best = self.best()
        out = [[escape(self.row_name)] + [escape(c) for c in self.columns] + ["n", "step"]]
        for row in self.rows:
            cells = [escape(self.cell(row, c)) for c in self.columns]
            cells = [bold.format(t) if row in best.get(c, ()) else t for t, c in zip(cells, self.columns)]
            out.append([escape(row)] + cells + [self.row_n(row), escape(self.steps.get(row, ""))])
        for row, values in self.paper.items():
            cells = [f"{values[c]:.{self.digits}f}" if c in values else "" for c in self.columns]
            out.append([escape(f"{row} (paper)")] + cells + ["", ""])
        return out

    def notes(self) -> list[str]:
        """One line per row with n/a cells: where, and the reason given for the first of them."""
        cells: dict[str, list[str]] = {}
        for row, col in self.not_applicable:
            cells.setdefault(row, []).append(col)
        return [
            f"n/a for {row} at {', '.join(cols)}: {self.not_applicable[(row, cols[0])]}" for row, cols in cells.items()
        ]

    def markdown(self) -> str:
        lines = self.lines(bold="**{}**")
        text = [f"### {self.title}", "", "| " + " | ".join(lines[0]) + " |", "|" + " --- |" * len(lines[0])]
        text += ["| " + " | ".join(line) + " |" for line in lines[1:]]
        return "\n".join(text + [""] + [f"- {note}" for note in self.notes()]) + "\n"

    def latex(self) -> str:
        def escape(text: str) -> str:
            for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#")):
                text = text.replace(a, b)
            return text.replace("±", r"$\pm$")

        lines = self.lines(bold="\\textbf{{{}}}", escape=escape)
        body = [" & ".join(lines[0]) + r" \\", r"\midrule"] + [" & ".join(line) + r" \\" for line in lines[1:]]
        return (
            "\n".join(
                [
                    "\\begin{table}[t]",
                    "\\centering",
                    f"\\caption{{{escape(self.title)}}}",
                    "\\begin{tabular}{l" + "c" * (len(self.columns) + 2) + "}",
                    "\\toprule",
                    *body,
                    "\\bottomrule",
                    "\\end{tabular}",
                    "\\end{table}",
                ]
            )
            + "\n"
        )

    def write(self, out_dir: Path, name: str) -> list[Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = [out_dir / f"{name}.csv", out_dir / f"{name}.md", out_dir / f"{name}.tex"]
        self.frame().to_csv(paths[0], index=False)
        paths[1].write_text(self.markdown())
        paths[2].write_text(self.latex())
        return paths


# Building -----------------------------------------------------------------------------------------------
def row_labels(frame: pd.DataFrame, keys: list[str]) -> pd.Series:
    """Join the values of the row keys ('cope', or 'cope / seq_len512' when two keys vary)."""
    return frame[keys].astype(str).agg(" / ".join, axis=1)


def varying(frame: pd.DataFrame, keys: list[str]) -> list[str]:
    """Keys that tell rows apart: those with more than one value, and the encoding always (a legend names
    encodings, also for a single run); the first key when neither applies."""
    present = [k for k in keys if k in frame]
    keep = [k for k in present if frame[k].astype(str).nunique() > 1 or k == "position"]
    return keep or present[:1]


def metric_columns(frame: pd.DataFrame, metric: str) -> dict[str, str]:
    """Columns of a metric family -> column labels: 'test/error@ood' -> 'ood'; plain 'test/error' -> 'test'
    only when no named set exists (the plain name repeats the first named set)."""
    named = {c: c.split("@", 1)[1] for c in frame.columns if c.startswith(metric + "@")}
    if named:
        return named
    return {metric: metric.split("/", 1)[0]} if metric in frame else {}


def step_text(runs: pd.DataFrame, column: str) -> str:
    """The checkpoint step(s) of these runs' metrics ("600", or "300, 600" when they differ)."""
    ok = runs[runs["status"] == "ok"] if "status" in runs else runs
    values = pd.to_numeric(ok[column] if column in ok else pd.Series(dtype=float), errors="coerce")
    if values.isna().all() and column != "step":
        values = pd.to_numeric(ok["step"], errors="coerce") if "step" in ok else values
    return ", ".join(str(int(v)) for v in sorted(values.dropna().unique()))


def metric_table(
    runs: pd.DataFrame, metric: str, row_keys: list[str], title: str, lower_is_better: bool = True, **options
) -> Table | None:
    columns = metric_columns(runs, metric)
    if not columns:
        return None
    keys = varying(runs, row_keys)
    labels = row_labels(runs, keys)
    table = Table(title, " / ".join(keys), list(dict.fromkeys(labels)), list(columns.values()), {}, {}, {}, {})
    table.lower_is_better = lower_is_better
    for option, value in options.items():
        setattr(table, option, value)
    step_column = "test_step" if metric.startswith("test/") else "val_step"
    for row in table.rows:
        group = runs[labels == row]
        table.steps[row] = step_text(group, step_column)
        values_of = {col: pd.to_numeric(group[column], errors="coerce").dropna() for column, col in columns.items()}
        # Test sets this row's runs report: a column outside them belongs to another data module's sets (a sweep
        # over Flip-Flop and Counting, say), which is n/a for this row, not a missing result.
        reported = [col for col, values in values_of.items() if len(values)]
        for col, values in values_of.items():
            key = (row, col)
            table.expected[key], table.n[key] = len(group), len(values)
            table.mean[key] = float(values.mean()) if len(values) else math.nan
            table.std[key] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
            if reported and col not in reported:
                table.not_applicable[key] = f"not a test set of this data (its sets: {', '.join(reported)})"
    return table


def extrapolation_table(
    ec: pd.DataFrame,
    runs: pd.DataFrame,
    metric: str,
    row_keys: list[str],
    title: str,
    eval_set: str | None = None,
    **options,
) -> Table | None:
    """Rows: encodings; columns: evaluation context lengths; N/A where the encoding cannot represent it.

    `runs` (one row per run, missing ones included) sets how many seeds each row expects.
    """
    if ec.empty:
        return None
    ec = ec[ec["set"].fillna("") == (eval_set if eval_set is not None else ec["set"].fillna("").iloc[0])]
    keys = varying(runs, row_keys)
    labels = row_labels(ec, keys)
    run_labels = row_labels(runs, keys)
    lengths = sorted(ec["seq_len"].dropna().astype(int).unique())
    # Rows scored with RoPE scaling (`rope+yarn×4`) are rows of their own, expecting as many runs as were scored.
    rows = list(dict.fromkeys(list(run_labels) + list(labels)))
    table = Table(title, " / ".join(keys), rows, [str(t) for t in lengths], {}, {}, {}, {})
    for option, value in options.items():
        setattr(table, option, value)
    for row in table.rows:
        group = ec[labels == row]
        expected = int((run_labels == row).sum()) or int(group["run_dir"].nunique() if "run_dir" in group else 1)
        # The scored checkpoint's step where the rows name it (eval-context, passkey), else the run's.
        scored = "checkpoint_step" in group and group["checkpoint_step"].notna().any()
        table.steps[row] = step_text(group, "checkpoint_step") if scored else step_text(runs[run_labels == row], "step")
        for length in lengths:
            cell = group[group["seq_len"] == length]
            key = (row, str(length))
            ok = cell[cell["status"] == "ok"]
            values = pd.to_numeric(ok[metric], errors="coerce").dropna()
            table.expected[key], table.n[key] = expected, len(values)
            table.mean[key] = float(values.mean()) if len(values) else math.nan
            table.std[key] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
            not_ok = cell[cell["status"] != "ok"]
            if len(values) == 0 and len(not_ok):
                table.not_applicable[key] = str(not_ok["reason"].iloc[0])
    return table


def passkey_table(
    passkey: pd.DataFrame, runs: pd.DataFrame, metric: str, row_keys: list[str], title: str, **options
) -> Table | None:
    """Rows: encodings; columns: evaluated lengths; each run's metric averaged over the needle depths, then
    mean ± std over seeds (higher is better). N/A where the encoding cannot represent the length."""
    if passkey.empty:
        return None
    per_run = []
    by = ["run_dir", "seq_len"] + (["rope_scaling"] if "rope_scaling" in passkey else [])
    for _, group in passkey.groupby(by, sort=True, dropna=False):
        ok = group[group["status"] == "ok"]
        row = group.iloc[0].to_dict()
        if len(ok):
            row.update(status="ok", reason="")
        row[metric] = float(pd.to_numeric(ok[metric], errors="coerce").mean()) if len(ok) else math.nan
        per_run.append(row)
    frame = pd.DataFrame(per_run).assign(set="")
    return extrapolation_table(frame, runs, metric, row_keys, title, lower_is_better=False, **options)
