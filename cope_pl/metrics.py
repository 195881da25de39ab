"""Token-weighted evaluation metrics that reduce correctly across DDP ranks.

Loss and perplexity come from summed NLL and summed token counts (never averaged ratios); error is
counted per scored token and per sequence (a sequence is wrong if any scored token is wrong).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import SumMetric

SUMS = ("nll", "tokens", "token_errors", "sequences", "sequence_errors")


def metric_key(stage: str, metric: str, set_name: str = "") -> str:
    """'val/loss' for the main set, 'val/loss@ood_dense' for a named one."""
    return f"{stage}/{metric}@{set_name}" if set_name else f"{stage}/{metric}"


def batch_sums(
    logits: Tensor, labels: Tensor, ignore_index: int = -100, by_position: bool = False
) -> dict[str, Tensor]:
    """Per-batch sums from logits (B, T, V) and labels (B, T); labels == ignore_index are not scored.

    by_position adds "position_nll" and "position_tokens", the same sums per position t of the window (T,).
    """
    scored = labels != ignore_index  # (B, T)
    flat = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=ignore_index, reduction="none")
    token_nll = flat.view_as(labels).detach()  # (B, T), 0 where not scored
    wrong = (logits.argmax(-1) != labels) & scored  # (B, T)
    has_scored = scored.any(-1)  # (B,)
    sums = {
        "nll": token_nll.sum(),
        "tokens": scored.sum(),
        "token_errors": wrong.sum(),
        "sequences": has_scored.sum(),
        "sequence_errors": (wrong.any(-1) & has_scored).sum(),
    }
    if by_position:
        sums.update(position_nll=token_nll.sum(0), position_tokens=scored.sum(0))  # (T,), (T,)
    return sums


def perplexity(loss: float, tokens_per_word: float = 1.0) -> float:
    """exp of the mean NLL per token (per word: times the split's tokens per word), capped to stay finite;
    a NaN loss (a diverged model) stays NaN."""
    if math.isnan(loss):
        return math.nan
    return math.exp(min(loss * tokens_per_word, 80.0))


class EvalSums:
    """Running sums for one evaluation set; `compute` gives loss, ppl, error and seq_error.

    A NaN batch makes the sums NaN (torchmetrics' default would drop it and report the other batches' mean):
    a diverged evaluation reads NaN, and NonFiniteGuard stops the run on it."""

    def __init__(self, device: torch.device):
        self.sums = {name: SumMetric(nan_strategy="disable").to(device) for name in SUMS}

    def update(self, sums: dict[str, Tensor]) -> None:
        for name, value in sums.items():
            self.sums[name].update(value.float())

    def compute(self) -> dict[str, float]:
        total = {name: float(metric.compute()) for name, metric in self.sums.items()}  # synced across ranks
        tokens = max(total["tokens"], 1.0)
        loss = total["nll"] / tokens
        return {
            "loss": loss,
            "ppl": perplexity(loss),
            "error": total["token_errors"] / tokens,
            "seq_error": total["sequence_errors"] / max(total["sequences"], 1.0),
        }
