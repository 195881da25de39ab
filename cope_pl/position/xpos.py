"""xPos, the extrapolatable rotary embedding (Sun et al. 2023, "A Length-Extrapolatable Transformer", ACL 2023,
arXiv 2212.10554; the paper's method section: the extrapolatable position embedding).

RoPE with a per-dimension exponential scale (the paper's extrapolatable position embedding): the channel pair c
of a query at position n is multiplied by zeta_c^(n / scale_base) and that of a key at position m by
zeta_c^(-m / scale_base), with
zeta_c = (c / (D/2) + gamma) / (1 + gamma) in (0, 1) and gamma = 0.4, so the logit of (n, m) decays by
zeta_c^((n - m) / scale_base) on top of RoPE's rotation. Positions count from 0 on both sides (the paper's
code centres them, which leaves every product q_n . k_m as it is and would change cached keys as a sequence
grows); the scales are computed in float32, where zeta_c^(-m / scale_base) stays finite up to m of about
70 * scale_base.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cope_pl.position.base import ModelDims
from cope_pl.position.registry import register
from cope_pl.position.rope import RotaryPositionEncoding


@register("xpos")
class XPos(RotaryPositionEncoding):
    name = "xpos"

    def __init__(self, dims: ModelDims, *, base: float = 10000.0, scale_base: float = 512.0, gamma: float = 0.4):
        super().__init__(dims, base=base)
        if scale_base <= 0 or gamma <= 0:
            raise ValueError(f"xpos needs scale_base > 0 and gamma > 0, got scale_base={scale_base}, gamma={gamma}")
        self.scale_base = scale_base
        half = dims.d_head // 2
        zeta = (torch.arange(half, dtype=torch.float32) / half + gamma) / (1 + gamma)  # (D/2,)
        self.register_buffer("zeta", zeta, persistent=False)

    def scales(self, positions: Tensor) -> Tensor:
        """(N, D): zeta_c^(n / scale_base) for each position n and channel, in the rotate-half layout of rope.py."""
        power = positions.to(torch.float32).unsqueeze(-1) / self.scale_base  # (N, 1)
        scale = self.zeta**power  # (N, D/2)
        return torch.cat([scale, scale], dim=-1)

    def transform_qk(self, layer: int, q: Tensor, k: Tensor, start: int = 0) -> tuple[Tensor, Tensor]:
        q, k = super().transform_qk(layer, q, k, start)
        scale = self.scales(torch.arange(start, start + q.size(-2), device=q.device))  # (T, D)
        return q * scale.to(q.dtype), k / scale.to(k.dtype)
