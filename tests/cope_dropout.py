"""Checking a CoPE op with attention dropout against the reference, through the op's own dropout mask.

The mask cannot be read from the op, but it can be seen: with v_j = e_j (one-hot rows, S <= D) the output row i
is the dropped probability row, P_ij / (1 - p) where kept and exactly 0 where dropped. The same seed then gives
the same mask for any v, and the float64 reference with that mask is the function the op must compute.
"""

import math

import torch

from cope_pl.bench.accuracy import NAMES, outputs_and_grads
from cope_pl.ops import causal_mask, cope_position_logits


def reference_probs(q, k, pos_emb, gate_k=None):
    """(B, H, T, S) CoPE attention probabilities without dropout, in q's dtype."""
    t, s = q.size(-2), k.size(-2)
    mask = causal_mask(t, s, q.device)
    logits = (q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))).masked_fill(~mask, float("-inf"))
    gates = logits if gate_k is None else (q @ gate_k.transpose(-1, -2) / math.sqrt(q.size(-1)))
    gates = gates.masked_fill(~mask, float("-inf"))
    return torch.softmax(logits + cope_position_logits(q, gates, pos_emb), dim=-1)


def observed_mask(op, q, k, pos_emb, gate_k, p, seed):
    """The kept (True) entries of the op's dropout mask for this seed, and its dropped-probability output."""
    b, h, t, d = q.shape
    s = k.size(-2)
    assert s <= d, "one-hot values need S <= D"
    onehot = torch.eye(s, d, dtype=q.dtype, device=q.device).expand(b, h, s, d)
    with torch.no_grad():
        dropped = op(q, k, onehot, pos_emb, gate_k=gate_k, dropout_p=p, dropout_seed=seed)[..., :s]  # (B,H,T,S)
    return dropped != 0, dropped


def check_dropout_semantics(op, inputs, p, seed, dtype=torch.float32):
    """Kept entries equal P / (1 - p), about a fraction p of the causal entries are dropped."""
    q, k, _, pos_emb, gate_k = [None if x is None else x.to(dtype) for x in inputs]
    keep, dropped = observed_mask(op, q, k, pos_emb, gate_k, p, seed)
    probs = reference_probs(*(None if x is None else x.double() for x in (q, k, pos_emb, gate_k)))
    expected = torch.where(keep, probs / (1 - p), torch.zeros_like(probs))
    causal = causal_mask(q.size(-2), k.size(-2), q.device).expand_as(keep)
    return (dropped.double() - expected).abs().max().item(), 1 - keep[causal].float().mean().item()


def compare_with_masked_reference(op, inputs, p, seed, dtype=torch.float32):
    """(name, error, scale) for the output and every gradient, against float64 with the op's own mask."""
    q, k, v, pos_emb, gate_k = inputs
    keep, _ = observed_mask(op, *(None if x is None else x.to(dtype) for x in (q, k, pos_emb, gate_k)), p, seed)
    weights = torch.randn(q.shape, dtype=torch.float64).to(q.device)

    def masked_reference(q, k, v, pos_emb, gate_k=None):
        return (reference_probs(q, k, pos_emb, gate_k) * keep / (1 - p)) @ v

    def seeded_op(q, k, v, pos_emb, gate_k=None):
        return op(q, k, v, pos_emb, gate_k=gate_k, dropout_p=p, dropout_seed=seed)

    exact = outputs_and_grads(masked_reference, inputs, torch.float64, weights)
    got = outputs_and_grads(seeded_op, inputs, dtype, weights)
    return [(n, (g.double() - e).abs().max().item(), e.abs().max().item()) for n, e, g in zip(NAMES, exact, got)]


def dropout_inputs(t, s, d, sep_keys, b=2, h=2, npos=16, device="cpu"):
    """float64 (q, k, v, pos_emb, gate_k or None); callers cast. npos 16 < T, so the clamp is reached too."""
    q, k, v = torch.randn(b, h, t, d, dtype=torch.float64), *torch.randn(2, b, h, s, d, dtype=torch.float64)
    gate_k = torch.randn(b, h, s, d, dtype=torch.float64) if sep_keys else None
    inputs = [q, k, v, torch.randn(d, npos, dtype=torch.float64), gate_k]
    return [None if x is None else x.to(device) for x in inputs]
