#!/usr/bin/env python3
"""Short-prompt decode tokens/s, qkv vs llama.cpp, the two sides interleaved 5 times.

bench/compare_generate.py runs qkv's repeats, then llama.cpp's; on a noisy VM a burst of
neighbour load can land on one side only (its 2026-12-01 05:17 run: qkv's 1-thread prefill
fell from 266 to 145 tokens/s while llama.cpp's rose). Interleaving makes noise hit both.
Usage: /root/venv-llama/bin/python bench/compare_generate_short.py THREADS
(run from anywhere; paths below are the checkout's). Prints the medians and the ratio.
"""
import os, re, subprocess, statistics, time, sys
os.environ["OMP_NUM_THREADS"] = sys.argv[1] if len(sys.argv) > 1 else "1"
T = int(os.environ["OMP_NUM_THREADS"])
import numpy as np, llama_cpp
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
M = os.path.join(ROOT, "models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
llms = {fa: llama_cpp.Llama(model_path=M, n_ctx=512, n_threads=T, n_threads_batch=T, flash_attn=fa, verbose=False) for fa in (False, True)}
q, l = [], {False: [], True: []}
for rep in range(5):
    r = subprocess.run([os.path.join(ROOT, "build/release/qkv"), "generate", "--model", M, "--prompt", "Once upon a time",
                        "--temperature", "0", "--max-tokens", "64", "--threads", str(T), "--verbose"], capture_output=True, text=True)
    q.append(float(re.search(r"decode steps in [0-9.]+ s \(([0-9.]+) tokens/s", r.stderr).group(1)))
    for fa, llm in llms.items():
        llm.reset(); ids = llm.tokenize(b"Once upon a time", add_bos=False)
        llm.eval(ids); tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t0 = time.perf_counter()
        for _ in range(63):
            llm.eval([tok]); tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        l[fa].append(63 / (time.perf_counter() - t0))
print("threads", T, "qkv", [round(x, 1) for x in q], "median", statistics.median(q))
for fa in (False, True):
    print("llama.cpp FA", fa, [round(x, 1) for x in l[fa]], "median", statistics.median(l[fa]))
best = max(statistics.median(l[False]), statistics.median(l[True]))
print("ratio qkv / faster llama.cpp: %.2f" % (statistics.median(q) / best))
