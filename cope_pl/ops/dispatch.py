"""Which CoPE attention implementation runs: the one place where implementations are named and chosen.

`reference` is the paper's listing (cope.py), `chunked` the memory-efficient exact op (cope_chunked.py),
`cpu` the chunked op with each block's elementwise work in a C++ extension (cope_cpu.py, built once per
machine), `triton` a fused GPU kernel (cope_triton.py, when present). `auto` is `cpu` on CPU where the
extension builds and the call has no relative table or bias, else `chunked`, until a GPU check measures the
fused kernel faster on CUDA. `cope_pl.attention` decides when the CoPE op runs at all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from cope_pl.ops import cope_cpu
from cope_pl.ops.cope import cope_attention
from cope_pl.ops.cope_chunked import cope_attention_chunked
from cope_pl.ops.cope_triton import cope_attention_triton, triton_available

COPE_IMPLS = ("auto", "reference", "chunked", "cpu", "triton")
_TARGETS: list[torch.device] = []


@contextlib.contextmanager
def target_device(device: str | torch.device) -> Iterator[None]:
    """Take every device decision (implementation, block sizes) for `device` whatever the tensors' device: a
    plan traces on CPU or meta tensors what a run would do on a GPU, and tests check the CUDA policy without one."""
    _TARGETS.append(torch.device(device))
    try:
        yield
    finally:
        _TARGETS.pop()


def decision_device(device: torch.device) -> torch.device:
    """The device that device decisions are taken for: the innermost `target_device`, else the tensors' own."""
    return _TARGETS[-1] if _TARGETS else device


def check_cope_impl(impl: str) -> str:
    if impl not in COPE_IMPLS:
        raise ValueError(f"model.position_options.impl must be one of {list(COPE_IMPLS)}, got {impl!r}")
    planned_for_cuda = bool(_TARGETS) and _TARGETS[-1].type == "cuda"  # a plan builds it for a GPU elsewhere
    if impl == "triton" and not (triton_available() or planned_for_cuda):
        raise ValueError(
            "model.position_options.impl='triton' needs the triton package and a CUDA GPU; use impl=auto or chunked"
        )
    if impl == "cpu" and not cope_cpu.available():
        raise ValueError(
            "model.position_options.impl='cpu' needs the C++ extension, which did not build "
            f"({cope_cpu.build_error()}); install a C++ compiler (g++) or use impl=auto or chunked"
        )
    return impl


def resolve_cope_impl(impl: str, device: torch.device, relative: bool = False, compiled: bool = False) -> str:
    """The implementation that actually runs for `impl` on `device`; relative: the call also adds a relative
    table or a distance bias, which the fused kernels do not take; compiled: torch.compile'd chunked blocks
    were asked for (position option `compile`), so `auto` keeps them."""
    device = decision_device(device)
    if impl == "auto":
        # chunked: exact, O(T) memory, and faster than the reference on CPU; its C++ blocks (cpu) faster again
        # there (docs/benchmarks.md, `make bench`). torch.compile of the blocks measured slower than eager at the
        # task model's size, after a minute or more of compiling per process, so `compile` stays opt-in.
        # The fused kernel becomes the CUDA default once a GPU check measures it faster there.
        fused = device.type == "cpu" and not relative and not compiled
        impl = "cpu" if fused and cope_cpu.available() else "chunked"
    fused_device = {"triton": "cuda", "cpu": "cpu"}.get(impl)
    if fused_device is not None and (relative or device.type != fused_device):
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
    if impl in ("chunked", "cpu"):
        return cope_attention_chunked(
            q, k, v, pos_emb, gate_k=gate_k, rel_emb=rel_emb, bias=bias, dropout_p=dropout_p,
            compiled=compiled and impl == "chunked", fused=impl == "cpu",
        )  # fmt: skip
    if rel_emb is not None or bias is not None or dropout_p > 0:
        raise ValueError("the reference CoPE op has no relative table, bias or dropout; use explicit logits for those")
    return cope_attention(q, k, v, pos_emb, gate_k=gate_k)
