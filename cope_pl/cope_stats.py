"""What CoPE counts, logged while training: gate and position statistics per layer and head.

At every validation the callback runs the model once more, in eval mode on its usual attention backend, on a
fixed validation batch, with `cope_pl.attention.observing()`: each layer with a CoPE term hands its queries and
keys over, and its gates and positions are recomputed here in float32, one block of queries at a time, into
sums per head (never on the training hot path). It logs to TensorBoard, per layer L and head H:
  cope/mean_gate/layerL/headH         mean sigmoid gate over causal (query, key) pairs;
  cope/clamped_frac/layerL/headH      fraction of pairs whose position p_ij exceeds npos_max - 1: the clamp
                                      zeroes their gate gradient, so a high fraction means npos_max is too small;
  cope/mean_farthest/layerL/headH     mean position of the first key (the farthest) seen from each query;
  cope/max_farthest/layerL/headH      its maximum (unclamped);
  cope/gate_entropy/layerL/headH      mean binary entropy of the gates, in nats (0: every gate 0 or 1);
a histogram of the clamped positions per layer (cope/positions/layerL, TensorBoard's default bins, counted
block by block), and cope/max_clamped_frac, the largest clamped fraction over layers and heads, which also goes
to results.json for the ablation report. Memory: a block holds a few (B, H, rows, keys) float32 tensors of at
most BLOCK_ELEMENTS values each; nothing but the per-head sums and the histogram's counts outlives a layer.
Turned off with `--cope_stats.enabled=false`; models without a CoPE term run nothing and log nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cope_pl.attention import ContextualLogits

STATISTICS = ("mean_gate", "clamped_frac", "mean_farthest", "max_farthest", "gate_entropy")
# Values per (B, H, rows, keys) tensor of a query block: a few of them at a time, so a few tens of MB.
BLOCK_ELEMENTS = 1 << 22


@dataclass
class PositionHistogram:
    """A histogram of values over fixed bin edges, summed block by block: what TensorBoard's `add_histogram`
    would log for all the values at once (its `make_histogram`, without max_bins), in `add_histogram_raw` form."""

    edges: np.ndarray
    counts: np.ndarray
    num: int = 0
    sum: float = 0.0
    sum_squares: float = 0.0
    min: float = math.inf
    max: float = -math.inf

    @classmethod
    def over(cls, edges) -> PositionHistogram:
        edges = np.asarray(edges, dtype=float)
        return cls(edges, np.zeros(len(edges) - 1, dtype=np.int64))

    def add(self, values: Tensor) -> None:
        """Count values (any shape) on their own device, as np.histogram would: bin i holds edges[i] <= x <
        edges[i + 1], the last bin its right edge too, and values outside the edges are left out."""
        x = values.detach().reshape(-1).double()
        if x.numel() == 0:
            return
        edges = torch.as_tensor(self.edges, device=x.device)
        bins = len(self.counts)
        index = torch.bucketize(x, edges, right=True) - 1
        index[x == edges[-1]] = bins - 1
        index = index[(index >= 0) & (index < bins)]
        self.counts += torch.bincount(index, minlength=bins).cpu().numpy()
        self.num += x.numel()
        self.sum += float(x.sum())
        self.sum_squares += float(x.dot(x))
        self.min, self.max = min(self.min, float(x.min())), max(self.max, float(x.max()))

    def buckets(self) -> tuple[list[float], list[int]]:
        """(bucket right edges, counts): the bins from one left of the first non-empty one to the last non-empty
        one, as TensorBoard keeps them."""
        filled = np.flatnonzero(self.counts)
        start, end = int(filled[0]), int(filled[-1]) + 1
        counts = self.counts[start - 1 : end] if start > 0 else np.concatenate([[0], self.counts[:end]])
        return self.edges[start : end + 1].tolist(), counts.tolist()


class LayerStatistics:
    """One layer's statistics, summed over blocks of queries: per-head (H,) float64 sums and, with bin edges, a
    `PositionHistogram` of the clamped positions."""

    def __init__(self, heads: int, npos_max: int, edges=None):
        self.npos_max = npos_max
        self.sums = {name: torch.zeros(heads, dtype=torch.float64) for name in ("gates", "clamped", "entropy", "far")}
        self.max_farthest = torch.full((heads,), -math.inf, dtype=torch.float64)
        self.pairs = self.rows = 0
        self.histogram = None if edges is None else PositionHistogram.over(edges)

    def add(self, gate_logits: Tensor, valid: Tensor) -> None:
        """gate_logits (B, H, n, E) float32 of n queries against their first E keys in reverse order (key E - 1
        first), -inf where valid (n, E) is False (later keys)."""
        gates = torch.sigmoid(gate_logits)  # 0 on later keys
        positions = gates.cumsum(-1)  # keys reversed: p_ij = sum_{t=j..i} g_it, before the clamp; 0 on later keys
        # Binary entropy from the logits, exact where a float32 gate rounds to 1: g softplus(-x) + (1 - g) softplus(x).
        entropy = gates * F.softplus(-gate_logits) + torch.sigmoid(-gate_logits) * F.softplus(gate_logits)
        entropy = entropy.masked_fill_(~valid, 0)  # nan on later keys (0 * inf)
        farthest = positions[..., -1]  # (B, H, n): p_i0, the first key seen from each query
        for name, value in (("gates", gates), ("clamped", positions > self.npos_max - 1), ("entropy", entropy)):
            self.sums[name] += value.sum((0, 2, 3), dtype=torch.float32).double().cpu()
        self.sums["far"] += farthest.sum((0, 2)).double().cpu()
        self.max_farthest = torch.maximum(self.max_farthest, farthest.amax((0, 2)).double().cpu())
        self.pairs += int(valid.sum()) * gates.size(0)
        self.rows += farthest.size(0) * farthest.size(2)
        if self.histogram is not None:
            self.histogram.add(positions.clamp_(max=self.npos_max - 1)[:, :, valid])  # (B, H, pairs)

    def result(self) -> dict[str, Tensor | PositionHistogram | None]:
        sums = self.sums
        return {
            "mean_gate": sums["gates"] / self.pairs,
            "clamped_frac": sums["clamped"] / self.pairs,
            "mean_farthest": sums["far"] / self.rows,
            "max_farthest": self.max_farthest,
            "gate_entropy": sums["entropy"] / self.pairs,
            "positions": self.histogram,
        }


def query_blocks(q: Tensor, gate_keys: Tensor, block_elements: int = BLOCK_ELEMENTS):
    """(gate logits, valid) per block of queries, as `LayerStatistics.add` takes them: q (B, H, T, D), the last T
    of the S gate keys (B, H, S, D); float32, keys in reverse order, each block reading only its keys."""
    b, h, t, d = q.shape
    s = gate_keys.size(-2)
    rows = max(1, min(t, block_elements // max(b * h * s, 1)))
    keys = gate_keys.float().flip(-2)  # (B, H, S, D): keys S-1 .. 0
    for i0 in range(0, t, rows):
        n = min(rows, t - i0)
        end = s - t + i0 + n  # keys 0 .. end - 1 are read by some query of the block
        distance = torch.arange(end, device=q.device) - (n - 1 - torch.arange(n, device=q.device).unsqueeze(1))
        valid = distance >= 0  # (n, end): key end-1-c at or before query row r
        logits = (q[..., i0 : i0 + n, :].float() @ keys[..., s - end :, :].transpose(-1, -2)) / math.sqrt(d)
        yield logits.masked_fill_(~valid, float("-inf")), valid  # (B, H, n, end)


def gate_statistics(gate_logits: Tensor, npos_max: int) -> dict[str, Tensor]:
    """Per-head (H,) statistics of (B, H, T, S) gate logits, -inf on masked keys (queries are the last T of S),
    in one block: what the callback sums block by block."""
    t, s = gate_logits.shape[-2:]
    stats = LayerStatistics(gate_logits.size(1), npos_max)
    valid = torch.ones(t, s, dtype=torch.bool).tril(s - t).flip(-1)  # (T, S) in reverse key order
    stats.add(gate_logits.float().flip(-1).masked_fill(~valid, float("-inf")), valid)
    return {name: stats.result()[name] for name in STATISTICS}


def cope_statistics(model, input_ids: Tensor, edges=None, block_elements: int = BLOCK_ELEMENTS) -> list[dict]:
    """Per layer with a CoPE term: the statistics of `gate_statistics`, its index ("layer") and, with histogram
    bin edges, a `PositionHistogram` of its clamped causal positions ("positions"; else None)."""
    lm = getattr(model, "model", model)
    if not lm.has_cope_term():
        return []
    layers: list[dict] = []
    calls = iter(range(len(lm.blocks)))

    def observe(q: Tensor, k: Tensor, terms: list) -> None:
        layer = next(calls)
        cope = next((term for term in terms if isinstance(term, ContextualLogits)), None)
        if cope is None:
            return
        stats = LayerStatistics(q.size(1), cope.table.size(-1), edges)
        with torch.autocast(q.device.type, enabled=False):  # float32 whatever the trainer's precision
            for gate_logits, valid in query_blocks(q, k if cope.gate_keys is None else cope.gate_keys, block_elements):
                stats.add(gate_logits, valid)
        layers.append({**stats.result(), "layer": layer})

    lm.observe_attention(input_ids, observe)
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
        experiment = getattr(trainer.logger, "experiment", None)
        writes = trainer.is_global_zero and hasattr(experiment, "add_scalar")
        # TensorBoard's default bins (a list); a logger without them, or a stand-in whose every attribute is a
        # method, gets no histogram.
        edges = getattr(experiment, "default_bins", None) if writes else None
        edges = edges if isinstance(edges, list | tuple) and hasattr(experiment, "add_histogram_raw") else None
        layers = cope_statistics(pl_module, batch.to(pl_module.device), edges)
        if not layers:
            return
        step = trainer.global_step
        if writes:
            for stats in layers:
                layer = stats["layer"]
                for name in STATISTICS:
                    for head, value in enumerate(stats[name].tolist()):
                        experiment.add_scalar(f"cope/{name}/layer{layer}/head{head}", value, step)
                hist = stats["positions"]
                if hist is not None and hist.num:
                    limits, counts = hist.buckets()
                    experiment.add_histogram_raw(
                        f"cope/positions/layer{layer}", hist.min, hist.max, hist.num, hist.sum, hist.sum_squares,
                        limits, counts, step,
                    )  # fmt: skip
        worst = max(float(stats["clamped_frac"].max()) for stats in layers)
        pl_module.log("cope/max_clamped_frac", worst if math.isfinite(worst) else 0.0, rank_zero_only=True)
