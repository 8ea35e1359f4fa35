// qkv/models/tokenizer.h: the BERT WordPiece tokenizer of a Hugging Face
// tokenizer.json (all-MiniLM-L6-v2 and other uncased BERT checkpoints),
// token for token what Hugging Face `tokenizers` produces.
//
// Pipeline (the names are tokenizer.json's):
//   added tokens   special tokens written in the text ("[MASK]", "[SEP]", ...)
//                  are matched first, before normalisation and case-sensitively,
//                  as `tokenizers` does (only "normalized": false tokens)
//   BertNormalizer clean text (drop U+0000, U+FFFD and control characters;
//                  whitespace becomes ' '), spaces around CJK ideographs,
//                  strip accents (NFD, drop nonspacing marks Mn; by default
//                  when lowercasing), lowercase
//   BertPreTokenizer split on whitespace, and every punctuation character
//                  (ASCII punctuation and Unicode class P*) is a word of its own
//   WordPiece      greedy longest match from the left, continuations prefixed
//                  "##"; a word with no match, or longer than
//                  max_input_chars_per_word characters, becomes [UNK]
//   template       [CLS] pieces [SEP]
// Unicode properties (categories, NFD, case) come from utf8proc.
#ifndef QKV_MODELS_TOKENIZER_H_
#define QKV_MODELS_TOKENIZER_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace qkv::models {

struct Encoding {
  std::vector<int32_t> ids;         // token ids, [CLS] first and [SEP] last
  std::vector<std::string> pieces;  // the vocabulary string of each id
};

class WordPieceTokenizer {
 public:
  // Reads a tokenizer.json whose model is WordPiece, normalizer BertNormalizer
  // and pre_tokenizer BertPreTokenizer; anything else, a vocabulary with
  // duplicate or out-of-range ids, or missing [CLS]/[SEP]/[UNK]/[PAD] is a
  // qkv::Error naming `path`.
  static WordPieceTokenizer FromFile(const std::string& path);
  // The same from the file's text; `name` is used in messages.
  static WordPieceTokenizer FromJson(std::string_view json, const std::string& name);

  // Tokenises one text into at most `max_length` tokens (>= 2), [CLS] and
  // [SEP] included: longer texts lose their last pieces, as Hugging Face's
  // truncation does. Throws qkv::Error "invalid UTF-8 at byte N" on
  // malformed input.
  Encoding Encode(std::string_view text, size_t max_length) const;

  size_t vocab_size() const { return pieces_.size(); }
  const std::string& piece(int32_t id) const { return pieces_[static_cast<size_t>(id)]; }
  int32_t pad_id() const { return pad_id_; }
  int32_t cls_id() const { return cls_id_; }
  int32_t sep_id() const { return sep_id_; }
  int32_t unk_id() const { return unk_id_; }

 private:
  // An entry of tokenizer.json's added_tokens, matched in the raw text.
  struct AddedToken {
    std::string content;
    int32_t id = 0;
    bool lstrip = false;  // the match also takes the whitespace on its left
    bool rstrip = false;  // ... and on its right
  };

  WordPieceTokenizer() = default;
  // Normalises, pre-tokenises and WordPiece-encodes one span of text that
  // holds no added token, appending ids until `ids` holds `limit`.
  void EncodeSpan(std::string_view span, size_t limit, std::vector<int32_t>& ids) const;
  // Appends the WordPiece ids of one pre-tokenised word of `num_chars` code
  // points; `key` is scratch space for the vocabulary look-ups.
  void AppendWord(std::string_view word, size_t num_chars, std::string& key,
                  std::vector<int32_t>& ids) const;

  std::unordered_map<std::string, int32_t> vocab_;
  std::vector<std::string> pieces_;  // id -> piece
  std::vector<AddedToken> added_;    // special tokens matched in raw text
  std::string continuing_prefix_ = "##";
  size_t max_input_chars_per_word_ = 100;
  size_t max_piece_bytes_ = 0;  // longest vocabulary key: no longer match exists
  bool lowercase_ = true;
  bool strip_accents_ = true;
  bool handle_chinese_chars_ = true;
  bool clean_text_ = true;
  int32_t pad_id_ = 0, cls_id_ = 0, sep_id_ = 0, unk_id_ = 0;
};

}  // namespace qkv::models

#endif  // QKV_MODELS_TOKENIZER_H_
