"""Score a trained run at longer (or shorter) contexts than it was trained on.

`cope-pl eval-context RUN --lengths 1x 2x 4x` re-creates the run's data module from its saved config with
`seq_len` set to each length, scores its test split with the checkpoint, and writes one row per
(run, length, eval set): loss, token perplexity, word perplexity (when the data knows its tokens per word)
and token error, merged into the run's eval_context.json. The same NLL by token position, in buckets of
`--bucket` positions, goes to eval_context_positions.csv beside it (see cope_pl/eval_positions.py). Windows
do not overlap unless `--stride` asks for a sliding window over a flat token stream. Every length scores the
same tokens: the whole test split, or its first `--limit-tokens N` tokens.

An encoding that cannot represent a length (a learned absolute table, or an uncapped relative table shorter
than the context) raises ValueError from `position.check_length`; that row is reported as "n/a" with the
reason, never scored with wrapped or clipped positions.

`--rope-scaling linear|dynamic|yarn --rope-factor 4` scores a RoPE model with its frequencies scaled as Hugging
Face's rope_type of that name does (cope_pl/position/rope_scaling.py); its rows carry `rope_scaling` (`yarn×4`),
are kept beside the unscaled rows of the same length, and a report names them `rope+yarn×4`.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from cope_pl.atomic import write_csv_atomic, write_text_atomic
from cope_pl.data.base import IGNORE_INDEX
from cope_pl.data.windows import SlidingWindows
from cope_pl.eval_positions import bucket_rows, save_position_rows
from cope_pl.metrics import batch_sums, perplexity
from cope_pl.position.rope_scaling import ROPE_TYPES, apply_rope_scaling
from cope_pl.runs import (
    EVAL_CONTEXT_FILE,
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
    "seq_len",
    "factor",
    "set",
    "stride",
    "status",
    "reason",
    "loss",
    "ppl",
    "word_ppl",
    "error",
    "tokens",
)
# Bytes per (query, key) pair of one head that the explicit-softmax path keeps alive at once (logits, mask,
# CoPE gates, positions, their floor/ceil indices, interpolation): a deliberate over-estimate.
LOGIT_BYTES_PER_PAIR = 48
BUCKET = 32  # positions per bucket of the per-position loss


def parse_lengths(specs: Iterable[str | int | float], train_len: int) -> list[int]:
    """'512' is a length; '2x' or '2.5x' a multiple of the training length, rounded to an integer."""
    lengths = []
    for spec in specs:
        text = str(spec).strip()
        multiple = text.endswith("x")
        try:
            value = float(text[:-1]) if multiple else int(text)
        except ValueError:
            raise ValueError(
                f"--lengths: {text!r} is neither a number of tokens (e.g. 512) nor a multiple of the training "
                "length (e.g. 2x)"
            ) from None
        if multiple:
            if train_len < 1:
                raise ValueError(f"length {text!r} is a multiple, but the run's config has no data seq_len")
            value = round(value * train_len)
        lengths.append(value)
        if lengths[-1] < 1:
            raise ValueError(f"--lengths: {text!r} gives {lengths[-1]} tokens; every length must be >= 1")
    return lengths


def stream_loaders(dm, seq_len: int, stride: int, batch_size: int) -> dict[str, DataLoader]:
    stream = getattr(dm, "token_stream", None)
    if stream is None:
        raise ValueError(
            f"--stride needs a flat token stream, but {type(dm).__name__} has no token_stream(split) method; "
            "score it with non-overlapping windows (leave out --stride)"
        )
    tokens = torch.as_tensor(stream("test"))
    return {"": DataLoader(SlidingWindows(tokens, seq_len, stride), batch_size=batch_size)}


# Scoring ------------------------------------------------------------------------------------------------
def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def fitting_batch_size(model, seq_len: int, batch_size: int, device: torch.device, budget: float | None) -> int:
    """The largest batch (<= batch_size) whose full (B, H, T, T) logit tensors fit in `budget` bytes.

    Only the explicit attention backend holds the full matrix (SDPA and the CoPE ops keep O(T) memory per head,
    see `cope_pl.attention`). The budget defaults to 80% of free GPU memory; on CPU there is no cap unless one
    is given.
    """
    position = model.model.position
    if model.model.attention_backend() != "explicit":
        return batch_size
    if budget is None and device.type == "cuda":
        budget = 0.8 * torch.cuda.mem_get_info(device)[0]
    if budget is None:
        return batch_size
    per_sequence = LOGIT_BYTES_PER_PAIR * position.dims.n_heads * seq_len * seq_len
    fits = int(budget // per_sequence)
    if fits < 1:
        raise MemoryError(
            f"one sequence of {seq_len} tokens needs about {per_sequence / 2**30:.1f} GiB for the full attention "
            f"logits of {position.name!r} (budget {budget / 2**30:.1f} GiB); lower --lengths, or raise --memory-gb"
        )
    return min(batch_size, fits)


def score_batch(model, batch: dict[str, Tensor], ignore_index: int) -> dict[str, float | Tensor]:
    """Sums for one batch, the per-position ones as float64 (T,) tensors on the CPU; on out-of-memory the
    batch is split in two (sums add up exactly)."""
    try:
        logits = model(batch["input_ids"])  # (B, T, V)
        sums = batch_sums(logits, batch["labels"], ignore_index, by_position=True)
        return {k: v.double().cpu() if v.dim() else float(v) for k, v in sums.items()}
    except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
        size = batch["input_ids"].size(0)
        if not is_oom(err):
            raise
        if size == 1:
            raise MemoryError(
                f"one sequence of {batch['input_ids'].size(1)} tokens does not fit in memory; lower --lengths"
            ) from err
        torch.cuda.empty_cache()
        halves = [{k: v[: size // 2] for k, v in batch.items()}, {k: v[size // 2 :] for k, v in batch.items()}]
        parts = [score_batch(model, half, ignore_index) for half in halves]
        return {k: parts[0][k] + parts[1][k] for k in parts[0]}


def first_targets(batches: Iterable[dict[str, Tensor]], limit: int | None, ignore_index: int) -> Iterator[dict]:
    """The batches with only their first `limit` scored targets, in loader order, left scored (later labels
    become ignore_index), stopping once they are all in; every batch unchanged when limit is None.

    Evaluation windows walk the split in order, so at every length the kept targets are the same first `limit`
    tokens of the split, whatever the windows and batches look like."""
    left = limit
    for batch in batches:
        if left is not None and left <= 0:
            return
        if left is not None:
            scored = batch["labels"] != ignore_index  # (B, T)
            order = scored.flatten().cumsum(0).view_as(scored)  # (B, T): 1, 2, ... over the scored targets
            batch = {**batch, "labels": batch["labels"].masked_fill(~scored | (order > left), ignore_index)}
            left -= int(scored.sum())
        yield batch


def score_loader(
    model, loader: DataLoader, device: torch.device, limit_tokens: int | None
) -> dict[str, float | Tensor]:
    totals = dict.fromkeys(("nll", "tokens", "token_errors", "position_nll", "position_tokens"), 0.0)
    ignore_index = model.hparams.get("ignore_index", IGNORE_INDEX)
    for batch in first_targets(loader, limit_tokens, ignore_index):
        batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "labels")}
        sums = score_batch(model, batch, ignore_index)
        for key in totals:
            totals[key] += sums[key]
    return totals


def metrics_from_sums(totals: dict[str, float], tokens_per_word: float | None) -> dict[str, float | None]:
    tokens = max(totals["tokens"], 1.0)
    loss = totals["nll"] / tokens
    return {
        "loss": loss,
        "ppl": perplexity(loss),
        "word_ppl": perplexity(loss, tokens_per_word) if tokens_per_word else None,
        "error": totals["token_errors"] / tokens,
        "tokens": int(totals["tokens"]),
    }


def datamodule_at(config: dict[str, Any], seq_len: int, batch_size: int | None):
    """The run's data module with seq_len (and optionally batch_size) overridden and per-length validation
    sets switched off, so each call scores exactly one length."""
    overrides: dict[str, Any] = {"seq_len": seq_len}
    if batch_size is not None:
        overrides["batch_size"] = batch_size
    cls = import_class(config["data"]["class_path"])
    if "eval_seq_lens" in inspect.signature(cls.__init__).parameters:
        overrides["eval_seq_lens"] = None
    dm = build_datamodule(config, **overrides)
    dm.prepare_data()
    dm.setup("test")
    return dm


def test_loaders(dm) -> dict[str, DataLoader]:
    loaders = dm.test_dataloader()
    loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
    names = list(getattr(dm, "eval_names", None) or [""] * len(loaders))
    return dict(zip(names, loaders))


def evaluate_context(
    path: str | Path,
    lengths: Iterable[str | int | float],
    stride: int | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    limit_tokens: int | None = None,
    memory_gb: float | None = None,
    bucket: int = BUCKET,
    rope_scaling: str | None = None,
    rope_factor: float | None = None,
) -> list[dict[str, Any]]:
    """One row per (length, eval set) for one run (a run directory or a checkpoint file); the loss by
    position of each goes to the run's positions CSV. Progress goes to stderr, a line per length."""
    from cope_pl.resume import load_trained

    if bucket < 1:
        raise ValueError(f"--bucket must be >= 1 positions, got {bucket}")
    if limit_tokens is not None and limit_tokens < 1:
        raise ValueError(f"--limit-tokens must be >= 1 tokens, got {limit_tokens}")
    run, ckpt = resolve_run(path)
    config = load_config(run)
    train_len = train_seq_len(config)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_trained(ckpt, map_location=dev).eval()
    scaling = scale_rope(model, rope_scaling, rope_factor, train_len)
    budget = memory_gb * 2**30 if memory_gb else None
    base = {"run": run_label(run), "position": model.hparams.position, "train_seq_len": train_len, "stride": stride}
    base["checkpoint_step"] = model.checkpoint_step  # the training step of the scored weights
    base["rope_scaling"] = scaling
    rows, position_rows = [], []
    todo = parse_lengths(lengths, train_len)
    for step, seq_len in enumerate(todo, 1):
        start = time.perf_counter()
        tag = f"[{step}/{len(todo)}] {base['run']} seq_len {seq_len}"
        row = {**base, "seq_len": seq_len, "factor": round(seq_len / train_len, 3) if train_len else None}
        try:
            model.model.position.check_length(seq_len)
        except ValueError as err:
            rows.append({**row, "set": "", "status": "n/a", "reason": str(err)})
            progress(f"{tag}: n/a, {err}")
            continue
        try:
            dm = datamodule_at(config, seq_len, batch_size)
        except ValueError as err:  # the data itself cannot be made at this length (e.g. odd copy length)
            rows.append({**row, "set": "", "status": "invalid", "reason": str(err)})
            progress(f"{tag}: invalid data at this length")
            continue
        size = fitting_batch_size(model, seq_len, batch_size or dm.batch_size, dev, budget)
        if stride is not None:
            loaders = stream_loaders(dm, seq_len, stride, size)
        else:
            if size != dm.batch_size:
                dm = datamodule_at(config, seq_len, size)
            loaders = test_loaders(dm)
        progress(f"{tag}: scoring {len(loaders)} set{'s' * (len(loaders) != 1)}, batch size {size} ...")
        tokens_per_word = (getattr(dm, "tokens_per_word", None) or {}).get("test", {})  # [stage][set name]
        for set_name, loader in loaders.items():
            with torch.inference_mode():
                totals = score_loader(model, loader, dev, limit_tokens)
            metrics = metrics_from_sums(totals, tokens_per_word.get(set_name))
            rows.append({**row, "set": set_name, "status": "ok", "reason": "", **metrics})
            if isinstance(totals["position_nll"], Tensor):  # no batch scored: no positions
                position_rows += bucket_rows(
                    {**row, "set": set_name}, totals["position_nll"], totals["position_tokens"], bucket
                )
        progress(f"{tag}: done in {time.perf_counter() - start:.1f} s")
    save_rows(run, rows)
    save_position_rows(run, position_rows)
    return rows


def scale_rope(model, rope_type: str | None, factor: float | None, train_len: int) -> str:
    """Apply --rope-scaling/--rope-factor to a loaded run's model; its label (`yarn×4`), or "" without scaling."""
    if rope_type is None:
        if factor is not None:
            raise ValueError("--rope-factor needs --rope-scaling (linear, dynamic or yarn)")
        return ""
    if factor is None:
        raise ValueError(f"--rope-scaling {rope_type} needs --rope-factor (e.g. 4 for four times the training length)")
    return apply_rope_scaling(model.model, rope_type, factor, train_len).label


def add_rope_scaling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rope-scaling", choices=ROPE_TYPES, default=None, help="RoPE scaling (Hugging Face rope_type)"
    )
    parser.add_argument("--rope-factor", type=float, default=None, help="its factor, e.g. 4")


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def row_key(row: dict[str, Any]) -> tuple:
    return (row["seq_len"], row["set"], row.get("stride"), row.get("rope_scaling") or "")


def save_rows(run: Path, rows: list[dict[str, Any]]) -> None:
    """Merge rows into the run's eval_context.json (a re-evaluated length replaces its old row)."""
    path = run / EVAL_CONTEXT_FILE
    old = json.loads(path.read_text()) if path.exists() else []
    merged = {row_key(r): r for r in old}
    merged.update({row_key(r): r for r in rows})
    write_text_atomic(path, json.dumps(sorted(merged.values(), key=lambda r: row_key(r)[:2]), indent=2))


def write_csv(rows: list[dict[str, Any]], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(out, COLUMNS, rows)


def format_rows(rows: list[dict[str, Any]]) -> Iterator[str]:
    yield f"{'run':32} {'len':>6} {'set':>10} {'loss':>8} {'ppl':>10} {'word_ppl':>10} {'error':>7}"
    for r in rows:
        run = f"{r['run']} {r['rope_scaling']}" if r.get("rope_scaling") else r["run"]
        if r["status"] != "ok":
            yield f"{run:32} {r['seq_len']:>6} {r['status']:>10}  {r['reason']}"
            continue
        word = f"{r['word_ppl']:10.3f}" if r["word_ppl"] is not None else " " * 10
        name = r["set"] or "-"
        yield f"{run:32} {r['seq_len']:>6} {name:>10} {r['loss']:8.4f} {r['ppl']:10.3f} {word} {r['error']:7.4f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cope-pl eval-context", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories (runs/<name>/version_N) or checkpoint files")
    parser.add_argument("--lengths", nargs="+", default=["1x", "1.5x", "2x", "2.5x", "4x"], help="512 or 2x")
    parser.add_argument("--stride", type=int, default=None, help="sliding window step (needs a token stream)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the run's data.batch_size")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument(
        "--limit-tokens",
        type=int,
        default=None,
        help="score only the first N tokens of each test set, the same N tokens at every length (default: all)",
    )
    parser.add_argument("--limit-batches", type=int, default=None, help=argparse.SUPPRESS)  # removed: see below
    parser.add_argument("--memory-gb", type=float, default=None, help="memory budget for the attention logits")
    parser.add_argument("--bucket", type=int, default=BUCKET, help="positions per bucket of the loss by position")
    parser.add_argument("--out", type=Path, default=None, help="also write all rows to this CSV file")
    add_rope_scaling_arguments(parser)
    args = parser.parse_args(argv)
    if args.limit_batches is not None:
        raise ValueError(
            "--limit-batches was removed: it scored a different number of tokens at each length; use --limit-tokens N "
            "(the same first N tokens of each test set at every length)"
        )
    rows = []
    for run in args.runs:
        rows += evaluate_context(
            run,
            args.lengths,
            args.stride,
            args.batch_size,
            args.device,
            args.limit_tokens,
            args.memory_gb,
            args.bucket,
            rope_scaling=args.rope_scaling,
            rope_factor=args.rope_factor,
        )
    print("\n".join(format_rows(rows)))
    if args.out is not None:
        write_csv(rows, args.out)
        print(f"Rows written to {args.out}")
