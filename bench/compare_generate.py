#!/usr/bin/env python3
"""Peer benchmark for `qkv generate` (issue 15): qkv vs llama.cpp on the same GGUF file.

Run from the repository root with a virtualenv that has llama-cpp-python, after the release
build:

    /root/venv-llama/bin/python bench/compare_generate.py [--qkv build/release/qkv]
        [--model models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf] [--threads 1,2]
        [--repeat 3] [--long-repeat 1] [--json out.json]

What is measured, for each thread count T (qkv --threads T; llama.cpp n_threads =
n_threads_batch = T; OMP_NUM_THREADS=T for both), greedy decoding, in tokens/s only (a
135M model's decode step is a mix of memory traffic and compute, so no FLOP or byte model
is attempted here):
  * decode at a short prompt ("Once upon a time": greedy qkv does not hit end-of-text within
    64 tokens, and qkv has no ignore-EOS switch), 64 tokens: per-token decode time after the
    prefill, median of --repeat runs;
  * decode at ~1K and ~8K tokens of context (GPL-3 text, repeated and cut to 1024 / 8000
    tokens with llama.cpp's tokenizer; qkv's reported prompt-token count is checked against
    it), 32 tokens; qkv's share of decode time spent in attention at both;
  * prefill tokens/s of a 512-token prompt (median of --repeat), and of the 8K prompt.
qkv's numbers are read from its --verbose stderr line ("N prompt tokens in S s ...;
G tokens generated, D decode steps in S s (X tokens/s, median step M ms, attention P% of
it)"). For llama.cpp this script times Llama.eval(): the whole prompt for prefill, then one
eval([token]) + argmax of the last logits per decode step, for the same number of decode
steps qkv made. llama.cpp runs twice, flash attention off (llama-cpp-python's default) and
on (llama.cpp's own default on CPU); the ratio column uses the faster of the two.
Numerics differ: llama.cpp quantises activations to 8 bits for its Q4_1 dot products and
keeps its KV cache in f16, qkv computes in float32 on dequantised weights with an f32 KV
cache; the first 16 greedy tokens of both sides at the short prompt are printed to compare.
"""

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time

import numpy as np
import llama_cpp

QKV_LINE = re.compile(
    r"qkv generate: (?P<ptok>\d+) prompt tokens in (?P<ps>[0-9.]+) s \((?P<ptps>[0-9.]+) tokens/s"
    r".*?; (?P<gen>\d+) tokens generated, (?P<steps>\d+) decode steps in (?P<ds>[0-9.]+) s "
    r"\((?P<dtps>[0-9.]+) tokens/s, median step (?P<med>[0-9.]+) ms, attention (?P<attn>\d+)% of it\)")
SHORT_PROMPT = "Once upon a time"
TEXT_FILE = "/usr/share/common-licenses/GPL-3"
PROMPT_DIR = "/tmp/qkv_compare_generate_prompts"


def cpu_model():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def cut_text(tok, text, n):
    """A prefix of text that llama.cpp tokenises to exactly n tokens (or as close as it gets)."""
    ids = tok.tokenize(text.encode(), add_bos=False)
    assert len(ids) >= n, f"text has only {len(ids)} tokens"
    for m in range(n, n - 8, -1):
        cut = tok.detokenize(ids[:m]).decode("utf-8", errors="ignore")
        if len(tok.tokenize(cut.encode(), add_bos=False)) == n:
            return cut
    return tok.detokenize(ids[:n]).decode("utf-8", errors="ignore")


def run_qkv(args, prompt, max_tokens, threads, prompt_name):
    cmd = [args.qkv, "generate", "--model", args.model, "--prompt", prompt, "--temperature", "0",
           "--max-tokens", str(max_tokens), "--threads", str(threads), "--verbose"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    m = QKV_LINE.search(p.stderr)
    if p.returncode != 0 or not m:
        sys.exit(f"qkv failed (rc {p.returncode}):\n{p.stderr[-2000:]}")
    r = {k: float(v) for k, v in m.groupdict().items()}
    r["text"] = p.stdout
    shown = cmd[:5] + [f'"$(cat {prompt_name})"' if prompt_name else shlex.quote(prompt)] + cmd[6:]
    r["cmd"] = f"OMP_NUM_THREADS={threads} " + " ".join(shown)
    return r


class LlamaSide:
    def __init__(self, model, threads, fa):
        self.llm = llama_cpp.Llama(model_path=model, n_ctx=8192, n_threads=threads,
                                   n_threads_batch=threads, flash_attn=fa, verbose=False)
        self.n_vocab = self.llm.n_vocab()
        self.eval_prompt([1, 2, 3, 4])  # warm-up

    def argmax(self):
        ptr = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))))

    def eval_prompt(self, ids):
        self.llm.reset()
        t = time.perf_counter()
        self.llm.eval(ids)
        return time.perf_counter() - t, self.argmax()

    def decode(self, n_past, first, steps):
        """Decodes `steps` tokens after position n_past starting from token `first`."""
        self.llm.n_tokens = n_past  # eval() drops the KV cells from n_past on
        tok, out, t0 = first, [first], time.perf_counter()
        for _ in range(steps):
            self.llm.eval([tok])
            tok = self.argmax()
            out.append(tok)
        return time.perf_counter() - t0, out


def median_run(runs, key):
    return sorted(runs, key=lambda r: r[key])[len(runs) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--qkv", default="build/release/qkv")
    ap.add_argument("--model", default="models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeat", type=int, default=3, help="runs per short measurement (median)")
    ap.add_argument("--long-repeat", type=int, default=1,
                    help="qkv runs at 1K/8K context (each re-prefills; llama.cpp repeats decode only)")
    ap.add_argument("--json", help="also write the raw numbers to this file")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]

    tok = llama_cpp.Llama(model_path=args.model, n_ctx=64, verbose=False)  # tokeniser only
    base = open(TEXT_FILE).read()
    os.makedirs(PROMPT_DIR, exist_ok=True)
    prompts = {}
    for name, n in (("p512", 512), ("p1k", 1024), ("p8k", 8000)):
        text = cut_text(tok, base * 2, n)
        path = os.path.join(PROMPT_DIR, f"{name}.txt")
        with open(path, "w") as f:
            f.write(text)
        prompts[name] = (text, tok.tokenize(text.encode(), add_bos=True), path)
    prompts["short"] = (SHORT_PROMPT, tok.tokenize(SHORT_PROMPT.encode(), add_bos=True), None)
    tok.close()

    res = {"cpu": cpu_model(), "llama_cpp_python": llama_cpp.__version__,
           "system_info": llama_cpp.llama_print_system_info().decode().strip(),
           "prompt_tokens": {k: len(v[1]) for k, v in prompts.items()}, "runs": {}}
    odd = []
    for T in threads:
        q = {}
        q["short"] = [run_qkv(args, SHORT_PROMPT, 64, T, None) for _ in range(args.repeat)]
        q["p512"] = [run_qkv(args, prompts["p512"][0], 2, T, prompts["p512"][2])
                     for _ in range(args.repeat)]
        for k in ("p1k", "p8k"):
            q[k] = [run_qkv(args, prompts[k][0], 32, T, prompts[k][2]) for _ in range(args.long_repeat)]
        for k, runs in q.items():
            if int(runs[0]["ptok"]) != len(prompts[k][1]):
                odd.append(f"{k}: qkv saw {int(runs[0]['ptok'])} prompt tokens, llama.cpp {len(prompts[k][1])}")
        qm = {"decode_short": median_run(q["short"], "dtps"), "prefill_512": median_run(q["p512"], "ptps"),
              "decode_1k": median_run(q["p1k"], "dtps"), "decode_8k": median_run(q["p8k"], "dtps")}
        row = {"qkv": {k: {kk: vv for kk, vv in v.items() if kk != "text"} for k, v in qm.items()},
               "qkv_short_text": q["short"][0]["text"]}
        for fa in (False, True):
            side, L = LlamaSide(args.model, T, fa), {}
            ids = prompts["short"][1]
            runs = []
            for _ in range(args.repeat):
                steps = int(qm["decode_short"]["steps"])
                _, first = side.eval_prompt(ids)
                dt, out = side.decode(len(ids), first, steps)
                runs.append({"tps": steps / dt, "tokens": out})
            L["decode_short"] = median_run(runs, "tps")
            L["short_text"] = side.llm.detokenize(L["decode_short"]["tokens"][:16]).decode("utf-8", "replace")
            L["decode_short"] = L["decode_short"]["tps"]
            L["prefill_512"] = statistics.median(
                len(prompts["p512"][1]) / side.eval_prompt(prompts["p512"][1])[0] for _ in range(args.repeat))
            for k, key in (("p1k", "decode_1k"), ("p8k", "decode_8k")):
                ids = prompts[k][1]
                pt, first = side.eval_prompt(ids)
                steps = int(qm[key]["steps"])
                L[key] = statistics.median(steps / side.decode(len(ids), first, steps)[0]
                                           for _ in range(args.repeat))
                L["prefill_" + k] = len(ids) / pt
            row["llama_fa" if fa else "llama"] = L
            side.llm.close()
        res["runs"][T] = row
        print(f"[threads {T} done]", file=sys.stderr, flush=True)

    # ---- report ----
    print(f"CPU: {res['cpu']} ({os.cpu_count()} logical CPUs)  ")
    print(f"llama-cpp-python {res['llama_cpp_python']}; llama.cpp system_info: `{res['system_info']}`  ")
    print(f"Model: {args.model}; prompt tokens: {res['prompt_tokens']}\n")
    print("| measurement | threads | qkv tokens/s | llama.cpp tokens/s (FA off) | llama.cpp tokens/s (FA on)"
          " | qkv / llama.cpp (faster) | qkv attention share of decode |")
    print("|---|---|---|---|---|---|---|")
    labels = [("decode_short", f"decode, {len(prompts['short'][1])}-token prompt", "dtps"),
              ("decode_1k", f"decode at {len(prompts['p1k'][1])} tokens of context", "dtps"),
              ("decode_8k", f"decode at {len(prompts['p8k'][1])} tokens of context", "dtps"),
              ("prefill_512", f"prefill, {len(prompts['p512'][1])}-token prompt", "ptps"),
              ("prefill_8k", f"prefill, {len(prompts['p8k'][1])}-token prompt (1 run)", "ptps")]
    for T, row in res["runs"].items():
        for key, label, field in labels:
            qr = row["qkv"]["decode_8k" if key == "prefill_8k" else key]
            qv = qr[field]
            lk = "prefill_p8k" if key == "prefill_8k" else key
            a, b = row["llama"][lk], row["llama_fa"][lk]
            attn = f"{qr['attn']:.0f}%" if key.startswith("decode") else "-"
            steps = f" ({int(qr['steps'])} steps)" if key.startswith("decode") else ""
            print(f"| {label}{steps} | {T} | {qv:.1f} | {a:.1f} | {b:.1f} | {qv / max(a, b):.2f} | {attn} |")
    print("\nGreedy continuation of the short prompt, first 16 tokens (llama.cpp) vs qkv's text:")
    for T, row in res["runs"].items():
        qt = row["qkv_short_text"]
        for name in ("llama", "llama_fa"):
            lt = row[name]["short_text"]
            agree = "agree" if qt.startswith(lt) else "DIFFER"
            print(f"- threads {T}, {name}: {lt!r} -> {agree}")
        print(f"- threads {T}, qkv: {qt[:len(lt) + 40]!r}...")
    print("\nqkv commands (median run; prompt files in " + PROMPT_DIR + "):")
    for T, row in res["runs"].items():
        for k, v in row["qkv"].items():
            print(f"    {v['cmd']}")
    print("llama.cpp: llama_cpp.Llama(model_path, n_ctx=8192, n_threads=T, n_threads_batch=T, "
          "flash_attn=False|True, verbose=False); prefill = Llama.eval(prompt ids), decode step = "
          "eval([tok]) + argmax(llama_get_logits_ith(ctx, -1))")
    for o in odd:
        print(f"NOTE: {o}")
    res["odd"] = odd
    print("\n```json\n" + json.dumps(res, indent=1, default=str) + "\n```")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)


if __name__ == "__main__":
    main()
