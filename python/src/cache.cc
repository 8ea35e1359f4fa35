// Python bindings: KV caches, decode, merging partials and the memory
// planner (qkv/kv_cache.h, qkv/decode.h, qkv/memory_plan.h).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "arrays.h"
#include "bindings.h"
#include "qkv/decode.h"
#include "qkv/error.h"
#include "qkv/kv_cache.h"
#include "qkv/memory_plan.h"
#include "qkv/positional.h"

namespace qkv::python {
namespace {

using namespace nb::literals;

std::string S(int64_t v) { return std::to_string(v); }

// qkv.KvCache: the library's cache and the number of decode calls reading
// it right now. decode releases the GIL while it reads the cache's memory;
// an append, fork or free from another thread meanwhile could move or free
// that memory, so those refuse (ValueError) while readers > 0. Both sides
// touch `readers` with the GIL held, so no lock is needed.
struct PyKvCache {
  explicit PyKvCache(const KvCacheConfig& config) : cache(config) {}
  KvCache cache;
  int readers = 0;

  KvCache& Writable(const char* what) {
    if (readers > 0) {
      throw Error(std::string(what) +
                  ": the cache is being read by a decode call on another thread " +
                  "(expected to change it after that call returns)");
    }
    return cache;
  }
};

// Counts a decode call as a reader of its caches for its lifetime (created
// and destroyed with the GIL held).
class ReadGuard {
 public:
  explicit ReadGuard(std::vector<PyKvCache*> caches) : caches_(std::move(caches)) {
    for (PyKvCache* c : caches_) ++c->readers;
  }
  ~ReadGuard() {
    for (PyKvCache* c : caches_) --c->readers;
  }
  ReadGuard(const ReadGuard&) = delete;
  ReadGuard& operator=(const ReadGuard&) = delete;

 private:
  std::vector<PyKvCache*> caches_;
};

// The kinds as Python spells them, for parsing and for config().
constexpr std::pair<const char*, CacheKind> kKinds[] = {{"contiguous", CacheKind::kContiguous},
                                                       {"sliding", CacheKind::kSliding},
                                                       {"sinks", CacheKind::kSinks},
                                                       {"paged", CacheKind::kPaged}};

CacheKind ParseKind(const std::string& kind) {
  for (const auto& [name, k] : kKinds) {
    if (kind == name) return k;
  }
  throw Error("kind: '" + kind + "' (expected 'contiguous', 'sliding', 'sinks' or 'paged')");
}

const char* KindName(CacheKind kind) {
  for (const auto& [name, k] : kKinds) {
    if (kind == k) return name;
  }
  return "?";
}

// The storage dtypes, by the library's own names (DTypeName).
DType ParseCacheDType(const std::string& dtype) {
  for (DType d : {DType::kFloat32, DType::kFloat16, DType::kBFloat16, DType::kInt8}) {
    if (dtype == DTypeName(d)) return d;
  }
  throw Error("dtype: '" + dtype + "' (expected 'float32', 'float16', 'bfloat16' or 'int8')");
}

// k or v of an append: [num_kv_heads, n, head_dim] ('bhsd') or
// [n, num_kv_heads, head_dim] ('bshd'), optionally with a leading batch dim
// of 1, as the library's [1, num_kv_heads, n, head_dim] view.
TensorView TokensView(nb::handle obj, const char* name, bool bshd) {
  const Array a = AsArray(obj, name);
  const size_t rank = a.ndim();
  if (rank != 3 && !(rank == 4 && a.shape(0) == 1)) {
    throw Error(std::string(name) + ": " + S(static_cast<int64_t>(rank)) + "-D array (expected " +
                (bshd ? "[n, num_kv_heads, head_dim]" : "[num_kv_heads, n, head_dim]") +
                ", or with a leading batch dim of 1)");
  }
  const size_t base = rank - 3;
  TensorView v;
  v.data = a.data();
  v.dtype = a.dtype();
  const size_t heads = base + (bshd ? 1 : 0), seq = base + (bshd ? 0 : 1);
  v.shape = {1, static_cast<int64_t>(a.shape(heads)), static_cast<int64_t>(a.shape(seq)),
             static_cast<int64_t>(a.shape(base + 2))};
  v.strides = {0, a.stride(heads), a.stride(seq), a.stride(base + 2)};
  return v;
}

nb::dict ConfigDict(const KvCacheConfig& c) {
  nb::dict d;
  d["kind"] = KindName(c.kind);
  d["dtype"] = DTypeName(c.dtype);
  d["num_kv_heads"] = c.num_kv_heads;
  d["head_dim"] = c.head_dim;
  d["capacity"] = c.capacity;
  d["window"] = c.window;
  d["num_sinks"] = c.num_sinks;
  d["block_size"] = c.block_size;
  d["num_blocks"] = c.num_blocks;
  return d;
}

nb::object Decode(nb::handle q_obj, nb::handle caches, nb::handle seqs, std::optional<double> scale,
                  int64_t window, int64_t split_tokens, int threads, const std::string& layout,
                  bool return_lse, bool return_info) {
  const bool bshd = ParseLayout(layout);
  const Array q = AsArray(q_obj, "q");
  DecodeParams p;
  p.q = InView(q, "q", bshd);
  const int64_t batch = p.q.shape[0];
  // One cache for the whole batch (sequence b = seqs[b], default b), or a
  // list of (cache, sequence) pairs.
  std::vector<KvSequenceView> views;
  std::vector<PyKvCache*> readers;
  if (nb::isinstance<PyKvCache>(caches)) {
    PyKvCache& py_cache = nb::cast<PyKvCache&>(caches);
    readers.push_back(&py_cache);
    const KvCache& cache = py_cache.cache;
    std::vector<int64_t> ids;
    if (seqs.is_none()) {
      for (int64_t b = 0; b < batch; ++b) ids.push_back(b);
    } else if (!nb::try_cast(seqs, ids)) {
      throw Error("seqs: expected a sequence of sequence ids, one per batch row");
    }
    if (static_cast<int64_t>(ids.size()) != batch) {
      throw Error("seqs: " + S(static_cast<int64_t>(ids.size())) + " ids for q's batch " +
                  S(batch) + " (expected one sequence per batch row)");
    }
    for (int64_t id : ids) views.push_back(cache.View(id));
  } else if (nb::isinstance<nb::list>(caches) || nb::isinstance<nb::tuple>(caches)) {
    if (!seqs.is_none())
      throw Error("seqs: given with a list of (cache, seq) pairs (expected None)");
    for (nb::handle item : caches) {
      if (!nb::isinstance<nb::tuple>(item) || nb::len(item) != 2 ||
          !nb::isinstance<PyKvCache>(item[0])) {
        throw Error("cache: a list whose items are not (KvCache, seq) pairs");
      }
      PyKvCache& py_cache = nb::cast<PyKvCache&>(item[0]);
      readers.push_back(&py_cache);
      views.push_back(py_cache.cache.View(nb::cast<int64_t>(item[1])));
    }
  } else {
    throw Error("cache: " + PyStr(caches.type().attr("__name__")) +
                " (expected a KvCache or a list of (KvCache, seq) pairs)");
  }
  p.sequences = views;
  p.scale = scale;
  p.window = window;
  p.split_tokens = split_tokens;
  p.num_threads = threads;
  const Framework fw = FrameworkOf(q_obj);
  nb::object out = NewOutput(fw, p.q.dtype, p.q.shape, bshd, &p.out);
  nb::object lse;
  if (return_lse) {
    void* data = nullptr;
    const Shape4& s = p.q.shape;
    lse = NewArray(fw, DType::kFloat32, {size_t(s[0]), size_t(s[1]), size_t(s[2])}, &data);
    p.lse = MutableTensorView::Contiguous(data, DType::kFloat32, {s[0], s[1], s[2], 1});
  }
  DecodeInfo info;
  {
    const ReadGuard guard(readers);
    nb::gil_scoped_release release;
    info = qkv::Decode(p);
  }
  if (!return_lse && !return_info) return out;
  nb::list result;
  result.append(out);
  if (return_lse) result.append(lse);
  if (return_info) {
    nb::dict d;
    d["splits"] = info.splits;
    d["kv_bytes_read"] = info.kv_bytes_read;
    d["threads"] = info.threads;
    d["simd_target"] = info.simd_target;
    d["path"] = info.path;
    result.append(d);
  }
  return nb::tuple(result);
}

// Copies a float array into a float32 vector (merge_partials is O(n * dim)).
std::vector<float> Floats(nb::handle obj, const char* name, size_t rank) {
  const Array a = AsArray(obj, name);
  const DType dt = a.dtype();
  if (a.ndim() != rank || (dt != DType::kFloat32 && dt != DType::kFloat64)) {
    throw Error(std::string(name) + ": " + S(static_cast<int64_t>(a.ndim())) + "-D " +
                DTypeName(dt) + " array (expected " + (rank == 2 ? "[n, head_dim_v]" : "[n]") +
                " float32 or float64)");
  }
  std::vector<float> values;
  const auto* base = static_cast<const uint8_t*>(a.data());
  const size_t rows = a.shape(0), cols = rank == 2 ? a.shape(1) : 1;
  for (size_t i = 0; i < rows; ++i) {
    for (size_t j = 0; j < cols; ++j) {
      const int64_t off = static_cast<int64_t>(i) * a.stride(0) +
                          (rank == 2 ? static_cast<int64_t>(j) * a.stride(1) : 0);
      values.push_back(dt == DType::kFloat32
                           ? reinterpret_cast<const float*>(base)[off]
                           : static_cast<float>(reinterpret_cast<const double*>(base)[off]));
    }
  }
  return values;
}

nb::tuple MergePartials(nb::handle out_parts, nb::handle lse_parts) {
  const std::vector<float> outs = Floats(out_parts, "out_parts", 2);
  const std::vector<float> lses = Floats(lse_parts, "lse_parts", 1);
  const Array o = AsArray(out_parts, "out_parts");
  const int64_t n = static_cast<int64_t>(o.shape(0)), dim = static_cast<int64_t>(o.shape(1));
  if (static_cast<int64_t>(lses.size()) != n) {
    throw Error("lse_parts: " + S(static_cast<int64_t>(lses.size())) + " values for " + S(n) +
                " partials (expected one per row of out_parts)");
  }
  void* data = nullptr;
  nb::object out = NewArray(Framework::kNumpy, DType::kFloat32, {size_t(dim)}, &data);
  float lse = 0.0f;
  MergeAttentionPartials(outs, lses, dim, {static_cast<float*>(data), size_t(dim)}, &lse);
  return nb::make_tuple(out, lse);
}

// A planner figure, None when it exceeds 2^63 - 1.
nb::object Figure(int64_t v) {
  return v == kMemoryPlanOverflow ? nb::none() : nb::cast(v);
}

nb::dict MemoryPlanDict(std::optional<std::string> preset, std::optional<int64_t> layers,
                        std::optional<int64_t> heads, std::optional<int64_t> kv_heads,
                        std::optional<int64_t> head_dim, std::optional<int64_t> window, int64_t seq,
                        int64_t batch, const std::string& dtype, int threads) {
  MemoryPlanConfig c;
  c.preset = preset.value_or("");
  c.layers = layers, c.heads = heads, c.kv_heads = kv_heads, c.head_dim = head_dim;
  c.window = window, c.seq = seq, c.batch = batch, c.dtype = dtype, c.threads = threads;
  const MemoryPlan p = PlanMemory(c);
  nb::dict d;
  d["preset"] = p.config.preset;
  d["layers"] = p.layers;
  d["heads"] = p.heads;
  d["kv_heads"] = p.kv_heads;
  d["head_dim"] = p.head_dim;
  d["window"] = p.window;
  d["seq"] = p.config.seq;
  d["batch"] = p.config.batch;
  d["dtype"] = p.config.dtype;
  d["threads"] = p.config.threads;
  d["cached_tokens"] = p.cached_tokens;
  d["kv_cache_bytes_per_token"] = Figure(p.kv_cache_bytes_per_token);
  d["kv_cache_bytes"] = Figure(p.kv_cache_bytes);
  d["score_matrix_bytes_per_layer"] = Figure(p.score_matrix_bytes_per_layer);
  d["flash_working_set_bytes_per_thread"] = p.flash_working_set_bytes_per_thread;
  d["flash_working_set_bytes"] = Figure(p.flash_working_set_bytes);
  d["attention_flops_per_token"] = Figure(p.attention_flops_per_token);
  return d;
}

}  // namespace

void BindCache(nb::module_& m) {
  nb::class_<PyKvCache>(m, "KvCache",
                        R"(Keys and values of one attention layer for any number of sequences.

kind: 'contiguous' (up to `capacity` tokens per sequence), 'sliding' (ring of the last
`window` tokens), 'sinks' (StreamingLLM: first `num_sinks` kept plus the last `window`)
or 'paged' (blocks of `block_size` tokens from a pool of `num_blocks`; fork shares
blocks copy-on-write). dtype: 'float32', 'float16', 'bfloat16' or 'int8' (symmetric,
one float32 scale per token and kv head). Token t of a sequence has position t.)")
      .def(
          "__init__",
          [](PyKvCache* self, const std::string& kind, int64_t num_kv_heads, int64_t head_dim,
             const std::string& dtype, int64_t capacity, int64_t window, int64_t num_sinks,
             int64_t block_size, int64_t num_blocks) {
            KvCacheConfig c;
            c.kind = ParseKind(kind);
            c.dtype = ParseCacheDType(dtype);
            c.num_kv_heads = num_kv_heads, c.head_dim = head_dim, c.capacity = capacity;
            c.window = window, c.num_sinks = num_sinks, c.block_size = block_size;
            c.num_blocks = num_blocks;
            new (self) PyKvCache(c);
          },
          "kind"_a = "contiguous", nb::kw_only(), "num_kv_heads"_a, "head_dim"_a,
          "dtype"_a = "float32", "capacity"_a = 0, "window"_a = 0, "num_sinks"_a = 0,
          "block_size"_a = 16, "num_blocks"_a = 0)
      .def(
          "add_sequence",
          [](PyKvCache& self) { return self.Writable("add_sequence").AddSequence(); },
          "Returns the id of a new empty sequence.")
      .def(
          "fork_sequence",
          [](PyKvCache& self, int64_t parent) {
            return self.Writable("fork_sequence").ForkSequence(parent);
          },
          "parent"_a, "Returns a new sequence holding parent's tokens (paged: shared blocks).")
      .def(
          "free_sequence",
          [](PyKvCache& self, int64_t seq) { self.Writable("free_sequence").FreeSequence(seq); },
          "seq"_a, "Frees a sequence.")
      .def(
          "append",
          [](PyKvCache& self, int64_t seq, nb::handle k, nb::handle v, const std::string& layout) {
            const bool bshd = ParseLayout(layout);
            self.Writable("append").Append(seq, TokensView(k, "k", bshd), TokensView(v, "v", bshd));
          },
          "seq"_a, "k"_a, "v"_a, nb::kw_only(), "layout"_a = "bhsd",
          R"(Appends n tokens: k, v [num_kv_heads, n, head_dim] (layout 'bhsd') or
[n, num_kv_heads, head_dim] ('bshd'), float32/float16/float64, any strides; converted to
the cache's dtype. Raises ValueError (nothing stored) on a bad shape, an unknown
sequence, a full contiguous cache or an exhausted paged pool.)")
      .def(
          "append_with_rope",
          [](PyKvCache& self, int64_t seq, nb::handle k, nb::handle v, const std::string& style,
             double base, int64_t rotary_dim, const std::string& layout) {
            const bool bshd = ParseLayout(layout);
            RopeParams rope;
            if (style == "neox") {
              rope.style = RopeStyle::kNeox;
            } else if (style == "gptj") {
              rope.style = RopeStyle::kGptJ;
            } else {
              throw Error("style: '" + style + "' (expected 'neox' or 'gptj')");
            }
            rope.base = base;
            rope.rotary_dim = rotary_dim;
            KvCache& cache = self.Writable("append_with_rope");
            rope.offset = cache.Length(seq);
            AppendWithRope(cache, seq, TokensView(k, "k", bshd), TokensView(v, "v", bshd), rope);
          },
          "seq"_a, "k"_a, "v"_a, nb::kw_only(), "style"_a = "neox", "base"_a = kDefaultRopeBase,
          "rotary_dim"_a = 0, "layout"_a = "bhsd",
          R"(Appends like append(), with the keys rotated by RoPE at their absolute
positions length(seq), ..., length(seq) + n - 1 first (style 'neox' or 'gptj',
rotary_dim 0 = head_dim).)")
      .def(
          "length", [](const PyKvCache& self, int64_t seq) { return self.cache.Length(seq); },
          "seq"_a, "Tokens ever appended to seq (the next position).")
      .def(
          "kept", [](const PyKvCache& self, int64_t seq) { return self.cache.Kept(seq); }, "seq"_a,
          "Tokens held for seq now (after eviction).")
      .def_prop_ro(
          "bytes_allocated", [](const PyKvCache& self) { return self.cache.BytesAllocated(); },
          "K/V bytes allocated now.")
      .def_prop_ro(
          "free_blocks", [](const PyKvCache& self) { return self.cache.FreeBlocks(); },
          "Paged: blocks on the free list.")
      .def_prop_ro(
          "config", [](const PyKvCache& self) { return ConfigDict(self.cache.config()); },
          "The configuration as a dict.");

  m.def("decode", &Decode, "q"_a, "cache"_a, "seqs"_a.none() = nb::none(), nb::kw_only(),
        "scale"_a.none() = nb::none(), "window"_a = -1, "split_tokens"_a = 0, "threads"_a = 0,
        "layout"_a = "bhsd", "return_lse"_a = false, "return_info"_a = false,
        nb::sig("def decode(q: numpy.typing.ArrayLike, cache: KvCache | "
                "collections.abc.Sequence[tuple[KvCache, int]], "
                "seqs: collections.abc.Sequence[int] | None = None, *, scale: float | None = None, "
                "window: int = -1, split_tokens: int = 0, threads: int = 0, "
                "layout: str = 'bhsd', return_lse: bool = False, return_info: bool = False) -> "
                "typing.Any"),
        R"(Attention of new queries against KV caches (flash-decoding).

q [batch, num_q_heads, seq_q, head_dim]: row b's queries sit at the last seq_q positions
of its sequence (their K/V already appended) and attend causally. cache: one KvCache
with seqs (default 0 .. batch-1) or a list of (KvCache, seq) pairs. window: -1 or the
kept recent tokens. Returns out (or (out[, lse][, info])); bitwise identical for any
thread count.)");

  m.def("merge_partials", &MergePartials, "out_parts"_a, "lse_parts"_a,
        nb::sig("def merge_partials(out_parts: numpy.typing.ArrayLike, lse_parts: "
                "numpy.typing.ArrayLike) -> "
                "tuple[numpy.ndarray, float]"),
        R"(Merges n partial attention results of one query by log-sum-exp:
lse = log(sum exp(lse_i)), out = sum exp(lse_i - lse) * out_i, in index order.
out_parts [n, head_dim_v], lse_parts [n]. Returns (out float32 [head_dim_v], lse).)");

  m.def("memory_plan", &MemoryPlanDict, nb::kw_only(), "preset"_a.none() = nb::none(),
        "layers"_a.none() = nb::none(), "heads"_a.none() = nb::none(),
        "kv_heads"_a.none() = nb::none(), "head_dim"_a.none() = nb::none(),
        "window"_a.none() = nb::none(), "seq"_a, "batch"_a = 1, "dtype"_a = "f16", "threads"_a = 0,
        R"(What attention costs for a model configuration, as `qkv memory --json` prints it:
KV cache bytes, the naive score matrix per layer, the flash kernel's working set and
flops per generated token. preset: 'llama2-7b', 'llama3-8b', 'mistral-7b' or
'llama2-70b' (the other arguments override its fields). dtype: 'f32', 'f16', 'bf16'
or 'i8'. threads: those holding a flash working set, 0 = every core.)");
}

}  // namespace qkv::python
