"""KERPLE's logarithmic bias against its formula, kept positive, and on the chunked CoPE op when combined."""

import math

import pytest
import torch

from cope_pl.position import ModelDims, build_position_encoding
from tests.conftest import tiny_model

DIMS = ModelDims(n_layers=2, n_heads=3, d_model=12, max_seq_len=64)


def test_the_bias_is_minus_r1_log_one_plus_r2_distance():
    enc = build_position_encoding("kerple", DIMS)
    with torch.no_grad():
        enc.r1.copy_(torch.tensor([[0.5, 1.5, -1.0], [2.0, 0.1, 0.3]]))  # a negative value reads min_value
        enc.r2.copy_(torch.tensor([[0.2, 0.9, 0.4], [1.0, -3.0, 0.05]]))
    q = torch.zeros(1, 3, 30, 4)
    for layer in (0, 1):
        (term,) = enc.attention_terms(layer, q, {"k": q, "v": q})
        logits = term.logits(q, 30, None)  # (H, T, S)
        for i, j in [(0, 0), (7, 3), (29, 0), (20, 19)]:
            for head in range(3):
                r1 = max(enc.r1[layer, head].item(), 0.01)
                r2 = max(enc.r2[layer, head].item(), 0.01)
                assert logits[head, i, j].item() == pytest.approx(-r1 * math.log(1 + r2 * (i - j)), rel=1e-5)


@pytest.mark.parametrize("impl", ["chunked", "reference"])
def test_with_cope_it_takes_the_chunked_op_and_equals_explicit_logits(impl):
    options = {"kerple": {}, "cope": {"npos_max": 16, "impl": impl}}
    model = tiny_model("kerple+cope", position_options=options).double()
    with torch.no_grad():
        model.position.parts[1].pos_emb.normal_(std=0.5)
    assert model.attention_backend() == ("chunked" if impl == "chunked" else "explicit")
    reference = tiny_model("kerple+cope", position_options={**options, "cope": {"npos_max": 16, "impl": "reference"}})
    reference = reference.double()
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(0, 23, (2, 40))
    torch.testing.assert_close(model(ids), reference(ids), rtol=1e-10, atol=1e-10)


def test_a_non_positive_floor_is_refused():
    with pytest.raises(ValueError, match="min_value must be > 0"):
        build_position_encoding("kerple", DIMS, {"min_value": 0.0})
