"""Ablation options of the CoPE paper's official code: the CoPE term divided by sqrt(D) with the content
logits, one CoPE table for all layers, and a relative baseline with one table for all layers."""

import math
from pathlib import Path

import pytest
import torch
import yaml

from cope_pl.ops import causal_mask, cope_position_logits
from cope_pl.position import ModelDims, build_position_encoding
from cope_pl.position.cope import ContextualPositionEncoding
from tests.conftest import tiny_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "position"
DIMS = ModelDims(n_layers=3, n_heads=2, d_model=16, max_seq_len=32)


def cope_term(cope, layer, q, k, logits):
    """The CoPE term (B, H, T, S) an encoding adds to these logits."""
    (term,) = cope.attention_terms(layer, q, {"k": k, "v": k})
    return term.logits(q, k.size(-2), logits)


def random_qk(t=7):
    q, k = torch.randn(2, 2, t, 8, dtype=torch.float64), torch.randn(2, 2, t, 8, dtype=torch.float64)
    logits = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~causal_mask(t, t, q.device), float("-inf"))
    return q, k, logits


def test_divided_cope_term_is_the_listing_term_over_sqrt_d():
    cope = build_position_encoding("cope", DIMS, {"npos_max": 5, "divide_by_sqrt_d": True}).double()
    torch.nn.init.normal_(cope.pos_emb)
    q, k, logits = random_qk()
    # Official code: (q.k + q.e[p]) / sqrt(D), gates from q.k / sqrt(D) as in the listing.
    expected = cope_position_logits(q, logits, cope.pos_emb[1]) / math.sqrt(8)
    torch.testing.assert_close(cope_term(cope, 1, q, k, logits), expected)


def test_a_shared_cope_table_is_one_parameter_for_every_layer():
    cope = build_position_encoding("cope", DIMS, {"npos_max": 5, "shared_table": True}).double()
    assert cope.pos_emb.shape == (1, 8, 5)
    torch.nn.init.normal_(cope.pos_emb)
    q, k, logits = random_qk()
    terms = [cope_term(cope, layer, q, k, logits) for layer in range(DIMS.n_layers)]
    torch.testing.assert_close(terms[0], terms[2])


@pytest.mark.parametrize("position", ["relative", "relative_capped"])
def test_a_shared_relative_table_serves_every_layer(position):
    rel = build_position_encoding(position, DIMS, {"shared_table": True})
    assert rel.tables.shape[0] == 1
    q = torch.randn(1, 2, 4, 8)
    (first,), (last,) = (rel.attention_terms(layer, q, {"k": q, "v": q}) for layer in (0, 2))
    assert torch.equal(first.table, last.table)


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_the_options_take_every_op_path(impl):
    options = {"npos_max": 8, "divide_by_sqrt_d": True, "shared_table": True, "impl": impl}
    model = tiny_model("cope_sepkeys", position_options=options).double().eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.position.pos_emb)
    x = torch.randint(0, 23, (2, 20))
    reference = tiny_model("cope_sepkeys", position_options={**options, "impl": "reference"}).double().eval()
    reference.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(x), reference(x))


@pytest.mark.parametrize("name", ["cope_divided", "cope_shared_table", "relative_shared"])
def test_each_ablation_has_a_config_that_builds(name):
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["model"]
    build_position_encoding(config["position"], DIMS, config.get("position_options"))


def test_value_gates_count_with_the_values():
    cope = build_position_encoding("cope", DIMS, {"npos_max": 5, "value_gates": True}).double()
    torch.nn.init.normal_(cope.pos_emb)
    q, k, logits = random_qk()
    v = torch.randn_like(k)
    (term,) = cope.attention_terms(0, q, {"k": k, "v": v})
    value_logits = (q @ v.transpose(-1, -2) / math.sqrt(8)).masked_fill(~causal_mask(7, 7), float("-inf"))
    torch.testing.assert_close(term.logits(q, 7, logits), cope_position_logits(q, value_logits, cope.pos_emb[0]))
    with pytest.raises(ValueError, match="value_gates and sep-keys"):
        ContextualPositionEncoding(DIMS, sep_keys=True, value_gates=True)


@pytest.mark.parametrize(
    "position, options",
    [("cope", {"value_gates": True}), ("cope_every_k", {"k": 2}), ("cope_every_k_else_relative", {"k": 2})],
)
def test_value_gates_and_every_kth_layer_take_the_fast_op_exactly(position, options):
    model = tiny_model(position, position_options=options).double()
    with torch.no_grad():
        for p in model.position.parameters():
            torch.nn.init.normal_(p, std=0.5)
    reference = tiny_model(position, position_options={**options, "impl": "reference"}).double()
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(0, 23, (2, 30))
    outputs = [m(ids) for m in (model, reference)]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-10, atol=1e-10)
    grads = [
        torch.autograd.grad(o.square().sum(), m.blocks[0].attn.qkv.weight)[0]
        for o, m in zip(outputs, (model, reference))
    ]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-10)


def loop_logits(q, k, rel_table, cope_table):
    """The position logits of one head by explicit loops: q_i . r[i - j], plus, with a CoPE table,
    q_i . e[p_ij] with p_ij = sum_{t=j..i} sigmoid(q_i . k_t / sqrt(D)) interpolated between integer positions."""
    t, d = q.shape
    out = torch.full((t, t), float("-inf"), dtype=q.dtype)
    for i in range(t):
        for j in range(i + 1):
            logit = q[i] @ rel_table[:, i - j]
            if cope_table is not None:
                p = sum(torch.sigmoid(q[i] @ k[s] / math.sqrt(d)) for s in range(j, i + 1))
                p = min(p, cope_table.size(1) - 1)
                lo, hi = math.floor(p), math.ceil(p)
                logit = logit + (q[i] @ cope_table[:, hi]) * (p - lo) + (q[i] @ cope_table[:, lo]) * (1 - (p - lo))
            out[i, j] = logit
    return out


@pytest.mark.parametrize(
    "position, k, cope_layers, relative_layers",
    [
        ("cope_every_k", 2, [1, 3], [0, 1, 2, 3]),  # official: CoPE where (l + 1) % k == 0, relative everywhere
        ("cope_every_k", 3, [2], [0, 1, 2, 3]),
        ("cope_every_k", 1, [0, 1, 2, 3], [0, 1, 2, 3]),
        ("cope_every_k_else_relative", 2, [0, 2], [1, 3]),
    ],
)
def test_cope_every_k_layers_and_logits_match_a_loop_oracle(position, k, cope_layers, relative_layers):
    from cope_pl.attention import ContextualLogits, RelativeLogits

    dims = ModelDims(n_layers=4, n_heads=2, d_model=16, max_seq_len=32)
    enc = build_position_encoding(position, dims, {"k": k, "npos_max": 4}).double()
    with torch.no_grad():
        for p in enc.parameters():
            torch.nn.init.normal_(p)
    cope = next(part for part in enc.parts if isinstance(part, ContextualPositionEncoding))
    rel = next(part for part in enc.parts if part is not cope)
    q, k_, logits = random_qk(t=6)
    for layer in range(dims.n_layers):
        terms = enc.attention_terms(layer, q, {"k": k_, "v": k_})
        forms = {type(term) for term in terms}
        assert (RelativeLogits in forms) == (layer in relative_layers), layer
        assert (ContextualLogits in forms) == (layer in cope_layers), layer
        total = sum(term.logits(q, k_.size(-2), logits) for term in terms)
        for b in range(2):
            for h in range(2):
                expected = loop_logits(
                    q[b, h],
                    k_[b, h],
                    rel.tables[layer] if layer in relative_layers else torch.zeros(8, 32, dtype=q.dtype),
                    cope.pos_emb[layer] if layer in cope_layers else None,
                )
                causal = torch.isfinite(expected)
                torch.testing.assert_close(total[b, h][causal], expected[causal])


def test_cope_every_k_checks_the_relative_length_on_every_layer_and_rejects_k_0():
    enc = build_position_encoding("cope_every_k", ModelDims(n_layers=1, n_heads=2, d_model=16, max_seq_len=32), {})
    with pytest.raises(ValueError, match="raise max_distance"):
        enc.check_length(33)  # the relative table of the only layer, which has no CoPE at k=2
    with pytest.raises(ValueError, match="k must be >= 1"):
        build_position_encoding("cope_every_k", DIMS, {"k": 0})


@pytest.mark.parametrize("config", ["cope_value_gates.yaml", "cope_every_2.yaml"])
def test_the_ablation_configs_build(config):
    model = yaml.safe_load((CONFIGS / config).read_text())["model"]
    assert tiny_model(model["position"], position_options=model["position_options"])(
        torch.randint(0, 23, (1, 20))
    ).shape == (1, 20, 23)
