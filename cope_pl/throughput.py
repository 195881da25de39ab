"""Tokens per second while training: Lightning's ThroughputMonitor counting tokens instead of samples."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities import rank_zero_info


class TokenThroughputMonitor(ThroughputMonitor):
    """Lightning's ThroughputMonitor counting tokens: train/device/items_per_sec is tokens/s per device
    (and train/items_per_sec over all devices under DDP).

    The rolling window is 20 steps (Lightning's default of 100 would show nothing in short runs). Values are
    logged at the number of updates done, the step of `train/loss` and of checkpoints (Lightning's count is one
    less); validation and test batches are timed but not logged, since Lightning would log them at batch
    indices, not at training steps.
    """

    def __init__(self, window_size: int = 20, **kwargs: Any):
        super().__init__(
            window_size=window_size,
            batch_size_fn=lambda batch: batch["input_ids"].size(0),
            length_fn=lambda batch: batch["input_ids"].numel(),
            **kwargs,
        )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        data = trainer.datamodule
        if data is None or not hasattr(data, "seq_len"):
            return
        per_step = data.batch_size * trainer.world_size * trainer.accumulate_grad_batches
        tokens = per_step * data.seq_len
        rank_zero_info(
            f"Global batch: {per_step} sequences x {data.seq_len} tokens = {tokens} tokens per optimizer step "
            f"({trainer.world_size} processes x {data.batch_size} x {trainer.accumulate_grad_batches} accumulation)"
        )
        for logger in trainer.loggers:
            logger.log_metrics({"train/global_batch_tokens": tokens}, step=trainer.global_step)

    def _compute(self, trainer: L.Trainer, iter_num: int | None = None) -> None:
        if trainer.state.stage != RunningStage.TRAINING or not trainer._logger_connector.should_update_logs:
            return
        throughput = self._throughputs[trainer.state.stage]
        metrics = {f"train{throughput.separator}{k}": v for k, v in throughput.compute().items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def on_test_batch_end(self, *args: Any, **kwargs: Any) -> None:
        # Not even timed: a test of a finished run has no training to compare with.
        return
