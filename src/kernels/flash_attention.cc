// The FlashAttention-style CPU forward kernel: exact attention in one pass
// over K and V with an online softmax, in fixed-size tiles (Dao et al. 2022,
// arXiv:2205.14135; FlashAttention-2, Dao 2023, arXiv:2307.08691; the
// "queries in lanes" layout follows gemma.cpp's gemma/flash_attention.cc).
//
// Work items. The group_size query heads that share KV head g are one
// sequence of group_size * seq_q rows t = h_local * seq_q + i; a work item is
// (batch b, KV head g, block of kBlockQ consecutive rows t). So every packed
// K/V block serves up to kBlockQ query rows of all heads of the group: a
// decode step (seq_q = 1) with GQA puts the whole group in one item and reads
// each K/V row once per group. Threads take items from a shared counter (last
// row block first); each
// output row belongs to one item, computed by one thread in a fixed key-block
// order, so results are bitwise identical for any thread count.
//
// Per item, for each key block [j0, j0 + kBlockKV) in key order:
//   1. S^T[c, r] = sum_d K[j0 + c, d] * Q'^T[d, r]   Q' = scale * Q, packed
//      once per item as Q'^T [head_dim, kBlockQ] (queries in SIMD lanes);
//   2. mask (see tile modes) and online softmax per row r (vertical ops
//      only: each lane is a query row, so no horizontal reductions):
//        m_new = max(m_old, max_c S[c, r])
//        alpha = exp(m_old - m_new),  P[c, r] = exp(S[c, r] - m_new)
//        l     = alpha * l + sum_c P[c, r]
//   3. acc^T[dv, r] = alpha * acc^T[dv, r] + sum_c V[j0 + c, dv] * P[c, r].
// Finally out = acc / l and lse = m + log(l) per row.
//
// Tile modes, chosen per key block from the rows' key ranges
// (internal::RowKeyRange: causal, window, key lengths):
//   skipped   the block lies outside every row's range: never touched, so
//             causal attention costs about half of full attention;
//   full      inside every row's range and no explicit mask: no mask work;
//   ranged    a boundary block, no explicit mask: S = -inf outside each
//             row's [lo, hi), from int32 lane compares;
//   explicit  an explicit bool/additive mask: a bias tile (0 / value / -inf)
//             is read per element first; if it is -inf everywhere, the
//             block is skipped before any K/V is read.
// Only the key rows [c_begin, c_end) that some row of the item may attend
// are packed and computed.
//
// Memory traffic: per item, Q once and each attended K/V row once, i.e.
// K/V are read seq_q * group_size / kBlockQ times in total (not seq_q
// times); all tiles stay in L2. float32 K/V with unit stride along head_dim
// are read in place (any other strides are fine: each element is broadcast);
// other dtypes or strides are converted into a [kBlockKV, head_dim] tile.
//
// Edge cases, all as the reference kernel (reference_attention.cc):
//   * A disallowed pair is -inf in S and its P is exactly 0; the running max
//     is replaced by 0 while it is -inf (m_sub below), so exp(-inf - -inf)
//     never happens. P = 0 times a finite value adds +-0: exact. A block
//     with skipped pairs (any block but a full one, or a full one with an
//     s = -inf from inf inputs) has its V rows checked for inf/NaN; if there
//     are any, skipped pairs get P = -0 and a scalar P.V skips lanes with the
//     sign bit set (exp never returns -0), so a masked inf/NaN value never
//     meets a 0 weight (0 * inf = NaN). Full blocks skip the check (it cost
//     8% of the time when done for every block).
//   * Exp2NonPositive returns NaN for NaN, so an allowed NaN score makes
//     its row NaN like std::exp does; -inf gives +0.
//   * Scores are in base 2 (log2 e folded into Q'): a dot product above
//     FLT_MAX / log2(e) = 2.4e38 (instead of FLT_MAX) overflows to inf.
//   * A row with no allowed key keeps l = 0: it writes zeros, lse = -inf.
#include "kernels/flash_attention.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <new>

#include "mask_rules.h"

// Target-independent part: compiled once although foreach_target re-includes
// this file.
#ifndef QKV_SRC_KERNELS_FLASH_ATTENTION_CC_ONCE_
#define QKV_SRC_KERNELS_FLASH_ATTENTION_CC_ONCE_
namespace qkv::internal {

// Tile sizes, shared by every SIMD target (so FlashScratchBytes is exact and
// results do not depend on the tile plan of a target beyond its lane count).
struct FlashTraits {
  // Query rows per item. 64 = 4 AVX-512 vectors of query lanes: the S^T and
  // P.V micro-tiles are 4 keys (or 4 dv columns) x 4 query vectors = 16
  // accumulators, half of the 32 zmm registers, and 16 independent FMA chains
  // cover 2 FMA ports x 4 cycles latency twice. Each K/V row is re-read once
  // per 64 query rows.
  static constexpr int64_t kBlockQ = 64;
  // Keys per block: S^T / P^T are [64, 64] floats = 16 KiB, a K or V block at
  // head_dim 128 is 32 KiB; with Q'^T and acc^T (32 KiB each) the item's
  // working set stays in the 2 MiB L2. Measured (Sapphire Rapids, 1 thread,
  // thread CPU time, D = 128, N = 4096, fp32; full / causal GFLOP/s):
  //   kBlockKV 32: 118 / 114   64: 122 / 117   128: 125 / 120
  //   kBlockQ 128 (kBlockKV 64): 123 / 114
  // All within the machine's +-3% noise: the FMA issue rate of the
  // micro-tiles and the exp of the softmax bound the kernel, not the caches.
  // 64 keeps scratch small and matches the vector count of kBlockQ.
  static constexpr int64_t kBlockKV = 64;
  // Every scratch array starts on a 64-byte boundary (one AVX-512 vector).
  static constexpr int64_t kAlignFloats = 16;
  static_assert(kBlockQ % kAlignFloats == 0, "query lanes must fill whole vectors");
  static_assert(kBlockKV >= 4, "micro-tiles take 4 keys at a time");
  static_assert(kBlockKV == kSparseBlock, "a block-sparse tile is one key block");
};

// Offsets (in bytes) of the per-thread scratch arrays for one problem.
struct FlashLayout {
  int64_t q_t, k_tile, v_tile, s_t, bias, acc_t, row_max, row_max_old, m_sub, row_sum, alpha;
  int64_t rel_lo, rel_hi;
  int64_t row_meta;  // int64 [4, kBlockQ]: head, query index, lo, hi
  int64_t bytes;     // total per thread

  static FlashLayout For(const Problem& pr) {
    constexpr int64_t br = FlashTraits::kBlockQ, bc = FlashTraits::kBlockKV;
    FlashLayout l{};
    int64_t at = 0;
    auto take = [&](int64_t floats) {
      const int64_t start = at;
      const int64_t a = FlashTraits::kAlignFloats;
      at += (floats + a - 1) / a * a * static_cast<int64_t>(sizeof(float));
      return start;
    };
    l.q_t = take(pr.head_dim * br);      // Q'^T  [head_dim, kBlockQ]
    l.k_tile = take(bc * pr.head_dim);   // K     [kBlockKV, head_dim] (converted)
    l.v_tile = take(bc * pr.head_dim_v); // V     [kBlockKV, head_dim_v] (converted)
    l.s_t = take(bc * br);               // S^T, then P^T  [kBlockKV, kBlockQ]
    l.bias = take(bc * br);              // explicit-mask bias [kBlockKV, kBlockQ]
    l.acc_t = take(pr.head_dim_v * br);  // acc^T [head_dim_v, kBlockQ]
    l.row_max = take(br);
    l.row_max_old = take(br);
    l.m_sub = take(br);
    l.row_sum = take(br);
    l.alpha = take(br);
    l.rel_lo = take(br);  // int32 per row
    l.rel_hi = take(br);
    l.row_meta = take(4 * br * 2);  // int64 = 2 float slots
    l.bytes = at;
    return l;
  }
};

}  // namespace qkv::internal
#endif  // QKV_SRC_KERNELS_FLASH_ATTENTION_CC_ONCE_

// Build AVX3 (AVX-512), AVX2, SSE4 and the scalar fallback only (SSSE3 adds
// build time and no machine we target lacks SSE4; AVX3_DL is opt-in anyway).
#ifndef HWY_DISABLED_TARGETS
#define HWY_DISABLED_TARGETS (HWY_SSSE3 | HWY_AVX3_DL)
#endif
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/flash_attention.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "kernels/convert-inl.h"
#include "kernels/exp2-inl.h"

HWY_BEFORE_NAMESPACE();
namespace qkv::internal::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

using DF = hn::ScalableTag<float>;
using DI = hn::RebindToSigned<DF>;
using VF = hn::Vec<DF>;
constexpr int64_t kBr = FlashTraits::kBlockQ;
constexpr int64_t kBc = FlashTraits::kBlockKV;
// Query vectors per micro-tile: 4 keys x kMaxVecs accumulators must fit the
// register file with room for the loads: 16 of 32 zmm on AVX-512; 8 of 16
// registers on AVX2/SSE4 (16 there would spill).
#if HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL
constexpr int kMaxVecs = 4;
#else
constexpr int kMaxVecs = 2;
#endif
// Keys (QKTile) or dv columns (PVTile) per micro-tile with kMaxVecs query
// vectors: 6 x 4 = 24 accumulators + 4 loaded vectors + 1 broadcast = 29 of
// 32 zmm (no spills in the AVX3 asm), and per step 10 loads feed 24 FMAs.
// Measured (1 thread, D = 128, min of runs, GFLOP/s with only QK resp. only
// P.V left on): 4 keys 290 / 276, 6 keys 298 / 282, 7 keys 295 / 277 at
// N = 4096; all equal at N = 1024. A stand-alone loop of the 4x4 and 6x4
// tiles on L1-resident data runs at 170 GFLOP/s, 96% of the 177 GFLOP/s a
// register-only FMA loop reaches on this core: the tiles are FMA-bound, so
// wider tiles gain only the 2% of fewer Q'^T / P^T reloads. The remainder
// of a 64-key block takes a 4-key tile, then 1-key tiles.
constexpr int kTileKeys = kMaxVecs == 4 ? 6 : 4;
constexpr float kInf = std::numeric_limits<float>::infinity();

// Returns true when V rows [c0, c1) hold no inf or NaN.
bool VFinite(const float* v, int64_t v_stride, int64_t dim_v, int64_t c0, int64_t c1) {
  for (int64_t c = c0; c < c1; ++c)
    if (!RowFinite(v + c * v_stride, dim_v)) return false;
  return true;
}

// Computes S^T[c, lanes] = sum_d K[c, d] * Q'^T[d, lanes] for kK keys (rows
// `k`, `k_stride` apart) and kV query vectors. q_t and s_t point at the first
// lane of the group; their rows are kBr floats apart. The kK * kV independent
// accumulators are an array indexed only by constants of fully unrolled
// loops, which GCC keeps in registers (checked in the AVX3 asm: 24 zmm
// accumulators, no stack traffic); this needs sized vectors, which all our
// x86 targets have (SVE/RVV would need named variables as gemma.cpp uses).
template <int kK, int kV>
HWY_INLINE void QKTile(DF df, const float* HWY_RESTRICT q_t, int64_t dim,
                       const float* HWY_RESTRICT k, int64_t k_stride, float* HWY_RESTRICT s_t) {
  const size_t nf = hn::Lanes(df);
  VF s[kK][kV];
  HWY_UNROLL(8) for (int c = 0; c < kK; ++c)
    HWY_UNROLL(8) for (int v = 0; v < kV; ++v) s[c][v] = hn::Zero(df);
  for (int64_t d = 0; d < dim; ++d) {
    const float* qd = q_t + d * kBr;
    VF q[kV];
    HWY_UNROLL(8) for (int v = 0; v < kV; ++v) q[v] = hn::Load(df, qd + v * nf);
    HWY_UNROLL(8) for (int c = 0; c < kK; ++c) {
      const VF b = hn::Set(df, k[c * k_stride + d]);
      HWY_UNROLL(8) for (int v = 0; v < kV; ++v) s[c][v] = hn::MulAdd(b, q[v], s[c][v]);
    }
  }
  HWY_UNROLL(8)
  for (int c = 0; c < kK; ++c) HWY_UNROLL(8) for (int v = 0; v < kV; ++v)
      hn::Store(s[c][v], df, s_t + c * kBr + v * nf);
}

// Updates acc^T[dv0 + n, lanes] = alpha * acc^T + sum_{c in [c0, c1)}
// V[c, dv0 + n] * P^T[c, lanes] for kN columns and kV query vectors.
template <int kN, int kV>
HWY_INLINE void PVTile(DF df, const float* HWY_RESTRICT p_t, const float* HWY_RESTRICT alpha,
                       const float* HWY_RESTRICT v, int64_t v_stride, int64_t c0, int64_t c1,
                       float* HWY_RESTRICT acc_t) {
  const size_t nf = hn::Lanes(df);
  VF a[kN][kV];
  HWY_UNROLL(8) for (int vv = 0; vv < kV; ++vv) {
    const VF al = hn::Load(df, alpha + vv * nf);
    HWY_UNROLL(8)
    for (int n = 0; n < kN; ++n) a[n][vv] = hn::Mul(al, hn::Load(df, acc_t + n * kBr + vv * nf));
  }
  for (int64_t c = c0; c < c1; ++c) {
    const float* pc = p_t + c * kBr;
    const float* vc = v + c * v_stride;
    VF p[kV];
    HWY_UNROLL(8) for (int vv = 0; vv < kV; ++vv) p[vv] = hn::Load(df, pc + vv * nf);
    HWY_UNROLL(8) for (int n = 0; n < kN; ++n) {
      const VF b = hn::Set(df, vc[n]);
      HWY_UNROLL(8) for (int vv = 0; vv < kV; ++vv) a[n][vv] = hn::MulAdd(b, p[vv], a[n][vv]);
    }
  }
  HWY_UNROLL(8)
  for (int n = 0; n < kN; ++n) HWY_UNROLL(8) for (int vv = 0; vv < kV; ++vv)
      hn::Store(a[n][vv], df, acc_t + n * kBr + vv * nf);
}

// S^T rows [c0, c1) for kV query vectors at lane offset `lane0`.
template <int kV>
void QKBlock(const float* q_t, int64_t dim, const float* k, int64_t k_stride, int64_t c0,
             int64_t c1, float* s_t) {
  const DF df;
  constexpr int kK = kV == kMaxVecs ? kTileKeys : 4;
  int64_t c = c0;
  for (; c + kK <= c1; c += kK)
    QKTile<kK, kV>(df, q_t, dim, k + c * k_stride, k_stride, s_t + c * kBr);
  for (; c + 4 <= c1; c += 4)
    QKTile<4, kV>(df, q_t, dim, k + c * k_stride, k_stride, s_t + c * kBr);
  for (; c < c1; ++c) QKTile<1, kV>(df, q_t, dim, k + c * k_stride, k_stride, s_t + c * kBr);
}

template <int kV>
void PVBlock(const float* p_t, const float* alpha, const float* v, int64_t v_stride, int64_t dim_v,
             int64_t c0, int64_t c1, float* acc_t) {
  const DF df;
  constexpr int kN = kV == kMaxVecs ? kTileKeys : 4;
  int64_t n = 0;
  for (; n + kN <= dim_v; n += kN)
    PVTile<kN, kV>(df, p_t, alpha, v + n, v_stride, c0, c1, acc_t + n * kBr);
  for (; n + 4 <= dim_v; n += 4)
    PVTile<4, kV>(df, p_t, alpha, v + n, v_stride, c0, c1, acc_t + n * kBr);
  for (; n < dim_v; ++n) PVTile<1, kV>(df, p_t, alpha, v + n, v_stride, c0, c1, acc_t + n * kBr);
}
// QKBlock / PVBlock for nv (1 to kMaxVecs) query vectors.
void QKVecs(int64_t nv, const float* q_t, int64_t dim, const float* k, int64_t k_stride, int64_t c0,
            int64_t c1, float* s_t) {
  switch (nv) {
    case 1: QKBlock<1>(q_t, dim, k, k_stride, c0, c1, s_t); break;
    case 2: QKBlock<2>(q_t, dim, k, k_stride, c0, c1, s_t); break;
    case 3: QKBlock<3>(q_t, dim, k, k_stride, c0, c1, s_t); break;
    default: QKBlock<4>(q_t, dim, k, k_stride, c0, c1, s_t); break;
  }
}
void PVVecs(int64_t nv, const float* p_t, const float* alpha, const float* v, int64_t v_stride,
            int64_t dim_v, int64_t c0, int64_t c1, float* acc_t) {
  switch (nv) {
    case 1: PVBlock<1>(p_t, alpha, v, v_stride, dim_v, c0, c1, acc_t); break;
    case 2: PVBlock<2>(p_t, alpha, v, v_stride, dim_v, c0, c1, acc_t); break;
    case 3: PVBlock<3>(p_t, alpha, v, v_stride, dim_v, c0, c1, acc_t); break;
    default: PVBlock<4>(p_t, alpha, v, v_stride, dim_v, c0, c1, acc_t); break;
  }
}

// Safe P.V for a V block with inf/NaN: skips every P = -0 (a skipped pair).
void PVBlockSafe(const float* p_t, const float* alpha, const float* v, int64_t v_stride,
                 int64_t dim_v, int64_t c0, int64_t c1, int64_t lanes, float* acc_t) {
  for (int64_t n = 0; n < dim_v; ++n) {
    float* acc = acc_t + n * kBr;
    for (int64_t r = 0; r < lanes; ++r) acc[r] *= alpha[r];
    for (int64_t c = c0; c < c1; ++c) {
      const float vc = v[c * v_stride + n];
      for (int64_t r = 0; r < lanes; ++r) {
        const float pr = p_t[c * kBr + r];
        if (!std::signbit(pr)) acc[r] += pr * vc;
      }
    }
  }
}

// Fills bias^T[c, r] for c in [c0, c1) of one row: the explicit mask value
// times log2(e) (S is in base 2) where [lo, hi) allows j0 + c, else -inf;
// returns whether any is not -inf.
template <class T>
bool FillBiasRow(const T* mask, int64_t j_stride, int64_t j0, int64_t lo, int64_t hi, int64_t c0,
                 int64_t c1, float* bias_col) {
  bool any = false;
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t j = j0 + c;
    float value = -kInf;
    if (j >= lo && j < hi) {
      if constexpr (std::is_same_v<T, uint8_t>) {
        value = mask[j * j_stride] ? 0.0f : -kInf;
      } else if constexpr (std::is_same_v<T, uint16_t>) {
        value = static_cast<float>(HalfToFloat(mask[j * j_stride]) * kLog2E);
      } else {
        value = static_cast<float>(static_cast<double>(mask[j * j_stride]) * kLog2E);
      }
    }
    any |= value != -kInf;
    bias_col[c * kBr] = value;
  }
  return any;
}

// Runs items taken from `next` (shared by the threads) with the scratch
// `buf` until none is left. Which thread runs an item never changes its
// result: an item owns its output rows and computes them alone in a fixed
// order.
void FlashRunThread(const AttentionParams& p, const Problem& pr, std::atomic<int64_t>* next,
                    uint8_t* buf, std::atomic<int64_t>* tiles_out) {
  const DF df;
  const DI di;
  const int64_t nf = static_cast<int64_t>(hn::Lanes(df));
  const FlashLayout lay = FlashLayout::For(pr);
  auto f = [&](int64_t off) { return reinterpret_cast<float*>(buf + off); };
  float* q_t = f(lay.q_t);
  float* k_tile = f(lay.k_tile);
  float* v_tile = f(lay.v_tile);
  float* s_t = f(lay.s_t);
  float* bias = f(lay.bias);
  float* acc_t = f(lay.acc_t);
  float* row_max = f(lay.row_max);
  float* row_max_old = f(lay.row_max_old);
  float* m_sub = f(lay.m_sub);
  float* row_sum = f(lay.row_sum);
  float* alpha = f(lay.alpha);
  int32_t* rel_lo = reinterpret_cast<int32_t*>(buf + lay.rel_lo);
  int32_t* rel_hi = reinterpret_cast<int32_t*>(buf + lay.rel_hi);
  int64_t* meta = reinterpret_cast<int64_t*>(buf + lay.row_meta);
  int64_t* row_head = meta;
  int64_t* row_i = meta + kBr;
  int64_t* row_lo = meta + 2 * kBr;
  int64_t* row_hi = meta + 3 * kBr;

  const int64_t dim = pr.head_dim, dim_v = pr.head_dim_v, nq = pr.seq_q, nk = pr.seq_kv;
  const int64_t group_rows = pr.group_size * nq;
  const int64_t blocks = (group_rows + kBr - 1) / kBr;
  const int64_t items = pr.batch * pr.num_kv_heads * blocks;
  const bool k_direct = p.k.dtype == DType::kFloat32 && p.k.strides[3] == 1;
  const bool v_direct = p.v.dtype == DType::kFloat32 && p.v.strides[3] == 1;
  const TensorView& mask = p.mask.mask;
  const bool has_mask = mask.present();
  const bool sparse = p.mask.block_mask.present();
  int64_t tiles = 0;  // (item, key block) tiles computed, for AttentionInfo
  const float softcap2 = static_cast<float>(p.mask.softcap * kLog2E);
  const double scale2 = static_cast<double>(pr.scale) * kLog2E;
  int64_t vec_end[kBr];  // per query vector of the item: end of its keys in a block
  HWY_ALIGN float ones[kBr];
  std::fill(ones, ones + kBr, 1.0f);

  for (int64_t item; (item = next->fetch_add(1, std::memory_order_relaxed)) < items;) {
    // Last row block first: under causal (and key-length) rules the later
    // rows attend more keys, and taking the longest items first leaves the
    // short ones to fill the threads' ends. Round-robin items (the first
    // version) gave one of 2 threads 72 and the other 64 key blocks per head
    // at N = 1024 causal.
    const int64_t b = item / (pr.num_kv_heads * blocks);
    const int64_t g = item / blocks % pr.num_kv_heads;
    const int64_t t0 = (blocks - 1 - item % blocks) * kBr;
    const int64_t rows = std::min(kBr, group_rows - t0);
    const int64_t lanes = (rows + nf - 1) / nf * nf;
    const int64_t key_length = p.mask.key_lengths.empty() ? nk : p.mask.key_lengths[b];

    // Rows: head, query index, key range; the union [lo_min, hi_max) and the
    // intersection [lo_max, hi_min) of the non-empty ranges.
    int64_t lo_min = nk, hi_max = 0, lo_max = 0, hi_min = nk;
    for (int64_t r = 0; r < rows; ++r) {
      row_head[r] = g * pr.group_size + (t0 + r) / nq;
      row_i[r] = (t0 + r) % nq;
      const KeyRange range = RowKeyRange(p.mask, nq, nk, row_i[r], key_length);
      row_lo[r] = range.lo, row_hi[r] = range.hi;
      lo_max = std::max(lo_max, range.lo), hi_min = std::min(hi_min, range.hi);
      if (range.hi > range.lo) lo_min = std::min(lo_min, range.lo), hi_max = std::max(hi_max, range.hi);
    }
    // Pack Q'^T [dim, lanes] = scale * log2(e) * Q^T (one rounding of the
    // double product), so S is in base 2; padding lanes are 0 and never
    // written out.
    for (int64_t r = 0; r < lanes; ++r) {
      if (r >= rows) {
        for (int64_t d = 0; d < dim; ++d) q_t[d * kBr + r] = 0.0f;
        continue;
      }
      const int64_t off = p.q.Offset(b, row_head[r], row_i[r], 0);
      if (p.q.dtype == DType::kFloat32) {
        const float* q = static_cast<const float*>(p.q.data) + off;
        for (int64_t d = 0; d < dim; ++d)
          q_t[d * kBr + r] = static_cast<float>(scale2 * q[d * p.q.strides[3]]);
      } else {
        for (int64_t d = 0; d < dim; ++d)
          q_t[d * kBr + r] = static_cast<float>(
              scale2 * LoadAsFloat(p.q.data, p.q.dtype, off + d * p.q.strides[3]));
      }
    }
    for (int64_t r = 0; r < lanes; ++r) row_max[r] = -kInf, row_sum[r] = 0.0f, alpha[r] = 0.0f;
    std::fill(acc_t, acc_t + dim_v * kBr, 0.0f);

    const int64_t kb_begin = lo_min / kBc, kb_end = hi_max > lo_min ? (hi_max + kBc - 1) / kBc : 0;
    // Block-sparse: when every row of the item is in one query block of one
    // head (seq_q a multiple of 64 without GQA, or any single-block item),
    // its tile row is read once per key block and an absent tile is skipped
    // before any per-row work (the per-row test cost 40% of a 4%-dense
    // BigBird run at N = 16K).
    const uint8_t* tile_row = nullptr;
    int64_t tile_stride = 0;
    if (sparse && rows > 0 && row_head[0] == row_head[rows - 1] &&
        row_i[0] / kSparseBlock == row_i[rows - 1] / kSparseBlock) {
      const TensorView& bm = p.mask.block_mask;
      tile_row = static_cast<const uint8_t*>(bm.data) + bm.Offset(b, row_head[0], row_i[0] / kSparseBlock, 0);
      tile_stride = bm.strides[3];
    }
    for (int64_t kb = kb_begin; kb < kb_end; ++kb) {
      if (tile_row != nullptr && tile_row[kb * tile_stride] == 0) continue;  // absent tile
      const int64_t j0 = kb * kBc;
      const int64_t cols = std::min(kBc, nk - j0);
      // Key rows [c0, c1) of the block that some row may attend. A row whose
      // block-sparse tile (row's query block, kb) is absent gets an empty
      // range here, exactly as if its structural range missed the block.
      int64_t c0 = cols, c1 = 0;
      bool all_present = true;
      for (int64_t r = 0; r < rows; ++r) {
        int64_t lo = std::clamp<int64_t>(row_lo[r] - j0, 0, cols);
        int64_t hi = std::clamp<int64_t>(row_hi[r] - j0, 0, cols);
        if (sparse && tile_row == nullptr && hi > lo &&
            !BlockPresent(p.mask, b, row_head[r], row_i[r], kb)) {
          lo = hi = 0, all_present = false;
        }
        rel_lo[r] = static_cast<int32_t>(lo), rel_hi[r] = static_cast<int32_t>(hi);
        if (hi > lo) c0 = std::min(c0, lo), c1 = std::max(c1, hi);
      }
      if (c1 <= c0) continue;  // skipped: no row attends this block
      ++tiles;
      for (int64_t r = rows; r < lanes; ++r) rel_lo[r] = rel_hi[r] = 0;
      const bool full = !has_mask && all_present && j0 >= lo_max && j0 + cols <= hi_min;

      // Explicit mask: bias first, so an all -inf block reads no K/V.
      if (has_mask) {
        bool any = false;
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t off = mask.Offset(b, row_head[r], row_i[r], 0);
          const int64_t js = mask.strides[3];
          float* col = bias + r;
          // An absent block-sparse tile: the row's range is empty here.
          const bool absent = rel_hi[r] <= rel_lo[r];
          const int64_t lo_r = absent ? 0 : row_lo[r], hi_r = absent ? 0 : row_hi[r];
          switch (mask.dtype) {
            case DType::kBool:
              any |= FillBiasRow(static_cast<const uint8_t*>(mask.data) + off, js, j0, lo_r,
                                 hi_r, c0, c1, col);
              break;
            case DType::kFloat16:
              any |= FillBiasRow(static_cast<const uint16_t*>(mask.data) + off, js, j0, lo_r,
                                 hi_r, c0, c1, col);
              break;
            case DType::kFloat64:
              any |= FillBiasRow(static_cast<const double*>(mask.data) + off, js, j0, lo_r,
                                 hi_r, c0, c1, col);
              break;
            default:
              any |= FillBiasRow(static_cast<const float*>(mask.data) + off, js, j0, lo_r,
                                 hi_r, c0, c1, col);
              break;
          }
        }
        if (!any) continue;  // every pair of the block masked: skipped
        for (int64_t c = c0; c < c1; ++c)
          for (int64_t r = rows; r < lanes; ++r) bias[c * kBr + r] = -kInf;
      }

      // K and V rows of the block: in place, or converted to float32 tiles.
      const float* k_rows = k_tile;
      int64_t k_stride = dim;
      if (k_direct) {
        k_rows = static_cast<const float*>(p.k.data) + p.k.Offset(b, g, j0, 0);
        k_stride = p.k.strides[2];
      } else {
        for (int64_t c = c0; c < c1; ++c)
          ConvertRow(p.k.data, p.k.dtype, p.k.Offset(b, g, j0 + c, 0), p.k.strides[3], dim,
                     k_tile + c * dim);
      }
      const float* v_rows = v_tile;
      int64_t v_stride = dim_v;
      if (v_direct) {
        v_rows = static_cast<const float*>(p.v.data) + p.v.Offset(b, g, j0, 0);
        v_stride = p.v.strides[2];
      } else {
        for (int64_t c = c0; c < c1; ++c)
          ConvertRow(p.v.data, p.v.dtype, p.v.Offset(b, g, j0 + c, 0), p.v.strides[3], dim_v,
                     v_tile + c * dim_v);
      }

      // Key ends per query vector. A ranged block (no explicit mask, finite
      // V) computes vector v's S^T, softmax and P.V only for keys [c0,
      // vec_end[v]), vec_end = the running max over the group's vectors of
      // their lanes' range ends: on a causal diagonal block the 4 vectors of
      // 16 rows take 16, 32, 48 and 64 keys (62.5% of the tile). Keys a
      // vector computes beyond its own lanes' ends are masked to -inf below
      // and multiply finite V by P = 0 (exact). Other blocks: c1 for all.
      // An explicit-mask block or one with non-finite V rows keeps the whole
      // tile (the safe P.V reads every P of [c0, c1)).
      const bool ranged = !full && !has_mask;
      const bool v_finite = !ranged || VFinite(v_rows, v_stride, dim_v, c0, c1);
      const bool segmented = ranged && v_finite;
      for (int64_t v0 = 0; v0 < lanes; v0 += kMaxVecs * nf) {
        int64_t end = c0;
        for (int64_t r = v0; r < std::min(lanes, v0 + kMaxVecs * nf); r += nf) {
          if (segmented) {
            for (int64_t x = r; x < r + nf; ++x)
              if (rel_hi[x] > rel_lo[x]) end = std::max<int64_t>(end, rel_hi[x]);
          } else {
            end = c1;
          }
          vec_end[r / nf] = end;
        }
      }

      // 1. S^T = K Q'^T over groups of up to kMaxVecs query vectors: key
      // segment [vec_end[v - 1], vec_end[v]) for vectors v, v + 1, ...
      for (int64_t v0 = 0; v0 < lanes; v0 += kMaxVecs * nf) {
        const int64_t nv = std::min<int64_t>(kMaxVecs, (lanes - v0) / nf);
        int64_t prev = c0;
        for (int64_t s = 0; s < nv; ++s) {
          const int64_t e = vec_end[v0 / nf + s];
          if (e > prev) {
            QKVecs(nv - s, q_t + v0 + s * nf, dim, k_rows, k_stride, prev, e, s_t + v0 + s * nf);
          }
          prev = e;
        }
      }

      // Soft-capping (MaskSpec::softcap = C): S2 = C2 tanh(S2 / C2) with
      // C2 = C log2(e) (S is in base 2), on every computed key, before the
      // mask is added. TanhViaExp2 (exp2-inl.h); a NaN score stays NaN.
      if (softcap2 > 0) {
        const VF c2 = hn::Set(df, softcap2), inv = hn::Set(df, 1.0f / softcap2);
        for (int64_t r = 0; r < lanes; r += nf) {
          for (int64_t c = c0; c < vec_end[r / nf]; ++c) {
            float* sp = s_t + c * kBr + r;
            hn::Store(hn::Mul(c2, TanhViaExp2(df, hn::Mul(hn::Load(df, sp), inv))), df, sp);
          }
        }
      }

      // 2. Mask and online softmax, one vector of query lanes at a time.
      const VF neg_inf = hn::Set(df, -kInf);
      const VF neg_zero = hn::Set(df, -0.0f);
      std::copy(row_max, row_max + lanes, row_max_old);
      bool has_skipped = !full;
      for (int64_t r = 0; r < lanes; r += nf) {
        const int64_t c1 = vec_end[r / nf];  // this vector's keys: [c0, c1)
        if (has_mask) {  // s = bias == -inf ? -inf : s + bias (-inf masks exactly)
          for (int64_t c = c0; c < c1; ++c) {
            const VF bv = hn::Load(df, bias + c * kBr + r);
            const VF sv = hn::Load(df, s_t + c * kBr + r);
            hn::Store(hn::IfThenElse(hn::Eq(bv, neg_inf), neg_inf, hn::Add(sv, bv)), df,
                      s_t + c * kBr + r);
          }
        } else if (!full) {  // s = lo <= c < hi ? s : -inf
          const auto lo = hn::Load(di, rel_lo + r), hi = hn::Load(di, rel_hi + r);
          for (int64_t c = c0; c < c1; ++c) {
            const auto cv = hn::Set(di, static_cast<int32_t>(c));
            const auto in = hn::RebindMask(df, hn::AndNot(hn::Lt(cv, lo), hn::Lt(cv, hi)));
            const VF sv = hn::Load(df, s_t + c * kBr + r);
            hn::Store(hn::IfThenElse(in, sv, neg_inf), df, s_t + c * kBr + r);
          }
        }
        const VF m_old = hn::Load(df, row_max + r);
        VF m0 = neg_inf, m1 = neg_inf;  // two chains for the max latency
        auto ninf = hn::Eq(m0, hn::Zero(df));  // all false: lanes with an s = -inf
        int64_t c = c0;
        for (; c + 2 <= c1; c += 2) {
          const VF s0 = hn::Load(df, s_t + c * kBr + r), s1 = hn::Load(df, s_t + (c + 1) * kBr + r);
          m0 = hn::Max(m0, s0);
          m1 = hn::Max(m1, s1);
          if (full) ninf = hn::Or(ninf, hn::Or(hn::Eq(s0, neg_inf), hn::Eq(s1, neg_inf)));
        }
        if (c < c1) {
          const VF s0 = hn::Load(df, s_t + c * kBr + r);
          m0 = hn::Max(m0, s0);
          if (full) ninf = hn::Or(ninf, hn::Eq(s0, neg_inf));
        }
        if (full && !hn::AllFalse(df, ninf)) has_skipped = true;
        const VF m_new = hn::Max(m_old, hn::Max(m0, m1));  // m_new = max(m_old, max_c s)
        // While no key is allowed yet m_new = -inf: subtract 0 instead, so
        // exp(-inf - 0) = 0 rather than exp(-inf - -inf) = NaN.
        hn::Store(hn::IfThenZeroElse(hn::Eq(m_new, neg_inf), m_new), df, m_sub + r);
        hn::Store(m_new, df, row_max + r);
      }
      // Skipped pairs meet V only through P = 0; if V has inf/NaN there,
      // mark them P = -0 for the safe P.V below (0 * inf would be NaN).
      const bool safe =
          has_skipped && (ranged ? !v_finite : !VFinite(v_rows, v_stride, dim_v, c0, c1));
      for (int64_t r = 0; r < lanes; r += nf) {
        const int64_t c1 = vec_end[r / nf];
        const VF ms = hn::Load(df, m_sub + r);
        const VF al = Exp2NonPositive(
            df, hn::Sub(hn::Load(df, row_max_old + r), ms));  // alpha = 2^(m_old - m_new)
        VF l0 = hn::Zero(df), l1 = l0;
        int64_t c = c0;
        if (!safe) {
          for (; c + 2 <= c1; c += 2) {
            float* s0 = s_t + c * kBr + r;
            const VF p0 = Exp2NonPositive(df, hn::Sub(hn::Load(df, s0), ms));  // p = 2^(s - m_new)
            const VF p1 = Exp2NonPositive(df, hn::Sub(hn::Load(df, s0 + kBr), ms));
            hn::Store(p0, df, s0);
            hn::Store(p1, df, s0 + kBr);
            l0 = hn::Add(l0, p0);
            l1 = hn::Add(l1, p1);
          }
        }
        for (; c < c1; ++c) {
          const VF sv = hn::Load(df, s_t + c * kBr + r);
          VF pv = Exp2NonPositive(df, hn::Sub(sv, ms));
          if (safe) pv = hn::IfThenElse(hn::Eq(sv, neg_inf), neg_zero, pv);
          hn::Store(pv, df, s_t + c * kBr + r);
          l0 = hn::Add(l0, pv);
        }
        // l = l * alpha + sum_c p
        hn::Store(hn::MulAdd(al, hn::Load(df, row_sum + r), hn::Add(l0, l1)), df, row_sum + r);
        hn::Store(al, df, alpha + r);
      }

      // 3. acc^T = alpha * acc^T + V^T P^T.
      if (safe) {
        PVBlockSafe(s_t, alpha, v_rows, v_stride, dim_v, c0, c1, lanes, acc_t);
        continue;
      }
      // The first non-empty segment of a group applies alpha to all its
      // vectors; later ones add with alpha = 1. A vector before it has no key
      // in this block, so its alpha is exactly 1 (m unchanged) or its acc is
      // still 0 (no key yet): leaving it unscaled is exact.
      for (int64_t v0 = 0; v0 < lanes; v0 += kMaxVecs * nf) {
        const int64_t nv = std::min<int64_t>(kMaxVecs, (lanes - v0) / nf);
        int64_t prev = c0;
        bool first = true;
        for (int64_t s = 0; s < nv; ++s) {
          const int64_t e = vec_end[v0 / nf + s], at = v0 + s * nf;
          if (e > prev) {
            PVVecs(nv - s, s_t + at, first ? alpha + at : ones, v_rows, v_stride, dim_v, prev, e,
                   acc_t + at);
            first = false;
          }
          prev = e;
        }
      }
    }

    // A learned sink (MaskSpec::sink_logits) joins each row's denominator:
    // l += 2^(sink2 - m) with sink2 = sink log2(e), and lse = m' + log2(l
    // 2^(m - m') + 2^(sink2 - m')) with m' = max(m, sink2), in double. A sink
    // far above m makes l inf: out rounds to 0, as the exact value does in
    // float. A row without keys keeps out = 0 and gets lse = sink.
    // row_max_old is free here: it holds each row's natural-log lse.
    const bool sink = !p.mask.sink_logits.empty();
    if (sink) {
      for (int64_t r = 0; r < rows; ++r) {
        const double s2 = static_cast<double>(p.mask.sink_logits[row_head[r]]) * kLog2E;
        const double m = row_max[r], l = row_sum[r];
        if (s2 == -std::numeric_limits<double>::infinity() || l == 0.0) {
          row_max_old[r] = l == 0.0 ? static_cast<float>(s2 / kLog2E) : LseFromBase2(row_max[r], row_sum[r]);
          continue;
        }
        const double mm = std::max(m, s2);
        const double ll = l * std::exp2(m - mm) + std::exp2(s2 - mm);
        row_max_old[r] = static_cast<float>((mm + std::log2(ll)) / kLog2E);
        row_sum[r] = static_cast<float>(l + std::exp2(s2 - m));
      }
    }
    // out = acc / l, lse = (m + log2(l)) ln 2 (m is in base 2); l = 0: no
    // allowed key, zeros and -inf.
    // acc^T / l in place, a vector of rows at a time (the same correctly
    // rounded division as per element), then each row copied out: the
    // per-element offset and dtype switch of the first version cost 10% of
    // a causal N = 1024 run.
    for (int64_t n = 0; n < dim_v; ++n) {
      for (int64_t r = 0; r < lanes; r += nf) {
        const VF l = hn::Load(df, row_sum + r);
        float* a = acc_t + n * kBr + r;
        hn::Store(hn::IfThenZeroElse(hn::Eq(l, hn::Zero(df)), hn::Div(hn::Load(df, a), l)), df, a);
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float l = row_sum[r];
      const bool empty = l == 0.0f;
      const int64_t h = row_head[r], i = row_i[r];
      const int64_t off = p.out.Offset(b, h, i, 0), step = p.out.strides[3];
      if (p.out.dtype == DType::kFloat32) {
        float* o = static_cast<float*>(p.out.data) + off;
        for (int64_t n = 0; n < dim_v; ++n) o[n * step] = acc_t[n * kBr + r];
      } else {
        for (int64_t n = 0; n < dim_v; ++n)
          StoreFromFloat(p.out.data, p.out.dtype, off + n * step, acc_t[n * kBr + r]);
      }
      if (p.lse.present()) {
        StoreFromFloat(p.lse.data, p.lse.dtype, p.lse.Offset(b, h, i, 0),
                       sink ? row_max_old[r] : empty ? -kInf : LseFromBase2(row_max[r], l));
      }
    }
  }
  tiles_out->fetch_add(tiles, std::memory_order_relaxed);
}

const char* TargetName() { return hwy::TargetName(HWY_TARGET); }

// Computes out[i] = Exp2NonPositive(in[i]) for i < n (for the accuracy test).
void Exp2Array(const float* in, int64_t n, float* out) {
  const DF df;
  const int64_t nf = static_cast<int64_t>(hn::Lanes(df));
  HWY_ALIGN float buf[64] = {};  // >= one vector on every target
  for (int64_t i = 0; i < n; i += nf) {
    const int64_t m = std::min(nf, n - i);
    std::copy(in + i, in + i + m, buf);
    hn::Store(Exp2NonPositive(df, hn::Load(df, buf)), df, buf);
    std::copy(buf, buf + m, out + i);
  }
}

}  // namespace qkv::internal::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace qkv::internal {

HWY_EXPORT(FlashRunThread);
HWY_EXPORT(TargetName);
HWY_EXPORT(Exp2Array);

int64_t FlashScratchBytes(const Problem& problem) {
  return FlashLayout::For(problem).bytes * std::max(problem.threads, 1);
}

int64_t FlashAttention(const AttentionParams& params, const Problem& problem) {
  const int64_t bytes = FlashLayout::For(problem).bytes;
  // Resolve the target once, outside the parallel region (the first
  // dispatch initialises Highway's chosen target).
  (void)FlashSimdTarget();
  auto* const run = &HWY_DYNAMIC_DISPATCH(FlashRunThread);
  std::atomic<int64_t> next{0}, tiles{0};
#pragma omp parallel num_threads(std::max(problem.threads, 1))
  {
    auto* buf = static_cast<uint8_t*>(::operator new(bytes, std::align_val_t{64}));
    run(params, problem, &next, buf, &tiles);
    ::operator delete(buf, std::align_val_t{64});
  }
  return tiles.load();
}

const char* FlashSimdTarget() { return HWY_DYNAMIC_DISPATCH(TargetName)(); }

// Test hook (declared in tests/flash_attention_test.cc): the kernel's 2^t.
void FlashExp2ForTest(const float* in, int64_t n, float* out) {
  HWY_DYNAMIC_DISPATCH(Exp2Array)(in, n, out);
}

}  // namespace qkv::internal
#endif  // HWY_ONCE
