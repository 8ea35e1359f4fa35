// Tests of `qkv embed` and `qkv tokenize` (cli/embed.cc) on all-MiniLM-L6-v2
// (make models): outputs against the sentence-transformers fixtures, the
// --attn-weights folder, and the error contract (exit 2, one line on stderr
// naming the flag or file, nothing written).
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "cli_test_util.h"
#include "file_test_util.h"
#include "models/model_test_util.h"
#include "qkv/npy.h"

namespace qkv::test {
namespace {

namespace fs = std::filesystem;

const std::string kModel = kMiniLm;
const std::string kFixtures = kMiniLmFixtures;

bool HaveModel() { return HaveMiniLm(); }

void ExpectUsageError(const CliResult& r, const std::string& fragment) {
  EXPECT_TRUE(r.exited) << Describe(r);
  EXPECT_EQ(r.status, 2) << Describe(r);
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_NE(r.err.find(fragment), std::string::npos) << r.err;
}

TEST(CliEmbedTest, TextsGiveTheSentenceTransformersEmbeddings) {
  if (!HaveModel()) return;
  TempDir dir("cli_embed_");
  const std::vector<std::string> sentences = ReadJsonFile(kFixtures + "/sentences.json");
  const NpyArray want = ReadNpy(kFixtures + "/embeddings.npy");
  const CliResult r =
      RunCli({"embed", "--model", kModel, "--text", sentences[0], "--text", sentences[1], "--text",
              sentences[2], "--out", dir.File("e.npy"), "--threads", "2"},
             dir.File(""), 120);
  ASSERT_TRUE(r.exited && r.status == 0) << Describe(r);
  EXPECT_NE(r.err.find("qkv embed: 3 lines in "), std::string::npos) << r.err;
  const NpyArray got = ReadNpy(dir.File("e.npy"));
  ASSERT_EQ(got.shape, (std::vector<int64_t>{3, 384}));
  for (int64_t i = 0; i < 3 * 384; ++i) {
    ASSERT_NEAR(got.data<float>()[i], want.data<float>()[i], 1e-5) << "element " << i;
  }
}

TEST(CliEmbedTest, InputLinesWithCrlfAndEmptyLinesGiveOneRowEach) {
  if (!HaveModel()) return;
  TempDir dir("cli_embed_input_");
  std::ofstream(dir.File("lines.txt"), std::ios::binary) << "Hello world.\r\n\r\nA cat.\n";
  const CliResult r = RunCli({"embed", "--model", kModel, "--input", dir.File("lines.txt"), "--out",
                              dir.File("e.npy"), "--batch-size", "2"},
                             dir.File(""), 120);
  ASSERT_TRUE(r.exited && r.status == 0) << Describe(r);
  const NpyArray lines = ReadNpy(dir.File("e.npy"));
  ASSERT_EQ(lines.shape, (std::vector<int64_t>{3, 384}));
  const CliResult t = RunCli({"embed", "--model", kModel, "--text", "Hello world.", "--text", "",
                              "--text", "A cat.", "--out", dir.File("t.npy")},
                             dir.File(""), 120);
  ASSERT_TRUE(t.exited && t.status == 0) << Describe(t);
  const NpyArray texts = ReadNpy(dir.File("t.npy"));
  for (int64_t i = 0; i < 3 * 384; ++i) {
    // Other batch sizes: within the batch-size tolerance of bert_test.cc.
    ASSERT_NEAR(lines.data<float>()[i], texts.data<float>()[i], 1e-6) << i;
  }
}

TEST(CliEmbedTest, AttnWeightsFolderHoldsEveryLayerAndTheTokens) {
  if (!HaveModel()) return;
  TempDir dir("cli_embed_weights_");
  const std::vector<std::string> texts = ReadJsonFile(kFixtures + "/attn_texts.json");
  const std::vector<int64_t> lengths = ReadJsonFile(kFixtures + "/attn_lengths.json");
  const CliResult r =
      RunCli({"embed", "--model", kModel, "--text", texts[0], "--text", texts[1], "--text",
              texts[2], "--out", dir.File("e.npy"), "--attn-weights", dir.File("heads")},
             dir.File(""), 120);
  ASSERT_TRUE(r.exited && r.status == 0) << Describe(r);
  EXPECT_NE(r.err.find("reference"), std::string::npos) << "the path that ran is named: " << r.err;
  const nlohmann::json tokens = ReadJsonFile(dir.File("heads/tokens.json"));
  ASSERT_EQ(tokens.size(), 3u);
  EXPECT_EQ(tokens[0], nlohmann::json({"[CLS]", "short", "one", ".", "[SEP]"}));
  const int64_t seq = lengths[2];
  for (int layer = 0; layer < 6; ++layer) {
    const NpyArray w = ReadNpy(dir.File("heads/layer" + std::to_string(layer) + ".npy"));
    ASSERT_EQ(w.shape, (std::vector<int64_t>{3, 12, seq, seq})) << layer;
    for (int64_t b = 0; b < 3; ++b) {
      ASSERT_EQ(static_cast<int64_t>(tokens[b].size()), lengths[b]);
      for (int64_t i = 0; i < seq; ++i) {
        double sum = 0;
        for (int64_t j = 0; j < seq; ++j)
          sum += w.data<float>()[((b * 12 + 5) * seq + i) * seq + j];
        EXPECT_NEAR(sum, i < lengths[b] ? 1.0 : 0.0, 1e-5) << "layer " << layer << " b " << b;
      }
    }
  }
  const NpyArray want = ReadNpy(kFixtures + "/attn_layer5.npy");
  const NpyArray got = ReadNpy(dir.File("heads/layer5.npy"));
  for (int64_t i = 0; i < got.numel(); ++i) {
    const int64_t j = i % seq, q = i / seq % seq, b = i / (12 * seq * seq);
    if (q < lengths[b] && j < lengths[b]) {
      ASSERT_NEAR(got.data<float>()[i], want.data<float>()[i], 1e-5) << i;
    }
  }
}

TEST(CliEmbedTest, TokenizePrintsOneJsonLinePerText) {
  if (!HaveModel()) return;
  TempDir dir("cli_tokenize_");
  const nlohmann::json cases = ReadJsonFile(kFixtures + "/tokenizer_cases.json")["cases"];
  std::vector<std::string> args = {"tokenize", "--model", kModel};
  for (int i = 0; i < 20; ++i) {
    args.push_back("--text");
    args.push_back(cases[i]["text"]);
  }
  const CliResult r = RunCli(args, dir.File(""));
  ASSERT_TRUE(r.exited && r.status == 0) << Describe(r);
  std::istringstream lines(r.out);
  std::string line;
  for (int i = 0; i < 20; ++i) {
    ASSERT_TRUE(std::getline(lines, line)) << "line " << i;
    const nlohmann::json j = nlohmann::json::parse(line);
    EXPECT_EQ(j["ids"], cases[i]["ids"]) << cases[i]["text"];
    EXPECT_EQ(j["tokens"], cases[i]["pieces"]) << cases[i]["text"];
  }
  EXPECT_FALSE(std::getline(lines, line));
}

TEST(CliEmbedTest, BadInputIsOneLineExitTwoAndNothingWritten) {
  if (!HaveModel()) return;
  TempDir dir("cli_embed_errors_");
  const std::string out = dir.File("e.npy");
  auto embed = [&](std::vector<std::string> extra) {
    std::vector<std::string> args = {"embed", "--out", out};
    args.insert(args.end(), extra.begin(), extra.end());
    return RunCli(args, dir.File(""), 60);
  };
  ExpectUsageError(embed({"--model", dir.File("nope"), "--text", "x"}), "--model");
  ExpectUsageError(embed({"--model", kModel}), "--text, --input: neither");
  std::ofstream(dir.File("in.txt")) << "fine\n";
  ExpectUsageError(embed({"--model", kModel, "--text", "x", "--input", dir.File("in.txt")}),
                   "--text, --input: both");
  ExpectUsageError(embed({"--model", kModel, "--text", "x", "--batch-size", "0"}), "--batch-size");
  ExpectUsageError(embed({"--model", kModel, "--text", "x", "--threads", "-1"}), "--threads");
  ExpectUsageError(embed({"--model", kModel, "--input", dir.File("missing.txt")}), "--input");
  std::ofstream(dir.File("bad.txt"), std::ios::binary) << "good line\nbad \xff line\n";
  ExpectUsageError(embed({"--model", kModel, "--input", dir.File("bad.txt")}),
                   "line 2: invalid UTF-8 at byte 4");
  ExpectUsageError(embed({"--model", kModel, "--text", "ok", "--text", "\xc3"}),
                   "--text #2: invalid UTF-8");
  ExpectUsageError(embed({"--model", kModel, "--text", "x", "--attn-weights", dir.File("in.txt")}),
                   "--attn-weights");
  {
    // A batch whose working memory cannot fit is refused before it is made.
    std::ofstream many(dir.File("many.txt"));
    for (int i = 0; i < 70000; ++i) many << "a\n";
  }
  ExpectUsageError(
      embed({"--model", kModel, "--input", dir.File("many.txt"), "--batch-size", "65536"}),
      "--batch-size 65536");
  EXPECT_FALSE(fs::exists(out));

  // A model folder with a broken tokenizer.json names that file.
  fs::create_directories(dir.File("broken"));
  fs::copy_file(kModel + "/config.json", dir.File("broken/config.json"));
  std::ofstream(dir.File("broken/tokenizer.json")) << R"({"model": {"type": "BPE"}})";
  ExpectUsageError(embed({"--model", dir.File("broken"), "--text", "x"}), "tokenizer.json");
  EXPECT_FALSE(fs::exists(out));

  // An existing file that is not a .npy is never overwritten; nor is a
  // folder left behind by a failed --attn-weights.
  std::ofstream(dir.File("notes.txt")) << "keep me";
  const CliResult r = RunCli({"embed", "--model", kModel, "--text", "x", "--out",
                              dir.File("notes.txt"), "--attn-weights", dir.File("w")},
                             dir.File(""), 60);
  ExpectUsageError(r, "notes.txt");
  EXPECT_EQ(ReadFile(dir.File("notes.txt")), "keep me");
  EXPECT_FALSE(fs::exists(dir.File("w")));

  ExpectUsageError(RunCli({"tokenize", "--model", kModel, "--text", "\xe2\x82"}, dir.File("")),
                   "--text #1: invalid UTF-8");
}

// OpenBLAS allocates 128 MiB per CPU while it loads and retries forever when
// it cannot; qkv loads it on first use after checking ulimit -v, so a low
// limit is a one-line error, not a hang (src/models/blas.cc).
TEST(CliEmbedTest, LowAddressSpaceLimitIsOneLineErrorNotAHang) {
  if (test::kUnderAddressSanitizer) {
    GTEST_SKIP() << "AddressSanitizer reserves terabytes of address space: no ulimit -v applies";
  }
  if (!HaveModel()) return;
  TempDir dir("cli_embed_ulimit_");
  // The limit is set in the child only (a shell that then execs qkv), so
  // this test process, whatever it has mapped, can still spawn it.
  auto limited = [&](std::vector<std::string> args) {
    std::vector<std::string> command = {"/bin/sh", "-c", "ulimit -v 358400 && exec \"$0\" \"$@\"",
                                        QKV_CLI_PATH};
    command.insert(command.end(), args.begin(), args.end());
    return RunProgram(command, dir.File(""), 60);
  };
  const CliResult r = limited({"embed", "--model", kModel, "--text", "x", "--out", dir.File("e.npy")});
  ExpectUsageError(r, "ulimit -v");
  EXPECT_FALSE(fs::exists(dir.File("e.npy")));
  // Commands without dense layers never load OpenBLAS: the same limit is plenty.
  const CliResult t = limited({"tokenize", "--model", kModel, "--text", "x"});
  EXPECT_TRUE(t.exited && t.status == 0) << Describe(t);
}

}  // namespace
}  // namespace qkv::test
