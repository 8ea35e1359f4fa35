#!/usr/bin/python3
"""Writes the PyTorch golden fixtures of tests/backward_torch_fixture_test.cc.

Run with Debian's python3 (PyTorch 1.13 from `apt-get install python3-torch`, NumPy 1.24),
from the repository root:

    /usr/bin/python3 tests/gen_backward_fixtures.py

Each case is a folder tests/testdata/torch_backward/<case>/ holding C-order .npy files:
  q.npy    [batch, num_q_heads, seq_q, head_dim]        float32
  k.npy    [batch, num_kv_heads, seq_kv, head_dim]      float32
  v.npy    [batch, num_kv_heads, seq_kv, head_dim_v]    float32
  dout.npy [batch, num_q_heads, seq_q, head_dim_v]      float32, the upstream gradient dL/dout
  mask.npy (when the case has one) bool (True = attend) or additive float32, broadcastable
  out.npy  [batch, num_q_heads, seq_q, head_dim_v]      float64, the forward's output
  lse.npy  [batch, num_q_heads, seq_q]                  float64, logsumexp of the masked scores
  dq.npy, dk.npy, dv.npy  float64, in q's, k's and v's shapes
  dmask.npy (float mask only) float64 in the mask's own shape: dL/dmask, summed by autograd
            over the dimensions the mask broadcasts along

How the gradients are made: the inputs are drawn in float32 and stored as float32, then
widened (exactly) to float64, so torch and qkv see identical input values. The gradients are
torch.autograd.grad of <out, dout> (so dL/dout = dout) through PyTorch's own attention op,
torch.nn.functional._scaled_dot_product_attention (private in 1.13; signature (q, k, v,
attn_mask, dropout_p, need_attn_weights, is_causal); its math path is a composite of matmul
and softmax, so autograd differentiates it, float mask included), in float64 on CPU with the
default scale 1/sqrt(head_dim). Its is_causal is top-left (key j <= query i). As in
gen_torch_fixtures.py, its attn_mask is documented as boolean only but also adds a float mask.
Every gradient is cross-checked here against autograd through the plain formula
softmax(scale * q.k^T + mask) . v in float64 (agreement to 1e-12 relative), and against the
same op in float32 (agreement to 1e-4 of the gradient's largest magnitude), so a fixture never
silently disagrees with torch. GQA: K and V are repeated with repeat_interleave inside the
differentiated function, so autograd sums dk, dv over each group of query heads.

manifest.txt starts with a magic line and the format version, then the library versions,
then one line per case; the C++ test checks the magic and version.
"""

import math
import os
import shutil

import numpy as np
import torch
import torch.nn.functional as F

MAGIC = "qkv-torch-backward-fixtures"
FORMAT_VERSION = 1
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata", "torch_backward")


def Randn(gen, *shape):
    """Returns a float32 tensor of standard normal values from the fixed generator."""
    return torch.randn(*shape, generator=gen, dtype=torch.float32)


def FormulaAttention(q, k, v, mask, is_causal):
    """Returns softmax(scale * q.k^T + mask) . v written out (the cross-check)."""
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    if is_causal:
        allowed = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
    return torch.softmax(scores, dim=-1) @ v, torch.logsumexp(scores, dim=-1)


def TorchAttention(q, k, v, mask, is_causal):
    """Returns torch's SDPA output (and the formula's lse: torch 1.13 has no lse op)."""
    out, _ = F._scaled_dot_product_attention(q, k, v, mask, 0.0, False, is_causal)
    return out, FormulaAttention(q, k, v, mask, is_causal)[1]


def Gradients(attention, q, k, v, dout, mask, is_causal, group_size, dtype):
    """Returns (out, lse, dq, dk, dv, dmask) of `attention` in `dtype`; dmask None for no
    float mask. K and V are repeated per group inside the differentiated function."""
    q, k, v, dout = (t.to(dtype).requires_grad_() for t in (q, k, v, dout))
    float_mask = mask is not None and mask.dtype != torch.bool
    m = mask.to(dtype).requires_grad_() if float_mask else mask
    out, lse = attention(q, k.repeat_interleave(group_size, dim=1),
                         v.repeat_interleave(group_size, dim=1), m, is_causal)
    inputs = (q, k, v, m) if float_mask else (q, k, v)
    grads = torch.autograd.grad(out, inputs, grad_outputs=dout.detach())
    assert torch.isfinite(lse).all(), "a fixture row is fully masked (torch gives NaN)"
    dmask = grads[3] if float_mask else None
    return out.detach(), lse.detach(), grads[0], grads[1], grads[2], dmask


def CheckedGradients(q, k, v, dout, mask=None, is_causal=False, group_size=1):
    """Returns the float64 (out, lse, dq, dk, dv, dmask) of torch's op, after checking them
    against the float64 formula and torch's op in float32."""
    ref = Gradients(TorchAttention, q, k, v, dout, mask, is_causal, group_size, torch.float64)
    formula = Gradients(FormulaAttention, q, k, v, dout, mask, is_causal, group_size,
                        torch.float64)
    single = Gradients(TorchAttention, q, k, v, dout, mask, is_causal, group_size, torch.float32)
    for name, a, b, c in zip(("out", "lse", "dq", "dk", "dv", "dmask"), ref, formula, single):
        if a is None:
            continue
        scale = a.abs().max().item()
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12 * scale), name
        assert torch.allclose(a, c.double(), rtol=0, atol=1e-4 * scale), name
    return ref


def Save(case, manifest, note, **arrays):
    """Writes arrays (torch tensors) as <case>/<name>.npy."""
    folder = os.path.join(ROOT, case)
    os.makedirs(folder)
    for name, value in arrays.items():
        value = value.detach().cpu().numpy()
        np.save(os.path.join(folder, name + ".npy"), np.ascontiguousarray(value))
    q, k, v = arrays["q"], arrays["k"], arrays["v"]
    manifest.append(
        f"{case} batch={q.shape[0]} num_q_heads={q.shape[1]} num_kv_heads={k.shape[1]} "
        f"seq_q={q.shape[2]} seq_kv={k.shape[2]} head_dim={q.shape[3]} "
        f"head_dim_v={v.shape[3]}: {note}")


def RowsNotEmpty(mask):
    """Sets mask[..., i, j_i] = True on one random-looking key per row, so no row is empty."""
    seq_q, seq_kv = mask.shape[-2], mask.shape[-1]
    for i in range(seq_q):
        mask[..., i, (3 * i + 1) % seq_kv] = True
    return mask


def SaveCase(case, manifest, note, q, k, v, dout, mask=None, is_causal=False, group_size=1):
    """Computes the case's gradients and writes its folder."""
    out, lse, dq, dk, dv, dmask = CheckedGradients(q, k, v, dout, mask, is_causal, group_size)
    arrays = dict(q=q, k=k, v=v, dout=dout, out=out, lse=lse, dq=dq, dk=dk, dv=dv)
    if mask is not None:
        arrays["mask"] = mask
    if dmask is not None:
        arrays["dmask"] = dmask
    Save(case, manifest, note, **arrays)


def Main():
    assert torch.__version__.startswith("1.13"), torch.__version__
    if os.path.isdir(ROOT):
        shutil.rmtree(ROOT)
    os.makedirs(ROOT)
    gen = torch.Generator().manual_seed(20240612)
    manifest = []

    # plain: cross-attention shapes, head_dim_v != head_dim, no mask.
    q, k, v = Randn(gen, 2, 2, 7, 12), Randn(gen, 2, 2, 11, 12), Randn(gen, 2, 2, 11, 8)
    SaveCase("plain", manifest, "no mask, head_dim_v != head_dim", q, k, v,
             Randn(gen, 2, 2, 7, 8))

    # causal_top_left: seq_q < seq_kv, torch is_causal (j <= i) = qkv causal top-left.
    q, k, v = Randn(gen, 1, 2, 5, 8), Randn(gen, 1, 2, 9, 8), Randn(gen, 1, 2, 9, 8)
    dout = Randn(gen, 1, 2, 5, 8)
    SaveCase("causal_top_left", manifest, "torch is_causal=True (j <= i), seq_q < seq_kv",
             q, k, v, dout, is_causal=True)
    # The same gradients from the explicit top-left mask (guards the alignment).
    tril = torch.ones(5, 9, dtype=torch.bool).tril()
    a = CheckedGradients(q, k, v, dout, is_causal=True)
    b = CheckedGradients(q, k, v, dout, mask=tril)
    assert all(torch.equal(x, y) for x, y in zip(a[2:5], b[2:5]))

    # bool_mask: [batch, 1, seq_q, seq_kv] broadcast over heads, True = attend.
    q, k, v = Randn(gen, 2, 2, 6, 8), Randn(gen, 2, 2, 10, 8), Randn(gen, 2, 2, 10, 8)
    mask = RowsNotEmpty(torch.rand(2, 1, 6, 10, generator=gen) < 0.5)
    SaveCase("bool_mask", manifest, "bool mask [batch,1,seq_q,seq_kv], True = attend",
             q, k, v, Randn(gen, 2, 2, 6, 8), mask=mask)

    # float_mask: additive [heads, seq_q, seq_kv] (rank 3: broadcast over batch, so dmask
    # sums over the batch), finite values and some -inf; dmask.npy is autograd's.
    q, k, v = Randn(gen, 2, 2, 6, 8), Randn(gen, 2, 2, 10, 8), Randn(gen, 2, 2, 10, 8)
    mask = 2.0 * Randn(gen, 2, 6, 10)
    blocked = RowsNotEmpty(torch.rand(2, 6, 10, generator=gen) < 0.7)
    mask = mask.masked_fill(~blocked, float("-inf"))
    SaveCase("float_mask", manifest,
             "additive float32 mask [heads,seq_q,seq_kv] with -inf; dmask summed over batch",
             q, k, v, Randn(gen, 2, 2, 6, 8), mask=mask)

    # gqa: 4 query heads, 2 kv heads; torch repeats K/V, autograd sums dk, dv per group.
    q, k, v = Randn(gen, 2, 4, 5, 8), Randn(gen, 2, 2, 7, 8), Randn(gen, 2, 2, 7, 8)
    SaveCase("gqa", manifest, "num_q_heads=4 num_kv_heads=2, torch with repeat_interleave",
             q, k, v, Randn(gen, 2, 4, 5, 8), group_size=2)

    with open(os.path.join(ROOT, "manifest.txt"), "w") as f:
        f.write(f"{MAGIC} {FORMAT_VERSION}\n")
        f.write(f"torch {torch.__version__} numpy {np.__version__}\n")
        for line in manifest:
            f.write(line + "\n")


if __name__ == "__main__":
    Main()
