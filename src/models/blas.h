// Internal: OpenBLAS, loaded on first use (src/models/blas.cc).
#ifndef QKV_SRC_MODELS_BLAS_H_
#define QKV_SRC_MODELS_BLAS_H_

#include <cblas.h>

#include <string>

namespace qkv::models::internal {

struct Blas {
  decltype(&cblas_sgemm) sgemm = nullptr;
  std::string description;  // library, threading, kernel (and a re-selection)
};

// Loads Debian's OpenMP OpenBLAS once and returns its entry points; throws
// qkv::Error (one line) when it cannot be loaded, or when this process's
// address-space limit (ulimit -v) leaves too little room for the buffers
// OpenBLAS allocates while loading. Call it outside parallel regions.
const Blas& LoadBlas();

}  // namespace qkv::models::internal

#endif  // QKV_SRC_MODELS_BLAS_H_
