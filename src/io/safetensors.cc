// qkv/safetensors.cc: reads and writes safetensors files.
//
// Layout (huggingface/safetensors README, "Format"):
//   bytes 0..7    N, the header length: uint64 little-endian
//   next N bytes  header: a UTF-8 JSON object; the reference writer pads it
//                 with spaces to a multiple of 8 bytes, so the data is aligned
//   then          the data section; each tensor's data_offsets [begin, end)
//                 count from its start; data is row-major and little-endian
// A hostile file is refused by the cheapest check that can see the problem:
//   1. N <= 100 MiB and N <= file size - 8, before any JSON is read;
//   2. a scan of the raw header for NUL bytes and nesting depth > kMaxDepth;
//   3. nlohmann-json, with a callback that refuses repeated keys and arrays
//      longer than any valid one while it parses;
//   4. each entry against the schema, then the byte ranges against each other.
// The DOM costs a small multiple of the header text, which step 1 bounds; no
// allocation is ever sized by a number read from the file.
#include "qkv/safetensors.h"

#include <sys/stat.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>

#include "file_util.h"
#include "qkv/error.h"

namespace qkv {
namespace {

using internal::FilePtr;
using internal::Fail;
using internal::OpenRegularFile;
using internal::ReadAt;

using Json = nlohmann::json;

constexpr size_t kLenBytes = 8;  // the uint64 header length
// The reference reader's MAX_HEADER_SIZE is 100'000'000; 100 MiB is as
// generous, and a real model's header is well under 1 MiB.
constexpr uint64_t kMaxHeaderLen = uint64_t{100} << 20;
constexpr size_t kMaxRank = 8;
// A valid header nests 3 deep (top object > entry > shape). nlohmann 3.11
// parses and destroys iteratively, but copying, comparing and dumping a value
// recurse once per level; refusing "[[[[..." up front keeps the DOM shallow
// whatever is done with it later, and 8 leaves slack.
constexpr int kMaxDepth = 8;
// The longest valid array is a rank-8 shape. Longer ones are refused while
// parsing, so one array cannot grow the DOM to 16 bytes per 2 header bytes.
constexpr size_t kMaxArrayLen = kMaxRank;
constexpr size_t kHeaderAlign = 8;  // as the reference writer pads (N_LEN)
constexpr const char* kMetadataKey = "__metadata__";
constexpr const char* kLoadable = "F32, F16 or BF16";

// The fixed-size dtypes of the format. Sub-byte ones (F4, F6_*) and C64 are
// left out: no attention input uses them, and they are refused by name.
struct DTypeInfo {
  const char* name;
  uint64_t size;
};
constexpr DTypeInfo kDTypes[] = {
    {"F64", 8}, {"F32", 4}, {"F16", 2},  {"BF16", 2},    {"I64", 8},
    {"I32", 4}, {"I16", 2}, {"I8", 1},   {"U64", 8},     {"U32", 4},
    {"U16", 2}, {"U8", 1},  {"BOOL", 1}, {"F8_E4M3", 1}, {"F8_E5M2", 1},
};
constexpr const char* kKnownDTypes =
    "F64, F32, F16, BF16, I64, I32, I16, I8, U64, U32, U16, U8, BOOL, F8_E4M3 or F8_E5M2";

// Returns file text made safe for a one-line message: non-printable bytes
// become '?' and long text is cut.
std::string Printable(std::string_view text, size_t max_shown) {
  std::string out;
  for (size_t i = 0; i < text.size() && i < max_shown; ++i) {
    const char c = text[i];
    out += (c >= 0x20 && c < 0x7f) ? c : '?';
  }
  return text.size() > max_shown ? out + "..." : out;
}
std::string Quote(std::string_view text) { return "'" + Printable(text, 60) + "'"; }

std::string ShapeText(std::span<const int64_t> shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    out += (i > 0 ? ", " : "") + std::to_string(shape[i]);
  }
  return out + "]";
}

// Sets *bytes = elem_size * product(shape), or returns false on uint64
// overflow. Dimensions are >= 0; a zero one makes the tensor empty whatever
// the others are, so the product is only formed when all are positive.
bool ByteSize(std::span<const int64_t> shape, uint64_t elem_size, uint64_t* bytes) {
  *bytes = 0;
  if (std::find(shape.begin(), shape.end(), 0) != shape.end()) return true;
  uint64_t product = elem_size;
  for (int64_t dim : shape) {
    if (__builtin_mul_overflow(product, static_cast<uint64_t>(dim), &product)) return false;
  }
  *bytes = product;
  return true;
}

// Checks the 8-byte length against the limit and the file size; returns N.
// `head` holds the first min(file_size, 8) bytes.
uint64_t CheckHeaderLen(std::span<const unsigned char> head, uint64_t file_size,
                        const std::string& name) {
  if (file_size < kLenBytes) {
    Fail(name, "file is " + std::to_string(file_size) + " bytes, too short for a header length",
         "at least 8 bytes: a uint64 header length, then the JSON header");
  }
  uint64_t len = 0;
  for (size_t i = 0; i < kLenBytes; ++i) len |= uint64_t{head[i]} << (8 * i);
  if (len > kMaxHeaderLen) {
    Fail(name, "header length " + std::to_string(len) + " is too large",
         "at most " + std::to_string(kMaxHeaderLen) + " bytes");
  }
  if (len > file_size - kLenBytes) {
    Fail(name,
         "header is truncated: it claims " + std::to_string(len) + " bytes but the file has " +
             std::to_string(file_size - kLenBytes) + " after the length",
         "a complete header");
  }
  return len;
}

// Refuses what nlohmann must not see: a NUL byte, which its lexer takes for
// the end of input (so "{}\0<anything>" would pass, where the reference
// reader refuses it), and nesting deeper than kMaxDepth. Brackets inside
// strings do not count; a backslash skips the next byte, so \" does not end
// a string (and \uXXXX has no quote or bracket to skip). Up to the first
// syntax error this agrees with any JSON parser, and nlohmann stops there.
void CheckHeaderText(std::string_view text, const std::string& name) {
  if (const size_t nul = text.find('\0'); nul != std::string_view::npos) {
    Fail(name, "header has a NUL byte at byte " + std::to_string(nul),
         "JSON text, padded with spaces");
  }
  int depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\') {
        ++i;
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > kMaxDepth) {
        Fail(name,
             "header nests deeper than " + std::to_string(kMaxDepth) + " at byte " +
                 std::to_string(i),
             "a flat object of tensor entries");
      }
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
}

// Parses the header. nlohmann keeps the last of two equal keys silently, so
// the callback, which sees every event before it is stored, refuses repeats
// (in any object) and arrays longer than kMaxArrayLen. After a problem it
// discards everything, so the DOM stops growing, and the problem is reported
// once parsing ends.
Json ParseJson(std::string_view text, const std::string& name) {
  struct Frame {
    bool is_array = false;
    size_t count = 0;            // array elements so far
    std::set<std::string> keys;  // object keys so far
    std::string last_key;
  };
  std::vector<Frame> frames;  // the open containers, outermost first
  std::string problem, expected;
  // Returns where the innermost open container is, e.g. "'/w/shape'".
  auto where = [&frames] {
    std::string path;
    for (size_t i = 0; i + 1 < frames.size(); ++i) {
      // Two appends, not "/" + ...: GCC 12 warns falsely (-Wrestrict) on that.
      path += '/';
      path += frames[i].is_array ? std::to_string(frames[i].count - 1) : frames[i].last_key;
    }
    return path.empty() ? std::string("the top-level object") : Quote(path);
  };
  // Counts one more element of the innermost array, if that is where we are.
  auto count_element = [&] {
    if (frames.empty() || !frames.back().is_array) return true;
    if (++frames.back().count <= kMaxArrayLen) return true;
    problem = "array " + where() + " has more than " + std::to_string(kMaxArrayLen) + " elements";
    expected = "a shape of rank <= " + std::to_string(kMaxRank) + " or data_offsets [begin, end]";
    return false;
  };
  const Json::parser_callback_t callback = [&](int, Json::parse_event_t event, Json& parsed) {
    if (!problem.empty()) return false;
    switch (event) {
      case Json::parse_event_t::object_start:
      case Json::parse_event_t::array_start:
        if (!count_element()) return false;
        frames.push_back({event == Json::parse_event_t::array_start, 0, {}, {}});
        return true;
      case Json::parse_event_t::object_end:
      case Json::parse_event_t::array_end:
        frames.pop_back();
        return true;
      case Json::parse_event_t::key: {
        Frame& frame = frames.back();
        frame.last_key = parsed.get<std::string>();
        if (frame.keys.insert(frame.last_key).second) return true;
        problem = "duplicate key " + Quote(frame.last_key) + " in " + where();
        expected = "each tensor name and key once";
        return false;
      }
      case Json::parse_event_t::value:
        return count_element();
    }
    return true;
  };
  Json root;
  try {
    root = Json::parse(text.data(), text.data() + text.size(), callback,
                       /*allow_exceptions=*/true, /*ignore_comments=*/false);
  } catch (const Json::exception& e) {
    // A problem found earlier in the text is the better report.
    if (problem.empty()) {
      std::string_view what = e.what();  // "[json.exception.parse_error.101] parse error at ..."
      if (const size_t end = what.find("] "); end != what.npos) what.remove_prefix(end + 2);
      Fail(name, "header is not valid JSON: " + Printable(what, 200), "a UTF-8 JSON object");
    }
  }
  if (!problem.empty()) Fail(name, problem, expected);
  return root;
}

// Returns a JSON integer in [0, 2^63). nlohmann stores integers without a
// '-' as uint64 and others as int64; integers beyond uint64, and numbers
// with a '.' or an exponent, become floats and are refused.
int64_t GetIndex(const Json& value, const std::string& what, const std::string& name) {
  if (value.is_number_unsigned()) {
    const uint64_t u = value.get<uint64_t>();
    if (u <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return u;
    Fail(name, what + " " + std::to_string(u) + " is too large", "at most 2^63 - 1");
  }
  if (value.is_number_integer()) {
    const int64_t i = value.get<int64_t>();
    if (i >= 0) return i;  // "-0"
    Fail(name, what + " " + std::to_string(i) + " is negative", "a non-negative integer");
  }
  Fail(name, what + " " + Quote(value.dump()) + " is not an integer", "a non-negative integer");
}

// One validated header entry; its bytes are located once the file is in place.
struct Entry {
  SafetensorsFile::Tensor tensor;
  uint64_t begin = 0, end = 0;
};

// Checks one tensor entry against the schema and the data section's size.
Entry ParseEntry(const std::string& tensor_name, const Json& value, uint64_t data_size,
                 const std::string& name) {
  const std::string t = "tensor " + Quote(tensor_name);
  constexpr const char* kKeys[] = {"dtype", "shape", "data_offsets"};
  constexpr const char* kEntry =
      "{\"dtype\": ..., \"shape\": [...], \"data_offsets\": [begin, end]}";
  if (!value.is_object()) {
    Fail(name, t + " is a JSON " + value.type_name() + ", not an object", kEntry);
  }
  for (const auto& item : value.items()) {
    if (std::find(std::begin(kKeys), std::end(kKeys), item.key()) == std::end(kKeys)) {
      Fail(name, t + " has unexpected key " + Quote(item.key()), kEntry);
    }
  }
  for (const char* key : kKeys) {
    if (!value.contains(key)) Fail(name, t + " has no '" + key + "' key", kEntry);
  }

  Entry entry;
  entry.tensor.name = tensor_name;
  const Json& dtype = value["dtype"];
  if (!dtype.is_string()) {
    Fail(name, t + " has a non-string dtype " + Quote(dtype.dump()), kKnownDTypes);
  }
  entry.tensor.dtype = dtype.get<std::string>();
  const DTypeInfo* info =
      std::find_if(std::begin(kDTypes), std::end(kDTypes),
                   [&](const DTypeInfo& d) { return entry.tensor.dtype == d.name; });
  if (info == std::end(kDTypes)) {
    Fail(name, t + " has unknown dtype " + Quote(entry.tensor.dtype), kKnownDTypes);
  }

  const Json& shape = value["shape"];
  if (!shape.is_array() || shape.size() > kMaxRank) {
    Fail(name,
         t + " shape " + Quote(shape.dump()) +
             " is not an array of rank <= " + std::to_string(kMaxRank),
         "a list of dimensions like [2, 3]");
  }
  for (const Json& dim : shape) entry.tensor.shape.push_back(GetIndex(dim, t + " dimension", name));

  const Json& offsets = value["data_offsets"];
  if (!offsets.is_array() || offsets.size() != 2) {
    Fail(name, t + " data_offsets " + Quote(offsets.dump()) + " is not a pair", "[begin, end]");
  }
  entry.begin = GetIndex(offsets[0], t + " begin offset", name);
  entry.end = GetIndex(offsets[1], t + " end offset", name);
  const std::string range =
      "[" + std::to_string(entry.begin) + ", " + std::to_string(entry.end) + "]";
  if (entry.begin > entry.end) {
    Fail(name, t + " data_offsets " + range + " are reversed", "begin <= end");
  }
  if (entry.end > data_size) {
    Fail(name, t + " data_offsets " + range + " go past the data section",
         "end <= " + std::to_string(data_size) + ", the data size");
  }
  const std::string typed = ShapeText(entry.tensor.shape) + " " + entry.tensor.dtype;
  uint64_t bytes = 0;
  if (!ByteSize(entry.tensor.shape, info->size, &bytes)) {
    Fail(name, t + " byte size of " + typed + " overflows uint64", "a size below 2^64 bytes");
  }
  if (entry.end - entry.begin != bytes) {
    Fail(name,
         t + " data_offsets " + range + " hold " + std::to_string(entry.end - entry.begin) +
             " bytes but " + typed + " needs " + std::to_string(bytes),
         "end - begin == " + std::to_string(bytes));
  }
  return entry;
}

uint16_t LoadU16(const unsigned char* p) { return static_cast<uint16_t>(p[0] | p[1] << 8); }

}  // namespace

SafetensorsFile SafetensorsFile::Parse(std::vector<unsigned char> file, const std::string& name) {
  const uint64_t header_len =
      CheckHeaderLen({file.data(), std::min(file.size(), kLenBytes)}, file.size(), name);
  const std::string_view header(reinterpret_cast<const char*>(file.data()) + kLenBytes, header_len);
  CheckHeaderText(header, name);
  const Json root = ParseJson(header, name);
  if (!root.is_object()) {
    Fail(name, std::string("header is a JSON ") + root.type_name() + ", not an object",
         "{\"tensor name\": {...}, ...}");
  }

  SafetensorsFile result;
  const uint64_t data_offset = kLenBytes + header_len;
  const uint64_t data_size = file.size() - data_offset;
  std::vector<Entry> entries;
  for (const auto& item : root.items()) {
    if (item.key() != kMetadataKey) {
      entries.push_back(ParseEntry(item.key(), item.value(), data_size, name));
      continue;
    }
    // The reference reader takes null for "no metadata", and so do we.
    if (item.value().is_null()) continue;
    if (!item.value().is_object()) {
      Fail(name, std::string("__metadata__ is a JSON ") + item.value().type_name(),
           "an object of string values");
    }
    for (const auto& meta : item.value().items()) {
      if (!meta.value().is_string()) {
        Fail(name, "__metadata__ value of " + Quote(meta.key()) + " is not a string",
             "string values");
      }
      result.metadata_[meta.key()] = meta.value().get<std::string>();
    }
  }

  // Orders tensors as their data lies in the file and refuses overlaps: no
  // byte may belong to two tensors. Empty tensors hold no bytes, so they
  // overlap nothing. Gaps, and bytes after the last tensor, are accepted,
  // although the spec wants the data section fully covered and the reference
  // reader refuses both ("invalid offset", "incomplete metadata"): an
  // unclaimed byte is never read, so refusing it would protect nothing.
  std::stable_sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t claimed_end = 0;
  const Entry* claimed_by = nullptr;
  for (const Entry& e : entries) {
    if (e.begin == e.end) continue;
    if (claimed_by != nullptr && e.begin < claimed_end) {
      Fail(name,
           "tensors " + Quote(claimed_by->tensor.name) + " and " + Quote(e.tensor.name) +
               " overlap at data byte " + std::to_string(e.begin),
           "disjoint data_offsets");
    }
    claimed_end = e.end;
    claimed_by = &e;
  }

  // The vector's buffer moves with it, so spans into file_ stay valid when
  // the result is moved (but not when it is copied).
  result.name_ = name;
  result.file_ = std::move(file);
  for (Entry& e : entries) {
    e.tensor.bytes = std::span<const unsigned char>(result.file_)
                         .subspan(data_offset + e.begin, e.end - e.begin);
    result.tensors_.push_back(std::move(e.tensor));
  }
  return result;
}

SafetensorsFile SafetensorsFile::Read(const std::string& path) {
  uint64_t file_size = 0;
  const FilePtr f = OpenRegularFile(path, ".safetensors file", &file_size);

  // The length first, so that a bad one costs no more than 8 bytes; then the
  // whole file, whose size is real, not claimed.
  unsigned char head[kLenBytes];
  const size_t head_size = std::min<uint64_t>(file_size, kLenBytes);
  ReadAt(f.get(), 0, head, head_size, path);
  CheckHeaderLen({head, head_size}, file_size, path);
  std::vector<unsigned char> file(file_size);
  ReadAt(f.get(), 0, file.data(), file.size(), path);
  return Parse(std::move(file), path);
}

const SafetensorsFile::Tensor* SafetensorsFile::Find(std::string_view name) const {
  for (const Tensor& t : tensors_) {
    if (t.name == name) return &t;
  }
  return nullptr;
}

std::vector<float> SafetensorsFile::LoadFloat32(std::string_view name,
                                                std::span<const int64_t> expected_shape) const {
  const Tensor* t = Find(name);
  if (t == nullptr) {
    constexpr size_t kMaxListed = 5;
    std::string listed;
    for (size_t i = 0; i < tensors_.size() && i < kMaxListed; ++i) {
      listed += (i > 0 ? ", " : "") + Quote(tensors_[i].name);
    }
    if (tensors_.size() > kMaxListed) {
      listed += " and " + std::to_string(tensors_.size() - kMaxListed) + " more";
    }
    Fail(name_, "no tensor " + Quote(name),
         tensors_.empty() ? "a tensor, but the file has none" : "one of " + listed);
  }
  if (!std::equal(t->shape.begin(), t->shape.end(), expected_shape.begin(), expected_shape.end())) {
    Fail(name_, "tensor " + Quote(name) + " has shape " + ShapeText(t->shape),
         ShapeText(expected_shape));
  }
  const unsigned char* p = t->bytes.data();
  std::vector<float> out;
  // Parse() checked bytes.size() == element size * numel. Data may sit at
  // any address, so it is copied bytewise, never cast to float*.
  if (t->dtype == "F32") {
    out.resize(t->bytes.size() / 4);
    // Little-endian bytes on a little-endian host (qkv assumes one, as npy.cc does).
    if (!out.empty()) std::memcpy(out.data(), p, t->bytes.size());
  } else if (t->dtype == "F16" || t->dtype == "BF16") {
    const bool half = t->dtype == "F16";
    out.resize(t->bytes.size() / 2);
    for (size_t i = 0; i < out.size(); ++i) {
      const uint16_t bits = LoadU16(p + 2 * i);
      out[i] = half ? HalfToFloat(bits) : BFloat16ToFloat(bits);
    }
  } else {
    Fail(name_, "tensor " + Quote(name) + " has dtype " + t->dtype, kLoadable);
  }
  return out;
}

void WriteSafetensors(const std::string& path, std::span<const SafetensorsEntry> entries) {
  // Header: metadata first, then the entries in the caller's order with
  // contiguous data (the reference writer sorts by alignment, then name).
  // The file is built in memory: the writer serves tests and tools.
  nlohmann::ordered_json header;
  header[kMetadataKey] = {{"format", "pt"}};
  std::set<std::string_view> names;
  std::vector<unsigned char> data;
  for (const SafetensorsEntry& e : entries) {
    const std::string t = "entry " + Quote(e.name);
    const size_t size = e.dtype == "F32" ? 4 : 2;
    if (e.dtype != "F32" && e.dtype != "F16" && e.dtype != "BF16") {
      Fail(path, t + " has dtype " + Quote(e.dtype) + ", which cannot be written", kLoadable);
    }
    if (e.name == kMetadataKey || !names.insert(e.name).second) {
      Fail(path, t + " repeats a name or is reserved", "unique names other than __metadata__");
    }
    uint64_t numel = 0;
    if (e.shape.size() > kMaxRank ||
        std::any_of(e.shape.begin(), e.shape.end(), [](int64_t d) { return d < 0; }) ||
        !ByteSize(e.shape, 1, &numel) || numel != e.data.size()) {
      Fail(path,
           t + " has shape " + ShapeText(e.shape) + " and " + std::to_string(e.data.size()) +
               " values",
           "rank <= 8, dimensions >= 0 and as many values as the shape holds");
    }
    header[e.name] = {{"dtype", e.dtype},
                      {"shape", e.shape},
                      {"data_offsets", {data.size(), data.size() + numel * size}}};
    for (float value : e.data) {
      const uint32_t bits = e.dtype == "F32"   ? std::bit_cast<uint32_t>(value)
                            : e.dtype == "F16" ? FloatToHalf(value)
                                               : FloatToBFloat16(value);
      for (size_t b = 0; b < size; ++b) data.push_back(static_cast<unsigned char>(bits >> (8 * b)));
    }
  }
  std::string text(kLenBytes, '\0');  // the length, filled in below
  try {
    text += header.dump();
  } catch (const Json::exception& e) {
    Fail(path, "cannot write the header: " + Printable(e.what(), 200), "tensor names in UTF-8");
  }
  text.append((kHeaderAlign - text.size() % kHeaderAlign) % kHeaderAlign, ' ');
  for (size_t i = 0; i < kLenBytes; ++i) {
    text[i] = static_cast<char>((text.size() - kLenBytes) >> (8 * i));
  }

  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) {
    Fail(path, std::string("cannot create: ") + std::strerror(errno),
         "a writable path in an existing directory");
  }
  // Only a regular file is removed after a failure: never /dev/full or a FIFO.
  struct stat st;
  const bool regular = fstat(fileno(f), &st) == 0 && S_ISREG(st.st_mode);
  bool ok = std::fwrite(text.data(), 1, text.size(), f) == text.size() &&
            (data.empty() || std::fwrite(data.data(), 1, data.size(), f) == data.size());
  int error = ok ? 0 : errno;
  // fclose flushes the stdio buffer, so a full disk may only show up here.
  if (std::fclose(f) != 0 && ok) {
    ok = false;
    error = errno;
  }
  if (!ok) {
    if (regular) std::remove(path.c_str());
    Fail(path, std::string("write failed: ") + std::strerror(error),
         "a writable path with enough free space");
  }
}

}  // namespace qkv
