// Tests for the byte-level BPE tokenizer (qkv/models/bpe_tokenizer.h).
//
// Oracle: tests/testdata/smollm2/tokens.json, written by
// tests/models/gen_smollm2_tokens.py with Hugging Face tokenizers on the
// SmolLM2-135M-Instruct GGUF's vocabulary and SmolLM2's own pre-tokeniser;
// every case must give identical ids, and the chat template's rendering must
// match transformers' apply_chat_template. Hand-written cases cover UTF-8
// handling, Utf8Stream, threads, and small GGUF files built here for the
// BPE rules and hostile metadata.
#include "qkv/models/bpe_tokenizer.h"

#include <gtest/gtest.h>
#include <utf8proc.h>

#include <chrono>
#include <cstring>
#include <functional>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "cli_test_util.h"
#include "file_test_util.h"
#include "models/model_test_util.h"
#include "qkv/error.h"
#include "qkv/gguf.h"

namespace qkv::models {
namespace {

using Json = nlohmann::json;
using test::HaveSmolLm2;
using test::kSmolLm2;
using test::kSmolLm2Fixtures;

// The SmolLM2 tokenizer, loaded once; nullptr (and a failure) without the model.
const BpeTokenizer* SmolLm2() {
  static const BpeTokenizer* tokenizer = []() -> const BpeTokenizer* {
    if (!std::filesystem::exists(kSmolLm2)) return nullptr;
    const GgufFile file = GgufFile::Open(kSmolLm2);
    return new BpeTokenizer(BpeTokenizer::FromGguf(file));
  }();
  if (tokenizer == nullptr) HaveSmolLm2();
  return tokenizer;
}

const Json& Fixture() {
  static const Json fixture = test::ReadJsonFile(kSmolLm2Fixtures + "/tokens.json");
  return fixture;
}

// Returns the message of the qkv::Error that `fn` throws ("" if none).
std::string ErrorOf(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

bool IsValidUtf8(std::string_view s) {
  Utf8Stream stream;
  return stream.Push(s) == s && stream.Finish().empty();
}

// `s` less the bytes SmolLM2's vocabulary has no piece for, which Encode
// drops as tokenizers does: the controls 04 06 13 14 16 1D and the lead
// bytes F1 F2 of U+40000..U+BFFFF (C0 C1 F5..FF never occur in UTF-8).
std::string WithoutUnencodableBytes(std::string s) {
  std::erase_if(s, [](char c) {
    const auto b = static_cast<unsigned char>(c);
    return b == 0x04 || b == 0x06 || b == 0x13 || b == 0x14 || b == 0x16 || b == 0x1D ||
           b == 0xF1 || b == 0xF2;
  });
  return s;
}

TEST(BpeTokenizerTest, MatchesHuggingFaceFixture) {
  const BpeTokenizer* tok = SmolLm2();
  ASSERT_NE(tok, nullptr);
  const Json& cases = Fixture().at("cases");
  ASSERT_GE(cases.size(), 200u);
  size_t mismatches = 0;
  for (const Json& c : cases) {
    const std::string text = c.at("text").get<std::string>();
    const auto want = c.at("ids").get<std::vector<int32_t>>();
    const std::vector<int32_t> got = tok->Encode(text);
    if (got == want) continue;
    if (mismatches++ > 0) continue;  // report the first one in full
    std::ostringstream pieces;
    for (const int32_t id : got) pieces << id << ":" << tok->Piece(id) << " ";
    pieces << "\n  want: ";
    for (const int32_t id : want) pieces << id << ":" << tok->Piece(id) << " ";
    ADD_FAILURE() << "text " << Json(text).dump() << "\n  got:  " << pieces.str();
  }
  EXPECT_EQ(mismatches, 0u) << "of " << cases.size() << " fixture cases";
}

TEST(BpeTokenizerTest, DecodeInvertsEncode) {
  const BpeTokenizer* tok = SmolLm2();
  ASSERT_NE(tok, nullptr);
  const Json& fixture = Fixture();
  size_t lossy = 0;
  for (const Json& c : fixture.at("cases")) {
    const std::string text = c.at("text").get<std::string>();
    const std::string want = WithoutUnencodableBytes(text);
    lossy += want != text;
    EXPECT_EQ(tok->Decode(tok->Encode(text)), want) << Json(text).dump();
    EXPECT_EQ(tok->Decode(tok->Encode(text, /*parse_special=*/false)), want) << Json(text).dump();
  }
  EXPECT_EQ(lossy, fixture.at("no_round_trip").size());
}

TEST(BpeTokenizerTest, ChatTemplateMatchesTransformers) {
  const BpeTokenizer* tok = SmolLm2();
  ASSERT_NE(tok, nullptr);
  const Json& chat = Fixture().at("chat");
  ASSERT_EQ(chat.size(), 3u);
  for (const Json& c : chat) {
    const std::string text = tok->ApplyChatTemplate(c.at("message").get<std::string>());
    EXPECT_EQ(text, c.at("text").get<std::string>());
    EXPECT_EQ(tok->Encode(text), c.at("ids").get<std::vector<int32_t>>());
  }
}

TEST(BpeTokenizerTest, Metadata) {
  const BpeTokenizer* tok = SmolLm2();
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->vocab_size(), 49152);
  EXPECT_EQ(tok->bos_id(), 1);
  EXPECT_EQ(tok->eos_id(), 2);
  EXPECT_EQ(tok->pre_tokenizer(), "smollm");
  EXPECT_EQ(tok->Piece(2), "<|im_end|>");
  EXPECT_TRUE(tok->IsControl(2));
  EXPECT_FALSE(tok->IsControl(17));
  EXPECT_FALSE(tok->IsControl(-1));
  EXPECT_EQ(tok->TokenBytes(1), "<|im_start|>");
  EXPECT_EQ(tok->Encode(" "), std::vector<int32_t>{216});
  EXPECT_EQ(tok->Piece(216), "\xC4\xA0");  // 'Ġ' stands for the space byte
  EXPECT_EQ(tok->TokenBytes(216), " ");
  EXPECT_NE(ErrorOf([&] { tok->Piece(49152); }).find("out of range"), std::string::npos);
  EXPECT_NE(ErrorOf([&] { tok->Decode({-1}); }).find("out of range"), std::string::npos);
}

TEST(BpeTokenizerTest, ParseSpecialFalseTreatsMarkersAsText) {
  const BpeTokenizer* tok = SmolLm2();
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->Encode("<|im_start|>"), std::vector<int32_t>{1});
  const std::vector<int32_t> plain = tok->Encode("<|im_start|>user", /*parse_special=*/false);
  EXPECT_GT(plain.size(), 2u);
  for (const int32_t id : plain) EXPECT_FALSE(tok->IsControl(id)) << id;
  EXPECT_EQ(tok->Decode(plain), "<|im_start|>user");
  // Longest match first: nothing shorter than the whole marker is taken.
  EXPECT_EQ(tok->Encode("<|im_start|><|im_end|>x").size(), 3u);
}

TEST(BpeTokenizerTest, InvalidUtf8IsAnError) {
  const BpeTokenizer* tok = SmolLm2();
  ASSERT_NE(tok, nullptr);
  const std::vector<std::pair<std::string, size_t>> bad = {
      {"\xFF", 0},        {"ab\xC3", 2},           {"abc\x80", 3},
      {"\xC0\xAF", 0},    {"x\xED\xA0\x80", 1},    {"xy\xF4\x90\x80\x80", 2},
      {"\xE2\x82", 0},    {"ok \xF0\x9F\x98", 3},  {"caf\xC3\xA9\xA9", 5}};
  for (const auto& c : bad) {  // no structured binding: clang 14 lambdas cannot capture one
    const std::string& text = c.first;
    EXPECT_EQ(ErrorOf([&] { tok->Encode(text); }),
              "invalid UTF-8 at byte " + std::to_string(c.second))
        << Json::binary({text.begin(), text.end()}).dump();
  }
  EXPECT_EQ(ErrorOf([&] { tok->Encode(std::string("nul \0 ok", 8)); }), "");
}

TEST(BpeTokenizerTest, Utf8StreamJoinsCharactersSplitAcrossTokens) {
  const BpeTokenizer* tok = SmolLm2();
  ASSERT_NE(tok, nullptr);
  const std::string text = "Emoji 👨‍👩‍👧‍👦 🇫🇷 😶‍🌫️, CJK 你好世界, accents e\xCC\x81, ﷺ ꙮ 𝕳";
  const std::vector<int32_t> ids = tok->Encode(text);
  Utf8Stream stream;
  std::string joined;
  size_t partial_tokens = 0;
  for (const int32_t id : ids) {
    const std::string bytes = tok->TokenBytes(id);
    partial_tokens += !IsValidUtf8(bytes);
    const std::string out = stream.Push(bytes);
    EXPECT_TRUE(IsValidUtf8(out)) << id;
    joined += out;
  }
  joined += stream.Finish();
  EXPECT_GT(partial_tokens, 0u) << "no token ends inside a character: the test tests nothing";
  EXPECT_EQ(joined, text);
}

TEST(BpeTokenizerTest, Utf8StreamReplacesInvalidBytes) {
  Utf8Stream s;
  EXPECT_EQ(s.Push("a\xF0\x9F"), "a");
  EXPECT_EQ(s.Push("\x98"), "");
  EXPECT_EQ(s.Push("\x80z"), "\xF0\x9F\x98\x80z");
  EXPECT_EQ(s.Push("\xFF"), "\xEF\xBF\xBD");
  EXPECT_EQ(s.Push("\xE2\x82x"), "\xEF\xBF\xBDx");  // one U+FFFD for the unfinished E2 82
  EXPECT_EQ(s.Push("\xED\xA0"), "\xEF\xBF\xBD\xEF\xBF\xBD");  // a surrogate never completes
  EXPECT_EQ(s.Push("\xC3"), "");
  EXPECT_EQ(s.Finish(), "\xEF\xBF\xBD");
  EXPECT_EQ(s.Finish(), "");
  // Byte by byte gives what one push gives.
  const std::string text = "Zo\xC3\xAB 😀 \xE4\xB8\xAD";
  Utf8Stream bytewise;
  std::string out;
  for (const char c : text) out += bytewise.Push(std::string_view(&c, 1));
  EXPECT_EQ(out + bytewise.Finish(), text);
}

// Valid UTF-8 from code points of every length (surrogates excluded): Encode
// never throws, and Decode gives the text back.
TEST(BpeTokenizerTest, RandomValidUtf8RoundTrips) {
  const BpeTokenizer* tok = SmolLm2();
  ASSERT_NE(tok, nullptr);
  std::mt19937 rng(15);
  const auto append = [](uint32_t cp, std::string& out) {
    utf8proc_uint8_t buf[4];
    const utf8proc_ssize_t n = utf8proc_encode_char(static_cast<utf8proc_int32_t>(cp), buf);
    out.append(reinterpret_cast<const char*>(buf), static_cast<size_t>(n));
  };

  const uint32_t limits[] = {0x80, 0x800, 0x3000, 0x10000, 0x110000};
  for (int round = 0; round < 300; ++round) {
    std::string text;
    const int length = static_cast<int>(rng() % 80);
    for (int i = 0; i < length; ++i) {
      uint32_t cp = rng() % limits[rng() % 5];
      if (cp >= 0xD800 && cp < 0xE000) cp = ' ';
      if (rng() % 4 == 0) cp = " \t\n0<|"[rng() % 6];
      append(cp, text);
    }
    if (rng() % 8 == 0) text += "<|im_end|>";
    std::vector<int32_t> ids;
    ASSERT_NO_THROW(ids = tok->Encode(text)) << Json(text).dump();
    ASSERT_EQ(tok->Decode(ids), WithoutUnencodableBytes(text)) << Json(text).dump();
  }
  // Arbitrary bytes: a one-line error or a round trip, never a crash.
  for (int round = 0; round < 300; ++round) {
    std::string bytes(rng() % 24, '\0');
    for (char& b : bytes) b = static_cast<char>(rng());
    try {
      EXPECT_EQ(tok->Decode(tok->Encode(bytes)), WithoutUnencodableBytes(bytes));
    } catch (const Error& e) {
      EXPECT_TRUE(std::string(e.what()).starts_with("invalid UTF-8 at byte ")) << e.what();
    }
  }
}

TEST(BpeTokenizerTest, LongWordsAreNotQuadratic) {
  const BpeTokenizer* tok = SmolLm2();
  ASSERT_NE(tok, nullptr);
  std::string word;
  std::mt19937 rng(7);
  for (int i = 0; i < 200000; ++i) word += static_cast<char>('a' + rng() % 26);
  const std::string spaces(100000, ' ');
  const auto start = std::chrono::steady_clock::now();
  const std::vector<int32_t> ids = tok->Encode(word);
  const std::vector<int32_t> space_ids = tok->Encode(spaces + "x");
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_EQ(tok->Decode(ids), word);
  EXPECT_EQ(tok->Decode(space_ids), spaces + "x");
  // ~0.1 s here; an O(n^2) merge loop takes minutes on 200 KB.
  EXPECT_LT(seconds, 20.0);
}

TEST(BpeTokenizerTest, EncodeIsThreadSafe) {
  const BpeTokenizer* tok = SmolLm2();
  ASSERT_NE(tok, nullptr);
  const Json& cases = Fixture().at("cases");
  std::vector<std::vector<int32_t>> want;
  for (const Json& c : cases) want.push_back(tok->Encode(c.at("text").get<std::string>()));
  std::vector<int> mismatches(4, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int round = 0; round < 3; ++round) {
        for (size_t i = 0; i < cases.size(); ++i) {
          if (tok->Encode(cases[i].at("text").get<std::string>()) != want[i]) ++mismatches[t];
        }
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(mismatches, std::vector<int>(4, 0));
}

// ---------------------------------------------------------------------------
// Small GGUF files built in memory: the BPE rules on a toy vocabulary, and
// hostile metadata.

class GgufWriter {
 public:
  void String(const std::string& key, const std::string& value) {
    Key(key, 8);
    Str(value);
  }
  void Uint32(const std::string& key, uint32_t value) {
    Key(key, 4);
    Put(value);
  }
  void Strings(const std::string& key, const std::vector<std::string>& values) {
    Key(key, 9);
    Put(uint32_t{8});
    Put(uint64_t{values.size()});
    for (const std::string& v : values) Str(v);
  }
  void Int32s(const std::string& key, const std::vector<int32_t>& values) {
    Key(key, 9);
    Put(uint32_t{5});
    Put(uint64_t{values.size()});
    for (const int32_t v : values) Put(v);
  }
  std::vector<unsigned char> Bytes() const {
    std::vector<unsigned char> out = {'G', 'G', 'U', 'F', 3, 0, 0, 0};
    for (int i = 0; i < 8; ++i) out.push_back(0);  // no tensors
    for (int i = 0; i < 8; ++i) out.push_back(static_cast<unsigned char>(count_ >> (8 * i)));
    out.insert(out.end(), body_.begin(), body_.end());
    return out;
  }

 private:
  template <typename T>
  void Put(T v) {
    unsigned char b[sizeof(T)];
    std::memcpy(b, &v, sizeof(T));  // little-endian hosts only, like qkv
    body_.insert(body_.end(), b, b + sizeof(T));
  }
  void Str(const std::string& s) {
    Put(uint64_t{s.size()});
    body_.insert(body_.end(), s.begin(), s.end());
  }
  void Key(const std::string& key, uint32_t type) {
    ++count_;
    Str(key);
    Put(type);
  }
  std::vector<unsigned char> body_;
  uint64_t count_ = 0;
};

// A toy vocabulary: the 256 byte pieces (ids 0..255), then `extra` pieces,
// then "<|end|>" (control); metadata as SmolLM2's.
struct ToyVocab {
  std::vector<std::string> tokens;
  std::vector<int32_t> types;
  std::vector<std::string> merges;
  std::string model = "gpt2", pre = "smollm";
  uint32_t eos = 0;

  explicit ToyVocab(const std::vector<std::string>& extra,
                    const std::vector<std::string>& merge_rules) {
    uint32_t next = 256;
    for (uint32_t b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      const uint32_t cp = printable ? b : next++;
      std::string s;
      if (cp < 0x80) {
        s += static_cast<char>(cp);
      } else {
        s += static_cast<char>(0xC0 | (cp >> 6));
        s += static_cast<char>(0x80 | (cp & 0x3F));
      }
      tokens.push_back(s);
    }
    tokens.insert(tokens.end(), extra.begin(), extra.end());
    tokens.push_back("<|end|>");
    types.assign(tokens.size(), 1);
    types.back() = 3;
    eos = static_cast<uint32_t>(tokens.size() - 1);
    merges = merge_rules;
  }

  BpeTokenizer Load() const {
    GgufWriter w;
    w.String("tokenizer.ggml.model", model);
    w.String("tokenizer.ggml.pre", pre);
    w.Strings("tokenizer.ggml.tokens", tokens);
    w.Int32s("tokenizer.ggml.token_type", types);
    w.Strings("tokenizer.ggml.merges", merges);
    w.Uint32("tokenizer.ggml.eos_token_id", eos);
    const GgufFile file = GgufFile::Parse(w.Bytes(), "toy.gguf");
    return BpeTokenizer::FromGguf(file);
  }
};

std::vector<std::string> Pieces(const BpeTokenizer& tok, std::string_view text) {
  std::vector<std::string> out;
  for (const int32_t id : tok.Encode(text)) out.push_back(tok.Piece(id));
  return out;
}

using Strings = std::vector<std::string>;

TEST(BpeTokenizerToyTest, LowestRankFirstThenLeftmost) {
  // "b c" outranks "a b": "abc" is a + bc, not ab + c.
  const BpeTokenizer tok = ToyVocab({"ab", "bc", "aa", "aaa"}, {"b c", "a b", "a a", "aa a"}).Load();
  EXPECT_EQ(Pieces(tok, "abc"), (Strings{"a", "bc"}));
  EXPECT_EQ(Pieces(tok, "ab"), (Strings{"ab"}));
  // Equal ranks: leftmost first, so "aaaa" is aa + aa and "aaa" is aaa.
  EXPECT_EQ(Pieces(tok, "aaaa"), (Strings{"aa", "aa"}));
  EXPECT_EQ(Pieces(tok, "aaa"), (Strings{"aaa"}));
  EXPECT_EQ(Pieces(tok, "aaaaa"), (Strings{"aa", "aaa"}));
  // Digits are words of their own; the GPT-2 pattern splits the rest.
  EXPECT_EQ(Pieces(tok, "a1b"), (Strings{"a", "1", "b"}));
  EXPECT_EQ(Pieces(tok, "ab<|end|>ab"), (Strings{"ab", "<|end|>", "ab"}));
  EXPECT_EQ(tok.eos_id(), 260);
  EXPECT_EQ(tok.bos_id(), -1);
  // No chat template: ChatML without a system turn.
  EXPECT_EQ(tok.ApplyChatTemplate("hi"), "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
}

TEST(BpeTokenizerToyTest, Gpt2PreTokenizerKeepsDigitRuns) {
  ToyVocab vocab({"Ġ1", "12"}, {"Ġ 1", "1 2"});
  EXPECT_EQ(Pieces(vocab.Load(), " 12"), (Strings{"Ġ", "1", "2"}));
  vocab.pre = "gpt2";
  EXPECT_EQ(Pieces(vocab.Load(), " 12"), (Strings{"Ġ1", "2"}));
  EXPECT_EQ(Pieces(vocab.Load(), "12"), (Strings{"12"}));
}

TEST(BpeTokenizerToyTest, HostileMetadataIsAOneLineError) {
  const auto error = [](const ToyVocab& v) { return ErrorOf([&] { v.Load(); }); };
  const auto expect = [&](const ToyVocab& v, const std::string& part) {
    const std::string message = error(v);
    EXPECT_NE(message.find(part), std::string::npos) << message;
    EXPECT_EQ(message.rfind("toy.gguf: ", 0), 0u) << message;
    EXPECT_EQ(message.find('\n'), std::string::npos) << message;
  };
  expect(ToyVocab({}, {"a q"}), "tokenizer.ggml.merges[0]");       // "aq" is no piece
  expect(ToyVocab({}, {"a zz"}), "not in tokenizer.ggml.tokens");  // unknown right piece
  expect(ToyVocab({"ab"}, {"ab"}), "expected \"left right\"");
  expect(ToyVocab({"ab"}, {"a b "}), "tokenizer.ggml.merges[0]");
  expect(ToyVocab({"ab", "ab"}, {}), "repeats tokenizer.ggml.tokens[256]");
  ToyVocab v({}, {});
  v.model = "llama";
  expect(v, "tokenizer.ggml.model");
  v = ToyVocab({}, {});
  v.pre = "qwen2";
  expect(v, "tokenizer.ggml.pre");
  v = ToyVocab({}, {});
  v.types.pop_back();
  expect(v, "tokenizer.ggml.token_type has 256 entries (expected 257");
  v = ToyVocab({}, {});
  v.types[3] = 99;
  expect(v, "tokenizer.ggml.token_type[3]");
  v = ToyVocab({}, {});
  v.eos = 257;
  expect(v, "tokenizer.ggml.eos_token_id is 257");
  v = ToyVocab({}, {});
  v.tokens.clear();
  v.types.clear();
  expect(v, "tokenizer.ggml.tokens");
  // A missing key: the GGUF reader's message, naming it.
  GgufWriter w;
  w.String("tokenizer.ggml.model", "gpt2");
  const GgufFile file = GgufFile::Parse(w.Bytes(), "toy.gguf");
  const std::string message = ErrorOf([&] { BpeTokenizer::FromGguf(file); });
  EXPECT_NE(message.find("tokenizer.ggml.pre"), std::string::npos) << message;
}

TEST(BpeTokenizerToyTest, MissingBytePiecesAreDropped) {
  ToyVocab vocab({"!!"}, {"! !"});
  vocab.tokens[4] = "\xE2\x82\xAC" "4";  // byte 0x04 has no piece now, but "€4" is one
  const BpeTokenizer tok = vocab.Load();
  // The dropped byte leaves its neighbours adjacent, so they merge.
  EXPECT_EQ(Pieces(tok, "!\x04!"), (Strings{"!!"}));
  EXPECT_EQ(tok.Decode(tok.Encode("x\x04y")), "xy");
  // A piece with a character outside the byte map decodes to its own text.
  EXPECT_EQ(tok.TokenBytes(4), "\xE2\x82\xAC" "4");
}

// ---------------------------------------------------------------------------
// qkv tokenize --model FILE.gguf

TEST(BpeTokenizerCliTest, TokenizeGgufMatchesFixture) {
  if (!HaveSmolLm2()) return;
  test::TempDir dir("cli_tokenize_gguf_");
  const Json& cases = Fixture().at("cases");
  std::vector<std::string> args = {"tokenize", "--model", kSmolLm2};
  std::vector<size_t> picked;
  for (size_t i = 0; i < cases.size(); i += 13) {
    if (cases[i].at("text").get<std::string>().empty()) continue;  // CLI11 takes no empty value
    picked.push_back(i);
    args.push_back("--text");
    args.push_back(cases[i].at("text").get<std::string>());
  }
  const test::CliResult r = test::RunCli(args, dir.File(""));
  ASSERT_TRUE(r.exited && r.status == 0) << test::Describe(r);
  std::istringstream lines(r.out);
  std::string line;
  const BpeTokenizer* tok = SmolLm2();
  ASSERT_NE(tok, nullptr);
  for (const size_t i : picked) {
    ASSERT_TRUE(std::getline(lines, line)) << "case " << i;
    const Json j = Json::parse(line);
    EXPECT_EQ(j.at("ids"), cases[i].at("ids")) << cases[i].at("text");
    const auto ids = j.at("ids").get<std::vector<int32_t>>();
    ASSERT_EQ(j.at("tokens").size(), ids.size());
    ASSERT_EQ(j.at("bytes").size(), ids.size());
    for (size_t k = 0; k < ids.size(); ++k) EXPECT_EQ(j["tokens"][k], tok->Piece(ids[k]));
  }
  EXPECT_FALSE(std::getline(lines, line));

  const test::CliResult bad = test::RunCli({"tokenize", "--model", kSmolLm2, "--text", "a\xFF"},
                                           dir.File(""));
  EXPECT_TRUE(bad.exited && bad.status == 2) << test::Describe(bad);
  EXPECT_NE(bad.err.find("--text #1: invalid UTF-8 at byte 1"), std::string::npos) << bad.err;
}

}  // namespace
}  // namespace qkv::models
