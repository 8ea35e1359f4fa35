// Internal: argument checks shared by the public entry points (attention.cc,
// attention_backward.cc, decode.cc). Each throws qkv::Error
// "<name>: <problem> (expected ...)".
#ifndef QKV_SRC_VALIDATE_H_
#define QKV_SRC_VALIDATE_H_

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>

#include "problem.h"
#include "qkv/attention.h"
#include "qkv/tensor.h"

namespace qkv::internal {

// More threads than this is a typo, not a machine: each thread also holds
// its own scratch, so the count bounds memory too.
inline constexpr int kMaxThreads = 1024;
// Every dim fits int32, as in FlashAttention: zero-sized tensors cost no
// memory, so without this a 200-byte .npy could ask for 2^40 keys of
// head_dim 0 and hours of work.
inline constexpr int64_t kMaxDim = (int64_t{1} << 31) - 1;

inline std::string S(int64_t v) { return std::to_string(v); }

// True for float32, float16 and float64.
bool IsFloat(DType d);

// Checks a query/key/value/output view: present unless empty, a float dtype,
// dims in [0, kMaxDim], and (outputs) no stride 0 on a dim of size > 1.
void CheckTensor(const char* name, const Shape4& shape, const Shape4& strides, bool present,
                 DType dtype, bool output);

// Checks that `got` equals `expected`; `names` spells the expected dims.
void CheckShape(const char* name, const Shape4& got, const Shape4& expected, const char* names);

// Checks 0 <= num_threads <= kMaxThreads.
void CheckThreads(int num_threads);

// Returns the thread count a call runs with: num_threads when positive, else
// OpenMP's default (omp_get_max_threads(), i.e. OMP_NUM_THREADS or the core
// count). Every entry point resolves it here, once, so that the default is
// held to kMaxThreads too: OMP_NUM_THREADS=100000 is an error naming the
// variable, never 100000 threads (libgomp crashes or aborts on that).
int ResolveThreads(int num_threads);

// Throws unless OpenMP's default thread count is at most kMaxThreads; the
// message names OMP_NUM_THREADS.
void CheckDefaultThreads();

// Checks q, k, v, the mask, the scale and the thread count of an attention
// call (forward or backward) and returns the resolved problem
// (attention.cc).
Problem ValidateInputs(const TensorView& q, const TensorView& k, const TensorView& v,
                       const MaskSpec& mask, const std::optional<double>& scale,
                       int num_threads);

// Returns the shape of the data behind a mask view: 1 on each dim of stride
// 0 (broadcast), else the view's size. dmask has this shape.
inline Shape4 MaskOwnShape(const TensorView& mask) {
  Shape4 s = mask.shape;
  for (int d = 0; d < 4; ++d)
    if (mask.strides[d] == 0) s[d] = std::min<int64_t>(s[d], 1);
  return s;
}

// Refuses a kernel whose scratch would exceed this machine's physical
// memory: an error, not an unbounded allocation (attention.cc).
void CheckScratch(const AttentionInfo& info);

}  // namespace qkv::internal

#endif  // QKV_SRC_VALIDATE_H_
