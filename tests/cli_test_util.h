// Test helper: runs the built `qkv` binary as a child process (stdin from
// /dev/null, stdout and stderr captured), with a timeout, so a hang or a
// signal fails the test instead of the suite. Shared by the CLI tests.
#ifndef QKV_TESTS_CLI_TEST_UTIL_H_
#define QKV_TESTS_CLI_TEST_UTIL_H_

#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

extern char** environ;

namespace qkv::test {

// True in an AddressSanitizer build (gcc or clang): its shadow memory
// reserves terabytes of address space, so ulimit -v tests cannot run.
#if defined(__SANITIZE_ADDRESS__)
inline constexpr bool kUnderAddressSanitizer = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
inline constexpr bool kUnderAddressSanitizer = true;
#else
inline constexpr bool kUnderAddressSanitizer = false;
#endif
#else
inline constexpr bool kUnderAddressSanitizer = false;
#endif

struct CliResult {
  bool exited = false;  // normal exit (not a signal, not our timeout)
  int status = -1;      // exit status when `exited`
  int signal = 0;       // terminating signal otherwise
  bool timed_out = false;
  double seconds = 0.0;
  std::string out, err;
};

inline std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// Runs `argv` (argv[0] an absolute path), stdout and stderr redirected to
// files in `dir`. Calls `while_running(pid)` every millisecond until it
// exits (fault-injection tests send signals from it). Kills it (SIGKILL, by
// pid) after `timeout_s`, so that a hang fails the test instead of blocking
// the suite.
inline CliResult RunProgram(const std::vector<std::string>& command, const std::string& dir,
                            double timeout_s = 20.0,
                            const std::function<void(pid_t)>& while_running = {}) {
  const std::string out_path = dir + "/.stdout";
  const std::string err_path = dir + "/.stderr";
  std::vector<std::string> storage = command;
  std::vector<char*> argv;
  for (std::string& s : storage) argv.push_back(s.data());
  argv.push_back(nullptr);

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, out_path.c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, err_path.c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0644);
  CliResult r;
  const auto start = std::chrono::steady_clock::now();
  pid_t pid = -1;
  const int rc = posix_spawn(&pid, argv[0], &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) {
    ADD_FAILURE() << "posix_spawn " << argv[0] << ": " << std::strerror(rc);
    return r;
  }
  int wstatus = 0;
  for (;;) {
    const pid_t done = waitpid(pid, &wstatus, WNOHANG);
    if (done == pid) break;
    if (done < 0) {
      ADD_FAILURE() << "waitpid: " << std::strerror(errno);
      return r;
    }
    if (while_running) while_running(pid);
    const double elapsed =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (!r.timed_out && elapsed > timeout_s) {
      r.timed_out = true;
      kill(pid, SIGKILL);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (!r.timed_out && WIFEXITED(wstatus)) {
    r.exited = true;
    r.status = WEXITSTATUS(wstatus);
  } else if (WIFSIGNALED(wstatus)) {
    r.signal = WTERMSIG(wstatus);
  }
  r.out = ReadFile(out_path);
  r.err = ReadFile(err_path);
  std::remove(out_path.c_str());
  std::remove(err_path.c_str());
  return r;
}

// Runs the qkv binary with `args` (RunProgram's contract).
inline CliResult RunCli(const std::vector<std::string>& args, const std::string& dir,
                        double timeout_s = 20.0) {
  std::vector<std::string> command = {QKV_CLI_PATH};
  command.insert(command.end(), args.begin(), args.end());
  return RunProgram(command, dir, timeout_s);
}

inline std::string Describe(const CliResult& r) {
  std::ostringstream s;
  s << "exited=" << r.exited << " status=" << r.status << " signal=" << r.signal
    << " timed_out=" << r.timed_out << " seconds=" << r.seconds << "\nstdout: " << r.out
    << "\nstderr: " << r.err;
  return s.str();
}

}  // namespace qkv::test

#endif  // QKV_TESTS_CLI_TEST_UTIL_H_
