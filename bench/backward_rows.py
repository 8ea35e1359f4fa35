"""The backward-pass tables of bench/compare.py (`--backward yes`).

qkv: `qkv bench --backward --json` (out and lse from one forward, then only the backward timed).
Peer: a current PyTorch from PyPI, run with its own interpreter (`--torch-python`, a virtual
environment outside the repository): torch.nn.functional.scaled_dot_product_attention, then
torch.autograd.grad(out, (q, k, v), dout, retain_graph=True) timed alone; on the CPU that is
PyTorch's flash-attention backward (_scaled_dot_product_flash_attention_for_cpu_backward).
flops = 2.5 * 4 * B * H * Nq * Nk * D (FlashAttention's convention), allowed pairs only for causal;
PyTorch's rate is computed with the same flop count as qkv's.
"""
import json
import os
import subprocess
import sys

TORCH_SCRIPT = r"""
import json, sys, time
import torch
import torch.nn.functional as F
n, d, heads, causal, threads, repeat = (int(x) for x in sys.argv[1:7])
torch.set_num_threads(threads)
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, heads, n, d, generator=g).requires_grad_() for _ in range(3))
out = F.scaled_dot_product_attention(q, k, v, is_causal=bool(causal))
dout = torch.randn(out.shape, generator=g)
torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)  # warm-up
times = []
for _ in range(repeat):
    t0 = time.perf_counter()
    torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    times.append(time.perf_counter() - t0)
times.sort()
print(json.dumps({"median_s": times[len(times) // 2], "min_s": times[0],
                  "version": torch.__version__, "grad_fn": type(out.grad_fn).__name__,
                  "cpu_capability": torch.backends.cpu.get_cpu_capability()}))
"""


def torch_backward(python, n, d, heads, causal, threads, repeat):
    out = subprocess.check_output(
        [python, "-c", TORCH_SCRIPT, str(n), str(d), str(heads), str(int(causal)), str(threads),
         str(repeat)])
    return json.loads(out)


def qkv_backward(build, n, d, heads, causal, threads, repeat):
    cmd = [os.path.join(build, "qkv"), "bench", "--backward", "--shape", f"1,{heads},{n},{d}",
           "--threads", str(threads), "--repeat", str(repeat), "--json"]
    if causal:
        cmd.append("--causal")
    return json.loads(subprocess.check_output(cmd))


def peak_rss(build, shape, threads):
    """Runs `qkv backward --shape SHAPE --causal` in a fresh interpreter that reports its child's
    peak resident set (getrusage of the children, so nothing else is counted); returns (bytes,
    seconds, command)."""
    cmd = [os.path.join(build, "qkv"), "backward", "--shape", shape, "--causal", "--threads",
           str(threads)]
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, "
             "time.perf_counter() - t)")
    rss, sec = subprocess.check_output([sys.executable, "-c", probe] + cmd).split()
    return int(rss), float(sec), " ".join(["qkv"] + cmd[1:])


def backward_section(a, out, roofline):
    """Appends the backward tables to `out` (a list.append). `a` holds compare.py's arguments."""
    threads = [int(x) for x in a.threads.split(",")]
    n = a.backward_n
    peaks = {}
    for t in threads:
        r = roofline(a.build, t)
        rows = []
        for d in [int(x) for x in a.dims.split(",")]:
            for causal in (False, True):
                q = qkv_backward(a.build, n, d, a.heads, causal, t, a.repeat)
                pt = None
                if a.torch_python:
                    pt = torch_backward(a.torch_python, n, d, a.heads, causal, t, a.repeat)
                rows.append((d, causal, q, pt))
                print("backward", t, d, causal, f"{q['gflops']:.1f}",
                      f"{q['flops'] / pt['median_s'] * 1e-9:.1f}" if pt else "", file=sys.stderr,
                      flush=True)
        r2 = roofline(a.build, t)
        peak = max(r["fma_peak_gflops"], r2["fma_peak_gflops"])
        peaks[t] = peak
        torch_note = ""
        if rows and rows[0][3]:
            p0 = rows[0][3]
            torch_note = (f"; PyTorch {p0['version']} from PyPI ({p0['grad_fn']}, CPU capability "
                          f"{p0['cpu_capability']})")
        out(f"**Backward, {t} thread(s)**: B = 1, H = {a.heads}, N = {n}, float32; FMA peak "
            f"{peak:.1f} GFLOP/s ({r['fma_isa']}, the higher of a measurement before and one after "
            f"the rows){torch_note}")
        out("")
        out("| D | causal | qkv kernel | SIMD | qkv ms | qkv GFLOP/s | % FMA peak | torch ms "
            "| torch GFLOP/s | % FMA peak | qkv / torch | qkv peak RSS |")
        out("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for d, causal, q, pt in rows:
            tcells = ["skipped", "", "", ""]
            if pt:
                tg = q["flops"] / pt["median_s"] * 1e-9
                tcells = [f"{pt['median_s'] * 1e3:.0f}", f"{tg:.1f}", f"{100 * tg / peak:.0f}%",
                          f"{pt['median_s'] / q['median_s']:.2f}x"]
            out(f"| {d} | {'yes' if causal else 'no'} | {q['kernel']} | {q['simd_target']} | "
                f"{q['median_s'] * 1e3:.0f} | {q['gflops']:.1f} | "
                f"{100 * q['gflops'] / peak:.0f}% | " + " | ".join(tcells) +
                f" | {q['peak_rss_bytes'] / 2**20:.0f} MiB |")
        out("")
    if len(threads) > 1 and a.backward_scaling_n:
        t0, t1 = threads[0], threads[-1]
        ns = a.backward_scaling_n
        one = qkv_backward(a.build, ns, 128, 1, False, t0, a.repeat)
        two = qkv_backward(a.build, ns, 128, 1, False, t1, a.repeat)
        out(f"**Backward along the sequence** (B = 1, H = 1, N = {ns}, D = 128: one head, so only "
            f"the sequence can be split): {t0} thread(s) {one['median_s'] * 1e3:.0f} ms, {t1} "
            f"threads {two['median_s'] * 1e3:.0f} ms: **{one['median_s'] / two['median_s']:.2f}x**.")
        out("")
    if a.backward_memory_shape:
        rss, sec, cmd = peak_rss(a.build, a.backward_memory_shape, threads[-1])
        out(f"**Backward memory**: `{cmd}` peaks at **{rss / 1e6:.0f} MB** resident "
            f"({sec:.0f} s).")
        out("")
