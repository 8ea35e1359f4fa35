// One meaning per flag name (issue 18): walks every flag of every qkv
// subcommand (`qkv --list-flags`, one JSON line per flag) and checks the
// rules a user relies on when moving between commands:
//  1. a flag name used by two or more commands has one declared meaning
//     (kMeanings below): its help text says so in every command. A new
//     shared flag fails here until its meaning is declared;
//  2. a flag name is an output (help starting "Write" / "Output", or "...
//     to write") everywhere or an input everywhere, except the declared
//     cases where the same file is read back (backward reads attend's --out
//     and --lse; heatmap draws the --attn-weights others write);
//  3. names retired because they meant different things stay retired:
//     --weights (an output in attend, an input in mha), --context, --window
//     outside the attention mask, --prompt for a token count, --batch and
//     --heads for a selection;
//  4. --threads is 0 = all cores everywhere, its default.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <map>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "cli_test_util.h"
#include "file_test_util.h"

namespace qkv::test {
namespace {

struct Flag {
  std::string command, name, help, default_value;
  bool takes_value = false;
};

std::vector<Flag> ListFlags() {
  TempDir dir("cli_flags");
  const CliResult r = RunCli({"--list-flags"}, dir.File(""));
  EXPECT_TRUE(r.exited && r.status == 0) << Describe(r);
  std::vector<Flag> flags;
  std::istringstream lines(r.out);
  for (std::string line; std::getline(lines, line);) {
    const nlohmann::json j = nlohmann::json::parse(line);
    flags.push_back({j.at("command"), j.at("flag"), j.at("help"), j.at("default"),
                     j.at("takes_value")});
  }
  return flags;
}

// The meaning of every flag name shared by two or more commands: a pattern
// its help must match (case-insensitive) in each of them.
const std::map<std::string, std::string>& Meanings() {
  static const auto* m = new std::map<std::string, std::string>{
      {"--accumulate", "arithmetic"},
      {"--attn-dir", "layer\\{L\\}\\.npy"},
      {"--attn-weights", "attention weights|weights alpha"},
      {"--block-mask", "block-sparse layout"},
      {"--block-size", "tokens per block"},
      {"--cache", "cache kind"},
      {"--cache-dtype", "cache storage dtype"},
      {"--cache-window", "recent tokens kept"},
      {"--causal", "bottom-right"},
      {"--causal-top-left", "top-left.*is_causal"},
      {"--chat", "chat template"},
      {"--head-dim", "head dim"},
      {"--heads", "query heads|number of heads"},
      {"--input", "text file"},
      {"--json", "json"},
      {"--k", "^keys \\.npy"},
      {"--kernel", "^kernel"},
      {"--key-lengths", "valid key counts"},
      {"--kv-heads", "kv heads|key/value heads"},
      {"--layout", "layout"},
      {"--lse", "log-sum-exp"},
      {"--mask", "mask \\.npy"},
      {"--model", "model|gguf"},
      {"--out", "output|write"},
      {"--prompt", "prompt text"},
      {"--q", "^queries \\.npy"},
      {"--scale", "score scale"},
      {"--seed", "seed"},
      {"--seq", "sequence length|number of positions"},
      {"--seq-kv", "key count|keys"},
      {"--shape", "b,h,n,d"},
      {"--sink-logits", "sink logit"},
      {"--sinks", "first tokens kept"},
      {"--softcap", "soft-capping"},
      {"--sparse", "block-sparse layout"},
      {"--text", "text"},
      {"--threads", "0 = all cores"},
      {"--v", "^values \\.npy"},
      {"--verbose", "print"},
      {"--window", "sliding window left right"},
  };
  return *m;
}

bool IsOutput(const Flag& f) {
  static const std::regex re("^(write|output)|to write", std::regex::icase);
  return std::regex_search(f.help, re);
}

TEST(CliFlagsTest, EverySharedFlagHasOneDeclaredMeaning) {
  const std::vector<Flag> flags = ListFlags();
  ASSERT_GT(flags.size(), 150u);
  std::map<std::string, std::set<std::string>> commands;
  for (const Flag& f : flags) commands[f.name].insert(f.command);
  for (const auto& [name, used_by] : commands) {
    if (used_by.size() < 2) continue;
    const auto it = Meanings().find(name);
    if (it == Meanings().end()) {
      ADD_FAILURE() << name << " is used by " << used_by.size() << " commands (" << *used_by.begin()
                    << ", ...) but has no declared meaning in kMeanings: declare it, or rename it";
      continue;
    }
    const std::regex meaning(it->second, std::regex::icase);
    for (const Flag& f : flags) {
      if (f.name == name) {
        EXPECT_TRUE(std::regex_search(f.help, meaning))
            << "qkv " << f.command << " " << name << ": \"" << f.help << "\" does not say \""
            << it->second << "\"";
      }
    }
  }
}

TEST(CliFlagsTest, AFlagIsAnOutputEverywhereOrNowhere) {
  // Flags that read back what another command wrote under the same name.
  const std::set<std::pair<std::string, std::string>> read_back = {
      {"backward", "--out"}, {"backward", "--lse"}, {"heatmap", "--attn-weights"}};
  const std::vector<Flag> flags = ListFlags();
  std::map<std::string, std::set<std::string>> outputs, inputs;
  for (const Flag& f : flags) {
    if (!f.takes_value || read_back.count({f.command, f.name})) continue;
    (IsOutput(f) ? outputs : inputs)[f.name].insert(f.command);
  }
  for (const auto& [name, writers] : outputs) {
    const auto readers = inputs.find(name);
    if (readers == inputs.end()) continue;
    ADD_FAILURE() << name << " is an output in qkv " << *writers.begin() << " but an input in qkv "
                  << *readers->second.begin() << ": one of them must be renamed";
  }
  for (const auto& [command, name] : read_back) {
    bool found = false;
    for (const Flag& f : flags) found |= f.command == command && f.name == name && !IsOutput(f);
    EXPECT_TRUE(found) << "qkv " << command << " " << name << " (declared as read back)";
  }
}

TEST(CliFlagsTest, RetiredNamesStayRetired) {
  const std::map<std::string, std::set<std::string>> allowed = {
      // The attention mask's window, LEFT RIGHT; caches use --cache-window.
      {"--window", {"attend", "backward"}},
      // Prompt text; decode's token count is --prompt-tokens.
      {"--prompt", {"generate", "logits"}},
      // bench's input dtype; caches use --cache-dtype.
      {"--dtype", {"bench"}},
      // A count of query heads; heatmap's selection is --which-heads.
      {"--heads", {"bench", "positions", "mha", "decode", "memory"}},
      // A count of sequences; heatmap's index is --batch-index.
      {"--batch", {"memory"}},
      // perplexity's tokens per chunk (classic's output is --out).
      {"--context", {"perplexity"}},
  };
  for (const Flag& f : ListFlags()) {
    EXPECT_NE(f.name, "--weights") << "qkv " << f.command
                                   << ": --weights meant an output in one command and a model in "
                                      "another; use --attn-weights or --params";
    const auto it = allowed.find(f.name);
    if (it != allowed.end()) {
      EXPECT_TRUE(it->second.count(f.command)) << "qkv " << f.command << " " << f.name;
    }
  }
}

TEST(CliFlagsTest, ThreadsIsZeroForAllCoresEverywhere) {
  int seen = 0;
  for (const Flag& f : ListFlags()) {
    if (f.name != "--threads") continue;
    ++seen;
    EXPECT_EQ(f.default_value, "0") << "qkv " << f.command;
  }
  EXPECT_GE(seen, 10);
  // memory takes 0 like the rest, and plans for the cores it resolves to.
  TempDir dir("cli_flags_memory");
  const CliResult r =
      RunCli({"memory", "--heads", "8", "--head-dim", "64", "--seq", "128", "--threads", "0",
              "--json"},
             dir.File(""));
  ASSERT_TRUE(r.exited && r.status == 0) << Describe(r);
  EXPECT_GE(nlohmann::json::parse(r.out).at("threads").get<int>(), 1);
}

}  // namespace
}  // namespace qkv::test
