// Quantised weight products (qkv/models/quant.h).
//
// Dot path (x with fewer than kQuantGemmMinRows rows: decoding). For each
// output row r and x row i: one pass over W's row r, block by block, read in
// place. Q4_1: the 16 bytes of nibbles are split into low (values 0-15) and
// high (16-31) halves, widened u8 -> i32 -> float in registers, multiplied
// with x and summed into a per-block vector t; then acc += d * t, and the
// block's offset term m * sum(x_block) is added from x's block sums (computed
// once per x row). Q8_0 the same without the offset. Vectors are capped at
// 16 floats (one block half). Traffic: W once per call (row_bytes * rows:
// 20 / 32 bytes per weight for Q4_1), x from L1. Decoding SmolLM2 reads its
// ~85 MB of Q4_1 weights once per token this way.
//
// GEMM path (prefill): W's rows are dequantised kQuantTile at a time into a
// float32 tile (per thread) and y[:, tile] = x tile^T is one serial SGEMM
// (OpenBLAS, src/models/blas.cc): dequantisation costs cols operations per
// weight against 2 * m flops of the product.
//
// Threads take whole tiles of W's rows (static schedule); a tile's outputs
// are computed by the same serial code whatever the thread count, so results
// are bitwise identical for any num_threads.
#include "qkv/models/quant.h"

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "models/blas.h"
#include "qkv/error.h"
#include "qkv/gguf.h"
#include "qkv/tensor.h"
#include "validate.h"

#ifndef QKV_SRC_MODELS_QUANT_CC_ONCE_
#define QKV_SRC_MODELS_QUANT_CC_ONCE_
namespace qkv::models::quant_internal {

constexpr int64_t kBlock = 32;        // values per Q8_0 / Q4_1 block
constexpr int64_t kQ8_0Bytes = 34;    // f16 d, int8 q[32]
constexpr int64_t kQ4_1Bytes = 20;    // f16 d, f16 m, uint8 qs[16]

inline float LoadHalf(const unsigned char* p) {
  uint16_t bits;
  std::memcpy(&bits, p, sizeof(bits));
  return HalfToFloat(bits);
}

}  // namespace qkv::models::quant_internal
#endif  // QKV_SRC_MODELS_QUANT_CC_ONCE_

#ifndef HWY_DISABLED_TARGETS
#define HWY_DISABLED_TARGETS (HWY_SSSE3 | HWY_AVX3_DL)
#endif
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "models/quant.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace qkv::models::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
namespace {

using quant_internal::kBlock;
using quant_internal::kQ4_1Bytes;
using quant_internal::kQ8_0Bytes;
// At most 16 lanes: one vector covers half a block.
using DF = hn::CappedTag<float, 16>;
using DI = hn::RebindToSigned<DF>;
using VF = hn::Vec<DF>;

// One float16 scale, converted in registers (F16C on AVX2 / AVX3): a call
// to qkv::HalfToFloat per block was ~60% of a SmolLM2 decode step.
HWY_INLINE float LoadHalf(const unsigned char* p) {
  const hn::CappedTag<hwy::float16_t, 1> dh;
  const hn::CappedTag<float, 1> d1;
  return hn::GetLane(hn::PromoteTo(d1, hn::LoadU(dh, reinterpret_cast<const hwy::float16_t*>(p))));
}

// A float16 scale broadcast to every lane: one 16-bit broadcast and one
// conversion (F16C), instead of a scalar conversion and a float broadcast.
HWY_INLINE VF BroadcastHalf(const unsigned char* p) {
  const DF df;
  const hn::Rebind<hwy::float16_t, DF> dh;
  const hn::RebindToUnsigned<decltype(dh)> du16;
  uint16_t bits;
  std::memcpy(&bits, p, sizeof(bits));
  return hn::PromoteTo(df, hn::BitCast(dh, hn::Set(du16, bits)));
}

float DotF32(const float* HWY_RESTRICT w, const float* HWY_RESTRICT x, int64_t n) {
  const DF df;
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  VF acc = hn::Zero(df);
  int64_t j = 0;
  for (; j + N <= n; j += N) acc = hn::MulAdd(hn::LoadU(df, w + j), hn::LoadU(df, x + j), acc);
  float sum = hn::GetLane(hn::SumOfLanes(df, acc));
  for (; j < n; ++j) sum += w[j] * x[j];
  return sum;
}

float DotF16(const unsigned char* HWY_RESTRICT w, const float* HWY_RESTRICT x, int64_t n) {
  const DF df;
  const hn::Rebind<hwy::float16_t, DF> dh;
  const auto* wh = reinterpret_cast<const hwy::float16_t*>(w);
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  VF acc = hn::Zero(df);
  int64_t j = 0;
  for (; j + N <= n; j += N) {
    acc = hn::MulAdd(hn::PromoteTo(df, hn::LoadU(dh, wh + j)), hn::LoadU(df, x + j), acc);
  }
  float sum = hn::GetLane(hn::SumOfLanes(df, acc));
  for (; j < n; ++j) sum += LoadHalf(w + 2 * j) * x[j];
  return sum;
}

float DotQ8_0(const unsigned char* HWY_RESTRICT w, const float* HWY_RESTRICT x, int64_t blocks) {
  const DF df;
  const DI di;
  const hn::Rebind<int8_t, DI> d8;
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  VF acc = hn::Zero(df);
  for (int64_t b = 0; b < blocks; ++b) {
    const unsigned char* blk = w + b * kQ8_0Bytes;
    const auto* q = reinterpret_cast<const int8_t*>(blk + 2);
    const float* xb = x + b * kBlock;
    VF t = hn::Zero(df);
    for (int64_t j = 0; j < kBlock; j += N) {
      const VF qf = hn::ConvertTo(df, hn::PromoteTo(di, hn::LoadU(d8, q + j)));
      t = hn::MulAdd(qf, hn::LoadU(df, xb + j), t);
    }
    acc = hn::MulAdd(BroadcastHalf(blk), t, acc);
  }
  return hn::GetLane(hn::SumOfLanes(df, acc));
}

// One Q4_1 block's sum_j q_j x_j as a vector (summed later).
HWY_INLINE VF BlockQ4_1(const unsigned char* HWY_RESTRICT blk, const float* HWY_RESTRICT xb) {
  const DF df;
  const DI di;
  const hn::Rebind<uint8_t, DI> du8;
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  const auto low_mask = hn::Set(du8, uint8_t{0x0F});
  VF t = hn::Zero(df);
  for (int64_t j = 0; j < kBlock / 2; j += N) {
    const auto v = hn::LoadU(du8, blk + 4 + j);
    const VF lo = hn::ConvertTo(df, hn::PromoteTo(di, hn::And(v, low_mask)));
    const VF hi = hn::ConvertTo(df, hn::PromoteTo(di, hn::ShiftRight<4>(v)));
    t = hn::MulAdd(lo, hn::LoadU(df, xb + j), t);
    t = hn::MulAdd(hi, hn::LoadU(df, xb + kBlock / 2 + j), t);
  }
  return t;
}

// Two blocks per iteration into two accumulators (and two offset sums):
// one dependency chain per block made the first version latency-bound.
// Together with BroadcastHalf: SmolLM2 decode, 1 thread, Sapphire Rapids,
// 7.7-8.5 -> 8.3-9.6 G weights/s on [1536, 576] Q4_1 (noisy VM, +5-15 %).
float DotQ4_1(const unsigned char* HWY_RESTRICT w, const float* HWY_RESTRICT x,
              const float* HWY_RESTRICT xsum, int64_t blocks) {
  const DF df;
  VF acc0 = hn::Zero(df), acc1 = hn::Zero(df);
  float off0 = 0.0f, off1 = 0.0f;
  int64_t b = 0;
  for (; b + 2 <= blocks; b += 2) {
    const unsigned char* blk = w + b * kQ4_1Bytes;
    const VF t0 = BlockQ4_1(blk, x + b * kBlock);
    const VF t1 = BlockQ4_1(blk + kQ4_1Bytes, x + (b + 1) * kBlock);
    acc0 = hn::MulAdd(BroadcastHalf(blk), t0, acc0);
    acc1 = hn::MulAdd(BroadcastHalf(blk + kQ4_1Bytes), t1, acc1);
    off0 += LoadHalf(blk + 2) * xsum[b];
    off1 += LoadHalf(blk + kQ4_1Bytes + 2) * xsum[b + 1];
  }
  if (b < blocks) {
    const unsigned char* blk = w + b * kQ4_1Bytes;
    acc0 = hn::MulAdd(BroadcastHalf(blk), BlockQ4_1(blk, x + b * kBlock), acc0);
    off0 += LoadHalf(blk + 2) * xsum[b];
  }
  return hn::GetLane(hn::SumOfLanes(df, hn::Add(acc0, acc1))) + (off0 + off1);
}

}  // namespace

// y[i * y_stride + r] for r in [r0, r1) and i < m: dot products of x's rows
// (x_stride apart; xsum: their per-block sums, for Q4_1) with W's rows.
void DotRows(const QuantWeight& w, const float* x, int64_t m, const float* xsum, int64_t r0,
             int64_t r1, float* y) {
  const int64_t blocks = w.cols / kBlock;
  for (int64_t r = r0; r < r1; ++r) {
    const unsigned char* row = w.data + r * w.row_bytes;
    for (int64_t i = 0; i < m; ++i) {
      const float* xi = x + i * w.cols;
      float v = 0.0f;
      switch (static_cast<GgmlType>(w.type)) {
        case GgmlType::kF32: v = DotF32(reinterpret_cast<const float*>(row), xi, w.cols); break;
        case GgmlType::kF16: v = DotF16(row, xi, w.cols); break;
        case GgmlType::kQ8_0: v = DotQ8_0(row, xi, blocks); break;
        case GgmlType::kQ4_1: v = DotQ4_1(row, xi, xsum + i * blocks, blocks); break;
        default: break;  // excluded by MakeQuantWeight
      }
      y[i * w.rows + r] = v;
    }
  }
}

const char* TargetName() { return hwy::TargetName(HWY_TARGET); }

}  // namespace qkv::models::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace qkv::models {

HWY_EXPORT(DotRows);
HWY_EXPORT(TargetName);

using quant_internal::kBlock;
using quant_internal::kQ4_1Bytes;
using quant_internal::kQ8_0Bytes;
using quant_internal::LoadHalf;

QuantWeight MakeQuantWeight(uint32_t type, int64_t rows, int64_t cols,
                            std::span<const unsigned char> bytes, const std::string& name) {
  int64_t block_values = 1, block_bytes = 4;
  switch (static_cast<GgmlType>(type)) {
    case GgmlType::kF32: break;
    case GgmlType::kF16: block_bytes = 2; break;
    case GgmlType::kQ8_0: block_values = kBlock; block_bytes = kQ8_0Bytes; break;
    case GgmlType::kQ4_1: block_values = kBlock; block_bytes = kQ4_1Bytes; break;
    default:
      throw Error(name + ": type " + GgmlTypeName(type) + " (expected F32, F16, Q8_0 or Q4_1)");
  }
  if (rows < 1 || cols < 1 || cols % block_values != 0 || rows > (int64_t{1} << 40) ||
      cols > (int64_t{1} << 40)) {
    throw Error(name + ": shape [" + std::to_string(rows) + ", " + std::to_string(cols) +
                "] (expected positive, columns a multiple of " + std::to_string(block_values) +
                " for " + GgmlTypeName(type) + ")");
  }
  const int64_t row_bytes = cols / block_values * block_bytes;
  if (static_cast<uint64_t>(rows) * static_cast<uint64_t>(row_bytes) != bytes.size()) {
    throw Error(name + ": " + std::to_string(bytes.size()) + " bytes (expected " +
                std::to_string(rows * row_bytes) + " for [" + std::to_string(rows) + ", " +
                std::to_string(cols) + "] " + GgmlTypeName(type) + ")");
  }
  return QuantWeight{type, rows, cols, row_bytes, bytes.data()};
}

void DequantizeRows(const QuantWeight& w, int64_t row0, int64_t count, float* out) {
  const int64_t blocks = w.cols / kBlock;
  for (int64_t i = 0; i < count; ++i) {
    const unsigned char* row = w.data + (row0 + i) * w.row_bytes;
    float* o = out + i * w.cols;
    switch (static_cast<GgmlType>(w.type)) {
      case GgmlType::kF32: std::memcpy(o, row, static_cast<size_t>(w.cols) * 4); break;
      case GgmlType::kF16:
        for (int64_t j = 0; j < w.cols; ++j) o[j] = LoadHalf(row + 2 * j);
        break;
      case GgmlType::kQ8_0:
        for (int64_t b = 0; b < blocks; ++b) {
          const unsigned char* blk = row + b * kQ8_0Bytes;
          const float d = LoadHalf(blk);
          for (int64_t j = 0; j < kBlock; ++j) {
            o[b * kBlock + j] = d * static_cast<float>(static_cast<int8_t>(blk[2 + j]));
          }
        }
        break;
      case GgmlType::kQ4_1:
        for (int64_t b = 0; b < blocks; ++b) {
          const unsigned char* blk = row + b * kQ4_1Bytes;
          const float d = LoadHalf(blk), m = LoadHalf(blk + 2);
          for (int64_t j = 0; j < kBlock / 2; ++j) {
            o[b * kBlock + j] = d * static_cast<float>(blk[4 + j] & 0x0F) + m;
            o[b * kBlock + kBlock / 2 + j] = d * static_cast<float>(blk[4 + j] >> 4) + m;
          }
        }
        break;
      default: break;
    }
  }
}

void QuantLinear(const float* x, int64_t m, const QuantWeight& w, float* y, int num_threads) {
  if (m <= 0 || w.rows <= 0) return;
  const int threads = qkv::internal::ResolveThreads(num_threads);
  const int64_t tiles = (w.rows + kQuantTile - 1) / kQuantTile;
  const int team = static_cast<int>(std::min<int64_t>(threads, tiles));
  if (m < kQuantGemmMinRows) {
    std::vector<float> xsum;
    if (static_cast<GgmlType>(w.type) == GgmlType::kQ4_1) {
      const int64_t blocks = w.cols / kBlock;
      xsum.assign(static_cast<size_t>(m * blocks), 0.0f);
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t b = 0; b < blocks; ++b) {
          float s = 0.0f;
          for (int64_t j = 0; j < kBlock; ++j) s += x[i * w.cols + b * kBlock + j];
          xsum[static_cast<size_t>(i * blocks + b)] = s;
        }
      }
    }
#pragma omp parallel for num_threads(team) schedule(static) if (team > 1)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t r0 = t * kQuantTile, r1 = std::min(w.rows, r0 + kQuantTile);
      HWY_DYNAMIC_DISPATCH(DotRows)(w, x, m, xsum.data(), r0, r1, y);
    }
    return;
  }
  const auto sgemm = internal::LoadBlas().sgemm;
#pragma omp parallel num_threads(team)
  {
    // Serial SGEMM inside the team, as Linear (layers.cc) does.
    omp_set_num_threads(1);
    std::vector<float> tile(static_cast<size_t>(kQuantTile * w.cols));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t r0 = t * kQuantTile, n = std::min(kQuantTile, w.rows - r0);
      DequantizeRows(w, r0, n, tile.data());
      sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(m), static_cast<int>(n),
            static_cast<int>(w.cols), 1.0f, x, static_cast<int>(w.cols), tile.data(),
            static_cast<int>(w.cols), 0.0f, y + r0, static_cast<int>(w.rows));
    }
  }
}

const char* QuantSimdTarget() { return HWY_DYNAMIC_DISPATCH(TargetName)(); }

}  // namespace qkv::models
#endif  // HWY_ONCE
