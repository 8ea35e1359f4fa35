// Internal: text helpers shared by the inspection outputs (SVG heatmaps, the
// HTML report, the patterns JSON).
#ifndef QKV_SRC_INSPECT_MARKUP_H_
#define QKV_SRC_INSPECT_MARKUP_H_

#include <string>

#include <nlohmann/json.hpp>

#include "qkv/inspect/patterns.h"

namespace qkv::inspect::internal {

// Text for SVG / HTML: markup characters as entities, control characters as
// spaces (a token's newline must not break a label).
inline std::string EscapeMarkup(const std::string& text) {
  std::string out;
  for (const char c : text) {
    switch (c) {
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '&': out += "&amp;"; break;
      case '"': out += "&quot;"; break;
      default: out += static_cast<unsigned char>(c) < 0x20 ? ' ' : c;
    }
  }
  return out;
}

// One head's metrics as `qkv patterns --json` prints them (docs/inspect.md).
inline nlohmann::json PatternJson(const HeadPattern& p) {
  return {{"layer", p.layer},
          {"head", p.head},
          {"label", p.label},
          {"rows", p.rows},
          {"self", p.self},
          {"previous", p.previous},
          {"next", p.next},
          {"first", p.first},
          {"last", p.last},
          {"punct", p.punct},
          {"local", p.local},
          {"entropy", p.entropy},
          {"normalized_entropy", p.normalized_entropy},
          {"sparse", p.sparse}};
}

}  // namespace qkv::inspect::internal

#endif  // QKV_SRC_INSPECT_MARKUP_H_
