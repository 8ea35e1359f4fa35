"""Shared helpers for the NumPy tests of qkv: an independent float64 oracle.

The oracle materialises the score matrix and evaluates every mask rule from
its definition in include/qkv/mask.h (it shares no code with the library):

    d = seq_kv - seq_q (bottom-right, default) or 0 ('top_left')
    causal            j <= i + d
    window (L, R)     i + d - L <= j <= i + d + R   (-1 / None: unbounded side)
    key_lengths       j < key_lengths[b]
    bool mask         mask[b, h, i, j] is True
    additive mask     mask[b, h, i, j] != -inf; the value is added to the score

Error bounds are first-order analyses of the kernels' float arithmetic; they
are the ones the C++ tests use (tests/test_util.h `Bound`,
tests/backward_test_util.h `BackwardOracle`), restated next to each helper.
"""

import numpy as np

# Unit roundoffs: float16 2^-11, float32 2^-24, float64 2^-53.
U16 = 2.0**-11
U32 = 2.0**-24
U64 = 2.0**-53
# The flash kernels (forward, backward, decode) at most double the reference
# kernel's first-order error terms (online rescaling: one subtraction and one
# exp per key block, telescoping to <= 2 A u + 3 u ceil(seq_kv / 64), each
# below a term already in the reference bound; see
# tests/flash_attention_test.cc), so they are checked with u_eff = 2 u.
FLASH_U = 2.0 * U32
# Smallest normal numbers: below them a product or exp loses relative
# accuracy, an absolute error of at most this per term.
TINY32 = 2.0**-126
TINY64 = 2.0**-1022
# Absolute rounding error of storing a value below the normals: half the
# smallest subnormal of float16 / float32 / float64.
STORE_TINY = {np.float16: 2.0**-25, np.float32: 2.0**-150, np.float64: 2.0**-1075}
STORE_U = {np.float16: U16, np.float32: U32, np.float64: U64}


def rand(rng, shape, dtype=np.float32, sigma=1.0):
    """N(0, sigma) values rounded to `dtype` (so the oracle sees what qkv reads)."""
    return (rng.standard_normal(shape) * sigma).astype(dtype)


def to_layout(x, layout):
    """A logical [b, h, s, d] array as memory in `layout` (a new contiguous array)."""
    return np.ascontiguousarray(x if layout == "bhsd" else x.transpose(0, 2, 1, 3))


def from_layout(x, layout):
    """The logical [b, h, s, d] view of an array stored in `layout`."""
    x = np.asarray(x)
    return x if layout == "bhsd" else x.transpose(0, 2, 1, 3)


def allowed_pairs(batch, heads, seq_q, seq_kv, *, causal=None, window=None, key_lengths=None,
                  mask=None):
    """Returns (allowed [b, h, i, j] bool, additive [b, h, i, j] float64).

    Every rule of mask.h from its definition; `causal` is None, 'bottom_right'
    or 'top_left'; `window` a (left, right) pair with -1/None unbounded; the
    mask is broadcast with NumPy's rules.
    """
    i = np.arange(seq_q)[:, None]
    j = np.arange(seq_kv)[None, :]
    d = 0 if causal == "top_left" else seq_kv - seq_q
    ok = np.ones((seq_q, seq_kv), dtype=bool)
    if causal is not None:
        ok &= j <= i + d
    if window is not None:
        left, right = (-1 if w is None else w for w in window)
        if left >= 0:
            ok &= j >= i + d - left
        if right >= 0:
            ok &= j <= i + d + right
    ok = np.broadcast_to(ok, (batch, heads, seq_q, seq_kv)).copy()
    if key_lengths is not None:
        lens = np.asarray(key_lengths, dtype=np.int64)
        ok &= (np.arange(seq_kv)[None, :] < lens[:, None])[:, None, None, :]
    add = np.zeros((batch, heads, seq_q, seq_kv))
    if mask is not None:
        m = np.broadcast_to(np.asarray(mask), (batch, heads, seq_q, seq_kv))
        if m.dtype == bool:
            ok &= m
        else:
            add = m.astype(np.float64)
            ok &= add != -np.inf
    return ok, add


def _expand_group(x, heads):
    """k or v [b, g, s, d] repeated to [b, heads, s, d]: q head h reads kv head h // group."""
    return np.repeat(x, heads // x.shape[1], axis=1)


def forward_oracle(q, k, v, *, scale=None, allowed=None, add=None):
    """Exact attention of logical [b, h, s, d] arrays (any float dtype) in float64.

    Returns a dict: out, lse, p (weights), ok (allowed pairs with finite score),
    any (rows with a key), A (row max over allowed j of |scale| sum_d |q k| +
    |mask|: the score magnitude of the bounds), absv (sum_j p_j |v_j|).
    """
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    if scale is None:
        scale = 1.0 / np.sqrt(D) if D > 0 else 1.0
    if allowed is None:
        allowed = np.ones((B, H, NQ, NK), dtype=bool)
    if add is None:
        add = np.zeros((B, H, NQ, NK))
    kk, vv = _expand_group(k, H), _expand_group(v, H)
    with np.errstate(invalid="ignore"):
        s = scale * np.einsum("bhid,bhjd->bhij", q, kk) + add
    ok = allowed & (s != -np.inf)
    any_row = ok.any(-1)
    s_ok = np.where(ok, s, -np.inf)
    m = np.where(any_row, s_ok.max(-1, initial=-np.inf), 0.0)
    e = np.where(ok, np.exp(np.where(ok, s, 0.0) - m[..., None]), 0.0)
    l = e.sum(-1)
    p = e / np.where(any_row, l, 1.0)[..., None]
    out = np.einsum("bhij,bhjd->bhid", p, vv)
    with np.errstate(divide="ignore"):
        lse = np.where(any_row, m + np.log(np.where(any_row, l, 1.0)), -np.inf)
    mag = abs(scale) * np.einsum("bhid,bhjd->bhij", abs(q), abs(kk)) + np.where(ok, abs(add), 0.0)
    A = np.where(ok, mag, 0.0).max(-1, initial=0.0)
    absv = np.einsum("bhij,bhjd->bhid", p, abs(vv))
    return dict(out=out, lse=lse, p=p, ok=ok, any=any_row, A=A, absv=absv, scale=scale,
                D=D, NK=NK, max_v=float(np.max(abs(v), initial=0.0)))


def row_factor(o, u):
    """Relative error factor of a row of out (and of each weight) [b, h, i].

    First order (tests/test_util.h Bound): a D-term dot product, one scale
    multiply and one mask add give |ds| <= (D + 2) u A; p_j = exp(s_j - m) has
    relative error <= 2 |ds| + 2 u (argument and exp; the max is one of the
    s_j); each N-term sum adds (N + 1) u and renormalising doubles the weight
    error:  (2 (2 (D + 2) A + 2) + 2 (N + 2)) u.
    """
    return (2.0 * (2.0 * (o["D"] + 2) * o["A"] + 2.0) + 2.0 * (o["NK"] + 2)) * u


def out_bound(o, u, out_dtype=None, arith_tiny=None):
    """Bound on |out - exact| per element for a kernel of unit roundoff u.

    row_factor * sum_j p_j |v_j|, plus underflow (p_j below the smallest
    normal flushes: tiny (N + 1)(max|v| + 1)), plus the final rounding to the
    output dtype when it is narrower than the arithmetic: store_u (|out| +
    error) + half its smallest subnormal.
    """
    if arith_tiny is None:
        arith_tiny = TINY64 if u <= U64 else TINY32
    b = row_factor(o, u)[..., None] * o["absv"] + arith_tiny * (o["NK"] + 1) * (o["max_v"] + 1.0)
    if out_dtype is not None:
        su = STORE_U[np.dtype(out_dtype).type]
        if su > u:
            b = b + su * (abs(o["out"]) + b) + STORE_TINY[np.dtype(out_dtype).type]
    return b


def lse_bound(o, u, lse_dtype=None):
    """Bound on |lse - exact|: the score error (D + 2) u A, the N-term sum
    (N + 2) u and the final add u |lse| (tests/test_util.h), plus the rounding
    to the lse dtype when it is narrower than the arithmetic."""
    lse = np.where(o["any"], o["lse"], 0.0)
    b = ((o["D"] + 2) * o["A"] + (o["NK"] + 2) + abs(lse)) * u + 1e-300
    if lse_dtype is not None and STORE_U[np.dtype(lse_dtype).type] > u:
        b = b + STORE_U[np.dtype(lse_dtype).type] * (abs(lse) + b)
    return b


def assert_within(name, got, want, bound):
    """Elementwise |got - want| <= bound; infinities must match exactly, no NaN."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    bound = np.broadcast_to(np.asarray(bound, dtype=np.float64), want.shape)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    assert not np.isnan(got).any(), f"{name}: NaN at {np.argwhere(np.isnan(got))[:5].tolist()}"
    inf = np.isinf(want) | np.isinf(got)
    mismatch_inf = inf & (got != want)
    assert not mismatch_inf.any(), (
        f"{name}: infinities differ at {np.argwhere(mismatch_inf)[:5].tolist()}: "
        f"got {got[mismatch_inf][:5]} want {want[mismatch_inf][:5]}")
    with np.errstate(invalid="ignore"):
        err = np.where(inf, 0.0, abs(got - want))
    bad = ~(err <= bound)
    if bad.any():
        ratio = np.where(bad, err / np.maximum(bound, 1e-300), 0.0)
        w = np.unravel_index(np.argmax(ratio), ratio.shape)
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.size} elements out of bound; worst at {w}: "
            f"got {got[w]!r} want {want[w]!r} err {err[w]:.3e} bound {bound[w]:.3e}")


def check_forward(o, out, lse=None, weights=None, *, u, out_dtype, stat_dtype=None):
    """Checks out (logical bhsd), lse and weights of a call against the oracle."""
    assert_within("out", out, o["out"], out_bound(o, u, out_dtype))
    # Rows with no allowed key: exactly zero (never NaN), lse -inf.
    empty = ~o["any"]
    assert np.all(np.asarray(out)[empty] == 0), "a fully masked row is not zero"
    if lse is not None:
        assert_within("lse", lse, o["lse"], lse_bound(o, u, stat_dtype))
    if weights is not None:
        f = row_factor(o, u)[..., None]
        b = f * o["p"] + (TINY64 if u <= U64 else TINY32)
        if stat_dtype is not None and STORE_U[np.dtype(stat_dtype).type] > u:
            b = b + STORE_U[np.dtype(stat_dtype).type] * (o["p"] + b)
        assert_within("weights", weights, o["p"], b)


def backward_oracle(q, k, v, dout, *, scale=None, allowed=None, add=None, u=None,
                    given_out=None, given_lse=None, grad_dtype=np.float32, mask_shape=None,
                    dmask_dtype=np.float32):
    """Exact gradients (attention_backward.h) and, when `u` is given, bounds.

    With P = softmax(S), S = scale Q K^T + M:
        dV = P^T dO, dP = dO V^T, D_i = rowsum(dO * O), dS = P * (dP - D),
        dQ = scale dS K, dK = scale dS^T Q (dK, dV summed over the GQA group),
        dM = dS summed over the mask's broadcast dims (to `mask_shape`).

    The bound (tests/backward_test_util.h, first order; A = row score
    magnitude, given_out / given_lse the forward results the kernel was given,
    their measured errors dl = |lse_given - lse|, e_out = |out_given - out|):
      eps_P = (D + 2) u A + dl + u (A + |lse|) + 2 u       (P = exp(s - lse))
      e_D   = DV u sum_d |dO O| + sum_d |dO_d| e_out_d      (D_i)
      e_dS  = P ((eps_P + 2 u) |dP - D| + DV u sum_d |dO v_j| + e_D) + tiny (|dP - D| + 1)
      dq:  |scale| sum_j (e_dS |k_j| + (N + 2) u |dS k_j| + tiny)
      dk:  |scale| sum_i (e_dS |q_i| + (M + 2) u |dS q_i| + tiny), M = group * seq_q
      dv:  sum_i (P (eps_P + (M + 1) u) + tiny) |dO_i|
      dmask: the reduced e_dS + (R + 1) u sum |dS| over R broadcast copies
    and storing each in grad_dtype adds store_u |g| + store_tiny.
    """
    q, k, v, dout = (np.asarray(x, dtype=np.float64) for x in (q, k, v, dout))
    o = forward_oracle(q, k, v, scale=scale, allowed=allowed, add=add)
    B, H, NQ, D = q.shape
    G, NK, DV = v.shape[1], v.shape[2], v.shape[3]
    group = H // G
    M = group * NQ
    scale = o["scale"]
    kk, vv = _expand_group(k, H), _expand_group(v, H)
    p, ok, out = o["p"], o["ok"], o["out"]
    okf = ok.astype(np.float64)
    di = (dout * out).sum(-1)
    dp = np.einsum("bhid,bhjd->bhij", dout, vv)
    ds = np.where(ok, p * (dp - di[..., None]), 0.0)

    def group_sum(x):  # [b, h, j, d] -> [b, g, j, d]
        return x.reshape(B, G, group, *x.shape[2:]).sum(2)

    r = dict(o=o, ds=ds)
    r["dq"] = scale * np.einsum("bhij,bhjd->bhid", ds, kk)
    r["dk"] = group_sum(scale * np.einsum("bhij,bhid->bhjd", ds, q))
    r["dv"] = group_sum(np.einsum("bhij,bhid->bhjd", p, dout))
    if mask_shape is not None:
        r["dmask"] = reduce_to_shape(ds, mask_shape)
    if u is None:
        return r
    tiny = TINY64 if u <= U64 else TINY32
    su = STORE_U[np.dtype(grad_dtype).type]
    st = STORE_TINY[np.dtype(grad_dtype).type]
    any_row = o["any"]
    lse = np.where(any_row, o["lse"], 0.0)
    A = o["A"]
    given_lse = np.asarray(given_lse, dtype=np.float64).reshape(B, H, NQ)
    with np.errstate(invalid="ignore"):
        dl = np.where(any_row, abs(np.where(any_row, given_lse, 0.0) - lse), 0.0)
    dl = np.where(any_row & ~np.isfinite(given_lse), np.nan, dl)
    eps_p = np.where(any_row, (D + 2) * u * A + dl + u * (A + abs(lse)) + 2 * u, 0.0)
    e_out = abs(np.asarray(given_out, dtype=np.float64) - out)
    e_d = DV * u * abs(dout * out).sum(-1) + (abs(dout) * e_out).sum(-1)
    W = np.einsum("bhid,bhjd->bhij", abs(dout), abs(vv))
    x = abs(dp - di[..., None])
    e_ds = okf * (p * ((eps_p[..., None] + 2 * u) * x + DV * u * W + e_d[..., None])
                  + tiny * (x + 1.0))
    aq, ak = abs(q), abs(kk)
    r["dq_bound"] = abs(scale) * (np.einsum("bhij,bhjd->bhid", e_ds + (NK + 2) * u * abs(ds), ak)
                                  + tiny * okf.sum(-1)[..., None]) + su * abs(r["dq"]) + st
    r["dk_bound"] = group_sum(abs(scale) * (
        np.einsum("bhij,bhid->bhjd", e_ds + (M + 2) * u * abs(ds), aq)
        + tiny * okf.sum(2)[..., None])) + su * abs(r["dk"]) + st
    r["dv_bound"] = group_sum(np.einsum(
        "bhij,bhid->bhjd", okf * (p * (eps_p[..., None] + (M + 1) * u) + tiny), abs(dout))
    ) + su * abs(r["dv"]) + st
    if mask_shape is not None:
        full = (B, H, NQ, NK)
        own = tuple(mask_shape)
        R = int(np.prod(full)) // max(1, int(np.prod(own)))
        msu = STORE_U[np.dtype(dmask_dtype).type]
        mst = STORE_TINY[np.dtype(dmask_dtype).type]
        r["dmask_bound"] = (reduce_to_shape(e_ds, own) + (R + 1) * u * reduce_to_shape(abs(ds), own)
                            + msu * abs(r["dmask"]) + mst)
    return r


def reduce_to_shape(full, shape):
    """Sums a [b, h, i, j] array over the dims where `shape` (trailing-aligned,
    NumPy broadcasting) is 1 or missing; returns an array of `shape`."""
    shape = tuple(shape)
    lead = full.ndim - len(shape)
    x = full.sum(axis=tuple(range(lead))) if lead else full
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    if axes:
        x = x.sum(axis=axes, keepdims=True)
    return x.reshape(shape)


# ---------------------------------------------------------------------------
# The case matrix shared by the forward and backward tests: every mask kind
# and shapes with GQA, MQA, seq_q != seq_kv both ways and awkward sizes.

# (batch, num_q_heads, num_kv_heads, seq_q, seq_kv, head_dim, head_dim_v)
SHAPES = [
    (2, 4, 4, 7, 9, 16, 16),     # MHA, small
    (1, 8, 2, 97, 7, 3, 5),      # GQA 4, seq_q > seq_kv, head_dim 3, dv != d
    (2, 6, 1, 7, 97, 59, 59),    # MQA, seq_q < seq_kv, head_dim 59
    (1, 2, 1, 1, 97, 80, 80),    # one query (decode-like), head_dim 80
    (3, 2, 2, 97, 97, 1, 1),     # head_dim 1, self-attention length 97
    (2, 3, 3, 1, 1, 7, 3),       # one query, one key
]

MASKS = [
    "none", "causal_br", "causal_tl", "window_5_2", "window_0_0", "window_left_only",
    "window_right_only", "window_tl", "key_lengths", "bool_full", "bool_bcast",
    "add_full_inf", "add_bcast_f64", "add_f16_batch", "combo",
]

def mask_options(kind, rng, shape):
    """The qkv keyword options of mask kind `kind` for `shape` (also the oracle's)."""
    B, H, _, NQ, NK, _, _ = shape
    full = (B, H, NQ, NK)
    if kind == "none":
        return {}
    if kind == "causal_br":
        return dict(causal="bottom_right")
    if kind == "causal_tl":
        return dict(causal="top_left")
    if kind == "window_5_2":
        return dict(window=(5, 2))
    if kind == "window_0_0":
        return dict(window=(0, 0))
    if kind == "window_left_only":
        return dict(window=(3, None))
    if kind == "window_right_only":
        return dict(window=(-1, 2))
    if kind == "window_tl":
        return dict(causal="top_left", window=(4, -1))
    if kind == "key_lengths":
        lens = [(b * 67 + 3) % (NK + 1) for b in range(B)]
        if B > 1:
            lens[0] = 0  # a batch row with no key at all
        return dict(key_lengths=np.array(lens, dtype=np.int64))
    if kind == "bool_full":
        m = rng.random(full) < 0.7
        m[0, 0, 0, :] = False  # a fully masked row
        return dict(mask=m)
    if kind == "bool_bcast":
        m = rng.random((NQ, NK)) < 0.6
        return dict(mask=m)
    if kind == "add_full_inf":
        m = rand(rng, full, np.float32, 2.0)
        m[rng.random(full) < 0.3] = -np.inf
        m[0, -1, NQ - 1, :] = -np.inf  # a fully masked row
        return dict(mask=m)
    if kind == "add_bcast_f64":
        return dict(mask=rand(rng, (H, 1, NK), np.float64, 1.5))  # [1, H, 1, NK]
    if kind == "add_f16_batch":
        m = rand(rng, (B, 1, 1, NK), np.float16, 1.0)
        m[rng.random(m.shape) < 0.25] = -np.inf
        return dict(mask=m)
    if kind == "combo":  # causal + window + key lengths + additive mask, all at once
        m = rand(rng, full, np.float32, 1.0)
        m[rng.random(full) < 0.2] = -np.inf
        lens = [max(0, NK - 2 * b) for b in range(B)]
        return dict(causal="bottom_right", window=(4, None), key_lengths=lens, mask=m)
    raise AssertionError(kind)


def oracle_mask(opts, shape):
    B, H, _, NQ, NK, _, _ = shape
    return allowed_pairs(B, H, NQ, NK, causal=opts.get("causal"), window=opts.get("window"),
                         key_lengths=opts.get("key_lengths"), mask=opts.get("mask"))
