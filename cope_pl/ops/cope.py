"""Reference CoPE, exactly as in the paper's Appendix B (Golovneva et al. 2024).

These two functions are the specification: every faster implementation (chunked, fused kernel) is
tested against them. They materialise full (..., T, S) tensors and are meant to be read, not to be fast.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def cope_position_logits(query: Tensor, attn_logits: Tensor, pos_emb: Tensor) -> Tensor:
    """The CoPE term to add to the attention logits.

    query:       (..., T, D)
    attn_logits: (..., T, S), already scaled by 1/sqrt(D) and causally masked with -inf
    pos_emb:     (D, P), one embedding per integer position 0..P-1
    returns:     (..., T, S), q_i . e[p_ij] with p_ij interpolated between integer positions
    """
    positions = contextual_positions(attn_logits, pos_emb.size(-1))  # (..., T, S)
    pos_ceil = positions.ceil().long()  # integer indices carry no gradient
    pos_floor = positions.floor().long()
    z = torch.matmul(query, pos_emb)  # (..., T, P): z_i[p] = q_i . e[p] (`logits_int` in the paper's listing)
    z_ceil = z.gather(-1, pos_ceil)  # (..., T, S)
    z_floor = z.gather(-1, pos_floor)  # (..., T, S)
    w = positions - pos_floor  # interpolation weight, differentiable through the gates
    return (z_ceil * w + z_floor * (1 - w)).to(z.dtype)  # positions are float32 or wider: back to q's dtype


def contextual_positions(gate_logits: Tensor, npos_max: int) -> Tensor:
    """(..., T, S) masked gate logits -> p_ij = sum_{t=j..i} sigmoid(gate_it), clamped at npos_max - 1."""
    # At least float32: a bf16 running sum counts exactly only to 256 and loses gates long before.
    gates = torch.sigmoid(gate_logits.to(torch.promote_types(gate_logits.dtype, torch.float32)))  # masked: exactly 0
    # A cumulative sum from the right (keys after i are masked to 0).
    return gates.flip(-1).cumsum(dim=-1).flip(-1).clamp(max=npos_max - 1)


def causal_mask(t: int, s: int, device: torch.device | None = None) -> Tensor:
    """(T, S) bool, True where query i may attend key j; queries are the last T of S positions."""
    rows = torch.arange(t, device=device).unsqueeze(1) + (s - t)  # absolute position of each query
    cols = torch.arange(s, device=device).unsqueeze(0)
    return cols <= rows


def cope_attention(q: Tensor, k: Tensor, v: Tensor, pos_emb: Tensor, gate_k: Tensor | None = None) -> Tensor:
    """Causal softmax attention with CoPE.

    q: (B, H, T, D); k, v: (B, H, S, D) with S >= T (queries are the last T positions);
    pos_emb: (D, P); gate_k: optional (B, H, S, D) separate keys for the gates (sep-keys CoPE).
    returns (B, H, T, D).
    """
    t, s, d = q.size(-2), k.size(-2), q.size(-1)
    if s < t:
        raise ValueError(f"cope_attention needs at least as many keys as queries, got S={s} < T={t}")
    mask = causal_mask(t, s, q.device)  # (T, S)
    scale = 1.0 / math.sqrt(d)
    logits = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))  # (B, H, T, S)
    if gate_k is None:
        gate_logits = logits
    else:
        gate_logits = (q @ gate_k.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    logits = logits + cope_position_logits(q, gate_logits, pos_emb)
    return F.softmax(logits, dim=-1) @ v  # (B, H, T, D)
