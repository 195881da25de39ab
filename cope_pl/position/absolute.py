"""Absolute position embeddings added to the token embeddings: a learned table or sinusoids."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from cope_pl.position.base import ModelDims, PositionEncoding
from cope_pl.position.registry import register


def sinusoids(seq_len: int, d_model: int, device: torch.device | None = None) -> Tensor:
    """(T, C) table of Vaswani et al. 2017: sin on even channels, cos on odd ones."""
    pos = torch.arange(seq_len, device=device, dtype=torch.float32).unsqueeze(1)  # (T, 1)
    freq = torch.exp(torch.arange(0, d_model, 2, device=device) * (-math.log(10000.0) / d_model))
    table = torch.zeros(seq_len, d_model, device=device)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: d_model // 2])
    return table


@register("absolute")
class AbsolutePositionEncoding(PositionEncoding):
    name = "absolute"

    def __init__(self, dims: ModelDims, *, table: str = "learned"):
        super().__init__(dims)
        if table not in ("learned", "sinusoidal"):
            raise ValueError(f"model.position_options.table must be 'learned' or 'sinusoidal', got {table!r}")
        self.table = table
        if table == "learned":
            self.embedding = nn.Parameter(torch.randn(dims.max_seq_len, dims.d_model) * 0.02)  # (T_max, C)

    def check_length(self, seq_len: int) -> None:
        if self.table == "learned" and seq_len > self.dims.max_seq_len:
            raise ValueError(
                f"sequence of {seq_len} tokens is longer than the learned absolute position table "
                f"(model.max_seq_len={self.dims.max_seq_len}); raise model.max_seq_len or use an encoding "
                "that extrapolates"
            )

    def encode_input(self, x: Tensor, start: int = 0) -> Tensor:
        end = start + x.size(1)
        self.check_length(end)
        if self.table == "learned":
            return x + self.embedding[start:end].to(x.dtype)
        return x + sinusoids(end, x.size(-1), x.device)[start:].to(x.dtype)
