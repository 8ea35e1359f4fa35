// Quantised weights (qkv/models/quant.h): dequantisation bit for bit as the
// formats define it, and QuantLinear (both paths) against a float64 oracle
// on the dequantised values, with a bound derived from float32 rounding;
// results bitwise identical for any thread count.
#include "qkv/models/quant.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "qkv/error.h"
#include "qkv/gguf.h"
#include "qkv/tensor.h"

namespace qkv::models {
namespace {

using ::testing::HasSubstr;

void PutHalf(unsigned char* p, float v) {
  const uint16_t bits = FloatToHalf(v);
  std::memcpy(p, &bits, 2);
}

float GetHalf(const unsigned char* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return HalfToFloat(bits);
}

int64_t BlockBytes(GgmlType t) {
  switch (t) {
    case GgmlType::kF32: return 4;
    case GgmlType::kF16: return 2;
    case GgmlType::kQ8_0: return 34;
    case GgmlType::kQ4_1: return 20;
    default: return 0;
  }
}

int64_t BlockValues(GgmlType t) {
  return t == GgmlType::kQ8_0 || t == GgmlType::kQ4_1 ? 32 : 1;
}

// Random bytes of a [rows, cols] weight: scales in the range of real models'
// (d ~ 1e-3..1e-1, m ~ -d*8), all nibble / int8 values.
std::vector<unsigned char> RandomWeight(GgmlType t, int64_t rows, int64_t cols, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> scale(1e-3f, 0.1f), unit(-1.0f, 1.0f);
  std::uniform_int_distribution<int> byte(0, 255);
  const int64_t blocks = rows * cols / BlockValues(t);
  std::vector<unsigned char> bytes(static_cast<size_t>(blocks * BlockBytes(t)));
  for (int64_t b = 0; b < blocks; ++b) {
    unsigned char* p = bytes.data() + b * BlockBytes(t);
    switch (t) {
      case GgmlType::kF32: {
        const float v = unit(rng);
        std::memcpy(p, &v, 4);
        break;
      }
      case GgmlType::kF16: PutHalf(p, unit(rng)); break;
      case GgmlType::kQ8_0:
        PutHalf(p, scale(rng));
        for (int j = 0; j < 32; ++j) p[2 + j] = static_cast<unsigned char>(byte(rng));
        break;
      case GgmlType::kQ4_1: {
        const float d = scale(rng);
        PutHalf(p, d);
        PutHalf(p + 2, -8.0f * d * (1.0f + 0.1f * unit(rng)));
        for (int j = 0; j < 16; ++j) p[4 + j] = static_cast<unsigned char>(byte(rng));
        break;
      }
      default: break;
    }
  }
  return bytes;
}

QuantWeight Make(GgmlType t, int64_t rows, int64_t cols, const std::vector<unsigned char>& bytes) {
  return MakeQuantWeight(static_cast<uint32_t>(t), rows, cols, bytes, "w");
}

TEST(QuantTest, DequantisesAsTheFormatsDefine) {
  for (GgmlType t : {GgmlType::kF32, GgmlType::kF16, GgmlType::kQ8_0, GgmlType::kQ4_1}) {
    const int64_t rows = 3, cols = 96;
    const auto bytes = RandomWeight(t, rows, cols, 7);
    const QuantWeight w = Make(t, rows, cols, bytes);
    std::vector<float> got(static_cast<size_t>(rows * cols));
    DequantizeRows(w, 0, rows, got.data());
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < cols; ++j) {
        const unsigned char* row = bytes.data() + r * w.row_bytes;
        const float g = got[static_cast<size_t>(r * cols + j)];
        float want = 0;
        switch (t) {
          case GgmlType::kF32: std::memcpy(&want, row + 4 * j, 4); break;
          case GgmlType::kF16: want = GetHalf(row + 2 * j); break;
          case GgmlType::kQ8_0: {
            const unsigned char* blk = row + (j / 32) * 34;
            want = GetHalf(blk) * static_cast<float>(static_cast<int8_t>(blk[2 + j % 32]));
            break;
          }
          case GgmlType::kQ4_1: {
            // Low nibbles are values 0-15 of the block, high nibbles 16-31.
            const unsigned char* blk = row + (j / 32) * 20;
            const int64_t i = j % 32;
            const int q = i < 16 ? (blk[4 + i] & 15) : (blk[4 + i - 16] >> 4);
            const double exact = static_cast<double>(GetHalf(blk)) * q + GetHalf(blk + 2);
            const float two_roundings = GetHalf(blk) * static_cast<float>(q);
            // d * q + m in float32: one product and one sum (or one fused
            // rounding where the compiler contracts them).
            want = two_roundings + GetHalf(blk + 2);
            if (g != want) want = static_cast<float>(exact);
            break;
          }
          default: break;
        }
        ASSERT_EQ(g, want) << GgmlTypeName(static_cast<uint32_t>(t)) << " row " << r << " col " << j;
      }
    }
  }
}

// y against sum_j x_j w_j in double over the dequantised w. A float32 dot of
// n terms is within gamma_n sum |x_j w_j| (gamma_n = n u / (1 - n u), u =
// 2^-24); the blocked sums here add at most 64 more roundings per term
// (block sum, scale product, offset term over the block sum of x), so the
// bound used is (cols + 64) u sum_j (|d q_j| + |m|) |x_j| with margin 2.
TEST(QuantTest, LinearMatchesFloat64OracleOnBothPaths) {
  for (GgmlType t : {GgmlType::kF32, GgmlType::kF16, GgmlType::kQ8_0, GgmlType::kQ4_1}) {
    for (int64_t cols : {32, 96, 576, 1536}) {
      for (int64_t rows : {1, 7, 97, 129}) {
        const auto bytes = RandomWeight(t, rows, cols, static_cast<uint64_t>(cols * 1000 + rows));
        const QuantWeight w = Make(t, rows, cols, bytes);
        std::vector<float> deq(static_cast<size_t>(rows * cols));
        DequantizeRows(w, 0, rows, deq.data());
        for (int64_t m : {1, 3, 7, 8, 33}) {
          std::mt19937_64 rng(static_cast<uint64_t>(m));
          std::normal_distribution<float> normal(0.0f, 1.0f);
          std::vector<float> x(static_cast<size_t>(m * cols));
          for (float& v : x) v = normal(rng);
          std::vector<float> y(static_cast<size_t>(m * rows), NAN);
          QuantLinear(x.data(), m, w, y.data(), 2);
          for (int64_t i = 0; i < m; ++i) {
            for (int64_t r = 0; r < rows; ++r) {
              double exact = 0, mag = 0;
              for (int64_t j = 0; j < cols; ++j) {
                const double xv = x[static_cast<size_t>(i * cols + j)];
                const double wv = deq[static_cast<size_t>(r * cols + j)];
                exact += xv * wv;
                double wmag = std::fabs(wv);
                if (t == GgmlType::kQ4_1) {
                  const unsigned char* blk = bytes.data() + r * w.row_bytes + (j / 32) * 20;
                  wmag = std::fabs(wv - GetHalf(blk + 2)) + std::fabs(GetHalf(blk + 2));
                }
                mag += wmag * std::fabs(xv);
              }
              const double bound = 2.0 * static_cast<double>(cols + 64) * 0x1p-24 * mag + 1e-30;
              const double got = y[static_cast<size_t>(i * rows + r)];
              ASSERT_LE(std::fabs(got - exact), bound)
                  << GgmlTypeName(static_cast<uint32_t>(t)) << " cols " << cols << " rows " << rows
                  << " m " << m << " (" << (m < kQuantGemmMinRows ? "dot" : "gemm") << " path)";
            }
          }
        }
      }
    }
  }
}

TEST(QuantTest, LinearIsBitwiseIdenticalForAnyThreadCount) {
  for (GgmlType t : {GgmlType::kQ8_0, GgmlType::kQ4_1}) {
    const int64_t rows = 1536, cols = 576;
    const auto bytes = RandomWeight(t, rows, cols, 3);
    const QuantWeight w = Make(t, rows, cols, bytes);
    for (int64_t m : {1, 2, 16, 300}) {
      std::mt19937_64 rng(11);
      std::normal_distribution<float> normal(0.0f, 1.0f);
      std::vector<float> x(static_cast<size_t>(m * cols));
      for (float& v : x) v = normal(rng);
      std::vector<float> one(static_cast<size_t>(m * rows)), many(one.size());
      QuantLinear(x.data(), m, w, one.data(), 1);
      for (int threads : {2, 3, 7}) {
        QuantLinear(x.data(), m, w, many.data(), threads);
        ASSERT_EQ(0, std::memcmp(one.data(), many.data(), one.size() * sizeof(float)))
            << GgmlTypeName(static_cast<uint32_t>(t)) << " m " << m << " threads " << threads;
      }
    }
  }
}

TEST(QuantTest, RefusesUnsupportedTypesAndWrongSizes) {
  std::vector<unsigned char> bytes(20 * 4);
  try {
    MakeQuantWeight(static_cast<uint32_t>(GgmlType::kQ5_K), 1, 256, bytes, "blk.0.attn_q.weight");
    FAIL() << "Q5_K accepted";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("blk.0.attn_q.weight: type Q5_K (expected F32, F16, Q8_0 or Q4_1)"));
  }
  try {
    MakeQuantWeight(static_cast<uint32_t>(GgmlType::kQ4_1), 1, 48, bytes, "w");
    FAIL() << "48 columns of Q4_1 accepted";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("a multiple of 32"));
  }
  try {
    MakeQuantWeight(static_cast<uint32_t>(GgmlType::kQ4_1), 3, 32, bytes, "w");
    FAIL() << "80 bytes for 3 Q4_1 rows accepted";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("80 bytes (expected 60"));
  }
}

}  // namespace
}  // namespace qkv::models
