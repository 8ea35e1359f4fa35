// Python bindings: the pieces module.cc and cache.cc share.
#ifndef QKV_PYTHON_BINDINGS_H_
#define QKV_PYTHON_BINDINGS_H_

#include <nanobind/nanobind.h>

#include <optional>

#include "arrays.h"
#include "qkv/attention.h"

namespace qkv::python {

// Returns the array behind `obj` (a NumPy array, a CPU torch tensor, or any
// DLPack producer): a view, never a copy. A torch tensor that requires grad
// is read through .detach() (same memory). Throws qkv::Error naming `name`
// for anything else (a list, a CUDA tensor).
inline Array AsArray(nb::handle obj, const char* name, const char* expected = kFloatDTypes) {
  return ImportArray(obj, name, false, expected);
}
// The same for None-able arguments.
inline std::optional<Array> AsOptionalArray(nb::handle obj, const char* name,
                                            const char* expected = kFloatDTypes) {
  if (obj.is_none()) return std::nullopt;
  return ImportArray(obj, name, false, expected);
}
// A writable array (caller-provided outputs).
inline Array AsOutArray(nb::handle obj, const char* name) { return ImportArray(obj, name, true); }

// AttentionInfo as a dict: kernel, reason, scratch_bytes, threads, simd_target.
nb::dict InfoDict(const AttentionInfo& info);

void BindAttention(nb::module_& m);
void BindCache(nb::module_& m);

}  // namespace qkv::python

#endif  // QKV_PYTHON_BINDINGS_H_
