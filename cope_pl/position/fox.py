"""FoX, Forgetting Attention (Lin et al. 2025, "Forgetting Transformer: Softmax Attention with a Forget Gate",
ICLR 2025, arXiv 2503.02130; the paper's method section, Forgetting Attention).

Each head of each layer computes a scalar forget gate per token from the layer input, f_t = sigmoid(w . x_t + b)
(the paper's forget gate), and the logit of query i and key j gains D_ij = sum_{t=j+1..i} log f_t: the paper's
softmax(q.k / sqrt(D) + D), with D = c_i - c_j and c the cumulative sum of log f. Like CoPE's gates it
is data-dependent, but one gate per key rather than per (query, key) pair. The paper's FoX uses no other
position encoding; `fox+cope` and the like compose from configuration.

The log gates are a per-key feature (`key_features`), so a KV cache keeps them with the keys and decoding sums
them over everything cached; the bias is a `PairBias`, so attention runs explicitly. w and b are plain
parameters outside the model's Linear init: w normal with std 0.02, b `gate_bias_init`. The default 0 is the
authors' code for the data-dependent gate (a Linear whose bias starts at 0: every gate 1/2, so a key d tokens
back starts d ln 2 nats down); configs/position/fox.yaml starts at 2 (gates 0.88, 0.13 nats per token), from which
the small CPU models learn the copy task (16 tokens back), which they do not from 1/2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cope_pl.attention import PairBias, Term
from cope_pl.position.base import ModelDims, PositionEncoding
from cope_pl.position.registry import register

LOG_GATE = "fox_log_forget"


@register("fox")
class ForgettingAttention(PositionEncoding):
    name = "fox"

    def __init__(self, dims: ModelDims, *, gate_bias_init: float = 0.0):
        super().__init__(dims)
        self.gate_weight = nn.Parameter(torch.randn(dims.n_layers, dims.n_heads, dims.d_model) * 0.02)  # (L, H, C)
        self.gate_bias = nn.Parameter(torch.full((dims.n_layers, dims.n_heads), float(gate_bias_init)))  # (L, H)

    def key_features(self, layer: int, x: Tensor) -> dict[str, Tensor]:
        """(B, H, T, 1) log f_t of the new tokens, from the layer input x (B, T, C)."""
        preact = x @ self.gate_weight[layer].transpose(0, 1) + self.gate_bias[layer]  # (B, T, H)
        preact = preact.to(torch.promote_types(preact.dtype, torch.float32))  # log gates are summed: float32 at least
        return {LOG_GATE: F.logsigmoid(preact).transpose(1, 2).unsqueeze(-1)}

    def attention_terms(self, layer: int, q: Tensor, keys: dict[str, Tensor]) -> list[Term]:
        cumulative = keys[LOG_GATE][..., 0].cumsum(-1)  # (B, H, S): c_t = sum_{u<=t} log f_u
        t = q.size(-2)
        queries = cumulative[..., -t:]  # (B, H, T): c_i of the last T positions
        return [PairBias(queries.unsqueeze(-1) - cumulative.unsqueeze(-2))]  # (B, H, T, S): c_i - c_j
