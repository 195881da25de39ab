// The elementwise part of the chunked CoPE op (cope_chunked.py) for one query block, fused for CPU: from the
// block's logits, gate logits and (z, z_step) pairs, per row in one pass: gates, their running sum (the
// positions), floor and w, the interpolated CoPE term and the softmax; backward recomputes that row and walks the
// softmax's, the interpolation's and the running sum's gradients back in one more pass. The matrix products stay
// with torch's BLAS in cope_chunked.py. Names as in docs/cope-ops.md ("Names and gradients").
//
// float32 uses a polynomial exp that the compiler vectorises (the row loops are exp-bound); float64 uses std::exp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace {

// exp for float32 in [-87, 88] (Cephes' expf: range reduction by ln 2, degree-6 polynomial, ~1 ulp), written
// without calls or branches so that loops over it vectorise: n = round(x / ln 2) by adding and subtracting
// 1.5 * 2^23 rather than std::floor, 2^n from its exponent bits. The clamp's comparisons vectorise only under
// -fno-trapping-math (cope_cpu.py builds with it); without it every exp loop stays scalar.
inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}

inline float exp_of(float x) { return exp_approx(x); }
inline double exp_of(double x) { return std::exp(x); }

template <typename scalar_t>
void sigmoid(const scalar_t* x, scalar_t* y, int64_t begin, int64_t end) {
#pragma omp simd
  for (int64_t c = begin; c < end; ++c) {
    const scalar_t e = exp_of(-x[c]);
    y[c] = scalar_t(1) / (scalar_t(1) + e);
  }
}

// One query block's rows, as the chunked op lays them out: keys in reverse order, so row r of an n-row block
// reads columns c0 = n - 1 - r .. S - 1 (column c0 is the query's own key) and the paper's cumulative sum from
// the right is a running sum over increasing columns. Running sums are serial along a row, so rows are taken
// ROWS at a time and their sums advance together (independent chains, not one add's latency per column);
// everything else is a vectorised loop over one row.
constexpr int64_t ROWS = 8;

template <typename scalar_t>
struct RowGroup {
  int64_t s_len, npos, m = 0, c0[ROWS] = {};
  std::vector<scalar_t> gate, w;  // (ROWS, S): 0 before each row's c0
  std::vector<int32_t> pos_floor;
  RowGroup(int64_t s_len_, int64_t npos_)
      : s_len(s_len_), npos(npos_), gate(ROWS * s_len_), w(ROWS * s_len_), pos_floor(ROWS * s_len_) {}
  scalar_t* g(int64_t k) { return gate.data() + k * s_len; }
  scalar_t* wk(int64_t k) { return w.data() + k * s_len; }
  int32_t* fk(int64_t k) { return pos_floor.data() + k * s_len; }
  int64_t first() const { return *std::min_element(c0, c0 + m); }

  // Rows r0 .. r0 + m - 1 (n rows per block): scores (logit + z[f] + w z_step[f]) into out + k * S, from their
  // logits, gate logits and (z, z_step) pairs zz (2P per row).
  void scores(int64_t r0, int64_t m_, int64_t n, const scalar_t* logits, const scalar_t* gate_logits,
              const scalar_t* zz, scalar_t* out) {
    m = m_;
    for (int64_t k = 0; k < m; ++k) {
      c0[k] = n - 1 - (r0 + k) % n;
      std::fill(g(k), g(k) + c0[k], scalar_t(0));
      sigmoid(gate_logits + k * s_len, g(k), c0[k], s_len);
    }
    // The running sums in double, as torch's CPU cumsum accumulates float32 (positions reach P - 1 after
    // hundreds of gates; float32 sums would move w by ~1e-5 there).
    const double top = double(npos - 1);
    double running[ROWS] = {};
    for (int64_t c = first(); c < s_len; ++c) {
      for (int64_t k = 0; k < m; ++k) {
        running[k] += gate[k * s_len + c];
        w[k * s_len + c] = scalar_t(std::min(running[k], top));  // the position; w below
      }
    }
    for (int64_t k = 0; k < m; ++k) {
      scalar_t *pos = wk(k), *score = out + k * s_len;
      int32_t* fl = fk(k);
      const scalar_t *lk = logits + k * s_len, *zk = zz + k * 2 * npos;
      std::fill(fl, fl + c0[k], 0);
#pragma omp simd
      for (int64_t c = c0[k]; c < s_len; ++c) {
        const int32_t f = static_cast<int32_t>(pos[c]);
        fl[c] = f;
        pos[c] -= scalar_t(f);
        score[c] = lk[c] + zk[2 * f] + pos[c] * zk[2 * f + 1];
      }
    }
  }
};

// Softmax of score[c0..S-1] in place into probs (0 before c0).
template <typename scalar_t>
void softmax_row(scalar_t* score, int64_t c0, int64_t s_len) {
  scalar_t m = score[c0];
#pragma omp simd reduction(max : m)
  for (int64_t c = c0 + 1; c < s_len; ++c) m = std::max(m, score[c]);
  scalar_t total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t c = c0; c < s_len; ++c) {
    score[c] = exp_of(score[c] - m);
    total += score[c];
  }
  const scalar_t inv = scalar_t(1) / total;
#pragma omp simd
  for (int64_t c = c0; c < s_len; ++c) score[c] *= inv;
  for (int64_t c = 0; c < c0; ++c) score[c] = 0;
}

void check_block(const at::Tensor& logits, const at::Tensor& gate_logits, const at::Tensor& zz) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 3 && logits.is_contiguous(),
              "cope_cpu: logits (G, n, S), contiguous, on CPU");
  TORCH_CHECK(gate_logits.numel() == 0 || (gate_logits.sizes() == logits.sizes() && gate_logits.is_contiguous()),
              "cope_cpu: gate logits shaped as the logits");
  TORCH_CHECK(zz.dim() == 3 && zz.size(0) == logits.size(0) && zz.size(1) == logits.size(1) && zz.size(2) % 2 == 0 &&
                  zz.is_contiguous(),
              "cope_cpu: (z, z_step) pairs (G, n, 2P)");
  TORCH_CHECK(logits.size(2) >= logits.size(1), "cope_cpu: a block reads at least its own rows' keys");
  TORCH_CHECK(zz.scalar_type() == logits.scalar_type() &&
                  (gate_logits.numel() == 0 || gate_logits.scalar_type() == logits.scalar_type()),
              "cope_cpu: one dtype for all inputs");
}

template <typename scalar_t>
void forward_rows(const at::Tensor& logits, const at::Tensor& gate_logits, const at::Tensor& zz, at::Tensor& probs) {
  const int64_t n = logits.size(1), s_len = logits.size(2), npos = zz.size(2) / 2;
  const scalar_t *lp = logits.data_ptr<scalar_t>(), *zp = zz.data_ptr<scalar_t>();
  const scalar_t* gp = gate_logits.numel() ? gate_logits.data_ptr<scalar_t>() : lp;
  scalar_t* pp = probs.data_ptr<scalar_t>();
  const int64_t rows = logits.size(0) * n, groups = (rows + ROWS - 1) / ROWS;
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    RowGroup<scalar_t> group(s_len, npos);
    for (int64_t gi = begin; gi < end; ++gi) {
      const int64_t r0 = gi * ROWS, m = std::min(ROWS, rows - r0), off = r0 * s_len;
      group.scores(r0, m, n, lp + off, gp + off, zp + r0 * 2 * npos, pp + off);
      for (int64_t k = 0; k < m; ++k) softmax_row(pp + off + k * s_len, group.c0[k], s_len);
    }
  });
}

// The block's probabilities (G, n, S): softmax over its keys of logit + the interpolated CoPE term.
at::Tensor block_probs(const at::Tensor& logits, const at::Tensor& gate_logits, const at::Tensor& zz) {
  check_block(logits, gate_logits, zz);
  auto probs = at::empty_like(logits);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "cope_block_probs",
                             [&] { forward_rows<scalar_t>(logits, gate_logits, zz, probs); });
  return probs;
}

template <typename scalar_t>
void backward_rows(const at::Tensor& logits, const at::Tensor& gate_logits, const at::Tensor& zz,
                   const at::Tensor& dprobs, at::Tensor& probs, at::Tensor& dscores, at::Tensor& dgate, at::Tensor& dzz) {
  const int64_t n = logits.size(1), s_len = logits.size(2), npos = zz.size(2) / 2;
  const bool sep = gate_logits.numel() != 0;
  const scalar_t *lp = logits.data_ptr<scalar_t>(), *zp = zz.data_ptr<scalar_t>(), *dpp = dprobs.data_ptr<scalar_t>();
  const scalar_t* gp = sep ? gate_logits.data_ptr<scalar_t>() : lp;
  scalar_t *pp = probs.data_ptr<scalar_t>(), *dsp = dscores.data_ptr<scalar_t>(), *dzp = dzz.data_ptr<scalar_t>();
  scalar_t* dgp = sep ? dgate.data_ptr<scalar_t>() : dsp;
  const scalar_t keep = sep ? scalar_t(0) : scalar_t(1);  // plain: the gates' gradient joins the logits'
  const int64_t rows = logits.size(0) * n, groups = (rows + ROWS - 1) / ROWS;
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    RowGroup<scalar_t> group(s_len, npos);
    std::vector<scalar_t> dpos_buf(ROWS * s_len);
    for (int64_t gi = begin; gi < end; ++gi) {
      const int64_t r0 = gi * ROWS, m = std::min(ROWS, rows - r0), off = r0 * s_len;
      group.scores(r0, m, n, lp + off, gp + off, zp + r0 * 2 * npos, pp + off);
      for (int64_t k = 0; k < m; ++k) {
        const int64_t c0 = group.c0[k], o = off + k * s_len;
        scalar_t *prob = pp + o, *ds = dsp + o, *dpos = dpos_buf.data() + k * s_len;
        const scalar_t *dprob = dpp + o, *zk = zp + (r0 + k) * 2 * npos;
        const int32_t* fl = group.fk(k);
        softmax_row(prob, c0, s_len);
        scalar_t delta = 0;
#pragma omp simd reduction(+ : delta)
        for (int64_t c = c0; c < s_len; ++c) delta += prob[c] * dprob[c];
        std::fill(ds, ds + c0, scalar_t(0));
        std::fill(dpos, dpos + c0, scalar_t(0));
#pragma omp simd
        for (int64_t c = c0; c < s_len; ++c) {
          ds[c] = prob[c] * (dprob[c] - delta);
          dpos[c] = ds[c] * zk[2 * fl[c] + 1];  // through w to the position; z_step is 0 where clamped
        }
        std::fill(dzp + (r0 + k) * 2 * npos, dzp + (r0 + k + 1) * 2 * npos, scalar_t(0));
      }
      // To the (z, z_step) pair at floor(p) (each row its own pairs, so the rows' adds are independent), and a
      // gate's gradient: the sum of its row's positions' gradients from its column onwards.
      const int64_t first = group.first();
      for (int64_t c = first; c < s_len; ++c) {
        for (int64_t k = 0; k < m; ++k) {
          const int64_t i = k * s_len + c;
          const scalar_t d = dsp[off + i];  // 0 before the row's c0 (where pos_floor is 0)
          scalar_t* dz = dzp + (r0 + k) * 2 * npos + 2 * group.pos_floor[i];
          dz[0] += d;
          dz[1] += group.w[i] * d;
        }
      }
      double running[ROWS] = {};
      for (int64_t c = s_len - 1; c >= first; --c) {
        for (int64_t k = 0; k < m; ++k) {
          running[k] += dpos_buf[k * s_len + c];
          dpos_buf[k * s_len + c] = scalar_t(running[k]);
        }
      }
      for (int64_t k = 0; k < m; ++k) {
        const int64_t c0 = group.c0[k], o = off + k * s_len;
        const scalar_t *ds = dsp + o, *dpos = dpos_buf.data() + k * s_len, *g = group.g(k);
        scalar_t* dg = dgp + o;
#pragma omp simd
        for (int64_t c = c0; c < s_len; ++c) dg[c] = keep * ds[c] + dpos[c] * g[c] * (scalar_t(1) - g[c]);
        if (sep) std::fill(dg, dg + c0, scalar_t(0));
      }
    }
  });
}

// Recomputes a block's probabilities and returns them with the gradients of its scores, gate logits (without
// gate keys: one tensor, the logits' full gradient) and (z, z_step) pairs, given the probabilities' gradient.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> block_grads(const at::Tensor& logits,
                                                                        const at::Tensor& gate_logits,
                                                                        const at::Tensor& zz, const at::Tensor& dprobs) {
  check_block(logits, gate_logits, zz);
  TORCH_CHECK(dprobs.sizes() == logits.sizes() && dprobs.is_contiguous() &&
                  dprobs.scalar_type() == logits.scalar_type(),
              "cope_cpu: dprobs shaped as the logits");
  auto probs = at::empty_like(logits), dscores = at::empty_like(logits), dzz = at::empty_like(zz);
  auto dgate = gate_logits.numel() ? at::empty_like(logits) : at::empty({0}, logits.options());
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "cope_block_grads", [&] {
    backward_rows<scalar_t>(logits, gate_logits, zz, dprobs, probs, dscores, dgate, dzz);
  });
  return {probs, dscores, dgate, dzz};
}

// The whole call, block loop included (without dropout): heads split into tasks of `heads_per_task`, the tasks
// over the threads, and each task's blocks one after another, so a task's products run on one thread (BLAS in a
// parallel region) with its block tensors in that core's cache, and no Python runs between the blocks.
// q (BH, T, D); k, v, gate_k (BH, S, D) keys in reverse order (gate_k empty: gates from the logits); table (D, 2P).
struct Call {
  at::Tensor q, k, v, gk, table;
  int64_t bh, t, s, d, block, per_task;
  double scale;
  std::vector<at::Tensor> masks;  // (n, S) additive mask by block height n: -inf on a row's later keys

  Call(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& gk_, const at::Tensor& table_,
       int64_t block_, int64_t per_task_, double scale_)
      : q(q_), k(k_), v(v_), gk(gk_), table(table_), bh(q_.size(0)), t(q_.size(1)), s(k_.size(1)), d(q_.size(2)),
        block(block_), per_task(per_task_), scale(scale_), masks(block_ + 1) {
    TORCH_CHECK(q.device().is_cpu() && q.dim() == 3 && q.is_contiguous() && k.is_contiguous() && v.is_contiguous() &&
                    k.sizes() == v.sizes() && k.size(0) == bh && k.size(2) == d && s >= t,
                "cope_cpu: q (BH, T, D), k and v (BH, S, D) with S >= T, contiguous, on CPU");
    TORCH_CHECK(gk.numel() == 0 || (gk.sizes() == k.sizes() && gk.is_contiguous()), "cope_cpu: gate keys shaped as k");
    TORCH_CHECK(table.dim() == 2 && table.size(0) == d && block >= 1 && per_task >= 1,
                "cope_cpu: table (D, 2P), block and heads per task >= 1");
    for (int64_t i0 = 0; i0 < t; i0 += block) {
      const int64_t n = std::min(block, t - i0);
      if (masks[n].defined()) continue;
      auto col = at::arange(s, q.options().dtype(at::kLong));
      auto row = at::arange(n, q.options().dtype(at::kLong)).unsqueeze(1);
      masks[n] = at::zeros({n, s}, q.options()).masked_fill_(col.lt(row.neg().add(n - 1)), -INFINITY);
    }
  }
  int64_t tasks() const { return (bh + per_task - 1) / per_task; }

  // Block (i0, n) of heads h0..h1: its queries, keys read (the last `end` of the reversed keys), mask, logits.
  struct Block {
    at::Tensor qb, kb, vb, gkb, logits, gate_logits, zz;
    int64_t end;
  };
  Block open(int64_t h0, int64_t h1, int64_t i0, int64_t n) const {
    Block b;
    b.end = s - t + i0 + n;
    b.qb = q.slice(0, h0, h1).slice(1, i0, i0 + n);
    b.kb = k.slice(0, h0, h1).slice(1, s - b.end, s);
    b.vb = v.slice(0, h0, h1).slice(1, s - b.end, s);
    auto mask = masks[n].slice(1, 0, b.end);
    b.logits = at::baddbmm(mask, b.qb, b.kb.transpose(1, 2), 1.0, scale);
    if (gk.numel()) {
      b.gkb = gk.slice(0, h0, h1).slice(1, s - b.end, s);
      b.gate_logits = at::baddbmm(mask, b.qb, b.gkb.transpose(1, 2), 1.0, scale);
    } else {
      b.gate_logits = at::empty({0}, q.options());
    }
    b.zz = at::matmul(b.qb, table);
    return b;
  }
};

at::Tensor attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& gk,
                             const at::Tensor& table, int64_t block, int64_t per_task, double scale) {
  const Call call(q, k, v, gk, table, block, per_task, scale);
  auto out = at::empty_like(q);
  at::parallel_for(0, call.tasks(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h0 = task * per_task, h1 = std::min(h0 + per_task, call.bh);
      for (int64_t i0 = 0; i0 < call.t; i0 += block) {
        const int64_t n = std::min(block, call.t - i0);
        auto b = call.open(h0, h1, i0, n);
        auto probs = block_probs(b.logits, b.gate_logits, b.zz);
        out.slice(0, h0, h1).slice(1, i0, i0 + n).copy_(at::bmm(probs, b.vb));
      }
    }
  });
  return out;
}

// Gradients of the whole call: dq, dk, dv, d gate_k (keys in reverse order, without the logits' scale: the caller
// applies it) and the table's (D, 2P) (per-task partial sums, added at the end).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& gk, const at::Tensor& table,
    const at::Tensor& dout, int64_t block, int64_t per_task, double scale) {
  const Call call(q, k, v, gk, table, block, per_task, scale);
  TORCH_CHECK(dout.sizes() == q.sizes() && dout.is_contiguous(), "cope_cpu: dout shaped as q, contiguous");
  auto dq = at::empty_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  auto dgk = gk.numel() ? at::zeros_like(gk) : at::empty({0}, q.options());
  auto dtables = at::zeros({call.tasks(), table.size(0), table.size(1)}, table.options());
  const auto table_t = table.transpose(0, 1);
  at::parallel_for(0, call.tasks(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h0 = task * per_task, h1 = std::min(h0 + per_task, call.bh);
      auto dtable = dtables[task];
      for (int64_t i0 = 0; i0 < call.t; i0 += block) {
        const int64_t n = std::min(block, call.t - i0);
        auto b = call.open(h0, h1, i0, n);
        auto doutb = dout.slice(0, h0, h1).slice(1, i0, i0 + n);
        auto dprobs = at::bmm(doutb, b.vb.transpose(1, 2));
        auto [probs, dscores, dgate, dzz] = block_grads(b.logits, b.gate_logits, b.zz, dprobs);
        const auto keys = [&](const at::Tensor& x) { return x.slice(0, h0, h1).slice(1, call.s - b.end, call.s); };
        keys(dv).add_(at::bmm(probs.transpose(1, 2), doutb));
        auto dqb = at::matmul(dzz, table_t);
        dtable.addmm_(b.qb.reshape({-1, call.d}).transpose(0, 1), dzz.reshape({-1, dzz.size(-1)}));
        // Plain CoPE: dscores is the logits' whole gradient, the softmax's and the gates'.
        dqb.baddbmm_(dscores, b.kb, 1.0, scale);
        keys(dk).add_(at::bmm(dscores.transpose(1, 2), b.qb));
        if (gk.numel()) {
          dqb.baddbmm_(dgate, b.gkb, 1.0, scale);
          keys(dgk).add_(at::bmm(dgate.transpose(1, 2), b.qb));
        }
        dq.slice(0, h0, h1).slice(1, i0, i0 + n).copy_(dqb);
      }
    }
  });
  return {dq, dk, dv, dgk, dtables.sum(0)};
}

}  // namespace

TORCH_LIBRARY(cope_pl_cpu, m) {
  m.def("block_probs", &block_probs);
  m.def("block_grads", &block_grads);
  m.def("attention_forward", &attention_forward);
  m.def("attention_backward", &attention_backward);
}
