// qkv: the command-line tool. It parses flags, then calls the library; every
// usage error or bad input ends with one line on stderr and exit status 2.
#include <cstdio>
#include <new>
#include <string>
#include <vector>

#include "commands.h"
#include "qkv/error.h"

namespace {

// Returns the first line of `text` (CLI11 messages can span lines).
std::string FirstLine(const std::string& text) { return text.substr(0, text.find('\n')); }

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"qkv: exact, fast attention. softmax(Q.K^T * scale + M) . V on .npy files.", "qkv"};
  app.require_subcommand(1);
  app.set_help_all_flag("--help-all", "Print help for every command");
  const qkv::cli::Runner runners[] = {
      qkv::cli::AddAttendCommand(app),
      qkv::cli::AddBackwardCommand(app),
      qkv::cli::AddDemoCommand(app),
      qkv::cli::AddBenchCommand(app),
      qkv::cli::AddPositionalCommand(app),
      qkv::cli::AddClassicCommand(app),
      qkv::cli::AddMhaCommand(app),
      qkv::cli::AddDecodeCommand(app),
      qkv::cli::AddMemoryCommand(app),
  };
  const std::vector<CLI::App*> all = app.get_subcommands({});  // in the order added
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help
    if (argc > 1 && argv[1][0] != '-' && app.get_subcommands().empty()) {
      std::fprintf(stderr, "qkv: unknown command '%s' (expected attend, backward, demo, bench, decode, memory, mha, positions or classic; see qkv --help)\n",
                   argv[1]);
      return 2;
    }
    std::fprintf(stderr, "qkv: %s (see qkv --help)\n", FirstLine(e.what()).c_str());
    return 2;
  }
  try {
    const CLI::App* chosen = app.get_subcommands().front();
    for (size_t i = 0; i < all.size(); ++i) {
      if (all[i] == chosen) return runners[i]();
    }
    return 2;
  } catch (const qkv::Error& e) {
    std::fprintf(stderr, "qkv %s: %s\n", app.get_subcommands().front()->get_name().c_str(),
                 FirstLine(e.what()).c_str());
    return 2;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "qkv: out of memory\n");
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "qkv: internal error: %s\n", FirstLine(e.what()).c_str());
    return 1;
  }
}
