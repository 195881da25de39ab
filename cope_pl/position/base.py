"""The one interface through which a position encoding reaches the Transformer.

A position encoding can act in three places, and each hook defaults to "do nothing":
  encode_input    - add something to the token embeddings (absolute PE);
  transform_qk    - change queries and keys before the dot product (RoPE);
  attention_terms - contribute terms to the attention logits, in the forms of `cope_pl.attention`
                    (relative tables, per-head biases by distance, CoPE's contextual term).
Encodings whose terms need more than the attention keys declare per-key features (`key_features`, e.g.
sep-keys CoPE's gate keys); the model caches them with the keys and values when decoding. No encoding
computes attention: `cope_pl.attention.causal_attention` does, on the fastest exact path for the terms.
One instance serves the whole model; per-layer parameters live inside it and the hooks get the layer index.
Hooks see only new tokens; `start` is the absolute position of the first (non-zero when decoding with a cache).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from cope_pl.attention import Term


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

    def __init__(self, dims: ModelDims):
        super().__init__()
        self.dims = dims

    def check_length(self, seq_len: int) -> None:
        """Raise ValueError if this encoding cannot represent a sequence of seq_len tokens."""

    def encode_input(self, x: Tensor, start: int = 0) -> Tensor:
        """(B, T, C) token embeddings of positions start .. start + T - 1 -> (B, T, C)."""
        return x

    def transform_qk(self, layer: int, q: Tensor, k: Tensor, start: int = 0) -> tuple[Tensor, Tensor]:
        """Queries and keys (B, H, T, D) of the new tokens at positions start .. start + T - 1."""
        return q, k

    def key_features(self, layer: int, x: Tensor) -> dict[str, Tensor]:
        """(B, H, T, D) tensors per new token that attention_terms reads for every key; x is the layer input."""
        return {}

    def attention_terms(self, layer: int, q: Tensor, keys: dict[str, Tensor]) -> list[Term]:
        """Terms added to the logits of queries q (B, H, T, D) against keys["k"], keys["v"] and the key features
        (B, H, S, D) of all S tokens so far."""
        return []


class ComposedPositionEncoding(PositionEncoding):
    """Several encodings at once: hooks run in the parts' order and their attention terms add up, so a
    combination takes the same attention paths as its parts."""

    def __init__(self, name: str, parts: list[PositionEncoding]):
        super().__init__(parts[0].dims)
        self.name = name
        self.parts = nn.ModuleList(parts)

    def check_length(self, seq_len: int) -> None:
        for part in self.parts:
            part.check_length(seq_len)

    def encode_input(self, x: Tensor, start: int = 0) -> Tensor:
        for part in self.parts:
            x = part.encode_input(x, start)
        return x

    def transform_qk(self, layer: int, q: Tensor, k: Tensor, start: int = 0) -> tuple[Tensor, Tensor]:
        for part in self.parts:
            q, k = part.transform_qk(layer, q, k, start)
        return q, k

    def key_features(self, layer: int, x: Tensor) -> dict[str, Tensor]:
        features: dict[str, Tensor] = {}
        for part in self.parts:
            features.update(part.key_features(layer, x))
        return features

    def attention_terms(self, layer: int, q: Tensor, keys: dict[str, Tensor]) -> list[Term]:
        return [term for part in self.parts for term in part.attention_terms(layer, q, keys)]
