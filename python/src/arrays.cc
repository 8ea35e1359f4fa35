// Python bindings: array views and new arrays (arrays.h).
#include "arrays.h"

#include <nanobind/stl/string.h>

#include <cstdlib>
#include <cstring>

#include "qkv/error.h"

namespace qkv::python {
namespace {

namespace dl = nb::dlpack;

std::string S(int64_t v) { return std::to_string(v); }

const char* CodeName(uint8_t code) {
  switch (static_cast<dl::dtype_code>(code)) {
    case dl::dtype_code::Int:
      return "int";
    case dl::dtype_code::UInt:
      return "uint";
    case dl::dtype_code::Float:
      return "float";
    case dl::dtype_code::Bfloat:
      return "bfloat";
    case dl::dtype_code::Complex:
      return "complex";
    case dl::dtype_code::Bool:
      return "bool";
    default:
      return "float8_";
  }
}

// Returns the dtype of a DLPack dtype; throws naming `name`.
DType FromDlpack(const dl::dtype& t, const char* name, const char* expected) {
  if (t.lanes == 1) {
    switch (static_cast<dl::dtype_code>(t.code)) {
      case dl::dtype_code::Float:
        if (t.bits == 32) return DType::kFloat32;
        if (t.bits == 16) return DType::kFloat16;
        if (t.bits == 64) return DType::kFloat64;
        break;
      case dl::dtype_code::Bfloat:
        if (t.bits == 16) return DType::kBFloat16;
        break;
      case dl::dtype_code::Bool:
        return DType::kBool;
      case dl::dtype_code::Int:
        if (t.bits == 8) return DType::kInt8;
        if (t.bits == 32) return DType::kInt32;
        if (t.bits == 64) return DType::kInt64;
        break;
      default:
        break;
    }
  }
  throw Error(std::string(name) + ": dtype " + CodeName(t.code) + S(t.bits) +
              " is not supported (expected " + expected + ")");
}

// Returns the dtype of a buffer-protocol format in native byte order, or
// nothing (then the DLPack import decides, and names the dtype). Throws
// naming `name` for a big-endian format.
bool FromFormat(const char* format, Py_ssize_t itemsize, DType* dtype, const char* name) {
  if (format == nullptr) return false;
  if (*format == '>' || *format == '!') {
    throw Error(std::string(name) +
                ": big-endian data (expected the machine's little-endian byte "
                "order: a.astype(a.dtype.newbyteorder('='))");
  }
  if (*format == '@' || *format == '=' || *format == '<') ++format;  // x86-64: little endian
  if (format[0] == '\0' || format[1] != '\0') return false;
  switch (format[0]) {
    case 'f':
      *dtype = DType::kFloat32;
      return itemsize == 4;
    case 'd':
      *dtype = DType::kFloat64;
      return itemsize == 8;
    case 'e':
      *dtype = DType::kFloat16;
      return itemsize == 2;
    case '?':
      *dtype = DType::kBool;
      return itemsize == 1;
    case 'b':
      *dtype = DType::kInt8;
      return itemsize == 1;
    case 'i':
    case 'l':
    case 'q':
      if (itemsize != 4 && itemsize != 8) return false;
      *dtype = itemsize == 4 ? DType::kInt32 : DType::kInt64;
      return true;
    default:
      return false;
  }
}

std::string TypeName(nb::handle obj) { return PyStr(obj.type().attr("__name__")); }

template <class View>
View MakeView(const Array& a, const char* name, bool bshd) {
  if (a.ndim() != 4) {
    throw Error(std::string(name) + ": " + S(static_cast<int64_t>(a.ndim())) +
                "-D array (expected 4-D " +
                (bshd ? "[batch, seq, heads, head_dim] for layout 'bshd'"
                      : "[batch, heads, seq, head_dim] for layout 'bhsd'") +
                ")");
  }
  View v;
  v.data = a.data();
  v.dtype = a.dtype();
  // Logical [batch, heads, seq, dim] from memory dims (0,1,2,3) or (0,2,1,3).
  const int order[4] = {0, bshd ? 2 : 1, bshd ? 1 : 2, 3};
  for (int d = 0; d < 4; ++d) {
    v.shape[d] = static_cast<int64_t>(a.shape(order[d]));
    v.strides[d] = a.stride(order[d]);
  }
  return v;
}

bool IsNumpyArray(nb::handle obj) {
  return std::strcmp(Py_TYPE(obj.ptr())->tp_name, "numpy.ndarray") == 0;
}

}  // namespace

Array::Array(Array&& o) noexcept { *this = std::move(o); }

Array& Array::operator=(Array&& o) noexcept {
  if (this != &o) {
    if (has_buffer_) PyBuffer_Release(&buffer_);
    data_ = o.data_, dtype_ = o.dtype_, ndim_ = o.ndim_;
    std::memcpy(shape_, o.shape_, sizeof shape_);
    std::memcpy(strides_, o.strides_, sizeof strides_);
    buffer_ = o.buffer_, has_buffer_ = o.has_buffer_;
    o.has_buffer_ = false;
    ndarray_ = std::move(o.ndarray_);
  }
  return *this;
}

Array::~Array() {
  if (has_buffer_) PyBuffer_Release(&buffer_);
}

Array ImportArray(nb::handle obj, const char* name, bool writable, const char* expected) {
  Array a;
  if (IsNumpyArray(obj)) {
    const int flags = writable ? PyBUF_RECORDS : PyBUF_RECORDS_RO;
    if (PyObject_GetBuffer(obj.ptr(), &a.buffer_, flags) != 0) {
      PyErr_Clear();
      throw Error(std::string(name) + ": a read-only array (expected a writable array)");
    }
    a.has_buffer_ = true;
    DType dtype;
    if (a.buffer_.ndim <= static_cast<int>(Array::kMaxRank) &&
        FromFormat(a.buffer_.format, a.buffer_.itemsize, &dtype, name)) {
      a.data_ = a.buffer_.buf;
      a.dtype_ = dtype;
      a.ndim_ = static_cast<size_t>(a.buffer_.ndim);
      for (size_t i = 0; i < a.ndim_; ++i) {
        const Py_ssize_t st = a.buffer_.strides[i];
        if (st % a.buffer_.itemsize != 0) {
          throw Error(std::string(name) + ": a stride of " + S(st) +
                      " bytes (expected whole elements of " + S(a.buffer_.itemsize) + " bytes)");
        }
        a.shape_[i] = a.buffer_.shape[i];
        a.strides_[i] = st / a.buffer_.itemsize;
      }
      return a;
    }
    PyBuffer_Release(&a.buffer_);  // another dtype: DLPack names it below
    a.has_buffer_ = false;
  }
  // torch 1.13 exports no bool tensors through DLPack: read a bool
  // tensor's bytes (0 or 1) as uint8, then call them bool again.
  bool torch_bool = false;
  nb::object source = nb::borrow(obj);
  if (FrameworkOf(obj) == Framework::kTorch && nb::hasattr(obj, "dtype") &&
      PyStr(obj.attr("dtype")) == "torch.bool") {
    source = obj.attr("view")(nb::module_::import_("torch").attr("uint8"));
    torch_bool = true;
  }
  obj = source;
  bool ok = writable ? nb::try_cast(obj, a.ndarray_) : false;
  if (!writable) {
    nb::ndarray<nb::ro> ro;
    ok = nb::try_cast(obj, ro);
    if (!ok && FrameworkOf(obj) == Framework::kTorch && nb::hasattr(obj, "detach")) {
      // torch refuses __dlpack__ on a tensor that requires grad; its
      // detached alias has the same memory.
      ok = nb::try_cast(obj.attr("detach")(), ro);
    }
    if (ok) a.ndarray_ = nb::ndarray<>(ro.handle());
  }
  if (!ok || a.ndarray_.device_type() != nb::device::cpu::value) {
    std::string what = TypeName(obj);
    if (nb::hasattr(obj, "device")) what += " on " + PyStr(obj.attr("device"));
    throw Error(std::string(name) + ": " + what +
                (writable ? " (expected a writable" : " (expected a") +
                " NumPy array or CPU torch tensor)");
  }
  if (a.ndarray_.ndim() > Array::kMaxRank) {
    throw Error(std::string(name) + ": " + S(static_cast<int64_t>(a.ndarray_.ndim())) +
                "-D array (expected at most 8-D)");
  }
  a.dtype_ = torch_bool ? DType::kBool : FromDlpack(a.ndarray_.dtype(), name, expected);
  a.data_ = static_cast<uint8_t*>(a.ndarray_.data_handle()) + a.ndarray_.byte_offset();
  a.ndim_ = a.ndarray_.ndim();
  for (size_t i = 0; i < a.ndim_; ++i) {
    a.shape_[i] = static_cast<int64_t>(a.ndarray_.shape(i));
    a.strides_[i] = a.ndarray_.stride(i);
  }
  return a;
}

Framework FrameworkOf(nb::handle obj) {
  if (IsNumpyArray(obj)) return Framework::kNumpy;
  // torch.Tensor and its subclasses (nn.Parameter) live in module "torch".
  nb::handle type = obj.type();
  if (!nb::hasattr(type, "__module__")) return Framework::kNumpy;
  const nb::object module = type.attr("__module__");
  if (!nb::isinstance<nb::str>(module)) return Framework::kNumpy;
  const char* m = nb::borrow<nb::str>(module).c_str();
  return std::strncmp(m, "torch", 5) == 0 ? Framework::kTorch : Framework::kNumpy;
}

TensorView InView(const Array& a, const char* name, bool bshd) {
  return MakeView<TensorView>(a, name, bshd);
}

MutableTensorView OutView(const Array& a, const char* name, bool bshd) {
  return MakeView<MutableTensorView>(a, name, bshd);
}

TensorView MaskView(const Array& mask, const Shape4& target) {
  const int64_t rank = static_cast<int64_t>(mask.ndim());
  if (rank > 4) {
    throw Error("mask: " + S(rank) + "-D array (expected at most 4-D, broadcastable to " +
                ShapeString(target) + " = [batch, num_q_heads, seq_q, seq_kv])");
  }
  TensorView v;
  v.data = mask.data();
  v.dtype = mask.dtype();
  v.shape = target;
  for (int d = 0; d < 4; ++d) {
    const int64_t m = d - (4 - rank);  // the mask's own dim aligned with d
    const int64_t size = m < 0 ? 1 : static_cast<int64_t>(mask.shape(m));
    if (size == 1) {
      v.strides[d] = 0;
    } else if (size == target[d]) {
      v.strides[d] = mask.stride(m);
    } else {
      std::string shape = "(";
      for (int64_t i = 0; i < rank; ++i) shape += (i ? ", " : "") + S(mask.shape(i));
      throw Error("mask: shape " + shape + (rank == 1 ? ",)" : ")") + " does not broadcast to " +
                  ShapeString(target) +
                  " = [batch, num_q_heads, seq_q, seq_kv] (expected each dim 1 or equal, "
                  "trailing dims aligned)");
    }
  }
  return v;
}

std::vector<size_t> MaskOwnShape(const Array& mask) {
  std::vector<size_t> shape(mask.ndim());
  for (size_t i = 0; i < mask.ndim(); ++i) {
    shape[i] = mask.stride(i) == 0 && mask.shape(i) > 1 ? 1 : mask.shape(i);
  }
  return shape;
}

nb::object NewArray(Framework framework, DType dtype, const std::vector<size_t>& shape,
                    void** data) {
  if (framework == Framework::kNumpy && dtype != DType::kBFloat16) {
    // numpy.empty, then its data pointer: cheaper than exporting our own
    // memory (a capsule, a DLPack wrapper and numpy.asarray per call).
    static PyObject* const empty =
        nb::object(nb::module_::import_("numpy").attr("empty")).release().ptr();
    // numpy.dtype objects by qkv dtype, made once (a dtype string would be
    // parsed on every call).
    static PyObject* dtypes[8] = {};
    PyObject*& dtype_obj = dtypes[static_cast<int>(dtype)];
    if (dtype_obj == nullptr) {
      dtype_obj =
          nb::object(nb::module_::import_("numpy").attr("dtype")(DTypeName(dtype))).release().ptr();
    }
    nb::object shape_tuple = nb::steal(PyTuple_New(static_cast<Py_ssize_t>(shape.size())));
    for (size_t i = 0; i < shape.size(); ++i) {
      PyTuple_SET_ITEM(shape_tuple.ptr(), i, PyLong_FromSize_t(shape[i]));
    }
    nb::object array =
        nb::steal(PyObject_CallFunctionObjArgs(empty, shape_tuple.ptr(), dtype_obj, nullptr));
    if (!array.is_valid()) throw nb::python_error();
    Py_buffer buffer;
    if (PyObject_GetBuffer(array.ptr(), &buffer, PyBUF_SIMPLE | PyBUF_WRITABLE) != 0) {
      throw nb::python_error();
    }
    *data = buffer.buf;
    PyBuffer_Release(&buffer);  // the array keeps its memory
    return array;
  }
  size_t bytes = DTypeSize(dtype);
  for (size_t s : shape) bytes *= s;
  const size_t padded = (bytes + 63) / 64 * 64 + 64;  // never 0
  void* p = std::aligned_alloc(64, padded);
  if (p == nullptr) throw std::bad_alloc();
  nb::capsule owner(p, [](void* q) noexcept { std::free(q); });
  *data = p;
  dl::dtype t;
  t.lanes = 1;
  t.bits = static_cast<uint8_t>(DTypeSize(dtype) * 8);
  switch (dtype) {
    case DType::kBFloat16:
      t.code = static_cast<uint8_t>(dl::dtype_code::Bfloat);
      break;
    case DType::kBool:
      t.code = static_cast<uint8_t>(dl::dtype_code::Bool);
      break;
    case DType::kInt8:
    case DType::kInt32:
    case DType::kInt64:
      t.code = static_cast<uint8_t>(dl::dtype_code::Int);
      break;
    default:
      t.code = static_cast<uint8_t>(dl::dtype_code::Float);
      break;
  }
  if (framework == Framework::kTorch) {
    return nb::ndarray<nb::pytorch>(p, shape.size(), shape.data(), owner, nullptr, t).cast();
  }
  return nb::ndarray<nb::numpy>(p, shape.size(), shape.data(), owner, nullptr, t).cast();
}

nb::object NewOutput(Framework framework, DType dtype, const Shape4& shape, bool bshd,
                     MutableTensorView* view) {
  void* data = nullptr;
  const auto u = [&](int d) { return static_cast<size_t>(shape[d]); };
  nb::object array = bshd ? NewArray(framework, dtype, {u(0), u(2), u(1), u(3)}, &data)
                          : NewArray(framework, dtype, {u(0), u(1), u(2), u(3)}, &data);
  *view = bshd ? MutableTensorView::FromBSHD(data, dtype, shape[0], shape[2], shape[1], shape[3])
               : MutableTensorView::Contiguous(data, dtype, shape);
  return array;
}

bool ParseLayout(const std::string& layout) {
  if (layout == "bhsd") return false;
  if (layout == "bshd") return true;
  throw Error("layout: '" + layout + "' (expected 'bhsd' or 'bshd')");
}

}  // namespace qkv::python
