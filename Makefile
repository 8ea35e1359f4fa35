# qkv: two commands set everything up on a fresh Debian 12 machine.
#   make demo   installs missing Debian packages, builds, runs `qkv demo`
#   make test   the same setup, then the whole test suite (ctest)
# Also: make build, make test-asan (AddressSanitizer + UBSan), make bench.
SHELL := /bin/bash
JOBS ?= $(shell nproc)
# Debian packages the build and tests need (g++ 12, CMake and GoogleTest come
# with the machine; checked anyway so a bare Debian 12 works too).
PACKAGES := g++ cmake make pkg-config libgtest-dev libbenchmark-dev libcli11-dev nlohmann-json3-dev libhwy-dev
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: deps build demo test test-asan bench bench-deps clean

deps:
	@missing=$$(for p in $(PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "make deps: installing" $$missing; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

build: deps
	cmake --preset release
	cmake --build --preset release -j$(JOBS)

demo: build
	./build/release/qkv demo

test: build
	ctest --preset release -j$(JOBS)

test-asan: deps
	cmake --preset asan-ubsan
	cmake --build --preset asan-ubsan -j$(JOBS)
	ctest --preset asan-ubsan -j$(JOBS)

# Benchmarks need OpenBLAS (the SGEMM roofline) and PyTorch (the peer), from Debian.
bench-deps: deps
	@missing=$$(for p in libopenblas-dev pkg-config python3-torch; do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

bench: bench-deps build
	/usr/bin/python3 bench/compare.py

clean:
	rm -rf build
