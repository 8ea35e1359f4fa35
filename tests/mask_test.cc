// The mask algebra: broadcasting, the structural key ranges against their
// definition pair by pair, and the worked examples of docs/masks.md.
#include <gtest/gtest.h>

#include <string>

#include "mask_rules.h"
#include "qkv/error.h"
#include "qkv/mask.h"

namespace qkv {
namespace {

// Returns the allowed pattern of rows as strings of '1' (attend) / '.'.
std::vector<std::string> Pattern(const MaskSpec& m, int64_t nq, int64_t nk, int64_t len = -1) {
  std::vector<std::string> rows;
  for (int64_t i = 0; i < nq; ++i) {
    const auto r = internal::RowKeyRange(m, nq, nk, i, len < 0 ? nk : len);
    std::string s;
    for (int64_t j = 0; j < nk; ++j) s += (j >= r.lo && j < r.hi) ? '1' : '.';
    rows.push_back(s);
  }
  return rows;
}

TEST(MaskTest, CausalAlignments) {
  MaskSpec m;
  m.causal = true;  // bottom-right, seq_q 2 < seq_kv 4: the last query sees every key
  EXPECT_EQ(Pattern(m, 2, 4), (std::vector<std::string>{"111.", "1111"}));
  m.alignment = Alignment::kTopLeft;  // torch is_causal
  EXPECT_EQ(Pattern(m, 2, 4), (std::vector<std::string>{"1...", "11.."}));
  // seq_q 4 > seq_kv 2, bottom-right: the first two queries see nothing.
  m.alignment = Alignment::kBottomRight;
  EXPECT_EQ(Pattern(m, 4, 2), (std::vector<std::string>{"..", "..", "1.", "11"}));
}

TEST(MaskTest, WindowAndKeyLengths) {
  MaskSpec m;
  m.window_left = 1;
  m.window_right = 0;  // causal, one key back
  EXPECT_EQ(Pattern(m, 4, 4), (std::vector<std::string>{"1...", "11..", ".11.", "..11"}));
  m.window_left = -1;
  m.window_right = 1;  // one key ahead, unbounded behind
  EXPECT_EQ(Pattern(m, 3, 4), (std::vector<std::string>{"111.", "1111", "1111"}));
  MaskSpec pad;
  EXPECT_EQ(Pattern(pad, 2, 4, 2), (std::vector<std::string>{"11..", "11.."}));
  pad.causal = true;  // padding does not move the diagonal
  EXPECT_EQ(Pattern(pad, 2, 4, 3), (std::vector<std::string>{"111.", "111."}));
}

// RowKeyRange equals the pairwise definition of mask.h for many settings,
// including window sides far beyond the sequence (no overflow).
TEST(MaskTest, RangesMatchDefinitionPairwise) {
  for (int64_t nq : {1, 3, 8})
    for (int64_t nk : {0, 1, 5, 8})
      for (int align = 0; align < 2; ++align)
        for (bool causal : {false, true})
          for (int64_t left : {int64_t{-1}, int64_t{0}, int64_t{2}, int64_t{1} << 62})
            for (int64_t right : {int64_t{-1}, int64_t{0}, int64_t{3}, int64_t{1} << 62})
              for (int64_t len = 0; len <= nk; ++len) {
                MaskSpec m;
                m.alignment = align ? Alignment::kTopLeft : Alignment::kBottomRight;
                m.causal = causal;
                m.window_left = left;
                m.window_right = right;
                const int64_t d = align ? 0 : nk - nq;
                for (int64_t i = 0; i < nq; ++i) {
                  const auto r = internal::RowKeyRange(m, nq, nk, i, len);
                  for (int64_t j = 0; j < nk; ++j) {
                    bool ok = j < len;
                    if (causal) ok = ok && j <= i + d;
                    if (left >= 0) ok = ok && j >= i + d - left;
                    if (right >= 0) ok = ok && j <= i + d + right;
                    ASSERT_EQ(ok, j >= r.lo && j < r.hi)
                        << "nq " << nq << " nk " << nk << " i " << i << " j " << j;
                  }
                }
              }
}

TEST(MaskTest, CountAllowedPairs) {
  MaskSpec m;
  EXPECT_EQ(CountAllowedPairs(m, 2, 3, 5), 30);
  m.causal = true;
  EXPECT_EQ(CountAllowedPairs(m, 1, 4, 4), 10);  // n (n + 1) / 2
  const int64_t lengths[] = {2, 4};
  m.key_lengths = lengths;
  EXPECT_EQ(CountAllowedPairs(m, 2, 4, 4), 1 + 2 + 2 + 2 + 10);
}

TEST(MaskTest, BroadcastFollowsNumpyRules) {
  const Shape4 target{2, 3, 4, 5};
  const int64_t s2[] = {4, 5};
  auto v = BroadcastMask(nullptr, DType::kBool, s2, target);
  EXPECT_EQ(v.strides, (Shape4{0, 0, 5, 1}));
  const int64_t s4[] = {2, 1, 4, 1};
  v = BroadcastMask(nullptr, DType::kFloat32, s4, target);
  EXPECT_EQ(v.strides, (Shape4{4, 0, 1, 0}));
  const int64_t s0[] = {1};
  v = BroadcastMask(nullptr, DType::kBool, std::span<const int64_t>(s0, 0), target);
  EXPECT_EQ(v.strides, (Shape4{0, 0, 0, 0}));
  const int64_t bad[] = {3, 5};
  EXPECT_THROW(BroadcastMask(nullptr, DType::kBool, bad, target), Error);
  const int64_t rank5[] = {1, 1, 1, 1, 1};
  EXPECT_THROW(BroadcastMask(nullptr, DType::kBool, rank5, target), Error);
  try {
    BroadcastMask(nullptr, DType::kBool, bad, target);
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("does not broadcast to [2,3,4,5]"), std::string::npos);
  }
}

}  // namespace
}  // namespace qkv
