// Dense layers on OpenBLAS (qkv/models/layers.h).
//
// Linear: y = x . W^T + b as cblas_sgemm(RowMajor, NoTrans, Trans) per block
// (OpenBLAS, loaded on first use: src/models/blas.cc)
// of kLinearRowBlock rows; the blocks are spread over OpenMP threads, and
// OpenBLAS's OpenMP build runs single-threaded inside a parallel region, so
// each block is one serial SGEMM whatever the thread count (bitwise
// identical results for any thread count). Each call packs W (in * out
// floats) once for 128 rows: packing is 1/128 of the block's flops.
// Traffic per block: x block (128 * in), W (out * in, from L2/L3 for BERT
// sizes), y block (128 * out).
//
// AddLayerNorm and GeluErf are elementwise passes. GeluErf's erf is glibc's
// vector libm (libmvec, glibc >= 2.35: _ZGVdN8v_erff on AVX2, _ZGVbN4v_erff
// otherwise), every element through the same vector function, tails through
// a padded buffer, so a value's result never depends on its position or on
// the thread split. Scalar std::erf was 1.3 s of 8.5 s embedding 200
// sentences with MiniLM on one Zen 1 core; the vector one is ~10x faster.
#include "qkv/models/layers.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <mutex>

#if defined(__x86_64__) && defined(__GLIBC__) && \
    (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 35))
#include <immintrin.h>
#define QKV_LIBMVEC 1
// libmvec: erff on 4 floats (SSE ABI) and on 8 floats (AVX2 ABI).
extern "C" __m128 _ZGVbN4v_erff(__m128);
extern "C" __attribute__((target("avx2,fma"))) __m256 _ZGVdN8v_erff(__m256);
#endif

#include "models/blas.h"
#include "validate.h"

namespace qkv::models {

void Linear(const float* x, int64_t rows, int64_t in, const float* w, const float* bias,
            int64_t out, float* y, int num_threads) {
  if (rows <= 0 || out <= 0) return;
  const auto sgemm = internal::LoadBlas().sgemm;
  const int threads = qkv::internal::ResolveThreads(num_threads);
  const int64_t blocks = (rows + kLinearRowBlock - 1) / kLinearRowBlock;
#pragma omp parallel num_threads(static_cast <int>(std::min <int64_t>(threads, blocks)))
  {
    // OpenBLAS's OpenMP build sizes its own team by omp_get_max_threads():
    // 1 in this task (and only in it), so every call is serial, also when
    // the team above has a single thread and OMP_NUM_THREADS says more.
    omp_set_num_threads(1);
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t m0 = blk * kLinearRowBlock, m = std::min(kLinearRowBlock, rows - m0);
      float* yb = y + m0 * out;
      float beta = 0.0f;
      if (bias != nullptr) {
        for (int64_t r = 0; r < m; ++r) std::copy(bias, bias + out, yb + r * out);
        beta = 1.0f;
      } else if (in == 0) {
        std::fill(yb, yb + m * out, 0.0f);
      }
      if (in == 0) continue;
      sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(m),
                  static_cast<int>(out), static_cast<int>(in), 1.0f, x + m0 * in,
                  static_cast<int>(in), w, static_cast<int>(in), beta, yb, static_cast<int>(out));
    }
  }
}

void AddLayerNorm(float* x, const float* residual, int64_t rows, int64_t features,
                  const float* gamma, const float* beta, float eps, int num_threads) {
  const int threads = qkv::internal::ResolveThreads(num_threads);
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * features > 65536)
  for (int64_t r = 0; r < rows; ++r) {
    float* row = x + r * features;
    if (residual != nullptr) {
      const float* res = residual + r * features;
      for (int64_t f = 0; f < features; ++f) row[f] += res[f];
    }
    double sum = 0.0;
    for (int64_t f = 0; f < features; ++f) sum += row[f];
    const double mean = features > 0 ? sum / static_cast<double>(features) : 0.0;
    double sq = 0.0;
    for (int64_t f = 0; f < features; ++f) {
      const double d = row[f] - mean;
      sq += d * d;
    }
    const double var = features > 0 ? sq / static_cast<double>(features) : 0.0;
    const double inv = 1.0 / std::sqrt(var + static_cast<double>(eps));
    for (int64_t f = 0; f < features; ++f) {
      row[f] = static_cast<float>((row[f] - mean) * inv) * gamma[f] + beta[f];
    }
  }
}

namespace {

constexpr float kRsqrt2 = 0.70710678118654752f;

#ifdef QKV_LIBMVEC
__attribute__((target("avx2,fma"))) void Gelu8(float* p) {
  const __m256 v = _mm256_loadu_ps(p);
  const __m256 e = _ZGVdN8v_erff(_mm256_mul_ps(v, _mm256_set1_ps(kRsqrt2)));
  _mm256_storeu_ps(p, _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), v),
                                    _mm256_add_ps(_mm256_set1_ps(1.0f), e)));
}

__attribute__((target("avx2,fma"))) void GeluAvx2(float* x, int64_t count) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) Gelu8(x + i);
  if (i < count) {
    float tail[8] = {};
    std::copy(x + i, x + count, tail);
    Gelu8(tail);
    std::copy(tail, tail + (count - i), x + i);
  }
}

void Gelu4(float* p) {
  const __m128 v = _mm_loadu_ps(p);
  const __m128 e = _ZGVbN4v_erff(_mm_mul_ps(v, _mm_set1_ps(kRsqrt2)));
  _mm_storeu_ps(p, _mm_mul_ps(_mm_mul_ps(_mm_set1_ps(0.5f), v), _mm_add_ps(_mm_set1_ps(1.0f), e)));
}

void GeluSse(float* x, int64_t count) {
  int64_t i = 0;
  for (; i + 4 <= count; i += 4) Gelu4(x + i);
  if (i < count) {
    float tail[4] = {};
    std::copy(x + i, x + count, tail);
    Gelu4(tail);
    std::copy(tail, tail + (count - i), x + i);
  }
}
#else
void GeluScalar(float* x, int64_t count) {
  for (int64_t i = 0; i < count; ++i) x[i] = 0.5f * x[i] * (1.0f + std::erf(x[i] * kRsqrt2));
}
#endif

}  // namespace

void GeluErf(float* x, int64_t count, int num_threads) {
  const int threads = qkv::internal::ResolveThreads(num_threads);
#ifdef QKV_LIBMVEC
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  void (*gelu)(float*, int64_t) = avx2 ? GeluAvx2 : GeluSse;
#else
  void (*gelu)(float*, int64_t) = GeluScalar;
#endif
  constexpr int64_t kChunk = 4096;  // a multiple of 8: only the last chunk has a tail
  const int64_t chunks = (count + kChunk - 1) / kChunk;
#pragma omp parallel for num_threads(threads) schedule(static) if (count > 65536)
  for (int64_t c = 0; c < chunks; ++c) gelu(x + c * kChunk, std::min(kChunk, count - c * kChunk));
}

const char* GeluErfImplementation() {
#ifdef QKV_LIBMVEC
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
             ? "glibc libmvec erff, AVX2"
             : "glibc libmvec erff, SSE";
#else
  return "std::erf, scalar";
#endif
}

std::string BlasDescription() { return internal::LoadBlas().description; }

}  // namespace qkv::models
