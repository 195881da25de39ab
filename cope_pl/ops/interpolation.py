"""The CoPE position table in the form the chunked op and its C++ blocks read it: values and slopes side by side."""

from __future__ import annotations

import torch
from torch import Tensor


def interpolation_table(pos_emb: Tensor) -> Tensor:
    """(D, 2P): columns e[p], e[p + 1] - e[p] for each p (the slope is 0 at p = P - 1). q_i . e interpolated at
    p = f + w is z[f] + w slope[f] with (z[f], slope[f]) the pair f of q_i . table, so one gather of complex
    pairs at f = floor(p) reads both, and a clamped position (f = P - 1) has no slope."""
    slopes = torch.cat([pos_emb[:, 1:] - pos_emb[:, :-1], torch.zeros_like(pos_emb[:, :1])], dim=1)
    return torch.stack([pos_emb, slopes], dim=-1).flatten(1)


def interpolation_table_grad(grad: Tensor) -> Tensor:
    """The gradient of `interpolation_table`'s input (D, P), given the gradient of its output (D, 2P)."""
    pairs = grad.unflatten(1, (-1, 2))
    grad_e, grad_slopes = pairs[..., 0].clone(), pairs[:, :-1, 1]
    grad_e[:, 1:] += grad_slopes
    grad_e[:, :-1] -= grad_slopes
    return grad_e
