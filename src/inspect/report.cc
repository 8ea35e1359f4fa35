// The HTML report (qkv/inspect/report.h): the page template of
// report_page.h around two JSON data blocks.
//
// Weights go in as uint16 (round(w * 65535)), base64: 2.7 characters per
// weight, against ~8 for JSON numbers with 4 decimals, and exact to
// 1/131070, below what a colour or a line's opacity can show. Only real
// tokens are stored (each input's L_b x L_b, not the padded seq x seq).
#include "qkv/inspect/report.h"

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>

#include "inspect/markup.h"
#include "inspect/report_page.h"
#include "qkv/error.h"
#include "qkv/inspect/heatmap.h"

namespace qkv::inspect {
namespace {


// JSON that can sit inside <script type="application/json">: '<', '>' and
// '&' occur only inside JSON strings, where \u003c etc. mean the same, so
// no token can write "</script>" or "<!--" into the block. Invalid UTF-8 (a
// hostile in-memory token) becomes U+FFFD instead of an exception.
std::string ScriptSafeJson(const nlohmann::json& j) {
  const std::string text = j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  std::string out;
  out.reserve(text.size());
  for (const char c : text) {
    if (c == '<') {
      out += "\\u003c";
    } else if (c == '>') {
      out += "\\u003e";
    } else if (c == '&') {
      out += "\\u0026";
    } else {
      out += c;
    }
  }
  return out;
}

// Standard base64 (RFC 4648, '=' padding), which the page's atob() reads.
std::string Base64(const std::vector<unsigned char>& bytes) {
  static constexpr char kDigits[] =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  out.reserve((bytes.size() + 2) / 3 * 4);
  size_t i = 0;
  for (; i + 3 <= bytes.size(); i += 3) {
    const uint32_t v = uint32_t{bytes[i]} << 16 | uint32_t{bytes[i + 1]} << 8 | bytes[i + 2];
    for (const int shift : {18, 12, 6, 0}) out += kDigits[(v >> shift) & 63];
  }
  const size_t left = bytes.size() - i;
  if (left > 0) {
    uint32_t v = uint32_t{bytes[i]} << 16;
    if (left == 2) v |= uint32_t{bytes[i + 1]} << 8;
    out += kDigits[(v >> 18) & 63];
    out += kDigits[(v >> 12) & 63];
    out += left == 2 ? kDigits[(v >> 6) & 63] : '=';
    out += '=';
  }
  return out;
}

}  // namespace

double ReportWeightCount(const AttentionDump& d) {
  double per_head = 0;
  for (const std::vector<std::string>& t : d.tokens) {
    per_head += static_cast<double>(t.size()) * static_cast<double>(t.size());
  }
  return static_cast<double>(d.num_layers) * static_cast<double>(d.num_heads) * per_head;
}

void CheckReportSize(const AttentionDump& d, const std::string& name) {
  const double count = ReportWeightCount(d);
  if (count > static_cast<double>(kMaxReportWeights)) {
    throw Error(name + ": " + std::to_string(d.num_layers) + " layers x " +
                std::to_string(d.num_heads) + " heads over " + std::to_string(d.num_inputs) +
                " inputs are " + std::to_string(static_cast<int64_t>(count)) +
                " weights for the page (expected at most " + std::to_string(kMaxReportWeights) +
                ": save fewer or shorter inputs with qkv embed --attn-weights)");
  }
}

std::string RenderReport(const AttentionDump& d, const std::vector<HeadPattern>& heads,
                         const std::string& title) {
  CheckReportSize(d, title);
  if (static_cast<int64_t>(heads.size()) != d.num_layers * d.num_heads) {
    throw Error(title + ": " + std::to_string(heads.size()) + " head patterns (expected " +
                std::to_string(d.num_layers * d.num_heads) + ", ClassifyHeads of the dump)");
  }
  nlohmann::json meta = {{"title", title},
                         {"num_layers", d.num_layers},
                         {"num_heads", d.num_heads},
                         {"num_inputs", d.num_inputs},
                         {"tokens", d.tokens}};
  // The anchors of WeightColour, from WeightColour itself: the page's
  // colours cannot drift from the PNG and SVG heatmaps'.
  nlohmann::json colours = nlohmann::json::array();
  for (const float w : {0.0f, 0.25f, 0.5f, 0.75f, 1.0f}) colours.push_back(WeightColour(w));
  meta["colours"] = colours;
  nlohmann::json patterns = nlohmann::json::array();
  for (size_t k = 0; k < heads.size(); ++k) {
    const HeadPattern& p = heads[k];
    if (p.layer != static_cast<int64_t>(k) / d.num_heads ||
        p.head != static_cast<int64_t>(k) % d.num_heads) {
      throw Error(title + ": head pattern " + std::to_string(k) + " is layer " +
                  std::to_string(p.layer) + ", head " + std::to_string(p.head) +
                  " (expected ClassifyHeads' order: by layer, then head)");
    }
    patterns.push_back(internal::PatternJson(p));
  }
  meta["patterns"] = std::move(patterns);

  // Layer, input, head, query, key over each input's real tokens; uint16
  // little-endian whatever this machine's byte order.
  const auto count = static_cast<size_t>(ReportWeightCount(d));
  std::vector<unsigned char> bytes;
  bytes.reserve(2 * count);
  for (int64_t l = 0; l < d.num_layers; ++l)
    for (int64_t b = 0; b < d.num_inputs; ++b) {
      const int64_t len = static_cast<int64_t>(d.tokens[static_cast<size_t>(b)].size());
      for (int64_t h = 0; h < d.num_heads; ++h)
        for (int64_t i = 0; i < len; ++i) {
          const float* row =
              d.layers[static_cast<size_t>(l)].data() + ((b * d.num_heads + h) * d.seq + i) * d.seq;
          for (int64_t j = 0; j < len; ++j) {
            // Validation allows up to 1 + 1e-6 (float rounding of a softmax).
            const double w = std::clamp(static_cast<double>(row[j]), 0.0, 1.0);
            const auto q = static_cast<uint16_t>(std::lround(w * 65535.0));
            bytes.push_back(static_cast<unsigned char>(q & 0xff));
            bytes.push_back(static_cast<unsigned char>(q >> 8));
          }
        }
    }
  const nlohmann::json weights = {
      {"format", "uint16 little-endian round(w * 65535), base64"},
      {"order", "layer, input, head, query, key; each input's real tokens only"},
      {"count", count},
      {"base64", Base64(bytes)}};

  std::string page = internal::kReportHead;
  page += "qkv report: " + internal::EscapeMarkup(title);
  page += internal::kReportStyle;
  page +=
      "<script type=\"application/json\" id=\"qkv-meta\">" + ScriptSafeJson(meta) + "</script>\n";
  page += "<script type=\"application/json\" id=\"qkv-weights\">" + ScriptSafeJson(weights) +
          "</script>\n";
  page += internal::kReportScript;
  return page;
}

}  // namespace qkv::inspect
