// Tests of qkv/positional.h: RoPE against a float64 formula (both pairings,
// partial rotary, bhsd and bshd memory), its invariants (norms kept, q.k a
// function of the distance only, decode == prefill), ALiBi slopes against the
// published values, the ALiBi bias as an attention mask, sinusoidal values
// and the learned table.
#include "qkv/positional.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "qkv/error.h"
#include "test_util.h"

namespace qkv {
namespace {

using test::kU32;
using test::kU64;

// Higham's gamma_n = n u / (1 - n u): the relative error bound of n float32
// roundings in a row.
double Gamma(int n) { return n * kU32 / (1.0 - n * kU32); }

std::vector<float> RandomFloats(int64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const std::vector<double> x = test::RandomValues(n, rng);
  return std::vector<float>(x.begin(), x.end());
}

// RoPE of one [head_dim] row at position p, in double, straight from the
// definition: pair i of neox is (i, i + r/2), of gptj (2i, 2i + 1), and it is
// rotated by p / base^(2i/r). Returns the angles of the pairs in `angles`.
std::vector<double> RopeRow(const float* x, int64_t stride, int64_t head_dim, int64_t rotary_dim,
                            bool neox, double base, double p, std::vector<double>* angles) {
  std::vector<double> y(head_dim);
  for (int64_t d = 0; d < head_dim; ++d) y[d] = x[d * stride];
  angles->assign(head_dim, 0.0);
  for (int64_t i = 0; i < rotary_dim / 2; ++i) {
    const int64_t a = neox ? i : 2 * i, b = neox ? i + rotary_dim / 2 : 2 * i + 1;
    const double angle = p / std::pow(base, 2.0 * i / rotary_dim);
    y[a] = x[a * stride] * std::cos(angle) - x[b * stride] * std::sin(angle);
    y[b] = x[a * stride] * std::sin(angle) + x[b * stride] * std::cos(angle);
    (*angles)[a] = (*angles)[b] = angle;
  }
  return y;
}

struct RopeCase {
  RopeStyle style;
  bool bshd;
  int64_t head_dim, rotary_dim, offset;
  double base;
};

// Error bound of one rotated element a' = a c - b s in float32 with c, s
// rounded from double: c and s carry u each, the two products and the
// difference one rounding each, so |a' - exact| <= gamma_3 (|a c| + |b s|).
// The library's double angle differs from ours by a few ulps of the angle
// (pow and the product: 4 u64 |angle|), and double cos / sin by an ulp each,
// which adds (|a| + |b|) (4 u64 |angle| + 2 u64).
void CheckRopeAgainstFormula(const RopeCase& rc) {
  SCOPED_TRACE(std::string(rc.style == RopeStyle::kNeox ? "neox" : "gptj") +
               (rc.bshd ? " bshd" : " bhsd") + " head_dim " + std::to_string(rc.head_dim) +
               " rotary_dim " + std::to_string(rc.rotary_dim) + " offset " +
               std::to_string(rc.offset));
  const int64_t batch = 2, heads = 3, seq = 11, head_dim = rc.head_dim;
  const std::vector<float> x0 = RandomFloats(batch * heads * seq * head_dim, 7 + head_dim);
  std::vector<float> x = x0;
  MutableTensorView view =
      rc.bshd
          ? MutableTensorView::FromBSHD(x.data(), DType::kFloat32, batch, seq, heads, head_dim)
          : MutableTensorView::Contiguous(x.data(), DType::kFloat32, {batch, heads, seq, head_dim});
  ApplyRope(view, {rc.style, rc.base, rc.rotary_dim, rc.offset});
  const int64_t rotary_dim = rc.rotary_dim == 0 ? head_dim : rc.rotary_dim;
  std::vector<double> got, want, bound;
  std::vector<double> angles;
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t s = 0; s < seq; ++s) {
        const int64_t off = view.Offset(b, h, s, 0);
        const std::vector<double> y =
            RopeRow(x0.data() + off, 1, head_dim, rotary_dim, rc.style == RopeStyle::kNeox, rc.base,
                    static_cast<double>(rc.offset + s), &angles);
        for (int64_t d = 0; d < head_dim; ++d) {
          got.push_back(x[off + d]);
          want.push_back(y[d]);
          if (d >= rotary_dim) {
            bound.push_back(0.0);  // passed through: bitwise unchanged
            continue;
          }
          // Partner of d, and |a c| + |b s| from the double formula.
          const int64_t half = rotary_dim / 2;
          const bool neox = rc.style == RopeStyle::kNeox;
          const int64_t partner = neox ? (d < half ? d + half : d - half) : (d ^ 1);
          const double c = std::cos(angles[d]), sn = std::sin(angles[d]);
          const double xa = x0[off + d], xb = x0[off + partner];
          bound.push_back(Gamma(3) * (std::fabs(xa * c) + std::fabs(xb * sn)) +
                          (std::fabs(xa) + std::fabs(xb)) *
                              (4 * kU64 * std::fabs(angles[d]) + 2 * kU64));
        }
      }
  EXPECT_TRUE(test::WithinBound("rope", got, want, bound));
}

TEST(PositionalTest, RopeMatchesFloat64FormulaBothStyles) {
  for (RopeStyle style : {RopeStyle::kNeox, RopeStyle::kGptJ}) {
    for (bool bshd : {false, true}) {
      CheckRopeAgainstFormula({style, bshd, 64, 0, 0, 10000.0});
      CheckRopeAgainstFormula({style, bshd, 64, 0, 100000, 10000.0});  // long-context positions
      CheckRopeAgainstFormula({style, bshd, 10, 0, 3, 500000.0});      // Llama 3 base
    }
  }
}

TEST(PositionalTest, PartialRotaryPassesTheRestThrough) {
  for (RopeStyle style : {RopeStyle::kNeox, RopeStyle::kGptJ}) {
    CheckRopeAgainstFormula({style, false, 48, 16, 9, 10000.0});  // GPT-NeoX rotary_pct 1/3
    CheckRopeAgainstFormula({style, true, 7, 4, 2, 10000.0});     // odd head_dim, even rotary
    CheckRopeAgainstFormula({style, false, 6, 2, 0, 10000.0});
  }
}

// Returns the norm of row `r` of a [rows, dim] array, in double.
double Norm(const std::vector<float>& x, int64_t r, int64_t dim) {
  double sum = 0.0;
  for (int64_t d = 0; d < dim; ++d) sum += double{x[r * dim + d]} * x[r * dim + d];
  return std::sqrt(sum);
}

// RoPE is a rotation, so it keeps norms exactly; in float32 each element is
// off by at most gamma_3 (|a c| + |b s|) <= gamma_3 ||(a, b)|| (Cauchy-Schwarz
// with c^2 + s^2 = 1), so the error vector of a pair is <= sqrt(2) gamma_3
// ||(a, b)|| and of the row <= sqrt(2) gamma_3 ||x||; the angle's double error
// (positions <= 2^17 here) and the double norms add below 2^-30 relative.
TEST(PositionalTest, RopeKeepsVectorNorms) {
  const int64_t rows = 40, dim = 128;
  for (RopeStyle style : {RopeStyle::kNeox, RopeStyle::kGptJ}) {
    const std::vector<float> x0 = RandomFloats(rows * dim, 11);
    std::vector<float> x = x0;
    ApplyRope(MutableTensorView::Contiguous(x.data(), DType::kFloat32, {1, 1, rows, dim}),
              {style, 10000.0, 0, 131000});
    for (int64_t r = 0; r < rows; ++r) {
      const double before = Norm(x0, r, dim), after = Norm(x, r, dim);
      const double bound = (std::sqrt(2.0) * Gamma(3) + std::ldexp(1.0, -30)) * before;
      EXPECT_LE(std::fabs(after - before), bound) << "row " << r;
    }
  }
}

// Rotating q to position m and k to n gives q.R(n - m)k in exact arithmetic:
// the dot product depends on n - m only. Each rotated vector is within
// eps = (sqrt(2) gamma_3 + 8 u64 (p + 1)) ||x|| of the exact rotation (see
// RopeKeepsVectorNorms; the second term is the double angle at position p),
// so one dot product is within ||q|| eps_k + eps_q ||k|| + eps_q eps_k of
// the exact value, and two of them within twice that of each other.
TEST(PositionalTest, RopeDotProductDependsOnlyOnDistance) {
  const int64_t dim = 64;
  const std::vector<float> q0 = RandomFloats(dim, 21), k0 = RandomFloats(dim, 22);
  auto rotated = [&](const std::vector<float>& x0, RopeStyle style, int64_t p) {
    std::vector<float> x = x0;
    ApplyRope(MutableTensorView::Contiguous(x.data(), DType::kFloat32, {1, 1, 1, dim}),
              {style, 10000.0, 0, p});
    return x;
  };
  const double nq = Norm(q0, 0, dim), nk = Norm(k0, 0, dim);
  for (RopeStyle style : {RopeStyle::kNeox, RopeStyle::kGptJ}) {
    for (int64_t distance : {0, 1, 5, 300}) {
      double first = 0.0;
      for (int64_t m : {0, 7, 1000, 100000}) {
        const std::vector<float> q = rotated(q0, style, m + distance), k = rotated(k0, style, m);
        double dot = 0.0;
        for (int64_t d = 0; d < dim; ++d) dot += double{q[d]} * k[d];
        if (m == 0) {
          first = dot;
          continue;
        }
        const double rel = std::sqrt(2.0) * Gamma(3) + 8 * kU64 * (m + distance + 1);
        const double eps_q = rel * nq, eps_k = rel * nk;
        const double bound = 2 * (nq * eps_k + eps_q * nk + eps_q * eps_k);
        EXPECT_NEAR(dot, first, bound) << "distance " << distance << " m " << m;
      }
    }
  }
}

// Decoding token t alone with offset t computes the same double angle
// static_cast<double>(t) * theta_i as row t of the full sequence, then the
// same float32 operations, so the results are bitwise equal (chunked prefill
// too).
TEST(PositionalTest, DecodeWithOffsetEqualsFullSequence) {
  const int64_t heads = 2, seq = 9, dim = 16;
  for (RopeStyle style : {RopeStyle::kNeox, RopeStyle::kGptJ}) {
    const std::vector<float> x0 = RandomFloats(heads * seq * dim, 31);
    std::vector<float> full = x0;
    ApplyRope(MutableTensorView::FromBSHD(full.data(), DType::kFloat32, 1, seq, heads, dim),
              {style, 10000.0, 0, 0});
    // Prefill rows 0..3 in one call, then decode rows 4..8 one at a time.
    std::vector<float> steps = x0;
    const int64_t prefill = 4;
    ApplyRope(MutableTensorView::FromBSHD(steps.data(), DType::kFloat32, 1, prefill, heads, dim),
              {style, 10000.0, 0, 0});
    for (int64_t t = prefill; t < seq; ++t) {
      ApplyRope(MutableTensorView::FromBSHD(steps.data() + t * heads * dim, DType::kFloat32, 1, 1,
                                            heads, dim),
                {style, 10000.0, 0, t});
    }
    for (int64_t i = 0; i < heads * seq * dim; ++i) {
      ASSERT_EQ(steps[i], full[i]) << "row " << i / (heads * dim) << " element " << i;
    }
  }
}

template <class F>
std::string ErrorOf(F f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(PositionalTest, RopeRejectsBadArguments) {
  std::vector<float> x(2 * 3 * 64, 1.0f);
  auto view = [&](int64_t dim) {
    return MutableTensorView::Contiguous(x.data(), DType::kFloat32, {1, 2, 3, dim});
  };
  const std::vector<float> before = x;
  EXPECT_NE(ErrorOf([&] { ApplyRope(view(63), {}); }).find("head_dim 63 is odd"),
            std::string::npos);
  EXPECT_NE(ErrorOf([&] {
              ApplyRope(view(64), {RopeStyle::kNeox, 10000.0, 63, 0});
            }).find("rotary_dim: 63"),
            std::string::npos);
  EXPECT_NE(ErrorOf([&] {
              ApplyRope(view(32), {RopeStyle::kGptJ, 10000.0, 34, 0});
            }).find("rotary_dim: 34"),
            std::string::npos);
  for (double base : {0.0, -10000.0, std::nan(""), std::numeric_limits<double>::infinity()}) {
    EXPECT_NE(ErrorOf([&] {
                ApplyRope(view(64), {RopeStyle::kNeox, base, 0, 0});
              }).find("base:"),
              std::string::npos);
  }
  EXPECT_NE(ErrorOf([&] {
              ApplyRope(view(64), {RopeStyle::kNeox, 10000.0, 0, -1});
            }).find("offset: -1"),
            std::string::npos);
  MutableTensorView half = view(64);
  half.dtype = DType::kFloat16;
  EXPECT_NE(ErrorOf([&] { ApplyRope(half, {}); }).find("expected float32"), std::string::npos);
  MutableTensorView broadcast = view(64);
  broadcast.strides[1] = 0;
  EXPECT_NE(ErrorOf([&] { ApplyRope(broadcast, {}); }).find("stride 0"), std::string::npos);
  EXPECT_EQ(x, before);  // nothing written before a throw
  ApplyRope(MutableTensorView::Contiguous(nullptr, DType::kFloat32, {1, 2, 0, 64}), {});  // empty
}

// Press et al. (2022), get_slopes: n a power of two gives 2^(-8/n) times
// itself h times; 8 heads: 1/2, 1/4, ..., 1/256 (exact powers of two).
TEST(PositionalTest, AlibiSlopesMatchPublishedValues) {
  auto expect_slopes = [](int64_t n, const std::vector<double>& want) {
    const std::vector<double> got = AlibiSlopes(n);
    ASSERT_EQ(got.size(), want.size()) << n << " heads";
    for (size_t h = 0; h < want.size(); ++h) {
      // exp2 in double is within 1 ulp (2 u64 relative) of the true power.
      EXPECT_NEAR(got[h], want[h], 2 * kU64 * want[h]) << n << " heads, head " << h;
    }
  };
  expect_slopes(8, {0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.00390625});
  // 12 heads, by hand from get_slopes: the closest power of two below is 8,
  // whose slopes 2^-1 .. 2^-8 come first; then get_slopes(16)[0::2][:4], the
  // even-indexed slopes of 16 heads (2^(-0.5 (h+1)) for h = 0, 2, 4, 6):
  // 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5.
  expect_slopes(
      12, {0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.00390625, 0.70710678118654752,
           0.35355339059327376, 0.17677669529663688, 0.08838834764831844});
  // 6 heads: 2^-2, 2^-4, 2^-6, 2^-8 (4 heads), then 2^-1, 2^-3 (8 heads, 0 and 2).
  expect_slopes(6, {0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125});
  expect_slopes(1, {0.00390625});
  EXPECT_NE(ErrorOf([] { AlibiSlopes(0); }).find("num_heads: 0"), std::string::npos);
}

TEST(PositionalTest, AlibiBiasIsBottomRightAligned) {
  // 3 heads: slopes 2^-4, 2^-8 (2 heads), then 2^-2 (4 heads, index 0).
  const int64_t heads = 3, seq_q = 2, seq_kv = 5;
  std::vector<float> bias(heads * seq_q * seq_kv);
  const auto view =
      MutableTensorView::Contiguous(bias.data(), DType::kFloat32, {1, heads, seq_q, seq_kv});
  FillAlibiBias(view);
  const float inf = std::numeric_limits<float>::infinity();
  // Head 2 (m = 1/4); query 0 sits at key 3 (i' = 0 + 5 - 2), query 1 at key 4.
  const float* h2 = bias.data() + 2 * seq_q * seq_kv;
  EXPECT_EQ(std::vector<float>(h2, h2 + 5),
            (std::vector<float>{-0.75f, -0.5f, -0.25f, 0.0f, -inf}));
  EXPECT_EQ(std::vector<float>(h2 + 5, h2 + 10),
            (std::vector<float>{-1.0f, -0.75f, -0.5f, -0.25f, 0.0f}));
  EXPECT_EQ(bias[0], -0.1875f);  // head 0, m = 1/16: (0 - 3) / 16
  FillAlibiBias(view, {.causal = false, .slopes = {}});
  EXPECT_EQ(std::vector<float>(h2, h2 + 5),
            (std::vector<float>{-0.75f, -0.5f, -0.25f, 0.0f, -0.25f}));
  const std::vector<double> wrong = {1.0, 2.0};
  EXPECT_NE(ErrorOf([&] {
              FillAlibiBias(view, {.causal = true, .slopes = wrong});
            }).find("slopes: 2 values"),
            std::string::npos);
}

// The bias works as qkv::Attention's additive mask (checked against the test
// oracle), and matches the reference implementation's form m_h * j plus a
// causal mask: the two differ by m_h * i' on each row, which softmax ignores.
TEST(PositionalTest, AlibiBiasAsAttentionMask) {
  const int64_t heads = 4, seq_q = 5, seq_kv = 9, dim = 16;
  test::Case c = test::RandomCase(1, heads, heads, seq_q, seq_kv, dim, dim, 41);
  std::vector<float> bias(heads * seq_q * seq_kv);
  FillAlibiBias(
      MutableTensorView::Contiguous(bias.data(), DType::kFloat32, {1, heads, seq_q, seq_kv}));
  c.add_mask.assign(bias.begin(), bias.end());
  const test::OracleResult want = test::Oracle(c);
  EXPECT_TRUE(test::MatchesOracle(c, test::RunQkv(c), want, kU32));

  test::Case shifted = c;
  shifted.causal = true;
  const std::vector<double> slopes = AlibiSlopes(heads);
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t i = 0; i < seq_q; ++i)
      for (int64_t j = 0; j < seq_kv; ++j) {
        shifted.add_mask[(h * seq_q + i) * seq_kv + j] = static_cast<float>(slopes[h] * j);
      }
  // Both oracles run in double and are each within test::Bound (u = 2^-53)
  // of the exact attention, which is the same for both: so within twice that
  // of each other (lse differs by the row shift m_h i', so it is not compared).
  const test::OracleResult published = test::Oracle(shifted);
  const test::Bound bound{kU64};
  std::vector<double> out_bound(want.out.size());
  for (int64_t row = 0; row < heads * seq_q; ++row) {
    const double mag = std::max(want.score_mag[row], published.score_mag[row]);
    for (int64_t d = 0; d < dim; ++d) {
      out_bound[row * dim + d] = 2 * bound.RowFactor(mag, dim, seq_kv) * want.abs_v[row * dim + d];
    }
  }
  EXPECT_TRUE(test::WithinBound("out vs m_h * j + causal", published.out, want.out, out_bound));
}

// Sinusoidal values at several positions and columns against the formula of
// Vaswani et al., evaluated literally as sin(pos / 10000^(2i/d)). float32
// rounding gives u |PE|; the library's double angle may differ from ours by
// a few ulps (4 u64 |angle|), and double sin / cos by an ulp (2 u64).
TEST(PositionalTest, SinusoidalMatchesFormula) {
  for (int64_t dim : {64, 5}) {
    for (int64_t offset : {0, 10000}) {
      const int64_t seq = 50;
      std::vector<float> pe(seq * dim, -7.0f);
      FillSinusoidalPositions(
          MutableTensorView::Contiguous(pe.data(), DType::kFloat32, {1, 1, seq, dim}), offset);
      for (int64_t s : {0, 1, 7, 49}) {
        for (int64_t d : {0, 1, 2, 3, 30, 31, 62, 63}) {
          if (d >= dim) continue;
          const int64_t i = d / 2;
          const double pos = static_cast<double>(offset + s);
          const double angle = pos / std::pow(10000.0, 2.0 * i / dim);
          const double want = d % 2 == 0 ? std::sin(angle) : std::cos(angle);
          const double bound = kU32 * std::fabs(want) + 4 * kU64 * angle + 2 * kU64;
          EXPECT_NEAR(pe[s * dim + d], want, bound)
              << "pos " << pos << " d " << d << " dim " << dim;
        }
      }
    }
  }
  // Literal values: PE[1, 0] = sin(1), PE[1, 1] = cos(1) (theta_0 = 1);
  // position 0 is 0 in sin columns and 1 in cos columns.
  std::vector<float> pe(2 * 4);
  FillSinusoidalPositions(MutableTensorView::Contiguous(pe.data(), DType::kFloat32, {1, 1, 2, 4}));
  EXPECT_EQ(pe[0], 0.0f);
  EXPECT_EQ(pe[1], 1.0f);
  EXPECT_NEAR(pe[4], 0.8414709848078965, kU32 * 0.85);
  EXPECT_NEAR(pe[5], 0.5403023058681398, kU32 * 0.55);
  // Column 2 of d = 4: theta_1 = 10000^(-2/4) = 0.01: sin(0.01), cos(0.01).
  EXPECT_NEAR(pe[6], 0.009999833334166665, kU32 * 0.01);
  EXPECT_NEAR(pe[7], 0.9999500004166653, kU32 * 1.0);
}

TEST(PositionalTest, LearnedTableAddsRowsAndRejectsOutOfRange) {
  const int64_t batch = 2, seq = 3, dim = 4, positions = 6;
  // Multiples of 1/64 below 2^10: every sum is exact in float32.
  std::vector<float> x(batch * seq * dim), table(positions * dim);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i) / 64.0f - 0.5f;
  for (size_t i = 0; i < table.size(); ++i) table[i] = 100.0f + static_cast<float>(i) / 8.0f;
  const std::vector<float> x0 = x;
  const auto xv = MutableTensorView::Contiguous(x.data(), DType::kFloat32, {batch, 1, seq, dim});
  const TensorView tv{table.data(), DType::kFloat32, {1, 1, positions, dim}, {0, 0, dim, 1}};
  AddLearnedPositions(xv, tv, 2);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t s = 0; s < seq; ++s)
      for (int64_t d = 0; d < dim; ++d) {
        const int64_t i = (b * seq + s) * dim + d;
        EXPECT_EQ(x[i], x0[i] + table[(2 + s) * dim + d]) << "b " << b << " s " << s << " d " << d;
      }
  x = x0;
  EXPECT_NE(ErrorOf([&] {
              AddLearnedPositions(xv, tv, 4);
            }).find("table: positions 4..6 run past its 6 rows"),
            std::string::npos);
  EXPECT_NE(ErrorOf([&] { AddLearnedPositions(xv, tv, -1); }).find("offset: -1"),
            std::string::npos);
  TensorView narrow = tv;
  narrow.shape[3] = 3;
  EXPECT_NE(ErrorOf([&] { AddLearnedPositions(xv, narrow, 0); }).find("table: shape"),
            std::string::npos);
  EXPECT_EQ(x, x0);                // nothing written before a throw
  AddLearnedPositions(xv, tv, 3);  // the last rows of the table fit exactly
}

}  // namespace
}  // namespace qkv
