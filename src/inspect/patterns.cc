// Head patterns (qkv/inspect/patterns.h): reading a saved attention folder,
// validating it, and the per-head metrics and labels.
//
// Cost: one pass over every real row of every head (O(sum of L_b^2) per
// head), in double; the folder is read whole (it was written whole).
#include "qkv/inspect/patterns.h"

#include <sys/stat.h>
#include <utf8proc.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <functional>
#include <nlohmann/json.hpp>
#include <string_view>

#include "io/file_util.h"
#include "qkv/error.h"
#include "qkv/npy.h"

namespace qkv::inspect {
namespace {

std::string S(int64_t v) { return std::to_string(v); }

bool FileExists(const std::string& path) {
  struct stat st {};
  return stat(path.c_str(), &st) == 0;
}

std::string LayerPath(const std::string& dir, int64_t layer) {
  return dir + "/layer" + S(layer) + ".npy";
}

}  // namespace

bool IsPunctuationToken(const std::string& token) {
  if (token.empty() || token.rfind("##", 0) == 0) return false;
  for (const char* special : {"[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]"}) {
    if (token == special) return false;
  }
  const auto* p = reinterpret_cast<const utf8proc_uint8_t*>(token.data());
  utf8proc_ssize_t left = static_cast<utf8proc_ssize_t>(token.size());
  bool any = false;
  while (left > 0) {
    utf8proc_int32_t c = 0;
    const utf8proc_ssize_t n = utf8proc_iterate(p, left, &c);
    if (n <= 0) return false;
    p += n, left -= n;
    // A decoder's token carries its leading space (" ,"): spaces do not count.
    if (utf8proc_category(c) == UTF8PROC_CATEGORY_ZS || c == '\t' || c == '\n' || c == '\r') continue;
    any = true;
    switch (utf8proc_category(c)) {
      case UTF8PROC_CATEGORY_PC:
      case UTF8PROC_CATEGORY_PD:
      case UTF8PROC_CATEGORY_PS:
      case UTF8PROC_CATEGORY_PE:
      case UTF8PROC_CATEGORY_PI:
      case UTF8PROC_CATEGORY_PF:
      case UTF8PROC_CATEGORY_PO:
        break;
      default:
        return false;
    }
  }
  return any;
}

void ValidateAttentionDump(const AttentionDump& d, const std::string& name) {
  if (static_cast<int64_t>(d.tokens.size()) != d.num_inputs) {
    throw Error(name + "/tokens.json: " + S(static_cast<int64_t>(d.tokens.size())) +
                " token lists (expected one per input: " + S(d.num_inputs) + ")");
  }
  for (int64_t b = 0; b < d.num_inputs; ++b) {
    const int64_t len = static_cast<int64_t>(d.tokens[b].size());
    if (len < 1 || len > d.seq) {
      throw Error(name + "/tokens.json: input " + S(b) + " has " + S(len) +
                  " tokens (expected 1.." + S(d.seq) + ", the weights' seq)");
    }
  }
  for (int64_t l = 0; l < d.num_layers; ++l) {
    const float* w = d.layers[l].data();
    for (int64_t b = 0; b < d.num_inputs; ++b) {
      const int64_t len = static_cast<int64_t>(d.tokens[b].size());
      for (int64_t h = 0; h < d.num_heads; ++h)
        for (int64_t i = 0; i < len; ++i) {
          const float* row = w + ((b * d.num_heads + h) * d.seq + i) * d.seq;
          double sum = 0;
          for (int64_t j = 0; j < len; ++j) {
            if (!(row[j] >= 0.0f && row[j] <= 1.0f + 1e-6f)) {
              throw Error(LayerPath(name, l) + ": input " + S(b) + ", head " + S(h) + ", row " +
                          S(i) + ": weight " + std::to_string(row[j]) + " at key " + S(j) +
                          " (expected attention weights in [0, 1])");
            }
            sum += row[j];
          }
          if (std::abs(sum - 1.0) > 1e-3) {
            throw Error(LayerPath(name, l) + ": input " + S(b) + ", head " + S(h) + ", row " +
                        S(i) + ": weights sum to " + std::to_string(sum) + " over the input's " +
                        S(len) + " tokens (expected a probability distribution, sum 1)");
          }
        }
    }
  }
}

AttentionDump ReadAttentionDir(const std::string& dir) {
  AttentionDump d;
  struct stat st {};
  if (stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    throw Error(dir + ": not a directory (expected the folder `qkv embed --attn-weights` wrote)");
  }
  while (FileExists(LayerPath(dir, d.num_layers))) {
    const std::string path = LayerPath(dir, d.num_layers);
    NpyArray a = ReadNpy(path);
    if (a.dtype != DType::kFloat32 || a.shape.size() != 4 || a.shape[2] != a.shape[3] ||
        a.shape[1] < 1 || a.shape[2] < 1) {
      throw Error(path + ": " + DTypeName(a.dtype) + " " + NpyShapeString(a.shape) +
                  " (expected float32 [inputs, heads, seq, seq])");
    }
    if (d.num_layers == 0) {
      d.num_inputs = a.shape[0], d.num_heads = a.shape[1], d.seq = a.shape[2];
    } else if (a.shape != std::vector<int64_t>{d.num_inputs, d.num_heads, d.seq, d.seq}) {
      throw Error(path + ": shape " + NpyShapeString(a.shape) + " (expected layer0.npy's [" +
                  S(d.num_inputs) + "," + S(d.num_heads) + "," + S(d.seq) + "," + S(d.seq) + "])");
    }
    d.layers.emplace_back(a.data<float>(), a.data<float>() + a.numel());
    ++d.num_layers;
  }
  if (d.num_layers == 0) {
    throw Error(dir + ": no layer0.npy (expected the folder `qkv embed --attn-weights` wrote)");
  }
  const std::string tokens_path = dir + "/tokens.json";
  const nlohmann::json j = nlohmann::json::parse(
      internal::ReadSmallFile(tokens_path, "tokens.json", uint64_t{1} << 30), nullptr, false);
  if (j.is_discarded() || !j.is_array()) {
    throw Error(tokens_path + ": not a JSON list (expected one list of token strings per input)");
  }
  for (const auto& list : j) {
    if (!list.is_array()) {
      throw Error(tokens_path + ": an entry is " + std::string(list.type_name()) +
                  " (expected a list of token strings per input)");
    }
    std::vector<std::string> tokens;
    for (const auto& t : list) {
      if (!t.is_string()) {
        throw Error(tokens_path + ": a token is " + std::string(t.type_name()) +
                    " (expected strings)");
      }
      tokens.push_back(t.get<std::string>());
    }
    d.tokens.push_back(std::move(tokens));
  }
  ValidateAttentionDump(d, dir);
  return d;
}

std::vector<HeadPattern> ClassifyHeads(const AttentionDump& d) {
  std::vector<HeadPattern> out;
  std::vector<std::vector<uint8_t>> punct(static_cast<size_t>(d.num_inputs));
  for (int64_t b = 0; b < d.num_inputs; ++b) {
    for (const std::string& t : d.tokens[b]) punct[b].push_back(IsPunctuationToken(t));
  }
  for (int64_t l = 0; l < d.num_layers; ++l)
    for (int64_t h = 0; h < d.num_heads; ++h) {
      HeadPattern p;
      p.layer = l, p.head = h;
      int64_t prev_rows = 0, next_rows = 0, entropy_rows = 0;
      for (int64_t b = 0; b < d.num_inputs; ++b) {
        const int64_t len = static_cast<int64_t>(d.tokens[b].size());
        for (int64_t i = 0; i < len; ++i) {
          const float* a = d.layers[l].data() + ((b * d.num_heads + h) * d.seq + i) * d.seq;
          ++p.rows;
          p.self += a[i];
          if (i >= 1) p.previous += a[i - 1], ++prev_rows;
          if (i <= len - 2) p.next += a[i + 1], ++next_rows;
          p.first += a[0];
          p.last += a[len - 1];
          double entropy = 0;
          std::array<double, 3> top{0, 0, 0};
          for (int64_t j = 0; j < len; ++j) {
            const double w = a[j];
            if (punct[b][j]) p.punct += w;
            if (std::abs(j - i) <= 2) p.local += w;
            if (w > 0) entropy -= w * std::log(w);
            if (w > top[2]) {
              top[2] = w;
              std::sort(top.begin(), top.end(), std::greater<>());
            }
          }
          p.entropy += entropy;
          if (len >= 2)
            p.normalized_entropy += entropy / std::log(static_cast<double>(len)), ++entropy_rows;
          if (top[0] + top[1] + top[2] >= 0.9) p.sparse += 1;
        }
      }
      const auto mean = [](double sum, int64_t n) {
        return n > 0 ? sum / static_cast<double>(n) : 0.0;
      };
      p.previous = mean(p.previous, prev_rows);
      p.next = mean(p.next, next_rows);
      p.normalized_entropy = mean(p.normalized_entropy, entropy_rows);
      for (double* m : {&p.self, &p.first, &p.last, &p.punct, &p.local, &p.entropy, &p.sparse}) {
        *m = mean(*m, p.rows);
      }
      const std::pair<const char*, double> positional[] = {
          {"diagonal", p.self},      {"previous", p.previous}, {"next", p.next},
          {"column:[CLS]", p.first}, {"column:[SEP]", p.last}, {"column:punct", p.punct}};
      const auto* best = &positional[0];
      for (const auto& c : positional) {
        if (c.second > best->second) best = &c;
      }
      p.label = best->second >= kPositionalThreshold      ? best->first
                : p.local >= kLocalThreshold              ? "local block"
                : p.sparse >= kSparseThreshold            ? "sparse"
                : p.normalized_entropy >= kBroadThreshold ? "broad"
                                                          : "mixed";
      out.push_back(std::move(p));
    }
  return out;
}

}  // namespace qkv::inspect
