#!/usr/bin/python3
"""Writes the PyTorch golden fixtures of tests/torch_fixture_test.cc.

Run with Debian's python3 (PyTorch 1.13, NumPy 1.24), from the repository root:

    /usr/bin/python3 tests/gen_torch_fixtures.py

Each case is a folder tests/testdata/torch/<case>/ holding C-order .npy files:
  q.npy [batch, num_q_heads, seq_q, head_dim]        (float32, float16 for "float16")
  k.npy [batch, num_kv_heads, seq_kv, head_dim]
  v.npy [batch, num_kv_heads, seq_kv, head_dim_v]
  mask.npy   (when the case has one) bool (True = attend) or additive float32
  out.npy    [batch, num_q_heads, seq_q, head_dim_v] float32 (float16 for "float16")
  out32.npy  ("float16" only) the float32 output before rounding to float16
  weights.npy [batch, num_q_heads, seq_q, seq_kv] float32 softmax probabilities
  lse.npy     [batch, num_q_heads, seq_q, 1] float32 logsumexp of the masked scores

The outputs come from PyTorch's own op, torch.nn.functional._scaled_dot_product_attention
(private in 1.13; signature (q, k, v, attn_mask, dropout_p, need_attn_weights, is_causal);
its attn_mask is documented as boolean only but also adds a float mask, which this script
checks), on CPU in float32 with the default scale 1/sqrt(head_dim). Its is_causal is
top-left (key j <= query i). Every output is also checked here against the plain
softmax(scale * q.k^T + mask) . v formula, so a fixture never silently disagrees with torch.
lse has no torch op: it is torch.logsumexp over the masked, scaled scores (float32).

manifest.txt starts with a magic line and the format version, then the library versions,
then one line per case; the C++ test checks the magic and version.
"""

import math
import os
import shutil

import numpy as np
import torch
import torch.nn.functional as F

MAGIC = "qkv-torch-fixtures"
FORMAT_VERSION = 1
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata", "torch")


def Randn(gen, *shape):
    """Returns a float32 tensor of standard normal values from the fixed generator."""
    return torch.randn(*shape, generator=gen, dtype=torch.float32)


def MaskedScores(q, k, mask, is_causal):
    """Returns scale * q.k^T + mask with disallowed pairs set to -inf, float32."""
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    if is_causal:
        allowed = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
    return scores


def Compute(q, k, v, mask=None, is_causal=False):
    """Returns (out, weights, lse) of torch's SDPA in float32; K/V already have num_q_heads."""
    out, weights = F._scaled_dot_product_attention(q, k, v, mask, 0.0, True, is_causal)
    scores = MaskedScores(q, k, mask, is_causal)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    # Cross-check torch's op against the textbook formula (same float32 arithmetic
    # up to reordering: a few ulps of max|v|).
    probs = torch.softmax(scores, dim=-1)
    assert torch.isfinite(lse).all(), "a fixture row is fully masked (torch gives NaN)"
    assert torch.allclose(weights, probs, rtol=1e-5, atol=1e-6)
    assert torch.allclose(out, probs @ v, rtol=1e-5, atol=1e-5 * v.abs().max().item())
    return out, weights, lse


def Save(case, manifest, note, **arrays):
    """Writes arrays (torch tensors or ndarrays) as <case>/<name>.npy."""
    folder = os.path.join(ROOT, case)
    os.makedirs(folder)
    for name, value in arrays.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        np.save(os.path.join(folder, name + ".npy"), np.ascontiguousarray(value))
    q = arrays["q"]
    k = arrays["k"]
    v = arrays["v"]
    manifest.append(
        f"{case} batch={q.shape[0]} num_q_heads={q.shape[1]} num_kv_heads={k.shape[1]} "
        f"seq_q={q.shape[2]} seq_kv={k.shape[2]} head_dim={q.shape[3]} "
        f"head_dim_v={v.shape[3]} dtype={str(q.dtype).replace('torch.', '')}: {note}")


def RowsNotEmpty(mask):
    """Sets mask[..., i, j_i] = True on one random-looking key per row, so no row is empty."""
    seq_q, seq_kv = mask.shape[-2], mask.shape[-1]
    for i in range(seq_q):
        mask[..., i, (3 * i + 1) % seq_kv] = True
    return mask


def Main():
    assert torch.__version__.startswith("1.13"), torch.__version__
    if os.path.isdir(ROOT):
        for entry in os.listdir(ROOT):
            path = os.path.join(ROOT, entry)
            if os.path.isdir(path):
                shutil.rmtree(path)
    os.makedirs(ROOT, exist_ok=True)
    gen = torch.Generator().manual_seed(20240611)
    manifest = []

    # plain: cross-attention shapes, no mask.
    q, k, v = Randn(gen, 2, 3, 7, 16), Randn(gen, 2, 3, 11, 16), Randn(gen, 2, 3, 11, 16)
    out, weights, lse = Compute(q, k, v)
    Save("plain", manifest, "no mask", q=q, k=k, v=v, out=out, weights=weights, lse=lse)

    # causal_square: torch's is_causal, seq_q == seq_kv (both alignments agree).
    q, k, v = Randn(gen, 1, 2, 9, 8), Randn(gen, 1, 2, 9, 8), Randn(gen, 1, 2, 9, 8)
    out, weights, lse = Compute(q, k, v, is_causal=True)
    Save("causal_square", manifest, "torch is_causal=True (j <= i)",
         q=q, k=k, v=v, out=out, weights=weights, lse=lse)

    # causal_top_left: seq_q < seq_kv, mask j <= i; also checked against is_causal.
    q, k, v = Randn(gen, 1, 2, 5, 8), Randn(gen, 1, 2, 9, 8), Randn(gen, 1, 2, 9, 8)
    mask = torch.ones(5, 9, dtype=torch.bool).tril()
    out, weights, lse = Compute(q, k, v, mask)
    out_causal, _, _ = Compute(q, k, v, is_causal=True)
    assert torch.equal(out, out_causal)
    Save("causal_top_left", manifest, "bool mask [seq_q,seq_kv] j <= i (= torch is_causal)",
         q=q, k=k, v=v, mask=mask, out=out, weights=weights, lse=lse)

    # causal_bottom_right: seq_q < seq_kv, mask j <= i + seq_kv - seq_q.
    q, k, v = Randn(gen, 1, 2, 5, 8), Randn(gen, 1, 2, 9, 8), Randn(gen, 1, 2, 9, 8)
    mask = torch.ones(5, 9, dtype=torch.bool).tril(9 - 5)
    out, weights, lse = Compute(q, k, v, mask)
    Save("causal_bottom_right", manifest, "bool mask [seq_q,seq_kv] j <= i + seq_kv - seq_q",
         q=q, k=k, v=v, mask=mask, out=out, weights=weights, lse=lse)

    # bool_mask_2d: [seq_q, seq_kv] broadcast over batch and heads.
    q, k, v = Randn(gen, 2, 2, 6, 8), Randn(gen, 2, 2, 10, 8), Randn(gen, 2, 2, 10, 8)
    mask = RowsNotEmpty(torch.rand(6, 10, generator=gen) < 0.5)
    out, weights, lse = Compute(q, k, v, mask)
    Save("bool_mask_2d", manifest, "bool mask [seq_q,seq_kv], True = attend",
         q=q, k=k, v=v, mask=mask, out=out, weights=weights, lse=lse)

    # bool_mask_4d: [batch, 1, seq_q, seq_kv] broadcast over heads.
    q, k, v = Randn(gen, 2, 2, 6, 8), Randn(gen, 2, 2, 10, 8), Randn(gen, 2, 2, 10, 8)
    mask = RowsNotEmpty(torch.rand(2, 1, 6, 10, generator=gen) < 0.5)
    out, weights, lse = Compute(q, k, v, mask)
    Save("bool_mask_4d", manifest, "bool mask [batch,1,seq_q,seq_kv], True = attend",
         q=q, k=k, v=v, mask=mask, out=out, weights=weights, lse=lse)

    # float_mask: additive [batch, heads, seq_q, seq_kv], finite values and some -inf;
    # head_dim_v (8) differs from head_dim (12).
    q, k, v = Randn(gen, 2, 2, 6, 12), Randn(gen, 2, 2, 10, 12), Randn(gen, 2, 2, 10, 8)
    mask = 2.0 * Randn(gen, 2, 2, 6, 10)
    blocked = RowsNotEmpty(torch.rand(2, 2, 6, 10, generator=gen) < 0.7)
    mask = mask.masked_fill(~blocked, float("-inf"))
    out, weights, lse = Compute(q, k, v, mask)
    Save("float_mask", manifest, "additive float32 mask [batch,heads,seq_q,seq_kv] with -inf",
         q=q, k=k, v=v, mask=mask, out=out, weights=weights, lse=lse)

    # gqa: 4 query heads, 2 kv heads; group_size = 2, query head h reads kv head h // 2.
    q, k, v = Randn(gen, 2, 4, 5, 8), Randn(gen, 2, 2, 7, 8), Randn(gen, 2, 2, 7, 8)
    group_size = 2
    out, weights, lse = Compute(q, k.repeat_interleave(group_size, dim=1),
                                v.repeat_interleave(group_size, dim=1))
    Save("gqa", manifest, "num_q_heads=4 num_kv_heads=2, torch with repeat_interleave",
         q=q, k=k, v=v, out=out, weights=weights, lse=lse)

    # float16: half inputs; torch's CPU bmm has no half kernel in 1.13, so the output is
    # computed in float32 from the (exactly widened) half values, then rounded to half.
    q16 = Randn(gen, 1, 2, 6, 16).half()
    k16 = Randn(gen, 1, 2, 10, 16).half()
    v16 = Randn(gen, 1, 2, 10, 16).half()
    out, weights, lse = Compute(q16.float(), k16.float(), v16.float())
    Save("float16", manifest, "float16 q/k/v; out32 in float32 from them, out rounded to half",
         q=q16, k=k16, v=v16, out=out.half(), out32=out, weights=weights, lse=lse)

    with open(os.path.join(ROOT, "manifest.txt"), "w") as f:
        f.write(f"{MAGIC} {FORMAT_VERSION}\n")
        f.write(f"torch {torch.__version__} numpy {np.__version__}\n")
        for line in manifest:
            f.write(line + "\n")


if __name__ == "__main__":
    Main()
