"""The one interface through which a position encoding reaches the Transformer.

A position encoding can act in three places, and each hook defaults to "do nothing":
  encode_input  - add something to the token embeddings (absolute PE);
  transform_qk  - change queries and keys before the dot product (RoPE);
  logit_term    - add a (B, H, T, S) term to the attention logits (relative, ALiBi, CoPE).
One instance serves the whole model; per-layer parameters live inside it and the hooks get the layer
index. Attention takes the fused scaled_dot_product_attention path whenever no logit term is present.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cope_pl.ops import causal_mask


@dataclass(frozen=True)
class ModelDims:
    """The model sizes a position encoding may need to shape its parameters."""

    n_layers: int
    n_heads: int
    d_model: int
    max_seq_len: int

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads


class PositionEncoding(nn.Module):
    name: ClassVar[str] = "none"
    adds_logit_term: ClassVar[bool] = False

    def __init__(self, dims: ModelDims):
        super().__init__()
        self.dims = dims

    def check_length(self, seq_len: int) -> None:
        """Raise ValueError if this encoding cannot represent a sequence of seq_len tokens."""

    def encode_input(self, x: Tensor) -> Tensor:  # (B, T, C) -> (B, T, C)
        return x

    def transform_qk(self, layer: int, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return q, k  # (B, H, T, D), (B, H, S, D)

    def logit_term(self, layer: int, x: Tensor, q: Tensor, k: Tensor, logits: Tensor) -> Tensor:
        """(B, H, T, S) term added to `logits` (scaled by 1/sqrt(D), causally masked with -inf).

        x is the layer's (normalised) input (B, T, C), for encodings with their own projections.
        """
        raise NotImplementedError(f"{type(self).__name__} adds no logit term")

    def attend(self, layer: int, x: Tensor, q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> Tensor:
        """Causal attention (B, H, T, D) -> (B, H, T, D). Encodings with a faster exact path override it."""
        q, k = self.transform_qk(layer, q, k)
        if not self.adds_logit_term:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        t, s = q.size(-2), k.size(-2)
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))  # (B, H, T, S)
        logits = logits.masked_fill(~causal_mask(t, s, q.device), float("-inf"))
        logits = logits + self.logit_term(layer, x, q, k, logits)
        probs = F.dropout(torch.softmax(logits, dim=-1), p=dropout_p, training=dropout_p > 0)
        return probs @ v  # (B, H, T, D)


def distance_matrix(t: int, s: int, device: torch.device) -> Tensor:
    """(T, S) long: i - j for query i (the last T of S positions) and key j; negative above the diagonal."""
    rows = torch.arange(t, device=device).unsqueeze(1) + (s - t)
    return rows - torch.arange(s, device=device).unsqueeze(0)


def gather_positions(z: Tensor, index: Tensor) -> Tensor:
    """Pick z[..., i, index[i, j]]: z (B, H, T, P) per-position logits, index (T, S) -> (B, H, T, S)."""
    return z.gather(-1, index.expand(*z.shape[:-2], *index.shape))
