#!/usr/bin/python3
"""Writes the head-pattern fixtures (tests/testdata/patterns/) and their NumPy reference.

Run with Debian's python3 (NumPy 1.24, nothing else), from anywhere:

    /usr/bin/python3 tests/inspect/gen_pattern_fixtures.py

The output is deterministic (seeded): running it twice writes byte-identical files.

Files, in the format `qkv embed --attn-weights DIR` writes:
  layer0.npy, layer1.npy  float32 [n, heads, seq, seq] = [4, 5, 9, 9]. Input b has L_b real
                          tokens, L = [9, 6, 3, 2]. For i < L_b each row weights[b, h, i, :L_b] is a
                          probability distribution (float32 values whose exact sum is 1 to within
                          about 1e-7); every entry with i >= L_b or j >= L_b is exactly 0.
                          Layer 0 holds pure patterns: head 0 diagonal (row i -> key i), head 1
                          previous token (row i -> key i-1, row 0 -> key 0), head 2 column on the
                          first token (key 0), head 3 column on the last real token (key L_b - 1),
                          head 4 uniform over the L_b real keys.
                          Layer 1's rows are rng.dirichlet draws with concentration
                          0.05, 0.3, 1, 5, 50 for heads 0..4.
  tokens.json             a JSON list of n lists of token strings (list b has L_b strings), written
                          as qkv writes it (nlohmann::json::dump(): no spaces, UTF-8, final newline).
  expected.json           one object per (layer, head), ordered by layer then head, with the metrics
                          below computed in float64 from the float32 arrays, and "label".

Metrics. For each input b, head h and real query row i < L_b let a = weights[b, h, i, :L_b] in
float64. A mean over zero rows is 0.
  rows                number of rows averaged over by self/first/last/punct/local/entropy/sparse
                      = sum over b of L_b.
  self                mean over rows of a[i].
  previous            mean over rows with i >= 1 of a[i-1] (rows with i = 0 left out).
  next                mean over rows with i <= L_b - 2 of a[i+1] (each input's last row left out).
  first               mean over rows of a[0].
  last                mean over rows of a[L_b - 1].
  punct               mean over rows of the sum of a[j] over keys j whose token is punctuation: a
                      token that is not special ("[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]"), does
                      not start with "##", is non-empty, and whose every character c has
                      unicodedata.category(c) starting with "P".
  local               mean over rows of the sum of a[j] over |j - i| <= 2.
  entropy             mean over rows of -sum_j a[j] ln a[j] (a[j] = 0 terms are 0), in nats.
  normalized_entropy  mean over rows with L_b >= 2 of (that row's entropy) / ln(L_b) (rows of
                      single-token inputs left out).
  sparse              fraction of rows whose three largest weights (all of them when L_b < 3) sum
                      to >= 0.9.
Label, the first rule that applies: the positional candidates, in this order, are
("diagonal", self), ("previous", previous), ("next", next), ("column:[CLS]", first),
("column:[SEP]", last), ("column:punct", punct); if the largest candidate value is >= 0.5 the label
is that candidate's name (ties: the earlier one). Else "local block" if local >= 0.8, else "sparse"
if sparse >= 0.8, else "broad" if normalized_entropy >= 0.8, else "mixed".
"""

import json
import math
import os
import unicodedata

import numpy as np

LENGTHS = [9, 6, 3, 2]
HEADS = 5
SEQ = max(LENGTHS)
ALPHAS = [0.05, 0.3, 1.0, 5.0, 50.0]
SEED = 20190611

TOKENS = [
    ["[CLS]", "hello", ",", "world", "##s", "—", "$", "!", "[SEP]"],
    ["[CLS]", "(", "[UNK]", "?", ")", "[SEP]"],
    ["[CLS]", ".", "[SEP]"],
    ["[CLS]", "[SEP]"],
]

SPECIAL = {"[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]"}

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "testdata", "patterns")


def is_punct(token):
    if token in SPECIAL or token.startswith("##") or not token:
        return False
    # Spaces (a decoder token's leading " ") do not count; at least one P* character.
    chars = [c for c in token if not (unicodedata.category(c) == "Zs" or c in "\t\n\r")]
    return bool(chars) and all(unicodedata.category(c).startswith("P") for c in chars)


def to_float32_distribution(p):
    """float64 distribution -> float32 values whose exact sum is as close to 1 as we can make it."""
    q = p.astype(np.float32)
    k = int(np.argmax(q))
    for _ in range(4):
        err = 1.0 - float(q.astype(np.float64).sum())
        if err == 0.0:
            break
        q[k] = np.float32(float(q[k]) + err)
    assert abs(float(q.astype(np.float64).sum()) - 1.0) < 2e-7, q
    assert np.all(q >= 0)
    return q


def layer0():
    w = np.zeros((len(LENGTHS), HEADS, SEQ, SEQ), dtype=np.float32)
    for b, n in enumerate(LENGTHS):
        for i in range(n):
            w[b, 0, i, i] = 1.0
            w[b, 1, i, max(i - 1, 0)] = 1.0
            w[b, 2, i, 0] = 1.0
            w[b, 3, i, n - 1] = 1.0
            w[b, 4, i, :n] = np.float32(1.0 / n)  # all equal: a pure uniform pattern
    return w


def layer1(rng):
    w = np.zeros((len(LENGTHS), HEADS, SEQ, SEQ), dtype=np.float32)
    for b, n in enumerate(LENGTHS):
        for h in range(HEADS):
            for i in range(n):
                p = rng.dirichlet(np.full(n, ALPHAS[h]))
                assert np.all(np.isfinite(p))
                w[b, h, i, :n] = to_float32_distribution(p)
    return w


def mean(values):
    return float(sum(values) / len(values)) if values else 0.0


def head_metrics(weights, h):
    rows = 0
    acc = {k: [] for k in ("self", "previous", "next", "first", "last", "punct", "local",
                           "entropy", "normalized_entropy", "sparse")}
    for b, n in enumerate(LENGTHS):
        punct_keys = [j for j in range(n) if is_punct(TOKENS[b][j])]
        for i in range(n):
            a = weights[b, h, i, :n].astype(np.float64)
            rows += 1
            acc["self"].append(a[i])
            if i >= 1:
                acc["previous"].append(a[i - 1])
            if i <= n - 2:
                acc["next"].append(a[i + 1])
            acc["first"].append(a[0])
            acc["last"].append(a[n - 1])
            acc["punct"].append(float(a[punct_keys].sum()) if punct_keys else 0.0)
            acc["local"].append(float(a[max(i - 2, 0):min(i + 3, n)].sum()))
            nz = a[a > 0]
            ent = float(-(nz * np.log(nz)).sum())
            acc["entropy"].append(ent)
            if n >= 2:
                acc["normalized_entropy"].append(ent / math.log(n))
            top3 = float(np.sort(a)[::-1][:3].sum())
            acc["sparse"].append(1.0 if top3 >= 0.9 else 0.0)
    out = {"rows": rows}
    for k, v in acc.items():
        out[k] = mean([float(x) for x in v])
    return out


def label(m):
    candidates = [("diagonal", m["self"]), ("previous", m["previous"]), ("next", m["next"]),
                  ("column:[CLS]", m["first"]), ("column:[SEP]", m["last"]),
                  ("column:punct", m["punct"])]
    best_name, best = candidates[0]
    for name, value in candidates[1:]:
        if value > best:  # strict: ties keep the earlier candidate
            best_name, best = name, value
    if best >= 0.5:
        return best_name
    if m["local"] >= 0.8:
        return "local block"
    if m["sparse"] >= 0.8:
        return "sparse"
    if m["normalized_entropy"] >= 0.8:
        return "broad"
    return "mixed"


def check_layer(w):
    assert w.dtype == np.float32 and w.shape == (len(LENGTHS), HEADS, SEQ, SEQ)
    for b, n in enumerate(LENGTHS):
        assert np.all(w[b, :, n:, :] == 0) and np.all(w[b, :, :, n:] == 0)
        sums = w[b, :, :n, :n].astype(np.float64).sum(axis=-1)
        assert np.all(np.abs(sums - 1.0) < 2e-7), sums


def main():
    assert [len(t) for t in TOKENS] == LENGTHS
    for t in TOKENS:
        assert t[0] == "[CLS]" and t[-1] == "[SEP]"
    rng = np.random.default_rng(SEED)
    layers = [layer0(), layer1(rng)]
    for w in layers:
        check_layer(w)

    expected = []
    for layer, w in enumerate(layers):
        for h in range(HEADS):
            m = head_metrics(w, h)
            entry = {"layer": layer, "head": h}
            entry.update(m)
            entry["label"] = label(m)
            expected.append(entry)
    got0 = [e["label"] for e in expected if e["layer"] == 0]
    assert got0 == ["diagonal", "previous", "column:[CLS]", "column:[SEP]", "broad"], got0

    os.makedirs(OUT_DIR, exist_ok=True)
    written = []
    for layer, w in enumerate(layers):
        path = os.path.join(OUT_DIR, "layer%d.npy" % layer)
        np.save(path, w)
        written.append(path)
    path = os.path.join(OUT_DIR, "tokens.json")
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(TOKENS, ensure_ascii=False, separators=(",", ":")) + "\n")
    written.append(path)
    path = os.path.join(OUT_DIR, "expected.json")
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(expected, indent=1) + "\n")
    written.append(path)

    for p in written:
        print("wrote %s (%d bytes)" % (os.path.relpath(p), os.path.getsize(p)))
    for e in expected:
        print("layer %d head %d: %-12s self %.3f prev %.3f next %.3f first %.3f last %.3f "
              "punct %.3f local %.3f H %.3f Hn %.3f sparse %.3f"
              % (e["layer"], e["head"], e["label"], e["self"], e["previous"], e["next"],
                 e["first"], e["last"], e["punct"], e["local"], e["entropy"],
                 e["normalized_entropy"], e["sparse"]))


if __name__ == "__main__":
    main()
