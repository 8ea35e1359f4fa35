// The small valid files the CLI fuzz targets run against (q.npy, k.npy,
// v.npy, masks, mha inputs and w.safetensors), written into a directory; also
// used by tests/hardening_test.cc to replay the inputs the fuzzers found.
#ifndef QKV_FUZZ_CLI_FIXTURES_H_
#define QKV_FUZZ_CLI_FIXTURES_H_

#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include "qkv/npy.h"
#include "qkv/safetensors.h"

namespace qkv::fuzz {

inline std::vector<float> Values(size_t n, int seed) {
  std::vector<float> v(n);
  uint32_t x = 2654435761u * static_cast<uint32_t>(seed + 1);
  for (float& f : v) {
    x = x * 1664525u + 1013904223u;
    f = static_cast<float>(static_cast<int>((x >> 16) % 256) - 128) / 64.0f;
  }
  return v;
}

inline void Npy(const std::string& dir, std::set<std::string>& fixtures, const char* name,
                qkv::DType dtype, std::vector<int64_t> shape, const void* data) {
  qkv::WriteNpy(dir + "/" + name, dtype, shape, data);
  fixtures.insert(name);
}

inline std::set<std::string> WriteCliFixtures(const std::string& dir) {
  std::set<std::string> fixtures;
  const std::vector<float> f = Values(4096, 1);
  const std::vector<uint8_t> bools = {1, 0, 1, 1, 0, 1, 1, 1, 0, 1, 1, 0, 1, 1, 1, 1, 0, 0,
                                      1, 1, 1, 0, 1, 1};
  const int64_t lengths[] = {5, 3};
  // attend: q [1,2,4,8], k [1,1,6,8], v [1,1,6,4]; masks [1,1,4,6] and [4,6].
  Npy(dir, fixtures, "q.npy", qkv::DType::kFloat32, {1, 2, 4, 8}, f.data());
  Npy(dir, fixtures, "k.npy", qkv::DType::kFloat32, {1, 1, 6, 8}, f.data() + 100);
  Npy(dir, fixtures, "v.npy", qkv::DType::kFloat32, {1, 1, 6, 4}, f.data() + 200);
  Npy(dir, fixtures, "q0.npy", qkv::DType::kFloat32, {1, 2, 4, 0}, nullptr);
  Npy(dir, fixtures, "k0.npy", qkv::DType::kFloat32, {1, 1, 1073741824, 0}, nullptr);
  Npy(dir, fixtures, "mask.npy", qkv::DType::kBool, {1, 1, 4, 6}, bools.data());
  Npy(dir, fixtures, "maskf.npy", qkv::DType::kFloat32, {4, 6}, f.data() + 300);
  Npy(dir, fixtures, "len.npy", qkv::DType::kInt64, {1}, lengths);
  Npy(dir, fixtures, "len2.npy", qkv::DType::kInt64, {2}, lengths);
  // mha: query [1,4,8], key/value [1,6,8], masks [1,6] and [4,6]; weights
  // for embed_dim 8 (any --heads dividing 8).
  Npy(dir, fixtures, "x.npy", qkv::DType::kFloat32, {1, 4, 8}, f.data() + 400);
  Npy(dir, fixtures, "kv.npy", qkv::DType::kFloat32, {1, 6, 8}, f.data() + 500);
  Npy(dir, fixtures, "kpm.npy", qkv::DType::kBool, {1, 6}, bools.data());
  Npy(dir, fixtures, "am.npy", qkv::DType::kFloat32, {4, 6}, f.data() + 600);
  const std::vector<float> in_w = Values(24 * 8, 2), in_b = Values(24, 3), out_w = Values(64, 4),
                           out_b = Values(8, 5);
  const qkv::SafetensorsEntry entries[] = {{"in_proj_weight", {24, 8}, in_w},
                                           {"in_proj_bias", {24}, in_b},
                                           {"out_proj.weight", {8, 8}, out_w},
                                           {"out_proj.bias", {8}, out_b}};
  qkv::WriteSafetensors(dir + "/w.safetensors", entries);
  fixtures.insert("w.safetensors");
  return fixtures;
}

}  // namespace qkv::fuzz

#endif  // QKV_FUZZ_CLI_FIXTURES_H_
