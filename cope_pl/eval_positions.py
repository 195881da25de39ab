"""Loss by token position for eval-context: `eval_context_positions.csv` beside `eval_context.json`.

One row per (run, length, eval set, bucket of positions): the mean NLL in nats of the scored tokens whose
0-based position within the window lies in [bucket_start, bucket_end), and how many there were. Buckets
cover 0..seq_len; one without scored tokens (e.g. the prefix of the copy task) has tokens 0 and no loss.
The token-weighted mean of a length's bucket losses is its `loss` in eval_context.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from cope_pl.atomic import merge_csv_atomic
from cope_pl.runs import POSITIONS_FILE

POSITION_COLUMNS = (
    "run",
    "position",
    "rope_scaling",
    "train_seq_len",
    "seq_len",
    "set",
    "stride",
    "bucket_start",
    "bucket_end",
    "tokens",
    "loss",
)


def bucket_rows(row: dict[str, Any], nll: Tensor, tokens: Tensor, bucket: int) -> list[dict[str, Any]]:
    """Rows of one (length, set) from per-position sums: nll (T,) and scored-token counts (T,)."""
    if bucket < 1:
        raise ValueError(f"--bucket must be >= 1 positions, got {bucket}")
    length = nll.numel()
    rows = []
    for start in range(0, length, bucket):
        end = min(start + bucket, length)
        count = int(tokens[start:end].sum())
        loss = float(nll[start:end].sum()) / count if count else None
        rows.append({**row, "bucket_start": start, "bucket_end": end, "tokens": count, "loss": loss})
    return rows


def position_key(row: dict[str, Any]) -> tuple[int, str, str, str]:
    """(length, set, stride, RoPE scaling): a sliding-window or RoPE-scaled evaluation of a length keeps its own
    rows. Read back from the CSV every value is text, hence the stride as text ('' without one)."""
    stride = row.get("stride")
    return (
        int(row["seq_len"]),
        row["set"] or "",
        "" if stride in (None, "") else str(stride),
        row.get("rope_scaling") or "",
    )


def save_position_rows(run: Path, rows: list[dict[str, Any]]) -> None:
    """Merge rows into the run's positions CSV: a re-evaluated (length, set) replaces all its old rows."""
    order = lambda r: (*position_key(r), int(r["bucket_start"]))  # noqa: E731
    merge_csv_atomic(run / POSITIONS_FILE, POSITION_COLUMNS, rows, key=position_key, order=order)
