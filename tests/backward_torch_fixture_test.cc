// Oracle C for the backward: compares qkv::AttentionBackward with gradients
// that PyTorch 1.13 autograd wrote (tests/gen_backward_fixtures.py; fixtures
// in tests/testdata/torch_backward/, manifest.txt names each case).
//
// The fixtures store float32 inputs and the float64 gradients torch computed
// from exactly those values, so both sides see identical inputs and torch's
// own error is a float64 one. Every comparison uses a bound computed from the
// inputs (derived at ComputeBounds below): |qkv - torch| <= E(qkv) + E(torch) +
// the rounding of qkv's output dtype, with E(torch) = E at u = 2^-53. A
// separate check requires |torch - double oracle| <= 2 E(torch) (both are
// float64): when it fails the fixture or the bound is wrong, not qkv.
//
// Measured margin (these fixtures): the worst |qkv - torch| is 3.2% of its
// bound for the float64 reference, 5.5% for the float32 reference and 6.3%
// for the flash backward (first-order worst-case bounds add every rounding
// with the same sign); the fixture check's worst is 4% of 2 E(torch).
//
// Kernels: reference with float64 accumulation (float64 gradients: the bound
// is ~1e-15 relative, so this is nearly an equality test), reference and
// auto (the flash backward) in float32, each with out and lse recomputed and
// given.
#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

#include "qkv/attention.h"
#include "qkv/attention_backward.h"
#include "qkv/error.h"
#include "qkv/mask.h"
#include "qkv/npy.h"
#include "qkv/tensor.h"

namespace qkv {
namespace {

constexpr double kUnitF32 = 0x1p-24;  // float32 unit roundoff u = eps_f32 / 2
constexpr double kUnitF64 = 0x1p-53;  // float64 unit roundoff
constexpr int kFormatVersion = 1;     // manifest.txt: "qkv-torch-backward-fixtures 1"

std::string CaseDir(const std::string& name) {
  return std::string(QKV_TESTDATA_DIR) + "/torch_backward/" + name;
}

// One fixture folder (see gen_backward_fixtures.py for dtypes and shapes).
struct Case {
  std::string name;
  NpyArray q, k, v, dout, out, lse, dq, dk, dv;
  std::optional<NpyArray> mask, dmask;
};

Case LoadCase(const std::string& name) {
  const std::string dir = CaseDir(name);
  Case c;
  c.name = name;
  for (auto [file, array] : {std::pair{"q", &c.q}, {"k", &c.k}, {"v", &c.v}, {"dout", &c.dout},
                             {"out", &c.out}, {"lse", &c.lse}, {"dq", &c.dq}, {"dk", &c.dk},
                             {"dv", &c.dv}}) {
    *array = ReadNpy(dir + "/" + file + ".npy");
  }
  if (std::filesystem::exists(dir + "/mask.npy")) c.mask = ReadNpy(dir + "/mask.npy");
  if (std::filesystem::exists(dir + "/dmask.npy")) c.dmask = ReadNpy(dir + "/dmask.npy");
  return c;
}

Shape4 Shape4Of(const NpyArray& a) {
  EXPECT_EQ(a.shape.size(), 4u);
  Shape4 s{1, 1, 1, 1};
  for (size_t d = 0; d < 4 && d < a.shape.size(); ++d) s[d] = a.shape[d];
  return s;
}

// Returns element `flat` (row-major) of a as double; bools read as 0 / 1.
double At(const NpyArray& a, int64_t flat) {
  switch (a.dtype) {
    case DType::kFloat32:
      return a.data<float>()[flat];
    case DType::kFloat64:
      return a.data<double>()[flat];
    case DType::kBool:
      return a.data<unsigned char>()[flat] != 0 ? 1.0 : 0.0;
    default:
      ADD_FAILURE() << "unexpected dtype " << DTypeName(a.dtype);
      return NAN;
  }
}

// Returns the row-major index into `mask` of element [b,h,i,j] under NumPy
// broadcasting of a rank <= 4 array (written here independently of
// qkv::BroadcastMask, so the oracle does not share it).
int64_t MaskIndex(const NpyArray& mask, int64_t b, int64_t h, int64_t i, int64_t j) {
  const int64_t idx[4] = {b, h, i, j};
  const size_t rank = mask.shape.size();
  int64_t flat = 0;
  for (size_t d = 0; d < rank; ++d) {
    const int64_t n = mask.shape[d];
    flat = flat * n + (n == 1 ? 0 : idx[4 - rank + d]);
  }
  return flat;
}

// How one qkv call is configured.
struct RunSpec {
  Kernel kernel = Kernel::kReference;
  Accumulate accumulate = Accumulate::kFloat32;
  bool causal = false;
  Alignment alignment = Alignment::kBottomRight;
  bool use_mask = false;
  bool give_out_lse = false;  // pass the fixture's out and lse (else recomputed)
  bool want_dmask = false;
  double scale_factor = 1.0;  // qkv's scale = factor / sqrt(head_dim) (bound check)
};

// The exact (double) backward of a case, plus what the bounds are made of.
// Per row t = (b, h, i) and key j, [rows, seq_kv]: p, dp, ds (0 where the
// pair is not allowed), w = sum_d |dout_td v_jd|, and mask_index (the float
// mask's element the pair adds to, -1 without one).
struct Oracle {
  int64_t batch = 0, num_q_heads = 0, num_kv_heads = 0, seq_q = 0, seq_kv = 0;
  int64_t head_dim = 0, head_dim_v = 0, group_size = 1;
  double scale = 1.0;
  std::vector<uint8_t> allowed;
  std::vector<double> p, dp, ds, w;
  std::vector<int64_t> mask_index;
  std::vector<double> lse, d, row_logit, dout_out_abs;  // [rows]
  std::vector<double> out, abs_pv;                      // [rows, head_dim_v]
  std::vector<double> dq, dk, dv, dmask;                // the gradients
  std::vector<int64_t> dmask_terms;                     // terms summed per dmask element
};

// Computes the case in double with the rules of qkv/mask.h (which, for the
// masks the fixtures use, are torch's):
//   1. s_tj = scale * q_t.k_j + m_tj on allowed pairs, R_t;
//   2. P = softmax(s), lse, out_t = sum_j P v_j;
//   3. D_t = dout_t . out_t, dP = dout_t . v_j, dS = P (dP - D),
//      dq_t = scale sum_j dS k_j, dk_j += scale dS q_t, dv_j += P dout_t,
//      dmask[e(t, j)] += dS.
Oracle ComputeOracle(const Case& c, const RunSpec& run) {
  const Shape4 qs = Shape4Of(c.q), ks = Shape4Of(c.k), vs = Shape4Of(c.v);
  Oracle o;
  o.batch = qs[0], o.num_q_heads = qs[1], o.seq_q = qs[2], o.head_dim = qs[3];
  o.num_kv_heads = ks[1], o.seq_kv = ks[2], o.head_dim_v = vs[3];
  o.group_size = o.num_q_heads / o.num_kv_heads;
  o.scale = 1.0 / std::sqrt(static_cast<double>(o.head_dim));
  const int64_t nk = o.seq_kv, dk = o.head_dim, dv = o.head_dim_v;
  const int64_t rows = o.batch * o.num_q_heads * o.seq_q;
  const NpyArray* mask = run.use_mask ? &*c.mask : nullptr;
  const bool float_mask = mask != nullptr && mask->dtype != DType::kBool;
  o.allowed.assign(rows * nk, 0);
  o.p.assign(rows * nk, 0.0), o.dp = o.ds = o.w = o.p;
  o.mask_index.assign(rows * nk, -1);
  o.lse.assign(rows, -INFINITY), o.d.assign(rows, 0.0);
  o.row_logit = o.dout_out_abs = o.d;
  o.out.assign(rows * dv, 0.0), o.abs_pv = o.out;
  o.dq.assign(c.q.numel(), 0.0), o.dk.assign(c.k.numel(), 0.0), o.dv.assign(c.v.numel(), 0.0);
  if (float_mask) o.dmask.assign(mask->numel(), 0.0), o.dmask_terms.assign(mask->numel(), 0);
  const int64_t diag = run.alignment == Alignment::kBottomRight ? nk - o.seq_q : 0;
  std::vector<double> s(nk);
  for (int64_t t = 0; t < rows; ++t) {
    const int64_t b = t / (o.num_q_heads * o.seq_q), h = t / o.seq_q % o.num_q_heads;
    const int64_t i = t % o.seq_q, kv = b * o.num_kv_heads + h / o.group_size;
    // 1. Masked scaled scores, allowed pairs and R_t.
    double row_max = -INFINITY;
    for (int64_t j = 0; j < nk; ++j) {
      double dot = 0.0, abs_dot = 0.0;
      for (int64_t x = 0; x < dk; ++x) {
        const double qk = At(c.q, t * dk + x) * At(c.k, (kv * nk + j) * dk + x);
        dot += qk;
        abs_dot += std::fabs(qk);
      }
      bool ok = !run.causal || j <= i + diag;
      double m = 0.0;
      if (mask != nullptr) {
        const int64_t e = MaskIndex(*mask, b, h, i, j);
        m = At(*mask, e);
        if (float_mask) {
          ok = ok && m != -INFINITY;
          o.mask_index[t * nk + j] = e;
        } else {
          ok = ok && m != 0.0;
          m = 0.0;
        }
      }
      if (!ok) continue;
      o.allowed[t * nk + j] = 1;
      s[j] = o.scale * dot + m;
      row_max = std::max(row_max, s[j]);
      o.row_logit[t] = std::max(o.row_logit[t], o.scale * abs_dot + std::fabs(m));
    }
    if (row_max == -INFINITY) continue;  // no allowed key: zero gradients
    // 2. Softmax, lse, out and A_td = sum_j P |v_jd|.
    double sum = 0.0;
    for (int64_t j = 0; j < nk; ++j) {
      if (o.allowed[t * nk + j]) sum += std::exp(s[j] - row_max);
    }
    o.lse[t] = row_max + std::log(sum);
    for (int64_t j = 0; j < nk; ++j) {
      if (!o.allowed[t * nk + j]) continue;
      o.p[t * nk + j] = std::exp(s[j] - row_max) / sum;
      for (int64_t x = 0; x < dv; ++x) {
        const double vx = At(c.v, (kv * nk + j) * dv + x);
        o.out[t * dv + x] += o.p[t * nk + j] * vx;
        o.abs_pv[t * dv + x] += o.p[t * nk + j] * std::fabs(vx);
      }
    }
    // 3. D_t; dP, dS; dq; dk, dv and dmask accumulate.
    for (int64_t x = 0; x < dv; ++x) {
      o.d[t] += At(c.dout, t * dv + x) * o.out[t * dv + x];
      o.dout_out_abs[t] += std::fabs(At(c.dout, t * dv + x) * o.out[t * dv + x]);
    }
    for (int64_t j = 0; j < nk; ++j) {
      const int64_t f = t * nk + j;
      if (!o.allowed[f]) continue;
      for (int64_t x = 0; x < dv; ++x) {
        const double gv = At(c.dout, t * dv + x) * At(c.v, (kv * nk + j) * dv + x);
        o.dp[f] += gv;
        o.w[f] += std::fabs(gv);
      }
      o.ds[f] = o.p[f] * (o.dp[f] - o.d[t]);
      for (int64_t x = 0; x < dk; ++x) {
        o.dq[t * dk + x] += o.scale * o.ds[f] * At(c.k, (kv * nk + j) * dk + x);
        o.dk[(kv * nk + j) * dk + x] += o.scale * o.ds[f] * At(c.q, t * dk + x);
      }
      for (int64_t x = 0; x < dv; ++x) {
        o.dv[(kv * nk + j) * dv + x] += o.p[f] * At(c.dout, t * dv + x);
      }
      if (float_mask) {
        o.dmask[o.mask_index[f]] += o.ds[f];
        ++o.dmask_terms[o.mask_index[f]];
      }
    }
  }
  return o;
}

// First-order error bounds of one implementation with unit roundoff u on each
// gradient element (Higham, "Accuracy and Stability of Numerical Algorithms",
// ch. 3; gamma_n ~ n u for an n-term sum or dot product in any order), row t:
//
//   scores s = scale q.k + m: E_s = (D + 6) u R_t, R_t = max_j scale sum|q k|
//     + |m| (the forward test's ScoreError: dot, scale, mask add, max shift);
//   lse (recomputed; a given float64 one is better): E_lse = E_s + (Nk + 2) u
//     + 2u |lse|;
//   P = exp(s - lse): relative eps_P = E_s + E_lse + 2u (R_t + |lse|) (the
//     subtraction, or an exp2 rescale of it) + 2u (exp within 1 ulp); E_P =
//     eps_P P + tiny, tiny the absolute error of exp underflowing;
//   out (recomputed; a given one is better): sum_j E_P |v_jd| + (Nk + 1) u
//     sum_j P |v_jd| + u |out|;
//   dP = dout_t . v_j: E_dP = (Dv + 1) u w_tj, w_tj = sum_d |dout_td v_jd|;
//   D_t as dout . out: (Dv + 1) u sum |dout out| + sum_d |dout_td| E_out; as
//     sum_j P dP (torch's softmax backward): sum_j (E_P |dP| + P E_dP) +
//     (Nk + 1) u sum_j P |dP|; E_D is the larger;
//   dS = P (dP - D): E_dS = E_P |dP - D| + P (E_dP + E_D) + 2u |dS| (the
//     subtraction and the product round once each);
//   dq_td = scale sum_j dS k_jd: scale (sum_j E_dS |k| + (Nk + 1) u sum_j
//     |dS k|) + u |dq| (the scale multiply, wherever it is applied);
//   dk_jd = scale sum_t dS q_td over the group's T = group_size * Nq rows:
//     scale (sum_t E_dS |q| + (T + 1) u sum_t |dS q|) + u |dk|;
//   dv_jd = sum_t P dout_td: sum_t E_P |dout| + (T + 1) u sum_t P |dout|;
//   dmask_e, the sum of its n broadcast dS: sum E_dS + (n + 1) u sum |dS|.
// A pair that is not allowed (or scores -inf) has bound 0: it must add
// exactly nothing, as qkv/attention_backward.h promises (so a key no query
// sees gets dk = dv = 0 exactly, and dmask is 0 where the mask is -inf).
struct Bounds {
  std::vector<double> dq, dk, dv, dmask;
};

Bounds ComputeBounds(const Case& c, const Oracle& o, double u, double tiny) {
  const int64_t nk = o.seq_kv, dk = o.head_dim, dv = o.head_dim_v;
  const int64_t rows = o.batch * o.num_q_heads * o.seq_q;
  const double group_rows = static_cast<double>(o.group_size * o.seq_q);
  Bounds e;
  e.dq.assign(o.dq.size(), 0.0), e.dk.assign(o.dk.size(), 0.0);
  e.dv.assign(o.dv.size(), 0.0), e.dmask.assign(o.dmask.size(), 0.0);
  std::vector<double> dk_abs(e.dk.size(), 0.0), dv_abs(e.dv.size(), 0.0),
      dmask_abs(e.dmask.size(), 0.0), e_p(nk);
  for (int64_t t = 0; t < rows; ++t) {
    if (o.lse[t] == -INFINITY) continue;
    const int64_t b = t / (o.num_q_heads * o.seq_q), h = t / o.seq_q % o.num_q_heads;
    const int64_t kv = b * o.num_kv_heads + h / o.group_size;
    const double r = o.row_logit[t], lse = std::fabs(o.lse[t]);
    const double e_s = (dk + 6) * u * r;
    const double e_lse = e_s + (nk + 2) * u + 2 * u * lse;
    const double eps_p = e_s + e_lse + 2 * u * (r + lse) + 2 * u;
    double e_d_softmax = 0.0, p_dp_abs = 0.0;
    for (int64_t j = 0; j < nk; ++j) {
      const int64_t f = t * nk + j;
      e_p[j] = o.allowed[f] ? eps_p * o.p[f] + tiny : 0.0;
      e_d_softmax += e_p[j] * std::fabs(o.dp[f]) + o.p[f] * (dv + 1) * u * o.w[f];
      p_dp_abs += o.p[f] * std::fabs(o.dp[f]);
    }
    e_d_softmax += (nk + 1) * u * p_dp_abs;
    double e_d_dot = (dv + 1) * u * o.dout_out_abs[t];
    for (int64_t x = 0; x < dv; ++x) {
      double e_out = (nk + 1) * u * o.abs_pv[t * dv + x] + u * std::fabs(o.out[t * dv + x]);
      for (int64_t j = 0; j < nk; ++j) e_out += e_p[j] * std::fabs(At(c.v, (kv * nk + j) * dv + x));
      e_d_dot += std::fabs(At(c.dout, t * dv + x)) * e_out;
    }
    const double e_d = std::max(e_d_dot, e_d_softmax);
    for (int64_t j = 0; j < nk; ++j) {
      const int64_t f = t * nk + j;
      if (!o.allowed[f]) continue;
      const double e_ds = e_p[j] * std::fabs(o.dp[f] - o.d[t]) +
                          o.p[f] * ((dv + 1) * u * o.w[f] + e_d) + 2 * u * std::fabs(o.ds[f]);
      const int64_t kv_row = kv * nk + j;
      for (int64_t x = 0; x < dk; ++x) {
        const double kx = std::fabs(At(c.k, kv_row * dk + x)), qx = std::fabs(At(c.q, t * dk + x));
        e.dq[t * dk + x] += o.scale * (e_ds + (nk + 1) * u * std::fabs(o.ds[f])) * kx;
        e.dk[kv_row * dk + x] += o.scale * e_ds * qx;
        dk_abs[kv_row * dk + x] += o.scale * std::fabs(o.ds[f]) * qx;
      }
      for (int64_t x = 0; x < dv; ++x) {
        const double gx = std::fabs(At(c.dout, t * dv + x));
        e.dv[kv_row * dv + x] += e_p[j] * gx;
        dv_abs[kv_row * dv + x] += o.p[f] * gx;
      }
      if (o.mask_index[f] >= 0) {
        e.dmask[o.mask_index[f]] += e_ds;
        dmask_abs[o.mask_index[f]] += std::fabs(o.ds[f]);
      }
    }
    for (int64_t x = 0; x < dk; ++x) e.dq[t * dk + x] += u * std::fabs(o.dq[t * dk + x]);
  }
  for (size_t n = 0; n < e.dk.size(); ++n) {
    e.dk[n] += (group_rows + 1) * u * dk_abs[n] + u * std::fabs(o.dk[n]);
  }
  for (size_t n = 0; n < e.dv.size(); ++n) e.dv[n] += (group_rows + 1) * u * dv_abs[n];
  for (size_t n = 0; n < e.dmask.size(); ++n) {
    e.dmask[n] += (o.dmask_terms[n] + 1) * u * dmask_abs[n];
  }
  return e;
}

// Element-wise comparison that reports the worst element and the count out of
// bound (gemma ops/matmul_test.cc style).
class Comparison {
 public:
  explicit Comparison(std::string what) : what_(std::move(what)) {}

  void Add(int64_t flat, double expected, double actual, double exact, double bound) {
    ++count_;
    const double diff = expected == actual ? 0.0 : std::fabs(actual - expected);
    const bool ok = diff <= bound;  // false for NaN
    if (!ok) ++bad_;
    const double ratio = ok ? (bound > 0 ? diff / bound : 0.0) : INFINITY;
    if (worst_ < 0 || ratio > worst_ratio_ || (!ok && diff > worst_diff_)) {
      worst_ = flat, worst_ratio_ = ratio, worst_diff_ = diff;
      worst_expected_ = expected, worst_actual_ = actual, worst_exact_ = exact;
      worst_bound_ = bound;
    }
  }

  // Fails the test (and prints) when any element was out of bound.
  void Check() const {
    if (bad_ == 0) return;
    ADD_FAILURE() << what_ << ": " << bad_ << " of " << count_
                  << " elements out of bound; worst at flat index " << worst_ << ": expected "
                  << Fmt(worst_expected_) << " actual " << Fmt(worst_actual_) << " |diff| "
                  << Fmt(worst_diff_) << " bound " << Fmt(worst_bound_) << " (double oracle "
                  << Fmt(worst_exact_) << ")";
  }

  int64_t bad() const { return bad_; }
  double worst_ratio() const { return worst_ratio_; }

 private:
  static std::string Fmt(double x) {
    char buf[40];
    std::snprintf(buf, sizeof(buf), "%.9g", x);
    return buf;
  }
  std::string what_;
  int64_t count_ = 0, bad_ = 0, worst_ = -1;
  double worst_ratio_ = 0, worst_diff_ = 0, worst_expected_ = 0, worst_actual_ = 0,
         worst_exact_ = 0, worst_bound_ = 0;
};

// What qkv wrote (row-major, as double) and which kernel ran.
struct Result {
  std::vector<double> dq, dk, dv, dmask;
  AttentionInfo info;
};

// Returns the elements of a float32 or float64 buffer as double.
std::vector<double> AsDouble(const std::vector<unsigned char>& bytes, DType dtype) {
  std::vector<double> values(bytes.size() / DTypeSize(dtype));
  for (size_t n = 0; n < values.size(); ++n) {
    values[n] = dtype == DType::kFloat64 ? reinterpret_cast<const double*>(bytes.data())[n]
                                         : reinterpret_cast<const float*>(bytes.data())[n];
  }
  return values;
}

// Runs qkv::AttentionBackward on the case (bhsd views of the fixture's own
// bytes); gradients in float64 for float64 accumulation, else float32.
Result RunQkv(const Case& c, const RunSpec& run) {
  const Shape4 qs = Shape4Of(c.q), ks = Shape4Of(c.k), vs = Shape4Of(c.v);
  const DType grad = run.accumulate == Accumulate::kFloat64 ? DType::kFloat64 : DType::kFloat32;
  const size_t gsize = DTypeSize(grad);
  std::vector<unsigned char> dq(c.q.numel() * gsize), dk(c.k.numel() * gsize),
      dv(c.v.numel() * gsize), dmask;
  AttentionBackwardParams p;
  p.q = TensorView::Contiguous(c.q.bytes.data(), c.q.dtype, qs);
  p.k = TensorView::Contiguous(c.k.bytes.data(), c.k.dtype, ks);
  p.v = TensorView::Contiguous(c.v.bytes.data(), c.v.dtype, vs);
  p.dout = TensorView::Contiguous(c.dout.bytes.data(), c.dout.dtype, Shape4Of(c.dout));
  if (run.give_out_lse) {
    p.out = TensorView::Contiguous(c.out.bytes.data(), c.out.dtype, Shape4Of(c.out));
    p.lse = TensorView::Contiguous(c.lse.bytes.data(), c.lse.dtype, {qs[0], qs[1], qs[2], 1});
  }
  p.dq = MutableTensorView::Contiguous(dq.data(), grad, qs);
  p.dk = MutableTensorView::Contiguous(dk.data(), grad, ks);
  p.dv = MutableTensorView::Contiguous(dv.data(), grad, vs);
  p.mask.causal = run.causal;
  p.mask.alignment = run.alignment;
  if (run.use_mask) {
    p.mask.mask = BroadcastMask(c.mask->bytes.data(), c.mask->dtype, c.mask->shape,
                                {qs[0], qs[1], qs[2], ks[2]});
    // BroadcastMask keeps the target's size on broadcast dims (stride 0);
    // size 1 there makes the view's shape the mask's own, dmask's shape.
    for (int d = 0; d < 4; ++d) {
      if (p.mask.mask.strides[d] == 0) p.mask.mask.shape[d] = 1;
    }
  }
  if (run.want_dmask) {
    dmask.resize(c.mask->numel() * gsize);
    p.dmask = MutableTensorView::Contiguous(dmask.data(), grad, p.mask.mask.shape);
  }
  if (run.scale_factor != 1.0) {
    p.scale = run.scale_factor / std::sqrt(static_cast<double>(qs[3]));
  }
  p.kernel = run.kernel;
  p.accumulate = run.accumulate;
  Result r;
  r.info = AttentionBackward(p);
  r.dq = AsDouble(dq, grad), r.dk = AsDouble(dk, grad), r.dv = AsDouble(dv, grad);
  r.dmask = AsDouble(dmask, grad);
  return r;
}

std::string Describe(const Case& c, const RunSpec& run) {
  return "case " + c.name + ", kernel " + KernelName(run.kernel) + ", accumulate " +
         (run.accumulate == Accumulate::kFloat32 ? "float32" : "float64") +
         (run.give_out_lse ? ", out and lse given" : ", out and lse recomputed") +
         (run.causal ? (run.alignment == Alignment::kTopLeft ? ", causal top-left"
                                                             : ", causal bottom-right")
                     : "") +
         (run.use_mask ? ", mask" : "") + (run.want_dmask ? ", dmask" : "");
}

// Compares qkv with torch within E(qkv) + E(torch) + qkv's output rounding,
// and torch with the double oracle within 2 E(torch). Returns how many qkv
// elements were out of bound (failures are reported unless `expect_fail`).
int64_t CompareWithTorch(const Case& c, const RunSpec& run, bool expect_fail = false) {
  SCOPED_TRACE(Describe(c, run));
  const Oracle o = ComputeOracle(c, run);
  const bool f64 = run.accumulate == Accumulate::kFloat64;
  const Bounds e_qkv = ComputeBounds(c, o, f64 ? kUnitF64 : kUnitF32, f64 ? DBL_MIN : FLT_MIN);
  const Bounds e_torch = ComputeBounds(c, o, kUnitF64, DBL_MIN);
  const Result r = RunQkv(c, run);
  // Storing a float32 result: u |x| plus half the smallest subnormal.
  const double store_u = f64 ? 0.0 : kUnitF32, store_tiny = f64 ? 0.0 : 0x1p-150;
  int64_t bad = 0;
  const auto compare = [&](const char* name, const NpyArray& torch,
                           const std::vector<double>& exact,
                           const std::vector<double>& qkv, const std::vector<double>& bq,
                           const std::vector<double>& bt) {
    Comparison fix(std::string(name) + " (torch vs double oracle: fixture or bound problem)");
    Comparison cmp(std::string(name) + " (qkv vs torch)");
    ASSERT_EQ(torch.numel(), static_cast<int64_t>(exact.size())) << name;
    ASSERT_EQ(qkv.size(), exact.size()) << name;
    for (size_t n = 0; n < exact.size(); ++n) {
      const int64_t f = static_cast<int64_t>(n);
      fix.Add(f, exact[n], At(torch, f), exact[n], 2 * bt[n]);
      cmp.Add(f, At(torch, f), qkv[n], exact[n],
              bq[n] + bt[n] + store_u * std::fabs(exact[n]) + store_tiny);
    }
    fix.Check();
    if (!expect_fail) cmp.Check();
    bad += cmp.bad();
  };
  compare("dq", c.dq, o.dq, r.dq, e_qkv.dq, e_torch.dq);
  compare("dk", c.dk, o.dk, r.dk, e_qkv.dk, e_torch.dk);
  compare("dv", c.dv, o.dv, r.dv, e_qkv.dv, e_torch.dv);
  if (run.want_dmask) {
    compare("dmask", *c.dmask, o.dmask, r.dmask, e_qkv.dmask, e_torch.dmask);
  }
  return bad;
}

// Runs the reference kernel in float64 and float32, with out and lse
// recomputed and given.
void CompareReference(const Case& c, RunSpec run) {
  run.kernel = Kernel::kReference;
  for (Accumulate acc : {Accumulate::kFloat64, Accumulate::kFloat32}) {
    for (bool given : {false, true}) {
      run.accumulate = acc;
      run.give_out_lse = given;
      CompareWithTorch(c, run);
    }
  }
}

TEST(TorchBackwardFixtureTest, ManifestHasMagicAndVersion) {
  std::ifstream in(CaseDir("manifest.txt").c_str());
  ASSERT_TRUE(in) << CaseDir("manifest.txt")
                  << ": missing (hint: /usr/bin/python3 tests/gen_backward_fixtures.py)";
  std::string magic, versions;
  std::getline(in, magic);
  std::getline(in, versions);
  EXPECT_EQ(magic, "qkv-torch-backward-fixtures " + std::to_string(kFormatVersion));
  EXPECT_EQ(versions.rfind("torch 1.13", 0), 0u) << versions;
  int cases = 0;
  for (std::string line; std::getline(in, line);) {
    const std::string name = line.substr(0, line.find(' '));
    EXPECT_TRUE(std::filesystem::is_directory(CaseDir(name))) << line;
    ++cases;
  }
  EXPECT_EQ(cases, 5);
}

TEST(TorchBackwardFixtureTest, Plain) { CompareReference(LoadCase("plain"), RunSpec{}); }

TEST(TorchBackwardFixtureTest, CausalTopLeft) {
  RunSpec run;  // torch's is_causal: qkv's causal rule with Alignment::kTopLeft
  run.causal = true;
  run.alignment = Alignment::kTopLeft;
  CompareReference(LoadCase("causal_top_left"), run);
}

// Guards the fixture: with seq_q < seq_kv the bottom-right alignment must give
// other gradients, or the test above would not tell the alignments apart.
TEST(TorchBackwardFixtureTest, CausalBottomRightDiffers) {
  const Case c = LoadCase("causal_top_left");
  RunSpec run;
  run.causal = true;
  const Result r = RunQkv(c, run);
  double max_diff = 0.0;
  for (size_t n = 0; n < r.dk.size(); ++n) {
    max_diff = std::max(max_diff, std::fabs(r.dk[n] - At(c.dk, static_cast<int64_t>(n))));
  }
  EXPECT_GT(max_diff, 0.05);
}

TEST(TorchBackwardFixtureTest, BoolMask) {
  RunSpec run;
  run.use_mask = true;
  CompareReference(LoadCase("bool_mask"), run);
}

// The additive mask and its gradient: dmask.npy is torch's, in the mask's
// rank-3 shape [heads, seq_q, seq_kv] summed over the batch; it is 0 exactly
// where the mask is -inf.
TEST(TorchBackwardFixtureTest, FloatMaskAndDmask) {
  const Case c = LoadCase("float_mask");
  ASSERT_TRUE(c.mask && c.dmask);
  ASSERT_EQ(c.mask->shape.size(), 3u);
  RunSpec run;
  run.use_mask = true;
  CompareReference(c, run);
  run.want_dmask = true;
  CompareReference(c, run);
  // kAuto with dmask runs the reference and says why.
  run.kernel = Kernel::kAuto;
  run.accumulate = Accumulate::kFloat32;
  const Result r = RunQkv(c, run);
  EXPECT_EQ(r.info.kernel, Kernel::kReference);
  EXPECT_NE(r.info.reason.find("dmask"), std::string::npos) << r.info.reason;
  CompareWithTorch(c, run);
}

TEST(TorchBackwardFixtureTest, Gqa) { CompareReference(LoadCase("gqa"), RunSpec{}); }

// The bound is not vacuous: a float32 run whose scale is off by 2^-16
// relative (about 2^8 float32 ulps of every score) is caught (43 elements;
// 2^-17 is the smallest power of two caught, 2 elements; 2^-18 passes).
TEST(TorchBackwardFixtureTest, BoundCatchesAScaleError) {
  RunSpec run;
  run.scale_factor = 1.0 + 0x1p-16;
  EXPECT_GT(CompareWithTorch(LoadCase("plain"), run, /*expect_fail=*/true), 0);
}

// The flash backward (kAuto without dmask or float64) in float32 on every
// case, out and lse recomputed and given.
TEST(TorchBackwardFixtureTest, FlashMatchesTorch) {
  struct Spec {
    const char* name;
    RunSpec run;
  };
  RunSpec causal, masked;
  causal.causal = true;
  causal.alignment = Alignment::kTopLeft;
  masked.use_mask = true;
  for (const Spec& s : {Spec{"plain", {}}, Spec{"causal_top_left", causal},
                        Spec{"bool_mask", masked}, Spec{"float_mask", masked}, Spec{"gqa", {}}}) {
    const Case c = LoadCase(s.name);
    RunSpec run = s.run;
    run.kernel = Kernel::kAuto;
    for (bool given : {false, true}) {
      run.give_out_lse = given;
      EXPECT_EQ(RunQkv(c, run).info.kernel, Kernel::kFlash) << s.name;
      CompareWithTorch(c, run);
    }
  }
}

}  // namespace
}  // namespace qkv
