"""Files written whole or not at all: write beside the target, then rename over it.

A reader (another rank, a report, a resumed run) sees the old file or the new one, never half of one; a
failed write leaves no temporary file behind.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write to; it replaces `path` when the block ends without error."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # per process: concurrent writers never share one
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True))


def merge_csv_atomic(
    path: Path, columns: Sequence[str], rows: list[dict[str, Any]], key: Callable[[dict[str, Any]], Any], order=None
) -> None:
    """Merge rows into a CSV file: old rows whose key(row) a new row has are replaced (all of them), the rest kept;
    rows sorted by order(row) (default: key). Rows read back from the file hold text, so key must accept both."""
    old = []
    if Path(path).exists():
        with open(path, newline="") as f:
            old = list(csv.DictReader(f))
    fresh = {key(r) for r in rows}
    merged = [r for r in old if key(r) not in fresh] + list(rows)
    write_csv_atomic(path, columns, sorted(merged, key=order or key))


def write_csv_atomic(path: Path, columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> None:
    """A CSV file with exactly these columns (keys of a row outside them are left out, missing ones empty)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, text.getvalue())
