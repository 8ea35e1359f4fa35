// The qkv subcommands. Each Add* declares its flags on `app` (name, default
// and help in one place, so --help is generated from them) and returns the
// function that runs it after parsing; that function throws qkv::Error on bad
// input and returns the exit status.
#ifndef QKV_CLI_COMMANDS_H_
#define QKV_CLI_COMMANDS_H_

#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>

#include <CLI/CLI.hpp>

namespace qkv::cli {

using Runner = std::function<int()>;

// Runs `qkv argv[1..]`: parses, runs the command and returns its exit status;
// every error is one line on `err` (cli/app.cc). Never calls exit().
// `adjust`, when given, is called on the app before parsing (the fuzz targets
// lower defaults with it).
int RunCommandLine(int argc, char** argv, std::FILE* err,
                   const std::function<void(CLI::App&)>& adjust = {});

// Flushes stdout and returns `status`, or 2 with one line on stderr when a
// write to stdout failed (a full disk, /dev/full) and status was 0.
int FinishStdout(int status);

Runner AddAttendCommand(CLI::App& app);
Runner AddBackwardCommand(CLI::App& app);
Runner AddDemoCommand(CLI::App& app);
Runner AddBenchCommand(CLI::App& app);
Runner AddPositionalCommand(CLI::App& app);
Runner AddClassicCommand(CLI::App& app);
Runner AddMhaCommand(CLI::App& app);
Runner AddDecodeCommand(CLI::App& app);
Runner AddMemoryCommand(CLI::App& app);
Runner AddEmbedCommand(CLI::App& app);
Runner AddTokenizeCommand(CLI::App& app);
Runner AddPatternsCommand(CLI::App& app);
Runner AddExplainCommand(CLI::App& app);
Runner AddHeatmapCommand(CLI::App& app);
Runner AddReportCommand(CLI::App& app);
Runner AddSparseCommand(CLI::App& app);
Runner AddGenerateCommand(CLI::App& app);
Runner AddLogitsCommand(CLI::App& app);
Runner AddPerplexityCommand(CLI::App& app);

// `qkv bench --decode`: one decode step over a filled contiguous cache.
struct DecodeBenchArgs {
  int64_t cache_len = 0;
  int64_t heads = 32, kv_heads = 8, head_dim = 128;
  std::string cache_dtype = "f32";
  int threads = 0;
  int repeat = 5;
  bool json = false;
};
int RunDecodeBenchmark(const DecodeBenchArgs& args);

}  // namespace qkv::cli

#endif  // QKV_CLI_COMMANDS_H_
