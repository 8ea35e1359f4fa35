// qkv/kv_cache.h: key/value caches for autoregressive decoding.
//
// One KvCache holds the K and V of one attention layer for any number of
// sequences (continuous batching). Tokens are appended per sequence; a
// sequence's cached tokens are read as a KvSequenceView: a list of chunks,
// each a contiguous run of tokens, so contiguous, ring-buffer and paged
// storage all feed the same decode kernel without copies.
//
// Kinds (KvCacheConfig::kind):
//   kContiguous  one growing buffer per sequence, up to `capacity` tokens;
//                appending past it is an error.
//   kSliding     a ring buffer of the last `window` tokens; older tokens are
//                evicted. Equals full attention with a sliding-window mask
//                (window_left = window - 1, window_right = 0).
//   kSinks       StreamingLLM: the first `num_sinks` tokens are kept forever,
//                plus a ring of the last `window` tokens; the middle is evicted.
//   kPaged       fixed-size blocks of `block_size` tokens from a shared pool of
//                `num_blocks`, a block table per sequence and a free list.
//                ForkSequence shares the parent's blocks by reference count
//                (copy-on-write of the last, partly filled block only). Pool
//                exhaustion is a qkv::Error, not a crash.
// Storage dtypes (KvCacheConfig::dtype): kFloat32, kFloat16, kBFloat16 (rounded
// to nearest even when appended) and kInt8: symmetric, one float32 scale per
// (token, kv head) for K and for V: scale = max|x| / 127, q = round(x / scale)
// (0 scale for an all-zero row), dequantised inside the kernel as q * scale.
//
// Positions: token t of a sequence (t = 0, 1, ...) has absolute position t,
// whether or not it was evicted later. Keys are stored as appended: apply
// RoPE at the absolute position before Append (qkv/positional.h), or let
// AppendWithRope below do it. Views report each chunk's first absolute
// position, so kernels can apply causal and window rules by position.
#ifndef QKV_KV_CACHE_H_
#define QKV_KV_CACHE_H_

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "qkv/positional.h"
#include "qkv/tensor.h"

namespace qkv {

enum class CacheKind : uint8_t { kContiguous, kSliding, kSinks, kPaged };

struct KvCacheConfig {
  CacheKind kind = CacheKind::kContiguous;
  DType dtype = DType::kFloat32;  // kFloat32, kFloat16, kBFloat16 or kInt8
  int64_t num_kv_heads = 1;
  int64_t head_dim = 64;      // of K and of V
  int64_t capacity = 0;       // kContiguous: max tokens per sequence
  int64_t window = 0;         // kSliding / kSinks: recent tokens kept
  int64_t num_sinks = 0;      // kSinks: first tokens kept
  int64_t block_size = 16;    // kPaged: tokens per block
  int64_t num_blocks = 0;     // kPaged: blocks in the pool
};

// A run of `count` cached tokens with consecutive positions. Token t of the
// chunk has absolute position first_position + t. Element d of kv head g of
// token t is at index t * token_stride + g * head_stride + d of k (and v),
// in `dtype` elements. For kInt8, k_scale[t * scale_token_stride + g *
// scale_head_stride] (and v_scale) is its scale: value = int8 * scale.
// KvCache stores each kv head's rows contiguously (token_stride = head_dim):
// the decode kernel then streams one run of memory per (head, split).
struct KvChunk {
  const void* k = nullptr;
  const void* v = nullptr;
  const float* k_scale = nullptr;  // kInt8 only
  const float* v_scale = nullptr;  // kInt8 only
  int64_t count = 0;
  int64_t first_position = 0;
  int64_t token_stride = 0;
  int64_t head_stride = 0;
  int64_t scale_token_stride = 0;  // kInt8 only
  int64_t scale_head_stride = 0;   // kInt8 only
};

// The cached tokens of one sequence: chunks in increasing position order.
// Valid until the next Append, Fork or Free on that cache.
struct KvSequenceView {
  DType dtype = DType::kFloat32;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t length = 0;  // tokens ever appended = next token's position
  std::vector<KvChunk> chunks;
};

class KvCache {
 public:
  // Validates `config` (throws qkv::Error naming the field) and allocates:
  // kPaged its whole pool; the others grow per sequence up to their bound.
  explicit KvCache(const KvCacheConfig& config);
  ~KvCache();
  KvCache(KvCache&&) noexcept;
  KvCache& operator=(KvCache&&) noexcept;

  // Returns the id of a new empty sequence.
  int64_t AddSequence();
  // Returns a new sequence holding the same tokens as `parent`. kPaged shares
  // all the parent's blocks (reference counted); the last, partly filled one
  // is copied by whichever sequence appends to it first. Other kinds copy.
  int64_t ForkSequence(int64_t parent);
  // Frees a sequence; kPaged returns its blocks (when no fork holds them).
  void FreeSequence(int64_t seq);

  // Appends n tokens: k and v are float32/float16/float64 views of shape
  // [1, num_kv_heads, n, head_dim], the library's [batch, heads, seq, dim]
  // order (any strides: TensorView::FromBSHD of token-major [n, H, D]
  // memory, or a slice of a bhsd tensor). Converted to the storage dtype. Throws qkv::Error
  // (before storing anything) on a bad shape, an unknown sequence, a full
  // contiguous cache or an exhausted paged pool.
  void Append(int64_t seq, const TensorView& k, const TensorView& v);

  // Tokens ever appended to `seq` (the next token's position).
  int64_t Length(int64_t seq) const;
  // Tokens currently held for `seq` (<= Length after eviction).
  int64_t Kept(int64_t seq) const;
  KvSequenceView View(int64_t seq) const;

  const KvCacheConfig& config() const;
  // Bytes of K/V storage (and scales) allocated now.
  int64_t BytesAllocated() const;
  // kPaged: blocks on the free list.
  int64_t FreeBlocks() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  // Validates with Append's own checks before copying the keys.
  friend void AppendWithRope(KvCache& cache, int64_t seq, const TensorView& k,
                             const TensorView& v, const RopeParams& rope);
};

// Returns the bytes one token takes in a cache: 2 * num_kv_heads * head_dim *
// dtype size, plus 2 * num_kv_heads * 4 for kInt8 scales.
int64_t KvBytesPerToken(const KvCacheConfig& config);

// Appends n tokens like cache.Append, with the keys rotated by RoPE at their
// absolute positions Length(seq), ..., Length(seq) + n - 1 first (v as is).
// rope.offset must equal cache.Length(seq): the same RopeParams then rotate
// the step's queries, and a caller whose position count drifted from the
// cache's gets a qkv::Error instead of silently wrong positions. Keys are
// converted to float32 (float64 rounded to nearest) and rotated in float32
// on a copy, bitwise as ApplyRope on the whole sequence's keys; the copy
// takes n * num_kv_heads * head_dim floats. Every error (the offset, the
// RoPE parameters, Append's checks) is thrown before anything is stored.
void AppendWithRope(KvCache& cache, int64_t seq, const TensorView& k, const TensorView& v,
                    const RopeParams& rope);

}  // namespace qkv

#endif  // QKV_KV_CACHE_H_
