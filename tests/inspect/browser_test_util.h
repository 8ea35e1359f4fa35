// Test helpers: a page opened in headless Chromium (Debian's, installed by
// `make deps`), for the HTML report's tests. Chromium runs as a child process
// through RunProgram (timeout, output captured): --dump-dom prints the DOM
// after the page's scripts ran, and --enable-logging=stderr prints every
// console message of the page as a line with ":CONSOLE".
#ifndef QKV_TESTS_INSPECT_BROWSER_TEST_UTIL_H_
#define QKV_TESTS_INSPECT_BROWSER_TEST_UTIL_H_

#include <gtest/gtest.h>

#include <cctype>
#include <cstdio>
#include <filesystem>
#include <sstream>
#include <string>
#include <vector>

#include "cli_test_util.h"

namespace qkv::test {

inline const std::string kChromium = "/usr/bin/chromium";

// The browser is a test input, never a reason to skip: a missing one fails
// the calling test with how to get it.
inline bool HaveChromium() {
  if (std::filesystem::exists(kChromium)) return true;
  ADD_FAILURE() << kChromium << " is missing: install chromium (make deps)";
  return false;
}

// file:// URL of an absolute path, bytes outside [A-Za-z0-9/._~-] as %XX
// (a '#' or '%' in a temp dir must not end the path), then `fragment`.
inline std::string FileUrl(const std::string& path, const std::string& fragment = "") {
  std::string url = "file://";
  for (const char c : path) {
    const unsigned char u = static_cast<unsigned char>(c);
    if (std::isalnum(u) || c == '/' || c == '.' || c == '_' || c == '~' || c == '-') {
      url += c;
    } else {
      char hex[4];
      std::snprintf(hex, sizeof hex, "%%%02X", u);
      url += hex;
    }
  }
  return fragment.empty() ? url : url + "#" + fragment;
}

// Headless Chromium with `extra` flags; its profile lives in `dir`.
// 60 s: a cold start takes about 1 s here, so only a hang reaches it.
inline CliResult RunChromium(const std::vector<std::string>& extra, const std::string& dir) {
  std::vector<std::string> command = {kChromium,
                                      "--headless",
                                      "--no-sandbox",  // tests may run as root
                                      "--disable-gpu",
                                      "--disable-dev-shm-usage",
                                      "--user-data-dir=" + dir + "/chromium-profile",
                                      "--enable-logging=stderr",
                                      "--v=0"};
  command.insert(command.end(), extra.begin(), extra.end());
  return RunProgram(command, dir, 60.0);
}

// The lines of Chromium's stderr that are console messages of the page
// (`INFO:CONSOLE:1] "Uncaught ReferenceError: ...", source: file:///...`).
inline std::vector<std::string> ConsoleLines(const std::string& err) {
  std::vector<std::string> lines;
  std::istringstream in(err);
  for (std::string line; std::getline(in, line);) {
    if (line.find(":CONSOLE") != std::string::npos) lines.push_back(line);
  }
  return lines;
}

struct PageDom {
  bool ok = false;                   // Chromium exited 0
  std::string dom;                   // the DOM after the scripts ran
  std::vector<std::string> console;  // the page's console messages
  std::string log;                   // everything, for failure messages
};

// Loads `url` and returns the DOM once the load event has run.
inline PageDom DumpDom(const std::string& url, const std::string& dir) {
  const CliResult r = RunChromium({"--dump-dom", url}, dir);
  PageDom page;
  page.ok = r.exited && r.status == 0;
  page.dom = r.out;
  page.console = ConsoleLines(r.err);
  page.log = Describe(r);
  return page;
}

// Saves a `width` x `height` screenshot of `url` as the PNG `png`.
inline CliResult Screenshot(const std::string& url, const std::string& png, int width, int height,
                            const std::string& dir) {
  return RunChromium({"--hide-scrollbars", "--screenshot=" + png,
                      "--window-size=" + std::to_string(width) + "," + std::to_string(height), url},
                     dir);
}

}  // namespace qkv::test

#endif  // QKV_TESTS_INSPECT_BROWSER_TEST_UTIL_H_
