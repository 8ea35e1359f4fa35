// qkv/classic_attention.h: the attention of RNN encoder-decoder models, one
// decoder step over the encoder states (see docs/classic.md).
//
//   e_j     = score(s, h_j)                 j in [0, seq_kv)
//   alpha   = softmax(e)                    over unmasked j, max-subtracted
//   context = sum_j alpha_j h_j             [enc_dim]
//
// Scores (matrices are row-major; s is the decoder state, h_j encoder row j):
//   kBahdanau  v . tanh(W1 s + W2 h_j)   W1 [attn_dim, dec_dim],
//              W2 [attn_dim, enc_dim], v [attn_dim]; s = PREVIOUS state s_{t-1}
//              (Bahdanau et al. 2015: the context feeds the RNN update to s_t)
//   kDot       s . h_j                   dec_dim == enc_dim; s = CURRENT h_t
//   kGeneral   s . (W h_j)               W [dec_dim, enc_dim]; s = current
//   kConcat    v . tanh(W [s; h_j])      W [attn_dim, dec_dim + enc_dim],
//              v [attn_dim]; s = current (Luong et al. 2015: the context is
//              combined with h_t after the RNN step)
// None is scaled by 1/sqrt(d): the additive scores pass through tanh, so
// |e_j| <= ||v||_1 whatever the widths, and v learns the temperature; dot and
// general are unscaled as Luong et al. published them.
#ifndef QKV_CLASSIC_ATTENTION_H_
#define QKV_CLASSIC_ATTENTION_H_

#include <cstdint>
#include <span>

namespace qkv {

enum class ClassicScore : uint8_t { kBahdanau, kDot, kGeneral, kConcat };

struct ClassicAttentionParams {
  ClassicScore score = ClassicScore::kDot;
  int64_t seq_kv = 0, enc_dim = 0, dec_dim = 0;
  int64_t attn_dim = 0;            // kBahdanau and kConcat only
  std::span<const float> state;    // [dec_dim]
  std::span<const float> encoder;  // [seq_kv, enc_dim]
  std::span<const float> w1, w2;   // kBahdanau only, shapes above
  std::span<const float> w;        // kGeneral and kConcat only
  std::span<const float> v;        // kBahdanau and kConcat only
  // [seq_kv] optional, nonzero = attend; masked positions get alpha = 0.
  std::span<const uint8_t> mask;
  std::span<float> context;  // out [enc_dim]
  std::span<float> weights;  // out [seq_kv]: alpha
  std::span<float> scores;   // out [seq_kv], optional: e (-inf where masked)
};

// Computes one step as documented above. Products, tanh, exp and sums are
// evaluated in double and rounded to float32 once at the end (so each
// output is within about 2^-24 relative of the exact value; the sizes of
// a seq2seq step make double cheap here). A step with no unmasked position
// (all masked, or seq_kv = 0) gives zero context and zero weights, not NaN.
// Throws qkv::Error naming the argument before writing anything when a size
// disagrees with the dims, a weight of another score is given, or kDot has
// dec_dim != enc_dim.
void ClassicAttention(const ClassicAttentionParams& params);

// Returns "bahdanau", "dot", "general" or "concat".
const char* ClassicScoreName(ClassicScore score);

}  // namespace qkv

#endif  // QKV_CLASSIC_ATTENTION_H_
