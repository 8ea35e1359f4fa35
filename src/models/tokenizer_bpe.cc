// src/models/tokenizer_bpe.cc: the byte-level BPE tokenizer of a GGUF file
// (tokenizer.ggml.model "gpt2"), id for id what Hugging Face `tokenizers`
// and llama.cpp produce for SmolLM2 (tokenizer.ggml.pre "smollm").
//
// Design. Encode validates the UTF-8 once (the only input error), then:
//   1. special tokens: control and user-defined pieces (token_type 3, 4)
//      found in the text, leftmost first and longest first at one position
//      (as tokenizers' Aho-Corasick leftmost-longest), are emitted as they
//      are; the text between them goes on. parse_special = false skips this.
//   2. pre-tokeniser "smollm", as tokenizer.json's Sequence[Digits(
//      individual_digits = true), ByteLevel(use_regex = true)] and llama.cpp's
//      LLAMA_VOCAB_PRE_TYPE_SMOLLM regex list {"\p{N}", GPT-2}: every \p{N}
//      code point is a word of its own, and the GPT-2 pattern then splits
//      each stretch between them *on its own*: a stretch is the whole PCRE2
//      subject, so `\s+(?!\S)` cannot look past it ("a  1" gives "a", "  ",
//      "1", where one pattern over the whole text would give "a", " ", " ",
//      "1"). "gpt2" is the same without the digit split.
//   3. each word's bytes become GPT-2's printable stand-ins (bytes_to_unicode,
//      computed below), whose single-character pieces are the initial
//      symbols; BPE then merges, always the adjacent pair with the lowest
//      rank (tokenizer.ggml.merges order), leftmost first among equal ranks
//      (tokenizers' word.rs and llama.cpp's llm_tokenizer_bpe agree). Merges
//      are keyed by the two symbols' ids, and the symbols are a linked list
//      under a min-heap of candidate pairs with lazy deletion, so a word of n
//      bytes costs O(n log n): a 10 KB run of letters is one word.
// Unicode classes (\p{L}, \p{N}, \p{Z}) come from PCRE2 (PCRE2_UTF | PCRE2_UCP),
// JIT-compiled when the library has a JIT. Each Encode call makes its own
// match data, so Encode is const and thread-safe; a JIT stack overflow falls
// back to the interpreter. There is no word cache: ~10 MB/s of English on
// one core (800 KB of short words in 0.08 s; 1 MB of one letter, a single
// word, in 0.5 s) is far ahead of the model that consumes the ids.
//
// Bytes without a piece: SmolLM2's vocabulary lacks 21 byte stand-ins, so
// tokenizers (BPE without unk_token) silently drops those bytes; so does
// Encode. Valid UTF-8 can hold 8 of them: the controls 04 06 13 14 16 1D and
// the lead bytes F1 F2 of U+40000..U+BFFFF.
//
// Decoding: a normal token's piece maps back char by char through the
// inverse of bytes_to_unicode; a piece with a character outside that map
// decodes to its own UTF-8 (tokenizers' ByteLevel decoder), and control and
// user-defined tokens to their text, so Decode(Encode(s)) == s for every
// valid s without dropped bytes. The bytes of every token are computed once
// at load.
//
// Checked against tokenizers 0.23.3 on every code point c (surrogates
// aside) in "a{c}a {c}1{c}  {c}{c}!{c} ": all but 133 give identical ids. The
// 133 are the digits of scripts added in Unicode 15.0 to 17.0 (Kawi U+11F50,
// Kaktovik U+1D2C0, Nag Mundari U+1E4F0, Garay, Sunuwar, Ol Onal, ...), which
// tokenizers' Digits step (Rust's char::is_numeric) isolates but PCRE2 10.42,
// on Unicode 14, does not know; a newer PCRE2 closes the gap by itself.
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <queue>
#include <unordered_map>
#include <utility>

#include "qkv/error.h"
#include "qkv/gguf.h"
#include "qkv/models/bpe_tokenizer.h"

namespace qkv::models {
namespace {

// tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
constexpr int64_t kTypeControl = 3;
constexpr int64_t kTypeUserDefined = 4;
constexpr int64_t kMaxTokenType = 6;  // 0 undefined .. 6 byte

// The GPT-2 pre-tokenisation pattern (openai/gpt-2 encoder.py; tokenizers'
// ByteLevel), 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|
// \s+(?!\S)|\s+, with \s spelt [\p{Z}\t-\r\x{85}]: Oniguruma's \s (tokenizers'
// engine) is the White_Space property, which is exactly the Z categories plus
// \t..\r and U+0085. PCRE2's own \s under UCP adds U+180E MONGOLIAN VOWEL
// SEPARATOR (its \h list predates U+180E becoming Cf in Unicode 6.3), which
// Oniguruma puts with the symbols. Every part stays a single character class,
// so no repetition keeps a backtracking frame per character (a 1 MB run of
// "!" or of spaces is one match in constant memory).
// Contractions are lowercase only: "I'M" splits as "I", "'", "M".
constexpr const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\p{Z}\t-\r\x{85}\p{L}\p{N}]+)"
    R"(|[\p{Z}\t-\r\x{85}]+(?![^\p{Z}\t-\r\x{85}])|[\p{Z}\t-\r\x{85}]+)";
constexpr const char* kDigitPattern = R"(\p{N})";

// Returns the length (1..4) of the UTF-8 character at p[0, n); 0 when p[0, n)
// is a valid but unfinished start of one; -k when the first k >= 1 bytes can
// never start a valid character (the maximal subpart, which U+FFFD replaces
// as one). Overlong forms, surrogates and code points past U+10FFFF are
// invalid (Unicode table 3-7).
int Utf8Char(const unsigned char* p, size_t n) {
  const unsigned char b0 = p[0];
  if (b0 < 0x80) return 1;
  int len = 0;
  unsigned char lo = 0x80, hi = 0xBF;  // range of the second byte
  if (b0 < 0xC2) {
    return -1;  // a continuation byte or the overlong leads C0 C1
  } else if (b0 < 0xE0) {
    len = 2;
  } else if (b0 < 0xF0) {
    len = 3;
    if (b0 == 0xE0) lo = 0xA0;  // overlong
    if (b0 == 0xED) hi = 0x9F;  // surrogates
  } else if (b0 < 0xF5) {
    len = 4;
    if (b0 == 0xF0) lo = 0x90;  // overlong
    if (b0 == 0xF4) hi = 0x8F;  // past U+10FFFF
  } else {
    return -1;
  }
  for (int k = 1; k < len; ++k) {
    if (static_cast<size_t>(k) >= n) return 0;
    const unsigned char b = p[k];
    if (b < (k == 1 ? lo : 0x80) || b > (k == 1 ? hi : 0xBF)) return -k;
  }
  return len;
}

void AppendUtf8(uint32_t cp, std::string& out) {
  utf8proc_uint8_t buf[4];
  const utf8proc_ssize_t n = utf8proc_encode_char(static_cast<utf8proc_int32_t>(cp), buf);
  out.append(reinterpret_cast<const char*>(buf), static_cast<size_t>(n));
}

// GPT-2's bytes_to_unicode: the printable bytes '!'..'~', 0xA1..0xAC and
// 0xAE..0xFF stand for themselves; the other 68 (controls, space, 0x7F..0xA0,
// 0xAD) become U+0100, U+0101, ... in byte order, so ' ' is U+0120 'Ġ'.
std::array<uint32_t, 256> ByteToCodePoint() {
  std::array<uint32_t, 256> cp{};
  uint32_t next = 256;
  for (uint32_t b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
    cp[b] = printable ? b : next++;
  }
  return cp;
}

std::string Quote(std::string_view s) {
  std::string out = "\"";
  for (const char c : s.substr(0, 40)) {
    if (c == '"' || c == '\\') out += '\\';
    if (c == '\n') {
      out += "\\n";
    } else if (static_cast<unsigned char>(c) < 0x20) {
      out += '?';
    } else {
      out += c;
    }
  }
  return out + (s.size() > 40 ? "...\"" : "\"");
}

// A compiled PCRE2 pattern, shared by all threads (pcre2_match only reads it).
class Regex {
 public:
  explicit Regex(const char* pattern) {
    int error = 0;
    PCRE2_SIZE offset = 0;
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern), PCRE2_ZERO_TERMINATED,
                          PCRE2_UTF | PCRE2_UCP, &error, &offset, nullptr);
    if (code_ == nullptr) throw Error("PCRE2 cannot compile " + Quote(pattern) + ": " + Message(error));
    // Without a JIT (an unsupported CPU, or a library built without it)
    // pcre2_match interprets the pattern: same results, slower.
    pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE);
  }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;
  ~Regex() { pcre2_code_free(code_); }

  // Finds the first match in subject[start, size) into *begin, *end; false
  // when there is none. The subject is valid UTF-8 (Encode checked it) and
  // `start` a character boundary.
  bool Find(std::string_view subject, size_t start, pcre2_match_data* match, size_t* begin,
            size_t* end) const {
    const auto* s = reinterpret_cast<PCRE2_SPTR>(subject.data());
    int rc = pcre2_match(code_, s, subject.size(), start, PCRE2_NO_UTF_CHECK, match, nullptr);
    if (rc == PCRE2_ERROR_JIT_STACKLIMIT) {
      rc = pcre2_match(code_, s, subject.size(), start, PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT, match,
                       nullptr);
    }
    if (rc == PCRE2_ERROR_NOMATCH) return false;
    if (rc < 0) throw Error("PCRE2 match failed: " + Message(rc));
    const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(match);
    *begin = ovector[0];
    *end = ovector[1];
    return true;
  }

  pcre2_match_data* NewMatchData() const {
    pcre2_match_data* match = pcre2_match_data_create_from_pattern(code_, nullptr);
    if (match == nullptr) throw Error("PCRE2: out of memory for match data");
    return match;
  }

 private:
  static std::string Message(int error) {
    PCRE2_UCHAR buffer[256];
    pcre2_get_error_message(error, buffer, sizeof(buffer));
    return reinterpret_cast<const char*>(buffer);
  }

  pcre2_code* code_ = nullptr;
};

struct MatchDataDeleter {
  void operator()(pcre2_match_data* m) const { pcre2_match_data_free(m); }
};
using MatchData = std::unique_ptr<pcre2_match_data, MatchDataDeleter>;

uint64_t PairKey(int32_t left, int32_t right) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}

}  // namespace

struct BpeTokenizer::Impl {
  struct Merge {
    int32_t rank;
    int32_t id;  // the merged piece
  };
  struct Special {
    std::string text;
    int32_t id;
  };

  std::string name;  // the GGUF file, for messages
  std::string pre;
  bool split_digits = true;
  std::vector<std::string> pieces;
  std::vector<std::string> bytes;  // TokenBytes of every id
  std::vector<int64_t> types;
  std::unordered_map<uint64_t, Merge> merges;  // PairKey(left, right) -> merge
  std::array<int32_t, 256> byte_ids{};          // the piece of each single byte
  std::vector<Special> specials;                // longest first
  std::array<bool, 256> special_first{};        // a special piece starts with this byte
  bool chatml = true;                           // the chat template writes ChatML
  std::string system_turn;                      // its default system turn, if any
  int32_t bos = -1, eos = -1;
  Regex digits{kDigitPattern};
  Regex gpt2{kGpt2Pattern};

  void CheckId(int32_t id) const {
    if (id < 0 || static_cast<size_t>(id) >= pieces.size()) {
      throw Error("token id " + std::to_string(id) + " is out of range (expected [0, " +
                  std::to_string(pieces.size()) + "))");
    }
  }

  // Appends the BPE tokens of one pre-tokenised word.
  void Bpe(std::string_view word, std::vector<int32_t>& ids) const;
  // Pre-tokenises a stretch of text without special tokens.
  void EncodeText(std::string_view text, pcre2_match_data* match, std::vector<int32_t>& ids) const;
};

void BpeTokenizer::Impl::Bpe(std::string_view word, std::vector<int32_t>& ids) const {
  // Symbols are a doubly linked list over the word's bytes (those with a
  // piece); a merged-away symbol gets id -1. Heap entries are checked when
  // popped: a pair whose left symbol died or whose right neighbour changed
  // since it was pushed is stale.
  struct Symbol {
    int32_t id, prev, next;
  };
  std::vector<Symbol> symbols;
  symbols.reserve(word.size());
  for (const char c : word) {
    const int32_t id = byte_ids[static_cast<unsigned char>(c)];
    if (id < 0) continue;
    const auto i = static_cast<int32_t>(symbols.size());
    symbols.push_back({id, i - 1, i + 1});
  }
  const size_t n = symbols.size();
  if (n == 0) return;
  symbols.back().next = -1;
  if (n == 1) {
    ids.push_back(symbols[0].id);
    return;
  }
  struct Candidate {
    int32_t rank, pos, left_id, right_id;
    bool operator>(const Candidate& o) const {
      return rank != o.rank ? rank > o.rank : pos > o.pos;  // lowest rank, then leftmost
    }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> heap;
  const auto push = [&](int32_t left) {
    if (left < 0) return;
    const int32_t right = symbols[left].next;
    if (right < 0) return;
    const auto it = merges.find(PairKey(symbols[left].id, symbols[right].id));
    if (it != merges.end()) heap.push({it->second.rank, left, symbols[left].id, symbols[right].id});
  };
  for (size_t i = 0; i + 1 < n; ++i) push(static_cast<int32_t>(i));
  while (!heap.empty()) {
    const Candidate c = heap.top();
    heap.pop();
    Symbol& left = symbols[c.pos];
    if (left.id != c.left_id || left.next < 0 || symbols[left.next].id != c.right_id) continue;
    Symbol& right = symbols[left.next];
    left.id = merges.at(PairKey(c.left_id, c.right_id)).id;  // the pair merges into one
    left.next = right.next;
    if (right.next >= 0) symbols[right.next].prev = c.pos;
    right.id = -1;
    push(left.prev);
    push(c.pos);
  }
  for (int32_t i = 0; i >= 0; i = symbols[i].next) ids.push_back(symbols[i].id);
}

void BpeTokenizer::Impl::EncodeText(std::string_view text, pcre2_match_data* match,
                                    std::vector<int32_t>& ids) const {
  // Splits one digit-free stretch with the GPT-2 pattern. Its alternatives
  // cover every character, so there are no gaps; were there one, it would be
  // a word of its own, as llama.cpp keeps unmatched text.
  const auto split = [&](std::string_view stretch) {
    size_t pos = 0, begin = 0, end = 0;
    while (pos < stretch.size() && gpt2.Find(stretch, pos, match, &begin, &end)) {
      if (begin > pos) Bpe(stretch.substr(pos, begin - pos), ids);
      if (end == begin) break;  // no alternative matches empty; never loop
      Bpe(stretch.substr(begin, end - begin), ids);
      pos = end;
    }
    if (pos < stretch.size()) Bpe(stretch.substr(pos), ids);
  };
  if (!split_digits) {
    split(text);
    return;
  }
  size_t pos = 0, begin = 0, end = 0;
  while (pos < text.size() && digits.Find(text, pos, match, &begin, &end)) {
    if (begin > pos) split(text.substr(pos, begin - pos));
    Bpe(text.substr(begin, end - begin), ids);  // one \p{N} code point
    pos = end;
  }
  if (pos < text.size()) split(text.substr(pos));
}

BpeTokenizer::BpeTokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
BpeTokenizer::BpeTokenizer(BpeTokenizer&&) noexcept = default;
BpeTokenizer& BpeTokenizer::operator=(BpeTokenizer&&) noexcept = default;
BpeTokenizer::~BpeTokenizer() = default;

BpeTokenizer BpeTokenizer::FromGguf(const GgufFile& file) {
  auto impl = std::make_unique<Impl>();
  Impl& t = *impl;
  t.name = file.name();
  const auto fail = [&t](const std::string& key, const std::string& problem) {
    return Error(t.name + ": " + key + " " + problem);
  };
  const std::string model = file.GetString("tokenizer.ggml.model");
  if (model != "gpt2") {
    throw fail("tokenizer.ggml.model", "is " + Quote(model) + " (expected \"gpt2\", byte-level BPE)");
  }
  t.pre = file.GetString("tokenizer.ggml.pre");
  if (t.pre != "smollm" && t.pre != "gpt2") {
    throw fail("tokenizer.ggml.pre",
               "is " + Quote(t.pre) + ", a pre-tokeniser qkv does not implement (expected "
               "\"smollm\" or \"gpt2\")");
  }
  t.split_digits = t.pre == "smollm";

  // Vocabulary: ids 0..N-1, unique pieces, types in range.
  t.pieces = file.GetStringArray("tokenizer.ggml.tokens");
  const size_t num_tokens = t.pieces.size();
  if (num_tokens == 0 || num_tokens > (size_t{1} << 30)) {
    throw fail("tokenizer.ggml.tokens", "has " + std::to_string(num_tokens) +
                                            " pieces (expected 1 to 2^30)");
  }
  if (file.FindMetadata("tokenizer.ggml.token_type") != nullptr) {
    t.types = file.GetIntArray("tokenizer.ggml.token_type");
    if (t.types.size() != num_tokens) {
      throw fail("tokenizer.ggml.token_type",
                 "has " + std::to_string(t.types.size()) + " entries (expected " +
                     std::to_string(num_tokens) + ", one per token)");
    }
  } else {
    t.types.assign(num_tokens, 1);  // all normal, as llama.cpp assumes
  }
  std::unordered_map<std::string_view, int32_t> ids;
  ids.reserve(num_tokens);
  for (size_t i = 0; i < num_tokens; ++i) {
    const std::string key = "tokenizer.ggml.tokens[" + std::to_string(i) + "]";
    if (t.types[i] < 0 || t.types[i] > kMaxTokenType) {
      throw fail("tokenizer.ggml.token_type[" + std::to_string(i) + "]",
                 "is " + std::to_string(t.types[i]) + " (expected 0 to 6)");
    }
    const auto [it, inserted] = ids.emplace(t.pieces[i], static_cast<int32_t>(i));
    if (!inserted) {
      throw fail(key, Quote(t.pieces[i]) + " repeats tokenizer.ggml.tokens[" +
                          std::to_string(it->second) + "] (expected unique pieces)");
    }
  }

  // Byte level: the piece of each byte's stand-in. A byte without one is
  // dropped from the text, as tokenizers' BPE drops a character it has no
  // piece for when there is no unk_token; SmolLM2 lacks 21: the bytes UTF-8
  // never uses (C0 C1 F5..FF) and the controls 04 06 13 14 16 1D.
  const std::array<uint32_t, 256> byte_cp = ByteToCodePoint();
  std::array<int16_t, 324> cp_byte;  // stand-ins end at U+0100 + 68 = U+0143
  cp_byte.fill(-1);
  for (int b = 0; b < 256; ++b) {
    cp_byte[byte_cp[b]] = static_cast<int16_t>(b);
    std::string stand_in;
    AppendUtf8(byte_cp[b], stand_in);
    const auto it = ids.find(stand_in);
    t.byte_ids[b] = it == ids.end() ? -1 : it->second;
  }

  // Merges "left right": both sides and their concatenation must be pieces.
  // A repeated pair keeps its first (lowest) rank, as llama.cpp does.
  const std::vector<std::string>& merges = file.GetStringArray("tokenizer.ggml.merges");
  if (merges.size() >= (size_t{1} << 31)) throw fail("tokenizer.ggml.merges", "is too long");
  t.merges.reserve(merges.size());
  std::string joined;
  for (size_t r = 0; r < merges.size(); ++r) {
    const std::string key = "tokenizer.ggml.merges[" + std::to_string(r) + "]";
    const std::string_view m = merges[r];
    // Pieces never hold a space (it is 'Ġ'), so the first one separates.
    const size_t space = m.find(' ', 1);
    if (space == std::string_view::npos || space + 1 >= m.size()) {
      throw fail(key, "is " + Quote(m) + " (expected \"left right\")");
    }
    const std::string_view left = m.substr(0, space), right = m.substr(space + 1);
    const auto l = ids.find(left), rt = ids.find(right);
    if (l == ids.end() || rt == ids.end()) {
      throw fail(key, Quote(m) + " names a piece that is not in tokenizer.ggml.tokens");
    }
    joined.assign(left).append(right);
    const auto j = ids.find(joined);
    if (j == ids.end()) {
      throw fail(key, Quote(m) + " merges into " + Quote(joined) +
                          ", which is not in tokenizer.ggml.tokens");
    }
    t.merges.emplace(PairKey(l->second, rt->second), Impl::Merge{static_cast<int32_t>(r), j->second});
  }

  // Special pieces, longest first; their bytes are their text.
  t.bytes.resize(num_tokens);
  for (size_t i = 0; i < num_tokens; ++i) {
    const std::string& piece = t.pieces[i];
    if (t.types[i] == kTypeControl || t.types[i] == kTypeUserDefined) {
      t.bytes[i] = piece;
      if (!piece.empty()) {
        t.specials.push_back({piece, static_cast<int32_t>(i)});
        t.special_first[static_cast<unsigned char>(piece[0])] = true;
      }
      continue;
    }
    // tokenizers' ByteLevel decoder: a piece with a character outside the
    // byte map (or not UTF-8 at all) decodes to its own bytes, whole.
    std::string out;
    const auto* p = reinterpret_cast<const unsigned char*>(piece.data());
    for (size_t k = 0; k < piece.size();) {
      const int len = Utf8Char(p + k, piece.size() - k);
      uint32_t cp = 0;
      if (len == 1) cp = p[k];
      if (len == 2) cp = ((p[k] & 0x1Fu) << 6) | (p[k + 1] & 0x3Fu);
      if (len <= 0 || len > 2 || cp >= cp_byte.size() || cp_byte[cp] < 0) {
        out = piece;
        break;
      }
      out += static_cast<char>(cp_byte[cp]);
      k += static_cast<size_t>(len);
    }
    t.bytes[i] = std::move(out);
  }
  std::stable_sort(t.specials.begin(), t.specials.end(),
                   [](const Impl::Special& a, const Impl::Special& b) {
                     return a.text.size() > b.text.size();
                   });

  const auto special_id = [&](const char* key) -> int32_t {
    if (file.FindMetadata(key) == nullptr) return -1;
    const int64_t id = file.GetInt(key);
    if (id < 0 || static_cast<uint64_t>(id) >= num_tokens) {
      throw fail(key, "is " + std::to_string(id) + " (expected a token id in [0, " +
                          std::to_string(num_tokens) + "))");
    }
    return static_cast<int32_t>(id);
  };
  t.bos = special_id("tokenizer.ggml.bos_token_id");
  t.eos = special_id("tokenizer.ggml.eos_token_id");

  // The chat template: qkv renders ChatML itself, with the default system
  // turn the template writes as a literal (SmolLM2's "You are a helpful AI
  // assistant named SmolLM, trained by Hugging Face"), rather than running Jinja.
  if (file.FindMetadata("tokenizer.chat_template") != nullptr) {
    const std::string tmpl = file.GetString("tokenizer.chat_template");
    t.chatml = tmpl.find("<|im_start|>") != std::string::npos;
    for (const char* start : {"<|im_start|>system\n", "<|im_start|>system\\n"}) {
      const size_t at = tmpl.find(start);
      if (at == std::string::npos) continue;
      const size_t content = at + std::strlen(start);
      const size_t stop = tmpl.find("<|im_end|>", content);
      if (stop == std::string::npos) break;
      std::string system(tmpl, content, stop - content);
      // Only a literal counts: Jinja expressions or quotes mean the system
      // turn comes from the messages.
      if (system.find_first_of("{}'\"+\\") != std::string::npos) break;
      t.system_turn = "<|im_start|>system\n" + system + "<|im_end|>\n";
      break;
    }
  }
  return BpeTokenizer(std::move(impl));
}

std::vector<int32_t> BpeTokenizer::Encode(std::string_view text, bool parse_special) const {
  const auto* p = reinterpret_cast<const unsigned char*>(text.data());
  for (size_t i = 0; i < text.size();) {
    if (p[i] < 0x80) {
      ++i;
      continue;
    }
    const int len = Utf8Char(p + i, text.size() - i);
    if (len <= 0) throw Error("invalid UTF-8 at byte " + std::to_string(i));
    i += static_cast<size_t>(len);
  }
  const Impl& t = *impl_;
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 4);  // English averages ~4.5 bytes a token
  const MatchData match(t.gpt2.NewMatchData());
  size_t start = 0;  // of the text not yet encoded
  for (size_t i = 0; parse_special && i < text.size(); ++i) {
    if (!t.special_first[p[i]]) continue;
    for (const Impl::Special& s : t.specials) {
      if (text.compare(i, s.text.size(), s.text) != 0) continue;
      if (i > start) t.EncodeText(text.substr(start, i - start), match.get(), ids);
      ids.push_back(s.id);
      start = i + s.text.size();
      i = start - 1;
      break;
    }
  }
  if (start < text.size()) t.EncodeText(text.substr(start), match.get(), ids);
  return ids;
}

std::string BpeTokenizer::TokenBytes(int32_t id) const {
  impl_->CheckId(id);
  return impl_->bytes[static_cast<size_t>(id)];
}

const std::string& BpeTokenizer::Piece(int32_t id) const {
  impl_->CheckId(id);
  return impl_->pieces[static_cast<size_t>(id)];
}

std::string BpeTokenizer::Decode(const std::vector<int32_t>& ids) const {
  std::string out;
  for (const int32_t id : ids) {
    impl_->CheckId(id);
    out += impl_->bytes[static_cast<size_t>(id)];
  }
  return out;
}

std::string BpeTokenizer::ApplyChatTemplate(std::string_view user_message) const {
  if (!impl_->chatml) {
    throw Error(impl_->name + ": tokenizer.chat_template does not write ChatML (<|im_start|>), "
                              "the only chat format qkv renders");
  }
  return impl_->system_turn + "<|im_start|>user\n" + std::string(user_message) +
         "<|im_end|>\n<|im_start|>assistant\n";
}

int64_t BpeTokenizer::vocab_size() const { return static_cast<int64_t>(impl_->pieces.size()); }
int32_t BpeTokenizer::bos_id() const { return impl_->bos; }
int32_t BpeTokenizer::eos_id() const { return impl_->eos; }
bool BpeTokenizer::IsControl(int32_t id) const {
  return id >= 0 && static_cast<size_t>(id) < impl_->types.size() &&
         impl_->types[static_cast<size_t>(id)] == kTypeControl;
}
const std::string& BpeTokenizer::pre_tokenizer() const { return impl_->pre; }

std::string Utf8Stream::Push(std::string_view bytes) {
  pending_.append(bytes);
  std::string out;
  const auto* p = reinterpret_cast<const unsigned char*>(pending_.data());
  size_t i = 0;
  while (i < pending_.size()) {
    const int len = Utf8Char(p + i, pending_.size() - i);
    if (len == 0) break;  // an unfinished character: wait for more bytes
    if (len > 0) {
      out.append(pending_, i, static_cast<size_t>(len));
      i += static_cast<size_t>(len);
    } else {
      out += "\xEF\xBF\xBD";  // U+FFFD for the maximal invalid subpart
      i += static_cast<size_t>(-len);
    }
  }
  pending_.erase(0, i);
  return out;
}

std::string Utf8Stream::Finish() {
  std::string out = pending_.empty() ? "" : "\xEF\xBF\xBD";
  pending_.clear();
  return out;
}

}  // namespace qkv::models
