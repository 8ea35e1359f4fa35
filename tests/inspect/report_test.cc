// Tests of qkv/inspect/report.h and `qkv report`:
//  - the page of a small synthetic dump (2 layers x 3 heads; inputs of 5 and
//    3 tokens in a seq of 6, so padding must be skipped): nothing external,
//    the Content-Security-Policy, the base64 weights decode to
//    round(w * 65535) of the real tokens only, hostile tokens and titles
//    stay text, the size cap;
//  - the command: writes the page; bad input is exit 2 and one line naming
//    the flag, and a file that is not an earlier page is left untouched;
//  - the page in headless Chromium (make deps): no console message, the DOM
//    that a URL-hash selection draws (grid, tokens, heat cells with their
//    weights and colours, lines isolated by a hover), a 1400 x 1000
//    screenshot, and the page of a real all-MiniLM-L6-v2 dump (make models).
#include "qkv/inspect/report.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include "cli_test_util.h"
#include "file_test_util.h"
#include "inspect/browser_test_util.h"
#include "models/model_test_util.h"
#include "qkv/error.h"
#include "qkv/inspect/heatmap.h"
#include "qkv/inspect/patterns.h"
#include "qkv/npy.h"

namespace qkv::inspect {
namespace {

namespace fs = std::filesystem;
using test::ExpectError;
using test::TempDir;
using Attributes = std::map<std::string, std::string>;

// Tokens that would run code if the page ever treated them as markup.
const std::string kScriptToken = "</script><script>alert(1)</script>";
const std::string kImgToken = "<img src=x onerror=alert(1)>";

// 2 layers x 3 heads, seq 6: input 0 has 5 tokens (with `hostile`, two of
// them markup), input 1 has 3. Layer 0: head 0 attends to the token itself,
// head 1 to the previous one (row 0 to itself), head 2 uniformly; layer 1:
// random rows (seed 7). Padding entries are 0.9: embedding any of them
// would show in the decode test.
AttentionDump SyntheticDump(bool hostile) {
  AttentionDump d;
  d.num_layers = 2, d.num_heads = 3, d.num_inputs = 2, d.seq = 6;
  d.tokens = {
      {"[CLS]", hostile ? kScriptToken : "the", hostile ? kImgToken : "cat", "a&b \"q\"", "[SEP]"},
      {"[CLS]", "x", "[SEP]"}};
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> uniform(0.01f, 1.0f);
  for (int64_t l = 0; l < d.num_layers; ++l) {
    std::vector<float> w(static_cast<size_t>(d.num_inputs * d.num_heads * d.seq * d.seq), 0.9f);
    for (int64_t b = 0; b < d.num_inputs; ++b) {
      const int64_t len = static_cast<int64_t>(d.tokens[b].size());
      for (int64_t h = 0; h < d.num_heads; ++h)
        for (int64_t i = 0; i < len; ++i) {
          float* row = w.data() + ((b * d.num_heads + h) * d.seq + i) * d.seq;
          std::fill(row, row + len, 0.0f);
          if (l == 1) {
            float sum = 0;
            for (int64_t j = 0; j < len; ++j) sum += row[j] = uniform(rng);
            for (int64_t j = 0; j < len; ++j) row[j] /= sum;
          } else if (h == 0) {
            row[i] = 1;
          } else if (h == 1) {
            row[std::max<int64_t>(i - 1, 0)] = 1;
          } else {
            std::fill(row, row + len, 1.0f / static_cast<float>(len));
          }
        }
    }
    d.layers.push_back(std::move(w));
  }
  return d;
}

float Weight(const AttentionDump& d, int64_t l, int64_t b, int64_t h, int64_t i, int64_t j) {
  return d.layers[l][static_cast<size_t>(((b * d.num_heads + h) * d.seq + i) * d.seq + j)];
}

// What the page stores for weight w: round(w * 65535).
uint16_t Quantized(float w) {
  return static_cast<uint16_t>(std::lround(std::clamp(static_cast<double>(w), 0.0, 1.0) * 65535));
}

// The folder `qkv embed --attn-weights` would write for `d`.
void WriteDumpDir(const AttentionDump& d, const std::string& dir) {
  fs::create_directories(dir);
  const std::vector<int64_t> shape = {d.num_inputs, d.num_heads, d.seq, d.seq};
  for (int64_t l = 0; l < d.num_layers; ++l) {
    WriteNpy(dir + "/layer" + std::to_string(l) + ".npy", DType::kFloat32, shape,
             d.layers[l].data());
  }
  std::ofstream(dir + "/tokens.json") << nlohmann::json(d.tokens).dump();
}

void WriteText(const std::string& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

size_t Count(const std::string& text, const std::string& needle) {
  size_t n = 0;
  for (size_t at = text.find(needle); at != std::string::npos; at = text.find(needle, at + 1)) ++n;
  return n;
}

// The text of <script type="application/json" id="`id`">...</script>.
std::string JsonBlock(const std::string& page, const std::string& id) {
  const std::string open = "<script type=\"application/json\" id=\"" + id + "\">";
  const size_t start = page.find(open);
  const size_t end = page.find("</script>", start);
  if (start == std::string::npos || end == std::string::npos) {
    ADD_FAILURE() << "no " << open;
    return "null";
  }
  return page.substr(start + open.size(), end - start - open.size());
}

// RFC 4648 base64 (what the page's atob() reads), written here again so the
// test does not share the encoder's mistakes.
std::vector<unsigned char> DecodeBase64(const std::string& text) {
  const std::string digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::vector<unsigned char> out;
  uint32_t bits = 0;
  int have = 0;
  for (const char c : text) {
    if (c == '=') break;
    const size_t v = digits.find(c);
    if (v == std::string::npos) {
      ADD_FAILURE() << "not base64: " << c;
      return out;
    }
    bits = bits << 6 | static_cast<uint32_t>(v), have += 6;
    if (have >= 8) have -= 8, out.push_back(static_cast<unsigned char>(bits >> have & 0xff));
  }
  return out;
}

TEST(ReportTest, PageIsSelfContainedAndCarriesACsp) {
  const AttentionDump d = SyntheticDump(false);
  const std::string page = RenderReport(d, ClassifyHeads(d), "heads/");
  EXPECT_EQ(page.rfind("<!DOCTYPE html", 0), 0u);
  const size_t csp = page.find(
      "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; script-src "
      "'unsafe-inline'; style-src 'unsafe-inline'; img-src data:\">");
  ASSERT_NE(csp, std::string::npos);
  // In force before any style or script.
  EXPECT_LT(csp, page.find("<style"));
  EXPECT_LT(csp, page.find("<script"));
  for (const char* external :
       {"http:", "https:", "src=", "href=", "url(", "@import", "<link", "<iframe", "<img",
        "<object", "innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
        "fetch(", "XMLHttpRequest", "WebSocket"}) {
    EXPECT_EQ(page.find(external), std::string::npos) << external;
  }
}

TEST(ReportTest, WeightsDecodeToRoundedUint16OfRealTokensOnly) {
  const AttentionDump d = SyntheticDump(false);
  const std::vector<HeadPattern> heads = ClassifyHeads(d);
  const std::string page = RenderReport(d, heads, "heads/");
  const nlohmann::json weights = nlohmann::json::parse(JsonBlock(page, "qkv-weights"));
  const std::vector<unsigned char> bytes = DecodeBase64(weights["base64"].get<std::string>());
  // Layer, input, head, query, key; each input's L x L.
  std::vector<uint16_t> want;
  for (int64_t l = 0; l < d.num_layers; ++l)
    for (int64_t b = 0; b < d.num_inputs; ++b) {
      const int64_t len = static_cast<int64_t>(d.tokens[b].size());
      for (int64_t h = 0; h < d.num_heads; ++h)
        for (int64_t i = 0; i < len; ++i)
          for (int64_t j = 0; j < len; ++j) want.push_back(Quantized(Weight(d, l, b, h, i, j)));
    }
  ASSERT_EQ(want.size(), 2u * 3u * (25u + 9u));
  EXPECT_EQ(weights["count"].get<size_t>(), want.size());
  EXPECT_EQ(ReportWeightCount(d), static_cast<double>(want.size()));
  ASSERT_EQ(bytes.size(), 2 * want.size());
  int wrong = 0;
  for (size_t k = 0; k < want.size(); ++k) {
    const uint16_t got = static_cast<uint16_t>(bytes[2 * k] | bytes[2 * k + 1] << 8);
    if (got != want[k] && ++wrong <= 5) ADD_FAILURE() << k << ": " << got << " != " << want[k];
  }
  EXPECT_EQ(wrong, 0);
  EXPECT_EQ(want[0], 65535);  // layer 0, input 0, head 0, row 0: itself
  EXPECT_EQ(want[1], 0);

  const nlohmann::json meta = nlohmann::json::parse(JsonBlock(page, "qkv-meta"));
  EXPECT_EQ(meta["title"], "heads/");
  EXPECT_EQ(meta["num_layers"], 2);
  EXPECT_EQ(meta["num_heads"], 3);
  EXPECT_EQ(meta["num_inputs"], 2);
  EXPECT_EQ(meta["tokens"], nlohmann::json(d.tokens));
  for (int k = 0; k < 5; ++k) {
    EXPECT_EQ(meta["colours"][k], nlohmann::json(WeightColour(0.25f * static_cast<float>(k))));
  }
  ASSERT_EQ(meta["patterns"].size(), heads.size());
  for (size_t k = 0; k < heads.size(); ++k) {
    EXPECT_EQ(meta["patterns"][k]["label"], heads[k].label);
    EXPECT_EQ(meta["patterns"][k]["normalized_entropy"], heads[k].normalized_entropy);
  }
  EXPECT_EQ(heads[0].label, "diagonal");
  EXPECT_EQ(heads[1].label, "previous");
}

TEST(ReportTest, HostileTokensAndTitlesStayText) {
  AttentionDump d = SyntheticDump(true);
  d.tokens[1][1] = "<!--\xff";  // a comment opener, and a byte that is not UTF-8
  const std::string title = "</title><script>alert(2)</script>";
  const std::string page = RenderReport(d, ClassifyHeads(d), title);
  // The page's own four script elements, each closed once: no token or
  // title opened or closed one.
  EXPECT_EQ(Count(page, "<script"), 4u);
  EXPECT_EQ(Count(page, "</script>"), 4u);
  EXPECT_EQ(page.find("<img"), std::string::npos);
  EXPECT_EQ(page.find("<!--"), std::string::npos);
  EXPECT_NE(page.find("<title>qkv report: &lt;/title&gt;&lt;script&gt;alert(2)&lt;/script&gt;"
                      "</title>"),
            std::string::npos);
  EXPECT_NE(page.find("\\u003c/script\\u003e\\u003cscript\\u003ealert(1)"), std::string::npos);
  const nlohmann::json meta = nlohmann::json::parse(JsonBlock(page, "qkv-meta"));
  EXPECT_EQ(meta["title"], title);
  EXPECT_EQ(meta["tokens"][0][1], kScriptToken);
  EXPECT_EQ(meta["tokens"][0][2], kImgToken);
  EXPECT_EQ(meta["tokens"][0][3], "a&b \"q\"");
  EXPECT_EQ(meta["tokens"][1][1], "<!--\xef\xbf\xbd");  // U+FFFD for the bad byte
}

TEST(ReportTest, RefusesPagesPastTheCapAndMismatchedPatterns) {
  AttentionDump d;
  d.num_layers = 1, d.num_heads = 1, d.num_inputs = 1;
  d.tokens = {std::vector<std::string>(8192, "a")};  // 2^26 weights: the cap itself
  EXPECT_EQ(ReportWeightCount(d), static_cast<double>(kMaxReportWeights));
  EXPECT_NO_THROW(CheckReportSize(d, "heads"));
  d.tokens[0].push_back("b");  // 8193^2 > 2^26; checked before any weight is read
  ExpectError([&] { CheckReportSize(d, "heads"); }, "heads: 1 layers x 1 heads",
              "67125249 weights for the page (expected at most 67108864: save fewer");
  ExpectError([&] { RenderReport(d, {}, "heads"); }, "heads", "expected at most 67108864");
  const AttentionDump small = SyntheticDump(false);
  ExpectError([&] { RenderReport(small, {}, "heads"); }, "0 head patterns", "expected 6");
}

TEST(ReportCliTest, WritesThePageAndReplacesAnEarlierOne) {
  TempDir dir("report_cli_");
  const AttentionDump d = SyntheticDump(true);
  WriteDumpDir(d, dir.File("heads"));
  const std::string want = RenderReport(d, ClassifyHeads(d), dir.File("heads"));
  for (const char* name : {"report.html", "report.html", "report.htm"}) {
    const test::CliResult r = test::RunCli(
        {"report", "--attn-dir", dir.File("heads"), "--out", dir.File(name)}, dir.File(""));
    ASSERT_TRUE(r.exited && r.status == 0) << test::Describe(r);
    EXPECT_EQ(r.err, "");
    EXPECT_TRUE(test::ReadFile(dir.File(name)) == want) << name;  // not printed: 30 kB
  }
}

TEST(ReportCliTest, BadInputIsOneLineNamingTheFlag) {
  TempDir dir("report_bad_");
  WriteDumpDir(SyntheticDump(false), dir.File("heads"));
  fs::create_directories(dir.File("empty"));
  AttentionDump bad = SyntheticDump(false);
  bad.layers[1][1] += 0.25f;  // layer 1, input 0, head 0, row 0 sums to 1.25
  WriteDumpDir(bad, dir.File("bad"));
  const std::string notes = "precious notes, not a report\n";
  WriteText(dir.File("notes.html"), notes);
  struct Case {
    std::vector<std::string> args;
    std::string flag, fragment;
  };
  const std::string heads = dir.File("heads"), out = dir.File("report.html");
  const std::vector<Case> cases = {
      {{"--attn-dir", dir.File("nope"), "--out", out}, "--attn-dir", "not a directory"},
      {{"--attn-dir", dir.File("empty"), "--out", out}, "--attn-dir", "no layer0.npy"},
      {{"--attn-dir", dir.File("bad"), "--out", out}, "--attn-dir", "sum to 1.25"},
      {{"--attn-dir", heads, "--out", dir.File("report.txt")}, "--out", ".html or .htm"},
      {{"--attn-dir", heads, "--out", dir.File("notes.html")}, "--out", "exists and is not"},
      {{"--attn-dir", heads}, "--out", "required"},
  };
  for (const Case& c : cases) {
    std::vector<std::string> args = {"report"};
    args.insert(args.end(), c.args.begin(), c.args.end());
    const test::CliResult r = test::RunCli(args, dir.File(""));
    SCOPED_TRACE(c.fragment);
    EXPECT_TRUE(r.exited && r.status == 2) << test::Describe(r);
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    EXPECT_NE(r.err.find(c.flag), std::string::npos) << r.err;
    EXPECT_NE(r.err.find(c.fragment), std::string::npos) << r.err;
  }
  EXPECT_EQ(test::ReadFile(dir.File("notes.html")), notes);
  for (const auto& entry : fs::directory_iterator(dir.File(""))) {
    const std::string name = entry.path().filename().string();
    EXPECT_TRUE(name == "heads" || name == "empty" || name == "bad" || name == "notes.html")
        << name;
  }
}

// The DOM without its <script> elements (the data blocks and the code):
// what the scripts drew.
std::string WithoutScripts(const std::string& dom) {
  std::string out;
  size_t at = 0;
  for (size_t start; (start = dom.find("<script", at)) != std::string::npos;) {
    out += dom.substr(at, start - at);
    const size_t end = dom.find("</script>", start);
    if (end == std::string::npos) return out;
    at = end + 9;
  }
  return out + dom.substr(at);
}

// The attributes of every `tag` element of a serialised DOM. Chromium
// writes every attribute as name="value", with '"' inside as &quot;.
std::vector<Attributes> Elements(const std::string& dom, const std::string& tag) {
  static const std::regex kAttribute(R"re(([^\s="/>]+)="([^"]*)")re");
  std::vector<Attributes> all;
  for (size_t at = dom.find("<" + tag); at != std::string::npos; at = dom.find("<" + tag, at + 1)) {
    const char next = dom[at + 1 + tag.size()];
    if (next != ' ' && next != '>') continue;
    const std::string start = dom.substr(at, dom.find('>', at) - at);
    Attributes a;
    for (auto m = std::sregex_iterator(start.begin(), start.end(), kAttribute);
         m != std::sregex_iterator(); ++m) {
      a[(*m)[1]] = (*m)[2];
    }
    all.push_back(std::move(a));
  }
  return all;
}

bool HasClass(const Attributes& a, const std::string& name) {
  const auto it = a.find("class");
  if (it == a.end()) return false;
  std::istringstream words(it->second);
  for (std::string w; words >> w;) {
    if (w == name) return true;
  }
  return false;
}

std::vector<Attributes> WithClass(const std::vector<Attributes>& all, const std::string& name) {
  std::vector<Attributes> out;
  for (const Attributes& a : all) {
    if (HasClass(a, name)) out.push_back(a);
  }
  return out;
}

int64_t Int(const Attributes& a, const std::string& key) {
  const auto it = a.find(key);
  return it == a.end() ? -1 : std::stoll(it->second);
}

// Checks what every page must show: no console message, no error, ready,
// the layers x heads grid with (layer, head) selected.
void ExpectReadyWithSelection(const test::PageDom& page, const std::string& dom,
                              int64_t num_heads_total, int64_t layer, int64_t head) {
  EXPECT_TRUE(page.console.empty()) << page.log;
  EXPECT_NE(dom.find("<pre id=\"qkv-errors\"></pre>"), std::string::npos) << page.log;
  const std::vector<Attributes> body = Elements(dom, "body");
  ASSERT_EQ(body.size(), 1u);
  EXPECT_EQ(body[0].count("data-ready") ? body[0].at("data-ready") : "", "1") << page.log;
  const std::vector<Attributes> cells = WithClass(Elements(dom, "td"), "head-cell");
  EXPECT_EQ(static_cast<int64_t>(cells.size()), num_heads_total);
  const std::vector<Attributes> selected = WithClass(cells, "selected");
  ASSERT_EQ(selected.size(), 1u);
  EXPECT_EQ(Int(selected[0], "data-layer"), layer);
  EXPECT_EQ(Int(selected[0], "data-head"), head);
  const std::vector<Attributes> rows = WithClass(Elements(dom, "tr"), "pattern-row");
  EXPECT_EQ(static_cast<int64_t>(rows.size()), num_heads_total);
  const std::vector<Attributes> row = WithClass(rows, "selected");
  ASSERT_EQ(row.size(), 1u);
  EXPECT_EQ(Int(row[0], "data-layer"), layer);
  EXPECT_EQ(Int(row[0], "data-head"), head);
}

// Checks the "rgb(r,g,b)" fill against WeightColour (±1: the page computes
// in double, WeightColour from a float).
void ExpectColour(const std::string& fill, float w) {
  const std::array<uint8_t, 3> want = WeightColour(w);
  int r = -1, g = -1, b = -1;
  ASSERT_EQ(std::sscanf(fill.c_str(), "rgb(%d,%d,%d)", &r, &g, &b), 3) << fill;
  EXPECT_LE(std::abs(r - want[0]) + std::abs(g - want[1]) + std::abs(b - want[2]), 1)
      << fill << " for weight " << w;
}

TEST(ReportBrowserTest, HashSelectsAndHoverIsolatesInChromium) {
  if (!test::HaveChromium()) return;
  TempDir dir("report_browser_");
  const AttentionDump d = SyntheticDump(true);
  const std::string path = dir.File("report.html");
  WriteText(path, RenderReport(d, ClassifyHeads(d), "heads/"));
  struct View {
    int64_t input, layer, head;
    std::string hover;  // "" or q<i> / k<j>
  };
  // Input 0 holds the markup tokens; input 1 is 3 tokens of a seq of 6.
  for (const View& v : {View{0, 1, 2, "k2"}, View{1, 0, 1, "q1"}, View{1, 1, 0, ""}}) {
    const std::string hash =
        "input=" + std::to_string(v.input) + "&layer=" + std::to_string(v.layer) +
        "&head=" + std::to_string(v.head) + (v.hover.empty() ? "" : "&hover=" + v.hover);
    SCOPED_TRACE(hash);
    const test::PageDom page = test::DumpDom(test::FileUrl(path, hash), dir.File(""));
    ASSERT_TRUE(page.ok) << page.log;
    const std::string dom = WithoutScripts(page.dom);
    ExpectReadyWithSelection(page, dom, 6, v.layer, v.head);
    const std::vector<Attributes> body = Elements(dom, "body");
    EXPECT_EQ(Int(body[0], "data-input"), v.input);
    const int64_t len = static_cast<int64_t>(d.tokens[v.input].size());

    // The head view: the input's tokens on both sides, in order.
    const std::vector<Attributes> groups = Elements(dom, "g");
    const std::vector<Attributes> queries = WithClass(WithClass(groups, "token"), "query");
    const std::vector<Attributes> keys = WithClass(WithClass(groups, "token"), "key");
    ASSERT_EQ(static_cast<int64_t>(queries.size()), len);
    ASSERT_EQ(static_cast<int64_t>(keys.size()), len);
    for (int64_t i = 0; i < len; ++i) {
      EXPECT_EQ(Int(queries[i], "data-index"), i);
      EXPECT_EQ(Int(keys[i], "data-index"), i);
    }

    // The heatmap: L^2 cells, real tokens only, coloured by their weight,
    // and the weight (4 decimals) in each cell's <title>.
    const std::vector<Attributes> cells = WithClass(Elements(dom, "rect"), "heat-cell");
    ASSERT_EQ(static_cast<int64_t>(cells.size()), len * len);
    for (const Attributes& c : cells) {
      const int64_t i = Int(c, "data-query"), j = Int(c, "data-key");
      ASSERT_TRUE(i >= 0 && i < len && j >= 0 && j < len);
      ExpectColour(c.at("fill"), Weight(d, v.layer, v.input, v.head, i, j));
    }
    static const std::regex kTitle(R"re(: ([0-9.]+) \(query ([0-9]+), key ([0-9]+)\)</title>)re");
    int64_t titles = 0;
    for (auto m = std::sregex_iterator(dom.begin(), dom.end(), kTitle); m != std::sregex_iterator();
         ++m, ++titles) {
      const float w = Weight(d, v.layer, v.input, v.head, std::stoll((*m)[2]), std::stoll((*m)[3]));
      // 4 decimals of round(w * 65535) / 65535.
      EXPECT_NEAR(std::stod((*m)[1]), Quantized(w) / 65535.0, 0.5e-4 + 1e-9) << (*m)[0];
    }
    EXPECT_EQ(titles, len * len);

    // The lines: one per (query, key) with opacity = weight; a hover hides
    // exactly those not touching its token, and marks the token.
    const std::vector<Attributes> lines = WithClass(Elements(dom, "line"), "attn-line");
    ASSERT_EQ(static_cast<int64_t>(lines.size()), len * len);
    const char side = v.hover.empty() ? ' ' : v.hover[0];
    const int64_t index = v.hover.empty() ? -1 : std::stoll(v.hover.substr(1));
    int64_t shown = 0;
    for (const Attributes& l : lines) {
      const int64_t i = Int(l, "data-query"), j = Int(l, "data-key");
      const bool hide = side == 'q' ? i != index : side == 'k' ? j != index : false;
      EXPECT_EQ(HasClass(l, "hidden"), hide) << "query " << i << ", key " << j;
      EXPECT_NEAR(std::stod(l.at("stroke-opacity")),
                  Quantized(Weight(d, v.layer, v.input, v.head, i, j)) / 65535.0, 0.5e-4 + 1e-9);
      shown += !HasClass(l, "hidden");
    }
    EXPECT_EQ(shown, v.hover.empty() ? len * len : len);
    EXPECT_EQ(WithClass(queries, "active").size(), side == 'q' ? 1u : 0u);
    EXPECT_EQ(WithClass(keys, "active").size(), side == 'k' ? 1u : 0u);
    if (side == 'k') {
      EXPECT_TRUE(HasClass(keys[index], "active"));
    } else if (side == 'q') {
      EXPECT_TRUE(HasClass(queries[index], "active"));
    }

    // Markup tokens are text: escaped in the DOM, never elements.
    if (v.input == 0) {
      EXPECT_NE(dom.find("&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;"),
                std::string::npos);
      EXPECT_NE(dom.find("&lt;img src=x onerror=alert(1)&gt;"), std::string::npos);
      EXPECT_TRUE(Elements(dom, "img").empty());
    }
  }
}

// Drives the page as a person would, from a script appended after the
// page's own: a click on a grid cell and a table row, mouseenter and
// mouseleave on tokens, a change of input; it writes what it saw as JSON
// into <pre id="probe">.
const char kProbe[] = R"JS(<pre id="probe"></pre>
<script>
(function () {
  'use strict';
  const out = {};
  const all = (selector) => Array.from(document.querySelectorAll(selector));
  const selected = () => all('.head-cell.selected, .pattern-row.selected').map(
      (e) => e.tagName.toLowerCase() + ' ' + e.dataset.layer + ',' + e.dataset.head);
  const shown = (key) => [...new Set(all('.attn-line:not(.hidden)').map((e) => e.dataset[key]))];
  document.querySelector('.head-cell[data-layer="1"][data-head="2"]').click();
  const value = (id) => document.getElementById(id).value;
  out.cell = {selected: selected(), hash: location.hash, layer: value('sel-layer'),
              head: value('sel-head')};
  const query = document.querySelector('.token.query[data-index="3"]');
  query.dispatchEvent(new MouseEvent('mouseenter'));
  out.enter_query = {
    hidden: all('.attn-line.hidden').length, queries: shown('query'),
    active: all('.token.active').map((e) => e.getAttribute('class') + ' ' + e.dataset.index)};
  query.dispatchEvent(new MouseEvent('mouseleave'));
  out.leave_query = {hidden: all('.attn-line.hidden').length, active: all('.token.active').length};
  const key = document.querySelector('.token.key[data-index="0"]');
  key.dispatchEvent(new MouseEvent('mouseenter'));
  out.enter_key = {hidden: all('.attn-line.hidden').length, keys: shown('key')};
  key.dispatchEvent(new MouseEvent('mouseleave'));
  out.leave_key = {hidden: all('.attn-line.hidden').length};
  document.querySelector('.pattern-row[data-layer="0"][data-head="1"]').click();
  out.row = {selected: selected(), hash: location.hash};
  const input = document.getElementById('sel-input');
  input.value = '1';
  input.dispatchEvent(new Event('change'));
  out.input = {queries: all('.token.query').length, cells: all('.heat-cell').length,
               hash: location.hash};
  document.getElementById('probe').textContent = JSON.stringify(out);
})();
</script>
)JS";

// Text of a serialised text node: Chromium escapes '&', '<', '>' there.
std::string UnescapeText(std::string text) {
  for (const auto& [entity, c] : std::vector<std::pair<std::string, std::string>>{
           {"&lt;", "<"}, {"&gt;", ">"}, {"&nbsp;", "\xc2\xa0"}, {"&amp;", "&"}}) {
    for (size_t at = text.find(entity); at != std::string::npos; at = text.find(entity, at + 1)) {
      text.replace(at, entity.size(), c);
    }
  }
  return text;
}

TEST(ReportBrowserTest, ClicksAndMouseEventsUpdateThePageInChromium) {
  if (!test::HaveChromium()) return;
  TempDir dir("report_events_");
  const AttentionDump d = SyntheticDump(false);
  std::string page = RenderReport(d, ClassifyHeads(d), "heads/");
  page.insert(page.rfind("</body>"), kProbe);
  const std::string path = dir.File("report.html");
  WriteText(path, page);
  const test::PageDom dom = test::DumpDom(test::FileUrl(path), dir.File(""));
  ASSERT_TRUE(dom.ok) << dom.log;
  EXPECT_TRUE(dom.console.empty()) << dom.log;
  const std::string open = "<pre id=\"probe\">";
  const size_t start = dom.dom.find(open);
  ASSERT_NE(start, std::string::npos) << dom.dom;
  const std::string text =
      dom.dom.substr(start + open.size(), dom.dom.find("</pre>", start) - start - open.size());
  const nlohmann::json probe = nlohmann::json::parse(UnescapeText(text), nullptr, false);
  ASSERT_FALSE(probe.is_discarded()) << text;
  // Input 0 (5 tokens) first; a click selects the head everywhere.
  EXPECT_EQ(probe["cell"]["selected"], nlohmann::json({"td 1,2", "tr 1,2"})) << probe.dump();
  EXPECT_EQ(probe["cell"]["hash"], "#input=0&layer=1&head=2");
  EXPECT_EQ(probe["cell"]["layer"], "1");
  EXPECT_EQ(probe["cell"]["head"], "2");
  // mouseenter on query 3 hides the 20 lines of the other queries.
  EXPECT_EQ(probe["enter_query"]["hidden"], 20);
  EXPECT_EQ(probe["enter_query"]["queries"], nlohmann::json({"3"}));
  EXPECT_EQ(probe["enter_query"]["active"], nlohmann::json({"token query active 3"}));
  EXPECT_EQ(probe["leave_query"]["hidden"], 0);
  EXPECT_EQ(probe["leave_query"]["active"], 0);
  EXPECT_EQ(probe["enter_key"]["hidden"], 20);
  EXPECT_EQ(probe["enter_key"]["keys"], nlohmann::json({"0"}));
  EXPECT_EQ(probe["leave_key"]["hidden"], 0);
  EXPECT_EQ(probe["row"]["selected"], nlohmann::json({"td 0,1", "tr 0,1"}));
  EXPECT_EQ(probe["row"]["hash"], "#input=0&layer=0&head=1");
  // Input 1: 3 tokens, the padding of its seq of 6 not drawn.
  EXPECT_EQ(probe["input"]["queries"], 3);
  EXPECT_EQ(probe["input"]["cells"], 9);
  EXPECT_EQ(probe["input"]["hash"], "#input=1&layer=0&head=1");
}

TEST(ReportBrowserTest, ScreenshotIsA1400By1000Png) {
  if (!test::HaveChromium()) return;
  TempDir dir("report_shot_");
  const AttentionDump d = SyntheticDump(false);
  const std::string path = dir.File("report.html");
  WriteText(path, RenderReport(d, ClassifyHeads(d), "heads/"));
  const test::CliResult r = test::Screenshot(test::FileUrl(path, "input=0&layer=0&head=1"),
                                             dir.File("shot.png"), 1400, 1000, dir.File(""));
  ASSERT_TRUE(r.exited && r.status == 0) << test::Describe(r);
  EXPECT_TRUE(test::ConsoleLines(r.err).empty()) << r.err;
  const test::Bytes png = test::ReadFileBytes(dir.File("shot.png"));
  ASSERT_GE(png.size(), 24u);
  const test::Bytes signature = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  EXPECT_TRUE(std::equal(signature.begin(), signature.end(), png.begin()));
  EXPECT_EQ(std::string(png.begin() + 12, png.begin() + 16), "IHDR");
  const auto be32 = [&](size_t at) {
    return uint32_t{png[at]} << 24 | uint32_t{png[at + 1]} << 16 | uint32_t{png[at + 2]} << 8 |
           png[at + 3];
  };
  EXPECT_EQ(be32(16), 1400u);
  EXPECT_EQ(be32(20), 1000u);
}

TEST(ReportBrowserTest, MiniLmReportShowsEveryHeadInChromium) {
  if (!test::HaveMiniLm() || !test::HaveChromium()) return;
  TempDir dir("report_minilm_");
  const test::CliResult embed = test::RunCli(
      {"embed", "--model", test::kMiniLm, "--text", "The cat sat on the mat, and the dog barked.",
       "--text", "Attention is all you need.", "--out", dir.File("emb.npy"), "--attn-weights",
       dir.File("heads")},
      dir.File(""), 120.0);
  ASSERT_TRUE(embed.exited && embed.status == 0) << test::Describe(embed);
  const test::CliResult report = test::RunCli(
      {"report", "--attn-dir", dir.File("heads"), "--out", dir.File("report.html")}, dir.File(""));
  ASSERT_TRUE(report.exited && report.status == 0) << test::Describe(report);
  const nlohmann::json tokens = test::ReadJsonFile(dir.File("heads/tokens.json"));
  ASSERT_EQ(tokens.size(), 2u);
  const test::PageDom page =
      test::DumpDom(test::FileUrl(dir.File("report.html"), "input=1&layer=2&head=3"), dir.File(""));
  ASSERT_TRUE(page.ok) << page.log;
  const std::string dom = WithoutScripts(page.dom);
  ExpectReadyWithSelection(page, dom, 6 * 12, 2, 3);
  const size_t len = tokens[1].size();  // [CLS] attention is all you need . [SEP]
  EXPECT_EQ(len, 8u);
  const std::vector<Attributes> groups = WithClass(Elements(dom, "g"), "token");
  EXPECT_EQ(WithClass(groups, "query").size(), len);
  EXPECT_EQ(WithClass(groups, "key").size(), len);
  EXPECT_EQ(WithClass(Elements(dom, "rect"), "heat-cell").size(), len * len);
  EXPECT_EQ(WithClass(Elements(dom, "line"), "attn-line").size(), len * len);
}

}  // namespace
}  // namespace qkv::inspect
