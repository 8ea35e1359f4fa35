"""The Python-module tables of bench/compare.py (`--python yes`, issue 13).

Both run in `--torch-python`, an interpreter with a current PyTorch from PyPI and qkv installed
(`pip install .` into it; docs/python.md):

1. Call overhead: `qkv.attention(q, k, v, threads=T)` on NumPy float32 arrays, median of many
   calls each timed alone (time.perf_counter_ns), against the C++ call's median from
   `qkv bench --json` (Attention() alone, outputs preallocated) at the same shape and threads;
   the two alternate for several rounds and the medians of the rounds are compared.
   The Python call also allocates its output array: that is part of the overhead.
2. Training step: out = sdpa(q, k, v); out.backward(dout), forward + backward timed together,
   qkv.torch.scaled_dot_product_attention against torch.nn.functional.scaled_dot_product_attention
   (on the CPU, PyTorch's flash-attention kernels), float32, B = 1, H = 8, alternating the two
   in one process so that both see the same machine state. flops = 3.5 * 4 * B * H * N^2 * D
   (forward 1 + backward 2.5, FlashAttention's convention), halved for causal.
"""
import json
import os
import statistics
import subprocess

OVERHEAD_SCRIPT = r"""
import json, sys, time
import numpy as np
import qkv
b, h, n, d, threads, calls = (int(x) for x in sys.argv[1:7])
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((b, h, n, d), dtype=np.float32) for _ in range(3))
for _ in range(min(calls, 50)):
    qkv.attention(q, k, v, threads=threads)
times = []
for _ in range(calls):
    t0 = time.perf_counter_ns()
    qkv.attention(q, k, v, threads=threads)
    times.append(time.perf_counter_ns() - t0)
times.sort()
print(json.dumps({"median_s": times[len(times) // 2] * 1e-9, "min_s": times[0] * 1e-9,
                  "version": qkv.__version__}))
"""

TRAIN_SCRIPT = r"""
import json, sys, time
import torch
import torch.nn.functional as F
import qkv.torch as qt
n, d, heads, causal, threads, repeat = (int(x) for x in sys.argv[1:7])
torch.set_num_threads(threads)
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, heads, n, d, generator=g).requires_grad_() for _ in range(3))
dout = torch.randn(1, heads, n, d, generator=g)
fns = {"torch": F.scaled_dot_product_attention, "qkv": qt.scaled_dot_product_attention}
times = {name: [] for name in fns}
for r in range(repeat + 1):
    for name, fn in fns.items():
        q.grad = k.grad = v.grad = None
        t0 = time.perf_counter()
        out = fn(q, k, v, is_causal=bool(causal))
        out.backward(dout)
        if r > 0:  # the first round warms up
            times[name].append(time.perf_counter() - t0)
res = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
res["version"] = torch.__version__
res["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
print(json.dumps(res))
"""


def _json(cmd):
    return json.loads(subprocess.check_output(cmd))


def python_section(a, out):
    """Appends the Python tables to `out` (a list.append). `a` holds compare.py's arguments."""
    py = a.torch_python
    if not py:
        out("**Python** tables skipped: `--torch-python` not given.")
        out("")
        return
    threads = [int(x) for x in a.threads.split(",")]
    out("**Python call overhead** (`qkv.attention` on NumPy float32 arrays vs `qkv bench --json`, "
        "the C++ Attention() call alone; medians):")
    out("")
    out("| B,H,N,D | threads | rounds | C++ call | Python call | overhead | Python / C++ |")
    out("|---|---|---|---|---|---|---|")
    for shape, calls, reps, rounds in (((1, 1, 16, 64), 20000, 10000, 5),
                                       ((1, 8, 4096, 64), 9, 9, 1)):
        for t in threads:
            b, h, n, d = shape
            # C++ and Python alternate, `rounds` times: each median is the median of the
            # rounds' medians, so that a neighbour slowing the VM for a while moves both.
            cs, ps = [], []
            for _ in range(rounds):
                cs.append(_json([os.path.join(a.build, "qkv"), "bench", "--shape",
                                 f"{b},{h},{n},{d}", "--threads", str(t), "--repeat", str(reps),
                                 "--json"])["median_s"])
                ps.append(_json([py, "-c", OVERHEAD_SCRIPT, str(b), str(h), str(n), str(d),
                                 str(t), str(calls)])["median_s"])
            c, p = statistics.median(cs), statistics.median(ps)
            unit, scale = ("us", 1e6) if c < 1e-3 else ("ms", 1e3)
            out(f"| {b},{h},{n},{d} | {t} | {rounds} | {c * scale:.2f} {unit} | "
                f"{p * scale:.2f} {unit} | {(p - c) * 1e6:+.2f} us | {p / c:.3f} |")
    out("")
    n = a.python_n
    rows = []
    for t in threads:
        for d in [int(x) for x in a.dims.split(",")]:
            for causal in (False, True):
                r = _json([py, "-c", TRAIN_SCRIPT, str(n), str(d), str(a.heads), str(int(causal)),
                           str(t), str(a.repeat)])
                flops = 3.5 * 4 * a.heads * n * n * d * (0.5 if causal else 1.0)
                rows.append((t, d, causal, r, flops))
    r0 = rows[0][3]
    out(f"**Forward + backward through `qkv.torch`** vs PyTorch {r0['version']} from PyPI "
        f"(CPU capability {r0['cpu_capability']}): B = 1, H = {a.heads}, N = {n}, float32, "
        f"`out = sdpa(q, k, v); out.backward(dout)` timed together, median of {a.repeat}, the two "
        "alternating in one process; flops 3.5 x 4 B H N^2 D (halved for causal):")
    out("")
    out("| threads | D | causal | qkv.torch ms | GFLOP/s | torch SDPA ms | GFLOP/s | qkv / torch |")
    out("|---|---|---|---|---|---|---|---|")
    for t, d, causal, r, flops in rows:
        out(f"| {t} | {d} | {'yes' if causal else 'no'} | {r['qkv'] * 1e3:.0f} | "
            f"{flops / r['qkv'] * 1e-9:.1f} | {r['torch'] * 1e3:.0f} | "
            f"{flops / r['torch'] * 1e-9:.1f} | {r['torch'] / r['qkv']:.2f}x |")
    out("")
