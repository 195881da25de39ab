"""Attention dropout for the CoPE ops that never hold the (T, S) probabilities: they keep a seed, not a mask.

The chunked op and the fused kernel regenerate each tile's mask from (seed, position) in backward. Each draws
its own masks (they differ between implementations, as any two dropout streams do); within one op, forward
and backward agree. The seed comes from torch's global RNG, so `seed_everything` makes runs repeatable.
"""

from __future__ import annotations

import torch


def check_dropout(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"attention dropout must be in [0, 1), got {p}")


def draw_dropout_seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())
