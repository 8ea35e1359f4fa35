#!/usr/bin/env python3
"""Peer embedding benchmark: sentence-transformers on CPU, the reference for `qkv embed`.

Run with the PyTorch virtualenv, offline, on a local model directory:

    OMP_NUM_THREADS=1 /root/venv-torch/bin/python bench/embed_peer.py \\
        --model models/all-MiniLM-L6-v2 --input lines.txt --threads 1 \\
        [--batch-size 32] [--repeat 3] [--out emb.npy]

torch.set_num_threads(T); loads SentenceTransformer(dir, device="cpu"); one warm-up encode
of the first batch; then times encode(lines, batch_size=B, convert_to_numpy=True) over all
lines, --repeat times, and prints one JSON line with the best time:

    {"peer": "sentence-transformers X, torch Y", "threads": T, "lines": n,
     "seconds": best, "lines_per_s": n / best, ...}

Lines are read as UTF-8, one text per line (the trailing newline is dropped, nothing else;
an empty line is an empty text). --out saves the float32 [n, 384] embeddings (.npy).
"""

import argparse
import json
import os
import sys
import time

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_lines(path):
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [l[:-1] if l.endswith("\r") else l for l in lines]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join(REPO_ROOT, "models", "all-MiniLM-L6-v2"))
    ap.add_argument("--input", required=True, help="UTF-8 text file, one text per line")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", help="save embeddings here (.npy, float32 [n, dim])")
    args = ap.parse_args()
    if args.threads < 1 or args.batch_size < 1 or args.repeat < 1:
        ap.error("--threads, --batch-size and --repeat must be >= 1")

    import numpy as np
    import torch
    import sentence_transformers
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)
    lines = read_lines(args.input)
    if not lines:
        sys.exit(f"no lines in {args.input}")
    model = SentenceTransformer(os.path.abspath(args.model), device="cpu",
                                local_files_only=True)
    model.eval()

    def encode(texts):
        with torch.inference_mode():
            return model.encode(texts, batch_size=args.batch_size, convert_to_numpy=True,
                                show_progress_bar=False)

    encode(lines[:args.batch_size])  # warm-up
    best = float("inf")
    times = []
    emb = None
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        emb = encode(lines)
        dt = time.perf_counter() - t0
        times.append(round(dt, 4))
        best = min(best, dt)
    if args.out:
        np.save(args.out, np.ascontiguousarray(emb, dtype=np.float32))
    print(json.dumps({
        "peer": f"sentence-transformers {sentence_transformers.__version__}, "
                f"torch {torch.__version__}",
        "threads": args.threads,
        "torch_threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "lines": len(lines),
        "seconds": round(best, 4),
        "lines_per_s": round(len(lines) / best, 1),
        "times": times,
    }), flush=True)


if __name__ == "__main__":
    main()
