"""Bad configuration gives one clear line that names the option to fix."""

import pytest
import torch

from tests.conftest import tiny_model


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"position": "cope2"}, r"model.position: unknown position encoding 'cope2'; choose one of \["),
        ({"position": "cope", "position_options": {"npos_max": 0}}, "npos_max must be >= 1, got 0"),
        ({"position": "cope", "position_options": {"npos": 8}}, r"\['npos'\] not accepted by 'cope'"),
        ({"position": "rope", "n_heads": 5}, "model.n_heads=5 must divide model.d_model=32"),
        ({"position": "rope", "norm": "sandwich"}, "model.norm must be 'pre' or 'post'"),
        ({"position": "absolute", "position_options": {"table": "fourier"}}, "'learned' or 'sinusoidal'"),
    ],
)
def test_bad_model_option(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(**kwargs)


def test_sequence_longer_than_absolute_table():
    model = tiny_model("absolute", max_seq_len=8)
    with pytest.raises(ValueError, match=r"longer than the learned absolute position table \(model.max_seq_len=8\)"):
        model(torch.randint(0, 23, (1, 9)))


def test_sequence_longer_than_relative_table():
    model = tiny_model("relative", max_seq_len=8)
    with pytest.raises(ValueError, match="raise max_distance or use relative_capped"):
        model(torch.randint(0, 23, (1, 9)))


def test_post_norm_model_trains_forward():
    assert tiny_model("cope", norm="post")(torch.randint(0, 23, (1, 5))).isfinite().all()
