"""What a killed run needs to continue exactly where it stopped.

Lightning's checkpoint already holds weights, optimizer, LR schedule and loop counters; the data position
comes from `ResumableBatchSampler` (cope_pl/data/sampling.py). This module adds the rest:
  - `RngState`: the torch RNG state (dropout) at the checkpoint, put back before the first resumed step;
  - `CheckedCheckpointIO`: checkpoints written to a temporary file and renamed (a kill while saving leaves
    the previous file intact), and a clear error for a corrupt or truncated checkpoint or a full disk;
  - `read_checkpoint` / `load_trained`: every checkpoint is read with torch's weights-only unpickler and the
    allowlist `TRUSTED_GLOBALS`, so a shared file can never run code; anything else in it is refused;
  - `resolve_resume`: `--ckpt_path last` continues from the newest intact checkpoint of the run (periodic or
    preemption, cope_pl/preemption.py), in the run directory it came from instead of a new `version_N`, so the
    logs and checkpoints stay in one place.
"""

from __future__ import annotations

import errno
import os
import pickle
import pickletools
import re
import zipfile
from collections.abc import Callable
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


# Every object the pickle of a cope_pl checkpoint names. Lightning writes hyper-parameters, loop, callback,
# optimizer, LR-scheduler and RNG states as dicts, lists, tuples, numbers, strings and tensors; only the
# tensors (typed storages rebuilt by torch) and the state dicts' OrderedDict are named objects.
TENSOR_STORAGES = ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool")
TRUSTED_GLOBALS = frozenset(
    ["collections.OrderedDict", "torch._utils._rebuild_tensor_v2"] + [f"torch.{k}Storage" for k in TENSOR_STORAGES]
)
# How torch's weights-only unpickler names the object it refused.
REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]*\w)")


class UntrustedCheckpointError(ValueError):
    """A checkpoint that holds an object no cope_pl checkpoint holds: it is not loaded."""

    def __init__(self, path: Any, what: str):
        super().__init__(
            f"checkpoint {path} holds {what}, which no cope_pl checkpoint holds; the file is not trusted and was "
            "not loaded (use checkpoints written by cope-pl fit)"
        )


def archive_intact(path: Path) -> bool:
    """A complete torch checkpoint archive: the zip directory is readable, there is a pickle in it and every
    member matches its CRC. Nothing is unpickled."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith("data.pkl") for n in archive.namelist()) and archive.testzip() is None
    except (OSError, zipfile.BadZipFile, EOFError, ValueError):
        return False


def untrusted_object(path: Any) -> str | None:
    """The first object outside TRUSTED_GLOBALS that a checkpoint's pickles name, read as opcodes (never
    unpickled); None when there is none or the file is no readable archive (then the loader fails on it).
    Every pickle in the archive is read, not only the one torch would pick."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [archive.read(n) for n in archive.namelist() if n.endswith(".pkl")]
    except (OSError, zipfile.BadZipFile, EOFError, ValueError):
        return None
    try:
        for pickled in pickles:
            for op, arg, _ in pickletools.genops(pickled):
                if op.name in ("GLOBAL", "INST") and arg.replace(" ", ".") not in TRUSTED_GLOBALS:
                    return arg.replace(" ", ".")
                if op.name == "STACK_GLOBAL":  # protocol 4 names objects from the stack; torch.save never does
                    return "an object named at load time (STACK_GLOBAL)"
    except (ValueError, EOFError):  # opcodes pickle itself does not know: not written by torch.save
        return "a pickle that is not torch's"
    return None


def refuse_untrusted(path: Any) -> None:
    """Raise UntrustedCheckpointError for a checkpoint that names anything outside TRUSTED_GLOBALS."""
    what = untrusted_object(path)
    if what is not None:
        raise UntrustedCheckpointError(path, what)


def untrusted(path: Any, err: Exception) -> UntrustedCheckpointError | None:
    """The one-line refusal for an object torch's weights-only unpickler (the second guard) rejected, or None
    when `err` is about a damaged file instead (a truncated pickle fails in the same unpickler)."""
    if not isinstance(err, pickle.UnpicklingError):
        return None
    found = REFUSED_GLOBAL.search(str(err))
    if found is None and not archive_intact(Path(path)):
        return None
    return UntrustedCheckpointError(path, found.group(1) if found else "an object torch's weights-only loader refuses")


def load_trusted(path: Any, load: Callable[[], Any]) -> Any:
    """`load()` of a checkpoint file, refused first if its pickle names anything outside TRUSTED_GLOBALS; an
    object the weights-only unpickler refuses is the same one-line refusal, other load errors pass through."""
    refuse_untrusted(path)
    try:
        return load()
    except CORRUPT as err:
        refusal = untrusted(path, err)
        if refusal is not None:
            raise refusal from None
        raise


def read_checkpoint(path: Any, map_location: Any = "cpu") -> dict[str, Any]:
    """A checkpoint's contents, read with torch's weights-only unpickler behind the allowlist (`load_trusted`),
    so nothing in the file can run code."""
    return load_trusted(path, lambda: torch.load(path, map_location=map_location, weights_only=True))


def is_intact(path: Path) -> bool:
    """An intact archive of trusted objects, checked without unpickling: a crafted file can neither run code
    here nor be named as the checkpoint to resume from."""
    return archive_intact(path) and untrusted_object(path) is None


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


def checkpoint_error(path: Any, err: Exception) -> ValueError:
    """The one-line error for a checkpoint torch could not load while resuming or testing: an untrusted object,
    or a corrupt file, set aside, with the newest intact checkpoint beside it named."""
    refusal = untrusted(path, err)
    if refusal is not None:
        return refusal
    return ValueError(f"checkpoint {path} is corrupt or truncated{set_aside(Path(path))}; {recovery_hint(Path(path))}")


def load_trained(ckpt: str | Path, map_location: Any = "cpu"):
    """The trained LanguageModel in a checkpoint file, for evaluation. A corrupt or truncated file is one clear
    error that names the newest intact checkpoint beside it; the file stays where it is (evaluating changes
    nothing, unlike resuming, which sets it aside)."""
    try:
        return load_trusted(
            ckpt, lambda: LanguageModel.load_from_checkpoint(ckpt, map_location=map_location, weights_only=True)
        )
    except CORRUPT as err:
        if archive_intact(Path(ckpt)):
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


def keep_device(storage: Any, location: str) -> Any:
    return storage


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

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Always read_checkpoint (allowlist, weights-only), whatever `weights_only` the caller passes;
        tensors stay on the device they were saved from unless `map_location` says otherwise (Lightning's default)."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist; check --ckpt_path")
        try:
            return read_checkpoint(path, map_location=map_location or keep_device)
        except CORRUPT as err:
            raise checkpoint_error(path, err) from err

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
    """The newest intact checkpoint under a run root; corrupt ones newer than it are set aside, saying so. An
    intact one that holds objects no cope_pl checkpoint holds is refused, not skipped: nobody resumes past a
    planted file without being told."""
    for ckpt in run_checkpoints(run_root):
        try:
            intact = archive_intact(ckpt)
        except FileNotFoundError:  # another rank set it aside meanwhile
            continue
        if intact:
            refuse_untrusted(ckpt)
            return ckpt
        print(f"{ckpt} is corrupt or truncated{set_aside(ckpt)}; trying the next newest checkpoint.")
    return None
