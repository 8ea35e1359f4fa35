// Dense layers on OpenBLAS (qkv/models/layers.h).
//
// Linear: y = x . W^T + b as cblas_sgemm(RowMajor, NoTrans, Trans) per block
// of kLinearRowBlock rows; the blocks are spread over OpenMP threads, and
// OpenBLAS's OpenMP build runs single-threaded inside a parallel region, so
// each block is one serial SGEMM whatever the thread count (bitwise
// identical results for any thread count). Each call packs W (in * out
// floats) once for 128 rows: packing is 1/128 of the block's flops.
// Traffic per block: x block (128 * in), W (out * in, from L2/L3 for BERT
// sizes), y block (128 * out).
//
// AddLayerNorm and GeluErf are memory-bound elementwise passes.
#include "qkv/models/layers.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <cmath>

#include "validate.h"

extern "C" {
// OpenBLAS's own entry points (declared in its cblas.h; repeated here so a
// reference CBLAS header would not hide them).
char* openblas_get_config(void);
char* openblas_get_corename(void);
int openblas_get_parallel(void);
}

namespace qkv::models {

void Linear(const float* x, int64_t rows, int64_t in, const float* w, const float* bias,
            int64_t out, float* y, int num_threads) {
  if (rows <= 0 || out <= 0) return;
  const int threads = internal::ResolveThreads(num_threads);
  const int64_t blocks = (rows + kLinearRowBlock - 1) / kLinearRowBlock;
#pragma omp parallel num_threads(static_cast<int>(std::min<int64_t>(threads, blocks)))
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
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(m),
                  static_cast<int>(out), static_cast<int>(in), 1.0f, x + m0 * in,
                  static_cast<int>(in), w, static_cast<int>(in), beta, yb,
                  static_cast<int>(out));
    }
  }
}

void AddLayerNorm(float* x, const float* residual, int64_t rows, int64_t features,
                  const float* gamma, const float* beta, float eps, int num_threads) {
  const int threads = internal::ResolveThreads(num_threads);
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

void GeluErf(float* x, int64_t count, int num_threads) {
  const int threads = internal::ResolveThreads(num_threads);
#pragma omp parallel for num_threads(threads) schedule(static) if (count > 65536)
  for (int64_t i = 0; i < count; ++i) {
    x[i] = 0.5f * x[i] * (1.0f + std::erf(x[i] * 0.70710678118654752f));
  }
}

std::string BlasDescription() {
  std::string s = openblas_get_config();
  s += openblas_get_parallel() == 2 ? " (OpenMP)" : openblas_get_parallel() == 1 ? " (pthreads)"
                                                                                  : " (serial)";
  s += ", core ";
  s += openblas_get_corename();
  return s;
}

}  // namespace qkv::models
