// Classic (Bahdanau / Luong) attention: validation, then one decoder step in
// double. The work per step is attn_dim * enc_dim * seq_kv multiply-adds at
// most (Bahdanau's W2 h_j), small beside the RNN it serves, so the oracle-grade
// double arithmetic is the production path too.
#include "qkv/classic_attention.h"

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "qkv/error.h"

namespace qkv {
namespace {

std::string S(int64_t v) { return std::to_string(v); }

// Returns a * b, or -1 when it overflows int64 (no span can be that long).
int64_t Product(int64_t a, int64_t b) {
  int64_t p = 0;
  return __builtin_mul_overflow(a, b, &p) ? -1 : p;
}

void CheckSize(const char* name, size_t size, int64_t expected, const std::string& shape) {
  if (expected < 0 || static_cast<int64_t>(size) != expected) {
    throw Error(std::string(name) + ": " + S(static_cast<int64_t>(size)) + " elements (expected " +
                shape + " = " + S(expected) + ")");
  }
}

void CheckAbsent(const char* name, size_t size, ClassicScore score) {
  if (size != 0) {
    throw Error(std::string(name) + ": given, but score " + ClassicScoreName(score) +
                " does not use it (expected it empty)");
  }
}

void Validate(const ClassicAttentionParams& p) {
  if (p.seq_kv < 0 || p.enc_dim < 0 || p.dec_dim < 0 || p.attn_dim < 0) {
    throw Error("dims: seq_kv " + S(p.seq_kv) + ", enc_dim " + S(p.enc_dim) + ", dec_dim " +
                S(p.dec_dim) + ", attn_dim " + S(p.attn_dim) + " (expected each >= 0)");
  }
  const std::string dec = S(p.dec_dim), enc = S(p.enc_dim), attn = S(p.attn_dim);
  CheckSize("state", p.state.size(), p.dec_dim, "[dec_dim] = [" + dec + "]");
  CheckSize("encoder", p.encoder.size(), Product(p.seq_kv, p.enc_dim),
            "[seq_kv, enc_dim] = [" + S(p.seq_kv) + ", " + enc + "]");
  CheckSize("context", p.context.size(), p.enc_dim, "[enc_dim] = [" + enc + "]");
  CheckSize("weights", p.weights.size(), p.seq_kv, "[seq_kv] = [" + S(p.seq_kv) + "]");
  if (!p.scores.empty()) {
    CheckSize("scores", p.scores.size(), p.seq_kv, "[seq_kv] = [" + S(p.seq_kv) + "]");
  }
  if (!p.mask.empty()) {
    CheckSize("mask", p.mask.size(), p.seq_kv, "[seq_kv] = [" + S(p.seq_kv) + "]");
  }
  switch (p.score) {
    case ClassicScore::kBahdanau:
      CheckSize("w1", p.w1.size(), Product(p.attn_dim, p.dec_dim),
                "[attn_dim, dec_dim] = [" + attn + ", " + dec + "]");
      CheckSize("w2", p.w2.size(), Product(p.attn_dim, p.enc_dim),
                "[attn_dim, enc_dim] = [" + attn + ", " + enc + "]");
      CheckSize("v", p.v.size(), p.attn_dim, "[attn_dim] = [" + attn + "]");
      CheckAbsent("w", p.w.size(), p.score);
      break;
    case ClassicScore::kDot:
      if (p.dec_dim != p.enc_dim) {
        throw Error("state: dec_dim " + dec + " but encoder enc_dim " + enc +
                    " (expected equal for the dot score; use general for a W between them)");
      }
      CheckAbsent("w", p.w.size(), p.score);
      CheckAbsent("w1", p.w1.size(), p.score);
      CheckAbsent("w2", p.w2.size(), p.score);
      CheckAbsent("v", p.v.size(), p.score);
      break;
    case ClassicScore::kGeneral:
      CheckSize("w", p.w.size(), Product(p.dec_dim, p.enc_dim),
                "[dec_dim, enc_dim] = [" + dec + ", " + enc + "]");
      CheckAbsent("w1", p.w1.size(), p.score);
      CheckAbsent("w2", p.w2.size(), p.score);
      CheckAbsent("v", p.v.size(), p.score);
      break;
    case ClassicScore::kConcat:
      CheckSize("w", p.w.size(), Product(p.attn_dim, p.dec_dim + p.enc_dim),
                "[attn_dim, dec_dim + enc_dim] = [" + attn + ", " + S(p.dec_dim + p.enc_dim) + "]");
      CheckSize("v", p.v.size(), p.attn_dim, "[attn_dim] = [" + attn + "]");
      CheckAbsent("w1", p.w1.size(), p.score);
      CheckAbsent("w2", p.w2.size(), p.score);
      break;
    default:
      throw Error("score: unknown value (expected bahdanau, dot, general or concat)");
  }
}

// Returns v . tanh(pre + Wh h) for every row h_j of the encoder: the additive
// score, where pre = W_s s is the state's part (the same for every j) and
// Wh [attn_dim, enc_dim] sits in rows of length wh_row_stride.
std::vector<double> AdditiveScores(const ClassicAttentionParams& p, const std::vector<double>& pre,
                                   const float* wh, int64_t wh_row_stride) {
  std::vector<double> e(p.seq_kv, 0.0);
  for (int64_t j = 0; j < p.seq_kv; ++j) {
    const float* h = p.encoder.data() + j * p.enc_dim;
    double sum = 0.0;
    for (int64_t a = 0; a < p.attn_dim; ++a) {
      double z = pre[a];  // z = (W_s s)_a + (W_h h_j)_a
      for (int64_t k = 0; k < p.enc_dim; ++k) z += double{wh[a * wh_row_stride + k]} * h[k];
      sum += double{p.v[a]} * std::tanh(z);  // e_j = v . tanh(z)
    }
    e[j] = sum;
  }
  return e;
}

// Returns W_s s with W_s the first dec_dim columns of rows of length row_stride.
std::vector<double> StatePart(const ClassicAttentionParams& p, const float* ws,
                              int64_t row_stride) {
  std::vector<double> pre(p.attn_dim, 0.0);
  for (int64_t a = 0; a < p.attn_dim; ++a)
    for (int64_t d = 0; d < p.dec_dim; ++d) pre[a] += double{ws[a * row_stride + d]} * p.state[d];
  return pre;
}

std::vector<double> Scores(const ClassicAttentionParams& p) {
  switch (p.score) {
    case ClassicScore::kBahdanau:
      return AdditiveScores(p, StatePart(p, p.w1.data(), p.dec_dim), p.w2.data(), p.enc_dim);
    case ClassicScore::kConcat: {
      // W [s; h] = W[:, :dec_dim] s + W[:, dec_dim:] h.
      const int64_t row = p.dec_dim + p.enc_dim;
      return AdditiveScores(p, StatePart(p, p.w.data(), row), p.w.data() + p.dec_dim, row);
    }
    case ClassicScore::kDot:
    case ClassicScore::kGeneral: {
      // u = W^T s (general) or s (dot), so that e_j = u . h_j.
      std::vector<double> u(p.enc_dim, 0.0);
      for (int64_t k = 0; k < p.enc_dim; ++k) {
        if (p.score == ClassicScore::kDot) {
          u[k] = p.state[k];
        } else {
          for (int64_t d = 0; d < p.dec_dim; ++d)
            u[k] += double{p.state[d]} * p.w[d * p.enc_dim + k];
        }
      }
      std::vector<double> e(p.seq_kv, 0.0);
      for (int64_t j = 0; j < p.seq_kv; ++j)
        for (int64_t k = 0; k < p.enc_dim; ++k) e[j] += u[k] * p.encoder[j * p.enc_dim + k];
      return e;
    }
  }
  return {};
}

}  // namespace

const char* ClassicScoreName(ClassicScore score) {
  switch (score) {
    case ClassicScore::kBahdanau:
      return "bahdanau";
    case ClassicScore::kDot:
      return "dot";
    case ClassicScore::kGeneral:
      return "general";
    case ClassicScore::kConcat:
      return "concat";
  }
  return "unknown";
}

void ClassicAttention(const ClassicAttentionParams& p) {
  Validate(p);
  const double inf = std::numeric_limits<double>::infinity();
  // 1. Scores e_j; masked positions are -inf and take no part below.
  std::vector<double> e = Scores(p);
  bool any = false;
  double row_max = -inf;
  for (int64_t j = 0; j < p.seq_kv; ++j) {
    if (!p.mask.empty() && p.mask[j] == 0) {
      e[j] = -inf;
      continue;
    }
    any = true;
    row_max = std::isnan(e[j]) || std::isnan(row_max) ? e[j] + row_max : std::max(row_max, e[j]);
  }
  // 2. alpha_j = exp(e_j - max) / sum: max-subtracted, so no exp overflows.
  //    No unmasked position: alpha and context stay 0 (not 0/0 = NaN).
  std::vector<double> alpha(p.seq_kv, 0.0), context(p.enc_dim, 0.0);
  if (any) {
    double row_sum = 0.0;
    for (int64_t j = 0; j < p.seq_kv; ++j) {
      if (e[j] == -inf) continue;  // masked, or a score of -inf: weight 0
      alpha[j] = std::exp(e[j] - row_max);
      row_sum += alpha[j];
    }
    // All unmasked scores -inf (only from infinite inputs): row_sum is 0;
    // leave alpha at 0 like a fully masked step. A NaN sum stays NaN.
    if (row_sum != 0.0) {
      for (double& a : alpha) a /= row_sum;
    }
    // 3. context = sum_j alpha_j h_j.
    for (int64_t j = 0; j < p.seq_kv; ++j) {
      if (alpha[j] == 0.0) continue;
      for (int64_t k = 0; k < p.enc_dim; ++k) context[k] += alpha[j] * p.encoder[j * p.enc_dim + k];
    }
  }
  // 4. Round once to float32; outputs are written only now, so they may
  //    alias the inputs.
  for (int64_t k = 0; k < p.enc_dim; ++k) p.context[k] = static_cast<float>(context[k]);
  for (int64_t j = 0; j < p.seq_kv; ++j) p.weights[j] = static_cast<float>(alpha[j]);
  if (!p.scores.empty()) {
    for (int64_t j = 0; j < p.seq_kv; ++j) p.scores[j] = static_cast<float>(e[j]);
  }
}

}  // namespace qkv
