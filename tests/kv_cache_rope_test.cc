// Tests of qkv::AppendWithRope (qkv/kv_cache.h): keys are rotated at their
// absolute positions before being cached. Decoding token by token through
// every cache kind, with each query rotated at its own position, equals the
// float64 oracle of test_util.h fed the whole sequence's q and k rotated once
// at positions 0..N-1, under each kind's mask; with sinks the kept keys keep
// their original positions after eviction, and StreamingLLM's renumbering
// provably gives other results. Cached keys are bitwise those of ApplyRope on
// the whole sequence whatever the append sizes and input dtypes, and every
// error leaves the cache as it was.
#include "qkv/kv_cache.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "qkv/decode.h"
#include "qkv/error.h"
#include "qkv/positional.h"
#include "test_util.h"

namespace qkv::test {
namespace {

// GQA with group_size 2; 143 tokens wrap the 37-token ring three times and
// end mid-block of the 5-token pages.
constexpr int64_t kHeads = 4, kKvHeads = 2, kTokens = 143;
constexpr int64_t kWindow = 37, kSinks = 3, kBlockSize = 5;
constexpr CacheKind kKinds[] = {CacheKind::kContiguous, CacheKind::kSliding, CacheKind::kSinks,
                                CacheKind::kPaged};

// head_dim 6 is three pairs (rotary_dim 4 leaves one pair unrotated); 64 with
// full and partial rotary; both styles; Llama 3's base 500000 next to 10000.
struct RopeCase {
  int64_t head_dim;
  RopeParams rope;
};
constexpr RopeCase kRopeCases[] = {
    {6, {RopeStyle::kGptJ, 10000.0, 4, 0}},
    {6, {RopeStyle::kNeox, 10000.0, 0, 0}},
    {64, {RopeStyle::kNeox, 10000.0, 0, 0}},
    {64, {RopeStyle::kGptJ, 500000.0, 40, 0}},
};

std::string Describe(CacheKind kind, const RopeCase& rc) {
  return "cache kind " + std::to_string(static_cast<int>(kind)) + ", head_dim " +
         std::to_string(rc.head_dim) + ", " +
         (rc.rope.style == RopeStyle::kNeox ? "neox" : "gptj") + ", rotary_dim " +
         std::to_string(rc.rope.rotary_dim);
}

// A float32 cache of `kind` that holds (and for the rings wraps) kTokens.
KvCacheConfig ConfigFor(CacheKind kind, int64_t head_dim) {
  KvCacheConfig config;
  config.kind = kind;
  config.num_kv_heads = kKvHeads;
  config.head_dim = head_dim;
  config.capacity = kTokens;
  config.window = kWindow;
  config.num_sinks = kSinks;
  config.block_size = kBlockSize;
  config.num_blocks = (kTokens + kBlockSize - 1) / kBlockSize;
  return config;
}

// Returns tokens [from, from + count) of x, bhsd memory [1, heads, n, dim] in
// float32, as a [1, heads, count, dim] view (a strided slice, no copy).
template <class View, class Vec>
View TokenRows(Vec& x, int64_t heads, int64_t dim, int64_t from, int64_t count) {
  const int64_t n = static_cast<int64_t>(x.size()) / (heads * dim);
  return {x.data() + from * dim, DType::kFloat32, {1, heads, count, dim},
          {heads * n * dim, n * dim, dim, 1}};
}

// Returns x [1, heads, n, dim] in float32, rotated once at positions 0..n-1:
// what the oracle sees, and what the cache must hold.
std::vector<float> RotateAll(const std::vector<float>& x, int64_t heads, int64_t dim,
                             RopeParams rope) {
  std::vector<float> r = x;
  const int64_t n = static_cast<int64_t>(x.size()) / (heads * dim);
  rope.offset = 0;
  ApplyRope(MutableTensorView::Contiguous(r.data(), DType::kFloat32, {1, heads, n, dim}), rope);
  return r;
}

std::vector<float> ToFloat(const std::vector<double>& x) { return {x.begin(), x.end()}; }
std::vector<double> ToDouble(const std::vector<float>& x) { return {x.begin(), x.end()}; }

// Decodes `c` (batch 1, un-rotated q, k, v) token by token through a new
// cache of `config`: step t rotates its query at position Length(seq) = t,
// appends its K/V with AppendWithRope under the same RopeParams, and decodes.
// Returns out [H, N, D] and lse [H, N] in the oracle's order.
Result DecodeWithRope(const Case& c, const KvCacheConfig& config, RopeParams rope) {
  const int64_t H = c.num_q_heads, G = c.num_kv_heads, N = c.seq_q, D = c.head_dim;
  KvCache cache(config);
  const int64_t seq = cache.AddSequence();
  std::vector<float> q = ToFloat(c.q);
  const std::vector<float> k = ToFloat(c.k), v = ToFloat(c.v);
  std::vector<float> out(H * D), lse(H);
  Result r;
  r.out.assign(H * N * D, 0.0);
  r.lse.assign(H * N, 0.0);
  for (int64_t t = 0; t < N; ++t) {
    rope.offset = cache.Length(seq);  // the new token's absolute position, t
    ApplyRope(TokenRows<MutableTensorView>(q, H, D, t, 1), rope);
    AppendWithRope(cache, seq, TokenRows<TensorView>(k, G, D, t, 1),
                   TokenRows<TensorView>(v, G, D, t, 1), rope);
    const KvSequenceView view = cache.View(seq);
    DecodeParams p;
    p.q = TokenRows<TensorView>(q, H, D, t, 1);
    p.sequences = std::span<const KvSequenceView>(&view, 1);
    p.out = MutableTensorView::Contiguous(out.data(), DType::kFloat32, {1, H, 1, D});
    p.lse = MutableTensorView::Contiguous(lse.data(), DType::kFloat32, {1, H, 1, 1});
    Decode(p);
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t d = 0; d < D; ++d) r.out[(h * N + t) * D + d] = out[h * D + d];
      r.lse[h * N + t] = lse[h];
    }
  }
  return r;
}

// The rows of one step of a full result: out [H, 1, D], lse [H, 1].
Result Step(const Result& full, int64_t t, int64_t heads, int64_t n, int64_t dim) {
  Result r;
  for (int64_t h = 0; h < heads; ++h) {
    r.out.insert(r.out.end(), full.out.begin() + (h * n + t) * dim,
                 full.out.begin() + (h * n + t + 1) * dim);
    r.lse.push_back(full.lse[h * n + t]);
  }
  return r;
}

// Positions a cache of `config` holds after `length` appended tokens.
std::vector<int64_t> KeptPositions(const KvCacheConfig& config, int64_t length) {
  int64_t sinks = 0, ring_start = 0;
  if (config.kind == CacheKind::kSliding) ring_start = std::max<int64_t>(0, length - config.window);
  if (config.kind == CacheKind::kSinks) {
    sinks = std::min(length, config.num_sinks);
    ring_start = std::max(sinks, length - config.window);
  }
  std::vector<int64_t> kept;
  for (int64_t p = 0; p < sinks; ++p) kept.push_back(p);
  for (int64_t p = ring_start; p < length; ++p) kept.push_back(p);
  return kept;
}

// One cached token of a float32 cache: K and V rows [num_kv_heads * head_dim].
struct CachedToken {
  std::vector<float> k, v;
};
using CachedTokens = std::map<int64_t, CachedToken>;  // by absolute position

CachedTokens ReadCache(const KvCache& cache, int64_t seq) {
  const KvSequenceView view = cache.View(seq);
  const int64_t D = view.head_dim;
  CachedTokens tokens;
  for (const KvChunk& chunk : view.chunks) {
    for (int64_t t = 0; t < chunk.count; ++t) {
      CachedToken& token = tokens[chunk.first_position + t];
      for (int64_t g = 0; g < view.num_kv_heads; ++g) {
        const int64_t at = t * chunk.token_stride + g * chunk.head_stride;
        const float* k = static_cast<const float*>(chunk.k) + at;
        const float* v = static_cast<const float*>(chunk.v) + at;
        token.k.insert(token.k.end(), k, k + D);
        token.v.insert(token.v.end(), v, v + D);
      }
    }
  }
  return tokens;
}

// Returns the cache contents that positions `kept` of whole-sequence K and V
// ([1, num_kv_heads, n, head_dim] float32) should give.
CachedTokens Expected(const std::vector<float>& k, const std::vector<float>& v, int64_t heads,
                      int64_t dim, const std::vector<int64_t>& kept) {
  const int64_t n = static_cast<int64_t>(k.size()) / (heads * dim);
  CachedTokens tokens;
  for (int64_t p : kept) {
    CachedToken& token = tokens[p];
    for (int64_t g = 0; g < heads; ++g) {
      const int64_t row = (g * n + p) * dim;
      token.k.insert(token.k.end(), k.begin() + row, k.begin() + row + dim);
      token.v.insert(token.v.end(), v.begin() + row, v.begin() + row + dim);
    }
  }
  return tokens;
}

// Bitwise equality of two cache contents (positions, then every K/V bit).
::testing::AssertionResult SameBits(const CachedTokens& got, const CachedTokens& want) {
  auto positions = [](const CachedTokens& x) {
    std::string s;
    for (const auto& [p, token] : x) s += std::to_string(p) + " ";
    return s;
  };
  if (positions(got) != positions(want)) {
    return ::testing::AssertionFailure() << "positions " << positions(got) << "\nexpected "
                                         << positions(want);
  }
  for (const auto& [p, token] : want) {
    const CachedToken& g = got.at(p);
    for (const bool is_k : {true, false}) {
      const std::vector<float>& a = is_k ? g.k : g.v;
      const std::vector<float>& b = is_k ? token.k : token.v;
      if (a.size() != b.size() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) != 0) {
        size_t i = 0;
        while (i < std::min(a.size(), b.size()) && std::memcmp(&a[i], &b[i], sizeof(float)) == 0) {
          ++i;
        }
        return ::testing::AssertionFailure()
               << (is_k ? "k" : "v") << " of position " << p << " element " << i
               << ": got " << (i < a.size() ? a[i] : 0.0f) << " want "
               << (i < b.size() ? b[i] : 0.0f);
      }
    }
  }
  return ::testing::AssertionSuccess();
}

// Every step's output equals the oracle on the whole sequence rotated once,
// under the kind's mask: causal; sliding adds the window; sinks sees keys
// j < num_sinks or j > i - window, at their original rotations. Bound: the
// flash bound 2u of decode_cache_test.cc. RoPE's own rounding is not in it:
// the oracle is fed the same float32 rotations (bitwise, see below).
TEST(KvCacheRopeTest, StepByStepEqualsRotatedFullSequenceForEveryCacheKind) {
  for (const RopeCase& rc : kRopeCases) {
    const int64_t D = rc.head_dim;
    const Case base = RandomCase(1, kHeads, kKvHeads, kTokens, kTokens, D, D, 5 + D);
    Case rotated = base;
    rotated.q = ToDouble(RotateAll(ToFloat(base.q), kHeads, D, rc.rope));
    rotated.k = ToDouble(RotateAll(ToFloat(base.k), kKvHeads, D, rc.rope));
    rotated.causal = true;
    for (CacheKind kind : kKinds) {
      SCOPED_TRACE(Describe(kind, rc));
      Case c = rotated;
      if (kind == CacheKind::kSliding) c.window_left = kWindow - 1, c.window_right = 0;
      if (kind == CacheKind::kSinks) {
        c.bool_mask.assign(kHeads * kTokens * kTokens, 0);
        for (int64_t h = 0; h < kHeads; ++h)
          for (int64_t i = 0; i < kTokens; ++i)
            for (int64_t j = 0; j < kTokens; ++j)
              c.bool_mask[(h * kTokens + i) * kTokens + j] = j < kSinks || j > i - kWindow;
      }
      EXPECT_TRUE(MatchesOracle(c, DecodeWithRope(base, ConfigFor(kind, D), rc.rope), Oracle(c),
                                2 * kU32));
    }
  }
}

// Which positions the sinks cache's keys keep after eviction, per step t,
// with the oracle fed exactly the kept keys (no mask): the absolute rule
// (key at position j rotated at j, the query at t) matches every step;
// StreamingLLM's renumbering (Xiao et al. 2023, section 3.2: the c-th kept key
// at c, the query at its in-cache index) matches only before the first
// eviction, where both rules give the same positions, and never after. Only
// the sinks' scores tell them apart: a ring key's distance to the query is
// the same under both rules, a sink's is larger by t + 1 - (num_sinks +
// window) under the absolute rule.
TEST(KvCacheRopeTest, SinksKeepAbsolutePositionsNotStreamingLlmRenumbering) {
  for (const RopeCase& rc : kRopeCases) {
    const int64_t D = rc.head_dim;
    SCOPED_TRACE(Describe(CacheKind::kSinks, rc));
    const Case base = RandomCase(1, kHeads, kKvHeads, kTokens, kTokens, D, D, 77 + D);
    const Result decoded = DecodeWithRope(base, ConfigFor(CacheKind::kSinks, D), rc.rope);
    const std::vector<float> q = ToFloat(base.q), k = ToFloat(base.k), v = ToFloat(base.v);
    // The step-t problem: the kept keys in position order, each at position
    // key_position(c, j) for in-cache index c and absolute position j; the
    // query at query_position(kept count).
    auto step_case = [&](int64_t t, const std::function<int64_t(int64_t, int64_t)>& key_position,
                         int64_t query_position) {
      const std::vector<int64_t> kept = KeptPositions(ConfigFor(CacheKind::kSinks, D), t + 1);
      const int64_t n = static_cast<int64_t>(kept.size());
      std::vector<float> q_t(kHeads * D), k_t(kKvHeads * n * D), v_t(kKvHeads * n * D);
      for (int64_t h = 0; h < kHeads; ++h)
        std::copy_n(q.begin() + (h * kTokens + t) * D, D, q_t.begin() + h * D);
      RopeParams rope = rc.rope;
      rope.offset = query_position;
      ApplyRope(MutableTensorView::Contiguous(q_t.data(), DType::kFloat32, {1, kHeads, 1, D}),
                rope);
      for (int64_t c = 0; c < n; ++c) {
        for (int64_t g = 0; g < kKvHeads; ++g) {
          std::copy_n(k.begin() + (g * kTokens + kept[c]) * D, D, k_t.begin() + (g * n + c) * D);
          std::copy_n(v.begin() + (g * kTokens + kept[c]) * D, D, v_t.begin() + (g * n + c) * D);
        }
        rope.offset = key_position(c, kept[c]);
        ApplyRope(TokenRows<MutableTensorView>(k_t, kKvHeads, D, c, 1), rope);
      }
      Case s;
      s.num_q_heads = kHeads, s.num_kv_heads = kKvHeads, s.seq_q = 1, s.seq_kv = n;
      s.head_dim = D, s.head_dim_v = D;
      s.q = ToDouble(q_t), s.k = ToDouble(k_t), s.v = ToDouble(v_t);
      return s;
    };
    int64_t renumbered_matches_after_eviction = 0;
    for (int64_t t = 0; t < kTokens; ++t) {
      const Result got = Step(decoded, t, kHeads, kTokens, D);
      const Case absolute = step_case(t, [](int64_t, int64_t j) { return j; }, t);
      EXPECT_TRUE(MatchesOracle(absolute, got, Oracle(absolute), 2 * kU32)) << "step " << t;
      const int64_t kept = absolute.seq_kv;
      const Case renumbered = step_case(t, [](int64_t c, int64_t) { return c; }, kept - 1);
      const bool matches = MatchesOracle(renumbered, got, Oracle(renumbered), 2 * kU32);
      if (t < kSinks + kWindow) {
        EXPECT_TRUE(matches) << "step " << t << ": nothing evicted, the rules agree";
      } else {
        renumbered_matches_after_eviction += matches;
      }
    }
    EXPECT_EQ(renumbered_matches_after_eviction, 0)
        << "steps after the first eviction where renumbered positions matched too";
  }
}

// Prefill of several tokens in one call, then a mix of single tokens and
// chunks, caches bitwise the same K (and V) as token-by-token appends, and
// both equal ApplyRope on the whole sequence at offset 0, sliced: the angle
// of position p is computed from the same double p either way. The 41-token
// prefill is longer than sinks + window = 40, so the rings evict inside it.
TEST(KvCacheRopeTest, ChunkedAppendsCacheTheSameKeysAsTokenByToken) {
  const int64_t sizes[] = {41, 1, 1, 7, 1, 13, 2};
  for (const RopeCase& rc : kRopeCases) {
    const int64_t D = rc.head_dim;
    std::mt19937_64 rng(300 + D);
    const std::vector<float> k = ToFloat(RandomValues(kKvHeads * kTokens * D, rng));
    const std::vector<float> v = ToFloat(RandomValues(kKvHeads * kTokens * D, rng));
    const std::vector<float> rotated = RotateAll(k, kKvHeads, D, rc.rope);
    for (CacheKind kind : kKinds) {
      SCOPED_TRACE(Describe(kind, rc));
      const KvCacheConfig config = ConfigFor(kind, D);
      KvCache single(config), chunked(config);
      const int64_t s1 = single.AddSequence(), s2 = chunked.AddSequence();
      RopeParams rope = rc.rope;
      for (int64_t i = 0; chunked.Length(s2) < kTokens; ++i) {
        const int64_t from = chunked.Length(s2);
        const int64_t n = std::min(i < 7 ? sizes[i] : 1, kTokens - from);
        rope.offset = from;
        AppendWithRope(chunked, s2, TokenRows<TensorView>(k, kKvHeads, D, from, n),
                       TokenRows<TensorView>(v, kKvHeads, D, from, n), rope);
        for (int64_t t = from; t < from + n; ++t) {
          rope.offset = t;
          AppendWithRope(single, s1, TokenRows<TensorView>(k, kKvHeads, D, t, 1),
                         TokenRows<TensorView>(v, kKvHeads, D, t, 1), rope);
        }
        const CachedTokens want =
            Expected(rotated, v, kKvHeads, D, KeptPositions(config, from + n));
        ASSERT_TRUE(SameBits(ReadCache(chunked, s2), want)) << "chunked, length " << from + n;
        ASSERT_TRUE(SameBits(ReadCache(single, s1), want)) << "single, length " << from + n;
      }
    }
  }
}

// float16 keys are widened exactly and float64 keys rounded to nearest
// float32, then rotated in float32: the cache holds ApplyRope of those
// float32 values, bitwise. V is stored as Append stores it.
TEST(KvCacheRopeTest, HalfAndDoubleKeysAreRotatedInFloat32) {
  const int64_t n = 29;
  for (const RopeCase& rc : kRopeCases) {
    const int64_t D = rc.head_dim;
    SCOPED_TRACE(Describe(CacheKind::kPaged, rc));
    std::mt19937_64 rng(500 + D);
    std::normal_distribution<double> normal(0.0, 3.0);
    std::vector<double> k64(kKvHeads * n * D), v64(kKvHeads * n * D);
    for (double& x : k64) x = normal(rng);  // not exact in float32
    for (double& x : v64) x = normal(rng);
    std::vector<uint16_t> k16(k64.size()), v16(v64.size());
    for (size_t i = 0; i < k64.size(); ++i) k16[i] = FloatToHalf(static_cast<float>(k64[i]));
    for (size_t i = 0; i < v64.size(); ++i) v16[i] = FloatToHalf(static_cast<float>(v64[i]));
    std::vector<float> k16_as_f32(k16.size()), v16_as_f32(v16.size());
    for (size_t i = 0; i < k16.size(); ++i) k16_as_f32[i] = HalfToFloat(k16[i]);
    for (size_t i = 0; i < v16.size(); ++i) v16_as_f32[i] = HalfToFloat(v16[i]);
    const Shape4 strides{kKvHeads * n * D, n * D, D, 1};
    auto append_all = [&](DType dtype, const void* k, const void* v) {
      KvCache cache(ConfigFor(CacheKind::kPaged, D));
      const int64_t seq = cache.AddSequence();
      const int64_t bytes = static_cast<int64_t>(DTypeSize(dtype));
      RopeParams rope = rc.rope;
      for (int64_t from = 0, count = 4; from < n; from += count, count = 1) {  // 4, then 1s
        rope.offset = from;
        const Shape4 shape{1, kKvHeads, count, D};
        const int64_t at = from * D * bytes;  // token `from` of head 0
        const TensorView k_new{static_cast<const char*>(k) + at, dtype, shape, strides};
        const TensorView v_new{static_cast<const char*>(v) + at, dtype, shape, strides};
        AppendWithRope(cache, seq, k_new, v_new, rope);
      }
      return ReadCache(cache, seq);
    };
    std::vector<int64_t> all(n);
    for (int64_t p = 0; p < n; ++p) all[p] = p;
    EXPECT_TRUE(SameBits(append_all(DType::kFloat16, k16.data(), v16.data()),
                         Expected(RotateAll(k16_as_f32, kKvHeads, D, rc.rope), v16_as_f32,
                                  kKvHeads, D, all)))
        << "float16 input";
    const std::vector<float> k64_as_f32 = ToFloat(k64), v64_as_f32 = ToFloat(v64);
    EXPECT_TRUE(SameBits(append_all(DType::kFloat64, k64.data(), v64.data()),
                         Expected(RotateAll(k64_as_f32, kKvHeads, D, rc.rope), v64_as_f32,
                                  kKvHeads, D, all)))
        << "float64 input";
  }
}

// Every error is thrown before anything is stored: Length and every cached
// bit stay as they were, and the cache stays usable. The capacity and pool
// errors come from Append after the keys were rotated on the copy.
TEST(KvCacheRopeTest, ErrorsLeaveTheCacheUnchanged) {
  const int64_t D = 6, before = 10;
  std::mt19937_64 rng(9);
  const std::vector<float> k = ToFloat(RandomValues(kKvHeads * 16 * D, rng));
  const std::vector<float> v = ToFloat(RandomValues(kKvHeads * 16 * D, rng));
  const RopeParams good{RopeStyle::kNeox, 10000.0, 4, 0};
  for (CacheKind kind : kKinds) {
    SCOPED_TRACE("cache kind " + std::to_string(static_cast<int>(kind)));
    KvCacheConfig config = ConfigFor(kind, D);
    config.capacity = 12;                       // kContiguous: 10 + 3 tokens overflow
    config.window = 4, config.num_sinks = 2;    // the rings have wrapped at 10 tokens
    config.block_size = 4, config.num_blocks = 3;  // kPaged: 10 + 3 tokens need a 4th block
    KvCache cache(config);
    const int64_t seq = cache.AddSequence();
    RopeParams rope = good;
    AppendWithRope(cache, seq, TokenRows<TensorView>(k, kKvHeads, D, 0, 7),
                   TokenRows<TensorView>(v, kKvHeads, D, 0, 7), rope);
    for (int64_t t = 7; t < before; ++t) {
      rope.offset = t;
      AppendWithRope(cache, seq, TokenRows<TensorView>(k, kKvHeads, D, t, 1),
                     TokenRows<TensorView>(v, kKvHeads, D, t, 1), rope);
    }
    const CachedTokens snapshot = ReadCache(cache, seq);
    const TensorView k1 = TokenRows<TensorView>(k, kKvHeads, D, before, 1);
    const TensorView v1 = TokenRows<TensorView>(v, kKvHeads, D, before, 1);
    auto at = [&](int64_t offset) {
      RopeParams r = good;
      r.offset = offset;
      return r;
    };
    struct Bad {
      std::string fragment;
      std::function<void()> call;
    };
    std::vector<Bad> bad = {
        {"AppendWithRope: rope.offset: 11 (expected cache.Length(seq) = 10",
         [&] { AppendWithRope(cache, seq, k1, v1, at(before + 1)); }},
        {"rope.offset: 9 (expected cache.Length(seq) = 10",
         [&] { AppendWithRope(cache, seq, k1, v1, at(before - 1)); }},
        {"rope.offset: 0 (expected cache.Length(seq) = 10",
         [&] { AppendWithRope(cache, seq, k1, v1, at(0)); }},
        {"Append: k: shape [1,2,1,4]",
         [&] {
           TensorView k4 = k1;
           k4.shape[3] = 4;
           AppendWithRope(cache, seq, k4, v1, at(before));
         }},
        {"Append: k: shape [1,1,1,6]",
         [&] {
           TensorView k_one_head = k1;
           k_one_head.shape[1] = 1;
           AppendWithRope(cache, seq, k_one_head, v1, at(before));
         }},
        {"Append: v: shape [1,2,2,6]",
         [&] { AppendWithRope(cache, seq, k1, TokenRows<TensorView>(v, kKvHeads, D, before, 2),
                              at(before)); }},
        {"Append: k: dtype int32",
         [&] {
           TensorView k_int = k1;
           k_int.dtype = DType::kInt32;
           AppendWithRope(cache, seq, k_int, v1, at(before));
         }},
        {"Append: k: missing",
         [&] {
           TensorView k_none = k1;
           k_none.data = nullptr;
           AppendWithRope(cache, seq, k_none, v1, at(before));
         }},
        {"AppendWithRope: k: rotary_dim: 5",
         [&] {
           RopeParams odd = at(before);
           odd.rotary_dim = 5;
           AppendWithRope(cache, seq, k1, v1, odd);
         }},
        {"AppendWithRope: k: base:",
         [&] {
           RopeParams zero = at(before);
           zero.base = 0.0;
           AppendWithRope(cache, seq, k1, v1, zero);
         }},
        {"sequence 5 does not exist", [&] { AppendWithRope(cache, 5, k1, v1, at(0)); }},
    };
    const TensorView k3 = TokenRows<TensorView>(k, kKvHeads, D, before, 3);
    const TensorView v3 = TokenRows<TensorView>(v, kKvHeads, D, before, 3);
    if (kind == CacheKind::kContiguous) {
      bad.push_back({"exceed capacity 12",
                     [&] { AppendWithRope(cache, seq, k3, v3, at(before)); }});
    }
    if (kind == CacheKind::kPaged) {
      bad.push_back({"pool exhausted", [&] { AppendWithRope(cache, seq, k3, v3, at(before)); }});
    }
    for (const Bad& b : bad) {
      std::string message = "(no error)";
      try {
        b.call();
      } catch (const Error& e) {
        message = e.what();
      }
      EXPECT_NE(message.find(b.fragment), std::string::npos)
          << "got: " << message << "\nexpected to contain: " << b.fragment;
      EXPECT_EQ(cache.Length(seq), before) << b.fragment;
      EXPECT_TRUE(SameBits(ReadCache(cache, seq), snapshot)) << b.fragment;
    }
    AppendWithRope(cache, seq, k1, v1, at(before));
    EXPECT_EQ(cache.Length(seq), before + 1);
  }
}

}  // namespace
}  // namespace qkv::test
