"""Preemption that loses nothing: a checkpoint at the step a scheduler's warning arrives, written into the run's
own checkpoints folder, then a SLURM requeue.

SLURM sends SIGUSR1 before a job's time limit when asked to (`#SBATCH --signal=SIGUSR1@90`, as `cope-pl launch
slurm` writes). `PreemptionCheckpoint` notes the signal; at the end of the training step under way (every rank at
the same step) it writes `checkpoints/hpc_ckpt_N.ckpt` beside the run's other checkpoints and, inside a SLURM job,
requeues the job (`scontrol requeue`). The requeued job's `--ckpt_path last` resumes from the newest intact
checkpoint of the run, which is this one (cope_pl/resume.py::resolve_resume). Outside SLURM the signal only saves
and training goes on, so `kill -USR1 PID` checkpoints a run on demand.

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
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from cope_pl.results import run_dir
from cope_pl.runs import CHECKPOINTS_DIR, preemption_checkpoint


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
    """The SLURM job (or array task) this process runs in, when it should be requeued; None outside SLURM or when
    a SLURMEnvironment plugin turned auto_requeue off."""
    environment = getattr(trainer.strategy, "cluster_environment", None)
    if isinstance(environment, SLURMEnvironment) and not environment.auto_requeue:
        return None
    if not SLURMEnvironment.detect():
        return None
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job is not None:
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
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


class PreemptionCheckpoint(L.Callback):
    """On the requeue signal: a checkpoint in the run's checkpoints folder at the end of the current step, then a
    SLURM requeue (see the module docstring)."""

    def __init__(self) -> None:
        self._requested = False
        self._signal: signal.Signals | None = None
        self._previous: Any = None

    def _note(self, signum: int, frame: Any) -> None:
        # Only a flag: saving here could fall between the ranks' collectives of a step.
        self._requested = True

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Installed before the trainer registers its signal handlers, which then leaves this signal alone (in
        # validate and test too, so no stage writes a checkpoint into the working directory).
        signum = requeue_signal(trainer)
        if signum is None or threading.current_thread() is not threading.main_thread():
            return
        self._requested = False
        self._signal = signum
        self._previous = signal.signal(signum, self._note)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._signal is not None:
            signal.signal(self._signal, self._previous if self._previous is not None else signal.SIG_DFL)
            self._signal = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Any rank's signal counts; every rank takes the same decision at the same step.
        if not trainer.strategy.reduce_boolean_decision(self._requested, all=False):
            return
        self._requested = False
        path = preemption_checkpoint(checkpoints_dir(trainer))
        trainer.save_checkpoint(path)
        rank_zero_info(f"Preemption warning: saved {path} at step {trainer.global_step}")
        job = slurm_job_to_requeue(trainer)
        if job is not None and trainer.is_global_zero:
            requeue(job)
