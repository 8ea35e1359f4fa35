// qkv/models/layers.h: the dense building blocks of Transformer models
// around attention (BERT, Llama): linear layers, LayerNorm, GELU, embedding
// lookup, pooling. Row-major float32 [rows, features] activations; weights in
// PyTorch's nn.Linear layout [out_features, in_features].
//
// Matrix products run on OpenBLAS's SGEMM (Debian's OpenMP build). Linear
// splits the rows into blocks of a fixed size (kLinearRowBlock, not derived
// from the thread count), and OpenMP hands whole blocks to threads, each an
// independent single-threaded SGEMM call: the same calls on the same data
// whatever the thread count, so every result here is bitwise identical for
// any num_threads, as qkv's attention kernels are.
#ifndef QKV_MODELS_LAYERS_H_
#define QKV_MODELS_LAYERS_H_

#include <cstdint>
#include <string>

namespace qkv::models {

// Rows per SGEMM call in Linear. OpenBLAS 0.3.21 on Zen 1, one thread,
// 1536 rows of MiniLM's products ([1152|1536|384] x [384|384|1536]):
// 64 rows 21-32, 128 rows 29-33, 256 rows 30-34, 512 rows 33-34 GFLOP/s.
// 256 keeps most of it and still gives a 32 x 45-token batch 6 blocks to
// share between threads.
inline constexpr int64_t kLinearRowBlock = 256;

// y[m, n] = sum_k x[m, k] * w[n, k] + bias[n] for m < rows, n < out:
// x [rows, in], w [out, in] (nn.Linear), bias [out] or nullptr, y [rows, out]
// (must not overlap x). num_threads 0: OpenMP's default.
void Linear(const float* x, int64_t rows, int64_t in, const float* w, const float* bias,
            int64_t out, float* y, int num_threads);

// x[m, :] = LayerNorm(x[m, :] + residual[m, :]) * gamma + beta, per row of
// `features` values (residual may be nullptr). Mean and variance (biased, as
// torch) are accumulated in double.
void AddLayerNorm(float* x, const float* residual, int64_t rows, int64_t features,
                  const float* gamma, const float* beta, float eps, int num_threads);

// x = 0.5 x (1 + erf(x / sqrt 2)) elementwise: the exact GELU of BERT
// ("gelu" in Hugging Face configs, torch's approximate="none").
// erf comes from glibc's vector math library on x86-64 (see layers.cc).
void GeluErf(float* x, int64_t count, int num_threads);

// Which erf GeluErf runs on this machine, e.g. "glibc libmvec erff, AVX2".
const char* GeluErfImplementation();

// Name and version of the BLAS library Linear runs on, and the kernel it
// chose for this CPU, e.g. "OpenBLAS 0.3.21 ... (OpenMP), core Zen". Where
// OpenBLAS 0.3.21 does not know the CPU and falls back to its slow
// "Prescott" kernel on an AVX2 machine, qkv selects Haswell (or SkylakeX
// with AVX-512) and this says so (layers.cc, CheckBlasCore).
std::string BlasDescription();

}  // namespace qkv::models

#endif  // QKV_MODELS_LAYERS_H_
