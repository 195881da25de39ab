"""T5's bucketed relative bias, and its combination with CoPE from configuration alone."""

import pytest
import torch
import yaml

from cope_pl.attention import choose_backend
from cope_pl.generate import generate
from cope_pl.position import ModelDims, build_position_encoding
from cope_pl.position.t5_bias import distance_buckets
from tests.conftest import tiny_model
from tests.test_official_ablations import CONFIGS


def test_buckets_are_exact_near_and_log_spaced_far():
    buckets = distance_buckets(torch.arange(300), num_buckets=32, max_distance=128)
    assert torch.equal(buckets[:16], torch.arange(16))  # one bucket per distance below num_buckets / 2
    assert buckets[32] == 21 and buckets[127] == 31  # 16 + floor(16 log(d / 16) / log 8)
    assert (buckets[128:] == 31).all() and (buckets.diff() >= 0).all()


def test_the_bias_of_a_pair_is_its_heads_scalar_for_the_bucket_of_its_distance():
    enc = build_position_encoding("t5_bias", ModelDims(1, 2, 8, 64), {"num_buckets": 8, "max_distance": 20})
    q = torch.randn(1, 2, 30, 4)
    (term,) = enc.attention_terms(0, q, {"k": q, "v": q})
    logits = term.logits(q, 30, None)  # (H, T, S)
    for i, j in [(5, 5), (9, 2), (29, 0), (25, 3)]:
        bucket = distance_buckets(torch.tensor(i - j), 8, 20)
        torch.testing.assert_close(logits[:, i, j], enc.bias[bucket])


def composed_from_config():
    position = yaml.safe_load((CONFIGS / "t5_bias_cope.yaml").read_text())["model"]
    return position["position"], position["position_options"]


@pytest.mark.parametrize("impl", ["chunked", "reference"])
def test_t5_bias_with_cope_from_config_takes_the_fast_path_and_equals_explicit_logits(impl):
    name, options = composed_from_config()
    options = {**options, "cope": {**options["cope"], "impl": impl}}
    model = tiny_model(name, position_options=options).double()
    with torch.no_grad():
        for p in model.position.parameters():
            torch.nn.init.normal_(p, std=0.5)
    assert model.attention_backend() == ("chunked" if impl == "chunked" else "explicit")
    reference = tiny_model(name, position_options={**options, "cope": {**options["cope"], "impl": "reference"}})
    reference = reference.double()
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(0, 23, (2, 40))
    outputs = [m(ids) for m in (model, reference)]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-10, atol=1e-10)
    grads = [
        torch.autograd.grad(o.square().sum(), m.position.parts[0].bias)[0] for o, m in zip(outputs, (model, reference))
    ]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-10)


def test_the_combination_decodes_with_a_cache():
    name, options = composed_from_config()
    model = tiny_model(name, position_options=options).double().eval()
    with torch.no_grad():
        for p in model.position.parameters():
            torch.nn.init.normal_(p, std=0.5)
    prompt = torch.randint(0, 23, (2, 6))
    assert torch.equal(generate(model, prompt, 10), generate(model, prompt, 10, use_cache=False))


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("t5_bias+copee", {}, r"unknown parts \['copee'\]"),
        ("cope+cope", {}, "a part named twice"),
        (
            "relative+cope",
            {"shared_table": True},
            "'shared_table' is accepted by relative and cope; give options per part",
        ),
        ("t5_bias+cope", {"p_max": 3}, "'p_max' is accepted by no part"),
    ],
)
def test_composed_names_and_options_are_checked(name, options, message):
    with pytest.raises(ValueError, match=message):
        build_position_encoding(name, ModelDims(2, 2, 8, 32), options)


def test_flat_options_go_to_the_part_that_takes_them():
    enc = build_position_encoding("t5_bias+cope", ModelDims(2, 2, 8, 32), {"num_buckets": 6, "npos_max": 5})
    assert enc.parts[0].bias.shape == (6, 2) and enc.parts[1].npos_max == 5
    assert (
        choose_backend(
            enc.attention_terms(0, torch.zeros(1, 2, 1, 4), {"k": torch.zeros(1, 2, 1, 4)}), torch.device("cpu")
        ).backend
        == "chunked"
    )
