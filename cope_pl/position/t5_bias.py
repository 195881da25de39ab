"""T5's bucketed relative bias (Raffel et al. 2020): a learned scalar per head per distance bucket.

Distances below num_buckets / 2 get a bucket each; longer ones share log-spaced buckets up to max_distance,
and every distance beyond reads the last bucket (causal attention: T5's bidirectional=False), so it runs at
any length. One table (num_buckets, H) serves every layer, as in T5.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from cope_pl.attention import DistanceBias, Term
from cope_pl.position.base import ModelDims, PositionEncoding
from cope_pl.position.registry import register


def distance_buckets(distances: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """Bucket of each distance i - j >= 0: exact below num_buckets // 2, log-spaced up to max_distance."""
    exact = num_buckets // 2
    far = (
        exact
        + (
            torch.log(distances.clamp(min=1).float() / exact) / math.log(max_distance / exact) * (num_buckets - exact)
        ).long()
    )
    return torch.where(distances < exact, distances, far.clamp(max=num_buckets - 1))


@register("t5_bias")
class T5RelativeBias(PositionEncoding):
    name = "t5_bias"

    def __init__(self, dims: ModelDims, *, num_buckets: int = 32, max_distance: int = 128):
        super().__init__(dims)
        if num_buckets < 2 or max_distance <= num_buckets // 2:
            raise ValueError(
                "model.position_options: t5_bias needs num_buckets >= 2 and max_distance > num_buckets / 2, "
                f"got num_buckets={num_buckets}, max_distance={max_distance}"
            )
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.bias = nn.Parameter(torch.randn(num_buckets, dims.n_heads) * 0.02)  # (buckets, H)

    def attention_terms(self, layer: int, q: Tensor, keys: dict[str, Tensor]) -> list[Term]:
        distances = torch.arange(keys["k"].size(-2), device=q.device)  # 0 .. S - 1
        buckets = distance_buckets(distances, self.num_buckets, self.max_distance)
        return [DistanceBias(self.bias[buckets].transpose(0, 1))]  # (H, S): b_h[bucket(i - j)]
