"""Triton kernels for fused CoPE attention (FlashAttention-style: O(T) memory, no (T, S) matrix in memory).

Imported only by `cope_pl.ops.cope_triton`, lazily, so that cope_pl imports without triton. Triton reads
TRITON_INTERPRET when these functions are decorated, i.e. when this module is first imported.

Notation, per (batch, head) and query row i at absolute position r_i = i + S - T:
    s_it = scale q_i.k_t,  g_it = sigmoid(scale q_i.gk_t) for t <= r_i else 0   (gk = k unless sep-keys)
    p_ij = sum_{t=j..r_i} g_it, clamped at P-1;  pos_floor, pos_ceil = floor, ceil;  w = p - pos_floor
    l_ij = s_ij + z_i[pos_floor] (1 - w) + z_i[pos_ceil] w,  with z_i = q_i E computed outside (B, H, T, P)
(the names of the reference op, cope_pl/ops/cope.py, and of the chunked op; gradients in docs/cope-ops.md)

Forward: key tiles are walked from the diagonal to the left, so p for a whole tile is an in-tile reverse
cumulative sum plus the running gate sum of the tiles already seen (fp32). z_i[pos_floor] is read from the (BLOCK_M, P)
register tile with tl.gather. Online softmax does not care about the order of tiles. The total gate sum of each
row is saved for the backward.

Backward, two passes, neither with atomics across programs:
  1. `cope_bwd_query_kernel`, one program per query tile, walks key tiles from the left, so the gate gradient
     dg_it = sum_{j<=t} dp_ij is an in-tile cumulative sum plus a carry; the positions are recovered from the saved
     row total as p_ij = total_i - sum_{t<j} g_it. It owns dq and dz (dz entries of one row are scattered into its
     P bins with atomic adds inside the program; clamped positions all land in bin P-1 and are summed first), and
     writes both carries at the left edge of every key tile: (BH, S/BLOCK_N, T) floats each.
  2. `cope_bwd_key_kernel`, one program per key tile, walks the query tiles below it, recomputes the tile from
     those carries and owns dk, dv and d gate_k.
The carries cost O(T^2 / BLOCK_N) scratch memory during the backward (the forward keeps O(T)). With
ATOMIC_KEY_GRADS the first pass instead adds dk, dv and d gate_k into fp32 buffers with atomics and the second
pass is skipped: the alternative `backward="atomic"`, kept so a GPU benchmark can compare the two.

Attention dropout (DROPOUT) multiplies the normalised probabilities by 0 or 1/(1-p), drawn with Philox from
(seed, batch-head, row, key), so every kernel and every tile shape sees the same mask.
"""

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, IN_DT: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr):
    """a @ b with both operands rounded to the input dtype; DOT_DT is fp32 under the interpreter (no bf16 dot)."""
    return tl.dot(a.to(IN_DT).to(DOT_DT), b.to(IN_DT).to(DOT_DT), input_precision=PREC)


@triton.jit
def _positions_and_cope(z, p, NPOS):
    """Clamp positions at NPOS-1, interpolate z between floor and ceil: (term, pos_floor, pos_ceil, w, z_step)."""
    pc = tl.minimum(p, NPOS - 1.0)
    pos_floor = tl.floor(pc)
    pos_ceil = tl.ceil(pc)
    w = pc - pos_floor
    z_floor = tl.gather(z, pos_floor.to(tl.int32), axis=1)  # (BLOCK_M, BLOCK_N)
    z_ceil = tl.gather(z, pos_ceil.to(tl.int32), axis=1)
    return z_floor * (1.0 - w) + z_ceil * w, pos_floor, pos_ceil, w, z_ceil - z_floor


@triton.jit
def _query_program(T, S, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr):
    """Indices of a program that owns query tile program_id(0) of (batch, head) program_id(1)."""
    bh = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows_abs = offs_m + (S - T)  # absolute position of each query among the keys
    return bh, offs_m, offs_d, tl.arange(0, BLOCK_P), offs_m < T, rows_abs, offs_d < D


@triton.jit
def cope_fwd_kernel(
    Q, K, V, GK, Z, O, LSE, GSUM,
    T, S, NPOS, scale, dropout_p, seed,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
    SEP_KEYS: tl.constexpr, DROPOUT: tl.constexpr, IN_DT: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    m0 = tl.program_id(0) * BLOCK_M
    bh, offs_m, offs_d, offs_p, row_ok, rows_abs, d_ok = _query_program(T, S, D, BLOCK_M, BLOCK_D, BLOCK_P)

    q = tl.load(Q + bh * T * D + offs_m[:, None] * D + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    z = tl.load(
        Z + bh * T * NPOS + offs_m[:, None] * NPOS + offs_p[None, :],
        mask=row_ok[:, None] & (offs_p < NPOS)[None, :],
        other=0.0,
    )  # (BLOCK_M, BLOCK_P) fp32

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite: rows with no key in a tile must not give nan
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    carry = tl.zeros([BLOCK_M], tl.float32)  # gate sum of the tiles to the right, fp32

    last_abs = tl.minimum(m0 + BLOCK_M, T) - 1 + (S - T)
    n_tiles = last_abs // BLOCK_N + 1
    for it in range(0, n_tiles):
        n0 = (n_tiles - 1 - it) * BLOCK_N  # right to left
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n < S)[:, None] & d_ok[None, :]
        kv_off = bh * S * D + offs_n[:, None] * D + offs_d[None, :]
        k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
        valid = (offs_n[None, :] <= rows_abs[:, None]) & (offs_n < S)[None, :]

        s = _dot(q, tl.trans(k), IN_DT, DOT_DT, PREC) * scale  # (BLOCK_M, BLOCK_N)
        if SEP_KEYS:
            gk = tl.load(GK + kv_off, mask=kv_mask, other=0.0)
            gate_logits = _dot(q, tl.trans(gk), IN_DT, DOT_DT, PREC) * scale
        else:
            gate_logits = s
        g = tl.where(valid, tl.sigmoid(gate_logits), 0.0)
        p = tl.cumsum(g, axis=1, reverse=True) + carry[:, None]
        carry += tl.sum(g, axis=1)
        cope, _, _, _, _ = _positions_and_cope(z, p, NPOS)
        logits = tl.where(valid, s + cope, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        alpha = tl.exp(m_i - m_new)
        probs = tl.exp(logits - m_new[:, None])
        l_i = l_i * alpha + tl.sum(probs, axis=1)
        if DROPOUT:  # the normaliser l_i sums the probabilities before dropout
            probs = probs * _dropout_factors(seed, dropout_p, bh, offs_m, offs_n, T, S)
        acc = acc * alpha[:, None] + _dot(probs, v, IN_DT, DOT_DT, PREC)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(
        O + bh * T * D + offs_m[:, None] * D + offs_d[None, :],
        out.to(O.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )
    tl.store(LSE + bh * T + offs_m, m_i + tl.log(l_i), mask=row_ok)
    tl.store(GSUM + bh * T + offs_m, carry, mask=row_ok)


@triton.jit
def _dropout_factors(seed, dropout_p, bh, offs_m, offs_n, T, S):
    """Attention dropout, 0 or 1 / (1 - p) per (query row, key), drawn from (seed, batch-head, row, key) with
    Philox: the forward and both backward passes regenerate the same mask, whatever their tiles."""
    keep = tl.rand(seed, (bh * T + offs_m)[:, None] * S + offs_n[None, :]) >= dropout_p
    return tl.where(keep, 1.0 / (1.0 - dropout_p), 0.0)


@triton.jit
def _backward_tile(
    q, do, k, v, gk, z, lse, delta, p_left, valid, NPOS, scale, dropout_p, seed, bh, offs_m, offs_n, T, S,
    SEP_KEYS: tl.constexpr, DROPOUT: tl.constexpr, IN_DT: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Recompute one (query tile, key tile) of the forward and its gradients up to the positions.

    p_left: (BLOCK_M,) gate sum from the tile's first key to the diagonal. Returns g, p, floor, w, attention
    probabilities after dropout, dL/dlogits and dL/dp, each (BLOCK_M, BLOCK_N) and zero outside `valid`.
    """
    s = _dot(q, tl.trans(k), IN_DT, DOT_DT, PREC) * scale
    if SEP_KEYS:
        gate_logits = _dot(q, tl.trans(gk), IN_DT, DOT_DT, PREC) * scale
    else:
        gate_logits = s
    g = tl.where(valid, tl.sigmoid(gate_logits), 0.0)
    # p_ij = p_left_i - sum_{tile start <= t < j} g_it; rounding may dip just below 0 near the diagonal.
    p = p_left[:, None] - (tl.cumsum(g, axis=1) - g)
    p = tl.where(valid, tl.maximum(p, 0.0), 0.0)
    cope, pos_floor, _, w, z_step = _positions_and_cope(z, p, NPOS)
    logits = tl.where(valid, s + cope, float("-inf"))
    probs = tl.exp(logits - lse[:, None])
    dprobs = _dot(do, tl.trans(v), IN_DT, DOT_DT, PREC)  # gradient of the probabilities after dropout
    if DROPOUT:
        factors = _dropout_factors(seed, dropout_p, bh, offs_m, offs_n, T, S)
        dprobs = dprobs * factors
        dropped = probs * factors
    else:
        dropped = probs
    ds = probs * (dprobs - delta[:, None])  # dL/dlogits; delta_i = dO_i . O_i, with or without dropout
    # dL/dp = ds (z_ceil - z_floor); clamped positions have pos_floor = pos_ceil = P-1: no gradient, as torch.clamp.
    dpos = tl.where(valid, ds * z_step, 0.0)
    return g, p, pos_floor, w, dropped, ds, dpos


@triton.jit
def _gate_logit_grads(dpos, dpos_before, g, valid):
    """dL/d(gate logit)_it = sigmoid'(.) sum_{j<=t} dL/dp_ij, the sum carried in from the tiles to the left."""
    dgate = tl.cumsum(dpos, axis=1) + dpos_before[:, None]
    return tl.where(valid, dgate * g * (1.0 - g), 0.0)


@triton.jit
def _load_query_tile(Q, DO, Z, LSE, DELTA, GSUM, bh, offs_m, offs_d, offs_p, T, D, NPOS):
    """What the backward needs of a tile of query rows: q, dO, z (fp32, (BLOCK_M, BLOCK_P)), lse, delta, gate sum."""
    row_ok = offs_m < T
    qo_off = bh * T * D + offs_m[:, None] * D + offs_d[None, :]
    qo_mask = row_ok[:, None] & (offs_d < D)[None, :]
    q = tl.load(Q + qo_off, mask=qo_mask, other=0.0)
    do = tl.load(DO + qo_off, mask=qo_mask, other=0.0)
    z = tl.load(
        Z + bh * T * NPOS + offs_m[:, None] * NPOS + offs_p[None, :],
        mask=row_ok[:, None] & (offs_p < NPOS)[None, :],
        other=0.0,
    )
    lse = tl.load(LSE + bh * T + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh * T + offs_m, mask=row_ok, other=0.0)
    gsum = tl.load(GSUM + bh * T + offs_m, mask=row_ok, other=0.0)
    return q, do, z, lse, delta, gsum


@triton.jit
def cope_bwd_query_kernel(
    Q, K, V, GK, Z, DO, LSE, DELTA, GSUM, DQ, DZ, GATE_BEFORE, DPOS_BEFORE, DK, DV, DGK,
    T, S, NPOS, N_KEY_TILES, scale, dropout_p, seed,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
    SEP_KEYS: tl.constexpr, ATOMIC_KEY_GRADS: tl.constexpr, DROPOUT: tl.constexpr,
    IN_DT: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    m0 = tl.program_id(0) * BLOCK_M
    bh, offs_m, offs_d, offs_p, row_ok, rows_abs, d_ok = _query_program(T, S, D, BLOCK_M, BLOCK_D, BLOCK_P)

    q, do, z, lse, delta, gsum = _load_query_tile(Q, DO, Z, LSE, DELTA, GSUM, bh, offs_m, offs_d, offs_p, T, D, NPOS)
    dz_rows = DZ + bh * T * NPOS + offs_m * NPOS  # (BLOCK_M,) pointers to each row's bins
    carry_rows = bh * N_KEY_TILES * T + offs_m  # + tile * T: carries at the left edge of that key tile

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    gate_carry = tl.zeros([BLOCK_M], tl.float32)  # sum of gates left of the tile
    dpos_carry = tl.zeros([BLOCK_M], tl.float32)  # sum of dL/dp left of the tile
    clamped_dz = tl.zeros([BLOCK_M], tl.float32)  # dL/dz[P-1] from clamped positions

    last_abs = tl.minimum(m0 + BLOCK_M, T) - 1 + (S - T)
    n_tiles = last_abs // BLOCK_N + 1
    for it in range(0, n_tiles):
        n0 = it * BLOCK_N  # left to right
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n < S)[:, None] & d_ok[None, :]
        kv_off = bh * S * D + offs_n[:, None] * D + offs_d[None, :]
        k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
        gk = tl.load(GK + kv_off, mask=kv_mask, other=0.0) if SEP_KEYS else k
        valid = (offs_n[None, :] <= rows_abs[:, None]) & (offs_n < S)[None, :] & row_ok[:, None]
        if not ATOMIC_KEY_GRADS:
            tl.store(GATE_BEFORE + carry_rows + it * T, gate_carry, mask=row_ok)
            tl.store(DPOS_BEFORE + carry_rows + it * T, dpos_carry, mask=row_ok)

        g, p, pos_floor, w, probs, ds, dpos = _backward_tile(
            q, do, k, v, gk, z, lse, delta, gsum - gate_carry, valid, NPOS, scale, dropout_p, seed, bh, offs_m, offs_n,
            T, S, SEP_KEYS, DROPOUT, IN_DT, DOT_DT, PREC,
        )  # fmt: skip
        gate_carry += tl.sum(g, axis=1)
        dgate_logits = _gate_logit_grads(dpos, dpos_carry, g, valid)
        dpos_carry += tl.sum(dpos, axis=1)
        if SEP_KEYS:
            dq += (_dot(ds, k, IN_DT, DOT_DT, PREC) + _dot(dgate_logits, gk, IN_DT, DOT_DT, PREC)) * scale
        else:  # gates and scores share the keys: one product
            dq += _dot(ds + dgate_logits, k, IN_DT, DOT_DT, PREC) * scale

        if ATOMIC_KEY_GRADS:
            tl.atomic_add(DV + kv_off, _dot(tl.trans(probs), do, IN_DT, DOT_DT, PREC), mask=kv_mask)
            if SEP_KEYS:
                tl.atomic_add(DK + kv_off, _dot(tl.trans(ds), q, IN_DT, DOT_DT, PREC) * scale, mask=kv_mask)
                dgk_tile = _dot(tl.trans(dgate_logits), q, IN_DT, DOT_DT, PREC) * scale
                tl.atomic_add(DGK + kv_off, dgk_tile, mask=kv_mask)
            else:
                dk_tile = _dot(tl.trans(ds + dgate_logits), q, IN_DT, DOT_DT, PREC) * scale
                tl.atomic_add(DK + kv_off, dk_tile, mask=kv_mask)

        # dz_i[pos_floor] += ds (1 - w), dz_i[pos_ceil] += ds w; clamped entries (both P-1) are summed per row instead.
        inside = valid & (p < NPOS - 1.0)
        clamped_dz += tl.sum(tl.where(valid & (p >= NPOS - 1.0), ds, 0.0), axis=1)
        tl.atomic_add(dz_rows[:, None] + pos_floor.to(tl.int32), ds * (1.0 - w), mask=inside)
        tl.atomic_add(dz_rows[:, None] + pos_floor.to(tl.int32) + 1, ds * w, mask=inside & (w > 0.0))

    dq_off = bh * T * D + offs_m[:, None] * D + offs_d[None, :]
    tl.store(DQ + dq_off, dq, mask=row_ok[:, None] & d_ok[None, :])
    tl.atomic_add(dz_rows + NPOS - 1, clamped_dz, mask=row_ok)


@triton.jit
def cope_bwd_key_kernel(
    Q, K, V, GK, Z, DO, LSE, DELTA, GSUM, GATE_BEFORE, DPOS_BEFORE, DK, DV, DGK,
    T, S, NPOS, N_KEY_TILES, scale, dropout_p, seed,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
    SEP_KEYS: tl.constexpr, DROPOUT: tl.constexpr, IN_DT: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    n0 = tile * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_p = tl.arange(0, BLOCK_P)
    key_ok = offs_n < S
    d_ok = offs_d < D
    kv_off = bh * S * D + offs_n[:, None] * D + offs_d[None, :]
    kv_mask = key_ok[:, None] & d_ok[None, :]
    k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
    gk = tl.load(GK + kv_off, mask=kv_mask, other=0.0) if SEP_KEYS else k

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dgk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # Query tiles from the first that reaches this key tile to the last. Their height need not match the query
    # pass: the carries are stored per row, and rows that do not reach this tile are masked out.
    first_row = tl.maximum(n0 - (S - T), 0)
    for m0 in range((first_row // BLOCK_M) * BLOCK_M, T, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < T
        rows_abs = offs_m + (S - T)
        q, do, z, lse, delta, gsum = _load_query_tile(
            Q, DO, Z, LSE, DELTA, GSUM, bh, offs_m, offs_d, offs_p, T, D, NPOS
        )
        carry_off = bh * N_KEY_TILES * T + tile * T + offs_m
        gate_before = tl.load(GATE_BEFORE + carry_off, mask=row_ok, other=0.0)
        dpos_before = tl.load(DPOS_BEFORE + carry_off, mask=row_ok, other=0.0)
        valid = (offs_n[None, :] <= rows_abs[:, None]) & key_ok[None, :] & row_ok[:, None]

        g, _p, _f, _w, probs, ds, dpos = _backward_tile(
            q, do, k, v, gk, z, lse, delta, gsum - gate_before, valid, NPOS, scale, dropout_p, seed, bh, offs_m,
            offs_n, T, S, SEP_KEYS, DROPOUT, IN_DT, DOT_DT, PREC,
        )  # fmt: skip
        dgate_logits = _gate_logit_grads(dpos, dpos_before, g, valid)
        dv += _dot(tl.trans(probs), do, IN_DT, DOT_DT, PREC)
        if SEP_KEYS:
            dk += _dot(tl.trans(ds), q, IN_DT, DOT_DT, PREC)
            dgk += _dot(tl.trans(dgate_logits), q, IN_DT, DOT_DT, PREC)
        else:
            dk += _dot(tl.trans(ds + dgate_logits), q, IN_DT, DOT_DT, PREC)

    tl.store(DK + kv_off, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kv_mask)
    if SEP_KEYS:
        tl.store(DGK + kv_off, (dgk * scale).to(DGK.dtype.element_ty), mask=kv_mask)
