"""Memory-efficient exact CoPE attention: one block of queries against its keys at a time.

The reference op (`cope_pl/ops/cope.py`) holds several (B, H, T, S) tensors for the whole sequence, two of
them int64, and autograd keeps them all for backward. This op computes the same function block by block:
for a block of queries it forms logits, gates, positions, the interpolated CoPE term and the softmax, writes
the block's output, and frees everything else. Backward recomputes each block (the same softmax, so no
log-sum-exp is kept) from q, k, v (and gate keys, tables), so what is saved is O(T·D) per head, never O(T·S).

How big a block is depends on the device decisions are taken for (`block_policy`): on CPU a core's cache
sizes it; on CUDA, where every tensor op is a kernel launch, a memory budget does, so a layer launches hundreds
of kernels rather than tens of thousands.

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

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from cope_pl.ops import cope_cpu
from cope_pl.ops.device import decision_device
from cope_pl.ops.dropout import check_dropout, draw_dropout_seed
from cope_pl.ops.interpolation import interpolation_table, interpolation_table_grad
from cope_pl.seeding import generator as seeded_generator

# CPU: a block is at most MAX_BLOCK_ROWS queries of a group of heads (of the flattened B*H) whose (group, rows,
# keys) tensors hold about GROUP_ELEMENTS values, so the dozen passes over each stay in a core's cache; short
# sequences take shorter blocks, which skip more of the masked upper triangle (docs/benchmarks.md measures the
# choice).
MAX_BLOCK_ROWS = 64
GROUP_ELEMENTS = 1 << 17
# CUDA: every tensor op is a kernel launch, so a block is as many queries of as many heads as a memory budget
# takes: CUDA_GROUP_ELEMENTS values per (group, rows, keys) tensor, of which backward holds about a dozen at once.
CUDA_GROUP_ELEMENTS = 1 << 26
MIN_BLOCK_ROWS = 16


@dataclass(frozen=True)
class BlockPolicy:
    """How big a block is: at most max_rows queries (None: no limit but the budget), and about group_elements
    values per (heads, rows, keys) tensor."""

    max_rows: int | None
    group_elements: int


def block_policy(device: torch.device) -> BlockPolicy:
    """The block sizes for tensors of `device`, decided for `decision_device(device)` (a plan's target GPU)."""
    if decision_device(device).type == "cuda":
        return BlockPolicy(None, CUDA_GROUP_ELEMENTS)
    return BlockPolicy(MAX_BLOCK_ROWS, GROUP_ELEMENTS)


def block_rows(t: int, policy: BlockPolicy | None = None, bh: int = 1, s: int | None = None) -> int:
    """Queries per block for T queries of bh heads against s keys (default T), spread evenly over the blocks that
    takes (T=129 runs as 3 x 43, not 64 + 64 + a one-row block of full overhead). CPU: T/4 within
    [MIN_BLOCK_ROWS, MAX_BLOCK_ROWS]; CUDA: as many rows as the budget takes for all bh heads, at least
    MIN_BLOCK_ROWS (then `head_groups` splits the heads)."""
    policy = policy or BlockPolicy(MAX_BLOCK_ROWS, GROUP_ELEMENTS)
    if policy.max_rows is not None:
        most = max(MIN_BLOCK_ROWS, min(t // 4, policy.max_rows))
    else:
        most = max(MIN_BLOCK_ROWS, policy.group_elements // max(bh * (t if s is None else s), 1))
    most = min(most, t) if t > 0 else 1
    return math.ceil(t / math.ceil(t / most)) if t > 0 else 1


def head_groups(b: int, h: int, n: int, end: int, group_elements: int | None = None):
    """(slice of the flattened B*H, its first head) per group for a block of n queries reading `end` keys: whole
    batches of heads, or a divisor of H heads once one batch's (H, n, end) tensors pass group_elements (default
    GROUP_ELEMENTS)."""
    fit = (group_elements or GROUP_ELEMENTS) // max(n * end, 1)
    size = (
        h * max(1, min(b, fit // h)) if fit >= h else max(x for x in range(1, h + 1) if h % x == 0 and x <= max(fit, 1))
    )
    for g0 in range(0, b * h, size):
        yield slice(g0, min(g0 + size, b * h)), g0 % h


def as_pairs(x: Tensor) -> Tensor:
    """(..., 2P) real -> (..., P) complex view: each (z, slope) pair one element, for one gather or scatter."""
    return torch.view_as_complex(x.unflatten(-1, (-1, 2)))


def block_masks(n: int, s: int, rel: int, bias: int, dtype: torch.dtype, device: torch.device):
    """What depends only on a block's shape, for n queries against s keys in reverse order (a block reads the
    first `end` of them): key column c of query row r is at distance c - (n - 1 - r), whatever the block's
    offset. Returns the (n, s) additive mask (-inf on later keys, else 0) and (n, s) distances clamped to the
    relative table's and the bias's widths (None without them)."""
    distance = torch.arange(s, device=device) - (n - 1 - torch.arange(n, device=device).unsqueeze(1))  # (n, s)
    mask = torch.zeros(n, s, dtype=dtype, device=device).masked_fill_(distance < 0, float("-inf"))
    idx_rel = distance.clamp(0, rel - 1) if rel else None
    idx_bias = distance.clamp(0, bias - 1) if bias else None
    return mask, idx_rel, idx_bias


def block_scores(qb, kb, gkb, table, rel_emb, bias_b, mask, idx_rel, scale: float):
    """CoPE attention scores of one query block against its keys in reverse order, and what backward reuses.

    Heads are flattened into the batch: qb (G, n, D) for a group of G of them; kb, gkb: (G, S, D) keys S-1..0 of
    the block (gkb None: gates from the attention logits); table: (D, 2P) `interpolation_table`; rel_emb:
    optional (D, R); bias_b: optional (h, n, S) bias by distance of the group's heads, h dividing G; mask,
    idx_rel: (n, S) from `block_masks`. The (G, n, P) table products are formed here, block by block: per call
    they would be (B*H, T, 2P), as large as the logits of short sequences and freshly paged in every call.
    """
    zz = as_pairs(qb @ table)  # (G, n, P) complex pairs (q . e[p], q . (e[p + 1] - e[p]))
    logits = torch.baddbmm(mask, qb, kb.transpose(1, 2), alpha=scale)  # (G, n, S), -inf on masked keys
    gate_logits = logits if gkb is None else torch.baddbmm(mask, qb, gkb.transpose(1, 2), alpha=scale)
    gates = torch.sigmoid(gate_logits)  # 0 on masked keys
    # Keys reversed: p_ij = sum_{t=j..i} g_it is a plain cumulative sum.
    positions = gates.cumsum(-1)
    # f = min(floor(p), P - 1) in one pass (p >= 0). Past the clamp the pair's slope is 0, so the unclamped p's
    # fraction adds nothing and gets no gradient: the clamp itself is never formed. int64: gather and scatter
    # convert narrower indices first.
    edges = torch.arange(1, zz.size(-1), dtype=positions.dtype, device=positions.device)  # (P - 1,)
    pos_floor = torch.bucketize(positions, edges, right=True)
    w = positions.frac_()  # p - floor(p), differentiable through the gates
    pair = torch.view_as_real(zz.gather(-1, pos_floor))  # (G, n, S, 2): q_i . e[f], q_i . (e[f + 1] - e[f])
    z_step = pair[..., 1]  # 0 where clamped
    scores = torch.addcmul(pair[..., 0], w, z_step).add_(logits)
    if rel_emb is not None:
        scores.add_((qb @ rel_emb).gather(-1, idx_rel.expand_as(scores)))
    if bias_b is not None:
        scores.view(-1, *bias_b.shape).add_(bias_b)  # broadcast over the batch
    return scores, (gates, w, pos_floor, z_step)


def block_forward(qb, kb, vb, gkb, table, rel_emb, bias_b, mask, idx_rel, scale: float, drop, low=None):
    """One query block's output (G, n, D), before dropout's 1 / (1 - p). drop: None, or the (G, n, S) bool mask of
    kept keys in reversed order; low: None, or the half precision of the dropped probabilities' product with the
    values (`half_products`). Backward recomputes the same softmax, so no log-sum-exp is kept."""
    scores, _ = block_scores(qb, kb, gkb, table, rel_emb, bias_b, mask, idx_rel, scale)
    probs = torch.softmax(scores, -1)
    if drop is None:
        return torch.bmm(probs, vb)
    if low is None:
        return torch.bmm(probs.mul_(drop), vb)
    return torch.bmm(_narrow_product(probs, drop, low), vb.to(low))


def _narrow_product(a: Tensor, b: Tensor, low: torch.dtype, subtract: bool = False) -> Tensor:
    """a * b (or a - b) computed in a's precision and stored in `low`: on CUDA the narrowing is part of the same
    elementwise pass, so a half-precision matrix product reads half the bytes for no extra pass."""
    out = torch.empty_like(a, dtype=low)
    return torch.sub(a, b, out=out) if subtract else torch.mul(a, b, out=out)


def block_backward(qb, kb, vb, gkb, table, rel_emb, bias_b, mask, idx_rel, scale: float, drop, dout, low=None):
    """Gradients of one query block, recomputed from its inputs: dq; dk, dv, d gate_k (keys in reversed order,
    without the logits' 1/sqrt(D): the caller applies it once); the tables' gradients (D, 2P) and (D, R); the
    bias's gradient by (row, key) summed over the batch, (h, n, S). drop: as `block_forward`'s, with dropout's
    1 / (1 - p) already in dout; low: None, or the half precision of the products of the dropped probabilities
    (with dout) and of the logits' gradient (with q and k)."""
    scores, (gates, w, pos_floor, z_step) = block_scores(qb, kb, gkb, table, rel_emb, bias_b, mask, idx_rel, scale)
    probs = torch.softmax(scores, -1)  # (G, n, S)
    dprobs = torch.bmm(dout, vb.transpose(1, 2))  # gradient of the (dropped) probabilities
    if drop is not None:
        dprobs.mul_(drop)
    if drop is None:
        dvb = torch.bmm(probs.transpose(1, 2), dout)  # (G, S, D)
    elif low is None:
        dvb = torch.bmm((probs * drop).transpose(1, 2), dout)
    else:
        dvb = torch.bmm(_narrow_product(probs, drop, low).transpose(1, 2), dout.to(low))
    # P (dP - sum_j P_ij dP_ij) in one pass; with dropout too, as dP is taken before it.
    dscores = torch._softmax_backward_data(dprobs, probs, -1, probs.dtype)
    # The CoPE term z[f] + w z_step (docs/cope-ops.md): to z and to its step at f, two scatters of real values into
    # the table's (value, slope) columns; through w to the gates.
    g, n, s = dscores.shape
    dzz = torch.zeros(g, n, table.size(-1) // 2, 2, dtype=dscores.dtype, device=qb.device)  # (G, n, P, 2)
    dzz[..., 0].scatter_add_(-1, pos_floor, dscores)
    dzz[..., 1].scatter_add_(-1, pos_floor, w.mul_(dscores))
    dzz = dzz.flatten(-2)  # (G, n, 2P), as the table's columns
    # positions = cumsum(gates) over reversed keys, so a gate's gradient sums the dpositions from it onwards:
    # minus a running sum that starts at minus the row's total (no flips). z_step is 0 where the clamp holds.
    run = torch.empty(g, n, s + 1, dtype=dscores.dtype, device=qb.device)  # (G, n, 1 + S)
    dpositions = torch.mul(z_step, dscores, out=run[..., 1:])
    torch.neg(dpositions.sum(-1), out=run[..., 0])
    neg_dgate_logits = torch.ops.aten.sigmoid_backward(run.cumsum_(-1)[..., :s], gates)  # minus d gate logits
    dqb = dzz @ table.transpose(0, 1)  # (G, n, D)
    q_flat = qb.reshape(-1, qb.size(-1)).transpose(0, 1)  # (D, G*n)
    dtable = q_flat @ dzz.reshape(-1, dzz.size(-1))
    drel = None
    if rel_emb is not None:
        dzr = torch.zeros(*qb.shape[:-1], rel_emb.size(-1), dtype=qb.dtype, device=qb.device)
        dzr.scatter_add_(-1, idx_rel.expand_as(dscores), dscores)
        dqb += dzr @ rel_emb.transpose(0, 1)
        drel = q_flat @ dzr.reshape(-1, dzr.size(-1))
    dbias = None if bias_b is None else dscores.view(-1, *bias_b.shape).sum(0)
    if gkb is None and low is not None:
        dlogits = _narrow_product(dscores, neg_dgate_logits, low, subtract=True)
        dqb.add_(torch.bmm(dlogits, kb.to(low)), alpha=scale)
        return dqb, torch.bmm(dlogits.transpose(1, 2), qb.to(low)), dvb, None, dtable, drel, dbias
    if gkb is None:
        dlogits = dscores.sub_(neg_dgate_logits)  # dscores is not read again
        dqb = torch.baddbmm(dqb, dlogits, kb, alpha=scale)
        return dqb, torch.bmm(dlogits.transpose(1, 2), qb), dvb, None, dtable, drel, dbias
    dqb = torch.baddbmm(torch.baddbmm(dqb, dscores, kb, alpha=scale), neg_dgate_logits, gkb, alpha=-scale)
    dkb, dgkb = torch.bmm(dscores.transpose(1, 2), qb), torch.bmm(neg_dgate_logits.transpose(1, 2), qb).neg_()
    return dqb, dkb, dvb, dgkb, dtable, drel, dbias


def _dropout_keep(q: Tensor, n: int, end: int, block_start: int, p: float, seed: int) -> Tensor | None:
    """(B*H, n, end) bool mask of kept keys for one block (one byte each; the 1 / (1 - p) is applied to the (T, D)
    output and its gradient), the same every time for (seed, block_start)."""
    if p == 0:
        return None
    generator = seeded_generator(seed, block_start, q.device)
    keep = torch.empty(*q.shape[:2], n, end, dtype=torch.bool, device=q.device)
    return keep.bernoulli_(1.0 - p, generator=generator).flatten(0, 1)


def _group_bias(bias_b: Tensor | None, g: slice, h0: int) -> Tensor | None:
    """The (h, n, end) bias rows of a group's heads: all H for whole batches, else the group's own heads."""
    if bias_b is None:
        return None
    heads = g.stop - g.start
    return bias_b if heads % bias_b.size(0) == 0 else bias_b[h0 : h0 + heads]


class _Blocks:
    """The query blocks of one call: (first query, queries, keys read, mask, idx_rel, idx_bias) each. A block
    reads keys 0 .. its last query (the rest are masked), i.e. the last `end` of the reversed keys; the masks
    depend only on the block's height, so they are built once per height."""

    def __init__(self, t: int, s: int, block: int, rel_emb, bias, dtype, device):
        self.t, self.s, self.block = t, s, block
        self.widths = (0 if rel_emb is None else rel_emb.size(-1), 0 if bias is None else bias.size(-1))
        self.dtype, self.device, self.masks = dtype, device, {}

    def __iter__(self):
        for i0 in range(0, self.t, self.block):
            n = min(self.block, self.t - i0)
            end = self.s - self.t + i0 + n
            if n not in self.masks:
                self.masks[n] = block_masks(n, self.s, *self.widths, self.dtype, self.device)
            yield (i0, n, end, *(None if x is None else x[:, :end] for x in self.masks[n]))


class ChunkedCoPEAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pos_emb, gate_k, rel_emb, bias, block, group_elements, fns, dropout_p, seed):  # noqa: D102
        b, h, t, d = q.shape
        s, scale = k.size(-2), 1.0 / math.sqrt(d)
        fwd, _ = fns
        q3 = q.reshape(b * h, t, d).contiguous()
        # Keys in reverse order once per call: every block reads a suffix of them (keys end-1 .. 0), a view.
        k3, v3, gk3 = (None if x is None else x.flip(-2).reshape(b * h, s, d).contiguous() for x in (k, v, gate_k))
        table = interpolation_table(pos_emb)
        out = torch.empty_like(q3)
        for i0, n, end, mask, idx_rel, idx_bias in _Blocks(t, s, block, rel_emb, bias, q.dtype, q.device):
            rows, keys = slice(i0, i0 + n), slice(s - end, s)
            drop = _dropout_keep(q, n, end, i0, dropout_p, seed)
            bias_b = None if bias is None else bias[:, idx_bias]  # (H, n, end)
            for g, h0 in head_groups(b, h, n, end, group_elements):
                out[g, rows] = fwd(
                    q3[g, rows], k3[g, keys], v3[g, keys], None if gk3 is None else gk3[g, keys], table, rel_emb,
                    _group_bias(bias_b, g, h0), mask, idx_rel, scale, None if drop is None else drop[g],
                )  # fmt: skip
        if dropout_p > 0:
            out.mul_(1.0 / (1.0 - dropout_p))
        ctx.save_for_backward(q3, k3, v3, pos_emb, gk3, rel_emb, bias)
        ctx.block, ctx.group_elements, ctx.fns = block, group_elements, fns
        ctx.dropout, ctx.shape = (dropout_p, seed), (b, h, t, s, d)
        return out.view(b, h, t, d)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        q3, k3, v3, pos_emb, gk3, rel_emb, bias = ctx.saved_tensors
        b, h, t, s, d = ctx.shape
        scale = 1.0 / math.sqrt(d)
        _, bwd = ctx.fns
        dropout_p = ctx.dropout[0]
        dout = grad_out.reshape(b * h, t, d)
        # Dropout's 1 / (1 - p) once for every block (the product is contiguous too).
        dout = dout * (1.0 / (1.0 - dropout_p)) if dropout_p > 0 else dout.contiguous()
        table = interpolation_table(pos_emb)
        dq, dtable = torch.empty_like(q3), torch.zeros_like(table)
        dk, dv = torch.zeros_like(k3), torch.zeros_like(v3)  # keys in reverse order
        dgk = None if gk3 is None else torch.zeros_like(gk3)
        drel = None if rel_emb is None else torch.zeros_like(rel_emb)
        dbias = None if bias is None else torch.zeros_like(bias)
        for i0, n, end, mask, idx_rel, idx_bias in _Blocks(t, s, ctx.block, rel_emb, bias, q3.dtype, q3.device):
            rows, keys = slice(i0, i0 + n), slice(s - end, s)
            drop = _dropout_keep(q3.view(b, h, t, d), n, end, i0, *ctx.dropout)
            bias_b = None if bias is None else bias[:, idx_bias]
            for g, h0 in head_groups(b, h, n, end, ctx.group_elements):
                dqb, dkb, dvb, dgkb, dtb, drb, dbb = bwd(
                    q3[g, rows], k3[g, keys], v3[g, keys], None if gk3 is None else gk3[g, keys], table, rel_emb,
                    _group_bias(bias_b, g, h0), mask, idx_rel, scale, None if drop is None else drop[g],
                    dout[g, rows],
                )  # fmt: skip
                dq[g, rows] = dqb
                dk[g, keys].add_(dkb)  # in place (`+=` on an index would copy the view onto itself too)
                dv[g, keys].add_(dvb)
                dtable += dtb
                if dgk is not None:
                    dgk[g, keys].add_(dgkb)
                if drel is not None:
                    drel += drb
                if dbias is not None:
                    heads = dbb.size(0)
                    dbias[h0 : h0 + heads].scatter_add_(-1, idx_bias.reshape(1, -1).expand(heads, -1), dbb.flatten(1))

        def keys_out(x):  # (G, S, D) in reverse order -> (B, H, S, D), with the logits' scale
            return None if x is None else x.flip(1).mul_(scale).view(b, h, s, d)

        dk, dgk = keys_out(dk), keys_out(dgk)
        dv = dv.flip(1).view(b, h, s, d)
        dpos_emb = interpolation_table_grad(dtable)
        return dq.view(b, h, t, d), dk, dv, dpos_emb, dgk, drel, dbias, None, None, None, None, None


_COMPILED: dict[str, tuple] = {}


def block_functions(compiled: bool, fused: bool = False, low: torch.dtype | None = None) -> tuple:
    """(forward, backward) block functions; with compiled=True, torch.compile'd once and reused; with fused=True,
    the C++ ones of cope_cpu.py (CPU; no relative table or bias); low: the torch blocks' half-precision products
    (`half_products`)."""
    if fused:
        return cope_cpu.fused_block_forward, cope_cpu.fused_block_backward
    if not compiled:
        fns = block_forward, block_backward
    else:
        if "fns" not in _COMPILED:
            _COMPILED["fns"] = (
                torch.compile(block_forward, dynamic=True),
                torch.compile(block_backward, dynamic=True),
            )
        fns = _COMPILED["fns"]
    return fns if low is None else tuple(functools.partial(f, low=low) for f in fns)


def half_products(dtype: torch.dtype, policy: BlockPolicy) -> torch.dtype | None:
    """The precision of the products that read a block's dropped probabilities or logits' gradient: the inputs'
    float16 or bfloat16 under the CUDA policy (as a flash kernel keeps them; tensor cores, half the bytes), else None
    (the compute dtype). Logits, gates, positions and softmax stay in float32 either way."""
    return dtype if dtype in (torch.float16, torch.bfloat16) and policy.max_rows is None else None


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
    fused: bool = False,
) -> Tensor:
    """Same function as `cope_attention` (plus an optional relative table), computed in query blocks.

    q: (B, H, T, D); k, v, gate_k: (B, H, S, D) with S >= T; pos_emb: (D, P); rel_emb: optional (D, R), adds
    q_i . r[clamp(i - j, 0, R - 1)]; bias: optional (H, R'), adds b_h[clamp(i - j, 0, R' - 1)]; block_size:
    queries per block (default: `block_rows` for the device `decision_device` names); dropout_p: attention
    dropout, with masks drawn from dropout_seed (default: a seed from torch's global RNG); fused: each block's
    elementwise work in the C++ extension of cope_cpu.py (CPU tensors, no rel_emb or bias, not compiled).
    Half-precision inputs are computed in float32 (under the CUDA policy the products that read the dropped
    probabilities or the logits' gradient take the inputs' precision: `half_products`) and the output is cast back.
    """
    b, h, t, d = q.shape
    s = k.size(-2)
    if s < t:
        raise ValueError(f"cope_attention_chunked needs at least as many keys as queries, got S={s} < T={t}")
    policy = block_policy(torch.device("cpu") if fused else q.device)  # the C++ blocks: CPU sizes
    block = block_size or block_rows(t, policy, b * h, s)
    if block < 1:
        raise ValueError(f"cope_attention_chunked: block_size must be >= 1, got {block}")
    check_dropout(dropout_p)
    if fused:
        if rel_emb is not None or bias is not None or compiled or q.device.type != "cpu":
            raise ValueError("the fused CPU blocks take CPU tensors without a relative table, bias or compile")
        if not cope_cpu.available():
            raise RuntimeError(f"the CPU CoPE kernel could not be built ({cope_cpu.build_error()}); use impl=chunked")
    if dropout_p > 0 and dropout_seed is None:
        dropout_seed = draw_dropout_seed()
    dtype = torch.promote_types(q.dtype, torch.float32)
    args = [x if x is None else x.to(dtype) for x in (q, k, v, pos_emb, gate_k, rel_emb, bias)]
    with torch.autocast(q.device.type, enabled=False):
        if fused and dropout_p == 0:  # the block loop in C++ too
            return cope_cpu.CPUCoPEAttention.apply(*args[:5], block).to(q.dtype)
        fns = block_functions(compiled, fused, None if fused else half_products(q.dtype, policy))
        out = ChunkedCoPEAttention.apply(*args, block, policy.group_elements, fns, dropout_p, dropout_seed or 0)
    return out.to(q.dtype)
