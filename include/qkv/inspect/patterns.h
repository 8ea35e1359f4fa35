// qkv/inspect/patterns.h: what each attention head looks at, measured on
// saved attention weights (the folder `qkv embed --attn-weights` writes),
// after Clark et al. 2019, "What Does BERT Look At?".
//
// For every layer and head, averaged over the real (non-padding) query rows
// of every input, with a the row's weights over the input's L real keys:
//   self a[i]   previous a[i-1] (rows i >= 1)   next a[i+1] (rows i <= L-2)
//   first a[0] ([CLS])   last a[L-1] ([SEP])   punct: mass on punctuation tokens
//   local: mass within |j - i| <= 2   entropy: -sum a ln a (nats)
//   normalized_entropy: entropy / ln L (inputs with L >= 2)
//   sparse: fraction of rows whose top 3 weights hold >= 90 %
// and a label, the first rule that applies (docs/inspect.md):
//   the largest of self, previous, next, first, last, punct if >= 0.5:
//     "diagonal", "previous", "next", "column:[CLS]", "column:[SEP]", "column:punct";
//   local >= 0.8: "local block"; sparse >= 0.8: "sparse";
//   normalized_entropy >= 0.8: "broad"; else "mixed".
#ifndef QKV_INSPECT_PATTERNS_H_
#define QKV_INSPECT_PATTERNS_H_

#include <cstdint>
#include <string>
#include <vector>

namespace qkv::inspect {

// Saved attention weights: layers[l] is [inputs, heads, seq, seq] row-major;
// tokens[b] holds input b's L_b <= seq token strings (its real rows and keys).
struct AttentionDump {
  int64_t num_layers = 0, num_inputs = 0, num_heads = 0, seq = 0;
  std::vector<std::vector<float>> layers;
  std::vector<std::vector<std::string>> tokens;
};

// Reads DIR/layer0.npy, layer1.npy, ... (consecutive, same shape, float32)
// and DIR/tokens.json, and checks every real row: entries in [0, 1],
// summing to 1 within 1e-3. Throws one-line qkv::Error naming the file.
AttentionDump ReadAttentionDir(const std::string& dir);

// Checks an in-memory dump as ReadAttentionDir does; `name` is used in messages.
void ValidateAttentionDump(const AttentionDump& dump, const std::string& name);

struct HeadPattern {
  int64_t layer = 0, head = 0, rows = 0;
  double self = 0, previous = 0, next = 0, first = 0, last = 0, punct = 0, local = 0;
  double entropy = 0, normalized_entropy = 0, sparse = 0;
  std::string label;
};

// The thresholds of the labels above.
inline constexpr double kPositionalThreshold = 0.5, kLocalThreshold = 0.8;
inline constexpr double kSparseThreshold = 0.8, kBroadThreshold = 0.8;

// Metrics and label of every head, ordered by layer, then head. Assumes a
// dump that passed validation.
std::vector<HeadPattern> ClassifyHeads(const AttentionDump& dump);

// True for a token made only of Unicode punctuation (categories P*) and
// spaces, with at least one punctuation character (a decoder's " ," counts),
// not a special token ([CLS], ...) nor a "##" continuation.
bool IsPunctuationToken(const std::string& token);

}  // namespace qkv::inspect

#endif  // QKV_INSPECT_PATTERNS_H_
