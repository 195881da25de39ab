"""The device that device decisions (CoPE implementation, block sizes) are taken for.

`target_device` names it for a block of code whatever the tensors' device, so that a plan traces on CPU or meta
tensors what a run would do on a GPU and tests check the CUDA policy without one; `decision_device` reads it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

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
