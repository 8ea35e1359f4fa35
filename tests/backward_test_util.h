// Test helpers for the attention backward: an independent float64 oracle of
// the gradients (it shares no code with the library; the mask rules are
// evaluated from their definitions in qkv/mask.h, as test_util.h's Oracle
// does), a first-order error bound for each gradient element, and a runner
// that calls qkv::Attention then qkv::AttentionBackward on a Case the way a
// user would, returning doubles.
#ifndef QKV_TESTS_BACKWARD_TEST_UTIL_H_
#define QKV_TESTS_BACKWARD_TEST_UTIL_H_

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "qkv/attention.h"
#include "qkv/attention_backward.h"
#include "qkv/tensor.h"
#include "test_util.h"

namespace qkv::test {

// The flash backward's bound doubles u, as the forward's does
// (flash_attention_test.cc). Against the reference analysis in
// BackwardOracle, its differences are:
//   (a) base-2 exponent: scale * log2(e) folded into Q (one rounding per
//       product, inside the (D + 2) u A score term), the mask and lse each
//       multiplied by log2(e) (u |mask| <= u A and u |lse|), and 2^x within
//       2 ULP (4u) instead of exp's 2u: eps_P grows by at most
//       u A + u |lse| + 2u, below the doubled (D + 2) u A + u (A + |lse|) + 2u;
//   (b) dq accumulated per key block and the blocks added in order, dk, dv
//       per row block: the same N- and M-term sums regrouped, plus one
//       addition per block (<= N / 64 + M / 64 extra roundings), below the
//       doubled (N + 2) u and (M + 2) u;
//   (c) vector lanes split each dot product into partial sums, which only
//       lowers the D- and DV-term bounds.
// Each addition is at most the term it is compared with, so u_eff = 2u.
inline constexpr double kFlashBackwardU = 2.0 * kU32;

// Exact gradients of L with dL/dout = dout, in plain [b, h, s, d] arrays, and
// (when an ErrorModel is given) a bound on each element of a kernel's result.
struct BackwardOracleResult {
  std::vector<double> out, lse;  // the exact forward: [b, h, i, dv], [b, h, i]
  std::vector<double> dq;        // [b, h, i, d]
  std::vector<double> dk, dv;    // [b, g, j, d], [b, g, j, dv]
  std::vector<double> ds;        // dS [b, h, i, j]: dmask before any reduction; 0 if skipped
  std::vector<uint8_t> allowed;  // [b, h, i, j]: 1 where the pair has a score
  std::vector<double> dq_bound, dk_bound, dv_bound, ds_bound;  // same shapes
  std::vector<double> dsink;     // [h]: the learned sinks' gradient (Case::sink_logits)
};

// What a kernel's error bound depends on (see BackwardOracle's derivation).
struct ErrorModel {
  double u = kU32;                        // unit roundoff of the kernel's arithmetic
  double tiny = std::ldexp(1.0, -126);    // its smallest normal: underflow's absolute error
  double store_u = kU32;                  // rounding of the gradients' dtype
  double store_tiny = std::ldexp(1.0, -150);  // its absolute rounding below the normals
  // The out [b, h, i, dv] and lse [b, h, i] the kernel was given; their
  // measured errors against the exact forward enter the bound.
  const std::vector<double>* given_out = nullptr;
  const std::vector<double>* given_lse = nullptr;
};

// The model for gradients stored in `dtype` by a kernel with unit roundoff
// `u` (kU32: float32 arithmetic; kU64: float64).
inline ErrorModel ModelFor(double u, DType grad_dtype, const std::vector<double>& out,
                           const std::vector<double>& lse) {
  ErrorModel em;
  em.u = u;
  em.tiny = u <= kU64 ? std::ldexp(1.0, -1022) : std::ldexp(1.0, -126);
  em.store_u = grad_dtype == DType::kFloat64 ? kU64 : grad_dtype == DType::kFloat16 ? 1.0 / 2048 : kU32;
  em.store_tiny = grad_dtype == DType::kFloat64   ? std::ldexp(1.0, -1075)
                  : grad_dtype == DType::kFloat16 ? std::ldexp(1.0, -25)
                                                  : std::ldexp(1.0, -150);
  em.given_out = &out, em.given_lse = &lse;
  return em;
}

// Oracle A for the backward (STYLE.md 6), shapes as in qkv/attention_backward.h:
//   1. s_ij and the allowed pairs of each row, every rule from its definition;
//   2. P_ij = exp(s_ij - m) / l (own max m and sum l), out_i, lse_i;
//   3. D_i = dout_i . out_i (exact out), dP_ij = dout_i . v_j,
//      dS_ij = P_ij (dP_ij - D_i), dq_i = scale sum_j dS_ij k_j,
//      dk_j += scale dS_ij q_i, dv_j += P_ij dout_i (summed over the group).
// Error bound of a kernel with unit roundoff u, given out and lse with
// measured errors dout_e = |out_given - out|, dl = |lse_given - lse|
// (first order; A = row max of scale sum|q k| + |mask|, as in Bound):
//   P_ij = exp(s_ij - lse_i): the score rounds by (D + 2) u A, the
//     subtraction by u |s - lse| <= u (A + |lse|), exp by 2u, and lse comes
//     in with dl: rel(P) = eps_P = (D + 2) u A + dl + u (A + |lse|) + 2u;
//   dP_ij: a DV-term dot product, |e| <= DV u W_ij, W_ij = sum_d |dout v_jd|;
//   D_i: |e| <= DV u sum_d |dout out| + sum_d |dout_d| dout_e_d;
//   dS_ij = P (dP - D): |e| <= P ((eps_P + 2u) |x| + DV u W + e_D),
//     x = dP - D (one rounding each for the subtraction and the product),
//     plus tiny (|x| + 1) where P or dS underflows;
//   dq_id: an N-term sum (N = seq_kv) then one scale multiply:
//     |e| <= |scale| sum_j (e_dS |k_jd| + (N + 2) u |dS k_jd| + tiny);
//   dk_jd: M-term sum (M = group_size seq_q) of (scale dS) q:
//     |e| <= |scale| sum_i (e_dS |q_id| + (M + 2) u |dS q_id| + tiny);
//   dv_jd: M-term sum of P dout: |e| <= sum_i (P (eps_P + (M + 1) u) + tiny) |dout_id|;
//   storing in the gradient dtype adds store_u |g| + store_tiny.
// A fully masked row (lse = -inf) must give exactly dq = 0 and nothing else.
inline BackwardOracleResult BackwardOracle(const Case& c, const std::vector<double>& dout,
                                           const ErrorModel* em = nullptr) {
  const int64_t B = c.batch, H = c.num_q_heads, G = c.num_kv_heads, NQ = c.seq_q,
                NK = c.seq_kv, D = c.head_dim, DV = c.head_dim_v;
  const int64_t group = G == 0 ? 1 : H / G, M = group * NQ;
  const double scale = EffectiveScale(c), abs_scale = std::fabs(scale);
  const double inf = std::numeric_limits<double>::infinity();
  BackwardOracleResult r;
  r.out.assign(B * H * NQ * DV, 0.0);
  r.lse.assign(B * H * NQ, -inf);
  r.dq.assign(B * H * NQ * D, 0.0);
  r.dk.assign(B * G * NK * D, 0.0);
  r.dv.assign(B * G * NK * DV, 0.0);
  r.ds.assign(B * H * NQ * NK, 0.0);
  r.allowed.assign(B * H * NQ * NK, 0);
  r.dsink.assign(H, 0.0);
  if (em) {
    r.dq_bound.assign(r.dq.size(), 0.0), r.dk_bound.assign(r.dk.size(), 0.0);
    r.dv_bound.assign(r.dv.size(), 0.0), r.ds_bound.assign(r.ds.size(), 0.0);
  }
  std::vector<double> s(NK), p(NK), dp(NK), cap_grad(NK, 1.0);
  std::vector<bool> allowed(NK);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t g = h / group;
      for (int64_t i = 0; i < NQ; ++i) {
        const int64_t row = (b * H + h) * NQ + i;
        const int64_t diag = c.top_left ? 0 : NK - NQ;
        const double* q = c.q.data() + row * D;
        const double* dout_i = dout.data() + row * DV;
        auto k_at = [&](int64_t j) { return c.k.data() + ((b * G + g) * NK + j) * D; };
        auto v_at = [&](int64_t j) { return c.v.data() + ((b * G + g) * NK + j) * DV; };
        // 1. Allowed pairs, one rule at a time, the scores and their magnitude.
        double a_mag = 0.0;
        bool any = false;
        for (int64_t j = 0; j < NK; ++j) {
          bool ok = !(c.causal && !(j <= i + diag));
          if (c.window_left >= 0 && !(j >= i + diag - c.window_left)) ok = false;
          if (c.window_right >= 0 && !(j <= i + diag + c.window_right)) ok = false;
          if (!c.key_lengths.empty() && !(j < c.key_lengths[b])) ok = false;
          if (!c.bool_mask.empty() && !c.bool_mask[row * NK + j]) ok = false;
          if (!c.block_mask.empty() && !c.block_mask[BlockIndex(c, b, h, i, j)]) ok = false;
          const double add = c.add_mask.empty() ? 0.0 : c.add_mask[row * NK + j];
          if (add == -inf) ok = false;
          double dot = 0.0, dot_abs = 0.0;
          for (int64_t d = 0; d < D; ++d) dot += q[d] * k_at(j)[d], dot_abs += std::fabs(q[d] * k_at(j)[d]);
          const double raw = scale * dot;
          const double th = c.softcap > 0 ? std::tanh(raw / c.softcap) : 0.0;
          s[j] = (c.softcap > 0 ? c.softcap * th : raw) + add;
          cap_grad[j] = c.softcap > 0 ? 1.0 - th * th : 1.0;
          if (c.softcap > 0) dot_abs += c.softcap / (abs_scale > 0 ? abs_scale : 1.0);  // tanh: ~C u
          allowed[j] = ok && s[j] != -inf;
          r.allowed[row * NK + j] = allowed[j];
          if (allowed[j]) any = true, a_mag = std::max(a_mag, abs_scale * dot_abs + std::fabs(add));
        }
        if (!any) continue;  // fully masked: dq = 0, adds nothing
        // 2. Softmax with its own max and sum (a learned sink adds exp(sink)
        // to the sum: a key of value 0); out and lse.
        const double sink = c.sink_logits.empty() ? -inf : c.sink_logits[h];
        double m = sink, l = 0.0;
        for (int64_t j = 0; j < NK; ++j)
          if (allowed[j]) m = std::max(m, s[j]);
        for (int64_t j = 0; j < NK; ++j)
          if (allowed[j]) l += std::exp(s[j] - m);
        if (sink != -inf) l += std::exp(sink - m);
        r.lse[row] = m + std::log(l);
        double* out = r.out.data() + row * DV;
        for (int64_t j = 0; j < NK; ++j) {
          p[j] = allowed[j] ? std::exp(s[j] - m) / l : 0.0;
          if (allowed[j])
            for (int64_t d = 0; d < DV; ++d) out[d] += p[j] * v_at(j)[d];
        }
        // 3. D_i, dP, dS and the gradients; the sink's: its weight times
        // (dP = 0 - D_i).
        double di = 0.0, di_abs = 0.0;
        for (int64_t d = 0; d < DV; ++d) di += dout_i[d] * out[d], di_abs += std::fabs(dout_i[d] * out[d]);
        if (sink != -inf) r.dsink[h] -= std::exp(sink - m) / l * di;
        double* dq = r.dq.data() + row * D;
        for (int64_t j = 0; j < NK; ++j) {
          if (!allowed[j]) continue;
          dp[j] = 0.0;
          for (int64_t d = 0; d < DV; ++d) dp[j] += dout_i[d] * v_at(j)[d];
          const double ds_capped = p[j] * (dp[j] - di);
          r.ds[row * NK + j] = ds_capped;  // at the capped score: what dmask is
          const double ds = ds_capped * cap_grad[j];
          double* dk = r.dk.data() + ((b * G + g) * NK + j) * D;
          double* dv = r.dv.data() + ((b * G + g) * NK + j) * DV;
          for (int64_t d = 0; d < D; ++d) dq[d] += ds * k_at(j)[d], dk[d] += scale * ds * q[d];
          for (int64_t d = 0; d < DV; ++d) dv[d] += p[j] * dout_i[d];
        }
        for (int64_t d = 0; d < D; ++d) dq[d] *= scale;
        if (!em) continue;
        // The bound, term by term as derived above.
        const double u = em->u, tiny = em->tiny;
        // A given lse that is not finite on a row with keys makes the bound
        // NaN: every element that is not exact then fails.
        const double lse_given = (*em->given_lse)[row];
        const double dl = !std::isfinite(lse_given) ? std::nan("") : std::fabs(lse_given - r.lse[row]);
        const double eps_p = (D + 2) * u * a_mag + dl + u * (a_mag + std::fabs(r.lse[row])) + 2 * u;
        double e_d = DV * u * di_abs;
        for (int64_t d = 0; d < DV; ++d)
          e_d += std::fabs(dout_i[d]) * std::fabs((*em->given_out)[row * DV + d] - out[d]);
        for (int64_t j = 0; j < NK; ++j) {
          if (!allowed[j]) continue;
          double w = 0.0;
          for (int64_t d = 0; d < DV; ++d) w += std::fabs(dout_i[d] * v_at(j)[d]);
          const double x = std::fabs(dp[j] - di), ds = std::fabs(r.ds[row * NK + j]);
          // Soft-capping: 1 - tanh^2 in float adds ~6u of |dS| absolute.
          const double e_ds = p[j] * ((eps_p + 2 * u + (c.softcap > 0 ? 6 * u : 0.0)) * x + DV * u * w + e_d) +
                              tiny * (x + 1.0);
          r.ds_bound[row * NK + j] = e_ds;
          double* dq_b = r.dq_bound.data() + row * D;
          double* dk_b = r.dk_bound.data() + ((b * G + g) * NK + j) * D;
          double* dv_b = r.dv_bound.data() + ((b * G + g) * NK + j) * DV;
          for (int64_t d = 0; d < D; ++d) {
            const double kd = std::fabs(k_at(j)[d]), qd = std::fabs(q[d]);
            dq_b[d] += abs_scale * (e_ds * kd + (NK + 2) * u * ds * kd + tiny);
            dk_b[d] += abs_scale * (e_ds * qd + (M + 2) * u * ds * qd + tiny);
          }
          for (int64_t d = 0; d < DV; ++d)
            dv_b[d] += (p[j] * (eps_p + (M + 1) * u) + tiny) * std::fabs(dout_i[d]);
        }
      }
    }
  if (em) {
    auto store = [&](const std::vector<double>& x, std::vector<double>& bound) {
      for (size_t e = 0; e < x.size(); ++e) bound[e] += em->store_u * std::fabs(x[e]) + em->store_tiny;
    };
    store(r.dq, r.dq_bound), store(r.dk, r.dk_bound), store(r.dv, r.dv_bound);
  }
  return r;
}

// Returns the full [b, h, i, j] array `full` summed over the dims where
// `shape` is 1 (the reduction of dS to a broadcast mask's own shape),
// row-major in `shape`.
inline std::vector<double> ReduceToShape(const Case& c, const std::vector<double>& full,
                                         const Shape4& shape) {
  const Shape4 t{c.batch, c.num_q_heads, c.seq_q, c.seq_kv};
  std::vector<double> r(shape[0] * shape[1] * shape[2] * shape[3], 0.0);
  for (int64_t b = 0; b < t[0]; ++b)
    for (int64_t h = 0; h < t[1]; ++h)
      for (int64_t i = 0; i < t[2]; ++i)
        for (int64_t j = 0; j < t[3]; ++j) {
          const int64_t dst = ((std::min(b, shape[0] - 1) * shape[1] + std::min(h, shape[1] - 1)) *
                                   shape[2] + std::min(i, shape[2] - 1)) * shape[3] + std::min(j, shape[3] - 1);
          r[dst] += full[((b * t[1] + h) * t[2] + i) * t[3] + j];
        }
  return r;
}

// The bound of dmask in `shape`: R-term sums (R broadcast copies per
// element) of dS, each within ds_bound, add (R + 1) u sum |dS|; then storing.
inline std::vector<double> DmaskBound(const Case& c, const BackwardOracleResult& o,
                                      const Shape4& shape, const ErrorModel& em) {
  const int64_t r_terms = c.batch * c.num_q_heads * c.seq_q * c.seq_kv /
                          std::max<int64_t>(1, shape[0] * shape[1] * shape[2] * shape[3]);
  std::vector<double> abs_ds(o.ds.size());
  for (size_t e = 0; e < o.ds.size(); ++e) abs_ds[e] = std::fabs(o.ds[e]);
  std::vector<double> bound = ReduceToShape(c, o.ds_bound, shape);
  const std::vector<double> sum_abs = ReduceToShape(c, abs_ds, shape);
  const std::vector<double> value = ReduceToShape(c, o.ds, shape);
  for (size_t e = 0; e < bound.size(); ++e)
    bound[e] += (r_terms + 1) * em.u * sum_abs[e] + em.store_u * std::fabs(value[e]) + em.store_tiny;
  return bound;
}

// Fills c.add_mask with an additive mask of the broadcast `shape` expanded to
// [b, h, i, j]: N(0, 2) values rounded to float32, about 1 in 5 -inf.
inline void BroadcastAddMask(Case& c, const Shape4& shape, std::mt19937_64& rng) {
  std::normal_distribution<double> normal(0.0, 2.0);
  std::bernoulli_distribution off(0.2);
  std::vector<double> own(shape[0] * shape[1] * shape[2] * shape[3]);
  for (double& x : own) x = off(rng) ? -std::numeric_limits<double>::infinity() : float(normal(rng));
  const Shape4 t{c.batch, c.num_q_heads, c.seq_q, c.seq_kv};
  c.add_mask.assign(t[0] * t[1] * t[2] * t[3], 0.0);
  for (int64_t b = 0; b < t[0]; ++b)
    for (int64_t h = 0; h < t[1]; ++h)
      for (int64_t i = 0; i < t[2]; ++i)
        for (int64_t j = 0; j < t[3]; ++j)
          c.add_mask[((b * t[1] + h) * t[2] + i) * t[3] + j] =
              own[((std::min(b, shape[0] - 1) * shape[1] + std::min(h, shape[1] - 1)) * shape[2] +
                   std::min(i, shape[2] - 1)) * shape[3] + std::min(j, shape[3] - 1)];
}

// Returns dout for `c`: N(0, 1) rounded to float32 (or float16).
inline std::vector<double> RandomDout(const Case& c, uint64_t seed, bool half = false) {
  std::mt19937_64 rng(seed);
  std::vector<double> x = RandomValues(c.batch * c.num_q_heads * c.seq_q * c.head_dim_v, rng);
  if (half)
    for (double& e : x) e = HalfToFloat(FloatToHalf(float(e)));
  return x;
}

// Rounds q, k, v of `c` to float16 (so the oracle sees what a kernel reads).
inline void RoundCaseToHalf(Case& c) {
  for (auto* x : {&c.q, &c.k, &c.v})
    for (double& e : *x) e = HalfToFloat(FloatToHalf(float(e)));
}

// How one backward run is set up.
struct BackwardOptions {
  Kernel kernel = Kernel::kAuto;                 // of the backward
  Kernel forward_kernel = Kernel::kAuto;         // of the forward that writes out, lse
  Accumulate accumulate = Accumulate::kFloat32;  // of both
  int threads = 1;
  DType in = DType::kFloat32;    // q, k, v, dout
  DType fwd = DType::kFloat32;   // out, lse as the forward writes them
  DType grad = DType::kFloat32;  // dq, dk, dv, dmask
  bool bshd = false;             // [b, s, h, d] memory for q, k, v, dout, out, dq, dk, dv
  bool give_out = true, give_lse = true;  // false: the backward recomputes it
  bool dmask = false;            // ask for the additive mask's gradient
  Shape4 mask_shape{0, 0, 0, 0};  // the explicit mask's own shape; zeros: full
  // The mask view as BroadcastMask makes it: the full shape with stride 0 on
  // the broadcast dims (else the own shape; dmask has the own shape either way).
  bool mask_view_full = false;
  DType mask_dtype = DType::kFloat32;  // of an additive mask
  // Every stride of q, k, v, dout, out, dq, dk, dv doubled: the elements sit
  // at even offsets, NaN between them in the inputs and the sentinel in the
  // outputs (GapsUntouched checks it stays).
  bool spread = false;
};

// The float32/float64 reference or flash configuration with its dtypes.
inline BackwardOptions Options(Kernel kernel, Accumulate acc = Accumulate::kFloat32) {
  BackwardOptions o;
  o.kernel = kernel, o.accumulate = acc;
  if (acc == Accumulate::kFloat64) o.fwd = o.grad = DType::kFloat64;
  return o;
}

// What one run gave, in double, bhsd order; dmask row-major in its shape.
struct BackwardResult {
  std::vector<double> dq, dk, dv, dmask, dsink;
  std::vector<double> out, lse;  // what the forward wrote (and the backward was given)
  AttentionInfo info;
  bool gaps_untouched = true;  // BackwardSetup::GapsUntouched after the call
};

inline std::vector<unsigned char> EncodeAs(const std::vector<double>& x, DType dtype) {
  std::vector<unsigned char> bytes(x.size() * DTypeSize(dtype));
  for (size_t i = 0; i < x.size(); ++i) {
    if (dtype == DType::kFloat32) reinterpret_cast<float*>(bytes.data())[i] = float(x[i]);
    if (dtype == DType::kFloat64) reinterpret_cast<double*>(bytes.data())[i] = x[i];
    if (dtype == DType::kFloat16) reinterpret_cast<uint16_t*>(bytes.data())[i] = FloatToHalf(float(x[i]));
  }
  return bytes;
}

inline double DecodeAt(const std::vector<unsigned char>& bytes, DType dtype, int64_t i) {
  if (dtype == DType::kFloat64) return reinterpret_cast<const double*>(bytes.data())[i];
  if (dtype == DType::kFloat16) return HalfToFloat(reinterpret_cast<const uint16_t*>(bytes.data())[i]);
  return reinterpret_cast<const float*>(bytes.data())[i];
}

// The buffers and params of one backward call: q, k, v, dout (and the mask)
// encoded as `o` says, out and lse written by qkv::Attention, dq, dk, dv (and
// dmask) filled with the sentinel byte 0xAB. Tests may edit `params` before
// calling qkv::AttentionBackward(params).
class BackwardSetup {
 public:
  static constexpr unsigned char kSentinel = 0xAB;

  BackwardSetup(const Case& c, const std::vector<double>& dout, const BackwardOptions& o)
      : c_(c), o_(o), key_lengths_(c.key_lengths) {
    const int64_t B = c.batch, H = c.num_q_heads, G = c.num_kv_heads, NQ = c.seq_q,
                  NK = c.seq_kv, D = c.head_dim, DV = c.head_dim_v;
    q_ = EncodeAs(Reorder(c.q, H, NQ, D), o.in), k_ = EncodeAs(Reorder(c.k, G, NK, D), o.in);
    v_ = EncodeAs(Reorder(c.v, G, NK, DV), o.in), dout_ = EncodeAs(Reorder(dout, H, NQ, DV), o.in);
    const int64_t x = o.spread ? 2 : 1;
    out_.assign(x * B * H * NQ * DV * DTypeSize(o.fwd), 0), lse_.assign(B * H * NQ * DTypeSize(o.fwd), 0);
    dq_.assign(x * B * H * NQ * D * DTypeSize(o.grad), kSentinel);
    dk_.assign(x * B * G * NK * D * DTypeSize(o.grad), kSentinel);
    dv_.assign(x * B * G * NK * DV * DTypeSize(o.grad), kSentinel);
    AttentionParams f;
    f.q = View<TensorView>(q_.data(), o.in, H, NQ, D);
    f.k = View<TensorView>(k_.data(), o.in, G, NK, D);
    f.v = View<TensorView>(v_.data(), o.in, G, NK, DV);
    f.out = View<MutableTensorView>(out_.data(), o.fwd, H, NQ, DV);
    f.lse = MutableTensorView::Contiguous(lse_.data(), o.fwd, {B, H, NQ, 1});
    f.mask.causal = c.causal;
    f.mask.alignment = c.top_left ? Alignment::kTopLeft : Alignment::kBottomRight;
    f.mask.window_left = c.window_left, f.mask.window_right = c.window_right;
    f.mask.key_lengths = key_lengths_;
    // One explicit mask per call: bool, or additive with the bool folded in
    // as -inf; in its own (broadcast) shape, stride 0 on the broadcast dims.
    const Shape4 full{B, H, NQ, NK};
    mask_shape_ = o.mask_shape == Shape4{0, 0, 0, 0} ? full : o.mask_shape;
    std::vector<double> own(mask_shape_[0] * mask_shape_[1] * mask_shape_[2] * mask_shape_[3]);
    const bool has_add = !c.add_mask.empty(), has_bool = !c.bool_mask.empty();
    for (int64_t e = 0; e < int64_t(own.size()) && (has_add || has_bool); ++e) {
      const int64_t jj = e % mask_shape_[3], ii = e / mask_shape_[3] % mask_shape_[2],
                    hh = e / (mask_shape_[3] * mask_shape_[2]) % mask_shape_[1],
                    bb = e / (mask_shape_[3] * mask_shape_[2] * mask_shape_[1]);
      const int64_t src = ((bb * H + hh) * NQ + ii) * NK + jj;
      own[e] = has_add ? c.add_mask[src] : 0.0;
      if (has_bool && !c.bool_mask[src]) own[e] = -std::numeric_limits<double>::infinity();
    }
    Shape4 mstrides{mask_shape_[1] * mask_shape_[2] * mask_shape_[3], mask_shape_[2] * mask_shape_[3],
                    mask_shape_[3], 1};
    for (int d = 0; d < 4; ++d)
      if (mask_shape_[d] == 1) mstrides[d] = 0;
    const Shape4 view_shape = o.mask_view_full ? full : mask_shape_;
    if (has_add) {
      mask_ = EncodeAs(own, o.mask_dtype);
      f.mask.mask = TensorView{mask_.data(), o.mask_dtype, view_shape, mstrides};
    } else if (has_bool) {
      for (double x : own) bool_mask_.push_back(x == 0.0 ? 1 : 0);
      f.mask.mask = TensorView{bool_mask_.data(), DType::kBool, view_shape, mstrides};
    }
    if (!c.block_mask.empty()) {
      f.mask.block_mask = TensorView::Contiguous(c.block_mask.data(), DType::kBool,
                                                 {B, H, (NQ + 63) / 64, (NK + 63) / 64});
    }
    sinks_.assign(c.sink_logits.begin(), c.sink_logits.end());
    f.mask.sink_logits = sinks_;
    f.mask.softcap = c.softcap;
    if (c.scale != 0.0) f.scale = c.scale;
    f.kernel = o.forward_kernel, f.accumulate = o.accumulate, f.num_threads = o.threads;
    Attention(f);

    params.q = f.q, params.k = f.k, params.v = f.v, params.mask = f.mask, params.scale = f.scale;
    if (o.give_out) params.out = TensorView{f.out.data, f.out.dtype, f.out.shape, f.out.strides};
    if (o.give_lse) params.lse = TensorView{f.lse.data, f.lse.dtype, f.lse.shape, f.lse.strides};
    params.dout = View<TensorView>(dout_.data(), o.in, H, NQ, DV);
    params.dq = View<MutableTensorView>(dq_.data(), o.grad, H, NQ, D);
    params.dk = View<MutableTensorView>(dk_.data(), o.grad, G, NK, D);
    params.dv = View<MutableTensorView>(dv_.data(), o.grad, G, NK, DV);
    if (o.dmask) {
      dmask_.assign(own.size() * DTypeSize(o.grad), kSentinel);
      params.dmask = MutableTensorView::Contiguous(dmask_.data(), o.grad, mask_shape_);
    }
    params.kernel = o.kernel, params.accumulate = o.accumulate, params.num_threads = o.threads;
    if (!sinks_.empty()) {
      dsink_.assign(sinks_.size(), -12345.0f);
      params.dsink_logits = dsink_;
    }
  }
  BackwardSetup(const BackwardSetup&) = delete;

  // Fills dq, dk, dv (and dmask) with the sentinel again.
  void Refill() {
    for (auto* x : {&dq_, &dk_, &dv_, &dmask_}) std::fill(x->begin(), x->end(), kSentinel);
  }
  BackwardSetup& operator=(const BackwardSetup&) = delete;

  // True when no byte of dq, dk, dv between the spread elements was written.
  bool GapsUntouched() const {
    if (!o_.spread) return true;
    const size_t e = DTypeSize(o_.grad);
    for (const auto* x : {&dq_, &dk_, &dv_})
      for (size_t at = e; at < x->size(); at += 2 * e)
        for (size_t k = 0; k < e; ++k)
          if ((*x)[at + k] != kSentinel) return false;
    return true;
  }

  // Reads the gradients (and what the forward wrote) back in bhsd order.
  BackwardResult Read() const {
    const int64_t B = c_.batch, H = c_.num_q_heads, G = c_.num_kv_heads;
    BackwardResult r;
    r.dq = ReadView(dq_, params.dq, B, H, c_.seq_q, c_.head_dim);
    r.dk = ReadView(dk_, params.dk, B, G, c_.seq_kv, c_.head_dim);
    r.dv = ReadView(dv_, params.dv, B, G, c_.seq_kv, c_.head_dim_v);
    const MutableTensorView out = View<MutableTensorView>(nullptr, o_.fwd, H, c_.seq_q, c_.head_dim_v);
    r.out = ReadView(out_, out, B, H, c_.seq_q, c_.head_dim_v);
    for (int64_t e = 0; e < B * H * c_.seq_q; ++e) r.lse.push_back(DecodeAt(lse_, o_.fwd, e));
    for (size_t e = 0; e < dmask_.size() / DTypeSize(o_.grad); ++e)
      r.dmask.push_back(DecodeAt(dmask_, o_.grad, int64_t(e)));
    r.dsink.assign(dsink_.begin(), dsink_.end());
    return r;
  }

  AttentionBackwardParams params;
  std::vector<unsigned char> dq_, dk_, dv_, dmask_;  // the outputs' bytes
  std::vector<unsigned char> out_, lse_;  // what the forward wrote (params.out, lse point here)

 private:
  // bhsd order -> memory order of the run.
  std::vector<double> Reorder(const std::vector<double>& x, int64_t heads, int64_t seq,
                              int64_t dim) const {
    std::vector<double> y = x;
    if (o_.bshd) {
      for (int64_t b = 0; b < c_.batch; ++b)
        for (int64_t h = 0; h < heads; ++h)
          for (int64_t s = 0; s < seq; ++s)
            for (int64_t d = 0; d < dim; ++d)
              y[((b * seq + s) * heads + h) * dim + d] = x[((b * heads + h) * seq + s) * dim + d];
    }
    if (!o_.spread) return y;
    std::vector<double> z(2 * y.size(), std::nan(""));
    for (size_t e = 0; e < y.size(); ++e) z[2 * e] = y[e];
    return z;
  }
  template <class V, class P>
  V View(P data, DType dtype, int64_t heads, int64_t seq, int64_t dim) const {
    V v = o_.bshd ? V::FromBSHD(data, dtype, c_.batch, seq, heads, dim)
                  : V::Contiguous(data, dtype, {c_.batch, heads, seq, dim});
    if (o_.spread)
      for (int64_t& stride : v.strides) stride *= 2;
    return v;
  }
  static std::vector<double> ReadView(const std::vector<unsigned char>& bytes,
                                      const MutableTensorView& v, int64_t B, int64_t H, int64_t S,
                                      int64_t Dm) {
    std::vector<double> x;
    x.reserve(B * H * S * Dm);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t s = 0; s < S; ++s)
          for (int64_t d = 0; d < Dm; ++d) x.push_back(DecodeAt(bytes, v.dtype, v.Offset(b, h, s, d)));
    return x;
  }

  const Case& c_;
  BackwardOptions o_;
  std::vector<int64_t> key_lengths_;
  Shape4 mask_shape_{};
  std::vector<unsigned char> q_, k_, v_, dout_, mask_;
  std::vector<uint8_t> bool_mask_;
  std::vector<float> sinks_, dsink_;
};

// Runs qkv::Attention then qkv::AttentionBackward on `c` as `o` says.
inline BackwardResult RunBackward(const Case& c, const std::vector<double>& dout,
                                  const BackwardOptions& o) {
  BackwardSetup setup(c, dout, o);
  const AttentionInfo info = AttentionBackward(setup.params);
  BackwardResult r = setup.Read();
  r.info = info;
  r.gaps_untouched = setup.GapsUntouched();
  return r;
}

// Checks dq, dk, dv of `r` against the oracle `o` and its bounds.
inline ::testing::AssertionResult MatchesGradients(const BackwardResult& r,
                                                   const BackwardOracleResult& o) {
  auto res = WithinBound("dq", r.dq, o.dq, o.dq_bound);
  if (res) res = WithinBound("dk", r.dk, o.dk, o.dk_bound);
  if (res) res = WithinBound("dv", r.dv, o.dv, o.dv_bound);
  return res;
}

// Checks dq, dk, dv (and dmask, when the run has one, in `mask_shape`) of
// `r` against the oracle with the bound of a kernel of unit roundoff `u`
// whose gradients are stored in `grad`, given the out and lse that `r` was.
inline ::testing::AssertionResult MatchesBackwardOracle(const Case& c,
                                                        const std::vector<double>& dout,
                                                        const BackwardResult& r, double u,
                                                        DType grad = DType::kFloat32,
                                                        Shape4 mask_shape = {0, 0, 0, 0}) {
  const ErrorModel em = ModelFor(u, grad, r.out, r.lse);
  const BackwardOracleResult o = BackwardOracle(c, dout, &em);
  auto res = MatchesGradients(r, o);
  if (res && !r.dmask.empty()) {
    if (mask_shape == Shape4{0, 0, 0, 0}) mask_shape = {c.batch, c.num_q_heads, c.seq_q, c.seq_kv};
    res = WithinBound("dmask", r.dmask, ReduceToShape(c, o.ds, mask_shape),
                      DmaskBound(c, o, mask_shape, em));
  }
  return res;
}

// NaN in one element of a q, k or v row reaches exactly the gradients that
// depend on it, read off the oracle's allowed pairs; every other element is
// finite and within the clean oracle's bound:
//   q row r (with keys): dq of r; dk, dv of the keys r attends;
//   k row j0: the rows R that attend j0 (their lse is NaN): dq of R; dk, dv
//     of every key a row of R attends;
//   v row j0: out and D of R are NaN, so dq of R and dk of their keys; P
//     never reads v, so dv stays finite everywhere.
// Checks NaN in element 0 of row `pos` of `which` ('q', 'k' or 'v', rows
// counted over [b, h, s]); returns how many key rows the NaN reaches.
inline int64_t ExpectNanPattern(const Case& clean, char which, int64_t pos,
                                const BackwardOptions& o, double u) {
  const int64_t H = clean.num_q_heads, G = clean.num_kv_heads, NQ = clean.seq_q,
                NK = clean.seq_kv, group = H / G;
  const std::vector<double> dout = RandomDout(clean, 12);
  const BackwardResult r0 = RunBackward(clean, dout, o);
  EXPECT_TRUE(MatchesBackwardOracle(clean, dout, r0, u, o.grad));
  const ErrorModel em = ModelFor(u, o.grad, r0.out, r0.lse);
  const BackwardOracleResult or0 = BackwardOracle(clean, dout, &em);
  auto key_row = [&](int64_t q_row, int64_t j) { return (q_row / (H * NQ) * G + q_row / NQ % H / group) * NK + j; };
  std::vector<bool> nan_q(clean.batch * H * NQ, false), nan_k(clean.batch * G * NK, false);
  if (which == 'q') {
    for (int64_t j = 0; j < NK; ++j)
      if (or0.allowed[pos * NK + j]) nan_q[pos] = true, nan_k[key_row(pos, j)] = true;
  } else {
    for (int64_t row = 0; row < int64_t(nan_q.size()); ++row)
      nan_q[row] = key_row(row, pos % NK) == pos && or0.allowed[row * NK + pos % NK];
    for (int64_t row = 0; row < int64_t(nan_q.size()); ++row)
      for (int64_t j = 0; j < NK && nan_q[row]; ++j)
        if (or0.allowed[row * NK + j]) nan_k[key_row(row, j)] = true;
  }
  Case c = clean;
  std::vector<double>& x = which == 'q' ? c.q : which == 'k' ? c.k : c.v;
  x[pos * (which == 'v' ? clean.head_dim_v : clean.head_dim)] = std::nan("");
  const BackwardResult r = RunBackward(c, dout, o);
  auto expect = [&](const char* what, const std::vector<double>& got, const std::vector<double>& want,
                    const std::vector<double>& bound, int64_t dim, const std::vector<bool>& nan_rows) {
    std::vector<double> w = want;
    for (size_t e = 0; e < w.size(); ++e)
      if (nan_rows[e / dim]) w[e] = std::nan("");
    EXPECT_TRUE(WithinBound(what, got, w, bound)) << "NaN in " << which << " row " << pos;
  };
  const std::vector<bool> none(nan_k.size(), false);
  expect("dq", r.dq, or0.dq, or0.dq_bound, clean.head_dim, nan_q);
  expect("dk", r.dk, or0.dk, or0.dk_bound, clean.head_dim, nan_k);
  expect("dv", r.dv, or0.dv, or0.dv_bound, clean.head_dim_v, which == 'v' ? none : nan_k);
  int64_t count = 0;
  for (bool b : nan_k) count += b;
  return count;
}

}  // namespace qkv::test

#endif  // QKV_TESTS_BACKWARD_TEST_UTIL_H_
