// src/models/tokenizer_wordpiece.cc: the BERT WordPiece tokenizer of a
// Hugging Face tokenizer.json, id for id what `tokenizers` (the Rust library
// behind transformers' fast BertTokenizer) produces.
//
// Design. Encode validates the UTF-8 once (the only place it throws), splits
// the raw text at added tokens (leftmost-longest, as tokenizers' Aho-Corasick
// does) and streams each span between them through three stages:
//   1. per code point: clean text, spaces around CJK ideographs, NFD
//      (utf8proc_decompose_char) into a code point buffer, then canonical
//      reordering of combining marks across the span, as NFD of a string does
//   2. per normalised code point: drop Mn (strip accents), lowercase
//   3. the pre-tokeniser: whitespace ends a word, punctuation is a word of its
//      own; each finished word goes to WordPiece (greedy longest match)
// ASCII never reaches utf8proc. The stages stop once max_length - 2 pieces are
// out, so a long text costs what is kept. The per-span buffers are reused, so
// a word costs no heap allocation unless a key outgrows std::string's SSO.
//
// Hugging Face behaviour mirrored here (checked on tokenizers 0.23):
// - Added tokens are matched before normalisation, case-sensitively:
//   "x[SEP]y" is x [SEP] y, but "[mask]" is "[", "mask", "]".
// - is_control is Cc, Cf or Co (not Cn or Cs), minus \t \n \r; clean text
//   drops it before mapping whitespace to ' ', so \v, \f and U+0085 vanish
//   and glue their neighbours ("\vq\x1cq" is q ##q), while U+00AD and U+200B
//   (Cf) vanish too.
// - Whitespace is Rust's char::is_whitespace (White_Space): Zs, Zl, Zp,
//   \t..\r and U+0085.
// - Punctuation is ASCII punctuation (so $ + < = > ^ ` | ~, Unicode symbols,
//   split) or a P* category; other symbols (€, ©, emoji) stay inside words.
// - strip_accents null follows lowercase. NFD comes before lowercasing, so
//   U+0130 İ becomes I + U+0307, loses the mark and gives "i"; without
//   strip_accents, Rust's char::to_lowercase turns İ into "i" + U+0307
//   (utf8proc_tolower gives one code point, so that case is written out).
// - max_input_chars_per_word counts code points of the normalised word; a
//   longer word, or one with an unmatched remainder, is a single [UNK].
// - CJK spacing skips U+2B820..2B91F, a typo in tokenizers' ranges.
// - Truncation cuts pieces, even inside a word; [CLS] and [SEP] stay.
// Known difference: tokenizers takes categories from unicode_categories 0.1.1
// (Unicode 9-era tables), utf8proc 2.8 from Unicode 15. Tried one by one in
// "xy?ab", 568 code points (117 ranges) assigned or recategorised since then
// (Arabic U+0890..08E2, U+2E43..2E5D, Egyptian format controls, new scripts'
// marks) encode differently; every other code point gives identical ids.
#include <utf8proc.h>

#include <algorithm>
#include <cstring>
#include <nlohmann/json.hpp>

#include "io/file_util.h"
#include "qkv/error.h"
#include "qkv/models/tokenizer.h"

namespace qkv::models {
namespace {

using Json = nlohmann::json;

bool IsAsciiPunct(int32_t c) {
  return (c >= 33 && c <= 47) || (c >= 58 && c <= 64) || (c >= 91 && c <= 96) ||
         (c >= 123 && c <= 126);
}

// Rust char::is_whitespace: the White_Space property, which is exactly
// Zs, Zl, Zp plus \t..\r and U+0085.
bool IsWhitespace(int32_t c) {
  if (c < 0x80) return c == ' ' || (c >= '\t' && c <= '\r');
  if (c == 0x85) return true;
  const utf8proc_category_t cat = utf8proc_category(c);
  return cat == UTF8PROC_CATEGORY_ZS || cat == UTF8PROC_CATEGORY_ZL || cat == UTF8PROC_CATEGORY_ZP;
}

// tokenizers' is_control: unicode_categories' is_other (Cc, Cf, Co), minus
// the \t \n \r that count as whitespace.
bool IsControl(int32_t c) {
  if (c == '\t' || c == '\n' || c == '\r') return false;
  const utf8proc_category_t cat = utf8proc_category(c);
  return cat == UTF8PROC_CATEGORY_CC || cat == UTF8PROC_CATEGORY_CF || cat == UTF8PROC_CATEGORY_CO;
}

// BERT's _is_chinese_char: the CJK Unified Ideographs blocks (not Hangul,
// Hiragana or Katakana, which are written with spaces). tokenizers starts the
// block after 0x2B81F at 0x2B920 where BERT has 0x2B820, so U+2B820..2B91F
// (CJK Extension E) get no spaces there; mirrored.
bool IsChineseChar(int32_t c) {
  return (c >= 0x4E00 && c <= 0x9FFF) || (c >= 0x3400 && c <= 0x4DBF) ||
         (c >= 0x20000 && c <= 0x2A6DF) || (c >= 0x2A700 && c <= 0x2B73F) ||
         (c >= 0x2B740 && c <= 0x2B81F) || (c >= 0x2B920 && c <= 0x2CEAF) ||
         (c >= 0xF900 && c <= 0xFAFF) || (c >= 0x2F800 && c <= 0x2FA1F);
}

// tokenizers' is_bert_punc: ASCII punctuation or a P* category.
bool IsBertPunct(int32_t c) {
  if (c < 0x80) return IsAsciiPunct(c);
  const utf8proc_category_t cat = utf8proc_category(c);
  return cat >= UTF8PROC_CATEGORY_PC && cat <= UTF8PROC_CATEGORY_PO;
}

int CombiningClass(int32_t c) {
  return c < 0x300 ? 0 : utf8proc_get_property(c)->combining_class;  // U+0300: first mark
}

bool IsContinuationByte(char b) { return (static_cast<unsigned char>(b) & 0xC0) == 0x80; }

// Returns the offset of the first malformed UTF-8 sequence (overlong forms,
// surrogates and code points past U+10FFFF included), or npos.
size_t FindInvalidUtf8(std::string_view text) {
  const auto* p = reinterpret_cast<const utf8proc_uint8_t*>(text.data());
  size_t i = 0;
  while (i < text.size()) {
    if (p[i] < 0x80) {
      ++i;
      continue;
    }
    utf8proc_int32_t c;
    const utf8proc_ssize_t len =
        utf8proc_iterate(p + i, static_cast<utf8proc_ssize_t>(text.size() - i), &c);
    if (len <= 0) return i;
    i += static_cast<size_t>(len);
  }
  return std::string_view::npos;
}

// Whitespace at the end / start of `s`, for added tokens with lstrip / rstrip.
size_t WhitespaceBytesAtEnd(std::string_view s) {
  size_t n = s.size();
  while (n > 0) {
    size_t start = n - 1;
    while (start > 0 && IsContinuationByte(s[start])) --start;
    utf8proc_int32_t c;
    utf8proc_iterate(reinterpret_cast<const utf8proc_uint8_t*>(s.data() + start),
                     static_cast<utf8proc_ssize_t>(n - start), &c);
    if (!IsWhitespace(c)) break;
    n = start;
  }
  return s.size() - n;
}

size_t WhitespaceBytesAtStart(std::string_view s) {
  size_t n = 0;
  while (n < s.size()) {
    utf8proc_int32_t c;
    const utf8proc_ssize_t len =
        utf8proc_iterate(reinterpret_cast<const utf8proc_uint8_t*>(s.data() + n),
                         static_cast<utf8proc_ssize_t>(s.size() - n), &c);
    if (!IsWhitespace(c)) break;
    n += static_cast<size_t>(len);
  }
  return n;
}

// A JSON value for a message: escaped by dump(), so it stays on one line.
std::string Quote(const Json& value) {
  std::string s = value.dump();
  return s.size() > 40 ? s.substr(0, 37) + "..." : s;
}

// Reads `key` of `object`: `fallback` when absent or null, else it must have
// the type of `fallback`.
template <typename T>
T Field(const Json& object, const char* key, T fallback, const std::string& where,
        const std::string& name) {
  const auto it = object.find(key);
  if (it == object.end() || it->is_null()) return fallback;
  const bool ok = std::is_same_v<T, bool>          ? it->is_boolean()
                  : std::is_same_v<T, std::string> ? it->is_string()
                                                   : it->is_number_unsigned();
  if (!ok) throw Error(name + ": " + where + "." + key + " is " + Quote(*it) + " (wrong type)");
  return it->get<T>();
}

// The object at `key` with its "type", or a null Json when absent or null.
const Json& Section(const Json& root, const char* key, const std::string& name) {
  static const Json kNull;
  const auto it = root.find(key);
  if (it == root.end() || it->is_null()) return kNull;
  if (!it->is_object() || !it->contains("type") || !(*it)["type"].is_string()) {
    throw Error(name + ": " + key + " is not an object with a \"type\" string");
  }
  return *it;
}

}  // namespace

WordPieceTokenizer WordPieceTokenizer::FromFile(const std::string& path) {
  // Real tokenizer.json files are under 20 MB (MiniLM's: 466 KB).
  constexpr uint64_t kMaxTokenizerBytes = uint64_t{256} << 20;
  return FromJson(internal::ReadSmallFile(path, "tokenizer.json", kMaxTokenizerBytes), path);
}

WordPieceTokenizer WordPieceTokenizer::FromJson(std::string_view json_text,
                                                const std::string& name) {
  const auto fail = [&name](const std::string& message) { return Error(name + ": " + message); };
  // nlohmann 3.11 parses and destroys iteratively, so deep nesting cannot
  // overflow the stack, and it rejects strings that are not UTF-8.
  const Json root = Json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded()) throw fail("not valid JSON");
  if (!root.is_object()) throw fail("the top level is not a JSON object");

  const Json& model = Section(root, "model", name);
  if (model.is_null() || model["type"] != "WordPiece") {
    throw fail("model.type is " + (model.is_null() ? "missing" : Quote(model["type"])) +
               " (expected \"WordPiece\")");
  }
  WordPieceTokenizer tok;
  tok.continuing_prefix_ =
      Field<std::string>(model, "continuing_subword_prefix", "##", "model", name);
  tok.max_input_chars_per_word_ =
      Field<size_t>(model, "max_input_chars_per_word", 100, "model", name);

  const Json& normalizer = Section(root, "normalizer", name);
  if (normalizer.is_null()) {
    tok.clean_text_ = tok.handle_chinese_chars_ = tok.strip_accents_ = tok.lowercase_ = false;
  } else if (normalizer["type"] != "BertNormalizer") {
    throw fail("unsupported normalizer " + Quote(normalizer["type"]) +
               " (expected \"BertNormalizer\")");
  } else {
    tok.clean_text_ = Field(normalizer, "clean_text", true, "normalizer", name);
    tok.handle_chinese_chars_ = Field(normalizer, "handle_chinese_chars", true, "normalizer", name);
    tok.lowercase_ = Field(normalizer, "lowercase", true, "normalizer", name);
    // null means "follow lowercase" (BertNormalizer::new in tokenizers).
    tok.strip_accents_ = Field(normalizer, "strip_accents", tok.lowercase_, "normalizer", name);
  }
  const Json& pre_tokenizer = Section(root, "pre_tokenizer", name);
  if (pre_tokenizer.is_null() || pre_tokenizer["type"] != "BertPreTokenizer") {
    throw fail("unsupported pre_tokenizer " +
               (pre_tokenizer.is_null() ? "null" : Quote(pre_tokenizer["type"])) +
               " (expected \"BertPreTokenizer\")");
  }

  // Vocabulary and added tokens together must number ids 0..N-1 without holes,
  // so an id is range-checked before it sizes anything.
  const auto vocab_it = model.find("vocab");
  if (vocab_it == model.end() || !vocab_it->is_object() || vocab_it->empty()) {
    throw fail("model.vocab is not a non-empty object of piece -> id");
  }
  const Json added = root.value("added_tokens", Json::array());
  if (!added.is_array()) throw fail("added_tokens is not an array");
  const size_t max_ids = vocab_it->size() + added.size();
  const auto check_id = [&](const Json& id, const std::string& what) {
    if (!id.is_number_unsigned() || id.get<uint64_t>() >= max_ids) {
      throw fail(what + " has id " + Quote(id) + " (expected an integer in [0, " +
                 std::to_string(max_ids) + "))");
    }
    return static_cast<size_t>(id.get<uint64_t>());
  };
  std::vector<const std::string*> by_id(max_ids, nullptr);
  tok.vocab_.reserve(vocab_it->size());
  for (const auto& [piece, id_json] : vocab_it->items()) {
    const size_t id = check_id(id_json, "vocab piece " + Quote(Json(piece)));
    if (by_id[id] != nullptr) {
      throw fail("vocab id " + std::to_string(id) + " is used twice (" + Quote(Json(piece)) +
                 " and " + Quote(Json(*by_id[id])) + ")");
    }
    by_id[id] = &tok.vocab_.emplace(piece, static_cast<int32_t>(id)).first->first;
    tok.max_piece_bytes_ = std::max(tok.max_piece_bytes_, piece.size());
  }
  tok.added_.reserve(added.size());
  for (const Json& entry : added) {
    if (!entry.is_object() || !entry.contains("content") || !entry["content"].is_string() ||
        entry["content"].get_ref<const std::string&>().empty()) {
      throw fail("added_tokens entry " + Quote(entry) + " has no content string");
    }
    AddedToken token;
    token.content = entry["content"].get<std::string>();
    const std::string what = "added token " + Quote(entry["content"]);
    const size_t id = check_id(entry.value("id", Json()), what);
    token.id = static_cast<int32_t>(id);
    token.lstrip = Field(entry, "lstrip", false, what, name);
    token.rstrip = Field(entry, "rstrip", false, what, name);
    if (Field(entry, "single_word", false, what, name) ||
        Field(entry, "normalized", false, what, name)) {
      throw fail(what + ": single_word and normalized added tokens are not supported");
    }
    if (by_id[id] != nullptr && *by_id[id] != token.content) {
      throw fail(what + " has id " + std::to_string(id) + ", which the vocabulary gives to " +
                 Quote(Json(*by_id[id])));
    }
    tok.added_.push_back(std::move(token));  // reserved: pointers into added_ stay valid
    if (by_id[id] == nullptr) by_id[id] = &tok.added_.back().content;  // past the vocabulary
  }
  size_t num_ids = 0;
  while (num_ids < max_ids && by_id[num_ids] != nullptr) ++num_ids;
  for (size_t id = num_ids; id < max_ids; ++id) {
    if (by_id[id] != nullptr) {
      throw fail("ids leave a hole: no piece has id " + std::to_string(num_ids) + " but " +
                 Quote(Json(*by_id[id])) + " has id " + std::to_string(id));
    }
  }
  tok.pieces_.reserve(num_ids);
  for (size_t id = 0; id < num_ids; ++id) tok.pieces_.push_back(*by_id[id]);

  // Special ids: [UNK] from the model, [CLS]/[SEP] from the post-processor's
  // own names (BertProcessing or the usual single template), [PAD] from padding.
  const auto lookup = [&](const std::string& piece, const char* role) {
    for (const AddedToken& token : tok.added_) {
      if (token.content == piece) return token.id;
    }
    const auto it = tok.vocab_.find(piece);
    if (it == tok.vocab_.end()) {
      throw fail("the " + std::string(role) + " token " + Quote(Json(piece)) +
                 " is not in the vocabulary");
    }
    return it->second;
  };
  tok.unk_id_ = lookup(Field<std::string>(model, "unk_token", "[UNK]", "model", name), "unknown");
  std::string cls = "[CLS]", sep = "[SEP]";
  const Json& post = Section(root, "post_processor", name);
  if (!post.is_null() && post["type"] == "BertProcessing") {
    const Json c = post.value("cls", Json()), s = post.value("sep", Json());
    if (!c.is_array() || c.empty() || !c[0].is_string() || !s.is_array() || s.empty() ||
        !s[0].is_string()) {
      throw fail("post_processor cls/sep are not [piece, id] pairs");
    }
    cls = c[0].get<std::string>();
    sep = s[0].get<std::string>();
  } else if (!post.is_null() && post["type"] == "TemplateProcessing") {
    const Json single = post.value("single", Json());
    const auto special = [&](size_t i) {
      if (!single.is_array() || single.size() != 3 || !single[i].is_object()) return Json();
      const auto it = single[i].find("SpecialToken");
      return it == single[i].end() || !it->is_object() ? Json() : it->value("id", Json());
    };
    if (!special(0).is_string() || !special(2).is_string() || !single[1].contains("Sequence")) {
      throw fail("post_processor.single is not [special token, sequence, special token]");
    }
    cls = special(0).get<std::string>();
    sep = special(2).get<std::string>();
  } else if (!post.is_null()) {
    throw fail("unsupported post_processor " + Quote(post["type"]) +
               " (expected \"TemplateProcessing\" or \"BertProcessing\")");
  }
  tok.cls_id_ = lookup(cls, "[CLS]");
  tok.sep_id_ = lookup(sep, "[SEP]");
  const Json padding = root.value("padding", Json());
  tok.pad_id_ = lookup(padding.is_object()
                           ? Field<std::string>(padding, "pad_token", "[PAD]", "padding", name)
                           : std::string("[PAD]"),
                       "[PAD]");
  return tok;
}

void WordPieceTokenizer::AppendWord(std::string_view word, size_t num_chars, std::string& key,
                                    std::vector<int32_t>& ids) const {
  if (num_chars > max_input_chars_per_word_) {
    ids.push_back(unk_id_);
    return;
  }
  const size_t first = ids.size();
  size_t start = 0;
  while (start < word.size()) {
    // Longest match first; no key is longer than max_piece_bytes_, so longer
    // candidates are skipped without a look-up (a 60-letter word tries ~20
    // instead of 60 prefixes). end always sits on a code point boundary.
    size_t end = std::min(word.size(), start + max_piece_bytes_);
    while (end > start && end < word.size() && IsContinuationByte(word[end])) --end;
    int32_t id = -1;
    while (end > start) {
      key.assign(start > 0 ? continuing_prefix_ : std::string_view());
      key.append(word.data() + start, end - start);
      const auto it = vocab_.find(key);
      if (it != vocab_.end()) {
        id = it->second;
        break;
      }
      do --end;
      while (end > start && IsContinuationByte(word[end]));
    }
    if (id < 0) {  // an unmatched remainder: the whole word is [UNK]
      ids.resize(first);
      ids.push_back(unk_id_);
      return;
    }
    ids.push_back(id);
    start = end;
  }
}

void WordPieceTokenizer::EncodeSpan(std::string_view span, size_t limit,
                                    std::vector<int32_t>& ids) const {
  // Stage 1: clean text, CJK spacing and NFD into cps [normalised length].
  std::vector<int32_t> cps;
  cps.reserve(span.size() + 8);
  bool reorder = false;
  const auto* p = reinterpret_cast<const utf8proc_uint8_t*>(span.data());
  for (size_t i = 0; i < span.size();) {
    int32_t c = p[i];
    if (c < 0x80) {
      ++i;
      if (clean_text_ && (c < 0x20 || c == 0x7F)) {  // Cc: dropped unless \t \n \r
        if (c == '\t' || c == '\n' || c == '\r') cps.push_back(' ');
      } else {
        cps.push_back(c);
      }
      continue;
    }
    i += static_cast<size_t>(
        utf8proc_iterate(p + i, static_cast<utf8proc_ssize_t>(span.size() - i), &c));
    if (clean_text_) {
      if (c == 0xFFFD || IsControl(c)) continue;
      if (IsWhitespace(c)) {
        cps.push_back(' ');
        continue;
      }
    }
    const bool cjk = handle_chinese_chars_ && IsChineseChar(c);
    if (cjk) cps.push_back(' ');
    if (strip_accents_) {
      utf8proc_int32_t nfd[16];  // canonical decompositions have at most 4 code points
      const utf8proc_ssize_t n = utf8proc_decompose_char(c, nfd, 16, UTF8PROC_DECOMPOSE, nullptr);
      if (n > 0 && n <= 16) {
        cps.insert(cps.end(), nfd, nfd + n);
      } else {
        cps.push_back(c);
      }
      reorder = true;
    } else {
      cps.push_back(c);
    }
    if (cjk) cps.push_back(' ');
  }
  // Canonical ordering: a run of marks (ccc > 0) is stably sorted by ccc,
  // which matters when a later stage keeps some of them (Mc, Me, ...).
  for (size_t i = 1; reorder && i < cps.size(); ++i) {
    const int ccc = CombiningClass(cps[i]);
    for (size_t j = i; ccc != 0 && j > 0 && CombiningClass(cps[j - 1]) > ccc; --j) {
      std::swap(cps[j - 1], cps[j]);
    }
  }

  // Stages 2 and 3: strip Mn, lowercase, split into words, WordPiece.
  std::string word, key;
  size_t word_chars = 0;
  const auto flush = [&] {
    if (!word.empty()) AppendWord(word, word_chars, key, ids);
    word.clear();
    word_chars = 0;
    return ids.size() >= limit;
  };
  const auto emit = [&](int32_t c) {
    if (IsWhitespace(c)) return flush();
    const bool punct = IsBertPunct(c);
    if (punct && flush()) return true;
    if (c < 0x80) {
      word.push_back(static_cast<char>(c));
    } else {
      utf8proc_uint8_t utf8[4];
      word.append(reinterpret_cast<const char*>(utf8),
                  static_cast<size_t>(utf8proc_encode_char(c, utf8)));
    }
    ++word_chars;
    return punct && flush();
  };
  for (int32_t c : cps) {
    if (c >= 0x80 && strip_accents_ && utf8proc_category(c) == UTF8PROC_CATEGORY_MN) continue;
    if (lowercase_) {
      if (c < 0x80) {
        if (c >= 'A' && c <= 'Z') c += 'a' - 'A';
      } else if (c == 0x130) {  // İ: Rust's to_lowercase gives "i" + U+0307
        if (emit('i')) return;
        c = 0x307;
      } else {
        c = utf8proc_tolower(c);
      }
    }
    if (emit(c)) return;
  }
  flush();
}

Encoding WordPieceTokenizer::Encode(std::string_view text, size_t max_length) const {
  if (max_length < 2) {
    throw Error("max_length is " + std::to_string(max_length) +
                " (expected >= 2 for [CLS] and [SEP])");
  }
  const size_t bad = FindInvalidUtf8(text);
  if (bad != std::string_view::npos) throw Error("invalid UTF-8 at byte " + std::to_string(bad));

  std::vector<int32_t> ids;
  ids.reserve(std::min(max_length, text.size() / 3 + 8));
  ids.push_back(cls_id_);
  const size_t limit = max_length - 1;  // room for [SEP]
  // Added tokens, leftmost-longest: next[k] caches where token k occurs next.
  std::vector<size_t> next;
  next.reserve(added_.size());
  for (const AddedToken& token : added_) next.push_back(text.find(token.content));
  size_t pos = 0;  // start of the text not yet encoded
  while (pos < text.size() && ids.size() < limit) {
    size_t best = std::string_view::npos, best_start = text.size();
    for (size_t k = 0; k < added_.size(); ++k) {
      if (next[k] != std::string_view::npos && next[k] < pos)
        next[k] = text.find(added_[k].content, pos);
      if (next[k] < best_start || (next[k] == best_start && best != std::string_view::npos &&
                                   added_[k].content.size() > added_[best].content.size())) {
        best = k;
        best_start = next[k];
      }
    }
    size_t span_end = best_start, match_end = text.size();
    if (best != std::string_view::npos) {
      match_end = best_start + added_[best].content.size();
      if (added_[best].lstrip) span_end -= WhitespaceBytesAtEnd(text.substr(pos, best_start - pos));
      if (added_[best].rstrip) match_end += WhitespaceBytesAtStart(text.substr(match_end));
    }
    EncodeSpan(text.substr(pos, span_end - pos), limit, ids);
    if (best != std::string_view::npos && ids.size() < limit) ids.push_back(added_[best].id);
    pos = match_end;
  }
  ids.resize(std::min(ids.size(), limit));
  ids.push_back(sep_id_);

  Encoding encoding;
  encoding.pieces.reserve(ids.size());
  for (int32_t id : ids) encoding.pieces.push_back(pieces_[static_cast<size_t>(id)]);
  encoding.ids = std::move(ids);
  return encoding;
}

}  // namespace qkv::models
