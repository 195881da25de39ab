"""A run on disk: the one place that knows a run directory's layout, and what is re-created from its files.

Every run writes `runs/<name>/version_N/`:
    config.yaml                    the full LightningCLI config (CONFIG_FILE)
    results.json                   final metrics, model and data settings (RESULTS_FILE)
    checkpoints/last.ckpt          the newest periodic checkpoint (LAST_CKPT)
    checkpoints/hpc_ckpt_N.ckpt    a checkpoint written when a scheduler warned of preemption (preemption_checkpoint)
    eval_context.json, eval_context.csv, eval_context_positions.csv   cope-pl eval-context
    passkey.csv                    cope-pl passkey
    position_maps/                 cope-pl position-maps
A sweep keeps each cell's run in `<save_dir>/<cell>/version_0` and its status in `<save_dir>/status/<cell>.json`.
The tools that come after training (eval-context, position maps, reports) start from here rather than from
Python objects, so they work on any run from any machine.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import yaml

CONFIG_FILE = "config.yaml"
RESULTS_FILE = "results.json"
CHECKPOINTS_DIR = "checkpoints"
LAST_CKPT = Path(CHECKPOINTS_DIR) / "last.ckpt"
PREEMPTION_PREFIX = "hpc_ckpt_"  # Lightning's name for its SLURM checkpoints, kept so users recognise them
EVAL_CONTEXT_FILE = "eval_context.json"
POSITIONS_FILE = "eval_context_positions.csv"
PASSKEY_FILE = "passkey.csv"
POSITION_MAPS_DIR = "position_maps"


def sweep_cell_dir(save_dir: Path, cell: str) -> Path:
    """The run directory of a sweep cell."""
    return Path(save_dir) / cell / "version_0"


def sweep_status_file(save_dir: Path, cell: str) -> Path:
    """Where a sweep records a cell's last status (done, failed at which step, its log)."""
    return Path(save_dir) / "status" / f"{cell}.json"


def run_of_checkpoint(ckpt: Path) -> Path:
    """The run directory a checkpoint file belongs to (`<run>/checkpoints/x.ckpt`, or a file beside the logs)."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def preemption_checkpoints(checkpoints: Path) -> dict[int, Path]:
    """The `hpc_ckpt_N.ckpt` files of a checkpoints folder, by N."""
    files = {p.stem[len(PREEMPTION_PREFIX) :]: p for p in Path(checkpoints).glob(f"{PREEMPTION_PREFIX}*.ckpt")}
    return {int(n): p for n, p in files.items() if n.isdigit()}


def preemption_checkpoint(checkpoints: Path) -> Path:
    """The next free `hpc_ckpt_N.ckpt` in a checkpoints folder (N counts the run's preemptions from 1)."""
    return Path(checkpoints) / f"{PREEMPTION_PREFIX}{max(preemption_checkpoints(checkpoints), default=0) + 1}.ckpt"


def run_checkpoints(run_root: Path) -> list[Path]:
    """Every checkpoint file of every `version_N` under `<save_dir>/<name>`, newest first, whichever kind
    (last.ckpt, periodic, preemption); files that vanish while being listed are left out."""

    def written(path: Path) -> float | None:
        try:
            return path.stat().st_mtime
        except OSError:
            return None

    found = [(written(p), p) for p in Path(run_root).glob(f"version_*/{CHECKPOINTS_DIR}/*.ckpt")]
    return [p for mtime, p in sorted((f for f in found if f[0] is not None), reverse=True)]


def version_of(run: Path) -> int | None:
    """N for a `version_N` run directory (the TensorBoard logger's version), else None."""
    match = re.fullmatch(r"version_(\d+)", run.name)
    return int(match.group(1)) if match else None


def resolve_run(path: str | Path) -> tuple[Path, Path]:
    """A run directory or a checkpoint file -> (run directory, checkpoint)."""
    path = Path(path)
    if path.is_file():
        ckpt = path
        run = run_of_checkpoint(path)
    elif path.is_dir():
        run, ckpt = path, path / LAST_CKPT
        if not ckpt.is_file():
            raise FileNotFoundError(f"{path} has no {LAST_CKPT}; pass the checkpoint file itself")
    else:
        raise FileNotFoundError(f"{path} is neither a run directory nor a checkpoint file")
    return run, ckpt


def load_config(run: Path) -> dict[str, Any]:
    path = Path(run) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: runs made by `cope-pl fit` save it beside their logs")
    with open(path) as f:
        return yaml.safe_load(f) or {}


def import_class(class_path: str) -> type:
    """The data module class a run's config.yaml names; anything else (a function, another class) is refused
    before it is called, so a shared config cannot make a tool call an arbitrary function."""
    from cope_pl.data import LMDataModule

    module, _, name = class_path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"data.class_path {class_path!r} cannot be imported ({err})") from err
    if not (isinstance(found, type) and issubclass(found, LMDataModule)):
        raise ValueError(f"data.class_path {class_path!r} is not a cope_pl data module (a subclass of LMDataModule)")
    return found


def build_datamodule(config: dict[str, Any], **overrides: Any):
    """The run's data module from its config (data.class_path + init_args), with init_args overridden."""
    data = config.get("data") or {}
    if "class_path" not in data:
        raise ValueError("the run's config.yaml has no data.class_path; was it written by `cope-pl fit`?")
    init_args = {**(data.get("init_args") or {}), **overrides}
    return import_class(data["class_path"])(**init_args)


def train_seq_len(config: dict[str, Any]) -> int:
    return int(((config.get("data") or {}).get("init_args") or {}).get("seq_len", 0))


def run_label(run: Path) -> str:
    """`copy-cope/version_0` style label: the logger name and version, enough to tell runs apart."""
    return f"{run.parent.name}/{run.name}" if run.name.startswith("version_") else run.name
