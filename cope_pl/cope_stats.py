"""What CoPE counts, logged while training: gate and position statistics per layer and head.

At every validation the callback runs the model once more on a fixed validation batch with
`cope_pl.attention.recording()` (explicit attention on a few sequences; never on the training hot path) and
logs to TensorBoard, per layer L and head H:
  cope/mean_gate/layerL/headH         mean sigmoid gate over causal (query, key) pairs;
  cope/clamped_frac/layerL/headH      fraction of pairs whose position p_ij exceeds npos_max - 1: the clamp
                                      zeroes their gate gradient, so a high fraction means npos_max is too small;
  cope/mean_farthest/layerL/headH     mean position of the first key (the farthest) seen from each query;
  cope/max_farthest/layerL/headH      its maximum (unclamped);
  cope/gate_entropy/layerL/headH      mean binary entropy of the gates, in nats (0: every gate 0 or 1);
a histogram of the clamped positions per layer (cope/positions/layerL), and cope/max_clamped_frac, the largest
clamped fraction over layers and heads, which also goes to results.json for the ablation report.
Turned off with `--cope_stats.enabled=false`; models without a CoPE term log nothing.
"""

from __future__ import annotations

import math

import lightning as L
from torch import Tensor

from cope_pl.ops import causal_mask

STATISTICS = ("mean_gate", "clamped_frac", "mean_farthest", "max_farthest", "gate_entropy")


def gate_statistics(gates: Tensor, npos_max: int) -> dict[str, Tensor]:
    """Per-head (H,) statistics of (B, H, T, S) gates (0 on masked keys; queries are the last T of S keys)."""
    t, s = gates.shape[-2:]
    mask = causal_mask(t, s, gates.device).to(gates.dtype)  # (T, S)
    pairs = mask.sum() * gates.size(0)
    positions = gates.flip(-1).cumsum(-1).flip(-1)  # (B, H, T, S) p_ij before the clamp
    clamped = (positions > npos_max - 1).to(gates.dtype) * mask
    g = gates.clamp(1e-12, 1 - 1e-12)
    entropy = -(g * g.log() + (1 - g) * (1 - g).log()) * mask
    farthest = positions[..., 0]  # (B, H, T): the first key, seen from every query
    return {
        "mean_gate": (gates * mask).sum((0, 2, 3)) / pairs,
        "clamped_frac": clamped.sum((0, 2, 3)) / pairs,
        "mean_farthest": farthest.mean((0, 2)),
        "max_farthest": farthest.amax((0, 2)),
        "gate_entropy": entropy.sum((0, 2, 3)) / pairs,
    }


def cope_statistics(model, input_ids: Tensor) -> list[dict[str, Tensor]]:
    """Per layer with a CoPE term: the statistics of `gate_statistics` and the causal positions (N,), clamped."""
    layers = []
    for layer, record in enumerate(getattr(model, "model", model).record_attention(input_ids)):
        if record["gates"] is None:
            continue
        gates = record["gates"].double()
        stats = gate_statistics(gates, int(record["npos_max"]))
        mask = causal_mask(*gates.shape[-2:], gates.device).expand_as(gates)
        stats["positions"] = record["positions"][mask].float()
        stats["layer"] = layer
        layers.append(stats)
    return layers


class CopeStatistics(L.Callback):
    """Logs `cope/*` gate and position statistics at every validation (see the module docstring)."""

    def __init__(self, enabled: bool = True, sequences: int = 8):
        if sequences < 1:
            raise ValueError(f"cope_stats.sequences must be >= 1, got {sequences}")
        self.enabled = enabled
        self.sequences = sequences
        self.batch: Tensor | None = None

    def fixed_batch(self, trainer: L.Trainer) -> Tensor | None:
        if self.batch is None:
            loaders = trainer.val_dataloaders
            loader = loaders[0] if isinstance(loaders, list | tuple) else loaders
            if loader is None:
                return None
            self.batch = next(iter(loader))["input_ids"][: self.sequences].clone()
        return self.batch

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or trainer.sanity_checking:
            return
        batch = self.fixed_batch(trainer)
        if batch is None:
            return
        layers = cope_statistics(pl_module, batch.to(pl_module.device))
        if not layers:
            return
        experiment = getattr(trainer.logger, "experiment", None)
        step = trainer.global_step
        if trainer.is_global_zero and hasattr(experiment, "add_scalar"):
            for stats in layers:
                layer = stats["layer"]
                for name in STATISTICS:
                    for head, value in enumerate(stats[name].tolist()):
                        experiment.add_scalar(f"cope/{name}/layer{layer}/head{head}", value, step)
                experiment.add_histogram(f"cope/positions/layer{layer}", stats["positions"].cpu(), step)
        worst = max(float(stats["clamped_frac"].max()) for stats in layers)
        # Every rank measures its own fixed batch; the largest over ranks is logged.
        value = worst if math.isfinite(worst) else 0.0
        pl_module.log("cope/max_clamped_frac", value, sync_dist=True, reduce_fx="max")
