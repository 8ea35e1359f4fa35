// The qkv subcommands. Each Add* declares its flags on `app` (name, default
// and help in one place, so --help is generated from them) and returns the
// function that runs it after parsing; that function throws qkv::Error on bad
// input and returns the exit status.
#ifndef QKV_CLI_COMMANDS_H_
#define QKV_CLI_COMMANDS_H_

#include <functional>

#include <CLI/CLI.hpp>

namespace qkv::cli {

using Runner = std::function<int()>;

Runner AddAttendCommand(CLI::App& app);
Runner AddDemoCommand(CLI::App& app);
Runner AddBenchCommand(CLI::App& app);
Runner AddPositionalCommand(CLI::App& app);
Runner AddClassicCommand(CLI::App& app);
Runner AddMhaCommand(CLI::App& app);

}  // namespace qkv::cli

#endif  // QKV_CLI_COMMANDS_H_
