"""What a killed run needs to continue exactly where it stopped.

Lightning's checkpoint already holds weights, optimizer, LR schedule and loop counters; the data position
comes from `ResumableBatchSampler` (cope_pl/data/sampling.py). This module adds the rest:
  - `RngState`: the torch RNG state (dropout) at the checkpoint, put back before the first resumed step;
  - `CheckedCheckpointIO`: checkpoints written to a temporary file and renamed (a kill while saving leaves
    the previous file intact), and a clear error for a corrupt or truncated checkpoint or a full disk;
  - `resolve_resume`: `--ckpt_path last` continues from the newest intact checkpoint of the run (periodic or
    preemption, cope_pl/preemption.py), in the run directory it came from instead of a new `version_N`, so the
    logs and checkpoints stay in one place.
"""

from __future__ import annotations

import errno
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from cope_pl.atomic import atomic_path
from cope_pl.lm import LanguageModel
from cope_pl.runs import run_checkpoints, run_of_checkpoint, version_of

# What torch.load raises on a truncated or overwritten file.
CORRUPT = (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile)


def is_intact(path: Path) -> bool:
    try:
        torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        return True
    except CORRUPT:
        return False


def set_aside(bad: Path) -> str:
    """Rename a corrupt checkpoint to `<name>.corrupt` (kept, but no longer found by `--ckpt_path last` nor in
    the way of the next last.ckpt); returns the clause saying so, or '' when it cannot be renamed."""
    try:
        os.replace(bad, bad.with_name(bad.name + ".corrupt"))
    except OSError:
        return ""
    return f" (kept as {bad.name}.corrupt)"


def newest_intact(bad: Path) -> Path | None:
    """The newest intact checkpoint in the folder of a corrupt one, if any."""
    others = sorted(bad.parent.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    return next((p for p in others if p != bad and is_intact(p)), None)


def recovery_hint(bad: Path) -> str:
    """What to do about a corrupt checkpoint: resume from the newest intact one beside it, named exactly."""
    intact = newest_intact(bad)
    run = run_of_checkpoint(bad)
    if intact is None:
        return f"no intact checkpoint is left in {bad.parent}; train again from scratch (drop --ckpt_path)"
    return (
        f"the newest intact checkpoint beside it is {intact.name}; resume from it with: "
        f"cope-pl fit --config {run / 'config.yaml'} --ckpt_path {intact}"
    )


def load_trained(ckpt: str | Path, map_location: Any = "cpu"):
    """The trained LanguageModel in a checkpoint file, for evaluation. A corrupt or truncated file is one clear
    error that names the newest intact checkpoint beside it; the file stays where it is (evaluating changes
    nothing, unlike resuming, which sets it aside)."""
    try:
        return LanguageModel.load_from_checkpoint(ckpt, map_location=map_location)
    except CORRUPT as err:
        if is_intact(Path(ckpt)):
            raise  # a readable file: the error is not about the file
        intact = newest_intact(Path(ckpt))
        hint = (
            f"the newest intact checkpoint beside it is {intact.name}; pass that file instead: {intact}"
            if intact is not None
            else f"no intact checkpoint is left in {Path(ckpt).parent}; train the run again"
        )
        raise ValueError(f"checkpoint {ckpt} is corrupt or truncated; {hint}") from err


class RngState(L.Callback):
    """Saves the torch RNG states with each checkpoint and restores them at the first resumed step."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        state = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int):
        # Restored here, not at load time: Lightning draws random numbers while it sets up the loops.
        if self._pending is None:
            return
        torch.set_rng_state(self._pending["cpu"])
        if "cuda" in self._pending and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self._pending["cuda"])
        self._pending = None


class CheckedCheckpointIO(TorchCheckpointIO):
    """Torch checkpoint files, written atomically, read with errors that say what to do."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                torch.save(checkpoint, tmp)
        except OSError as err:
            hint = "free some space" if err.errno == errno.ENOSPC else "check the directory's permissions"
            message = f"could not write checkpoint {path} ({err.strerror}); {hint}; the previous checkpoint is intact"
            raise OSError(err.errno, message) from err

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if not Path(path).is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist; check --ckpt_path")
        try:
            return super().load_checkpoint(path, *args, **kwargs)
        except CORRUPT as err:
            raise ValueError(
                f"checkpoint {path} is corrupt or truncated{set_aside(Path(path))}; {recovery_hint(Path(path))}"
            ) from err

    def remove_checkpoint(self, path: Any) -> None:
        Path(path).unlink(missing_ok=True)


def resolve_resume(ckpt_path: str | None, run_root: Path) -> tuple[str | None, int | None]:
    """(checkpoint file, logger version) for a `--ckpt_path` value.

    run_root is `<save_dir>/<name>`. "last" picks the newest intact checkpoint under its `version_*/checkpoints/`,
    whichever kind (last.ckpt, a periodic one, or the one written when a scheduler warned of preemption), and
    continues in that version; newer corrupt ones are set aside on the way. A path inside
    `version_N/checkpoints/` continues in version N; anything else is passed through with a new version. With
    "last" and no checkpoint yet, training starts from scratch (so the same command can be resubmitted, e.g. by
    a SLURM requeue).
    """
    if not ckpt_path:
        return ckpt_path, None
    if ckpt_path == "last":
        chosen = newest_intact_of_run(run_root)
        if chosen is None:
            print(f"No checkpoint under {run_root}: starting from scratch.")
            return None, None
        print(f"--ckpt_path last: resuming from {chosen}, the newest intact checkpoint under {run_root}.")
        return str(chosen), version_of(run_of_checkpoint(chosen))
    path = Path(ckpt_path)
    if path.parent.name == "checkpoints" and path.parent.parent.parent.resolve() == run_root.resolve():
        return ckpt_path, version_of(path.parent.parent)
    return ckpt_path, None


def newest_intact_of_run(run_root: Path) -> Path | None:
    """The newest intact checkpoint under a run root; corrupt ones newer than it are set aside, saying so."""
    for ckpt in run_checkpoints(run_root):
        try:
            intact = is_intact(ckpt)
        except FileNotFoundError:  # another rank set it aside meanwhile
            continue
        if intact:
            return ckpt
        print(f"{ckpt} is corrupt or truncated{set_aside(ckpt)}; trying the next newest checkpoint.")
    return None
