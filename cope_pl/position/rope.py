"""Rotary position embedding (Su et al. 2021), rotate-half layout, applied to q and k.

At evaluation a `RopeScaling` (rope_scaling.py: linear, dynamic NTK, YaRN) may replace the frequencies.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cope_pl.position.base import ModelDims, PositionEncoding
from cope_pl.position.registry import register
from cope_pl.position.rope_scaling import RopeScaling


def rotate(x: Tensor, positions: Tensor, inv_freq: Tensor) -> Tensor:
    """Rotate channel pairs (c, c + D/2) of x (..., N, D) by angle positions[n] * inv_freq[c]."""
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # (N, D/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)  # (..., N, D/2) each
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


@register("rope")
class RotaryPositionEncoding(PositionEncoding):
    name = "rope"

    def __init__(self, dims: ModelDims, *, base: float = 10000.0):
        super().__init__(dims)
        d = dims.d_head
        if d % 2:
            raise ValueError(f"rope needs an even head dimension, got d_model/n_heads = {d}")
        inv_freq = base ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)  # (D/2,)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.base = base
        self.scaling: RopeScaling | None = None  # set at evaluation by apply_rope_scaling

    def transform_qk(self, layer: int, q: Tensor, k: Tensor, start: int = 0) -> tuple[Tensor, Tensor]:
        positions = torch.arange(start, start + q.size(-2), device=q.device)
        if self.scaling is None:
            return rotate(q, positions, self.inv_freq), rotate(k, positions, self.inv_freq)
        inv_freq, scale = self.scaling.frequencies(self.base, self.dims.d_head, start + q.size(-2))
        inv_freq = inv_freq.to(q.device, torch.float32)  # (D/2,)
        return rotate(q, positions, inv_freq) * scale, rotate(k, positions, inv_freq) * scale
