"""A fit ends with a validation and a checkpoint at its last step.

Lightning validates every `val_check_interval` steps only: with max_steps 300 and an interval of 200 the last
validation (and the checkpoint saved after it) is at step 200, while the run trained to 300. Asking the loop to
stop at the last step makes Lightning validate there (its early-stop path), and ModelCheckpoint then saves
after that validation; a checkpoint setting that does not save after validation still gets `last.ckpt` at the
last step from `on_train_end`.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


def at_last_batch(trainer: L.Trainer) -> bool:
    """Whether the batch just trained is the fit's last: max_steps reached, or the last batch of max_epochs."""
    if trainer.max_steps is not None and trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
        return True
    max_epochs = trainer.max_epochs
    last_epoch = max_epochs is not None and max_epochs > 0 and trainer.current_epoch + 1 >= max_epochs
    return last_epoch and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch


class LastStepEvaluation(L.Callback):
    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if at_last_batch(trainer):
            trainer.should_stop = True  # Lightning validates a batch at which the fit is asked to stop

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        checkpoint = trainer.checkpoint_callback
        if not isinstance(checkpoint, ModelCheckpoint) or not checkpoint.save_last or checkpoint.dirpath is None:
            return
        last = Path(checkpoint.dirpath) / f"{checkpoint.CHECKPOINT_NAME_LAST}{checkpoint.FILE_EXTENSION}"
        if checkpoint.last_model_path == str(last) and checkpoint._last_global_step_saved == trainer.global_step:
            return
        trainer.save_checkpoint(last)  # every rank calls it; the strategy writes once
        checkpoint.last_model_path = str(last)
