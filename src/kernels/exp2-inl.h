// Exp2NonPositive, the softmax exponential of the flash and decode kernels,
// with their base-2 constants and lse conversion,
// for every Highway target. Included by a file that includes
// hwy/foreach_target.h and hwy/highway.h, once per target (Highway's -inl.h
// convention: the include guard toggles per target).
#if defined(QKV_SRC_KERNELS_EXP2_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef QKV_SRC_KERNELS_EXP2_INL_H_
#undef QKV_SRC_KERNELS_EXP2_INL_H_
#else
#define QKV_SRC_KERNELS_EXP2_INL_H_
#endif

#include <cmath>

#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace qkv::internal::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// Both kernels keep scores in base 2: log2(e) is folded into Q', and the
// lse goes back to base e at the end.
constexpr double kLog2E = 1.4426950408889634;  // log2(e)
constexpr double kLn2 = 0.6931471805599453;    // ln(2)

// The natural-log lse of a row from its base-2 running max m and sum l > 0:
// ln(sum_c e^s_c) = (m + log2 l) ln 2, computed in double, rounded once.
inline float LseFromBase2(float m, float l) {
  return static_cast<float>((double{m} + std::log2(double{l})) * kLn2);
}

// Returns 2^t per lane for t <= 0 (every softmax argument: s - m_new and
// m_old - m_new), 0 for t = -inf or t < -126.5, NaN for NaN; within 2 ULP of
// exp2 for t >= -126 (checked against std::exp2 in the tests). Scores are
// kept in base 2 (log2 e is folded into Q'), which makes the range reduction
// t = n + f, n = round(t), f in [-0.5, 0.5] exact: no Cody-Waite steps as in
// hn::Exp, and a single multiply by 2^n. 2^f is a degree-6 polynomial
// (relative-error minimax fit on [-0.5, 0.5], 1.9e-9 = 0.03 ULP before
// rounding), so the whole step is 13 vector ops + the NaN select instead of
// about 20 for hn::Exp: the softmax went from 12.5% to about 8% of the
// time at D = 128 (1 thread, N = 4096: 127 -> 134 GFLOP/s). Measured worst
// error 0.92 ULP with FMA (AVX3, AVX2), 1.2 ULP without (SSE4, scalar). Results below 2^-126 flush
// towards 0: every weight is relative to the row maximum, whose weight is exactly 1, so this is an
// absolute error below 2^-126 per weight.
template <class DF>
HWY_INLINE hn::Vec<DF> Exp2NonPositive(DF df, hn::Vec<DF> t) {
  using VF = hn::Vec<DF>;
  const hn::RebindToSigned<DF> di;
  // Max(NaN, c) is c on every target; n = -127 gives 2^n = +0 below.
  const VF tc = hn::Max(t, hn::Set(df, -127.0f));
  const VF n = hn::Round(tc);   // nearest integer, exact
  const VF f = hn::Sub(tc, n);  // exact: |f| <= 0.5
  VF p = hn::Set(df, 1.534578769e-04f);
  p = hn::MulAdd(p, f, hn::Set(df, 1.339993207e-03f));
  p = hn::MulAdd(p, f, hn::Set(df, 9.618489072e-03f));
  p = hn::MulAdd(p, f, hn::Set(df, 5.550328642e-02f));
  p = hn::MulAdd(p, f, hn::Set(df, 2.402264625e-01f));
  p = hn::MulAdd(p, f, hn::Set(df, 6.931471825e-01f));
  p = hn::MulAdd(p, f, hn::Set(df, 1.0f));
  // 2^n from the exponent field: n + 127 in [0, 127], 0 -> +0.0f.
  const VF two_n =
      hn::BitCast(df, hn::ShiftLeft<23>(hn::Add(hn::ConvertTo(di, n), hn::Set(di, 127))));
  return hn::IfThenElse(hn::IsNaN(t), t, hn::Mul(p, two_n));
}

// tanh(x) = sign(x) (1 - t) / (1 + t) with t = e^(-2|x|) = 2^(-2 log2(e) |x|):
// one Exp2NonPositive and a reciprocal, for soft-capping. Its error is a few
// ulp of 1 in absolute terms (1 - t cancels for small |x|), which is what a
// capped score C tanh(s / C) needs: within a few C u of exact. Highway's
// hn::Tanh (relative accuracy near 0) made the capped forward 28% slower
// than the plain one at D = 64 (1 thread, N = 4096, Sapphire Rapids).
// NaN gives NaN; |x| > 44 gives +-1 within a few ulp.
template <class DF>
HWY_INLINE hn::Vec<DF> TanhViaExp2(DF df, hn::Vec<DF> x) {
  using VF = hn::Vec<DF>;
  const VF one = hn::Set(df, 1.0f);
  const VF t = Exp2NonPositive(df, hn::Mul(hn::Abs(x), hn::Set(df, static_cast<float>(-2.0 * 1.4426950408889634))));
  // 1 / (1 + t) for 1 + t in [1, 2]: the hardware estimate (14 bits on
  // AVX-512, 12 on AVX2) and one Newton step, instead of a division (the
  // division alone made the capped forward 25% slower).
  const VF den = hn::Add(one, t);
  VF r = hn::ApproximateReciprocal(den);
  r = hn::Mul(r, hn::NegMulAdd(den, r, hn::Set(df, 2.0f)));
  return hn::CopySign(hn::Mul(hn::Sub(one, t), r), x);
}

}  // namespace qkv::internal::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // QKV_SRC_KERNELS_EXP2_INL_H_
