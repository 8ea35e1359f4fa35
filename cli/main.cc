// qkv: the command-line tool. It parses flags, then calls the library; every
// usage error or bad input ends with one line on stderr and exit status 2
// (cli/app.cc), and so does a failed write to standard output.
#include <cstdio>

#include "commands.h"

int main(int argc, char** argv) {
  return qkv::cli::FinishStdout(qkv::cli::RunCommandLine(argc, argv, stderr));
}
