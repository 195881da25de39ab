"""The fused CoPE op against the float64 reference at the lengths training runs, with the autotuned tiles.

The kernel tests check tiny shapes with fixed tiles; this checks long contexts, where gate sums run into the
hundreds, rows cross many key tiles and the backward's carries link them. The error of each output and gradient
is ||fused - exact|| / ||exact||, exact being the reference op (`cope_attention`) in float64 on the same rounded
inputs; the reference op run in the input dtype is shown beside it for scale.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pandas as pd
import torch
from torch import Tensor

from cope_pl.ops import cope_attention, cope_attention_triton

NAMES = ("out", "dq", "dk", "dv", "dpos_emb", "dgate_k")
# ||fused - exact|| / ||exact|| allowed per input dtype: fp32 dots are exact-rounded (ieee); half-precision inputs
# go through the tensor cores with probabilities rounded to the input dtype before P @ V.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def random_inputs(b, h, t, s, d, npos, sep_keys, device) -> list[Tensor | None]:
    """float32 (q, k, v, pos_emb, gate_k or None), drawn on the CPU so a seed gives the same values anywhere."""
    q, k, v = torch.randn(b, h, t, d), torch.randn(b, h, s, d), torch.randn(b, h, s, d)
    gate_k = torch.randn(b, h, s, d) if sep_keys else None
    return [None if x is None else x.to(device) for x in (q, k, v, torch.randn(d, npos) / d**0.5, gate_k)]


def outputs_and_grads(fn: Callable, inputs: list, dtype: torch.dtype, out_weights: Tensor) -> list[Tensor]:
    """fn's output and the gradients of (out * out_weights).sum() for every given input, inputs cast to dtype."""
    leaves = [None if x is None else x.detach().to(dtype).requires_grad_() for x in inputs]
    out = fn(*leaves[:4], gate_k=leaves[4])
    given = [x for x in leaves if x is not None]
    return [out.detach(), *torch.autograd.grad((out * out_weights.to(dtype)).sum(), given)]


def poison_free_memory(device: torch.device, nbytes: int) -> None:
    """Fill what the CUDA caching allocator hands out next with NaN: an output element a kernel never writes then
    shows as NaN, not as a stale copy of an earlier, correct result in reused memory."""
    if device.type != "cuda":
        return
    torch.cuda.empty_cache()
    torch.full((nbytes // 4,), float("nan"), device=device)  # freed at once, kept by the allocator


def relative_error(got: Tensor, exact: Tensor) -> float:
    return ((got.double() - exact).norm() / exact.norm().clamp_min(1e-300)).item()


def accuracy_rows(shape: tuple, dtype: torch.dtype, backward: str, device: torch.device) -> list[dict]:
    """One row per output and gradient of the fused op on one shape (B, H, T, S, D, P, sep_keys)."""
    b, h, t, s, d, npos, sep_keys = shape
    inputs = [None if x is None else x.to(dtype) for x in random_inputs(*shape, device)]  # rounded once
    weights = torch.randn(b, h, t, d).to(device)
    exact = outputs_and_grads(cope_attention, inputs, torch.float64, weights)
    poison_free_memory(device, 8 * sum(x.numel() * 4 for x in inputs if x is not None))  # outputs, grads, scratch
    fused = outputs_and_grads(functools.partial(cope_attention_triton, backward=backward), inputs, dtype, weights)
    same_dtype = outputs_and_grads(cope_attention, inputs, dtype, weights)
    label = dict(B=b, H=h, T=t, S=s, D=d, P=npos, sep_keys=sep_keys, dtype=str(dtype).removeprefix("torch."))
    rows = []
    for name, e, f, r in zip(NAMES, exact, fused, same_dtype):
        err = relative_error(f, e)
        rows.append(
            dict(
                label,
                backward=backward,
                tensor=name,
                fused_error=err,
                reference_error=relative_error(r, e),
                ok=bool(f.isfinite().all()) and err <= TOLERANCE[dtype],  # NaN: unwritten (poisoned) memory
            )
        )
    return rows


def accuracy_table(cases: list[tuple], device: torch.device, backwards=("two_pass", "atomic")) -> pd.DataFrame:
    """cases: (shape, dtype) pairs; every case runs with each backward variant."""
    rows = []
    for shape, dtype in cases:
        for backward in backwards:
            torch.manual_seed(0)
            case_rows = accuracy_rows(shape, dtype, backward, device)
            rows += case_rows
            worst = max(r["fused_error"] for r in case_rows)
            print(f"accuracy {shape} {dtype} {backward}: worst relative error {worst:.2e}", flush=True)
    return pd.DataFrame(rows)
