"""The reference CoPE op against loop implementations written from the paper's definition."""

import math

import pytest
import torch

from cope_pl.ops import causal_mask, cope_attention, cope_position_logits


def loop_cope_position_logits(query, logits, pos_emb):
    """q_i . e[p_ij], p_ij = sum_{t=j..i} sigmoid(logit_it) clamped at P-1, e interpolated linearly."""
    if logits.dim() > 2:  # leading batch dims: one (T, S) matrix at a time
        return torch.stack([loop_cope_position_logits(qq, ll, pos_emb) for qq, ll in zip(query, logits)])
    t_len, s_len = logits.shape[-2:]
    npos = pos_emb.shape[-1]
    out = torch.zeros_like(logits)
    for i in range(t_len):
        for j in range(s_len):
            p = torch.sigmoid(logits[i, j:]).sum().clamp(max=npos - 1)  # keys past i are masked to 0
            lo = p.detach().floor().long()
            hi = p.detach().ceil().long()
            e = pos_emb[:, lo] * (1 - (p - lo)) + pos_emb[:, hi] * (p - lo)  # (D,) interpolated embedding
            out[i, j] = query[i] @ e
    return out


def masked_logits(q, k):
    t, s = q.shape[-2], k.shape[-2]
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return logits.masked_fill(~causal_mask(t, s), float("-inf"))


def test_position_logits_match_loop_values_and_gradients():
    d, npos = 8, 5
    q = torch.randn(7, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(7, d, dtype=torch.float64, requires_grad=True)
    e = torch.randn(d, npos, dtype=torch.float64, requires_grad=True)
    fast = cope_position_logits(q, masked_logits(q, k), e)
    slow = loop_cope_position_logits(q, masked_logits(q, k), e)
    mask = causal_mask(7, 7)
    torch.testing.assert_close(fast[mask], slow[mask])
    weights = torch.randn_like(fast).masked_fill(~mask, 0)
    grads_fast = torch.autograd.grad((fast * weights).sum(), (q, k, e))
    grads_slow = torch.autograd.grad((slow * weights).sum(), (q, k, e))
    for gf, gs in zip(grads_fast, grads_slow):
        torch.testing.assert_close(gf, gs)


def test_positions_are_clamped_at_npos_max():
    d, npos, t = 4, 3, 10
    q = torch.randn(t, d, dtype=torch.float64)
    e = torch.randn(d, npos, dtype=torch.float64)
    logits = torch.full((t, t), 50.0, dtype=torch.float64).masked_fill(~causal_mask(t, t), float("-inf"))
    out = cope_position_logits(q, logits, e)
    # Every gate is 1, so key 0 seen from query 9 sits at 10 > npos_max - 1 and reads e[npos_max - 1].
    torch.testing.assert_close(out[9, 0], q[9] @ e[:, npos - 1])


def test_all_gates_open_is_relative_pe_shifted_by_one():
    # With every gate 1, p_ij = i - j + 1 (the key itself counts), so CoPE is relative PE with r[d] = e[d + 1].
    d, npos, t = 6, 12, 9
    q = torch.randn(2, t, d, dtype=torch.float64)
    e = torch.randn(d, npos, dtype=torch.float64)
    logits = torch.full((2, t, t), 60.0, dtype=torch.float64).masked_fill(~causal_mask(t, t), float("-inf"))
    out = cope_position_logits(q, logits, e)
    rel = torch.zeros_like(out)
    for i in range(t):
        for j in range(i + 1):
            rel[:, i, j] = q[:, i] @ e[:, i - j + 1]
    mask = causal_mask(t, t)
    torch.testing.assert_close(out[:, mask], rel[:, mask])


def loop_cope_attention(q, k, v, e, gate_k=None):
    gate_k = k if gate_k is None else gate_k
    logits = masked_logits(q, k)
    logits = logits + loop_cope_position_logits(q, masked_logits(q, gate_k), e)
    return torch.softmax(logits, -1) @ v


@pytest.mark.parametrize("sep_keys", [False, True])
@pytest.mark.parametrize("t,s", [(5, 5), (3, 6)])
def test_cope_attention_matches_loop(sep_keys, t, s):
    b, h, d, npos = 2, 2, 4, 4
    q = torch.randn(b, h, t, d, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(b, h, s, d, dtype=torch.float64, requires_grad=True) for _ in range(2))
    e = torch.randn(d, npos, dtype=torch.float64, requires_grad=True)
    gk = torch.randn(b, h, s, d, dtype=torch.float64, requires_grad=True) if sep_keys else None
    inputs = [x for x in (q, k, v, e, gk) if x is not None]
    fast = cope_attention(q, k, v, e, gate_k=gk)
    slow = loop_cope_attention(q, k, v, e, gate_k=gk)
    torch.testing.assert_close(fast, slow)
    w = torch.randn_like(fast)
    for gf, gs in zip(torch.autograd.grad((fast * w).sum(), inputs), torch.autograd.grad((slow * w).sum(), inputs)):
        torch.testing.assert_close(gf, gs)


def test_cope_attention_rejects_fewer_keys_than_queries():
    q = torch.randn(1, 1, 4, 2)
    k = torch.randn(1, 1, 3, 2)
    with pytest.raises(ValueError, match="S=3 < T=4"):
        cope_attention(q, k, k, torch.randn(2, 3))
