// The FlashAttention-2-style CPU backward kernel: dQ, dK, dV in one pass over
// fixed-size tiles that recompute P from the forward's log-sum-exp, so no
// seq_q x seq_kv matrix is ever held (Dao 2023, arXiv:2307.08691, Algorithm
// 2; the deterministic dQ order follows FlashAttention-3's deterministic
// backward, Shah et al. 2024, arXiv:2407.08608).
//
// Work items. An item is (batch b, KV head g, key block kb of kBlockKV
// keys). It holds its keys' K'^T = scale log2(e) K^T, V^T and K in packed
// tiles and the dK^T, dV^T accumulators, and visits, in order, every block of
// kBlockQ consecutive rows t = h_local * seq_q + i of the group (the
// group_size query heads sharing g) whose keys it may attend. Per tile
// (rows r, keys c in lanes; vertical ops only):
//   1. S2[r, c] = sum_d Q[r, d] K'^T[d, c]        (base-2 scores)
//   2. P[r, c]  = 2^(S2 + bias2 - lse2_r)         lse2 = lse log2(e)
//   3. dP[r, c] = sum_n dO[r, n] V^T[n, c]
//   4. dS[r, c] = scale P (dP - D_r)              D_r = dO_r . O_r
//   5. dV^T[n, c] += sum_r dO[r, n] P[r, c];   dK^T[d, c] += sum_r Q[r, d] dS[r, c]
//   6. dQpart[r, d] = sum_c dS[r, c] K[c, d], then dQ[r] += dQpart[r].
// Five products of kBlockQ x kBlockKV x head_dim: 2.5 times the forward's
// two, the count FlashAttention's benchmarks use.
//
// Determinism. dK and dV of a key block are summed by its one item, over
// rows in t order: GQA sums the group's heads in head order. dQ of a row
// block receives one part per key block; the parts are added in key-block
// order, enforced by a per-row-block turn counter: key block kb waits until
// counter == kb, adds, and sets kb + 1 (a key block outside the row block's
// structural key range never takes a turn; one inside it takes its turn even
// if its tile turns out empty). The part is computed before waiting, so only
// the add (head_dim per row) is serialised. Items are handed out in
// increasing order and wait only on lower ones, so the lowest unfinished
// item never waits: no deadlock for any thread count, and results are
// bitwise identical for every thread count. No float is ever added
// atomically. A single head of length N gives N / kBlockKV items, so a long
// sequence parallelises even when batch x heads is 1 (PyTorch's CPU
// backward parallelises over batch x heads only). Causal items come longest
// first (key block 0 attends every row).
//
// Tile modes, per (row block, key block), from the rows' key ranges
// (internal::RowKeyRange; a row with lse = -inf has none):
//   skipped   outside the row block's structural range: never visited;
//   full      every row attends every key, no explicit mask: no selects;
//   ranged    a boundary tile: P, dS = 0 outside each row's [lo, hi);
//   explicit  the explicit mask's bias tile (0 / value / -inf) is read
//             first; all -inf: the tile is skipped (its turn still taken);
//   scalar    some q, dO, K or V row of the tile holds inf/NaN: a scalar
//             loop over the allowed pairs only, so 0 * inf never lets a
//             masked NaN in (what the forward's "safe" P.V does).
//
// Memory. Per thread: the item's K'^T, V^T, K, dK^T, dV^T tiles and the
// tile's S/P, dP/dS, bias and dQ part, about 16 KiB + 20 head_dim KiB at
// kBlockQ = kBlockKV = 64: independent of seq_q and seq_kv. Shared: lse2 and
// D per row and three ints per row block (O(seq_q)); dQ accumulates in
// place when dq is float32 with unit stride along head_dim, else in a
// float32 copy (O(seq_q head_dim), reported in the scratch bytes). Traffic:
// each item reads its K/V block once and the Q, dO rows and dQ of every row
// block it attends once: Q, dO and dQ are streamed seq_kv / 64 times.
//
// Edge cases: a row with no allowed key (lse = -inf) has dq = 0 and adds
// nothing; seq_kv = 0 leaves dq = 0; seq_q = 0 gives dk = dv = 0. An
// allowed NaN score makes its row's gradients NaN, as the reference does.
#include "kernels/flash_backward.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <new>
#include <thread>
#include <vector>

#include "kernels/flash_attention.h"
#include "mask_rules.h"

// Target-independent part: compiled once although foreach_target re-includes
// this file.
#ifndef QKV_SRC_KERNELS_FLASH_BACKWARD_CC_ONCE_
#define QKV_SRC_KERNELS_FLASH_BACKWARD_CC_ONCE_
namespace qkv::internal {

// Tile sizes, shared by every SIMD target (so the scratch size is exact and
// the order of every sum is the same on every target up to its lane count).
struct BackwardTraits {
  // Query rows per tile: each item re-reads Q, dO and dQ once per 64 rows x
  // 64 keys, and a tile is 5 products of 64 x 64 x head_dim.
  static constexpr int64_t kBlockQ = 64;
  // Keys per item: 64 = 4 AVX-512 / 8 AVX2 vectors of key lanes; the five
  // [64, 64] and [head_dim, 64] tiles of an item stay in L2.
  static constexpr int64_t kBlockKV = 64;
  static constexpr int64_t kAlignFloats = 16;  // 64-byte aligned arrays and rows
  static_assert(kBlockKV % kAlignFloats == 0, "key lanes must fill whole vectors");
};

// Offsets (in bytes) of the per-thread scratch arrays for one problem.
struct BackwardLayout {
  int64_t dim_pad;  // head_dim rounded up to kAlignFloats
  int64_t k_t, v_t, k_rows, dk_t, dv_t, s, dp, bias, dq_part, q_tile, do_tile, v_row, zero_row;
  int64_t row_meta;  // int64 [4, kBlockQ]: head, query, lo, hi
  int64_t rel;       // int32 [2, kBlockQ]: lo, hi within the key block
  int64_t row_ptrs;  // const float* [2, kBlockQ]: Q and dO rows
  int64_t bytes;

  static BackwardLayout For(const Problem& pr) {
    constexpr int64_t br = BackwardTraits::kBlockQ, bc = BackwardTraits::kBlockKV;
    constexpr int64_t a = BackwardTraits::kAlignFloats;
    BackwardLayout l{};
    l.dim_pad = (pr.head_dim + a - 1) / a * a;
    int64_t at = 0;
    auto take = [&](int64_t floats) {
      const int64_t start = at;
      at += (floats + a - 1) / a * a * static_cast<int64_t>(sizeof(float));
      return start;
    };
    l.k_t = take(pr.head_dim * bc);       // K'^T [head_dim, kBlockKV]
    l.v_t = take(pr.head_dim_v * bc);     // V^T  [head_dim_v, kBlockKV]
    l.k_rows = take(bc * l.dim_pad);      // K    [kBlockKV, dim_pad]
    l.dk_t = take(pr.head_dim * bc);      // dK^T [head_dim, kBlockKV]
    l.dv_t = take(pr.head_dim_v * bc);    // dV^T [head_dim_v, kBlockKV]
    l.s = take(br * bc);                  // S2, then P   [kBlockQ, kBlockKV]
    l.dp = take(br * bc);                 // dP, then dS  [kBlockQ, kBlockKV]
    l.bias = take(br * bc);               // explicit-mask bias [kBlockQ, kBlockKV]
    l.dq_part = take(br * l.dim_pad);     // [kBlockQ, dim_pad]
    l.q_tile = take(br * pr.head_dim);    // converted Q rows  [kBlockQ, head_dim]
    l.do_tile = take(br * pr.head_dim_v); // converted dO rows [kBlockQ, head_dim_v]
    l.v_row = take(pr.head_dim_v);        // one V row, converted before transposing
    l.zero_row = take(std::max(pr.head_dim, pr.head_dim_v));  // zeros: Q, dO of empty rows
    l.row_meta = take(4 * br * 2);
    l.rel = take(2 * br);
    l.row_ptrs = take(2 * br * 2);
    l.bytes = at;
    return l;
  }
};

// State shared by the threads of one backward call.
struct BackwardShared {
  int64_t row_blocks = 0;     // per (b, g): ceil(group_size * seq_q / kBlockQ)
  int64_t key_blocks = 0;     // per (b, g): ceil(seq_kv / kBlockKV)
  const float* lse2 = nullptr;    // [batch * num_q_heads * seq_q]: lse log2(e), -inf: empty
  const float* d_row = nullptr;   // [batch * num_q_heads * seq_q]: D = dO . O
  const int32_t* kb_lo = nullptr;  // [batch * num_kv_heads * row_blocks]: key blocks
  const int32_t* kb_hi = nullptr;  //   [kb_lo, kb_hi) the row block may attend
  const uint8_t* rows_finite = nullptr;  // same index: Q and dO rows all finite
  std::atomic<int32_t>* turn = nullptr;  // same index: next key block to add dQ
  // dQ accumulation: row (b, h, i) at dq_base + b * s0 + h * s1 + i * s2,
  // unit stride along head_dim (the dq output itself, or a float32 copy).
  float* dq_base = nullptr;
  int64_t dq_stride[3] = {0, 0, 0};
  std::atomic<int64_t> next{0};
};

}  // namespace qkv::internal
#endif  // QKV_SRC_KERNELS_FLASH_BACKWARD_CC_ONCE_

#ifndef HWY_DISABLED_TARGETS
#define HWY_DISABLED_TARGETS (HWY_SSSE3 | HWY_AVX3_DL)
#endif
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/flash_backward.cc"
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
constexpr int64_t kBr = BackwardTraits::kBlockQ;
constexpr int64_t kBc = BackwardTraits::kBlockKV;
static_assert(kBc == kSparseBlock, "a block-sparse tile is one key block");
constexpr float kInf = std::numeric_limits<float>::infinity();
// Micro-tiles: kRows rows (or head_dim columns) x kVecs vectors of key (or
// head_dim) lanes = kRows * kVecs accumulators, plus kVecs loaded vectors
// and one broadcast: 6 x 4 + 4 + 1 = 29 of 32 zmm on AVX-512, 6 x 2 + 2 + 1
// = 15 of 16 registers on AVX2/SSE4 (the forward's tiles, for the same
// reason: enough independent FMA chains to cover 2 ports x 4-5 cycles).
#if HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL
constexpr int kVecs = 4;
#else
constexpr int kVecs = 2;
#endif
constexpr int kRows = 6;

// out[r, lanes] = sum_x a_r[x] * b[x, lanes] for kR rows (pointers a[0..kR))
// and kV vectors; b rows are kBc floats apart, out rows kBc apart. Steps 1
// (Q, K'^T) and 3 (dO, V^T).
template <int kR, int kV>
HWY_INLINE void RowsByKeys(DF df, const float* const* HWY_RESTRICT a, int64_t x_count,
                           const float* HWY_RESTRICT b, float* HWY_RESTRICT out) {
  const size_t nf = hn::Lanes(df);
  VF acc[kR][kV];
  HWY_UNROLL(8) for (int r = 0; r < kR; ++r)
    HWY_UNROLL(8) for (int v = 0; v < kV; ++v) acc[r][v] = hn::Zero(df);
  for (int64_t x = 0; x < x_count; ++x) {
    VF bv[kV];
    HWY_UNROLL(8) for (int v = 0; v < kV; ++v) bv[v] = hn::Load(df, b + x * kBc + v * nf);
    HWY_UNROLL(8) for (int r = 0; r < kR; ++r) {
      const VF av = hn::Set(df, a[r][x]);
      HWY_UNROLL(8) for (int v = 0; v < kV; ++v) acc[r][v] = hn::MulAdd(av, bv[v], acc[r][v]);
    }
  }
  HWY_UNROLL(8) for (int r = 0; r < kR; ++r)
    HWY_UNROLL(8) for (int v = 0; v < kV; ++v) hn::Store(acc[r][v], df, out + r * kBc + v * nf);
}

// acc_t[n, lanes] += sum_{r < rows} a_r[n0 + n] * bt[r, lanes] for kN columns
// and kV vectors (acc_t rows kBc apart). Step 5: dV^T (dO, P), dK^T (Q, dS).
template <int kN, int kV>
HWY_INLINE void ColsByKeys(DF df, const float* const* HWY_RESTRICT a, int64_t rows, int64_t n0,
                           const float* HWY_RESTRICT bt, float* HWY_RESTRICT acc_t) {
  const size_t nf = hn::Lanes(df);
  VF acc[kN][kV];
  HWY_UNROLL(8) for (int n = 0; n < kN; ++n)
    HWY_UNROLL(8) for (int v = 0; v < kV; ++v) acc[n][v] = hn::Load(df, acc_t + n * kBc + v * nf);
  for (int64_t r = 0; r < rows; ++r) {
    VF bv[kV];
    HWY_UNROLL(8) for (int v = 0; v < kV; ++v) bv[v] = hn::Load(df, bt + r * kBc + v * nf);
    const float* ar = a[r] + n0;
    HWY_UNROLL(8) for (int n = 0; n < kN; ++n) {
      const VF av = hn::Set(df, ar[n]);
      HWY_UNROLL(8) for (int v = 0; v < kV; ++v) acc[n][v] = hn::MulAdd(av, bv[v], acc[n][v]);
    }
  }
  HWY_UNROLL(8) for (int n = 0; n < kN; ++n)
    HWY_UNROLL(8) for (int v = 0; v < kV; ++v) hn::Store(acc[n][v], df, acc_t + n * kBc + v * nf);
}

// out[r, lanes] = sum_{c in [c0, c1)} ds[r, c] * k[c, lanes] for kR rows and
// kV vectors of head_dim lanes; k rows dim_pad apart, ds rows kBc apart,
// out rows dim_pad apart. Step 6.
template <int kR, int kV>
HWY_INLINE void DsByK(DF df, const float* HWY_RESTRICT ds, int64_t c0, int64_t c1,
                      const float* HWY_RESTRICT k, int64_t dim_pad, float* HWY_RESTRICT out) {
  const size_t nf = hn::Lanes(df);
  VF acc[kR][kV];
  HWY_UNROLL(8) for (int r = 0; r < kR; ++r)
    HWY_UNROLL(8) for (int v = 0; v < kV; ++v) acc[r][v] = hn::Zero(df);
  for (int64_t c = c0; c < c1; ++c) {
    VF kv[kV];
    HWY_UNROLL(8) for (int v = 0; v < kV; ++v) kv[v] = hn::Load(df, k + c * dim_pad + v * nf);
    HWY_UNROLL(8) for (int r = 0; r < kR; ++r) {
      const VF av = hn::Set(df, ds[r * kBc + c]);
      HWY_UNROLL(8) for (int v = 0; v < kV; ++v) acc[r][v] = hn::MulAdd(av, kv[v], acc[r][v]);
    }
  }
  HWY_UNROLL(8) for (int r = 0; r < kR; ++r)
    HWY_UNROLL(8) for (int v = 0; v < kV; ++v) hn::Store(acc[r][v], df, out + r * dim_pad + v * nf);
}

// Calls f.template operator()<kR, kV>() for run-time nr in [1, kRows] and
// nv in [1, kVecs]: one template instance per micro-tile size, so the
// remainder of a sweep runs an exact-size tile instead of padding.
template <int kV, class F>
HWY_INLINE void WithRows(int64_t nr, const F& f) {
  switch (nr) {
    case 1: f.template operator()<1, kV>(); break;
    case 2: f.template operator()<2, kV>(); break;
    case 3: f.template operator()<3, kV>(); break;
    case 4: f.template operator()<4, kV>(); break;
    case 5: f.template operator()<5, kV>(); break;
    default: f.template operator()<kRows, kV>(); break;
  }
}
template <class F>
HWY_INLINE void WithTile(int64_t nr, int64_t nv, const F& f) {
  if constexpr (kVecs == 4) {
    switch (nv) {
      case 1: WithRows<1>(nr, f); break;
      case 2: WithRows<2>(nr, f); break;
      case 3: WithRows<3>(nr, f); break;
      default: WithRows<4>(nr, f); break;
    }
  } else {
    if (nv == 1) {
      WithRows<1>(nr, f);
    } else {
      WithRows<kVecs>(nr, f);
    }
  }
}

// Runs op(r, v) as templates <kR, kV> over rows (or columns) [0, count) in
// groups of kRows and vectors [v0, v1) in groups of kVecs.
template <class Op>
HWY_INLINE void Sweep(int64_t count, int64_t v0, int64_t v1, const Op& op) {
  for (int64_t v = v0; v < v1; v += kVecs) {
    const int64_t nv = std::min<int64_t>(kVecs, v1 - v);
    for (int64_t r = 0; r < count; r += kRows) {
      WithTile(std::min<int64_t>(kRows, count - r), nv,
               [&]<int kR, int kV>() { op.template operator()<kR, kV>(r, v); });
    }
  }
}

// Pauses between polls of a turn counter; yields the core after a while so
// that more threads than cores still make progress.
HWY_INLINE void SpinPause(int& spins) {
  if (++spins > 64) {
    std::this_thread::yield();
  } else {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }
}

// Prepares row block rb of (b, g): lse2 and D per row, its dQ rows zeroed,
// its structural key-block range and whether its Q and dO rows are finite.
void PrepareRowBlock(const AttentionBackwardParams& p, const Problem& pr, BackwardShared* sh,
                     float* lse2, float* d_row, int32_t* kb_lo, int32_t* kb_hi,
                     uint8_t* rows_finite, int64_t index) {
  const int64_t nq = pr.seq_q, nk = pr.seq_kv, dim = pr.head_dim, dim_v = pr.head_dim_v;
  const int64_t rb = index % sh->row_blocks;
  const int64_t g = index / sh->row_blocks % pr.num_kv_heads;
  const int64_t b = index / (sh->row_blocks * pr.num_kv_heads);
  const int64_t group_rows = pr.group_size * nq;
  const int64_t t0 = rb * kBr, rows = std::min(kBr, group_rows - t0);
  const int64_t base = (b * pr.num_q_heads + g * pr.group_size) * nq + t0;
  const int64_t key_length = p.mask.key_lengths.empty() ? nk : p.mask.key_lengths[b];
  int64_t lo_min = nk, hi_max = 0;
  bool finite = true;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t h = g * pr.group_size + (t0 + r) / nq, i = (t0 + r) % nq;
    const double lse = LoadAsFloat(p.lse.data, p.lse.dtype, p.lse.Offset(b, h, i, 0));
    lse2[base + r] = static_cast<float>(lse * kLog2E);
    double d = 0.0;  // D = dO . O, in double, rounded once
    bool dout_finite = true;
    for (int64_t n = 0; n < dim_v; ++n) {
      const float o = LoadAsFloat(p.out.data, p.out.dtype, p.out.Offset(b, h, i, n));
      const float dout = LoadAsFloat(p.dout.data, p.dout.dtype, p.dout.Offset(b, h, i, n));
      dout_finite &= std::isfinite(dout);
      d += static_cast<double>(dout) * o;
    }
    // A row without keys never reads its D: 0, whatever dout and out hold.
    d_row[base + r] = lse2[base + r] == -kInf ? 0.0f : static_cast<float>(d);
    float* dq = sh->dq_base + b * sh->dq_stride[0] + h * sh->dq_stride[1] + i * sh->dq_stride[2];
    std::fill(dq, dq + dim, 0.0f);
    if (lse2[base + r] == -kInf) continue;  // no allowed key: never read (zeros)
    finite &= dout_finite && std::isfinite(d_row[base + r]) && !std::isnan(lse2[base + r]) &&
              lse2[base + r] != kInf;
    for (int64_t x = 0; x < dim; ++x)
      finite &= std::isfinite(LoadAsFloat(p.q.data, p.q.dtype, p.q.Offset(b, h, i, x)));
    const KeyRange range = RowKeyRange(p.mask, nq, nk, i, key_length);
    if (range.hi > range.lo) lo_min = std::min(lo_min, range.lo), hi_max = std::max(hi_max, range.hi);
  }
  const int64_t at = index;
  const bool any = hi_max > lo_min;
  kb_lo[at] = any ? static_cast<int32_t>(lo_min / kBc) : 0;
  kb_hi[at] = any ? static_cast<int32_t>((hi_max + kBc - 1) / kBc) : 0;
  rows_finite[at] = finite;
  sh->turn[at].store(kb_lo[at], std::memory_order_relaxed);
}

// Fills bias[r, c] for one row: the explicit mask value times log2(e) where
// [lo, hi) allows key j0 + c, else -inf; returns whether any is not -inf.
template <class T>
bool FillBiasRow(const T* mask, int64_t j_stride, int64_t j0, int64_t lo, int64_t hi,
                 float* HWY_RESTRICT bias_row) {
  bool any = false;
  for (int64_t c = 0; c < kBc; ++c) {
    float value = -kInf;
    if (c >= lo && c < hi) {
      const int64_t j = j0 + c;
      if constexpr (std::is_same_v<T, uint8_t>) {
        value = mask[j * j_stride] ? 0.0f : -kInf;
      } else if constexpr (std::is_same_v<T, uint16_t>) {
        value = static_cast<float>(HalfToFloat(mask[j * j_stride]) * kLog2E);
      } else {
        value = static_cast<float>(static_cast<double>(mask[j * j_stride]) * kLog2E);
      }
    }
    any |= value != -kInf;
    bias_row[c] = value;
  }
  return any;
}

// The per-thread tiles of one item, carved from the thread's scratch.
struct Tiles {
  float *k_t, *v_t, *k_rows, *dk_t, *dv_t, *s, *dp, *bias, *dq_part, *q_tile, *do_tile, *v_row;
  const float* zero_row;
  int64_t *row_head, *row_i;
  int32_t *rel_lo, *rel_hi;
  const float** q_ptr;
  const float** do_ptr;
  int64_t dim_pad;
};

// Scalar tile for rows or keys holding inf/NaN: only allowed pairs (in
// range, bias not -inf, score not -inf) are touched, so a non-finite value
// reaches exactly the gradients it touches. Writes dq_part rows [0, rows).
void ScalarTile(const Tiles& t, const Problem& pr, bool has_mask, const float* lse2,
                const float* d_row, int64_t rows, float pr_softcap2) {
  const int64_t dim = pr.head_dim, dim_v = pr.head_dim_v;
  const float scale = static_cast<float>(pr.scale);
  for (int64_t r = 0; r < rows; ++r) {
    float* dq = t.dq_part + r * t.dim_pad;
    std::fill(dq, dq + dim, 0.0f);
    const float* q = t.q_ptr[r];
    const float* dout = t.do_ptr[r];
    for (int64_t c = t.rel_lo[r]; c < t.rel_hi[r]; ++c) {
      const float bias = has_mask ? t.bias[r * kBc + c] : 0.0f;
      if (bias == -kInf) continue;
      float s2 = 0.0f;
      for (int64_t d = 0; d < dim; ++d) s2 += q[d] * t.k_t[d * kBc + c];
      float cap_grad = 1.0f;
      if (pr_softcap2 > 0) {  // as the vector tile: capped score, 1 - tanh^2
        const float th = std::tanh(s2 / pr_softcap2);
        s2 = pr_softcap2 * th;
        cap_grad = 1.0f - th * th;
      }
      s2 += bias;
      if (s2 == -kInf) continue;  // skipped, as in the forward
      const float p = std::exp2(std::min(s2 - lse2[r], 128.0f));
      float dp = 0.0f;
      for (int64_t n = 0; n < dim_v; ++n) dp += dout[n] * t.v_t[n * kBc + c];
      const float ds = scale * cap_grad * (p * (dp - d_row[r]));
      for (int64_t n = 0; n < dim_v; ++n) t.dv_t[n * kBc + c] += p * dout[n];
      for (int64_t d = 0; d < dim; ++d) t.dk_t[d * kBc + c] += ds * q[d];
      for (int64_t d = 0; d < dim; ++d) dq[d] += ds * t.k_rows[c * t.dim_pad + d];
    }
  }
}

// Computes one tile (row block rb of item (b, g, kb)) into dK^T, dV^T and
// dq_part; returns false when the tile has no allowed pair (nothing to add).
bool Tile(const AttentionBackwardParams& p, const Problem& pr, const BackwardShared& sh,
          const Tiles& t, int64_t b, int64_t g, int64_t kb, int64_t rb, bool keys_finite) {
  const DF df;
  const DI di;
  const int64_t nf = static_cast<int64_t>(hn::Lanes(df));
  const int64_t nq = pr.seq_q, nk = pr.seq_kv, dim = pr.head_dim, dim_v = pr.head_dim_v;
  const int64_t j0 = kb * kBc, cols = std::min(kBc, nk - j0);
  const int64_t t0 = rb * kBr, rows = std::min(kBr, pr.group_size * nq - t0);
  const int64_t base = (b * pr.num_q_heads + g * pr.group_size) * nq + t0;
  const float* lse2 = sh.lse2 + base;
  const float* d_row = sh.d_row + base;
  const int64_t key_length = p.mask.key_lengths.empty() ? nk : p.mask.key_lengths[b];
  const TensorView& mask = p.mask.mask;
  const bool has_mask = mask.present();

  // Rows: head, query, key range within the block; the union [c0, c1).
  int64_t c0 = kBc, c1 = 0;
  bool full = !has_mask && cols == kBc;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t h = g * pr.group_size + (t0 + r) / nq, i = (t0 + r) % nq;
    t.row_head[r] = h, t.row_i[r] = i;
    int64_t lo = 0, hi = 0;
    if (lse2[r] != -kInf) {
      const KeyRange range = RowKeyRange(p.mask, nq, nk, i, key_length);
      lo = std::clamp<int64_t>(range.lo - j0, 0, cols);
      hi = std::clamp<int64_t>(range.hi - j0, 0, cols);
      // An absent block-sparse tile is an empty range, as in the forward.
      if (hi <= lo || !BlockPresent(p.mask, b, h, i, kb)) lo = hi = 0;
    }
    t.rel_lo[r] = static_cast<int32_t>(lo), t.rel_hi[r] = static_cast<int32_t>(hi);
    if (hi > lo) c0 = std::min(c0, lo), c1 = std::max(c1, hi);
    full &= lo == 0 && hi == kBc;
  }
  if (c1 <= c0) return false;
  if (has_mask) {
    bool any = false;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t off = mask.Offset(b, t.row_head[r], t.row_i[r], 0), js = mask.strides[3];
      float* row = t.bias + r * kBc;
      const int64_t lo = t.rel_lo[r], hi = t.rel_hi[r];
      switch (mask.dtype) {
        case DType::kBool:
          any |= FillBiasRow(static_cast<const uint8_t*>(mask.data) + off, js, j0, lo, hi, row);
          break;
        case DType::kFloat16:
          any |= FillBiasRow(static_cast<const uint16_t*>(mask.data) + off, js, j0, lo, hi, row);
          break;
        case DType::kFloat64:
          any |= FillBiasRow(static_cast<const double*>(mask.data) + off, js, j0, lo, hi, row);
          break;
        default:
          any |= FillBiasRow(static_cast<const float*>(mask.data) + off, js, j0, lo, hi, row);
          break;
      }
    }
    if (!any) return false;  // every pair masked: skipped
  }
  // Q and dO rows: in place (float32, unit stride along dims) or converted.
  // A row without keys (lse = -inf) reads zeros: it multiplies P = dS = 0
  // in the products, and 0 * 0 keeps whatever its q or dout hold out.
  for (int64_t r = 0; r < rows; ++r) {
    if (lse2[r] == -kInf) {
      t.q_ptr[r] = t.do_ptr[r] = t.zero_row;
      continue;
    }
    const int64_t h = t.row_head[r], i = t.row_i[r];
    const int64_t q_off = p.q.Offset(b, h, i, 0), do_off = p.dout.Offset(b, h, i, 0);
    if (p.q.dtype == DType::kFloat32 && p.q.strides[3] == 1) {
      t.q_ptr[r] = static_cast<const float*>(p.q.data) + q_off;
    } else {
      ConvertRow(p.q.data, p.q.dtype, q_off, p.q.strides[3], dim, t.q_tile + r * dim);
      t.q_ptr[r] = t.q_tile + r * dim;
    }
    if (p.dout.dtype == DType::kFloat32 && p.dout.strides[3] == 1) {
      t.do_ptr[r] = static_cast<const float*>(p.dout.data) + do_off;
    } else {
      ConvertRow(p.dout.data, p.dout.dtype, do_off, p.dout.strides[3], dim_v,
                 t.do_tile + r * dim_v);
      t.do_ptr[r] = t.do_tile + r * dim_v;
    }
  }
  const int64_t rbi = (b * pr.num_kv_heads + g) * sh.row_blocks + rb;
  if (!keys_finite || !sh.rows_finite[rbi]) {
    ScalarTile(t, pr, has_mask, lse2, d_row, rows, static_cast<float>(p.mask.softcap * kLog2E));
    return true;
  }

  const int64_t v0 = c0 / nf, v1 = (c1 + nf - 1) / nf;
  // 1. S2 = Q K'^T;  3. dP = dO V^T  (rows [0, rows), key vectors [v0, v1)).
  Sweep(rows, v0, v1, [&]<int kR, int kV>(int64_t r, int64_t v) {
    RowsByKeys<kR, kV>(df, t.q_ptr + r, dim, t.k_t + v * nf, t.s + r * kBc + v * nf);
  });
  Sweep(rows, v0, v1, [&]<int kR, int kV>(int64_t r, int64_t v) {
    RowsByKeys<kR, kV>(df, t.do_ptr + r, dim_v, t.v_t + v * nf, t.dp + r * kBc + v * nf);
  });
  // 2, 4. P = 2^(S2 + bias2 - lse2), dS = scale P (dP - D); P and dS are 0
  // outside a row's range (ranged) or where the bias is -inf (explicit).
  // The exponent is capped at 128 (2^128 = inf) so that an lse below the
  // row's maximum overflows to inf instead of wrapping the exponent field.
  const VF neg_inf = hn::Set(df, -kInf), cap = hn::Set(df, 128.0f);
  const VF scale = hn::Set(df, static_cast<float>(pr.scale));
  // Soft-capping: the capped score C2 tanh(S2 / C2) (base 2, as the forward)
  // and dS times its derivative 1 - tanh^2 for dK and dQ.
  const float softcap2 = static_cast<float>(p.mask.softcap * kLog2E);
  const VF c2 = hn::Set(df, softcap2), inv_c2 = hn::Set(df, softcap2 > 0 ? 1.0f / softcap2 : 0.0f);
  const VF one = hn::Set(df, 1.0f);
  const auto lane = hn::Iota(di, 0);
  for (int64_t r = 0; r < rows; ++r) {
    const VF l2 = hn::Set(df, lse2[r]), dr = hn::Set(df, d_row[r]);
    const auto lo = hn::Set(di, t.rel_lo[r]), hi = hn::Set(di, t.rel_hi[r]);
    float* s_r = t.s + r * kBc;
    float* dp_r = t.dp + r * kBc;
    for (int64_t v = v0; v < v1; ++v) {
      VF sv = hn::Load(df, s_r + v * nf);
      VF cap_grad = one;
      if (softcap2 > 0) {
        const VF th = TanhViaExp2(df, hn::Mul(sv, inv_c2));
        sv = hn::Mul(c2, th);
        cap_grad = hn::NegMulAdd(th, th, one);
      }
      VF bv = hn::Zero(df);
      if (has_mask) {
        bv = hn::Load(df, t.bias + r * kBc + v * nf);
        sv = hn::Add(sv, bv);
      }
      VF pv = Exp2NonPositive(df, hn::Min(hn::Sub(sv, l2), cap));
      if (has_mask) {
        // Selected, not computed: a row without keys has lse2 = -inf, and
        // -inf - -inf would be NaN.
        pv = hn::IfThenZeroElse(hn::Eq(bv, neg_inf), pv);
      } else if (!full) {
        const auto c = hn::Add(lane, hn::Set(di, static_cast<int32_t>(v * nf)));
        pv = hn::IfThenElseZero(hn::RebindMask(df, hn::AndNot(hn::Lt(c, lo), hn::Lt(c, hi))), pv);
      }
      const VF dsv = hn::Mul(hn::Mul(scale, cap_grad),
                             hn::Mul(pv, hn::Sub(hn::Load(df, dp_r + v * nf), dr)));
      hn::Store(pv, df, s_r + v * nf);
      hn::Store(dsv, df, dp_r + v * nf);
    }
  }
  // 5. dV^T += dO^T P,  dK^T += Q^T dS  (head_dim columns, key vectors).
  Sweep(dim_v, v0, v1, [&]<int kN, int kV>(int64_t n, int64_t v) {
    ColsByKeys<kN, kV>(df, t.do_ptr, rows, n, t.s + v * nf, t.dv_t + n * kBc + v * nf);
  });
  Sweep(dim, v0, v1, [&]<int kN, int kV>(int64_t n, int64_t v) {
    ColsByKeys<kN, kV>(df, t.q_ptr, rows, n, t.dp + v * nf, t.dk_t + n * kBc + v * nf);
  });
  // 6. dQpart = dS K over the keys [c0, c1) (rows, head_dim vectors).
  Sweep(rows, 0, t.dim_pad / nf, [&]<int kR, int kV>(int64_t r, int64_t v) {
    DsByK<kR, kV>(df, t.dp + r * kBc, c0, c1, t.k_rows + v * nf, t.dim_pad,
                  t.dq_part + r * t.dim_pad + v * nf);
  });
  return true;
}

// Runs the whole backward on this thread's share: prepare the row blocks,
// then take items from sh->next until none is left, then (if dQ went to a
// float32 copy) convert it. Called inside an OpenMP parallel region by every
// thread; the worksharing loops split the preparation and conversion.
void BackwardRunThread(const AttentionBackwardParams& p, const Problem& pr, BackwardShared* sh,
                       float* lse2, float* d_row, int32_t* kb_lo, int32_t* kb_hi,
                       uint8_t* rows_finite, uint8_t* buf) {
  const DF df;
  const int64_t nf = static_cast<int64_t>(hn::Lanes(df));
  const int64_t prep = pr.batch * pr.num_kv_heads * sh->row_blocks;
#pragma omp for schedule(static)
  for (int64_t index = 0; index < prep; ++index)
    PrepareRowBlock(p, pr, sh, lse2, d_row, kb_lo, kb_hi, rows_finite, index);
  // (implicit barrier: every row block is prepared before any item starts)

  const BackwardLayout lay = BackwardLayout::For(pr);
  auto f = [&](int64_t off) { return reinterpret_cast<float*>(buf + off); };
  Tiles t;
  t.k_t = f(lay.k_t), t.v_t = f(lay.v_t), t.k_rows = f(lay.k_rows);
  t.dk_t = f(lay.dk_t), t.dv_t = f(lay.dv_t), t.s = f(lay.s), t.dp = f(lay.dp);
  t.bias = f(lay.bias), t.dq_part = f(lay.dq_part), t.q_tile = f(lay.q_tile);
  t.do_tile = f(lay.do_tile), t.v_row = f(lay.v_row);
  std::fill(f(lay.zero_row), f(lay.zero_row) + std::max(pr.head_dim, pr.head_dim_v), 0.0f);
  t.zero_row = f(lay.zero_row);
  t.row_head = reinterpret_cast<int64_t*>(buf + lay.row_meta);
  t.row_i = t.row_head + kBr;
  t.rel_lo = reinterpret_cast<int32_t*>(buf + lay.rel);
  t.rel_hi = t.rel_lo + kBr;
  t.q_ptr = reinterpret_cast<const float**>(buf + lay.row_ptrs);
  t.do_ptr = t.q_ptr + kBr;
  t.dim_pad = lay.dim_pad;

  const int64_t nk = pr.seq_kv, dim = pr.head_dim, dim_v = pr.head_dim_v;
  const int64_t items = pr.batch * pr.num_kv_heads * sh->key_blocks;
  const double scale2 = pr.scale * kLog2E;
  for (int64_t item; (item = sh->next.fetch_add(1, std::memory_order_relaxed)) < items;) {
    const int64_t kb = item % sh->key_blocks;
    const int64_t g = item / sh->key_blocks % pr.num_kv_heads;
    const int64_t b = item / (sh->key_blocks * pr.num_kv_heads);
    const int64_t j0 = kb * kBc, cols = std::min(kBc, nk - j0);
    // Pack K rows (zero-padded to dim_pad), K'^T = scale log2(e) K^T (one
    // rounding of the double product) and V^T; keys past cols are 0.
    bool keys_finite = true;
    for (int64_t c = 0; c < kBc; ++c) {
      float* kr = t.k_rows + c * t.dim_pad;
      float* vr = t.v_row;
      if (c < cols) {
        ConvertRow(p.k.data, p.k.dtype, p.k.Offset(b, g, j0 + c, 0), p.k.strides[3], dim, kr);
        ConvertRow(p.v.data, p.v.dtype, p.v.Offset(b, g, j0 + c, 0), p.v.strides[3], dim_v, vr);
        keys_finite &= RowFinite(kr, dim) && RowFinite(vr, dim_v);
      } else {
        std::fill(kr, kr + dim, 0.0f);
        std::fill(vr, vr + dim_v, 0.0f);
      }
      std::fill(kr + dim, kr + t.dim_pad, 0.0f);
      for (int64_t d = 0; d < dim; ++d) t.k_t[d * kBc + c] = static_cast<float>(scale2 * kr[d]);
      for (int64_t n = 0; n < dim_v; ++n) t.v_t[n * kBc + c] = vr[n];
    }
    std::fill(t.dk_t, t.dk_t + dim * kBc, 0.0f);
    std::fill(t.dv_t, t.dv_t + dim_v * kBc, 0.0f);

    for (int64_t rb = 0; rb < sh->row_blocks; ++rb) {
      const int64_t rbi = (b * pr.num_kv_heads + g) * sh->row_blocks + rb;
      if (kb < sh->kb_lo[rbi] || kb >= sh->kb_hi[rbi]) continue;  // skipped
      const bool add = Tile(p, pr, *sh, t, b, g, kb, rb, keys_finite);
      // dQ += dQpart in key-block order: wait for this block's turn.
      int spins = 0;
      while (sh->turn[rbi].load(std::memory_order_acquire) != kb) SpinPause(spins);
      if (add) {
        const int64_t rows = std::min(kBr, pr.group_size * pr.seq_q - rb * kBr);
        for (int64_t r = 0; r < rows; ++r) {
          float* dq = sh->dq_base + b * sh->dq_stride[0] + t.row_head[r] * sh->dq_stride[1] +
                      t.row_i[r] * sh->dq_stride[2];
          const float* part = t.dq_part + r * t.dim_pad;
          int64_t d = 0;
          for (; d + nf <= dim; d += nf)
            hn::StoreU(hn::Add(hn::LoadU(df, dq + d), hn::Load(df, part + d)), df, dq + d);
          for (; d < dim; ++d) dq[d] += part[d];
        }
      }
      sh->turn[rbi].store(static_cast<int32_t>(kb + 1), std::memory_order_release);
    }
    for (int64_t c = 0; c < cols; ++c) {
      for (int64_t d = 0; d < dim; ++d)
        StoreFromFloat(p.dk.data, p.dk.dtype, p.dk.Offset(b, g, j0 + c, d), t.dk_t[d * kBc + c]);
      for (int64_t n = 0; n < dim_v; ++n)
        StoreFromFloat(p.dv.data, p.dv.dtype, p.dv.Offset(b, g, j0 + c, n), t.dv_t[n * kBc + c]);
    }
  }

  // dq from the float32 copy, when dQ did not accumulate in place.
  if (sh->dq_base != p.dq.data) {
#pragma omp barrier
    const int64_t rows = pr.batch * pr.num_q_heads * pr.seq_q;
#pragma omp for schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
      const int64_t i = row % pr.seq_q, h = row / pr.seq_q % pr.num_q_heads;
      const int64_t b = row / (pr.seq_q * pr.num_q_heads);
      const float* src = sh->dq_base + row * dim;
      for (int64_t d = 0; d < dim; ++d)
        StoreFromFloat(p.dq.data, p.dq.dtype, p.dq.Offset(b, h, i, d), src[d]);
    }
  }
}

}  // namespace qkv::internal::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace qkv::internal {

HWY_EXPORT(BackwardRunThread);

namespace {
// True when dQ can accumulate in the dq output itself.
bool DqInPlace(const AttentionBackwardParams& p) {
  return p.dq.dtype == DType::kFloat32 && p.dq.strides[3] == 1;
}
}  // namespace

int64_t FlashBackwardScratchBytes(const Problem& pr, const AttentionBackwardParams& params) {
  // In double: zero-sized tensors can declare dims near 2^31 each.
  const double rows = 1.0 * pr.batch * pr.num_q_heads * pr.seq_q;
  const double row_blocks = 1.0 * pr.batch * pr.num_kv_heads *
                            std::ceil(1.0 * pr.group_size * pr.seq_q / BackwardTraits::kBlockQ);
  double bytes = 1.0 * BackwardLayout::For(pr).bytes * std::max(pr.threads, 1) + 8.0 * rows +
                 13.0 * row_blocks;
  if (!DqInPlace(params)) bytes += 4.0 * rows * pr.head_dim;
  return bytes >= 9.2e18 ? INT64_MAX : static_cast<int64_t>(bytes);
}

void FlashBackward(const AttentionBackwardParams& params, const Problem& pr) {
  BackwardShared sh;
  sh.row_blocks = (pr.group_size * pr.seq_q + BackwardTraits::kBlockQ - 1) / BackwardTraits::kBlockQ;
  sh.key_blocks = (pr.seq_kv + BackwardTraits::kBlockKV - 1) / BackwardTraits::kBlockKV;
  const int64_t rows = pr.batch * pr.num_q_heads * pr.seq_q;
  const int64_t blocks = pr.batch * pr.num_kv_heads * sh.row_blocks;
  std::vector<float> lse2(static_cast<size_t>(rows)), d_row(static_cast<size_t>(rows));
  std::vector<int32_t> kb_lo(static_cast<size_t>(blocks)), kb_hi(static_cast<size_t>(blocks));
  std::vector<uint8_t> rows_finite(static_cast<size_t>(blocks));
  std::vector<std::atomic<int32_t>> turn(static_cast<size_t>(blocks));
  std::vector<float> dq_copy;
  if (DqInPlace(params)) {
    sh.dq_base = static_cast<float*>(params.dq.data);
    for (int x = 0; x < 3; ++x) sh.dq_stride[x] = params.dq.strides[x];
  } else {
    dq_copy.resize(static_cast<size_t>(rows * pr.head_dim));
    sh.dq_base = dq_copy.data();
    sh.dq_stride[0] = pr.num_q_heads * pr.seq_q * pr.head_dim;
    sh.dq_stride[1] = pr.seq_q * pr.head_dim;
    sh.dq_stride[2] = pr.head_dim;
  }
  sh.lse2 = lse2.data(), sh.d_row = d_row.data();
  sh.kb_lo = kb_lo.data(), sh.kb_hi = kb_hi.data(), sh.rows_finite = rows_finite.data();
  sh.turn = turn.data();
  const int64_t bytes = BackwardLayout::For(pr).bytes;
  (void)FlashSimdTarget();  // resolve the target before the parallel region
  auto* const run = &HWY_DYNAMIC_DISPATCH(BackwardRunThread);
#pragma omp parallel num_threads(std::max(pr.threads, 1))
  {
    auto* buf = static_cast<uint8_t*>(::operator new(bytes, std::align_val_t{64}));
    run(params, pr, &sh, lse2.data(), d_row.data(), kb_lo.data(), kb_hi.data(),
        rows_finite.data(), buf);
    ::operator delete(buf, std::align_val_t{64});
  }
}

}  // namespace qkv::internal
#endif  // HWY_ONCE
