"""Preemption that loses nothing: a checkpoint at the step a scheduler's warning (or SIGTERM) arrives, written
into the run's own checkpoints folder, and a SLURM requeue after the warning.

SLURM sends SIGUSR1 before a job's time limit when the job asks for it (`#SBATCH --signal=SIGUSR1@SECONDS`, as
the scripts of `cope-pl launch slurm` do). `PreemptionCheckpoint` notes the signal; at the end of the training
step under way (every rank at the same step) it writes `checkpoints/hpc_ckpt_N.ckpt` beside the run's other
checkpoints, deletes the run's earlier hpc_ckpt files once it is written and, inside a SLURM job, requeues the
job (`scontrol requeue`). The requeued job's `--ckpt_path last` resumes from the newest intact checkpoint of the
run, which is this one (cope_pl/resume.py::resolve_resume). Outside SLURM the signal only saves and training goes
on, so `kill -USR1 PID` checkpoints a run on demand.

SIGTERM (a preemption, `scancel`, the end of the time limit) is saved the same way, without a requeue; the trainer
then stops after that step and `cope-pl` exits non-zero (cope_pl/cli.py).

It takes the place of Lightning's own SLURM handler, which saves from inside the signal handler (at any point of
a step, on each rank at a different one) into the working directory, where no resume looks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from cope_pl.results import run_dir
from cope_pl.runs import CHECKPOINTS_DIR, preemption_checkpoint, preemption_checkpoints


def requeue_signal(trainer: L.Trainer) -> signal.Signals | None:
    """The signal that warns of the end of the job: a SLURMEnvironment plugin's choice, else SIGUSR1."""
    environment = getattr(trainer.strategy, "cluster_environment", None)
    if isinstance(environment, SLURMEnvironment) and environment.requeue_signal is not None:
        return environment.requeue_signal
    return getattr(signal, "SIGUSR1", None)  # absent on Windows


def checkpoints_dir(trainer: L.Trainer) -> Path:
    """The run's checkpoints folder (ModelCheckpoint's, the same on every rank), read without a collective."""
    dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
    if dirpath:
        return Path(dirpath)
    directory = run_dir(trainer)
    return (directory if directory is not None else Path(trainer.default_root_dir)) / CHECKPOINTS_DIR


def slurm_job_to_requeue(trainer: L.Trainer) -> str | None:
    """The SLURM job (or array task) this process runs in, when it should be requeued; None outside SLURM, in an
    interactive allocation (Lightning's convention: job name bash or interactive), or when a SLURMEnvironment
    plugin turned auto_requeue off."""
    environment = getattr(trainer.strategy, "cluster_environment", None)
    if isinstance(environment, SLURMEnvironment) and not environment.auto_requeue:
        return None
    if os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job is not None and task is not None:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def requeue(job: str) -> None:
    try:
        code = subprocess.call(["scontrol", "requeue", job])
    except FileNotFoundError:
        code = None
    if code == 0:
        rank_zero_info(f"Requeued SLURM job {job}; it resumes from the newest checkpoint with --ckpt_path last")
    else:
        rank_zero_warn(f"could not requeue SLURM job {job} (scontrol requeue: {code or 'not found'}); resubmit it")


def drop_older_preemption_checkpoints(newest: Path) -> None:
    """Delete the run's earlier preemption checkpoints once `newest` is written: a job preempted twenty times
    would otherwise keep twenty full checkpoints (weights and optimizer state each), and resuming only ever
    reads the newest intact one (last.ckpt and the periodic ones stay as they are)."""
    for path in preemption_checkpoints(newest.parent).values():
        if path != newest:
            path.unlink(missing_ok=True)


class PreemptionCheckpoint(L.Callback):
    """On the requeue signal or SIGTERM: a checkpoint in the run's checkpoints folder at the end of the current
    step; after the requeue signal, a SLURM requeue too (see the module docstring)."""

    def __init__(self) -> None:
        self._warned: int | None = None
        self._saved_at_sigterm = False

    def _note(self, signum: int, frame: Any) -> None:
        # Only a flag: saving here could fall between the ranks' collectives of a step.
        self._warned = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Installed after the trainer's own handlers, in place of its SLURM one for this signal; the trainer puts
        # back the handlers from before the fit when it ends, also when it fails.
        self._warned, self._saved_at_sigterm = None, False
        signum = requeue_signal(trainer)
        if signum is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signum, self._note)

    def _stopping(self, trainer: L.Trainer) -> bool:
        return trainer.received_sigterm and not self._saved_at_sigterm  # the trainer's own SIGTERM flag

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Any rank's signal counts; every rank takes the same decision at the same step (under DDP: one all-reduce
        # of a flag per step, beside the one the trainer makes for SIGTERM).
        pending = self._warned is not None or self._stopping(trainer)
        if trainer.strategy.reduce_boolean_decision(pending, all=False):
            self._save(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # SIGTERM after this step's check, before the trainer's: one process saves here. Several could each stop at
        # a different point, where the collective save would wait forever; they keep their newest checkpoint.
        training = trainer.state.stage == RunningStage.TRAINING
        if isinstance(exception, SIGTERMException) and self._stopping(trainer) and training and trainer.world_size == 1:
            self._save(trainer)

    def _save(self, trainer: L.Trainer) -> None:
        warned, self._warned = self._warned, None
        self._saved_at_sigterm = trainer.received_sigterm
        path = preemption_checkpoint(checkpoints_dir(trainer))
        trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            drop_older_preemption_checkpoints(path)
        reason = "SIGTERM" if trainer.received_sigterm else "preemption warning"
        rank_zero_info(f"{reason}: saved {path} at step {trainer.global_step}")
        job = slurm_job_to_requeue(trainer)
        if job is not None and trainer.is_global_zero and warned is not None:
            requeue(job)
