"""Benchmark tables on disk (reports/bench/*.csv and *.md): the same frame for pandas and for docs and notes."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def markdown(df: pd.DataFrame) -> str:
    """A Markdown table (pandas' own needs the optional tabulate package)."""
    cells = [[f"{x:.4g}" if isinstance(x, float) else str(x) for x in row] for row in df.itertuples(index=False)]
    lines = ["| " + " | ".join(df.columns) + " |", "|" + " --- |" * len(df.columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


def write(df: pd.DataFrame, path: Path, title: str, note: str) -> None:
    df.to_csv(path.with_suffix(".csv"), index=False)
    path.with_suffix(".md").write_text(f"# {title}\n\n{note}\n\n{markdown(df)}\n")
