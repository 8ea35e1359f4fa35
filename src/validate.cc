#include "validate.h"

#include <omp.h>

#include <cstdlib>

#include "qkv/error.h"

namespace qkv::internal {

bool IsFloat(DType d) {
  return d == DType::kFloat32 || d == DType::kFloat16 || d == DType::kFloat64;
}

void CheckTensor(const char* name, const Shape4& shape, const Shape4& strides, bool present,
                 DType dtype, bool output) {
  const bool empty = shape[0] == 0 || shape[1] == 0 || shape[2] == 0 || shape[3] == 0;
  if (!present && !empty) throw Error(std::string(name) + ": missing (expected a tensor)");
  if (!IsFloat(dtype)) {
    throw Error(std::string(name) + ": dtype " + DTypeName(dtype) +
                " is not supported (expected float32, float16 or float64)");
  }
  for (int d = 0; d < 4; ++d) {
    if (shape[d] > kMaxDim) {
      throw Error(std::string(name) + ": dimension " + S(shape[d]) + " in shape " +
                  ShapeString(shape) + " is too large (expected at most 2^31 - 1)");
    }
    if (shape[d] < 0) {
      throw Error(std::string(name) + ": negative dimension in shape " + ShapeString(shape) +
                  " (expected sizes >= 0)");
    }
    if (output && !empty && shape[d] > 1 && strides[d] == 0) {
      throw Error(std::string(name) + ": stride 0 on dimension " + S(d) +
                  " of an output (expected distinct elements)");
    }
  }
}

void CheckShape(const char* name, const Shape4& got, const Shape4& expected,
                const char* names) {
  if (got != expected) {
    throw Error(std::string(name) + ": shape " + ShapeString(got) + " (expected " +
                ShapeString(expected) + " = " + names + ")");
  }
}

void CheckThreads(int num_threads) {
  if (num_threads < 0 || num_threads > kMaxThreads) {
    throw Error("num_threads: " + S(num_threads) + " (expected 0 to " + S(kMaxThreads) +
                "; 0 = all cores)");
  }
}

void CheckDefaultThreads() {
  const int threads = omp_get_max_threads();
  if (threads > kMaxThreads) {
    // The variable's own text is not echoed: it may hold anything.
    throw Error("OMP_NUM_THREADS: sets a default of " + S(threads) +
                " threads (expected at most " + S(kMaxThreads) +
                "; set OMP_NUM_THREADS lower or give a thread count)");
  }
}

int ResolveThreads(int num_threads) {
  CheckThreads(num_threads);
  if (num_threads > 0) return num_threads;
  CheckDefaultThreads();
  return omp_get_max_threads();
}

}  // namespace qkv::internal
