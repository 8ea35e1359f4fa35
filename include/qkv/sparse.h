// qkv/sparse.h: block-sparse attention layouts for MaskSpec::block_mask.
//
// A layout says which 64 x 64 tiles of the [seq_q, seq_kv] attention matrix
// are computed: tile (qb, kb) holds queries [64 qb, 64 qb + 64) and keys
// [64 kb, 64 kb + 64) (kSparseBlock = 64, the flash kernels' key block, so a
// tile is computed whole or skipped before any K/V row is read). The flash
// forward and backward kernels never touch an absent tile: their work is
// proportional to the tiles present (AttentionInfo::tiles counts them). A
// layout composes with every other mask rule by AND (causal, windows, key
// lengths, explicit masks).
//
// Builders (blocks of 64; "diagonal" tile of query block qb: the key block
// of its first query under bottom-right alignment, (64 qb + seq_kv - seq_q)
// / 64, clamped; for seq_q = seq_kv it is kb = qb):
//   BigBird (Zaheer et al. 2020): `window` blocks centred on the diagonal
//     (window 3: kb - 1 .. kb + 1), the first `global` blocks attend and are
//     attended everywhere, and each other row of blocks gets `random` more
//     key blocks drawn without replacement (std::mt19937_64 seeded by
//     `seed`, the same on every platform) from those it does not have.
//   Longformer (Beltagy et al. 2020): `window` blocks as BigBird, and every
//     block holding a global token attends and is attended everywhere (at
//     block granularity: the 64 tokens around a global token are global too).
//   Strided (Child et al. 2019, "Sparse Transformer", strided pattern):
//     kb with 0 <= qb - kb < stride (the local part) or (qb - kb) % stride
//     == 0 (the strided part), for kb <= qb; usually used with causal.
//   Fixed (Child et al. 2019, fixed pattern): kb in qb's segment of `stride`
//     blocks (floor(kb / stride) == floor(qb / stride)), or kb among the
//     last `summary` blocks of any segment; kb <= qb.
// Text specs (the CLI's --sparse): "bigbird:window=3,global=2,random=3,seed=0",
// "longformer:window=3,global=0+100+517" (token indices joined by '+'),
// "strided:stride=4", "fixed:stride=4,summary=1"; "block=64" may be given
// and must be 64.
#ifndef QKV_SPARSE_H_
#define QKV_SPARSE_H_

#include <cstdint>
#include <string>
#include <vector>

#include "qkv/mask.h"
#include "qkv/tensor.h"

namespace qkv {

struct BlockLayout {
  int64_t q_blocks = 0, kv_blocks = 0;
  std::vector<uint8_t> present;  // [q_blocks, kv_blocks], 1 = the tile is computed

  // MaskSpec::block_mask for every batch and head: [1, 1, q_blocks,
  // kv_blocks] viewing `present` (keep the layout alive while it is used).
  TensorView View() const;
  // Tiles present.
  int64_t Count() const;
  bool At(int64_t qb, int64_t kb) const { return present[qb * kv_blocks + kb] != 0; }
};

// Blocks covering n tokens: ceil(n / kSparseBlock).
inline int64_t SparseBlocks(int64_t n) { return (n + kSparseBlock - 1) / kSparseBlock; }

struct BigBirdOptions {
  int64_t window = 3, global = 2, random = 3;
  uint64_t seed = 0;
};
struct LongformerOptions {
  int64_t window = 3;
  std::vector<int64_t> global_tokens;  // token indices; each must be < max(seq_q, seq_kv)
};

// Each throws qkv::Error (one line naming the parameter) on a negative or
// out-of-range parameter; seq_q, seq_kv >= 0 and at most 2^31 - 1.
BlockLayout BigBirdLayout(int64_t seq_q, int64_t seq_kv, const BigBirdOptions& options);
BlockLayout LongformerLayout(int64_t seq_q, int64_t seq_kv, const LongformerOptions& options);
BlockLayout StridedLayout(int64_t seq_q, int64_t seq_kv, int64_t stride);
BlockLayout FixedLayout(int64_t seq_q, int64_t seq_kv, int64_t stride, int64_t summary);

// Parses a text spec (above) and builds its layout; errors name `flag` and
// the key ("--sparse: bigbird: window: -1 (expected >= 1)").
BlockLayout ParseSparseLayout(const std::string& spec, int64_t seq_q, int64_t seq_kv,
                              const std::string& flag = "sparse");

// A picture: one character per tile ('#' present, '.' absent), one line per
// block row, then the density (capped at 256 x 256 tiles: larger layouts are
// drawn with one character per group of tiles, '#' if any is present).
std::string RenderLayout(const BlockLayout& layout);

}  // namespace qkv

#endif  // QKV_SPARSE_H_
