"""Which CoPE attention implementation runs: the one place where implementations are named and chosen.

`reference` is the paper's listing (cope.py), `chunked` the memory-efficient exact op (cope_chunked.py),
`cpu` the chunked op with each block's elementwise work in a C++ extension (cope_cpu.py, built once per
machine), `triton` a fused GPU kernel (cope_triton.py, with the `triton` package).

`auto` is, on CPU, `cpu` where the extension builds and the call has no relative table, bias or compiled
blocks, else `chunked`. On CUDA it is `triton` where the fused kernel takes the call (no relative table or bias,
float32/float16/bfloat16, npos_max <= 256) and, the first time in a process for each dtype, head size, table
width and gate-key form, agrees with the chunked op on a small random problem, values and gradients
(`fused_kernel_agrees`); else `chunked`, with one warning saying why. `impl: triton` skips that check; where the
kernel cannot run (no CUDA device, no triton) it runs what `auto` picks there, with one warning, so a run
trained with it evaluates and resumes anywhere: the implementation is chosen at call time, never stored.

Decisions are taken for `decision_device`: the tensors' device, or the innermost `target_device`. A plan traces
on CPU tensors what a GPU would run; where the kernel cannot run on the tensors (CPU without Triton's
interpreter) the check cannot run, and `auto` assumes the kernel passes it. `cope_pl.attention` decides when
the CoPE op runs at all.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from cope_pl.ops import cope_cpu
from cope_pl.ops.cope import cope_attention
from cope_pl.ops.cope_chunked import cope_attention_chunked
from cope_pl.ops.cope_triton import MAX_NPOS, cope_attention_triton, interpreting, triton_available
from cope_pl.ops.device import decision_device, target_device  # noqa: F401 (target_device: named here too)

COPE_IMPLS = ("auto", "reference", "chunked", "cpu", "triton")
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (device type, dtype, head size, table width, gate keys) -> why the fused kernel is not used there (None: it is).
_FUSED_CHECKS: dict[tuple, str | None] = {}
_WARNED: set[str] = set()


def check_cope_impl(impl: str) -> str:
    """A valid `impl` name. `triton` is accepted anywhere (it falls back where it cannot run); `cpu` needs the
    C++ extension, which is built on this machine now."""
    if impl not in COPE_IMPLS:
        raise ValueError(f"model.position_options.impl must be one of {list(COPE_IMPLS)}, got {impl!r}")
    if impl == "cpu" and not cope_cpu.available():
        raise ValueError(
            "model.position_options.impl='cpu' needs the C++ extension, which did not build "
            f"({cope_cpu.build_error()}); install a C++ compiler (g++) or use impl=auto or chunked"
        )
    return impl


def warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _kernel_runs_on(device: torch.device) -> bool:
    """The fused kernel can run on tensors of `device`: compiled on CUDA, or in Triton's interpreter on CPU."""
    return triton_available() and (device.type == "cuda" or (device.type == "cpu" and interpreting()))


def _tracing_fake_tensors() -> bool:
    """A fake-tensor trace (`cope-pl plan`) is under way: nothing it runs is a real launch to check."""
    from torch._guards import detect_fake_mode

    return detect_fake_mode() is not None


def _fused_problem(device, dtype, head_dim: int, npos: int, sep_keys: bool, seed: int = 0):
    """A small random CoPE problem on `device`: T = S = 40 crosses several kernel tiles."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(1, 2, 40, head_dim)] * 3 + [(head_dim, npos)] + ([(1, 2, 40, head_dim)] if sep_keys else [])
    inputs = [torch.randn(shape, generator=generator) for shape in shapes]
    inputs[3] = inputs[3] * 0.5
    return [x.to(device, dtype).requires_grad_() for x in inputs]


def _outputs_and_grads(op, inputs: list[Tensor], weights: Tensor) -> list[Tensor]:
    for x in inputs:
        x.grad = None
    q, k, v, pos_emb, *gate_k = inputs
    out = op(q, k, v, pos_emb, gate_k=gate_k[0] if gate_k else None)
    (out.float() * weights).sum().backward()
    return [out.detach().float(), *(x.grad.float() for x in inputs)]


def fused_kernel_agrees(device: torch.device, dtype: torch.dtype, head_dim: int, npos: int, sep_keys: bool) -> bool:
    """True once the fused kernel's output and gradients on a small random problem match the chunked op's (within
    1e-3 of each tensor's largest entry in float32, 3e-2 in half precision); checked once per process and
    key. A compile error or a mismatch returns False after one warning saying why."""
    key = (device.type, dtype, head_dim, npos, sep_keys)
    if key not in _FUSED_CHECKS:
        _FUSED_CHECKS[key] = _check_fused_kernel(device, dtype, head_dim, npos, sep_keys)
        if _FUSED_CHECKS[key] is not None:
            warn_once(
                f"CoPE: the fused Triton kernel ({dtype}, head size {head_dim}, npos_max {npos}) "
                f"{_FUSED_CHECKS[key]}; running the chunked op instead"
            )
    return _FUSED_CHECKS[key] is None


def _check_fused_kernel(device, dtype, head_dim: int, npos: int, sep_keys: bool) -> str | None:
    """Why the fused kernel may not run for this key (a compile or launch error, or which tensor differs from the
    chunked op's and by how much), or None."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    # The first call may come from validation (inference mode, no grad), under autocast or in a fake-tensor trace.
    with unset_fake_temporarily(), torch.inference_mode(False), torch.enable_grad():
        with torch.autocast(device.type, enabled=False):
            inputs = _fused_problem(device, dtype, head_dim, npos, sep_keys)
            weights = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1)).to(device)
            try:
                fused = _outputs_and_grads(cope_attention_triton, inputs, weights)
            except Exception as err:  # a compile or launch error: the chunked op runs instead
                lines = str(err).strip().splitlines() or [""]
                return f"failed to run ({type(err).__name__}: {lines[-1][:200]})"
            exact = _outputs_and_grads(cope_attention_chunked, inputs, weights)
    tolerance = 1e-3 if dtype == torch.float32 else 3e-2
    for name, f, e in zip(["output", "dq", "dk", "dv", "dpos_emb", "dgate_k"], fused, exact):
        scale = e.abs().max().item()
        err = (f - e).abs().max().item()
        if not err <= tolerance * scale + 1e-5:  # NaN fails too
            return f"disagrees with the chunked op ({name}: error {err:.2e} for values up to {scale:.2e})"
    return None


def resolve_cope_impl(
    impl: str,
    device: torch.device,
    relative: bool = False,
    compiled: bool = False,
    dtype: torch.dtype = torch.float32,
    table: tuple[int, int] | None = None,
    sep_keys: bool = False,
) -> str:
    """The implementation that actually runs for `impl` on tensors of `device` (decisions for `decision_device`).
    relative: the call also adds a relative table or a distance bias, which the fused kernels do not take;
    compiled: torch.compile'd chunked blocks were asked for (position option `compile`), so `auto` keeps them;
    dtype, table (D, P) and sep_keys describe the call, for the fused kernel's check (table None: no check)."""
    target = decision_device(device)
    if impl == "triton":
        if relative:
            return "chunked"
        if target.type == "cuda" and (target.type != device.type or _kernel_runs_on(device)):
            return "triton"
        why = "needs a CUDA device" if target.type != "cuda" else "needs the triton package"
        fallback = resolve_cope_impl("auto", device, relative, compiled, dtype, None, sep_keys)
        warn_once(f"CoPE: impl='triton' {why}; on {target.type} CoPE runs impl={fallback!r} (what auto picks there)")
        return fallback
    if impl == "cpu":
        return "cpu" if target.type == "cpu" and not relative else "chunked"
    if impl != "auto":
        return impl
    if target.type == "cpu":
        # The C++ blocks measured faster than the torch blocks on CPU, both faster than the reference
        # (docs/benchmarks.md, `make bench`). torch.compile of the blocks measured slower than eager at the task
        # model's size, after a minute or more of compiling per process, so `compile` stays opt-in.
        return "cpu" if not relative and not compiled and cope_cpu.available() else "chunked"
    if target.type == "cuda" and not relative and not compiled and dtype in FUSED_DTYPES:
        if table is None or table[1] > MAX_NPOS:
            return "chunked"
        if target.type != device.type and (_tracing_fake_tensors() or not _kernel_runs_on(device)):
            return "triton"  # a plan on other tensors: the check can only run on the target itself
        if _kernel_runs_on(device):
            return "triton" if fused_kernel_agrees(device, dtype, *table, sep_keys) else "chunked"
        warn_once("CoPE: the fused Triton kernel needs the triton package; running the chunked op instead")
        return "chunked"
    return "chunked"


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
