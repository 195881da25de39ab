"""KERPLE, logarithmic variant (Chi et al. 2022, "KERPLE: Kernelized Relative Positional Embedding for Length
Extrapolation", NeurIPS 2022, arXiv 2205.09921; the paper's method section: its logarithmic kernel).

Each layer adds -r1 * log(1 + r2 * |i - j|) to the logits, with r1, r2 > 0 learned per head: the logarithmic
conditionally positive definite kernel of the paper (its "log" variant, beside the power variant). Both are
clamped at `min_value` so they stay positive, and initialised uniformly in (min_value, 2) and (min_value, 1).
A function of i - j alone: a `DistanceBias`, so it takes every fast path.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cope_pl.attention import DistanceBias, Term
from cope_pl.position.base import ModelDims, PositionEncoding
from cope_pl.position.registry import register


@register("kerple")
class KERPLE(PositionEncoding):
    name = "kerple"

    def __init__(self, dims: ModelDims, *, min_value: float = 0.01):
        super().__init__(dims)
        if not min_value > 0:
            raise ValueError(f"model.position_options.min_value must be > 0 (r1, r2 stay positive), got {min_value}")
        self.min_value = min_value
        shape = (dims.n_layers, dims.n_heads)
        self.r1 = nn.Parameter(torch.empty(shape).uniform_(min_value, 2.0))
        self.r2 = nn.Parameter(torch.empty(shape).uniform_(min_value, 1.0))

    def attention_terms(self, layer: int, q: Tensor, keys: dict[str, Tensor]) -> list[Term]:
        distances = torch.arange(keys["k"].size(-2), device=q.device, dtype=torch.float32)  # 0 .. S - 1
        r1 = self.r1[layer].clamp(min=self.min_value).unsqueeze(1)  # (H, 1)
        r2 = self.r2[layer].clamp(min=self.min_value).unsqueeze(1)
        return [DistanceBias(-r1 * torch.log1p(r2 * distances))]  # (H, S)
