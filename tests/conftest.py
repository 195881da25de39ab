import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_model(position: str, **kwargs):
    from cope_pl.model import TransformerLM

    defaults = dict(vocab_size=23, n_layers=2, d_model=32, n_heads=4, max_seq_len=64, position=position)
    defaults.update(kwargs)
    return TransformerLM(**defaults)
