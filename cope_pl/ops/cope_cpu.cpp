// The chunked CoPE op (cope_chunked.py) for CPU: per query block, from its logits, gate logits and (z, z_step)
// pairs, in one pass each way: gates, their running sum (the positions), floor and w, the interpolated CoPE term
// and the softmax; backward recomputes them and walks the softmax's, the interpolation's and the running sum's
// gradients back. The matrix products stay with torch's BLAS. `attention_forward` / `attention_backward` run the
// whole call (the block loop too) with threads splitting heads. Names as in docs/cope-ops.md ("Names and
// gradients"; the layout and the loops: "The C++ blocks").
//
// float32 uses a polynomial exp that the compiler vectorises (the loops are exp-bound); float64 uses std::exp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
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

// One head's query block, laid out keys-major: (S, n), element (c, r) for key column c and query row r, keys in
// reverse order, so row r reads columns c0 = n - 1 - r .. S - 1 (column c0 is the query's own key) and the
// paper's cumulative sum from the right is a running sum over increasing columns. With the n rows of a column
// side by side every step is one vectorised loop over the rows: the running sums of all rows advance together
// (no serial chain per row), and each row's softmax max and sum are per-lane reductions. The matrix products read
// and write this layout as a transpose, at no cost. Masked entries (c < c0) are never read: their gates and
// probabilities are 0.
//
// The whole call's forward keeps per row only the softmax's max and 1 / sum (`top`, `inv`, as flash attention
// keeps its log-sum-exp); its backward recomputes a column's scores from them with the forward's own arithmetic
// (so its probabilities are the forward's, bit for bit) and forms the softmax's and the interpolation's
// gradients in the same pass, given each row's delta = sum over keys of p dp; a second pass, over the columns
// backwards, is the running sum's gradient. The block functions of the dropout path (`block_grads`) keep the
// forward's gates, w, floor(p) and z_step for the block instead (`forward(keep)`), and skip the recompute.
template <typename scalar_t>
struct Block {
  int64_t n, s_len, npos;
  std::vector<scalar_t> gate, dpos, w, z_step;  // (S, n): gates, the positions' gradients; kept w and z_step
  std::vector<int32_t> pos_floor;              // (S, n): kept floor(p)
  std::vector<double> running;                 // (n) the rows' running sums
  std::vector<scalar_t> g_col, w_col, z_col, total;  // (n) one column's gates, w and z_step; softmax sums
  std::vector<int32_t> f_col;                  // (n) one column's floor(p)
  // Scratch for blocks of up to n_ rows and s_len_ keys, allocated once per thread and reused block after block.
  Block(int64_t n_, int64_t s_len_, int64_t npos_, bool keep = false)
      : n(n_), s_len(s_len_), npos(npos_), gate(n_ * s_len_), dpos(n_ * s_len_), w(keep ? n_ * s_len_ : 0),
        z_step(keep ? n_ * s_len_ : 0), pos_floor(keep ? n_ * s_len_ : 0), running(n_), g_col(n_), w_col(n_),
        z_col(n_), total(n_), f_col(n_) {}
  void shape(int64_t n_, int64_t s_len_) {
    TORCH_CHECK(n_ * s_len_ <= int64_t(gate.size()) && n_ <= int64_t(running.size()), "cope_cpu: block scratch too small");
    n = n_, s_len = s_len_;
  }
  int64_t first(int64_t c) const { return std::max<int64_t>(0, n - 1 - c); }  // the column's first unmasked row

  // Column c's scores (logit + interpolated CoPE term) into sc, rows r0 .. n - 1, from its logits lc and gate
  // logits gc and the rows' (z, z_step) pairs zz (n, 2P): gates into g, the running sums advanced, w, floor(p)
  // and z_step into wc, fc, zs.
  void column_scores(int64_t r0, const scalar_t* lc, const scalar_t* gc, const scalar_t* zz, scalar_t* g,
                     scalar_t* sc, scalar_t* wc, int32_t* fc, scalar_t* zs) {
    // The running sums in double, as torch's CPU cumsum accumulates float32 (positions reach P - 1 after
    // hundreds of gates; float32 sums would move w by ~1e-5 there).
    const double clamp = double(npos - 1);
    const int64_t pairs = 2 * npos;
    double* run = running.data();
#pragma omp simd
    for (int64_t r = r0; r < n; ++r) g[r] = scalar_t(1) / (scalar_t(1) + exp_of(-gc[r]));
#pragma omp simd
    for (int64_t r = r0; r < n; ++r) {
      run[r] += double(g[r]);
      wc[r] = scalar_t(run[r] < clamp ? run[r] : clamp);  // the position, then w below
    }
#pragma omp simd
    for (int64_t r = r0; r < n; ++r) {
      const int32_t f = static_cast<int32_t>(wc[r]);  // p >= 0: truncation is floor
      fc[r] = f;
      wc[r] -= scalar_t(f);
      zs[r] = zz[r * pairs + 2 * f + 1];
      sc[r] = lc[r] + zz[r * pairs + 2 * f] + wc[r] * zs[r];
    }
  }

  // The softmax's numerators exp(score - max) (S, n) into out, and per row the max into top and 1 / sum into
  // inv; normalising (out * inv) is the caller's: the whole call scales the rows of probs @ v instead. keep:
  // the gates, w, floor(p) and z_step stay in the block's arrays for `grads`.
  void forward(const scalar_t* logits, const scalar_t* gate_logits, const scalar_t* zz, scalar_t* out,
               scalar_t* top, scalar_t* inv, bool keep = false) {
    std::fill(running.begin(), running.end(), 0.0);
    std::fill(top, top + n, -std::numeric_limits<scalar_t>::infinity());
    for (int64_t c = 0; c < s_len; ++c) {
      const int64_t o = c * n, r0 = first(c);
      // keep: into the block's arrays at the column, else into the one column's scratch
      scalar_t *sc = out + o, *g = keep ? gate.data() + o : g_col.data();
      for (int64_t r = 0; r < r0; ++r) sc[r] = g[r] = 0;
      column_scores(r0, logits + o, gate_logits + o, zz, g, sc, keep ? w.data() + o : w_col.data(),
                    keep ? pos_floor.data() + o : f_col.data(), keep ? z_step.data() + o : z_col.data());
#pragma omp simd
      for (int64_t r = r0; r < n; ++r) top[r] = std::max(top[r], sc[r]);
    }
    scalar_t* sum = total.data();
    std::fill(sum, sum + n, scalar_t(0));
    for (int64_t c = 0; c < s_len; ++c) {
      scalar_t* sc = out + c * n;
#pragma omp simd
      for (int64_t r = first(c); r < n; ++r) {
        sc[r] = exp_of(sc[r] - top[r]);
        sum[r] += sc[r];
      }
    }
    for (int64_t r = 0; r < n; ++r) inv[r] = scalar_t(1) / sum[r];
  }

  void normalize(scalar_t* out, const scalar_t* inv) const {
    for (int64_t c = 0; c < s_len; ++c) {
      scalar_t* sc = out + c * n;
#pragma omp simd
      for (int64_t r = first(c); r < n; ++r) sc[r] *= inv[r];
    }
  }

  // Column c's gradients, rows r0 .. n - 1, from its probabilities pc and their gradient dc: the scores' into
  // ds (through the softmax), the position's into dp (through w; z_step is 0 where clamped) and the (z, z_step)
  // pair's at floor(p), added into dzz (n, 2P).
  void column_grads(int64_t r0, const scalar_t* pc, const scalar_t* dc, const scalar_t* delta, const scalar_t* wc,
                    const int32_t* fc, const scalar_t* zs, scalar_t* ds, scalar_t* dp, scalar_t* dzz) const {
    const int64_t pairs = 2 * npos;
#pragma omp simd
    for (int64_t r = r0; r < n; ++r) {
      ds[r] = pc[r] * (dc[r] - delta[r]);
      dp[r] = ds[r] * zs[r];
    }
#pragma omp simd
    for (int64_t r = r0; r < n; ++r) {  // each row its own pairs: the rows' adds are independent
      scalar_t* dz = dzz + r * pairs + 2 * fc[r];
      dz[0] += ds[r];
      dz[1] += wc[r] * ds[r];
    }
  }

  // A gate's gradient: the sum of its row's positions' gradients from its column onwards (in double, as the
  // forward's sums), times the sigmoid's slope, into dgate; plain CoPE (dgate == dscores) adds it to the
  // scores' gradient.
  void gate_grads(const scalar_t* dscores, scalar_t* dgate) {
    const scalar_t keep = dgate != dscores ? scalar_t(0) : scalar_t(1);
    std::fill(running.begin(), running.end(), 0.0);
    double* run = running.data();
    for (int64_t c = s_len - 1; c >= 0; --c) {
      const int64_t o = c * n;
      const scalar_t *ds = dscores + o, *dp = dpos.data() + o, *g = gate.data() + o;
      scalar_t* dg = dgate + o;
#pragma omp simd
      for (int64_t r = 0; r < n; ++r) {
        run[r] += double(dp[r]);
        dg[r] = keep * ds[r] + scalar_t(run[r]) * g[r] * (scalar_t(1) - g[r]);  // masked: g = 0, ds = 0
      }
    }
  }

  // Backward with the probabilities recomputed, from the rows' top, inv and delta and the probabilities'
  // gradient dprobs (S, n): the probabilities (into probs), the scores' gradient (for plain CoPE the logits'
  // whole gradient, the softmax's and the gates'), the gate logits' (sep-keys: into dgate) and the (z, z_step)
  // pairs' (n, 2P).
  void backward(const scalar_t* logits, const scalar_t* gate_logits, const scalar_t* zz, const scalar_t* top,
                const scalar_t* inv, const scalar_t* delta, const scalar_t* dprobs, scalar_t* probs,
                scalar_t* dscores, scalar_t* dgate, scalar_t* dzz) {
    std::fill(running.begin(), running.end(), 0.0);
    std::fill(dzz, dzz + n * 2 * npos, scalar_t(0));
    for (int64_t c = 0; c < s_len; ++c) {
      const int64_t o = c * n, r0 = first(c);
      scalar_t *g = gate.data() + o, *pc = probs + o, *ds = dscores + o, *dp = dpos.data() + o;
      for (int64_t r = 0; r < r0; ++r) g[r] = pc[r] = ds[r] = dp[r] = 0;
      column_scores(r0, logits + o, gate_logits + o, zz, g, pc, w_col.data(), f_col.data(), z_col.data());
#pragma omp simd
      for (int64_t r = r0; r < n; ++r) pc[r] = exp_of(pc[r] - top[r]) * inv[r];
      column_grads(r0, pc, dprobs + o, delta, w_col.data(), f_col.data(), z_col.data(), ds, dp, dzz);
    }
    gate_grads(dscores, dgate);
  }

  // Backward right after `forward(keep)` on the same block, from its normalised probabilities: delta from them,
  // then the gradients of `backward` without recomputing anything.
  void grads(const scalar_t* probs, const scalar_t* dprobs, scalar_t* delta, scalar_t* dscores, scalar_t* dgate,
             scalar_t* dzz) {
    std::fill(delta, delta + n, scalar_t(0));
    for (int64_t c = 0; c < s_len; ++c) {
      const scalar_t *pc = probs + c * n, *dc = dprobs + c * n;
#pragma omp simd
      for (int64_t r = 0; r < n; ++r) delta[r] += pc[r] * dc[r];  // masked probabilities are 0
    }
    std::fill(dzz, dzz + n * 2 * npos, scalar_t(0));
    for (int64_t c = 0; c < s_len; ++c) {
      const int64_t o = c * n, r0 = first(c);
      scalar_t *ds = dscores + o, *dp = dpos.data() + o;
      for (int64_t r = 0; r < r0; ++r) ds[r] = dp[r] = 0;
      column_grads(r0, probs + o, dprobs + o, delta, w.data() + o, pos_floor.data() + o, z_step.data() + o, ds, dp,
                   dzz);
    }
    gate_grads(dscores, dgate);
  }
};

void check_block(const at::Tensor& logits, const at::Tensor& gate_logits, const at::Tensor& zz) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 3 && logits.is_contiguous(),
              "cope_cpu: logits (G, S, n), keys-major, contiguous, on CPU");
  TORCH_CHECK(gate_logits.numel() == 0 || (gate_logits.sizes() == logits.sizes() && gate_logits.is_contiguous()),
              "cope_cpu: gate logits shaped as the logits");
  TORCH_CHECK(zz.dim() == 3 && zz.size(0) == logits.size(0) && zz.size(1) == logits.size(2) && zz.size(2) % 2 == 0 &&
                  zz.is_contiguous(),
              "cope_cpu: (z, z_step) pairs (G, n, 2P)");
  TORCH_CHECK(logits.size(1) >= logits.size(2), "cope_cpu: a block reads at least its own rows' keys");
  TORCH_CHECK(zz.scalar_type() == logits.scalar_type() &&
                  (gate_logits.numel() == 0 || gate_logits.scalar_type() == logits.scalar_type()),
              "cope_cpu: one dtype for all inputs");
}

// One block's tensors, heads first: logits, gate logits (empty: plain CoPE), (z, z_step) pairs (G, n, 2P) and
// the probabilities (forward: their numerators); the rows' softmax max and 1 / sum (G, n; a row of the whole
// call's (BH, T) tensors, so heads may stride); backward also each row's delta, the probabilities' gradient and
// the scores', gate logits' and pairs' gradients.
struct BlockTensors {
  at::Tensor logits, gate_logits, zz, probs, top, inv;
  at::Tensor delta, dprobs, dscores, dgate, dzz;

  // Heads h0 .. h1 - 1 forward, with `work` as scratch (normalize: probabilities, else numerators).
  template <typename scalar_t>
  void forward(Block<scalar_t>& work, int64_t h0, int64_t h1, bool normalize) const {
    const int64_t size = logits.size(1) * logits.size(2), pairs = zz.size(2);
    work.shape(logits.size(2), logits.size(1));
    const scalar_t *lp = logits.data_ptr<scalar_t>(), *zp = zz.data_ptr<scalar_t>();
    const scalar_t* gp = gate_logits.numel() ? gate_logits.data_ptr<scalar_t>() : lp;
    for (int64_t h = h0; h < h1; ++h) {
      const int64_t o = h * size;
      scalar_t *pp = probs.data_ptr<scalar_t>() + o, *ip = inv.data_ptr<scalar_t>() + h * inv.stride(0);
      work.forward(lp + o, gp + o, zp + h * work.n * pairs, pp, top.data_ptr<scalar_t>() + h * top.stride(0), ip);
      if (normalize) work.normalize(pp, ip);
    }
  }
  // Heads h0 .. h1 - 1 backward (top, inv and delta given): recomputes the probabilities, then the gradients.
  template <typename scalar_t>
  void backward(Block<scalar_t>& work, int64_t h0, int64_t h1) const {
    const int64_t size = logits.size(1) * logits.size(2), pairs = zz.size(2);
    work.shape(logits.size(2), logits.size(1));
    const bool sep = gate_logits.numel() != 0;
    const scalar_t *lp = logits.data_ptr<scalar_t>(), *zp = zz.data_ptr<scalar_t>();
    const scalar_t* gp = sep ? gate_logits.data_ptr<scalar_t>() : lp;
    scalar_t* dsp = dscores.data_ptr<scalar_t>();
    scalar_t* dgp = sep ? dgate.data_ptr<scalar_t>() : dsp;
    for (int64_t h = h0; h < h1; ++h) {
      const int64_t o = h * size, oz = h * work.n * pairs;
      work.backward(lp + o, gp + o, zp + oz, top.data_ptr<scalar_t>() + h * top.stride(0),
                    inv.data_ptr<scalar_t>() + h * inv.stride(0), delta.data_ptr<scalar_t>() + h * delta.stride(0),
                    dprobs.data_ptr<scalar_t>() + o, probs.data_ptr<scalar_t>() + o, dsp + o, dgp + o,
                    dzz.data_ptr<scalar_t>() + oz);
    }
  }
};

// The block's probabilities (G, S, n): softmax over its keys of logit + the interpolated CoPE term, per head.
at::Tensor block_probs(const at::Tensor& logits, const at::Tensor& gate_logits, const at::Tensor& zz) {
  check_block(logits, gate_logits, zz);
  const auto rows = logits.new_empty({logits.size(0), logits.size(2)});
  BlockTensors b{logits, gate_logits, zz, at::empty_like(logits), rows, at::empty_like(rows)};
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "cope_block_probs", [&] {
    at::parallel_for(0, logits.size(0), 1, [&](int64_t begin, int64_t end) {
      Block<scalar_t> work(logits.size(2), logits.size(1), zz.size(2) / 2);
      b.forward(work, begin, end, true);
    });
  });
  return b.probs;
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
  const bool sep = gate_logits.numel() != 0;
  auto probs = at::empty_like(logits), dscores = at::empty_like(logits), dzz = at::empty_like(zz);
  auto dgate = sep ? at::empty_like(logits) : at::empty({0}, logits.options());
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "cope_block_grads", [&] {
    at::parallel_for(0, logits.size(0), 1, [&](int64_t begin, int64_t end) {
      const int64_t n = logits.size(2), size = logits.size(1) * n, pairs = zz.size(2);
      Block<scalar_t> work(n, logits.size(1), pairs / 2, true);
      std::vector<scalar_t> top(n), inv(n), delta(n);
      const scalar_t* lp = logits.data_ptr<scalar_t>();
      const scalar_t* gp = sep ? gate_logits.data_ptr<scalar_t>() : lp;
      scalar_t *pp = probs.data_ptr<scalar_t>(), *dsp = dscores.data_ptr<scalar_t>();
      scalar_t* dgp = sep ? dgate.data_ptr<scalar_t>() : dsp;
      for (int64_t h = begin; h < end; ++h) {  // each head's forward keeps what its gradients read
        const int64_t o = h * size, oz = h * n * pairs;
        work.forward(lp + o, gp + o, zz.data_ptr<scalar_t>() + oz, pp + o, top.data(), inv.data(), true);
        work.normalize(pp + o, inv.data());
        work.grads(pp + o, dprobs.data_ptr<scalar_t>() + o, delta.data(), dsp + o, dgp + o,
                   dzz.data_ptr<scalar_t>() + oz);
      }
    });
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
  at::Tensor zero;  // the logits' products start from nothing (beta 0): masked entries are never read

  Call(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& gk_, const at::Tensor& table_,
       int64_t block_, int64_t per_task_, double scale_)
      : q(q_), k(k_), v(v_), gk(gk_), table(table_), bh(q_.size(0)), t(q_.size(1)), s(k_.size(1)), d(q_.size(2)),
        block(block_), per_task(per_task_), scale(scale_), zero(at::zeros({}, q_.options())) {
    TORCH_CHECK(q.device().is_cpu() && q.dim() == 3 && q.is_contiguous() && k.is_contiguous() && v.is_contiguous() &&
                    k.sizes() == v.sizes() && k.size(0) == bh && k.size(2) == d && s >= t,
                "cope_cpu: q (BH, T, D), k and v (BH, S, D) with S >= T, contiguous, on CPU");
    TORCH_CHECK(gk.numel() == 0 || (gk.sizes() == k.sizes() && gk.is_contiguous()), "cope_cpu: gate keys shaped as k");
    TORCH_CHECK(table.dim() == 2 && table.size(0) == d && block >= 1 && per_task >= 1,
                "cope_cpu: table (D, 2P), block and heads per task >= 1");
  }
  int64_t tasks() const { return (bh + per_task - 1) / per_task; }

  // Per-thread buffers, sized for a task's largest block (per_task heads, `block` rows, S keys): every block
  // takes a prefix of them, so that a call allocates once per thread, not a dozen tensors per block.
  struct Scratch {
    at::Tensor logits, gate_logits, probs, dprobs, dscores, dgate, zz, dzz, keys_out, rows_out, rows_in;
    Scratch(const Call& c, bool backward) {
      const auto opt = c.q.options();
      const int64_t big = c.per_task * c.s * c.block, rows = c.per_task * c.block;
      const auto sized = [&](int64_t numel, bool wanted = true) { return at::empty({wanted ? numel : 0}, opt); };
      const bool sep = c.gk.numel() != 0;
      logits = sized(big), gate_logits = sized(big, sep), probs = sized(big), zz = sized(rows * c.table.size(1));
      rows_out = sized(rows * c.d);
      if (!backward) return;
      dprobs = sized(big), dscores = sized(big), dgate = sized(big, sep), dzz = sized(rows * c.table.size(1));
      keys_out = sized(c.per_task * c.s * c.d), rows_in = sized(rows * c.d);
    }
  };
  static at::Tensor take(const at::Tensor& buf, at::IntArrayRef shape) {
    return buf.numel() ? buf.narrow(0, 0, c10::multiply_integers(shape)).view(shape) : buf;
  }

  // Block (i0, n) of heads h0..h1: its queries, keys read (the last `end` of the reversed keys) and, keys-major
  // (G, end, n), its logits and gate logits; the rows' (z, z_step) pairs (G, n, 2P).
  struct Span {
    at::Tensor qb, kb, vb, gkb;
    BlockTensors t;
    int64_t end;
  };
  Span open(Scratch& sc, int64_t h0, int64_t h1, int64_t i0, int64_t n, bool backward, const at::Tensor& top,
            const at::Tensor& inv) const {
    Span b;
    const int64_t g = h1 - h0;
    b.end = s - t + i0 + n;
    b.qb = q.slice(0, h0, h1).slice(1, i0, i0 + n);
    b.kb = k.slice(0, h0, h1).slice(1, s - b.end, s);
    b.vb = v.slice(0, h0, h1).slice(1, s - b.end, s);
    const auto qt = b.qb.transpose(1, 2);
    const std::vector<int64_t> keys_rows{g, b.end, n};
    auto& bt = b.t;
    bt.logits = take(sc.logits, keys_rows);
    at::baddbmm_out(bt.logits, zero, b.kb, qt, 0.0, scale);
    bt.gate_logits = take(sc.gate_logits, keys_rows);  // empty: plain CoPE
    if (gk.numel()) {
      b.gkb = gk.slice(0, h0, h1).slice(1, s - b.end, s);
      at::baddbmm_out(bt.gate_logits, zero, b.gkb, qt, 0.0, scale);
    }
    bt.zz = take(sc.zz, {g, n, table.size(1)});
    at::matmul_out(bt.zz, b.qb, table);
    bt.probs = take(sc.probs, keys_rows);
    bt.top = top.slice(0, h0, h1).slice(1, i0, i0 + n), bt.inv = inv.slice(0, h0, h1).slice(1, i0, i0 + n);
    if (backward) {
      bt.dprobs = take(sc.dprobs, keys_rows), bt.dscores = take(sc.dscores, keys_rows);
      bt.dgate = take(sc.dgate, keys_rows), bt.dzz = take(sc.dzz, {g, n, table.size(1)});
    }
    return b;
  }

  // fn(scratch, work, task, h0, h1) for every task, the tasks split over the threads.
  template <typename F>
  void for_tasks(bool backward, F fn) const {
    // The caller's thread-local state (inference mode, as Lightning validates under) in every worker thread, and
    // no autograd: the products write into scratch buffers (out=) from inputs that may require grad.
    const at::ThreadLocalState caller;
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "cope_call", [&] {
      at::parallel_for(0, tasks(), 1, [&](int64_t begin, int64_t end) {
        const at::ThreadLocalStateGuard state(caller);
        const at::NoGradGuard no_grad;
        Scratch sc(*this, backward);
        Block<scalar_t> work(block, s, table.size(1) / 2);
        for (int64_t task = begin; task < end; ++task) fn(sc, work, task, task * per_task, std::min(bh, (task + 1) * per_task));
      });
    });
  }
};

// Returns the output (BH, T, D) and the rows' softmax max and 1 / sum (BH, T), which backward takes.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                                 const at::Tensor& v, const at::Tensor& gk,
                                                                 const at::Tensor& table, int64_t block,
                                                                 int64_t per_task, double scale) {
  const Call call(q, k, v, gk, table, block, per_task, scale);
  auto out = at::empty_like(q), top = q.new_empty({call.bh, call.t}), inv = at::empty_like(top);
  call.for_tasks(false, [&](Call::Scratch& sc, auto& work, int64_t, int64_t h0, int64_t h1) {
    for (int64_t i0 = 0; i0 < call.t; i0 += block) {
      const int64_t n = std::min(block, call.t - i0);
      auto b = call.open(sc, h0, h1, i0, n, false, top, inv);
      b.t.forward(work, 0, h1 - h0, false);
      // The numerators' product, its rows scaled by 1 / sum: (n, D) multiplies instead of (S, n).
      auto rows = Call::take(sc.rows_out, {h1 - h0, n, call.d});
      at::bmm_out(rows, b.t.probs.transpose(1, 2), b.vb);
      out.slice(0, h0, h1).slice(1, i0, i0 + n).copy_(rows.mul_(b.t.inv.unsqueeze(-1)));
    }
  });
  return {out, top, inv};
}

// Gradients of the whole call, given its output and the rows' top and inv from `attention_forward`: dq, dk, dv,
// d gate_k (keys in reverse order, without the logits' scale: the caller applies it) and the table's (D, 2P)
// (per-task partial sums, added at the end).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& gk, const at::Tensor& table,
    const at::Tensor& out, const at::Tensor& top, const at::Tensor& inv, const at::Tensor& dout, int64_t block,
    int64_t per_task, double scale) {
  const Call call(q, k, v, gk, table, block, per_task, scale);
  TORCH_CHECK(dout.sizes() == q.sizes() && dout.is_contiguous() && out.sizes() == q.sizes(),
              "cope_cpu: dout and out shaped as q, dout contiguous");
  TORCH_CHECK(top.sizes() == at::IntArrayRef({call.bh, call.t}) && inv.sizes() == top.sizes() && top.is_contiguous() &&
                  inv.is_contiguous(),
              "cope_cpu: the rows' top and inv (BH, T) from attention_forward");
  // delta = sum over keys of p dp = dout . out per row, as flash attention forms it: no pass over the keys.
  const auto delta = (dout * out).sum(-1);
  auto dq = at::empty_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  auto dgk = gk.numel() ? at::zeros_like(gk) : at::empty({0}, q.options());
  auto dtables = at::zeros({call.tasks(), table.size(0), table.size(1)}, table.options());
  const auto table_t = table.transpose(0, 1);
  call.for_tasks(true, [&](Call::Scratch& sc, auto& work, int64_t task, int64_t h0, int64_t h1) {
    auto dtable = dtables[task];
    const int64_t g = h1 - h0;
    for (int64_t i0 = 0; i0 < call.t; i0 += block) {
      const int64_t n = std::min(block, call.t - i0);
      auto b = call.open(sc, h0, h1, i0, n, true, top, inv);
      auto& bt = b.t;
      bt.delta = delta.slice(0, h0, h1).slice(1, i0, i0 + n);
      auto doutb = dout.slice(0, h0, h1).slice(1, i0, i0 + n);
      at::bmm_out(bt.dprobs, b.vb, doutb.transpose(1, 2));  // (G, end, n), as the logits
      bt.backward(work, 0, g);
      const auto keys = [&](const at::Tensor& x) { return x.slice(0, h0, h1).slice(1, call.s - b.end, call.s); };
      auto key_rows = Call::take(sc.keys_out, {g, b.end, call.d});
      keys(dv).add_(at::bmm_out(key_rows, bt.probs, doutb));
      auto dqb = Call::take(sc.rows_out, {g, n, call.d});
      at::matmul_out(dqb, bt.dzz, table_t);
      auto q_rows = Call::take(sc.rows_in, {g, n, call.d}).copy_(b.qb);
      dtable.addmm_(q_rows.view({-1, call.d}).transpose(0, 1), bt.dzz.view({-1, bt.dzz.size(-1)}));
      // Plain CoPE: dscores is the logits' whole gradient, the softmax's and the gates'.
      dqb.baddbmm_(bt.dscores.transpose(1, 2), b.kb, 1.0, scale);
      keys(dk).add_(at::bmm_out(key_rows, bt.dscores, b.qb));
      if (gk.numel()) {
        dqb.baddbmm_(bt.dgate.transpose(1, 2), b.gkb, 1.0, scale);
        keys(dgk).add_(at::bmm_out(key_rows, bt.dgate, b.qb));
      }
      dq.slice(0, h0, h1).slice(1, i0, i0 + n).copy_(dqb);
    }
  });
  return {dq, dk, dv, dgk, dtables.sum(0)};
}

}  // namespace

// Schemas, with the functions as CPU kernels: fake tensors (`cope-pl plan`, torch.compile) then take the shapes
// registered in cope_cpu.py instead of running them.
TORCH_LIBRARY(cope_pl_cpu, m) {
  m.def("block_probs(Tensor logits, Tensor gate_logits, Tensor zz) -> Tensor");
  m.def("block_grads(Tensor logits, Tensor gate_logits, Tensor zz, Tensor dprobs) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "attention_forward(Tensor q, Tensor k, Tensor v, Tensor gk, Tensor table, int block, int per_task, float scale)"
      " -> (Tensor, Tensor, Tensor)");
  m.def(
      "attention_backward(Tensor q, Tensor k, Tensor v, Tensor gk, Tensor table, Tensor out, Tensor top, Tensor inv,"
      " Tensor dout, int block, int per_task, float scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cope_pl_cpu, CPU, m) {
  m.impl("block_probs", &block_probs);
  m.impl("block_grads", &block_grads);
  m.impl("attention_forward", &attention_forward);
  m.impl("attention_backward", &attention_backward);
}
