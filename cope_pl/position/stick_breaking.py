"""Stick-breaking attention (Tan et al. 2025, "Scaling Stick-Breaking Attention: An Efficient Implementation and
In-depth Study", ICLR 2025, arXiv 2410.17980; the paper's method section: the stick-breaking process and its
numerically stable log-space form).

No softmax and no position encoding: query i walks back from its nearest key, and each key j breaks off the
share beta_ij = sigmoid(z_ij) of what the nearer keys left, A_ij = beta_ij prod_{j<t<i} (1 - beta_it)
(the paper's stick-breaking process), with z_ij = q_i . k_j / sqrt(D). Following the paper and its kernel's
default, a query does not attend to its own token (`attend_current: false`; the first token attends to nothing
and its attention output is zero); `attend_current: true` lets its own key break the stick first. What the
sticks leave is not attended. The weights are computed in log space, log A_ij = logsigmoid(z_ij) -
sum_{j<t<i} softplus(z_it) (`cope_pl.attention.StickBreaking`); other encodings composed with it
(`stick_breaking+fire`) add their terms to z.

Initialisation. With z near 0, as q.k is at initialisation, every key takes half of what is left, so a key d
tokens back gets 2^-d of the attention and a gradient as small: a task that must look 16 tokens back starts
with nothing to learn from. `logit_bias_init` (not in the paper; None leaves it out) adds a learned offset b per
layer and head to every z, so that at initialisation a key takes sigmoid(b) and the weight falls by
1 - sigmoid(b) per token instead of 1/2 (b = -2: 0.88 per token, a key 16 tokens back keeps 0.018 of the
attention instead of 2^-16).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cope_pl.attention import StickBreaking, Term
from cope_pl.position.base import ModelDims, PositionEncoding
from cope_pl.position.registry import register


@register("stick_breaking")
class StickBreakingAttention(PositionEncoding):
    name = "stick_breaking"

    def __init__(self, dims: ModelDims, *, attend_current: bool = False, logit_bias_init: float | None = None):
        super().__init__(dims)
        self.attend_current = attend_current
        self.logit_bias = (
            None
            if logit_bias_init is None
            else nn.Parameter(torch.full((dims.n_layers, dims.n_heads), float(logit_bias_init)))  # (L, H)
        )

    def attention_terms(self, layer: int, q: Tensor, keys: dict[str, Tensor]) -> list[Term]:
        offset = None if self.logit_bias is None else self.logit_bias[layer]  # (H,)
        return [StickBreaking(self.attend_current, offset)]
