"""Fused CoPE attention with Triton: a drop-in for `cope_attention` that never materialises (T, S) tensors.

The kernels live in `cope_triton_kernels` and are imported on first use, so cope_pl imports without triton.
z = q E (B, H, T, P) is computed here in fp32 and differentiated by autograd (dq += dz E^T, dE = q^T dz); the
kernels take z and return dz. Gate sums are accumulated in fp32 whatever the input dtype: a bf16 running sum
cannot count past 256.
"""

from __future__ import annotations

import importlib.util
import math
import os

import torch
from torch import Tensor

MAX_NPOS = 256


def triton_available() -> bool:
    """True when cope_attention_triton can run here: triton is installed and there is a GPU or the interpreter."""
    if importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.is_available() or _interpreting()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _launch_config(q: Tensor, npos: int) -> dict:
    import triton
    import triton.language as tl

    dtypes = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
    d = q.size(-1)
    # Interpreter: 16-wide tiles so tiny test shapes still cross tiles. GPU: untuned guesses, compiled for sm_90.
    block = 16 if _interpreting() else (32 if q.dtype == torch.float32 else 64)
    return dict(
        D=d,
        BLOCK_M=block,
        BLOCK_N=block,
        BLOCK_D=max(16, triton.next_power_of_2(d)),
        BLOCK_P=max(16, triton.next_power_of_2(npos)),
        IN_DT=dtypes[q.dtype],
        DOT_DT=tl.float32 if _interpreting() else dtypes[q.dtype],  # the interpreter cannot multiply bf16
        PREC="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 inputs: no silent tf32 rounding
    )


class _CopeAttention(torch.autograd.Function):
    """Inputs flattened to (BH, T, D) / (BH, S, D) / (BH, T, P), contiguous; z in fp32."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, z: Tensor, gate_k: Tensor | None) -> Tensor:
        from cope_pl.ops.cope_triton_kernels import cope_fwd_kernel

        bh, t, d = q.shape
        s, npos = k.size(1), z.size(-1)
        cfg = _launch_config(q, npos)
        out = torch.empty_like(q)
        lse = torch.empty(bh, t, device=q.device, dtype=torch.float32)
        gsum = torch.empty(bh, t, device=q.device, dtype=torch.float32)
        grid = (math.ceil(t / cfg["BLOCK_M"]), bh)
        sep = gate_k is not None
        cope_fwd_kernel[grid](
            q, k, v, gate_k if sep else k, z, out, lse, gsum, t, s, npos, 1.0 / math.sqrt(d), SEP_KEYS=sep, **cfg
        )
        ctx.save_for_backward(q, k, v, z, gate_k if sep else None, out, lse, gsum)
        ctx.sep = sep
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        from cope_pl.ops.cope_triton_kernels import cope_bwd_kernel

        q, k, v, z, gate_k, out, lse, gsum = ctx.saved_tensors
        bh, t, d = q.shape
        s, npos = k.size(1), z.size(-1)
        dout = dout.contiguous()
        delta = (dout.float() * out.float()).sum(-1)  # (BH, T): rowsum(dO * O)
        dq = torch.empty(bh, t, d, device=q.device, dtype=torch.float32)
        dk, dv = (torch.zeros(bh, s, d, device=q.device, dtype=torch.float32) for _ in range(2))
        dgk = torch.zeros_like(dk) if ctx.sep else dk
        dz = torch.zeros(bh, t, npos, device=q.device, dtype=torch.float32)
        cfg = _launch_config(q, npos)
        grid = (math.ceil(t / cfg["BLOCK_M"]), bh)
        cope_bwd_kernel[grid](
            q, k, v, gate_k if ctx.sep else k, z, dout, lse, delta, gsum, dq, dk, dv, dgk, dz,
            t, s, npos, 1.0 / math.sqrt(d), SEP_KEYS=ctx.sep, **cfg,
        )  # fmt: skip
        dgk = dgk.to(q.dtype) if ctx.sep else None
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dz, dgk


def cope_attention_triton(q: Tensor, k: Tensor, v: Tensor, pos_emb: Tensor, gate_k: Tensor | None = None) -> Tensor:
    """Causal softmax attention with CoPE, fused; same signature, semantics and gradients as `cope_attention`.

    q: (B, H, T, D); k, v: (B, H, S, D) with S >= T (queries are the last T positions);
    pos_emb: (D, P) with P <= 256; gate_k: optional (B, H, S, D) separate keys for the gates (sep-keys CoPE).
    Inputs fp32, fp16 or bf16 (all of q, k, v, gate_k alike); returns (B, H, T, D) in that dtype.
    """
    b, h, t, d = q.shape
    s, npos = k.size(-2), pos_emb.size(-1)
    if s < t:
        raise ValueError(f"cope_attention_triton needs at least as many keys as queries, got S={s} < T={t}")
    if npos > MAX_NPOS:
        raise ValueError(f"cope_attention_triton supports npos_max <= {MAX_NPOS}, got {npos}; use impl: chunked")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"cope_attention_triton takes float32, float16 or bfloat16 inputs, got {q.dtype}")
    if not (q.is_cuda or _interpreting()):
        raise ValueError(
            "cope_attention_triton runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1); use impl: chunked on CPU"
        )
    if importlib.util.find_spec("triton") is None:
        raise ImportError("cope_attention_triton needs triton: pip install 'cope_pl[triton]'")
    z = torch.matmul(q.float(), pos_emb.float())  # (B, H, T, P): z_i[p] = q_i . e[p], fp32

    def flat(x: Tensor, n: int) -> Tensor:
        return x.reshape(b * h, n, x.size(-1)).contiguous()

    out = _CopeAttention.apply(
        flat(q, t), flat(k, s), flat(v, s), flat(z, t), None if gate_k is None else flat(gate_k, s)
    )  # (BH, T, D)
    return out.view(b, h, t, d)
