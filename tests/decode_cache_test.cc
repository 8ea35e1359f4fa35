// End to end: decoding a sequence token by token through each KvCache kind
// (append the token's K/V, then Decode its query) equals the matching rows
// of one full causal attention, checked against the float64 oracle of
// test_util.h with the flash bound (2u; the split merge adds no more than the
// online rescaling does, see decode_test.cc).
#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include "qkv/decode.h"
#include "qkv/kv_cache.h"
#include "test_util.h"

namespace qkv::test {
namespace {

constexpr int64_t kHeads = 4, kKvHeads = 2, kDim = 16, kTokens = 150;
constexpr int64_t kWindow = 37, kSinks = 3;

// Runs the token-by-token loop for `config`; returns out [H, N, D] and lse
// [H, N] in the oracle's [b, h, i, d] order (batch 1).
Result DecodeStepByStep(const Case& c, const KvCacheConfig& config, int64_t split_tokens) {
  KvCache cache(config);
  const int64_t seq = cache.AddSequence();
  Result r;
  r.out.assign(kHeads * kTokens * kDim, 0.0);
  r.lse.assign(kHeads * kTokens, 0.0);
  std::vector<float> k(kKvHeads * kDim), v(kKvHeads * kDim), q(kHeads * kDim), out(kHeads * kDim),
      lse(kHeads);
  for (int64_t t = 0; t < kTokens; ++t) {
    for (int64_t g = 0; g < kKvHeads; ++g)
      for (int64_t d = 0; d < kDim; ++d) {
        k[g * kDim + d] = static_cast<float>(c.k[(g * kTokens + t) * kDim + d]);
        v[g * kDim + d] = static_cast<float>(c.v[(g * kTokens + t) * kDim + d]);
      }
    for (int64_t h = 0; h < kHeads; ++h)
      for (int64_t d = 0; d < kDim; ++d) q[h * kDim + d] = static_cast<float>(c.q[(h * kTokens + t) * kDim + d]);
    cache.Append(seq, TensorView::Contiguous(k.data(), DType::kFloat32, {1, kKvHeads, 1, kDim}),
                 TensorView::Contiguous(v.data(), DType::kFloat32, {1, kKvHeads, 1, kDim}));
    const KvSequenceView view = cache.View(seq);
    DecodeParams p;
    p.q = TensorView::Contiguous(q.data(), DType::kFloat32, {1, kHeads, 1, kDim});
    p.sequences = std::span<const KvSequenceView>(&view, 1);
    p.out = MutableTensorView::Contiguous(out.data(), DType::kFloat32, {1, kHeads, 1, kDim});
    p.lse = MutableTensorView::Contiguous(lse.data(), DType::kFloat32, {1, kHeads, 1, 1});
    p.split_tokens = split_tokens;
    Decode(p);
    for (int64_t h = 0; h < kHeads; ++h) {
      for (int64_t d = 0; d < kDim; ++d) r.out[(h * kTokens + t) * kDim + d] = out[h * kDim + d];
      r.lse[h * kTokens + t] = lse[h];
    }
  }
  return r;
}

TEST(DecodeCacheTest, StepByStepEqualsFullCausalForEveryCacheKind) {
  const Case base = RandomCase(1, kHeads, kKvHeads, kTokens, kTokens, kDim, kDim, 2024);
  for (CacheKind kind : {CacheKind::kContiguous, CacheKind::kSliding, CacheKind::kSinks,
                         CacheKind::kPaged}) {
    KvCacheConfig config;
    config.kind = kind;
    config.num_kv_heads = kKvHeads;
    config.head_dim = kDim;
    config.capacity = kTokens;
    config.window = kWindow;
    config.num_sinks = kSinks;
    config.block_size = 16;
    config.num_blocks = (kTokens + 15) / 16;
    // The full forward that the cache must reproduce, as the oracle sees it.
    Case c = base;
    c.causal = true;
    if (kind == CacheKind::kSliding) c.window_left = kWindow - 1, c.window_right = 0;
    if (kind == CacheKind::kSinks) {  // keys j < sinks, or within the last `window`
      c.bool_mask.assign(kHeads * kTokens * kTokens, 0);
      for (int64_t h = 0; h < kHeads; ++h)
        for (int64_t i = 0; i < kTokens; ++i)
          for (int64_t j = 0; j < kTokens; ++j)
            c.bool_mask[(h * kTokens + i) * kTokens + j] = j < kSinks || j > i - kWindow;
    }
    const OracleResult o = Oracle(c);
    for (int64_t split : {int64_t{0}, int64_t{7}}) {  // the default, and many splits
      SCOPED_TRACE("cache kind " + std::to_string(static_cast<int>(kind)) + " split " +
                   std::to_string(split));
      EXPECT_TRUE(MatchesOracle(c, DecodeStepByStep(c, config, split), o, 2 * kU32));
    }
    // The library's own full forward agrees with the same oracle (sanity of
    // the mask translation above).
    EXPECT_TRUE(MatchesOracle(c, RunQkv(c, Accumulate::kFloat32, 0, false), o, 2 * kU32));
  }
}

}  // namespace
}  // namespace qkv::test
