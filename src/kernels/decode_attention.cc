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
//   1. s_rc = Q'_r . K_c for every row and c in [c0, c1), Q' = scale *
//      log2(e) * Q packed once per item (head_dim in SIMD lanes; scores in
//      base 2, as in the flash kernel). Tiles of 4 rows x 4 keys: each K
//      load (and its dtype conversion) serves 4 rows, each Q load 4 keys,
//      and the dot products are reduced by a transpose-add tree (Sum4; on
//      AVX-512 the trees of 16 keys are folded together) instead of
//      horizontal sums; int8 scales multiply the sums. Meanwhile the next
//      block's K/V rows are prefetched.
//   2. online softmax per row over [a_r, e_r), with 2^t (Exp2NonPositive):
//        m_new = max(m_old, max_c s_rc),  alpha = 2^(m_old - m_new)
//        p_rc  = 2^(s_rc - m_new),        l = alpha * l + sum_c p_rc
//      When every row attends all of [c0, c1) (the usual block) the rows
//      run together (SoftmaxRowsUniform), else one by one (SoftmaxRow).
//   3. acc_r = alpha * acc_r + sum_c p_rc V_c (int8: p_rc * v_scale_c), 4
//      rows x 4 vectors per V load. A block where rows attend different
//      ranges (the diagonal of seq_q > 1, a window edge) or with a -inf
//      score instead skips each zero weight (WeightedSumRows on float32
//      rows).
// K/V rows are read in place in their storage dtype (float32, float16,
// bfloat16, int8 converted in registers) when head_dim is a multiple of the
// lane count; other head_dims go through a zero-padded float32 tile
// (ConvertRow), scales applied there.
//
// Memory traffic: each K/V row (and int8 scale) of an attended token is read
// once per step for the whole group; Q and the partials are tiny. A decode
// step is bound by memory: 4 query heads x 128 dims cost 2 FMAs per K/V
// float, far below the FMA peak. KvCache stores each kv head's rows
// contiguously, so an item streams two sequential runs (K and V).
// Measured (1 thread, B = 1, 32/8 heads, D = 128, 64K tokens, this
// project's VM): the core hardly overlaps a sequential stream with
// arithmetic by itself: a synthetic stream with W FMAs after each 16 KiB
// block takes longer than the stream alone plus the FMAs alone
// (qkv_roofline --overlap). So both halves count: compute was cut by the
// in-register conversion, Sum4 and hoisting Iota (Highway 1.0.3's Iota
// stores lanes and reloads them: a failed store forward, 15% of the
// kernel), the head-major cache layout gave 1.2x, and spreading the next
// block's prefetches through the FMAs (RowPrefetcher) 62 -> 45 ms, the one
// change that made the stream and the arithmetic overlap (no prefetch: 61
// ms float32, 23.6 ms int8; prefetching 2-8 blocks ahead, into L2 only, a
// whole quadruple's rows at once, or V during P.V instead of during the
// scores all measured slower). An item's first block is not prefetched:
// hence the 2048-token default split (decode.cc). int8 does ~70 cycles of
// arithmetic per (token, KV head) with its data in L2/L3 (16K tokens, at
// the 2.73 GHz the FMA peak implies), against ~59 cycles of FMA-port uops
// by our count (two conversion uops and 4 FMAs per 16 K or V values: 48;
// reductions and softmax: ~11), and ~88 when it streams from DRAM. Fewer
// would take integer dot products (vpdpbusd runs at the FMA rate here with
// 4x the products), which need K in token-interleaved tiles: see
// BENCHMARKS.md.
//
// Edge cases:
//   * Tokens outside a row's range never meet the row: scores, exps and
//     P.V loops run over [a_r, e_r) only, so a NaN or inf in an evicted-by-
//     window K/V row cannot turn into 0 * NaN. A block where the rows'
//     ranges differ, or with an attended score of -inf (inf inputs), skips
//     every zero weight's V row for the same reason (WeightedSumRows); in
//     the usual block an underflowed p = 0 meets its V row, as in the flash
//     kernel (an inf there makes the row NaN: it was attended).
//   * While m is -inf (no finite score yet) 0 is subtracted instead, so
//     exp(-inf - -inf) never happens; a row with no attended key keeps l = 0
//     and writes lse = -inf: the merge ignores it, zeros if all are -inf.
//   * Exp2NonPositive returns NaN for NaN, so an attended NaN score makes
//     its row NaN like std::exp does (as the flash kernel). Scores are in
//     base 2: a dot product above FLT_MAX / log2(e) overflows to inf.
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
#include "hwy/cache_control.h"
#include "hwy/highway.h"
#include "kernels/exp2-inl.h"

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

// Loads nf elements of a cached row at `p` as float32 (int8 unscaled: its
// scale is folded into the scores and weights by the callers).
template <DType kDT>
HWY_INLINE VF LoadRow(DF df, const void* HWY_RESTRICT base, int64_t offset) {
  if constexpr (kDT == DType::kFloat32) {
    return hn::LoadU(df, static_cast<const float*>(base) + offset);
  } else if constexpr (kDT == DType::kFloat16) {
    const hn::Rebind<hwy::float16_t, DF> dh;
    return hn::PromoteTo(df, hn::LoadU(dh, static_cast<const hwy::float16_t*>(base) + offset));
  } else if constexpr (kDT == DType::kBFloat16) {  // bf16 bits are the float's top half
    const hn::RebindToUnsigned<DF> du;
    const hn::Rebind<uint16_t, DF> du16;
    const auto bits = hn::LoadU(du16, static_cast<const uint16_t*>(base) + offset);
    return hn::BitCast(df, hn::ShiftLeft<16>(hn::PromoteTo(du, bits)));
  } else {  // kInt8: int8 -> int32 -> float32 is exact
    const DI di;
    const hn::Rebind<int8_t, DF> d8;
    return hn::ConvertTo(df, hn::PromoteTo(di, hn::LoadU(d8, static_cast<const int8_t*>(base) + offset)));
  }
}

#if HWY_TARGET != HWY_SCALAR
// Returns the 128-bit vector whose lane i is the sum of lane i of every
// 128-bit block of v (one block: v itself).
template <class D>
HWY_INLINE hn::Vec<hn::Full128<float>> FoldBlocks(D d, hn::Vec<D> v) {
  if constexpr (hn::MaxLanes(D()) > 4) {
    const hn::Half<D> dh;
    return FoldBlocks(dh, hn::Add(hn::LowerHalf(dh, v), hn::UpperHalf(dh, v)));
  } else {
    (void)d;
    return v;
  }
}

// Returns, per 128-bit block, (a_b, b_b, c_b, e_b): the sums of a, b, c and
// e over that block's lanes; summed over the blocks (FoldBlocks) they are
// the 4 dot products. A transpose-and-add tree: 6 shuffles and 3 adds.
HWY_INLINE VF Transpose4(DF df, VF a, VF b, VF c, VF e) {
  const hn::Repartition<double, DF> dd;
  // Per 128-bit block: (a0+a2, b0+b2, a1+a3, b1+b3), and the same for c, e.
  const VF ab = hn::Add(hn::InterleaveLower(df, a, b), hn::InterleaveUpper(df, a, b));
  const VF ce = hn::Add(hn::InterleaveLower(df, c, e), hn::InterleaveUpper(df, c, e));
  // Per block: (a, b, c, e) partial sums.
  const auto lo = hn::InterleaveLower(dd, hn::BitCast(dd, ab), hn::BitCast(dd, ce));
  const auto hi = hn::InterleaveUpper(dd, hn::BitCast(dd, ab), hn::BitCast(dd, ce));
  return hn::Add(hn::BitCast(df, lo), hn::BitCast(df, hi));
}

// Returns (sum(a), sum(b), sum(c), sum(e)) in 4 lanes: 8 shuffles and 5
// adds on AVX-512 instead of 4 SumOfLanes (each 4 shuffles, 4 adds and a
// broadcast). Every target but the scalar one has >= 4 float lanes.
HWY_INLINE hn::Vec<hn::Full128<float>> Sum4(DF df, VF a, VF b, VF c, VF e) {
  return FoldBlocks(df, Transpose4(df, a, b, c, e));
}

#endif  // HWY_TARGET != HWY_SCALAR

// The K and V rows of the next block, prefetched into L1 from inside the
// score loop: each d step of a key quadruple also prefetches one line of
// each of 4 next-block rows (ScoreRows), so memory requests are spread
// evenly through the FMAs. Measured (1 thread, 64K tokens, float32): no
// prefetch 62 ms; a whole block's prefetches at once 55 ms (the core stalls
// on full fill buffers, then computes with no request in flight); 4 rows
// per key quadruple 54 ms; one line per row per d step 45 ms. Rows() serves
// the remainder paths.
struct RowPrefetcher {
  const char* k = nullptr;  // row 0 of the next block; null: nothing to fetch
  const char* v = nullptr;
  int64_t stride = 0;       // bytes between rows
  int64_t rows = 0;
  int64_t row_bytes = 0;

  // Prefetches rows [i0, i1) (clipped to the block).
  HWY_INLINE void Rows(int64_t i0, int64_t i1) const {
    if (k == nullptr) return;
    for (int64_t i = i0; i < std::min(i1, rows); ++i) {
      for (int64_t x = 0; x < row_bytes; x += 64) {
        hwy::Prefetch(k + i * stride + x);
        hwy::Prefetch(v + i * stride + x);
      }
    }
  }
};

// Computes s_r[c] = k_scale[c] * (q_r . K_c) for kRows (<= 4) rows (q_r =
// q + r * dim_pad, s_r = s + r * kBc) and c in [c0, c1). K_c is row c of the
// cache: `dim_pad` elements of kDT at k_base + k_off + c * k_stride (a
// multiple of the lane count). k_scale is null except for int8.
// Tiles of kRows x 4 keys: each K load (and int8 -> float conversion) serves
// kRows rows and each q load 4 keys; 4 * kRows independent FMA chains cover
// the FMA latency (4 cycles x 2 ports = 8 in flight); Sum4 reduces a key
// quadruple per row.
template <DType kDT, int kRows>
void ScoreRows(const float* HWY_RESTRICT q, int64_t dim_pad, const void* k_base, int64_t k_off,
               int64_t k_stride, const float* k_scale, int64_t c0, int64_t c1,
               float* HWY_RESTRICT s, const RowPrefetcher& pf) {
  const DF df;
  const int64_t nf = static_cast<int64_t>(hn::Lanes(df));
  int64_t c = c0;
#if HWY_TARGET != HWY_SCALAR
  {
    constexpr int64_t kElemBytes = kDT == DType::kFloat32 ? 4 : kDT == DType::kInt8 ? 1 : 2;
    const hn::Full128<float> d4;
    using V4 = hn::Vec<hn::Full128<float>>;
    // Scores of keys [c, c + 4) for every row: out[r].
    // acc[r][j] = the lanes of q_r . K_{c+j} for the 4 keys from c.
    auto dots = [&](int64_t c, VF (&acc)[kRows][4]) HWY_ATTR {
      // Four row pointers and one index keep the loop in registers (with
      // the offsets recomputed per step GCC spilled them to the stack).
      const char* krow[4];
      HWY_UNROLL(4) for (int j = 0; j < 4; ++j)
        krow[j] = static_cast<const char*>(k_base) + (k_off + (c + j) * k_stride) * kElemBytes;
      // The next block's rows c - c0 .. + 3: one line of each per line of K
      // consumed here.
      const int64_t i0 = c - c0, n_pf = pf.k == nullptr ? 0 : std::clamp<int64_t>(pf.rows - i0, 0, 4);
      const char* pk = pf.k + i0 * pf.stride;
      const char* pv = pf.v + i0 * pf.stride;
      HWY_UNROLL(4) for (int r = 0; r < kRows; ++r)
        HWY_UNROLL(4) for (int j = 0; j < 4; ++j) acc[r][j] = hn::Zero(df);
      for (int64_t d = 0; d < dim_pad; d += nf) {
        if (n_pf > 0 && (d * kElemBytes) % 64 == 0) {
          for (int64_t j = 0; j < n_pf; ++j) {
            hwy::Prefetch(pk + j * pf.stride + d * kElemBytes);
            hwy::Prefetch(pv + j * pf.stride + d * kElemBytes);
          }
        }
        VF kv[4];
        HWY_UNROLL(4) for (int j = 0; j < 4; ++j) kv[j] = LoadRow<kDT>(df, krow[j], d);
        HWY_UNROLL(4) for (int r = 0; r < kRows; ++r) {
          const VF qv = hn::Load(df, q + r * dim_pad + d);
          HWY_UNROLL(4) for (int j = 0; j < 4; ++j) acc[r][j] = hn::MulAdd(qv, kv[j], acc[r][j]);
        }
      }
    };
    // Scores of keys [c, c + 4) for every row: out[r].
    auto quad = [&](int64_t c, V4* out) HWY_ATTR {
      VF acc[kRows][4];
      dots(c, acc);
      HWY_UNROLL(4) for (int r = 0; r < kRows; ++r) {
        out[r] = Sum4(df, acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
        if constexpr (kDT == DType::kInt8) out[r] = hn::Mul(out[r], hn::LoadU(d4, k_scale + c));
      }
    };
    // Whole vectors of keys first, stored with one full-width store per row,
    // so the softmax's full-width loads forward from the store buffer (four
    // 16-byte stores read back as one 64-byte load stalled ~20% of the block
    // time).
#if HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL
    // 16 keys at a time: the four quadruples' Transpose4 results x0..x3 are
    // folded together, 4 block shuffles, 4 adds and a blend, where folding
    // each alone (Sum4) and combining took 11 shuffles and 8 adds (3% of an
    // int8 step in L3, 2K tokens). x0 and x2 are combined before x1 and x3
    // are computed, so at most 8 vectors are live next to a quadruple's 16
    // accumulators.
    for (; c + 16 <= c1; c += 16) {
      VF y02[kRows], x1[kRows], acc[kRows][4];
      dots(c, acc);
      HWY_UNROLL(4) for (int r = 0; r < kRows; ++r) y02[r] = Transpose4(df, acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
      dots(c + 8, acc);
      HWY_UNROLL(4) for (int r = 0; r < kRows; ++r) {
        const VF x2 = Transpose4(df, acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
        y02[r] = hn::Add(hn::ConcatLowerLower(df, x2, y02[r]), hn::ConcatUpperUpper(df, x2, y02[r]));
      }
      dots(c + 4, acc);
      HWY_UNROLL(4) for (int r = 0; r < kRows; ++r) x1[r] = Transpose4(df, acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
      dots(c + 12, acc);
      HWY_UNROLL(4) for (int r = 0; r < kRows; ++r) {
        const VF x3 = Transpose4(df, acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
        const VF y13 = hn::Add(hn::ConcatLowerLower(df, x3, x1[r]), hn::ConcatUpperUpper(df, x3, x1[r]));
        // As Fold16, from y02 and y13.
        const VF p = hn::Add(y02[r], hn::SwapAdjacentBlocks(y02[r]));  // blocks x0, x0, x2, x2
        const VF q = hn::Add(y13, hn::SwapAdjacentBlocks(y13));         // blocks x1, x1, x3, x3
        VF out = hn::OddEvenBlocks(q, p);
        if constexpr (kDT == DType::kInt8) out = hn::Mul(out, hn::LoadU(df, k_scale + c));
        hn::StoreU(out, df, s + r * kBc + c);
      }
    }
#else
    constexpr int64_t kQuads = hn::MaxLanes(DF()) / 4;  // 1 or 2
    for (; c + 4 * kQuads <= c1; c += 4 * kQuads) {
      V4 out[kQuads][kRows];
      HWY_UNROLL(4) for (int64_t j = 0; j < kQuads; ++j) quad(c + 4 * j, out[j]);
      HWY_UNROLL(4) for (int r = 0; r < kRows; ++r) {
        if constexpr (kQuads == 2) {
          hn::StoreU(hn::Combine(df, out[1][r], out[0][r]), df, s + r * kBc + c);
        } else {
          hn::StoreU(out[0][r], d4, s + r * kBc + c);
        }
      }
    }
#endif
    for (; c + 4 <= c1; c += 4) {
      V4 out[kRows];
      quad(c, out);
      HWY_UNROLL(4) for (int r = 0; r < kRows; ++r) hn::StoreU(out[r], d4, s + r * kBc + c);
    }
  }
#endif  // HWY_TARGET != HWY_SCALAR
  for (; c < c1; ++c) {
    pf.Rows(c - c0, c - c0 + 1);
    const int64_t kc = k_off + c * k_stride;
    VF acc[kRows];
    HWY_UNROLL(4) for (int r = 0; r < kRows; ++r) acc[r] = hn::Zero(df);
    for (int64_t d = 0; d < dim_pad; d += nf) {
      const VF kv = LoadRow<kDT>(df, k_base, kc + d);
      HWY_UNROLL(4) for (int r = 0; r < kRows; ++r)
        acc[r] = hn::MulAdd(hn::Load(df, q + r * dim_pad + d), kv, acc[r]);
    }
    const float sc = kDT == DType::kInt8 ? k_scale[c] : 1.0f;
    HWY_UNROLL(4) for (int r = 0; r < kRows; ++r)
      s[r * kBc + c] = hn::GetLane(hn::SumOfLanes(df, acc[r])) * sc;
  }
  pf.Rows(c1 - c0, pf.rows);
}

// ScoreRows for `rows` rows, four at a time; the first group prefetches.
template <DType kDT>
void ScoreAllRows(int64_t rows, const float* q, int64_t dim_pad, const void* k_base, int64_t k_off,
                  int64_t k_stride, const float* k_scale, int64_t c0, int64_t c1, float* s,
                  const RowPrefetcher& prefetch) {
  const RowPrefetcher none;
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    ScoreRows<kDT, 4>(q + r * dim_pad, dim_pad, k_base, k_off, k_stride, k_scale, c0, c1,
                      s + r * kBc, r == 0 ? prefetch : none);
  }
  const int64_t left = rows - r;
  const RowPrefetcher& pf = r == 0 ? prefetch : none;
  q += r * dim_pad, s += r * kBc;
  if (left == 3) ScoreRows<kDT, 3>(q, dim_pad, k_base, k_off, k_stride, k_scale, c0, c1, s, pf);
  if (left == 2) ScoreRows<kDT, 2>(q, dim_pad, k_base, k_off, k_stride, k_scale, c0, c1, s, pf);
  if (left == 1) ScoreRows<kDT, 1>(q, dim_pad, k_base, k_off, k_stride, k_scale, c0, c1, s, pf);
}

// acc_r[0, kN * nf) = alpha_r * acc_r + sum_{c in [c0, c1)} p_r[c] * V_c for
// kRows rows (p_r = p + r * kBc, acc_r = acc + r * dim_pad), V_c = kN * nf
// elements of kDT at v_base + v_off + c * v_stride. Every p_r[c] is
// multiplied in: only for blocks where every row attends all of [c0, c1)
// (a token outside a row's range takes WeightedSumRows, which skips it).
// Each V load (and int8 conversion) serves kRows rows; kRows * kN <= 16
// accumulators stay in registers.
template <DType kDT, int kRows, int kN>
HWY_INLINE void PvTile(DF df, const float* alpha, const float* HWY_RESTRICT p, const void* v_base,
                       int64_t v_off, int64_t v_stride, int64_t c0, int64_t c1,
                       float* HWY_RESTRICT acc, int64_t dim_pad) {
  const int64_t nf = static_cast<int64_t>(hn::Lanes(df));
  VF sum[kRows][kN];
  HWY_UNROLL(4) for (int r = 0; r < kRows; ++r) {
    const VF al = hn::Set(df, alpha[r]);
    HWY_UNROLL(8) for (int n = 0; n < kN; ++n)
      sum[r][n] = hn::Mul(al, hn::Load(df, acc + r * dim_pad + n * nf));
  }
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t vc = v_off + c * v_stride;
    VF vv[kN];
    HWY_UNROLL(8) for (int n = 0; n < kN; ++n) vv[n] = LoadRow<kDT>(df, v_base, vc + n * nf);
    HWY_UNROLL(4) for (int r = 0; r < kRows; ++r) {
      const VF pr = hn::Set(df, p[r * kBc + c]);
      HWY_UNROLL(8) for (int n = 0; n < kN; ++n) sum[r][n] = hn::MulAdd(pr, vv[n], sum[r][n]);
    }
  }
  HWY_UNROLL(4) for (int r = 0; r < kRows; ++r)
    HWY_UNROLL(8) for (int n = 0; n < kN; ++n) hn::Store(sum[r][n], df, acc + r * dim_pad + n * nf);
}

// PvTile over all of dim_pad for kRows rows: 4 rows x 4 vectors or 2 rows x
// 8 vectors per pass (head_dim 128 on AVX-512: two passes over the block's V
// rows for 4 rows, the second from L1).
template <DType kDT, int kRows>
void PvRows(const float* alpha, const float* p, const void* v_base, int64_t v_off,
            int64_t v_stride, int64_t dim_pad, int64_t c0, int64_t c1, float* acc) {
  const DF df;
  const int64_t nf = static_cast<int64_t>(hn::Lanes(df));
  constexpr int kWide = kRows <= 2 ? 8 : 4;
  for (int64_t d0 = 0; d0 < dim_pad;) {
    const int64_t left = (dim_pad - d0) / nf;
    if (left >= kWide) {
      PvTile<kDT, kRows, kWide>(df, alpha, p, v_base, v_off + d0, v_stride, c0, c1, acc + d0, dim_pad);
      d0 += kWide * nf;
    } else if (left >= 2) {
      PvTile<kDT, kRows, 2>(df, alpha, p, v_base, v_off + d0, v_stride, c0, c1, acc + d0, dim_pad);
      d0 += 2 * nf;
    } else {
      PvTile<kDT, kRows, 1>(df, alpha, p, v_base, v_off + d0, v_stride, c0, c1, acc + d0, dim_pad);
      d0 += nf;
    }
  }
}

// PvRows for `rows` rows, four at a time.
template <DType kDT>
void PvAllRows(int64_t rows, const float* alpha, const float* p, const void* v_base, int64_t v_off,
               int64_t v_stride, int64_t dim_pad, int64_t c0, int64_t c1, float* acc) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4)
    PvRows<kDT, 4>(alpha + r, p + r * kBc, v_base, v_off, v_stride, dim_pad, c0, c1, acc + r * dim_pad);
  const int64_t left = rows - r;
  alpha += r, p += r * kBc, acc += r * dim_pad;
  if (left == 3) PvRows<kDT, 3>(alpha, p, v_base, v_off, v_stride, dim_pad, c0, c1, acc);
  if (left == 2) PvRows<kDT, 2>(alpha, p, v_base, v_off, v_stride, dim_pad, c0, c1, acc);
  if (left == 1) PvRows<kDT, 1>(alpha, p, v_base, v_off, v_stride, dim_pad, c0, c1, acc);
}

// Online-softmax update of one row for the block's scores s[c0, c1), of
// which the row attends [a, e) (a < e): m, l and alpha updated, and
// s[c0, c1) = p, exactly 0 outside [a, e). For blocks whose rows attend
// different ranges; their P.V skips zero weights (WeightedSumRows), so a
// -inf score needs no flag here.
void SoftmaxRow(float* HWY_RESTRICT s, int64_t c0, int64_t c1, int64_t a, int64_t e,
                float* row_max, float* row_sum, float* alpha_out) {
  const DF df;
  const DI di;
  const int64_t nf = static_cast<int64_t>(hn::Lanes(df));
  const VF neg_inf = hn::Set(df, -kInf);
  const auto av = hn::Set(di, static_cast<int32_t>(a)), ev = hn::Set(di, static_cast<int32_t>(e));
  // Highway 1.0.3's Iota(di, x) stores the lanes to the stack and reloads
  // them (a failed store forward, 15% of the kernel when called per vector):
  // build it once and add x.
  const auto iota = hn::Iota(di, 0);
  // m_new = max(m_old, max_c s): lanes outside [a, e) are -inf.
  VF mx = neg_inf;
  for (int64_t x = a / nf * nf; x < e; x += nf) {
    const auto idx = hn::Add(iota, hn::Set(di, static_cast<int32_t>(x)));
    const auto in = hn::RebindMask(df, hn::AndNot(hn::Lt(idx, av), hn::Lt(idx, ev)));
    mx = hn::Max(mx, hn::IfThenElse(in, hn::Load(df, s + x), neg_inf));
  }
  const float m_old = *row_max;
  const float m_new = std::max(m_old, hn::GetLane(hn::MaxOfLanes(df, mx)));
  // While no finite score is seen m_new = -inf: subtract 0 instead, so
  // exp(-inf - 0) = 0 rather than exp(-inf - -inf) = NaN.
  const float m_sub = m_new == -kInf ? 0.0f : m_new;
  const float alpha = std::exp2(m_old - m_sub);  // alpha = 2^(m_old - m_new)
  // p = exp(s - m_new) inside [a, e), exactly 0 elsewhere in [c0, c1).
  const VF ms = hn::Set(df, m_sub);
  VF l0 = hn::Zero(df);
  for (int64_t x = c0 / nf * nf; x < c1; x += nf) {
    const auto idx = hn::Add(iota, hn::Set(di, static_cast<int32_t>(x)));
    const auto in = hn::RebindMask(df, hn::AndNot(hn::Lt(idx, av), hn::Lt(idx, ev)));
    const VF p = hn::IfThenElseZero(in, Exp2NonPositive(df, hn::Sub(hn::Load(df, s + x), ms)));
    hn::Store(p, df, s + x);
    l0 = hn::Add(l0, p);
  }
  *row_sum = alpha * *row_sum + hn::GetLane(hn::SumOfLanes(df, l0));  // l = alpha * l + sum p
  *row_max = m_new;
  *alpha_out = alpha;
}

// SoftmaxRow for kRows (<= 4) rows that all attend exactly [c0, c1), the
// usual block: the rows run interleaved (their max and sum reductions are
// independent chains), lanes are masked only in a vector that [c0, c1)
// does not fill, and the kRows alphas come from one vector Exp instead of a
// std::exp call each. pv (int8 in place; null otherwise) also receives p
// times V's scale, the weights PvRows multiplies. Returns whether a score in
// [c0, c1) is -inf. Measured (1 thread, int8, 2K tokens, in L3): the
// row-at-a-time SoftmaxRow took 14 of the ~85 cycles per (token, KV head),
// this ~6 (with Exp2NonPositive).
template <int kRows>
bool SoftmaxRowsUniform(float* HWY_RESTRICT s, int64_t c0, int64_t c1, float* row_max,
                        float* row_sum, float* alpha_out, const float* HWY_RESTRICT v_scale,
                        float* HWY_RESTRICT pv) {
  const DF df;
  const int64_t nf = static_cast<int64_t>(hn::Lanes(df));
  const VF neg_inf = hn::Set(df, -kInf);
  const int64_t x0 = c0 / nf * nf;
  // Lanes of the vector at x that lie in [c0, c1).
  auto in_range = [&](int64_t x) HWY_ATTR {
    const size_t hi = static_cast<size_t>(std::clamp<int64_t>(c1 - x, 0, nf));
    const size_t lo = static_cast<size_t>(std::clamp<int64_t>(c0 - x, 0, nf));
    return hn::AndNot(hn::FirstN(df, lo), hn::FirstN(df, hi));
  };
  VF mx[kRows];
  HWY_UNROLL(4) for (int r = 0; r < kRows; ++r) mx[r] = neg_inf;
  auto any_neg_inf = hn::FirstN(df, 0);
  for (int64_t x = x0; x < c1; x += nf) {
    const auto in = in_range(x);
    HWY_UNROLL(4) for (int r = 0; r < kRows; ++r) {
      const VF sx = hn::Load(df, s + r * kBc + x);
      mx[r] = hn::Max(mx[r], hn::IfThenElse(in, sx, neg_inf));
      any_neg_inf = hn::Or(any_neg_inf, hn::And(in, hn::Eq(sx, neg_inf)));
    }
  }
  // alpha_r = exp(m_old - m_new), subtracting 0 while m_new is -inf (as
  // SoftmaxRow), for all rows in one Exp.
  alignas(64) float diff[hn::MaxLanes(DF()) > 4 ? hn::MaxLanes(DF()) : 4] = {};
  float m_sub[kRows];
  HWY_UNROLL(4) for (int r = 0; r < kRows; ++r) {
    const float m_new = std::max(row_max[r], hn::GetLane(hn::MaxOfLanes(df, mx[r])));
    m_sub[r] = m_new == -kInf ? 0.0f : m_new;
    diff[r] = row_max[r] - m_sub[r];
    row_max[r] = m_new;
  }
  float alpha[hn::MaxLanes(DF()) > 4 ? hn::MaxLanes(DF()) : 4];
  if constexpr (hn::MaxLanes(DF()) >= kRows) {
    hn::StoreU(Exp2NonPositive(df, hn::Load(df, diff)), df, alpha);
  } else {
    HWY_UNROLL(4) for (int r = 0; r < kRows; ++r) alpha[r] = std::exp2(diff[r]);
  }
  // p = exp(s - m_new) in [c0, c1), 0 in the rest of each vector.
  VF l0[kRows];
  VF ms[kRows];
  HWY_UNROLL(4) for (int r = 0; r < kRows; ++r) l0[r] = hn::Zero(df), ms[r] = hn::Set(df, m_sub[r]);
  for (int64_t x = x0; x < c1; x += nf) {
    const auto in = in_range(x);
    HWY_UNROLL(4) for (int r = 0; r < kRows; ++r) {
      const VF p = hn::IfThenElseZero(in, Exp2NonPositive(df, hn::Sub(hn::Load(df, s + r * kBc + x), ms[r])));
      hn::Store(p, df, s + r * kBc + x);
      if (pv != nullptr) hn::Store(hn::Mul(p, hn::LoadU(df, v_scale + x)), df, pv + r * kBc + x);
      l0[r] = hn::Add(l0[r], p);
    }
  }
  HWY_UNROLL(4) for (int r = 0; r < kRows; ++r) {
    row_sum[r] = alpha[r] * row_sum[r] + hn::GetLane(hn::SumOfLanes(df, l0[r]));  // l = alpha l + sum p
    alpha_out[r] = alpha[r];
  }
  return !hn::AllFalse(df, any_neg_inf);
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
  // pv: int8 weights times V's scale; k_scale, v_scale: one block's scales.
  hwy::AlignedFreeUniquePtr<float[]> q, acc, s, pv, k_tile, v_tile, row_max, row_sum, alpha,
      k_scale, v_scale;
  std::vector<int64_t> lo, hi, a, e;

  Scratch(int64_t rows, int64_t dim_pad) {
    auto alloc = [](int64_t n) {
      auto ptr = hwy::AllocateAligned<float>(static_cast<size_t>(std::max<int64_t>(n, 1)));
      std::fill(ptr.get(), ptr.get() + std::max<int64_t>(n, 1), 0.0f);
      return ptr;
    };
    q = alloc(rows * dim_pad), acc = alloc(rows * dim_pad), s = alloc(rows * kBc);
    pv = alloc(rows * kBc), k_scale = alloc(kBc), v_scale = alloc(kBc);
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

  // Q' = scale * log2(e) * Q, rounded once to float32, zero-padded to
  // dim_pad: scores are in base 2 (the softmax takes 2^t, Exp2NonPositive).
  const double scale2 = static_cast<double>(plan.scale) * kLog2E;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t h = g * plan.group_size + r / nq;
    const int64_t off = p.q.Offset(b, h, r % nq, 0);
    float* q = w.q.get() + r * dim_pad;
    if (p.q.dtype == DType::kFloat32 && p.q.strides[3] == 1) {  // vectorised by the compiler
      const float* src = static_cast<const float*>(p.q.data) + off;
      for (int64_t d = 0; d < dim; ++d) q[d] = static_cast<float>(scale2 * src[d]);
    } else {
      for (int64_t d = 0; d < dim; ++d)
        q[d] = static_cast<float>(scale2 * LoadQ(p.q.data, p.q.dtype, off + d * p.q.strides[3]));
    }
    for (int64_t d = dim; d < dim_pad; ++d) q[d] = 0.0f;
    w.row_max[r] = -kInf, w.row_sum[r] = 0.0f;
  }
  std::fill(w.acc.get(), w.acc.get() + rows * dim_pad, 0.0f);

  const DType dtype = plan.dtype;
  const bool direct = dim % nf == 0;
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

      // K and V rows [c0, c1): read in place in their storage dtype (int8
      // scales gathered per block), or, for a head_dim that is not a
      // multiple of the lane count, converted to zero-padded float32 tiles.
      const int64_t head_off = g * chunk.head_stride;
      const void* k_base = w.k_tile.get();
      const void* v_base = w.v_tile.get();
      int64_t kv_off = 0, kv_stride = dim_pad;
      DType row_dtype = DType::kFloat32;
      const float* k_scale = nullptr;  // int8 in place: the block's scales
      const float* v_scale = w.v_scale.get();
      if (direct) {
        k_base = chunk.k, v_base = chunk.v;
        kv_off = head_off + tb * chunk.token_stride, kv_stride = chunk.token_stride;
        row_dtype = dtype;
        if (int8 && chunk.scale_token_stride == 1 && c0 == 0 && c1 == kBc) {
          // A whole block of contiguous scales (KvCache's layout): read in
          // place; the vector loads of [0, kBc) stay inside the chunk.
          const int64_t si = tb + g * chunk.scale_head_stride;
          k_scale = chunk.k_scale + si, v_scale = chunk.v_scale + si;
        } else if (int8) {
          for (int64_t c = c0; c < c1; ++c) {
            const int64_t si = (tb + c) * chunk.scale_token_stride + g * chunk.scale_head_stride;
            w.k_scale[c] = chunk.k_scale[si], w.v_scale[c] = chunk.v_scale[si];
          }
          k_scale = w.k_scale.get();
        }
      } else {
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t t = tb + c;
          const int64_t si = t * chunk.scale_token_stride + g * chunk.scale_head_stride;
          ConvertRow(chunk.k, dtype, t * chunk.token_stride + head_off,
                     int8 ? chunk.k_scale[si] : 1.0f, dim, dim_pad, w.k_tile.get() + c * dim_pad);
          ConvertRow(chunk.v, dtype, t * chunk.token_stride + head_off,
                     int8 ? chunk.v_scale[si] : 1.0f, dim, dim_pad, w.v_tile.get() + c * dim_pad);
        }
      }
      RowPrefetcher prefetch;
      if (direct && tb + kBc < t_end) {
        const int64_t next_off = (kv_off + kBc * kv_stride) * esize;
        prefetch.k = static_cast<const char*>(chunk.k) + next_off;
        prefetch.v = static_cast<const char*>(chunk.v) + next_off;
        prefetch.stride = kv_stride * esize;
        prefetch.rows = std::min(kBc, t_end - tb - kBc);
        prefetch.row_bytes = dim * esize;
      }
      // 1. Scores of every row over the union [c0, c1), four rows at a time
      // (a row's tokens outside its own range are masked in step 2).
      float* q = w.q.get();
      float* s = w.s.get();
      switch (row_dtype) {
        case DType::kFloat16:
          ScoreAllRows<DType::kFloat16>(rows, q, dim_pad, k_base, kv_off, kv_stride, k_scale, c0, c1, s, prefetch);
          break;
        case DType::kBFloat16:
          ScoreAllRows<DType::kBFloat16>(rows, q, dim_pad, k_base, kv_off, kv_stride, k_scale, c0, c1, s, prefetch);
          break;
        case DType::kInt8:
          ScoreAllRows<DType::kInt8>(rows, q, dim_pad, k_base, kv_off, kv_stride, k_scale, c0, c1, s, prefetch);
          break;
        default:
          ScoreAllRows<DType::kFloat32>(rows, q, dim_pad, k_base, kv_off, kv_stride, k_scale, c0, c1, s, prefetch);
          break;
      }
      // 2. Online softmax per row over its range; p = 0 elsewhere. `uniform`:
      // every row attends all of [c0, c1) and no score there is -inf, so
      // every p may meet every V row (the usual block).
      bool uniform = true;
      for (int64_t r = 0; r < rows; ++r) uniform = uniform && w.a[r] == c0 && w.e[r] == c1;
      float* pv = k_scale != nullptr ? w.pv.get() : nullptr;  // int8 in place: p * V's scale
      if (uniform) {
        bool neg_inf = false;
        int64_t r = 0;
        for (; r + 4 <= rows; r += 4) {
          neg_inf |= SoftmaxRowsUniform<4>(s + r * kBc, c0, c1, &w.row_max[r], &w.row_sum[r],
                                           &w.alpha[r], v_scale, pv ? pv + r * kBc : nullptr);
        }
        float* ps = s + r * kBc;
        float* ppv = pv ? pv + r * kBc : nullptr;
        const float* vs = v_scale;
        if (rows - r == 3) neg_inf |= SoftmaxRowsUniform<3>(ps, c0, c1, &w.row_max[r], &w.row_sum[r], &w.alpha[r], vs, ppv);
        if (rows - r == 2) neg_inf |= SoftmaxRowsUniform<2>(ps, c0, c1, &w.row_max[r], &w.row_sum[r], &w.alpha[r], vs, ppv);
        if (rows - r == 1) neg_inf |= SoftmaxRowsUniform<1>(ps, c0, c1, &w.row_max[r], &w.row_sum[r], &w.alpha[r], vs, ppv);
        uniform = !neg_inf;
      } else {
        for (int64_t r = 0; r < rows; ++r) {
          if (w.e[r] > w.a[r]) {
            SoftmaxRow(s + r * kBc, c0, c1, w.a[r], w.e[r], &w.row_max[r], &w.row_sum[r], &w.alpha[r]);
          } else {  // nothing attended here: p = 0, state unchanged
            std::fill(s + r * kBc + c0, s + r * kBc + c1, 0.0f);
            w.alpha[r] = 1.0f;
          }
        }
      }
      // 3. acc = alpha * acc + P.V.
      float* acc = w.acc.get();
      if (uniform) {
        const float* pw = pv != nullptr ? pv : s;
        switch (row_dtype) {
          case DType::kFloat16:
            PvAllRows<DType::kFloat16>(rows, w.alpha.get(), pw, v_base, kv_off, kv_stride, dim_pad, c0, c1, acc);
            break;
          case DType::kBFloat16:
            PvAllRows<DType::kBFloat16>(rows, w.alpha.get(), pw, v_base, kv_off, kv_stride, dim_pad, c0, c1, acc);
            break;
          case DType::kInt8:
            PvAllRows<DType::kInt8>(rows, w.alpha.get(), pw, v_base, kv_off, kv_stride, dim_pad, c0, c1, acc);
            break;
          default:
            PvAllRows<DType::kFloat32>(rows, w.alpha.get(), pw, v_base, kv_off, kv_stride, dim_pad, c0, c1, acc);
            break;
        }
      } else {
        // Rows with different ranges (a diagonal or window edge with seq_q >
        // 1) or a -inf score: float32 V rows that skip zero weights.
        const float* v_rows = static_cast<const float*>(v_base) + kv_off;
        int64_t v_stride = kv_stride;
        if (row_dtype != DType::kFloat32) {
          for (int64_t c = c0; c < c1; ++c) {
            const int64_t t = tb + c;
            ConvertRow(chunk.v, dtype, t * chunk.token_stride + head_off,
                       int8 ? v_scale[c] : 1.0f, dim, dim_pad, w.v_tile.get() + c * dim_pad);
          }
          v_rows = w.v_tile.get(), v_stride = dim_pad;
        }
        int64_t r = 0;
        for (; r + 2 <= rows; r += 2)
          WeightedSumRows<2>(&w.alpha[r], s + r * kBc, v_rows, v_stride, dim_pad, c0, c1,
                             acc + r * dim_pad, dim_pad);
        if (r < rows)
          WeightedSumRows<1>(&w.alpha[r], s + r * kBc, v_rows, v_stride, dim_pad, c0, c1,
                             acc + r * dim_pad, dim_pad);
      }
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
    part_lse[idx] = LseFromBase2(w.row_max[r], l);
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
      // token-major view (heads interleaved per token, as a caller may
      // build) the lines and pages the hardware fetched for one head are
      // still cached for the next (1.5x at 64K tokens when KvCache was
      // token-major). KvCache's head-major runs do not care.
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
int64_t DecodeLanes() { return static_cast<int64_t>(hn::Lanes(DF())); }

}  // namespace qkv::internal::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace qkv::internal {

HWY_EXPORT(RunDecode);
HWY_EXPORT(DecodeTargetName);
HWY_EXPORT(DecodeLanes);

void DecodePartials(const DecodeParams& params, const DecodePlan& plan, float* part_out,
                    float* part_lse, int64_t* splits_computed, int64_t* kv_bytes_read) {
  HWY_DYNAMIC_DISPATCH(RunDecode)(params, plan, part_out, part_lse, splits_computed, kv_bytes_read);
}

const char* DecodeSimdTarget() { return HWY_DYNAMIC_DISPATCH(DecodeTargetName)(); }
int64_t DecodeSimdLanes() { return HWY_DYNAMIC_DISPATCH(DecodeLanes)(); }

}  // namespace qkv::internal
#endif  // HWY_ONCE
