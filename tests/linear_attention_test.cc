// Linear attention (qkv/linear_attention.h) against an independent float64
// oracle that forms the quadratic form explicitly,
//   A_ij = phi(q_i) . phi(k_j)  (j <= i + seq_kv - seq_q when causal)
//   out_i = sum_j A_ij v_j / sum_j A_ij          (0 when the sum is 0),
// its analytic gradients (through d out_i / d A_ij = (v_j - out_i) / den_i, a
// different formula from the kernel's S' g'), and finite differences.
//
// Error bounds. The kernel and the oracle both sum the products
// phi(q_ia) phi(k_ja) v_je in float64 (unit roundoff u = 2^-53), in different
// orders. A sum of m products of 3 rounded factors has error <= (m' + 3) u
// times the sum of the absolute terms, where m' is the depth of the summation
// (the kernel: n keys + 16 partial states into S', then head_dim terms, plus
// the chunk's head_dim-term A and its chunk terms: <= n + 2 head_dim + 20).
// phi itself is within 2 u (the oracle writes elu(x) + 1 with expm1, the
// kernel e^x). With T_e = sum_j |A|_ij |v_je|, T = sum_j |A|_ij (|A|_ij =
// sum_a |phi(q_ia) phi(k_ja)|), num and den each have error <= c T u, so
//   |d out_e| <= u_out |out_e| + 2 c u (T_e + |out_e| T) / |den|,
//   c = n + 2 head_dim + 40   (2: kernel and oracle),
// u_out the output's rounding (2^-24 float32, 2^-11 float16, 0 float64).
// For elu and relu T = den (no cancellation), so the bound is ~2 c u relative;
// identity rows with cancelling terms get T / |den| times more, as they should.
// The gradient bounds follow the same pattern (GradBounds below).
#include "qkv/linear_attention.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "cli_test_util.h"
#include "file_test_util.h"
#include "kernels/linear_attention.h"
#include "qkv/error.h"
#include "simd_test_util.h"
#include "test_util.h"

namespace qkv::test {
namespace {

constexpr FeatureMap kMaps[] = {FeatureMap::kElu, FeatureMap::kRelu, FeatureMap::kIdentity};

// One problem in contiguous [b, h, s, d] doubles.
struct Lin {
  int64_t B = 1, H = 1, G = 1, NQ = 1, NK = 1, D = 1, DV = 1;
  std::vector<double> q, k, v, dout;
  FeatureMap fm = FeatureMap::kElu;
  bool causal = false;
};

Lin RandomLin(int64_t B, int64_t H, int64_t G, int64_t NQ, int64_t NK, int64_t D, int64_t DV,
              uint64_t seed) {
  std::mt19937_64 rng(seed);
  Lin c;
  c.B = B, c.H = H, c.G = G, c.NQ = NQ, c.NK = NK, c.D = D, c.DV = DV;
  c.q = RandomValues(B * H * NQ * D, rng);
  c.k = RandomValues(B * G * NK * D, rng);
  c.v = RandomValues(B * G * NK * DV, rng);
  c.dout = RandomValues(B * H * NQ * DV, rng);
  return c;
}

void RoundToHalf(Lin& c) {
  for (auto* t : {&c.q, &c.k, &c.v, &c.dout})
    for (double& x : *t) x = HalfToFloat(FloatToHalf(static_cast<float>(x)));
}

double PhiRef(FeatureMap fm, double x) {
  if (fm == FeatureMap::kElu) return (x > 0 ? x : std::expm1(x)) + 1.0;  // elu(x) + 1
  if (fm == FeatureMap::kRelu) return std::max(x, 0.0);
  return x;
}
double PhiGradRef(FeatureMap fm, double x) {
  if (fm == FeatureMap::kElu) return x > 0 ? 1.0 : std::exp(x);
  if (fm == FeatureMap::kRelu) return x > 0 ? 1.0 : 0.0;
  return 1.0;
}

struct OracleOut {
  std::vector<double> out, den, t_den, t_num;        // out, t_num [rows, DV]; den, t_den [rows]
  std::vector<double> dq, dk, dv, m_dq, m_dk, m_dv;  // gradients and their magnitudes
};

// Oracle: the quadratic form, numbered passes, no tricks.
OracleOut Oracle(const Lin& c, bool grads = false) {
  const int64_t B = c.B, H = c.H, G = c.G, NQ = c.NQ, NK = c.NK, D = c.D, DV = c.DV;
  OracleOut o;
  o.out.assign(B * H * NQ * DV, 0.0), o.t_num = o.out;
  o.den.assign(B * H * NQ, 0.0), o.t_den = o.den;
  o.dq.assign(c.q.size(), 0.0), o.m_dq = o.dq;
  o.dk.assign(c.k.size(), 0.0), o.m_dk = o.dk;
  o.dv.assign(c.v.size(), 0.0), o.m_dv = o.dv;
  // 0. phi and phi' of every q and k element.
  std::vector<double> phi_q(c.q.size()), phi_k(c.k.size()), grad_q(c.q.size()), grad_k(c.k.size());
  for (size_t x = 0; x < c.q.size(); ++x)
    phi_q[x] = PhiRef(c.fm, c.q[x]), grad_q[x] = PhiGradRef(c.fm, c.q[x]);
  for (size_t x = 0; x < c.k.size(); ++x)
    phi_k[x] = PhiRef(c.fm, c.k[x]), grad_k[x] = PhiGradRef(c.fm, c.k[x]);
  std::vector<double> a(NK), abs_a(NK);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t g = h / (H / G);
      for (int64_t i = 0; i < NQ; ++i) {
        const int64_t row = (b * H + h) * NQ + i;
        auto fq = [&](int64_t x) { return phi_q[row * D + x]; };
        auto kidx = [&](int64_t j) { return (b * G + g) * NK + j; };
        auto fk = [&](int64_t j, int64_t x) { return phi_k[kidx(j) * D + x]; };
        // 1. Scores of the keys this row sees.
        const int64_t last = c.causal ? std::min(NK - 1, i + NK - NQ) : NK - 1;
        for (int64_t j = 0; j <= last; ++j) {
          a[j] = abs_a[j] = 0.0;
          for (int64_t x = 0; x < D; ++x)
            a[j] += fq(x) * fk(j, x), abs_a[j] += std::fabs(fq(x) * fk(j, x));
        }
        // 2. Numerator, denominator, output.
        double& den = o.den[row];
        for (int64_t j = 0; j <= last; ++j) {
          den += a[j], o.t_den[row] += abs_a[j];
          for (int64_t e = 0; e < DV; ++e) {
            o.out[row * DV + e] += a[j] * c.v[kidx(j) * DV + e];
            o.t_num[row * DV + e] += abs_a[j] * std::fabs(c.v[kidx(j) * DV + e]);
          }
        }
        for (int64_t e = 0; e < DV; ++e)
          o.out[row * DV + e] = den == 0 ? 0.0 : o.out[row * DV + e] / den;
        if (!grads || den == 0) continue;
        // 3. Gradients: dA_ij = dout_i . (v_j - out_i) / den_i.
        const double* dout = &c.dout[row * DV];
        const double* out = &o.out[row * DV];
        const double amp = (1.0 + o.t_den[row] / std::fabs(den)) / std::fabs(den);
        double w = 0.0;  // error carried by out into dout . out
        for (int64_t e = 0; e < DV; ++e)
          w += std::fabs(dout[e]) *
               (std::fabs(out[e]) +
                (o.t_num[row * DV + e] + std::fabs(out[e]) * o.t_den[row]) / std::fabs(den));
        for (int64_t j = 0; j <= last; ++j) {
          double da = 0.0, vmag = w;
          for (int64_t e = 0; e < DV; ++e) {
            const double vj = c.v[kidx(j) * DV + e];
            da += dout[e] * (vj - out[e]) / den;
            vmag += std::fabs(dout[e] * vj);
            o.dv[kidx(j) * DV + e] += a[j] * dout[e] / den;
            o.m_dv[kidx(j) * DV + e] += abs_a[j] * std::fabs(dout[e]) * amp;
          }
          for (int64_t x = 0; x < D; ++x) {
            const double gq = fk(j, x) * grad_q[row * D + x], gk = fq(x) * grad_k[kidx(j) * D + x];
            o.dq[row * D + x] += da * gq;
            o.m_dq[row * D + x] += std::fabs(gq) * vmag * amp;
            o.dk[kidx(j) * D + x] += da * gk;
            o.m_dk[kidx(j) * D + x] += std::fabs(gk) * vmag * amp;
          }
        }
      }
    }
  return o;
}

// A tensor in memory of a given dtype and layout (bhsd or bshd).
struct Buf {
  std::vector<unsigned char> bytes;
  DType dtype = DType::kFloat32;
  Shape4 shape{};
  bool bshd = false;
  int64_t Index(int64_t b, int64_t h, int64_t s, int64_t d) const {
    return bshd ? ((b * shape[2] + s) * shape[1] + h) * shape[3] + d
                : ((b * shape[1] + h) * shape[2] + s) * shape[3] + d;
  }
  MutableTensorView View() {
    void* p = bytes.empty() ? nullptr : bytes.data();
    return bshd ? MutableTensorView::FromBSHD(p, dtype, shape[0], shape[2], shape[1], shape[3])
                : MutableTensorView::Contiguous(p, dtype, shape);
  }
  TensorView CView() {
    const MutableTensorView m = View();
    return {m.data, m.dtype, m.shape, m.strides};
  }
  // Returns the values in bhsd order as double.
  std::vector<double> Read() const {
    std::vector<double> x;
    for (int64_t b = 0; b < shape[0]; ++b)
      for (int64_t h = 0; h < shape[1]; ++h)
        for (int64_t s = 0; s < shape[2]; ++s)
          for (int64_t d = 0; d < shape[3]; ++d) {
            const int64_t i = Index(b, h, s, d);
            if (dtype == DType::kFloat64)
              x.push_back(reinterpret_cast<const double*>(bytes.data())[i]);
            else if (dtype == DType::kFloat32)
              x.push_back(reinterpret_cast<const float*>(bytes.data())[i]);
            else
              x.push_back(HalfToFloat(reinterpret_cast<const uint16_t*>(bytes.data())[i]));
          }
    return x;
  }
};

// Writes bhsd values `x` (or `fill` everywhere when x is empty).
Buf MakeBuf(const std::vector<double>& x, DType dtype, Shape4 shape, bool bshd, double fill = 0) {
  Buf buf;
  buf.dtype = dtype, buf.shape = shape, buf.bshd = bshd;
  const int64_t n = shape[0] * shape[1] * shape[2] * shape[3];
  buf.bytes.assign(n * DTypeSize(dtype), 0);
  int64_t src = 0;
  for (int64_t b = 0; b < shape[0]; ++b)
    for (int64_t h = 0; h < shape[1]; ++h)
      for (int64_t s = 0; s < shape[2]; ++s)
        for (int64_t d = 0; d < shape[3]; ++d, ++src) {
          const double val = x.empty() ? fill : x[src];
          const int64_t i = buf.Index(b, h, s, d);
          if (dtype == DType::kFloat64)
            reinterpret_cast<double*>(buf.bytes.data())[i] = val;
          else if (dtype == DType::kFloat32)
            reinterpret_cast<float*>(buf.bytes.data())[i] = static_cast<float>(val);
          else
            reinterpret_cast<uint16_t*>(buf.bytes.data())[i] = FloatToHalf(static_cast<float>(val));
        }
  return buf;
}

struct RunOpts {
  DType in = DType::kFloat32, out = DType::kFloat32;
  bool bshd = false;
  int threads = 0;
  int64_t chunk = 64;
};

struct Bufs {
  Buf q, k, v, dout, out, dq, dk, dv;
  Bufs(const Lin& c, const RunOpts& o) {
    q = MakeBuf(c.q, o.in, {c.B, c.H, c.NQ, c.D}, o.bshd);
    k = MakeBuf(c.k, o.in, {c.B, c.G, c.NK, c.D}, o.bshd);
    v = MakeBuf(c.v, o.in, {c.B, c.G, c.NK, c.DV}, o.bshd);
    dout = MakeBuf(c.dout, o.in, {c.B, c.H, c.NQ, c.DV}, o.bshd);
    out = MakeBuf({}, o.out, {c.B, c.H, c.NQ, c.DV}, o.bshd, 7.0);
    dq = MakeBuf({}, o.out, q.shape, o.bshd, 7.0);
    dk = MakeBuf({}, o.out, k.shape, o.bshd, 7.0);
    dv = MakeBuf({}, o.out, v.shape, o.bshd, 7.0);
  }
  LinearAttentionParams Forward(const Lin& c, const RunOpts& o) {
    LinearAttentionParams p;
    p.q = q.CView(), p.k = k.CView(), p.v = v.CView(), p.out = out.View();
    p.feature_map = c.fm, p.causal = c.causal, p.num_threads = o.threads, p.chunk = o.chunk;
    return p;
  }
  LinearAttentionBackwardParams Backward(const Lin& c, const RunOpts& o) {
    LinearAttentionBackwardParams p;
    p.q = q.CView(), p.k = k.CView(), p.v = v.CView(), p.dout = dout.CView();
    p.dq = dq.View(), p.dk = dk.View(), p.dv = dv.View();
    p.feature_map = c.fm, p.causal = c.causal, p.num_threads = o.threads, p.chunk = o.chunk;
    return p;
  }
};

std::vector<double> RunForward(const Lin& c, const RunOpts& o = {},
                               LinearAttentionInfo* info = nullptr) {
  Bufs bufs(c, o);
  const LinearAttentionInfo i = LinearAttention(bufs.Forward(c, o));
  if (info) *info = i;
  return bufs.out.Read();
}

struct Grads {
  std::vector<double> dq, dk, dv;
};
Grads RunBackward(const Lin& c, const RunOpts& o = {}) {
  Bufs bufs(c, o);
  LinearAttentionBackward(bufs.Backward(c, o));
  return {bufs.dq.Read(), bufs.dk.Read(), bufs.dv.Read()};
}

double OutRounding(DType d) {
  return d == DType::kFloat32   ? kU32
         : d == DType::kFloat16 ? std::ldexp(1.0, -11) * (1 + kU32)
                                : 0.0;
}

// The forward bound of the file comment, per output element.
std::vector<double> OutBounds(const Lin& c, const OracleOut& o, DType out_dtype) {
  const double cu = 2.0 * (c.NK + 2.0 * c.D + 40.0) * kU64, uo = OutRounding(out_dtype);
  // float16 outputs: a subnormal result is rounded to 2^-24 absolute.
  const double floor = out_dtype == DType::kFloat16 ? std::ldexp(1.0, -25) : 1e-300;
  std::vector<double> bound(o.out.size());
  for (size_t i = 0; i < bound.size(); ++i) {
    const int64_t row = static_cast<int64_t>(i) / c.DV;
    const double den = std::fabs(o.den[row]), out = std::fabs(o.out[i]);
    bound[i] = uo * out + floor + (den == 0 ? 0 : cu * (o.t_num[i] + out * o.t_den[row]) / den);
  }
  return bound;
}

::testing::AssertionResult ForwardMatches(const Lin& c, const RunOpts& opts = {}) {
  const OracleOut o = Oracle(c);
  return WithinBound("out", RunForward(c, opts), o.out, OutBounds(c, o, opts.out));
}

// Gradient bounds: magnitudes m (file comment) times 4 c u, c with every
// reduction length (group rows into U', keys into S', both dims).
::testing::AssertionResult GradsMatch(const Lin& c, const Grads& got, const OracleOut& o,
                                      DType out_dtype) {
  const double cu = 4.0 * (c.H / c.G * c.NQ + c.NK + 2.0 * c.D + c.DV + 40.0) * kU64;
  const double uo = OutRounding(out_dtype);
  auto bounds = [&](const std::vector<double>& g, const std::vector<double>& m) {
    std::vector<double> b(g.size());
    for (size_t i = 0; i < g.size(); ++i) b[i] = uo * std::fabs(g[i]) + cu * m[i] + 1e-300;
    return b;
  };
  auto r = WithinBound("dq", got.dq, o.dq, bounds(o.dq, o.m_dq));
  if (r) r = WithinBound("dk", got.dk, o.dk, bounds(o.dk, o.m_dk));
  if (r) r = WithinBound("dv", got.dv, o.dv, bounds(o.dv, o.m_dv));
  return r;
}

std::string Name(const Lin& c) {
  return std::string(FeatureMapName(c.fm)) + (c.causal ? " causal" : " full") + " B" +
         std::to_string(c.B) + " H" + std::to_string(c.H) + "/" + std::to_string(c.G) + " NQ" +
         std::to_string(c.NQ) + " NK" + std::to_string(c.NK) + " D" + std::to_string(c.D) + " DV" +
         std::to_string(c.DV);
}

// Awkward sizes: seq 1, 7, 97, 129, 1025; head dims 1, 3, 59, 80; dv != d;
// seq_q != seq_kv both ways; MHA, GQA 8/2, MQA; more than one partial sum.
std::vector<Lin> AwkwardCases() {
  return {RandomLin(1, 1, 1, 1, 1, 1, 1, 1),       RandomLin(2, 2, 2, 7, 7, 3, 5, 2),
          RandomLin(1, 8, 2, 97, 97, 59, 80, 3),   RandomLin(1, 4, 1, 129, 129, 80, 59, 4),
          RandomLin(1, 2, 1, 1025, 1025, 3, 1, 5), RandomLin(2, 2, 1, 7, 97, 59, 3, 6),
          RandomLin(1, 2, 2, 97, 7, 1, 80, 7),     RandomLin(1, 2, 1, 129, 1025, 16, 24, 8),
          RandomLin(1, 1, 1, 1025, 129, 8, 8, 9),  RandomLin(1, 2, 1, 16, 9000, 4, 4, 10),
          RandomLin(1, 2, 1, 2500, 16, 4, 3, 11)};
}

TEST(LinearAttentionTest, MatchesQuadraticOracleOnAwkwardSizes) {
  for (Lin c : AwkwardCases())
    for (FeatureMap fm : kMaps)
      for (bool causal : {false, true}) {
        c.fm = fm, c.causal = causal;
        EXPECT_TRUE(ForwardMatches(c)) << Name(c);
      }
}

// float16 and float64 inputs and outputs, and bshd strides (bitwise equal to
// bhsd: the layout changes addresses only).
TEST(LinearAttentionTest, DtypesAndStrides) {
  for (FeatureMap fm : kMaps)
    for (bool causal : {false, true}) {
      Lin c = RandomLin(2, 4, 2, 33, 45, 59, 17, 21);
      c.fm = fm, c.causal = causal;
      RoundToHalf(c);
      for (DType in : {DType::kFloat16, DType::kFloat32, DType::kFloat64})
        for (DType out : {DType::kFloat16, DType::kFloat32, DType::kFloat64}) {
          RunOpts o;
          o.in = in, o.out = out, o.chunk = 8;
          EXPECT_TRUE(ForwardMatches(c, o))
              << Name(c) << " " << DTypeName(in) << "->" << DTypeName(out);
        }
      RunOpts o;
      o.chunk = 8;
      const std::vector<double> bhsd = RunForward(c, o);
      o.bshd = true;
      EXPECT_EQ(RunForward(c, o), bhsd) << Name(c);
      EXPECT_TRUE(ForwardMatches(c, o)) << Name(c);
    }
}

// The chunked causal form equals the quadratic form for any chunk (1, 7,
// 64, more than seq_kv), within the float64 bound.
TEST(LinearAttentionTest, CausalChunkSizesMatchOracle) {
  for (Lin c : {RandomLin(1, 4, 2, 129, 129, 59, 80, 31), RandomLin(1, 2, 1, 97, 129, 3, 5, 32),
                RandomLin(1, 2, 1, 129, 97, 5, 3, 33)}) {
    c.causal = true;
    for (FeatureMap fm : kMaps)
      for (int64_t chunk : {1, 7, 64, 5000}) {
        c.fm = fm;
        RunOpts o;
        o.chunk = chunk;
        o.out = DType::kFloat64;
        LinearAttentionInfo info;
        const OracleOut want = Oracle(c);
        EXPECT_TRUE(
            WithinBound("out", RunForward(c, o, &info), want.out, OutBounds(c, want, o.out)))
            << Name(c) << " chunk " << chunk;
        EXPECT_EQ(info.chunk, std::min<int64_t>(chunk, c.NK));
        EXPECT_EQ(info.path, "causal chunked");
      }
  }
}

// Results are bitwise identical for 1, 2 and 3 threads, forward and
// backward, on both work splits (one item per thread, or threads sharing the
// partial sums of one item) and with several partial sums.
TEST(LinearAttentionTest, BitwiseIdenticalForAnyThreadCount) {
  for (Lin c : {RandomLin(1, 2, 1, 300, 9000, 8, 6, 41), RandomLin(3, 4, 2, 97, 129, 16, 9, 42),
                RandomLin(1, 2, 1, 4500, 33, 5, 4, 43)})
    for (FeatureMap fm : kMaps)
      for (bool causal : {false, true}) {
        c.fm = fm, c.causal = causal;
        RunOpts o;
        o.out = DType::kFloat64, o.threads = 1, o.chunk = 7;
        const std::vector<double> want = RunForward(c, o);
        const Grads want_g = RunBackward(c, o);
        for (int threads : {2, 3}) {
          o.threads = threads;
          EXPECT_EQ(RunForward(c, o), want) << Name(c) << " threads " << threads;
          const Grads g = RunBackward(c, o);
          EXPECT_TRUE(g.dq == want_g.dq && g.dk == want_g.dk && g.dv == want_g.dv)
              << Name(c) << " threads " << threads;
        }
      }
}

// A zero denominator gives 0: relu rows with phi(q) = 0, keys whose relu is
// 0, identity terms that cancel exactly, causal rows before the first key,
// seq_kv = 0; never NaN.
TEST(LinearAttentionTest, ZeroDenominatorGivesZero) {
  Lin c = RandomLin(1, 1, 1, 4, 3, 2, 2, 51);
  c.fm = FeatureMap::kRelu;
  c.q = {-1, -2, 1, 1, 0.5, -1, 2, 2};  // row 0: phi(q) = 0
  c.k = {1, -1, -1, 3, -2, -1};         // key 2: phi(k) = 0
  for (bool causal : {false, true}) {
    c.causal = causal;
    const std::vector<double> out = RunForward(c);
    EXPECT_EQ(out[0], 0.0);
    EXPECT_EQ(out[1], 0.0);
    for (double x : out) EXPECT_FALSE(std::isnan(x));
    EXPECT_TRUE(ForwardMatches(c));
    const Grads g = RunBackward(c, {DType::kFloat32, DType::kFloat64});
    EXPECT_EQ(g.dq[0], 0.0);
    EXPECT_EQ(g.dq[1], 0.0);
  }
  // Identity: q . k_0 = 1, q . k_1 = -1: den = 0 exactly.
  Lin id = RandomLin(1, 1, 1, 1, 2, 1, 3, 52);
  id.fm = FeatureMap::kIdentity;
  id.q = {1}, id.k = {1, -1};
  EXPECT_EQ(RunForward(id), std::vector<double>(3, 0.0));
  // Causal with seq_q > seq_kv: rows 0..2 see no key.
  Lin early = RandomLin(1, 2, 1, 5, 2, 3, 4, 53);
  early.causal = true;
  const std::vector<double> out = RunForward(early);
  for (int64_t h = 0; h < 2; ++h)
    for (int64_t x = 0; x < 3 * 4; ++x) EXPECT_EQ(out[h * 5 * 4 + x], 0.0);
  EXPECT_TRUE(ForwardMatches(early));
  // seq_kv = 0: every row is 0, every gradient 0.
  for (bool causal : {false, true}) {
    Lin none = RandomLin(1, 2, 1, 3, 0, 3, 4, 54);
    none.causal = causal;
    EXPECT_EQ(RunForward(none), std::vector<double>(2 * 3 * 4, 0.0));
    EXPECT_EQ(RunBackward(none).dq, std::vector<double>(2 * 3 * 3, 0.0));
  }
}

// Stepping the decode state token by token writes bitwise what the causal
// forward with chunk 1 writes, and agrees with any chunk within the bound;
// a prefill equals the forward with its chunk; the state after any mix of
// prefills and steps is bitwise the same (S' sums each key in order).
TEST(LinearAttentionStateTest, StepEqualsCausalForwardRowByRow) {
  for (FeatureMap fm : kMaps) {
    Lin c = RandomLin(2, 8, 2, 37, 37, 11, 6, 61);
    c.fm = fm, c.causal = true;
    RunOpts o;
    o.chunk = 1;
    const std::vector<double> chunk1 = RunForward(c, o);
    Bufs bufs(c, o);
    LinearAttentionState state(2, 8, 2, 11, 6, fm, 2);
    std::vector<double> stepped(chunk1.size());
    for (int64_t t = 0; t < c.NQ; ++t) {
      auto row = [&](Buf& b) {  // token t as a [B, H, 1, D] view
        MutableTensorView m = b.View();
        m.data = static_cast<unsigned char*>(m.data) + t * m.strides[2] * DTypeSize(m.dtype);
        m.shape[2] = 1;
        return m;
      };
      auto in = [&](Buf& b) {
        const MutableTensorView m = row(b);
        return TensorView{m.data, m.dtype, m.shape, m.strides};
      };
      state.Step(in(bufs.q), in(bufs.k), in(bufs.v), row(bufs.out));
    }
    EXPECT_EQ(state.tokens(), 37);
    EXPECT_EQ(bufs.out.Read(), chunk1) << FeatureMapName(fm);
    EXPECT_EQ(state.state_bytes(), 2 * 2 * 11 * 8 * 8);
    EXPECT_TRUE(WithinBound("step vs oracle", bufs.out.Read(), Oracle(c).out,
                            OutBounds(c, Oracle(c), DType::kFloat32)));
    // Prefill with chunk 7 = the forward with chunk 7; same final state.
    LinearAttentionState pre(2, 8, 2, 11, 6, fm);
    Bufs p(c, o);
    const LinearAttentionInfo info =
        pre.Prefill(p.q.CView(), p.k.CView(), p.v.CView(), p.out.View(), 7);
    EXPECT_EQ(info.chunk, 7);
    o.chunk = 7;
    EXPECT_EQ(p.out.Read(), RunForward(c, o));
    for (int64_t b = 0; b < 2; ++b)
      for (int64_t g = 0; g < 2; ++g)
        for (int64_t a = 0; a < 11; ++a) {
          EXPECT_EQ(pre.z(b, g, a), state.z(b, g, a));
          for (int64_t e = 0; e < 6; ++e) ASSERT_EQ(pre.S(b, g, a, e), state.S(b, g, a, e));
        }
    // The state holds sum_j phi(k_j) v_j^T and sum_j phi(k_j).
    double s = 0, z = 0;
    for (int64_t j = 0; j < 37; ++j) {
      const double fk = PhiRef(fm, static_cast<float>(c.k[j * 11 + 3]));
      s += fk * static_cast<float>(c.v[j * 6 + 2]), z += fk;
    }
    EXPECT_NEAR(pre.S(0, 0, 3, 2), s, 1e-12 * (1 + std::fabs(s)));
    EXPECT_NEAR(pre.z(0, 0, 3), z, 1e-12 * (1 + z));
    // Absorbing k, v without out (no q needed), then Reset.
    LinearAttentionState absorb(2, 8, 2, 11, 6, fm);
    absorb.Prefill({}, p.k.CView(), p.v.CView(), {}, 64);
    EXPECT_EQ(absorb.S(1, 1, 10, 5), state.S(1, 1, 10, 5));
    absorb.Reset();
    EXPECT_EQ(absorb.tokens(), 0);
    EXPECT_EQ(absorb.S(1, 1, 10, 5), 0.0);
  }
}

// Gradients against central differences of the float64 oracle's loss
// L = sum(out * dout) on small sizes. Truncation error of a step h is
// estimated by Richardson, |D(2h) - D(h)| / 3, and rounding by
// 4 u sum|out * dout| / h; the bound is 4x their sum plus 1e-9 |D|.
TEST(LinearAttentionBackwardTest, MatchesFiniteDifferences) {
  for (FeatureMap fm : kMaps)
    for (bool causal : {false, true})
      for (Lin c : {RandomLin(1, 2, 1, 4, 5, 3, 2, 71), RandomLin(1, 2, 2, 5, 3, 2, 3, 72)}) {
        c.fm = fm, c.causal = causal;
        if (fm == FeatureMap::kIdentity)  // keep identity denominators away from 0
          for (auto* t : {&c.q, &c.k})
            for (double& x : *t) x = std::fabs(x) + 0.25;
        const Grads g = RunBackward(c, {DType::kFloat64, DType::kFloat64, false, 1, 2});
        auto loss = [&](const Lin& x, double* mag) {
          const OracleOut o = Oracle(x);
          double l = 0;
          *mag = 0;
          for (size_t i = 0; i < o.out.size(); ++i)
            l += o.out[i] * x.dout[i], *mag += std::fabs(o.out[i] * x.dout[i]);
          return l;
        };
        double mag;
        loss(c, &mag);
        auto check = [&](std::vector<double> Lin::*member, const std::vector<double>& got,
                         const char* what) {
          for (size_t i = 0; i < got.size(); ++i) {
            const double x0 = (c.*member)[i], h = std::ldexp(1.0, -18) * (1 + std::fabs(x0));
            if (fm == FeatureMap::kRelu && std::fabs(x0) < 4 * h) continue;  // kink at 0
            auto diff = [&](double step) {
              Lin cp = c, cm = c;
              (cp.*member)[i] = x0 + step, (cm.*member)[i] = x0 - step;
              double mp, mm;
              return (loss(cp, &mp) - loss(cm, &mm)) / (2 * step);
            };
            const double d1 = diff(h), d2 = diff(2 * h);
            const double bound =
                4 * (std::fabs(d2 - d1) / 3 + 4 * kU64 * mag / h) + 1e-9 * std::fabs(d1);
            EXPECT_NEAR(got[i], d1, bound) << Name(c) << " " << what << "[" << i << "]";
          }
        };
        check(&Lin::q, g.dq, "dq");
        check(&Lin::k, g.dk, "dk");
        check(&Lin::v, g.dv, "dv");
      }
}

// Gradients against the analytic float64 oracle on the awkward sizes, for
// several chunks and float32 / float64 outputs.
TEST(LinearAttentionBackwardTest, MatchesAnalyticOracle) {
  for (Lin c : AwkwardCases())
    for (FeatureMap fm : kMaps)
      for (bool causal : {false, true}) {
        c.fm = fm, c.causal = causal;
        const OracleOut o = Oracle(c, true);
        for (int64_t chunk : {int64_t{7}, int64_t{64}}) {
          RunOpts opts;
          opts.chunk = chunk, opts.out = chunk == 7 ? DType::kFloat64 : DType::kFloat32;
          EXPECT_TRUE(GradsMatch(c, RunBackward(c, opts), o, opts.out))
              << Name(c) << " chunk " << chunk;
          if (!causal) break;
        }
      }
}

// Every compiled SIMD target (AVX3, AVX2, SSE4, EMU128, scalar: with and
// without FMA) meets the same bounds, is bitwise the same for 1 and 3
// threads, and steps bitwise as the chunk-1 forward.
TEST(LinearAttentionTest, EverySimdTargetMatchesOracle) {
  int targets = 0;
  ForEachSimdTarget(
      [] { return std::string(internal::LinearSimdTarget()); },
      [&](const std::string&) {
        ++targets;
        for (Lin c : {RandomLin(1, 4, 2, 37, 37, 13, 6, 91), RandomLin(2, 3, 1, 29, 17, 8, 9, 92)})
          for (FeatureMap fm : kMaps)
            for (bool causal : {false, true}) {
              c.fm = fm, c.causal = causal;
              RunOpts o;
              o.chunk = 7, o.out = DType::kFloat64, o.threads = 1;
              const OracleOut want = Oracle(c, true);
              const std::vector<double> out = RunForward(c, o);
              EXPECT_TRUE(WithinBound("out", out, want.out, OutBounds(c, want, o.out))) << Name(c);
              EXPECT_TRUE(GradsMatch(c, RunBackward(c, o), want, o.out)) << Name(c);
              o.threads = 3;
              EXPECT_EQ(RunForward(c, o), out) << Name(c);
              if (!causal || c.NQ != c.NK) continue;
              o.chunk = 1;
              Bufs bufs(c, o);
              LinearAttentionState state(c.B, c.H, c.G, c.D, c.DV, fm, 1);
              for (int64_t t = 0; t < c.NQ; ++t) {
                auto token = [&](Buf& b) {
                  MutableTensorView m = b.View();
                  m.data =
                      static_cast<unsigned char*>(m.data) + t * m.strides[2] * DTypeSize(m.dtype);
                  m.shape[2] = 1;
                  return m;
                };
                auto in = [&](Buf& b) {
                  const MutableTensorView m = token(b);
                  return TensorView{m.data, m.dtype, m.shape, m.strides};
                };
                state.Step(in(bufs.q), in(bufs.k), in(bufs.v), token(bufs.out));
              }
              EXPECT_EQ(bufs.out.Read(), RunForward(c, o)) << Name(c);
            }
      });
  EXPECT_GE(targets, 2);
}

// Valid float32 [1, 2, 3, 4] buffers to break one at a time.
struct Fixture {
  std::vector<float> q = std::vector<float>(24, 0.5f), k = q, v = q,
                     out = std::vector<float>(24, 7.0f);
  std::vector<float> dq = out, dk = out, dv = out;
  LinearAttentionParams p;
  LinearAttentionBackwardParams bp;
  Fixture() {
    p.q = TensorView::Contiguous(q.data(), DType::kFloat32, {1, 2, 3, 4});
    p.k = p.q, p.k.data = k.data();
    p.v = p.q, p.v.data = v.data();
    p.out = MutableTensorView::Contiguous(out.data(), DType::kFloat32, {1, 2, 3, 4});
    bp.q = p.q, bp.k = p.k, bp.v = p.v, bp.dout = p.q;
    bp.dq = MutableTensorView::Contiguous(dq.data(), DType::kFloat32, {1, 2, 3, 4});
    bp.dk = bp.dq, bp.dk.data = dk.data();
    bp.dv = bp.dq, bp.dv.data = dv.data();
  }
  bool Untouched() const {
    for (const auto* t : {&out, &dq, &dk, &dv})
      for (float x : *t)
        if (x != 7.0f) return false;
    return true;
  }
};

template <class F>
void ExpectError(const F& call, const std::string& fragment) {
  try {
    call();
    ADD_FAILURE() << "no error; expected one containing '" << fragment << "'";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find(fragment), std::string::npos) << what;
    EXPECT_EQ(what.find('\n'), std::string::npos) << what;
    EXPECT_NE(what.find("expected"), std::string::npos) << what;
  }
}

// Each bad argument is a one-line qkv::Error naming it, raised before any
// output is written (the outputs keep their sentinel 7).
TEST(LinearAttentionTest, BadInputsThrowBeforeWriting) {
  using P = LinearAttentionParams;
  const std::vector<std::pair<std::function<void(P&)>, std::string>> forward = {
      {[](P& p) { p.k.shape[3] = 3; }, "k: head_dim 3"},
      {[](P& p) { p.v.shape[2] = 2; }, "v: shape"},
      {[](P& p) { p.q.shape[1] = 3, p.out.shape[1] = 3, p.k.shape[1] = 2, p.v.shape[1] = 2; },
       "must divide"},
      {[](P& p) { p.out.dtype = DType::kInt32; }, "out: dtype int32"},
      {[](P& p) { p.out.shape[3] = 5; }, "out: shape [1,2,3,5]"},
      {[](P& p) { p.out.strides[2] = 0; }, "out: stride 0"},
      {[](P& p) { p.q.data = nullptr; }, "q: missing"},
      {[](P& p) { p.k.dtype = DType::kBool; }, "k: dtype bool"},
      {[](P& p) { p.chunk = 0; }, "chunk: 0"},
      {[](P& p) { p.chunk = -5; }, "chunk: -5"},
      {[](P& p) { p.num_threads = -1; }, "num_threads"},
      {[](P& p) { p.feature_map = static_cast<FeatureMap>(9); }, "feature_map: 9"},
  };
  for (const auto& [breakit, fragment] : forward) {
    Fixture f;
    breakit(f.p);
    ExpectError([&] { LinearAttention(f.p); }, fragment);
    EXPECT_TRUE(f.Untouched()) << fragment;
  }
  using BP = LinearAttentionBackwardParams;
  const std::vector<std::pair<std::function<void(BP&)>, std::string>> backward = {
      {[](BP& p) { p.dout.shape[3] = 2; }, "dout: shape"},
      {[](BP& p) { p.dout.dtype = DType::kInt64; }, "dout: dtype int64"},
      {[](BP& p) { p.dq.shape[2] = 2; }, "dq: shape"},
      {[](BP& p) { p.dk.strides[3] = 0; }, "dk: stride 0"},
      {[](BP& p) { p.dv.data = nullptr; }, "dv: missing"},
      {[](BP& p) { p.chunk = 0; }, "chunk: 0"},
      {[](BP& p) { p.v.shape[0] = 2; }, "k, v: batch"},
  };
  for (const auto& [breakit, fragment] : backward) {
    Fixture f;
    breakit(f.bp);
    ExpectError([&] { LinearAttentionBackward(f.bp); }, fragment);
    EXPECT_TRUE(f.Untouched()) << fragment;
  }
  // The decode state: bad dims, a token count other than 1, shapes that
  // disagree with the state; a failed step leaves state and out untouched.
  ExpectError([] { LinearAttentionState(1, 3, 2, 4, 4, FeatureMap::kElu); }, "must divide");
  ExpectError([] { LinearAttentionState(1, 2, 1, -4, 4, FeatureMap::kElu); }, "dimension -4");
  Fixture f;
  LinearAttentionState state(1, 2, 2, 4, 4, FeatureMap::kElu);
  ExpectError([&] { state.Step(f.p.q, f.p.k, f.p.v, f.p.out); }, "Step: seq 3");
  TensorView q1 = f.p.q, k1 = f.p.k, v1 = f.p.v;
  MutableTensorView o1 = f.p.out;
  q1.shape[2] = k1.shape[2] = v1.shape[2] = o1.shape[2] = 1;
  TensorView k_bad = k1;
  k_bad.shape[3] = 3, q1.shape[3] = 3;
  ExpectError([&] { state.Step(q1, k_bad, v1, o1); }, "q: shape [1,2,1,3]");
  q1.shape[3] = 4;
  o1.dtype = DType::kInt8;
  ExpectError([&] { state.Step(q1, k1, v1, o1); }, "out: dtype int8");
  ExpectError([&] { state.Prefill(f.p.q, f.p.k, f.p.v, f.p.out, 0); }, "chunk: 0");
  EXPECT_TRUE(f.Untouched());
  EXPECT_EQ(state.tokens(), 0);
  EXPECT_EQ(state.S(0, 1, 3, 3), 0.0);
}

TEST(LinearAttentionTest, InfoSaysWhatRan) {
  Lin c = RandomLin(2, 4, 2, 10, 20, 8, 8, 81);
  LinearAttentionInfo info;
  RunOpts o;
  o.threads = 3;
  RunForward(c, o, &info);
  EXPECT_EQ(info.path, "non-causal");
  EXPECT_EQ(info.chunk, 0);
  EXPECT_EQ(info.threads, 3);
  EXPECT_GT(info.state_bytes, 0);
  EXPECT_GE(info.scratch_bytes, info.state_bytes);
  EXPECT_FALSE(info.simd_target.empty());
  c.causal = true;
  o.chunk = 16;
  RunForward(c, o, &info);
  EXPECT_EQ(info.path, "causal chunked");
  EXPECT_EQ(info.chunk, 16);
  // One state of [8, 16] doubles per thread (4 items >= 3 threads).
  EXPECT_EQ(info.state_bytes, 3 * 8 * 16 * 8);
  EXPECT_EQ(FeatureMapFromName("relu"), FeatureMap::kRelu);
  EXPECT_STREQ(FeatureMapName(FeatureMap::kIdentity), "identity");
  ExpectError([] { FeatureMapFromName("softmax"); }, "feature map: 'softmax'");
}

// qkv attend --linear: runs (causal chunked), and the softmax-only flags are
// refused by name rather than ignored.
TEST(LinearAttentionCliTest, AttendLinearRunsAndRefusesSoftmaxOnlyFlags) {
  TempDir dir("linear_cli");
  const CliResult r = RunCli({"attend", "--shape", "1,2,97,8", "--seed", "3", "--linear", "elu",
                              "--causal", "--verbose"},
                             dir.File(""));
  ASSERT_TRUE(r.exited && r.status == 0) << Describe(r);
  EXPECT_NE(r.out.find("linear attention (elu): causal chunked, chunk 64"), std::string::npos) << r.out;
  for (const char* flag : {"--lse", "--scale", "--softcap", "--causal-top-left"}) {
    std::vector<std::string> args = {"attend", "--shape", "1,2,16,8", "--linear", "relu", flag};
    if (std::string(flag) == "--lse") args.push_back(dir.File("l.npy"));
    if (std::string(flag) == "--scale") args.push_back("0.5");
    if (std::string(flag) == "--softcap") args.push_back("5");
    const CliResult e = RunCli(args, dir.File(""));
    EXPECT_TRUE(e.exited && e.status == 2) << flag << ": " << Describe(e);
    EXPECT_NE(e.err.find(std::string(flag) + ": not with --linear"), std::string::npos) << e.err;
  }
  const CliResult bad = RunCli({"attend", "--shape", "1,2,16,8", "--linear", "softmax"}, dir.File(""));
  EXPECT_TRUE(bad.exited && bad.status == 2) << Describe(bad);
  EXPECT_NE(bad.err.find("--linear"), std::string::npos) << bad.err;
}

}  // namespace
}  // namespace qkv::test
