// qkv::Decode (split-KV decode against KV caches) against the independent
// float64 oracle of test_util.h, under every compiled SIMD target: lengths
// around the split and block edges, head dims, GQA/MQA, cache dtypes, chunk
// layouts, windows, mixed lengths, NaN rules; thread and split invariance;
// MergeAttentionPartials; argument checks.
//
// Caches are built by hand (no KvCache): a sequence's K/V [kv_head, token,
// dim] doubles are stored in a dtype and cut into chunks, and the oracle is
// fed the dequantised values. Query i of a sequence sits at position
// length - seq_q + i: the oracle's bottom-right causal mask with seq_q
// queries and seq_kv = length keys; a window W is window_left = W - 1,
// window_right = 0.
#include "qkv/decode.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/decode_attention.h"
#include "qkv/error.h"
#include "simd_test_util.h"
#include "test_util.h"

namespace qkv::test {
namespace {

const float kInfF = std::numeric_limits<float>::infinity();

// Error bound: MatchesOracle's reference factor with u_eff = 2u, the flash
// kernel's factor (flash_attention_test.cc: online rescaling adds at most
// the terms it is compared with). The split merge adds, per partial i with
// its own lse_i: w_i = exp(lse_i - m) / sum rounds in double and once to
// float (u), but inherits lse_i's error, ((D + 2) A + (N_i + 2) + |lse_i|) u
// with N_i <= seq_kv keys; out = sum_i w_i out_i adds n_splits u relative.
// Relative to sum_j w_j |v_j| (= sum_i w_i sum_{j in i} w_ij |v_j|) that is
// at most 2 (D + 2) A u + 2 (N + 2) u + 2 |lse| u + n u, and |lse| <= A +
// log N; with D >= 1 each piece is at most the matching term of the
// reference factor 2 (2 (D + 2) A + 2) + 2 (N + 2): the merge at most doubles
// the flash kernel's error budget only where the flash rescaling (which the
// decode kernel also does within a split) leaves room. Measured: every
// oracle comparison here still passes with u_eff = u / 4, 1/8 of the bound
// used. So the flash factor 2u is kept.
constexpr double kDecodeU = 2.0 * kU32;

// How a sequence's cache is cut and laid out.
struct Storage {
  DType dtype = DType::kFloat32;
  enum Chunking { kOne, kRandom, kBlocks } chunking = kOne;
  int64_t block = 16;         // kBlocks: tokens per chunk
  bool head_major = false;    // [head, token, dim] per chunk instead of [token, head, dim]
                              // (int8 scales [head, token] instead of [token, head])
  int64_t pad = 0;            // extra elements per token row (misalignment)
  int64_t dropped = 0;        // first tokens evicted (not in any chunk)
  int64_t sinks = 0;          // of the dropped range, the first `sinks` tokens are kept
};

// One sequence's cache: the chunks' storage and the view over it.
struct SeqCache {
  std::vector<std::vector<unsigned char>> k, v;
  std::vector<std::vector<float>> k_scale, v_scale;
  KvSequenceView view;
};

// Rounds one row x (of one token and kv head) to the storage dtype, int8
// with scale = max|x| / 127 appended to *scales; writes the stored bytes and
// returns the dequantised values (what the kernel computes with).
std::vector<double> Quantise(const std::vector<double>& x, DType dtype, std::vector<float>* scales,
                             std::vector<unsigned char>* bytes) {
  const size_t n = x.size();
  std::vector<double> deq(n);
  bytes->resize(n * DTypeSize(dtype));
  float scale = 0.0f;
  if (dtype == DType::kInt8) {
    for (double v : x) scale = std::max(scale, std::fabs(static_cast<float>(v)));
    scale /= 127.0f;
    scales->push_back(scale);
  }
  for (size_t i = 0; i < n; ++i) {
    const float f = static_cast<float>(x[i]);
    uint16_t h = 0;
    switch (dtype) {
      case DType::kFloat32:
        std::memcpy(bytes->data() + 4 * i, &f, 4), deq[i] = f;
        break;
      case DType::kFloat16:
        h = FloatToHalf(f);
        std::memcpy(bytes->data() + 2 * i, &h, 2), deq[i] = HalfToFloat(h);
        break;
      case DType::kBFloat16:
        h = FloatToBFloat16(f);
        std::memcpy(bytes->data() + 2 * i, &h, 2), deq[i] = BFloat16ToFloat(h);
        break;
      default: {  // int8: q = round(x / scale), value = q * scale in float
        const int8_t q = scale == 0.0f ? 0 : static_cast<int8_t>(std::lround(f / scale));
        (*bytes)[i] = static_cast<unsigned char>(q);
        deq[i] = static_cast<float>(q) * scale;
        break;
      }
    }
  }
  return deq;
}

// Stores k, v ([kv_heads, length, dim] doubles) as `st` says; replaces k and
// v by the values the kernel will see (dequantised).
SeqCache BuildCache(std::vector<double>& k, std::vector<double>& v, int64_t kv_heads,
                    int64_t length, int64_t dim, const Storage& st, std::mt19937_64& rng) {
  SeqCache cache;
  cache.view.dtype = st.dtype;
  cache.view.num_kv_heads = kv_heads;
  cache.view.head_dim = dim;
  cache.view.length = length;
  // Kept token runs [begin, end) by position, then chunk sizes within them.
  std::vector<std::pair<int64_t, int64_t>> runs;
  if (st.sinks > 0) runs.push_back({0, std::min(st.sinks, length)});
  if (st.dropped < length) runs.push_back({std::max(st.dropped, st.sinks), length});
  std::vector<std::pair<int64_t, int64_t>> chunks;
  for (auto [begin, end] : runs) {
    for (int64_t t = begin; t < end;) {
      int64_t n = end - t;
      if (st.chunking == Storage::kBlocks) n = std::min(n, st.block);
      if (st.chunking == Storage::kRandom) n = std::min<int64_t>(n, 1 + rng() % 300);
      chunks.push_back({t, n});
      t += n;
    }
  }
  const int64_t row = dim + st.pad;
  for (auto [first, count] : chunks) {
    // Gather the chunk as [token, head, dim] or [head, token, dim] with pad.
    std::vector<double> kc(count * kv_heads * row, 0.0), vc(kc.size(), 0.0);
    const int64_t token_stride = st.head_major ? row : kv_heads * row;
    const int64_t head_stride = st.head_major ? count * row : row;
    for (int64_t t = 0; t < count; ++t)
      for (int64_t g = 0; g < kv_heads; ++g)
        for (int64_t d = 0; d < dim; ++d) {
          const int64_t src = (g * length + first + t) * dim + d;
          kc[t * token_stride + g * head_stride + d] = k[src];
          vc[t * token_stride + g * head_stride + d] = v[src];
        }
    // int8 scales are per (token, head): quantise row by row in that order.
    cache.k.emplace_back(), cache.v.emplace_back();
    cache.k_scale.emplace_back(), cache.v_scale.emplace_back();
    std::vector<double> kd(kc.size()), vd(vc.size());
    cache.k.back().resize(kc.size() * DTypeSize(st.dtype));
    cache.v.back().resize(vc.size() * DTypeSize(st.dtype));
    for (int64_t t = 0; t < count; ++t)
      for (int64_t g = 0; g < kv_heads; ++g) {
        const int64_t at = t * token_stride + g * head_stride;
        for (auto [src, dst, deq, scales] :
             {std::tuple{&kc, &cache.k.back(), &kd, &cache.k_scale.back()},
              std::tuple{&vc, &cache.v.back(), &vd, &cache.v_scale.back()}}) {
          std::vector<double> x(src->begin() + at, src->begin() + at + dim);
          std::vector<unsigned char> b;
          const std::vector<double> q = Quantise(x, st.dtype, scales, &b);
          std::copy(b.begin(), b.end(), dst->begin() + at * DTypeSize(st.dtype));
          std::copy(q.begin(), q.end(), deq->begin() + at);
        }
      }
    for (int64_t t = 0; t < count; ++t)
      for (int64_t g = 0; g < kv_heads; ++g)
        for (int64_t d = 0; d < dim; ++d) {
          const int64_t dst = (g * length + first + t) * dim + d;
          k[dst] = kd[t * token_stride + g * head_stride + d];
          v[dst] = vd[t * token_stride + g * head_stride + d];
        }
    KvChunk c;
    c.k = cache.k.back().data(), c.v = cache.v.back().data();
    if (st.dtype == DType::kInt8) {
      if (st.head_major) {  // scales [head, token] too, as KvCache stores them
        for (auto* scales : {&cache.k_scale.back(), &cache.v_scale.back()}) {
          std::vector<float> by_head(scales->size());
          for (int64_t t = 0; t < count; ++t)
            for (int64_t g = 0; g < kv_heads; ++g) by_head[g * count + t] = (*scales)[t * kv_heads + g];
          scales->swap(by_head);
        }
        c.scale_token_stride = 1, c.scale_head_stride = count;
      } else {
        c.scale_token_stride = kv_heads, c.scale_head_stride = 1;  // quantised in (t, g) order
      }
      c.k_scale = cache.k_scale.back().data(), c.v_scale = cache.v_scale.back().data();
    }
    c.count = count, c.first_position = first;
    c.token_stride = token_stride, c.head_stride = head_stride;
    cache.view.chunks.push_back(c);
  }
  return cache;
}

// A decode problem: per-sequence cases for the oracle plus the caches.
struct Problem {
  int64_t num_q_heads = 1, num_kv_heads = 1, seq_q = 1, head_dim = 1;
  int64_t window = -1;
  std::vector<Case> cases;  // one per sequence: batch 1, seq_kv = length
  std::vector<SeqCache> caches;
};

Problem MakeProblem(const std::vector<int64_t>& lengths, int64_t heads, int64_t kv_heads,
                    int64_t seq_q, int64_t dim, int64_t window, const std::vector<Storage>& st,
                    uint64_t seed) {
  Problem p;
  p.num_q_heads = heads, p.num_kv_heads = kv_heads, p.seq_q = seq_q, p.head_dim = dim;
  p.window = window;
  std::mt19937_64 rng(seed);
  for (size_t b = 0; b < lengths.size(); ++b) {
    Case c = RandomCase(1, heads, kv_heads, seq_q, lengths[b], dim, dim, seed * 131 + b);
    c.causal = true;
    if (window > 0) c.window_left = window - 1, c.window_right = 0;
    const Storage& s = st[b % st.size()];
    if (s.sinks > 0) {  // keep the sinks and [dropped, length): a bool mask for the oracle
      c.bool_mask.assign(heads * seq_q * lengths[b], 0);
      for (int64_t r = 0; r < heads * seq_q; ++r)
        for (int64_t j = 0; j < lengths[b]; ++j)
          c.bool_mask[r * lengths[b] + j] = j < s.sinks || j >= s.dropped;
    }
    p.caches.push_back(BuildCache(c.k, c.v, kv_heads, lengths[b], dim, s, rng));
    p.cases.push_back(std::move(c));
  }
  return p;
}

struct DecodeRun {
  std::vector<float> out, lse;
  DecodeInfo info;
};

DecodeRun RunDecode(const Problem& p, int threads = 0, int64_t split_tokens = 0) {
  const int64_t B = static_cast<int64_t>(p.cases.size()), H = p.num_q_heads, NQ = p.seq_q,
                D = p.head_dim;
  std::vector<float> q(B * H * NQ * D);
  for (int64_t b = 0; b < B; ++b)
    std::copy(p.cases[b].q.begin(), p.cases[b].q.end(), q.begin() + b * H * NQ * D);
  std::vector<KvSequenceView> views;
  for (const SeqCache& c : p.caches) views.push_back(c.view);
  DecodeRun r;
  r.out.assign(B * H * NQ * D, -7.0f);
  r.lse.assign(B * H * NQ, -7.0f);
  DecodeParams params;
  params.q = TensorView::Contiguous(q.data(), DType::kFloat32, {B, H, NQ, D});
  params.sequences = views;
  params.out = MutableTensorView::Contiguous(r.out.data(), DType::kFloat32, {B, H, NQ, D});
  params.lse = MutableTensorView::Contiguous(r.lse.data(), DType::kFloat32, {B, H, NQ, 1});
  params.window = p.window;
  params.split_tokens = split_tokens;
  params.num_threads = threads;
  r.info = Decode(params);
  return r;
}

// Compares sequence b of `r` with the oracle.
::testing::AssertionResult SequenceMatches(const Problem& p, const DecodeRun& r, size_t b) {
  const Case& c = p.cases[b];
  const int64_t rows = p.num_q_heads * p.seq_q, D = p.head_dim;
  Result res;
  res.out.assign(r.out.begin() + b * rows * D, r.out.begin() + (b + 1) * rows * D);
  res.lse.assign(r.lse.begin() + b * rows, r.lse.begin() + (b + 1) * rows);
  return MatchesOracle(c, res, Oracle(c), kDecodeU);
}

// Calls fn() once per compiled SIMD target of the decode kernel.
template <class Fn>
void ForEachTarget(const Fn& fn) {
  ForEachSimdTarget([] { return std::string(internal::DecodeSimdTarget()); },
                    [&](const std::string&) { fn(); });
}

// The whole problem against the oracle under every target.
void ExpectMatches(const Problem& p, int64_t split_tokens = 0, bool all_targets = true) {
  auto check = [&] {
    const DecodeRun r = RunDecode(p, 0, split_tokens);
    for (size_t b = 0; b < p.cases.size(); ++b) {
      EXPECT_TRUE(SequenceMatches(p, r, b)) << "sequence " << b << " length "
                                             << p.cases[b].seq_kv;
    }
  };
  if (all_targets) {
    ForEachTarget(check);
  } else {
    check();
  }
}

TEST(DecodeTest, CompiledTargetsIncludeTheBest) {
  int n = 0;
  ForEachTarget([&] { ++n; });
  EXPECT_GE(n, 2);
}

// Lengths around the block (32) and split (64 here, 512 default) edges,
// head dims around the lane counts, seq_q 1..4.
TEST(DecodeTest, LengthsAndHeadDims) {
  const int64_t dims[] = {1, 3, 64, 80, 128};
  int k = 0;
  for (int64_t length : {1, 7, 31, 33, 63, 65, 97, 129, 511, 513, 1025}) {
    for (int64_t seq_q = 1; seq_q <= std::min<int64_t>(4, length); seq_q += 3) {
      const int64_t dim = dims[k++ % 5];
      SCOPED_TRACE("length " + std::to_string(length) + " seq_q " + std::to_string(seq_q) +
                   " head_dim " + std::to_string(dim));
      const Problem p = MakeProblem({length}, 4, 2, seq_q, dim, -1, {{}}, 10 + k);
      ExpectMatches(p, 0);
      ExpectMatches(p, 64, /*all_targets=*/false);
    }
  }
}

// DecodeInfo says which path read K/V and why (no silent slow path).
TEST(DecodeTest, InfoNamesTheKvPath) {
  const int64_t lanes = internal::DecodeSimdLanes();
  for (int64_t dim : {64, 3}) {
    const Problem p = MakeProblem({40}, 4, 2, 1, dim, -1, {{}}, 15);
    const DecodeRun r = RunDecode(p);
    if (dim % lanes == 0) {
      EXPECT_EQ(r.info.path, "in place (float32 rows read and converted in registers)");
    } else {
      EXPECT_EQ(r.info.path, "float32 tiles (head_dim 3 is not a multiple of the " +
                                 std::to_string(lanes) + "-float " + r.info.simd_target +
                                 " width: each K/V row is converted and padded first, slower)");
    }
  }
}

TEST(DecodeTest, LongCachesAcrossSplits) {
  for (int64_t length : {4095, 4097}) {
    const Problem p = MakeProblem({length}, 8, 2, 2, 128, -1, {{}}, 20);
    ExpectMatches(p, 0, /*all_targets=*/length == 4097);
  }
}

TEST(DecodeTest, GroupedAndMultiQuery) {
  for (auto [heads, kv_heads] : {std::pair{4, 4}, {8, 2}, {8, 1}, {16, 2}, {6, 1}}) {
    SCOPED_TRACE("heads " + std::to_string(heads) + "/" + std::to_string(kv_heads));
    for (int64_t seq_q : {1, 3}) {
      ExpectMatches(MakeProblem({300}, heads, kv_heads, seq_q, 64, -1, {{}}, 30 + seq_q), 128);
      // int8 in place (KvCache's head-major layout): a row count that is not
      // a multiple of 4 takes the 3-, 2- or 1-row softmax and P.V tiles.
      Storage st;
      st.dtype = DType::kInt8, st.head_major = true;
      ExpectMatches(MakeProblem({300}, heads, kv_heads, seq_q, 64, -1, {st}, 40 + seq_q), 128,
                    /*all_targets=*/false);
    }
  }
}

// Every cache dtype in every chunk layout; the oracle sees the dequantised
// values, so the bound is the float32 one.
TEST(DecodeTest, DtypesAndChunkLayouts) {
  int seed = 40;
  for (DType dtype : {DType::kFloat32, DType::kFloat16, DType::kBFloat16, DType::kInt8}) {
    for (auto chunking : {Storage::kOne, Storage::kRandom, Storage::kBlocks}) {
      for (bool head_major : {false, true}) {
        Storage st;
        st.dtype = dtype, st.chunking = chunking, st.head_major = head_major;
        st.pad = head_major ? 3 : 0;  // misaligned rows: no in-place reads
        SCOPED_TRACE(std::string(DTypeName(dtype)) + " chunking " + std::to_string(chunking) +
                     (head_major ? " head-major" : " token-major"));
        for (int64_t dim : {64, 80, 3}) {
          ExpectMatches(MakeProblem({777}, 8, 2, 2, dim, -1, {st}, ++seed), 256,
                        /*all_targets=*/dim == 80);
        }
      }
    }
  }
}

TEST(DecodeTest, MixedLengthsInOneBatch) {
  Storage one, random, blocks;
  random.chunking = Storage::kRandom;
  blocks.chunking = Storage::kBlocks, blocks.block = 16;
  const Problem p = MakeProblem({1, 97, 1025, 4097, 4, 600}, 4, 1, 1, 64, -1,
                                {one, random, blocks}, 50);
  ExpectMatches(p);
  const Problem p4 = MakeProblem({4, 97, 1025, 130}, 8, 2, 4, 80, -1, {blocks, one}, 51);
  ExpectMatches(p4, 64);
}

// Windows: full, partial and one-token; a ring buffer (evicted prefix) and
// StreamingLLM sinks give the same rows as the masks they implement.
TEST(DecodeTest, WindowsAndEvictedTokens) {
  for (int64_t window : {1, 2, 5, 100, 513, 1000, 5000}) {
    SCOPED_TRACE("window " + std::to_string(window));
    ExpectMatches(MakeProblem({3, 97, 1025, 3000}, 8, 2, 3 - (window % 2), 64, window, {{}}, 60),
                  128, /*all_targets=*/window == 100);
    Storage ring;  // only the last window + seq_q - 1 tokens are kept
    ring.chunking = Storage::kBlocks, ring.block = 64;
    ring.dropped = std::max<int64_t>(0, 3000 - window - 2);
    ExpectMatches(MakeProblem({3000}, 4, 4, 3, 64, window, {ring}, 61), 256, false);
  }
  Storage sinks;  // positions [0, 4) and [2000, 2500)
  sinks.sinks = 4, sinks.dropped = 2000, sinks.chunking = Storage::kRandom;
  ExpectMatches(MakeProblem({2500}, 8, 2, 2, 64, -1, {sinks}, 62), 128);
}

// length == seq_q: every cached token is new; query 0 attends position 0
// only (its splits beyond are skipped for it, not for query 3).
TEST(DecodeTest, AllTokensNew) {
  ExpectMatches(MakeProblem({4, 5}, 4, 2, 4, 64, -1, {{}}, 70), 0);
  ExpectMatches(MakeProblem({2}, 4, 2, 2, 3, 1, {{}}, 71), 1);  // window 1, split 1
}

// A NaN or inf in K/V rows a query does not attend (outside its window)
// never reaches its row; one it attends makes the row NaN as the oracle.
TEST(DecodeTest, NanOutsideTheWindowStaysOut) {
  for (DType dtype : {DType::kFloat32, DType::kFloat16}) {
    Storage st;
    st.dtype = dtype, st.chunking = Storage::kRandom;
    Problem p = MakeProblem({700}, 4, 2, 2, 64, 100, {st}, 80);
    // Poison positions 10 and 598 (outside both windows [599, 700) and
    // [600, 701)), in the stored data directly.
    for (KvChunk& c : p.caches[0].view.chunks) {
      for (int64_t pos : {10, 598}) {
        if (pos < c.first_position || pos >= c.first_position + c.count) continue;
        const int64_t t = pos - c.first_position;
        for (int64_t g = 0; g < 2; ++g) {
          const int64_t at = t * c.token_stride + g * c.head_stride;
          if (dtype == DType::kFloat32) {
            static_cast<float*>(const_cast<void*>(c.k))[at] = std::nanf("");
            static_cast<float*>(const_cast<void*>(c.v))[at + 1] = kInfF;
          } else {
            static_cast<uint16_t*>(const_cast<void*>(c.k))[at] = 0x7e00;  // NaN
            static_cast<uint16_t*>(const_cast<void*>(c.v))[at + 1] = 0x7c00;  // inf
          }
        }
      }
    }
    ForEachTarget([&] {
      const DecodeRun r = RunDecode(p, 0, 64);
      for (float x : r.out) ASSERT_TRUE(std::isfinite(x));
      EXPECT_TRUE(SequenceMatches(p, r, 0));
    });
    // Without the window the NaN key is attended: every row is NaN.
    p.window = -1;
    p.cases[0].window_left = p.cases[0].window_right = -1;
    const DecodeRun r = RunDecode(p, 0, 64);
    for (float x : r.out) EXPECT_TRUE(std::isnan(x));
  }
}

// An attended key with score -inf (k = -inf where every q > 0) gets weight
// exactly 0, and its inf V row must be skipped, not multiplied by 0.
TEST(DecodeTest, MinusInfScoreSkipsItsValueRow) {
  Problem p = MakeProblem({300}, 4, 2, 1, 16, -1, {{}}, 85);
  Case& c = p.cases[0];
  for (size_t x = 0; x < c.q.size(); x += 16) c.q[x] = std::fabs(c.q[x]) + 0.5;
  const KvChunk& chunk = p.caches[0].view.chunks[0];
  for (int64_t g = 0; g < 2; ++g) {
    const int64_t at = 250 * chunk.token_stride + g * chunk.head_stride;
    static_cast<float*>(const_cast<void*>(chunk.k))[at] = -kInfF;
    static_cast<float*>(const_cast<void*>(chunk.v))[at + 3] = kInfF;
    c.k[(g * 300 + 250) * 16] = -kInfF;
    c.v[(g * 300 + 250) * 16 + 3] = kInfF;
  }
  ForEachTarget([&] {
    // split_tokens 1: token 250's split has only the -inf score (m stays -inf).
    for (int64_t split : {1, 64}) {
      const DecodeRun r = RunDecode(p, 0, split);
      for (float x : r.out) ASSERT_TRUE(std::isfinite(x));
      EXPECT_TRUE(SequenceMatches(p, r, 0));
    }
  });
}

TEST(DecodeTest, BitwiseIdenticalForAnyThreadCount) {
  Storage blocks;
  blocks.chunking = Storage::kBlocks;
  const Problem p = MakeProblem({5000, 33, 1200}, 8, 2, 2, 80, 3000, {blocks, {}}, 90);
  const DecodeRun base = RunDecode(p, 1, 256);
  for (int threads : {2, 3, 8}) {
    const DecodeRun r = RunDecode(p, threads, 256);
    EXPECT_EQ(0, std::memcmp(base.out.data(), r.out.data(), base.out.size() * 4)) << threads;
    EXPECT_EQ(0, std::memcmp(base.lse.data(), r.lse.data(), base.lse.size() * 4)) << threads;
    EXPECT_EQ(base.info.splits, r.info.splits);
    EXPECT_EQ(base.info.kv_bytes_read, r.info.kv_bytes_read);
  }
}

// One split (split_tokens huge) and many small ones both match the oracle;
// prints the worst error as a fraction of the bound.
TEST(DecodeTest, SplitMergeWithinBound) {
  const Problem p = MakeProblem({4097}, 8, 2, 1, 128, -1, {{}}, 100);
  const DecodeRun whole = RunDecode(p, 0, int64_t{1} << 40);
  EXPECT_EQ(whole.info.splits, 2);  // one per KV head
  for (int64_t split : {int64_t{1}, int64_t{17}, int64_t{256}, int64_t{1} << 40}) {
    const DecodeRun r = RunDecode(p, 0, split);
    EXPECT_TRUE(SequenceMatches(p, r, 0)) << "split_tokens " << split;
    EXPECT_EQ(r.info.splits, 2 * ((4097 + std::min<int64_t>(split, 4097) - 1) / std::min<int64_t>(split, 4097)));
    double worst = 0.0;
    for (size_t i = 0; i < r.out.size(); ++i) worst = std::max(worst, std::fabs(double(r.out[i]) - whole.out[i]));
    std::printf("split_tokens %lld: max |split - unsplit| = %.3g\n", static_cast<long long>(split), worst);
  }
}

// kv_bytes_read counts the K/V (+ scale) rows of attended tokens once per KV head.
TEST(DecodeTest, BytesReadAndSkippedSplits) {
  Storage i8;
  i8.dtype = DType::kInt8;
  const Problem p = MakeProblem({2048}, 8, 2, 1, 64, -1, {i8}, 110);
  EXPECT_EQ(RunDecode(p, 0, 512).info.kv_bytes_read, 2 * 2048 * (2 * 64 + 8));
  Problem w = MakeProblem({2048}, 8, 2, 1, 64, 100, {{}}, 111);
  const DecodeRun r = RunDecode(w, 0, 512);
  EXPECT_EQ(r.info.kv_bytes_read, 2 * 100 * 2 * 64 * 4);  // the window only
  EXPECT_EQ(r.info.splits, 2);                              // splits 0..2 skipped
  EXPECT_TRUE(SequenceMatches(w, r, 0));
}

// Float64 q and float16 / float64 outputs, strided q.
TEST(DecodeTest, OtherQueryAndOutputDtypes) {
  const Problem p = MakeProblem({300}, 4, 2, 2, 64, -1, {{}}, 120);
  const DecodeRun want = RunDecode(p, 0, 0);
  const Case& c = p.cases[0];
  std::vector<double> q(c.q);  // float32-exact values
  std::vector<double> out(4 * 2 * 64);
  std::vector<uint16_t> lse(8);
  std::vector<KvSequenceView> views{p.caches[0].view};
  DecodeParams params;
  params.q = TensorView::Contiguous(q.data(), DType::kFloat64, {1, 4, 2, 64});
  params.sequences = views;
  params.out = MutableTensorView::FromBSHD(out.data(), DType::kFloat64, 1, 2, 4, 64);
  params.lse = MutableTensorView::Contiguous(lse.data(), DType::kFloat16, {1, 4, 2, 1});
  Decode(params);
  for (int64_t h = 0; h < 4; ++h)
    for (int64_t i = 0; i < 2; ++i) {
      for (int64_t d = 0; d < 64; ++d)
        ASSERT_EQ(out[(i * 4 + h) * 64 + d], want.out[(h * 2 + i) * 64 + d]);
      EXPECT_EQ(lse[h * 2 + i], FloatToHalf(want.lse[h * 2 + i]));
    }
}

// Partials of the oracle on key halves, rounded to float and merged, match
// the oracle on all keys; -inf partials change no bit; all -inf gives zeros.
TEST(DecodeTest, MergeAttentionPartials) {
  Case c = RandomCase(1, 1, 1, 1, 1000, 32, 32, 130);
  const OracleResult full = Oracle(c);
  std::vector<float> parts, lses;
  for (auto [j0, j1] : {std::pair{0, 300}, {300, 301}, {301, 1000}}) {
    Case h = c;
    h.seq_kv = j1 - j0;
    h.k.assign(c.k.begin() + j0 * 32, c.k.begin() + j1 * 32);
    h.v.assign(c.v.begin() + j0 * 32, c.v.begin() + j1 * 32);
    const OracleResult o = Oracle(h);
    for (double x : o.out) parts.push_back(static_cast<float>(x));
    lses.push_back(static_cast<float>(o.lse[0]));
  }
  std::vector<float> out(32);
  float lse = 0.0f;
  MergeAttentionPartials(parts, lses, 32, out, &lse);
  Result r;
  r.out.assign(out.begin(), out.end());
  r.lse = {lse};
  // Inputs rounded to float (u each) and the merge's own rounding: well
  // inside the float32 reference bound.
  EXPECT_TRUE(MatchesOracle(c, r, full, kU32));

  // Interleave -inf partials (with garbage out rows): bitwise the same.
  std::vector<float> parts2, lses2;
  for (int i = 0; i < 3; ++i) {
    for (int d = 0; d < 32; ++d) parts2.push_back(std::nanf(""));
    lses2.push_back(-kInfF);
    parts2.insert(parts2.end(), parts.begin() + i * 32, parts.begin() + (i + 1) * 32);
    lses2.push_back(lses[i]);
  }
  std::vector<float> out2(32);
  float lse2 = 0.0f;
  MergeAttentionPartials(parts2, lses2, 32, out2, &lse2);
  EXPECT_EQ(0, std::memcmp(out.data(), out2.data(), 32 * 4));
  EXPECT_EQ(0, std::memcmp(&lse, &lse2, 4));

  // All -inf (and none at all): zeros and -inf.
  const std::vector<float> empty_lse(2, -kInfF), garbage(64, std::nanf(""));
  std::fill(out.begin(), out.end(), 5.0f);
  MergeAttentionPartials(garbage, empty_lse, 32, out, &lse);
  for (float x : out) EXPECT_EQ(x, 0.0f);
  EXPECT_EQ(lse, -kInfF);
  MergeAttentionPartials({}, {}, 32, out, nullptr);
  for (float x : out) EXPECT_EQ(x, 0.0f);

  // One partial: returned as is.
  MergeAttentionPartials(std::span<const float>(parts).first(32), std::span<const float>(lses).first(1),
                         32, out, &lse);
  EXPECT_EQ(0, std::memcmp(out.data(), parts.data(), 32 * 4));
  EXPECT_EQ(lse, lses[0]);

  // Size mismatches.
  EXPECT_THROW(MergeAttentionPartials(std::span<const float>(parts).first(40), lses, 32, out, &lse), Error);
  EXPECT_THROW(MergeAttentionPartials(parts, lses, 32, std::span<float>(out).first(31), &lse), Error);
}

// Each bad argument is refused before anything is written, naming it.
TEST(DecodeTest, ValidationNamesTheArgument) {
  const Problem p = MakeProblem({10, 20}, 4, 2, 2, 8, -1, {{}}, 140);
  std::vector<float> q(2 * 4 * 2 * 8), out(q.size()), lse(16);
  std::vector<KvSequenceView> views;
  for (const SeqCache& c : p.caches) views.push_back(c.view);
  auto params = [&] {
    DecodeParams d;
    d.q = TensorView::Contiguous(q.data(), DType::kFloat32, {2, 4, 2, 8});
    d.sequences = views;
    d.out = MutableTensorView::Contiguous(out.data(), DType::kFloat32, {2, 4, 2, 8});
    d.lse = MutableTensorView::Contiguous(lse.data(), DType::kFloat32, {2, 4, 2, 1});
    return d;
  };
  EXPECT_NO_THROW(Decode(params()));
  auto expect_error = [&](DecodeParams d, const std::string& prefix) {
    try {
      Decode(d);
      ADD_FAILURE() << "no error for " << prefix;
    } catch (const Error& e) {
      const std::string what = e.what();
      EXPECT_EQ(what.rfind(prefix, 0), 0u) << what;
      EXPECT_EQ(what.find('\n'), std::string::npos) << what;
    }
  };
  DecodeParams d = params();
  d.sequences = std::span<const KvSequenceView>(views).first(1);
  expect_error(d, "sequences: 1 views");
  d = params(), d.q.dtype = DType::kInt32;
  expect_error(d, "q: dtype int32");
  d = params(), d.q.shape = {2, 3, 2, 8};
  expect_error(d, "sequences: num_kv_heads 2 must divide");
  d = params(), d.q.shape = {2, 4, 2, 7};
  expect_error(d, "sequences[0]: head_dim 8");
  d = params(), d.out.shape = {2, 4, 1, 8};
  expect_error(d, "out: shape");
  d = params(), d.lse.shape = {2, 4, 2, 2};
  expect_error(d, "lse: shape");
  d = params(), d.window = 0;
  expect_error(d, "window: 0");
  d = params(), d.split_tokens = -1;
  expect_error(d, "split_tokens: -1");
  d = params(), d.num_threads = 1025;
  expect_error(d, "num_threads: 1025");
  d = params(), d.scale = std::nan("");
  expect_error(d, "scale:");
  {
    std::vector<KvSequenceView> bad = views;
    bad[1].length = 1;  // seq_q 2 new tokens but only 1 appended
    bad[1].chunks.clear();
    d = params(), d.sequences = bad;
    expect_error(d, "sequences[1]: length 1");
    bad = views, bad[1].dtype = DType::kFloat16;
    d.sequences = bad;
    expect_error(d, "sequences[1]: dtype float16");
    bad = views, bad[1].num_kv_heads = 1;
    d.sequences = bad;
    expect_error(d, "sequences[1]: num_kv_heads 1");
    bad = views, bad[0].dtype = DType::kFloat64, bad[1].dtype = DType::kFloat64;
    d.sequences = bad;
    expect_error(d, "sequences[0]: dtype float64");
    bad = views, bad[1].chunks[0].first_position = 15;  // runs past length 20
    d.sequences = bad;
    expect_error(d, "sequences[1].chunks[0]: tokens [15, 35)");
    bad = views, bad[0].dtype = bad[1].dtype = DType::kInt8;
    d.sequences = bad;
    expect_error(d, "sequences[0].chunks[0]: k_scale or v_scale is null");
    // Scales present but their strides left 0: one scale would serve all.
    std::vector<float> scales(64, 1.0f);
    for (KvSequenceView& view : bad)
      for (KvChunk& chunk : view.chunks) chunk.k_scale = chunk.v_scale = scales.data();
    d.sequences = bad;
    expect_error(d, "sequences[0].chunks[0]: scale_token_stride 0, scale_head_stride 0");
  }
}

}  // namespace
}  // namespace qkv::test
