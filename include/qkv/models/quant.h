// qkv/models/quant.h: weight matrices stored as ggml blocks (GGUF files),
// used where they lie in the mapped file, never copied whole to float32.
//
// A QuantWeight is [rows, cols] row-major: row r is cols / block_values
// consecutive blocks. Formats (ggml's definitions; d and m are IEEE float16):
//   F32   one float per value
//   F16   one float16 per value
//   Q8_0  32 values per 34-byte block {d, int8 q[32]}: value_j = d * q_j
//   Q4_1  32 values per 20-byte block {d, m, uint8 qs[16]}: value_j = d * q_j + m
//         with q_j = qs[j] & 15 for j < 16 and qs[j - 16] >> 4 for j >= 16
// Dequantised values are computed in float32 exactly as written (one
// product, then one sum for Q4_1), as ggml's dequantize_row_* does.
//
// QuantLinear computes y = x W^T. For a few rows of x (decoding) each output
// is a dot product over the blocks read directly, Highway SIMD: for Q4_1,
// sum_b (d_b * sum_j q_j x_j + m_b * sum_j x_j), with sum_j x_j per block
// computed once per x row. For many rows (prefill) W is dequantised kQuantTile
// rows at a time into a float32 tile and multiplied with OpenBLAS's SGEMM.
// Outputs are split between threads by fixed tiles of W's rows, each computed
// by the same serial code whatever the thread count: results are bitwise
// identical for any num_threads (they may differ between the two paths and
// between SIMD targets).
#ifndef QKV_MODELS_QUANT_H_
#define QKV_MODELS_QUANT_H_

#include <cstdint>
#include <span>
#include <string>

namespace qkv::models {

// x rows from which QuantLinear uses SGEMM on dequantised tiles.
inline constexpr int64_t kQuantGemmMinRows = 8;
// W rows per dequantised tile (64 x 576 floats = 144 KiB, in L2).
inline constexpr int64_t kQuantTile = 64;

struct QuantWeight {
  uint32_t type = 0;  // a qkv::GgmlType value: F32, F16, Q8_0 or Q4_1
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t row_bytes = 0;
  const unsigned char* data = nullptr;
};

// Checks that `type` is one of the four formats above, cols is a multiple of
// its block and bytes.size() == rows * row_bytes; throws qkv::Error naming
// `name` ("blk.0.attn_q.weight: type Q5_K (expected F32, F16, Q8_0 or Q4_1)").
QuantWeight MakeQuantWeight(uint32_t type, int64_t rows, int64_t cols,
                            std::span<const unsigned char> bytes, const std::string& name);

// out[i * cols + j] = value j of row row0 + i, for i < count.
void DequantizeRows(const QuantWeight& w, int64_t row0, int64_t count, float* out);

// y[i, r] = sum_j x[i, j] * W[r, j] for i < m, r < w.rows: x [m, cols],
// y [m, rows] (must not overlap x). num_threads 0: OpenMP's default.
void QuantLinear(const float* x, int64_t m, const QuantWeight& w, float* y, int num_threads);

// The SIMD target the dot-product path runs on, e.g. "AVX3".
const char* QuantSimdTarget();

}  // namespace qkv::models

#endif  // QKV_MODELS_QUANT_H_
