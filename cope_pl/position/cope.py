"""Contextual Position Encoding (Golovneva et al. 2024).

Each head gates every earlier key with sigmoid(q_i . k_j / sqrt(D)); a key's position seen from query i
is the sum of the gates between them, and q_i . e[p_ij] (interpolated) is added to the logit. One
position table per layer, shared by its heads (paper, Appendix B). `cope_sepkeys` gates with a separate
key projection instead of the attention keys.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from cope_pl.ops import causal_mask, cope_position_logits
from cope_pl.position.base import ModelDims, PositionEncoding
from cope_pl.position.registry import register


@register("cope")
class ContextualPositionEncoding(PositionEncoding):
    name = "cope"
    adds_logit_term = True

    def __init__(self, dims: ModelDims, *, npos_max: int = 64, sep_keys: bool = False):
        super().__init__(dims)
        if npos_max < 1:
            raise ValueError(f"model.position_options.npos_max must be >= 1, got {npos_max}")
        self.npos_max = npos_max
        # (L, D, P), zero-initialised as in the paper's code.
        self.pos_emb = nn.Parameter(torch.zeros(dims.n_layers, dims.d_head, npos_max))
        self.gate_proj = None
        if sep_keys:
            self.gate_proj = nn.ModuleList(
                nn.Linear(dims.d_model, dims.d_model, bias=False) for _ in range(dims.n_layers)
            )

    def gate_logits(self, layer: int, x: Tensor, q: Tensor, logits: Tensor) -> Tensor:
        if self.gate_proj is None:
            return logits  # the layer's own scaled, masked attention logits
        b, t, _ = x.shape
        gate_k = self.gate_proj[layer](x).view(b, t, self.dims.n_heads, -1).transpose(1, 2)  # (B, H, S, D)
        gate = q @ gate_k.transpose(-1, -2) / math.sqrt(q.size(-1))  # (B, H, T, S)
        return gate.masked_fill(~causal_mask(q.size(-2), gate_k.size(-2), q.device), float("-inf"))

    def logit_term(self, layer: int, x: Tensor, q: Tensor, k: Tensor, logits: Tensor) -> Tensor:
        gates = self.gate_logits(layer, x, q, logits)
        return cope_position_logits(q, gates, self.pos_emb[layer].to(q.dtype))


@register("cope_sepkeys")
def cope_sepkeys(dims: ModelDims, *, npos_max: int = 64) -> ContextualPositionEncoding:
    return ContextualPositionEncoding(dims, npos_max=npos_max, sep_keys=True)
