"""Callbacks that break a training process on purpose, for the subprocess tests of resume and saving."""

import os
import signal

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint


class KillAtStep(L.Callback):
    """SIGKILL this process after optimizer step `step` (no cleanup, no final checkpoint), like an OOM kill."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class KillDuringSave(L.Callback):
    """From step `step` on, torch.save writes half a file and then the process is SIGKILLed mid-write."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step < self.step:
            return
        real_save = torch.save

        def half_save(obj, f, *args, **kwargs):
            real_save(obj, f, *args, **kwargs)
            with open(f, "r+b") as handle:  # leave a truncated file behind, as a kill mid-write would
                handle.truncate(os.path.getsize(f) // 2)
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = half_save


class NaNAtStep(L.Callback):
    """Poison one weight with NaN before step `step`, as a diverging run would."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.parameters()).view(-1)[0] = float("nan")


class SignalAtStep(L.Callback):
    """Send this process a signal (by name, e.g. SIGUSR1) once, after optimizer step `step`, as a scheduler would;
    with `rank`, only the process of that global rank."""

    def __init__(self, step: int, name: str, rank: int | None = None):
        self.step = step
        self.signum = getattr(signal, name)
        self.rank = rank
        self.sent = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.rank is not None and trainer.global_rank != self.rank:
            return
        if trainer.global_step >= self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)


class SignalAfterCallbacks(Checkpoint, SignalAtStep):
    """SignalAtStep from the step's last callback: the trainer runs checkpoint callbacks after all others."""


class SignalAtTestBatch(L.Callback):
    """Send this process a signal (by name) once, after the first test batch, as a scheduler would mid-command."""

    def __init__(self, name: str):
        self.signum = getattr(signal, name)
        self.sent = False

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)
