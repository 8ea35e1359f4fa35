// Tests for qkv/npy.h: round trips, files written by NumPy
// (tests/testdata/npy/make_npy_fixtures.py) and every refused malformation.
#include "qkv/npy.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "file_test_util.h"
#include "qkv/error.h"

namespace qkv {
namespace {

namespace fs = std::filesystem;

using test::Bytes;

const std::string kFixtureDir = QKV_TESTDATA_DIR "/npy/";
constexpr DType kAllDTypes[] = {DType::kFloat32, DType::kFloat16, DType::kFloat64,
                                DType::kBool,    DType::kInt32,   DType::kInt64};

using test::ExpectError;
using test::ReadFileBytes;
using test::TempDir;

// Builds .npy bytes: preamble of the given version, `dict` + '\n' as the
// header, then `data_bytes` zero bytes.
Bytes MakeNpy(const std::string& dict, size_t data_bytes, int major = 1) {
  const std::string header = dict + "\n";
  Bytes out = {0x93, 'N', 'U', 'M', 'P', 'Y', static_cast<unsigned char>(major), 0};
  const int len_bytes = major == 1 ? 2 : 4;
  for (int i = 0; i < len_bytes; ++i) out.push_back((header.size() >> (8 * i)) & 0xff);
  out.insert(out.end(), header.begin(), header.end());
  out.resize(out.size() + data_bytes, 0);
  return out;
}

std::string Dict(const std::string& descr, const std::string& shape,
                 const std::string& fortran = "False") {
  return "{'descr': '" + descr + "', 'fortran_order': " + fortran + ", 'shape': " + shape + ", }";
}

// Expects ParseNpy to throw a one-line qkv::Error "mem.npy: ... (expected ...)"
// containing `fragment`.
void ExpectParseError(const Bytes& file, const std::string& fragment) {
  SCOPED_TRACE("fragment: " + fragment);
  try {
    ParseNpy(file, "mem.npy");
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find(fragment), std::string::npos) << message;
    EXPECT_EQ(message.rfind("mem.npy: ", 0), 0u) << message;
    EXPECT_NE(message.find(" (expected "), std::string::npos) << message;
    EXPECT_EQ(message.back(), ')') << message;
    EXPECT_EQ(message.find('\n'), std::string::npos) << message;
  }
}

TEST(NpyTest, ShapeString) {
  EXPECT_EQ(NpyShapeString(std::vector<int64_t>{2, 3, 4}), "(2, 3, 4)");
  EXPECT_EQ(NpyShapeString(std::vector<int64_t>{5}), "(5,)");
  EXPECT_EQ(NpyShapeString(std::vector<int64_t>{}), "()");
}

TEST(NpyTest, RoundTripsEveryDTypeAndRank) {
  TempDir dir("qkv_npy_");
  const std::vector<std::vector<int64_t>> shapes = {{}, {5}, {2, 3}, {2, 1, 3, 2}, {0, 3}};
  for (DType dtype : kAllDTypes) {
    for (const auto& shape : shapes) {
      SCOPED_TRACE(std::string(DTypeName(dtype)) + " " + NpyShapeString(shape));
      int64_t numel = 1;
      for (int64_t dim : shape) numel *= dim;
      Bytes data(numel * DTypeSize(dtype));
      for (size_t i = 0; i < data.size(); ++i) {
        data[i] = dtype == DType::kBool ? i % 3 == 0 : static_cast<unsigned char>(i * 37 + 11);
      }
      const std::string path = dir.File("a.npy");
      WriteNpy(path, dtype, shape, data.data());

      const NpyArray read = ReadNpy(path);
      EXPECT_EQ(read.dtype, dtype);
      EXPECT_EQ(read.shape, shape);
      EXPECT_EQ(read.numel(), numel);
      EXPECT_EQ(read.bytes, data);
      // The header is padded so the data starts at a multiple of 64 bytes.
      const Bytes file = ReadFileBytes(path);
      EXPECT_EQ((file.size() - data.size()) % 64, 0u);
      EXPECT_EQ(file[file.size() - data.size() - 1], '\n');
      const NpyArray parsed = ParseNpy(file, path);
      EXPECT_EQ(parsed.shape, shape);
      EXPECT_EQ(parsed.bytes, data);
    }
  }
}

TEST(NpyTest, ReadsNumPyFixtures) {
  const NpyArray f32 = ReadNpy(kFixtureDir + "f32_2x3.npy");
  EXPECT_EQ(f32.dtype, DType::kFloat32);
  EXPECT_EQ(f32.shape, (std::vector<int64_t>{2, 3}));
  const std::vector<float> f32_want = {-1.0f, -0.5f, 0.0f, 0.5f, 1.0f, 1.5f};
  EXPECT_EQ(std::vector<float>(f32.data<float>(), f32.data<float>() + 6), f32_want);

  // 1, -2, 0.5 and 65504 (the largest half) as binary16 bits.
  const NpyArray f16 = ReadNpy(kFixtureDir + "f16_4.npy");
  EXPECT_EQ(f16.dtype, DType::kFloat16);
  EXPECT_EQ(f16.shape, (std::vector<int64_t>{4}));
  const std::vector<uint16_t> f16_want = {0x3C00, 0xC000, 0x3800, 0x7BFF};
  EXPECT_EQ(std::vector<uint16_t>(f16.data<uint16_t>(), f16.data<uint16_t>() + 4), f16_want);

  const NpyArray b = ReadNpy(kFixtureDir + "bool_2x2.npy");
  EXPECT_EQ(b.dtype, DType::kBool);
  EXPECT_EQ(b.shape, (std::vector<int64_t>{2, 2}));
  EXPECT_EQ(b.bytes, (Bytes{1, 0, 0, 1}));

  const NpyArray i64 = ReadNpy(kFixtureDir + "i64_3.npy");
  EXPECT_EQ(i64.dtype, DType::kInt64);
  const std::vector<int64_t> i64_want = {-1, 0, int64_t{1} << 40};
  EXPECT_EQ(std::vector<int64_t>(i64.data<int64_t>(), i64.data<int64_t>() + 3), i64_want);

  const NpyArray i32 = ReadNpy(kFixtureDir + "i32_0d.npy");
  EXPECT_EQ(i32.dtype, DType::kInt32);
  EXPECT_TRUE(i32.shape.empty());
  EXPECT_EQ(i32.numel(), 1);
  EXPECT_EQ(*i32.data<int32_t>(), 7);

  const NpyArray empty = ReadNpy(kFixtureDir + "f32_0x3.npy");
  EXPECT_EQ(empty.shape, (std::vector<int64_t>{0, 3}));
  EXPECT_EQ(empty.numel(), 0);
  EXPECT_TRUE(empty.bytes.empty());

  const NpyArray v2 = ReadNpy(kFixtureDir + "f64_v2.npy");
  EXPECT_EQ(v2.dtype, DType::kFloat64);
  EXPECT_EQ(std::vector<double>(v2.data<double>(), v2.data<double>() + 2),
            (std::vector<double>{1.5, -2.25}));

  const NpyArray v3 = ReadNpy(kFixtureDir + "f32_v3.npy");
  EXPECT_EQ(v3.dtype, DType::kFloat32);
  EXPECT_EQ(std::vector<float>(v3.data<float>(), v3.data<float>() + 2),
            (std::vector<float>{3.0f, 4.0f}));
}

// WriteNpy output is byte-identical to np.save for the same array.
TEST(NpyTest, WritesTheBytesNumPyWrites) {
  TempDir dir("qkv_npy_");
  for (const char* name :
       {"f32_2x3.npy", "f16_4.npy", "bool_2x2.npy", "i64_3.npy", "i32_0d.npy", "f32_0x3.npy"}) {
    SCOPED_TRACE(name);
    const NpyArray want = ReadNpy(kFixtureDir + name);
    const std::string path = dir.File(name);
    WriteNpy(path, want.dtype, want.shape, want.bytes.data());
    EXPECT_EQ(ReadFileBytes(path), ReadFileBytes(kFixtureDir + name));
  }
}

TEST(NpyTest, RefusesFortranOrderAndBigEndianFixtures) {
  ExpectError([] { ReadNpy(kFixtureDir + "f32_fortran.npy"); },
              "f32_fortran.npy: ", "Fortran-order");
  ExpectError([] { ReadNpy(kFixtureDir + "f32_big_endian.npy"); }, "big-endian",
              "(expected little-endian '<f4')");
}

TEST(NpyTest, ReadRefusesMissingFileAndDirectory) {
  TempDir dir("qkv_npy_");
  const std::string missing = dir.File("missing.npy");
  ExpectError([&] { ReadNpy(missing); }, missing + ": cannot open", "No such file");
  const std::string sub = dir.File("sub.npy");
  fs::create_directory(sub);
  ExpectError([&] { ReadNpy(sub); }, sub + ": ", "directory");
}

TEST(NpyTest, ReadRefusesTruncatedAndPaddedFiles) {
  TempDir dir("qkv_npy_");
  const std::string path = dir.File("a.npy");
  const std::vector<int64_t> shape = {2, 3};
  const std::vector<float> data(6, 1.0f);
  WriteNpy(path, DType::kFloat32, shape, data.data());
  fs::resize_file(path, fs::file_size(path) - 1);
  ExpectError([&] { ReadNpy(path); }, path + ": data is truncated", "(expected file size 152)");
  fs::resize_file(path, fs::file_size(path) + 2);
  ExpectError([&] { ReadNpy(path); }, path + ": trailing bytes", "(expected file size 152)");
  // A header claiming 4 TiB on a small file fails before the data is read.
  const Bytes huge = MakeNpy(Dict("<f4", "(1099511627776,)"), 100);
  std::ofstream(path, std::ios::binary | std::ios::trunc)
      .write(reinterpret_cast<const char*>(huge.data()), huge.size());
  ExpectError([&] { ReadNpy(path); }, path + ": data is truncated", "needs 4398046511104");
}

TEST(NpyTest, ParsesHeaderVariants) {
  // Key order, quotes, spacing, no trailing comma, Python 2 longs.
  const std::pair<std::string, std::vector<int64_t>> cases[] = {
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", {2, 3}},
      {"{'shape': (2,3), 'fortran_order': False, 'descr': '<f4'}", {2, 3}},
      {"{\"descr\":\"<f4\",\"fortran_order\":False,\"shape\":(6,)}", {6}},
      {"  {\t'descr' : '<f4' ,\n'fortran_order' : False , 'shape' : ( 1 , 2 , 3 , ) , }  ",
       {1, 2, 3}},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (2L, 3L), }", {2, 3}},
  };
  for (const auto& [dict, shape] : cases) {
    SCOPED_TRACE(dict);
    const NpyArray a = ParseNpy(MakeNpy(dict, 24), "mem.npy");
    EXPECT_EQ(a.dtype, DType::kFloat32);
    EXPECT_EQ(a.shape, shape);
  }
  const NpyArray scalar = ParseNpy(MakeNpy(Dict("<f8", "()"), 8), "mem.npy");
  EXPECT_TRUE(scalar.shape.empty());
  EXPECT_EQ(scalar.bytes.size(), 8u);
  // Bool has no byte order, so '<b1' (and '>b1') mean the same as '|b1'.
  EXPECT_EQ(ParseNpy(MakeNpy(Dict("<b1", "(2,)"), 2), "m").dtype, DType::kBool);
  EXPECT_EQ(ParseNpy(MakeNpy(Dict("|b1", "(2,)"), 2, 2), "m").dtype, DType::kBool);
  // An empty array may have any other dimension, even one whose product with
  // the rest would overflow.
  EXPECT_EQ(ParseNpy(MakeNpy(Dict("<i8", "(4611686018427387904, 0)"), 0), "m").numel(), 0);
}

// Bool bytes other than 0/1 are kept as they are (nonzero means true).
TEST(NpyTest, KeepsNonBinaryBoolBytes) {
  Bytes file = MakeNpy(Dict("|b1", "(3,)"), 3);
  file[file.size() - 1] = 0x7f;
  file[file.size() - 2] = 0x01;
  const NpyArray a = ParseNpy(file, "mem.npy");
  EXPECT_EQ(a.bytes, (Bytes{0, 1, 0x7f}));
}

TEST(NpyTest, RefusesBadPreamble) {
  Bytes file = MakeNpy(Dict("<f4", "(2,)"), 8);
  Bytes bad_magic = file;
  bad_magic[5] = 'Z';
  ExpectParseError(bad_magic, "bad magic");
  ExpectParseError(Bytes{'h', 'e', 'l', 'l', 'o'}, "bad magic");
  ExpectParseError(Bytes{}, "too short");
  ExpectParseError(Bytes(file.begin(), file.begin() + 7), "too short");
  for (const auto& [major, minor] : {std::pair{4, 0}, std::pair{1, 1}, std::pair{0, 0}}) {
    Bytes version = file;
    version[6] = major;
    version[7] = minor;
    ExpectParseError(
        version, "unsupported .npy version " + std::to_string(major) + "." + std::to_string(minor));
  }
  // Version 2.0 needs a 4-byte length: 10 bytes are not enough.
  const Bytes v2 = MakeNpy("{}", 0, 2);
  ExpectParseError(Bytes(v2.begin(), v2.begin() + 10), "header is truncated");
  ExpectParseError(Bytes(file.begin(), file.begin() + 40), "header is truncated");
  // Header length 1 MiB + 1 in a version 2.0 file of a few bytes.
  Bytes huge_header = MakeNpy("{}", 0, 2);
  huge_header[8] = 1;
  huge_header[9] = 0;
  huge_header[10] = 0x10;
  huge_header[11] = 0;
  ExpectParseError(huge_header, "header length 1048577 is too large");
}

TEST(NpyTest, RefusesMalformedHeaders) {
  const std::string ok_shape = "'shape': (2,)";
  const std::pair<std::string, std::string> cases[] = {
      {"['descr', '<f4']", "not a dict literal"},
      {"", "not a dict literal"},
      {"{'fortran_order': False, 'shape': (2,)}", "no 'descr' key"},
      {"{'descr': '<f4', 'shape': (2,)}", "no 'fortran_order' key"},
      {"{'descr': '<f4', 'fortran_order': False}", "no 'shape' key"},
      {"{}", "no 'descr' key"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'x': 1}", "unexpected key 'x'"},
      {"{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (2,)}",
       "repeats key 'descr'"},
      {"{'descr' '<f4', 'fortran_order': False, 'shape': (2,)}", "malformed header"},
      {"{'descr': '<f4 , 'fortran_order': False, 'shape': (2,)}", "malformed header"},
      {"{'descr': '<f4', 'fortran_order': 0, 'shape': (2,)}", "True or False"},
      {"{'descr': '<f4' 'fortran_order': False, 'shape': (2,)}", "malformed header"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (2,)", "malformed header"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (2,)} x", "only spaces"},
      {"{,}", "malformed header"},
      {Dict("<f4", "(2)"), "shape (2) is not a tuple"},
      {Dict("<f4", "[2]"), "shape tuple"},
      {Dict("<f4", "(2, 3"), "malformed header"},
      {Dict("<f4", "(2,, 3)"), "integer dimension"},
      {Dict("<f4", "(2 3)"), "malformed header"},
      {Dict("<f4", "(2.0,)"), "malformed header"},
      {Dict("<f4", "(99999999999999999999,)"), "fits in int64"},
      {Dict("<f4", "(1, 1, 1, 1, 1, 1, 1, 1, 1)"), "more than 8 dimensions"},
      {Dict("<f4", "(2, -3)"), "negative dimension in shape (2, -3)"},
      {Dict("<f4", "(2,)", "True"), "Fortran-order"},
  };
  for (const auto& [dict, fragment] : cases) {
    SCOPED_TRACE(dict);
    ExpectParseError(MakeNpy(dict, 8), fragment);
  }
  // Eight dimensions are fine.
  EXPECT_EQ(ParseNpy(MakeNpy(Dict("<f4", "(1, 1, 1, 1, 1, 1, 1, 2)"), 8), "m").shape.size(), 8u);
}

TEST(NpyTest, RefusesUnsupportedDTypes) {
  for (const char* descr : {"<U5", "|O", "<c8", "|u1", "<u4", "|i1", "<f16", "|f4", "f4"}) {
    ExpectParseError(MakeNpy(Dict(descr, "(2,)"), 8),
                     "unsupported dtype '" + std::string(descr) + "'");
  }
  ExpectParseError(MakeNpy("{'descr': [('x', '<f4')], 'fortran_order': False, 'shape': (2,)}", 8),
                   "unsupported descr");
  ExpectParseError(MakeNpy(Dict(">f8", "(2,)"), 16), "(expected little-endian '<f8')");
  ExpectParseError(MakeNpy(Dict(">i4", "(2,)"), 8), "big-endian dtype '>i4'");
  ExpectParseError(MakeNpy(Dict("=f4", "(2,)"), 8), "native byte order");
  // A control character from the file does not break the one-line message.
  ExpectParseError(MakeNpy(Dict("<f\n4", "(2,)"), 8), "unsupported dtype '<f?4'");
}

TEST(NpyTest, RefusesDataSizeMismatch) {
  const std::string dict = Dict("<f4", "(2, 3)");
  ExpectParseError(MakeNpy(dict, 20), "data is truncated: shape (2, 3) float32 needs 24");
  ExpectParseError(MakeNpy(dict, 0), "data is truncated");
  ExpectParseError(MakeNpy(dict, 28), "trailing bytes");
  ExpectParseError(MakeNpy(Dict("<f4", "(0, 3)"), 1), "trailing bytes");
}

// Headers claiming huge shapes on a ~200-byte file throw before allocating:
// an attempt to allocate would end in std::bad_alloc, not qkv::Error.
TEST(NpyTest, RefusesHugeShapesWithoutAllocating) {
  ExpectParseError(MakeNpy(Dict("<f4", "(1099511627776, 1099511627776)"), 100), "overflows");
  ExpectParseError(MakeNpy(Dict("<f4", "(4611686018427387904,)"), 100), "overflows");
  ExpectParseError(MakeNpy(Dict("<i8", "(2, 3, 4, 5, 6, 7, 8, 99999999999999)"), 100), "overflows");
  ExpectParseError(MakeNpy(Dict("<f8", "(1099511627776,)"), 100), "data is truncated");
  ExpectParseError(MakeNpy(Dict("|b1", "(9223372036854775807,)"), 100), "data is truncated");
}

TEST(NpyTest, WriteToMissingDirectoryThrowsAndLeavesNoFile) {
  TempDir dir("qkv_npy_");
  const std::string path = dir.File("no_such_dir/a.npy");
  const float data[2] = {1.0f, 2.0f};
  const std::vector<int64_t> shape = {2};
  ExpectError([&] { WriteNpy(path, DType::kFloat32, shape, data); }, path + ": ", "(expected ");
  EXPECT_FALSE(fs::exists(path));
}

TEST(NpyTest, WriteRefusesBadShapes) {
  TempDir dir("qkv_npy_");
  const std::string path = dir.File("a.npy");
  const float data[2] = {1.0f, 2.0f};
  const std::vector<int64_t> negative = {2, -1};
  ExpectError([&] { WriteNpy(path, DType::kFloat32, negative, data); }, path + ": ",
              "negative dimension");
  const std::vector<int64_t> rank9(9, 1);
  ExpectError([&] { WriteNpy(path, DType::kFloat32, rank9, data); }, path + ": rank 9",
              "(expected rank 0..8)");
  const std::vector<int64_t> huge = {int64_t{1} << 62, 4};
  ExpectError([&] { WriteNpy(path, DType::kFloat32, huge, data); }, path + ": ", "overflows");
  EXPECT_FALSE(fs::exists(path));
}

}  // namespace
}  // namespace qkv
