#!/usr/bin/python3
"""Writes the `qkv explain scaling` fixtures (tests/testdata/scaling/) and their NumPy reference.

Run with Debian's python3 (NumPy 1.24, nothing else), from anywhere:

    /usr/bin/python3 tests/inspect/gen_scaling_fixtures.py

The output is deterministic (seeded, np.random.default_rng(20240607), one generator drawn in the
order case 0..3, and within a case q, k, v, dout): running it twice writes byte-identical files.

Cases (c, head_dim d, keys N, samples S):
  c0: d=4,  N=16, S=2      c1: d=16, N=16, S=2      c2: d=64, N=16, S=2      c3: d=64, N=7, S=3

Files:
  case{c}_q.npy, case{c}_k.npy, case{c}_v.npy, case{c}_dout.npy
                 float32 [S, 1, N, d] (self-attention shape: seq_q = seq_kv = N, one head,
                 head_dim_v = d), entries rng.standard_normal cast to float32.
  expected.json  a list, ordered by case then setting ("scaled" then "unscaled"), of objects
                 {"case", "head_dim", "keys", "samples", "setting", "scale", "dot_mean",
                  "dot_variance", "mean_max_weight", "entropy", "one_hot_fraction",
                  "score_grad_norm", "query_grad_norm", "softmax_gain"}; floats written with Python
                  repr precision.

Definitions. Everything is computed in float64 from the float32 arrays. A "row" is a query row i of
a sample s; there are S*N rows and no masking. Settings: "scaled" uses scale = 1/sqrt(d),
"unscaled" uses scale = 1.
  dot_mean, dot_variance  over all S*N*N pairs (s, i, j) of the raw (unscaled) dot product
                          x = q[s,0,i,:] . k[s,0,j,:]: dot_mean = mean(x), dot_variance =
                          numpy.var(x) (population variance, ddof=0). Independent of the setting;
                          repeated in both objects of a case.
  scores                  S_ij = scale * q_i . k_j; P_i = softmax_j(S_i) (max-subtracted).
  mean_max_weight         mean over rows of max_j P_ij.
  entropy                 mean over rows of -sum_j P_ij ln P_ij (0 ln 0 = 0), in nats.
  one_hot_fraction        fraction of rows with max_j P_ij > 0.99.
  score_grad_norm         with upstream gradient dout (out_i = sum_j P_ij v_j):
                          dP_ij = dout_i . v_j; dS_i = J_i dP_i with the explicitly built softmax
                          Jacobian J_i = diag(P_i) - P_i P_i^T; mean over rows of ||dS_i||_2.
  query_grad_norm         dQ_i = scale * sum_j dS_ij k_j; mean over rows of ||dQ_i||_2.
  softmax_gain            median over rows of ||dS_i||_2 / ||dP_i||_2 (numpy.median: the mean of
                          the middle two for an even count): the share of the gradient
                          arriving at the weights that the softmax passes on to the scores
                          (the Jacobian's effect alone, free of dout's and V's magnitudes).
"""

import json
import math
import os

import numpy as np

SEED = 20240607
CASES = [  # (case, head_dim, keys, samples)
    (0, 4, 16, 2),
    (1, 16, 16, 2),
    (2, 64, 16, 2),
    (3, 64, 7, 3),
]
ONE_HOT_THRESHOLD = 0.99

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.path.join(HERE, os.pardir, "testdata", "scaling")


def metrics(q, k, v, dout, scale):
    """q, k, v, dout: float64 [S, N, d]. Returns the setting-dependent metrics (loops over rows)."""
    samples, n, _ = q.shape
    max_w, ent, one_hot, sg, qg, gain = [], [], [], [], [], []
    for s in range(samples):
        for i in range(n):
            scores = np.array([scale * float(np.dot(q[s, i], k[s, j])) for j in range(n)])
            e = np.exp(scores - scores.max())
            p = e / e.sum()
            m = float(p.max())
            max_w.append(m)
            nz = p[p > 0]
            ent.append(float(-(nz * np.log(nz)).sum()))
            one_hot.append(1.0 if m > ONE_HOT_THRESHOLD else 0.0)
            dp = np.array([float(np.dot(dout[s, i], v[s, j])) for j in range(n)])
            jac = np.diag(p) - np.outer(p, p)
            ds = jac @ dp
            sg.append(float(np.linalg.norm(ds)))
            gain.append(float(np.linalg.norm(ds)) / float(np.linalg.norm(dp)))
            dq = scale * (ds[:, None] * k[s]).sum(axis=0)
            qg.append(float(np.linalg.norm(dq)))
    rows = samples * n
    return {
        "mean_max_weight": math.fsum(max_w) / rows,
        "entropy": math.fsum(ent) / rows,
        "one_hot_fraction": math.fsum(one_hot) / rows,
        "score_grad_norm": math.fsum(sg) / rows,
        "query_grad_norm": math.fsum(qg) / rows,
        "softmax_gain": float(np.median(np.array(gain))),
    }


def main():
    os.makedirs(OUT_DIR, exist_ok=True)
    rng = np.random.default_rng(SEED)
    written = []
    expected = []
    for c, d, n, samples in CASES:
        arrays = {}
        for name in ("q", "k", "v", "dout"):
            a = rng.standard_normal((samples, 1, n, d)).astype(np.float32)
            path = os.path.join(OUT_DIR, "case%d_%s.npy" % (c, name))
            np.save(path, a)
            written.append(path)
            arrays[name] = a[:, 0].astype(np.float64)  # [S, N, d]
        q, k, v, dout = arrays["q"], arrays["k"], arrays["v"], arrays["dout"]
        x = np.einsum("sid,sjd->sij", q, k).reshape(-1)
        dot_mean = float(np.mean(x))
        dot_var = float(np.var(x))
        for setting, scale in (("scaled", 1.0 / math.sqrt(d)), ("unscaled", 1.0)):
            obj = {
                "case": c, "head_dim": d, "keys": n, "samples": samples,
                "setting": setting, "scale": scale,
                "dot_mean": dot_mean, "dot_variance": dot_var,
            }
            obj.update(metrics(q, k, v, dout, scale))
            expected.append(obj)

    path = os.path.join(OUT_DIR, "expected.json")
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(expected, indent=1) + "\n")
    written.append(path)

    for p in written:
        print("wrote %s (%d bytes)" % (os.path.relpath(p), os.path.getsize(p)))
    for o in expected:
        print("case %d d=%-2d N=%-2d S=%d %-8s scale %.4f dot mean %+.3f var %7.3f | max_w %.4f "
              "H %.4f one_hot %.3f |dS| %.5f |dQ| %.5f"
              % (o["case"], o["head_dim"], o["keys"], o["samples"], o["setting"], o["scale"],
                 o["dot_mean"], o["dot_variance"], o["mean_max_weight"], o["entropy"],
                 o["one_hot_fraction"], o["score_grad_norm"], o["query_grad_norm"]))


if __name__ == "__main__":
    main()
