// Tests for qkv/safetensors.h: round trips, a file written by the reference
// Python package (tests/testdata/safetensors/make_safetensors_fixtures.py)
// and hostile files built in memory, each refused with a one-line error.
#include "qkv/safetensors.h"

#include <gtest/gtest.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cmath>
#include <csignal>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "file_test_util.h"
#include "qkv/error.h"
#include "qkv/tensor.h"

namespace qkv {
namespace {

namespace fs = std::filesystem;

using test::Bytes;
using Shape = std::vector<int64_t>;

const std::string kFixture = QKV_TESTDATA_DIR "/safetensors/python_mixed.safetensors";

using test::ExpectError;
using test::ReadFileBytes;
using test::TempDir;

void WriteFileBytes(const std::string& path, const Bytes& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()), bytes.size());
}

// Returns `len` as 8 little-endian bytes followed by `rest`.
Bytes WithLength(uint64_t len, const std::string& rest) {
  Bytes out;
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<unsigned char>(len >> (8 * i)));
  out.insert(out.end(), rest.begin(), rest.end());
  return out;
}

// Returns a file with header `json` and `data_bytes` data bytes 0, 1, 2, ...
Bytes MakeFile(const std::string& json, size_t data_bytes) {
  Bytes out = WithLength(json.size(), json);
  for (size_t i = 0; i < data_bytes; ++i) out.push_back(static_cast<unsigned char>(i));
  return out;
}

// Returns one header entry: "name":{"dtype":..,"shape":..,"data_offsets":[b,e]}.
std::string Entry(const std::string& name, const std::string& dtype, const std::string& shape,
                  uint64_t begin, uint64_t end) {
  return "\"" + name + "\":{\"dtype\":\"" + dtype + "\",\"shape\":" + shape +
         ",\"data_offsets\":[" + std::to_string(begin) + "," + std::to_string(end) + "]}";
}

// Expects Parse to throw a one-line qkv::Error "mem.safetensors: ... (expected
// ...)" containing `fragment`.
void ExpectParseError(const Bytes& file, const std::string& fragment) {
  SCOPED_TRACE("fragment: " + fragment);
  try {
    SafetensorsFile::Parse(file, "mem.safetensors");
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find(fragment), std::string::npos) << message;
    EXPECT_EQ(message.rfind("mem.safetensors: ", 0), 0u) << message;
    EXPECT_NE(message.find(" (expected "), std::string::npos) << message;
    EXPECT_EQ(message.find('\n'), std::string::npos) << message;
  }
}
void ExpectHeaderError(const std::string& json, size_t data_bytes, const std::string& fragment) {
  ExpectParseError(MakeFile(json, data_bytes), fragment);
}

int64_t Numel(const Shape& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

TEST(SafetensorsTest, RoundTripsEveryDTypeAndRank) {
  TempDir dir("qkv_st_");
  const std::vector<Shape> shapes = {{}, {5}, {2, 3}, {2, 1, 3}, {0}, {2, 0, 3}};
  // Values k/64 with |k| < 256 have at most 8 significant bits, so they are
  // exact in bfloat16 and float16 too and the round trip is compared with ==.
  std::vector<std::vector<float>> values;
  std::vector<SafetensorsEntry> entries;
  for (const char* dtype : {"F32", "F16", "BF16"}) {
    for (const Shape& shape : shapes) {
      std::vector<float> v(Numel(shape));
      for (size_t i = 0; i < v.size(); ++i) v[i] = (static_cast<float>(i * 37 % 255) - 100) / 64;
      values.push_back(std::move(v));
      entries.push_back(
          {std::string(dtype) + "_" + std::to_string(entries.size()), shape, {}, dtype});
    }
  }
  for (size_t i = 0; i < entries.size(); ++i) entries[i].data = values[i];
  const std::string path = dir.File("a.safetensors");
  WriteSafetensors(path, entries);

  const SafetensorsFile file = SafetensorsFile::Read(path);
  ASSERT_EQ(file.tensors().size(), entries.size());
  EXPECT_EQ(file.metadata(), (std::map<std::string, std::string>{{"format", "pt"}}));
  for (size_t i = 0; i < entries.size(); ++i) {
    SCOPED_TRACE(entries[i].name);
    const SafetensorsFile::Tensor* t = file.Find(entries[i].name);
    ASSERT_NE(t, nullptr);
    EXPECT_EQ(t->dtype, entries[i].dtype);
    EXPECT_EQ(t->shape, entries[i].shape);
    EXPECT_EQ(t->bytes.size(), values[i].size() * (entries[i].dtype == "F32" ? 4 : 2));
    EXPECT_EQ(file.LoadFloat32(entries[i].name, entries[i].shape), values[i]);
  }
  EXPECT_EQ(file.Find("F32_99"), nullptr);
}

// F16 and BF16 round to nearest even on write, exactly as tensor.h converts.
TEST(SafetensorsTest, WritesRoundedHalfAndBFloat16) {
  TempDir dir("qkv_st_");
  const std::vector<float> v = {1.0f / 3, -1e-6f, 70000.0f, 3.14159f};
  const SafetensorsEntry entries[] = {{"h", {4}, v, "F16"}, {"b", {4}, v, "BF16"}};
  WriteSafetensors(dir.File("r.safetensors"), entries);
  const SafetensorsFile file = SafetensorsFile::Read(dir.File("r.safetensors"));
  const std::vector<float> h = file.LoadFloat32("h", Shape{4});
  const std::vector<float> b = file.LoadFloat32("b", Shape{4});
  for (size_t i = 0; i < v.size(); ++i) {
    EXPECT_EQ(h[i], HalfToFloat(FloatToHalf(v[i])));
    EXPECT_EQ(b[i], BFloat16ToFloat(FloatToBFloat16(v[i])));
  }
  EXPECT_TRUE(std::isinf(h[2]));  // 70000 is beyond the largest half, 65504
}

// The layout the reference writer produces: metadata first, header padded
// with spaces to a multiple of 8, data contiguous in the given order.
TEST(SafetensorsTest, WritesThePaddedReferenceLayout) {
  TempDir dir("qkv_st_");
  const std::vector<float> a = {1, 2, 3}, b = {4};
  const SafetensorsEntry entries[] = {{"zeta", {3}, a, "F32"}, {"alpha", {1}, b, "F16"}};
  const std::string path = dir.File("l.safetensors");
  WriteSafetensors(path, entries);
  const Bytes bytes = ReadFileBytes(path);
  ASSERT_GE(bytes.size(), 8u);
  uint64_t len = 0;
  for (int i = 0; i < 8; ++i) len |= uint64_t{bytes[i]} << (8 * i);
  EXPECT_EQ(len % 8, 0u);
  ASSERT_EQ(bytes.size(), 8 + len + 14);
  const std::string header(bytes.begin() + 8, bytes.begin() + 8 + len);
  const std::string want = "{\"__metadata__\":{\"format\":\"pt\"}," +
                           Entry("zeta", "F32", "[3]", 0, 12) + "," +
                           Entry("alpha", "F16", "[1]", 12, 14) + "}";
  EXPECT_EQ(header.substr(0, want.size()), want);
  EXPECT_EQ(header.find_first_not_of(' ', want.size()), std::string::npos);
  float first = 0;
  std::memcpy(&first, bytes.data() + 8 + len, 4);
  EXPECT_EQ(first, 1.0f);
  EXPECT_EQ(bytes[8 + len + 12], 0x00);  // 4.0 in binary16 is 0x4400
  EXPECT_EQ(bytes[8 + len + 13], 0x44);
}

TEST(SafetensorsTest, ReadsTheReferenceWritersFile) {
  const SafetensorsFile file = SafetensorsFile::Read(kFixture);
  EXPECT_EQ(file.metadata(),
            (std::map<std::string, std::string>{{"format", "pt"}, {"source", "qkv"}}));
  // Tensors are listed in data order; the reference writer orders by
  // alignment, then name, and the empty tensor ties with f32_2x3 at byte 24.
  std::vector<std::string> names;
  for (const auto& t : file.tensors()) names.push_back(t.name);
  EXPECT_EQ(names, (std::vector<std::string>{"i64_3", "empty_0x3", "f32_2x3", "scalar", "bf16_2x2",
                                             "f16_4", "u8_3"}));

  EXPECT_EQ(file.LoadFloat32("f32_2x3", Shape{2, 3}),
            (std::vector<float>{-1, -0.5f, 0, 0.5f, 1, 1.5f}));
  EXPECT_EQ(file.LoadFloat32("f16_4", Shape{4}), (std::vector<float>{1, -2, 0.5f, 65504}));
  EXPECT_EQ(file.LoadFloat32("bf16_2x2", Shape{2, 2}), (std::vector<float>{1, -2, 0.5f, 3}));
  EXPECT_EQ(file.LoadFloat32("scalar", Shape{}), (std::vector<float>{7}));
  EXPECT_TRUE(file.LoadFloat32("empty_0x3", Shape{0, 3}).empty());

  // Other dtypes are listed with their raw bytes but not loaded as float.
  const SafetensorsFile::Tensor* i64 = file.Find("i64_3");
  ASSERT_NE(i64, nullptr);
  EXPECT_EQ(i64->dtype, "I64");
  EXPECT_EQ(i64->shape, Shape{3});
  int64_t last = 0;
  std::memcpy(&last, i64->bytes.data() + 16, 8);
  EXPECT_EQ(last, int64_t{1} << 40);
  const SafetensorsFile::Tensor* u8 = file.Find("u8_3");
  ASSERT_NE(u8, nullptr);
  EXPECT_EQ(Bytes(u8->bytes.begin(), u8->bytes.end()), (Bytes{1, 2, 255}));
  ExpectError([&] { file.LoadFloat32("i64_3", Shape{3}); },
              "python_mixed.safetensors: tensor 'i64_3' has dtype I64",
              "(expected F32, F16 or BF16)");

  // Parse() on the same bytes agrees with Read().
  const SafetensorsFile parsed = SafetensorsFile::Parse(ReadFileBytes(kFixture), "x");
  EXPECT_EQ(parsed.tensors().size(), 7u);
  EXPECT_EQ(parsed.LoadFloat32("bf16_2x2", Shape{2, 2}), (std::vector<float>{1, -2, 0.5f, 3}));
}

TEST(SafetensorsTest, LoadFloat32NamesTheMissingTensorAndTheShapes) {
  const SafetensorsFile file = SafetensorsFile::Read(kFixture);
  ExpectError([&] { file.LoadFloat32("q_proj", Shape{2}); }, "no tensor 'q_proj'",
              "one of 'i64_3', 'empty_0x3', 'f32_2x3', 'scalar', 'bf16_2x2' and 2 more)");
  ExpectError(
      [&] {
        file.LoadFloat32("f32_2x3", Shape{3, 2});
      },
      "tensor 'f32_2x3' has shape [2, 3]", "(expected [3, 2])");
  ExpectError([&] { file.LoadFloat32("f32_2x3", Shape{6}); }, "has shape [2, 3]", "(expected [6])");
  ExpectError([&] { file.LoadFloat32("scalar", Shape{1}); }, "has shape []", "(expected [1])");
  const SafetensorsFile none = SafetensorsFile::Parse(MakeFile("{}", 0), "none");
  EXPECT_TRUE(none.tensors().empty());
  ExpectError([&] { none.LoadFloat32("w", Shape{}); }, "none: no tensor 'w'", "has none");
}

// Data at odd addresses (after a 1-byte tensor) loads without aligned access
// (UBSan would flag a float* cast).
TEST(SafetensorsTest, LoadsUnalignedData) {
  const std::string json = "{" + Entry("u", "U8", "[1]", 0, 1) + "," +
                           Entry("f", "F32", "[2]", 1, 9) + "," + Entry("h", "F16", "[1]", 9, 11) +
                           "," + Entry("b", "BF16", "[1]", 11, 13) + "}";
  Bytes file = MakeFile(json, 0);
  const float f[2] = {1.5f, -2.0f};
  file.push_back(7);
  file.insert(file.end(), reinterpret_cast<const unsigned char*>(f),
              reinterpret_cast<const unsigned char*>(f) + 8);
  file.insert(file.end(), {0x00, 0x3C, 0x80, 0xBF});  // half 1.0, bfloat16 -1.0
  const SafetensorsFile st = SafetensorsFile::Parse(file, "odd");
  EXPECT_EQ(st.LoadFloat32("f", Shape{2}), (std::vector<float>{1.5f, -2.0f}));
  EXPECT_EQ(st.LoadFloat32("h", Shape{1}), (std::vector<float>{1.0f}));
  EXPECT_EQ(st.LoadFloat32("b", Shape{1}), (std::vector<float>{-1.0f}));
}

// Gaps, trailing bytes, empty tensors anywhere, missing or null metadata and
// escaped brackets in strings are all accepted.
TEST(SafetensorsTest, AcceptsGapsEmptyTensorsAndNullMetadata) {
  const std::string json = "{" + Entry("a", "F32", "[1]", 4, 8) + "," +
                           Entry("e", "F32", "[0,5]", 6, 6) + "," +
                           Entry("b", "I8", "[2]", 10, 12) + ",\"__metadata__\":null}";
  const SafetensorsFile st = SafetensorsFile::Parse(MakeFile(json, 16), "gaps");
  ASSERT_EQ(st.tensors().size(), 3u);
  EXPECT_EQ(st.tensors()[0].name, "a");
  EXPECT_EQ(st.tensors()[1].name, "e");  // empty, at byte 6 inside 'a': no overlap
  EXPECT_EQ(st.tensors()[1].bytes.data(), st.tensors()[0].bytes.data() + 2);
  EXPECT_EQ(st.tensors()[2].bytes[0], 10);
  EXPECT_TRUE(st.metadata().empty());

  const std::string strings =
      R"({"__metadata__":{"k":"[[[[[[[[[[{{{{{{{{{{","\"[[[[[[[[[[":"\\[[[[[[[[[[\u005b"}})";
  const SafetensorsFile meta = SafetensorsFile::Parse(MakeFile(strings + "    ", 0), "s");
  EXPECT_EQ(meta.metadata().at("k"), "[[[[[[[[[[{{{{{{{{{{");
  EXPECT_EQ(meta.metadata().at("\"[[[[[[[[[["), "\\[[[[[[[[[[[");
  EXPECT_TRUE(meta.tensors().empty());
}

TEST(SafetensorsTest, RefusesTruncatedFiles) {
  ExpectParseError({}, "file is 0 bytes, too short for a header length");
  ExpectParseError({1, 0, 0, 0, 0, 0, 0}, "file is 7 bytes, too short");
  ExpectParseError(WithLength(100, "{\"a\":1}"), "header is truncated: it claims 100 bytes");
  ExpectParseError(WithLength(3, "{}"),
                   "header is truncated: it claims 3 bytes but the file has 2");
  // Data cut short: the entry ends past the 5 bytes present.
  ExpectHeaderError("{" + Entry("w", "F32", "[2,3]", 0, 24) + "}", 5,
                    "tensor 'w' data_offsets [0, 24] go past the data section");
}

TEST(SafetensorsTest, RefusesHugeHeaderLengths) {
  ExpectParseError(WithLength(uint64_t{1} << 63, "{}"),
                   "header length 9223372036854775808 is too large");
  ExpectParseError(WithLength(~uint64_t{0}, "{}"), "is too large (expected at most 104857600");
  ExpectParseError(WithLength(uint64_t{1} << 40, "{}"), "header length 1099511627776 is too large");
  ExpectParseError(WithLength((uint64_t{100} << 20) + 1, "{}"), "is too large");
}

TEST(SafetensorsTest, RefusesHeadersThatAreNotJsonObjects) {
  ExpectHeaderError("hello", 0, "header is not valid JSON: ");
  ExpectHeaderError("", 0, "header is not valid JSON: ");
  ExpectHeaderError("{\"a\":", 0, "header is not valid JSON: ");
  ExpectHeaderError("{} x", 0, "header is not valid JSON: ");
  // nlohmann would stop at a NUL and accept "{}"; the reference reader refuses.
  ExpectHeaderError(std::string("{}\0\0", 4), 0, "header has a NUL byte at byte 2");
  ExpectHeaderError(std::string("{\"a\0\":1}", 8), 0, "header has a NUL byte at byte 3");
  ExpectHeaderError("{\"a\n\":1}", 0, "header is not valid JSON: ");       // raw control character
  ExpectHeaderError("{\"\xff\xfe\":1}", 0, "header is not valid JSON: ");  // invalid UTF-8
  ExpectHeaderError("{/*c*/}", 0, "header is not valid JSON: ");
  ExpectHeaderError("[]", 0, "header is a JSON array, not an object");
  ExpectHeaderError("5", 0, "header is a JSON number, not an object");
  ExpectHeaderError("\"x\"", 0, "header is a JSON string, not an object");
  ExpectHeaderError("null", 0, "header is a JSON null, not an object");
}

TEST(SafetensorsTest, RefusesDeepNestingBeforeParsing) {
  ExpectHeaderError(std::string(100000, '['), 0, "header nests deeper than 8 at byte 8");
  ExpectHeaderError(std::string(100000, '{'), 0, "header nests deeper than 8");
  std::string nested = "{\"__metadata__\":";
  for (int i = 0; i < 8; ++i) nested += "{\"k\":";
  ExpectHeaderError(nested + "1" + std::string(9, '}'), 0, "nests deeper than 8");
  // A quote escaped inside a string does not end it, so these brackets count.
  ExpectHeaderError("{\"a\\\"\":" + std::string(50, '['), 0, "nests deeper than 8");
}

TEST(SafetensorsTest, RefusesMalformedEntries) {
  const std::string head = "{\"w\":{";
  ExpectHeaderError(head + "\"shape\":[1],\"data_offsets\":[0,4]}}", 4,
                    "tensor 'w' has no 'dtype' key");
  ExpectHeaderError(head + "\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", 4,
                    "tensor 'w' has no 'shape' key");
  ExpectHeaderError(head + "\"dtype\":\"F32\",\"shape\":[1]}}", 4,
                    "tensor 'w' has no 'data_offsets' key");
  ExpectHeaderError(head + "\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4],\"x\":1}}", 4,
                    "tensor 'w' has unexpected key 'x'");
  ExpectHeaderError("{\"w\":5}", 0, "tensor 'w' is a JSON number, not an object");
  ExpectHeaderError("{\"w\":[]}", 0, "tensor 'w' is a JSON array, not an object");
  ExpectHeaderError("{" + Entry("w", "F128", "[1]", 0, 16) + "}", 16,
                    "tensor 'w' has unknown dtype 'F128' (expected F64, F32");
  ExpectHeaderError("{" + Entry("w", "f32", "[1]", 0, 4) + "}", 4, "unknown dtype 'f32'");
  ExpectHeaderError(head + "\"dtype\":4,\"shape\":[1],\"data_offsets\":[0,4]}}", 4,
                    "tensor 'w' has a non-string dtype '4'");
  ExpectHeaderError(head + "\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}}", 4,
                    "data_offsets '[0]' is not a pair");
  ExpectHeaderError(head + "\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4,8]}}", 8,
                    "data_offsets '[0,4,8]' is not a pair");
  ExpectHeaderError(head + "\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":{}}}", 4,
                    "data_offsets '{}' is not a pair");
  // A newline in a name (escaped in JSON) is shown as '?', keeping one line.
  ExpectHeaderError("{" + Entry("a\\nb", "X", "[1]", 0, 1) + "}", 1, "tensor 'a?b' has unknown");
}

TEST(SafetensorsTest, RefusesBadShapes) {
  auto with_shape = [](const std::string& shape) {
    return "{" + Entry("w", "F32", shape, 0, 4) + "}";
  };
  ExpectHeaderError(with_shape("[-1]"), 4, "tensor 'w' dimension -1 is negative");
  ExpectHeaderError(with_shape("[\"2\"]"), 4, "tensor 'w' dimension '\"2\"' is not an integer");
  ExpectHeaderError(with_shape("[1.0]"), 4, "dimension '1.0' is not an integer");
  ExpectHeaderError(with_shape("[1e0]"), 4, "is not an integer");
  ExpectHeaderError(with_shape("[null]"), 4, "dimension 'null' is not an integer");
  ExpectHeaderError(with_shape("[9223372036854775808]"), 4,
                    "dimension 9223372036854775808 is too large");
  // Beyond uint64, nlohmann reads a float.
  ExpectHeaderError(with_shape("[18446744073709551616]"), 4, "is not an integer");
  ExpectHeaderError(with_shape("3"), 4, "tensor 'w' shape '3' is not an array");
  ExpectHeaderError(with_shape("{}"), 4, "shape '{}' is not an array");
  ExpectHeaderError(with_shape("[1,1,1,1,1,1,1,1,1]"), 4,
                    "array '/w/shape' has more than 8 elements");
  ExpectHeaderError(with_shape("[4294967296,4294967296]"), 4,
                    "tensor 'w' byte size of [4294967296, 4294967296] F32 overflows uint64");
  // A long array is refused at its 9th element, before it is stored.
  std::string long_array = "[0";
  for (int i = 0; i < 200000; ++i) long_array += ",0";
  ExpectHeaderError(with_shape(long_array + "]"), 4, "has more than 8 elements");
  // A zero dimension makes the size 0 whatever the others are.
  ExpectHeaderError(with_shape("[0,9223372036854775807,9223372036854775807]"), 4,
                    "hold 4 bytes but [0, 9223372036854775807, 9223372036854775807] F32 needs 0");
  const Bytes zero = MakeFile("{" + Entry("w", "F32", "[0,9223372036854775807]", 0, 0) + "}", 0);
  EXPECT_EQ(SafetensorsFile::Parse(zero, "z").tensors()[0].shape,
            (Shape{0, int64_t{9223372036854775807}}));
}

TEST(SafetensorsTest, RefusesBadOffsets) {
  ExpectHeaderError("{" + Entry("w", "F32", "[1]", 0, 400) + "}", 4,
                    "tensor 'w' data_offsets [0, 400] go past the data section (expected end <= 4");
  ExpectHeaderError("{" + Entry("w", "F32", "[1]", 8, 4) + "}", 8,
                    "tensor 'w' data_offsets [8, 4] are reversed");
  ExpectHeaderError("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]}}", 4,
                    "tensor 'w' begin offset -4 is negative");
  ExpectHeaderError("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4.0]}}", 4,
                    "tensor 'w' end offset '4.0' is not an integer");
  ExpectHeaderError(
      "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,18446744073709551615]}}", 4,
      "end offset 18446744073709551615 is too large");
  ExpectHeaderError("{" + Entry("w", "F32", "[3]", 0, 8) + "}", 8,
                    "tensor 'w' data_offsets [0, 8] hold 8 bytes but [3] F32 needs 12 (expected "
                    "end - begin == 12)");
  ExpectHeaderError("{" + Entry("w", "BF16", "[2,2]", 0, 16) + "}", 16, "[2, 2] BF16 needs 8");
  ExpectHeaderError(
      "{" + Entry("a", "F32", "[2]", 0, 8) + "," + Entry("b", "F32", "[2]", 4, 12) + "}", 12,
      "tensors 'a' and 'b' overlap at data byte 4");
  // Same range twice, and one range inside another.
  ExpectHeaderError(
      "{" + Entry("a", "F32", "[1]", 0, 4) + "," + Entry("b", "I32", "[1]", 0, 4) + "}", 4,
      "overlap at data byte 0");
  ExpectHeaderError("{" + Entry("a", "U8", "[8]", 0, 8) + "," + Entry("e", "F32", "[0]", 2, 2) +
                        "," + Entry("b", "U8", "[2]", 3, 5) + "}",
                    8, "tensors 'a' and 'b' overlap at data byte 3");
}

TEST(SafetensorsTest, RefusesDuplicateKeys) {
  const std::string w = Entry("w", "F32", "[1]", 0, 4);
  ExpectHeaderError("{" + w + "," + Entry("w", "F32", "[1]", 4, 8) + "}", 8,
                    "duplicate key 'w' in the top-level object");
  ExpectHeaderError(
      "{\"w\":{\"dtype\":\"F32\",\"dtype\":\"F16\",\"shape\":[1],"
      "\"data_offsets\":[0,4]}}",
      4, "duplicate key 'dtype' in '/w'");
  ExpectHeaderError("{\"__metadata__\":{\"a\":\"1\",\"a\":\"2\"}}", 0,
                    "duplicate key 'a' in '/__metadata__'");
  // "\u0077" is "w": duplicates are found after unescaping.
  ExpectHeaderError("{" + w + ",\"\\u0077\":{}}", 4, "duplicate key 'w'");
}

TEST(SafetensorsTest, RefusesBadMetadata) {
  ExpectHeaderError("{\"__metadata__\":{\"k\":1}}", 0, "__metadata__ value of 'k' is not a string");
  ExpectHeaderError("{\"__metadata__\":{\"k\":null}}", 0, "value of 'k' is not a string");
  ExpectHeaderError("{\"__metadata__\":{\"k\":[\"v\"]}}", 0, "value of 'k' is not a string");
  ExpectHeaderError("{\"__metadata__\":[]}", 0, "__metadata__ is a JSON array");
  ExpectHeaderError("{\"__metadata__\":\"pt\"}", 0, "__metadata__ is a JSON string");
}

// Random edits of a valid file (bytes replaced by random or JSON-significant
// characters, inserted, or the file cut) either parse or throw qkv::Error
// with one line; any other exception fails the test, and ASan/UBSan check
// every access, including loading each accepted float tensor.
TEST(SafetensorsTest, MutatedFilesParseOrThrowOnlyQkvError) {
  const Bytes good = ReadFileBytes(kFixture);
  ASSERT_FALSE(good.empty());
  const std::string significant = "[]{}\",:-.0123456789eE \\";
  std::mt19937 rng(20240601);  // fixed seed: the same files every run
  int accepted = 0, refused = 0;
  for (int iter = 0; iter < 4000; ++iter) {
    Bytes file = good;
    for (int edit = 0, edits = 1 + rng() % 3; edit < edits && !file.empty(); ++edit) {
      const size_t pos = rng() % file.size();
      const unsigned char c = rng() % 2 ? significant[rng() % significant.size()] : rng() & 0xff;
      switch (rng() % 4) {
        case 0:
          file[pos] = c;
          break;
        case 1:
          file[pos] = significant[rng() % significant.size()];
          break;
        case 2:
          file.insert(file.begin() + pos, c);
          break;
        default:
          file.resize(pos);
          break;
      }
    }
    try {
      const SafetensorsFile st = SafetensorsFile::Parse(file, "fuzz");
      for (const auto& t : st.tensors()) {
        if (t.dtype == "F32" || t.dtype == "F16" || t.dtype == "BF16") {
          EXPECT_EQ(st.LoadFloat32(t.name, t.shape).size() * (t.dtype == "F32" ? 4 : 2),
                    t.bytes.size());
        }
      }
      ++accepted;
    } catch (const Error& e) {
      const std::string message = e.what();
      ASSERT_EQ(message.find('\n'), std::string::npos) << message;
      ++refused;
    }
  }
  // Both outcomes occur (edits inside data bytes or padding are harmless).
  EXPECT_GT(accepted, 100);
  EXPECT_GT(refused, 1000);
}

TEST(SafetensorsTest, ReadRefusesWhatIsNotARegularFile) {
  TempDir dir("qkv_st_");
  ExpectError([&] { SafetensorsFile::Read(dir.File("missing.safetensors")); },
              "missing.safetensors: cannot open: ", "(expected an existing readable");
  ExpectError([&] { SafetensorsFile::Read(dir.File("")); }, ": is a directory",
              "(expected a .safetensors file)");
  ExpectError([] { SafetensorsFile::Read("/dev/null"); }, "/dev/null: is not a regular file",
              "(expected");
  const std::string cut = dir.File("cut.safetensors");
  WriteFileBytes(cut, {1, 2, 3});
  ExpectError([&] { SafetensorsFile::Read(cut); }, "cut.safetensors: file is 3 bytes", "too short");
  WriteFileBytes(cut, WithLength(uint64_t{1} << 62, "{}"));
  ExpectError([&] { SafetensorsFile::Read(cut); }, "cut.safetensors: header length", "too large");
  WriteFileBytes(cut, MakeFile("{" + Entry("w", "F32", "[1]", 0, 4) + "}", 3));
  ExpectError([&] { SafetensorsFile::Read(cut); }, "cut.safetensors: tensor 'w'",
              "go past the data section");
}

TEST(SafetensorsTest, WriteRefusesBadEntries) {
  TempDir dir("qkv_st_");
  const std::string path = dir.File("w.safetensors");
  const std::vector<float> six(6, 1.0f);
  auto write = [&](SafetensorsEntry e) {
    return [&path, e] { WriteSafetensors(path, std::span<const SafetensorsEntry>(&e, 1)); };
  };
  ExpectError(write({"w", {6}, six, "I64"}), "entry 'w' has dtype 'I64', which cannot be written",
              "(expected F32, F16 or BF16)");
  ExpectError(write({"w", {6}, six, "F64"}), "dtype 'F64'", "F32, F16 or BF16");
  ExpectError(write({"w", {2, 2}, six, "F32"}), "entry 'w' has shape [2, 2] and 6 values",
              "as many values as the shape holds");
  ExpectError(write({"w", {-2, -3}, six, "F32"}), "has shape [-2, -3]", "dimensions >= 0");
  ExpectError(write({"w", {1, 1, 1, 1, 1, 1, 1, 1, 6}, six, "F32"}), "shape", "rank <= 8");
  ExpectError(write({"__metadata__", {6}, six, "F32"}), "reserved", "other than __metadata__");
  ExpectError(write({"\xff", {6}, six, "F32"}), "cannot write the header", "UTF-8");
  const SafetensorsEntry twice[] = {{"w", {6}, six, "F32"}, {"w", {6}, six, "F16"}};
  ExpectError([&] { WriteSafetensors(path, twice); }, "entry 'w' repeats a name", "unique names");
  EXPECT_FALSE(fs::exists(path));
}

TEST(SafetensorsTest, WriteRemovesThePartialFileOnIoFailure) {
  TempDir dir("qkv_st_");
  const std::vector<float> one = {1.0f};
  const SafetensorsEntry entry[] = {{"w", {1}, one, "F32"}};
  ExpectError([&] { WriteSafetensors(dir.File("no/such/dir.safetensors"), entry); },
              "dir.safetensors: cannot create: ", "(expected a writable path");

  // A file size limit makes the write fail half way (EFBIG instead of SIGXFSZ).
  const std::vector<float> big(1 << 16, 0.5f);
  const SafetensorsEntry big_entry[] = {{"w", {1 << 16}, big, "F32"}};
  const std::string path = dir.File("big.safetensors");
  rlimit old_limit;
  ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &old_limit), 0);
  const auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
  rlimit limit = old_limit;
  limit.rlim_cur = 4096;
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &limit), 0);
  std::string message;
  try {
    WriteSafetensors(path, big_entry);
  } catch (const Error& e) {
    message = e.what();
  }
  setrlimit(RLIMIT_FSIZE, &old_limit);
  std::signal(SIGXFSZ, old_handler);
  EXPECT_NE(message.find("big.safetensors: write failed: "), std::string::npos) << message;
  EXPECT_FALSE(fs::exists(path));
  // Without the limit the same write succeeds.
  WriteSafetensors(path, big_entry);
  EXPECT_EQ(SafetensorsFile::Read(path).LoadFloat32("w", Shape{1 << 16}), big);
}

}  // namespace
}  // namespace qkv
