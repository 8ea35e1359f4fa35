// Positional encodings: validation at the API, then plain loops. Every
// function here is O(elements) and memory-bound, so none is vectorised by
// hand or threaded; angles are computed in double (see qkv/positional.h).
#include "qkv/positional.h"

#include <cmath>
#include <limits>
#include <string>

#include "qkv/error.h"

namespace qkv {
namespace {

// Positions are converted to double for the angles; up to 2^53 they are
// exact, so two calls that see the same position compute the same angle.
constexpr int64_t kMaxPosition = int64_t{1} << 53;
// More ALiBi heads than this is a typo, not a model (the largest published
// models use 128); it also bounds the slope vector's allocation.
constexpr int64_t kMaxAlibiHeads = int64_t{1} << 20;

std::string S(int64_t v) { return std::to_string(v); }

// Checks a float32 view: sizes >= 0, data present unless empty, and (for a
// view written in place) no stride 0 on a dim of size > 1.
void CheckView(const char* name, const Shape4& shape, const Shape4& strides, bool present,
               DType dtype, bool written) {
  for (int d = 0; d < 4; ++d) {
    if (shape[d] < 0) {
      throw Error(std::string(name) + ": negative dimension in shape " + ShapeString(shape) +
                  " (expected sizes >= 0)");
    }
  }
  const bool empty = shape[0] == 0 || shape[1] == 0 || shape[2] == 0 || shape[3] == 0;
  if (dtype != DType::kFloat32) {
    throw Error(std::string(name) + ": dtype " + DTypeName(dtype) + " (expected float32)");
  }
  if (empty) return;
  if (!present) throw Error(std::string(name) + ": missing data (expected a tensor)");
  for (int d = 0; written && d < 4; ++d) {
    if (shape[d] > 1 && strides[d] == 0) {
      throw Error(std::string(name) + ": stride 0 on dimension " + S(d) +
                  " (expected distinct elements: it is written in place)");
    }
  }
}

void CheckBase(double base) {
  if (!(base > 0.0) || !std::isfinite(base)) {
    throw Error("base: " + std::to_string(base) + " (expected a finite value > 0, e.g. 10000)");
  }
}

void CheckPositions(int64_t offset, int64_t seq) {
  if (offset < 0) throw Error("offset: " + S(offset) + " (expected >= 0)");
  if (offset > kMaxPosition - seq) {
    throw Error("offset: " + S(offset) + " + seq " + S(seq) +
                " is past 2^53 (expected positions exact in double)");
  }
}

// Returns theta_k = base^(-2k / dim) for k in [0, count).
std::vector<double> Frequencies(double base, int64_t dim, int64_t count) {
  std::vector<double> inv_freq(count);
  for (int64_t k = 0; k < count; ++k) {
    inv_freq[k] = std::pow(base, -2.0 * static_cast<double>(k) / static_cast<double>(dim));
  }
  return inv_freq;
}

}  // namespace

void FillSinusoidalPositions(MutableTensorView pe, int64_t offset, double base) {
  CheckView("pe", pe.shape, pe.strides, pe.present(), pe.dtype, true);
  CheckBase(base);
  const auto [batch, num_heads, seq, dim] = pe.shape;
  CheckPositions(offset, seq);
  if (pe.numel() == 0) return;
  // Column d uses theta_{d/2}: PE[p, 2i] = sin(p theta_i), PE[p, 2i+1] = cos(p theta_i).
  const std::vector<double> inv_freq = Frequencies(base, dim, (dim + 1) / 2);
  std::vector<float> row(dim);
  float* data = static_cast<float*>(pe.data);
  for (int64_t s = 0; s < seq; ++s) {
    const double p = static_cast<double>(offset + s);
    for (int64_t d = 0; d < dim; ++d) {
      const double angle = p * inv_freq[d / 2];
      row[d] = static_cast<float>(d % 2 == 0 ? std::sin(angle) : std::cos(angle));
    }
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t h = 0; h < num_heads; ++h)
        for (int64_t d = 0; d < dim; ++d) data[pe.Offset(b, h, s, d)] = row[d];
  }
}

void AddLearnedPositions(MutableTensorView x, TensorView table, int64_t offset) {
  CheckView("x", x.shape, x.strides, x.present(), x.dtype, true);
  CheckView("table", table.shape, table.strides, table.present(), table.dtype, false);
  const auto [batch, num_heads, seq, head_dim] = x.shape;
  if (table.shape[0] != 1 || table.shape[1] != 1 || table.shape[3] != head_dim) {
    throw Error("table: shape " + ShapeString(table.shape) + " (expected [1, 1, num_positions, " +
                S(head_dim) + "] with x's head_dim)");
  }
  CheckPositions(offset, seq);
  const int64_t num_positions = table.shape[2];
  if (offset + seq > num_positions) {
    throw Error("table: positions " + S(offset) + ".." + S(offset + seq - 1) + " run past its " +
                S(num_positions) + " rows (expected offset + seq <= num_positions)");
  }
  if (x.numel() == 0) return;
  float* xd = static_cast<float*>(x.data);
  const float* td = static_cast<const float*>(table.data);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t h = 0; h < num_heads; ++h)
      for (int64_t s = 0; s < seq; ++s)
        for (int64_t d = 0; d < head_dim; ++d) {
          xd[x.Offset(b, h, s, d)] += td[table.Offset(0, 0, offset + s, d)];  // x += table[p]
        }
}

void ApplyRope(MutableTensorView x, const RopeParams& params) {
  CheckView("x", x.shape, x.strides, x.present(), x.dtype, true);
  const auto [batch, num_heads, seq, head_dim] = x.shape;
  if (params.rotary_dim == 0 && head_dim % 2 != 0) {
    throw Error("x: head_dim " + S(head_dim) +
                " is odd (expected even, or an even rotary_dim < head_dim)");
  }
  const int64_t rotary_dim = params.rotary_dim == 0 ? head_dim : params.rotary_dim;
  if (rotary_dim < 0 || rotary_dim > head_dim || rotary_dim % 2 != 0) {
    throw Error("rotary_dim: " + S(params.rotary_dim) + " (expected even, 0 <= rotary_dim <= " +
                "head_dim = " + S(head_dim) + "; 0 means head_dim)");
  }
  CheckBase(params.base);
  CheckPositions(params.offset, seq);
  if (x.numel() == 0 || rotary_dim == 0) return;

  const int64_t half = rotary_dim / 2;
  const std::vector<double> inv_freq = Frequencies(params.base, rotary_dim, half);
  // Pair i is (first + i * pair_step, first + i * pair_step + partner) in
  // units of the head_dim stride: neox (i, i + half), gptj (2i, 2i + 1).
  const bool neox = params.style == RopeStyle::kNeox;
  const int64_t sd = x.strides[3];
  const int64_t pair_step = (neox ? 1 : 2) * sd;
  const int64_t partner = (neox ? half : 1) * sd;
  std::vector<float> cos_p(half), sin_p(half);
  float* data = static_cast<float*>(x.data);
  for (int64_t s = 0; s < seq; ++s) {
    // One double angle per (position, frequency), shared by every head.
    const double p = static_cast<double>(params.offset + s);
    for (int64_t i = 0; i < half; ++i) {
      const double angle = p * inv_freq[i];
      cos_p[i] = static_cast<float>(std::cos(angle));
      sin_p[i] = static_cast<float>(std::sin(angle));
    }
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t h = 0; h < num_heads; ++h) {
        float* row = data + x.Offset(b, h, s, 0);
        for (int64_t i = 0; i < half; ++i) {
          float* a = row + i * pair_step;
          float* c = a + partner;
          const float x0 = *a, x1 = *c;
          *a = x0 * cos_p[i] - x1 * sin_p[i];  // a' = a cos - b sin
          *c = x0 * sin_p[i] + x1 * cos_p[i];  // b' = a sin + b cos
        }
      }
  }
}

std::vector<double> AlibiSlopes(int64_t num_heads) {
  if (num_heads < 1 || num_heads > kMaxAlibiHeads) {
    throw Error("num_heads: " + S(num_heads) + " (expected 1 <= num_heads <= " + S(kMaxAlibiHeads) +
                ")");
  }
  // m_h = 2^(-8 (h+1) / n) for a power of two n: start = ratio = 2^(-8/n).
  auto power_of_two_slopes = [](int64_t n) {
    std::vector<double> m(n);
    for (int64_t h = 0; h < n; ++h) m[h] = std::exp2(-8.0 * static_cast<double>(h + 1) / n);
    return m;
  };
  int64_t closest = 1;  // largest power of two <= num_heads
  while (closest * 2 <= num_heads) closest *= 2;
  std::vector<double> slopes = power_of_two_slopes(closest);
  if (closest < num_heads) {
    // The rest interleave between the first ones: every other slope of 2n'.
    const std::vector<double> extra = power_of_two_slopes(2 * closest);
    for (int64_t k = 0; k < num_heads - closest; ++k) slopes.push_back(extra[2 * k]);
  }
  return slopes;
}

void FillAlibiBias(MutableTensorView bias, const AlibiParams& params) {
  CheckView("bias", bias.shape, bias.strides, bias.present(), bias.dtype, true);
  const auto [batch, num_q_heads, seq_q, seq_kv] = bias.shape;
  std::vector<double> own;
  std::span<const double> slopes = params.slopes;
  if (slopes.empty()) {
    if (num_q_heads == 0) return;
    own = AlibiSlopes(num_q_heads);
    slopes = own;
  }
  if (static_cast<int64_t>(slopes.size()) != num_q_heads) {
    throw Error("slopes: " + S(static_cast<int64_t>(slopes.size())) +
                " values (expected one per head, num_q_heads = " + S(num_q_heads) + ")");
  }
  for (double m : slopes) {
    if (!std::isfinite(m)) throw Error("slopes: non-finite value (expected finite slopes)");
  }
  if (bias.numel() == 0) return;
  float* data = static_cast<float*>(bias.data);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t h = 0; h < num_q_heads; ++h)
      for (int64_t i = 0; i < seq_q; ++i) {
        const int64_t diag = i + seq_kv - seq_q;  // i': bottom-right aligned query
        for (int64_t j = 0; j < seq_kv; ++j) {
          const double dist = static_cast<double>(j - diag);  // <= 0 for past keys
          float value;
          if (params.causal) {
            value = j <= diag ? static_cast<float>(slopes[h] * dist) : neg_inf;  // m (j - i')
          } else {
            value = static_cast<float>(-slopes[h] * std::fabs(dist));  // -m |j - i'|
          }
          data[bias.Offset(b, h, i, j)] = value;
        }
      }
}

}  // namespace qkv
