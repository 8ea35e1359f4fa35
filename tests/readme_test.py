#!/usr/bin/env python3
"""Runs README.md's code blocks top to bottom in one scratch directory, as a new user would (issue 18).

The blocks are extracted from README.md itself, so the README and this test cannot drift:
  ```sh       run with bash -e -o pipefail, `qkv` on PATH (the build's binary)
  ```console  the lines starting "$ " run the same way (the printed output is an example, not compared)
  ```python   run with Debian's /usr/bin/python3 (numpy, torch 1.13); python blocks continue one
              session: each runs after every earlier python block (so `rng` and imports carry over)
Other languages (cpp, cmake, text) are not run. A block right after a line `<!-- readme-test: skip -->`
is not run either: setup and install commands that change the machine (make test, make install, pip).
`make models` is a no-op here (the repository's models/ is linked into the scratch directory); the
models must be there (`make test` runs `make models` first). Fails on the first block that exits
non-zero, printing the block and its output.

Usage: readme_test.py --readme README.md --bin-dir build/release --models models [--keep]
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

SKIP = "<!-- readme-test: skip -->"


def blocks(text):
    """Yields (line number, language, code) of each fenced block not marked skip."""
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        lang, start = m.group(1), i
        skipped = any(lines[j].strip() == SKIP for j in range(max(0, i - 2), i))
        i += 1
        body = []
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        i += 1
        if not skipped:
            yield start + 1, lang, "\n".join(body) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--readme", required=True)
    ap.add_argument("--bin-dir", required=True, help="folder holding the qkv binary")
    ap.add_argument("--models", required=True, help="the repository's models/ folder")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = ap.parse_args()

    qkv = os.path.join(os.path.abspath(args.bin_dir), "qkv")
    if not os.access(qkv, os.X_OK):
        sys.exit(f"readme_test: {qkv} is not an executable (build first)")
    models = os.path.abspath(args.models)
    for need in ("all-MiniLM-L6-v2/model.safetensors", "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"):
        if not os.path.exists(os.path.join(models, need)):
            sys.exit(f"readme_test: {models}/{need} is missing: run `make models`")
    text = open(args.readme, encoding="utf-8").read()

    scratch = tempfile.mkdtemp(prefix="qkv_readme_")
    os.symlink(models, os.path.join(scratch, "models"))
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(qkv) + os.pathsep + env.get("PATH", "")
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "2")
    # `make models` has been run by `make test`; other make targets are never run from here.
    prelude = 'make() { [ "$*" = models ] || { echo "readme_test: make $* not run" >&2; return 1; }; }\n'
    python_session = []
    ran = 0
    try:
        for line, lang, code in blocks(text):
            if lang == "python":
                python_session.append(code)
                command = ["/usr/bin/python3", "-c", "\n".join(python_session)]
            elif lang in ("sh", "console"):
                if lang == "console":
                    code = "\n".join(l[2:] for l in code.split("\n") if l.startswith("$ ")) + "\n"
                command = ["bash", "-e", "-o", "pipefail", "-c", prelude + code]
            else:
                continue
            t0 = time.time()
            r = subprocess.run(command, cwd=scratch, env=env, capture_output=True, text=True,
                               timeout=600)
            ran += 1
            print(f"README.md:{line} ({lang}): exit {r.returncode} in {time.time() - t0:.1f} s")
            if r.returncode != 0:
                print(f"--- block at README.md:{line} ---\n{code}--- stdout ---\n{r.stdout[-4000:]}"
                      f"--- stderr ---\n{r.stderr[-4000:]}")
                return 1
        if ran < 10:
            print(f"readme_test: only {ran} blocks ran (expected the tour's dozen or more)")
            return 1
        print(f"readme_test: {ran} README blocks ran in order in {scratch}")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
