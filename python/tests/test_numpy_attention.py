"""qkv.attention on NumPy arrays against an independent float64 oracle
(conftest.py), and the no-copy contract of the bindings.

Every check is against a derived error bound (conftest.py: the first-order
analysis of the kernels' arithmetic), not a guessed tolerance.
"""

import os
import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import pytest

import qkv
from conftest import (FLASH_U, MASKS, SHAPES, U32, U64, allowed_pairs, check_forward,
                      forward_oracle, from_layout, mask_options, oracle_mask, out_bound, rand,
                      to_layout)

# ---------------------------------------------------------------------------
# The case matrix: every mask kind x shapes (GQA, MQA, seq_q != seq_kv both
# ways, awkward sizes) x variants (layout, dtype, kernel, accumulation).

# (layout, dtype, kernel, accumulate)
VARIANTS = [
    ("bhsd", np.float32, "flash", None),
    ("bshd", np.float32, "auto", None),
    ("bhsd", np.float16, "flash", None),
    ("bshd", np.float64, "auto", None),          # float64: reference, float64 accumulation
    ("bhsd", np.float32, "reference", None),
    ("bshd", np.float16, "reference", None),
    ("bhsd", np.float32, "reference", "float64"),
    ("bshd", np.float64, "flash", "float32"),    # float64 in/out, float32 flash arithmetic
]


def kernel_u(info, dtype, accumulate):
    """Unit roundoff of the arithmetic that ran (info names the kernel)."""
    if accumulate == "float64" or (accumulate is None and dtype == np.float64):
        assert info["kernel"] == "reference", info
        return U64
    return FLASH_U if info["kernel"] == "flash" else U32


CASES = []
for mi, mk in enumerate(MASKS):
    for r in range(3):
        CASES.append((mk, (mi + 2 * r) % len(SHAPES), (3 * mi + r) % len(VARIANTS)))


def case_id(c):
    mk, si, vi = c
    layout, dtype, kernel, acc = VARIANTS[vi]
    return f"{mk}-s{si}-{layout}-{np.dtype(dtype).name}-{kernel}{'-acc' + acc if acc else ''}"


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_attention_matches_float64_oracle(case):
    """out, lse (and weights for the reference kernel) of every mask kind,
    shape and variant are within the derived bound of the float64 oracle;
    fully masked rows are exactly zero with lse -inf; nothing is NaN."""
    mk, si, vi = case
    shape = SHAPES[si]
    layout, dtype, kernel, acc = VARIANTS[vi]
    B, H, G, NQ, NK, D, DV = shape
    rng = np.random.default_rng(1000 + 17 * si + 3 * vi + len(mk))
    # float64 inputs hold float32 values, so a float32 flash run reads them exactly.
    src = np.float32 if dtype == np.float64 else dtype
    q = rand(rng, (B, H, NQ, D), src).astype(dtype)
    k = rand(rng, (B, G, NK, D), src).astype(dtype)
    v = rand(rng, (B, G, NK, DV), src).astype(dtype)
    opts = mask_options(mk, rng, shape)
    want_weights = kernel == "reference"
    res = qkv.attention(to_layout(q, layout), to_layout(k, layout), to_layout(v, layout),
                        layout=layout, kernel=kernel, accumulate=acc, return_lse=True,
                        return_weights=want_weights, return_info=True, **opts)
    out, lse = res[0], res[1]
    weights = res[2] if want_weights else None
    info = res[-1]
    assert out.dtype == dtype and out.shape == to_layout(q[..., :1], layout).shape[:-1] + (DV,)
    out = from_layout(out, layout)
    stat = np.float64 if (acc == "float64" or (acc is None and dtype == np.float64)) else np.float32
    assert lse.dtype == stat and lse.shape == (B, H, NQ)
    if weights is not None:
        assert weights.dtype == stat and weights.shape == (B, H, NQ, NK)
    if kernel != "auto":
        assert info["kernel"] == kernel
    allowed, add = oracle_mask(opts, shape)
    o = forward_oracle(q, k, v, allowed=allowed, add=add)
    check_forward(o, out, lse, weights, u=kernel_u(info, dtype, acc), out_dtype=dtype,
                  stat_dtype=stat)


def test_explicit_scale_and_cross_kernel_agreement():
    """An explicit (negative) scale is used as given, and the reference and
    flash kernels agree within the sum of their bounds (each is checked
    against the oracle, then against each other)."""
    rng = np.random.default_rng(7)
    q, k, v = rand(rng, (2, 4, 33, 24)), rand(rng, (2, 2, 45, 24)), rand(rng, (2, 2, 45, 24))
    o = forward_oracle(q, k, v, scale=-0.37)
    outs = {}
    for kernel, u in (("reference", U32), ("flash", FLASH_U)):
        out, lse = qkv.attention(q, k, v, scale=-0.37, kernel=kernel, return_lse=True)
        check_forward(o, out, lse, u=u, out_dtype=np.float32)
        outs[kernel] = out
    diff = abs(outs["reference"].astype(np.float64) - outs["flash"])
    assert np.all(diff <= out_bound(o, U32) + out_bound(o, FLASH_U))
    # The default scale is 1/sqrt(head_dim): a scale of 1 must differ.
    o1 = forward_oracle(q, k, v, scale=1.0)
    assert np.max(abs(o1["out"] - o["out"])) > 100 * np.max(out_bound(o, FLASH_U))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("kernel", ["flash", "reference"])
def test_large_logits_stay_finite_and_exact(kernel, dtype):
    """scale * |q.k| ~ 80 (exp would overflow float32 without the max
    subtraction) and an additive mask offset of 1e4: out within the bound,
    lse ~ 1e4 + 80, no inf or NaN."""
    rng = np.random.default_rng(11)
    D = 16
    k = rand(rng, (1, 2, 50, D), dtype)
    # q aligned with some keys: scale * q.k = 80 * cos(angle) for |q| |k| scaled.
    q = np.ascontiguousarray(k[:, :, ::5, :][:, :, :9]).astype(np.float64)
    q = q * (80.0 * np.sqrt(D) / np.maximum((q * q).sum(-1, keepdims=True), 1e-9))
    q = q.astype(dtype)
    v = rand(rng, (1, 2, 50, D), dtype)
    mask = np.full((1, 1, 9, 50), 1e4, dtype=np.float32)
    mask[..., 40:] = -np.inf
    out, lse = qkv.attention(q, k, v, mask=mask, kernel=kernel, return_lse=True)
    allowed, add = allowed_pairs(1, 2, 9, 50, mask=mask)
    o = forward_oracle(q, k, v, allowed=allowed, add=add)
    assert o["A"].max() > 1e4 + 60  # the case really has large logits
    s_max = (forward_oracle(q, k, v)["A"]).max()
    assert s_max > 70, s_max
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(lse))
    check_forward(o, out, lse, u=FLASH_U if kernel == "flash" else U32, out_dtype=dtype,
                  stat_dtype=np.float32)


@pytest.mark.parametrize("kernel", ["flash", "reference", "auto"])
def test_fully_masked_rows_are_zero_with_lse_minus_inf(kernel):
    """Rows with no allowed key (key_lengths 0, a row of -inf, causal with
    seq_q > seq_kv, seq_kv = 0) are exact zeros with lse -inf, and NaN or inf
    in keys/values no row attends (padding) never reaches any output."""
    rng = np.random.default_rng(5)
    B, H, NQ, NK, D = 3, 2, 12, 8, 8
    q, k, v = rand(rng, (B, H, NQ, D)), rand(rng, (B, H, NK, D)), rand(rng, (B, H, NK, D))
    lens = np.array([0, 5, 8])
    # Padding past key_lengths holds garbage: NaN and inf.
    k[1, :, 5:] = np.nan
    v[1, :, 5:] = np.inf
    mask = np.zeros((B, 1, NQ, NK), dtype=np.float32)
    mask[2, 0, 11, :] = -np.inf
    out, lse = qkv.attention(q, k, v, causal="bottom_right", key_lengths=lens, mask=mask,
                             kernel=kernel, return_lse=True)
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    # bottom-right causal with seq_q 12 > seq_kv 8: rows 0..3 see no key (j <= i - 4).
    empty = np.zeros((B, H, NQ), dtype=bool)
    empty[0] = True
    empty[:, :, :4] = True
    empty[2, :, 11] = True
    assert np.all(out[empty] == 0) and np.all(lse[empty] == -np.inf)
    assert np.all(np.isfinite(lse[~empty])) and np.all(np.isfinite(out[~empty]))
    kc, vc = k.copy(), v.copy()
    kc[1, :, 5:] = 0
    vc[1, :, 5:] = 0
    allowed, add = allowed_pairs(B, H, NQ, NK, causal="bottom_right", key_lengths=lens, mask=mask)
    o = forward_oracle(q, kc, vc, allowed=allowed, add=add)
    u = FLASH_U if kernel in ("flash", "auto") else U32
    check_forward(o, out, lse, u=u, out_dtype=np.float32)
    # seq_kv = 0: every row empty.
    out0, lse0 = qkv.attention(q, k[:, :, :0], v[:, :, :0], kernel=kernel, return_lse=True)
    assert out0.shape == (B, H, NQ, D) and np.all(out0 == 0) and np.all(lse0 == -np.inf)


@pytest.mark.parametrize("kernel", ["flash", "reference"])
def test_threads_1_and_2_are_bitwise_equal(kernel):
    """Results do not depend on the thread count: threads=1 and threads=2
    give bitwise identical out and lse (GQA, masks, many rows and heads)."""
    rng = np.random.default_rng(3)
    q, k, v = rand(rng, (2, 8, 97, 40)), rand(rng, (2, 2, 150, 40)), rand(rng, (2, 2, 150, 40))
    mask = rand(rng, (1, 8, 97, 150), np.float32)
    runs = []
    for t in (1, 2):
        out, lse, info = qkv.attention(q, k, v, causal="bottom_right", mask=mask,
                                       key_lengths=[150, 77], kernel=kernel, threads=t,
                                       return_lse=True, return_info=True)
        assert info["threads"] == t
        runs.append((out, lse))
    assert runs[0][0].tobytes() == runs[1][0].tobytes()
    assert runs[0][1].tobytes() == runs[1][1].tobytes()


# ---------------------------------------------------------------------------
# Zero copy: strided views are read in place, outputs written in place.

def test_strided_views_match_their_contiguous_copies():
    """A q with a seq stride of 2 (big[:, :, ::2, :]), a k given as the
    transposed view of bshd memory, a v with a negative seq stride and a
    np.broadcast_to mask with stride 0 give bitwise the results of their
    np.ascontiguousarray copies (the library reads the strides as given)."""
    rng = np.random.default_rng(21)
    B, H, G, NQ, NK, D = 2, 4, 2, 13, 29, 24
    big_q = rand(rng, (B, H, 2 * NQ, D))
    big_q[:, :, 1::2, :] = np.nan  # never read if the stride is honoured
    q = big_q[:, :, ::2, :]
    k = rand(rng, (B, NK, G, D)).transpose(0, 2, 1, 3)  # bhsd view of bshd memory
    v = rand(rng, (B, G, NK, D))[:, :, ::-1, :]
    mask = np.broadcast_to(rand(rng, (1, 1, NQ, NK)), (B, H, NQ, NK))
    assert not q.flags.c_contiguous and not k.flags.c_contiguous and v.strides[2] < 0
    assert mask.strides[0] == 0 and mask.strides[1] == 0
    for kernel in ("flash", "reference"):
        got = qkv.attention(q, k, v, mask=mask, causal="top_left", kernel=kernel, return_lse=True)
        want = qkv.attention(*(np.ascontiguousarray(x) for x in (q, k, v)),
                             mask=np.ascontiguousarray(mask), causal="top_left", kernel=kernel,
                             return_lse=True)
        assert not np.isnan(got[0]).any()
        assert got[0].tobytes() == want[0].tobytes(), kernel
        assert got[1].tobytes() == want[1].tobytes(), kernel
    # And the values are right.
    allowed, add = allowed_pairs(B, H, NQ, NK, causal="top_left", mask=mask)
    o = forward_oracle(q, k, v, allowed=allowed, add=add)
    check_forward(o, got[0], got[1], u=U32, out_dtype=np.float32)


def test_inputs_are_not_copied_tracemalloc():
    """NumPy allocations are traced by tracemalloc: a call on 4 MB strided k
    and v views (every other row and half the columns of a 16 MB buffer), a
    transposed q and a stride-0 broadcast mask (8 MB if materialised) with a
    tiny output allocates almost nothing through NumPy (a copy by the
    bindings, np.ascontiguousarray or an implicit conversion, would show as
    at least a view's size)."""
    rng = np.random.default_rng(0)
    NK, D = 1 << 15, 16
    base = np.zeros((1, 2, 2 * NK, 2 * D), dtype=np.float32)  # 16 MB
    base[:, :, ::64, :] = rand(rng, (1, 2, NK // 32, 2 * D))
    k = base[:, :, ::2, :D]  # non-contiguous views, 4 MB of elements each
    v = base[:, :, ::2, D:]
    q = rand(rng, (1, 4, 2, D)).transpose(0, 2, 1, 3)
    mask = np.broadcast_to(np.zeros((1, 1, 1, 1), np.float64), (1, 2, 4, NK))
    view_bytes = k.size * 4
    out = qkv.attention(q, k, v, mask=mask)  # warm up: first-call imports and caches
    tracemalloc.start()
    try:
        out = qkv.attention(q, k, v, mask=mask)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.shape == (1, 2, 4, D) and np.isfinite(out).all()
    assert peak < view_bytes // 8, f"NumPy allocated {peak} bytes during the call"


def test_large_input_not_copied_peak_rss():
    """A ~256 MB float32 buffer read through non-contiguous k and v views
    (128 MB each) and a stride-0 mask (256 MB if materialised) does not
    raise the process's peak RSS by anything near their size: the library
    reads them in place (no NumPy or C++ copy). Run in a fresh interpreter
    so the peak is this call's."""
    script = textwrap.dedent("""
        import resource, numpy as np, qkv
        def rss():
            with open('/proc/self/statm') as f:
                return int(f.read().split()[1]) * resource.getpagesize()
        N, D, H = 1 << 22, 8, 8
        base = np.empty((1, 1, N, 2 * D), dtype=np.float32)     # 256 MB
        base[..., :D] = 0.0                                      # keys: all zero
        vals = np.array([0, 1, 2, 3, 4, 0.5, 0.25, -1], dtype=np.float32)
        base[..., D:] = vals                                     # every value row
        k, v = base[..., :D], base[..., D:]                      # strided views
        q = np.ones((1, H, 1, D), dtype=np.float32)
        mask = np.broadcast_to(np.zeros(1, np.float64), (1, H, 1, N))  # 256 MB virtual
        before = rss()
        out = qkv.attention(q, k, v, mask=mask, kernel='flash', threads=2)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        assert np.isfinite(out).all()
        # Keys are zero, so every weight is exp(0) = 1 before normalising by
        # l = N = 2^22, and every partial sum of a column is a multiple of its
        # value below 2^24 in magnitude: all float32 arithmetic here is exact,
        # and out equals the (identical) value rows exactly.
        assert np.array_equal(out, np.broadcast_to(vals, out.shape)), out
        print(peak - before)
    """)
    env = dict(os.environ, OMP_NUM_THREADS="2")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    growth = int(r.stdout.split()[-1])
    view_bytes = (1 << 22) * 8 * 4
    assert growth < view_bytes // 2, f"peak RSS grew by {growth} bytes during the call"


def test_out_is_written_in_place_including_non_contiguous_view():
    """out= returns the very object given, writes it in place (its data
    pointer unchanged), honours a non-contiguous out view and leaves the
    memory around the view untouched; also in layout 'bshd'."""
    rng = np.random.default_rng(8)
    B, H, NQ, NK, D, DV = 2, 3, 11, 17, 8, 6
    q, k, v = rand(rng, (B, H, NQ, D)), rand(rng, (B, H, NK, D)), rand(rng, (B, H, NK, DV))
    want = qkv.attention(q, k, v, causal="bottom_right")
    # Contiguous out.
    out = np.full((B, H, NQ, DV), 7.0, dtype=np.float32)
    ptr = out.__array_interface__["data"][0]
    got = qkv.attention(q, k, v, causal="bottom_right", out=out)
    assert got is out and out.__array_interface__["data"][0] == ptr
    assert out.tobytes() == want.tobytes()
    # Non-contiguous out: every other row and a column slice of a bigger buffer.
    buf = np.full((B, H, 2 * NQ, DV + 3), 7.0, dtype=np.float32)
    view = buf[:, :, ::2, 1:DV + 1]
    got = qkv.attention(q, k, v, causal="bottom_right", out=view)
    assert got is view
    assert np.array_equal(view, want)
    untouched = np.ones(buf.shape, dtype=bool)
    untouched[:, :, ::2, 1:DV + 1] = False
    assert np.all(buf[untouched] == 7.0)
    # Layout bshd: out in [b, s, h, d] memory.
    out_bshd = np.full((B, NQ, H, DV), 7.0, dtype=np.float32)
    got, lse = qkv.attention(to_layout(q, "bshd"), to_layout(k, "bshd"), to_layout(v, "bshd"),
                             layout="bshd", causal="bottom_right", out=out_bshd, return_lse=True)
    assert got is out_bshd and np.array_equal(from_layout(out_bshd, "bshd"), want)
    # An out of another float dtype receives the result rounded to it.
    out64 = np.zeros((B, H, NQ, DV), dtype=np.float64)
    assert qkv.attention(q, k, v, causal="bottom_right", out=out64) is out64
    assert np.array_equal(out64, want.astype(np.float64))


def test_read_only_inputs_are_accepted():
    """Read-only arrays (flags.writeable = False) are read like any other."""
    rng = np.random.default_rng(2)
    q, k, v = rand(rng, (1, 2, 5, 8)), rand(rng, (1, 2, 6, 8)), rand(rng, (1, 2, 6, 8))
    mask = rng.random((5, 6)) < 0.8
    want = qkv.attention(q, k, v, mask=mask)
    for x in (q, k, v, mask):
        x.flags.writeable = False
    got = qkv.attention(q, k, v, mask=mask)
    assert got.tobytes() == want.tobytes()


def test_concurrent_calls_from_python_threads_match_serial():
    """The GIL is released while the library computes: calls from several
    Python threads at once (forward and backward, shared inputs) give
    bitwise the serial results."""
    import threading
    rng = np.random.default_rng(23)
    q, k, v = rand(rng, (2, 4, 40, 32)), rand(rng, (2, 2, 50, 32)), rand(rng, (2, 2, 50, 32))
    dout = rand(rng, (2, 4, 40, 32))

    def work():
        out, lse = qkv.attention(q, k, v, causal="bottom_right", return_lse=True, threads=1)
        grads = qkv.attention_backward(q, k, v, out, dout, lse, causal="bottom_right", threads=1)
        return [out.tobytes(), lse.tobytes()] + [g.tobytes() for g in grads]

    want = work()
    results = [None] * 4

    def run(i):
        results[i] = [work() for _ in range(3)]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r == want for rs in results for r in rs)
