#!/usr/bin/python3
"""One-run CPU attention comparison for BENCHMARKS.md.

Runs, in one go and on the same threads:
  1. qkv_roofline: the measured FMA peak (register-only FMA loop) and Debian
     OpenBLAS's SGEMM (2048^3), with OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE
     unset for that command only; prints which OpenBLAS kernel ran. OpenBLAS
     0.3.21 does not recognise some newer CPUs and falls back to the slow
     "Prescott" kernel: then it is run again with OPENBLAS_CORETYPE=SkylakeX
     (AVX-512 machines) or Haswell, and both numbers are reported.
  2. PyTorch's math path (Debian python3-torch): matmul + softmax + matmul in
     float32, torch.set_num_threads(T).
  3. `qkv bench --json`.
flops = 4 * B * H * N^2 * D, halved (exactly: allowed pairs) for causal.
With --backward yes, also the backward tables (bench/backward_rows.py): `qkv bench --backward`
next to the FMA peak and PyTorch's CPU flash backward from a PyPI torch (--torch-python).
With --python yes, the Python-module tables (bench/python_rows.py): qkv.attention's call
overhead over the C++ call, and forward + backward through qkv.torch against PyTorch's SDPA,
run in --torch-python (which then needs qkv installed: pip install . in that environment).

Usage (Debian's python3, which has torch; numpy is not needed):
  /usr/bin/python3 bench/compare.py [--build build/release] [--threads 1,2]
      [--sizes 1024,4096,16384] [--dims 64,128] [--repeat 3] [--write BENCHMARKS.md]
      [--backward yes --torch-python ~/venv-torch/bin/python] [--python yes]
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from backward_rows import backward_section
from python_rows import python_section

BEGIN = "<!-- compare.py: begin -->"
END = "<!-- compare.py: end -->"


def roofline(build, threads):
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    cmd = [os.path.join(build, "qkv_roofline"), "--threads", str(threads)]
    result = json.loads(subprocess.check_output(cmd, env=env))
    result["openblas_autodetected"] = result["openblas_core"]
    if result["openblas_core"].lower() == "prescott":
        env["OPENBLAS_CORETYPE"] = "SkylakeX" if result["fma_isa"] == "avx512" else "Haswell"
        forced = json.loads(subprocess.check_output(cmd, env=env))
        result["sgemm_autodetected_gflops"] = result["sgemm_gflops"]
        result["sgemm_gflops"] = forced["sgemm_gflops"]
        result["openblas_core"] = forced["openblas_core"] + " (forced; autodetect gave Prescott)"
    return result


def torch_math(n, d, heads, causal, threads, repeat):
    import torch
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, d, generator=g) for _ in range(3))
    mask = None
    if causal:
        mask = torch.full((n, n), float("-inf")).triu(1)  # square: both alignments agree

    def run():
        s = torch.matmul(q, k.transpose(-2, -1)) * (d ** -0.5)
        if mask is not None:
            s = s + mask
        return torch.matmul(torch.softmax(s, dim=-1), v)

    with torch.no_grad():
        run()
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def qkv_bench(build, n, d, heads, causal, threads, repeat, kernel="auto"):
    cmd = [os.path.join(build, "qkv"), "bench", "--shape", f"1,{heads},{n},{d}", "--threads",
           str(threads), "--repeat", str(repeat), "--kernel", kernel, "--json"]
    if causal:
        cmd.append("--causal")
    return json.loads(subprocess.check_output(cmd)), " ".join(cmd[1:])


def decode_rows(build, thread_counts, lengths, repeat, runs):
    """qkv bench --decode results: B=1, 32 query heads, 8 KV heads, head_dim 128.

    Returns {(threads, n, dtype): result}, each the fastest of `runs` runs
    (each the median of its steps), as STREAM reports its best rate. Every
    round runs each (dtype, threads) pair of a length back to back, so the
    int8 / float32 and 2-thread / 1-thread ratios compare runs seconds
    apart: a neighbour on a shared machine slows some runs by 10-25 % for
    minutes, and a ratio of two rows taken minutes apart would carry that.
    Also returns every run's median, for the spread of the ratios."""
    best, all_runs = {}, {}
    for n in lengths:
        steps = max(repeat, min(200, 262144 // n))
        for _ in range(runs):
            for t in thread_counts:
                for dtype in ("f32", "i8"):
                    cmd = [os.path.join(build, "qkv"), "bench", "--decode", "--cache-len", str(n),
                           "--cache-dtype", dtype, "--threads", str(t), "--repeat", str(steps),
                           "--json"]
                    r = json.loads(subprocess.check_output(cmd))
                    key = (t, n, dtype)
                    all_runs.setdefault(key, []).append(r["median_s"])
                    if key not in best or r["median_s"] < best[key]["median_s"]:
                        best[key] = r
            print(n, {k: f"{v[-1] * 1e3:.2f}" for k, v in all_runs.items() if k[1] == n},
                  file=sys.stderr, flush=True)
    return best, all_runs


def bandwidths(build, t, env):
    bw = json.loads(subprocess.check_output(
        [os.path.join(build, "qkv_roofline"), "--threads", str(t), "--copy"], env=env))
    return {k: bw[k] for k in ("copy_gbps", "read_gbps", "triad_gbps")}


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", default="build/release")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--sizes", default="1024,4096,16384")
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--torch-max-n", type=int, default=4096,
                    help="largest N for PyTorch's math path (its score matrix is H*N^2*4 bytes, twice)")
    ap.add_argument("--decode-lengths", default="1024,4096,16384,65536,131072",
                    help="cache lengths for the decode table (empty: no decode table)")
    ap.add_argument("--decode-runs", type=int, default=5,
                    help="rounds per decode length; each row is the fastest round")
    ap.add_argument("--prefill", default="yes", help="no: skip the prefill table")
    ap.add_argument("--backward", default="no", help="yes: the backward tables too")
    ap.add_argument("--backward-n", type=int, default=4096, help="N of the backward tables")
    ap.add_argument("--backward-scaling-n", type=int, default=16384,
                    help="N of the one-head backward thread-scaling row (0: none)")
    ap.add_argument("--backward-memory-shape", default="",
                    help="B,H,N,D of a causal `qkv backward` run whose peak RSS is reported")
    ap.add_argument("--python", default="no",
                    help="yes: the Python-module tables (bench/python_rows.py; needs --torch-python "
                         "with qkv installed)")
    ap.add_argument("--python-n", type=int, default=4096, help="N of the qkv.torch table")
    ap.add_argument("--torch-python", default="",
                    help="python of a PyPI torch for the backward peer (empty: no peer)")
    ap.add_argument("--write", default="", help="replace the table between the markers in this file")
    a = ap.parse_args()
    if a.decode_runs < 1:
        print(f"compare.py: --decode-runs {a.decode_runs} (expected >= 1)", file=sys.stderr)
        sys.exit(2)
    lines = []
    out = lines.append
    out(f"Machine: {cpu_name()}, {os.cpu_count()} cores; date {datetime.date.today()}; "
        f"command: `/usr/bin/python3 bench/compare.py {' '.join(sys.argv[1:])}`")
    out("")
    for t in [int(x) for x in a.threads.split(",")]:
        if a.prefill != "yes":
            break
        r = roofline(a.build, t)
        rows = []
        for d in [int(x) for x in a.dims.split(",")]:
            for n in [int(x) for x in a.sizes.split(",")]:
                for causal in (False, True):
                    # Runs under ~50 ms take at least 30 repeats: the median of 3 swung
                    # +-8% between runs on this VM at N = 1024 (neighbours' noise).
                    q, _ = qkv_bench(a.build, n, d, a.heads, causal, t,
                                     max(a.repeat, 30) if n <= 1024 else a.repeat)
                    ts = None
                    if n <= a.torch_max_n:
                        ts = torch_math(n, d, a.heads, causal, t, a.repeat)
                    rows.append((n, d, causal, q, ts))
                    print(n, d, causal, f"{q['gflops']:.1f}", file=sys.stderr, flush=True)
        # The ceilings again after the rows, keeping the higher of the two: a neighbour
        # slowing the VM during one measurement read 312 instead of ~350 GFLOP/s once,
        # which overstated every percentage of that table.
        r2 = roofline(a.build, t)
        for key in ("fma_peak_gflops", "sgemm_gflops"):
            r[key] = max(r[key], r2[key])
        out(f"**{t} thread(s)**: FMA peak {r['fma_peak_gflops']:.1f} GFLOP/s ({r['fma_isa']}); "
            f"OpenBLAS SGEMM {r['sgemm_gflops']:.1f} GFLOP/s (kernel {r['openblas_core']}"
            + (f"; autodetected Prescott kernel: {r['sgemm_autodetected_gflops']:.1f}"
               if "sgemm_autodetected_gflops" in r else "") + "); each the higher of a measurement "
            "before and one after the rows")
        out("")
        out("| N | D | causal | qkv kernel | SIMD | qkv ms | qkv GFLOP/s | % FMA peak | % SGEMM "
            "| torch math ms | torch GFLOP/s | qkv / torch | qkv peak RSS |")
        out("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for n, d, causal, q, ts in rows:
            torch_cell, tg_cell, ratio = "skipped", "", ""
            if ts is not None:
                # torch computes the masked half too; count the same flops as qkv.
                tg = q["flops"] / ts * 1e-9
                torch_cell, tg_cell = f"{ts * 1e3:.1f}", f"{tg:.1f}"
                ratio = f"{ts / q['median_s']:.2f}x"
            out(f"| {n} | {d} | {'yes' if causal else 'no'} | {q['kernel']} | "
                f"{q['simd_target']} | {q['median_s'] * 1e3:.1f} | {q['gflops']:.1f} | "
                f"{100 * q['gflops'] / r['fma_peak_gflops']:.0f}% | "
                f"{100 * q['gflops'] / r['sgemm_gflops']:.0f}% | {torch_cell} | {tg_cell} | "
                f"{ratio} | {q['peak_rss_bytes'] / 2**20:.0f} MiB |")
        out("")
    if a.backward == "yes":
        backward_section(a, out, roofline)
    if a.python == "yes":
        python_section(a, out)
    if a.decode_lengths:
        threads = [int(x) for x in a.threads.split(",")]
        lengths = [int(x) for x in a.decode_lengths.split(",")]
        env = {k: v for k, v in os.environ.items()
               if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
        # The references before and after the rows, the higher kept (as the FMA peak).
        bw = {t: bandwidths(a.build, t, env) for t in threads}
        best, all_runs = decode_rows(a.build, threads, lengths, max(a.repeat, 5), a.decode_runs)
        for t in threads:
            after = bandwidths(a.build, t, env)
            bw[t] = {k: max(v, after[k]) for k, v in bw[t].items()}
        out("**Decode** (one step, B = 1, 32 query heads, 8 KV heads, head_dim 128, contiguous cache; "
            f"each row the fastest of {a.decode_runs} runs of median steps, every round running each "
            "dtype and thread count of a length back to back; "
            "GB/s = K/V bytes read / median time; copy = memcpy on the same threads, read + write "
            "bytes / time; triad = STREAM's triad a = b + s c with ordinary stores, 12 bytes per "
            "element as STREAM counts; read = a read-only stream on the same threads; each the higher "
            "of a measurement before and one after the rows):")
        out("")
        out("| threads | copy GB/s | triad GB/s | read GB/s | cache tokens | f32 us/token | f32 GB/s "
            "| f32 % of copy | f32 % of triad | f32 % of read | i8 us/token | i8 GB/s "
            "| i8 speedup over f32 |")
        out("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for t in threads:
            copy, read, triad = bw[t]["copy_gbps"], bw[t]["read_gbps"], bw[t]["triad_gbps"]
            for n in lengths:
                f32, i8 = best[(t, n, "f32")], best[(t, n, "i8")]
                out(f"| {t} | {copy:.1f} | {triad:.1f} | {read:.1f} | {f32['cache_len']} | "
                    f"{f32['median_s'] * 1e6:.0f} | {f32['gbps']:.1f} | "
                    f"{100 * f32['gbps'] / copy:.0f}% | {100 * f32['gbps'] / triad:.0f}% | "
                    f"{100 * f32['gbps'] / read:.0f}% | "
                    f"{i8['median_s'] * 1e6:.0f} | {i8['gbps']:.1f} | "
                    f"{f32['median_s'] / i8['median_s']:.2f}x |")
        # The same ratios round by round: how far the neighbours move them.
        def spread(values):
            return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"
        out("")
        out("Ratios round by round (median, and range over the rounds, of ratios of runs made seconds "
            "apart):")
        out("")
        if len(threads) > 1:
            t0, t1 = threads[0], threads[-1]
            out(f"| cache tokens | i8 speedup, {t0} thread(s) | i8 speedup, {t1} threads "
                f"| f32 {t1}T / {t0}T | i8 {t1}T / {t0}T | read stream {t1}T / {t0}T |")
            out("|---|---|---|---|---|---|")
        else:
            t0 = t1 = threads[0]
            out(f"| cache tokens | i8 speedup, {t0} thread(s) |")
            out("|---|---|")
        for n in lengths:
            def ratios(num, den):
                return [x / y for x, y in zip(all_runs[num], all_runs[den])]
            cells = [spread(ratios((t0, n, "f32"), (t0, n, "i8")))]
            if t1 != t0:
                cells.append(spread(ratios((t1, n, "f32"), (t1, n, "i8"))))
                cells.append(spread(ratios((t0, n, "f32"), (t1, n, "f32"))))
                cells.append(spread(ratios((t0, n, "i8"), (t1, n, "i8"))))
                cells.append(f"{bw[t1]['read_gbps'] / bw[t0]['read_gbps']:.2f}")
            out(f"| {n} | " + " | ".join(cells) + " |")
        out("")
        ov = json.loads(subprocess.check_output(
            [os.path.join(a.build, "qkv_roofline"), "--threads", "1", "--overlap"], env=env))
        if "overlap" in ov:
            out("Does one core overlap a read stream with arithmetic? (`qkv_roofline --threads 1 "
                "--overlap`: 512 MiB read in 16 KiB blocks, W rounds of 8 independent FMAs after each "
                "block)")
            out("")
            out("| FMA rounds per block | stream + FMAs ms | FMAs alone ms | stream alone + FMAs alone ms |")
            out("|---|---|---|---|")
            base = ov["overlap"][0]["stream_and_fma_ms"]
            for row in ov["overlap"]:
                out(f"| {row['fma_rounds_per_16KiB']} | {row['stream_and_fma_ms']:.1f} | "
                    f"{row['fma_only_ms']:.1f} | {base + row['fma_only_ms']:.1f} |")
            out("")
    text = "\n".join(lines)
    print(text)
    if a.write:
        with open(a.write) as f:
            doc = f.read()
        if BEGIN not in doc or END not in doc:
            sys.exit(f"{a.write}: markers '{BEGIN}' / '{END}' not found (expected both)")
        head, rest = doc.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        with open(a.write, "w") as f:
            f.write(head + BEGIN + "\n" + text + "\n" + END + tail)


if __name__ == "__main__":
    main()
