// qkv_int8_vnni_scores: a measurement for a proposed change, not product
// code. It times the int8 decode kernel's score step (4 query rows x 16-token
// groups, head_dim 128, data in L2) two ways and checks both against a
// float64 sum:
//   kernel: K rows [token][128] int8, as KvCache stores them: each 16 values
//           sign-extended and converted (2 uops), 4 FMAs (one per row), and a
//           transpose-add reduction per 16 keys (what decode_attention.cc
//           does; written here with plain AVX-512 intrinsics).
//   vnni:   K in 16-token tiles with 4 dims interleaved (tile t, dim group g:
//           64 bytes, token i's dims 4g..4g+3 at byte 4i), Q' in 24-bit block
//           fixed point per row (|q| <= 2^23 - 1 units of max|q'| / (2^23 - 1),
//           offset by 2^23 to 3 unsigned byte limbs). vpdpbusd sums 4 u8 x s8
//           products per lane: 3 limbs x 4 rows + 1 column sum (for the
//           offset) per 64 K bytes, no reduction (lanes are tokens). The
//           integer sums are exact; the limbs are combined in float32.
// Usage: qkv_int8_vnni_scores [tokens (multiple of 16, default 2048)] [reps]
#include <immintrin.h>

// GCC 12 reports the intrinsics' internal undefined-vector idiom as
// -Wmaybe-uninitialized once they are inlined into target("avx512...")
// functions: a false positive.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

namespace {

constexpr int kDim = 128, kRows = 4;

__attribute__((target("avx512f"))) inline __m512 Transpose4(__m512 a, __m512 b, __m512 c,
                                                            __m512 e) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 ce = _mm512_add_ps(_mm512_unpacklo_ps(c, e), _mm512_unpackhi_ps(c, e));
  const __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(ab), _mm512_castps_pd(ce));
  const __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(ab), _mm512_castps_pd(ce));
  return _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
}

// s[r * n + t] = k_scale[t] * q_r . K_t, K row-major int8.
__attribute__((target("avx512f,avx512bw"))) void ScoresKernel(const float* q, const int8_t* k,
                                                              const float* k_scale, int n,
                                                              float* s) {
  for (int c = 0; c < n; c += 16) {
    __m512 x[4][kRows];
    for (int quad = 0; quad < 4; ++quad) {
      __m512 acc[kRows][4];
#pragma GCC unroll 16
      for (int r = 0; r < kRows; ++r)
        for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
      const int8_t* rows = k + (c + quad * 4) * kDim;
#pragma GCC unroll 8
      for (int d = 0; d < kDim; d += 16) {
        __m512 kv[4];
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j)
          kv[j] = _mm512_cvtepi32_ps(
              _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows + j * kDim + d))));
#pragma GCC unroll 4
        for (int r = 0; r < kRows; ++r) {
          const __m512 qv = _mm512_loadu_ps(q + r * kDim + d);
#pragma GCC unroll 4
          for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_fmadd_ps(qv, kv[j], acc[r][j]);
        }
      }
#pragma GCC unroll 4
      for (int r = 0; r < kRows; ++r) x[quad][r] = Transpose4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
    }
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
      const __m512 y02 = _mm512_add_ps(_mm512_shuffle_f32x4(x[0][r], x[2][r], 0x44),
                                       _mm512_shuffle_f32x4(x[0][r], x[2][r], 0xee));
      const __m512 y13 = _mm512_add_ps(_mm512_shuffle_f32x4(x[1][r], x[3][r], 0x44),
                                       _mm512_shuffle_f32x4(x[1][r], x[3][r], 0xee));
      const __m512 p = _mm512_add_ps(y02, _mm512_shuffle_f32x4(y02, y02, 0xb1));
      const __m512 o = _mm512_add_ps(y13, _mm512_shuffle_f32x4(y13, y13, 0xb1));
      const __m512 out = _mm512_mask_blend_ps(0xF0F0, p, o);  // blocks: keys 0-3, 4-7, 8-11, 12-15
      _mm512_storeu_ps(s + r * n + c, _mm512_mul_ps(out, _mm512_loadu_ps(k_scale + c)));
    }
  }
}

struct QLimbs {
  uint32_t limb[kRows][3][kDim / 4];  // 4 dims' bytes of limb j
  float unit[kRows];                  // q = (u - 2^23) * unit
};

void PackQ(const float* q, QLimbs* out) {
  for (int r = 0; r < kRows; ++r) {
    float m = 0.0f;
    for (int d = 0; d < kDim; ++d) m = std::max(m, std::fabs(q[r * kDim + d]));
    const double unit = m > 0.0f ? static_cast<double>(m) / 8388607.0 : 1.0;
    out->unit[r] = static_cast<float>(unit);
    uint8_t bytes[3][kDim];
    for (int d = 0; d < kDim; ++d) {
      const auto u = static_cast<uint32_t>(std::nearbyint(q[r * kDim + d] / unit) + 8388608.0);
      bytes[2][d] = static_cast<uint8_t>(u >> 16);
      bytes[1][d] = static_cast<uint8_t>(u >> 8);
      bytes[0][d] = static_cast<uint8_t>(u);
    }
    for (int j = 0; j < 3; ++j) std::memcpy(out->limb[r][j], bytes[j], kDim);
  }
}

__attribute__((target("avx512f,avx512bw,avx512vnni"))) void ScoresVnni(const QLimbs& q,
                                                                       const int8_t* tiles,
                                                                       const float* k_scale,
                                                                       int n, float* s) {
  const __m512i ones = _mm512_set1_epi8(1);
  for (int c = 0; c < n; c += 16) {
    const int8_t* tile = tiles + c * kDim;
    __m512i acc[kRows][3], ksum = _mm512_setzero_si512();
#pragma GCC unroll 12
    for (int r = 0; r < kRows; ++r)
      for (int j = 0; j < 3; ++j) acc[r][j] = _mm512_setzero_si512();
#pragma GCC unroll 4
    for (int g = 0; g < kDim / 4; ++g) {
      const __m512i kv = _mm512_loadu_si512(tile + g * 64);
      ksum = _mm512_dpbusd_epi32(ksum, ones, kv);
#pragma GCC unroll 12
      for (int r = 0; r < kRows; ++r)
        for (int j = 0; j < 3; ++j)
          acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], _mm512_set1_epi32(static_cast<int>(q.limb[r][j][g])), kv);
    }
    const __m512 sc = _mm512_loadu_ps(k_scale + c);
    const __m512i offset = _mm512_slli_epi32(ksum, 7);  // 2^23 = 2^16 * 128
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
      const __m512i hi = _mm512_sub_epi32(acc[r][2], offset);  // exact: |hi| < 2^22
      __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), _mm512_set1_ps(65536.0f),
                                 _mm512_mul_ps(_mm512_cvtepi32_ps(acc[r][1]), _mm512_set1_ps(256.0f)));
      v = _mm512_add_ps(v, _mm512_cvtepi32_ps(acc[r][0]));
      _mm512_storeu_ps(s + r * n + c, _mm512_mul_ps(v, _mm512_mul_ps(sc, _mm512_set1_ps(q.unit[r]))));
    }
  }
}

template <class F>
double BestNsPerToken(F f, int reps, int n) {
  double best = 1e30;
  for (int i = 0; i < 5; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int j = 0; j < reps; ++j) f();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best / reps / n * 1e9;
}

}  // namespace

int main(int argc, char** argv) {
  const int n = argc > 1 ? std::atoi(argv[1]) : 2048;
  const int reps = argc > 2 ? std::atoi(argv[2]) : 2000;
  if (n < 16 || n % 16 != 0 || n > (1 << 20) || reps < 1) {
    std::fprintf(stderr, "qkv_int8_vnni_scores: tokens %d, reps %d (expected a multiple of 16 in "
                 "[16, 2^20] and reps >= 1)\n", n, reps);
    return 2;
  }
  if (!__builtin_cpu_supports("avx512vnni") || !__builtin_cpu_supports("avx512bw")) {
    std::fprintf(stderr, "qkv_int8_vnni_scores: this CPU lacks AVX-512 VNNI/BW (expected both)\n");
    return 2;
  }
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  std::vector<float> q(kRows * kDim), k_scale(n), s_kernel(kRows * n), s_vnni(kRows * n);
  std::vector<int8_t> k(n * kDim), tiles(n * kDim);
  for (float& x : q) x = normal(rng) * 0.125f;
  for (int t = 0; t < n; ++t) {
    k_scale[t] = 0.01f + 0.001f * (t % 7);
    for (int d = 0; d < kDim; ++d)
      k[t * kDim + d] = static_cast<int8_t>(std::clamp(static_cast<int>(std::lround(normal(rng) * 40)), -127, 127));
  }
  for (int t = 0; t < n; ++t)
    for (int d = 0; d < kDim; ++d)
      tiles[(t / 16) * 16 * kDim + (d / 4) * 64 + (t % 16) * 4 + d % 4] = k[t * kDim + d];
  QLimbs limbs;
  PackQ(q.data(), &limbs);
  ScoresKernel(q.data(), k.data(), k_scale.data(), n, s_kernel.data());
  ScoresVnni(limbs, tiles.data(), k_scale.data(), n, s_vnni.data());
  // Error relative to sum |q_d k_d| (the float32 dot product's error scale).
  double err_kernel = 0.0, err_vnni = 0.0;
  for (int r = 0; r < kRows; ++r) {
    for (int t = 0; t < n; ++t) {
      double ref = 0.0, mag = 0.0;
      for (int d = 0; d < kDim; ++d) {
        const double p = static_cast<double>(q[r * kDim + d]) * k[t * kDim + d];
        ref += p, mag += std::fabs(p);
      }
      ref *= k_scale[t], mag *= k_scale[t];
      err_kernel = std::max(err_kernel, std::fabs(s_kernel[r * n + t] - ref) / mag);
      err_vnni = std::max(err_vnni, std::fabs(s_vnni[r * n + t] - ref) / mag);
    }
  }
  const double ns_kernel = BestNsPerToken([&] {
    ScoresKernel(q.data(), k.data(), k_scale.data(), n, s_kernel.data());
    asm volatile("" ::: "memory");
  }, reps, n);
  const double ns_vnni = BestNsPerToken([&] {
    PackQ(q.data(), &limbs);
    ScoresVnni(limbs, tiles.data(), k_scale.data(), n, s_vnni.data());
    asm volatile("" ::: "memory");
  }, reps, n);
  std::printf("{\"tokens\": %d, \"kernel_ns_per_token\": %.2f, \"vnni_ns_per_token\": %.2f, "
              "\"kernel_max_rel_err\": %.3g, \"vnni_max_rel_err\": %.3g}\n",
              n, ns_kernel, ns_vnni, err_kernel, err_vnni);
  return 0;
}
