"""Stop a run at the first non-finite loss, gradient or validation metric, instead of training on NaNs for a day."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor


class NonFiniteError(RuntimeError):
    pass


def _likely_causes(trainer: L.Trainer, pl_module: L.LightningModule) -> str:
    causes = [f"a learning rate too high for this model (model.lr={pl_module.hparams.get('lr')})"]
    if str(trainer.precision).startswith("16"):
        causes.append("fp16 overflow: use trainer.precision=bf16-mixed")
    causes.append("bad input data (check the data module's tokens and labels)")
    return "; ".join(causes)


class NonFiniteGuard(L.Callback):
    """Raises NonFiniteError naming the step, the last good checkpoint and likely causes.

    A non-finite validation loss during fit stops the run the same way; outside fit (validate, test) it is
    recorded as it is (NaN in results.json) with one warning.

    Gradients are checked before the optimizer step, so the weights and every checkpoint stay finite.
    Under fp16 mixed precision the gradient scaler already skips steps with inf gradients by design, so
    only the loss is checked there.
    """

    def _fail(self, trainer: L.Trainer, pl_module: L.LightningModule, what: str) -> None:
        callback = trainer.checkpoint_callback
        last = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
        resume = f"last good checkpoint: {last}" if last else "no checkpoint was written yet"
        raise NonFiniteError(
            f"non-finite {what} at step {trainer.global_step}; {resume}; likely causes: "
            f"{_likely_causes(trainer, pl_module)}"
        )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if isinstance(loss, Tensor) and not torch.isfinite(loss).all():
            self._fail(trainer, pl_module, f"loss ({float(loss)})")

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if str(trainer.precision).startswith("16"):
            return
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if grads and not torch.isfinite(torch.stack([g.norm() for g in grads])).all():
            bad = [n for n, p in pl_module.named_parameters() if p.grad is not None and not p.grad.isfinite().all()]
            self._fail(trainer, pl_module, f"gradient (first in {bad[0]})")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check_eval(trainer, pl_module, "val/")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check_eval(trainer, pl_module, "test/")

    def _check_eval(self, trainer: L.Trainer, pl_module: L.LightningModule, prefix: str) -> None:
        bad = [
            f"{key}={float(value)}"
            for key, value in trainer.callback_metrics.items()
            if key.startswith(prefix) and "loss" in key and not math.isfinite(float(value))
        ]
        if not bad:
            return
        if trainer.state.fn == "fit":
            self._fail(trainer, pl_module, f"validation loss ({', '.join(bad)})")
        rank_zero_warn(f"non-finite evaluation loss ({', '.join(bad)}): the evaluated model diverges on these sets")
