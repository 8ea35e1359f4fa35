// The qkv Python extension (module qkv._qkv, re-exported by qkv/__init__.py):
// attention and its backward on NumPy arrays and torch tensors without
// copies, the GIL released while the library computes. Every qkv::Error
// becomes a ValueError carrying the library's one-line message; the library
// validates before writing, so an error leaves caller-provided outputs as
// they were. KV caches, decode, merge and the memory planner: cache.cc.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "arrays.h"
#include "bindings.h"
#include "qkv/attention.h"
#include "qkv/attention_backward.h"
#include "qkv/error.h"
#include "qkv/version.h"

namespace qkv::python {
namespace {

using namespace nb::literals;

constexpr const char* kMaskDTypes = "bool, float32, float16 or float64";

// The keyword options shared by attention and attention_backward, parsed
// once per call.
struct Options {
  MaskSpec mask;
  std::vector<int64_t> key_lengths;  // storage behind mask.key_lengths
  std::optional<Array> mask_array;
  std::optional<double> scale;
  Kernel kernel = Kernel::kAuto;
  std::optional<Accumulate> accumulate;  // default: float64 for float64 q
  int threads = 0;
  bool bshd = false;
};

void ParseCausal(nb::handle causal, MaskSpec* spec) {
  if (causal.is_none() || (nb::isinstance<nb::bool_>(causal) && !nb::cast<bool>(causal))) return;
  if (nb::isinstance<nb::str>(causal)) {
    const std::string s = nb::cast<std::string>(causal);
    if (s == "bottom_right" || s == "top_left") {
      spec->causal = true;
      spec->alignment = s == "top_left" ? Alignment::kTopLeft : Alignment::kBottomRight;
      return;
    }
    throw Error("causal: '" + s + "' (expected None, 'bottom_right' or 'top_left')");
  }
  if (nb::isinstance<nb::bool_>(causal)) {
    throw Error(
        "causal: True is ambiguous (expected 'bottom_right' as FlashAttention >= 2.1 and KV-cache "
        "decoding align it, or 'top_left' as torch's is_causal)");
  }
  throw Error("causal: " + PyStr(causal.type().attr("__name__")) +
              " (expected None, 'bottom_right' or 'top_left')");
}

void ParseWindow(nb::handle window, MaskSpec* spec) {
  if (window.is_none()) return;
  const char* expected =
      " (expected None or a pair (left, right) of ints, -1 or None = unbounded on that side)";
  if (!nb::isinstance<nb::tuple>(window) && !nb::isinstance<nb::list>(window)) {
    throw Error(std::string("window: ") + PyStr(window.type().attr("__name__")) + expected);
  }
  nb::sequence seq = nb::borrow<nb::sequence>(window);
  if (nb::len(seq) != 2)
    throw Error("window: " + std::to_string(nb::len(seq)) + " values" + expected);
  int64_t side[2];
  for (int i = 0; i < 2; ++i) {
    nb::object x = seq[i];
    if (x.is_none()) {
      side[i] = -1;
    } else if (!nb::isinstance<nb::bool_>(x) && PyIndex_Check(x.ptr())) {
      side[i] = nb::cast<int64_t>(nb::steal(PyNumber_Index(x.ptr())));  // int, numpy ints
    } else {
      throw Error(std::string("window: ") + PyStr(x.type().attr("__name__")) + expected);
    }
  }
  spec->window_left = side[0];
  spec->window_right = side[1];
}

void ParseKeyLengths(nb::handle key_lengths, Options* o) {
  if (key_lengths.is_none()) return;
  if (!nb::isinstance<nb::list>(key_lengths) && !nb::isinstance<nb::tuple>(key_lengths)) {
    const Array a = AsArray(key_lengths, "key_lengths", "int32 or int64");
    const DType dt = a.dtype();
    if (a.ndim() != 1 || (dt != DType::kInt32 && dt != DType::kInt64)) {
      throw Error("key_lengths: " + std::to_string(a.ndim()) + "-D " + DTypeName(dt) +
                  " array (expected a 1-D int32 or int64 array [batch])");
    }
    const auto* base = static_cast<const uint8_t*>(a.data());
    for (size_t i = 0; i < a.shape(0); ++i) {
      const int64_t off = static_cast<int64_t>(i) * a.stride(0);
      o->key_lengths.push_back(dt == DType::kInt64 ? reinterpret_cast<const int64_t*>(base)[off]
                                                   : reinterpret_cast<const int32_t*>(base)[off]);
    }
  } else if (!nb::try_cast(key_lengths, o->key_lengths)) {
    throw Error("key_lengths: " + PyStr(key_lengths.type().attr("__name__")) +
                " (expected a sequence or 1-D integer array of [batch] ints)");
  }
  o->mask.key_lengths = o->key_lengths;
}

Options ParseOptions(nb::handle causal, nb::handle window, std::optional<Array> mask,
                     nb::handle key_lengths, std::optional<double> scale, const std::string& layout,
                     const std::string& kernel, const std::optional<std::string>& accumulate,
                     int threads) {
  Options o;
  o.bshd = ParseLayout(layout);
  ParseCausal(causal, &o.mask);
  ParseWindow(window, &o.mask);
  ParseKeyLengths(key_lengths, &o);
  o.mask_array = std::move(mask);
  o.scale = scale;
  o.kernel = KernelFromName(kernel);
  if (accumulate) {
    if (*accumulate == "float32") {
      o.accumulate = Accumulate::kFloat32;
    } else if (*accumulate == "float64") {
      o.accumulate = Accumulate::kFloat64;
    } else {
      throw Error("accumulate: '" + *accumulate + "' (expected None, 'float32' or 'float64')");
    }
  }
  if (threads < 0 || threads > 1024) {
    throw Error("threads: " + std::to_string(threads) +
                " (expected 0 = OpenMP's default, or a count of 1 to 1024)");
  }
  o.threads = threads;
  return o;
}

// float64 inputs accumulate in float64 unless told otherwise: a float64
// caller asked for float64 results.
Accumulate ResolveAccumulate(const Options& o, DType q_dtype) {
  if (o.accumulate) return *o.accumulate;
  return q_dtype == DType::kFloat64 ? Accumulate::kFloat64 : Accumulate::kFloat32;
}

// Calls this small keep the GIL: they finish within microseconds, about
// what releasing and taking it back costs (~0.5 us here), which is most of
// the binding's overhead at B=H=1, N=16, D=64 (BENCHMARKS.md, issue 13).
bool Tiny(const Shape4& q, int64_t seq_kv, int64_t head_dim_v) {
  const double work = static_cast<double>(q[0]) * q[1] * q[2] * seq_kv * (q[3] + head_dim_v);
  return work <= 65536.0;
}

// Output dtype of lse and weights: float64 for float64 accumulation.
DType StatDType(Accumulate a) {
  return a == Accumulate::kFloat64 ? DType::kFloat64 : DType::kFloat32;
}

void ResolveMask(Options& o, const Shape4& target) {
  if (o.mask_array) o.mask.mask = MaskView(*o.mask_array, target);
}

// Fills what AttentionParams and AttentionBackwardParams share: the views of
// q, k, v (in o's layout), the mask broadcast to their sizes, scale,
// kernel, accumulation and threads.
template <class Params>
void FillCommon(Options& o, const Array& q, const Array& k, const Array& v, Params* p) {
  p->q = InView(q, "q", o.bshd);
  p->k = InView(k, "k", o.bshd);
  p->v = InView(v, "v", o.bshd);
  ResolveMask(o, {p->q.shape[0], p->q.shape[1], p->q.shape[2], p->k.shape[2]});
  p->mask = o.mask;
  p->scale = o.scale;
  p->kernel = o.kernel;
  p->accumulate = ResolveAccumulate(o, p->q.dtype);
  p->num_threads = o.threads;
}

TensorView LseView(const Array& a) {
  if (a.ndim() != 3 && !(a.ndim() == 4 && a.shape(3) == 1)) {
    throw Error("lse: " + std::to_string(a.ndim()) +
                "-D array (expected [batch, num_q_heads, seq_q] as attention returns it)");
  }
  TensorView v;
  v.data = a.data();
  v.dtype = a.dtype();
  for (int d = 0; d < 3; ++d)
    v.shape[d] = static_cast<int64_t>(a.shape(d)), v.strides[d] = a.stride(d);
  v.shape[3] = 1;
  v.strides[3] = a.ndim() == 4 ? a.stride(3) : 1;
  return v;
}

nb::object Attend(nb::handle q_obj, nb::handle k_obj, nb::handle v_obj, nb::handle causal,
                  nb::handle window, nb::handle mask, nb::handle key_lengths,
                  std::optional<double> scale, const std::string& layout, const std::string& kernel,
                  const std::optional<std::string>& accumulate, int threads, bool return_lse,
                  bool return_weights, bool return_info, nb::handle out) {
  const Array q = AsArray(q_obj, "q"), k = AsArray(k_obj, "k"), v = AsArray(v_obj, "v");
  Options o = ParseOptions(causal, window, AsOptionalArray(mask, "mask", kMaskDTypes), key_lengths,
                           scale, layout, kernel, accumulate, threads);
  const Framework fw = FrameworkOf(q_obj);
  AttentionParams p;
  FillCommon(o, q, k, v, &p);
  const Shape4 out_shape{p.q.shape[0], p.q.shape[1], p.q.shape[2], p.v.shape[3]};
  nb::object out_obj, lse_obj, weights_obj;
  std::optional<Array> out_array;
  if (!out.is_none()) {
    out_array = AsOutArray(out, "out");
    p.out = OutView(*out_array, "out", o.bshd);
    out_obj = nb::borrow(out);
  } else {
    out_obj = NewOutput(fw, p.q.dtype, out_shape, o.bshd, &p.out);
  }
  const DType stat = StatDType(p.accumulate);
  if (return_lse) {
    void* data = nullptr;
    lse_obj = NewArray(fw, stat, {size_t(out_shape[0]), size_t(out_shape[1]), size_t(out_shape[2])},
                       &data);
    p.lse =
        MutableTensorView::Contiguous(data, stat, {out_shape[0], out_shape[1], out_shape[2], 1});
  }
  if (return_weights) {
    const Shape4 w{out_shape[0], out_shape[1], out_shape[2], p.k.shape[2]};
    void* data = nullptr;
    weights_obj =
        NewArray(fw, stat, {size_t(w[0]), size_t(w[1]), size_t(w[2]), size_t(w[3])}, &data);
    p.weights = MutableTensorView::Contiguous(data, stat, w);
  }
  AttentionInfo info;
  if (Tiny(p.q.shape, p.k.shape[2], p.v.shape[3])) {
    info = Attention(p);
  } else {
    nb::gil_scoped_release release;
    info = Attention(p);
  }
  if (!return_lse && !return_weights && !return_info) return out_obj;
  nb::list result;
  result.append(out_obj);
  if (return_lse) result.append(lse_obj);
  if (return_weights) result.append(weights_obj);
  if (return_info) result.append(InfoDict(info));
  return nb::tuple(result);
}

nb::object AttendBackward(nb::handle q_obj, nb::handle k_obj, nb::handle v_obj, nb::handle out_obj,
                          nb::handle dout_obj, nb::handle lse_obj, nb::handle causal,
                          nb::handle window, nb::handle mask, nb::handle key_lengths,
                          std::optional<double> scale, const std::string& layout,
                          const std::string& kernel, const std::optional<std::string>& accumulate,
                          int threads, bool return_dmask, bool return_info) {
  const Array q = AsArray(q_obj, "q"), k = AsArray(k_obj, "k"), v = AsArray(v_obj, "v");
  const std::optional<Array> out = AsOptionalArray(out_obj, "out");
  const Array dout = AsArray(dout_obj, "dout");
  const std::optional<Array> lse = AsOptionalArray(lse_obj, "lse");
  Options o = ParseOptions(causal, window, AsOptionalArray(mask, "mask", kMaskDTypes), key_lengths,
                           scale, layout, kernel, accumulate, threads);
  const Framework fw = FrameworkOf(q_obj);
  AttentionBackwardParams p;
  FillCommon(o, q, k, v, &p);
  if (out) p.out = InView(*out, "out", o.bshd);
  p.dout = InView(dout, "dout", o.bshd);
  if (lse) p.lse = LseView(*lse);
  nb::object dq = NewOutput(fw, p.q.dtype, p.q.shape, o.bshd, &p.dq);
  nb::object dk = NewOutput(fw, p.k.dtype, p.k.shape, o.bshd, &p.dk);
  nb::object dv = NewOutput(fw, p.v.dtype, p.v.shape, o.bshd, &p.dv);
  nb::object dmask;
  if (return_dmask) {
    if (!o.mask_array)
      throw Error("return_dmask: True without a mask (expected an additive float mask)");
    const std::vector<size_t> own = MaskOwnShape(*o.mask_array);
    Shape4 own4{1, 1, 1, 1};
    for (size_t i = 0; i < own.size(); ++i) own4[4 - own.size() + i] = static_cast<int64_t>(own[i]);
    void* data = nullptr;
    dmask = NewArray(fw, p.mask.mask.dtype, own, &data);
    p.dmask = MutableTensorView::Contiguous(data, p.mask.mask.dtype, own4);
  }
  AttentionInfo info;
  {
    nb::gil_scoped_release release;
    info = AttentionBackward(p);
  }
  nb::list result;
  result.append(dq);
  result.append(dk);
  result.append(dv);
  if (return_dmask) result.append(dmask);
  if (return_info) result.append(InfoDict(info));
  return nb::tuple(result);
}

}  // namespace

nb::dict InfoDict(const AttentionInfo& info) {
  nb::dict d;
  d["kernel"] = KernelName(info.kernel);
  d["reason"] = info.reason;
  d["scratch_bytes"] = info.scratch_bytes;
  d["threads"] = info.threads;
  d["simd_target"] = info.simd_target;
  return d;
}

void BindAttention(nb::module_& m) {
  m.def("attention", &Attend, "q"_a.none(), "k"_a.none(), "v"_a.none(), nb::kw_only(),
        "causal"_a.none() = nb::none(), "window"_a.none() = nb::none(),
        "mask"_a.none() = nb::none(), "key_lengths"_a.none() = nb::none(),
        "scale"_a.none() = nb::none(), "layout"_a = "bhsd", "kernel"_a = "auto",
        "accumulate"_a.none() = nb::none(), "threads"_a = 0, "return_lse"_a = false,
        "return_weights"_a = false, "return_info"_a = false, "out"_a.none() = nb::none(),
        nb::sig("def attention(q: numpy.typing.ArrayLike, k: numpy.typing.ArrayLike, v: "
                "numpy.typing.ArrayLike, *, "
                "causal: str | None = None, window: tuple[int | None, int | None] | None = None, "
                "mask: numpy.typing.ArrayLike | None = None, key_lengths: numpy.typing.ArrayLike | "
                "collections.abc.Sequence[int] | None = None, "
                "scale: float | None = None, layout: str = 'bhsd', kernel: str = 'auto', "
                "accumulate: str | None = None, threads: int = 0, return_lse: bool = False, "
                "return_weights: bool = False, return_info: bool = False, "
                "out: numpy.typing.ArrayLike | None = None) -> typing.Any"),
        R"(Scaled dot-product attention: softmax(scale * q @ k^T + mask) @ v.

q [batch, num_q_heads, seq_q, head_dim], k [batch, num_kv_heads, seq_kv, head_dim],
v [batch, num_kv_heads, seq_kv, head_dim_v] (layout 'bhsd'; 'bshd' swaps heads and
seq in memory), float32/float16/float64 NumPy arrays or CPU torch tensors of any
strides, read in place (no copy). num_q_heads a multiple of num_kv_heads (GQA/MQA).

causal: None, 'bottom_right' (last query on last key: FlashAttention >= 2.1, KV-cache
decoding) or 'top_left' (torch's is_causal). window: (left, right) keys each side of
the diagonal, -1/None unbounded; it follows causal's alignment (bottom-right without
causal). mask: bool (True = attend) or additive float, broadcast to
[batch, num_q_heads, seq_q, seq_kv]. key_lengths: [batch] valid keys (padding after).
scale: default 1/sqrt(head_dim). kernel: 'auto', 'flash' or 'reference'.
accumulate: 'float32' or 'float64' (default: float64 for float64 q, via the reference
kernel). threads: 0 = OpenMP's default; results are bitwise identical for any count.

Returns out (q's dtype and layout; a new array of q's framework, or `out` if given),
or a tuple (out[, lse][, weights][, info]): lse [batch, num_q_heads, seq_q] natural-log
log-sum-exp (-inf for a row with no key), weights the softmax probabilities, info a
dict naming the kernel that ran and why. Rows with no allowed key are zero, never NaN.
Raises ValueError with qkv's one-line message; nothing is written on error.)");

  m.def("attention_backward", &AttendBackward, "q"_a.none(), "k"_a.none(), "v"_a.none(),
        "out"_a.none(), "dout"_a.none(), "lse"_a.none() = nb::none(), nb::kw_only(),
        "causal"_a.none() = nb::none(), "window"_a.none() = nb::none(),
        "mask"_a.none() = nb::none(), "key_lengths"_a.none() = nb::none(),
        "scale"_a.none() = nb::none(), "layout"_a = "bhsd", "kernel"_a = "auto",
        "accumulate"_a.none() = nb::none(), "threads"_a = 0, "return_dmask"_a = false,
        "return_info"_a = false,
        nb::sig("def attention_backward(q: numpy.typing.ArrayLike, k: numpy.typing.ArrayLike, v: "
                "numpy.typing.ArrayLike, "
                "out: numpy.typing.ArrayLike | None, dout: numpy.typing.ArrayLike, lse: "
                "numpy.typing.ArrayLike | None = None, *, "
                "causal: str | None = None, window: tuple[int | None, int | None] | None = None, "
                "mask: numpy.typing.ArrayLike | None = None, key_lengths: numpy.typing.ArrayLike | "
                "collections.abc.Sequence[int] | None = None, "
                "scale: float | None = None, layout: str = 'bhsd', kernel: str = 'auto', "
                "accumulate: str | None = None, threads: int = 0, return_dmask: bool = False, "
                "return_info: bool = False) -> tuple[typing.Any, ...]"),
        R"(Gradients of attention: (dq, dk, dv[, dmask][, info]).

q, k, v and every option as in attention(); out and lse are the forward's (either may
be None: the forward is then recomputed and info['reason'] says so); dout = dL/dout in
out's shape and layout. dq, dk, dv come in q's, k's and v's dtype and layout (dk, dv
summed over each GQA group). return_dmask: also the gradient of an additive float mask,
in the mask's own shape with its broadcast (size-1 or stride-0) dims summed. Results are
bitwise identical for any thread count. Raises ValueError with qkv's one-line message.)");
}

}  // namespace qkv::python

NB_MODULE(_qkv, m) {
  namespace nb = nanobind;
  m.doc() = "qkv: exact, fast attention (the C++ library's bindings; import qkv instead)";
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const qkv::Error& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });
  m.attr("__version__") = QKV_VERSION;
  m.def("build_info", &qkv::BuildInfo,
        "One line: the version, git revision, compiler, build type, the SIMD targets compiled "
        "and the one running (as `qkv --version` prints it).");
  qkv::python::BindAttention(m);
  qkv::python::BindCache(m);
}
