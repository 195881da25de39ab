"""FoX's forgetting attention against a loop over its equations: softmax weights times the product of forget
gates between key and query, with the gates computed from the layer input."""

import math

import torch

from cope_pl.attention import causal_attention
from cope_pl.position import ModelDims, build_position_encoding
from tests.copy_learning import config_position, copy_loss_after_training

DIMS = ModelDims(n_layers=2, n_heads=2, d_model=8, max_seq_len=64)


@torch.no_grad()
def test_attention_weights_are_forget_products_times_exp_logits():
    enc = build_position_encoding("fox", DIMS).double()
    with torch.no_grad():
        enc.gate_weight.normal_(std=0.7)
        enc.gate_bias.normal_()
    b, t, d = 2, 9, DIMS.d_head
    x = torch.randn(b, t, DIMS.d_model, dtype=torch.float64)
    q, k, v = (torch.randn(b, DIMS.n_heads, t, d, dtype=torch.float64) for _ in range(3))
    layer = 1
    keys = {"k": k, "v": v, **enc.key_features(layer, x)}
    out = causal_attention(q, k, v, enc.attention_terms(layer, q, keys))
    for batch in range(b):
        for head in range(DIMS.n_heads):
            w, bias = enc.gate_weight[layer, head], enc.gate_bias[layer, head]
            f = [1 / (1 + math.exp(-(float(w @ x[batch, s]) + bias.item()))) for s in range(t)]  # f_s
            for i in range(t):
                # o_i = sum_j F_ij exp(q_i.k_j / sqrt(D)) v_j / sum_j F_ij exp(q_i.k_j / sqrt(D)), F_ij = prod f_l
                weights = [
                    math.prod(f[j + 1 : i + 1]) * math.exp(float(q[batch, head, i] @ k[batch, head, j]) / math.sqrt(d))
                    for j in range(i + 1)
                ]
                expected = sum(wj * v[batch, head, j] for j, wj in enumerate(weights)) / sum(weights)
                torch.testing.assert_close(out[batch, head, i], expected, rtol=1e-9, atol=1e-12)


def test_the_cache_keeps_the_log_gates_and_decoding_sums_over_them():
    enc = build_position_encoding("fox", DIMS).double()
    x = torch.randn(1, 10, DIMS.d_model, dtype=torch.float64)
    q = torch.randn(1, DIMS.n_heads, 10, DIMS.d_head, dtype=torch.float64)
    full = enc.key_features(0, x)
    (full_term,) = enc.attention_terms(0, q, {"k": q, "v": q, **full})
    (step_term,) = enc.attention_terms(0, q[:, :, 7:], {"k": q, "v": q, **full})
    torch.testing.assert_close(step_term.values, full_term.values[:, :, 7:], rtol=0, atol=1e-12)
    assert full["fox_log_forget"].shape == (1, DIMS.n_heads, 10, 1)


def test_the_configured_model_starts_learning_a_copy_eight_tokens_back():
    """With the gates at 1/2 at initialisation (the paper's code: gate bias 0) a key 8 tokens back starts 5.5 nats
    down and the loss stays at ln 16 = 2.77; the config's opened gates let it fall."""
    position, options = config_position("configs/position/fox.yaml")
    assert copy_loss_after_training(position, options) < 2.4
