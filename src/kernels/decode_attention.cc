// The split-KV decode kernel ("flash-decoding": Dao, Haziza, Massa, Sizov
// 2023, https://crfm.stanford.edu/2023/10/12/flashdecoding.html; ggml's
// split-KV vec path) for a few new queries per sequence against a KV cache.
//
// Work items. For sequence b and KV head g, the group_size query heads that
// share g times the seq_q new queries are R = group_size * seq_q rows
// r = h_local * seq_q + i. The cached tokens (chunks concatenated) are cut
// into splits of split_tokens consecutive tokens; a work item is (b, g,
// split s). It reads each K/V row of its split once for all R rows (GQA-aware:
// llama3-8b's 4 heads per KV head cost one pass over K/V, not 4) and writes
// R partials (out_s = acc / l, lse_s = m + log l). Items are independent;
// qkv::Decode merges each row's partials in split order. Since the split
// boundaries come from the data and every partial is computed by one thread
// in a fixed order, any thread count gives bitwise identical results.
//
// Per item, for each block of up to kBlockKV tokens of one chunk:
//   0. row r may attend positions [lo_r, hi_r) = [p_i - window + 1, p_i + 1)
//      (lo_r = 0 without a window); in block coordinates [a_r, e_r); the
//      union [c0, c1) is what is read; an empty union skips the block, and
//      a split that misses every row's range is skipped before Q is packed.
//   1. s_rc = Q'_r . K_c for every row and c in [c0, c1), Q' = scale * Q
//      packed once per item (head_dim in SIMD lanes; tiles of 2 rows x 4
//      keys, so each K load serves 2 rows and each Q load 4 keys);
//   2. online softmax per row over [a_r, e_r):
//        m_new = max(m_old, max_c s_rc),  alpha = exp(m_old - m_new)
//        p_rc  = exp(s_rc - m_new),       l = alpha * l + sum_c p_rc
//   3. acc_r = alpha * acc_r + sum_{c in [a_r, e_r), p_rc != 0} p_rc V_c,
//      two rows per V load.
// float32 K/V rows whose head_dim is a multiple of the lane count are read
// in place; float16, bfloat16 and int8 rows (value = int8 * scale of its
// (token, kv head)) and odd head_dims are converted into a zero-padded
// float32 tile first, so one loop body serves every dtype.
//
// Memory traffic: each K/V row (and int8 scale) of an attended token is read
// once per step for the whole group; Q and the partials are tiny. A decode
// step is bound by memory: 4 query heads x 128 dims cost 2 FMAs per K/V
// float, far below the FMA peak. Items run KV head fastest within a split,
// so in a token-major cache (heads interleaved per token, as KvCache stores
// them) the lines the hardware fetched around one head's rows are still in
// L2 for the next head: 1.5x faster at 64K tokens than split-major order.
// Rejected: software prefetch of the next block (hwy::Prefetch of every
// line, 1 to 8 blocks ahead): 0 to 10% slower for float32 and neutral for
// int8 once the item order was fixed (1 thread, B = 1, 32/8 heads, D = 128).
//
// Edge cases:
//   * Tokens outside a row's range never meet the row: scores, exps and
//     P.V loops run over [a_r, e_r) only, so a NaN or inf in an evicted-by-
//     window K/V row cannot turn into 0 * NaN. p = 0 (an underflow or an
//     s = -inf from inf inputs) skips its V row for the same reason.
//   * While m is -inf (no finite score yet) 0 is subtracted instead, so
//     exp(-inf - -inf) never happens; a row with no attended key keeps l = 0
//     and writes lse = -inf: the merge ignores it, zeros if all are -inf.
//   * hn::Exp returns 0 for NaN; ExpOrNan restores NaN, so an attended NaN
//     score makes its row NaN like std::exp does (as the flash kernel).
#include "kernels/decode_attention.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>

// Target-independent part: compiled once although foreach_target re-includes
// this file.
#ifndef QKV_SRC_KERNELS_DECODE_ATTENTION_CC_ONCE_
#define QKV_SRC_KERNELS_DECODE_ATTENTION_CC_ONCE_
namespace qkv::internal {

struct DecodeTraits {
  // Tokens per block: the converted K and V tiles are 2 x 32 x 128 floats =
  // 32 KiB at head_dim 128, inside the 48 KiB L1d; the score row of a block
  // is 2 AVX-512 vectors. A multiple of every target's lane count (<= 16).
  static constexpr int64_t kBlockKV = 32;
  // kBlockKV 16 and 64 measured within +-3% of 32 (64K tokens, float32 and
  // int8, 1 thread): the block size does not bound the kernel.
  static_assert(kBlockKV % 16 == 0, "score rows must fill whole vectors");
};

}  // namespace qkv::internal
#endif  // QKV_SRC_KERNELS_DECODE_ATTENTION_CC_ONCE_

// The same targets as flash_attention.cc: AVX3, AVX2, SSE4 and the fallback.
#ifndef HWY_DISABLED_TARGETS
#define HWY_DISABLED_TARGETS (HWY_SSSE3 | HWY_AVX3_DL)
#endif
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/decode_attention.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/aligned_allocator.h"
#include "hwy/highway.h"
#include "hwy/contrib/math/math-inl.h"

HWY_BEFORE_NAMESPACE();
namespace qkv::internal::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
// Helpers are internal to this file: flash_attention.cc defines its own
// per-target functions in the same qkv::internal::N_* namespaces.
namespace {

using DF = hn::ScalableTag<float>;
using DI = hn::RebindToSigned<DF>;
using VF = hn::Vec<DF>;
constexpr int64_t kBc = DecodeTraits::kBlockKV;
constexpr float kInf = std::numeric_limits<float>::infinity();

// Returns exp(x) per lane, NaN for NaN (hn::Exp alone returns 0 for NaN).
HWY_INLINE VF ExpOrNan(DF df, VF x) { return hn::IfThenElse(hn::IsNaN(x), x, hn::Exp(df, x)); }

float LoadQ(const void* base, DType dtype, int64_t offset) {
  switch (dtype) {
    case DType::kFloat32: return static_cast<const float*>(base)[offset];
    case DType::kFloat64: return static_cast<float>(static_cast<const double*>(base)[offset]);
    case DType::kFloat16: return HalfToFloat(static_cast<const uint16_t*>(base)[offset]);
    default: return 0.0f;  // excluded by validation
  }
}

// Converts the `dim` elements of one cached row (`base` + `offset` elements
// of `dtype`) to float32 `dst`, int8 times `scale`, zeros up to `dim_pad`.
void ConvertRow(const void* base, DType dtype, int64_t offset, float scale, int64_t dim,
                int64_t dim_pad, float* HWY_RESTRICT dst) {
  const DF df;
  const int64_t nf = static_cast<int64_t>(hn::Lanes(df));
  int64_t x = 0;
  switch (dtype) {
    case DType::kFloat32:
      std::memcpy(dst, static_cast<const float*>(base) + offset, dim * sizeof(float));
      x = dim;
      break;
    case DType::kFloat16: {
      const hn::Rebind<hwy::float16_t, DF> dh;
      const auto* src = static_cast<const hwy::float16_t*>(base) + offset;
      for (; x + nf <= dim; x += nf) hn::Store(hn::PromoteTo(df, hn::LoadU(dh, src + x)), df, dst + x);
      const auto* bits = static_cast<const uint16_t*>(base) + offset;
      for (; x < dim; ++x) dst[x] = HalfToFloat(bits[x]);
      break;
    }
    case DType::kBFloat16: {  // bf16 bits are the top half of the float: shift left 16
      const hn::RebindToUnsigned<DF> du;
      const hn::Rebind<uint16_t, DF> du16;
      const auto* src = static_cast<const uint16_t*>(base) + offset;
      for (; x + nf <= dim; x += nf) {
        const auto wide = hn::ShiftLeft<16>(hn::PromoteTo(du, hn::LoadU(du16, src + x)));
        hn::Store(hn::BitCast(df, wide), df, dst + x);
      }
      for (; x < dim; ++x) dst[x] = BFloat16ToFloat(src[x]);
      break;
    }
    case DType::kInt8: {  // value = int8 * scale (int8 -> float is exact)
      const DI di;
      const hn::Rebind<int8_t, DF> d8;
      const auto* src = static_cast<const int8_t*>(base) + offset;
      const VF sv = hn::Set(df, scale);
      for (; x + nf <= dim; x += nf)
        hn::Store(hn::Mul(hn::ConvertTo(df, hn::PromoteTo(di, hn::LoadU(d8, src + x))), sv), df, dst + x);
      for (; x < dim; ++x) dst[x] = static_cast<float>(src[x]) * scale;
      break;
    }
    default: break;  // excluded by validation
  }
  for (; x < dim_pad; ++x) dst[x] = 0.0f;
}

// Computes s_r[c] = q_r . K_c for kRows rows (q_r, s_r = q + r * q_stride,
// s + r * kBc) and c in [c0, c1): K_c = k + c * k_stride, dim_pad floats (a
// multiple of the lane count; q is aligned). Tiles of kRows x 4 keys: each
// K load serves kRows rows and each q load 4 keys, and the 4 * kRows
// independent FMA chains cover the FMA latency (4 cycles x 2 ports = 8).
template <int kRows>
void ScoreTile(const float* HWY_RESTRICT q, int64_t q_stride, const float* HWY_RESTRICT k,
               int64_t k_stride, int64_t dim_pad, int64_t c0, int64_t c1, float* HWY_RESTRICT s) {
  const DF df;
  const int64_t nf = static_cast<int64_t>(hn::Lanes(df));
  int64_t c = c0;
  for (; c + 4 <= c1; c += 4) {
    const float* kc = k + c * k_stride;
    VF acc[kRows][4];
    HWY_UNROLL(2) for (int r = 0; r < kRows; ++r)
      HWY_UNROLL(4) for (int j = 0; j < 4; ++j) acc[r][j] = hn::Zero(df);
    for (int64_t d = 0; d < dim_pad; d += nf) {
      VF kv[4];
      HWY_UNROLL(4) for (int j = 0; j < 4; ++j) kv[j] = hn::LoadU(df, kc + j * k_stride + d);
      HWY_UNROLL(2) for (int r = 0; r < kRows; ++r) {
        const VF qv = hn::Load(df, q + r * q_stride + d);
        HWY_UNROLL(4) for (int j = 0; j < 4; ++j) acc[r][j] = hn::MulAdd(qv, kv[j], acc[r][j]);
      }
    }
    HWY_UNROLL(2) for (int r = 0; r < kRows; ++r)
      HWY_UNROLL(4) for (int j = 0; j < 4; ++j)
        s[r * kBc + c + j] = hn::GetLane(hn::SumOfLanes(df, acc[r][j]));
  }
  for (; c < c1; ++c) {
    const float* kc = k + c * k_stride;
    VF acc[kRows];
    HWY_UNROLL(2) for (int r = 0; r < kRows; ++r) acc[r] = hn::Zero(df);
    for (int64_t d = 0; d < dim_pad; d += nf) {
      const VF kv = hn::LoadU(df, kc + d);
      HWY_UNROLL(2) for (int r = 0; r < kRows; ++r)
        acc[r] = hn::MulAdd(hn::Load(df, q + r * q_stride + d), kv, acc[r]);
    }
    HWY_UNROLL(2) for (int r = 0; r < kRows; ++r) s[r * kBc + c] = hn::GetLane(hn::SumOfLanes(df, acc[r]));
  }
}

// Online-softmax update of one row for the block's scores s[c0, c1), of
// which the row attends [a, e) (a < e): m, l and alpha updated, and
// s[c0, c1) = p, exactly 0 outside [a, e).
void SoftmaxRow(float* HWY_RESTRICT s, int64_t c0, int64_t c1, int64_t a, int64_t e,
                float* row_max, float* row_sum, float* alpha_out) {
  const DF df;
  const DI di;
  const int64_t nf = static_cast<int64_t>(hn::Lanes(df));
  const VF neg_inf = hn::Set(df, -kInf);
  const auto av = hn::Set(di, static_cast<int32_t>(a)), ev = hn::Set(di, static_cast<int32_t>(e));
  // m_new = max(m_old, max_c s): lanes outside [a, e) are -inf.
  VF mx = neg_inf;
  for (int64_t x = a / nf * nf; x < e; x += nf) {
    const auto idx = hn::Iota(di, static_cast<int32_t>(x));
    const auto in = hn::RebindMask(df, hn::AndNot(hn::Lt(idx, av), hn::Lt(idx, ev)));
    mx = hn::Max(mx, hn::IfThenElse(in, hn::Load(df, s + x), neg_inf));
  }
  const float m_old = *row_max;
  const float m_new = std::max(m_old, hn::GetLane(hn::MaxOfLanes(df, mx)));
  // While no finite score is seen m_new = -inf: subtract 0 instead, so
  // exp(-inf - 0) = 0 rather than exp(-inf - -inf) = NaN.
  const float m_sub = m_new == -kInf ? 0.0f : m_new;
  const float alpha = std::exp(m_old - m_sub);  // alpha = exp(m_old - m_new)
  // p = exp(s - m_new) inside [a, e), exactly 0 elsewhere in [c0, c1).
  const VF ms = hn::Set(df, m_sub);
  VF l0 = hn::Zero(df);
  for (int64_t x = c0 / nf * nf; x < c1; x += nf) {
    const auto idx = hn::Iota(di, static_cast<int32_t>(x));
    const auto in = hn::RebindMask(df, hn::AndNot(hn::Lt(idx, av), hn::Lt(idx, ev)));
    const VF p = hn::IfThenElseZero(in, ExpOrNan(df, hn::Sub(hn::Load(df, s + x), ms)));
    hn::Store(p, df, s + x);
    l0 = hn::Add(l0, p);
  }
  *row_sum = alpha * *row_sum + hn::GetLane(hn::SumOfLanes(df, l0));  // l = alpha * l + sum p
  *row_max = m_new;
  *alpha_out = alpha;
}

// acc_r[0, kN * NF) = alpha_r * acc_r + sum_{c in [c0, c1), p_r[c] != 0}
// p_r[c] * V_c for kRows rows (p_r = p + r * kBc, acc_r = acc + r *
// acc_stride). Both rows share each V load; a token whose weight is 0 for
// a row (outside its range, or underflowed) is not multiplied into that row,
// so a masked inf/NaN V never meets a 0 weight (0 * inf = NaN).
template <int kN, int kRows>
HWY_INLINE void WeightedSumTile(DF df, const float* alpha, const float* HWY_RESTRICT p,
                                const float* HWY_RESTRICT v, int64_t v_stride, int64_t c0,
                                int64_t c1, float* HWY_RESTRICT acc, int64_t acc_stride) {
  const size_t nf = hn::Lanes(df);
  VF sum[kRows][kN];
  HWY_UNROLL(2) for (int r = 0; r < kRows; ++r) {
    const VF al = hn::Set(df, alpha[r]);
    HWY_UNROLL(8) for (int n = 0; n < kN; ++n)
      sum[r][n] = hn::Mul(al, hn::Load(df, acc + r * acc_stride + n * nf));
  }
  for (int64_t c = c0; c < c1; ++c) {
    const float* vc = v + c * v_stride;
    const float p0 = p[c], p1 = kRows == 2 ? p[kBc + c] : 0.0f;
    if (kRows == 2 && p0 != 0.0f && p1 != 0.0f) {
      const VF pv0 = hn::Set(df, p0), pv1 = hn::Set(df, p1);
      HWY_UNROLL(8) for (int n = 0; n < kN; ++n) {
        const VF vv = hn::LoadU(df, vc + n * nf);
        sum[0][n] = hn::MulAdd(pv0, vv, sum[0][n]);
        sum[kRows - 1][n] = hn::MulAdd(pv1, vv, sum[kRows - 1][n]);
      }
      continue;
    }
    if (p0 != 0.0f) {
      const VF pv0 = hn::Set(df, p0);
      HWY_UNROLL(8) for (int n = 0; n < kN; ++n)
        sum[0][n] = hn::MulAdd(pv0, hn::LoadU(df, vc + n * nf), sum[0][n]);
    }
    if (kRows == 2 && p1 != 0.0f) {
      const VF pv1 = hn::Set(df, p1);
      HWY_UNROLL(8) for (int n = 0; n < kN; ++n)
        sum[kRows - 1][n] = hn::MulAdd(pv1, hn::LoadU(df, vc + n * nf), sum[kRows - 1][n]);
    }
  }
  HWY_UNROLL(2) for (int r = 0; r < kRows; ++r)
    HWY_UNROLL(8) for (int n = 0; n < kN; ++n) hn::Store(sum[r][n], df, acc + r * acc_stride + n * nf);
}

// WeightedSumTile over all of dim_pad, up to 8 vectors per row and pass:
// head_dim 128 in one pass on AVX-512 with 16 accumulators for two rows,
// half the register file (on 16-register targets some spill to L1).
template <int kRows>
void WeightedSumRows(const float* alpha, const float* p, const float* v, int64_t v_stride,
                     int64_t dim_pad, int64_t c0, int64_t c1, float* acc, int64_t acc_stride) {
  const DF df;
  const int64_t nf = static_cast<int64_t>(hn::Lanes(df));
  for (int64_t d0 = 0; d0 < dim_pad;) {
    const int64_t left = (dim_pad - d0) / nf;
    if (left >= 8) {
      WeightedSumTile<8, kRows>(df, alpha, p, v + d0, v_stride, c0, c1, acc + d0, acc_stride);
      d0 += 8 * nf;
    } else if (left >= 4) {
      WeightedSumTile<4, kRows>(df, alpha, p, v + d0, v_stride, c0, c1, acc + d0, acc_stride);
      d0 += 4 * nf;
    } else if (left >= 2) {
      WeightedSumTile<2, kRows>(df, alpha, p, v + d0, v_stride, c0, c1, acc + d0, acc_stride);
      d0 += 2 * nf;
    } else {
      WeightedSumTile<1, kRows>(df, alpha, p, v + d0, v_stride, c0, c1, acc + d0, acc_stride);
      d0 += nf;
    }
  }
}

// Per-thread scratch, sized for R rows and dim_pad.
struct Scratch {
  hwy::AlignedFreeUniquePtr<float[]> q, acc, s, k_tile, v_tile, row_max, row_sum, alpha;
  std::vector<int64_t> lo, hi, a, e;

  Scratch(int64_t rows, int64_t dim_pad) {
    auto alloc = [](int64_t n) {
      auto ptr = hwy::AllocateAligned<float>(static_cast<size_t>(std::max<int64_t>(n, 1)));
      std::fill(ptr.get(), ptr.get() + std::max<int64_t>(n, 1), 0.0f);
      return ptr;
    };
    q = alloc(rows * dim_pad), acc = alloc(rows * dim_pad), s = alloc(rows * kBc);
    k_tile = alloc(kBc * dim_pad), v_tile = alloc(kBc * dim_pad);
    row_max = alloc(rows), row_sum = alloc(rows), alpha = alloc(rows);
    lo.resize(rows), hi.resize(rows), a.resize(rows), e.resize(rows);
  }
};

struct ItemResult {
  bool computed = false;  // false: skipped, every partial has lse = -inf
  int64_t bytes = 0;      // K/V (and scale) bytes read
};

// Computes the R partials of work item (b, g, split).
ItemResult RunItem(const DecodeParams& p, const DecodePlan& plan, int64_t b, int64_t g,
                int64_t split, Scratch& w, float* part_out, float* part_lse) {
  const DF df;
  const int64_t nf = static_cast<int64_t>(hn::Lanes(df));
  const KvSequenceView& view = p.sequences[b];
  const int64_t dim = plan.head_dim, dim_pad = (dim + nf - 1) / nf * nf;
  const int64_t nq = plan.seq_q, rows = plan.group_size * nq;
  const int64_t num_splits = plan.splits[b];
  auto part = [&](int64_t r) {  // index of row r's partial
    const int64_t h = g * plan.group_size + r / nq;
    return plan.part_base[b] + (h * nq + r % nq) * num_splits + split;
  };

  // 0. Row ranges by position; the union of rows is [lo_min, hi_max).
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t pos = view.length - nq + r % nq;  // p_i
    w.hi[r] = pos + 1;
    w.lo[r] = plan.window > 0 ? std::max<int64_t>(0, pos - plan.window + 1) : 0;
  }
  const int64_t lo_min = w.lo[0], hi_max = w.hi[nq - 1];

  // The split's cached tokens [k0, k1) start in chunk ci at token t.
  const int64_t k0 = split * plan.split_tokens;
  const int64_t k1 = std::min(plan.kept[b], k0 + plan.split_tokens);
  size_t ci = 0;
  int64_t chunk_start = 0;  // cached index of chunk ci's first token
  while (chunk_start + view.chunks[ci].count <= k0) chunk_start += view.chunks[ci++].count;
  {  // Skip the split when its first and last positions miss [lo_min, hi_max).
    size_t cj = ci;
    int64_t start_j = chunk_start;
    while (start_j + view.chunks[cj].count < k1) start_j += view.chunks[cj++].count;
    const int64_t first_pos = view.chunks[ci].first_position + (k0 - chunk_start);
    const int64_t last_pos = view.chunks[cj].first_position + (k1 - 1 - start_j);
    if (last_pos < lo_min || first_pos >= hi_max) {
      for (int64_t r = 0; r < rows; ++r) part_lse[part(r)] = -kInf;
      return {};
    }
  }

  // Q' = scale * Q, rounded once to float32, zero-padded to dim_pad.
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t h = g * plan.group_size + r / nq;
    const int64_t off = p.q.Offset(b, h, r % nq, 0);
    float* q = w.q.get() + r * dim_pad;
    for (int64_t d = 0; d < dim; ++d)
      q[d] = static_cast<float>(plan.scale * LoadQ(p.q.data, p.q.dtype, off + d * p.q.strides[3]));
    for (int64_t d = dim; d < dim_pad; ++d) q[d] = 0.0f;
    w.row_max[r] = -kInf, w.row_sum[r] = 0.0f;
  }
  std::fill(w.acc.get(), w.acc.get() + rows * dim_pad, 0.0f);

  const DType dtype = plan.dtype;
  const bool direct = dtype == DType::kFloat32 && dim % nf == 0;
  const bool int8 = dtype == DType::kInt8;
  const int64_t esize = static_cast<int64_t>(DTypeSize(dtype));
  const int64_t token_bytes = 2 * dim * esize + (int8 ? 2 * int64_t{sizeof(float)} : 0);
  ItemResult result;
  for (int64_t k = k0; k < k1; ++ci) {
    const KvChunk& chunk = view.chunks[ci];
    const int64_t t_end = std::min(chunk.count, k1 - chunk_start);
    for (int64_t tb = k - chunk_start; tb < t_end; tb += kBc) {
      const int64_t n = std::min(kBc, t_end - tb);
      const int64_t pos0 = chunk.first_position + tb;
      // Row ranges in block coordinates and their union [c0, c1).
      int64_t c0 = n, c1 = 0;
      for (int64_t r = 0; r < rows; ++r) {
        w.a[r] = std::clamp<int64_t>(w.lo[r] - pos0, 0, n);
        w.e[r] = std::clamp<int64_t>(w.hi[r] - pos0, 0, n);
        if (w.e[r] > w.a[r]) c0 = std::min(c0, w.a[r]), c1 = std::max(c1, w.e[r]);
      }
      if (c1 <= c0) continue;  // skipped: no row attends this block
      result.computed = true;
      result.bytes += (c1 - c0) * token_bytes;

      // K and V rows [c0, c1): in place, or converted to float32 tiles.
      const int64_t head_off = g * chunk.head_stride;
      const float* k_rows = w.k_tile.get();
      const float* v_rows = w.v_tile.get();
      int64_t kv_stride = dim_pad;
      if (direct) {
        k_rows = static_cast<const float*>(chunk.k) + head_off + tb * chunk.token_stride;
        v_rows = static_cast<const float*>(chunk.v) + head_off + tb * chunk.token_stride;
        kv_stride = chunk.token_stride;
      } else {
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t t = tb + c;
          const int64_t si = t * plan.num_kv_heads + g;
          ConvertRow(chunk.k, dtype, t * chunk.token_stride + head_off,
                     int8 ? chunk.k_scale[si] : 1.0f, dim, dim_pad, w.k_tile.get() + c * dim_pad);
          ConvertRow(chunk.v, dtype, t * chunk.token_stride + head_off,
                     int8 ? chunk.v_scale[si] : 1.0f, dim, dim_pad, w.v_tile.get() + c * dim_pad);
        }
      }
      // 1. Scores of every row over the union [c0, c1), two rows at a time
      // (a row's tokens outside its own range are masked in step 2).
      float* q = w.q.get();
      float* s = w.s.get();
      int64_t r = 0;
      for (; r + 2 <= rows; r += 2)
        ScoreTile<2>(q + r * dim_pad, dim_pad, k_rows, kv_stride, dim_pad, c0, c1, s + r * kBc);
      if (r < rows) ScoreTile<1>(q + r * dim_pad, dim_pad, k_rows, kv_stride, dim_pad, c0, c1, s + r * kBc);
      // 2. Online softmax per row over its range; p = 0 elsewhere.
      for (r = 0; r < rows; ++r) {
        if (w.e[r] > w.a[r]) {
          SoftmaxRow(s + r * kBc, c0, c1, w.a[r], w.e[r], &w.row_max[r], &w.row_sum[r], &w.alpha[r]);
        } else {  // nothing attended here: p = 0, state unchanged
          std::fill(s + r * kBc + c0, s + r * kBc + c1, 0.0f);
          w.alpha[r] = 1.0f;
        }
      }
      // 3. acc = alpha * acc + P.V, two rows per V load.
      float* acc = w.acc.get();
      for (r = 0; r + 2 <= rows; r += 2)
        WeightedSumRows<2>(&w.alpha[r], s + r * kBc, v_rows, kv_stride, dim_pad, c0, c1,
                           acc + r * dim_pad, dim_pad);
      if (r < rows)
        WeightedSumRows<1>(&w.alpha[r], s + r * kBc, v_rows, kv_stride, dim_pad, c0, c1,
                           acc + r * dim_pad, dim_pad);
    }
    k = chunk_start + chunk.count;
    chunk_start = k;
  }

  // Partial: out = acc / l, lse = m + log(l); l = 0 (nothing attended in
  // this split): lse = -inf, which the merge ignores.
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t idx = part(r);
    const float l = w.row_sum[r];
    if (l == 0.0f) {
      part_lse[idx] = -kInf;
      continue;
    }
    const float* acc = w.acc.get() + r * dim_pad;
    float* out = part_out + idx * dim;
    for (int64_t d = 0; d < dim; ++d) out[d] = acc[d] / l;
    part_lse[idx] = w.row_max[r] + std::log(l);
  }
  return result;
}

}  // namespace

// Runs every work item (b, g, split) on plan.threads OpenMP threads.
void RunDecode(const DecodeParams& p, const DecodePlan& plan, float* part_out, float* part_lse,
               int64_t* splits_computed, int64_t* kv_bytes_read) {
  const DF df;
  const int64_t nf = static_cast<int64_t>(hn::Lanes(df));
  const int64_t dim_pad = (plan.head_dim + nf - 1) / nf * nf;
  const int64_t rows = plan.group_size * plan.seq_q;
  const int64_t items = plan.item_base[plan.batch];
  int64_t computed = 0, bytes = 0;
#pragma omp parallel num_threads(std::max(plan.threads, 1)) reduction(+ : computed, bytes)
  {
    Scratch w(rows, dim_pad);
    // Dynamic: skipped splits (outside a window) cost nothing, so static
    // chunks would leave threads idle. The order never changes results.
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t b =
          std::upper_bound(plan.item_base.begin(), plan.item_base.end(), item) - plan.item_base.begin() - 1;
      const int64_t local = item - plan.item_base[b];
      // KV head fastest: the items of one split run back to back, so in a
      // token-major cache (heads interleaved per token) the lines and pages
      // the hardware fetched for one head are still cached for the next.
      const int64_t split = local / plan.num_kv_heads, g = local % plan.num_kv_heads;
      const ItemResult result = RunItem(p, plan, b, g, split, w, part_out, part_lse);
      bytes += result.bytes;
      computed += result.computed ? 1 : 0;
    }
  }
  *splits_computed += computed;
  *kv_bytes_read += bytes;
}

const char* DecodeTargetName() { return hwy::TargetName(HWY_TARGET); }

}  // namespace qkv::internal::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace qkv::internal {

HWY_EXPORT(RunDecode);
HWY_EXPORT(DecodeTargetName);

void DecodePartials(const DecodeParams& params, const DecodePlan& plan, float* part_out,
                    float* part_lse, int64_t* splits_computed, int64_t* kv_bytes_read) {
  HWY_DYNAMIC_DISPATCH(RunDecode)(params, plan, part_out, part_lse, splits_computed, kv_bytes_read);
}

const char* DecodeSimdTarget() { return HWY_DYNAMIC_DISPATCH(DecodeTargetName)(); }

}  // namespace qkv::internal
#endif  // HWY_ONCE
