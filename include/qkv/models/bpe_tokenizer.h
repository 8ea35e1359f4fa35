// qkv/models/bpe_tokenizer.h: the byte-level BPE tokenizer of GPT-2-style
// decoders stored in a GGUF file (tokenizer.ggml.model = "gpt2"), token for
// token what llama.cpp and Hugging Face `tokenizers` produce for SmolLM2.
//
// Pipeline:
//   special tokens  control and user-defined tokens (token_type 3 and 4, e.g.
//                   "<|im_start|>") written in the text are matched first when
//                   `parse_special` is true; otherwise they are plain text
//   pre-tokeniser   tokenizer.ggml.pre: "smollm" splits every digit into its
//                   own piece, then the GPT-2 pattern
//                   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//                   (PCRE2 with Unicode properties: no hand-made tables;
//                   \s is White_Space, as in tokenizers' Oniguruma); each
//                   stretch between digits is matched on its own
//   byte level      each byte of a piece becomes GPT-2's printable stand-in
//                   (bytes_to_unicode: 'Ġ' for a space, ...)
//   BPE             the lowest-ranked merge (tokenizer.ggml.merges order) is
//                   applied until none applies; each symbol is then a token
// Decoding maps each token's piece back to bytes. Text streamed token by
// token goes through Utf8Stream so that a character split across tokens is
// printed once, whole.
#ifndef QKV_MODELS_BPE_TOKENIZER_H_
#define QKV_MODELS_BPE_TOKENIZER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace qkv {
class GgufFile;
}

namespace qkv::models {

class BpeTokenizer {
 public:
  // Reads tokenizer.ggml.{model, pre, tokens, token_type, merges,
  // bos_token_id, eos_token_id} (and tokenizer.chat_template when present).
  // A model other than "gpt2", a pre-tokeniser qkv does not implement, a
  // merge naming an unknown piece, an id out of range or duplicate pieces is
  // a qkv::Error naming the file and the key.
  static BpeTokenizer FromGguf(const GgufFile& file);

  BpeTokenizer(BpeTokenizer&&) noexcept;
  BpeTokenizer& operator=(BpeTokenizer&&) noexcept;
  ~BpeTokenizer();

  // Token ids of `text` (no BOS is added: SmolLM2's add_bos_token is false).
  // A byte whose stand-in is not a piece is dropped, as tokenizers does
  // (SmolLM2: 04 06 13 14 16 1D, and the lead bytes F1 F2 of U+40000..BFFFF).
  // Throws qkv::Error "invalid UTF-8 at byte N" on malformed input.
  std::vector<int32_t> Encode(std::string_view text, bool parse_special = true) const;
  // The bytes token `id` stands for (control tokens: their text).
  std::string TokenBytes(int32_t id) const;
  // The vocabulary string of `id` (byte-level encoded, as in the file).
  const std::string& Piece(int32_t id) const;
  // Concatenated TokenBytes (may end inside a character).
  std::string Decode(const std::vector<int32_t>& ids) const;

  // ChatML as SmolLM2's chat template renders one user message with
  // add_generation_prompt: the default system turn (the literal the
  // template writes, if any), the user turn, then "<|im_start|>assistant\n".
  // Throws qkv::Error when tokenizer.chat_template is not ChatML.
  std::string ApplyChatTemplate(std::string_view user_message) const;

  int64_t vocab_size() const;
  int32_t bos_id() const;
  int32_t eos_id() const;
  // True for control tokens (token_type 3): end-of-turn markers and the like.
  bool IsControl(int32_t id) const;
  const std::string& pre_tokenizer() const;

 private:
  struct Impl;
  explicit BpeTokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Turns a stream of byte chunks into whole UTF-8 characters: Push returns
// the complete characters so far and keeps an unfinished one (at most 3
// bytes) for the next call; a byte that can never start or continue a valid
// character comes out as U+FFFD. Finish flushes what is left (an incomplete
// character as U+FFFD).
class Utf8Stream {
 public:
  std::string Push(std::string_view bytes);
  std::string Finish();

 private:
  std::string pending_;
};

}  // namespace qkv::models

#endif  // QKV_MODELS_BPE_TOKENIZER_H_
