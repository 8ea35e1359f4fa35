#!/usr/bin/env python3
"""Block-sparse attention against dense, one script run (issue 17; BENCHMARKS.md).

For each N and thread count: `qkv bench --json` dense, then with --sparse LAYOUT, interleaved
(dense, sparse, dense, sparse) so drift on a shared machine hits both; reports the medians, the
time ratio next to the layout's density (target: ratio <= density + 10 points), and the per-tile
efficiency = sparse GFLOP/s / dense GFLOP/s (target >= 80 %), flops counted over the allowed pairs
of the tiles present (the formula is qkv bench's: 4 * head_dim per pair).

Usage: bench/sparse_table.py [--qkv build/release/qkv] [--layout bigbird] [--rounds 2]
"""
import argparse
import json
import platform
import statistics
import subprocess


def bench(qkv, shape, threads, extra, repeat):
    cmd = [qkv, "bench", "--shape", shape, "--threads", str(threads), "--repeat", str(repeat), "--json"]
    out = subprocess.run(cmd + extra, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def cpu_name():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--qkv", default="build/release/qkv")
    ap.add_argument("--layout", default="bigbird")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    # Heads chosen so a dense run takes seconds, not minutes, on one core.
    cases = [(16384, 4), (65536, 1)]
    print(f"CPU: {cpu_name()}; layout {args.layout}; head_dim 64; medians of {args.rounds} interleaved "
          f"rounds of qkv bench --repeat 3\n")
    print("| N | heads | threads | density | dense s | sparse s | time ratio | dense GFLOP/s | "
          "sparse GFLOP/s | per-tile efficiency |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, heads in cases:
        density = json.loads(subprocess.run([args.qkv, "sparse", args.layout, "--seq", str(n), "--json"],
                                            check=True, capture_output=True, text=True).stdout)["density"]
        for threads in (1, 2):
            shape = f"1,{heads},{n},64"
            dense, sparse = [], []
            for _ in range(args.rounds):
                dense.append(bench(args.qkv, shape, threads, [], 3))
                sparse.append(bench(args.qkv, shape, threads, ["--sparse", args.layout], 3))
            d_s = statistics.median(r["median_s"] for r in dense)
            s_s = statistics.median(r["median_s"] for r in sparse)
            d_g = statistics.median(r["gflops"] for r in dense)
            s_g = statistics.median(r["gflops"] for r in sparse)
            print(f"| {n} | {heads} | {threads} | {density:.1%} | {d_s:.3f} | {s_s:.4f} | {s_s / d_s:.1%} | "
                  f"{d_g:.1f} | {s_g:.1f} | {s_g / d_g:.0%} |", flush=True)


if __name__ == "__main__":
    main()
