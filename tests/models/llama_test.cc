// SmolLM2-135M-Instruct (Q4_1 GGUF) through qkv::models::LlamaForward against
// Hugging Face transformers running the same file in float32
// (tests/models/gen_smollm2_fixtures.py wrote tests/testdata/smollm2), and
// every KV-cache kind and dtype against the contiguous float32 cache.
#include "qkv/models/llama.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "models/model_test_util.h"
#include "qkv/error.h"
#include "qkv/npy.h"

namespace qkv::models {
namespace {

using ::testing::HasSubstr;
using test::HaveSmolLm2;
using test::kSmolLm2;
using test::kSmolLm2Fixtures;
using test::ReadJsonFile;

const LlamaModel& Model() {
  static const LlamaModel* model = new LlamaModel(LlamaModel::Load(kSmolLm2));
  return *model;
}

KvCacheConfig Contiguous(int64_t capacity, DType dtype = DType::kFloat32) {
  KvCacheConfig c;
  c.capacity = capacity;
  c.dtype = dtype;
  return c;
}

std::vector<int32_t> Ids(const nlohmann::json& prompt) {
  return prompt.at("ids").get<std::vector<int32_t>>();
}

// One thread unless a test says otherwise: ctest runs two tests at once on
// the 2-core CI machine, and OpenMP teams of two per test would then wait on
// each other's time slices at every one of a step's ~250 parallel regions.
constexpr int kThreads = 1;

std::vector<float> AllLogits(const std::vector<int32_t>& ids, KvCacheConfig cache,
                             int threads = kThreads) {
  LlamaCache kv(Model().config(), cache);
  const int64_t seq = kv.AddSequence();
  std::vector<float> logits;
  LlamaForward(Model(), kv, seq, ids, Logits::kAll, logits, threads);
  return logits;
}

TEST(LlamaTest, ReadsTheConfigFromTheFile) {
  if (!HaveSmolLm2()) return;
  const LlamaConfig& c = Model().config();
  EXPECT_EQ(c.num_layers, 30);
  EXPECT_EQ(c.hidden, 576);
  EXPECT_EQ(c.ffn, 1536);
  EXPECT_EQ(c.num_q_heads, 9);
  EXPECT_EQ(c.num_kv_heads, 3);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.vocab, 49152);
  EXPECT_EQ(c.rope_base, 100000.0);
  EXPECT_FLOAT_EQ(c.rms_eps, 1e-5f);
  EXPECT_TRUE(c.tied_output);
}

// Every prompt position's logits at the fixture's 256 vocabulary ids within
// 2e-3 x that position's max |logit| (the bound: the two sides
// differ by float32 rounding in a different order, through 30 blocks), and
// the same top-1 token wherever transformers' top-2 gap exceeds 1e-3 (the
// measured differences are ~1e-4 absolute: 4e-6 x max |logit|).
TEST(LlamaTest, LogitsMatchTransformers) {
  if (!HaveSmolLm2()) return;
  const nlohmann::json prompts = ReadJsonFile(kSmolLm2Fixtures + "/prompts.json").at("prompts");
  ASSERT_GE(prompts.size(), 8u);
  const NpyArray subset = ReadNpy(kSmolLm2Fixtures + "/vocab_subset.npy");
  const int64_t vocab = Model().config().vocab;
  double worst = 0;
  for (const auto& prompt : prompts) {
    const int i = prompt.at("index").get<int>();
    const std::string tag = "_" + std::to_string(i) + ".npy";
    const std::vector<int32_t> ids = Ids(prompt);
    const NpyArray want = ReadNpy(kSmolLm2Fixtures + "/logits" + tag);
    const NpyArray max_abs = ReadNpy(kSmolLm2Fixtures + "/max_abs" + tag);
    const NpyArray top = ReadNpy(kSmolLm2Fixtures + "/top" + tag);
    const NpyArray top_logits = ReadNpy(kSmolLm2Fixtures + "/top_logits" + tag);
    const int64_t n = static_cast<int64_t>(ids.size()), k = subset.numel();
    ASSERT_EQ(want.numel(), n * k);
    const std::vector<float> got = AllLogits(ids, Contiguous(n));
    const int64_t top_k = top.shape[1];
    for (int64_t t = 0; t < n; ++t) {
      const float* row = got.data() + t * vocab;
      const double bound = 2e-3 * max_abs.data<float>()[t];
      for (int64_t j = 0; j < k; ++j) {
        const double d = std::fabs(row[subset.data<int32_t>()[j]] - want.data<float>()[t * k + j]);
        worst = std::max(worst, d / max_abs.data<float>()[t]);
        ASSERT_LE(d, bound) << prompt.at("name") << " position " << t << " id "
                            << subset.data<int32_t>()[j];
      }
      const float* tl = top_logits.data<float>() + t * top_k;
      if (tl[0] - tl[1] > 1e-3) {
        const int64_t argmax = std::max_element(row, row + vocab) - row;
        EXPECT_EQ(argmax, top.data<int32_t>()[t * top_k]) << prompt.at("name") << " position " << t;
      }
    }
  }
  RecordProperty("worst_relative_difference", std::to_string(worst));
}

// Greedy continuations (prefill, then one token per step through the decode
// kernel) equal transformers' token for token where its top-2 gap never
// fell below 1e-3.
TEST(LlamaTest, GreedyContinuationsMatchTransformers) {
  if (!HaveSmolLm2()) return;
  const nlohmann::json greedy = ReadJsonFile(kSmolLm2Fixtures + "/greedy.json");
  const nlohmann::json prompts = ReadJsonFile(kSmolLm2Fixtures + "/prompts.json").at("prompts");
  const int64_t vocab = Model().config().vocab;
  int compared = 0;
  for (const auto& g : greedy.at("results")) {
    const int i = g.at("index").get<int>();
    // Only the steps before transformers' top-2 gap first fell below 1e-3.
    std::vector<int32_t> want = g.at("generated_ids").get<std::vector<int32_t>>();
    want.resize(g.at("tokens_before_first_gap_below_threshold").get<size_t>());
    if (want.size() < 8) continue;
    const std::vector<int32_t> ids = Ids(prompts.at(static_cast<size_t>(i)));
    LlamaCache kv(Model().config(), Contiguous(static_cast<int64_t>(ids.size() + want.size())));
    const int64_t seq = kv.AddSequence();
    std::vector<float> logits;
    LlamaForward(Model(), kv, seq, ids, Logits::kLast, logits, kThreads);
    std::vector<int32_t> got;
    for (size_t s = 0; s < want.size(); ++s) {
      const int32_t next =
          static_cast<int32_t>(std::max_element(logits.begin(), logits.begin() + vocab) - logits.begin());
      got.push_back(next);
      if (s + 1 < want.size()) LlamaForward(Model(), kv, seq, std::span(&next, 1), Logits::kLast, logits, kThreads);
    }
    EXPECT_EQ(got, want) << "prompt " << i;
    ++compared;
  }
  EXPECT_GE(compared, 7);
}

const std::vector<int32_t>& LongIds() {
  static const std::vector<int32_t> ids = [] {
    const nlohmann::json prompts = ReadJsonFile(kSmolLm2Fixtures + "/prompts.json").at("prompts");
    size_t best = 0;
    for (size_t i = 0; i < prompts.size(); ++i) {
      if (prompts[i].at("ids").size() > prompts[best].at("ids").size()) best = i;
    }
    std::vector<int32_t> all = Ids(prompts[best]);
    all.resize(std::min<size_t>(all.size(), 96));
    return all;
  }();
  return ids;
}

// One token at a time: every step through the decode kernel.
std::vector<float> StepwiseLogits(const std::vector<int32_t>& ids, KvCacheConfig cache) {
  LlamaCache kv(Model().config(), cache);
  const int64_t seq = kv.AddSequence();
  std::vector<float> all, step;
  for (int32_t id : ids) {
    LlamaForward(Model(), kv, seq, std::span(&id, 1), Logits::kLast, step, kThreads);
    all.insert(all.end(), step.begin(), step.end());
  }
  return all;
}

bool Bitwise(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// max over positions of max_j |a - b| / max_j |a|.
double RelativeDifference(const std::vector<float>& a, const std::vector<float>& b) {
  const int64_t vocab = Model().config().vocab;
  double worst = 0;
  for (size_t t = 0; t * vocab < a.size(); ++t) {
    double mx = 0, diff = 0;
    for (int64_t j = 0; j < vocab; ++j) {
      mx = std::max(mx, std::fabs(static_cast<double>(a[t * vocab + j])));
      diff = std::max(diff, std::fabs(static_cast<double>(a[t * vocab + j]) - b[t * vocab + j]));
    }
    worst = std::max(worst, diff / mx);
  }
  return worst;
}

KvCacheConfig Paged(int64_t block_size, int64_t num_blocks) {
  KvCacheConfig c;
  c.kind = CacheKind::kPaged;
  c.block_size = block_size;
  c.num_blocks = num_blocks;
  return c;
}

// The decode kernel walks each cache chunk in blocks of 32 tokens
// (DecodeTraits::kBlockKV): storage that cuts the keys into the same blocks
// (paged blocks of a multiple of 32, a ring that has not wrapped) gives
// bitwise the contiguous cache's logits; other chunkings (16-token pages, 4
// sinks + a ring) change only the online softmax's summation order.
TEST(LlamaTest, CacheKindsGiveIdenticalLogitsWhileNothingIsEvicted) {
  if (!HaveSmolLm2()) return;
  const std::vector<int32_t>& ids = LongIds();
  const int64_t n = static_cast<int64_t>(ids.size());
  // Prefill: contiguous and paged caches both run the flash kernel.
  EXPECT_TRUE(Bitwise(AllLogits(ids, Contiguous(n)), AllLogits(ids, Paged(16, n / 16 + 2))));
  // Token by token: the decode kernel over each storage of the same keys.
  const std::vector<float> base = StepwiseLogits(ids, Contiguous(n));
  EXPECT_TRUE(Bitwise(base, StepwiseLogits(ids, Paged(32, n / 32 + 2))));
  KvCacheConfig sliding;
  sliding.kind = CacheKind::kSliding;
  sliding.window = n;
  EXPECT_TRUE(Bitwise(base, StepwiseLogits(ids, sliding)));
  // Chunked prompts on a sliding cache run one token at a time.
  EXPECT_TRUE(Bitwise(base, AllLogits(ids, sliding)));
  KvCacheConfig sinks;
  sinks.kind = CacheKind::kSinks;
  sinks.num_sinks = 4;
  sinks.window = n - 4;
  const double paged16 = RelativeDifference(base, StepwiseLogits(ids, Paged(16, n / 16 + 2)));
  const double sink = RelativeDifference(base, StepwiseLogits(ids, sinks));
  EXPECT_LT(paged16, 1e-4);
  EXPECT_LT(sink, 1e-4);
  RecordProperty("paged16_relative_difference", std::to_string(paged16));
  RecordProperty("sinks_relative_difference", std::to_string(sink));
}

// A shared prefix: prefill it once on a paged cache, fork, and continue the
// fork; its logits equal a contiguous cache fed the same chunks.
TEST(LlamaTest, ForkedPagedPrefixMatchesContiguous) {
  if (!HaveSmolLm2()) return;
  const std::vector<int32_t>& ids = LongIds();
  const std::vector<int32_t> prefix(ids.begin(), ids.begin() + 40), rest(ids.begin() + 40, ids.end());
  std::vector<float> want, got, scratch;
  {
    LlamaCache kv(Model().config(), Contiguous(static_cast<int64_t>(ids.size())));
    const int64_t seq = kv.AddSequence();
    LlamaForward(Model(), kv, seq, prefix, Logits::kNone, scratch, kThreads);
    LlamaForward(Model(), kv, seq, rest, Logits::kAll, want, kThreads);
  }
  LlamaCache kv(Model().config(), Paged(32, 8));
  const int64_t parent = kv.AddSequence();
  LlamaForward(Model(), kv, parent, prefix, Logits::kNone, scratch, kThreads);
  const int64_t child = kv.ForkSequence(parent);
  LlamaForward(Model(), kv, child, rest, Logits::kAll, got, kThreads);
  EXPECT_TRUE(Bitwise(want, got));
  // The parent is untouched by its fork's tokens.
  EXPECT_EQ(kv.Length(parent), 40);
}

// Lower-precision caches change the logits by their storage rounding only:
// within a few percent of max |logit|, and never NaN.
TEST(LlamaTest, ReducedPrecisionCachesStayClose) {
  if (!HaveSmolLm2()) return;
  const std::vector<int32_t>& ids = LongIds();
  const int64_t n = static_cast<int64_t>(ids.size()), vocab = Model().config().vocab;
  const std::vector<float> base = AllLogits(ids, Contiguous(n));
  for (DType d : {DType::kFloat16, DType::kBFloat16, DType::kInt8}) {
    const std::vector<float> got = AllLogits(ids, Contiguous(n, d));
    double worst = 0;
    for (int64_t t = 0; t < n; ++t) {
      const float* b = base.data() + t * vocab;
      const float* g = got.data() + t * vocab;
      double mx = 0, diff = 0;
      for (int64_t j = 0; j < vocab; ++j) {
        ASSERT_TRUE(std::isfinite(g[j]));
        mx = std::max(mx, std::fabs(static_cast<double>(b[j])));
        diff = std::max(diff, std::fabs(static_cast<double>(g[j]) - b[j]));
      }
      worst = std::max(worst, diff / mx);
    }
    EXPECT_LT(worst, d == DType::kInt8 ? 0.1 : 0.05) << DTypeName(d);
    EXPECT_GT(worst, 0.0) << DTypeName(d) << ": the cache dtype made no difference";
  }
}

// Prefill (SGEMM tiles, the flash kernel) and decode steps (dot products,
// the decode kernel) with 1, 2 and 3 threads. Kept short: with ctest running
// two tests on two cores, teams of 2-3 threads wait on each other's slices.
TEST(LlamaTest, BitwiseIdenticalForAnyThreadCount) {
  if (!HaveSmolLm2()) return;
  const std::vector<int32_t> ids(LongIds().begin(), LongIds().begin() + 24);
  const std::vector<float> one = AllLogits(ids, Contiguous(24), 1);
  EXPECT_TRUE(Bitwise(one, AllLogits(ids, Contiguous(24), 2)));
  EXPECT_TRUE(Bitwise(one, AllLogits(ids, Contiguous(24), 3)));
  const std::vector<int32_t> prompt(ids.begin(), ids.begin() + 20);
  const std::vector<int32_t> steps(ids.begin() + 20, ids.end());
  auto decode = [&](int threads) {
    LlamaCache kv(Model().config(), Contiguous(24, DType::kInt8));
    const int64_t seq = kv.AddSequence();
    std::vector<float> all, step;
    LlamaForward(Model(), kv, seq, prompt, Logits::kNone, step, threads);
    for (int32_t id : steps) {
      LlamaForward(Model(), kv, seq, std::span(&id, 1), Logits::kLast, step, threads);
      all.insert(all.end(), step.begin(), step.end());
    }
    return all;
  };
  EXPECT_TRUE(Bitwise(decode(1), decode(2)));
}

TEST(LlamaTest, BadTokensAndAFullCacheAreErrorsBeforeAnythingIsAppended) {
  if (!HaveSmolLm2()) return;
  LlamaCache kv(Model().config(), Contiguous(4));
  const int64_t seq = kv.AddSequence();
  std::vector<float> logits;
  const std::vector<int32_t> bad = {1, 49152};
  try {
    LlamaForward(Model(), kv, seq, bad, Logits::kLast, logits, kThreads);
    FAIL() << "token 49152 accepted";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("token 1: id 49152 (expected 0..49151)"));
  }
  EXPECT_EQ(kv.Length(seq), 0);
  const std::vector<int32_t> five = {1, 2, 3, 4, 5};
  try {
    LlamaForward(Model(), kv, seq, five, Logits::kLast, logits, kThreads);
    FAIL() << "5 tokens fit a 4-token cache";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("context full"));
  }
  EXPECT_EQ(kv.Length(seq), 0);
}

}  // namespace
}  // namespace qkv::models

namespace qkv::models {
namespace {

// A copy of the real file with one metadata value changed in place: the
// model's checks must name what no longer fits.
std::string PatchedCopy(const std::string& dir, const std::string& key, const std::string& from,
                        const std::string& to) {
  std::ifstream in(kSmolLm2, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const size_t at = bytes.find(key);
  const size_t value = bytes.find(from, at + key.size());
  EXPECT_NE(at, std::string::npos);
  EXPECT_LT(value - at, key.size() + 32) << key;
  bytes.replace(value, from.size(), to);
  const std::string path = dir + "/patched.gguf";
  std::ofstream(path, std::ios::binary) << bytes;
  return path;
}

TEST(LlamaTest, FilesThatDoNotFitTheArchitectureAreRefusedByName) {
  if (!HaveSmolLm2()) return;
  const std::string dir = ::testing::TempDir();
  const auto expect_error = [](const std::string& path, const std::string& needle) {
    try {
      LlamaModel::Load(path);
      ADD_FAILURE() << "loaded; expected an error with " << needle;
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), HasSubstr(needle));
      EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos);
    }
  };
  // FFN width 1536 (uint32 0x600) -> 1537: ffn_gate's shape no longer fits.
  expect_error(PatchedCopy(dir, "llama.feed_forward_length", std::string("\x00\x06\x00\x00", 4),
                           std::string("\x01\x06\x00\x00", 4)),
               "tensor blk.0.ffn_gate.weight has ne {576, 1536} (expected {576, 1537}");
  expect_error(PatchedCopy(dir, "general.architecture", "llama", "llamb"),
               "general.architecture is \"llamb\" (expected \"llama\")");
  // 9 heads -> 7: 576 is not a multiple of 7.
  expect_error(PatchedCopy(dir, "llama.attention.head_count", std::string("\x09\x00\x00\x00", 4),
                           std::string("\x07\x00\x00\x00", 4)),
               "(expected heads to divide hidden");
  std::remove((dir + "/patched.gguf").c_str());
}

}  // namespace
}  // namespace qkv::models
