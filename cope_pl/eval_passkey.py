"""Score a passkey run at longer contexts than it was trained on, at every depth of the needle.

`cope-pl passkey RUN --lengths 1x 2x 4x 8x` re-creates the run's passkey data module from its saved config
with `seq_len` set to each length, scores its test split (one set per depth, the same keys at every length
and depth) with the checkpoint, and writes one row per (run, length, depth) into the run's `passkey.csv`:
`accuracy` is the share of sequences with every key digit right (exact match), `digit_accuracy` the share of
key digits right, `loss` the mean NLL of the key digits. A re-scored (length, depth) replaces its old row.

An encoding that cannot represent a length (a learned absolute table past model.max_seq_len, an uncapped
relative table) raises ValueError from `position.check_length`; its rows say "n/a" with the reason and have
no accuracy, never one scored with wrapped or clipped positions.

`--rope-scaling linear|dynamic|yarn --rope-factor 4` scores a RoPE model with scaled frequencies, as
`cope-pl eval-context` does; its rows carry `rope_scaling` (`yarn×4`) beside the unscaled ones.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from cope_pl.atomic import merge_csv_atomic, write_csv_atomic
from cope_pl.data.base import IGNORE_INDEX
from cope_pl.data.passkey import EVAL_DEPTHS, PasskeyDataModule
from cope_pl.eval_context import (
    add_rope_scaling_arguments,
    fitting_batch_size,
    parse_lengths,
    progress,
    scale_rope,
    score_batch,
)
from cope_pl.runs import (
    PASSKEY_FILE,
    build_datamodule,
    import_class,
    load_config,
    resolve_run,
    run_label,
    train_seq_len,
)

COLUMNS = (
    "run",
    "position",
    "rope_scaling",
    "train_seq_len",
    "checkpoint_step",
    "seq_len",
    "factor",
    "depth",
    "samples",
    "status",
    "reason",
    "accuracy",
    "digit_accuracy",
    "loss",
)
LENGTHS = ("1x", "2x", "4x", "8x")
SUMS = ("nll", "tokens", "token_errors", "sequences", "sequence_errors")


def check_passkey_run(config: dict[str, Any], run: Path) -> None:
    class_path = str((config.get("data") or {}).get("class_path", ""))
    cls = import_class(class_path) if class_path else None
    if cls is None or not issubclass(cls, PasskeyDataModule):
        raise ValueError(
            f"{run} was trained on data.class_path {class_path or '(none)'!r}, not cope_pl.data.PasskeyDataModule; "
            "score other tasks with cope-pl eval-context"
        )


def passkey_datamodule(config: dict[str, Any], seq_len: int, depths: list[float] | None, samples: int | None):
    """The run's passkey data at seq_len (optionally other depths or a number of samples per depth), test split."""
    overrides: dict[str, Any] = {"seq_len": seq_len}
    if depths is not None:
        overrides["depths"] = depths
    if samples is not None:
        overrides["eval_size"] = samples
    dm = build_datamodule(config, **overrides)
    dm.setup("test")
    return dm


def score_sequences(model, loader: DataLoader, device: torch.device) -> dict[str, float]:
    """Exact-match accuracy, per-digit accuracy and loss of the scored (key) tokens over a loader."""
    totals = dict.fromkeys(SUMS, 0.0)
    ignore_index = model.hparams.get("ignore_index", IGNORE_INDEX) if hasattr(model, "hparams") else IGNORE_INDEX
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "labels")}
        sums = score_batch(model, batch, ignore_index)
        for key in totals:
            totals[key] += float(sums[key])
    sequences, tokens = max(totals["sequences"], 1.0), max(totals["tokens"], 1.0)
    return {
        "samples": int(totals["sequences"]),
        "accuracy": 1 - totals["sequence_errors"] / sequences,
        "digit_accuracy": 1 - totals["token_errors"] / tokens,
        "loss": totals["nll"] / tokens,
    }


def configured_depths(config: dict[str, Any], depths: list[float] | None) -> list[float]:
    """The depths to score: given ones, else the run's data.depths, else the module's default."""
    if depths is not None:
        return [float(d) for d in depths]
    saved = ((config.get("data") or {}).get("init_args") or {}).get("depths")
    return [float(d) for d in (saved if saved is not None else EVAL_DEPTHS)]


def evaluate_passkey(
    path: str | Path,
    lengths: Iterable[str | int | float] = LENGTHS,
    depths: list[float] | None = None,
    samples: int | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    memory_gb: float | None = None,
    rope_scaling: str | None = None,
    rope_factor: float | None = None,
) -> list[dict[str, Any]]:
    """One row per (length, depth) for one run (a run directory or a checkpoint file), merged into the run's
    passkey.csv. Progress goes to stderr, a line per length."""
    from cope_pl.resume import load_trained

    run, ckpt = resolve_run(path)
    config = load_config(run)
    check_passkey_run(config, run)
    if samples is not None and samples < 1:
        raise ValueError(f"--samples must be >= 1 sequences per depth, got {samples}")
    train_len = train_seq_len(config)
    depths = configured_depths(config, depths)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_trained(ckpt, map_location=dev).eval()
    scaling = scale_rope(model, rope_scaling, rope_factor, train_len)
    budget = memory_gb * 2**30 if memory_gb else None
    base = {"run": run_label(run), "position": model.hparams.position, "rope_scaling": scaling}
    base["train_seq_len"] = train_len
    base["checkpoint_step"] = model.checkpoint_step  # the training step of the scored weights
    rows: list[dict[str, Any]] = []
    todo = parse_lengths(lengths, train_len)
    for step, seq_len in enumerate(todo, 1):
        start = time.perf_counter()
        tag = f"[{step}/{len(todo)}] {base['run']} seq_len {seq_len}"
        row = {**base, "seq_len": seq_len, "factor": round(seq_len / train_len, 3) if train_len else None}
        try:
            model.model.position.check_length(seq_len)
        except ValueError as err:
            rows += [{**row, "depth": d, "samples": 0, "status": "n/a", "reason": str(err)} for d in depths]
            progress(f"{tag}: n/a, {err}")
            continue
        try:
            dm = passkey_datamodule(config, seq_len, depths, samples)
        except ValueError as err:  # the passkey does not fit this length (shorter than key and question)
            rows += [{**row, "depth": d, "samples": 0, "status": "invalid", "reason": str(err)} for d in depths]
            progress(f"{tag}: invalid data at this length, {err}")
            continue
        size = fitting_batch_size(model, seq_len, batch_size or dm.batch_size, dev, budget)
        progress(f"{tag}: scoring {len(dm.depths)} depths, batch size {size} ...")
        for name, depth in dm.depth_of.items():
            loader = DataLoader(dm.eval_sets[name], batch_size=size)
            with torch.inference_mode():
                metrics = score_sequences(model, loader, dev)
            rows.append({**row, "depth": depth, "status": "ok", "reason": "", **metrics})
        progress(f"{tag}: done in {time.perf_counter() - start:.1f} s")
    save_rows(run, rows)
    return rows


def row_key(row: dict[str, Any]) -> tuple[int, float, str]:
    """(length, depth, RoPE scaling); read back from the CSV every value is text."""
    return int(row["seq_len"]), float(row["depth"]), row.get("rope_scaling") or ""


def save_rows(run: Path, rows: list[dict[str, Any]]) -> None:
    """Merge rows into the run's passkey.csv (a re-scored (length, depth) replaces its old row)."""
    merge_csv_atomic(run / PASSKEY_FILE, COLUMNS, rows, key=row_key)


def format_rows(rows: list[dict[str, Any]]) -> Iterator[str]:
    yield f"{'run':32} {'len':>6} {'depth':>6} {'samples':>8} {'accuracy':>9} {'digit_acc':>9}"
    for r in rows:
        run = f"{r['run']} {r['rope_scaling']}" if r.get("rope_scaling") else r["run"]
        head = f"{run:32} {r['seq_len']:>6} {r['depth']:>6.2f}"
        if r["status"] != "ok":
            yield f"{head} {r['status']:>8}  {r['reason']}"
            continue
        yield f"{head} {r['samples']:>8} {r['accuracy']:9.3f} {r['digit_accuracy']:9.3f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cope-pl passkey", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="passkey run directories (runs/<name>/version_N) or checkpoints")
    parser.add_argument("--lengths", nargs="+", default=list(LENGTHS), help="512 or 2x (default 1x 2x 4x 8x)")
    parser.add_argument("--depths", nargs="+", type=float, default=None, help="default: the run's data.depths")
    parser.add_argument("--samples", type=int, default=None, help="sequences per depth (default data.eval_size)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the run's data.batch_size")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--memory-gb", type=float, default=None, help="memory budget for the attention logits")
    parser.add_argument("--out", type=Path, default=None, help="also write all rows to this CSV file")
    add_rope_scaling_arguments(parser)
    args = parser.parse_args(argv)
    rows = []
    for run in args.runs:
        rows += evaluate_passkey(
            run,
            args.lengths,
            args.depths,
            args.samples,
            args.batch_size,
            args.device,
            args.memory_gb,
            rope_scaling=args.rope_scaling,
            rope_factor=args.rope_factor,
        )
    print("\n".join(format_rows(rows)))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_csv_atomic(args.out, COLUMNS, rows)
        print(f"Rows written to {args.out}")
