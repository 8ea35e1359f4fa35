// Key/value caches: contiguous, sliding-window ring, attention sinks + ring,
// and a paged block pool with reference-counted forks (qkv/kv_cache.h).
//
// Every kind stores a token in one "slot". Slots come in groups (a ring
// kind's whole store is one group of s.slots slots; kPaged's groups are its
// blocks of block_size slots), and within a group each kv head's rows are
// contiguous: K and V each hold
//   [group, kv_head, slot in group, head_dim]  in the storage dtype
// (token_stride = head_dim, head_stride = group size * head_dim), and for
// kInt8 the scales [group, kv_head, slot in group] in float32, K and V
// separately. A chunk of a view is a run of consecutive slots of one group
// holding consecutive positions, so the decode kernel reads K/V in place, one
// contiguous run per kv head. Head-major rather than token-major
// ([slot, kv_head, head_dim]): the decode kernel then streams each (head,
// split) work item's K and V sequentially, which measured 1.2x (1 thread) to
// 1.3x (2 threads) faster at 64K tokens (B = 1, 32/8 heads, head_dim 128),
// since the token-major rows of one head sit 4 KiB apart, a new page per
// row for the hardware prefetchers.
//
// Ring kinds (kContiguous, kSliding, kSinks) share one per-sequence store of
// `num_sinks + window` slots at most; position p lives in slot
//   p                                    if p < num_sinks
//   num_sinks + (p - num_sinks) % window otherwise
// with num_sinks = 0 for kSliding and window = capacity for kContiguous (whose
// positions never wrap: appending past capacity is an error). The store grows
// by doubling, from kMinSlots, capped at num_sinks + window. Growth only
// happens while length <= num_sinks + window, i.e. before anything wraps, so
// the old slots are copied as they are. Rejected: allocating the whole bound
// at AddSequence, which costs a 32k-token capacity for every short sequence
// of a batch; doubling wastes at most half of a store and copies each token
// at most once on average (amortised O(1) per Append).
//
// Sequence ids are dense (0, 1, 2, ... in order of AddSequence and
// ForkSequence) and never reused: a freed id stays an error forever, so a
// stale id cannot silently read another sequence's tokens. A freed sequence
// releases its storage; only its bookkeeping entry (~150 bytes) remains.
#include "qkv/kv_cache.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <new>
#include <string>
#include <type_traits>

#include "qkv/error.h"

namespace qkv {
namespace {

// Every size field fits int32, as the dims of qkv::Attention.
constexpr int64_t kMaxField = (int64_t{1} << 31) - 1;
// First allocation of a ring store: 16 tokens of decode before the first copy,
// 2 KiB per kv head at head_dim 64 in float32; below that the doubling copies
// (1, 2, 4, 8 tokens) cost more calls than bytes.
constexpr int64_t kMinSlots = 16;
// Largest single allocation accepted (2^46 bytes = 64 TiB): anything above is
// a typo in the config, reported as such rather than as std::bad_alloc.
constexpr int64_t kMaxBytes = int64_t{1} << 46;

std::string S(int64_t v) { return std::to_string(v); }

bool IsStorageDType(DType d) {
  return d == DType::kFloat32 || d == DType::kFloat16 || d == DType::kBFloat16 ||
         d == DType::kInt8;
}

void CheckField(const char* name, int64_t value, int64_t min) {
  if (value < min || value > kMaxField) {
    throw Error(std::string("KvCacheConfig.") + name + ": " + S(value) + " (expected " + S(min) +
                " to 2^31 - 1)");
  }
}

// Checks the fields every kind uses: dtype, num_kv_heads, head_dim.
void CheckTokenFields(const KvCacheConfig& c) {
  if (!IsStorageDType(c.dtype)) {
    throw Error(std::string("KvCacheConfig.dtype: ") + DTypeName(c.dtype) +
                " is not a cache dtype (expected float32, float16, bfloat16 or int8)");
  }
  CheckField("num_kv_heads", c.num_kv_heads, 1);
  CheckField("head_dim", c.head_dim, 1);
  if (c.num_kv_heads * c.head_dim > kMaxField) {
    throw Error("KvCacheConfig.num_kv_heads: " + S(c.num_kv_heads) + " * head_dim " +
                S(c.head_dim) + " elements per token (expected at most 2^31 - 1)");
  }
}

// Rounds a double to float with round-to-odd: truncate, then set the lowest
// mantissa bit if anything was lost. A later round-to-nearest-even to a
// format with at most 24 - 2 = 22 bits (float16: 11, bfloat16: 8) then equals
// rounding the double directly; plain double -> float -> half rounds twice
// and gets 1 + 2^-11 + 2^-40 wrong (it becomes the tie 1 + 2^-11, then 1).
float RoundToOddFloat(double x) {
  float f = static_cast<float>(x);
  if (std::isnan(x) || static_cast<double>(f) == x) return f;
  if (std::fabs(static_cast<double>(f)) > std::fabs(x)) f = std::nextafter(f, 0.0f);
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  bits |= 1u;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Reads row (token t, kv head g) of a [1, num_kv_heads, n, head_dim] view
// into float32. float64 inputs are rounded to nearest even, or to odd when
// the storage then rounds again to float16/bfloat16 (see RoundToOddFloat).
void LoadRow(const TensorView& x, int64_t t, int64_t g, int64_t head_dim, bool round_to_odd,
             float* row) {
  const int64_t base = x.Offset(0, g, t, 0), step = x.strides[3];
  switch (x.dtype) {
    case DType::kFloat32: {
      const float* p = static_cast<const float*>(x.data) + base;
      for (int64_t d = 0; d < head_dim; ++d) row[d] = p[d * step];
      break;
    }
    case DType::kFloat16: {
      const uint16_t* p = static_cast<const uint16_t*>(x.data) + base;
      for (int64_t d = 0; d < head_dim; ++d) row[d] = HalfToFloat(p[d * step]);
      break;
    }
    default: {  // kFloat64 (validated)
      const double* p = static_cast<const double*>(x.data) + base;
      for (int64_t d = 0; d < head_dim; ++d) {
        row[d] = round_to_odd ? RoundToOddFloat(p[d * step]) : static_cast<float>(p[d * step]);
      }
      break;
    }
  }
}

// Writes one float32 row [head_dim] in the storage dtype at `dst`; for kInt8
// also its scale. Quantisation is symmetric per (token, kv head):
//   scale = max|x| / 127,  q = round_half_even(x / scale) in [-127, 127],
// all in float32, dequantised as q * scale. An all-zero row gives scale 0 and
// q = 0; so does a row whose max|x| / 127 underflows to 0 (max|x| < 127 *
// 2^-149), which then reads back as zeros, an error below 2^-142.
void StoreRow(DType dtype, const float* row, int64_t head_dim, void* dst, float* scale) {
  switch (dtype) {
    case DType::kFloat32:
      std::memcpy(dst, row, head_dim * sizeof(float));
      break;
    case DType::kFloat16: {
      uint16_t* p = static_cast<uint16_t*>(dst);
      for (int64_t d = 0; d < head_dim; ++d) p[d] = FloatToHalf(row[d]);
      break;
    }
    case DType::kBFloat16: {
      uint16_t* p = static_cast<uint16_t*>(dst);
      for (int64_t d = 0; d < head_dim; ++d) p[d] = FloatToBFloat16(row[d]);
      break;
    }
    default: {  // kInt8; the row is finite (checked before storing anything)
      int8_t* p = static_cast<int8_t*>(dst);
      float amax = 0.0f;
      for (int64_t d = 0; d < head_dim; ++d) amax = std::max(amax, std::fabs(row[d]));
      const float s = amax / 127.0f;
      *scale = s;
      for (int64_t d = 0; d < head_dim; ++d) {
        // nearbyint rounds half to even in the default rounding mode; the
        // clamp only guards |x| / s = 127 * (1 + 2^-23) after rounding of s.
        const float q = s == 0.0f ? 0.0f : std::nearbyint(row[d] / s);
        p[d] = static_cast<int8_t>(std::clamp(q, -127.0f, 127.0f));
      }
      break;
    }
  }
}

}  // namespace

int64_t KvBytesPerToken(const KvCacheConfig& config) {
  CheckTokenFields(config);
  const int64_t elems = config.num_kv_heads * config.head_dim;
  const int64_t scales = config.dtype == DType::kInt8 ? 2 * config.num_kv_heads * 4 : 0;
  return 2 * elems * static_cast<int64_t>(DTypeSize(config.dtype)) + scales;
}

// K/V bytes and scales of `slots` tokens: one ring store, or the paged pool.
struct Store {
  std::vector<unsigned char> k, v;  // [slot, kv_head, head_dim] in dtype
  std::vector<float> k_scale, v_scale;  // [slot, kv_head], kInt8 only
};

struct Sequence {
  bool live = true;
  int64_t length = 0;          // tokens ever appended
  int64_t slots = 0;           // ring kinds: slots allocated in `store`
  Store store;                 // ring kinds
  std::vector<int32_t> blocks;  // kPaged: block table, position p in blocks[p / block_size]
};

struct KvCache::Impl {
  KvCacheConfig config;
  int64_t elem_bytes = 0;
  bool int8 = false;
  // Ring kinds: sinks + ring slots (kContiguous: 0 + capacity).
  int64_t sinks = 0, ring = 0;
  std::vector<Sequence> seqs;
  // kPaged: the pool [num_blocks * block_size slots], reference counts and a
  // LIFO free list. LIFO reuses the most recently freed (cache-warm) block
  // first; the initial stack pops blocks 0, 1, 2, ... so layouts are
  // deterministic.
  Store pool;
  std::vector<int32_t> refcount;
  std::vector<int32_t> free_list;

  Sequence& Get(int64_t seq, const char* what) {
    return const_cast<Sequence&>(static_cast<const Impl*>(this)->Get(seq, what));
  }
  const Sequence& Get(int64_t seq, const char* what) const {
    if (seq < 0 || seq >= static_cast<int64_t>(seqs.size())) {
      throw Error(std::string(what) + ": sequence " + S(seq) +
                  " does not exist (expected an id returned by AddSequence or ForkSequence; " +
                  S(static_cast<int64_t>(seqs.size())) + " made so far)");
    }
    if (!seqs[seq].live) {
      throw Error(std::string(what) + ": sequence " + S(seq) +
                  " was freed (expected a live sequence; ids are not reused)");
    }
    return seqs[seq];
  }

  // Row index of (slot, kv head g) in a store whose groups hold
  // `group_slots` slots: multiply by head_dim for the element index; it is
  // the scale index as it is.
  int64_t Row(int64_t slot, int64_t g, int64_t group_slots) const {
    return ((slot / group_slots) * config.num_kv_heads + g) * group_slots + slot % group_slots;
  }
  // Slots per group of a sequence's store (ring kinds) or of the pool.
  int64_t GroupSlots(const Sequence& s) const {
    return config.kind == CacheKind::kPaged ? config.block_size : s.slots;
  }

  int64_t SlotOf(int64_t position) const {
    return position < sinks ? position : sinks + (position - sinks) % ring;
  }

  // Grows a ring store to hold `needed` slots (needed <= sinks + ring).
  void Grow(Sequence& s, int64_t needed) {
    if (needed <= s.slots) return;
    const int64_t bound = sinks + ring;
    const int64_t slots = std::min(bound, std::max({needed, 2 * s.slots, kMinSlots}));
    Resize(s.store, s.slots, slots);
    s.slots = slots;
  }
  // Reallocates a ring store of one group from `old_slots` to `slots` slots,
  // keeping the first old_slots of each kv head (which move: the head stride
  // is the group size). kPaged's pool is allocated once, from 0 slots. A new
  // vector of exact size, not resize(): resize may over-allocate, and
  // BytesAllocated reports what is really held.
  void Resize(Store& store, int64_t old_slots, int64_t slots) const {
    const int64_t heads = config.num_kv_heads;
    auto grow = [&](auto& vec, int64_t unit) {  // unit: elements of vec per row
      std::remove_reference_t<decltype(vec)> grown(slots * heads * unit);
      for (int64_t g = 0; g < heads && old_slots > 0; ++g) {
        std::copy_n(vec.begin() + g * old_slots * unit, old_slots * unit,
                    grown.begin() + g * slots * unit);
      }
      vec.swap(grown);
    };
    grow(store.k, config.head_dim * elem_bytes);
    grow(store.v, config.head_dim * elem_bytes);
    if (int8) {
      grow(store.k_scale, 1);
      grow(store.v_scale, 1);
    }
  }

  // Copies slots [from, from + count) to slot `to` of the same store, every
  // kv head; both runs lie inside groups of `group_slots` slots.
  void CopySlots(Store& store, int64_t from, int64_t to, int64_t count, int64_t group_slots) const {
    const int64_t row_bytes = config.head_dim * elem_bytes;
    for (int64_t g = 0; g < config.num_kv_heads; ++g) {
      const int64_t src = Row(from, g, group_slots), dst = Row(to, g, group_slots);
      std::copy_n(store.k.begin() + src * row_bytes, count * row_bytes, store.k.begin() + dst * row_bytes);
      std::copy_n(store.v.begin() + src * row_bytes, count * row_bytes, store.v.begin() + dst * row_bytes);
      if (int8) {
        std::copy_n(store.k_scale.begin() + src, count, store.k_scale.begin() + dst);
        std::copy_n(store.v_scale.begin() + src, count, store.v_scale.begin() + dst);
      }
    }
  }

  // A chunk of `count` slots from `slot`, all inside one group.
  KvChunk Chunk(const Store& store, int64_t slot, int64_t count, int64_t first_position,
                int64_t group_slots) const {
    const int64_t row = Row(slot, 0, group_slots);  // kv head 0's row
    KvChunk c;
    c.k = store.k.data() + row * config.head_dim * elem_bytes;
    c.v = store.v.data() + row * config.head_dim * elem_bytes;
    if (int8) {
      c.k_scale = store.k_scale.data() + row;
      c.v_scale = store.v_scale.data() + row;
      c.scale_token_stride = 1;
      c.scale_head_stride = group_slots;
    }
    c.count = count;
    c.first_position = first_position;
    c.token_stride = config.head_dim;
    c.head_stride = group_slots * config.head_dim;
    return c;
  }

  int32_t PopBlock() {
    const int32_t b = free_list.back();
    free_list.pop_back();
    refcount[b] = 1;
    return b;
  }
  void ReleaseBlock(int32_t b) {
    if (--refcount[b] == 0) free_list.push_back(b);
  }

  void ValidateAppend(const Sequence& s, int64_t seq, const TensorView& k,
                      const TensorView& v) const;
};

KvCache::KvCache(const KvCacheConfig& config) : impl_(std::make_unique<Impl>()) {
  const KvCacheConfig& c = config;
  if (c.kind != CacheKind::kContiguous && c.kind != CacheKind::kSliding &&
      c.kind != CacheKind::kSinks && c.kind != CacheKind::kPaged) {
    throw Error("KvCacheConfig.kind: " + S(static_cast<int>(c.kind)) +
                " (expected kContiguous, kSliding, kSinks or kPaged)");
  }
  CheckTokenFields(c);
  // Fields of the other kinds are ignored (block_size defaults to 16 for all).
  switch (c.kind) {
    case CacheKind::kContiguous: CheckField("capacity", c.capacity, 1); break;
    case CacheKind::kSliding: CheckField("window", c.window, 1); break;
    case CacheKind::kSinks:
      CheckField("window", c.window, 1);
      CheckField("num_sinks", c.num_sinks, 0);
      break;
    case CacheKind::kPaged:
      CheckField("block_size", c.block_size, 1);
      CheckField("num_blocks", c.num_blocks, 1);
      break;
  }
  Impl& m = *impl_;
  m.config = c;
  m.elem_bytes = static_cast<int64_t>(DTypeSize(c.dtype));
  m.int8 = c.dtype == DType::kInt8;
  // Ring bounds, kept as int64 products of int32 fields: no overflow.
  m.sinks = c.kind == CacheKind::kSinks ? c.num_sinks : 0;
  m.ring = c.kind == CacheKind::kContiguous ? c.capacity : c.window;
  const int64_t bound_slots = c.kind == CacheKind::kPaged ? c.num_blocks * c.block_size
                                                          : m.sinks + m.ring;
  const char* bound_field = c.kind == CacheKind::kPaged ? "num_blocks"
                            : c.kind == CacheKind::kContiguous ? "capacity" : "window";
  // bound_slots < 2^62 and KvBytesPerToken < 2^35: compare by division.
  const int64_t per_token = KvBytesPerToken(c);
  if (bound_slots > kMaxBytes / per_token) {
    throw Error(std::string("KvCacheConfig.") + bound_field + ": " + S(bound_slots) +
                " tokens of " + S(per_token) + " bytes (expected at most 2^46 bytes per " +
                (c.kind == CacheKind::kPaged ? "pool)" : "sequence)"));
  }
  if (c.kind == CacheKind::kPaged) {
    try {
      m.Resize(m.pool, 0, bound_slots);
    } catch (const std::bad_alloc&) {
      throw Error("KvCacheConfig.num_blocks: cannot allocate a pool of " +
                  S(bound_slots * per_token) + " bytes (expected fewer blocks)");
    }
    m.refcount.assign(c.num_blocks, 0);
    m.free_list.resize(c.num_blocks);
    for (int64_t b = 0; b < c.num_blocks; ++b) {
      m.free_list[b] = static_cast<int32_t>(c.num_blocks - 1 - b);
    }
  }
}

KvCache::~KvCache() = default;
KvCache::KvCache(KvCache&&) noexcept = default;
KvCache& KvCache::operator=(KvCache&&) noexcept = default;

const KvCacheConfig& KvCache::config() const { return impl_->config; }

int64_t KvCache::AddSequence() {
  impl_->seqs.emplace_back();
  return static_cast<int64_t>(impl_->seqs.size()) - 1;
}

int64_t KvCache::ForkSequence(int64_t parent) {
  Impl& m = *impl_;
  // Copy first: emplace_back may reallocate `seqs` and move the parent.
  Sequence child = m.Get(parent, "ForkSequence");
  if (m.config.kind == CacheKind::kPaged) {
    // Shares every block, the partly filled last one included; whichever
    // sequence appends to a shared partial block first copies it (Append).
    for (int32_t b : child.blocks) ++m.refcount[b];
  }
  m.seqs.push_back(std::move(child));
  return static_cast<int64_t>(m.seqs.size()) - 1;
}

void KvCache::FreeSequence(int64_t seq) {
  Impl& m = *impl_;
  Sequence& s = m.Get(seq, "FreeSequence");
  for (int32_t b : s.blocks) m.ReleaseBlock(b);
  s = Sequence();
  s.live = false;
}

int64_t KvCache::Length(int64_t seq) const { return impl_->Get(seq, "Length").length; }

int64_t KvCache::Kept(int64_t seq) const {
  const Impl& m = *impl_;
  const Sequence& s = m.Get(seq, "Kept");
  if (m.config.kind == CacheKind::kPaged) return s.length;
  return std::min(s.length, m.sinks + m.ring);
}

void KvCache::Impl::ValidateAppend(const Sequence& s, int64_t seq, const TensorView& k,
                                   const TensorView& v) const {
  const Shape4 expected{1, config.num_kv_heads, k.shape[2], config.head_dim};
  for (const TensorView* x : {&k, &v}) {
    const std::string name = x == &k ? "Append: k" : "Append: v";
    if (x->dtype != DType::kFloat32 && x->dtype != DType::kFloat16 &&
        x->dtype != DType::kFloat64) {
      throw Error(name + ": dtype " + DTypeName(x->dtype) +
                  " is not supported (expected float32, float16 or float64)");
    }
    if (x->shape != expected || x->shape[2] < 0 || x->shape[2] > kMaxField) {
      throw Error(name + ": shape " + ShapeString(x->shape) +
                  " (expected [1, num_kv_heads, n, head_dim] = [1, " + S(config.num_kv_heads) +
                  ", n, " + S(config.head_dim) + "] with n equal for k and v, 0 <= n < 2^31)");
    }
    if (!x->present() && x->shape[2] > 0) throw Error(name + ": missing (expected a tensor)");
  }
  const int64_t n = k.shape[2];
  if (config.kind == CacheKind::kContiguous && s.length + n > config.capacity) {
    throw Error("Append: sequence " + S(seq) + " holds " + S(s.length) + " tokens and " + S(n) +
                " more exceed capacity " + S(config.capacity) +
                " (expected at most capacity tokens per kContiguous sequence)");
  }
  if (!int8) return;
  // int8 cannot represent inf or NaN: max|x| would make every other value of
  // the row 0 (or NaN), so the row is rejected rather than silently lost.
  std::vector<float> row(config.head_dim);
  for (const TensorView* x : {&k, &v}) {
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t g = 0; g < config.num_kv_heads; ++g) {
        LoadRow(*x, t, g, config.head_dim, false, row.data());
        for (int64_t d = 0; d < config.head_dim; ++d) {
          if (!std::isfinite(row[d])) {
            throw Error(std::string("Append: ") + (x == &k ? "k" : "v") + "[token " + S(t) +
                        ", kv_head " + S(g) + ", " + S(d) + "] = " + std::to_string(row[d]) +
                        ": int8 cache cannot store non-finite values (expected finite K/V)");
          }
        }
      }
    }
  }
}

void KvCache::Append(int64_t seq, const TensorView& k, const TensorView& v) {
  Impl& m = *impl_;
  const KvCacheConfig& c = m.config;
  Sequence& s = m.Get(seq, "Append");
  m.ValidateAppend(s, seq, k, v);
  const int64_t n = k.shape[2];
  if (n == 0) return;
  const int64_t first = s.length, last = s.length + n;  // positions [first, last)

  // 1. Make room. Ring kinds: grow the store. kPaged: count the blocks the
  // whole append needs (plus one if the last block is shared and partly
  // filled: copy-on-write) and fail before touching anything.
  if (c.kind != CacheKind::kPaged) {
    m.Grow(s, std::min(last, m.sinks + m.ring));
  } else {
    const int64_t bs = c.block_size;
    const int64_t have = static_cast<int64_t>(s.blocks.size());
    const int64_t fresh = (last + bs - 1) / bs - have;
    const bool cow = first % bs != 0 && m.refcount[s.blocks.back()] > 1;
    const int64_t needed = fresh + (cow ? 1 : 0);
    if (needed > static_cast<int64_t>(m.free_list.size())) {
      throw Error("Append: kPaged pool exhausted: sequence " + S(seq) + " needs " + S(needed) +
                  " more blocks of " + S(bs) + " tokens but " +
                  S(static_cast<int64_t>(m.free_list.size())) + " of " + S(c.num_blocks) +
                  " are free (expected a larger num_blocks, or free sequences first)");
    }
    if (cow) {
      // The shared block's other holders keep the original.
      const int32_t old = s.blocks.back(), copy = m.PopBlock();
      m.CopySlots(m.pool, old * bs, copy * bs, first % bs, bs);
      m.ReleaseBlock(old);
      s.blocks.back() = copy;
    }
    for (int64_t i = 0; i < fresh; ++i) s.blocks.push_back(m.PopBlock());
  }

  // 2. Convert and store each token. Ring kinds skip tokens that this same
  // append evicts again (positions in the ring part below last - ring), so an
  // n-token prefill into a window-W ring writes at most sinks + W tokens.
  Store& store = c.kind == CacheKind::kPaged ? m.pool : s.store;
  const int64_t group_slots = m.GroupSlots(s);
  const bool round_to_odd = c.dtype == DType::kFloat16 || c.dtype == DType::kBFloat16;
  std::vector<float> row(c.head_dim);
  for (int64_t t = 0; t < n; ++t) {
    const int64_t p = first + t;
    int64_t slot;
    if (c.kind == CacheKind::kPaged) {
      slot = s.blocks[p / c.block_size] * c.block_size + p % c.block_size;
    } else {
      if (p >= m.sinks && p < last - m.ring) continue;
      slot = m.SlotOf(p);
    }
    for (int64_t g = 0; g < c.num_kv_heads; ++g) {
      const int64_t h = m.Row(slot, g, group_slots);  // scale index
      const int64_t e = h * c.head_dim;               // element index
      LoadRow(k, t, g, c.head_dim, round_to_odd, row.data());
      StoreRow(c.dtype, row.data(), c.head_dim, store.k.data() + e * m.elem_bytes,
               m.int8 ? store.k_scale.data() + h : nullptr);
      LoadRow(v, t, g, c.head_dim, round_to_odd, row.data());
      StoreRow(c.dtype, row.data(), c.head_dim, store.v.data() + e * m.elem_bytes,
               m.int8 ? store.v_scale.data() + h : nullptr);
    }
  }
  s.length = last;
}

// Chunks in increasing position order:
//   kContiguous  one chunk [0, length)
//   kSliding     the ring's older part, then the part that wrapped to slot 0
//   kSinks       the sinks [0, min(length, num_sinks)), then the ring as above
//   kPaged       one chunk per block, the last possibly partial
// Empty runs give no chunk; an empty sequence has no chunks.
//
// kSinks positions stay absolute: after eviction the ring's first position is
// length - window, not num_sinks, because keys were stored as appended (RoPE
// already applied at their absolute position) and cannot be re-rotated.
// StreamingLLM (Xiao et al. 2023, section 3.2) instead re-numbers positions
// inside the cache (sinks 0..S-1, ring S..S+W-1) and applies RoPE to the
// cached keys at read time; a caller wanting that must store un-rotated keys
// and rotate in its own kernel.
KvSequenceView KvCache::View(int64_t seq) const {
  const Impl& m = *impl_;
  const KvCacheConfig& c = m.config;
  const Sequence& s = m.Get(seq, "View");
  KvSequenceView view;
  view.dtype = c.dtype;
  view.num_kv_heads = c.num_kv_heads;
  view.head_dim = c.head_dim;
  view.length = s.length;
  const int64_t L = s.length;
  if (c.kind == CacheKind::kPaged) {
    for (size_t i = 0; i < s.blocks.size(); ++i) {
      const int64_t p0 = static_cast<int64_t>(i) * c.block_size;
      view.chunks.push_back(m.Chunk(m.pool, s.blocks[i] * c.block_size,
                                    std::min(c.block_size, L - p0), p0, c.block_size));
    }
    return view;
  }
  const int64_t num_sinks = std::min(L, m.sinks);
  if (num_sinks > 0) view.chunks.push_back(m.Chunk(s.store, 0, num_sinks, 0, s.slots));
  if (L <= m.sinks) return view;
  const int64_t start = std::max(m.sinks, L - m.ring);  // oldest kept ring position
  const int64_t count = L - start;
  const int64_t slot = m.SlotOf(start);
  const int64_t head = std::min(count, m.sinks + m.ring - slot);  // up to the ring's end
  view.chunks.push_back(m.Chunk(s.store, slot, head, start, s.slots));
  if (count > head) {
    view.chunks.push_back(m.Chunk(s.store, m.sinks, count - head, start + head, s.slots));
  }
  return view;
}

int64_t KvCache::BytesAllocated() const {
  const Impl& m = *impl_;
  auto bytes = [](const Store& st) {
    return static_cast<int64_t>(st.k.size() + st.v.size() +
                                (st.k_scale.size() + st.v_scale.size()) * sizeof(float));
  };
  // kPaged: the whole pool, allocated up front (FreeBlocks tells the use).
  int64_t total = bytes(m.pool);
  for (const Sequence& s : m.seqs) total += bytes(s.store);
  return total;
}

// 0 for the ring kinds, which have no pool.
int64_t KvCache::FreeBlocks() const { return static_cast<int64_t>(impl_->free_list.size()); }

// AppendWithRope: rotate a float32 copy of the keys, then Append. The order
// keeps Append's "nothing stored on error" contract: everything that can fail
// here (the sequence id, rope.offset, Append's checks of k and v, the RoPE
// parameters, the copy's allocation) happens before Append, and Append
// checks all of its own inputs before it stores anything.
//
// Rejected: rotating inside Append's per-token loop, which saves the copy
// (4 KiB per token at 8 kv heads x head_dim 128, freed on return) but needs a
// second path for the RoPE checks and angles inside Append, and loses the
// bitwise match with ApplyRope on the whole sequence that
// tests/kv_cache_rope_test.cc holds. Also rejected: rope.offset = 0 meaning
// "the cache's position", which silently accepts the params of a query that
// was rotated at position 0 by mistake.
void AppendWithRope(KvCache& cache, int64_t seq, const TensorView& k, const TensorView& v,
                    const RopeParams& rope) {
  KvCache::Impl& m = *cache.impl_;
  const Sequence& s = m.Get(seq, "AppendWithRope");
  if (rope.offset != s.length) {
    throw Error("AppendWithRope: rope.offset: " + S(rope.offset) +
                " (expected cache.Length(seq) = " + S(s.length) +
                ", the absolute position of the first new key)");
  }
  // Append's own checks, before k is read for the copy (Append repeats them
  // on the rotated copy: cheap next to the copy itself).
  m.ValidateAppend(s, seq, k, v);
  const KvCacheConfig& c = m.config;
  const int64_t n = k.shape[2];
  // [1, num_kv_heads, n, head_dim] contiguous. n < 2^31 (above) and
  // num_kv_heads * head_dim < 2^31 (KvCacheConfig): the size is < 2^62.
  std::vector<float> rotated(n * c.num_kv_heads * c.head_dim);
  for (int64_t g = 0; g < c.num_kv_heads; ++g) {
    for (int64_t t = 0; t < n; ++t) {
      LoadRow(k, t, g, c.head_dim, false, rotated.data() + (g * n + t) * c.head_dim);
    }
  }
  const Shape4 shape{1, c.num_kv_heads, n, c.head_dim};
  try {
    ApplyRope(MutableTensorView::Contiguous(rotated.data(), DType::kFloat32, shape), rope);
  } catch (const Error& e) {
    // ApplyRope names its tensor "x"; say which call and tensor it was.
    throw Error(std::string("AppendWithRope: k: ") + e.what());
  }
  cache.Append(seq, TensorView::Contiguous(rotated.data(), DType::kFloat32, shape), v);
}

}  // namespace qkv
