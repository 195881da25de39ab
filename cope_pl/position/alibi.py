"""ALiBi (Press et al. 2022): a fixed per-head linear penalty -m_h * (i - j) on the logits."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cope_pl.attention import DistanceBias, Term
from cope_pl.position.base import ModelDims, PositionEncoding
from cope_pl.position.registry import register


def alibi_slopes(n_heads: int) -> Tensor:
    """The paper's geometric slopes 2^(-8h/n); for n not a power of two, interleave the next power's."""

    def power_of_two(n: int) -> list[float]:
        return [2 ** (-8.0 * (h + 1) / n) for h in range(n)]

    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = power_of_two(closest)
    if closest < n_heads:
        slopes += power_of_two(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes)


@register("alibi")
class ALiBi(PositionEncoding):
    name = "alibi"

    def __init__(self, dims: ModelDims):
        super().__init__(dims)
        self.register_buffer("slopes", alibi_slopes(dims.n_heads), persistent=False)  # (H,)

    def attention_terms(self, layer: int, q: Tensor, keys: dict[str, Tensor]) -> list[Term]:
        # float32 whatever q's dtype: bf16 counts exactly only to 256, so bf16-mixed training and fp32
        # evaluation would see different biases; DistanceBias casts the finished bias once.
        distances = torch.arange(keys["k"].size(-2), device=q.device, dtype=torch.float32)  # 0 .. S - 1
        return [DistanceBias(-self.slopes.float().unsqueeze(1) * distances)]  # (H, S)
