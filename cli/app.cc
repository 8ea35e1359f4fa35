// The qkv command line as a function: builds every command, parses, runs the
// chosen one and turns every error into one line and an exit status. main.cc
// calls it; the fuzz target fuzz/cli_fuzzer.cc calls it in-process, which is
// why nothing here (or in any runner) calls exit().
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <new>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "commands.h"
#include "common.h"
#include "qkv/error.h"
#include "qkv/version.h"

namespace qkv::cli {
namespace {

// Returns the first line of `text` (CLI11 messages can span lines).
std::string FirstLine(const std::string& text) { return text.substr(0, text.find('\n')); }

// `qkv --list-flags` (not in --help): one JSON line per flag of every
// command, {"command", "flag", "help", "default", "takes_value"}, for the
// flag-consistency test (tests/cli_flags_test.cc) and completion scripts.
void ListFlags(CLI::App& app, const std::string& prefix, std::FILE* out) {
  for (CLI::App* sub : app.get_subcommands({})) {
    const std::string command = prefix.empty() ? sub->get_name() : prefix + " " + sub->get_name();
    for (const CLI::Option* o : sub->get_options()) {
      if (o->get_lnames().empty() || o->get_lnames().front().rfind("help", 0) == 0) continue;
      const nlohmann::json line = {{"command", command},
                                   {"flag", "--" + o->get_lnames().front()},
                                   {"help", o->get_description()},
                                   {"default", o->get_default_str()},
                                   {"takes_value", o->get_expected_max() > 0}};
      std::fprintf(out, "%s\n", line.dump().c_str());
    }
    ListFlags(*sub, command, out);
  }
}

}  // namespace

int RunCommandLine(int argc, char** argv, std::FILE* err,
                   const std::function<void(CLI::App&)>& adjust) {
  CLI::App app{"qkv: exact, fast attention. softmax(Q.K^T * scale + M) . V on .npy files.", "qkv"};
  app.require_subcommand(1);
  app.set_help_all_flag("--help-all", "Print help for every command");
  app.set_version_flag("--version", BuildInfo(),
                       "Print the version, git revision, compiler and SIMD targets, and exit");
  const Runner runners[] = {
      AddAttendCommand(app),     AddBackwardCommand(app), AddDemoCommand(app),
      AddBenchCommand(app),      AddPositionalCommand(app), AddClassicCommand(app),
      AddMhaCommand(app),        AddDecodeCommand(app),   AddMemoryCommand(app),
      AddEmbedCommand(app),      AddTokenizeCommand(app), AddPatternsCommand(app),
      AddExplainCommand(app),    AddHeatmapCommand(app),  AddGenerateCommand(app),
      AddLogitsCommand(app),     AddPerplexityCommand(app), AddReportCommand(app),
      AddSparseCommand(app),
  };
  const std::vector<CLI::App*> all = app.get_subcommands({});  // in the order added
  if (adjust) adjust(app);
  if (argc == 2 && std::string(argv[1]) == "--list-flags") {
    ListFlags(app, "", stdout);
    return FinishStdout(0);
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help
    if (argc > 1 && argv[1][0] != '-' && app.get_subcommands().empty()) {
      std::fprintf(err, "qkv: unknown command '%s' (expected attend, backward, demo, bench, decode, memory, mha, positions, classic, embed, tokenize, generate, logits, perplexity, patterns, explain, heatmap, report or sparse; see qkv --help)\n",
                   Printable(argv[1]).c_str());
      return 2;
    }
    std::fprintf(err, "qkv: %s (see qkv --help)\n", Printable(FirstLine(e.what())).c_str());
    return 2;
  }
  const CLI::App* chosen = app.get_subcommands().front();
  try {
    CheckThreadEnvironment();
    for (size_t i = 0; i < all.size(); ++i) {
      if (all[i] == chosen) return runners[i]();
    }
    return 2;
  } catch (const qkv::Error& e) {
    // The whole message, control characters escaped: a newline in a path
    // must neither cut it short nor add a line.
    std::fprintf(err, "qkv %s: %s\n", chosen->get_name().c_str(), Printable(e.what()).c_str());
    return 2;
  } catch (const std::bad_alloc&) {
    // Every command checks its buffers first (CheckFitsInMemory); this is
    // what is left: memory taken by others meanwhile, or overcommit refused.
    std::fprintf(err, "qkv %s: out of memory (expected a smaller problem, or more free memory "
                 "or a higher ulimit -v)\n", chosen->get_name().c_str());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(err, "qkv %s: internal error: %s\n", chosen->get_name().c_str(),
                 Printable(e.what()).c_str());
    return 1;
  }
}

int FinishStdout(int status) {
  // stdout is buffered: a full disk or /dev/full (qkv memory --json >
  // /dev/full) only shows when it is flushed, so check it before exiting.
  errno = 0;
  const bool failed = std::fflush(stdout) != 0 || std::ferror(stdout);
  if (failed) {
    const int error = errno;
    if (status == 0) {
      std::fprintf(stderr, "qkv: standard output: write failed: %s (expected a writable stdout)\n",
                   error != 0 ? std::strerror(error) : "stream error");
      return 2;
    }
  }
  return status;
}

}  // namespace qkv::cli
