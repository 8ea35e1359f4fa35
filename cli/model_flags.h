// Loading the models named by --model, shared by the commands that run them
// (embed, tokenize; generate, logits, perplexity; explain scaling --model).
// Every error is one line naming --model.
#ifndef QKV_CLI_MODEL_FLAGS_H_
#define QKV_CLI_MODEL_FLAGS_H_

#include <string>

#include "qkv/models/bert.h"
#include "qkv/models/bpe_tokenizer.h"
#include "qkv/models/llama.h"

namespace qkv::cli {

// A BERT model folder (all-MiniLM-L6-v2; cli/embed.cc).
models::BertEncoder LoadBertModel(const std::string& dir);

// A Llama-architecture GGUF file and its tokenizer (cli/generate.cc).
struct LoadedLlama {
  models::LlamaModel model;
  models::BpeTokenizer tokenizer;
};
LoadedLlama LoadLlamaModel(const std::string& path);

}  // namespace qkv::cli

#endif  // QKV_CLI_MODEL_FLAGS_H_
