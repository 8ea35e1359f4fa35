// Test helpers for file-format tests: a per-test temporary directory and
// whole-file reads.
#ifndef QKV_TESTS_FILE_TEST_UTIL_H_
#define QKV_TESTS_FILE_TEST_UTIL_H_

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <system_error>
#include <vector>

#include "qkv/error.h"

namespace qkv::test {

using Bytes = std::vector<unsigned char>;

// A fresh directory for this test's files ("<prefix><test name>_<pid>" under
// gtest's temp dir), removed by the destructor.
class TempDir {
 public:
  explicit TempDir(const std::string& prefix) {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path_ = std::filesystem::path(::testing::TempDir()) /
            (prefix + std::string(info->name()) + "_" + std::to_string(getpid()));
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string File(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

// Returns the bytes of the file at `path` (empty if it cannot be read).
inline Bytes ReadFileBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return Bytes(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// Expects `call` to throw a one-line qkv::Error containing both fragments.
template <class Call>
void ExpectError(Call call, const std::string& fragment1, const std::string& fragment2) {
  try {
    call();
    ADD_FAILURE() << "no error";
  } catch (const qkv::Error& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find(fragment1), std::string::npos) << message;
    EXPECT_NE(message.find(fragment2), std::string::npos) << message;
    EXPECT_EQ(message.find('\n'), std::string::npos) << message;
  }
}

}  // namespace qkv::test

#endif  // QKV_TESTS_FILE_TEST_UTIL_H_
