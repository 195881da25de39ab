"""One random stream per (seed, index): each synthetic sample, each epoch's order, each dropout block.

Streams are recreated from the pair alone, so any sample can be regenerated (and a resumed run draws what an
uninterrupted one would). Distinct pairs get distinct seeds while index < STRIDE.
"""

from __future__ import annotations

import torch

STRIDE = 1_000_003  # a prime above any index used


def derived_seed(seed: int, index: int) -> int:
    return seed * STRIDE + index


def generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator for the stream of (seed, index)."""
    return torch.Generator(device=device).manual_seed(derived_seed(seed, index))
