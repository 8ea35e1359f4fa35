// Tests for the BERT WordPiece tokenizer (qkv/models/tokenizer.h).
//
// Oracle: tests/testdata/minilm/tokenizer_cases.json, written by Hugging Face
// `tokenizers` (fast BertTokenizer) for all-MiniLM-L6-v2; every case must give
// identical ids and pieces. Hand-written cases pin the quirks the fixture
// might not reach, and small inline tokenizer.json texts cover hostile files.
#include "qkv/models/tokenizer.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "qkv/error.h"

namespace qkv::models {
namespace {

using Json = nlohmann::json;

const std::string kTokenizerPath = QKV_MODELS_DIR "/all-MiniLM-L6-v2/tokenizer.json";
const std::string kCasesPath = QKV_TESTDATA_DIR "/minilm/tokenizer_cases.json";

// The MiniLM tokenizer, loaded once; nullptr (and a failure, never a skip)
// when the model files are missing.
const WordPieceTokenizer* MiniLm() {
  static const WordPieceTokenizer* tokenizer = []() -> const WordPieceTokenizer* {
    if (!std::filesystem::exists(kTokenizerPath)) return nullptr;
    return new WordPieceTokenizer(WordPieceTokenizer::FromFile(kTokenizerPath));
  }();
  if (tokenizer == nullptr) {
    ADD_FAILURE() << kTokenizerPath << " is missing: run `make models` to fetch all-MiniLM-L6-v2";
  }
  return tokenizer;
}

std::vector<int32_t> Ids(const WordPieceTokenizer& tok, std::string_view text,
                         size_t max_length = 512) {
  return tok.Encode(text, max_length).ids;
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

TEST(TokenizerTest, MatchesHuggingFaceFixture) {
  const WordPieceTokenizer* tok = MiniLm();
  ASSERT_NE(tok, nullptr);
  std::ifstream in(kCasesPath);
  ASSERT_TRUE(in) << kCasesPath << " is missing (written by the fixture generator)";
  std::stringstream text;
  text << in.rdbuf();
  const Json fixture = Json::parse(text.str());
  const size_t max_length = fixture.at("max_length").get<size_t>();
  const Json& cases = fixture.at("cases");
  ASSERT_GT(cases.size(), 0u);
  size_t mismatches = 0;
  for (const Json& c : cases) {
    const std::string input = c.at("text").get<std::string>();
    const auto want_ids = c.at("ids").get<std::vector<int32_t>>();
    const auto want_pieces = c.at("pieces").get<std::vector<std::string>>();
    const Encoding got = tok->Encode(input, max_length);
    if (got.ids == want_ids && got.pieces == want_pieces) continue;
    if (mismatches++ > 0) continue;  // report the first one in full
    size_t pos = 0;
    while (pos < got.ids.size() && pos < want_ids.size() && got.ids[pos] == want_ids[pos]) ++pos;
    const auto at = [](const auto& v, size_t i) {
      std::ostringstream s;
      if (i < v.size())
        s << v[i];
      else
        s << "(end)";
      return s.str();
    };
    ADD_FAILURE() << "text " << Json(input).dump() << ": first difference at position " << pos
                  << ", expected id " << at(want_ids, pos) << " " << at(want_pieces, pos)
                  << ", got " << at(got.ids, pos) << " " << at(got.pieces, pos) << " (lengths "
                  << want_ids.size() << " and " << got.ids.size() << ")";
  }
  EXPECT_EQ(mismatches, 0u) << "of " << cases.size() << " cases";
}

TEST(TokenizerTest, SpecialIdsAndVocabulary) {
  const WordPieceTokenizer* tok = MiniLm();
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->vocab_size(), 30522u);
  EXPECT_EQ(tok->pad_id(), 0);
  EXPECT_EQ(tok->unk_id(), 100);
  EXPECT_EQ(tok->cls_id(), 101);
  EXPECT_EQ(tok->sep_id(), 102);
  EXPECT_EQ(tok->piece(103), "[MASK]");
}

// Ids below come from tokenizers 0.23.3 on the same tokenizer.json.
TEST(TokenizerTest, HuggingFaceQuirks) {
  const WordPieceTokenizer* tok = MiniLm();
  ASSERT_NE(tok, nullptr);
  using V = std::vector<int32_t>;
  EXPECT_EQ(Ids(*tok, "hello world"), (V{101, 7592, 2088, 102}));
  EXPECT_EQ(Ids(*tok, ""), (V{101, 102}));
  // Added tokens: raw text, case-sensitive, anywhere in a word.
  EXPECT_EQ(Ids(*tok, "[MASK]"), (V{101, 103, 102}));
  EXPECT_EQ(Ids(*tok, "[mask]"), (V{101, 1031, 7308, 1033, 102}));
  EXPECT_EQ(Ids(*tok, "x[SEP]y"), (V{101, 1060, 102, 1061, 102}));
  EXPECT_EQ(Ids(*tok, "Hello [MASK] x [PAD]"), (V{101, 7592, 103, 1060, 0, 102}));
  // Control characters vanish before whitespace is mapped, gluing neighbours;
  // Cf (soft hyphen, zero-width space) vanishes too.
  EXPECT_EQ(Ids(*tok, "\vq\x1cq"), (V{101, 1053, 4160, 102}));
  EXPECT_EQ(Ids(*tok,
                "\xC2\xAD"
                "ab\xE2\x80\x8B"
                "c"),
            (V{101, 5925, 102}));
  // ASCII symbols split, non-ASCII symbols do not: "€5 $5".
  EXPECT_EQ(Ids(*tok,
                "\xE2\x82\xAC"
                "5 $5"),
            (V{101, 1574, 2629, 1002, 1019, 102}));
  // İ: NFD, mark stripped, then lowercased.
  EXPECT_EQ(Ids(*tok, "\xC4\xB0stanbul"), (V{101, 9960, 102}));
  // Σσς: lowercased one character at a time (no final-sigma rule).
  EXPECT_EQ(Ids(*tok, "\xCE\xA3\xCF\x83\xCF\x82"), (V{101, 1173, 29733, 19579, 102}));
  // U+2B820 (CJK Extension E) gets no spaces: tokenizers' range starts at 0x2B920.
  EXPECT_EQ(Ids(*tok,
                "a\xF0\xAB\xA0\xA0"
                "b"),
            (V{101, 100, 102}));
  EXPECT_EQ(Ids(*tok,
                "a\xE4\xB8\x80"
                "b"),
            (V{101, 1037, 1740, 1038, 102}));
  // max_input_chars_per_word = 100 code points.
  EXPECT_EQ(Ids(*tok, std::string(100, 'a')).size(), 52u);
  EXPECT_EQ(Ids(*tok, std::string(101, 'a')), (V{101, 100, 102}));
}

TEST(TokenizerTest, TruncationKeepsClsAndSep) {
  const WordPieceTokenizer* tok = MiniLm();
  ASSERT_NE(tok, nullptr);
  std::string text;
  for (int i = 0; i < 40; ++i)
    text += "Tokenization of antidisestablishmentarianism, [MASK] again. ";
  const std::vector<int32_t> full = Ids(*tok, text, 100000);
  ASSERT_GT(full.size(), 300u);
  for (size_t max_length : {2u, 3u, 4u, 5u, 17u, 128u, 256u}) {
    const std::vector<int32_t> ids = Ids(*tok, text, max_length);
    ASSERT_EQ(ids.size(), max_length);
    EXPECT_EQ(ids.front(), tok->cls_id());
    EXPECT_EQ(ids.back(), tok->sep_id());
    EXPECT_TRUE(std::equal(ids.begin(), ids.end() - 1, full.begin()))
        << "max_length " << max_length;
  }
  EXPECT_EQ(Ids(*tok, "hello world", 4).size(), 4u);
  EXPECT_EQ(Ids(*tok, "hello world", 1000).size(), 4u);
  EXPECT_NE(ErrorOf([&] { tok->Encode("hello", 1); }).find("max_length"), std::string::npos);
}

TEST(TokenizerTest, InvalidUtf8NamesTheByte) {
  const WordPieceTokenizer* tok = MiniLm();
  ASSERT_NE(tok, nullptr);
  const std::pair<std::string, size_t> cases[] = {
      {"ab\xFF"
       "cd",
       2},                       // not a lead byte
      {"abc\xE2\x82", 3},        // truncated at the end
      {"\xC0\xAF", 0},           // overlong '/'
      {"ok \xED\xA0\x80", 3},    // surrogate U+D800
      {"x\xF4\x90\x80\x80", 1},  // past U+10FFFF
      {"caf\xC3\xA9 \x80", 6},   // stray continuation byte after valid é
      {"[MASK]\xC3", 6},         // after an added token
  };
  for (const auto& c : cases) {
    // Named copies, not structured bindings: clang 14 cannot capture those.
    const std::string& text = c.first;
    const auto byte = c.second;
    EXPECT_EQ(ErrorOf([&] { tok->Encode(text, 128); }),
              "invalid UTF-8 at byte " + std::to_string(byte))
        << Json::binary({text.begin(), text.end()}).dump();
  }
  // Past the truncation point too: the whole text is checked.
  EXPECT_NE(ErrorOf([&] { tok->Encode(std::string(1000, 'a') + " \xFF", 8); }), "");
}

// Random bytes and random code points: an Error about UTF-8 or a well-formed
// encoding, never a crash (run under ASan/UBSan).
TEST(TokenizerTest, RandomInputIsSafe) {
  const WordPieceTokenizer* tok = MiniLm();
  ASSERT_NE(tok, nullptr);
  std::mt19937 rng(14);
  for (int iter = 0; iter < 2000; ++iter) {
    std::string text(rng() % 64, '\0');
    for (char& c : text) c = static_cast<char>(iter % 2 ? rng() % 256 : 0x20 + rng() % 96);
    const size_t max_length = 2 + rng() % 40;
    try {
      const Encoding e = tok->Encode(text, max_length);
      ASSERT_GE(e.ids.size(), 2u);
      ASSERT_LE(e.ids.size(), max_length);
      ASSERT_EQ(e.ids.size(), e.pieces.size());
      for (int32_t id : e.ids) ASSERT_LT(static_cast<size_t>(id), tok->vocab_size());
    } catch (const Error& e) {
      ASSERT_EQ(std::string(e.what()).rfind("invalid UTF-8 at byte ", 0), 0u) << e.what();
    }
  }
}

// A small tokenizer.json in the shape Hugging Face writes.
Json SmallTokenizer() {
  return Json::parse(R"({
    "version": "1.0",
    "added_tokens": [{"id": 4, "content": "[MASK]", "single_word": false, "lstrip": false,
                      "rstrip": false, "normalized": false, "special": true}],
    "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
                   "strip_accents": null, "lowercase": true},
    "pre_tokenizer": {"type": "BertPreTokenizer"},
    "post_processor": {"type": "TemplateProcessing",
      "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}},
                 {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": "[SEP]", "type_id": 0}}]},
    "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
              "max_input_chars_per_word": 100,
              "vocab": {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4,
                        "un": 5, "##aff": 6, "##able": 7, "a": 8, ",": 9}}
  })");
}

TEST(TokenizerTest, SmallVocabulary) {
  const WordPieceTokenizer tok =
      WordPieceTokenizer::FromJson(SmallTokenizer().dump(), "small.json");
  using V = std::vector<int32_t>;
  EXPECT_EQ(tok.vocab_size(), 10u);
  EXPECT_EQ(Ids(tok, "UNAFFABLE, a [MASK]"), (V{2, 5, 6, 7, 9, 8, 4, 3}));
  EXPECT_EQ(Ids(tok, "unaff unaffx"), (V{2, 5, 6, 1, 3}));  // a remainder makes the word [UNK]
  Json extra = SmallTokenizer();  // an added token past the vocabulary takes the next id
  extra["added_tokens"].push_back(Json::parse(R"({"id": 10, "content": "<x>", "special": false})"));
  const WordPieceTokenizer with_extra = WordPieceTokenizer::FromJson(extra.dump(), "extra.json");
  EXPECT_EQ(with_extra.vocab_size(), 11u);
  EXPECT_EQ(Ids(with_extra, "a<x>a"), (V{2, 8, 10, 8, 3}));
  Json bert = SmallTokenizer();
  bert["post_processor"] =
      Json::parse(R"({"type": "BertProcessing", "sep": ["[SEP]", 3], "cls": ["[CLS]", 2]})");
  bert["normalizer"] = nullptr;  // no normalizer: case kept
  const WordPieceTokenizer cased = WordPieceTokenizer::FromJson(bert.dump(), "bert.json");
  EXPECT_EQ(Ids(cased, "UNaffable unaffable"), (V{2, 1, 5, 6, 7, 3}));
}

// Every hostile file gives a one-line qkv::Error that names the file.
TEST(TokenizerTest, HostileJsonIsAnError) {
  const std::string name = "hostile.json";
  const auto expect_error = [&](const std::string& text, const std::string& fragment) {
    const std::string message = ErrorOf([&] { WordPieceTokenizer::FromJson(text, name); });
    EXPECT_EQ(message.rfind(name + ": ", 0), 0u)
        << "no error naming the file; expected " << fragment;
    EXPECT_NE(message.find(fragment), std::string::npos) << message;
    EXPECT_EQ(message.find('\n'), std::string::npos) << message;
  };
  const auto mutated = [](const std::function<void(Json&)>& edit) {
    Json j = SmallTokenizer();
    edit(j);
    return j.dump();
  };
  expect_error("", "not valid JSON");
  expect_error("{\"model\": ", "not valid JSON");
  expect_error("[1, 2]", "not a JSON object");
  expect_error(std::string(100000, '[') + std::string(100000, ']'), "not a JSON object");
  expect_error(mutated([](Json& j) { j.erase("model"); }), "model.type");
  expect_error(mutated([](Json& j) { j["model"]["type"] = "BPE"; }), "\"BPE\"");
  expect_error(mutated([](Json& j) { j["normalizer"]["type"] = "Lowercase"; }),
               "unsupported normalizer");
  expect_error(mutated([](Json& j) { j["normalizer"]["lowercase"] = "yes"; }),
               "normalizer.lowercase");
  expect_error(mutated([](Json& j) { j["pre_tokenizer"]["type"] = "Whitespace"; }),
               "unsupported pre_tokenizer");
  expect_error(mutated([](Json& j) { j["pre_tokenizer"] = nullptr; }), "unsupported pre_tokenizer");
  expect_error(mutated([](Json& j) { j["post_processor"]["type"] = "RobertaProcessing"; }),
               "post_processor");
  expect_error(mutated([](Json& j) { j["post_processor"]["single"] = Json::array(); }),
               "post_processor.single");
  expect_error(mutated([](Json& j) {
                 j["model"]["vocab"] = Json::array({"a", "b"});
               }),
               "model.vocab");
  expect_error(mutated([](Json& j) { j["model"]["vocab"] = Json::object(); }), "model.vocab");
  expect_error(mutated([](Json& j) { j["model"]["vocab"]["a"] = "8"; }), "\"a\" has id \"8\"");
  expect_error(mutated([](Json& j) { j["model"]["vocab"]["a"] = -1; }), "has id -1");
  expect_error(mutated([](Json& j) { j["model"]["vocab"]["a"] = 8.5; }), "has id 8.5");
  expect_error(mutated([](Json& j) { j["model"]["vocab"]["a"] = 7; }), "used twice");
  expect_error(mutated([](Json& j) { j["model"]["vocab"]["a"] = 4000000000u; }),
               "has id 4000000000");
  expect_error(mutated([](Json& j) { j["model"]["vocab"]["zz"] = 11; }), "hole");
  expect_error(mutated([](Json& j) { j["model"]["max_input_chars_per_word"] = -5; }),
               "max_input_chars_per_word");
  expect_error(mutated([](Json& j) {
                 j["model"]["vocab"].erase("[UNK]");
                 j["model"]["vocab"]["b"] = 1;
               }),
               "\"[UNK]\" is not in the vocabulary");
  expect_error(mutated([](Json& j) {
                 j["model"]["vocab"].erase("[CLS]");
                 j["model"]["vocab"]["b"] = 2;
               }),
               "\"[CLS]\" is not in the vocabulary");
  expect_error(mutated([](Json& j) {
                 j["model"]["vocab"].erase("[SEP]");
                 j["model"]["vocab"]["b"] = 3;
               }),
               "\"[SEP]\" is not in the vocabulary");
  expect_error(mutated([](Json& j) {
                 j["model"]["vocab"].erase("[PAD]");
                 j["model"]["vocab"]["b"] = 0;
               }),
               "\"[PAD]\" is not in the vocabulary");
  expect_error(mutated([](Json& j) { j["added_tokens"] = 3; }), "added_tokens");
  expect_error(mutated([](Json& j) { j["added_tokens"][0]["id"] = 5; }),
               "which the vocabulary gives to \"un\"");
  expect_error(mutated([](Json& j) { j["added_tokens"][0]["id"] = 1000; }), "has id 1000");
  expect_error(mutated([](Json& j) { j["added_tokens"][0]["content"] = ""; }), "no content");
  expect_error(mutated([](Json& j) { j["added_tokens"][0]["normalized"] = true; }),
               "not supported");
  // Strings from the file reach messages escaped, so a message stays one line.
  expect_error(mutated([](Json& j) { j["model"]["type"] = "a\nb"; }), "\"a\\nb\"");
  const std::string missing =
      ErrorOf([] { WordPieceTokenizer::FromFile("/nonexistent/tokenizer.json"); });
  EXPECT_EQ(missing.rfind("/nonexistent/tokenizer.json: ", 0), 0u) << missing;
}

}  // namespace
}  // namespace qkv::models
