// qkv_roofline: the machine's measured ceilings, for BENCHMARKS.md. Only
// useful for performance measurement: it checks nothing.
//   fma_peak: a register-only loop of independent vector FMAs on every
//             thread (AVX-512, else AVX2+FMA): the float32 flop/s ceiling.
//   sgemm:    OpenBLAS cblas_sgemm, M = N = K = 2048, row-major: what a
//             tuned matrix multiply reaches on the same threads.
//   copy:     memcpy of 1 GiB split over the threads (read + write bytes
//             counted, as STREAM's copy): the bandwidth.
//   overlap:  (--overlap, one thread) whether a core overlaps a read stream
//             with arithmetic: 512 MiB read in 16 KiB blocks with W
//             dependent-free FMAs after each block, timed against the stream
//             alone and the FMAs alone. On this project's VM the sum of the
//             two is what it takes: the decode kernel's time model.
//   read:     a read-only stream over 1 GiB (vector adds) on every thread:
//             what a kernel that only reads (decode) can reach. On this
//             project's VM one core reads ~16 GB/s but copies ~23 GB/s
//             (glibc's memcpy uses non-temporal stores at this size); 2, 4
//             or 8 interleaved read streams, or software prefetch 1-8 KiB
//             ahead, measured no faster than one plain stream.
//   vnni:     (--vnni) the FMA loop's twin with vpdpbusd (AVX-512 VNNI):
//             instructions per ns next to the FMA loop's.
//   triad:    STREAM's triad a = b + s * c over 3 x 256 MiB float arrays
//             with ordinary stores (as STREAM compiled by GCC runs), 12
//             bytes counted per element as STREAM counts them (the write-
//             allocate read of a is not counted).
// Prints one JSON object. Flop counts: FMA = 2 flops per lane; SGEMM 2·M·N·K.
#include <cblas.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

double Seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// 12 independent accumulators: 2 FMA ports x 4-cycle latency = 8 FMAs in
// flight needed; 12 leaves slack and still fits the 32 zmm registers. Each
// starts from a different value: identical chains (same start, same
// operands) are merged by GCC into one, which measured 1/12 of the work and
// overstated the peak 1.6x in the first version of this file.
__attribute__((target("avx512f"))) double FmaLoopAvx512(int64_t iters) {
  const float e = 1.0f / 1024;
  __m512 a0 = _mm512_set1_ps(1.0f), a1 = _mm512_set1_ps(1 + e), a2 = _mm512_set1_ps(1 + 2 * e),
         a3 = _mm512_set1_ps(1 + 3 * e), a4 = _mm512_set1_ps(1 + 4 * e),
         a5 = _mm512_set1_ps(1 + 5 * e), a6 = _mm512_set1_ps(1 + 6 * e),
         a7 = _mm512_set1_ps(1 + 7 * e), a8 = _mm512_set1_ps(1 + 8 * e),
         a9 = _mm512_set1_ps(1 + 9 * e), a10 = _mm512_set1_ps(1 + 10 * e),
         a11 = _mm512_set1_ps(1 + 11 * e);
  const __m512 m = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-7f);
  for (int64_t i = 0; i < iters; ++i) {
    a0 = _mm512_fmadd_ps(a0, m, c); a1 = _mm512_fmadd_ps(a1, m, c);
    a2 = _mm512_fmadd_ps(a2, m, c); a3 = _mm512_fmadd_ps(a3, m, c);
    a4 = _mm512_fmadd_ps(a4, m, c); a5 = _mm512_fmadd_ps(a5, m, c);
    a6 = _mm512_fmadd_ps(a6, m, c); a7 = _mm512_fmadd_ps(a7, m, c);
    a8 = _mm512_fmadd_ps(a8, m, c); a9 = _mm512_fmadd_ps(a9, m, c);
    a10 = _mm512_fmadd_ps(a10, m, c); a11 = _mm512_fmadd_ps(a11, m, c);
  }
  const __m512 s = _mm512_add_ps(
      _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)),
      _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a4, a5), _mm512_add_ps(a6, a7)),
                    _mm512_add_ps(_mm512_add_ps(a8, a9), _mm512_add_ps(a10, a11))));
  float lanes[16];
  _mm512_storeu_ps(lanes, s);  // keeps the loop live; the value is ~0-weighted
  return lanes[0] * 1e-30 + 12.0 * 16 * 2 * static_cast<double>(iters);  // flops
}

__attribute__((target("avx2,fma"))) double FmaLoopAvx2(int64_t iters) {
  const float e = 1.0f / 1024;
  __m256 a0 = _mm256_set1_ps(1.0f), a1 = _mm256_set1_ps(1 + e), a2 = _mm256_set1_ps(1 + 2 * e),
         a3 = _mm256_set1_ps(1 + 3 * e), a4 = _mm256_set1_ps(1 + 4 * e),
         a5 = _mm256_set1_ps(1 + 5 * e), a6 = _mm256_set1_ps(1 + 6 * e),
         a7 = _mm256_set1_ps(1 + 7 * e), a8 = _mm256_set1_ps(1 + 8 * e),
         a9 = _mm256_set1_ps(1 + 9 * e);
  const __m256 m = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-7f);
  for (int64_t i = 0; i < iters; ++i) {
    a0 = _mm256_fmadd_ps(a0, m, c); a1 = _mm256_fmadd_ps(a1, m, c);
    a2 = _mm256_fmadd_ps(a2, m, c); a3 = _mm256_fmadd_ps(a3, m, c);
    a4 = _mm256_fmadd_ps(a4, m, c); a5 = _mm256_fmadd_ps(a5, m, c);
    a6 = _mm256_fmadd_ps(a6, m, c); a7 = _mm256_fmadd_ps(a7, m, c);
    a8 = _mm256_fmadd_ps(a8, m, c); a9 = _mm256_fmadd_ps(a9, m, c);
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, _mm256_add_ps(
                              _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                              _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7)),
                                            _mm256_add_ps(a8, a9))));
  return lanes[0] * 1e-30 + 10.0 * 8 * 2 * static_cast<double>(iters);  // flops
}

// The FMA loop's twin for AVX-512 VNNI: 12 independent chains of vpdpbusd
// (64 u8 x s8 products summed into 16 int32 lanes per instruction). Returns
// the instructions executed. For the decode kernel's int8 notes: whether
// integer dot products issue at the FMA rate on this CPU (they do on the
// project's VM: both ports), i.e. 4x the products per instruction.
__attribute__((target("avx512f,avx512vnni"))) double VnniLoop(int64_t iters) {
  __m512i a0 = _mm512_set1_epi32(0), a1 = _mm512_set1_epi32(1), a2 = _mm512_set1_epi32(2),
          a3 = _mm512_set1_epi32(3), a4 = _mm512_set1_epi32(4), a5 = _mm512_set1_epi32(5),
          a6 = _mm512_set1_epi32(6), a7 = _mm512_set1_epi32(7), a8 = _mm512_set1_epi32(8),
          a9 = _mm512_set1_epi32(9), a10 = _mm512_set1_epi32(10), a11 = _mm512_set1_epi32(11);
  const __m512i u = _mm512_set1_epi8(3), k = _mm512_set1_epi8(-2);
  for (int64_t i = 0; i < iters; ++i) {
    a0 = _mm512_dpbusd_epi32(a0, u, k); a1 = _mm512_dpbusd_epi32(a1, u, k);
    a2 = _mm512_dpbusd_epi32(a2, u, k); a3 = _mm512_dpbusd_epi32(a3, u, k);
    a4 = _mm512_dpbusd_epi32(a4, u, k); a5 = _mm512_dpbusd_epi32(a5, u, k);
    a6 = _mm512_dpbusd_epi32(a6, u, k); a7 = _mm512_dpbusd_epi32(a7, u, k);
    a8 = _mm512_dpbusd_epi32(a8, u, k); a9 = _mm512_dpbusd_epi32(a9, u, k);
    a10 = _mm512_dpbusd_epi32(a10, u, k); a11 = _mm512_dpbusd_epi32(a11, u, k);
  }
  const __m512i s = _mm512_add_epi32(
      _mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3)),
      _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(a4, a5), _mm512_add_epi32(a6, a7)),
                       _mm512_add_epi32(_mm512_add_epi32(a8, a9), _mm512_add_epi32(a10, a11))));
  int32_t lanes[16];
  _mm512_storeu_si512(lanes, s);  // keeps the loop live
  return lanes[0] * 1e-30 + 12.0 * static_cast<double>(iters);  // instructions
}

// Best of 5 runs of `loop` on every one of `threads` threads: the sum of the
// counts it returns (flops, instructions) per second.
double BestRate(int threads, double (*loop)(int64_t)) {
  const int64_t iters = 50'000'000;
  double best = 0.0;
  for (int rep = 0; rep < 5; ++rep) {
    double count = 0.0;
    const double t0 = Seconds();
#pragma omp parallel num_threads(threads) reduction(+ : count)
    count += loop(iters);
    best = std::max(best, count / (Seconds() - t0));
  }
  return best;
}

// The FMA loop's best rate on `threads` threads, in flop/s.
double FmaPeak(int threads, const char** isa) {
  const bool avx512 = __builtin_cpu_supports("avx512f");
  *isa = avx512 ? "avx512" : "avx2";
  return BestRate(threads, avx512 ? FmaLoopAvx512 : FmaLoopAvx2);
}

double SgemmRate(int threads) {
  const int n = 2048;
  std::vector<float> a(n * n, 0.5f), b(n * n, 0.25f), c(n * n);
  openblas_set_num_threads(threads);
  double best = 0.0;
  for (int rep = 0; rep < 5; ++rep) {
    const double t0 = Seconds();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a.data(), n, b.data(),
                n, 0.0f, c.data(), n);
    best = std::max(best, 2.0 * n * n * n / (Seconds() - t0));
  }
  return best;
}

double CopyBandwidth(int threads) {
  const int64_t bytes = int64_t{1} << 30;
  std::vector<char> src(bytes, 1), dst(bytes, 0);
  const int64_t part = bytes / threads;
  double best = 0.0;
  for (int rep = 0; rep < 3; ++rep) {
    const double t0 = Seconds();
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int i = 0; i < threads; ++i) std::memcpy(dst.data() + i * part, src.data() + i * part, part);
    best = std::max(best, 2.0 * part * threads / (Seconds() - t0));
  }
  return best + dst[bytes / 2] * 0.0;
}

// Sums 1 GiB of floats with 4 independent vector chains per thread, so the
// adds are far from the limit and only the loads count.
__attribute__((target("avx512f"))) float SumAvx512(const float* p, int64_t n) {
  __m512 a = _mm512_setzero_ps(), b = a, c = a, d = a;
  for (int64_t i = 0; i < n; i += 64) {
    a = _mm512_add_ps(a, _mm512_loadu_ps(p + i));
    b = _mm512_add_ps(b, _mm512_loadu_ps(p + i + 16));
    c = _mm512_add_ps(c, _mm512_loadu_ps(p + i + 32));
    d = _mm512_add_ps(d, _mm512_loadu_ps(p + i + 48));
  }
  alignas(64) float lanes[16];  // not _mm512_reduce_add_ps: GCC 12 warns inside it
  _mm512_store_ps(lanes, _mm512_add_ps(_mm512_add_ps(a, b), _mm512_add_ps(c, d)));
  float sum = 0.0f;
  for (float x : lanes) sum += x;
  return sum;
}

float SumScalar(const float* p, int64_t n) {
  float s[8] = {};
  for (int64_t i = 0; i < n; i += 8)
    for (int j = 0; j < 8; ++j) s[j] += p[i + j];
  return s[0] + s[1] + s[2] + s[3] + s[4] + s[5] + s[6] + s[7];
}

double ReadBandwidth(int threads) {
  const int64_t floats = int64_t{1} << 28;  // 1 GiB
  std::vector<float> data(floats, 1.0f);
  const int64_t part = floats / threads / 64 * 64;
  const bool avx512 = __builtin_cpu_supports("avx512f");
  double best = 0.0;
  float sink = 0.0f;
  for (int rep = 0; rep < 3; ++rep) {
    const double t0 = Seconds();
#pragma omp parallel for num_threads(threads) schedule(static, 1) reduction(+ : sink)
    for (int i = 0; i < threads; ++i) {
      sink += avx512 ? SumAvx512(data.data() + i * part, part) : SumScalar(data.data() + i * part, part);
    }
    best = std::max(best, 4.0 * part * threads / (Seconds() - t0));
  }
  return best + sink * 0.0;
}

__attribute__((target("avx512f"))) void TriadAvx512(float* a, const float* b, const float* c,
                                                     int64_t n, float s) {
  const __m512 sv = _mm512_set1_ps(s);
  for (int64_t i = 0; i < n; i += 16)
    _mm512_storeu_ps(a + i, _mm512_fmadd_ps(sv, _mm512_loadu_ps(c + i), _mm512_loadu_ps(b + i)));
}

void TriadScalar(float* a, const float* b, const float* c, int64_t n, float s) {
  for (int64_t i = 0; i < n; ++i) a[i] = b[i] + s * c[i];
}

double TriadBandwidth(int threads) {
  const int64_t n = int64_t{1} << 26;  // 256 MiB per array
  std::vector<float> a(n, 0.0f), b(n, 1.0f), c(n, 2.0f);
  const int64_t part = n / threads / 16 * 16;
  const bool avx512 = __builtin_cpu_supports("avx512f");
  double best = 0.0;
  for (int rep = 0; rep < 3; ++rep) {
    const double t0 = Seconds();
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int i = 0; i < threads; ++i) {
      float* ai = a.data() + i * part;
      if (avx512) {
        TriadAvx512(ai, b.data() + i * part, c.data() + i * part, part, 3.0f);
      } else {
        TriadScalar(ai, b.data() + i * part, c.data() + i * part, part, 3.0f);
      }
    }
    best = std::max(best, 12.0 * part * threads / (Seconds() - t0));
  }
  return best + a[n / 2] * 0.0;
}

// Streams `floats` floats in blocks of 4096 (16 KiB), `work` rounds of 8
// independent FMAs after each block (stream = false: the FMAs only).
// Returns seconds (best of 3).
__attribute__((target("avx512f"))) double StreamWithWork(const float* p, int64_t floats, int work,
                                                          bool stream, float* sink) {
  double best = 1e30;
  for (int rep = 0; rep < 3; ++rep) {
    const double t0 = Seconds();
    // a starts at 1: with a = 0 the FMA-only chains decay into denormals.
    __m512 a = _mm512_set1_ps(1.0f), b = _mm512_setzero_ps();
    __m512 c[8];
    for (int i = 0; i < 8; ++i) c[i] = _mm512_set1_ps(1.0f + i / 1024.0f);
    const __m512 m = _mm512_set1_ps(0.9999f);
    for (int64_t blk = 0; blk < floats; blk += 4096) {
      if (stream) {
        for (int64_t i = blk; i < blk + 4096; i += 32) {
          a = _mm512_add_ps(a, _mm512_loadu_ps(p + i));
          b = _mm512_add_ps(b, _mm512_loadu_ps(p + i + 16));
        }
      }
      for (int w = 0; w < work; ++w)
        for (int i = 0; i < 8; ++i) c[i] = _mm512_fmadd_ps(c[i], m, a);
    }
    best = std::min(best, Seconds() - t0);
    alignas(64) float lanes[16];
    __m512 s = _mm512_add_ps(a, b);
    for (int i = 0; i < 8; ++i) s = _mm512_add_ps(s, c[i]);
    _mm512_store_ps(lanes, s);
    for (float x : lanes) *sink += x;
  }
  return best;
}

void PrintOverlap() {
  const int64_t floats = int64_t{1} << 27;  // 512 MiB
  std::vector<float> data(floats, 1.0f);
  float sink = 0.0f;
  std::printf(", \"overlap\": [");
  const int works[] = {0, 200, 400, 800};
  for (int i = 0; i < 4; ++i) {
    const double both = StreamWithWork(data.data(), floats, works[i], true, &sink);
    const double fma = StreamWithWork(data.data(), floats, works[i], false, &sink);
    std::printf("%s{\"fma_rounds_per_16KiB\": %d, \"stream_and_fma_ms\": %.1f, \"fma_only_ms\": %.1f}",
                i ? ", " : "", works[i], both * 1e3, fma * 1e3 + sink * 0.0);
  }
  std::printf("]");
}

}  // namespace

int main(int argc, char** argv) {
  int threads = 1;
  bool copy = false, overlap = false, vnni = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--threads") == 0 && i + 1 < argc) {
      threads = std::atoi(argv[++i]);
    } else if (std::strcmp(argv[i], "--copy") == 0) {
      copy = true;
    } else if (std::strcmp(argv[i], "--overlap") == 0) {
      overlap = true;
    } else if (std::strcmp(argv[i], "--vnni") == 0) {
      vnni = true;
    } else {
      std::fprintf(stderr,
                   "qkv_roofline: unknown argument '%s' (expected --threads T [--copy] [--overlap] "
                   "[--vnni])\n",
                   argv[i]);
      return 2;
    }
  }
  if (threads < 1) {
    std::fprintf(stderr, "qkv_roofline: --threads %d (expected >= 1)\n", threads);
    return 2;
  }
  const char* isa = "";
  const double peak = FmaPeak(threads, &isa);
  const double sgemm = SgemmRate(threads);
  std::printf("{\"threads\": %d, \"fma_isa\": \"%s\", \"fma_peak_gflops\": %.2f, "
              "\"sgemm_gflops\": %.2f, \"openblas_core\": \"%s\", \"openblas_config\": \"%s\"",
              threads, isa, peak * 1e-9, sgemm * 1e-9, openblas_get_corename(),
              openblas_get_config());
  if (copy) {
    std::printf(", \"copy_gbps\": %.2f, \"read_gbps\": %.2f, \"triad_gbps\": %.2f",
                CopyBandwidth(threads) * 1e-9, ReadBandwidth(threads) * 1e-9,
                TriadBandwidth(threads) * 1e-9);
  }
  if (overlap && __builtin_cpu_supports("avx512f")) PrintOverlap();
  if (vnni && !__builtin_cpu_supports("avx512vnni")) {
    std::printf(", \"vpdpbusd_instr_per_ns\": null, \"vnni\": \"not supported by this CPU\"");
  } else if (vnni) {
    // One FMA instruction is 32 flops (16 lanes x 2); one vpdpbusd is 64
    // multiply-adds.
    std::printf(", \"fma_instr_per_ns\": %.3f, \"vpdpbusd_instr_per_ns\": %.3f", peak / 32 * 1e-9,
                BestRate(threads, VnniLoop) * 1e-9);
  }
  std::printf("}\n");
  return 0;
}
