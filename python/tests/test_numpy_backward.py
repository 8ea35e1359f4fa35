"""qkv.attention_backward on NumPy arrays against the analytic float64
gradients of conftest.py (dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO O)),
dQ = scale dS K, dK = scale dS^T Q summed over the GQA group, dmask = dS summed
over the mask's broadcast dims), each within its derived first-order bound."""

import numpy as np
import pytest

import qkv
from conftest import (FLASH_U, MASKS, SHAPES, U32, U64, allowed_pairs, assert_within,
                      backward_oracle, forward_oracle, from_layout, lse_bound, mask_options,
                      oracle_mask, out_bound, rand, to_layout)

# (layout, dtype, kernel, accumulate)
VARIANTS = [
    ("bhsd", np.float32, "flash", None),
    ("bshd", np.float32, "auto", None),
    ("bhsd", np.float16, "auto", None),
    ("bshd", np.float64, "auto", None),        # float64: reference, float64 accumulation
    ("bhsd", np.float32, "reference", None),
    ("bhsd", np.float32, "reference", "float64"),
    ("bshd", np.float16, "reference", None),
]

CASES = []
for mi, mk in enumerate(MASKS):
    for r in range(2):
        CASES.append((mk, (mi + 3 * r + 1) % len(SHAPES), (2 * mi + r) % len(VARIANTS)))


def case_id(c):
    mk, si, vi = c
    layout, dtype, kernel, acc = VARIANTS[vi]
    return f"{mk}-s{si}-{layout}-{np.dtype(dtype).name}-{kernel}{'-acc' + acc if acc else ''}"


def arith_u(info, dtype, acc):
    if acc == "float64" or (acc is None and dtype == np.float64):
        assert info["kernel"] == "reference", info
        return U64
    return FLASH_U if info["kernel"] == "flash" else U32


def run_backward(q, k, v, dout, opts, *, layout, kernel, acc, dmask=False, pass_forward=True,
                 threads=0):
    """Forward then backward as a user would; returns logical-bhsd results."""
    L = lambda x: to_layout(x, layout)  # noqa: E731
    fwd_kernel = "reference" if (kernel == "reference" or acc == "float64") else kernel
    out, lse, finfo = qkv.attention(L(q), L(k), L(v), layout=layout, kernel=fwd_kernel,
                                    accumulate=acc, return_lse=True, return_info=True,
                                    threads=threads, **opts)
    res = qkv.attention_backward(L(q), L(k), L(v), out if pass_forward else None, L(dout),
                                 lse if pass_forward else None, layout=layout, kernel=kernel,
                                 accumulate=acc, return_dmask=dmask, return_info=True,
                                 threads=threads, **opts)
    dq, dk, dv = (from_layout(x, layout) for x in res[:3])
    for x, src in ((res[0], q), (res[1], k), (res[2], v)):
        assert x.dtype == src.dtype and x.shape == L(src).shape
    return dict(out=from_layout(out, layout), lse=lse, finfo=finfo, dq=dq, dk=dk, dv=dv,
                dmask=res[3] if dmask else None, info=res[-1])


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_backward_matches_float64_gradients(case):
    """dq, dk, dv (and dmask for additive masks, reference kernel) of every
    mask kind, GQA/MQA shape, layout and dtype are within the derived bound
    of the analytic float64 gradients; rows with no key have dq exactly 0."""
    mk, si, vi = case
    shape = SHAPES[si]
    layout, dtype, kernel, acc = VARIANTS[vi]
    B, H, G, NQ, NK, D, DV = shape
    rng = np.random.default_rng(2000 + 13 * si + 5 * vi + len(mk))
    src = np.float32 if dtype == np.float64 else dtype
    q = rand(rng, (B, H, NQ, D), src).astype(dtype)
    k = rand(rng, (B, G, NK, D), src).astype(dtype)
    v = rand(rng, (B, G, NK, DV), src).astype(dtype)
    dout = rand(rng, (B, H, NQ, DV), src).astype(dtype)
    opts = mask_options(mk, rng, shape)
    mask = opts.get("mask")
    want_dmask = mask is not None and mask.dtype != bool and kernel != "flash"
    r = run_backward(q, k, v, dout, opts, layout=layout, kernel=kernel, acc=acc, dmask=want_dmask)
    info = r["info"]
    if kernel != "auto":
        assert info["kernel"] == kernel
    if want_dmask:
        assert info["kernel"] == "reference"  # dmask is the reference kernel's
    u = arith_u(info, dtype, acc)
    allowed, add = oracle_mask(opts, shape)
    g = backward_oracle(q, k, v, dout, allowed=allowed, add=add, u=u, given_out=r["out"],
                        given_lse=r["lse"], grad_dtype=dtype,
                        mask_shape=mask.shape if want_dmask else None,
                        dmask_dtype=mask.dtype if want_dmask else np.float32)
    assert_within("dq", r["dq"], g["dq"], g["dq_bound"])
    assert_within("dk", r["dk"], g["dk"], g["dk_bound"])
    assert_within("dv", r["dv"], g["dv"], g["dv_bound"])
    assert np.all(r["dq"][~g["o"]["any"]] == 0)
    if want_dmask:
        assert r["dmask"].shape == mask.shape and r["dmask"].dtype == mask.dtype
        assert_within("dmask", r["dmask"], g["dmask"], g["dmask_bound"])


@pytest.mark.parametrize("mask_shape, broadcast_to", [
    ((2, 4, 9, 11), None),           # full
    ((9, 11), None),                 # [seq_q, seq_kv]: summed over batch and heads
    ((4, 1, 11), None),              # [1, heads, 1, seq_kv]
    ((2, 1, 1, 1), None),            # one value per batch row
    ((1, 1, 9, 11), (2, 4, 9, 11)),  # np.broadcast_to: stride-0 dims count as broadcast
])
def test_dmask_is_ds_summed_over_broadcast_dims(mask_shape, broadcast_to):
    """dmask comes in the mask's own shape with its broadcast dims (size 1,
    missing or stride 0) summed, and equals the reduced dS within bound."""
    rng = np.random.default_rng(31)
    B, H, G, NQ, NK, D = 2, 4, 2, 9, 11, 8
    q, k, v = rand(rng, (B, H, NQ, D)), rand(rng, (B, G, NK, D)), rand(rng, (B, G, NK, D))
    dout = rand(rng, (B, H, NQ, D))
    own = rand(rng, mask_shape, np.float32)
    own[rng.random(mask_shape) < 0.15] = -np.inf
    mask = own if broadcast_to is None else np.broadcast_to(own, broadcast_to)
    out, lse = qkv.attention(q, k, v, mask=mask, causal="top_left", kernel="reference",
                             return_lse=True)
    dq, dk, dv, dmask = qkv.attention_backward(q, k, v, out, dout, lse, mask=mask,
                                               causal="top_left", return_dmask=True)
    assert dmask.shape == mask_shape and dmask.dtype == np.float32
    allowed, add = allowed_pairs(B, H, NQ, NK, causal="top_left", mask=mask)
    g = backward_oracle(q, k, v, dout, allowed=allowed, add=add, u=U32, given_out=out,
                        given_lse=lse, mask_shape=mask_shape)
    assert_within("dmask", dmask, g["dmask"], g["dmask_bound"])
    assert_within("dq", dq, g["dq"], g["dq_bound"])
    # dmask at -inf entries (no score) is exactly 0 where nothing else adds to it.
    if broadcast_to is None and own.size == B * H * NQ * NK:
        assert np.all(dmask[own == -np.inf] == 0)


@pytest.mark.parametrize("kernel", ["flash", "reference"])
def test_backward_recomputes_forward_when_out_and_lse_are_none(kernel):
    """out=None and lse=None: the forward is recomputed (info['reason'] says
    so) and the gradients stay within the bound, the recomputed forward's
    error entering as its own forward bound."""
    rng = np.random.default_rng(41)
    B, H, G, NQ, NK, D = 2, 4, 1, 19, 23, 12
    q, k, v = rand(rng, (B, H, NQ, D)), rand(rng, (B, G, NK, D)), rand(rng, (B, G, NK, D))
    dout = rand(rng, (B, H, NQ, D))
    opts = dict(causal="bottom_right", key_lengths=[23, 9])
    r = run_backward(q, k, v, dout, opts, layout="bhsd", kernel=kernel, acc=None,
                     pass_forward=False)
    assert "recomput" in r["info"]["reason"], r["info"]
    u = FLASH_U if kernel == "flash" else U32
    allowed, add = allowed_pairs(B, H, NQ, NK, **opts)
    o = forward_oracle(q, k, v, allowed=allowed, add=add)
    # Worst-case given forward: exact + its bound (the bound only uses |error|).
    given_out = o["out"] + out_bound(o, u)
    given_lse = np.where(o["any"], o["lse"] + lse_bound(o, u), -np.inf)
    g = backward_oracle(q, k, v, dout, allowed=allowed, add=add, u=u, given_out=given_out,
                        given_lse=given_lse)
    assert_within("dq", r["dq"], g["dq"], g["dq_bound"])
    assert_within("dk", r["dk"], g["dk"], g["dk_bound"])
    assert_within("dv", r["dv"], g["dv"], g["dv_bound"])


@pytest.mark.parametrize("kernel", ["flash", "reference"])
def test_backward_fully_masked_rows_and_padding(kernel):
    """A row with no allowed key has dq exactly 0; keys no row attends
    (padding past key_lengths, here holding NaN and inf) get dk = dv = 0 and
    leak nothing into any other gradient."""
    rng = np.random.default_rng(43)
    B, H, NQ, NK, D = 2, 2, 10, 6, 8
    q, k, v = rand(rng, (B, H, NQ, D)), rand(rng, (B, H, NK, D)), rand(rng, (B, H, NK, D))
    dout = rand(rng, (B, H, NQ, D))
    k[1, :, 4:] = np.nan
    v[1, :, 4:] = np.inf
    opts = dict(causal="bottom_right", key_lengths=[0, 4])
    r = run_backward(q, k, v, dout, opts, layout="bhsd", kernel=kernel, acc=None)
    for name in ("dq", "dk", "dv"):
        assert not np.isnan(r[name]).any(), name
    assert np.all(r["dq"][0] == 0) and np.all(r["dk"][0] == 0) and np.all(r["dv"][0] == 0)
    # causal bottom-right with seq_q 10 > seq_kv 6: rows 0..3 have no key.
    assert np.all(r["dq"][:, :, :4] == 0)
    assert np.all(r["dk"][1, :, 4:] == 0) and np.all(r["dv"][1, :, 4:] == 0)
    kc, vc = k.copy(), v.copy()
    kc[1, :, 4:] = 0
    vc[1, :, 4:] = 0
    allowed, add = allowed_pairs(B, H, NQ, NK, **opts)
    g = backward_oracle(q, kc, vc, dout, allowed=allowed, add=add,
                        u=FLASH_U if kernel == "flash" else U32, given_out=r["out"],
                        given_lse=r["lse"])
    assert_within("dq", r["dq"], g["dq"], g["dq_bound"])
    assert_within("dk", r["dk"], g["dk"], g["dk_bound"])
    assert_within("dv", r["dv"], g["dv"], g["dv_bound"])


@pytest.mark.parametrize("kernel", ["flash", "reference"])
def test_backward_threads_1_and_2_are_bitwise_equal(kernel):
    """dq, dk, dv (and dmask) do not depend on the thread count."""
    rng = np.random.default_rng(47)
    B, H, G, NQ, NK, D = 2, 8, 2, 70, 90, 24
    q, k, v = rand(rng, (B, H, NQ, D)), rand(rng, (B, G, NK, D)), rand(rng, (B, G, NK, D))
    dout = rand(rng, (B, H, NQ, D))
    mask = rand(rng, (1, H, NQ, NK))
    dmask = kernel == "reference"
    runs = []
    for t in (1, 2):
        out, lse = qkv.attention(q, k, v, mask=mask, causal="bottom_right", kernel=kernel,
                                 return_lse=True, threads=1)
        res = qkv.attention_backward(q, k, v, out, dout, lse, mask=mask, causal="bottom_right",
                                     kernel=kernel, threads=t, return_dmask=dmask,
                                     return_info=True)
        assert res[-1]["threads"] == t
        runs.append([x.tobytes() for x in res[:-1]])
    assert runs[0] == runs[1]


def test_backward_lse_accepts_4d_and_strided_inputs():
    """lse as [b, h, s, 1] and a non-contiguous dout / bshd-transposed q give
    bitwise the gradients of their contiguous forms."""
    rng = np.random.default_rng(53)
    B, H, NQ, NK, D = 1, 3, 8, 12, 16
    q, k, v = rand(rng, (B, H, NQ, D)), rand(rng, (B, H, NK, D)), rand(rng, (B, H, NK, D))
    big_dout = rand(rng, (B, H, NQ, 2 * D))
    dout = big_dout[..., ::2]
    out, lse = qkv.attention(q, k, v, return_lse=True)
    want = qkv.attention_backward(q, k, v, out, np.ascontiguousarray(dout), lse)
    q_view = to_layout(q, "bshd").transpose(0, 2, 1, 3)  # bhsd view of bshd memory
    got = qkv.attention_backward(q_view, k, v, out, dout, lse[..., None])
    for a, b in zip(got, want):
        assert a.tobytes() == b.tobytes()
