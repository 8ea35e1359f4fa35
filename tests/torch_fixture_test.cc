// Oracle C: compares qkv::Attention with golden outputs written by PyTorch 1.13
// (tests/gen_torch_fixtures.py; fixtures in tests/testdata/torch/, see its README).
//
// Every comparison uses an error bound computed from the inputs, not a round
// number. The test recomputes each case in double (a small scalar oracle, so
// that the bound's ingredients p_ij and the score magnitudes are exact), then
// bounds |qkv - torch| <= E(qkv) + E(torch), where E is the first-order
// forward error of one implementation with unit roundoff u (derived at
// ScoreError below). A separate check requires |torch - double| <= E(torch):
// when that fails the fixture or the bound is wrong, not qkv.
//
// Measured margin (reference kernel, these fixtures): the worst |qkv - torch|
// is 1-6% of its bound (first-order worst-case bounds add every rounding with
// the same sign); scaling qkv's scale by 1 + 1e-5 (about 80 float32 ulps of
// every score) already fails Plain, 1 + 1e-6 passes.
#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "qkv/attention.h"
#include "qkv/error.h"
#include "qkv/mask.h"
#include "qkv/npy.h"
#include "qkv/tensor.h"

namespace qkv {
namespace {

constexpr double kUnitF32 = 0x1p-24;  // float32 unit roundoff u = eps_f32 / 2
constexpr double kUnitF64 = 0x1p-53;  // float64 unit roundoff
constexpr double kUnitF16 = 0x1p-11;  // float16 unit roundoff
constexpr int kFormatVersion = 1;     // first line of manifest.txt: "qkv-torch-fixtures 1"

std::string CaseDir(const std::string& name) {
  return std::string(QKV_TESTDATA_DIR) + "/torch/" + name;
}

// One fixture folder. Absent files are left empty (dtype/shape unused).
struct Case {
  std::string name;
  NpyArray q, k, v, out, out32, weights, lse;
  std::optional<NpyArray> mask;
};

Case LoadCase(const std::string& name) {
  const std::string dir = CaseDir(name);
  Case c;
  c.name = name;
  c.q = ReadNpy(dir + "/q.npy");
  c.k = ReadNpy(dir + "/k.npy");
  c.v = ReadNpy(dir + "/v.npy");
  c.out = ReadNpy(dir + "/out.npy");
  c.weights = ReadNpy(dir + "/weights.npy");
  c.lse = ReadNpy(dir + "/lse.npy");
  if (std::filesystem::exists(dir + "/out32.npy")) c.out32 = ReadNpy(dir + "/out32.npy");
  if (std::filesystem::exists(dir + "/mask.npy")) c.mask = ReadNpy(dir + "/mask.npy");
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
    case DType::kFloat16:
      return HalfToFloat(a.data<uint16_t>()[flat]);
    case DType::kBool:
      return a.data<unsigned char>()[flat] != 0 ? 1.0 : 0.0;
    default:
      ADD_FAILURE() << "unexpected dtype " << DTypeName(a.dtype);
      return NAN;
  }
}

// Returns mask[b,h,i,j] under NumPy broadcasting of a rank <= 4 array (written
// here independently of qkv::BroadcastMask, so the oracle does not share it).
double MaskAt(const NpyArray& mask, int64_t b, int64_t h, int64_t i, int64_t j) {
  const int64_t idx[4] = {b, h, i, j};
  const size_t rank = mask.shape.size();
  int64_t flat = 0;
  for (size_t d = 0; d < rank; ++d) {
    const int64_t n = mask.shape[d];
    const int64_t index = idx[4 - rank + d];
    flat = flat * n + (n == 1 ? 0 : index);
  }
  return At(mask, flat);
}

// How one qkv call is configured.
struct RunSpec {
  bool use_mask = false;  // pass the fixture's mask.npy
  bool causal = false;
  Alignment alignment = Alignment::kBottomRight;
  Accumulate accumulate = Accumulate::kFloat32;
  DType out_dtype = DType::kFloat32;
  bool bshd = false;                      // q, k, v and out in [batch, seq, heads, dim] memory
  std::optional<NpyArray> mask_override;  // replaces mask.npy when set
};

// Exact (double) attention of a case plus the inputs of the error bound.
struct Oracle {
  Shape4 q_shape, out_shape, w_shape;
  std::vector<double> out, weights, lse;
  std::vector<double> abs_pv;     // [b,h,i,d]  A_id = sum_j p_ij |v_jd|
  std::vector<double> row_logit;  // [b,h,i]    R_i = max_j scale*sum_d|q_id k_jd| + |m_ij|
  int64_t head_dim = 0, seq_kv = 0;
  double max_abs_v = 0.0;
};

// Computes the case in double with the rules of qkv/mask.h (which, for the
// masks the fixtures use, are torch's).
Oracle ComputeOracle(const Case& c, const RunSpec& run) {
  const Shape4 qs = Shape4Of(c.q), ks = Shape4Of(c.k), vs = Shape4Of(c.v);
  const int64_t batch = qs[0], num_q_heads = qs[1], seq_q = qs[2], head_dim = qs[3];
  const int64_t num_kv_heads = ks[1], seq_kv = ks[2], head_dim_v = vs[3];
  const int64_t group_size = num_q_heads / num_kv_heads;
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim));
  const NpyArray* mask = run.mask_override ? &*run.mask_override
                         : run.use_mask    ? &*c.mask
                                           : nullptr;
  Oracle o;
  o.q_shape = qs;
  o.out_shape = {batch, num_q_heads, seq_q, head_dim_v};
  o.w_shape = {batch, num_q_heads, seq_q, seq_kv};
  o.head_dim = head_dim;
  o.seq_kv = seq_kv;
  for (int64_t n = 0; n < c.v.numel(); ++n) {
    o.max_abs_v = std::max(o.max_abs_v, std::fabs(At(c.v, n)));
  }
  o.out.assign(batch * num_q_heads * seq_q * head_dim_v, 0.0);
  o.abs_pv.assign(o.out.size(), 0.0);
  o.weights.assign(batch * num_q_heads * seq_q * seq_kv, 0.0);
  o.lse.assign(batch * num_q_heads * seq_q, -INFINITY);
  o.row_logit.assign(o.lse.size(), 0.0);
  const int64_t diag = run.alignment == Alignment::kBottomRight ? seq_kv - seq_q : 0;
  std::vector<double> s(seq_kv);
  std::vector<bool> allowed(seq_kv);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t h = 0; h < num_q_heads; ++h) {
      const int64_t kvh = h / group_size;
      for (int64_t i = 0; i < seq_q; ++i) {
        const int64_t row = (b * num_q_heads + h) * seq_q + i;
        // 1. Masked scaled scores and the logit magnitude R_i.
        double row_max = -INFINITY, r = 0.0;
        for (int64_t j = 0; j < seq_kv; ++j) {
          double dot = 0.0, abs_dot = 0.0;
          for (int64_t d = 0; d < head_dim; ++d) {
            const double qd = At(c.q, row * head_dim + d);
            const double kd = At(c.k, ((b * num_kv_heads + kvh) * seq_kv + j) * head_dim + d);
            dot += qd * kd;
            abs_dot += std::fabs(qd * kd);
          }
          bool ok = !run.causal || j <= i + diag;
          double m = 0.0;
          if (mask != nullptr) {
            m = MaskAt(*mask, b, h, i, j);
            if (mask->dtype == DType::kBool) {
              ok = ok && m != 0.0;
              m = 0.0;
            } else {
              ok = ok && m != -INFINITY;
            }
          }
          allowed[j] = ok;
          if (!ok) continue;
          s[j] = scale * dot + m;
          row_max = std::max(row_max, s[j]);
          r = std::max(r, scale * abs_dot + std::fabs(m));
        }
        o.row_logit[row] = r;
        if (row_max == -INFINITY) continue;  // fully masked: zeros, lse = -inf
        // 2. Softmax and log-sum-exp.
        double sum = 0.0;
        for (int64_t j = 0; j < seq_kv; ++j) {
          if (allowed[j]) sum += std::exp(s[j] - row_max);
        }
        o.lse[row] = row_max + std::log(sum);
        // 3. P.V and A_id = sum_j p_ij |v_jd|.
        for (int64_t j = 0; j < seq_kv; ++j) {
          if (!allowed[j]) continue;
          const double p = std::exp(s[j] - row_max) / sum;
          o.weights[row * seq_kv + j] = p;
          for (int64_t d = 0; d < head_dim_v; ++d) {
            const double vd = At(c.v, ((b * num_kv_heads + kvh) * seq_kv + j) * head_dim_v + d);
            o.out[row * head_dim_v + d] += p * vd;
            o.abs_pv[row * head_dim_v + d] += p * std::fabs(vd);
          }
        }
      }
    }
  }
  return o;
}

// First-order forward error of one float implementation with unit roundoff u
// (Higham, "Accuracy and Stability of Numerical Algorithms", ch. 3):
//
// Score s_ij = scale * sum_d q_id k_jd + m_ij, then s_ij - row_max:
//   head_dim products summed (gamma_D ~ D u of scale*sum|q k|), the scale
//   multiply (u; or q and k each pre-scaled: 2u), the mask add (u |s|+|m|),
//   the max subtraction (u |s - max| <= 2u R): at most (D + 6) u R_i with
//   R_i = max_j scale*sum_d |q_id k_jd| + |m_ij|.
double ScoreError(const Oracle& o, int64_t row, double u) {
  return (o.head_dim + 6) * u * o.row_logit[row];
}
// Softmax, relative error of p_ij: shift invariance makes a score error
//   count twice (|dp/p| <= |ds_ij| + sum_k p_k |ds_ik|), exp adds <= 1 ulp
//   (2u; std::exp and hn::Exp), the seq_kv-term denominator gamma_Nk, the
//   division (or reciprocal and multiply) 2u: 2*ScoreError + (Nk + 6) u.
double WeightRelError(const Oracle& o, int64_t row, double u) {
  return 2.0 * ScoreError(o, row, u) + (o.seq_kv + 6) * u;
}
// Output o_id = sum_j p_ij v_jd: sum_j |dp_ij| |v_jd| + gamma_Nk sum_j p_ij |v_jd|,
//   i.e. (WeightRelError + Nk u) * A_id. The caller adds seq_kv * FLT_MIN *
//   max|v| for weights that underflow to 0 (a float exp(x) with x < -87).
double OutError(const Oracle& o, int64_t row, int64_t flat, double u) {
  return (WeightRelError(o, row, u) + o.seq_kv * u) * o.abs_pv[flat];
}
// LSE = row_max + log(sum_j exp(s_ij - row_max)): a score error moves it by
//   at most max_j |ds_ij| (its gradient is p, summing to 1); the sum's
//   relative error (Nk + 2) u is absolute after log; log and the final add
//   round: 2u |lse|.
double LseError(const Oracle& o, int64_t row, double u) {
  return ScoreError(o, row, u) + (o.seq_kv + 2) * u + 2.0 * u * std::fabs(o.lse[row]);
}

// Element-wise comparison that reports the worst element and the count out of
// bound (gemma ops/matmul_test.cc style).
class Comparison {
 public:
  Comparison(std::string what, Shape4 shape) : what_(std::move(what)), shape_(shape) {}

  void Add(int64_t flat, double expected, double actual, double exact, double bound) {
    ++count_;
    double diff = std::fabs(actual - expected);
    if (expected == actual) diff = 0.0;  // both -inf (fully masked lse)
    const bool ok = diff <= bound;       // false for NaN
    if (!ok) ++bad_;
    const double ratio = ok ? (bound > 0 ? diff / bound : 0.0) : INFINITY;
    if (worst_ < 0 || ratio > worst_ratio_ ||
        (!ok && ratio == worst_ratio_ && diff > worst_diff_)) {
      worst_ = flat;
      worst_ratio_ = ratio;
      worst_diff_ = diff;
      worst_expected_ = expected;
      worst_actual_ = actual;
      worst_exact_ = exact;
      worst_bound_ = bound;
    }
  }

  // Fails the test (and prints) when any element was out of bound.
  void Check() const {
    if (bad_ == 0) return;
    int64_t idx[4], rest = worst_;
    for (int d = 3; d >= 0; --d) {
      idx[d] = rest % shape_[d];
      rest /= shape_[d];
    }
    ADD_FAILURE() << what_ << ": " << bad_ << " of " << count_
                  << " elements out of bound; worst at [" << idx[0] << "," << idx[1] << ","
                  << idx[2] << "," << idx[3] << "]: expected " << Fmt(worst_expected_) << " actual "
                  << Fmt(worst_actual_) << " |diff| " << Fmt(worst_diff_) << " bound "
                  << Fmt(worst_bound_) << " (double oracle " << Fmt(worst_exact_) << ")";
  }

  double worst_ratio() const { return worst_ratio_; }

 private:
  static std::string Fmt(double x) {
    char buf[40];
    std::snprintf(buf, sizeof(buf), "%.9g", x);
    return buf;
  }
  std::string what_;
  Shape4 shape_;
  int64_t count_ = 0, bad_ = 0, worst_ = -1;
  double worst_ratio_ = 0, worst_diff_ = 0, worst_expected_ = 0, worst_actual_ = 0,
         worst_exact_ = 0, worst_bound_ = 0;
};

// What qkv wrote, in row-major [b,h,s,d] order.
struct Result {
  std::vector<double> out, weights, lse;
};

// Returns a copy of row-major [b,h,s,d] bytes rearranged as [b,s,h,d].
std::vector<unsigned char> ToBSHD(const NpyArray& a) {
  const Shape4 s = Shape4Of(a);
  const size_t size = DTypeSize(a.dtype);
  const TensorView bshd = TensorView::FromBSHD(nullptr, a.dtype, s[0], s[2], s[1], s[3]);
  std::vector<unsigned char> bytes(a.bytes.size());
  int64_t flat = 0;
  for (int64_t b = 0; b < s[0]; ++b)
    for (int64_t h = 0; h < s[1]; ++h)
      for (int64_t i = 0; i < s[2]; ++i)
        for (int64_t d = 0; d < s[3]; ++d, ++flat)
          std::copy_n(&a.bytes[flat * size], size, &bytes[bshd.Offset(b, h, i, d) * size]);
  return bytes;
}

// Returns element (b,h,i,d) of every view position in row-major order, as double.
template <class T, class Convert>
std::vector<double> ReadBack(const MutableTensorView& view, const T* data, Convert convert) {
  std::vector<double> values;
  const Shape4& s = view.shape;
  for (int64_t b = 0; b < s[0]; ++b)
    for (int64_t h = 0; h < s[1]; ++h)
      for (int64_t i = 0; i < s[2]; ++i)
        for (int64_t d = 0; d < s[3]; ++d) values.push_back(convert(data[view.Offset(b, h, i, d)]));
  return values;
}

// Runs qkv::Attention on the case: bhsd views (Contiguous) or bshd ones.
Result RunQkv(const Case& c, const RunSpec& run) {
  const Shape4 qs = Shape4Of(c.q), ks = Shape4Of(c.k), vs = Shape4Of(c.v);
  const Shape4 out_shape{qs[0], qs[1], qs[2], vs[3]};
  const Shape4 w_shape{qs[0], qs[1], qs[2], ks[2]};
  const Shape4 lse_shape{qs[0], qs[1], qs[2], 1};
  const int64_t out_n = out_shape[0] * out_shape[1] * out_shape[2] * out_shape[3];
  std::vector<float> out32(out_n, NAN);
  std::vector<uint16_t> out16(out_n, FloatToHalf(NAN));
  std::vector<float> weights(w_shape[0] * w_shape[1] * w_shape[2] * w_shape[3], NAN);
  std::vector<float> lse(qs[0] * qs[1] * qs[2], NAN);
  void* out_data = run.out_dtype == DType::kFloat16 ? static_cast<void*>(out16.data())
                                                    : static_cast<void*>(out32.data());

  AttentionParams p;
  std::vector<unsigned char> q_bshd, k_bshd, v_bshd;
  if (run.bshd) {
    q_bshd = ToBSHD(c.q);
    k_bshd = ToBSHD(c.k);
    v_bshd = ToBSHD(c.v);
    p.q = TensorView::FromBSHD(q_bshd.data(), c.q.dtype, qs[0], qs[2], qs[1], qs[3]);
    p.k = TensorView::FromBSHD(k_bshd.data(), c.k.dtype, ks[0], ks[2], ks[1], ks[3]);
    p.v = TensorView::FromBSHD(v_bshd.data(), c.v.dtype, vs[0], vs[2], vs[1], vs[3]);
    p.out = MutableTensorView::FromBSHD(out_data, run.out_dtype, out_shape[0], out_shape[2],
                                        out_shape[1], out_shape[3]);
  } else {
    p.q = TensorView::Contiguous(c.q.bytes.data(), c.q.dtype, qs);
    p.k = TensorView::Contiguous(c.k.bytes.data(), c.k.dtype, ks);
    p.v = TensorView::Contiguous(c.v.bytes.data(), c.v.dtype, vs);
    p.out = MutableTensorView::Contiguous(out_data, run.out_dtype, out_shape);
  }
  p.weights = MutableTensorView::Contiguous(weights.data(), DType::kFloat32, w_shape);
  p.lse = MutableTensorView::Contiguous(lse.data(), DType::kFloat32, lse_shape);
  p.mask.causal = run.causal;
  p.mask.alignment = run.alignment;
  p.accumulate = run.accumulate;
  const NpyArray* mask = run.mask_override ? &*run.mask_override
                         : run.use_mask    ? &*c.mask
                                           : nullptr;
  if (mask != nullptr) {
    p.mask.mask = BroadcastMask(mask->bytes.data(), mask->dtype, mask->shape, w_shape);
  }
  Attention(p);

  const auto to_double = [](float x) { return static_cast<double>(x); };
  Result r;
  r.out = run.out_dtype == DType::kFloat16
              ? ReadBack(p.out, out16.data(), [](uint16_t x) { return double{HalfToFloat(x)}; })
              : ReadBack(p.out, out32.data(), to_double);
  r.weights = ReadBack(p.weights, weights.data(), to_double);
  r.lse = ReadBack(p.lse, lse.data(), to_double);
  return r;
}

const char* AccName(Accumulate a) { return a == Accumulate::kFloat32 ? "float32" : "float64"; }

// Compares qkv with torch's fixture within E(qkv) + E(torch), and the fixture
// with the double oracle within E(torch). Rows where skip_row(row) is true
// (row = (b * num_q_heads + h) * seq_q + i) are left out: torch has no answer
// there. Returns what qkv wrote, for qkv-only checks on those rows.
Result CompareWithTorch(const Case& c, const RunSpec& run,
                        const std::function<bool(int64_t)>& skip_row = nullptr) {
  SCOPED_TRACE("case " + c.name + ", accumulate " + AccName(run.accumulate) + ", out " +
               DTypeName(run.out_dtype) +
               (run.causal ? (run.alignment == Alignment::kTopLeft ? ", causal top-left"
                                                                   : ", causal bottom-right")
                           : "") +
               (run.use_mask || run.mask_override ? ", mask" : "") + (run.bshd ? ", bshd" : ""));
  const Oracle o = ComputeOracle(c, run);
  const Result r = RunQkv(c, run);
  const double u_qkv = run.accumulate == Accumulate::kFloat32 ? kUnitF32 : kUnitF64;
  const bool half_out = run.out_dtype == DType::kFloat16;
  // Torch's float32 output (for the float16 case out.npy is the rounded one).
  const NpyArray& torch_out32 = c.q.dtype == DType::kFloat16 ? c.out32 : c.out;
  const NpyArray& torch_out = half_out ? c.out : torch_out32;

  const Shape4 lse_shape{o.q_shape[0], o.q_shape[1], o.q_shape[2], 1};
  Comparison out("out (qkv vs torch)", o.out_shape);
  Comparison out_fix("out (torch vs double oracle: fixture or bound problem)", o.out_shape);
  Comparison w("weights (qkv vs torch)", o.w_shape);
  Comparison w_fix("weights (torch vs double oracle: fixture or bound problem)", o.w_shape);
  Comparison lse("lse (qkv vs torch)", lse_shape);
  Comparison lse_fix("lse (torch vs double oracle: fixture or bound problem)", lse_shape);
  const int64_t head_dim_v = o.out_shape[3], seq_kv = o.seq_kv;
  for (int64_t row = 0; row < static_cast<int64_t>(o.lse.size()); ++row) {
    if (skip_row && skip_row(row)) continue;
    for (int64_t d = 0; d < head_dim_v; ++d) {
      const int64_t f = row * head_dim_v + d;
      // qkv stores its float32 (or float64) result in a float32 view: one more
      // rounding, u |o|. Underflowed weights (see OutError) add the floor.
      const double floor = seq_kv * FLT_MIN * o.max_abs_v;
      const double e_torch = OutError(o, row, f, kUnitF32) + floor;
      double bound = e_torch + OutError(o, row, f, u_qkv) + kUnitF32 * std::fabs(o.out[f]);
      if (half_out) {
        // Both sides rounded a float to half: each moves <= u16 |x| (or half
        // the subnormal spacing 2^-25): add 2 u16 (|o| + bound) + 2^-24.
        bound += 2.0 * kUnitF16 * (std::fabs(o.out[f]) + bound) + 0x1p-24;
      }
      out.Add(f, At(torch_out, f), r.out[f], o.out[f], bound);
      out_fix.Add(f, o.out[f], At(torch_out32, f), o.out[f], e_torch);
    }
    for (int64_t j = 0; j < seq_kv; ++j) {
      const int64_t f = row * seq_kv + j;
      const double p = o.weights[f];
      const double e_torch = WeightRelError(o, row, kUnitF32) * p + FLT_MIN;
      const double bound = e_torch + WeightRelError(o, row, u_qkv) * p + kUnitF32 * p + FLT_MIN;
      w.Add(f, At(c.weights, f), r.weights[f], p, bound);
      w_fix.Add(f, p, At(c.weights, f), p, e_torch);
    }
    const double e_torch = LseError(o, row, kUnitF32);
    const double bound = e_torch + LseError(o, row, u_qkv) + kUnitF32 * std::fabs(o.lse[row]);
    lse.Add(row, At(c.lse, row), r.lse[row], o.lse[row], bound);
    lse_fix.Add(row, o.lse[row], At(c.lse, row), o.lse[row], e_torch);
  }
  out_fix.Check();
  w_fix.Check();
  lse_fix.Check();
  out.Check();
  w.Check();
  lse.Check();
  return r;
}

// Runs `run` with float32 accumulation and again with the float64 oracle mode.
void CompareBothAccumulations(const Case& c, RunSpec run) {
  for (Accumulate acc : {Accumulate::kFloat32, Accumulate::kFloat64}) {
    run.accumulate = acc;
    CompareWithTorch(c, run);
  }
}

TEST(TorchFixtureTest, ManifestHasMagicAndVersion) {
  std::ifstream in(CaseDir("manifest.txt").c_str());
  ASSERT_TRUE(in) << CaseDir("manifest.txt")
                  << ": missing (hint: /usr/bin/python3 tests/gen_torch_fixtures.py)";
  std::string magic, versions;
  std::getline(in, magic);
  std::getline(in, versions);
  EXPECT_EQ(magic, "qkv-torch-fixtures " + std::to_string(kFormatVersion));
  EXPECT_EQ(versions.rfind("torch 1.13", 0), 0u) << versions;
}

TEST(TorchFixtureTest, Plain) { CompareBothAccumulations(LoadCase("plain"), RunSpec{}); }

TEST(TorchFixtureTest, PlainBshdLayout) {
  RunSpec run;
  run.bshd = true;
  CompareBothAccumulations(LoadCase("plain"), run);
}

TEST(TorchFixtureTest, CausalSquareEitherAlignment) {
  const Case c = LoadCase("causal_square");
  for (Alignment a : {Alignment::kTopLeft, Alignment::kBottomRight}) {
    RunSpec run;
    run.causal = true;
    run.alignment = a;
    CompareBothAccumulations(c, run);
  }
}

TEST(TorchFixtureTest, CausalTopLeft) {
  const Case c = LoadCase("causal_top_left");
  RunSpec run;  // torch's is_causal: qkv's causal rule with Alignment::kTopLeft
  run.causal = true;
  run.alignment = Alignment::kTopLeft;
  CompareBothAccumulations(c, run);
  run.use_mask = true;  // the same rule twice (AND) changes nothing
  CompareBothAccumulations(c, run);
  run.causal = false;  // the explicit boolean mask alone
  CompareBothAccumulations(c, run);
}

TEST(TorchFixtureTest, CausalBottomRight) {
  const Case c = LoadCase("causal_bottom_right");
  RunSpec run;  // qkv's default alignment
  run.causal = true;
  CompareBothAccumulations(c, run);
  run.causal = false;
  run.use_mask = true;
  CompareBothAccumulations(c, run);
}

// Guards the two causal fixtures: with seq_q != seq_kv the alignments must
// give different answers, or the tests above would not tell them apart.
TEST(TorchFixtureTest, CausalAlignmentsDifferWhenSeqQBelowSeqKv) {
  const Case c = LoadCase("causal_top_left");
  RunSpec run;
  run.causal = true;
  run.alignment = Alignment::kBottomRight;
  const Result r = RunQkv(c, run);
  double max_diff = 0.0;
  for (size_t f = 0; f < r.out.size(); ++f) {
    max_diff = std::max(max_diff, std::fabs(r.out[f] - At(c.out, static_cast<int64_t>(f))));
  }
  EXPECT_GT(max_diff, 0.1);
}

TEST(TorchFixtureTest, BoolMask2d) {
  RunSpec run;
  run.use_mask = true;
  CompareBothAccumulations(LoadCase("bool_mask_2d"), run);
}

TEST(TorchFixtureTest, BoolMask4d) {
  RunSpec run;
  run.use_mask = true;
  CompareBothAccumulations(LoadCase("bool_mask_4d"), run);
}

TEST(TorchFixtureTest, FloatMask) {
  RunSpec run;
  run.use_mask = true;
  CompareBothAccumulations(LoadCase("float_mask"), run);
}

TEST(TorchFixtureTest, Gqa) { CompareBothAccumulations(LoadCase("gqa"), RunSpec{}); }

TEST(TorchFixtureTest, Float16InputsFloat32AndFloat16Out) {
  const Case c = LoadCase("float16");
  ASSERT_EQ(c.q.dtype, DType::kFloat16);
  ASSERT_EQ(c.out.dtype, DType::kFloat16);
  ASSERT_EQ(c.out32.dtype, DType::kFloat32);
  RunSpec run;
  CompareBothAccumulations(c, run);  // float32 out vs out32.npy
  run.out_dtype = DType::kFloat16;
  CompareBothAccumulations(c, run);  // float16 out vs out.npy
}

// qkv-only behaviour (torch 1.13 gives NaN here, so it is no fixture): a fully
// masked row gives zeros and lse = -inf, and leaves the other rows as torch's.
TEST(TorchFixtureTest, FullyMaskedRowIsZeroOthersMatchTorch) {
  const Case c = LoadCase("bool_mask_2d");
  ASSERT_TRUE(c.mask.has_value());
  constexpr int64_t kEmptyRow = 2;
  NpyArray mask = *c.mask;  // [seq_q, seq_kv]
  const int64_t seq_q = mask.shape[0], seq_kv = mask.shape[1];
  for (int64_t j = 0; j < seq_kv; ++j) mask.data<unsigned char>()[kEmptyRow * seq_kv + j] = 0;
  RunSpec run;
  run.mask_override = mask;
  const auto empty = [&](int64_t row) { return row % seq_q == kEmptyRow; };
  for (Accumulate acc : {Accumulate::kFloat32, Accumulate::kFloat64}) {
    SCOPED_TRACE(AccName(acc));
    run.accumulate = acc;
    const Result r = CompareWithTorch(c, run, empty);
    const int64_t head_dim_v = c.v.shape[3];
    for (int64_t row = 0; row < static_cast<int64_t>(r.lse.size()); ++row) {
      if (!empty(row)) continue;
      EXPECT_EQ(r.lse[row], -INFINITY) << "row " << row;
      for (int64_t d = 0; d < head_dim_v; ++d) {
        EXPECT_EQ(r.out[row * head_dim_v + d], 0.0) << "row " << row << " d " << d;
      }
      for (int64_t j = 0; j < seq_kv; ++j) {
        EXPECT_EQ(r.weights[row * seq_kv + j], 0.0) << "row " << row << " j " << j;
      }
    }
  }
}

}  // namespace
}  // namespace qkv
