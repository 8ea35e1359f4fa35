// Test helpers: an independent float64 attention oracle that materialises
// the score matrix and evaluates every mask rule from its definition in
// qkv/mask.h (it shares no code with the library), random inputs with fixed
// seeds, and comparison against error bounds.
#ifndef QKV_TESTS_TEST_UTIL_H_
#define QKV_TESTS_TEST_UTIL_H_

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "qkv/attention.h"

namespace qkv::test {

inline constexpr double kU32 = 1.0 / (1 << 24);     // float32 unit roundoff 2^-24
inline constexpr double kU64 = 1.0 / 9007199254740992.0;  // float64 unit roundoff 2^-53

// One attention problem in plain contiguous [b, h, s, d] double arrays.
struct Case {
  int64_t batch = 1, num_q_heads = 1, num_kv_heads = 1, seq_q = 1, seq_kv = 1;
  int64_t head_dim = 1, head_dim_v = 1;
  std::vector<double> q, k, v;  // values exactly representable in float32
  bool causal = false;
  bool top_left = false;
  int64_t window_left = -1, window_right = -1;
  std::vector<int64_t> key_lengths;  // [batch] or empty
  std::vector<uint8_t> bool_mask;    // full [b, h, i, j] or empty; 1 = attend
  std::vector<double> add_mask;      // full [b, h, i, j] or empty
  // Block-sparse tiles, full [b, h, ceil(seq_q / 64), ceil(seq_kv / 64)] or
  // empty; 1 = the 64 x 64 tile holding (i, j) is present.
  std::vector<uint8_t> block_mask;
  std::vector<double> sink_logits;   // [num_q_heads] learned sinks or empty (float32 values)
  double softcap = 0.0;              // > 0: s = C tanh(scale q.k / C) before the mask
  double scale = 0.0;                // 0: 1/sqrt(head_dim)
};

// Index of the tile holding (b, h, i, j) in Case::block_mask.
inline int64_t BlockIndex(const Case& c, int64_t b, int64_t h, int64_t i, int64_t j) {
  const int64_t qb = (c.seq_q + 63) / 64, kb = (c.seq_kv + 63) / 64;
  return ((b * c.num_q_heads + h) * qb + i / 64) * kb + j / 64;
}

struct OracleResult {
  std::vector<double> out;      // [b, h, i, dv]
  std::vector<double> lse;      // [b, h, i]
  std::vector<double> weights;  // [b, h, i, j]
  std::vector<double> score_mag;  // [b, h, i]: max over allowed j of scale*sum|q k| + |mask|
  std::vector<double> abs_v;      // [b, h, i, dv]: sum_j w_ij |v_jd|
};

inline double EffectiveScale(const Case& c) {
  return c.scale != 0.0 ? c.scale : (c.head_dim > 0 ? 1.0 / std::sqrt(double(c.head_dim)) : 1.0);
}

// Oracle A (STYLE.md 6): plain scalar attention in double, numbered passes.
inline OracleResult Oracle(const Case& c) {
  const int64_t B = c.batch, H = c.num_q_heads, G = c.num_kv_heads, NQ = c.seq_q,
                NK = c.seq_kv, D = c.head_dim, DV = c.head_dim_v;
  const double scale = EffectiveScale(c);
  const double inf = std::numeric_limits<double>::infinity();
  OracleResult r;
  r.out.assign(B * H * NQ * DV, 0.0);
  r.lse.assign(B * H * NQ, -inf);
  r.weights.assign(B * H * NQ * NK, 0.0);
  r.score_mag.assign(B * H * NQ, 0.0);
  r.abs_v.assign(B * H * NQ * DV, 0.0);
  std::vector<double> s(NK), mag(NK);
  std::vector<bool> allowed(NK);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t g = h / (H / G);
      for (int64_t i = 0; i < NQ; ++i) {
        const int64_t row = (b * H + h) * NQ + i;
        const int64_t diag = c.top_left ? 0 : NK - NQ;
        // 1. Allowed pairs, one rule at a time, and the scores.
        for (int64_t j = 0; j < NK; ++j) {
          bool ok = true;
          if (c.causal && !(j <= i + diag)) ok = false;
          if (c.window_left >= 0 && !(j >= i + diag - c.window_left)) ok = false;
          if (c.window_right >= 0 && !(j <= i + diag + c.window_right)) ok = false;
          if (!c.key_lengths.empty() && !(j < c.key_lengths[b])) ok = false;
          const int64_t mi = row * NK + j;
          if (!c.bool_mask.empty() && !c.bool_mask[mi]) ok = false;
          if (!c.block_mask.empty() && !c.block_mask[BlockIndex(c, b, h, i, j)]) ok = false;
          double add = c.add_mask.empty() ? 0.0 : c.add_mask[mi];
          if (add == -inf) ok = false;
          double dot = 0.0, dot_abs = 0.0;
          for (int64_t d = 0; d < D; ++d) {
            const double qd = c.q[row * D + d], kd = c.k[((b * G + g) * NK + j) * D + d];
            dot += qd * kd;
            dot_abs += std::fabs(qd * kd);
          }
          const double raw = scale * dot;
          s[j] = (c.softcap > 0 ? c.softcap * std::tanh(raw / c.softcap) : raw) + add;
          // tanh's own rounding adds ~C u: folded into the magnitude.
          mag[j] = std::fabs(scale) * dot_abs + std::fabs(add) + c.softcap;
          allowed[j] = ok && s[j] != -inf;
        }
        // 2. Row max and sum over allowed keys, and a learned sink: one more
        // term exp(sink) in the denominator (a key of value 0).
        double m = -inf;
        bool any = false;
        for (int64_t j = 0; j < NK; ++j)
          if (allowed[j]) {
            any = true;
            m = std::isnan(s[j]) || std::isnan(m) ? std::nan("") : std::max(m, s[j]);
            r.score_mag[row] = std::max(r.score_mag[row], mag[j]);
          }
        const double sink = c.sink_logits.empty() ? -inf : c.sink_logits[h];
        if (!any) {  // fully masked: zeros; lse -inf, or the sink's logit
          r.lse[row] = sink;
          continue;
        }
        if (sink != -inf) m = std::max(m, sink);
        double l = sink == -inf ? 0.0 : std::exp(sink - m);
        for (int64_t j = 0; j < NK; ++j)
          if (allowed[j]) l += std::exp(s[j] - m);
        r.lse[row] = m + std::log(l);
        if (sink != -inf) r.score_mag[row] = std::max(r.score_mag[row], std::fabs(sink));
        // 3. Weights and output.
        for (int64_t j = 0; j < NK; ++j) {
          if (!allowed[j]) continue;
          const double w = std::exp(s[j] - m) / l;
          r.weights[row * NK + j] = w;
          for (int64_t d = 0; d < DV; ++d) {
            const double vd = c.v[((b * G + g) * NK + j) * DV + d];
            r.out[row * DV + d] += w * vd;
            r.abs_v[row * DV + d] += w * std::fabs(vd);
          }
        }
      }
    }
  return r;
}

// Fills `n` values N(0, sigma) rounded to float32 (so float32 inputs hold
// them exactly).
inline std::vector<double> RandomValues(int64_t n, std::mt19937_64& rng, double sigma = 1.0) {
  std::normal_distribution<double> normal(0.0, sigma);
  std::vector<double> x(n);
  for (double& v : x) v = static_cast<float>(normal(rng));
  return x;
}

// Returns a case with random q, k, v.
inline Case RandomCase(int64_t batch, int64_t heads, int64_t kv_heads, int64_t seq_q,
                       int64_t seq_kv, int64_t head_dim, int64_t head_dim_v, uint64_t seed) {
  std::mt19937_64 rng(seed);
  Case c;
  c.batch = batch, c.num_q_heads = heads, c.num_kv_heads = kv_heads;
  c.seq_q = seq_q, c.seq_kv = seq_kv, c.head_dim = head_dim, c.head_dim_v = head_dim_v;
  c.q = RandomValues(batch * heads * seq_q * head_dim, rng);
  c.k = RandomValues(batch * kv_heads * seq_kv * head_dim, rng);
  c.v = RandomValues(batch * kv_heads * seq_kv * head_dim_v, rng);
  return c;
}

// Applies mask rule `kind` (0..9) to `c`, with random boolean/additive masks
// that also empty whole rows: 0 none, 1 causal, 2 causal top-left, 3 window
// (5, 2), 4 window (0, 0), 5 window (left_window, -1) top-left, 6 key lengths
// (one batch with none), 7 boolean, 8 additive with -inf, 9 everything at once.
inline void ApplyMaskKind(Case& c, int kind, std::mt19937_64& rng, int64_t left_window = 3) {
  const int64_t n = c.batch * c.num_q_heads * c.seq_q * c.seq_kv;
  std::bernoulli_distribution coin(0.7);
  switch (kind) {
    case 0: break;
    case 1: c.causal = true; break;
    case 2: c.causal = true; c.top_left = true; break;
    case 3: c.window_left = 5; c.window_right = 2; break;
    case 4: c.window_left = 0; c.window_right = 0; break;
    case 5: c.window_left = left_window; c.window_right = -1; c.top_left = true; break;
    case 6:
      c.key_lengths.resize(c.batch);
      for (int64_t b = 0; b < c.batch; ++b) c.key_lengths[b] = (b * 67 + 3) % (c.seq_kv + 1);
      if (c.batch > 1) c.key_lengths[0] = 0;  // a batch with no keys at all
      break;
    case 7:
      c.bool_mask.resize(n);
      for (auto& m : c.bool_mask) m = coin(rng);
      for (int64_t j = 0; j < c.seq_kv; ++j) c.bool_mask[j] = 0;  // row 0 fully masked
      break;
    case 8: {
      std::normal_distribution<double> normal(0.0, 2.0);
      c.add_mask.resize(n);
      for (auto& m : c.add_mask) m = coin(rng) ? static_cast<float>(normal(rng)) : -std::numeric_limits<double>::infinity();
      for (int64_t j = 0; j < c.seq_kv; ++j) c.add_mask[c.seq_kv + j] = -std::numeric_limits<double>::infinity();
      break;
    }
    case 9:  // everything at once
      ApplyMaskKind(c, 1, rng);
      ApplyMaskKind(c, 6, rng);
      ApplyMaskKind(c, 8, rng);
      c.window_left = 4;
      break;
  }
}

// Library outputs of one run, in double.
struct Result {
  std::vector<double> out, lse, weights;
  AttentionInfo info;
};

// Runs qkv::Attention on the case with float32 (or `dtype`) inputs in bhsd
// memory; outputs in `out_dtype` (float32 or float64) converted to double.
inline Result RunQkv(const Case& c, Accumulate acc = Accumulate::kFloat32, int threads = 0,
                     bool want_weights = true, DType out_dtype = DType::kFloat32,
                     Kernel kernel = Kernel::kAuto) {
  auto to_f32 = [](const std::vector<double>& x) { return std::vector<float>(x.begin(), x.end()); };
  std::vector<float> q = to_f32(c.q), k = to_f32(c.k), v = to_f32(c.v);
  std::vector<float> add(c.add_mask.begin(), c.add_mask.end());
  const int64_t B = c.batch, H = c.num_q_heads, NQ = c.seq_q, NK = c.seq_kv;
  const size_t esize = out_dtype == DType::kFloat64 ? 8 : 4;
  std::vector<unsigned char> out(B * H * NQ * c.head_dim_v * esize), lse(B * H * NQ * esize),
      weights(want_weights ? B * H * NQ * NK * esize : 0);
  AttentionParams p;
  p.q = TensorView::Contiguous(q.data(), DType::kFloat32, {B, H, NQ, c.head_dim});
  p.k = TensorView::Contiguous(k.data(), DType::kFloat32, {B, c.num_kv_heads, NK, c.head_dim});
  p.v = TensorView::Contiguous(v.data(), DType::kFloat32, {B, c.num_kv_heads, NK, c.head_dim_v});
  p.out = MutableTensorView::Contiguous(out.data(), out_dtype, {B, H, NQ, c.head_dim_v});
  p.lse = MutableTensorView::Contiguous(lse.data(), out_dtype, {B, H, NQ, 1});
  if (want_weights) p.weights = MutableTensorView::Contiguous(weights.data(), out_dtype, {B, H, NQ, NK});
  p.mask.causal = c.causal;
  p.mask.alignment = c.top_left ? Alignment::kTopLeft : Alignment::kBottomRight;
  p.mask.window_left = c.window_left;
  p.mask.window_right = c.window_right;
  p.mask.key_lengths = c.key_lengths;
  // One explicit mask per call: a boolean and an additive mask together are
  // given as one additive mask with -inf where the boolean says "masked".
  if (!c.bool_mask.empty() && !c.add_mask.empty()) {
    for (size_t i = 0; i < add.size(); ++i)
      if (!c.bool_mask[i]) add[i] = -std::numeric_limits<float>::infinity();
  } else if (!c.bool_mask.empty()) {
    p.mask.mask = TensorView::Contiguous(c.bool_mask.data(), DType::kBool, {B, H, NQ, NK});
  }
  if (!c.add_mask.empty())
    p.mask.mask = TensorView::Contiguous(add.data(), DType::kFloat32, {B, H, NQ, NK});
  if (!c.block_mask.empty()) {
    p.mask.block_mask = TensorView::Contiguous(c.block_mask.data(), DType::kBool,
                                               {B, H, (NQ + 63) / 64, (NK + 63) / 64});
  }
  const std::vector<float> sinks(c.sink_logits.begin(), c.sink_logits.end());
  p.mask.sink_logits = sinks;
  p.mask.softcap = c.softcap;
  if (c.scale != 0.0) p.scale = c.scale;
  p.accumulate = acc;
  p.num_threads = threads;
  p.kernel = kernel;
  Result r;
  r.info = Attention(p);
  auto read = [&](const std::vector<unsigned char>& bytes) {
    std::vector<double> x(bytes.size() / esize);
    for (size_t i = 0; i < x.size(); ++i)
      x[i] = esize == 8 ? reinterpret_cast<const double*>(bytes.data())[i]
                        : reinterpret_cast<const float*>(bytes.data())[i];
    return x;
  };
  r.out = read(out), r.lse = read(lse), r.weights = read(weights);
  return r;
}

// Error bound of a float32 (unit roundoff u = 2^-24) or float64 (2^-53)
// attention row against the exact result, from a first-order analysis:
//   scores: a D-term dot product, one scale multiply and one mask add give
//     |ds| <= (D + 2) u * A,  A = max_j scale*sum_d|q_d k_jd| + |mask_ij|;
//   p_j = exp(s_j - m): relative error <= 2|ds| + 2u (argument and exp), the
//     max m itself is one of the s_j so its error is bounded by |ds| too;
//   out = sum_j p_j v_j / sum_j p_j: each N-term sum adds (N + 1) u relative,
//     and renormalising doubles the weight error, so
//   |d out_d| <= (2 (2 (D + 2) A + 2) + 2 (N + 2)) u * sum_j w_j |v_jd|.
// The same factor bounds each weight relative to itself; the lse error is
// |ds| + (N + 2) u + u |lse|.
struct Bound {
  double u;
  double RowFactor(double score_mag, int64_t head_dim, int64_t seq_kv) const {
    return (2.0 * (2.0 * (head_dim + 2) * score_mag + 2.0) + 2.0 * (seq_kv + 2)) * u;
  }
};

// Compares `got` with `want` elementwise against bound[i]; NaN must match NaN.
// On failure prints the worst index, the values, the bound and the count.
inline ::testing::AssertionResult WithinBound(const std::string& what,
                                              const std::vector<double>& got,
                                              const std::vector<double>& want,
                                              const std::vector<double>& bound) {
  if (got.size() != want.size()) return ::testing::AssertionFailure() << what << ": size";
  int64_t bad = 0, worst = -1;
  double worst_ratio = 0.0;
  for (size_t i = 0; i < got.size(); ++i) {
    const bool nan_ok = std::isnan(got[i]) == std::isnan(want[i]);
    const double err = std::isnan(want[i]) ? 0.0 : (got[i] == want[i] ? 0.0 : std::fabs(got[i] - want[i]));
    const double ratio = !nan_ok ? INFINITY : (err == 0.0 ? 0.0 : err / bound[i]);
    if (ratio > 1.0 || std::isnan(ratio)) {
      ++bad;
      if (!(ratio <= worst_ratio)) worst_ratio = ratio, worst = static_cast<int64_t>(i);
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << what << ": " << bad << " of " << got.size() << " out of bound; worst index " << worst
         << " got " << got[worst] << " want " << want[worst] << " bound " << bound[worst];
}

// Checks out, lse and (if present) weights of `r` against the oracle `o`.
inline ::testing::AssertionResult MatchesOracle(const Case& c, const Result& r,
                                                const OracleResult& o, double u) {
  const Bound bound{u};
  const int64_t rows = c.batch * c.num_q_heads * c.seq_q;
  // Underflow: p_j below the smallest normal (2^-126 in float32) loses its
  // relative accuracy or flushes to 0, an absolute error of at most that
  // per weight and seq_kv times that times max|v| per output.
  const double tiny = u == kU32 ? std::ldexp(1.0, -126) : std::ldexp(1.0, -1022);
  double max_v = 0.0;
  for (double x : c.v) max_v = std::isfinite(x) ? std::max(max_v, std::fabs(x)) : max_v;
  const double out_floor = tiny * (c.seq_kv + 1) * (max_v + 1.0);
  std::vector<double> out_b(o.out.size()), lse_b(rows), w_b(o.weights.size());
  for (int64_t row = 0; row < rows; ++row) {
    const double f = bound.RowFactor(o.score_mag[row], c.head_dim, c.seq_kv);
    for (int64_t d = 0; d < c.head_dim_v; ++d)
      out_b[row * c.head_dim_v + d] = f * o.abs_v[row * c.head_dim_v + d] + out_floor;
    lse_b[row] = ((c.head_dim + 2) * o.score_mag[row] + (c.seq_kv + 2) + std::fabs(o.lse[row])) * u + 1e-300;
    for (int64_t j = 0; j < c.seq_kv; ++j)
      w_b[row * c.seq_kv + j] = f * o.weights[row * c.seq_kv + j] + tiny;
  }
  auto res = WithinBound("out", r.out, o.out, out_b);
  if (!res) return res;
  // lse: -inf must match exactly (the bound is finite).
  std::vector<double> lse_got = r.lse, lse_want = o.lse;
  for (int64_t row = 0; row < rows; ++row) {
    if (std::isinf(lse_want[row]) || std::isinf(lse_got[row])) {
      if (lse_got[row] != lse_want[row])
        return ::testing::AssertionFailure() << "lse row " << row << " got " << lse_got[row]
                                             << " want " << lse_want[row];
      lse_got[row] = lse_want[row] = 0.0;
    }
  }
  res = WithinBound("lse", lse_got, lse_want, lse_b);
  if (!res) return res;
  if (!r.weights.empty()) return WithinBound("weights", r.weights, o.weights, w_b);
  return ::testing::AssertionSuccess();
}

}  // namespace qkv::test

#endif  // QKV_TESTS_TEST_UTIL_H_
