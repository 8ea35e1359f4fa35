// qkv/inspect/report.h: one self-contained HTML page of a model's attention
// (`qkv report`), from the folder `qkv embed --attn-weights` writes.
//
// The page: a header (title, layers x heads, inputs); selectors for input,
// layer and head; the chosen head's heatmap for the chosen input (query rows
// x keys, real tokens only, viridis colours as WeightColour, scale 0..1);
// a head view after BertViz (queries left, keys right, one line per
// (query, key) with opacity = weight; hovering a token isolates its lines);
// the ClassifyHeads table and a layer x head grid of short labels (a click
// selects that head). State is also read from the URL hash:
// #input=1&layer=2&head=3&hover=q4 (or k2: the isolated lines of key 2).
//
// Self-contained: no network, enforced by a Content-Security-Policy meta
// tag (default-src 'none'; inline scripts and styles; data: images only).
// Data, in <script type="application/json"> blocks (with '<', '>', '&'
// written \u003c, \u003e, \u0026, so no token can end the block):
//   #qkv-meta: title, num_layers, num_heads, num_inputs, tokens (one list
//     per input), colours (WeightColour at 0, .25, .5, .75, 1), patterns;
//   #qkv-weights: count, and base64 of the weights of real tokens only as
//     uint16 little-endian round(w * 65535) (shown rounded to 1/65535),
//     ordered layer, input, head, query, key: input b's block of each
//     layer is heads x L_b x L_b.
#ifndef QKV_INSPECT_REPORT_H_
#define QKV_INSPECT_REPORT_H_

#include <cstdint>
#include <string>
#include <vector>

#include "qkv/inspect/patterns.h"

namespace qkv::inspect {

// The most weights one page embeds (128 MiB as uint16, 171 MiB of base64):
// past that a browser struggles to open the file.
inline constexpr int64_t kMaxReportWeights = int64_t{1} << 26;

// The number of weights the page of `dump` embeds: layers x heads x the sum
// over inputs of L_b^2 (as double: no overflow on a hostile in-memory dump).
double ReportWeightCount(const AttentionDump& dump);

// Throws a one-line qkv::Error naming `name` (the folder) when the page
// would embed more than kMaxReportWeights weights.
void CheckReportSize(const AttentionDump& dump, const std::string& name);

// Returns the page (it starts with "<!DOCTYPE html"). `heads` is
// ClassifyHeads(dump); `title` is shown as given (the folder's name).
// Assumes a dump that passed validation; throws qkv::Error when it is too
// large (CheckReportSize) or `heads` does not match it.
std::string RenderReport(const AttentionDump& dump, const std::vector<HeadPattern>& heads,
                         const std::string& title);

}  // namespace qkv::inspect

#endif  // QKV_INSPECT_REPORT_H_
