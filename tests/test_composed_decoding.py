"""The newer encodings composed with CoPE (and with each other) decode with a KV cache exactly as a full forward."""

import pytest
import torch

from tests.test_generate import random_model


@pytest.mark.parametrize(
    "position, options",
    [
        ("fire+cope", None),
        ("fox+cope", None),
        ("kerple+cope", None),
        ("xpos+cope", None),
        ("stick_breaking+fire", None),
        ("stick_breaking+fire", {"logit_bias_init": -2.0}),  # a learned offset per layer and head
    ],
)
def test_a_prefill_in_uneven_chunks_gives_the_full_forward_logits(position, options):
    model = random_model(position, position_options=options)
    ids = torch.randint(0, 23, (2, 19))
    with torch.no_grad():
        full = model(ids)
        cache, chunks, start = model.new_cache(), [], 0
        for size in (6, 1, 1, 4, 7):
            chunks.append(model(ids[:, start : start + size], cache=cache))
            start += size
    torch.testing.assert_close(torch.cat(chunks, 1), full, rtol=0, atol=1e-9)
