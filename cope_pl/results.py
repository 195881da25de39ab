"""One machine-readable result row per run: `results.json` beside the run's TensorBoard logs.

Written at the end of fit, validate and test (each stage adds its metrics), atomically, so reports can
read many runs with pandas without parsing event files. Also prints the final evaluation metrics.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from cope_pl.atomic import write_json_atomic
from cope_pl.runs import RESULTS_FILE

EVAL_PREFIXES = ("val/", "test/", "val_cope/")  # val_cope/: the CoPE statistics summary (cope_stats.py)


def run_dir(trainer: L.Trainer) -> Path | None:
    """Where this run's logs live (None when logging is off), as `trainer.log_dir` would say on this rank.

    Read from the logger itself: `trainer.log_dir` broadcasts from rank 0, a collective that a rank-zero-only
    hook must not call (the other ranks are not there to answer, so rank 0 crashes or hangs)."""
    logger = trainer.logger
    if logger is None:
        return None
    directory = logger.log_dir if isinstance(logger, TensorBoardLogger | CSVLogger) else logger.save_dir
    return Path(directory) if directory else None


def read_results(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); delete it and re-run the stage") from err


def fit_finished(results: dict[str, Any]) -> bool:
    """Whether a results.json records a finished fit; files written before `fit_finished` existed count when
    they hold final validation metrics."""
    return bool(results.get("fit_finished") or any(k.startswith("val/") for k in results.get("metrics", {})))


def public(hparams: dict[str, Any]) -> dict[str, Any]:
    """Drop LightningCLI's bookkeeping entries (_class_path, _instantiator)."""
    return {k: v for k, v in hparams.items() if not k.startswith("_")}


def eval_metrics(trainer: L.Trainer) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in sorted(trainer.callback_metrics.items())
        if k.startswith(EVAL_PREFIXES) and v.numel() == 1
    }


def format_summary(metrics: dict[str, float]) -> str:
    """A small table: one row per evaluation metric name, one column per evaluation set.

    Where sets are named, the plain names (`val/error`) are only aliases of the first set and are left out.
    """
    rows: dict[str, dict[str, float]] = {}
    named = any("@" in key for key in metrics)
    for key, value in metrics.items():
        name, _, set_name = key.partition("@")
        if named and not set_name:
            continue
        rows.setdefault(name, {})[set_name or "-"] = value
    sets = sorted({s for r in rows.values() for s in r})
    lines = ["  ".join(["metric".ljust(16)] + [s.rjust(12) for s in sets])]
    for name, values in rows.items():
        cells = [f"{values[s]:12.4f}" if s in values else " " * 12 for s in sets]
        lines.append("  ".join([name.ljust(16)] + cells))
    return "\n".join(lines)


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings -> {"model/position_options/npos_max": 64}; values TensorBoard can show."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "/"))
        else:
            flat[name] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat


def log_hparams_with_metrics(trainer: L.Trainer, result: dict[str, Any]) -> None:
    """Fill TensorBoard's HParams tab: the run's settings with its final metrics, so runs can be filtered
    and compared. Written as a summary beside the scalars (hparams.yaml is left as Lightning wrote it)."""
    if not isinstance(trainer.logger, TensorBoardLogger):
        return
    from torch.utils.tensorboard.summary import hparams

    params = flatten({"model": result["model"], "data": result["data"]})
    writer = trainer.logger.experiment._get_file_writer()  # as SummaryWriter.add_hparams does
    for summary in hparams(params, result["metrics"]):
        writer.add_summary(summary)
    writer.flush()


class ResultsWriter(L.Callback):
    """Writes `results.json` (hyperparameters, data settings, final eval metrics) into the run directory."""

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        metrics = eval_metrics(trainer)
        if not metrics and stage != "fit":  # a finished fit is recorded even when it never validated
            return
        step = pl_module.evaluated_step() if hasattr(pl_module, "evaluated_step") else trainer.global_step
        if metrics:
            label = "validation" if stage == "fit" else stage
            print(f"\nFinal {label} metrics (step {step}):\n{format_summary(metrics)}")
        directory = run_dir(trainer)
        if directory is None:
            return
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / RESULTS_FILE
        result = read_results(path) if path.exists() else {}
        datamodule = trainer.datamodule
        data_hparams = dict(getattr(datamodule, "hparams", {}))
        result.update(
            run_dir=str(directory),
            model=public(dict(pl_module.hparams)),
            data={"class": type(datamodule).__name__, **public(data_hparams)},
            # `cope-pl test` on a checkpoint starts at step 0; keep the step the model was trained to.
            global_step=max(trainer.global_step, result.get("global_step", 0)),
        )
        if stage == "fit":
            result["fit_finished"] = True
        if metrics:  # the checkpoint step each stage's metrics belong to (fit: its last validation's)
            result.setdefault("steps", {})[stage] = step
        result.setdefault("metrics", {}).update(metrics)
        write_json_atomic(path, result)
        log_hparams_with_metrics(trainer, result)
        print(f"Results written to {path}; TensorBoard logs in {directory}")

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module, "fit")

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.training and trainer.state.fn == "validate":
            self._write(trainer, pl_module, "validation")

    @rank_zero_only
    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module, "test")
