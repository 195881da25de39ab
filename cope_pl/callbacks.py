"""Small adaptations of Lightning's own callbacks to this project's batches."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ThroughputMonitor


class TokenThroughputMonitor(ThroughputMonitor):
    """Lightning's ThroughputMonitor counting tokens: logs train|device/items_per_sec as tokens/s."""

    def __init__(self, **kwargs: Any):
        super().__init__(
            batch_size_fn=lambda batch: batch["input_ids"].size(0),
            length_fn=lambda batch: batch["input_ids"].numel(),
            **kwargs,
        )
