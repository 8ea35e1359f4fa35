// Block-sparse attention (issue 17, part 1): the layouts of qkv/sparse.h
// and MaskSpec::block_mask in the flash and reference kernels, forward and
// backward.
//  - Layout builders against their definitions (small pictures written out
//    by hand, global rows and columns, random picks per row, seeds).
//  - Every kernel against the float64 oracle of test_util.h, which applies
//    the block mask from its definition (tile (i / 64, j / 64) present) on
//    top of every other rule, on awkward sizes (1, 7, 97, 129, 1025; head
//    dims 1, 3, 59, 80, 256; seq_q != seq_kv both ways), GQA, per-head
//    layouts, every mask kind of ApplyMaskKind, large logits; the backward
//    against the float64 backward oracle.
//  - Block skipping is real: the flash kernel's tile count equals the
//    layout's tiles intersected with the structural rules.
//  - Bitwise identical for 1, 2 and 3 threads; bad layouts are one-line
//    errors before anything is written.
#include "qkv/sparse.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "backward_test_util.h"
#include "cli_test_util.h"
#include "file_test_util.h"
#include "qkv/attention.h"
#include "qkv/attention_backward.h"
#include "qkv/error.h"
#include "qkv/npy.h"
#include "test_util.h"

namespace qkv::test {
namespace {

using ::testing::HasSubstr;

// The layout as text, '#' present, one line per block row.
std::string Picture(const BlockLayout& l) {
  std::string s;
  for (int64_t qb = 0; qb < l.q_blocks; ++qb) {
    for (int64_t kb = 0; kb < l.kv_blocks; ++kb) s += l.At(qb, kb) ? '#' : '.';
    s += '\n';
  }
  return s;
}

TEST(SparseLayoutTest, StridedAndFixedMatchTheirPictures) {
  // 8 x 8 blocks; strided, stride 3: local 0 <= qb - kb < 3, and kb with
  // qb - kb a multiple of 3.
  EXPECT_EQ(Picture(StridedLayout(512, 512, 3)),
            "#.......\n"
            "##......\n"
            "###.....\n"
            "####....\n"
            ".####...\n"
            "..####..\n"
            "#..####.\n"
            ".#..####\n");
  // Fixed, stride 3, summary 1: the own segment of 3 blocks, and the last
  // block of every segment (kb % 3 == 2), kb <= qb.
  EXPECT_EQ(Picture(FixedLayout(512, 512, 3, 1)),
            "#.......\n"
            "##......\n"
            "###.....\n"
            "..##....\n"
            "..###...\n"
            "..####..\n"
            "..#..##.\n"
            "..#..###\n");
}

TEST(SparseLayoutTest, BigBirdHasWindowGlobalAndRandomTiles) {
  const int64_t n = 20 * 64 - 5;  // 20 blocks, the last one partial
  BigBirdOptions o;
  o.window = 3, o.global = 2, o.random = 3, o.seed = 7;
  const BlockLayout l = BigBirdLayout(n, n, o);
  ASSERT_EQ(l.q_blocks, 20);
  ASSERT_EQ(l.kv_blocks, 20);
  for (int64_t qb = 0; qb < 20; ++qb) {
    int64_t row = 0;
    for (int64_t kb = 0; kb < 20; ++kb) row += l.At(qb, kb);
    if (qb < 2) {
      EXPECT_EQ(row, 20) << "global row " << qb;
      continue;
    }
    for (int64_t kb = qb - 1; kb <= std::min<int64_t>(qb + 1, 19); ++kb) EXPECT_TRUE(l.At(qb, kb));
    EXPECT_TRUE(l.At(qb, 0) && l.At(qb, 1)) << "global columns";
    // window (3, or 2 on the last row) + 2 global + 3 random, the window
    // overlapping the globals on rows 2 and 3.
    const int64_t window = qb == 19 ? 2 : 3, overlap = qb == 2 ? 1 : 0;
    EXPECT_EQ(row, window + 2 - overlap + 3) << "row " << qb;
  }
  EXPECT_EQ(Picture(BigBirdLayout(n, n, o)), Picture(l)) << "same seed, same layout";
  o.seed = 8;
  EXPECT_NE(Picture(BigBirdLayout(n, n, o)), Picture(l)) << "another seed";
  // Cross-attention: the window follows the bottom-right diagonal.
  BigBirdOptions w;
  w.window = 1, w.global = 0, w.random = 0;
  EXPECT_EQ(Picture(BigBirdLayout(128, 256, w)), "..#.\n...#\n");
}

TEST(SparseLayoutTest, LongformerGlobalTokensAndParsing) {
  LongformerOptions o;
  o.window = 1, o.global_tokens = {130};
  EXPECT_EQ(Picture(LongformerLayout(320, 320, o)),
            "#.#..\n"
            ".##..\n"
            "#####\n"
            "..##.\n"
            "..#.#\n");
  EXPECT_EQ(Picture(ParseSparseLayout("longformer:window=1,global=130", 320, 320)), Picture(LongformerLayout(320, 320, o)));
  EXPECT_EQ(Picture(ParseSparseLayout("strided:stride=3,block=64", 512, 512)),
            Picture(StridedLayout(512, 512, 3)));
  EXPECT_EQ(ParseSparseLayout("bigbird", 640, 640).Count(),
            BigBirdLayout(640, 640, BigBirdOptions{}).Count());
  const std::string picture = RenderLayout(StridedLayout(512, 512, 3));
  EXPECT_THAT(picture, HasSubstr(".#..####\n"));
  EXPECT_THAT(picture, HasSubstr("28 of 64 tiles of 64 x 64 present (43.8%)"));
  for (const auto& [spec, words] : std::vector<std::pair<std::string, std::string>>{
           {"bigbird:window=-1", "--sparse: bigbird: window: -1 (expected >= 0)"},
           {"bigbird:windw=3", "--sparse: bigbird: unknown key 'windw'"},
           {"bigbird:window=x", "--sparse: bigbird: window: 'x' (expected an integer)"},
           {"bigbird:block=32", "--sparse: bigbird: block: 32 (expected 64"},
           {"bigbird:window", "--sparse: bigbird: 'window' (expected key=value"},
           {"longformer:global=5+999", "--sparse: longformer: global token 999 (expected 0..319"},
           {"fixed:stride=2,summary=3", "--sparse: fixed: summary 3 (expected at most stride 2)"},
           {"dense", "--sparse: dense: unknown layout"}}) {
    try {
      ParseSparseLayout(spec, 320, 320);
      ADD_FAILURE() << spec << " was accepted";
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), HasSubstr(words)) << spec;
    }
  }
}

// A random per-(batch, head) layout of about `density` of the tiles.
std::vector<uint8_t> RandomBlocks(const Case& c, double density, std::mt19937_64& rng) {
  const int64_t n = c.batch * c.num_q_heads * SparseBlocks(c.seq_q) * SparseBlocks(c.seq_kv);
  std::bernoulli_distribution present(density);
  std::vector<uint8_t> blocks(static_cast<size_t>(n));
  for (auto& x : blocks) x = present(rng);
  return blocks;
}

struct Size {
  int64_t batch, heads, kv_heads, seq_q, seq_kv, dim, dim_v;
};
const Size kSizes[] = {
    {1, 1, 1, 7, 7, 1, 1},     {2, 4, 2, 129, 129, 59, 59}, {1, 2, 1, 97, 1025, 3, 80},
    {1, 2, 2, 1025, 97, 80, 3}, {1, 1, 1, 1, 1025, 256, 256}, {2, 2, 1, 200, 300, 64, 32},
};

TEST(SparseAttentionTest, FlashAndReferenceMatchTheFloat64Oracle) {
  std::mt19937_64 rng(42);
  for (const Size& z : kSizes) {
    for (const int kind : {0, 1, 2, 3, 6, 7, 8, 9}) {
      // ApplyMaskKind's additive kinds mask row 1 whole: they need two rows.
      if (kind >= 8 && z.batch * z.heads * z.seq_q < 2) continue;
      Case c = RandomCase(z.batch, z.heads, z.kv_heads, z.seq_q, z.seq_kv, z.dim, z.dim_v, 11 + kind);
      ApplyMaskKind(c, kind, rng);
      c.block_mask = RandomBlocks(c, 0.5, rng);
      SCOPED_TRACE("seq " + std::to_string(z.seq_q) + "x" + std::to_string(z.seq_kv) + " dim " +
                   std::to_string(z.dim) + " mask kind " + std::to_string(kind));
      const OracleResult o = Oracle(c);
      const Result flash = RunQkv(c, Accumulate::kFloat32, 2, false, DType::kFloat32, Kernel::kFlash);
      EXPECT_TRUE(MatchesOracle(c, flash, o, kU32));
      const Result ref = RunQkv(c, Accumulate::kFloat32, 2, true, DType::kFloat32, Kernel::kReference);
      EXPECT_TRUE(MatchesOracle(c, ref, o, kU32));
      const Result f64 = RunQkv(c, Accumulate::kFloat64, 2, true, DType::kFloat64);
      EXPECT_TRUE(MatchesOracle(c, f64, o, kU64));
    }
  }
}

TEST(SparseAttentionTest, LargeLogitsAndPerHeadLayouts) {
  std::mt19937_64 rng(5);
  Case c = RandomCase(1, 4, 4, 300, 300, 16, 16, 3);
  for (double& x : c.q) x *= 30.0;  // scores up to ~ 30 * sqrt(16) * 4
  c.block_mask = RandomBlocks(c, 0.3, rng);
  c.causal = true;
  EXPECT_TRUE(MatchesOracle(c, RunQkv(c, Accumulate::kFloat32, 2, false, DType::kFloat32, Kernel::kFlash),
                            Oracle(c), kU32));
}

TEST(SparseAttentionTest, BackwardMatchesTheFloat64Oracle) {
  std::mt19937_64 rng(9);
  for (const Size& z : kSizes) {
    if (z.seq_q * z.seq_kv > 300000) continue;  // the float64 backward oracle is O(n^2 d)
    for (const int kind : {0, 1, 3, 7, 8}) {
      if (kind >= 8 && z.batch * z.heads * z.seq_q < 2) continue;
      Case c = RandomCase(z.batch, z.heads, z.kv_heads, z.seq_q, z.seq_kv, z.dim, z.dim_v, 21 + kind);
      ApplyMaskKind(c, kind, rng);
      c.block_mask = RandomBlocks(c, 0.5, rng);
      const std::vector<double> dout = RandomDout(c, 77);
      SCOPED_TRACE("seq " + std::to_string(z.seq_q) + "x" + std::to_string(z.seq_kv) + " kind " +
                   std::to_string(kind));
      for (const Kernel kernel : {Kernel::kFlash, Kernel::kReference}) {
        BackwardOptions opt = Options(kernel);
        opt.threads = 2;
        const BackwardResult r = RunBackward(c, dout, opt);
        EXPECT_TRUE(MatchesBackwardOracle(c, dout, r, kernel == Kernel::kFlash ? kFlashBackwardU : kU32))
            << KernelName(kernel);
      }
    }
  }
}

TEST(SparseAttentionTest, ThreadCountNeverChangesABit) {
  std::mt19937_64 rng(3);
  Case c = RandomCase(1, 4, 2, 333, 333, 32, 32, 8);
  c.causal = true;
  c.block_mask = RandomBlocks(c, 0.4, rng);
  const Result one = RunQkv(c, Accumulate::kFloat32, 1, false, DType::kFloat32, Kernel::kFlash);
  const std::vector<double> dout = RandomDout(c, 5);
  BackwardOptions opt = Options(Kernel::kFlash);
  opt.threads = 1;
  const BackwardResult b1 = RunBackward(c, dout, opt);
  for (const int threads : {2, 3}) {
    const Result r = RunQkv(c, Accumulate::kFloat32, threads, false, DType::kFloat32, Kernel::kFlash);
    EXPECT_EQ(r.out, one.out) << threads;
    EXPECT_EQ(r.lse, one.lse) << threads;
    opt.threads = threads;
    const BackwardResult b = RunBackward(c, dout, opt);
    EXPECT_EQ(b.dq, b1.dq) << threads;
    EXPECT_EQ(b.dk, b1.dk) << threads;
    EXPECT_EQ(b.dv, b1.dv) << threads;
  }
}

// One query head per KV head and seq_q a multiple of 64: a flash work item
// is one 64-row query block, so its tiles are the layout's.
TEST(SparseAttentionTest, FlashComputesExactlyThePresentTiles) {
  BigBirdOptions bo;
  bo.window = 3, bo.global = 1, bo.random = 2, bo.seed = 1;
  const int64_t n = 16 * 64;
  const BlockLayout layout = BigBirdLayout(n, n, bo);
  const int64_t heads = 2;
  std::vector<float> q(heads * n * 32), k(q.size()), v(q.size()), out(q.size());
  std::mt19937_64 rng(1);
  std::normal_distribution<float> normal;
  for (auto* x : {&q, &k, &v})
    for (float& e : *x) e = normal(rng);
  AttentionParams p;
  p.q = TensorView::Contiguous(q.data(), DType::kFloat32, {1, heads, n, 32});
  p.k = TensorView::Contiguous(k.data(), DType::kFloat32, {1, heads, n, 32});
  p.v = TensorView::Contiguous(v.data(), DType::kFloat32, {1, heads, n, 32});
  p.out = MutableTensorView::Contiguous(out.data(), DType::kFloat32, {1, heads, n, 32});
  p.kernel = Kernel::kFlash;
  const int64_t dense = Attention(p).tiles;
  EXPECT_EQ(dense, heads * 16 * 16);
  p.mask.block_mask = layout.View();  // [1, 1, 16, 16]: every head
  EXPECT_EQ(Attention(p).tiles, heads * layout.Count());
  int64_t causal_tiles = 0;
  for (int64_t qb = 0; qb < 16; ++qb)
    for (int64_t kb = 0; kb <= qb; ++kb) causal_tiles += layout.At(qb, kb);
  p.mask.causal = true;
  EXPECT_EQ(Attention(p).tiles, heads * causal_tiles);
}

TEST(SparseAttentionTest, BadBlockMasksAreOneLineErrorsBeforeWriting) {
  std::vector<float> q(2 * 100 * 8, 1.0f), out(q.size(), 7.0f);
  std::vector<uint8_t> blocks(2 * 2 * 2, 1);
  std::vector<float> fblocks(8, 1.0f);
  AttentionParams p;
  p.q = TensorView::Contiguous(q.data(), DType::kFloat32, {1, 2, 100, 8});
  p.k = p.v = p.q;
  p.out = MutableTensorView::Contiguous(out.data(), DType::kFloat32, {1, 2, 100, 8});
  const auto expect_error = [&](const TensorView& bm, const std::string& words) {
    p.mask.block_mask = bm;
    try {
      Attention(p);
      ADD_FAILURE() << words;
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), HasSubstr(words));
      EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos);
    }
    for (const float x : out) ASSERT_EQ(x, 7.0f);
  };
  expect_error(TensorView::Contiguous(fblocks.data(), DType::kFloat32, {1, 2, 2, 2}),
               "block_mask: dtype float32 (expected bool");
  expect_error(TensorView::Contiguous(blocks.data(), DType::kBool, {1, 2, 2, 1}),
               "block_mask: shape [1,2,2,1] (expected [1,2,2,2]");
  expect_error(TensorView::Contiguous(blocks.data(), DType::kBool, {1, 2, 3, 2}),
               "block_mask: shape [1,2,3,2]");
  // Broadcast over batch and heads is fine; over blocks it is not.
  p.mask.block_mask = TensorView{blocks.data(), DType::kBool, {1, 2, 2, 2}, {0, 0, 2, 1}};
  EXPECT_NO_THROW(Attention(p));
  std::fill(out.begin(), out.end(), 7.0f);
  expect_error(TensorView{blocks.data(), DType::kBool, {1, 2, 1, 2}, {0, 0, 0, 1}},
               "block_mask: shape [1,2,1,2]");
}

// The command line: qkv sparse draws and saves a layout; attend --sparse and
// --block-mask with that file compute the same tiles; bad specs and files
// are one-line errors naming the flag.
TEST(SparseCliTest, SparseCommandAndAttendFlags) {
  TempDir dir("sparse_cli");
  const CliResult show = RunCli({"sparse", "strided:stride=3", "--seq", "512"}, dir.File(""));
  ASSERT_TRUE(show.exited && show.status == 0) << Describe(show);
  EXPECT_THAT(show.out, HasSubstr(".#..####\n28 of 64 tiles"));
  const CliResult save =
      RunCli({"sparse", "bigbird:random=1", "--seq", "700", "--out", dir.File("bm.npy"), "--json"},
             dir.File(""));
  ASSERT_TRUE(save.exited && save.status == 0) << Describe(save);
  const nlohmann::json j = nlohmann::json::parse(save.out);
  const NpyArray bm = ReadNpy(dir.File("bm.npy"));
  EXPECT_EQ(bm.dtype, DType::kBool);
  EXPECT_EQ(bm.shape, (std::vector<int64_t>{11, 11}));
  int64_t present = 0;
  for (int64_t e = 0; e < bm.numel(); ++e) present += bm.data<uint8_t>()[e] != 0;
  EXPECT_EQ(j.at("tiles_present").get<int64_t>(), present);
  EXPECT_EQ(present, ParseSparseLayout("bigbird:random=1", 700, 700).Count());
  const auto tiles = [](const CliResult& r) {
    const size_t at = r.out.find("tiles: ");
    return at == std::string::npos ? int64_t{-1} : std::stoll(r.out.substr(at + 7));
  };
  const CliResult by_spec = RunCli({"attend", "--shape", "1,2,700,16", "--sparse",
                                    "bigbird:random=1", "--verbose"}, dir.File(""));
  const CliResult by_file = RunCli({"attend", "--shape", "1,2,700,16", "--block-mask",
                                    dir.File("bm.npy"), "--verbose"}, dir.File(""));
  ASSERT_TRUE(by_spec.exited && by_spec.status == 0) << Describe(by_spec);
  ASSERT_TRUE(by_file.exited && by_file.status == 0) << Describe(by_file);
  EXPECT_EQ(tiles(by_spec), 2 * present);
  EXPECT_EQ(tiles(by_file), 2 * present);
  for (const auto& [args, words] : std::vector<std::pair<std::vector<std::string>, std::string>>{
           {{"attend", "--shape", "1,2,700,16", "--sparse", "bigbird:window=-2"}, "--sparse: bigbird: window"},
           {{"attend", "--shape", "1,2,300,16", "--block-mask", dir.File("bm.npy")}, "--block-mask"},
           {{"attend", "--shape", "1,2,700,16", "--block-mask", dir.File("bm.npy"), "--sparse", "bigbird"},
            "excludes"},
           {{"sparse", "nope", "--seq", "10"}, "--sparse: nope: unknown layout"},
           {{"sparse", "bigbird", "--seq", "-1"}, "--seq"}}) {
    const CliResult r = RunCli(args, dir.File(""));
    EXPECT_TRUE(r.exited && r.status == 2) << Describe(r);
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    EXPECT_THAT(r.err, HasSubstr(words));
  }
}

}  // namespace
}  // namespace qkv::test
