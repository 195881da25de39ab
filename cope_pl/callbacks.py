"""Small adaptations of Lightning's own callbacks to this project's batches."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ThroughputMonitor


class TokenThroughputMonitor(ThroughputMonitor):
    """Lightning's ThroughputMonitor counting tokens: train/device/items_per_sec is tokens/s per device
    (and train/items_per_sec over all devices under DDP).

    The rolling window is 20 steps (Lightning's default of 100 would show nothing in short runs).
    """

    def __init__(self, window_size: int = 20, **kwargs: Any):
        super().__init__(
            window_size=window_size,
            batch_size_fn=lambda batch: batch["input_ids"].size(0),
            length_fn=lambda batch: batch["input_ids"].numel(),
            **kwargs,
        )
