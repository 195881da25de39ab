"""Which CoPE attention implementation runs: the one place where implementations are named and chosen.

`reference` is the paper's listing (cope.py), `chunked` the memory-efficient exact op (cope_chunked.py),
`triton` a fused GPU kernel (cope_triton.py, when present). `auto` is `chunked` on every device until a GPU
check measures the fused kernel faster on CUDA. `cope_pl.attention` decides when the CoPE op runs at all.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cope_pl.ops.cope import cope_attention
from cope_pl.ops.cope_chunked import cope_attention_chunked
from cope_pl.ops.cope_triton import cope_attention_triton, triton_available

COPE_IMPLS = ("auto", "reference", "chunked", "triton")


def check_cope_impl(impl: str) -> str:
    if impl not in COPE_IMPLS:
        raise ValueError(f"model.position_options.impl must be one of {list(COPE_IMPLS)}, got {impl!r}")
    if impl == "triton" and not triton_available():
        raise ValueError(
            "model.position_options.impl='triton' needs the triton package and a CUDA GPU; use impl=auto or chunked"
        )
    return impl


def resolve_cope_impl(impl: str, device: torch.device, relative: bool = False) -> str:
    """The implementation that actually runs for `impl` on `device`; relative: the call also adds a relative
    table or a distance bias, which the fused kernel does not take."""
    if impl == "auto":
        # chunked: exact, O(T) memory, and faster than the reference on CPU (docs/benchmarks.md, `make bench`).
        # Eager: torch.compile of its blocks measured slower than eager at the task model's size, after a minute
        # or more of compiling per process (docs/benchmarks.md), so `compile` stays opt-in.
        # The fused kernel becomes the CUDA default once a GPU check measures it faster there.
        impl = "chunked"
    if impl == "triton" and (relative or device.type != "cuda"):
        impl = "chunked"
    return impl


def run_cope_attention(
    impl: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pos_emb: Tensor,
    gate_k: Tensor | None = None,
    rel_emb: Tensor | None = None,
    bias: Tensor | None = None,
    compiled: bool = False,
    dropout_p: float = 0.0,
) -> Tensor:
    """Causal CoPE attention (B, H, T, D) with the named implementation (after `resolve_cope_impl`)."""
    if impl == "triton":
        return cope_attention_triton(q, k, v, pos_emb, gate_k=gate_k, dropout_p=dropout_p)
    if impl == "chunked":
        return cope_attention_chunked(
            q, k, v, pos_emb, gate_k=gate_k, rel_emb=rel_emb, bias=bias, compiled=compiled, dropout_p=dropout_p
        )
    if rel_emb is not None or bias is not None or dropout_p > 0:
        raise ValueError("the reference CoPE op has no relative table, bias or dropout; use explicit logits for those")
    return cope_attention(q, k, v, pos_emb, gate_k=gate_k)
