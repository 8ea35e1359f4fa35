// Tests of qkv::KvCache: every kind and storage dtype gives back what was
// appended (float32 bitwise, float16/bfloat16 as rounded by FloatToHalf /
// FloatToBFloat16, int8 as q * scale with the documented quantiser), at the
// right positions; eviction of the sliding and sinks rings; paged block
// accounting, forks with copy-on-write and pool exhaustion; config and
// Append validation.
#include "qkv/kv_cache.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "qkv/error.h"

namespace qkv {
namespace {

constexpr DType kDTypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16, DType::kInt8};

// Tokens in [n, num_kv_heads, head_dim] order (the Append shape without the 1).
struct Tokens {
  int64_t n = 0, heads = 0, dim = 0;
  std::vector<float> k, v;
  TensorView KView() const { return View(k); }
  TensorView VView() const { return View(v); }
  TensorView View(const std::vector<float>& x) const {
    return TensorView::FromBSHD(x.data(), DType::kFloat32, 1, n, heads, dim);
  }
};

// Random values with a different magnitude per row (so int8 scales differ),
// multiples of 2^-20 scaled by powers of two: exact in float32.
Tokens RandomTokens(int64_t n, int64_t heads, int64_t dim, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> mant(-(1 << 20), 1 << 20), expo(-6, 6);
  Tokens t{n, heads, dim, std::vector<float>(n * heads * dim), std::vector<float>(n * heads * dim)};
  for (auto* x : {&t.k, &t.v}) {
    for (int64_t r = 0; r < n * heads; ++r) {
      const int e = expo(rng);
      for (int64_t d = 0; d < dim; ++d) (*x)[r * dim + d] = std::ldexp(float(mant(rng)), e - 20);
    }
  }
  return t;
}

// Returns tokens [from, from + count) of `t`.
Tokens Slice(const Tokens& t, int64_t from, int64_t count) {
  const int64_t row = t.heads * t.dim;
  Tokens s{count, t.heads, t.dim, {}, {}};
  s.k.assign(t.k.begin() + from * row, t.k.begin() + (from + count) * row);
  s.v.assign(t.v.begin() + from * row, t.v.begin() + (from + count) * row);
  return s;
}

// The documented int8 quantiser of one row, written from the header's
// formula: scale = max|x| / 127, q = round_half_even(x / scale).
void QuantiseRow(const float* x, int64_t dim, std::vector<int8_t>& q, float& scale) {
  float amax = 0.0f;
  for (int64_t d = 0; d < dim; ++d) amax = std::max(amax, std::fabs(x[d]));
  scale = amax / 127.0f;
  q.assign(dim, 0);
  if (scale == 0.0f) return;
  for (int64_t d = 0; d < dim; ++d) {
    q[d] = static_cast<int8_t>(std::clamp(std::nearbyint(x[d] / scale), -127.0f, 127.0f));
  }
}

// Returns what a cache of `dtype` should give back for the row x (decoded).
std::vector<float> ExpectedRow(DType dtype, const float* x, int64_t dim) {
  std::vector<float> out(dim);
  if (dtype == DType::kInt8) {
    std::vector<int8_t> q;
    float scale;
    QuantiseRow(x, dim, q, scale);
    for (int64_t d = 0; d < dim; ++d) out[d] = float(q[d]) * scale;
    return out;
  }
  for (int64_t d = 0; d < dim; ++d) {
    out[d] = dtype == DType::kFloat16    ? HalfToFloat(FloatToHalf(x[d]))
             : dtype == DType::kBFloat16 ? BFloat16ToFloat(FloatToBFloat16(x[d]))
                                         : x[d];
  }
  return out;
}

float ReadElement(DType dtype, const void* base, int64_t i, const float* scale) {
  switch (dtype) {
    case DType::kFloat32: return static_cast<const float*>(base)[i];
    case DType::kFloat16: return HalfToFloat(static_cast<const uint16_t*>(base)[i]);
    case DType::kBFloat16: return BFloat16ToFloat(static_cast<const uint16_t*>(base)[i]);
    default: return float(static_cast<const int8_t*>(base)[i]) * *scale;
  }
}

// A view read back: position -> decoded [heads, dim] rows of K and V. Checks
// the view's structure (chunk order, strides, no empty chunk) on the way.
struct Readback {
  std::map<int64_t, std::vector<float>> k, v;
};

::testing::AssertionResult ReadView(const KvSequenceView& view, Readback& r) {
  int64_t next = -1;
  for (const KvChunk& c : view.chunks) {
    if (c.count <= 0) return ::testing::AssertionFailure() << "empty chunk";
    if (next >= 0 && c.first_position < next)
      return ::testing::AssertionFailure() << "chunks out of order at " << c.first_position;
    // Head-major: each kv head's rows of a chunk are contiguous.
    if (c.token_stride != view.head_dim || c.head_stride < c.count * view.head_dim)
      return ::testing::AssertionFailure() << "strides " << c.token_stride << "," << c.head_stride;
    if (view.dtype == DType::kInt8 &&
        (c.scale_token_stride != 1 || c.scale_head_stride * view.head_dim != c.head_stride))
      return ::testing::AssertionFailure()
             << "scale strides " << c.scale_token_stride << "," << c.scale_head_stride;
    if ((view.dtype == DType::kInt8) != (c.k_scale != nullptr && c.v_scale != nullptr))
      return ::testing::AssertionFailure() << "scales present iff int8";
    for (int64_t t = 0; t < c.count; ++t) {
      const int64_t p = c.first_position + t;
      if (p >= view.length)
        return ::testing::AssertionFailure() << "position " << p << " >= length";
      for (auto [src, scales, dst] :
           {std::tuple{c.k, c.k_scale, &r.k}, std::tuple{c.v, c.v_scale, &r.v}}) {
        std::vector<float>& row = (*dst)[p];
        row.resize(view.num_kv_heads * view.head_dim);
        for (int64_t g = 0; g < view.num_kv_heads; ++g)
          for (int64_t d = 0; d < view.head_dim; ++d)
            row[g * view.head_dim + d] =
                ReadElement(view.dtype, src, t * c.token_stride + g * c.head_stride + d,
                            scales ? scales + t * c.scale_token_stride + g * c.scale_head_stride
                                   : nullptr);
      }
    }
    next = c.first_position + c.count;
  }
  return ::testing::AssertionSuccess();
}

// Positions a cache of this config keeps after `length` appended tokens.
std::vector<int64_t> KeptPositions(const KvCacheConfig& c, int64_t length) {
  std::vector<int64_t> p;
  for (int64_t i = 0; i < length; ++i) {
    const bool keep = c.kind == CacheKind::kSliding ? i >= length - c.window
                      : c.kind == CacheKind::kSinks ? i < c.num_sinks || i >= length - c.window
                                                    : true;
    if (keep) p.push_back(i);
  }
  return p;
}

// Checks that `view` holds exactly the kept positions of `all` (every token
// appended so far), each equal (bitwise) to ExpectedRow.
::testing::AssertionResult ViewMatches(const KvCache& cache, int64_t seq, const Tokens& all) {
  const KvCacheConfig& c = cache.config();
  const KvSequenceView view = cache.View(seq);
  if (view.length != all.n || cache.Length(seq) != all.n)
    return ::testing::AssertionFailure() << "length " << view.length << " want " << all.n;
  if (view.dtype != c.dtype || view.num_kv_heads != c.num_kv_heads || view.head_dim != c.head_dim)
    return ::testing::AssertionFailure() << "view header";
  Readback r;
  auto ok = ReadView(view, r);
  if (!ok) return ok;
  const std::vector<int64_t> kept = KeptPositions(c, all.n);
  if (static_cast<int64_t>(kept.size()) != cache.Kept(seq) || r.k.size() != kept.size())
    return ::testing::AssertionFailure() << "kept " << r.k.size() << " / " << cache.Kept(seq)
                                         << " want " << kept.size();
  const int64_t row = c.num_kv_heads * c.head_dim;
  for (int64_t p : kept) {
    if (!r.k.count(p)) return ::testing::AssertionFailure() << "position " << p << " missing";
    for (int64_t g = 0; g < c.num_kv_heads; ++g) {
      for (auto [src, got] : {std::pair{&all.k, &r.k[p]}, std::pair{&all.v, &r.v[p]}}) {
        const std::vector<float> want =
            ExpectedRow(c.dtype, src->data() + p * row + g * c.head_dim, c.head_dim);
        if (std::memcmp(want.data(), got->data() + g * c.head_dim, c.head_dim * sizeof(float)) != 0)
          return ::testing::AssertionFailure()
                 << "position " << p << " kv_head " << g << " differs";
      }
    }
  }
  return ::testing::AssertionSuccess();
}

std::vector<KvCacheConfig> AllKinds(DType dtype) {
  std::vector<KvCacheConfig> out(4);
  for (auto& c : out) c.dtype = dtype, c.num_kv_heads = 2, c.head_dim = 5;
  out[0].kind = CacheKind::kContiguous, out[0].capacity = 40;
  out[1].kind = CacheKind::kSliding, out[1].window = 7;
  out[2].kind = CacheKind::kSinks, out[2].window = 5, out[2].num_sinks = 3;
  out[3].kind = CacheKind::kPaged, out[3].block_size = 4, out[3].num_blocks = 16;
  return out;
}

TEST(KvCacheTest, EveryKindAndDTypeGivesBackWhatWasAppended) {
  const Tokens all = RandomTokens(37, 2, 5, 1);
  for (DType dtype : kDTypes) {
    for (const KvCacheConfig& config : AllKinds(dtype)) {
      for (int pattern = 0; pattern < 2; ++pattern) {
        SCOPED_TRACE(std::string(DTypeName(dtype)) + " kind " + std::to_string(int(config.kind)) +
                     (pattern ? " chunks" : " one by one"));
        KvCache cache(config);
        const int64_t seq = cache.AddSequence();
        ASSERT_TRUE(ViewMatches(cache, seq, Slice(all, 0, 0)));
        // Pattern 0: one token at a time; 1: chunks of 1, 2, ..., 8, 1, 2, ...
        for (int64_t done = 0, step = 1; done < all.n; done += step) {
          step = pattern == 0 ? 1 : std::min<int64_t>(all.n - done, (done % 8) + 1);
          const Tokens part = Slice(all, done, step);
          cache.Append(seq, part.KView(), part.VView());
          ASSERT_TRUE(ViewMatches(cache, seq, Slice(all, 0, done + step)))
              << "after " << done + step;
        }
      }
    }
  }
}

TEST(KvCacheTest, InputDTypesAndStridesConvertLikeFloat32) {
  // float64 and float16 inputs, and bhsd memory (head-major) instead of bshd.
  const Tokens t = RandomTokens(6, 3, 4, 2);
  for (DType dtype : kDTypes) {
    for (int variant = 0; variant < 3; ++variant) {
      KvCacheConfig c;
      c.dtype = dtype, c.num_kv_heads = 3, c.head_dim = 4, c.capacity = 8;
      KvCache cache(c);
      const int64_t seq = cache.AddSequence();
      Tokens want = t;
      if (variant == 0) {
        std::vector<double> k(t.k.begin(), t.k.end()), v(t.v.begin(), t.v.end());
        cache.Append(seq, TensorView::FromBSHD(k.data(), DType::kFloat64, 1, 6, 3, 4),
                     TensorView::FromBSHD(v.data(), DType::kFloat64, 1, 6, 3, 4));
      } else if (variant == 1) {
        std::vector<uint16_t> k(t.k.size()), v(t.v.size());
        for (size_t i = 0; i < k.size(); ++i) {
          k[i] = FloatToHalf(t.k[i]), v[i] = FloatToHalf(t.v[i]);
          want.k[i] = HalfToFloat(k[i]), want.v[i] = HalfToFloat(v[i]);
        }
        cache.Append(seq, TensorView::FromBSHD(k.data(), DType::kFloat16, 1, 6, 3, 4),
                     TensorView::FromBSHD(v.data(), DType::kFloat16, 1, 6, 3, 4));
      } else {
        // [heads, tokens, dim] memory: contiguous [1, heads, tokens, dim].
        std::vector<float> k(t.k.size()), v(t.v.size());
        for (int64_t n = 0; n < 6; ++n)
          for (int64_t g = 0; g < 3; ++g)
            for (int64_t d = 0; d < 4; ++d) {
              k[(g * 6 + n) * 4 + d] = t.k[(n * 3 + g) * 4 + d];
              v[(g * 6 + n) * 4 + d] = t.v[(n * 3 + g) * 4 + d];
            }
        cache.Append(seq, TensorView::Contiguous(k.data(), DType::kFloat32, {1, 3, 6, 4}),
                     TensorView::Contiguous(v.data(), DType::kFloat32, {1, 3, 6, 4}));
      }
      EXPECT_TRUE(ViewMatches(cache, seq, want)) << DTypeName(dtype) << " variant " << variant;
    }
  }
}

TEST(KvCacheTest, Float64InputsRoundOnceToHalfAndBFloat16) {
  // 1 + 2^-11 + 2^-40 rounds to 1 + 2^-10 in float16, but through float32 it
  // first becomes the tie 1 + 2^-11 and then 1 (round to even). Same for
  // bfloat16 with 1 + 2^-8 + 2^-40 -> 1 + 2^-7.
  for (auto [dtype, x, want] :
       {std::tuple{DType::kFloat16, 1 + std::ldexp(1.0, -11), 1 + std::ldexp(1.0, -10)},
        std::tuple{DType::kBFloat16, 1 + std::ldexp(1.0, -8), 1 + std::ldexp(1.0, -7)}}) {
    KvCacheConfig c;
    c.dtype = dtype, c.head_dim = 2, c.capacity = 1;
    KvCache cache(c);
    const int64_t seq = cache.AddSequence();
    const double k[2] = {x + std::ldexp(1.0, -40), -(x + std::ldexp(1.0, -40))}, v[2] = {x, -x};
    cache.Append(seq, TensorView::FromBSHD(k, DType::kFloat64, 1, 1, 1, 2),
                 TensorView::FromBSHD(v, DType::kFloat64, 1, 1, 1, 2));
    Readback r;
    ASSERT_TRUE(ReadView(cache.View(seq), r));
    EXPECT_EQ(r.k[0][0], float(want)) << DTypeName(dtype);
    EXPECT_EQ(r.k[0][1], -float(want)) << DTypeName(dtype);
    EXPECT_EQ(r.v[0][0], 1.0f) << DTypeName(dtype);  // the exact tie rounds to even
  }
}

TEST(KvCacheTest, Int8QuantisationErrorIsAtMostHalfAScale) {
  KvCacheConfig c;
  c.dtype = DType::kInt8, c.num_kv_heads = 3, c.head_dim = 67, c.capacity = 50;
  KvCache cache(c);
  const int64_t seq = cache.AddSequence();
  Tokens t = RandomTokens(50, 3, 67, 3);
  std::fill(t.k.begin() + 67, t.k.begin() + 134, 0.0f);  // token 0, head 1: all zero
  cache.Append(seq, t.KView(), t.VView());
  const KvSequenceView view = cache.View(seq);
  ASSERT_EQ(view.chunks.size(), 1u);
  const KvChunk& ch = view.chunks[0];
  EXPECT_EQ(ch.k_scale[ch.scale_head_stride], 0.0f);  // token 0, head 1
  int64_t bad = 0;
  for (int64_t n = 0; n < 50; ++n)
    for (int64_t g = 0; g < 3; ++g) {
      for (auto [x, q, scale] : {std::tuple{&t.k, static_cast<const int8_t*>(ch.k), ch.k_scale},
                                 std::tuple{&t.v, static_cast<const int8_t*>(ch.v), ch.v_scale}}) {
        const float s = scale[n * ch.scale_token_stride + g * ch.scale_head_stride];
        const float* row = x->data() + (n * 3 + g) * 67;
        std::vector<int8_t> want_q;
        float want_s;
        QuantiseRow(row, 67, want_q, want_s);
        EXPECT_EQ(std::memcmp(&s, &want_s, 4), 0);
        float amax = 0.0f;
        for (int64_t d = 0; d < 67; ++d) {
          const int8_t qd = q[n * ch.token_stride + g * ch.head_stride + d];
          EXPECT_EQ(qd, want_q[d]);
          EXPECT_GE(qd, -127);
          amax = std::max(amax, std::fabs(float(qd)));
          // |x - q s| <= s/2 plus float rounding of x/s and of q*s (each a
          // relative 2^-24 of at most 127 s): s * (1/2 + 2^-16) covers both.
          if (std::fabs(row[d] - float(qd) * s) > s * (0.5 + std::ldexp(1.0, -16))) ++bad;
        }
        if (s != 0.0f) {
          EXPECT_EQ(amax, 127.0f);  // the largest element uses the full range
        }
      }
    }
  EXPECT_EQ(bad, 0);
}

TEST(KvCacheTest, Int8RoundsHalfToEvenAndScalesByMaxAbs) {
  // max|x| = 127 makes the scale exactly 1, so x / scale are exact ties.
  KvCacheConfig c;
  c.dtype = DType::kInt8, c.head_dim = 6, c.capacity = 1;
  KvCache cache(c);
  const int64_t seq = cache.AddSequence();
  const float k[6] = {-127.0f, 0.5f, 1.5f, 2.5f, -2.5f, -0.5f};
  const float v[6] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  cache.Append(seq, TensorView::FromBSHD(k, DType::kFloat32, 1, 1, 1, 6),
               TensorView::FromBSHD(v, DType::kFloat32, 1, 1, 1, 6));
  const KvChunk ch = cache.View(seq).chunks.at(0);
  const int8_t* q = static_cast<const int8_t*>(ch.k);
  EXPECT_EQ(std::vector<int>(q, q + 6), (std::vector<int>{-127, 0, 2, 2, -2, 0}));
  EXPECT_EQ(ch.k_scale[0], 1.0f);
  EXPECT_EQ(ch.v_scale[0], 0.0f);  // all-zero row: scale 0, q 0
  const int8_t* qv = static_cast<const int8_t*>(ch.v);
  EXPECT_EQ(std::vector<int>(qv, qv + 6), std::vector<int>(6, 0));
}

TEST(KvCacheTest, Int8RejectsNonFiniteAndStoresNothing) {
  KvCacheConfig c;
  c.dtype = DType::kInt8, c.head_dim = 4, c.capacity = 8;
  KvCache cache(c);
  const int64_t seq = cache.AddSequence();
  Tokens t = RandomTokens(3, 1, 4, 4);
  cache.Append(seq, Slice(t, 0, 1).KView(), Slice(t, 0, 1).VView());
  for (float bad :
       {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    Tokens u = Slice(t, 1, 2);
    u.v[6] = bad;  // token 1, element 2
    try {
      cache.Append(seq, u.KView(), u.VView());
      ADD_FAILURE() << "no error";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("v[token 1, kv_head 0, 2]"), std::string::npos)
          << e.what();
      EXPECT_NE(std::string(e.what()).find("int8 cache cannot store non-finite values"),
                std::string::npos);
    }
    EXPECT_EQ(cache.Length(seq), 1);
  }
  // A float32 cache stores NaN as it is.
  c.dtype = DType::kFloat32;
  KvCache f32(c);
  const int64_t s2 = f32.AddSequence();
  Tokens u = Slice(t, 0, 1);
  u.k[0] = std::numeric_limits<float>::quiet_NaN();
  f32.Append(s2, u.KView(), u.VView());
  EXPECT_TRUE(std::isnan(static_cast<const float*>(f32.View(s2).chunks[0].k)[0]));
}

TEST(KvCacheTest, SlidingWindowEvictsExactlyTheOldest) {
  KvCacheConfig c;
  c.kind = CacheKind::kSliding, c.window = 4, c.head_dim = 3;
  KvCache cache(c);
  const int64_t seq = cache.AddSequence();
  const Tokens all = RandomTokens(9, 1, 3, 5);
  auto positions = [&] {
    std::vector<std::pair<int64_t, int64_t>> out;  // (first_position, count)
    for (const KvChunk& ch : cache.View(seq).chunks) out.emplace_back(ch.first_position, ch.count);
    return out;
  };
  using P = std::vector<std::pair<int64_t, int64_t>>;
  cache.Append(seq, Slice(all, 0, 1).KView(), Slice(all, 0, 1).VView());
  EXPECT_EQ(positions(), (P{{0, 1}}));  // first token
  cache.Append(seq, Slice(all, 1, 3).KView(), Slice(all, 1, 3).VView());
  EXPECT_EQ(positions(), (P{{0, 4}}));  // exactly full: no wrap yet
  EXPECT_EQ(cache.Kept(seq), 4);
  cache.Append(seq, Slice(all, 4, 1).KView(), Slice(all, 4, 1).VView());
  EXPECT_EQ(positions(), (P{{1, 3}, {4, 1}}));  // one past full: 0 evicted, 4 in slot 0
  EXPECT_TRUE(ViewMatches(cache, seq, Slice(all, 0, 5)));
  cache.Append(seq, Slice(all, 5, 3).KView(), Slice(all, 5, 3).VView());
  EXPECT_EQ(positions(), (P{{4, 4}}));  // wrapped exactly once: one chunk again
  EXPECT_EQ(cache.Length(seq), 8);
  EXPECT_EQ(cache.Kept(seq), 4);
  EXPECT_TRUE(ViewMatches(cache, seq, Slice(all, 0, 8)));
  // One append longer than the window keeps its last 4 tokens.
  const int64_t s2 = cache.AddSequence();
  cache.Append(s2, all.KView(), all.VView());
  EXPECT_TRUE(ViewMatches(cache, s2, all));
  EXPECT_EQ(cache.View(s2).chunks.front().first_position, 5);
}

TEST(KvCacheTest, SinksKeepFirstAndLastWithAbsolutePositions) {
  KvCacheConfig c;
  c.kind = CacheKind::kSinks, c.num_sinks = 2, c.window = 3, c.head_dim = 2;
  KvCache cache(c);
  const int64_t seq = cache.AddSequence();
  const Tokens all = RandomTokens(11, 1, 2, 6);
  using P = std::vector<std::pair<int64_t, int64_t>>;
  const P want[] = {{},
                    {{0, 1}},
                    {{0, 2}},
                    {{0, 2}, {2, 1}},
                    {{0, 2}, {2, 2}},
                    {{0, 2}, {2, 3}},
                    {{0, 2}, {3, 2}, {5, 1}},  // position 2 evicted, 5 wraps to slot 2
                    {{0, 2}, {4, 1}, {5, 2}},
                    {{0, 2}, {5, 3}},
                    {{0, 2}, {6, 2}, {8, 1}},
                    {{0, 2}, {7, 1}, {8, 2}},
                    {{0, 2}, {8, 3}}};
  for (int64_t n = 0; n <= 11; ++n) {
    if (n > 0) cache.Append(seq, Slice(all, n - 1, 1).KView(), Slice(all, n - 1, 1).VView());
    P got;
    for (const KvChunk& ch : cache.View(seq).chunks) got.emplace_back(ch.first_position, ch.count);
    EXPECT_EQ(got, want[n]) << "after " << n;
    EXPECT_TRUE(ViewMatches(cache, seq, Slice(all, 0, n))) << "after " << n;
  }
  // One long append keeps sinks + window.
  const int64_t s2 = cache.AddSequence();
  cache.Append(s2, all.KView(), all.VView());
  EXPECT_TRUE(ViewMatches(cache, s2, all));
  EXPECT_EQ(cache.Kept(s2), 5);
  // num_sinks = 0 keeps what kSliding keeps, in the same chunks.
  c.num_sinks = 0;
  KvCacheConfig sc = c;
  sc.kind = CacheKind::kSliding;
  KvCache no_sinks(c), sliding(sc);
  const int64_t a = no_sinks.AddSequence(), b = sliding.AddSequence();
  for (int64_t n = 1; n <= 11; ++n) {
    no_sinks.Append(a, Slice(all, n - 1, 1).KView(), Slice(all, n - 1, 1).VView());
    sliding.Append(b, Slice(all, n - 1, 1).KView(), Slice(all, n - 1, 1).VView());
    Readback ra, rb;
    ASSERT_TRUE(ReadView(no_sinks.View(a), ra));
    ASSERT_TRUE(ReadView(sliding.View(b), rb));
    EXPECT_EQ(ra.k, rb.k);
    EXPECT_EQ(no_sinks.View(a).chunks.size(), sliding.View(b).chunks.size());
    EXPECT_TRUE(ViewMatches(no_sinks, a, Slice(all, 0, n)));
  }
}

TEST(KvCacheTest, ContiguousCapacityIsAnErrorWithNothingStored) {
  KvCacheConfig c;
  c.capacity = 5, c.head_dim = 2;
  KvCache cache(c);
  const int64_t seq = cache.AddSequence();
  const Tokens all = RandomTokens(6, 1, 2, 7);
  cache.Append(seq, Slice(all, 0, 3).KView(), Slice(all, 0, 3).VView());
  try {
    cache.Append(seq, Slice(all, 3, 3).KView(), Slice(all, 3, 3).VView());
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("sequence 0"), std::string::npos) << m;
    EXPECT_NE(m.find("capacity 5"), std::string::npos) << m;
  }
  EXPECT_TRUE(ViewMatches(cache, seq, Slice(all, 0, 3)));
  cache.Append(seq, Slice(all, 3, 2).KView(), Slice(all, 3, 2).VView());
  EXPECT_TRUE(ViewMatches(cache, seq, Slice(all, 0, 5)));
  EXPECT_THROW(cache.Append(seq, Slice(all, 5, 1).KView(), Slice(all, 5, 1).VView()), Error);
}

TEST(KvCacheTest, ContiguousGrowsGeometricallyUpToCapacity) {
  KvCacheConfig c;
  c.capacity = 100, c.num_kv_heads = 2, c.head_dim = 4, c.dtype = DType::kInt8;
  KvCache cache(c);
  const int64_t per_token = KvBytesPerToken(c);
  EXPECT_EQ(per_token, 2 * 2 * 4 + 2 * 2 * 4);
  EXPECT_EQ(cache.BytesAllocated(), 0);
  const int64_t seq = cache.AddSequence();
  EXPECT_EQ(cache.BytesAllocated(), 0);
  const Tokens all = RandomTokens(100, 2, 4, 8);
  std::vector<int64_t> sizes;
  for (int64_t n = 0; n < 100; ++n) {
    cache.Append(seq, Slice(all, n, 1).KView(), Slice(all, n, 1).VView());
    const int64_t slots = cache.BytesAllocated() / per_token;
    EXPECT_EQ(cache.BytesAllocated() % per_token, 0);
    if (sizes.empty() || sizes.back() != slots) sizes.push_back(slots);
  }
  EXPECT_EQ(sizes, (std::vector<int64_t>{16, 32, 64, 100}));
  EXPECT_TRUE(ViewMatches(cache, seq, all));
  cache.FreeSequence(seq);
  EXPECT_EQ(cache.BytesAllocated(), 0);
}

TEST(KvCacheTest, PagedInterleavedAppendsMatchContiguous) {
  for (DType dtype : kDTypes) {
    KvCacheConfig cc;
    cc.dtype = dtype, cc.num_kv_heads = 2, cc.head_dim = 3, cc.capacity = 64;
    KvCacheConfig pc = cc;
    pc.kind = CacheKind::kPaged, pc.block_size = 4, pc.num_blocks = 48;
    KvCache contiguous(cc), paged(pc);
    EXPECT_EQ(paged.BytesAllocated(), 48 * 4 * KvBytesPerToken(pc));
    std::vector<Tokens> all;
    std::vector<int64_t> done(3, 0);
    for (int i = 0; i < 3; ++i) {
      EXPECT_EQ(contiguous.AddSequence(), i);
      EXPECT_EQ(paged.AddSequence(), i);
      all.push_back(RandomTokens(40 + i * 7, 2, 3, 10 + i));
    }
    std::mt19937_64 rng(9);
    for (int step = 0; step < 60; ++step) {
      const int i = static_cast<int>(rng() % 3);
      const int64_t n = std::min<int64_t>(int64_t(rng() % 6), all[i].n - done[i]);
      const Tokens part = Slice(all[i], done[i], n);
      contiguous.Append(i, part.KView(), part.VView());
      paged.Append(i, part.KView(), part.VView());
      done[i] += n;
    }
    int64_t used = 0;
    for (int i = 0; i < 3; ++i) {
      SCOPED_TRACE(std::string(DTypeName(dtype)) + " seq " + std::to_string(i));
      const Tokens appended = Slice(all[i], 0, done[i]);
      EXPECT_TRUE(ViewMatches(contiguous, i, appended));
      EXPECT_TRUE(ViewMatches(paged, i, appended));
      Readback a, b;
      ASSERT_TRUE(ReadView(contiguous.View(i), a));
      ASSERT_TRUE(ReadView(paged.View(i), b));
      EXPECT_EQ(a.k, b.k);
      EXPECT_EQ(a.v, b.v);
      const KvSequenceView view = paged.View(i);
      ASSERT_EQ(static_cast<int64_t>(view.chunks.size()), (done[i] + 3) / 4);
      for (size_t j = 0; j < view.chunks.size(); ++j) {
        EXPECT_EQ(view.chunks[j].first_position, int64_t(j) * 4);
        EXPECT_EQ(view.chunks[j].count, std::min<int64_t>(4, done[i] - int64_t(j) * 4));
      }
      used += (done[i] + 3) / 4;
    }
    EXPECT_EQ(paged.FreeBlocks(), 48 - used);
  }
}

TEST(KvCacheTest, PagedForkSharesBlocksAndCopiesOnWrite) {
  KvCacheConfig c;
  c.kind = CacheKind::kPaged, c.block_size = 4, c.num_blocks = 12, c.head_dim = 2;
  KvCache cache(c);
  const Tokens base = RandomTokens(10, 1, 2, 11), a = RandomTokens(3, 1, 2, 12),
               b = RandomTokens(3, 1, 2, 13);
  auto concat = [](const Tokens& x, const Tokens& y) {
    Tokens z = x;
    z.n += y.n;
    z.k.insert(z.k.end(), y.k.begin(), y.k.end());
    z.v.insert(z.v.end(), y.v.begin(), y.v.end());
    return z;
  };
  const int64_t parent = cache.AddSequence();
  cache.Append(parent, base.KView(), base.VView());
  EXPECT_EQ(cache.FreeBlocks(), 12 - 3);
  const int64_t child = cache.ForkSequence(parent);
  EXPECT_EQ(child, 1);
  EXPECT_EQ(cache.FreeBlocks(), 12 - 3);  // shared, nothing copied yet
  EXPECT_TRUE(ViewMatches(cache, child, base));
  // The child writes into the shared partial block (2 of 4 used): copy-on-write.
  cache.Append(child, Slice(a, 0, 1).KView(), Slice(a, 0, 1).VView());
  EXPECT_EQ(cache.FreeBlocks(), 12 - 4);
  EXPECT_TRUE(ViewMatches(cache, parent, base));
  EXPECT_TRUE(ViewMatches(cache, child, concat(base, Slice(a, 0, 1))));
  // The full blocks stay shared; only the last differs.
  const KvSequenceView pv = cache.View(parent), cv = cache.View(child);
  EXPECT_EQ(pv.chunks[0].k, cv.chunks[0].k);
  EXPECT_EQ(pv.chunks[1].k, cv.chunks[1].k);
  EXPECT_NE(pv.chunks[2].k, cv.chunks[2].k);
  // The parent now owns its last block alone: writes in place, no copy.
  cache.Append(parent, b.KView(), b.VView());
  EXPECT_EQ(cache.FreeBlocks(), 12 - 5);  // 10 + 3 = 13 tokens: a 4th block
  cache.Append(child, Slice(a, 1, 2).KView(), Slice(a, 1, 2).VView());
  EXPECT_EQ(cache.FreeBlocks(), 12 - 6);
  EXPECT_TRUE(ViewMatches(cache, parent, concat(base, b)));
  EXPECT_TRUE(ViewMatches(cache, child, concat(base, a)));
  // A fork of a fork (13 tokens each, 4 blocks), then frees in any order.
  const int64_t grandchild = cache.ForkSequence(child);
  EXPECT_EQ(cache.FreeBlocks(), 12 - 6);
  cache.FreeSequence(parent);  // its blocks 2, 3 are its own; 0, 1 still shared
  EXPECT_EQ(cache.FreeBlocks(), 12 - 4);
  EXPECT_TRUE(ViewMatches(cache, child, concat(base, a)));
  cache.FreeSequence(child);
  EXPECT_EQ(cache.FreeBlocks(), 12 - 4);  // the grandchild holds all four
  EXPECT_TRUE(ViewMatches(cache, grandchild, concat(base, a)));
  cache.FreeSequence(grandchild);
  EXPECT_EQ(cache.FreeBlocks(), 12);
  EXPECT_THROW(cache.View(parent), Error);
  // Fork at a block boundary: appends need fresh blocks, not copies.
  const int64_t p2 = cache.AddSequence();
  cache.Append(p2, Slice(base, 0, 8).KView(), Slice(base, 0, 8).VView());
  const int64_t c2 = cache.ForkSequence(p2);
  cache.Append(c2, Slice(a, 0, 1).KView(), Slice(a, 0, 1).VView());
  EXPECT_EQ(cache.FreeBlocks(), 12 - 3);
  EXPECT_TRUE(ViewMatches(cache, p2, Slice(base, 0, 8)));
  EXPECT_TRUE(ViewMatches(cache, c2, concat(Slice(base, 0, 8), Slice(a, 0, 1))));
  // Forking an empty sequence shares nothing.
  const int64_t e = cache.AddSequence(), e2 = cache.ForkSequence(e);
  cache.Append(e2, Slice(a, 0, 1).KView(), Slice(a, 0, 1).VView());
  EXPECT_EQ(cache.Length(e), 0);
  cache.FreeSequence(p2), cache.FreeSequence(c2), cache.FreeSequence(e), cache.FreeSequence(e2);
  EXPECT_EQ(cache.FreeBlocks(), 12);
}

TEST(KvCacheTest, RingKindsForkByCopy) {
  for (const KvCacheConfig& c : AllKinds(DType::kFloat16)) {
    KvCache cache(c);
    const Tokens all = RandomTokens(12, 2, 5, 14), extra = RandomTokens(2, 2, 5, 15);
    const int64_t parent = cache.AddSequence();
    cache.Append(parent, all.KView(), all.VView());
    const int64_t child = cache.ForkSequence(parent);
    EXPECT_TRUE(ViewMatches(cache, child, all));
    cache.Append(child, extra.KView(), extra.VView());
    EXPECT_TRUE(ViewMatches(cache, parent, all));
    cache.FreeSequence(parent);
    Tokens joined = all;
    joined.n += 2;
    joined.k.insert(joined.k.end(), extra.k.begin(), extra.k.end());
    joined.v.insert(joined.v.end(), extra.v.begin(), extra.v.end());
    EXPECT_TRUE(ViewMatches(cache, child, joined));
  }
}

TEST(KvCacheTest, PagedPoolExhaustionIsAnErrorWithNothingStored) {
  KvCacheConfig c;
  c.kind = CacheKind::kPaged, c.block_size = 4, c.num_blocks = 3, c.head_dim = 2;
  KvCache cache(c);
  const Tokens all = RandomTokens(13, 1, 2, 16);
  const int64_t a = cache.AddSequence(), b = cache.AddSequence();
  cache.Append(a, Slice(all, 0, 10).KView(), Slice(all, 0, 10).VView());
  EXPECT_EQ(cache.FreeBlocks(), 0);
  try {
    cache.Append(b, Slice(all, 0, 1).KView(), Slice(all, 0, 1).VView());
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("pool exhausted"), std::string::npos) << m;
    EXPECT_NE(m.find("sequence 1"), std::string::npos) << m;
    EXPECT_EQ(m.find('\n'), std::string::npos);
  }
  EXPECT_EQ(cache.Length(b), 0);
  cache.Append(a, Slice(all, 10, 2).KView(), Slice(all, 10, 2).VView());  // fills block 3
  EXPECT_THROW(cache.Append(a, Slice(all, 12, 1).KView(), Slice(all, 12, 1).VView()), Error);
  EXPECT_TRUE(ViewMatches(cache, a, Slice(all, 0, 12)));
  cache.FreeSequence(a);
  EXPECT_EQ(cache.FreeBlocks(), 3);
  cache.Append(b, Slice(all, 0, 12).KView(), Slice(all, 0, 12).VView());
  EXPECT_TRUE(ViewMatches(cache, b, Slice(all, 0, 12)));

  // Exhaustion counting the copy-on-write block: 6 tokens (2 blocks) forked,
  // 1 block free. 3 more tokens need a copy of block 1 plus a third block.
  KvCache cow(c);
  const int64_t p = cow.AddSequence();
  cow.Append(p, Slice(all, 0, 6).KView(), Slice(all, 0, 6).VView());
  const int64_t f = cow.ForkSequence(p);
  EXPECT_THROW(cow.Append(f, Slice(all, 6, 3).KView(), Slice(all, 6, 3).VView()), Error);
  EXPECT_EQ(cow.Length(f), 6);
  EXPECT_EQ(cow.FreeBlocks(), 1);
  cow.Append(f, Slice(all, 6, 2).KView(), Slice(all, 6, 2).VView());  // copy only
  EXPECT_EQ(cow.FreeBlocks(), 0);
  EXPECT_TRUE(ViewMatches(cow, p, Slice(all, 0, 6)));
  EXPECT_TRUE(ViewMatches(cow, f, Slice(all, 0, 8)));
  cow.FreeSequence(f);
  cow.FreeSequence(p);
  EXPECT_EQ(cow.FreeBlocks(), 3);
}

// Expects `fn` to throw a one-line qkv::Error containing `needle`.
template <class Fn>
void ExpectError(Fn fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "no error; expected one naming " << needle;
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find(needle), std::string::npos) << m;
    EXPECT_EQ(m.find('\n'), std::string::npos) << m;
  }
}

TEST(KvCacheTest, BadConfigNamesTheField) {
  auto with = [](auto edit) {
    KvCacheConfig c;
    c.capacity = 8, c.window = 4, c.num_sinks = 1, c.num_blocks = 4;
    edit(c);
    return c;
  };
  const std::pair<KvCacheConfig, std::string> cases[] = {
      {with([](auto& c) { c.kind = static_cast<CacheKind>(9); }), "kind"},
      {with([](auto& c) { c.dtype = DType::kFloat64; }), "dtype"},
      {with([](auto& c) { c.dtype = DType::kInt32; }), "dtype"},
      {with([](auto& c) { c.num_kv_heads = 0; }), "num_kv_heads"},
      {with([](auto& c) { c.head_dim = -1; }), "head_dim"},
      {with([](auto& c) { c.head_dim = int64_t{1} << 31; }), "head_dim"},
      {with([](auto& c) { c.num_kv_heads = 1 << 16, c.head_dim = 1 << 16; }), "num_kv_heads"},
      {with([](auto& c) { c.capacity = 0; }), "capacity"},
      {with([](auto& c) { c.capacity = (int64_t{1} << 31) - 1, c.head_dim = 1 << 20; }),
       "capacity"},
      {with([](auto& c) { c.kind = CacheKind::kSliding, c.window = 0; }), "window"},
      {with([](auto& c) { c.kind = CacheKind::kSinks, c.window = -3; }), "window"},
      {with([](auto& c) { c.kind = CacheKind::kSinks, c.num_sinks = -1; }), "num_sinks"},
      {with([](auto& c) { c.kind = CacheKind::kPaged, c.block_size = 0; }), "block_size"},
      {with([](auto& c) { c.kind = CacheKind::kPaged, c.num_blocks = 0; }), "num_blocks"},
      {with([](auto& c) {
         c.kind = CacheKind::kPaged, c.num_blocks = (1 << 30), c.head_dim = 1 << 16;
       }),
       "num_blocks"},
  };
  for (const auto& [config, field] : cases) {
    const KvCacheConfig& c = config;  // clang 14 cannot capture a structured binding
    ExpectError([&c] { KvCache cache(c); }, "KvCacheConfig." + field);
  }
  // Fields of other kinds are ignored: a sliding cache with capacity 0.
  EXPECT_NO_THROW(KvCache(with([](auto& c) { c.kind = CacheKind::kSliding, c.capacity = 0; })));
  ExpectError([] { KvBytesPerToken(KvCacheConfig{.dtype = DType::kBool}); }, "KvCacheConfig.dtype");
  EXPECT_EQ(
      KvBytesPerToken(KvCacheConfig{.dtype = DType::kBFloat16, .num_kv_heads = 2, .head_dim = 8}),
      2 * 2 * 8 * 2);
}

TEST(KvCacheTest, BadAppendAndIdsNameTheArgument) {
  for (const KvCacheConfig& config : AllKinds(DType::kFloat32)) {
    KvCache cache(config);
    const int64_t seq = cache.AddSequence();
    const Tokens t = RandomTokens(2, 2, 5, 17);
    auto view = [&](Shape4 shape, DType dtype = DType::kFloat32) {
      // `shape` is [1, n, heads, dim] token-major memory, as the tokens are.
      return TensorView::FromBSHD(t.k.data(), dtype, shape[0], shape[1], shape[2], shape[3]);
    };
    ExpectError(
        [&] {
          cache.Append(seq, view({1, 2, 2, 5}, DType::kInt32), t.VView());
        },
        "k: dtype int32");
    ExpectError(
        [&] {
          cache.Append(seq, t.KView(), view({1, 2, 2, 5}, DType::kBFloat16));
        },
        "v: dtype bfloat16");
    ExpectError([&] { cache.Append(seq, view({2, 1, 2, 5}), t.VView()); }, "k: shape [2,2,1,5]");
    ExpectError(
        [&] {
          cache.Append(seq, view({1, 2, 1, 10}), t.VView());
        },
        "[1, num_kv_heads, n, head_dim] = [1, 2, n, 5]");
    ExpectError([&] { cache.Append(seq, view({1, 2, 2, 4}), t.VView()); }, "k: shape");
    ExpectError([&] { cache.Append(seq, t.KView(), view({1, 1, 2, 5})); }, "v: shape [1,2,1,5]");
    ExpectError(
        [&] {
          cache.Append(seq, TensorView{nullptr, DType::kFloat32, {1, 2, 2, 5}, {}}, t.VView());
        },
        "k: missing");
    ExpectError([&] { cache.Append(7, t.KView(), t.VView()); },
                "Append: sequence 7 does not exist");
    ExpectError([&] { cache.Append(-1, t.KView(), t.VView()); }, "sequence -1 does not exist");
    EXPECT_EQ(cache.Length(seq), 0);
    // n = 0 appends nothing, even with no data.
    cache.Append(seq, TensorView{nullptr, DType::kFloat32, {1, 2, 0, 5}, {}},
                 TensorView{nullptr, DType::kFloat32, {1, 2, 0, 5}, {}});
    EXPECT_EQ(cache.Length(seq), 0);
    EXPECT_TRUE(cache.View(seq).chunks.empty());
    // Freed ids stay freed (not reused).
    cache.FreeSequence(seq);
    ExpectError([&] { cache.Length(seq); }, "Length: sequence 0 was freed");
    ExpectError([&] { cache.Kept(seq); }, "Kept: sequence 0 was freed");
    ExpectError([&] { cache.View(seq); }, "View: sequence 0 was freed");
    ExpectError([&] { cache.ForkSequence(seq); }, "ForkSequence: sequence 0 was freed");
    ExpectError([&] { cache.FreeSequence(seq); }, "FreeSequence: sequence 0 was freed");
    ExpectError([&] { cache.Append(seq, t.KView(), t.VView()); }, "Append: sequence 0 was freed");
    EXPECT_EQ(cache.AddSequence(), 1);
  }
}

TEST(KvCacheTest, MovedCacheKeepsItsSequences) {
  KvCacheConfig c;
  c.kind = CacheKind::kPaged, c.block_size = 2, c.num_blocks = 4, c.head_dim = 3;
  KvCache a(c);
  const Tokens t = RandomTokens(3, 1, 3, 18);
  const int64_t seq = a.AddSequence();
  a.Append(seq, t.KView(), t.VView());
  KvCache b(std::move(a));
  EXPECT_TRUE(ViewMatches(b, seq, t));
  KvCache d(KvCacheConfig{.capacity = 1});
  d = std::move(b);
  EXPECT_TRUE(ViewMatches(d, seq, t));
  EXPECT_EQ(d.FreeBlocks(), 2);
}

}  // namespace
}  // namespace qkv
