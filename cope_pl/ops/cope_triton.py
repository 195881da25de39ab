"""Fused CoPE attention with Triton: a drop-in for `cope_attention` that never materialises (T, S) tensors.

The kernels live in `cope_triton_kernels` and are imported on first use, so cope_pl imports without triton.
z = q E (B, H, T, P) is computed here in fp32 and differentiated by autograd (dq += dz E^T, dE = q^T dz); the
kernels take z and return dz. Gate sums are accumulated in fp32 whatever the input dtype: a bf16 running sum
cannot count past 256.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

from cope_pl.ops.dropout import check_dropout, draw_dropout_seed

MAX_NPOS = 256


def triton_available() -> bool:
    """True when cope_attention_triton can run here: triton is installed and there is a GPU or the interpreter."""
    if importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.is_available() or interpreting()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# Tile candidates the GPU autotuner times on first use of each (D, P, dtype, sep-keys): (BLOCK_M, BLOCK_N,
# num_warps, num_stages). Picked offline from ptxas register spills for sm_90 (`make bench-kernels` writes the
# table); no GPU has timed them yet.
FORWARD_TILES = ((64, 32, 8, 2), (32, 32, 8, 2), (16, 32, 8, 2), (16, 32, 4, 2), (32, 32, 4, 2), (64, 64, 8, 2))
# Both backward passes use one key tile width, since the carries are stored per key tile; (BLOCK_M, warps, stages).
BACKWARD_BLOCK_N = 32
BACKWARD_TILES = ((16, 8, 2), (16, 4, 2), (32, 8, 2), (32, 4, 2), (64, 8, 2))
# Fixed tiles, (BLOCK_M, BLOCK_N) per kernel, used in the interpreter and whenever AUTOTUNE is off: small, so tiny
# test shapes still cross tile edges. The two backward passes must share BLOCK_N; their BLOCK_M may differ, as the
# autotuner may pick on a GPU.
FIXED_TILES = {"forward": (16, 16), "query": (16, 16), "key": (16, 16)}
TUNING_KEY = ["D", "BLOCK_P", "SEP_KEYS", "DROPOUT"]
# Off: a GPU runs FIXED_TILES too, e.g. for the kernel tests on a GPU, where tuning every tiny shape would cost
# minutes of compiling (tests/conftest.py turns it off under COPE_TEST_DEVICE=cuda).
AUTOTUNE = True


def _autotuning() -> bool:
    return AUTOTUNE and not interpreting()  # the interpreter cannot time anything


@functools.cache
def _kernels(autotune: bool) -> tuple:
    """(forward, backward query pass, backward key pass) launchers: autotuned, or plain with the tiles passed in."""
    import triton

    from cope_pl.ops import cope_triton_kernels as kernels

    fwd, bwd_query, bwd_key = kernels.cope_fwd_kernel, kernels.cope_bwd_query_kernel, kernels.cope_bwd_key_kernel
    if not autotune:
        return fwd, bwd_query, bwd_key
    fwd_configs = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in FORWARD_TILES
    ]
    bwd_configs = [triton.Config({"BLOCK_M": m}, num_warps=w, num_stages=st) for m, w, st in BACKWARD_TILES]
    return (
        triton.autotune(fwd_configs, key=TUNING_KEY)(fwd),
        # Timing a config runs the kernel: zero what it accumulates into (only while tuning).
        triton.autotune(bwd_configs, key=[*TUNING_KEY, "ATOMIC_KEY_GRADS"], reset_to_zero=["DZ", "DK", "DV", "DGK"])(
            bwd_query
        ),
        triton.autotune(bwd_configs, key=TUNING_KEY)(bwd_key),
    )


def _constants(q: Tensor, npos: int) -> dict:
    """Compile-time constants every kernel takes (tile sizes come from the autotuner or `_tiles`)."""
    import triton
    import triton.language as tl

    dtypes = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
    d = q.size(-1)
    return dict(
        D=d,
        BLOCK_D=max(16, triton.next_power_of_2(d)),
        BLOCK_P=max(16, triton.next_power_of_2(npos)),
        IN_DT=dtypes[q.dtype],
        DOT_DT=tl.float32 if interpreting() else dtypes[q.dtype],  # the interpreter cannot multiply bf16
        PREC="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 inputs: no silent tf32 rounding
    )


def _tiles(kernel: str) -> dict:
    """Tile sizes passed by hand: all of them without the autotuner, else the shared key tile width of the backward."""
    if not _autotuning():
        block_m, block_n = FIXED_TILES[kernel]
        return dict(BLOCK_M=block_m, BLOCK_N=block_n)
    return {} if kernel == "forward" else dict(BLOCK_N=BACKWARD_BLOCK_N)


def _row_tiles(rows: int, bh: int):
    return lambda meta: (math.ceil(rows / meta["BLOCK_M"]), bh)


# The launches are torch.library custom ops with fake shapes, so fake tensors (`cope-pl plan` on a machine without
# a GPU) and torch.compile trace the kernel as one op each way without running it.
@torch.library.custom_op("cope_pl::triton_forward", mutates_args=())
def triton_forward(
    q: Tensor, k: Tensor, v: Tensor, z: Tensor, gate_k: Tensor | None, dropout_p: float, seed: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The forward kernel: (out (BH, T, D), row log-sum-exp (BH, T), row gate sum (BH, T)), both fp32."""
    bh, t, d = q.shape
    s, npos = k.size(1), z.size(-1)
    out = torch.empty_like(q)
    lse = torch.empty(bh, t, device=q.device, dtype=torch.float32)
    gsum = torch.empty(bh, t, device=q.device, dtype=torch.float32)
    sep = gate_k is not None
    fwd, _, _ = _kernels(_autotuning())
    fwd[_row_tiles(t, bh)](
        q, k, v, gate_k if sep else k, z, out, lse, gsum, t, s, npos, 1.0 / math.sqrt(d), dropout_p, seed,
        SEP_KEYS=sep, DROPOUT=dropout_p > 0, **_constants(q, npos), **_tiles("forward"),
    )  # fmt: skip
    return out, lse, gsum


@triton_forward.register_fake
def _(q, k, v, z, gate_k, dropout_p, seed):
    rows = q.new_empty(q.shape[:2], dtype=torch.float32)  # (BH, T)
    return torch.empty_like(q), rows, torch.empty_like(rows)


@torch.library.custom_op("cope_pl::triton_backward", mutates_args=())
def triton_backward(
    q: Tensor, k: Tensor, v: Tensor, z: Tensor, gate_k: Tensor | None, out: Tensor, lse: Tensor, gsum: Tensor,
    dout: Tensor, backward: str, dropout_p: float, seed: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """The backward kernels: dq, dk, dv in the inputs' dtype, dz fp32, d gate_k (empty without gate keys)."""
    bh, t, d = q.shape
    s, npos = k.size(1), z.size(-1)
    sep = gate_k is not None
    dout = dout.contiguous()
    delta = (dout.float() * out.float()).sum(-1)  # (BH, T): rowsum(dO * O)
    consts, query_tiles, key_tiles = _constants(q, npos), _tiles("query"), _tiles("key")
    if query_tiles["BLOCK_N"] != key_tiles["BLOCK_N"]:
        raise ValueError("the two backward passes need one key tile width (the carries are per key tile)")
    n_key_tiles = math.ceil(s / key_tiles["BLOCK_N"])
    atomic = choose_backward(backward, n_key_tiles, npos) == "atomic"
    dq = torch.empty(bh, t, d, device=q.device, dtype=torch.float32)
    dz = torch.zeros(bh, t, npos, device=q.device, dtype=torch.float32)
    # Key gradients: fp32 accumulators for atomic adds, or written once, in the input dtype, by the key pass.
    alloc, key_dtype = (torch.zeros, torch.float32) if atomic else (torch.empty, k.dtype)
    dk, dv = (alloc(bh, s, d, device=q.device, dtype=key_dtype) for _ in range(2))
    dgk = alloc(bh, s, d, device=q.device, dtype=key_dtype) if sep else dk
    # Gate and dL/dp sums at the left edge of every key tile, for the key pass (tiny dummies when atomic).
    carry_shape = (1,) if atomic else (bh, n_key_tiles, t)
    gate_before, dpos_before = (torch.empty(carry_shape, device=q.device, dtype=torch.float32) for _ in range(2))
    gk = gate_k if sep else k
    scale = 1.0 / math.sqrt(d)
    _, bwd_query, bwd_key = _kernels(_autotuning())
    bwd_query[_row_tiles(t, bh)](
        q, k, v, gk, z, dout, lse, delta, gsum, dq, dz, gate_before, dpos_before, dk, dv, dgk,
        t, s, npos, n_key_tiles, scale, dropout_p, seed,
        SEP_KEYS=sep, ATOMIC_KEY_GRADS=atomic, DROPOUT=dropout_p > 0, **consts, **query_tiles,
    )  # fmt: skip
    if not atomic:
        bwd_key[(n_key_tiles, bh)](
            q, k, v, gk, z, dout, lse, delta, gsum, gate_before, dpos_before, dk, dv, dgk,
            t, s, npos, n_key_tiles, scale, dropout_p, seed,
            SEP_KEYS=sep, DROPOUT=dropout_p > 0, **consts, **key_tiles,
        )  # fmt: skip
    dgk = dgk.to(q.dtype) if sep else q.new_empty(0)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dz, dgk


@triton_backward.register_fake
def _(q, k, v, z, gate_k, out, lse, gsum, dout, backward, dropout_p, seed):
    dgk = q.new_empty(0) if gate_k is None else torch.empty_like(gate_k)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(z), dgk


class _CopeAttention(torch.autograd.Function):
    """Inputs flattened to (BH, T, D) / (BH, S, D) / (BH, T, P), contiguous; z in fp32."""

    @staticmethod
    def forward(ctx, q, k, v, z, gate_k, backward: str, dropout_p: float, seed: int) -> Tensor:
        out, lse, gsum = triton_forward(q, k, v, z, gate_k, dropout_p, seed)
        ctx.save_for_backward(q, k, v, z, gate_k, out, lse, gsum)
        ctx.backward, ctx.dropout = backward, (dropout_p, seed)
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, k, v, z, gate_k, out, lse, gsum = ctx.saved_tensors
        dq, dk, dv, dz, dgk = triton_backward(q, k, v, z, gate_k, out, lse, gsum, dout, ctx.backward, *ctx.dropout)
        return dq, dk, dv, dz, None if gate_k is None else dgk, None, None, None


BACKWARDS = ("auto", "two_pass", "atomic")


def choose_backward(backward: str, n_key_tiles: int, npos: int) -> str:
    """The backward variant that runs. auto: the two-pass backward while its carries (two per row and key tile)
    take no more memory than z and dz (P per row each), so memory stays O(T·P); the atomic one beyond that."""
    if backward != "auto":
        return backward
    return "two_pass" if n_key_tiles <= npos else "atomic"


def cope_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pos_emb: Tensor,
    gate_k: Tensor | None = None,
    backward: str = "auto",
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
) -> Tensor:
    """Causal softmax attention with CoPE, fused; same signature, semantics and gradients as `cope_attention`.

    q: (B, H, T, D); k, v: (B, H, S, D) with S >= T (queries are the last T positions);
    pos_emb: (D, P) with P <= 256; gate_k: optional (B, H, S, D) separate keys for the gates (sep-keys CoPE).
    Inputs fp32, fp16 or bf16 (all of q, k, v, gate_k alike); returns (B, H, T, D) in that dtype.
    backward: "two_pass" (a query pass and a key pass, no atomics across programs, 2 fp32 carries per row and
    32-key tile of scratch), "atomic" (one pass adding key gradients with fp32 atomics) or "auto" (two_pass while
    S <= 32 P, so that memory stays O(T P); see `choose_backward` and cope_triton_kernels).
    dropout_p: attention dropout, with masks drawn from dropout_seed (default: a seed from torch's global RNG).
    """
    b, h, t, d = q.shape
    s, npos = k.size(-2), pos_emb.size(-1)
    if s < t:
        raise ValueError(f"cope_attention_triton needs at least as many keys as queries, got S={s} < T={t}")
    if npos > MAX_NPOS:
        raise ValueError(f"cope_attention_triton supports npos_max <= {MAX_NPOS}, got {npos}; use impl: chunked")
    if backward not in BACKWARDS:
        raise ValueError(f"cope_attention_triton: backward must be one of {list(BACKWARDS)}, got {backward!r}")
    check_dropout(dropout_p)
    if dropout_p > 0 and dropout_seed is None:
        dropout_seed = draw_dropout_seed()
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"cope_attention_triton takes float32, float16 or bfloat16 inputs, got {q.dtype}")
    fake = isinstance(q, FakeTensor)  # traced for shapes only (`cope-pl plan`): nothing is launched
    if not (q.is_cuda or interpreting() or fake):
        raise ValueError(
            "cope_attention_triton runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1); use impl: chunked on CPU"
        )
    if importlib.util.find_spec("triton") is None and not fake:
        raise ImportError("cope_attention_triton needs triton: pip install 'cope_pl[triton]'")

    def flat(x: Tensor, n: int) -> Tensor:
        return x.reshape(b * h, n, x.size(-1)).contiguous()

    # Under bf16 autocast (bf16-mixed training) the matmul would round z to bf16.
    with torch.autocast(q.device.type, enabled=False):
        z = torch.matmul(q.float(), pos_emb.float())  # (B, H, T, P): z_i[p] = q_i . e[p], fp32
        out = _CopeAttention.apply(
            flat(q, t),
            flat(k, s),
            flat(v, s),
            flat(z, t),
            None if gate_k is None else flat(gate_k, s),
            backward,
            dropout_p,
            dropout_seed or 0,
        )  # (BH, T, D)
    return out.view(b, h, t, d)
