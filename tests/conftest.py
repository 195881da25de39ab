import os

# Triton reads TRITON_INTERPRET when it is first imported (lightning imports it): set it before anything else so the
# fused CoPE kernel tests run on CPU tensors in Triton's interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# COPE_TEST_DEVICE=cuda (with TRITON_INTERPRET=0) runs the fused-kernel tests on a GPU, compiled for it, with the
# fixed test tiles: autotuning each tiny shape would compile every tile candidate.
TEST_DEVICE = torch.device(os.environ.get("COPE_TEST_DEVICE", "cpu"))
if TEST_DEVICE.type == "cuda":
    from cope_pl.ops import cope_triton

    cope_triton.AUTOTUNE = False


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_model(position: str, **kwargs):
    from cope_pl.model import TransformerLM

    defaults = dict(vocab_size=23, n_layers=2, d_model=32, n_heads=4, max_seq_len=64, position=position)
    defaults.update(kwargs)
    return TransformerLM(**defaults)
