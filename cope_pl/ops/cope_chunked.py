"""Memory-efficient exact CoPE attention: one block of queries against its keys at a time.

The reference op (`cope_pl/ops/cope.py`) holds several (B, H, T, S) tensors for the whole sequence, two of
them int64, and autograd keeps them all for backward. This op computes the same function block by block:
for a block of queries it forms logits, gates, positions, the interpolated CoPE term and the softmax, writes
the block's output and its per-row log-sum-exp, and frees everything else. Backward recomputes each block
from q, k, v (and gate keys, tables), so what is saved is O(T·D + T) per head, never O(T·S).

Two things make it faster as well as smaller. A query block only reads the keys up to its last query (the
rest are masked), which skips half of the causal square. And each block works with its keys in reverse
order, so the paper's "cumulative sum from the right" is a plain cumulative sum with no flips.

Optionally the block also adds q_i . r[clamp(i - j, 0, R - 1)] from a relative table (relative_cope) and a
per-head bias b_h[clamp(i - j, 0, R' - 1)] by distance (ALiBi, bucketed biases), so those combinations take the
same path. Attention dropout (on the normalised probabilities, as F.dropout after the
softmax) draws each block's mask from a generator seeded by (dropout seed, block), so backward regenerates the
same mask instead of saving it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cope_pl.ops.dropout import check_dropout, draw_dropout_seed

# Elements of one (B, H, block, keys) tensor, and at most this many queries per block: small blocks stay in
# cache and skip more of the masked upper triangle (on CPU, 64 rows beat 128 and whole-T blocks at T=256..1024).
DEFAULT_BLOCK_ELEMENTS = 1 << 20
MAX_BLOCK_ROWS = 64


def block_rows(b: int, h: int, t: int, s: int, max_elements: int = DEFAULT_BLOCK_ELEMENTS) -> int:
    """Queries per block: at most MAX_BLOCK_ROWS, and a (B, H, block, S) tensor within max_elements (>= 16 rows),
    spread evenly over the blocks that takes (T=129: 3 x 43, not 64 + 64 + a one-row block of full overhead)."""
    most = max(16, min(t, MAX_BLOCK_ROWS, max_elements // max(b * h * s, 1)))
    return math.ceil(t / math.ceil(t / most))


def block_scores(qb, k_rev, gk_rev, pos_emb, rel_emb, bias, first_row: int):
    """CoPE attention scores of one query block against its keys in reverse order, and what backward reuses.

    qb: (B, H, n, D) queries at absolute positions first_row.. ; k_rev, gk_rev: (B, H, S, D) keys 0..S-1 reversed;
    rel_emb: optional (D, R) relative table; bias: optional (H, R') per-head bias by distance.
    """
    n, s = qb.size(-2), k_rev.size(-2)
    npos = pos_emb.size(-1)
    scale = 1.0 / math.sqrt(qb.size(-1))
    rows = torch.arange(n, device=qb.device).unsqueeze(1) + first_row  # (n, 1) absolute query positions
    cols = (s - 1) - torch.arange(s, device=qb.device)  # (S,) key positions in reversed order
    masked = cols.unsqueeze(0) > rows  # (n, S)
    logits = (qb @ k_rev.transpose(-1, -2) * scale).masked_fill(masked, float("-inf"))  # (B, H, n, S)
    if gk_rev is None:
        gates = torch.sigmoid(logits)  # 0 on masked keys
    else:
        gates = torch.sigmoid((qb @ gk_rev.transpose(-1, -2) * scale).masked_fill(masked, float("-inf")))
    positions = gates.cumsum(-1)  # keys reversed: p_ij = sum_{t=j..i} g_it is a plain cumulative sum
    unclamped = positions <= npos - 1  # where the clamp passes gradient
    positions = positions.clamp(max=npos - 1)
    idx_floor = positions.floor().long()  # (B, H, n, S), block-sized, never (T, S)
    weight = positions - idx_floor  # interpolation weight, differentiable through the gates
    idx_ceil = positions.ceil().long()
    z = qb @ pos_emb  # (B, H, n, P): q_i . e[p]
    z_floor, z_ceil = z.gather(-1, idx_floor), z.gather(-1, idx_ceil)  # (B, H, n, S)
    scores = logits + z_floor + weight * (z_ceil - z_floor)
    distance = rows - cols.unsqueeze(0)  # (n, S): i - j, negative on masked keys
    idx_rel = idx_bias = None
    if rel_emb is not None:
        idx_rel = distance.clamp(0, rel_emb.size(-1) - 1).expand_as(scores)
        scores = scores + (qb @ rel_emb).gather(-1, idx_rel)
    if bias is not None:
        idx_bias = distance.clamp(0, bias.size(-1) - 1)  # (n, S)
        scores = scores + bias[:, idx_bias]  # (H, n, S), broadcast over the batch
    saved = (gates, unclamped, weight, idx_floor, idx_ceil, z_ceil - z_floor, idx_rel, idx_bias)
    return scores, saved  # scores (B, H, n, S), -inf on masked keys


def block_forward(qb, k_rev, v_rev, gk_rev, pos_emb, rel_emb, bias, first_row: int, drop):
    """One query block: output (B, H, n, D) and per-row log-sum-exp (B, H, n, 1).

    drop: None, or (B, H, n, S) dropout factors, 0 or 1 / (1 - p), for the keys in reversed order."""
    scores, _ = block_scores(qb, k_rev, gk_rev, pos_emb, rel_emb, bias, first_row)
    lse = torch.logsumexp(scores, -1, keepdim=True)
    probs = torch.exp(scores - lse)
    return (probs if drop is None else probs * drop) @ v_rev, lse


def block_backward(qb, k_rev, v_rev, gk_rev, pos_emb, rel_emb, bias, first_row: int, drop, dout, lse, delta):
    """Gradients of one query block, recomputed from its inputs; key gradients come back in reversed order."""
    scale = 1.0 / math.sqrt(qb.size(-1))
    scores, (gates, unclamped, weight, idx_floor, idx_ceil, z_step, idx_rel, idx_bias) = block_scores(
        qb, k_rev, gk_rev, pos_emb, rel_emb, bias, first_row
    )
    probs = torch.exp(scores - lse)  # (B, H, n, S)
    dprobs = dout @ v_rev.transpose(-1, -2)  # (B, H, n, S): gradient of the (dropped) probabilities
    if drop is not None:
        dprobs = dprobs * drop
    dv_rev = (probs if drop is None else probs * drop).transpose(-1, -2) @ dout  # (B, H, S, D)
    # delta_i = sum_j P_ij dP_ij = dO_i . O_i, with or without dropout.
    dscores = probs * (dprobs - delta)  # (B, H, n, S)
    # The CoPE term z_floor + w (z_ceil - z_floor): to the per-position logits z, and through w to the gates.
    dz = torch.zeros(*qb.shape[:-1], pos_emb.size(-1), dtype=qb.dtype, device=qb.device)  # (B, H, n, P)
    dz.scatter_add_(-1, idx_floor, dscores * (1 - weight))
    dz.scatter_add_(-1, idx_ceil, dscores * weight)
    dpositions = dscores * z_step * unclamped  # floor and ceil indices carry no gradient
    # positions = cumsum(gates) over reversed keys, so a gate's gradient sums the dpositions from it onwards.
    dgate_logits = dpositions.flip(-1).cumsum(-1).flip(-1) * gates * (1 - gates)  # 0 on masked keys
    dlogits = dscores if gk_rev is not None else dscores + dgate_logits
    dqb = (dlogits @ k_rev) * scale + dz @ pos_emb.transpose(0, 1)  # (B, H, n, D)
    dk_rev = (dlogits.transpose(-1, -2) @ qb) * scale  # (B, H, S, D)
    q_flat = qb.reshape(-1, qb.size(-1)).transpose(0, 1)  # (D, B*H*n)
    dpos_emb = q_flat @ dz.reshape(-1, dz.size(-1))  # (D, P)
    dgk_rev = drel = dbias = None
    if gk_rev is not None:
        dqb = dqb + (dgate_logits @ gk_rev) * scale
        dgk_rev = (dgate_logits.transpose(-1, -2) @ qb) * scale
    if rel_emb is not None:
        dzr = torch.zeros(*qb.shape[:-1], rel_emb.size(-1), dtype=qb.dtype, device=qb.device)  # (B, H, n, R)
        dzr.scatter_add_(-1, idx_rel, dscores)
        dqb = dqb + dzr @ rel_emb.transpose(0, 1)
        drel = q_flat @ dzr.reshape(-1, dzr.size(-1))
    if bias is not None:
        per_head = dscores.sum(0).flatten(1)  # (H, n*S)
        dbias = torch.zeros_like(bias).scatter_add_(-1, idx_bias.flatten().expand_as(per_head), per_head)
    return dqb, dk_rev, dv_rev, dgk_rev, dpos_emb, drel, dbias


def _reversed_keys(x: Tensor | None, end: int) -> Tensor | None:
    return None if x is None else x[..., :end, :].flip(-2)  # (B, H, end, D), keys end-1 .. 0


def _dropout_factors(q: Tensor, n: int, end: int, block_start: int, p: float, seed: int) -> Tensor | None:
    """(B, H, n, end) factors 0 or 1 / (1 - p) for one block, the same every time for (seed, block_start)."""
    if p == 0:
        return None
    generator = torch.Generator(device=q.device).manual_seed(seed * 1_000_003 + block_start)
    keep = torch.rand(*q.shape[:2], n, end, generator=generator, device=q.device, dtype=q.dtype) >= p
    return keep.to(q.dtype) / (1.0 - p)


class ChunkedCoPEAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pos_emb, gate_k, rel_emb, bias, block, fns, dropout_p, seed):  # noqa: D102
        t, s = q.size(-2), k.size(-2)
        fwd, _ = fns
        out = torch.empty_like(q)  # (B, H, T, D)
        lse = torch.empty(*q.shape[:-1], 1, dtype=q.dtype, device=q.device)  # (B, H, T, 1)
        for i0 in range(0, t, block):
            n = min(block, t - i0)
            first_row = s - t + i0
            end = first_row + n  # a block reads keys 0 .. its last query; the rest are masked
            rev = [_reversed_keys(x, end) for x in (k, v, gate_k)]
            drop = _dropout_factors(q, n, end, i0, dropout_p, seed)
            out[..., i0 : i0 + n, :], lse[..., i0 : i0 + n, :] = fwd(
                q[..., i0 : i0 + n, :], rev[0], rev[1], rev[2], pos_emb, rel_emb, bias, first_row, drop
            )
        ctx.save_for_backward(q, k, v, pos_emb, gate_k, rel_emb, bias, out, lse)
        ctx.block, ctx.fns, ctx.dropout = block, fns, (dropout_p, seed)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        q, k, v, pos_emb, gate_k, rel_emb, bias, out, lse = ctx.saved_tensors
        t, s = q.size(-2), k.size(-2)
        _, bwd = ctx.fns
        grad_out = grad_out.contiguous()
        delta = (grad_out * out).sum(-1, keepdim=True)  # (B, H, T, 1)
        grads = [torch.zeros_like(x) if x is not None else None for x in (q, k, v, gate_k, pos_emb, rel_emb, bias)]
        dq, dk, dv, dgk, dpos_emb, drel, dbias = grads
        for i0 in range(0, t, ctx.block):
            n = min(ctx.block, t - i0)
            first_row = s - t + i0
            end = first_row + n
            rows = slice(i0, i0 + n)
            rev = [_reversed_keys(x, end) for x in (k, v, gate_k)]
            dqb, dk_rev, dv_rev, dgk_rev, dpe, dr, db = bwd(
                q[..., rows, :],
                rev[0],
                rev[1],
                rev[2],
                pos_emb,
                rel_emb,
                bias,
                first_row,
                _dropout_factors(q, n, end, i0, *ctx.dropout),
                grad_out[..., rows, :],
                lse[..., rows, :],
                delta[..., rows, :],
            )
            dq[..., rows, :] = dqb
            dk[..., :end, :] += dk_rev.flip(-2)
            dv[..., :end, :] += dv_rev.flip(-2)
            dpos_emb += dpe
            if dgk is not None:
                dgk[..., :end, :] += dgk_rev.flip(-2)
            if drel is not None:
                drel += dr
            if dbias is not None:
                dbias += db
        return dq, dk, dv, dpos_emb, dgk, drel, dbias, None, None, None, None


_COMPILED: dict[str, tuple] = {}


def block_functions(compiled: bool) -> tuple:
    """(forward, backward) block functions; with compiled=True, torch.compile'd once and reused."""
    if not compiled:
        return block_forward, block_backward
    if "fns" not in _COMPILED:
        _COMPILED["fns"] = (
            torch.compile(block_forward, dynamic=True),
            torch.compile(block_backward, dynamic=True),
        )
    return _COMPILED["fns"]


def cope_attention_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pos_emb: Tensor,
    gate_k: Tensor | None = None,
    rel_emb: Tensor | None = None,
    bias: Tensor | None = None,
    block_size: int | None = None,
    compiled: bool = False,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
) -> Tensor:
    """Same function as `cope_attention` (plus an optional relative table), computed in query blocks.

    q: (B, H, T, D); k, v, gate_k: (B, H, S, D) with S >= T; pos_emb: (D, P); rel_emb: optional (D, R), adds
    q_i . r[clamp(i - j, 0, R - 1)]; bias: optional (H, R'), adds b_h[clamp(i - j, 0, R' - 1)]; block_size: queries per block (default: sized by `block_rows`);
    dropout_p: attention dropout, with masks drawn from dropout_seed (default: a seed from torch's global RNG).
    Half-precision inputs are computed in float32 and the output is cast back.
    """
    b, h, t, d = q.shape
    s = k.size(-2)
    if s < t:
        raise ValueError(f"cope_attention_chunked needs at least as many keys as queries, got S={s} < T={t}")
    block = block_size or block_rows(b, h, t, s)
    if block < 1:
        raise ValueError(f"cope_attention_chunked: block_size must be >= 1, got {block}")
    check_dropout(dropout_p)
    if dropout_p > 0 and dropout_seed is None:
        dropout_seed = draw_dropout_seed()
    dtype = torch.promote_types(q.dtype, torch.float32)
    args = [x if x is None else x.to(dtype) for x in (q, k, v, pos_emb, gate_k, rel_emb, bias)]
    with torch.autocast(q.device.type, enabled=False):
        out = ChunkedCoPEAttention.apply(*args, block, block_functions(compiled), dropout_p, dropout_seed or 0)
    return out.to(q.dtype)
