// Tests of qkv/inspect/patterns.h and `qkv patterns`:
//  - metrics and labels against an independent NumPy computation
//    (tests/inspect/gen_pattern_fixtures.py: pure diagonal, previous-token,
//    first- and last-column and uniform heads, and random Dirichlet rows);
//  - on all-MiniLM-L6-v2 (make models): labels stable across two disjoint
//    sentence sets for the heads whose deciding metric clears its threshold
//    by a margin;
//  - bad folders: one-line errors, exit 2.
#include "qkv/inspect/patterns.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "cli_test_util.h"
#include "file_test_util.h"
#include "models/model_test_util.h"
#include "qkv/error.h"
#include "qkv/models/bert.h"
#include "qkv/npy.h"

namespace qkv::inspect {
namespace {

namespace fs = std::filesystem;
using test::ExpectError;
using test::TempDir;

const std::string kFixtures = std::string(QKV_TESTDATA_DIR) + "/patterns";
using test::kMiniLm;
using test::ReadJsonFile;


TEST(PatternsTest, MetricsAndLabelsMatchNumPy) {
  const AttentionDump dump = ReadAttentionDir(kFixtures);
  const std::vector<HeadPattern> got = ClassifyHeads(dump);
  const nlohmann::json want = ReadJsonFile(kFixtures + "/expected.json");
  ASSERT_EQ(got.size(), want.size());
  for (size_t k = 0; k < got.size(); ++k) {
    const HeadPattern& p = got[k];
    const nlohmann::json& w = want[k];
    SCOPED_TRACE("layer " + std::to_string(p.layer) + " head " + std::to_string(p.head));
    EXPECT_EQ(p.layer, w["layer"].get<int64_t>());
    EXPECT_EQ(p.head, w["head"].get<int64_t>());
    EXPECT_EQ(p.rows, w["rows"].get<int64_t>());
    EXPECT_EQ(p.label, w["label"].get<std::string>());
    // Both sum float32 weights in double, in other orders: 1e-12 is
    // thousands of double roundings of values <= ln(9).
    const std::map<std::string, double> metrics = {
        {"self", p.self},    {"previous", p.previous}, {"next", p.next},
        {"first", p.first},  {"last", p.last},         {"punct", p.punct},
        {"local", p.local},  {"entropy", p.entropy},   {"normalized_entropy", p.normalized_entropy},
        {"sparse", p.sparse}};
    for (const auto& [name, value] : metrics)
      EXPECT_NEAR(value, w[name].get<double>(), 1e-12) << name;
  }
  EXPECT_EQ(got[0].label, "diagonal");
  EXPECT_EQ(got[1].label, "previous");
  EXPECT_EQ(got[2].label, "column:[CLS]");
  EXPECT_EQ(got[3].label, "column:[SEP]");
  EXPECT_EQ(got[4].label, "broad");
}

TEST(PatternsTest, PunctuationTokens) {
  for (const char* t : {".", ",", "!?", "\xe2\x80\x94", "\xc2\xbf", "(", "\xe3\x80\x82", " ,", ".\n",
                        " \xe2\x80\x94 "}) {
    EXPECT_TRUE(IsPunctuationToken(t)) << t;
  }
  for (const char* t : {"", "$", "a", "##.", "[SEP]", "[CLS]", "\xe2\x82\xac", ".a", "\xff", " ", " \n",
                        " the", " .a"}) {
    EXPECT_FALSE(IsPunctuationToken(t)) << t;
  }
}

// Heads on MiniLM: run the encoder on two disjoint halves of the fixture
// sentences and compare labels where the deciding value is clear.
std::vector<HeadPattern> MiniLmPatterns(const models::BertEncoder& model,
                                        const std::vector<std::string>& texts) {
  AttentionDump dump;
  dump.num_layers = model.config().num_layers, dump.num_heads = model.config().num_heads;
  dump.num_inputs = static_cast<int64_t>(texts.size());
  for (const std::string& t : texts) {
    dump.tokens.push_back(model.Tokenize(t).pieces);
    dump.seq = std::max<int64_t>(dump.seq, static_cast<int64_t>(dump.tokens.back().size()));
  }
  const int64_t plane = dump.num_heads * dump.seq * dump.seq;
  dump.layers.assign(static_cast<size_t>(dump.num_layers),
                     std::vector<float>(static_cast<size_t>(dump.num_inputs * plane)));
  models::EmbedOptions options;
  options.on_weights = [&](const models::LayerWeights& w) {
    for (size_t r = 0; r < w.rows.size(); ++r)
      for (int64_t h = 0; h < dump.num_heads; ++h)
        for (int64_t i = 0; i < w.seq; ++i)
          std::copy_n(
              w.weights + ((static_cast<int64_t>(r) * dump.num_heads + h) * w.seq + i) * w.seq,
              w.seq,
              dump.layers[w.layer].data() + w.rows[r] * plane + (h * dump.seq + i) * dump.seq);
  };
  model.Embed(texts, options);
  ValidateAttentionDump(dump, "MiniLM");
  return ClassifyHeads(dump);
}

// How far the value that decided the label is past its threshold.
double Margin(const HeadPattern& p) {
  if (p.label == "diagonal") return p.self - kPositionalThreshold;
  if (p.label == "previous") return p.previous - kPositionalThreshold;
  if (p.label == "next") return p.next - kPositionalThreshold;
  if (p.label == "column:[CLS]") return p.first - kPositionalThreshold;
  if (p.label == "column:[SEP]") return p.last - kPositionalThreshold;
  if (p.label == "column:punct") return p.punct - kPositionalThreshold;
  if (p.label == "local block") return p.local - kLocalThreshold;
  if (p.label == "sparse") return p.sparse - kSparseThreshold;
  if (p.label == "broad") return p.normalized_entropy - kBroadThreshold;
  return 0.0;  // mixed: decided by everything staying below
}

TEST(PatternsTest, MiniLmLabelsAreStableAcrossDisjointSentenceSets) {
  if (!fs::exists(kMiniLm + "/model.safetensors")) {
    FAIL() << kMiniLm << " is missing: run `make models`";
  }
  const models::BertEncoder model = models::BertEncoder::Load(kMiniLm);
  const std::vector<std::string> all =
      ReadJsonFile(std::string(QKV_TESTDATA_DIR) + "/minilm/sentences.json");
  std::vector<std::string> a, b;
  for (size_t i = 0; i < all.size(); ++i) {
    if (all[i].empty() || all[i].size() > 400) continue;  // the empty and the 300-word one
    (i % 2 ? b : a).push_back(all[i]);
  }
  const std::vector<HeadPattern> pa = MiniLmPatterns(model, a), pb = MiniLmPatterns(model, b);
  ASSERT_EQ(pa.size(), 72u);
  int clear = 0;
  for (size_t k = 0; k < pa.size(); ++k) {
    if (Margin(pa[k]) < 0.1 && Margin(pb[k]) < 0.1) continue;
    ++clear;
    EXPECT_EQ(pa[k].label, pb[k].label) << "layer " << pa[k].layer << " head " << pa[k].head;
  }
  // The test must compare something: real BERT heads have clear patterns.
  EXPECT_GE(clear, 10);
  std::printf("MiniLM: %d of 72 heads labelled with a margin >= 0.1 on one half or both\n", clear);
}

TEST(PatternsTest, BadFoldersAreOneLineErrors) {
  TempDir dir("patterns_bad_");
  ExpectError([&] { ReadAttentionDir(dir.File("missing")); }, "missing", "not a directory");
  ExpectError([&] { ReadAttentionDir(dir.File("")); }, "layer0.npy", "");
  const std::vector<float> w = {0.5f, 0.5f, 0.25f, 0.5f};  // row 1 sums to 0.75
  const std::vector<int64_t> shape = {1, 1, 2, 2};
  WriteNpy(dir.File("layer0.npy"), DType::kFloat32, shape, w.data());
  ExpectError([&] { ReadAttentionDir(dir.File("")); }, "tokens.json", "");
  std::ofstream(dir.File("tokens.json")) << R"([["[CLS]", "[SEP]"]])";
  ExpectError([&] { ReadAttentionDir(dir.File("")); }, "layer0.npy: input 0, head 0, row 1",
              "sum to 0.75");
  std::ofstream(dir.File("tokens.json")) << R"([["[CLS]", "a", "[SEP]"]])";
  ExpectError([&] { ReadAttentionDir(dir.File("")); }, "tokens.json", "3 tokens (expected 1..2");
  std::ofstream(dir.File("tokens.json")) << R"([["x"], ["y"]])";
  ExpectError([&] { ReadAttentionDir(dir.File("")); }, "tokens.json", "2 token lists");
  std::ofstream(dir.File("tokens.json")) << R"({"not": "a list"})";
  ExpectError([&] { ReadAttentionDir(dir.File("")); }, "tokens.json", "not a JSON list");
  const std::vector<float> w3 = {1, 0, 0, 1, 0, 0, 0, 0, 0};
  const std::vector<int64_t> shape3 = {1, 1, 3, 3};
  WriteNpy(dir.File("layer1.npy"), DType::kFloat32, shape3, w3.data());
  std::ofstream(dir.File("tokens.json")) << R"([["[CLS]"]])";
  ExpectError([&] { ReadAttentionDir(dir.File("")); }, "layer1.npy", "expected layer0.npy's");
}

TEST(PatternsTest, CliPrintsJsonAndATableAndRefusesBadFolders) {
  TempDir dir("patterns_cli_");
  const test::CliResult json =
      test::RunCli({"patterns", "--attn-dir", kFixtures, "--json"}, dir.File(""));
  ASSERT_TRUE(json.exited && json.status == 0) << test::Describe(json);
  const nlohmann::json list = nlohmann::json::parse(json.out);
  const nlohmann::json want = ReadJsonFile(kFixtures + "/expected.json");
  ASSERT_EQ(list.size(), want.size());
  for (size_t k = 0; k < list.size(); ++k) {
    EXPECT_EQ(list[k]["label"], want[k]["label"]);
    EXPECT_NEAR(list[k]["entropy"].get<double>(), want[k]["entropy"].get<double>(), 1e-12);
  }
  const test::CliResult table = test::RunCli({"patterns", "--attn-dir", kFixtures}, dir.File(""));
  ASSERT_TRUE(table.exited && table.status == 0) << test::Describe(table);
  EXPECT_NE(table.out.find("column:[CLS]"), std::string::npos) << table.out;
  EXPECT_NE(table.out.find("layer x head"), std::string::npos) << table.out;
  const test::CliResult bad =
      test::RunCli({"patterns", "--attn-dir", dir.File("nope")}, dir.File(""));
  EXPECT_TRUE(bad.exited && bad.status == 2) << test::Describe(bad);
  EXPECT_EQ(std::count(bad.err.begin(), bad.err.end(), '\n'), 1) << bad.err;
  EXPECT_NE(bad.err.find("--attn-dir"), std::string::npos) << bad.err;
}

}  // namespace
}  // namespace qkv::inspect
