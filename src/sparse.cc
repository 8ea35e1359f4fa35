// Block-sparse layouts (qkv/sparse.h): builders, the text spec and a picture.
// Work and memory: O(q_blocks * kv_blocks) bytes, 1/4096 of a dense bool
// mask of the same problem.
#include "qkv/sparse.h"

#include <algorithm>
#include <map>
#include <random>
#include <string>

#include "qkv/error.h"

namespace qkv {
namespace {

std::string S(int64_t v) { return std::to_string(v); }

constexpr int64_t kMaxSeq = (int64_t{1} << 31) - 1;

BlockLayout Empty(int64_t seq_q, int64_t seq_kv) {
  if (seq_q < 0 || seq_kv < 0 || seq_q > kMaxSeq || seq_kv > kMaxSeq) {
    throw Error("sparse layout: seq_q " + S(seq_q) + ", seq_kv " + S(seq_kv) +
                " (expected 0 to 2^31 - 1 each)");
  }
  BlockLayout l;
  l.q_blocks = SparseBlocks(seq_q), l.kv_blocks = SparseBlocks(seq_kv);
  if (l.q_blocks * l.kv_blocks > (int64_t{1} << 32)) {
    throw Error("sparse layout: " + S(l.q_blocks) + " x " + S(l.kv_blocks) +
                " tiles (expected at most 2^32: a layout of this size is 4 GiB)");
  }
  l.present.assign(static_cast<size_t>(l.q_blocks * l.kv_blocks), 0);
  return l;
}

void Set(BlockLayout& l, int64_t qb, int64_t kb) {
  if (qb >= 0 && qb < l.q_blocks && kb >= 0 && kb < l.kv_blocks) l.present[qb * l.kv_blocks + kb] = 1;
}

// The key block of query block qb's first query, bottom-right aligned.
int64_t DiagonalBlock(const BlockLayout& l, int64_t qb, int64_t seq_q, int64_t seq_kv) {
  const int64_t first_key = qb * kSparseBlock + seq_kv - seq_q;
  return std::clamp<int64_t>(first_key < 0 ? 0 : first_key / kSparseBlock, 0,
                             std::max<int64_t>(l.kv_blocks - 1, 0));
}

void Window(BlockLayout& l, int64_t window, int64_t seq_q, int64_t seq_kv) {
  for (int64_t qb = 0; qb < l.q_blocks; ++qb) {
    const int64_t d = DiagonalBlock(l, qb, seq_q, seq_kv);
    for (int64_t kb = d - (window - 1) / 2; kb <= d + window / 2; ++kb) Set(l, qb, kb);
  }
}

void GlobalBlock(BlockLayout& l, int64_t block) {
  for (int64_t kb = 0; kb < l.kv_blocks; ++kb) Set(l, block, kb);
  for (int64_t qb = 0; qb < l.q_blocks; ++qb) Set(l, qb, block);
}

void CheckMin(const std::string& what, int64_t v, int64_t min) {
  if (v < min) throw Error(what + ": " + S(v) + " (expected >= " + S(min) + ")");
}

}  // namespace

TensorView BlockLayout::View() const {
  // Stride 0 on batch and heads: broadcast to every one.
  return TensorView{present.data(), DType::kBool, {1, 1, q_blocks, kv_blocks}, {0, 0, kv_blocks, 1}};
}

int64_t BlockLayout::Count() const {
  return std::count_if(present.begin(), present.end(), [](uint8_t x) { return x != 0; });
}

BlockLayout BigBirdLayout(int64_t seq_q, int64_t seq_kv, const BigBirdOptions& o) {
  CheckMin("bigbird: window", o.window, 0);
  CheckMin("bigbird: global", o.global, 0);
  CheckMin("bigbird: random", o.random, 0);
  BlockLayout l = Empty(seq_q, seq_kv);
  Window(l, o.window, seq_q, seq_kv);
  for (int64_t g = 0; g < std::min(o.global, std::max(l.q_blocks, l.kv_blocks)); ++g) {
    GlobalBlock(l, g);
  }
  std::mt19937_64 rng(o.seed);
  std::vector<int64_t> free;
  for (int64_t qb = std::min(o.global, l.q_blocks); qb < l.q_blocks; ++qb) {
    free.clear();
    for (int64_t kb = 0; kb < l.kv_blocks; ++kb)
      if (!l.At(qb, kb)) free.push_back(kb);
    // Partial Fisher-Yates: `random` distinct picks, the same on every
    // platform (mt19937_64's output is specified; the modulo is ours).
    const int64_t picks = std::min<int64_t>(o.random, static_cast<int64_t>(free.size()));
    for (int64_t n = 0; n < picks; ++n) {
      const int64_t left = static_cast<int64_t>(free.size()) - n;
      const int64_t at = n + static_cast<int64_t>(rng() % static_cast<uint64_t>(left));
      std::swap(free[static_cast<size_t>(n)], free[static_cast<size_t>(at)]);
      Set(l, qb, free[static_cast<size_t>(n)]);
    }
  }
  return l;
}

BlockLayout LongformerLayout(int64_t seq_q, int64_t seq_kv, const LongformerOptions& o) {
  CheckMin("longformer: window", o.window, 0);
  BlockLayout l = Empty(seq_q, seq_kv);
  Window(l, o.window, seq_q, seq_kv);
  const int64_t tokens = std::max(seq_q, seq_kv);
  for (const int64_t t : o.global_tokens) {
    if (t < 0 || t >= tokens) {
      throw Error("longformer: global token " + S(t) + " (expected 0.." + S(tokens - 1) +
                  ", a token index)");
    }
    GlobalBlock(l, t / kSparseBlock);
  }
  return l;
}

BlockLayout StridedLayout(int64_t seq_q, int64_t seq_kv, int64_t stride) {
  CheckMin("strided: stride", stride, 1);
  BlockLayout l = Empty(seq_q, seq_kv);
  for (int64_t qb = 0; qb < l.q_blocks; ++qb)
    for (int64_t kb = 0; kb <= std::min(qb, l.kv_blocks - 1); ++kb)
      if (qb - kb < stride || (qb - kb) % stride == 0) Set(l, qb, kb);
  return l;
}

BlockLayout FixedLayout(int64_t seq_q, int64_t seq_kv, int64_t stride, int64_t summary) {
  CheckMin("fixed: stride", stride, 1);
  CheckMin("fixed: summary", summary, 0);
  if (summary > stride) {
    throw Error("fixed: summary " + S(summary) + " (expected at most stride " + S(stride) + ")");
  }
  BlockLayout l = Empty(seq_q, seq_kv);
  for (int64_t qb = 0; qb < l.q_blocks; ++qb)
    for (int64_t kb = 0; kb <= std::min(qb, l.kv_blocks - 1); ++kb)
      if (kb / stride == qb / stride || kb % stride >= stride - summary) Set(l, qb, kb);
  return l;
}

BlockLayout ParseSparseLayout(const std::string& spec, int64_t seq_q, int64_t seq_kv,
                              const std::string& flag) {
  const std::string name = spec.substr(0, spec.find(':'));
  const std::string where = "--" + flag + ": " + name;
  std::map<std::string, std::string> kv;
  if (spec.find(':') != std::string::npos) {
    std::string rest = spec.substr(spec.find(':') + 1);
    size_t at = 0;
    while (at <= rest.size()) {
      const size_t comma = std::min(rest.find(',', at), rest.size());
      const std::string item = rest.substr(at, comma - at);
      const size_t eq = item.find('=');
      if (eq == std::string::npos || eq == 0) {
        throw Error(where + ": '" + item + "' (expected key=value, comma-separated)");
      }
      if (!kv.emplace(item.substr(0, eq), item.substr(eq + 1)).second) {
        throw Error(where + ": " + item.substr(0, eq) + " given twice");
      }
      at = comma + 1;
    }
  }
  const auto number = [&](const std::string& key, const std::string& text) {
    size_t used = 0;
    long long v = 0;
    try {
      v = std::stoll(text, &used);
    } catch (...) {
      used = 0;
    }
    if (used != text.size() || text.empty()) {
      throw Error(key + ": '" + text + "' (expected an integer)");
    }
    return static_cast<int64_t>(v);
  };
  const auto take = [&](const std::string& key, int64_t fallback) {
    const auto it = kv.find(key);
    if (it == kv.end()) return fallback;
    const int64_t v = number(key, it->second);
    kv.erase(it);
    return v;
  };
  BlockLayout layout;
  try {
    const int64_t block = take("block", kSparseBlock);
    if (block != kSparseBlock) {
      throw Error("block: " + S(block) + " (expected 64, the kernels' tile)");
    }
    if (name == "bigbird") {
      BigBirdOptions o;
      o.window = take("window", o.window), o.global = take("global", o.global);
      o.random = take("random", o.random);
      o.seed = static_cast<uint64_t>(take("seed", 0));
      if (!kv.empty()) throw Error("unknown key '" + kv.begin()->first + "' (expected window, global, random, seed)");
      layout = BigBirdLayout(seq_q, seq_kv, o);
    } else if (name == "longformer") {
      LongformerOptions o;
      o.window = take("window", o.window);
      if (const auto it = kv.find("global"); it != kv.end()) {
        std::string list = it->second;
        size_t at = 0;
        while (at <= list.size() && !list.empty()) {
          const size_t plus = std::min(list.find('+', at), list.size());
          o.global_tokens.push_back(number("global", list.substr(at, plus - at)));
          at = plus + 1;
        }
        kv.erase(it);
      }
      if (!kv.empty()) throw Error("unknown key '" + kv.begin()->first + "' (expected window, global)");
      layout = LongformerLayout(seq_q, seq_kv, o);
    } else if (name == "strided") {
      const int64_t stride = take("stride", 4);
      if (!kv.empty()) throw Error("unknown key '" + kv.begin()->first + "' (expected stride)");
      layout = StridedLayout(seq_q, seq_kv, stride);
    } else if (name == "fixed") {
      const int64_t stride = take("stride", 4), summary = take("summary", 1);
      if (!kv.empty()) throw Error("unknown key '" + kv.begin()->first + "' (expected stride, summary)");
      layout = FixedLayout(seq_q, seq_kv, stride, summary);
    } else {
      throw Error("unknown layout (expected bigbird, longformer, strided or fixed)");
    }
  } catch (const Error& e) {
    const std::string what = e.what();
    // Builder messages start with the layout's name already.
    throw Error("--" + flag + ": " + (what.rfind(name + ":", 0) == 0 ? what : name + ": " + what));
  }
  return layout;
}

std::string RenderLayout(const BlockLayout& l) {
  constexpr int64_t kMaxCells = 256;
  const int64_t gr = std::max<int64_t>(1, (l.q_blocks + kMaxCells - 1) / kMaxCells);
  const int64_t gc = std::max<int64_t>(1, (l.kv_blocks + kMaxCells - 1) / kMaxCells);
  std::string text;
  for (int64_t r = 0; r < l.q_blocks; r += gr) {
    for (int64_t c = 0; c < l.kv_blocks; c += gc) {
      bool any = false;
      for (int64_t qb = r; qb < std::min(r + gr, l.q_blocks) && !any; ++qb)
        for (int64_t kb = c; kb < std::min(c + gc, l.kv_blocks) && !any; ++kb) any = l.At(qb, kb);
      text += any ? '#' : '.';
    }
    text += '\n';
  }
  const int64_t total = l.q_blocks * l.kv_blocks;
  char line[160];
  std::snprintf(line, sizeof line, "%lld of %lld tiles of 64 x 64 present (%.1f%%)%s\n",
                static_cast<long long>(l.Count()), static_cast<long long>(total),
                total ? 100.0 * static_cast<double>(l.Count()) / static_cast<double>(total) : 0.0,
                gr > 1 || gc > 1 ? "; drawn one character per group of tiles" : "");
  return text + line;
}

}  // namespace qkv
