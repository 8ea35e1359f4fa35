#!/usr/bin/env bash
# Install test (issue 18): installs an already built qkv build tree into a
# fresh temporary prefix, checks what landed there, then builds and runs
# examples/consumer against it twice: with find_package(qkv) and with
# pkg-config. Registered in ctest as InstallTest.FindPackageAndPkgConfig.
#
#   bash tests/install_test.sh BUILD_DIR [SOURCE_DIR] [CXX]
#
# BUILD_DIR: a configured and built tree (e.g. build/release); SOURCE_DIR: the
# qkv checkout (default: this script's parent); CXX: the compiler that built
# BUILD_DIR (default: c++). Exits non-zero, naming the failed step and
# printing its log, on any failure; the prefix is removed either way.
set -euo pipefail

build_dir=${1:?usage: install_test.sh BUILD_DIR [SOURCE_DIR] [CXX]}
source_dir=${2:-$(cd "$(dirname "$0")/.." && pwd)}
cxx=${3:-c++}
# The consumer's causal attention over values 1..4 (examples/consumer/main.cc).
expected="causal attention: 1 1.5 2 2.5"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/qkv-install-test.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
prefix=$tmp/prefix
log=$tmp/step.log

fail() {
  echo "InstallTest FAILED: $*" >&2
  if [ -s "$log" ]; then
    echo "--- log of that step (last 40 lines):" >&2
    tail -n 40 "$log" >&2
  fi
  exit 1
}

# Runs "$@" with its output in $log; fails with the step's name.
step() {
  local name=$1
  shift
  echo "== $name"
  "$@" >"$log" 2>&1 || fail "$name (exit $?): $*"
}

[ -f "$build_dir/CMakeCache.txt" ] || fail "$build_dir is not a configured CMake build tree"

# 1. Install.
step "cmake --install into $prefix" cmake --install "$build_dir" --prefix "$prefix"

# 2. The CLI runs from the prefix.
step "bin/qkv --version" "$prefix/bin/qkv" --version
grep -q '^qkv ' "$log" || fail "bin/qkv --version printed no 'qkv <version>' line"
head -n 1 "$log"

# 3. Headers: exactly the public ones, subfolders included, nothing from src/.
for h in qkv/attention.h qkv/tensor.h qkv/models/llama.h qkv/inspect/patterns.h; do
  [ -f "$prefix/include/$h" ] || fail "header include/$h was not installed"
done
(cd "$source_dir/include" && find . -type f -name '*.h' | sort) >"$tmp/headers.expected"
(cd "$prefix/include" && find . -type f | sort) >"$tmp/headers.installed"
if ! diff -u "$tmp/headers.expected" "$tmp/headers.installed" >"$log"; then
  fail "installed headers differ from include/ (+ lines were not expected)"
fi
# No internal header (src/) under include/: compared by content, since a
# public and an internal header may share a name (qkv/linear_attention.h and
# src/kernels/linear_attention.h).
leaked=""
while IFS= read -r -d '' internal; do
  while IFS= read -r -d '' installed; do
    cmp -s "$internal" "$installed" && leaked="$leaked ${internal#"$source_dir"/}"
  done < <(find "$prefix/include" -type f -name "$(basename "$internal")" -print0)
done < <(find "$source_dir/src" -type f -name '*.h' -print0)
[ -z "$leaked" ] || fail "src/ headers were installed:$leaked"
echo "headers: $(wc -l <"$tmp/headers.installed") public, none from src/"

# 4. The library, the CMake package and the pkg-config file.
lib=$(find "$prefix" -name 'libqkv.a' -o -name 'libqkv.so')
[ -n "$lib" ] || fail "no libqkv.a or libqkv.so under $prefix"
config=$(find "$prefix" -path '*/cmake/qkv/qkvConfig.cmake')
[ -n "$config" ] || fail "no lib/cmake/qkv/qkvConfig.cmake under $prefix"
for f in qkvConfigVersion.cmake qkvTargets.cmake; do
  [ -f "$(dirname "$config")/$f" ] || fail "no $f next to $config"
done
pc=$(find "$prefix" -path '*/pkgconfig/qkv.pc')
[ -n "$pc" ] || fail "no lib/pkgconfig/qkv.pc under $prefix"
for f in "$lib" "$config" "$pc"; do echo "installed ${f#"$prefix"/}"; done

# Nothing that is not part of the install may leak in.
leaked=$(find "$prefix" -type f \( -name 'qkv_tests' -o -name 'qkv_bench' -o -name '*_fuzzer' \
  -o -name '_qkv*' \))
[ -z "$leaked" ] || fail "test, bench, fuzz or Python files were installed: $leaked"

# 5. find_package(qkv): the consumer configured against the prefix only.
consumer=$source_dir/examples/consumer
step "configure examples/consumer with find_package" \
  cmake -S "$consumer" -B "$tmp/consumer-cmake" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CXX_COMPILER="$cxx" -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF
grep -q "qkv [0-9.]*: $prefix/" "$log" || fail "find_package(qkv) did not take $prefix: \
$(grep 'qkv ' "$log" || echo 'no qkv line')"
step "build examples/consumer with find_package" cmake --build "$tmp/consumer-cmake"
step "run the find_package consumer" "$tmp/consumer-cmake/qkv_consumer"
grep -qF "$expected" "$log" || fail "find_package consumer printed '$(cat "$log")', expected '$expected'"
cat "$log"

# 6. pkg-config: the one-line g++ command of examples/consumer/CMakeLists.txt.
pkg_config_path=$(dirname "$pc")
export PKG_CONFIG_PATH=$pkg_config_path${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}
step "pkg-config --cflags --libs qkv" pkg-config --cflags --libs qkv
flags=$(cat "$log")
echo "pkg-config: $flags"
case "$flags" in
  *"-I$prefix/"* | *"-I$pkg_config_path/"*) ;;
  *) fail "pkg-config's qkv.pc does not point into $prefix: $flags" ;;
esac
# shellcheck disable=SC2086  # $flags is a list of flags
step "build examples/consumer with pkg-config" \
  "$cxx" -std=c++20 -O2 "$consumer/main.cc" -o "$tmp/qkv_consumer_pc" $flags
step "run the pkg-config consumer" "$tmp/qkv_consumer_pc"
grep -qF "$expected" "$log" || fail "pkg-config consumer printed '$(cat "$log")', expected '$expected'"
cat "$log"

echo "InstallTest passed: cmake --install, find_package(qkv) and pkg-config qkv"
