// qkv/error.h: the one error type of the qkv API.
#ifndef QKV_ERROR_H_
#define QKV_ERROR_H_

#include <stdexcept>
#include <string>

namespace qkv {

// Thrown by every public function on invalid input (bad shape, dtype, stride,
// mask, file). what() is one line that names the argument and what was
// expected, e.g. "k: head_dim is 63 but q has head_dim 64 (expected equal)".
// Kernels never throw: the API validates once and then dispatches.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

}  // namespace qkv

#endif  // QKV_ERROR_H_
