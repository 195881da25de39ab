"""Every registered position encoding, through the model, and each encoding's own math."""

import cmath

import pytest
import torch

from cope_pl.position import ModelDims, available, build_position_encoding
from cope_pl.position.alibi import alibi_slopes
from cope_pl.position.rope import rotate
from tests.conftest import tiny_model

ENCODINGS = available()


def test_every_paper_encoding_is_registered():
    paper = {"absolute", "relative", "relative_capped", "rope", "cope", "cope_sepkeys", "rope_cope", "relative_cope"}
    assert paper | {"none", "alibi"} <= set(ENCODINGS)


@pytest.mark.parametrize("position", ENCODINGS)
def test_output_shape(position):
    model = tiny_model(position)
    assert model(torch.randint(0, 23, (3, 11))).shape == (3, 11, 23)


@pytest.mark.parametrize("position", ENCODINGS)
def test_causal(position):
    model = tiny_model(position).eval()
    x = torch.randint(0, 23, (2, 16))
    y = x.clone()
    y[:, 9:] = torch.randint(0, 23, (2, 7))  # change tokens 9.. only
    torch.testing.assert_close(model(x)[:, :9], model(y)[:, :9])


@pytest.mark.parametrize("position", ENCODINGS)
def test_gradients_reach_every_parameter(position):
    model = tiny_model(position)
    # CoPE's table starts at zero (paper), which blocks the gates' gradient; perturb it so both flow.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "pos_emb" in name:
                p.normal_()
    model(torch.randint(0, 23, (2, 12))).logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.mark.parametrize("position", ENCODINGS)
def test_a_few_steps_lower_the_loss(position):
    model = tiny_model(position)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = torch.randint(0, 23, (4, 17))

    def loss():
        return torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())

    first = loss().item()
    for _ in range(15):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < first - 0.3


def test_rope_matches_complex_rotation():
    d, n = 8, 6
    x = torch.randn(n, d, dtype=torch.float64)
    pos = torch.arange(n)
    inv_freq = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    out = rotate(x, pos, inv_freq)
    for m in range(n):
        for c in range(d // 2):
            z = complex(x[m, c], x[m, c + d // 2]) * cmath.exp(1j * m * inv_freq[c].item())
            assert out[m, c].item() == pytest.approx(z.real)
            assert out[m, c + d // 2].item() == pytest.approx(z.imag)


def test_rope_logits_depend_only_on_distance():
    enc = build_position_encoding("rope", ModelDims(1, 1, 8, 32))
    q = torch.randn(8).expand(1, 1, 10, 8)
    k = torch.randn(8).expand(1, 1, 10, 8)
    rq, rk = enc.transform_qk(0, q, k)
    logits = rq @ rk.transpose(-1, -2)
    torch.testing.assert_close(logits[0, 0, 5, 2], logits[0, 0, 8, 5])


def relative_term(name, t, options, tables=None):
    enc = build_position_encoding(name, ModelDims(1, 2, 8, 64), options)
    if tables is not None:
        enc.tables.data.copy_(tables[..., : enc.tables.shape[-1]])
    q = torch.linspace(-1, 1, 4).expand(1, 2, t, 4)  # the same query at every position
    (term,) = enc.attention_terms(0, q, {"k": q, "v": q})
    return enc, term.logits(q, t, torch.zeros(1, 2, t, t))


def test_relative_is_invariant_to_shifting_both_positions():
    _, term = relative_term("relative", 12, {})
    for i, j, shift in [(5, 2, 3), (7, 7, 4), (3, 0, 8)]:
        torch.testing.assert_close(term[..., i, j], term[..., i + shift, j + shift])


def test_capped_relative_equals_relative_below_p_max():
    rel, full = relative_term("relative", 10, {})
    _, capped = relative_term("relative_capped", 10, {"p_max": 10}, tables=rel.tables.data)
    torch.testing.assert_close(full, capped)


def test_capped_relative_reuses_last_embedding_beyond_p_max():
    _, term = relative_term("relative_capped", 12, {"p_max": 4})
    torch.testing.assert_close(term[..., 11, 0], term[..., 11, 8])  # distances 11 and 3 both read r[3]
    assert not torch.allclose(term[..., 11, 9], term[..., 11, 8])


def test_alibi_slopes_are_geometric():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0**-k for k in range(1, 9)]))
    assert alibi_slopes(6).shape == (6,)


def test_alibi_distances_are_exact_under_bf16():
    """bf16 counts exactly only to 256: the bias is built in float32 and rounded once, so a bf16-mixed model
    and its fp32 evaluation see the same distances (2047 stays 2047, not 2048)."""
    alibi = build_position_encoding("alibi", ModelDims(d_model=32, n_heads=4, n_layers=1, max_seq_len=2048))
    q = torch.zeros(1, 4, 1, 8, dtype=torch.bfloat16)
    (term,) = alibi.attention_terms(0, q, {"k": torch.zeros(1, 4, 2048, 8, dtype=torch.bfloat16)})
    exact = -alibi_slopes(4).unsqueeze(1) * torch.arange(2048, dtype=torch.float32)  # (H, S)
    assert term.values.dtype == torch.float32 and torch.equal(term.values, exact)
    logits = term.logits(q, 2048, None)  # (H, 1, S): the last query against every key, in bf16
    assert torch.equal(logits[:, 0], exact.flip(-1).to(torch.bfloat16))


def test_contextual_positions_count_past_256_under_bf16():
    from cope_pl.ops import contextual_positions

    gate_logits = torch.full((1, 600), 30.0, dtype=torch.bfloat16)  # every gate open: p_0j = 600 - j
    positions = contextual_positions(gate_logits, 1024)
    assert positions.dtype == torch.float32
    assert torch.equal(positions[0], torch.arange(600, 0, -1, dtype=torch.float32))


def test_sinusoidal_absolute_has_no_length_limit():
    model = tiny_model("absolute", max_seq_len=8, position_options={"table": "sinusoidal"})
    assert model(torch.randint(0, 23, (1, 20))).shape == (1, 20, 23)


def test_encodings_without_logit_term_take_the_sdpa_path(monkeypatch):
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    tiny_model("rope")(torch.randint(0, 23, (1, 5)))
    assert len(calls) == 2  # one per layer
    calls.clear()
    tiny_model("cope")(torch.randint(0, 23, (1, 5)))
    assert not calls


def test_every_name_with_cope_is_contextual_position_encoding():
    """'CoPE' also names Clipped RoPE (arXiv 2602.05258); here every name containing it holds Contextual PE."""
    from cope_pl.position.cope import ContextualPositionEncoding

    named_cope = [name for name in ENCODINGS if "cope" in name]
    assert named_cope and all(
        any(isinstance(m, ContextualPositionEncoding) for m in tiny_model(name).position.modules())
        for name in named_cope
    )
    assert not [name for name in ENCODINGS if "clip" in name]
