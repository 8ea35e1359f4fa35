// The flash backward kernel (through qkv::AttentionBackward, kernel flash)
// against the independent float64 gradient oracle (backward_test_util.h)
// under every compiled SIMD target: lengths around the 64-row and 64-key
// tiles, head dims 1..2*16 and 59, 111, explicit masks that empty whole
// tiles, GQA groups whose rows span two heads in one tile, a long head on 3
// threads; and scratch memory that does not grow with the sequences beyond
// row statistics.
#include "kernels/flash_backward.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "backward_test_util.h"
#include "kernels/flash_attention.h"
#include "qkv/attention_backward.h"
#include "simd_test_util.h"
#include "test_util.h"

namespace qkv::test {
namespace {

const double kInf = std::numeric_limits<double>::infinity();
// The kernel's query-row and key blocks, for the edge sweeps.
constexpr int64_t kBlockQ = 64, kBlockKV = 64;

// Calls fn(target name) once per compiled SIMD target of the flash kernels.
template <class Fn>
void ForEachTarget(const Fn& fn) {
  ForEachSimdTarget([] { return std::string(internal::FlashSimdTarget()); }, fn);
}

BackwardOptions FlashOptions(int threads = 2) {
  BackwardOptions o = Options(Kernel::kFlash);
  o.threads = threads;
  return o;
}

std::string Name(const Case& c) {
  return "seq_q " + std::to_string(c.seq_q) + " seq_kv " + std::to_string(c.seq_kv) +
         " head_dim " + std::to_string(c.head_dim) + "/" + std::to_string(c.head_dim_v) +
         " heads " + std::to_string(c.num_q_heads) + "/" + std::to_string(c.num_kv_heads) +
         (c.causal ? (c.top_left ? " causal top-left" : " causal") : "");
}

// The forward (best target) and the oracle once; the backward under every
// target against the same out, lse and bound.
void ExpectMatches(const Case& c, const BackwardOptions& o = FlashOptions(), uint64_t seed = 1) {
  const std::vector<double> dout = RandomDout(c, seed);
  BackwardSetup s(c, dout, o);
  const BackwardResult given = s.Read();
  const ErrorModel em = ModelFor(kFlashBackwardU, o.grad, given.out, given.lse);
  const BackwardOracleResult oracle = BackwardOracle(c, dout, &em);
  ForEachTarget([&](const std::string& name) {
    s.Refill();
    const AttentionInfo info = AttentionBackward(s.params);
    EXPECT_EQ(info.kernel, Kernel::kFlash);
    EXPECT_EQ(info.simd_target, name);
    EXPECT_TRUE(MatchesGradients(s.Read(), oracle));
  });
}

TEST(FlashBackwardTest, TileEdgeSizes) {
  const int64_t sizes[] = {kBlockQ - 1, kBlockQ, kBlockQ + 1, 2 * kBlockKV - 1, 2 * kBlockKV,
                           2 * kBlockKV + 1};
  const int64_t dims[] = {1, 3, 16, 59, 80, 128};
  uint64_t seed = 1;
  for (int64_t nq : sizes)
    for (int64_t nk : sizes) {
      Case c = RandomCase(1, 2, 1, nq, nk, dims[seed % 6], dims[(seed + 2) % 6], seed);
      ++seed;
      for (int mode = 0; mode < 3; ++mode) {
        c.causal = mode > 0, c.top_left = mode == 2;
        SCOPED_TRACE(Name(c));
        ExpectMatches(c, FlashOptions(), seed);
      }
    }
}

// Every head dim up to two AVX-512 vectors of float32, then 59 and 111
// (head_dim_v one more, so the two differ by a tail lane).
TEST(FlashBackwardTest, HeadDimSweep) {
  std::vector<int64_t> dims;
  for (int64_t d = 1; d <= 32; ++d) dims.push_back(d);
  dims.push_back(59), dims.push_back(111);
  for (int64_t d : dims) {
    Case c = RandomCase(1, 2, 1, 65, 129, d, d == 111 ? 59 : d + 1, 300 + d);
    c.causal = d % 2 == 0;
    SCOPED_TRACE(Name(c));
    ExpectMatches(c, FlashOptions(), d);
  }
}

// Explicit masks that empty whole 64 x 64 tiles (tile (ti, tj) off when
// ti + tj is odd) and whole rows (3 and 70), as a boolean and as an additive
// mask with random values elsewhere; key lengths and a window that empty
// whole key tiles of some rows.
TEST(FlashBackwardTest, WholeEmptyTiles) {
  for (const auto& [nq, nk] : {std::pair<int64_t, int64_t>{130, 200}, {200, 130}})
    for (int additive = 0; additive < 4; ++additive) {  // bool; float32, float16, float64
      Case c = RandomCase(2, 2, 1, nq, nk, 24, 16, 400 + additive);
      std::mt19937_64 rng(5);
      std::normal_distribution<double> normal(0.0, 1.0);
      const int64_t n = 2 * 2 * nq * nk;
      if (additive) c.add_mask.assign(n, 0.0); else c.bool_mask.assign(n, 1);
      for (int64_t row = 0; row < 2 * 2 * nq; ++row) {
        const int64_t i = row % nq;
        for (int64_t j = 0; j < nk; ++j) {
          const bool off = (i / kBlockQ + j / kBlockKV) % 2 == 1 || i == 3 || i == 70;
          // Values exact in float16, so every mask dtype holds the same mask.
          if (additive) c.add_mask[row * nk + j] = off ? -kInf : HalfToFloat(FloatToHalf(float(normal(rng))));
          else c.bool_mask[row * nk + j] = !off;
        }
      }
      BackwardOptions o = FlashOptions();
      const DType dtypes[] = {DType::kFloat32, DType::kFloat32, DType::kFloat16, DType::kFloat64};
      o.mask_dtype = dtypes[additive];
      SCOPED_TRACE(std::string(additive ? DTypeName(o.mask_dtype) : "boolean") + " mask " + Name(c));
      ExpectMatches(c, o);
    }
  Case k = RandomCase(3, 2, 2, 150, 200, 16, 16, 410);
  k.key_lengths = {0, 64, 129};
  k.window_left = 70, k.window_right = 10;
  SCOPED_TRACE("key lengths and window");
  ExpectMatches(k);
}

// NaN in a q, k or v row (ExpectNanPattern) under every target: the scalar
// tiles that rows and keys holding NaN take, with a window across the tile
// edge and with explicit masks that hide the NaN from most rows.
TEST(FlashBackwardTest, NanStaysWhereItBelongs) {
  Case window = RandomCase(1, 2, 1, 70, 140, 4, 4, 11);
  window.causal = window.top_left = true;
  window.window_left = 3;
  Case masked = RandomCase(1, 2, 1, 70, 100, 8, 5, 12);
  std::mt19937_64 rng(13);
  ApplyMaskKind(masked, 7, rng);
  ApplyMaskKind(masked, 8, rng);
  ForEachTarget([&](const std::string&) {
    for (const Case* c : {&window, &masked}) {
      SCOPED_TRACE(Name(*c));
      EXPECT_GT(ExpectNanPattern(*c, 'q', 64, FlashOptions(), kFlashBackwardU), 0);
      EXPECT_GT(ExpectNanPattern(*c, 'k', 65, FlashOptions(), kFlashBackwardU), 0);
      EXPECT_GT(ExpectNanPattern(*c, 'v', 63, FlashOptions(), kFlashBackwardU), 0);
    }
  });
}

// GQA: the group's query rows (head-major within a KV head) fill 64-row
// blocks across head boundaries: 2 x 40 rows (block 0 holds rows 0..39 of
// head 0 and 0..23 of head 1), 3 x 33, and decode (8 heads x 1 row).
TEST(FlashBackwardTest, GroupRowsSpanHeads) {
  struct Shape { int64_t heads, kv_heads, seq_q, seq_kv; };
  for (const Shape& s : {Shape{4, 2, 40, 100}, Shape{6, 2, 33, 77}, Shape{8, 1, 1, 300},
                         Shape{6, 1, 70, 65}}) {
    Case c = RandomCase(2, s.heads, s.kv_heads, s.seq_q, s.seq_kv, 32, 24, 500 + s.seq_q);
    for (int mode = 0; mode < 2; ++mode) {
      c.causal = mode == 1;
      SCOPED_TRACE(Name(c));
      ExpectMatches(c);
    }
  }
}

// One long head split over 3 threads: against the oracle, and the same bits
// as 1 thread.
TEST(FlashBackwardTest, LongHeadOnThreeThreads) {
  Case c = RandomCase(1, 1, 1, 1000, 1100, 32, 16, 600);
  c.causal = true;
  const std::vector<double> dout = RandomDout(c, 6);
  const BackwardResult three = RunBackward(c, dout, FlashOptions(3));
  EXPECT_EQ(three.info.threads, 3);
  EXPECT_TRUE(MatchesBackwardOracle(c, dout, three, kFlashBackwardU));
  const BackwardResult one = RunBackward(c, dout, FlashOptions(1));
  for (const auto& [a, b] : {std::pair{&three.dq, &one.dq}, {&three.dk, &one.dk}, {&three.dv, &one.dv}})
    EXPECT_EQ(std::memcmp(a->data(), b->data(), a->size() * sizeof(double)), 0);
}

// Scratch: fixed tiles per thread, plus O(seq_q) row statistics (and a
// float32 dq accumulator when dq is not float32 with unit stride); never
// anything in seq_kv.
TEST(FlashBackwardTest, ScratchGrowsOnlyWithRowStatistics) {
  const int64_t B = 1, H = 8, D = 128, DV = 128;
  auto bytes = [&](int64_t nq, int64_t nk, DType dq_dtype) {
    internal::Problem pr;
    pr.batch = B, pr.num_q_heads = H, pr.num_kv_heads = H, pr.group_size = 1;
    pr.seq_q = nq, pr.seq_kv = nk, pr.head_dim = D, pr.head_dim_v = DV, pr.threads = 2;
    AttentionBackwardParams p;
    p.dq = MutableTensorView::Contiguous(nullptr, dq_dtype, {B, H, nq, D});
    p.dk = MutableTensorView::Contiguous(nullptr, DType::kFloat32, {B, H, nk, D});
    p.dv = MutableTensorView::Contiguous(nullptr, DType::kFloat32, {B, H, nk, DV});
    p.kernel = Kernel::kFlash;
    return internal::FlashBackwardScratchBytes(pr, p);
  };
  const int64_t small = 16, large = 1 << 20;
  for (DType dt : {DType::kFloat32, DType::kFloat16}) {
    SCOPED_TRACE(DTypeName(dt));
    EXPECT_EQ(bytes(small, large, dt), bytes(small, small, dt));
    EXPECT_EQ(bytes(large, large, dt), bytes(large, small, dt));
    // Per query row and head: a few float32 statistics (lse, D: 16 bytes
    // allow four), and the float32 dq row when dq is float16.
    const int64_t per_row = 16 + (dt == DType::kFloat16 ? 4 * D : 0);
    EXPECT_LE(bytes(large, small, dt) - bytes(small, small, dt), (large - small) * B * H * per_row);
  }
  // The fixed part, O(Br Bc + (Br + Bc)(D + DV)) float32 per thread: 8 of
  // each is more than the kernel can need (P, dS, and Q, K, V, dout, dQ,
  // dK, dV tiles).
  const int64_t tiles = 4 * (8 * kBlockQ * kBlockKV + 8 * (kBlockQ + kBlockKV) * (D + DV));
  EXPECT_LE(bytes(small, small, DType::kFloat32), 2 * tiles + small * B * H * 16);
  // The same through qkv::AttentionBackward's AttentionInfo (out and lse
  // given, so nothing is recomputed).
  auto info_bytes = [](int64_t nq, int64_t nk) {
    const Case c = RandomCase(1, 2, 1, nq, nk, 8, 8, 700);
    return RunBackward(c, RandomDout(c, 7), FlashOptions()).info.scratch_bytes;
  };
  const int64_t base = info_bytes(64, 64);
  EXPECT_GT(base, 0);
  EXPECT_EQ(info_bytes(64, 4096), base);
  EXPECT_LE(info_bytes(4096, 64) - base, (4096 - 64) * 2 * 16);
}

}  // namespace
}  // namespace qkv::test
