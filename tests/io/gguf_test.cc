// Tests of the GGUF reader (src/io/gguf.cc): files built here by a small
// writer, valid ones and corrupted ones, and the real SmolLM2 model.
#include "qkv/gguf.h"

#include <fcntl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <future>
#include <random>
#include <string>
#include <vector>

#include "file_test_util.h"
#include "models/model_test_util.h"
#include "qkv/error.h"

namespace qkv {
namespace {

using ::testing::HasSubstr;
using test::Bytes;
using test::ExpectError;
using test::TempDir;

// Value type tags (GgufValueType) and ggml tensor types, as file numbers.
constexpr uint32_t kU8 = 0, kI8 = 1, kU16 = 2, kI16 = 3, kU32 = 4, kI32 = 5, kF32v = 6,
                   kBool = 7, kStr = 8, kArr = 9, kU64 = 10, kI64 = 11, kF64v = 12;
constexpr uint32_t kF32 = 0, kF16 = 1, kQ4_1 = 3, kQ8_0 = 8;

void Put(Bytes& b, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) b.push_back(i < 8 ? static_cast<unsigned char>(v >> (8 * i)) : 0);
}
Bytes Le(uint64_t v, int n) {
  Bytes b;
  Put(b, v, n);
  return b;
}
Bytes Cat(std::initializer_list<Bytes> parts) {
  Bytes out;
  for (const Bytes& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}
// A gguf string: uint64 length, bytes.
Bytes GStr(const std::string& s) {
  Bytes b = Le(s.size(), 8);
  b.insert(b.end(), s.begin(), s.end());
  return b;
}
Bytes F32Bytes(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return Le(u, 4);
}
Bytes F64Bytes(double d) {
  uint64_t u;
  std::memcpy(&u, &d, 8);
  return Le(u, 8);
}
// The value part of an array: element type, count, elements.
Bytes ArrayValue(uint32_t element_type, uint64_t count, const Bytes& elements) {
  return Cat({Le(element_type, 4), Le(count, 8), elements});
}

// Builds GGUF files: metadata and tensors in order, then the header, padding
// and data. Offsets are placed automatically unless given.
class GgufWriter {
 public:
  explicit GgufWriter(uint32_t version = 3) : version_(version) {}

  // Adds a metadata entry whose value (after the type tag) is `value`.
  GgufWriter& Kv(const std::string& key, uint32_t type, const Bytes& value) {
    kvs_ = Cat({kvs_, GStr(key), Le(type, 4), value});
    ++kv_count_;
    return *this;
  }
  GgufWriter& Alignment(uint32_t a) {
    alignment_ = a;
    return Kv("general.alignment", kU32, Le(a, 4));
  }
  // Adds a tensor whose `data_bytes` bytes go at the next aligned offset.
  GgufWriter& Tensor(const std::string& name, std::vector<uint64_t> ne, uint32_t type,
                     size_t data_bytes) {
    while (data_.size() % alignment_ != 0) data_.push_back(0);
    const uint64_t offset = data_.size();
    for (size_t i = 0; i < data_bytes; ++i) data_.push_back(static_cast<unsigned char>(i * 7 + 1));
    return TensorInfo(name, ne, type, offset);
  }
  // Adds a tensor info only, with any offset.
  GgufWriter& TensorInfo(const std::string& name, std::vector<uint64_t> ne, uint32_t type,
                         uint64_t offset) {
    Bytes info = Cat({GStr(name), Le(ne.size(), 4)});
    for (uint64_t n : ne) Put(info, n, 8);
    infos_ = Cat({infos_, info, Le(type, 4), Le(offset, 8)});
    ++tensor_count_;
    return *this;
  }
  GgufWriter& Data(const Bytes& extra) {
    data_ = Cat({data_, extra});
    return *this;
  }

  Bytes Build() const {
    Bytes b = {'G', 'G', 'U', 'F'};
    Put(b, version_, 4);
    Put(b, tensor_count_, 8);
    Put(b, kv_count_, 8);
    b = Cat({b, kvs_, infos_});
    if (tensor_count_ == 0 && data_.empty()) return b;
    while (b.size() % alignment_ != 0) b.push_back(0);
    return Cat({b, data_});
  }

 private:
  uint32_t version_;
  uint64_t alignment_ = 32;
  uint64_t kv_count_ = 0, tensor_count_ = 0;
  Bytes kvs_, infos_, data_;
};

GgufFile Parse(const Bytes& b) { return GgufFile::Parse(b, "t.gguf"); }

// Parses a copy of `b` and sets *base to where the parsed file's byte 0 is
// (a moved vector keeps its buffer).
GgufFile ParseAt(const Bytes& b, const unsigned char** base) {
  Bytes copy = b;
  *base = copy.data();
  return GgufFile::Parse(std::move(copy), "t.gguf");
}

// Expects Parse(b) to throw a one-line qkv::Error naming the file and `fragment`.
void ExpectBad(const Bytes& b, const std::string& fragment, const std::string& fragment2 = "") {
  ExpectError([&] { Parse(b); }, "t.gguf: ", fragment);
  if (!fragment2.empty()) ExpectError([&] { Parse(b); }, fragment, fragment2);
}

// A small valid file: two metadata entries and three tensors, the last one
// ending at the end of the file.
Bytes SmallFile() {
  return GgufWriter()
      .Kv("general.architecture", kStr, GStr("llama"))
      .Kv("llama.block_count", kU32, Le(2, 4))
      .Kv("tokenizer.ggml.tokens", kArr, ArrayValue(kStr, 2, Cat({GStr("a"), GStr("bc")})))
      .Tensor("w", {32, 2}, kQ4_1, 2 * 20)
      .Tensor("b", {3}, kF32, 12)
      .Tensor("e", {32, 1}, kQ8_0, 34)
      .Build();
}

// Touches everything a parsed file exposes, so that ASan sees a bad span.
uint64_t TouchAll(const GgufFile& f) {
  uint64_t sum = 0;
  for (const auto& t : f.tensors()) {
    for (unsigned char c : t.bytes) sum += c;
  }
  for (const auto& [key, v] : f.metadata()) {
    for (unsigned char c : v.raw) sum += c;
    for (const auto& s : v.strings) sum += s.size();
    try {
      sum += static_cast<uint64_t>(f.GetInt(key));
    } catch (const Error&) {
    }
    try {
      sum += static_cast<uint64_t>(f.GetIntArray(key).size());
    } catch (const Error&) {
    }
    try {
      sum += static_cast<uint64_t>(f.GetFloatArray(key).size());
    } catch (const Error&) {
    }
  }
  return sum;
}

TEST(GgufTest, TypeLayoutsMatchGgml) {
  int64_t values = 0, bytes = 0;
  const struct {
    uint32_t type;
    const char* name;
    int64_t values, bytes;
  } kCases[] = {{0, "F32", 1, 4},       {1, "F16", 1, 2},       {30, "BF16", 1, 2},
                {2, "Q4_0", 32, 18},    {3, "Q4_1", 32, 20},    {6, "Q5_0", 32, 22},
                {7, "Q5_1", 32, 24},    {8, "Q8_0", 32, 34},    {9, "Q8_1", 32, 36},
                {10, "Q2_K", 256, 84},  {11, "Q3_K", 256, 110}, {12, "Q4_K", 256, 144},
                {13, "Q5_K", 256, 176}, {14, "Q6_K", 256, 210}, {15, "Q8_K", 256, 292}};
  for (const auto& c : kCases) {
    ASSERT_TRUE(GgmlTypeLayout(c.type, &values, &bytes)) << c.name;
    EXPECT_EQ(values, c.values) << c.name;
    EXPECT_EQ(bytes, c.bytes) << c.name;
    EXPECT_EQ(GgmlTypeName(c.type), c.name);
  }
  EXPECT_FALSE(GgmlTypeLayout(16, &values, &bytes));
  EXPECT_EQ(GgmlTypeName(16), "IQ2_XXS");
  EXPECT_EQ(GgmlTypeName(4), "type 4");
  EXPECT_EQ(GgmlTypeName(99), "type 99");
}

TEST(GgufTest, ParsesEveryMetadataType) {
  for (uint32_t version : {2u, 3u}) {
    const Bytes nested = ArrayValue(
        kArr, 2,
        Cat({ArrayValue(kI16, 2, Cat({Le(0xFFFF, 2), Le(5, 2)})), ArrayValue(kStr, 1, GStr("x"))}));
    const Bytes b =
        GgufWriter(version)
            .Kv("u8", kU8, Le(200, 1))
            .Kv("i8", kI8, Le(0x80, 1))
            .Kv("u16", kU16, Le(60000, 2))
            .Kv("i16", kI16, Le(0xFFFE, 2))
            .Kv("u32", kU32, Le(4000000000u, 4))
            .Kv("i32", kI32, Le(static_cast<uint32_t>(-7), 4))
            .Kv("f32", kF32v, F32Bytes(1.5f))
            .Kv("bool", kBool, Le(1, 1))
            .Kv("str", kStr, GStr("hello"))
            .Kv("u64", kU64, Le(~uint64_t{0}, 8))
            .Kv("i64", kI64, Le(static_cast<uint64_t>(-3), 8))
            .Kv("f64", kF64v, F64Bytes(0.25))
            .Kv("ints", kArr, ArrayValue(kI32, 3, Cat({Le(1, 4), Le(0xFFFFFFFF, 4), Le(3, 4)})))
            .Kv("floats", kArr, ArrayValue(kF32v, 2, Cat({F32Bytes(0.5f), F32Bytes(-2.f)})))
            .Kv("doubles", kArr, ArrayValue(kF64v, 1, F64Bytes(3.0)))
            .Kv("bools", kArr, ArrayValue(kBool, 2, Bytes{0, 1}))
            .Kv("strs", kArr, ArrayValue(kStr, 3, Cat({GStr("a"), GStr(""), GStr("ccc")})))
            .Kv("empty", kArr, ArrayValue(kU8, 0, {}))
            .Kv("nested", kArr, nested)
            .Build();
    const GgufFile f = Parse(b);
    EXPECT_EQ(f.version(), version);
    EXPECT_EQ(f.alignment(), 32u);
    EXPECT_EQ(f.metadata().size(), 19u);
    EXPECT_EQ(f.metadata()[0].first, "u8");
    EXPECT_TRUE(f.tensors().empty());
    EXPECT_EQ(f.GetInt("u8"), 200);
    EXPECT_EQ(f.GetInt("i8"), -128);
    EXPECT_EQ(f.GetInt("u16"), 60000);
    EXPECT_EQ(f.GetInt("i16"), -2);
    EXPECT_EQ(f.GetInt("u32"), 4000000000);
    EXPECT_EQ(f.GetInt("i32"), -7);
    EXPECT_EQ(f.GetFloat("f32"), 1.5);
    EXPECT_EQ(f.GetInt("bool"), 1);
    EXPECT_EQ(f.GetString("str"), "hello");
    EXPECT_EQ(f.FindMetadata("u64")->uint_value, ~uint64_t{0});
    EXPECT_EQ(f.GetInt("i64"), -3);
    EXPECT_EQ(f.FindMetadata("i64")->uint_value, 0u);
    EXPECT_EQ(f.GetFloat("f64"), 0.25);
    EXPECT_EQ(f.GetFloat("u32"), 4e9);
    EXPECT_EQ(f.GetIntArray("ints"), (std::vector<int64_t>{1, -1, 3}));
    EXPECT_EQ(f.GetFloatArray("floats"), (std::vector<double>{0.5, -2.0}));
    EXPECT_EQ(f.GetFloatArray("doubles"), (std::vector<double>{3.0}));
    EXPECT_EQ(f.FindMetadata("bools")->raw.size(), 2u);
    EXPECT_EQ(f.GetStringArray("strs"), (std::vector<std::string>{"a", "", "ccc"}));
    EXPECT_TRUE(f.GetIntArray("empty").empty());
    const GgufValue* n = f.FindMetadata("nested");
    ASSERT_NE(n, nullptr);
    EXPECT_EQ(n->element_type, GgufValueType::kArray);
    ASSERT_EQ(n->arrays.size(), 2u);
    EXPECT_EQ(n->arrays[0].element_type, GgufValueType::kInt16);
    EXPECT_EQ(n->arrays[0].count, 2u);
    EXPECT_EQ(n->arrays[1].strings, std::vector<std::string>{"x"});
    EXPECT_EQ(f.FindMetadata("absent"), nullptr);
  }
}

TEST(GgufTest, ParsesTensorsOfEachType) {
  const Bytes b = GgufWriter()
                      .Kv("general.architecture", kStr, GStr("test"))
                      .Tensor("f32", {3, 2}, kF32, 24)
                      .Tensor("f16", {5}, kF16, 10)
                      .Tensor("q4_1", {64, 3, 2}, kQ4_1, 2 * 20 * 6)
                      .Tensor("q8_0", {32, 1, 1, 2}, kQ8_0, 34 * 2)
                      .Build();
  const unsigned char* base = nullptr;
  const GgufFile f = ParseAt(b, &base);
  ASSERT_EQ(f.tensors().size(), 4u);
  const GgufFile::Tensor* t = f.Find("q4_1");
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->type, static_cast<uint32_t>(GgmlType::kQ4_1));
  EXPECT_EQ(t->ne, (std::vector<int64_t>{64, 3, 2}));
  EXPECT_EQ(t->shape, (std::vector<int64_t>{2, 3, 64}));
  EXPECT_EQ(t->bytes.size(), 240u);
  EXPECT_EQ(f.Find("f32")->bytes.size(), 24u);
  EXPECT_EQ(f.Find("f16")->bytes.size(), 10u);
  EXPECT_EQ(f.Find("q8_0")->bytes.size(), 68u);
  EXPECT_EQ(f.Find("nope"), nullptr);
  // Each tensor's bytes start at data start + offset; the writer's pattern
  // starts every tensor with byte 1.
  for (const auto& tensor : f.tensors()) {
    EXPECT_EQ(tensor.offset % 32, 0u);
    EXPECT_EQ(tensor.bytes[0], 1);
  }
  EXPECT_EQ(f.Find("q8_0")->bytes.data() + 68, base + b.size());
  EXPECT_EQ(f.Find("q8_0")->bytes.data() + 68 - f.Find("f32")->bytes.data(),
            static_cast<ptrdiff_t>(f.Find("q8_0")->offset + 68));
  EXPECT_EQ(f.file_size(), b.size());
}

TEST(GgufTest, AlignmentVariants) {
  for (uint32_t alignment : {1u, 8u, 64u, 4096u}) {
    const Bytes b = GgufWriter()
                        .Alignment(alignment)
                        .Tensor("a", {3}, kF32, 12)
                        .Tensor("b", {1}, kF16, 2)
                        .Tensor("c", {2}, kF32, 8)
                        .Build();
    const unsigned char* base = nullptr;
    const GgufFile f = ParseAt(b, &base);
    EXPECT_EQ(f.alignment(), alignment);
    const auto& t = f.tensors();
    ASSERT_EQ(t.size(), 3u);
    EXPECT_EQ(t[2].bytes.data() + 8, base + b.size()) << alignment;
    EXPECT_EQ(t[1].offset, (12 + alignment - 1) / alignment * alignment);
    EXPECT_EQ(static_cast<uint64_t>(t[0].bytes.data() - base) % alignment, 0u);
    EXPECT_GT(t[0].bytes.data() - base, 0);
  }
}

TEST(GgufTest, MovedFileKeepsItsBytes) {
  GgufFile f = Parse(SmallFile());
  const unsigned char* p = f.Find("b")->bytes.data();
  GgufFile g = std::move(f);
  EXPECT_EQ(g.Find("b")->bytes.data(), p);
  EXPECT_EQ(g.GetString("general.architecture"), "llama");
  EXPECT_EQ(TouchAll(g), TouchAll(g));
}

TEST(GgufTest, RefusesBadHeaders) {
  Bytes b = SmallFile();
  b[0] = 'X';
  ExpectBad(b, "bad magic 'XGUF'", "\"GGUF\"");
  ExpectBad({}, "bad magic ''");
  b = SmallFile();
  b[4] = 1;
  ExpectBad(b, "GGUF version 1", "version 2 or 3");
  b[4] = 4;
  ExpectBad(b, "unsupported GGUF version 4", "version 2 or 3");
  b[4] = 0;
  b[7] = 3;
  ExpectBad(b, "big-endian");
}

TEST(GgufTest, EveryTruncationThrows) {
  const Bytes full = SmallFile();
  for (size_t n = 0; n < full.size(); ++n) {
    EXPECT_THROW(Parse(Bytes(full.begin(), full.begin() + static_cast<ptrdiff_t>(n))), Error) << n;
  }
  EXPECT_NO_THROW(Parse(full));
  ExpectBad(Bytes(full.begin(), full.begin() + 30), "tensor count 3 cannot fit");
  const Bytes one = GgufWriter().Kv("k", kU32, Le(1, 4)).Build();
  ExpectBad(Bytes(one.begin(), one.end() - 1), "truncated at byte 37 reading metadata 'k'",
            "(4 bytes, 3 left)");
  ExpectBad(Bytes(full.begin(), full.end() - 1), "past the end");
}

TEST(GgufTest, RefusesHugeCountsAndLengths) {
  // Key length: the first key's length field is at byte 24.
  Bytes b = SmallFile();
  std::memset(&b[24], 0xFF, 8);
  ExpectBad(b, "key of metadata entry 0", "at most 65536 bytes");
  b = SmallFile();
  std::memset(&b[24], 0, 8);
  b[26] = 1;  // 65536: within the name cap but not the file
  ExpectBad(b, "string length 65536", "within the file");
  // A string value too long for the file.
  b = GgufWriter().Kv("s", kStr, Cat({Le(1000, 8), Bytes{'x'}})).Build();
  ExpectBad(b, "string length 1000 of metadata 's'");
  // Array counts: strings take >= 8 bytes each, arrays >= 12, scalars their size.
  b = GgufWriter().Kv("a", kArr, ArrayValue(kStr, 3, Cat({GStr(""), GStr("")}))).Build();
  ExpectBad(b, "array count 3 of metadata 'a'", "8 bytes per element");
  b = GgufWriter().Kv("a", kArr, ArrayValue(kU32, uint64_t{1} << 62, Le(0, 8))).Build();
  ExpectBad(b, "array count 4611686018427387904", "fits in the file");
  b = GgufWriter().Kv("a", kArr, ArrayValue(kArr, ~uint64_t{0}, Le(0, 16))).Build();
  ExpectBad(b, "12 bytes per element");
  b = GgufWriter().Kv("a", kArr, ArrayValue(13, 1, Le(0, 16))).Build();
  ExpectBad(b, "elements of unknown value type 13");
  b = GgufWriter().Kv("a", 13, Le(0, 16)).Build();
  ExpectBad(b, "metadata 'a' has unknown value type 13");
  // Tensor and metadata counts beyond what the bytes left could hold.
  b = SmallFile();
  std::memset(&b[8], 0xFF, 8);
  ExpectBad(b, "tensor count 18446744073709551615", "bytes left");
  b = SmallFile();
  std::memcpy(&b[16], Le(uint64_t{1} << 40, 8).data(), 8);
  ExpectBad(b, "metadata count 1099511627776", "bytes left");
  // Key too long for the cap even inside a large enough file.
  b = GgufWriter().Kv(std::string(70000, 'k'), kU8, Le(0, 1)).Build();
  ExpectBad(b, "is 70000 bytes long", "at most 65536");
}

TEST(GgufTest, LimitsArrayNesting) {
  // depth arrays, innermost an empty uint8 array.
  auto nest = [](int depth) {
    Bytes v = ArrayValue(kU8, 0, {});
    for (int d = 1; d < depth; ++d) v = ArrayValue(kArr, 1, v);
    return GgufWriter().Kv("n", kArr, v).Build();
  };
  EXPECT_NO_THROW(Parse(nest(4)));
  ExpectBad(nest(5), "nests arrays 5 deep", "at most 4 deep");
}

TEST(GgufTest, RefusesBadTensorInfos) {
  ExpectBad(GgufWriter().TensorInfo("t", {}, kF32, 0).Data(Le(0, 4)).Build(),
            "tensor 't' has n_dims 0", "1..4");
  ExpectBad(GgufWriter().TensorInfo("t", {1, 1, 1, 1, 1}, kF32, 0).Data(Le(0, 4)).Build(),
            "tensor 't' has n_dims 5");
  ExpectBad(GgufWriter().TensorInfo("t", {4, 0}, kF32, 0).Data(Le(0, 16)).Build(),
            "tensor 't' has ne[1] = 0", "every dimension >= 1");
  ExpectBad(GgufWriter().TensorInfo("t", {~uint64_t{0}}, kF32, 0).Data(Le(0, 16)).Build(),
            "tensor 't' has ne[0] = -1");
  ExpectBad(GgufWriter()
                .TensorInfo("t", {uint64_t{1} << 31, uint64_t{1} << 31, uint64_t{1} << 2}, kF32, 0)
                .Data(Le(0, 16))
                .Build(),
            "tensor 't' byte size overflows");
  ExpectBad(GgufWriter().TensorInfo("t", {48, 2}, kQ4_1, 0).Data(Bytes(80)).Build(),
            "tensor 't' has ne[0] = 48, not a multiple of the Q4_1 block of 32");
  ExpectBad(GgufWriter().TensorInfo("t", {4}, 99, 0).Data(Bytes(16)).Build(),
            "tensor 't' has ggml type 99,", "F32");
  ExpectBad(GgufWriter().TensorInfo("t", {256}, 16, 0).Data(Bytes(256)).Build(),
            "ggml type 16 (IQ2_XXS)");
  ExpectBad(GgufWriter().Tensor("a", {4}, kF32, 16).TensorInfo("t", {4}, kF32, 16).Data(Bytes(64)).Build(),
            "tensor 't' offset 16 is not aligned", "multiple of the alignment 32");
  ExpectBad(GgufWriter().Tensor("a", {4}, kF32, 16).TensorInfo("t", {4}, kF32, 32).Build(),
            "tensor 't' data [32, +16) ends past the end", "inside the file");
  ExpectBad(GgufWriter().Tensor("a", {4}, kF32, 16).TensorInfo("t", {4}, kF32, ~uint64_t{31}).Build(),
            "past the end");
  ExpectBad(GgufWriter().Tensor("a", {16}, kF32, 64).TensorInfo("t", {4}, kF32, 32).Build(),
            "tensors 'a' and 't' overlap at data byte 32", "disjoint");
  ExpectBad(GgufWriter().Tensor("a", {4}, kF32, 16).Tensor("a", {4}, kF32, 16).Build(),
            "duplicate tensor name 'a'");
  ExpectBad(GgufWriter().TensorInfo(std::string(70000, 'n'), {4}, kF32, 0).Build(),
            "name of tensor 0", "at most 65536");
  // A tensor of zero bytes cannot exist (ne >= 1), so two equal offsets overlap.
  ExpectBad(GgufWriter().Tensor("a", {8}, kF32, 32).TensorInfo("b", {1}, kF32, 0).Build(),
            "overlap");
}

TEST(GgufTest, RefusesBadMetadata) {
  ExpectBad(GgufWriter().Kv("k", kU8, Le(1, 1)).Kv("k", kU8, Le(2, 1)).Build(),
            "duplicate metadata key 'k'", "unique keys");
  ExpectBad(GgufWriter().Kv("flag", kBool, Le(2, 1)).Build(), "metadata 'flag' is a bool of value 2",
            "0 or 1");
  ExpectBad(GgufWriter().Kv("flags", kArr, ArrayValue(kBool, 3, Bytes{0, 1, 255})).Build(),
            "element 2 of metadata 'flags' is a bool of value 255");
  ExpectBad(GgufWriter().Alignment(0).Build(), "general.alignment is 0", "power of two");
  ExpectBad(GgufWriter().Alignment(3).Build(), "general.alignment is 3");
  ExpectBad(GgufWriter().Alignment(1u << 21).Build(), "general.alignment is 2097152");
  ExpectBad(GgufWriter().Kv("general.alignment", kU64, Le(32, 8)).Build(),
            "'general.alignment' has type uint64", "uint32");
  // Non-printable key bytes are shown as '?', keeping the message one line.
  ExpectBad(GgufWriter().Kv("a\nb", kU8, Le(0, 1)).Kv("a\nb", kU8, Le(0, 1)).Build(), "'a?b'");
}

TEST(GgufTest, GettersCheckTypes) {
  const GgufFile f = Parse(GgufWriter()
                               .Kv("s", kStr, GStr("x"))
                               .Kv("u", kU32, Le(7, 4))
                               .Kv("big", kU64, Le(~uint64_t{0}, 8))
                               .Kv("f", kF32v, F32Bytes(2.f))
                               .Kv("ints", kArr, ArrayValue(kU64, 1, Le(~uint64_t{0}, 8)))
                               .Kv("strs", kArr, ArrayValue(kStr, 1, GStr("y")))
                               .Build());
  ExpectError([&] { f.GetString("u"); }, "t.gguf: metadata 'u' has type uint32", "(expected string)");
  ExpectError([&] { f.GetInt("s"); }, "metadata 's' has type string", "integer");
  ExpectError([&] { f.GetInt("f"); }, "metadata 'f' has type float32", "integer");
  ExpectError([&] { f.GetInt("big"); }, "metadata 'big' is 18446744073709551615", "below 2^63");
  ExpectError([&] { f.GetFloat("s"); }, "metadata 's' has type string", "float32");
  ExpectError([&] { f.GetStringArray("ints"); }, "metadata 'ints' has type array of uint64",
              "array of string");
  ExpectError([&] { f.GetIntArray("strs"); }, "'strs' has type array of string", "integer");
  ExpectError([&] { f.GetIntArray("ints"); }, "element 0 of metadata 'ints'", "below 2^63");
  ExpectError([&] { f.GetFloatArray("s"); }, "'s' has type string", "array of float32");
  ExpectError([&] { f.GetString("missing"); }, "metadata 'missing' missing", "present");
  EXPECT_EQ(f.GetFloat("u"), 7.0);
  EXPECT_EQ(f.GetFloat("f"), 2.0);
}

// Random corruptions of a valid file: each must parse or throw qkv::Error,
// and whatever parses must expose only in-bounds bytes (ASan checks).
TEST(GgufTest, MutatedFilesParseOrThrow) {
  const Bytes base = GgufWriter()
                              .Kv("general.architecture", kStr, GStr("llama"))
                              .Kv("n", kArr, ArrayValue(kArr, 1, ArrayValue(kI16, 2, Le(1, 4))))
                              .Kv("f", kBool, Le(1, 1))
                              .Kv("g", kF64v, F64Bytes(1))
                              .Tensor("w", {32, 2}, kQ4_1, 40)
                              .Tensor("e", {32}, kQ8_0, 34)
                              .Build();
  std::mt19937 rng(15);
  int parsed = 0, refused = 0;
  for (int i = 0; i < 2000; ++i) {
    Bytes b = base;
    const int edits = 1 + static_cast<int>(rng() % 3);
    for (int e = 0; e < edits; ++e) {
      const size_t pos = rng() % b.size();
      switch (rng() % 4) {
        case 0:  // one random byte
          b[pos] = static_cast<unsigned char>(rng());
          break;
        case 1:  // one flipped bit
          b[pos] ^= static_cast<unsigned char>(1u << (rng() % 8));
          break;
        case 2:  // a run of 0xFF, as in a huge length or count
          for (size_t j = pos; j < b.size() && j < pos + 1 + rng() % 8; ++j) b[j] = 0xFF;
          break;
        default:  // a small integer, as in a plausible wrong count
          b[pos] = static_cast<unsigned char>(rng() % 8);
          break;
      }
    }
    if (rng() % 8 == 0) b.resize(rng() % b.size());
    try {
      const GgufFile f = Parse(b);
      TouchAll(f);
      ++parsed;
    } catch (const Error& e) {
      EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos) << e.what();
      ++refused;
    }
  }
  EXPECT_GT(parsed, 0);
  EXPECT_GT(refused, 0);
}

TEST(GgufTest, OpenMapsAFile) {
  TempDir dir("qkv_gguf_");
  const std::string path = dir.File("small.gguf");
  const Bytes b = SmallFile();
  std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(b.data()),
                                              static_cast<std::streamsize>(b.size()));
  GgufFile f = GgufFile::Open(path);
  EXPECT_EQ(f.name(), path);
  EXPECT_EQ(f.file_size(), b.size());
  EXPECT_EQ(f.GetStringArray("tokenizer.ggml.tokens"), (std::vector<std::string>{"a", "bc"}));
  const GgufFile g = std::move(f);
  ASSERT_NE(g.Find("e"), nullptr);
  EXPECT_EQ(std::memcmp(g.Find("e")->bytes.data(), b.data() + b.size() - 34, 34), 0);

  ExpectError([&] { GgufFile::Open(dir.File("absent.gguf")); }, "absent.gguf: cannot open", "");
  std::ofstream(dir.File("empty.gguf")).close();
  ExpectError([&] { GgufFile::Open(dir.File("empty.gguf")); }, "empty.gguf: is empty", "GGUF");
  ExpectError([&] { GgufFile::Open(dir.File("")); }, "is a directory", "GGUF file");
  // A corrupt file on disk names its path.
  const std::string bad = dir.File("bad.gguf");
  std::ofstream(bad, std::ios::binary).write(reinterpret_cast<const char*>(b.data()), 40);
  ExpectError([&] { GgufFile::Open(bad); }, "bad.gguf: ", "cannot fit");
}

// A FIFO with no writer would block a plain open() forever; Open refuses it
// at once. On a hang, a writer is opened to unblock the reader and fail.
TEST(GgufTest, OpenRefusesFifoWithoutBlocking) {
  TempDir dir("qkv_gguf_");
  const std::string fifo = dir.File("model.gguf");
  ASSERT_EQ(mkfifo(fifo.c_str(), 0644), 0) << std::strerror(errno);
  auto result = std::async(std::launch::async, [&fifo]() -> std::string {
    try {
      GgufFile::Open(fifo);
      return "no error";
    } catch (const Error& e) {
      return e.what();
    }
  });
  if (result.wait_for(std::chrono::seconds(10)) != std::future_status::ready) {
    ADD_FAILURE() << "Open blocked on a FIFO";
    const int fd = open(fifo.c_str(), O_WRONLY | O_NONBLOCK);
    if (fd >= 0) close(fd);
  }
  const std::string message = result.get();
  EXPECT_THAT(message, HasSubstr("model.gguf: is not a regular file (a FIFO)"));
}

// The real model: SmolLM2-135M-Instruct, Q4_1 (make models); a missing model
// fails the test. Facts checked against the file with a standalone Python reader.
TEST(GgufTest, ReadsSmolLm2) {
  if (!test::HaveSmolLm2()) return;
  const GgufFile f = GgufFile::Open(test::kSmolLm2);
  EXPECT_EQ(f.version(), 3u);
  EXPECT_EQ(f.alignment(), 32u);
  EXPECT_EQ(f.metadata().size(), 33u);
  EXPECT_EQ(f.GetString("general.architecture"), "llama");
  EXPECT_EQ(f.GetInt("llama.block_count"), 30);
  EXPECT_EQ(f.GetInt("llama.context_length"), 8192);
  EXPECT_EQ(f.GetInt("llama.embedding_length"), 576);
  EXPECT_EQ(f.GetInt("llama.feed_forward_length"), 1536);
  EXPECT_EQ(f.GetInt("llama.attention.head_count"), 9);
  EXPECT_EQ(f.GetInt("llama.attention.head_count_kv"), 3);
  EXPECT_EQ(f.GetInt("llama.rope.dimension_count"), 64);
  EXPECT_EQ(f.GetInt("llama.vocab_size"), 49152);
  EXPECT_EQ(f.GetFloat("llama.rope.freq_base"), 100000.0);
  EXPECT_FLOAT_EQ(static_cast<float>(f.GetFloat("llama.attention.layer_norm_rms_epsilon")), 1e-5f);
  EXPECT_EQ(f.GetString("tokenizer.ggml.model"), "gpt2");
  EXPECT_EQ(f.GetString("tokenizer.ggml.pre"), "smollm");
  EXPECT_EQ(f.GetInt("tokenizer.ggml.bos_token_id"), 1);
  EXPECT_EQ(f.GetInt("tokenizer.ggml.eos_token_id"), 2);
  EXPECT_EQ(f.GetInt("tokenizer.ggml.add_bos_token"), 0);
  const auto& tokens = f.GetStringArray("tokenizer.ggml.tokens");
  ASSERT_EQ(tokens.size(), 49152u);
  EXPECT_EQ(tokens[0], "<|endoftext|>");
  EXPECT_EQ(tokens[1], "<|im_start|>");
  const auto& merges = f.GetStringArray("tokenizer.ggml.merges");
  ASSERT_EQ(merges.size(), 48900u);
  EXPECT_EQ(merges[0], "\xC4\xA0 t");  // "Ġ t"
  EXPECT_EQ(f.GetIntArray("tokenizer.ggml.token_type").size(), 49152u);
  EXPECT_THAT(f.GetString("tokenizer.chat_template"), HasSubstr("<|im_start|>"));

  ASSERT_EQ(f.tensors().size(), 272u);
  int q4_1 = 0, f32 = 0, q8_0 = 0;
  uint64_t total = 0;
  for (const auto& t : f.tensors()) {
    q4_1 += t.type == static_cast<uint32_t>(GgmlType::kQ4_1);
    f32 += t.type == static_cast<uint32_t>(GgmlType::kF32);
    q8_0 += t.type == static_cast<uint32_t>(GgmlType::kQ8_0);
    total += t.bytes.size();
  }
  EXPECT_EQ(q4_1, 210);
  EXPECT_EQ(f32, 61);
  EXPECT_EQ(q8_0, 1);
  EXPECT_LE(total, f.file_size());
  const GgufFile::Tensor* embd = f.Find("token_embd.weight");
  ASSERT_NE(embd, nullptr);
  EXPECT_EQ(embd->type, static_cast<uint32_t>(GgmlType::kQ8_0));
  EXPECT_EQ(embd->ne, (std::vector<int64_t>{576, 49152}));
  EXPECT_EQ(embd->shape, (std::vector<int64_t>{49152, 576}));
  EXPECT_EQ(embd->offset, 0u);
  EXPECT_EQ(embd->bytes.size(), 576u / 32 * 34 * 49152);
  const GgufFile::Tensor* down = f.Find("blk.0.ffn_down.weight");
  ASSERT_NE(down, nullptr);
  EXPECT_EQ(down->ne, (std::vector<int64_t>{1536, 576}));
  EXPECT_EQ(down->bytes.size(), 1536u / 32 * 20 * 576);
}

}  // namespace
}  // namespace qkv
