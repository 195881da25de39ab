"""Learned relative position embeddings: q_i . r[i - j] added to the logit, one table per layer.

`relative` has one embedding per distance up to max_distance; `relative_capped` lets every distance
>= p_max - 1 share the last embedding, so it extends to any length. `shared_table` uses one table for every
layer, as the relative baseline of the CoPE paper's official code does.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cope_pl.attention import RelativeLogits, Term
from cope_pl.position.base import ModelDims, PositionEncoding
from cope_pl.position.registry import register


@register("relative")
class RelativePositionEncoding(PositionEncoding):
    name = "relative"

    def __init__(self, dims: ModelDims, *, max_distance: int | None = None, shared_table: bool = False):
        super().__init__(dims)
        self.num_embeddings = dims.max_seq_len if max_distance is None else max_distance
        if self.num_embeddings < 1:
            raise ValueError(f"model.position_options.max_distance must be >= 1, got {self.num_embeddings}")
        # (L, D, P): per layer (or (1, D, P) for all layers), one embedding per distance, shared by the heads.
        layers = 1 if shared_table else dims.n_layers
        # std 0.02: the official std D^-0.5 is for a term divided by sqrt(D); see docs/position-encodings.md
        self.tables = nn.Parameter(torch.randn(layers, dims.d_head, self.num_embeddings) * 0.02)

    def table(self, layer: int) -> Tensor:
        return self.tables[0 if self.tables.size(0) == 1 else layer]  # (D, P)

    def check_length(self, seq_len: int) -> None:
        if seq_len > self.num_embeddings:
            raise ValueError(
                f"relative position table covers {self.num_embeddings} distances "
                f"(model.position_options.max_distance) but the sequence has {seq_len} tokens; "
                "raise max_distance or use relative_capped"
            )

    def attention_terms(self, layer: int, q: Tensor, keys: dict[str, Tensor]) -> list[Term]:
        self.check_length(keys["k"].size(-2))
        return [RelativeLogits(self.table(layer))]  # capped: distances past the table read its last embedding


@register("relative_capped")
class CappedRelativePositionEncoding(RelativePositionEncoding):
    name = "relative_capped"

    def __init__(self, dims: ModelDims, *, p_max: int = 64, shared_table: bool = False):
        super().__init__(dims, max_distance=p_max, shared_table=shared_table)

    def check_length(self, seq_len: int) -> None:
        pass  # distances beyond the table reuse its last embedding
