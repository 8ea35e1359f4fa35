// qkv/positional.h: positional encodings: sinusoidal, learned absolute,
// rotary (RoPE) and ALiBi. See docs/positional.md for the formulas.
//
// Tensors are float32 views in the logical order of qkv/tensor.h,
//   x  [batch, num_heads, seq, head_dim]   any strides (bhsd, bshd, ...)
// where num_heads is num_q_heads for queries and num_kv_heads for keys, and
// seq is seq_q or seq_kv. Rows of a plain [seq, dim] matrix are the view
// [1, 1, seq, dim] with strides {0, 0, row_stride, 1}. Row s of x has
// position `offset + s`: while decoding with a KV cache, offset is the number
// of tokens already in the cache, so new rows continue the positions.
//
// Every function validates its arguments first and throws qkv::Error (one
// line naming the argument and what was expected) before writing anything.
#ifndef QKV_POSITIONAL_H_
#define QKV_POSITIONAL_H_

#include <cstdint>
#include <span>
#include <vector>

#include "qkv/tensor.h"

namespace qkv {

inline constexpr double kDefaultRopeBase = 10000.0;

// Writes PE[offset + s, d] into pe[b, h, s, d] for every b and h (Vaswani et
// al. 2017): PE[p, 2i] = sin(p / base^(2i/dim)), PE[p, 2i+1] = cos(same);
// an odd dim ends with a sin column. Angles are computed in double.
void FillSinusoidalPositions(MutableTensorView pe, int64_t offset = 0,
                             double base = kDefaultRopeBase);

// Adds table[offset + s, :] to x[b, h, s, :] in place (GPT-2 style learned
// absolute positions). table is [1, 1, num_positions, head_dim] (broadcast
// over batch and heads). Throws when offset + seq > num_positions: positions
// past the table have no learned row.
void AddLearnedPositions(MutableTensorView x, TensorView table, int64_t offset = 0);

// Which dimensions RoPE rotates together. Both use the frequencies
// theta_i = base^(-2i / rotary_dim), i in [0, rotary_dim / 2).
enum class RopeStyle : uint8_t {
  kNeox,  // half-split: pair i is (x[i], x[i + rotary_dim/2]) (GPT-NeoX, Llama)
  kGptJ,  // interleaved: pair i is (x[2i], x[2i + 1]) (GPT-J, the RoFormer paper)
};

struct RopeParams {
  RopeStyle style = RopeStyle::kNeox;
  double base = kDefaultRopeBase;  // > 0 and finite
  int64_t rotary_dim = 0;          // 0: head_dim; else even, <= head_dim
  int64_t offset = 0;              // >= 0; row s has position offset + s
};

// Rotates every pair (a, b) of x in place by the angle p * theta_i of its
// position p:  a' = a cos - b sin,  b' = a sin + b cos. Dimensions from
// rotary_dim on pass through unchanged (partial rotary). The angle and its
// cos / sin are computed in double and then rounded to float32: a float32
// angle at p = 100000 would be off by ~p * 2^-24 = 0.006 rad; in double
// the error is ~1e-11 rad, below float32 resolution. The rotation itself
// is float32 (two products and a sum). x must not have stride 0 on a dim of
// size > 1 (an element would be rotated twice).
void ApplyRope(MutableTensorView x, const RopeParams& params);

// Returns the ALiBi slopes m_0 .. m_{n-1} of Press et al. (2022), as the
// reference get_slopes: for n a power of two, m_h = 2^(-8 (h+1) / n); else,
// with n' the largest power of two below n, the n' slopes of n' followed by
// slopes 0, 2, 4, ... of 2n' (the first n - n' of them). n >= 1.
std::vector<double> AlibiSlopes(int64_t num_heads);

struct AlibiParams {
  // Causal (the published form):  bias = m_h (j - i'), i' = i + seq_kv - seq_q,
  //   for j <= i', and -inf for j > i' (the mask then is causal by itself).
  // Symmetric (causal = false):    bias = -m_h |j - i'| (encoders, MPT).
  bool causal = true;
  std::span<const double> slopes;  // [num_q_heads]; empty: AlibiSlopes(heads)
};

// Fills bias [batch, num_q_heads, seq_q, seq_kv] (float32, usually batch 1)
// with the ALiBi bias of AlibiParams, ready for MaskSpec::mask as an additive
// mask. i' aligns the last query with the last key (bottom-right, as qkv's
// causal rule in qkv/mask.h), so decoding with seq_q = 1 sees every key.
void FillAlibiBias(MutableTensorView bias, const AlibiParams& params = {});

}  // namespace qkv

#endif  // QKV_POSITIONAL_H_
