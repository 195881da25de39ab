"""Stick-breaking attention against the stick broken key by key, nearest first."""

import math

import pytest
import torch

from cope_pl.attention import StickBreaking, causal_attention
from cope_pl.position import ModelDims, build_position_encoding
from tests.copy_learning import config_position, copy_loss_after_training


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
@pytest.mark.parametrize("logit_bias_init", [None, -2.0])
def test_weights_and_outputs_equal_breaking_the_stick_key_by_key(attend_current, t, logit_bias_init):
    options = {"attend_current": attend_current, "logit_bias_init": logit_bias_init}
    enc = build_position_encoding("stick_breaking", ModelDims(2, 2, 8, 64), options).double()
    if logit_bias_init is not None:
        with torch.no_grad():
            enc.logit_bias[1] = torch.tensor([-2.0, 0.5])  # a different offset per head, on the layer used
    q = torch.randn(2, 2, t, 4, dtype=torch.float64)
    k, v = torch.randn(2, 2, 11, 4, dtype=torch.float64), torch.randn(2, 2, 11, 4, dtype=torch.float64)
    (term,) = enc.attention_terms(1, q, {"k": k, "v": v})
    out = causal_attention(q, k, v, [term])
    z = q @ k.transpose(-1, -2) / 2.0  # (B, H, T, S), sqrt(D) = 2
    if logit_bias_init is not None:
        z = z + torch.tensor([-2.0, 0.5], dtype=torch.float64)[:, None, None]  # z_ij + b_h
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


@pytest.mark.parametrize("attend_current", [False, True])
def test_gradients_of_the_log_space_weights_match_finite_differences(attend_current):
    z = torch.randn(1, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    offset = torch.tensor([-2.0, 1.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z, b: StickBreaking(attend_current, b).weights(z), (z, offset))


def test_the_nearer_keys_take_their_share_first():
    """Equal logits: the nearest key takes half, the next a quarter; a wrong walking direction would reverse it."""
    weights = StickBreaking().weights(torch.zeros(1, 1, 5, 5))[0, 0, 4]  # (S,) of the last query
    torch.testing.assert_close(weights, torch.tensor([1 / 16, 1 / 8, 1 / 4, 1 / 2, 0.0]))


def test_the_configured_model_starts_learning_a_copy_eight_tokens_back():
    """With the paper's logits alone (z near 0 at initialisation) a key 8 tokens back gets 2^-8 of the
    attention and the loss stays at ln 16 = 2.77; the config's logit offset lets it fall."""
    position, options = config_position("configs/position/stick_breaking.yaml")
    assert copy_loss_after_training(position, options) < 2.4
