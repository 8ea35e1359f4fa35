// Tests of qkv/inspect/heatmap.h and `qkv heatmap`: PNG files decoded with
// libpng (dimensions, each cell's colour, the colour bar's ends), SVG cell
// counts and labels, the terminal picture, and bad inputs.
#include "qkv/inspect/heatmap.h"

#include <gtest/gtest.h>
#include <png.h>

#include <string>
#include <vector>

#include "cli_test_util.h"
#include "file_test_util.h"
#include "qkv/npy.h"

namespace qkv::inspect {
namespace {

struct Decoded {
  int64_t width = 0, height = 0;
  std::vector<unsigned char> rgb;
  std::array<uint8_t, 3> At(int64_t x, int64_t y) const {
    const size_t at = static_cast<size_t>((y * width + x) * 3);
    return {rgb[at], rgb[at + 1], rgb[at + 2]};
  }
};

Decoded DecodePng(const std::vector<unsigned char>& png) {
  png_image image{};
  image.version = PNG_IMAGE_VERSION;
  Decoded d;
  if (!png_image_begin_read_from_memory(&image, png.data(), png.size())) {
    ADD_FAILURE() << "not a PNG: " << image.message;
    return d;
  }
  image.format = PNG_FORMAT_RGB;
  d.width = image.width, d.height = image.height;
  d.rgb.resize(PNG_IMAGE_SIZE(image));
  EXPECT_TRUE(png_image_finish_read(&image, nullptr, d.rgb.data(), 0, nullptr)) << image.message;
  return d;
}

// Head 0: the identity (a diagonal head); head 1: uniform 0.2.
Heatmap TwoHeads() {
  Heatmap m;
  m.rows = m.cols = 5;
  m.heads = {0, 3};
  std::vector<float> diag(25, 0.0f), uniform(25, 0.2f);
  for (int i = 0; i < 5; ++i) diag[i * 5 + i] = 1.0f;
  m.weights = {diag, uniform};
  return m;
}

TEST(HeatmapTest, ColourScaleEndsAreViridis) {
  EXPECT_EQ(WeightColour(0.0f), (std::array<uint8_t, 3>{68, 1, 84}));
  EXPECT_EQ(WeightColour(1.0f), (std::array<uint8_t, 3>{253, 231, 37}));
  EXPECT_EQ(WeightColour(0.5f), (std::array<uint8_t, 3>{33, 145, 140}));
  EXPECT_EQ(WeightColour(-1.0f), WeightColour(0.0f));
  EXPECT_EQ(WeightColour(2.0f), WeightColour(1.0f));
}

TEST(HeatmapTest, PngHasTheLayoutsSizeAndEachCellsColour) {
  const Heatmap m = TwoHeads();
  const PngLayout l = LayoutPng(m);
  const Decoded d = DecodePng(RenderPng(m));
  ASSERT_EQ(d.width, l.width);
  ASSERT_EQ(d.height, l.height);
  EXPECT_EQ(l.grid_cols, 2);
  EXPECT_EQ(l.grid_rows, 1);
  for (int64_t h = 0; h < 2; ++h) {
    const int64_t x0 = l.gap + h * (m.cols * l.cell + l.gap), y0 = l.gap;
    for (int64_t i = 0; i < 5; ++i)
      for (int64_t j = 0; j < 5; ++j) {
        const auto want = WeightColour(m.weights[h][i * 5 + j]);
        // Every pixel of the cell, so cell size and count are checked too.
        for (int64_t y = 0; y < l.cell; ++y)
          for (int64_t x = 0; x < l.cell; ++x)
            ASSERT_EQ(d.At(x0 + j * l.cell + x, y0 + i * l.cell + y), want)
                << "head " << h << " cell " << i << "," << j;
      }
  }
  EXPECT_EQ(d.At(l.gap, l.bar_top + 1), WeightColour(0.0f));
  EXPECT_EQ(d.At(l.width - l.gap - 1, l.bar_top + 1), WeightColour(1.0f));
  EXPECT_EQ(d.At(0, 0), (std::array<uint8_t, 3>{255, 255, 255}));
}

TEST(HeatmapTest, SvgHasOneRectPerCellLabelsAndTheScale) {
  Heatmap m = TwoHeads();
  m.row_labels = m.col_labels = {"[CLS]", "a<b", "&", "x\x1b[2J", "[SEP]"};
  const std::string svg = RenderSvg(m);
  size_t cells = 0;
  for (size_t at = svg.find("class=\"cell\""); at != std::string::npos;
       at = svg.find("class=\"cell\"", at + 1)) {
    ++cells;
  }
  EXPECT_EQ(cells, 50u);
  EXPECT_NE(svg.find("a&lt;b"), std::string::npos);
  EXPECT_NE(svg.find("&amp;"), std::string::npos);
  EXPECT_EQ(svg.find('\x1b'), std::string::npos);
  EXPECT_NE(svg.find("data-head=\"3\""), std::string::npos);
  EXPECT_NE(svg.find("fill=\"#fde725\"><title>1.0000"), std::string::npos);  // a diagonal cell
  EXPECT_NE(svg.find("class=\"colour-bar\""), std::string::npos);
}

TEST(HeatmapTest, TerminalDrawsHalfBlocksAndNoEscapesFromLabels) {
  Heatmap m = TwoHeads();
  m.row_labels = m.col_labels = {"a", "b", "c", "evil\x1b]0;x\x07", "e"};
  const std::string t = RenderTerminal(m);
  EXPECT_NE(t.find("head 3"), std::string::npos);
  EXPECT_NE(t.find("\xe2\x96\x80"), std::string::npos);
  EXPECT_NE(t.find("evil?]0;x?"), std::string::npos) << t;
}

TEST(HeatmapTest, CommandDrawsEmbedOutputAndRefusesBadInput) {
  test::TempDir dir("heatmap_");
  const std::string fixtures = std::string(QKV_TESTDATA_DIR) + "/patterns";
  const test::CliResult r = test::RunCli(
      {"heatmap", "--attn-weights", fixtures + "/layer0.npy", "--tokens", fixtures + "/tokens.json",
       "--batch-index", "1", "--which-heads", "0,2", "--out", dir.File("m.svg")},
      dir.File(""));
  ASSERT_TRUE(r.exited && r.status == 0) << test::Describe(r);
  const std::string svg = test::ReadFile(dir.File("m.svg"));
  size_t cells = 0;
  for (size_t at = svg.find("class=\"cell\""); at != std::string::npos;
       at = svg.find("class=\"cell\"", at + 1)) {
    ++cells;
  }
  EXPECT_EQ(cells, 2u * 6 * 6);  // input 1 has 6 tokens
  const test::CliResult png = test::RunCli({"heatmap", "--attn-weights", fixtures + "/layer0.npy",
                                            "--out", dir.File("m.png"), "--terminal"},
                                           dir.File(""));
  ASSERT_TRUE(png.exited && png.status == 0) << test::Describe(png);
  EXPECT_NE(png.out.find("head 4"), std::string::npos);
  const std::string bytes = test::ReadFile(dir.File("m.png"));
  const Decoded d = DecodePng(std::vector<unsigned char>(bytes.begin(), bytes.end()));
  EXPECT_GT(d.width, 0);

  std::vector<float> bad = {0.5f, 0.7f, 0.1f, 0.2f};  // row 0 sums to 1.2
  const std::vector<int64_t> shape = {2, 2};
  WriteNpy(dir.File("bad.npy"), DType::kFloat32, shape, bad.data());
  std::vector<float> negative = {-0.5f, 1.5f, 0.5f, 0.5f};
  WriteNpy(dir.File("neg.npy"), DType::kFloat32, shape, negative.data());
  const std::string good = fixtures + "/layer0.npy";
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"--attn-weights", dir.File("bad.npy"), "--terminal"}, "sums to 1.2"},
      {{"--attn-weights", dir.File("neg.npy"), "--terminal"}, "in [0, 1]"},
      {{"--attn-weights", good, "--batch-index", "4", "--terminal"}, "--batch-index"},
      {{"--attn-weights", good, "--which-heads", "5", "--terminal"}, "--which-heads"},
      {{"--attn-weights", good, "--out", dir.File("m.jpg")}, "--out"},
      {{"--attn-weights", good}, "--out, --terminal"},
      {{"--attn-weights", dir.File("missing.npy"), "--terminal"}, "--attn-weights"},
      {{"--attn-weights", good, "--tokens", dir.File("bad.npy"), "--terminal"}, "--tokens"},
  };
  for (const auto& [args, fragment] : cases) {
    std::vector<std::string> all = {"heatmap"};
    all.insert(all.end(), args.begin(), args.end());
    const test::CliResult e = test::RunCli(all, dir.File(""));
    EXPECT_TRUE(e.exited && e.status == 2) << fragment << ": " << test::Describe(e);
    EXPECT_EQ(std::count(e.err.begin(), e.err.end(), '\n'), 1) << e.err;
    EXPECT_NE(e.err.find(fragment), std::string::npos) << e.err;
  }
  EXPECT_FALSE(std::filesystem::exists(dir.File("m.jpg")));
}

}  // namespace
}  // namespace qkv::inspect
