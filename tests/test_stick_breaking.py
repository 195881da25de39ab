"""Stick-breaking attention against the stick broken key by key, nearest first."""

import math

import pytest
import torch

from cope_pl.attention import StickBreaking, causal_attention
from cope_pl.position import ModelDims, build_position_encoding


def loop_weights(z, attend_current):
    """A_ij = sigmoid(z_ij) * what keys nearer to query i than j left, walking back from i (or i - 1)."""
    t, s = len(z), len(z[0])
    weights = [[0.0] * s for _ in range(t)]
    for row in range(t):
        i = s - t + row
        left = 1.0
        for j in range(i if attend_current else i - 1, -1, -1):
            share = 1 / (1 + math.exp(-z[row][j]))
            weights[row][j] = share * left
            left *= 1 - share
    return weights


@pytest.mark.parametrize("attend_current", [False, True])
@pytest.mark.parametrize("t", [11, 3])  # a full sequence, and the last queries of it (decoding with a cache)
def test_weights_and_outputs_equal_breaking_the_stick_key_by_key(attend_current, t):
    enc = build_position_encoding("stick_breaking", ModelDims(1, 2, 8, 64), {"attend_current": attend_current})
    q = torch.randn(2, 2, t, 4, dtype=torch.float64)
    k, v = torch.randn(2, 2, 11, 4, dtype=torch.float64), torch.randn(2, 2, 11, 4, dtype=torch.float64)
    (term,) = enc.attention_terms(0, q, {"k": k, "v": v})
    out = causal_attention(q, k, v, [term])
    z = q @ k.transpose(-1, -2) / 2.0  # (B, H, T, S), sqrt(D) = 2
    for b in range(2):
        for h in range(2):
            weights = torch.tensor(loop_weights(z[b, h].tolist(), attend_current), dtype=torch.float64)
            torch.testing.assert_close(out[b, h], weights @ v[b, h], rtol=1e-6, atol=1e-9)
    if not attend_current and t == 11:
        assert out[:, :, 0].abs().max() == 0  # the first token has no earlier key to attend


def test_extreme_logits_give_finite_weights_that_never_exceed_one():
    scores = torch.tensor([[-200.0, 300.0, 80.0, -60.0, 0.0]]).expand(1, 1, 5, 5)
    causal = torch.ones(5, 5).tril().bool()
    weights = StickBreaking(attend_current=True).weights(scores.masked_fill(~causal, float("-inf")))
    assert torch.isfinite(weights).all() and (weights >= 0).all()
    assert (weights.sum(-1) <= 1 + 1e-6).all()
    assert weights[0, 0, 4, 4] == pytest.approx(0.5) and weights[0, 0, 4, 3] < 1e-20  # key 2 takes the rest
    assert weights[0, 0, 4, 2].item() == pytest.approx(0.5, rel=1e-6)
