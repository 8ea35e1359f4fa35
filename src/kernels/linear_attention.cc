// Linear attention kernels, forward and backward (Katharopoulos et al. 2020,
// "Transformers are RNNs", arXiv:2006.16236; the chunked causal form as in
// Hua et al. 2022, arXiv:2202.10447, and Yang et al. 2023, arXiv:2312.06635).
//
// Notation per (batch b, kv head g): f_i = phi(q_i) [head_dim], phi(k_j),
// v_j [head_dim_v], and the augmented value v'_j = [v_j, 1]. Then
//   S' = sum_j phi(k_j) v'_j^T = [S | z]    [head_dim, head_dim_v + 1]
//   f_i^T S' = [num_i | den_i],  out_i = num_i / den_i  (0 when den_i == 0),
// so one row-times-matrix product yields numerator and denominator, in the
// same summation order. Every buffer is float64, rows padded with zeros to 8
// doubles (one AVX-512 vector), so SIMD loops have no tails.
//
// Non-causal, O(seq * head_dim * head_dim_v): (1) S' over all keys, (2) each
// query row of every head of the group: f_i^T S'. The keys are cut into parts
// of at least kPartRows (at most kMaxParts parts), fixed by seq_kv alone;
// each part's S' is summed in key order and the parts are added in part
// order. With batch * num_kv_heads >= threads a thread takes a whole (b, g)
// ("by item"), else all threads share the parts of one (b, g), then its query
// rows ("by phase"); both do the same arithmetic in the same order, so the
// result is bitwise the same for any thread count.
//
// Causal, chunked: query i sees keys j <= p_i = i + seq_kv - seq_q (bottom-
// right). Keys are cut into chunks [j0, j0 + C); query i belongs to the chunk
// holding p_i (p_i < 0: no key, out = 0). Per chunk, with S' the sum over the
// keys before it:
//   inter  [num | den]_i  = f_i^T S'
//   intra  A_ic = f_i . phi(k_c),  [num | den]_i += sum_{c <= p_i} A_ic v'_c
//   update S' += sum_c phi(k_c) v'_c^T           (after all the group's heads)
// Time per key (d = head_dim, e = head_dim_v + 1): group * (d e + d C / 2 +
// C e / 2) + d e multiply-adds: O(seq * d * e) for a fixed C; state O(d e).
// One thread runs a whole (b, g), so the group's heads share one S'. The
// update adds each key's term to each S' element in key order (one FMA chain),
// so S' after the last key does not depend on C; the outputs do (the intra
// sums are grouped by chunk), at the float64 rounding level.
//
// Backward. With g_i = dout_i / den_i and r_i = -(dout_i . out_i) / den_i,
// g'_i = [g_i, r_i] (0 when den_i == 0), differentiating out_i = num_i / den_i:
//   d num_i = g_i,  d den_i = r_i,  so  d f_i = S' g'_i   (sum over seen keys)
//   dS' = sum_i f_i g'_i^T = U' = [U | w]          (sum over rows that see j)
//   d phi(k_j) = U' v'_j,   dv_j = (U'^T phi(k_j))[:head_dim_v]
//   dq = phi'(q) * d f,  dk = phi'(k) * d phi(k)   (elementwise)
// phi'(x): elu+1: 1 (x > 0) or e^x; relu: 1 (x > 0) or 0 (also at 0, as
// torch); identity: 1. Non-causal: S' as the forward; rows (in parts, as S')
// give dq and U'; then each key gives dk, dv. Causal: pass 1 runs the chunks
// forward as the forward does and writes dq (inter S' g'_i plus intra
// sum_{c <= p_i} phi(k_c) (v'_c . g'_i)), keeping den_i and dout_i . out_i
// per row (16 bytes per row, the only O(seq) scratch); pass 2 runs the chunks
// backward with the running U' of the later chunks' rows:
//   d phi(k_j) = U' v'_j + sum_{i in chunk, p_i >= j} f_i (g'_i . v'_j)
//   dv_j       = U'^T phi(k_j) + sum_{i in chunk, p_i >= j} g_i (f_i . phi(k_j))
// then U' += sum_{i in chunk} f_i g'_i^T.
//
// Memory traffic: each q, k, v, dout element is read once per pass (the
// causal backward reads q, k, v, dout twice and recomputes phi); S' (37 KiB
// at d = 64) and the chunk tiles stay in L1/L2, so the kernels are bound by
// the FMA ports, not memory. The multiply-adds are RowTimesMatrix (acc +=
// coeff^T rows: up to 12 vector accumulators, 1 load per FMA, checked in the
// AVX3 asm: no spills) and MatrixTimesVector (rows . x, 8 rows at a time).
// Chunk size: per key the causal forward does 2 d e + C (d + e) / 2
// multiply-adds (inter, update, A and intra), so on a CPU a small C is
// cheaper; measured at d = 64, e = 65, N = 256K, 1 thread (noisy shared
// Xeon, min of runs): C = 8: 0.28 s, 16: 0.32 s, 32: 0.36 s, 64: 0.42 s,
// 256: 0.95 s. The API default stays 64 (a GPU-style tile; see the header).
//
// Edge cases: den == 0 gives 0 (outputs and gradients); seq_kv = 0 gives out
// = 0 and dq = 0; inf or NaN in an input reaches the rows that see it (a
// causal row never reads a later key). Padding lanes may hold NaN when an
// input is inf, but they are never stored.
#include "kernels/linear_attention.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

// Target-independent part, compiled once.
#ifndef QKV_SRC_KERNELS_LINEAR_ATTENTION_CC_ONCE_
#define QKV_SRC_KERNELS_LINEAR_ATTENTION_CC_ONCE_
namespace qkv::internal {

struct LinearTraits {
  // Doubles per padded row: one AVX-512 vector (64 bytes).
  static constexpr int64_t kPad = 8;
  // Non-causal keys / query rows per tile (the causal tile is the chunk).
  static constexpr int64_t kTile = 64;
  // Non-causal reductions (S' over keys, U' over rows) are cut into parts of
  // at least kPartRows rows, at most kMaxParts: enough parts for 16 threads
  // on one (b, g) at 64K keys, at most 16 partial states (600 KiB at
  // d = head_dim_v = 64), and a part of 4096 keys costs ~2 ms, 1000x the
  // cost of adding its partial state.
  static constexpr int64_t kPartRows = 4096;
  static constexpr int64_t kMaxParts = 16;
};

inline int64_t PadRow(int64_t n) {
  return (n + LinearTraits::kPad - 1) / LinearTraits::kPad * LinearTraits::kPad;
}

// Offsets (in doubles) of one thread's scratch arrays; rows = tile or chunk.
struct LinearLayout {
  int64_t ld_d, ld_s, ld_c, rows;
  int64_t fk, fk_t, vv, fq, fq_t, g, dfk, dva, a, num, dout, raw, vec, df, doubles;

  static LinearLayout For(const LinearProblem& pr) {
    LinearLayout l{};
    const int64_t d = pr.dims.head_dim;
    l.rows = pr.causal ? pr.chunk : LinearTraits::kTile;
    l.ld_d = PadRow(d);
    l.ld_s = PadRow(pr.dims.head_dim_v + 1);
    l.ld_c = PadRow(l.rows);
    int64_t at = 0;
    auto take = [&](int64_t n) { return (at += PadRow(n)) - PadRow(n); };  // start of n
    l.fk = take(l.rows * l.ld_d);   // phi(K) tile   [rows, ld_d]
    l.fk_t = take(d * l.ld_c);      // phi(K)^T      [head_dim, ld_c]
    l.vv = take(l.rows * l.ld_s);   // V' = [V, 1]   [rows, ld_s]
    l.fq = take(l.rows * l.ld_d);   // phi(Q) tile   [rows, ld_d]
    l.fq_t = take(d * l.ld_c);      // phi(Q)^T      [head_dim, ld_c]
    l.g = take(l.rows * l.ld_s);    // G' = [dout/den, r]  [rows, ld_s]
    l.dfk = take(l.rows * l.ld_d);  // d phi(K)      [rows, ld_d]
    l.dva = take(l.rows * l.ld_s);  // dV (+ 1 col)  [rows, ld_s]
    l.a = take(l.ld_c);             // one row of A = phi(Q) phi(K)^T
    l.num = take(l.ld_s);           // [num | den] of one row
    l.dout = take(l.ld_s);
    l.raw = take(std::max(l.ld_d, l.ld_s));
    l.vec = take(std::max(l.ld_c, l.ld_d));
    l.df = take(l.ld_d);
    l.doubles = at;
    return l;
  }
};

}  // namespace qkv::internal
#endif  // QKV_SRC_KERNELS_LINEAR_ATTENTION_CC_ONCE_

#ifndef HWY_DISABLED_TARGETS
#define HWY_DISABLED_TARGETS (HWY_SSSE3 | HWY_AVX3_DL)  // as flash_attention.cc
#endif
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/linear_attention.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
// After highway.h (it needs hn): Exp for the elu feature map.
#include "hwy/contrib/math/math-inl.h"

// Own namespace: helper names (LoadRow, TargetName, ...) must not collide
// with the other kernels' per-target functions.
HWY_BEFORE_NAMESPACE();
namespace qkv::internal::linear::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

using DD = hn::ScalableTag<double>;
using VD = hn::Vec<DD>;

// Vectors per RowTimesMatrix block: kMaxVecs accumulators plus a broadcast
// and a load fit the register file (32 zmm on AVX-512, 16 elsewhere).
#if HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL
constexpr int kMaxVecs = 12;
#else
constexpr int kMaxVecs = 8;
#endif

// acc[0, kV lanes) += sum_{c < count} coeff[c] * rows[c * ld + ...]. The kV
// accumulators are an array indexed by constants of unrolled loops, which GCC
// keeps in registers (sized vectors: every x86 target; SVE/RVV would need
// named variables).
template <int kV>
HWY_INLINE void RowTimesMatrixBlock(double* HWY_RESTRICT acc, const double* HWY_RESTRICT coeff,
                                    int64_t count, const double* HWY_RESTRICT rows, int64_t ld) {
  const DD dd;
  const size_t nl = hn::Lanes(dd);
  VD a[kV];
  HWY_UNROLL(12) for (int v = 0; v < kV; ++v) a[v] = hn::LoadU(dd, acc + v * nl);
  for (int64_t c = 0; c < count; ++c) {
    const VD s = hn::Set(dd, coeff[c]);
    const double* r = rows + c * ld;
    HWY_UNROLL(12)
    for (int v = 0; v < kV; ++v) a[v] = hn::MulAdd(s, hn::LoadU(dd, r + v * nl), a[v]);
  }
  HWY_UNROLL(12) for (int v = 0; v < kV; ++v) hn::StoreU(a[v], dd, acc + v * nl);
}

// RowTimesMatrixBlock<nv> for a run-time nv in [0, kV].
template <int kV>
HWY_INLINE void RowTimesMatrixRest(int64_t nv, double* HWY_RESTRICT acc,
                                   const double* HWY_RESTRICT coeff, int64_t count,
                                   const double* HWY_RESTRICT rows, int64_t ld) {
  if constexpr (kV > 0) {
    if (nv == kV) return RowTimesMatrixBlock<kV>(acc, coeff, count, rows, ld);
    RowTimesMatrixRest<kV - 1>(nv, acc, coeff, count, rows, ld);
  }
}

// acc[0, n) += sum_{c < count} coeff[c] * rows[c * ld + (0, n)]; n is a
// multiple of kPad. Each element is one FMA chain in c order, whatever the
// blocking. Blocks of 8 vectors, then one block of the rest (<= kMaxVecs):
// 8 or more independent chains cover 2 FMA ports x 4 cycles latency; a
// separate 1-vector tail (n = 72 = 64 + 8 at head_dim_v = 64) would be one
// 64-FMA chain, 256 cycles of latency: as long as the 8-vector block.
HWY_INLINE void RowTimesMatrix(double* HWY_RESTRICT acc, const double* HWY_RESTRICT coeff,
                               int64_t count, const double* HWY_RESTRICT rows, int64_t ld,
                               int64_t n) {
  const int64_t nl = static_cast<int64_t>(hn::Lanes(DD()));
  int64_t nv = n / nl;
  for (; nv > kMaxVecs; nv -= 8, acc += 8 * nl, rows += 8 * nl)
    RowTimesMatrixBlock<8>(acc, coeff, count, rows, ld);
  RowTimesMatrixRest<kMaxVecs>(nv, acc, coeff, count, rows, ld);
}

// out[c0 + r] = sum_{x < n} rows[(c0 + r) * ld + x] * vec[x] for r < kR: kR
// independent lane-sum chains, then one SumOfLanes per row (a fixed order
// per target, whatever the grouping).
template <int kR>
HWY_INLINE void MatrixTimesVectorBlock(double* HWY_RESTRICT out, const double* HWY_RESTRICT rows,
                                       int64_t ld, const double* HWY_RESTRICT vec, int64_t n) {
  const DD dd;
  const int64_t nl = static_cast<int64_t>(hn::Lanes(dd));
  VD s[kR];
  HWY_UNROLL(8) for (int r = 0; r < kR; ++r) s[r] = hn::Zero(dd);
  for (int64_t x = 0; x < n; x += nl) {
    const VD w = hn::LoadU(dd, vec + x);
    HWY_UNROLL(8)
    for (int r = 0; r < kR; ++r) s[r] = hn::MulAdd(hn::LoadU(dd, rows + r * ld + x), w, s[r]);
  }
  HWY_UNROLL(8) for (int r = 0; r < kR; ++r) out[r] = hn::GetLane(hn::SumOfLanes(dd, s[r]));
}

// out[c] = sum_{x < n} rows[c * ld + x] * vec[x] for c < count; n a multiple
// of kPad. Eight rows at a time (8 chains for 2 ports x 4 cycles).
HWY_INLINE void MatrixTimesVector(double* HWY_RESTRICT out, const double* HWY_RESTRICT rows,
                                  int64_t ld, int64_t count, const double* HWY_RESTRICT vec,
                                  int64_t n) {
  int64_t c = 0;
  for (; c + 8 <= count; c += 8) MatrixTimesVectorBlock<8>(out + c, rows + c * ld, ld, vec, n);
  for (; c + 4 <= count; c += 4) MatrixTimesVectorBlock<4>(out + c, rows + c * ld, ld, vec, n);
  for (; c < count; ++c) MatrixTimesVectorBlock<1>(out + c, rows + c * ld, ld, vec, n);
}

// Converts n elements `stride` apart; unit stride (the common layout) gets
// its own loop, which the compiler vectorises.
template <class From, class To, class Convert>
HWY_INLINE void CopyStrided(const From* src, int64_t src_stride, To* dst, int64_t dst_stride,
                            int64_t n, const Convert& convert) {
  if (src_stride == 1 && dst_stride == 1) {
    for (int64_t x = 0; x < n; ++x) dst[x] = convert(src[x]);
  } else {
    for (int64_t x = 0; x < n; ++x) dst[x * dst_stride] = convert(src[x * src_stride]);
  }
}

// dst[0, n) = row (b, h, s) of t as double; dst[n, pad) = 0.
void LoadRow(const TensorView& t, int64_t b, int64_t h, int64_t s, int64_t n, int64_t pad,
             double* HWY_RESTRICT dst) {
  const int64_t off = n > 0 ? t.Offset(b, h, s, 0) : 0, st = t.strides[3];
  auto same = [](auto x) { return static_cast<double>(x); };
  if (n > 0 && t.dtype == DType::kFloat32) {
    CopyStrided(static_cast<const float*>(t.data) + off, st, dst, 1, n, same);
  } else if (n > 0 && t.dtype == DType::kFloat64) {
    CopyStrided(static_cast<const double*>(t.data) + off, st, dst, 1, n, same);
  } else if (n > 0) {  // float16 (validation admits nothing else)
    CopyStrided(static_cast<const uint16_t*>(t.data) + off, st, dst, 1, n,
                [](uint16_t x) { return static_cast<double>(HalfToFloat(x)); });
  }
  std::fill(dst + n, dst + pad, 0.0);
}

// Row (b, h, s) of t = src[0, n) rounded to t's dtype (float16 via float32).
void StoreRow(const MutableTensorView& t, int64_t b, int64_t h, int64_t s, int64_t n,
              const double* HWY_RESTRICT src) {
  if (n <= 0) return;
  const int64_t off = t.Offset(b, h, s, 0), st = t.strides[3];
  if (t.dtype == DType::kFloat32) {
    CopyStrided(src, 1, static_cast<float*>(t.data) + off, st, n,
                [](double x) { return static_cast<float>(x); });
  } else if (t.dtype == DType::kFloat64) {
    CopyStrided(src, 1, static_cast<double*>(t.data) + off, st, n, [](double x) { return x; });
  } else {
    CopyStrided(src, 1, static_cast<uint16_t*>(t.data) + off, st, n,
                [](double x) { return FloatToHalf(static_cast<float>(x)); });
  }
}

void StoreZeroRow(const MutableTensorView& t, int64_t b, int64_t h, int64_t s, int64_t n,
                  double* HWY_RESTRICT tmp) {
  std::fill(tmp, tmp + n, 0.0);
  StoreRow(t, b, h, s, n, tmp);
}

// x[0, n) = phi(x) elementwise, x[n, pad) = 0 (pad: a multiple of kPad).
// e^x is Highway's Exp (within 1 ULP of std::exp; vectorised, so the elu map
// went from 1/3 of the causal forward's time to ~5%); NaN stays NaN for every
// map (hn::Exp alone would return 0 for NaN).
void Phi(FeatureMap fm, double* HWY_RESTRICT x, int64_t n, int64_t pad) {
  const DD dd;
  const int64_t nl = static_cast<int64_t>(hn::Lanes(dd));
  const VD zero = hn::Zero(dd), one = hn::Set(dd, 1.0);
  if (fm == FeatureMap::kElu) {
    for (int64_t i = 0; i < pad; i += nl) {
      const VD v = hn::LoadU(dd, x + i);
      const VD e = hn::Exp(dd, hn::Min(v, zero));
      const VD y = hn::IfThenElse(hn::Gt(v, zero), hn::Add(v, one), e);
      hn::StoreU(hn::IfThenElse(hn::IsNaN(v), v, y), dd, x + i);
    }
  } else if (fm == FeatureMap::kRelu) {
    for (int64_t i = 0; i < pad; i += nl) {
      const VD v = hn::LoadU(dd, x + i);
      hn::StoreU(hn::IfThenElse(hn::Lt(v, zero), zero, v), dd, x + i);
    }
  }
  std::fill(x + n, x + pad, 0.0);
}

// df[0, pad) *= phi'(x) elementwise (relu'(0) = 0; NaN x gives NaN).
void MulPhiGrad(FeatureMap fm, const double* HWY_RESTRICT x, double* HWY_RESTRICT df, int64_t pad) {
  const DD dd;
  const int64_t nl = static_cast<int64_t>(hn::Lanes(dd));
  const VD zero = hn::Zero(dd), one = hn::Set(dd, 1.0);
  if (fm == FeatureMap::kIdentity) return;
  for (int64_t i = 0; i < pad; i += nl) {
    const VD v = hn::LoadU(dd, x + i);
    const VD low = fm == FeatureMap::kElu ? hn::Exp(dd, hn::Min(v, zero)) : zero;
    const VD grad = hn::IfThenElse(hn::IsNaN(v), v, hn::IfThenElse(hn::Gt(v, zero), one, low));
    hn::StoreU(hn::Mul(hn::LoadU(dd, df + i), grad), dd, df + i);
  }
}

// The arrays of one thread's scratch for problem pr.
struct Tiles {
  LinearLayout l;
  int64_t d, dv, nq, nk, group, b, g, off;
  double *fk, *fk_t, *vv, *fq, *fq_t, *gg, *dfk, *dva, *a, *num, *dout, *raw, *vec, *df;

  Tiles(const LinearProblem& pr, int64_t bg, double* s) : l(LinearLayout::For(pr)) {
    d = pr.dims.head_dim, dv = pr.dims.head_dim_v, nq = pr.dims.seq_q, nk = pr.dims.seq_kv;
    group = pr.dims.group_size, b = bg / pr.dims.num_kv_heads, g = bg % pr.dims.num_kv_heads;
    off = nk - nq;
    fk = s + l.fk, fk_t = s + l.fk_t, vv = s + l.vv, fq = s + l.fq, fq_t = s + l.fq_t;
    gg = s + l.g, dfk = s + l.dfk, dva = s + l.dva, a = s + l.a, num = s + l.num;
    dout = s + l.dout, raw = s + l.raw, vec = s + l.vec, df = s + l.df;
  }
  int64_t Head(int64_t hl) const { return g * group + hl; }
};

// dst [head_dim, ld_c] = src^T for the n rows of src [rows, ld_d], 0 past n.
void Transpose(const double* HWY_RESTRICT src, int64_t n, const Tiles& t,
               double* HWY_RESTRICT dst) {
  for (int64_t x = 0; x < t.d; ++x)
    for (int64_t c = 0; c < t.l.ld_c; ++c)
      dst[x * t.l.ld_c + c] = c < n ? src[c * t.l.ld_d + x] : 0.0;
}

// Fills fk = phi(K), fk_t = phi(K)^T (zero columns past nc) and vv = [V, 1]
// for keys [j0, j0 + nc).
void LoadKeyTile(const LinearViews& w, FeatureMap fm, Tiles& t, int64_t j0, int64_t nc) {
  const LinearLayout& l = t.l;
  for (int64_t c = 0; c < nc; ++c) {
    double* fk = t.fk + c * l.ld_d;
    LoadRow(w.k, t.b, t.g, j0 + c, t.d, l.ld_d, fk);
    Phi(fm, fk, t.d, l.ld_d);
    double* vv = t.vv + c * l.ld_s;
    LoadRow(w.v, t.b, t.g, j0 + c, t.dv, l.ld_s, vv);
    vv[t.dv] = 1.0;  // v' = [v, 1]: S' gets z as its last column
  }
  Transpose(t.fk, nc, t, t.fk_t);
}

// S' += phi(K)^T V' for the nc keys of the tile (in key order per element).
void AbsorbTile(const Tiles& t, int64_t nc, double* HWY_RESTRICT state) {
  for (int64_t x = 0; x < t.d; ++x)
    RowTimesMatrix(state + x * t.l.ld_s, t.fk_t + x * t.l.ld_c, nc, t.vv, t.l.ld_s, t.l.ld_s);
}

// Writes out_row = num / den (0 when den == 0) for head h, query i.
void StoreOutRow(const LinearViews& w, Tiles& t, int64_t h, int64_t i) {
  const double den = t.num[t.dv];
  for (int64_t e = 0; e < t.dv; ++e) t.raw[e] = den == 0.0 ? 0.0 : t.num[e] / den;
  StoreRow(w.out, t.b, h, i, t.dv, t.raw);
}

// Sets gg_row = g' = [dout / den, -c / den] (0 when den == 0), dout in t.dout,
// c = dout . out. Pass 1 and pass 2 of the causal backward both build g' here.
void GradRow(const Tiles& t, double den, double c, double* HWY_RESTRICT gg_row) {
  std::fill(gg_row, gg_row + t.l.ld_s, 0.0);
  if (den == 0.0) return;
  for (int64_t e = 0; e < t.dv; ++e) gg_row[e] = t.dout[e] / den;
  gg_row[t.dv] = -c / den;
}

// Returns c = dout . out for out = num / den (0 when den == 0) and sets g'.
double MakeGradRow(const Tiles& t, double den, const double* HWY_RESTRICT num,
                   double* HWY_RESTRICT gg_row) {
  double c = 0.0;
  for (int64_t e = 0; den != 0.0 && e < t.dv; ++e) c += t.dout[e] * (num[e] / den);
  GradRow(t, den, c, gg_row);
  return c;
}

// Non-causal: S' += terms of keys [j0, j1) of item bg.
void AbsorbKeys(const LinearViews& w, const LinearProblem& pr, int64_t bg, int64_t j0, int64_t j1,
                double* state, double* scratch) {
  Tiles t(pr, bg, scratch);
  for (int64_t j = j0; j < j1; j += t.l.rows) {
    const int64_t nc = std::min(t.l.rows, j1 - j);
    LoadKeyTile(w, pr.feature_map, t, j, nc);
    AbsorbTile(t, nc, state);
  }
}

// Non-causal: out rows r in [r0, r1) of the group (r = h_local * seq_q + i).
void ForwardRows(const LinearViews& w, const LinearProblem& pr, int64_t bg, int64_t r0, int64_t r1,
                 const double* state, double* scratch) {
  Tiles t(pr, bg, scratch);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t h = t.Head(r / t.nq), i = r % t.nq;
    LoadRow(w.q, t.b, h, i, t.d, t.l.ld_d, t.fq);
    Phi(pr.feature_map, t.fq, t.d, t.l.ld_d);
    std::fill(t.num, t.num + t.l.ld_s, 0.0);
    if (t.nk > 0) RowTimesMatrix(t.num, t.fq, t.d, state, t.l.ld_s, t.l.ld_s);
    StoreOutRow(w, t, h, i);
  }
}

// Non-causal backward: dq of rows [r0, r1) and U' += sum f_r g'_r^T.
void BackwardRows(const LinearViews& w, const LinearProblem& pr, int64_t bg, int64_t r0, int64_t r1,
                  const double* state, double* u, double* scratch) {
  Tiles t(pr, bg, scratch);
  const LinearLayout& l = t.l;
  for (int64_t t0 = r0; t0 < r1; t0 += l.rows) {
    const int64_t nr = std::min(l.rows, r1 - t0);
    for (int64_t k = 0; k < nr; ++k) {
      const int64_t h = t.Head((t0 + k) / t.nq), i = (t0 + k) % t.nq;
      double* fq = t.fq + k * l.ld_d;
      LoadRow(w.q, t.b, h, i, t.d, l.ld_d, t.raw);
      std::copy(t.raw, t.raw + l.ld_d, fq);
      Phi(pr.feature_map, fq, t.d, l.ld_d);
      std::fill(t.num, t.num + l.ld_s, 0.0);
      if (t.nk > 0) RowTimesMatrix(t.num, fq, t.d, state, l.ld_s, l.ld_s);
      LoadRow(w.dout, t.b, h, i, t.dv, l.ld_s, t.dout);
      double* gg = t.gg + k * l.ld_s;
      MakeGradRow(t, t.num[t.dv], t.num, gg);
      std::fill(t.df, t.df + l.ld_d, 0.0);
      if (t.num[t.dv] != 0.0) {
        MatrixTimesVector(t.df, state, l.ld_s, t.d, gg, l.ld_s);  // d f = S' g'
        MulPhiGrad(pr.feature_map, t.raw, t.df, l.ld_d);
      }
      StoreRow(w.dq, t.b, h, i, t.d, t.df);
    }
    Transpose(t.fq, nr, t, t.fq_t);
    for (int64_t x = 0; x < t.d; ++x)
      RowTimesMatrix(u + x * l.ld_s, t.fq_t + x * l.ld_c, nr, t.gg, l.ld_s, l.ld_s);
  }
}

// Stores dk = phi'(k) * dfk and dv = dva[:head_dim_v] for key j (tile row c).
void StoreKeyGrads(const LinearViews& w, const LinearProblem& pr, Tiles& t, int64_t c, int64_t j) {
  double* dfk = t.dfk + c * t.l.ld_d;
  LoadRow(w.k, t.b, t.g, j, t.d, t.l.ld_d, t.raw);
  MulPhiGrad(pr.feature_map, t.raw, dfk, t.l.ld_d);
  StoreRow(w.dk, t.b, t.g, j, t.d, dfk);
  StoreRow(w.dv, t.b, t.g, j, t.dv, t.dva + c * t.l.ld_s);
}

// Sets the inter-chunk key gradients of the nc tile keys from U':
// d phi(k_c) = U' v'_c and dva_c = U'^T phi(k_c).
void KeyGradsFromState(Tiles& t, int64_t nc, const double* u) {
  const LinearLayout& l = t.l;
  for (int64_t c = 0; c < nc; ++c) {
    double* dfk = t.dfk + c * l.ld_d;
    std::fill(dfk, dfk + l.ld_d, 0.0);
    MatrixTimesVector(dfk, u, l.ld_s, t.d, t.vv + c * l.ld_s, l.ld_s);
    double* dva = t.dva + c * l.ld_s;
    std::fill(dva, dva + l.ld_s, 0.0);
    RowTimesMatrix(dva, t.fk + c * l.ld_d, t.d, u, l.ld_s, l.ld_s);
  }
}

// Non-causal backward: dk, dv of keys [j0, j1) from U'.
void BackwardKeys(const LinearViews& w, const LinearProblem& pr, int64_t bg, int64_t j0, int64_t j1,
                  const double* u, double* scratch) {
  Tiles t(pr, bg, scratch);
  for (int64_t j = j0; j < j1; j += t.l.rows) {
    const int64_t nc = std::min(t.l.rows, j1 - j);
    LoadKeyTile(w, pr.feature_map, t, j, nc);
    KeyGradsFromState(t, nc, u);
    for (int64_t c = 0; c < nc; ++c) StoreKeyGrads(w, pr, t, c, j + c);
  }
}

// Sets t.num = [num | den] of query i (head h, fq = phi(q_i)) in the chunk
// starting at key j0: inter f^T S' plus intra over the chunk keys c <= p_i.
void ChunkRow(Tiles& t, const double* fq, int64_t i, int64_t j0, const double* state) {
  const LinearLayout& l = t.l;
  const int64_t seen = i + t.off - j0 + 1;  // chunk keys this row sees
  std::fill(t.num, t.num + l.ld_s, 0.0);
  RowTimesMatrix(t.num, fq, t.d, state, l.ld_s, l.ld_s);  // inter: f^T S'
  const int64_t n_a = PadRow(seen);
  std::fill(t.a, t.a + n_a, 0.0);
  RowTimesMatrix(t.a, fq, t.d, t.fk_t, l.ld_c, n_a);       // A_c = f . phi(k_c)
  RowTimesMatrix(t.num, t.a, seen, t.vv, l.ld_s, l.ld_s);  // intra: sum A_c v'_c
}

// Causal forward of item bg, chunk by chunk, from and into `state`.
void CausalForward(const LinearViews& w, const LinearProblem& pr, int64_t bg, double* state,
                   double* scratch) {
  Tiles t(pr, bg, scratch);
  const LinearLayout& l = t.l;
  const bool write = w.out.present();
  for (int64_t hl = 0; write && hl < t.group; ++hl)  // rows with no key: out = 0
    for (int64_t i = 0; i < std::min(t.nq, -t.off); ++i)
      StoreZeroRow(w.out, t.b, t.Head(hl), i, t.dv, t.raw);
  for (int64_t j0 = 0; j0 < t.nk; j0 += l.rows) {
    const int64_t nc = std::min(l.rows, t.nk - j0);
    LoadKeyTile(w, pr.feature_map, t, j0, nc);
    const int64_t i0 = std::max<int64_t>(j0 - t.off, 0), i1 = std::min(j0 + nc - t.off, t.nq);
    for (int64_t hl = 0; write && hl < t.group; ++hl) {
      for (int64_t i = i0; i < i1; ++i) {
        LoadRow(w.q, t.b, t.Head(hl), i, t.d, l.ld_d, t.fq);
        Phi(pr.feature_map, t.fq, t.d, l.ld_d);
        ChunkRow(t, t.fq, i, j0, state);
        StoreOutRow(w, t, t.Head(hl), i);
      }
    }
    AbsorbTile(t, nc, state);
  }
}

// Causal backward of item bg: pass 1 (chunks forward) writes dq and keeps
// [den, dout . out] per row in rowbuf [group * seq_q, 2]; pass 2 (chunks
// backward) writes dk, dv.
void CausalBackward(const LinearViews& w, const LinearProblem& pr, int64_t bg, double* state,
                    double* rowbuf, double* scratch) {
  Tiles t(pr, bg, scratch);
  const LinearLayout& l = t.l;
  const FeatureMap fm = pr.feature_map;
  const int64_t sd = t.d * l.ld_s;
  std::fill(state, state + sd, 0.0);
  for (int64_t hl = 0; hl < t.group; ++hl)
    for (int64_t i = 0; i < std::min(t.nq, -t.off); ++i) {
      StoreZeroRow(w.dq, t.b, t.Head(hl), i, t.d, t.raw);
      rowbuf[2 * (hl * t.nq + i)] = rowbuf[2 * (hl * t.nq + i) + 1] = 0.0;
    }
  // Pass 1: d f_i = S' g'_i + sum_{c <= p_i} phi(k_c) (v'_c . g'_i).
  for (int64_t j0 = 0; j0 < t.nk; j0 += l.rows) {
    const int64_t nc = std::min(l.rows, t.nk - j0);
    LoadKeyTile(w, fm, t, j0, nc);
    const int64_t i0 = std::max<int64_t>(j0 - t.off, 0), i1 = std::min(j0 + nc - t.off, t.nq);
    for (int64_t hl = 0; hl < t.group; ++hl) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t h = t.Head(hl), seen = i + t.off - j0 + 1;
        LoadRow(w.q, t.b, h, i, t.d, l.ld_d, t.raw);
        std::copy(t.raw, t.raw + l.ld_d, t.fq);
        Phi(fm, t.fq, t.d, l.ld_d);
        ChunkRow(t, t.fq, i, j0, state);
        LoadRow(w.dout, t.b, h, i, t.dv, l.ld_s, t.dout);
        const double den = t.num[t.dv];
        rowbuf[2 * (hl * t.nq + i)] = den;
        rowbuf[2 * (hl * t.nq + i) + 1] = MakeGradRow(t, den, t.num, t.gg);
        std::fill(t.df, t.df + l.ld_d, 0.0);
        if (den != 0.0) {
          MatrixTimesVector(t.df, state, l.ld_s, t.d, t.gg, l.ld_s);   // inter
          MatrixTimesVector(t.vec, t.vv, l.ld_s, seen, t.gg, l.ld_s);  // v'_c . g'
          RowTimesMatrix(t.df, t.vec, seen, t.fk, l.ld_d, l.ld_d);     // intra
          MulPhiGrad(fm, t.raw, t.df, l.ld_d);
        }
        StoreRow(w.dq, t.b, h, i, t.d, t.df);
      }
    }
    AbsorbTile(t, nc, state);
  }
  // Pass 2: U' (here `state`) holds the rows of the chunks after the current one.
  std::fill(state, state + sd, 0.0);
  for (int64_t j0 = (t.nk - 1) / l.rows * l.rows; t.nk > 0 && j0 >= 0; j0 -= l.rows) {
    const int64_t nc = std::min(l.rows, t.nk - j0);
    LoadKeyTile(w, fm, t, j0, nc);
    KeyGradsFromState(t, nc, state);
    const int64_t i0 = std::max<int64_t>(j0 - t.off, 0), i1 = std::min(j0 + nc - t.off, t.nq);
    const int64_t nr = std::max<int64_t>(i1 - i0, 0);
    for (int64_t hl = 0; hl < t.group && nr > 0; ++hl) {
      const int64_t h = t.Head(hl);
      for (int64_t k = 0; k < nr; ++k) {
        double* fq = t.fq + k * l.ld_d;
        LoadRow(w.q, t.b, h, i0 + k, t.d, l.ld_d, fq);
        Phi(fm, fq, t.d, l.ld_d);
        LoadRow(w.dout, t.b, h, i0 + k, t.dv, l.ld_s, t.dout);
        const double* rb = rowbuf + 2 * (hl * t.nq + i0 + k);
        GradRow(t, rb[0], rb[1], t.gg + k * l.ld_s);  // bitwise pass 1's g'
      }
      for (int64_t c = 0; c < nc; ++c) {
        // Rows k >= k_lo have p_i = i0 + k + off >= j0 + c.
        const int64_t k_lo = std::max<int64_t>(j0 + c - t.off - i0, 0), cnt = nr - k_lo;
        if (cnt <= 0) continue;
        MatrixTimesVector(t.vec, t.gg + k_lo * l.ld_s, l.ld_s, cnt, t.vv + c * l.ld_s, l.ld_s);
        RowTimesMatrix(t.dfk + c * l.ld_d, t.vec, cnt, t.fq + k_lo * l.ld_d, l.ld_d, l.ld_d);
        MatrixTimesVector(t.vec, t.fq + k_lo * l.ld_d, l.ld_d, cnt, t.fk + c * l.ld_d, l.ld_d);
        RowTimesMatrix(t.dva + c * l.ld_s, t.vec, cnt, t.gg + k_lo * l.ld_s, l.ld_s, l.ld_s);
      }
      Transpose(t.fq, nr, t, t.fq_t);
      for (int64_t x = 0; x < t.d; ++x)  // U' += phi(Q_c)^T G'_c
        RowTimesMatrix(state + x * l.ld_s, t.fq_t + x * l.ld_c, nr, t.gg, l.ld_s, l.ld_s);
    }
    for (int64_t c = 0; c < nc; ++c) StoreKeyGrads(w, pr, t, c, j0 + c);
  }
}

const char* TargetName() { return hwy::TargetName(HWY_TARGET); }

}  // namespace qkv::internal::linear::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace qkv::internal::linear {

HWY_EXPORT(AbsorbKeys);
HWY_EXPORT(ForwardRows);
HWY_EXPORT(BackwardRows);
HWY_EXPORT(BackwardKeys);
HWY_EXPORT(CausalForward);
HWY_EXPORT(CausalBackward);
HWY_EXPORT(TargetName);

namespace {

int64_t NumParts(int64_t n) {
  const int64_t want = (n + LinearTraits::kPartRows - 1) / LinearTraits::kPartRows;
  return std::clamp<int64_t>(want, 1, LinearTraits::kMaxParts);
}
int64_t PartLo(int64_t p, int64_t parts, int64_t n) { return p * n / parts; }

// sum = sum over the parts of [0, n) of fn(lo, hi, buf) (each into a zeroed
// buf), added in part order; one thread. tmp: a second state buffer.
template <class F>
void ReduceSerial(int64_t n, int64_t sd, double* sum, double* tmp, const F& fn) {
  const int64_t parts = NumParts(n);
  std::fill(sum, sum + sd, 0.0);
  fn(PartLo(0, parts, n), PartLo(1, parts, n), sum);
  for (int64_t p = 1; p < parts; ++p) {
    std::fill(tmp, tmp + sd, 0.0);
    fn(PartLo(p, parts, n), PartLo(p + 1, parts, n), tmp);
    for (int64_t x = 0; x < sd; ++x) sum[x] += tmp[x];
  }
}

// The same sums, the parts shared by the threads of the enclosing parallel
// region (every thread calls this); partials: [kMaxParts, sd].
template <class F>
void ReducePhased(int64_t n, int64_t sd, double* sum, double* partials, const F& fn) {
  const int64_t parts = NumParts(n);
#pragma omp for schedule(dynamic, 1)
  for (int64_t p = 0; p < parts; ++p) {
    double* dst = partials + p * sd;
    std::fill(dst, dst + sd, 0.0);
    fn(PartLo(p, parts, n), PartLo(p + 1, parts, n), dst);
  }
#pragma omp single
  {
    std::copy(partials, partials + sd, sum);
    for (int64_t p = 1; p < parts; ++p)
      for (int64_t x = 0; x < sd; ++x) sum[x] += partials[p * sd + x];
  }
}

int64_t Items(const LinearProblem& pr) { return pr.dims.batch * pr.dims.num_kv_heads; }
int64_t StateDoubles(const LinearProblem& pr) {
  return pr.dims.head_dim * LinearStateLd(pr.dims.head_dim_v);
}

// Per-thread buffer: the tiles, then `states` state buffers, then `extra`
// doubles.
struct ThreadBuf {
  std::vector<double> v;
  int64_t tiles_, sd_, states_;
  ThreadBuf(const LinearProblem& pr, int states, int64_t extra)
      : tiles_(LinearLayout::For(pr).doubles), sd_(StateDoubles(pr)), states_(states) {
    v.resize(tiles_ + states * sd_ + extra);
  }
  double* tiles() { return v.data(); }
  double* state(int i) { return v.data() + tiles_ + i * sd_; }
  double* extra() { return v.data() + tiles_ + states_ * sd_; }
};

}  // namespace

const char* Target() { return HWY_DYNAMIC_DISPATCH(TargetName)(); }

LinearPlan Plan(const LinearProblem& pr, bool backward, bool external_state) {
  LinearPlan plan;
  const int64_t items = Items(pr);
  const double sd = static_cast<double>(StateDoubles(pr)) * sizeof(double);
  const double tiles = static_cast<double>(LinearLayout::For(pr).doubles) * sizeof(double);
  plan.by_item = pr.causal || items >= pr.dims.threads;
  plan.threads = static_cast<int>(plan.by_item ? std::clamp<int64_t>(items, 1, pr.dims.threads)
                                               : pr.dims.threads);
  double states = 0, extra = 0;
  if (pr.causal) {
    states = (external_state ? 0 : plan.threads) * sd;
    if (backward) extra = plan.threads * 2.0 * pr.dims.group_size * pr.dims.seq_q * 8.0;
  } else if (plan.by_item) {
    states = plan.threads * (backward ? 3 : 2) * sd;
  } else {  // the partials, S' and U'
    states = (LinearTraits::kMaxParts + (backward ? 2 : 1)) * sd;
  }
  const double total = states + extra + plan.threads * tiles;
  plan.state_bytes = static_cast<int64_t>(std::min(states, 9.0e18));
  plan.scratch_bytes = static_cast<int64_t>(std::min(total, 9.0e18));
  return plan;
}

// Non-causal forward or backward: S' summed over the key parts; the forward
// then writes out per row; the backward sums U' over the row parts (writing
// dq), then writes dk, dv per key tile.
void NonCausal(const LinearViews& w, const LinearProblem& pr, const LinearPlan& plan,
               bool backward) {
  const int64_t items = Items(pr), sd = StateDoubles(pr);
  const int64_t nk = pr.dims.seq_kv, nr = pr.dims.group_size * pr.dims.seq_q;
  auto* const absorb = &HWY_DYNAMIC_DISPATCH(AbsorbKeys);
  auto* const forward_rows = &HWY_DYNAMIC_DISPATCH(ForwardRows);
  auto* const backward_rows = &HWY_DYNAMIC_DISPATCH(BackwardRows);
  auto* const keys = &HWY_DYNAMIC_DISPATCH(BackwardKeys);
  if (plan.by_item) {
#pragma omp parallel num_threads(plan.threads)
    {
      ThreadBuf buf(pr, backward ? 3 : 2, 0);
      double *s = buf.state(0), *u = buf.state(1), *tmp = buf.state(backward ? 2 : 1);
      double* tiles = buf.tiles();
#pragma omp for schedule(dynamic, 1)
      for (int64_t bg = 0; bg < items; ++bg) {
        ReduceSerial(nk, sd, s, tmp, [&](int64_t lo, int64_t hi, double* dst) {
          absorb(w, pr, bg, lo, hi, dst, tiles);
        });
        if (!backward) {
          forward_rows(w, pr, bg, 0, nr, s, tiles);
          continue;
        }
        ReduceSerial(nr, sd, u, tmp, [&](int64_t lo, int64_t hi, double* dst) {
          backward_rows(w, pr, bg, lo, hi, s, dst, tiles);
        });
        keys(w, pr, bg, 0, nk, u, tiles);
      }
    }
    return;
  }
  std::vector<double> shared((LinearTraits::kMaxParts + 2) * sd);
  double *s = shared.data(), *u = s + sd, *partials = u + sd;
  const int64_t tile = LinearTraits::kTile;
#pragma omp parallel num_threads(plan.threads)
  {
    ThreadBuf buf(pr, 0, 0);
    double* tiles = buf.tiles();
    for (int64_t bg = 0; bg < items; ++bg) {
      ReducePhased(nk, sd, s, partials, [&](int64_t lo, int64_t hi, double* dst) {
        absorb(w, pr, bg, lo, hi, dst, tiles);
      });
      if (!backward) {
#pragma omp for schedule(dynamic, 1)
        for (int64_t r0 = 0; r0 < nr; r0 += tile)
          forward_rows(w, pr, bg, r0, std::min(r0 + tile, nr), s, tiles);
        continue;
      }
      ReducePhased(nr, sd, u, partials, [&](int64_t lo, int64_t hi, double* dst) {
        backward_rows(w, pr, bg, lo, hi, s, dst, tiles);
      });
#pragma omp for schedule(dynamic, 1)
      for (int64_t j0 = 0; j0 < nk; j0 += tile)
        keys(w, pr, bg, j0, std::min(j0 + tile, nk), u, tiles);
    }
  }
}

void Forward(const LinearViews& w, const LinearProblem& pr, double* states) {
  const int64_t items = Items(pr), sd = StateDoubles(pr);
  if (items == 0) return;
  const LinearPlan plan = Plan(pr, false, states != nullptr);
  (void)Target();  // resolve the target outside the parallel region
  if (!pr.causal) return NonCausal(w, pr, plan, false);
  auto* const run = &HWY_DYNAMIC_DISPATCH(CausalForward);
#pragma omp parallel num_threads(plan.threads)
  {
    ThreadBuf buf(pr, states ? 0 : 1, 0);
#pragma omp for schedule(dynamic, 1)
    for (int64_t bg = 0; bg < items; ++bg) {
      double* st = states ? states + bg * sd : buf.state(0);
      if (!states) std::fill(st, st + sd, 0.0);
      run(w, pr, bg, st, buf.tiles());
    }
  }
}

void Backward(const LinearViews& w, const LinearProblem& pr) {
  if (Items(pr) == 0) return;
  const LinearPlan plan = Plan(pr, true, false);
  (void)Target();
  if (!pr.causal) return NonCausal(w, pr, plan, true);
  auto* const run = &HWY_DYNAMIC_DISPATCH(CausalBackward);
#pragma omp parallel num_threads(plan.threads)
  {
    ThreadBuf buf(pr, 1, 2 * pr.dims.group_size * pr.dims.seq_q);  // + [den, c] per row
#pragma omp for schedule(dynamic, 1)
    for (int64_t bg = 0; bg < Items(pr); ++bg)
      run(w, pr, bg, buf.state(0), buf.extra(), buf.tiles());
  }
}

}  // namespace qkv::internal::linear

namespace qkv::internal {

int64_t LinearStateLd(int64_t head_dim_v) { return PadRow(head_dim_v + 1); }
LinearPlan PlanLinear(const LinearProblem& pr, bool bwd, bool ext) {
  return linear::Plan(pr, bwd, ext);
}
void LinearForward(const LinearViews& w, const LinearProblem& pr, double* states) {
  linear::Forward(w, pr, states);
}
void LinearBackward(const LinearViews& w, const LinearProblem& pr) { linear::Backward(w, pr); }
const char* LinearSimdTarget() { return linear::Target(); }

}  // namespace qkv::internal
#endif  // HWY_ONCE
