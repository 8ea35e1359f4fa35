#!/usr/bin/env python3
"""Compares `qkv embed` with sentence-transformers (bench/embed_peer.py) on all-MiniLM-L6-v2.

Run from the repository root with the PyTorch virtualenv, after the release build:

    /root/venv-torch/bin/python bench/compare_embed.py [--model models/all-MiniLM-L6-v2]
        [--qkv build/release/qkv] [--threads 1,2] [--lines 1000] [--batch-size 32]
        [--repeat 3] [--peer-only]

Steps: writes --lines sentences with bench/gen_sentences.py into a temporary folder; then
for each thread count T (OMP_NUM_THREADS=T set for both sides), one after the other:
  * runs `qkv embed --model DIR --input lines.txt --out TMP/emb.npy --batch-size B
    --threads T` --repeat times and keeps the best, reading the LAST stderr line:
    `qkv embed: 1000 lines in 3.214 s (311.1 lines/s) after loading the model in 0.220 s;
    tokenise 0.051 s, dense 2.100 s, attention 0.600 s, other 0.463 s` (the time after
    loading, as the peer's encode() is timed after loading and one warm-up batch)
  * runs bench/embed_peer.py with the same T, batch size and repeat (best of --repeat);
  * compares the two sets of embeddings: cosine similarity per row, minimum over rows.
Prints a markdown table (threads | qkv lines/s | sentence-transformers lines/s | ratio |
qkv time split), the CPU model, the peer's versions and the exact commands. --peer-only
skips qkv (for when the binary is not built). Exits 1 if a run fails or its last stderr
line does not parse.
"""

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO_ROOT, "bench")

QKV_LINE = re.compile(
    r"^qkv embed: (?P<lines>\d+) lines in (?P<total>[0-9.]+) s \((?P<lps>[0-9.]+) lines/s\) "
    r"after loading the model in (?P<load>[0-9.]+) s; "
    r"tokenise (?P<tokenise>[0-9.]+) s, dense (?P<dense>[0-9.]+) s, "
    r"attention (?P<attention>[0-9.]+) s, other (?P<other>[0-9.]+) s\s*$")


def cpu_model():
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def env_for(threads):
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def show(cmd, threads):
    return f"OMP_NUM_THREADS={threads} " + " ".join(shlex.quote(c) for c in cmd)


def run_qkv(args, lines_path, out_path, threads):
    cmd = [args.qkv, "embed", "--model", args.model, "--input", lines_path, "--out", out_path,
           "--batch-size", str(args.batch_size), "--threads", str(threads)]
    best = None
    for _ in range(args.repeat):
        p = subprocess.run(cmd, env=env_for(threads), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, errors="replace")
        if p.returncode != 0:
            sys.stderr.write(p.stderr[-4000:])
            sys.exit(f"qkv embed failed (exit {p.returncode}): {show(cmd, threads)}")
        err = [l for l in p.stderr.splitlines() if l.strip()]
        m = QKV_LINE.match(err[-1]) if err else None
        if not m:
            sys.exit("cannot parse the last stderr line of qkv embed: "
                     f"{err[-1] if err else '(none)'!r}")
        r = {k: float(v) for k, v in m.groupdict().items()}
        if best is None or r["total"] < best["total"]:
            best = r
    return best, cmd


def run_peer(args, lines_path, out_path, threads):
    cmd = [sys.executable, os.path.join(BENCH, "embed_peer.py"), "--model", args.model,
           "--input", lines_path, "--threads", str(threads), "--batch-size",
           str(args.batch_size), "--repeat", str(args.repeat), "--out", out_path]
    p = subprocess.run(cmd, env=env_for(threads), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, errors="replace")
    if p.returncode != 0:
        sys.stderr.write(p.stderr[-4000:])
        sys.exit(f"embed_peer.py failed (exit {p.returncode}): {show(cmd, threads)}")
    out = [l for l in p.stdout.splitlines() if l.startswith("{")]
    if not out:
        sys.exit(f"embed_peer.py printed no JSON line: {p.stdout[-2000:]!r}")
    return json.loads(out[-1]), cmd


def min_cosine(a_path, b_path):
    import numpy as np
    a = np.load(a_path).astype(np.float64)
    b = np.load(b_path).astype(np.float64)
    if a.shape != b.shape:
        sys.exit(f"embedding shapes differ: qkv {a.shape}, peer {b.shape}")
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    cos = (a * b).sum(1) / np.maximum(na * nb, 1e-30)
    i = int(cos.argmin())
    return float(cos[i]), i, float(np.abs(a - b).max())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join("models", "all-MiniLM-L6-v2"),
                    help="model directory, relative to the repository root or absolute")
    ap.add_argument("--qkv", default=os.path.join("build", "release", "qkv"))
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--lines", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--peer-only", action="store_true", help="skip qkv, run the peer only")
    args = ap.parse_args()
    os.chdir(REPO_ROOT)
    args.model = os.path.abspath(args.model)
    args.qkv = os.path.abspath(args.qkv)
    threads_list = [int(t) for t in args.threads.split(",") if t.strip()]
    if not os.path.isfile(os.path.join(args.model, "model.safetensors")):
        sys.exit(f"no model.safetensors in {args.model} (run `make models`?)")
    if not args.peer_only and not os.access(args.qkv, os.X_OK):
        sys.exit(f"no qkv binary at {args.qkv} (build it, or pass --peer-only)")

    rows = []
    commands = [" ".join(shlex.quote(c) for c in [sys.executable] + sys.argv)]
    with tempfile.TemporaryDirectory(prefix="qkv-embed-bench-") as tmp:
        lines_path = os.path.join(tmp, "lines.txt")
        gen = [sys.executable, os.path.join(BENCH, "gen_sentences.py"), "--out", lines_path,
               "--n", str(args.lines)]
        subprocess.run(gen, check=True)
        commands.append(" ".join(shlex.quote(c) for c in gen))
        for t in threads_list:
            row = {"threads": t}
            qkv_out = os.path.join(tmp, f"emb_qkv_t{t}.npy")
            peer_out = os.path.join(tmp, f"emb_peer_t{t}.npy")
            if not args.peer_only:
                q, cmd = run_qkv(args, lines_path, qkv_out, t)
                if int(q["lines"]) != args.lines:
                    sys.exit(f"qkv embed reported {int(q['lines'])} lines, expected {args.lines}")
                row["qkv"] = q
                commands.append(show(cmd, t) + f"   # best of {args.repeat}")
                print(f"threads {t}: qkv {q['lps']:.1f} lines/s", file=sys.stderr, flush=True)
            peer, cmd = run_peer(args, lines_path, peer_out, t)
            row["peer"] = peer
            commands.append(show(cmd, t))
            print(f"threads {t}: peer {peer['lines_per_s']:.1f} lines/s", file=sys.stderr,
                  flush=True)
            if not args.peer_only:
                row["cos"] = min_cosine(qkv_out, peer_out)
            rows.append(row)

    peer_name = rows[0]["peer"]["peer"] if rows else "?"
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs)")
    print(f"Peer: {peer_name}; model {os.path.basename(args.model)}; "
          f"{args.lines} generated lines, batch size {args.batch_size}, best of {args.repeat}")
    print()
    print("| threads | qkv lines/s | sentence-transformers lines/s | ratio (qkv/peer) "
          "| qkv time split (tokenise / dense / attention / other) |")
    print("|---:|---:|---:|---:|---|")
    for r in rows:
        p = r["peer"]["lines_per_s"]
        if "qkv" in r:
            q = r["qkv"]
            tot = q["total"] if q["total"] > 0 else 1.0
            split = " / ".join(f"{100.0 * q[k] / tot:.0f}%"
                               for k in ("tokenise", "dense", "attention", "other"))
            print(f"| {r['threads']} | {q['lps']:.1f} | {p:.1f} | {q['lps'] / p:.2f}x | {split} |")
        else:
            print(f"| {r['threads']} | - | {p:.1f} | - | - |")
    print()
    for r in rows:
        if "cos" in r:
            c, i, d = r["cos"]
            print(f"threads {r['threads']}: min cosine(qkv, peer) over {args.lines} rows = "
                  f"{c:.7f} (row {i}); max |difference| = {d:.2e}")
    print()
    print("Commands:")
    for c in commands:
        print(f"    {c}")


if __name__ == "__main__":
    main()
