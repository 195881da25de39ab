"""FIRE's bias against a loop over its equations, and its progressive interpolation by query position."""

import math

import torch

from cope_pl.position import ModelDims, build_position_encoding

DIMS = ModelDims(n_layers=2, n_heads=3, d_model=12, max_seq_len=64)


def fire(**options):
    enc = build_position_encoding("fire", DIMS, {"mlp_width": 5, **options}).double()
    with torch.no_grad():
        enc.c.copy_(torch.tensor([0.7, -0.3]))  # psi uses |c|
        enc.L_multiplier.copy_(torch.tensor([1.0, -2.0]))  # L = |multiplier * init_L|
    return enc


def bias(enc, layer, t, s):
    q = torch.zeros(1, DIMS.n_heads, t, DIMS.d_head, dtype=torch.float64)
    k = torch.zeros(1, DIMS.n_heads, s, DIMS.d_head, dtype=torch.float64)
    (term,) = enc.attention_terms(layer, q, {"k": k, "v": k})
    return term.logits(q, s, None)  # (H, T, S)


def loop_bias(enc, layer, i, j, head):
    """b(i, j) = f(psi(i - j) / psi(max(L, i))), psi(x) = log(|c| x + 1), f = w2 relu(w1 x + b1) + b2."""
    c = abs(enc.c[layer].item())
    threshold = abs(enc.L_multiplier[layer].item() * enc.init_L.item())
    x = math.log(c * (i - j) + 1) / (math.log(c * max(threshold, i) + 1) + enc.eps)
    hidden = [max(0.0, enc.w1[layer, u].item() * x + enc.b1[layer, u].item()) for u in range(enc.w1.size(1))]
    return sum(h * enc.w2[layer, u, head].item() for u, h in enumerate(hidden)) + enc.b2[layer, head].item()


def test_the_bias_of_every_pair_is_the_mlp_of_the_normalised_log_distance():
    enc = fire(init_L=6.0)  # thresholds 6 (layer 0) and 12 (layer 1): queries on both sides of them
    for layer in (0, 1):
        values = bias(enc, layer, 20, 20)
        for i in range(20):
            for j in range(i + 1):
                for head in range(DIMS.n_heads):
                    assert values[head, i, j].item() == pytest_approx(loop_bias(enc, layer, i, j, head))


def test_decoding_rows_equal_the_rows_of_the_full_bias():
    enc = fire(init_L=4.0)
    full = bias(enc, 0, 15, 15)
    torch.testing.assert_close(bias(enc, 0, 3, 15), full[:, 12:], rtol=0, atol=0)


def test_past_the_threshold_distances_are_interpolated_into_the_same_range():
    """Beyond L the oldest key of any query sits at normalised distance 1 (progressive interpolation): the bias of
    (i, 0) is the same for every i >= L, and below L it differs."""
    enc = fire(init_L=8.0)
    values = bias(enc, 0, 40, 40)
    torch.testing.assert_close(values[:, 8:, 0], values[:, 8:9, 0].expand(-1, 32))
    assert not torch.allclose(values[:, 5, 0], values[:, 8, 0])
    assert (enc.normalized_distances(0, 40, 40, torch.device("cpu")).tril() <= 1 + 1e-6).all()


def pytest_approx(value):
    import pytest

    return pytest.approx(value, rel=1e-9, abs=1e-12)
