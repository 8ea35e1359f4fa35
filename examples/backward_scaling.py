#!/usr/bin/python3
"""Why attention scales scores by 1/sqrt(d_k), on numbers `qkv backward` computes.

For each d_k: random unit-variance q, k of head dimension d_k, and v, dout of a fixed dimension 16,
so only the score statistics change with d_k. `qkv backward --mask zeros.npy --dmask ds.npy` returns
dS = dL/dS, the gradient that reaches the scores through the softmax (an all-zero additive mask adds
nothing to the scores, and its gradient is exactly dS). The script runs it with the default scale
1/sqrt(d_k) and with --scale 1 and prints, per setting: the variance of the scores, the mean largest
softmax weight, the median over query rows of |dS_i| (the gradient one row of scores receives) and
the fraction of rows where it is below 1e-3 (effectively no gradient), and the rms of dq. Without the
scale the scores' variance grows as d_k, the softmax saturates (max weight -> 1) and the gradient
through it collapses for more and more rows; with it every statistic stays put.

Usage: /usr/bin/python3 examples/backward_scaling.py [--qkv build/release/qkv] [--dims 4,16,64,256,1024]
"""
import argparse
import os
import subprocess
import tempfile

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qkv", default="build/release/qkv")
    ap.add_argument("--dims", default="4,16,64,256,1024,4096")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    n, dv = a.tokens, 16
    print(f"{n} tokens, 1 head, head_dim_v {dv}, seed {a.seed}; dS = gradient at the scores")
    print("| d_k | scale | score variance | mean max weight | median row norm of dS "
          "| rows with norm < 1e-3 | rms dq |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        path = lambda name: os.path.join(tmp, name)
        for d in [int(x) for x in a.dims.split(",")]:
            rng = np.random.default_rng(a.seed)
            np.save(path("q.npy"), rng.standard_normal((1, 1, n, d), dtype=np.float32))
            np.save(path("k.npy"), rng.standard_normal((1, 1, n, d), dtype=np.float32))
            np.save(path("v.npy"), rng.standard_normal((1, 1, n, dv), dtype=np.float32))
            np.save(path("dout.npy"), rng.standard_normal((1, 1, n, dv), dtype=np.float32))
            np.save(path("zeros.npy"), np.zeros((n, n), dtype=np.float32))
            for scale in (None, 1.0):
                extra = [] if scale is None else ["--scale", str(scale)]
                subprocess.run([a.qkv, "backward", "--q", path("q.npy"), "--k", path("k.npy"),
                                "--v", path("v.npy"), "--dout", path("dout.npy"),
                                "--mask", path("zeros.npy"), "--dmask", path("ds.npy"),
                                "--dq", path("dq.npy"), "--dk", path("dk.npy"),
                                "--dv", path("dv.npy")] + extra, check=True)
                subprocess.run([a.qkv, "attend", "--q", path("q.npy"), "--k", path("k.npy"),
                                "--v", path("v.npy"), "--out", path("out.npy"),
                                "--attn-weights", path("w.npy")] + extra, check=True)
                ds, dq, w = (np.load(path(x)) for x in ("ds.npy", "dq.npy", "w.npy"))
                q, k = np.load(path("q.npy"))[0, 0], np.load(path("k.npy"))[0, 0]
                s = (q.astype(np.float64) @ k.T.astype(np.float64)) * (
                    d ** -0.5 if scale is None else scale)
                rows = np.linalg.norm(ds.astype(np.float64), axis=-1)
                rms = float(np.sqrt(np.mean(np.square(dq, dtype=np.float64))))
                label = f"1/sqrt({d})" if scale is None else "1"
                print(f"| {d} | {label} | {s.var():.3g} | {w.max(axis=-1).mean():.3f} | "
                      f"{np.median(rows):.3g} | {np.mean(rows < 1e-3):.0%} | {rms:.3g} |")


if __name__ == "__main__":
    main()
