// Python bindings: NumPy arrays and torch tensors as qkv views, and new
// arrays in the caller's framework. No copies: an input's data pointer and
// strides (any, zero and negative included) go to the library as they are.
#ifndef QKV_PYTHON_ARRAYS_H_
#define QKV_PYTHON_ARRAYS_H_

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstdint>
#include <string>
#include <vector>

#include "qkv/tensor.h"

namespace qkv::python {

namespace nb = nanobind;

// A borrowed CPU array: data pointer, qkv dtype, shape and strides in
// elements, as the caller's object holds them (never copied). NumPy arrays
// are read through the buffer protocol (the cheapest way in: no DLPack
// capsule per call); torch tensors and other DLPack producers through
// nanobind's ndarray import. Move-only; releases what it borrowed.
class Array {
 public:
  Array() = default;
  Array(Array&& other) noexcept;
  Array& operator=(Array&& other) noexcept;
  Array(const Array&) = delete;
  Array& operator=(const Array&) = delete;
  ~Array();

  size_t ndim() const { return ndim_; }
  size_t shape(size_t i) const { return static_cast<size_t>(shape_[i]); }
  int64_t stride(size_t i) const { return strides_[i]; }  // elements
  DType dtype() const { return dtype_; }
  void* data() const { return data_; }

 private:
  friend Array ImportArray(nb::handle obj, const char* name, bool writable, const char* expected);
  static constexpr size_t kMaxRank = 8;
  void* data_ = nullptr;
  DType dtype_ = DType::kFloat32;
  size_t ndim_ = 0;
  int64_t shape_[kMaxRank] = {};
  int64_t strides_[kMaxRank] = {};
  Py_buffer buffer_{};
  bool has_buffer_ = false;
  nb::ndarray<> ndarray_;  // the DLPack import, when not a buffer
};

// The dtypes most arguments take, for messages.
inline constexpr const char* kFloatDTypes = "float32, float16 or float64";

// Returns the array behind `obj` (writable: for outputs the caller gave).
// Throws qkv::Error naming `name` when `obj` is no CPU array, has more than
// 8 dims, a dtype qkv has no name for (the message lists `expected`), a
// byte order other than the machine's, or strides that are not whole
// elements; or (writable) is read-only.
Array ImportArray(nb::handle obj, const char* name, bool writable,
                  const char* expected = kFloatDTypes);

// Where new outputs are made: NumPy for NumPy (and any other) inputs, torch
// for torch inputs, so that `qkv.attention(torch_q, ...)` returns tensors.
enum class Framework { kNumpy, kTorch };

// Returns kTorch for a torch.Tensor, else kNumpy.
Framework FrameworkOf(nb::handle obj);

// Returns the [batch, heads, seq, dim] view of a 4-D array in `layout`
// ("bhsd": as stored; "bshd": [batch, seq, heads, dim] memory). Throws
// qkv::Error naming `name` unless the array is 4-D.
TensorView InView(const Array& a, const char* name, bool bshd);
MutableTensorView OutView(const Array& a, const char* name, bool bshd);

// Returns the mask as a 4-D view broadcast (NumPy rules: trailing dims
// aligned, size-1 and missing dims get stride 0) to `target` =
// [batch, num_q_heads, seq_q, seq_kv]; throws qkv::Error naming "mask".
TensorView MaskView(const Array& mask, const Shape4& target);

// The shape the library writes dmask in for a mask given as `mask`: the
// mask's own dims (rank kept), with each broadcast (stride 0) dim as 1.
std::vector<size_t> MaskOwnShape(const Array& mask);

// A new C-contiguous array of `shape` and `dtype` in `framework` (NumPy:
// numpy.empty; torch: memory of ours exported by DLPack); *data receives
// its pointer.
nb::object NewArray(Framework framework, DType dtype, const std::vector<size_t>& shape,
                    void** data);

// A [batch, heads, seq, dim] output of logical shape `shape`, stored in
// `layout` order (bshd: [batch, seq, heads, dim] memory), and its view.
nb::object NewOutput(Framework framework, DType dtype, const Shape4& shape, bool bshd,
                     MutableTensorView* view);

// Returns str(o) (nb::str(object) would take a non-str object as a str).
inline std::string PyStr(const nb::object& o) { return nb::str(nb::handle(o)).c_str(); }

// Parses layout "bhsd" / "bshd" (true for bshd); throws naming "layout".
bool ParseLayout(const std::string& layout);

}  // namespace qkv::python

#endif  // QKV_PYTHON_ARRAYS_H_
