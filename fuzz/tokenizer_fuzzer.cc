// libFuzzer target: the WordPiece tokenizer (src/models/tokenizer_wordpiece.cc)
// on arbitrary bytes. The first byte picks the mode:
//   even: the rest is text, tokenised with a small BERT vocabulary (below)
//         into at most 2..65 tokens; every id must be in the vocabulary,
//         [CLS] first, [SEP] last, pieces naming the ids;
//   odd:  the rest is a tokenizer.json, parsed; when accepted, a fixed
//         mixed-script text is tokenised with it.
// Anything else must be one qkv::Error line; never a crash, a sanitizer
// report, a leak or a hang.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>

#include "qkv/error.h"
#include "qkv/models/tokenizer.h"

namespace {

constexpr std::string_view kVocab = R"({
  "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
                 "strip_accents": null, "lowercase": true},
  "pre_tokenizer": {"type": "BertPreTokenizer"},
  "post_processor": {"type": "TemplateProcessing",
    "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
               {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
    "pair": [], "special_tokens": {}},
  "added_tokens": [
    {"id": 0, "content": "[PAD]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 1, "content": "[UNK]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 2, "content": "[CLS]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 3, "content": "[SEP]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 4, "content": "[MASK]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
  "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
            "max_input_chars_per_word": 100,
            "vocab": {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4, "a": 5, "##a": 6,
                      "the": 7, "##s": 8, "un": 9, "##able": 10, "!": 11, ".": 12, "e": 13, "##e": 14,
                      "東": 15, "i": 16, "##i": 17, "x": 18, "##x": 19}}
})";

void CheckOneLine(const qkv::Error& e) {
  if (std::strchr(e.what(), '\n') != nullptr) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const std::string_view rest(reinterpret_cast<const char*>(data) + 1, size - 1);
  if (data[0] % 2 == 0) {
    static const qkv::models::WordPieceTokenizer tokenizer =
        qkv::models::WordPieceTokenizer::FromJson(kVocab, "fuzz-vocab.json");
    const size_t max_length = 2 + data[0] / 2 % 64;
    try {
      const qkv::models::Encoding e = tokenizer.Encode(rest, max_length);
      if (e.ids.size() < 2 || e.ids.size() > max_length || e.ids.size() != e.pieces.size() ||
          e.ids.front() != tokenizer.cls_id() || e.ids.back() != tokenizer.sep_id()) {
        std::abort();
      }
      for (size_t i = 0; i < e.ids.size(); ++i) {
        if (e.ids[i] < 0 || static_cast<size_t>(e.ids[i]) >= tokenizer.vocab_size() ||
            e.pieces[i] != tokenizer.piece(e.ids[i])) {
          std::abort();
        }
      }
    } catch (const qkv::Error& e) {
      CheckOneLine(e);
    }
  } else {
    try {
      const auto tokenizer = qkv::models::WordPieceTokenizer::FromJson(rest, "fuzz.json");
      (void)tokenizer.Encode("Héllo, wörld! 東京 [MASK] ﬁ  x##y", 32);
    } catch (const qkv::Error& e) {
      CheckOneLine(e);
    }
  }
  return 0;
}
