#!/usr/bin/python3
"""Writes the torch.nn.MultiheadAttention fixtures of tests/mha_test.cc.

Run with Debian's python3 (PyTorch 1.13, NumPy 1.24), from the repository root:

    /usr/bin/python3 tests/gen_mha_fixtures.py

Each case is a folder tests/testdata/mha/<case>/ holding
  weights.safetensors    the module's state_dict (torch names, F32), written by
                         SaveSafetensors below (no safetensors package needed)
  query.npy              [batch, seq_q, embed_dim] float32
  key.npy, value.npy     [batch, seq_kv, kdim], [batch, seq_kv, vdim] (cross-attention only)
  key_padding_mask.npy   [batch, seq_kv] bool (True = masked out) or float32 (added)
  attn_mask.npy          [seq_q, seq_kv] or [batch*num_heads, seq_q, seq_kv], bool
                         (True = masked out) or float32 (added, -inf masks)
  out.npy                [batch, seq_q, embed_dim] float32: torch's output
  attn_weights.npy       [batch, seq_q, seq_kv] (averaged over heads) or
                         [batch, num_heads, seq_q, seq_kv] (per_head=1)

Every output comes from nn.MultiheadAttention(batch_first=True) in eval mode under
no_grad, on CPU in float32 (self-attention without attn_mask takes torch's fused fast
path, the others its Python path), and is cross-checked here against the same module
in float64. No row is fully masked (torch gives NaN there, qkv zeros).

torch 1.13's nn.MultiheadAttention has no is_causal; the causal cases pass the top-left
boolean mask triu(ones(Nq, Nk), 1) (True = masked out) as attn_mask, which is what
is_causal means in later versions; the manifest marks them causal=1 and the C++ test runs
qkv with causal=true and no mask (and again with the mask).

manifest.txt: a magic line and the format version, the library versions, then one line
per case: "<case> key=value ..." with embed_dim, num_heads, kdim, vdim, batch, seq_q,
seq_kv, bias, cross, per_head, causal.
"""

import json
import os
import shutil
import struct

import numpy as np
import torch

MAGIC = "qkv-mha-fixtures"
FORMAT_VERSION = 1
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata", "mha")


def SaveSafetensors(path, tensors, metadata=None):
    """Writes {name: tensor} as a safetensors file: 8-byte little-endian header length,
    JSON header (padded with spaces to a multiple of 8), then the raw little-endian data."""
    header, blobs, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = metadata
    for name, t in tensors.items():
        data = t.detach().cpu().contiguous().to(torch.float32).numpy().astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)


def Randn(gen, *shape, sigma=1.0):
    return sigma * torch.randn(*shape, generator=gen, dtype=torch.float32)


def BoolMask(gen, shape, p):
    """Returns a bool mask (True = masked out) with key 0 always visible, so no row is empty."""
    mask = torch.rand(*shape, generator=gen) < p
    mask[..., 0] = False
    return mask


def FloatMask(gen, shape):
    """Returns an additive float32 mask: 2 N(0,1) with -inf on ~30%, key 0 finite."""
    mask = Randn(gen, *shape, sigma=2.0)
    return mask.masked_fill(BoolMask(gen, shape, 0.3), float("-inf"))


def MakeCase(gen, manifest, name, embed_dim, num_heads, batch, seq_q, seq_kv=None, kdim=None,
             vdim=None, bias=True, cross=False, per_head=False, kpm=None, attn=None,
             causal=False, note=""):
    """Builds a module with random weights, runs it, checks it in float64 and saves the case.
    kpm: None, "bool" or "float"; attn: None, "bool2d", "bool3d", "float2d" or "float3d"."""
    seq_kv = seq_q if seq_kv is None else seq_kv
    mha = torch.nn.MultiheadAttention(embed_dim, num_heads, bias=bias, kdim=kdim, vdim=vdim,
                                      batch_first=True)
    mha.eval()
    with torch.no_grad():
        for p in mha.parameters():  # torch zero-initialises biases: use random ones
            p.copy_(Randn(gen, *p.shape, sigma=0.5))
    kdim = embed_dim if kdim is None else kdim
    vdim = embed_dim if vdim is None else vdim
    arrays = {"query": Randn(gen, batch, seq_q, embed_dim)}
    if cross:
        arrays["key"] = Randn(gen, batch, seq_kv, kdim)
        arrays["value"] = Randn(gen, batch, seq_kv, vdim)
    else:
        assert seq_kv == seq_q and kdim == embed_dim and vdim == embed_dim
    if kpm == "bool":
        arrays["key_padding_mask"] = BoolMask(gen, (batch, seq_kv), 0.3)
    elif kpm == "float":
        arrays["key_padding_mask"] = Randn(gen, batch, seq_kv, sigma=2.0)
    shape_3d = (batch * num_heads, seq_q, seq_kv)
    if causal:
        arrays["attn_mask"] = torch.ones(seq_q, seq_kv, dtype=torch.bool).triu(1)
    elif attn == "bool2d":
        arrays["attn_mask"] = BoolMask(gen, (seq_q, seq_kv), 0.4)
    elif attn == "bool3d":
        arrays["attn_mask"] = BoolMask(gen, shape_3d, 0.4)
    elif attn == "float2d":
        arrays["attn_mask"] = FloatMask(gen, (seq_q, seq_kv))
    elif attn == "float3d":
        arrays["attn_mask"] = FloatMask(gen, shape_3d)

    def Run(module, dtype):
        q = arrays["query"].to(dtype)
        k = arrays["key"].to(dtype) if cross else q
        v = arrays["value"].to(dtype) if cross else q
        if not cross and (not bias or kpm == "float"):
            # torch 1.13's fused self-attention path fails without biases (TypeError:
            # qkv_bias must be Tensor) and converts a float key_padding_mask to bool
            # (nonzero = masked) instead of adding it; equal copies instead of the same
            # tensor take the documented Python path.
            k, v = q.clone(), q.clone()
        kp = arrays.get("key_padding_mask")
        am = arrays.get("attn_mask")
        if kp is not None and kp.is_floating_point():
            kp = kp.to(dtype)
        if am is not None and am.is_floating_point():
            am = am.to(dtype)
        with torch.no_grad():
            return module(q, k, v, key_padding_mask=kp, attn_mask=am, need_weights=True,
                          average_attn_weights=not per_head)

    out, weights = Run(mha, torch.float32)
    out64, weights64 = Run(mha.double(), torch.float64)  # converts mha in place, after use
    assert torch.isfinite(out).all() and torch.isfinite(weights).all(), name
    # float32 vs float64: a few hundred ulps of the magnitudes here at most.
    assert torch.allclose(out.double(), out64, rtol=1e-4, atol=1e-4), name
    assert torch.allclose(weights.double(), weights64, rtol=1e-4, atol=1e-6), name

    folder = os.path.join(ROOT, name)
    os.makedirs(folder)
    SaveSafetensors(os.path.join(folder, "weights.safetensors"),
                    {k: v.float() for k, v in mha.state_dict().items()}, {"format": "pt"})
    arrays["out"] = out
    arrays["attn_weights"] = weights
    for key, value in arrays.items():
        np.save(os.path.join(folder, key + ".npy"), np.ascontiguousarray(value.numpy()))
    manifest.append(
        f"{name} embed_dim={embed_dim} num_heads={num_heads} kdim={kdim} vdim={vdim} "
        f"batch={batch} seq_q={seq_q} seq_kv={seq_kv} bias={int(bias)} cross={int(cross)} "
        f"per_head={int(per_head)} causal={int(causal)}: {note}")


def Main():
    assert torch.__version__.startswith("1.13"), torch.__version__
    if os.path.isdir(ROOT):
        shutil.rmtree(ROOT)
    os.makedirs(ROOT)
    gen = torch.Generator().manual_seed(20240612)
    manifest = []
    MakeCase(gen, manifest, "self_bias", 16, 4, 2, 6,
             note="self-attention, packed in_proj_weight, biases, averaged weights (fast path)")
    MakeCase(gen, manifest, "self_nobias_kpm", 16, 2, 2, 6, bias=False, per_head=True,
             kpm="bool", note="bias=False, bool key_padding_mask, per-head weights")
    MakeCase(gen, manifest, "cross_kdim_vdim_kpm", 16, 4, 2, 5, seq_kv=9, kdim=10, vdim=12,
             cross=True, kpm="bool",
             note="kdim=10 vdim=12 (q/k/v_proj_weight), Nq != Nk, bool key_padding_mask")
    MakeCase(gen, manifest, "cross_kdim_vdim_nobias", 16, 4, 2, 5, seq_kv=9, kdim=10, vdim=12,
             bias=False, cross=True, per_head=True, attn="bool2d",
             note="kdim/vdim != E without biases, bool attn_mask [Nq,Nk], per-head weights")
    MakeCase(gen, manifest, "cross_float_mask_2d", 16, 8, 2, 5, seq_kv=8, cross=True,
             kpm="bool", attn="float2d",
             note="cross-attention kdim = vdim = E, float attn_mask [Nq,Nk] with -inf + bool kpm")
    MakeCase(gen, manifest, "bool_mask_3d", 16, 4, 2, 6, per_head=True, attn="bool3d",
             note="bool attn_mask [B*H,Nq,Nk], per-head weights")
    MakeCase(gen, manifest, "float_mask_3d_kpm", 16, 2, 2, 5, seq_kv=7, cross=True, kpm="bool",
             attn="float3d", note="float attn_mask [B*H,Nq,Nk] with -inf + bool kpm")
    MakeCase(gen, manifest, "float_kpm", 16, 4, 2, 6, kpm="float",
             note="float key_padding_mask (added), no attn_mask")
    MakeCase(gen, manifest, "causal_self", 16, 4, 2, 7, causal=True,
             note="causal: attn_mask triu(1) (torch's is_causal, top-left)")
    MakeCase(gen, manifest, "causal_cross", 16, 2, 2, 5, seq_kv=8, cross=True, per_head=True,
             causal=True, note="causal top-left with Nq < Nk (differs from bottom-right)")
    MakeCase(gen, manifest, "single_head", 8, 1, 2, 4, seq_kv=6, cross=True,
             note="num_heads=1, head_dim=E")
    MakeCase(gen, manifest, "head_dim_one", 16, 16, 1, 5, per_head=True, kpm="bool",
             note="num_heads=E=16, head_dim=1")
    with open(os.path.join(ROOT, "manifest.txt"), "w") as f:
        f.write(f"{MAGIC} {FORMAT_VERSION}\n")
        f.write(f"torch {torch.__version__} numpy {np.__version__}\n")
        for line in manifest:
            f.write(line + "\n")


if __name__ == "__main__":
    Main()
