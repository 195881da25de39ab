"""FIRE, Functional Interpolation for Relative Positions (Li et al. 2023, ICLR 2024, arXiv 2310.04418; the paper's
method section: the FIRE bias, its log transform and the thresholded normaliser).

Each layer adds a learned per-head bias b(i, j) = f_theta(psi(i - j) / psi(max(L, i))) to the logit of query i
and key j (the paper's FIRE bias, with both of its transformations): psi(x) = log(c x + 1)
compresses distances, and dividing by psi of the query position maps every distance into [0, 1] at any length
("progressive interpolation"); the threshold L keeps short contexts from being over-normalised. f_theta is an
MLP 1 -> mlp_width -> n_heads with a ReLU; c and the threshold multiplier are learned, initialised to init_c
and 1 (L = |multiplier * init_L|, as in the paper's appendix listing). The default init_L of 512 suits
training contexts longer than 512; on shorter ones no query ever passes L and the bias is a function of i - j
alone, so the CPU comparison sweeps start L at their training length (docs/position-encodings.md). The bias
depends on i, not only on i - j, so it is a `PairBias` and attention runs explicitly.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from cope_pl.attention import PairBias, Term
from cope_pl.position.base import ModelDims, PositionEncoding
from cope_pl.position.registry import register


def psi(x: Tensor, c: Tensor) -> Tensor:
    """FIRE's log transform log(|c| x + 1) of non-negative positions and distances."""
    return torch.log1p(c.abs() * x)


@register("fire")
class FIRE(PositionEncoding):
    name = "fire"

    def __init__(
        self, dims: ModelDims, *, mlp_width: int = 32, init_c: float = 0.1, init_L: float = 512.0, eps: float = 1e-6
    ):
        super().__init__(dims)
        if mlp_width < 1 or init_L <= 0 or init_c == 0:
            raise ValueError(
                "model.position_options: fire needs mlp_width >= 1, init_L > 0 and init_c != 0, "
                f"got mlp_width={mlp_width}, init_L={init_L}, init_c={init_c}"
            )
        n_layers, heads = dims.n_layers, dims.n_heads
        self.eps = eps
        self.register_buffer("init_L", torch.tensor(float(init_L)))
        self.c = nn.Parameter(torch.full((n_layers,), float(init_c)))
        self.L_multiplier = nn.Parameter(torch.ones(n_layers))
        # The MLP's two linear maps per layer, initialised as torch.nn.Linear does (uniform in +-1/sqrt(fan_in)).
        bound = 1 / math.sqrt(mlp_width)
        self.w1 = nn.Parameter(torch.empty(n_layers, mlp_width).uniform_(-1, 1))  # input size 1: bound 1
        self.b1 = nn.Parameter(torch.empty(n_layers, mlp_width).uniform_(-1, 1))
        self.w2 = nn.Parameter(torch.empty(n_layers, mlp_width, heads).uniform_(-bound, bound))
        self.b2 = nn.Parameter(torch.empty(n_layers, heads).uniform_(-bound, bound))

    def normalized_distances(self, layer: int, t: int, s: int, device: torch.device) -> Tensor:
        """(T, S): psi(i - j) / psi(max(L, i)) for the last T of S query positions (0 where j > i, masked)."""
        dtype = self.c.dtype  # float32 at least: positions are exact in it up to 2^24
        i = torch.arange(s - t, s, device=device, dtype=dtype).unsqueeze(1)  # (T, 1)
        j = torch.arange(s, device=device, dtype=dtype).unsqueeze(0)  # (1, S)
        c = self.c[layer]
        threshold = (self.L_multiplier[layer] * self.init_L).abs()
        return psi((i - j).clamp(min=0), c) / (psi(torch.maximum(i, threshold), c) + self.eps)

    def attention_terms(self, layer: int, q: Tensor, keys: dict[str, Tensor]) -> list[Term]:
        x = self.normalized_distances(layer, q.size(-2), keys["k"].size(-2), q.device).unsqueeze(-1)  # (T, S, 1)
        hidden = torch.relu(x * self.w1[layer] + self.b1[layer])  # (T, S, W)
        bias = hidden @ self.w2[layer] + self.b2[layer]  # (T, S, H)
        return [PairBias(bias.permute(2, 0, 1))]  # (H, T, S)
