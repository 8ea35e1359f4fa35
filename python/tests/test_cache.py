"""qkv.KvCache and qkv.decode against the float64 oracle (conftest.py) and
against qkv.attention on the same keys; append_with_rope against a NumPy
RoPE; qkv.merge_partials against its formula; qkv.memory_plan against the
formulas of include/qkv/memory_plan.h (and the `qkv memory --json` CLI)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import qkv
from conftest import (FLASH_U, U32, U64, assert_within, check_forward, forward_oracle,
                      lse_bound, out_bound, rand)

KINDS = ["contiguous", "sliding", "sinks", "paged"]
DTYPES = ["float32", "float16", "bfloat16", "int8"]
ELEM = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}

# Decode's bound: the flash factor u_eff = 2u (tests/decode_test.cc: the
# split merge stays within the flash kernel's doubled budget). An int8 cache
# adds one rounding per dequantised product q * scale (<= u |q_d k_d|, inside
# the (D + 2) u A score term and the u sum p |v| output term once more):
# u_eff = 3u.
DECODE_U = {"float32": FLASH_U, "float16": FLASH_U, "bfloat16": FLASH_U, "int8": 3 * U32}


def bf16_round(x):
    """float32 -> bfloat16 (round to nearest even), returned as float32."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    r = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return r.astype(np.uint32).view(np.float32)


def stored(x, dtype):
    """The values a cache of `dtype` holds for float32 rows x [..., head_dim],
    as float64 (kv_cache.h: float16/bfloat16 rounded to nearest even; int8
    symmetric per row: s = max|x| / 127 in float32, q = round_half_even(x / s)
    in [-127, 127], value q * s)."""
    x = np.asarray(x, dtype=np.float32)
    if dtype == "float32":
        return x.astype(np.float64)
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float64)
    if dtype == "bfloat16":
        return bf16_round(x).astype(np.float64)
    amax = np.abs(x).max(-1, keepdims=True)
    s = amax / np.float32(127.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        qv = np.where(s == 0, np.float32(0), np.clip(np.rint(x / s), -127, 127))
    return qv.astype(np.float64) * s.astype(np.float64)


def bytes_per_token(num_kv_heads, head_dim, dtype):
    """kv_cache.h KvBytesPerToken: K and V, plus two float32 scales per kv
    head for int8."""
    return 2 * num_kv_heads * head_dim * ELEM[dtype] + (2 * num_kv_heads * 4 if dtype == "int8" else 0)


def make_cache(kind, dtype, G, D, **kw):
    cfg = dict(num_kv_heads=G, head_dim=D, dtype=dtype)
    if kind == "contiguous":
        cfg.update(capacity=kw.get("capacity", 64))
    elif kind == "sliding":
        cfg.update(window=kw.get("window", 7))
    elif kind == "sinks":
        cfg.update(window=kw.get("window", 6), num_sinks=kw.get("num_sinks", 3))
    else:
        cfg.update(block_size=kw.get("block_size", 4), num_blocks=kw.get("num_blocks", 64))
    return qkv.KvCache(kind, **cfg)


def kept_positions(cache, length):
    """Positions a cache of this config holds after `length` appends."""
    c = cache.config
    pos = np.arange(length)
    if c["kind"] == "sliding":
        return pos >= length - c["window"]
    if c["kind"] == "sinks":
        return (pos < c["num_sinks"]) | (pos >= length - c["window"])
    return np.ones(length, dtype=bool)


def decode_oracle(q_b, K, V, kept, window=-1, scale=None):
    """Oracle of decode for one sequence: q_b [1, Hq, Sq, D], K/V [1, G, L, D]
    (stored values of every token ever appended); query i sits at position
    L - Sq + i and attends kept positions j <= p_i (and > p_i - window)."""
    Sq, L = q_b.shape[2], K.shape[2]
    p = L - Sq + np.arange(Sq)[:, None]
    j = np.arange(L)[None, :]
    ok = kept[None, :] & (j <= p)
    if window > 0:
        ok &= j > p - window
    allowed = np.broadcast_to(ok, (1, q_b.shape[1], Sq, L))
    return forward_oracle(q_b, K, V, allowed=allowed, scale=scale)


class History:
    """What was appended to each sequence (float32 rows), for the oracle."""

    def __init__(self, G, D):
        self.k, self.v, self.G, self.D = {}, {}, G, D

    def append(self, cache, seq, n, rng, *, layout="bhsd"):
        k, v = rand(rng, (self.G, n, self.D)), rand(rng, (self.G, n, self.D))
        if layout == "bshd":
            cache.append(seq, k.transpose(1, 0, 2).copy(), v.transpose(1, 0, 2).copy(), layout="bshd")
        else:
            cache.append(seq, k, v)
        self.k[seq] = np.concatenate([self.k.get(seq, np.zeros((self.G, 0, self.D), np.float32)), k], 1)
        self.v[seq] = np.concatenate([self.v.get(seq, np.zeros((self.G, 0, self.D), np.float32)), v], 1)

    def kv(self, seq, dtype):
        return stored(self.k[seq], dtype)[None], stored(self.v[seq], dtype)[None]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_decode_matches_oracle_and_attention(kind, dtype):
    """decode(q, cache, seqs) for sequences of different lengths (appended in
    irregular chunks, in both layouts) matches the float64 oracle on the
    stored keys within bound, and matches qkv.attention on all keys ever
    appended with the cache's rule as a mask: contiguous/paged = causal
    bottom-right; sliding = window (window - 1, 0) bottom-right; sinks =
    first num_sinks + last window positions."""
    rng = np.random.default_rng(100 + 10 * KINDS.index(kind) + DTYPES.index(dtype))
    G, Hq = 2, 4
    D = 20 if dtype in ("float16", "int8") else 16  # 20: the float32-tiles path
    cache = make_cache(kind, dtype, G, D)
    hist = History(G, D)
    seqs = [cache.add_sequence() for _ in range(3)]
    for n, s in ((5, 0), (1, 1), (17, 0), (3, 2), (9, 1), (2, 2), (1, 0), (11, 2)):
        hist.append(cache, seqs[s], n, rng, layout="bshd" if n % 2 else "bhsd")
    Sq = 1 if kind in ("sliding", "sinks") else 3
    order = [seqs[2], seqs[0], seqs[1]]
    q = rand(rng, (3, Hq, Sq, D))
    out, lse, info = qkv.decode(q, cache, order, return_lse=True, return_info=True)
    assert out.shape == q.shape and out.dtype == np.float32 and lse.shape == (3, Hq, Sq)
    assert info["splits"] >= 3
    u = DECODE_U[dtype]
    for b, seq in enumerate(order):
        K, V = hist.kv(seq, dtype)
        L = K.shape[2]
        assert cache.length(seq) == L
        kept = kept_positions(cache, L)
        assert cache.kept(seq) == kept.sum()
        o = decode_oracle(q[b:b + 1], K, V, kept)
        check_forward(o, out[b:b + 1], lse[b:b + 1], u=u, out_dtype=np.float32,
                      stat_dtype=np.float32)
        # The same keys through qkv.attention (float64 reference: bound u64).
        qb = q[b:b + 1].astype(np.float64)
        c = cache.config
        if kind == "sliding":
            ref = qkv.attention(qb, K, V, window=(c["window"] - 1, 0))
        elif kind == "sinks":
            mask = np.broadcast_to(kept, (Sq, L)) & (np.arange(L) <= L - Sq + np.arange(Sq)[:, None])
            ref = qkv.attention(qb, K, V, mask=mask)
        else:
            ref = qkv.attention(qb, K, V, causal="bottom_right")
        assert np.all(abs(out[b:b + 1] - ref) <= out_bound(o, u) + out_bound(o, U64))


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_decode_window_splits_threads_and_layout(kind):
    """decode's window=w equals attention with window (w - 1, 0); every
    split_tokens gives a result within bound; threads 1 and 2 are bitwise
    equal; layout 'bshd' q gives the bhsd result in bshd memory; a list of
    (cache, seq) pairs equals the cache + seqs form."""
    rng = np.random.default_rng(61)
    G, Hq, D = 1, 3, 32
    cache = make_cache(kind, "float32", G, D)
    hist = History(G, D)
    a, b = cache.add_sequence(), cache.add_sequence()
    hist.append(cache, a, 40, rng)
    hist.append(cache, b, 23, rng)
    q = rand(rng, (2, Hq, 2, D))
    K = {s: hist.kv(s, "float32") for s in (a, b)}
    for window in (-1, 5):
        for split in (0, 1, 7, 64):
            out, lse = qkv.decode(q, cache, [a, b], window=window, split_tokens=split,
                                  return_lse=True)
            for i, s in enumerate((a, b)):
                L = K[s][0].shape[2]
                o = decode_oracle(q[i:i + 1], *K[s], np.ones(L, bool), window=window)
                check_forward(o, out[i:i + 1], lse[i:i + 1], u=FLASH_U, out_dtype=np.float32,
                              stat_dtype=np.float32)
                if window > 0:
                    ref = qkv.attention(q[i:i + 1].astype(np.float64), *K[s],
                                        window=(window - 1, 0))
                    assert np.all(abs(out[i:i + 1] - ref) <= out_bound(o, FLASH_U) + out_bound(o, U64))
    r1 = qkv.decode(q, cache, [a, b], threads=1, split_tokens=4)
    r2 = qkv.decode(q, cache, [a, b], threads=2, split_tokens=4)
    assert r1.tobytes() == r2.tobytes()
    pairs = qkv.decode(q, [(cache, a), (cache, b)], threads=1, split_tokens=4)
    assert pairs.tobytes() == r1.tobytes()
    out_bshd = qkv.decode(np.ascontiguousarray(q.transpose(0, 2, 1, 3)), cache, [a, b],
                          layout="bshd", threads=1, split_tokens=4)
    assert out_bshd.shape == (2, 2, Hq, D)
    assert out_bshd.transpose(0, 2, 1, 3).tobytes() == r1.tobytes()


def test_paged_fork_copy_on_write_and_block_accounting():
    """fork_sequence shares the parent's blocks; the first append to the
    shared, partly filled last block copies it (one block); each sequence
    then decodes its own tokens; freeing returns exactly the blocks no one
    else holds."""
    rng = np.random.default_rng(67)
    G, D = 2, 16
    cache = make_cache("paged", "float16", G, D, block_size=4, num_blocks=8)
    assert cache.free_blocks == 8
    assert cache.bytes_allocated == 8 * 4 * bytes_per_token(G, D, "float16")
    hist = History(G, D)
    p = cache.add_sequence()
    hist.append(cache, p, 6, rng)  # blocks 0 (full) and 1 (2 of 4)
    assert cache.free_blocks == 6
    c = cache.fork_sequence(p)
    assert cache.free_blocks == 6 and cache.length(c) == 6 and cache.kept(c) == 6
    hist.k[c], hist.v[c] = hist.k[p].copy(), hist.v[p].copy()
    hist.append(cache, c, 1, rng)  # copy-on-write of the shared partial block
    assert cache.free_blocks == 5
    hist.append(cache, p, 1, rng)  # the parent now owns its block alone: in place
    assert cache.free_blocks == 5
    hist.append(cache, p, 2, rng)  # 9 tokens: a third block
    assert cache.free_blocks == 4
    q = rand(rng, (2, 4, 2, D))
    out, lse = qkv.decode(q, cache, [p, c], return_lse=True)
    for i, s in enumerate((p, c)):
        K, V = hist.kv(s, "float16")
        o = decode_oracle(q[i:i + 1], K, V, np.ones(K.shape[2], bool))
        check_forward(o, out[i:i + 1], lse[i:i + 1], u=FLASH_U, out_dtype=np.float32,
                      stat_dtype=np.float32)
    cache.free_sequence(c)
    assert cache.free_blocks == 5  # only the child's copied block: block 0 is still the parent's
    cache.free_sequence(p)
    assert cache.free_blocks == 8


@pytest.mark.parametrize("kind", ["contiguous", "sliding", "sinks"])
def test_fork_of_ring_caches_copies(kind):
    """fork_sequence on the other kinds copies: the child decodes like the
    parent, and appending to one does not change the other."""
    rng = np.random.default_rng(71)
    G, D = 1, 16
    cache = make_cache(kind, "float32", G, D)
    hist = History(G, D)
    p = cache.add_sequence()
    hist.append(cache, p, 10, rng)
    c = cache.fork_sequence(p)
    q = rand(rng, (1, 2, 1, D))
    assert qkv.decode(q, cache, [c]).tobytes() == qkv.decode(q, cache, [p]).tobytes()
    before = qkv.decode(q, cache, [c]).tobytes()
    hist.append(cache, p, 2, rng)
    assert qkv.decode(q, cache, [c]).tobytes() == before
    assert cache.length(p) == 12 and cache.length(c) == 10


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_bytes_allocated_within_documented_bounds(kind, dtype):
    """bytes_allocated: paged = the whole pool (num_blocks * block_size
    tokens) from the start; the others hold at least their kept tokens and
    at most their bound (capacity, window, num_sinks + window) per sequence,
    at KvBytesPerToken each."""
    rng = np.random.default_rng(73)
    G, D = 2, 8
    cache = make_cache(kind, dtype, G, D, capacity=50, window=8, num_sinks=2, block_size=4,
                       num_blocks=16)
    bpt = bytes_per_token(G, D, dtype)
    hist = History(G, D)
    seqs = [cache.add_sequence() for _ in range(2)]
    for n in (3, 20):
        for s in seqs:
            hist.append(cache, s, n, rng)
        if kind == "paged":
            assert cache.bytes_allocated == 16 * 4 * bpt
            assert cache.free_blocks == 16 - 2 * (-(-cache.length(seqs[0]) // 4))
        else:
            bound = {"contiguous": 50, "sliding": 8, "sinks": 10}[kind]
            kept = sum(cache.kept(s) for s in seqs)
            assert kept * bpt <= cache.bytes_allocated <= len(seqs) * bound * bpt


def test_float64_appends_are_rounded_once():
    """float64 keys/values are rounded once to the storage dtype (kv_cache.h:
    round to odd into float32 first), not twice: 1 + 2^-11 + 2^-30 is just
    above a float16 tie and must become 1 + 2^-10 (double rounding through
    float32 would give 1.0); likewise 1 + 2^-8 + 2^-30 in bfloat16 -> 1 + 2^-7.
    A decode over one token returns the stored value exactly."""
    for dtype, x, want in (("float16", 1 + 2**-11 + 2**-30, 1 + 2**-10),
                           ("bfloat16", 1 + 2**-8 + 2**-30, 1 + 2**-7),
                           ("float32", 1 + 2**-24 + 2**-40, 1 + 2**-23)):
        cache = make_cache("contiguous", dtype, 1, 2)
        seq = cache.add_sequence()
        cache.append(seq, np.zeros((1, 1, 2)), np.array([[[x, -x]]]))
        out = qkv.decode(np.zeros((1, 1, 1, 2), np.float32), cache)
        assert out.ravel().tolist() == [want, -want], dtype


@pytest.mark.parametrize("qdtype", [np.float16, np.float64])
def test_decode_output_follows_q_dtype(qdtype):
    """decode returns out in q's dtype (float16 rounded to nearest from the
    float32 arithmetic, float64 unrounded) within the bound; appends of
    4-D [1, G, n, D] keys work; config echoes the constructor."""
    rng = np.random.default_rng(101)
    G, D = 2, 16
    cache = make_cache("sinks", "bfloat16", G, D, window=5, num_sinks=2)
    assert cache.config == dict(kind="sinks", dtype="bfloat16", num_kv_heads=G, head_dim=D,
                                capacity=0, window=5, num_sinks=2, block_size=16, num_blocks=0)
    k, v = rand(rng, (1, G, 12, D)), rand(rng, (1, G, 12, D))
    seq = cache.add_sequence()
    cache.append(seq, k, v)
    q = rand(rng, (1, 4, 1, D), qdtype)
    out, lse = qkv.decode(q, cache, return_lse=True)
    assert out.dtype == qdtype and lse.dtype == np.float32
    o = decode_oracle(q, stored(k[0], "bfloat16")[None], stored(v[0], "bfloat16")[None],
                      kept_positions(cache, 12))
    check_forward(o, out, lse, u=FLASH_U, out_dtype=qdtype, stat_dtype=np.float32)


# ---------------------------------------------------------------------------
# RoPE: append_with_rope == a NumPy rotation, then append.

def numpy_rope(x, positions, style, base, rotary_dim):
    """x [G, n, D] float64 rotated at `positions` (positional.h): theta_i =
    base^(-2i / rotary_dim); neox pairs (i, i + r/2), gptj pairs (2i, 2i+1);
    a' = a cos - b sin, b' = a sin + b cos; dims past rotary_dim unchanged."""
    x = np.array(x, dtype=np.float64)
    r = rotary_dim or x.shape[-1]
    i = np.arange(r // 2)
    theta = base ** (-2.0 * i / r)
    ang = positions[:, None] * theta[None, :]
    c, s = np.cos(ang), np.sin(ang)
    if style == "neox":
        ia, ib = i, i + r // 2
    else:
        ia, ib = 2 * i, 2 * i + 1
    a, b = x[..., ia].copy(), x[..., ib].copy()
    x[..., ia] = a * c - b * s
    x[..., ib] = a * s + b * c
    return x


@pytest.mark.parametrize("style, rotary_dim, base, kind", [
    ("neox", 0, 10000.0, "contiguous"),
    ("gptj", 0, 10000.0, "paged"),
    ("neox", 8, 500.0, "sliding"),
    ("gptj", 12, 10000.0, "sinks"),
])
def test_append_with_rope_equals_numpy_rotation(style, rotary_dim, base, kind):
    """Keys appended with RoPE (in two appends: the second continues at
    positions length(seq) ...) decode as keys rotated by a NumPy RoPE at
    their absolute positions, within the float32 rotation's rounding; the
    other style, or positions restarting at 0, is far outside that bound."""
    rng = np.random.default_rng(79)
    G, D, Hq = 2, 16, 4
    cache = make_cache(kind, "float32", G, D)
    seq = cache.add_sequence()
    k1, v1 = rand(rng, (G, 9, D)), rand(rng, (G, 9, D))
    k2, v2 = rand(rng, (G, 5, D)), rand(rng, (G, 5, D))
    cache.append_with_rope(seq, k1, v1, style=style, base=base, rotary_dim=rotary_dim)
    cache.append_with_rope(seq, k2, v2, style=style, base=base, rotary_dim=rotary_dim)
    assert cache.length(seq) == 14
    q = rand(rng, (1, Hq, 1, D))
    out = qkv.decode(q, cache, [seq])
    k_all = np.concatenate([k1, k2], 1)
    V = np.concatenate([v1, v2], 1)[None].astype(np.float64)
    kept = kept_positions(cache, 14)

    def oracle(keys):
        return decode_oracle(q, keys[None], V, kept)

    K = numpy_rope(k_all, np.arange(14.0), style, base, rotary_dim)
    o = oracle(K)
    # The library rotates in float32 with cos/sin rounded to float32: each
    # rotated element is off by <= 4u (|a| + |b|) (cos/sin rounding, two
    # products, one sum). A key error delta_j shifts score j by at most
    # e_j = scale sum_d |q_d| delta_jd; with E = max_j e_j the weights change
    # by a factor within exp(+-2E), so out moves by at most
    # (exp(2E) - 1) sum_j p_j |v_j - out|.
    r = rotary_dim or D
    pair = abs(k_all[..., :r]) + abs(np.concatenate([k_all[..., r // 2:r], k_all[..., :r // 2]], -1)
                                    if style == "neox" else
                                    k_all[..., :r].reshape(G, 14, r // 2, 2)[..., ::-1].reshape(G, 14, r))
    delta = np.zeros_like(k_all, dtype=np.float64)
    delta[..., :r] = 4 * U32 * pair
    scale = 1 / np.sqrt(D)
    e = scale * np.einsum("hd,gjd->hgj", abs(q[0, :, 0]), delta)  # [Hq, G, j]
    E = e.max()
    spread = np.einsum("bhij,bhijd->bhid", o["p"],
                       abs(np.repeat(V, Hq // G, 1)[:, :, None] - o["out"][:, :, :, None]))
    bound = out_bound(o, FLASH_U) + np.expm1(2 * E) * spread
    assert_within("rope out", out, o["out"], bound)
    # Teeth: the wrong style or positions restarting at 0 are far outside.
    other = "gptj" if style == "neox" else "neox"
    wrong = [numpy_rope(k_all, np.arange(14.0), other, base, rotary_dim),
             numpy_rope(k_all, np.concatenate([np.arange(9.0), np.arange(5.0)]), style, base,
                        rotary_dim)]
    for Kw in wrong:
        assert np.max(abs(oracle(Kw)["out"] - o["out"]) - 10 * bound) > 0


def test_append_with_rope_float16_cache_and_bshd():
    """RoPE keys given in layout 'bshd' into a float16 cache decode as the
    NumPy-rotated keys rounded to float16 (bound: the rotation error before
    rounding, then the rounding itself is in the stored values)."""
    rng = np.random.default_rng(83)
    G, D = 1, 8
    cache = make_cache("contiguous", "float16", G, D)
    seq = cache.add_sequence()
    k, v = rand(rng, (G, 6, D)), rand(rng, (G, 6, D))
    cache.append_with_rope(seq, k.transpose(1, 0, 2).copy(), v.transpose(1, 0, 2).copy(),
                           layout="bshd")
    q = rand(rng, (1, 2, 1, D))
    out = qkv.decode(q, cache)
    K = numpy_rope(k, np.arange(6.0), "neox", 10000.0, 0)
    # float16 storage: each rotated key within u16 |k'| + 2^-25 (+ the float32
    # rotation's 4u (|a| + |b|) <= 8 u max|k|, absorbed into 2 u16 here).
    delta = 2 * (2.0**-11) * (abs(K) + 8 * U32 * abs(k).max()) + 2.0**-25
    V = stored(v, "float16")[None]
    o = decode_oracle(q, K[None], V, np.ones(6, bool))
    e = (1 / np.sqrt(D)) * np.einsum("hd,gjd->hgj", abs(q[0, :, 0]), delta).max()
    spread = np.einsum("bhij,bhijd->bhid", o["p"],
                       abs(np.repeat(V, 2, 1)[:, :, None] - o["out"][:, :, :, None]))
    assert_within("rope f16", out, o["out"], out_bound(o, FLASH_U) + np.expm1(2 * e) * spread)


# ---------------------------------------------------------------------------
# Cache errors: ValueError, nothing stored.

def test_cache_errors_store_nothing():
    """Full contiguous cache, exhausted paged pool, unknown and freed
    sequences, bad shapes and options: ValueError with a one-line message
    naming the problem; the cache is unchanged afterwards."""
    rng = np.random.default_rng(89)
    G, D = 2, 8

    def err(fn, *words):
        with pytest.raises(ValueError) as e:
            fn()
        msg = str(e.value)
        assert "\n" not in msg
        for w in words:
            assert w in msg, (w, msg)

    k5, v5 = rand(rng, (G, 5, D)), rand(rng, (G, 5, D))
    c = make_cache("contiguous", "float32", G, D, capacity=8)
    s = c.add_sequence()
    c.append(s, k5, v5)
    q = rand(rng, (1, 2, 1, D))
    before = qkv.decode(q, c, [s]).tobytes()
    err(lambda: c.append(s, k5, v5), "capacity", "8")
    assert c.length(s) == 5 and qkv.decode(q, c, [s]).tobytes() == before
    err(lambda: c.append_with_rope(s, k5, v5), "capacity")
    assert c.length(s) == 5
    err(lambda: c.append(42, k5, v5), "sequence 42", "does not exist")
    err(lambda: c.length(42), "sequence 42")
    err(lambda: c.kept(42), "sequence 42")
    err(lambda: c.fork_sequence(42), "sequence 42")
    err(lambda: c.free_sequence(42), "sequence 42")
    err(lambda: qkv.decode(q, c, [42]), "sequence 42")
    err(lambda: c.append(s, k5[:, :, :4], v5[:, :, :4]), "k:", "head_dim")
    err(lambda: c.append(s, k5, v5[:, :3]), "v:")
    err(lambda: c.append(s, k5[0], v5), "k:", "2-D")
    err(lambda: c.append(s, k5.astype(np.int32), v5), "k:", "int32")
    err(lambda: c.append(s, k5, v5, layout="sbhd"), "layout")
    err(lambda: c.append_with_rope(s, k5, v5, style="llama"), "style")
    err(lambda: c.append_with_rope(s, k5[:, :1], v5[:, :1], rotary_dim=3), "rotary_dim")
    assert c.length(s) == 5 and qkv.decode(q, c, [s]).tobytes() == before
    t = c.add_sequence()
    c.free_sequence(t)
    err(lambda: c.append(t, k5, v5), "freed")

    p = make_cache("paged", "int8", G, D, block_size=4, num_blocks=3)
    a = p.add_sequence()
    p.append(a, k5, v5)  # 2 blocks
    b = p.add_sequence()
    err(lambda: p.append(b, k5, v5), "exhausted", "num_blocks")
    assert p.length(b) == 0 and p.free_blocks == 1
    p.append(b, k5[:, :4], v5[:, :4])  # exactly the last block: fine
    assert p.free_blocks == 0
    err(lambda: p.append(a, k5[:, :4], v5[:, :4]), "exhausted")
    assert p.length(a) == 5

    err(lambda: qkv.KvCache("ring", num_kv_heads=G, head_dim=D), "kind", "'ring'")
    err(lambda: qkv.KvCache("contiguous", num_kv_heads=G, head_dim=D, dtype="int4"), "dtype")
    err(lambda: qkv.KvCache("contiguous", num_kv_heads=G, head_dim=D), "capacity")
    err(lambda: qkv.KvCache("sliding", num_kv_heads=G, head_dim=D), "window")
    err(lambda: qkv.KvCache("paged", num_kv_heads=G, head_dim=D), "num_blocks")

    err(lambda: qkv.decode(q, c, [s, s]), "seqs")
    err(lambda: qkv.decode(q, c, [s], window=0), "window")
    err(lambda: qkv.decode(q[..., :4], c, [s]), "head_dim")
    err(lambda: qkv.decode(rand(rng, (1, 3, 1, D)), c, [s]), "divide")
    err(lambda: qkv.decode(q, 5), "cache")
    err(lambda: qkv.decode(q, [(c, s)], [s]), "seqs")
    q2 = rand(rng, (2, 2, 1, D))
    err(lambda: qkv.decode(q2, [(c, s), (p, a)]), "dtype")  # float32 and int8 caches mixed


# ---------------------------------------------------------------------------
# merge_partials.

def test_merge_partials_matches_formula_and_recovers_full_attention():
    """merge_partials: lse = log(sum exp(lse_i)), out = sum exp(lse_i - lse)
    out_i (float32, derived bound); merging the attention of key chunks
    gives the attention over all keys; -inf partials contribute nothing and
    all -inf gives zeros with lse -inf."""
    rng = np.random.default_rng(97)
    n, dv = 5, 12
    outs = rand(rng, (n, dv))
    lses = (rand(rng, (n,)) * 3).astype(np.float32)
    out, lse = qkv.merge_partials(outs, lses)
    assert out.dtype == np.float32 and out.shape == (dv,)
    L = np.log(np.exp(lses.astype(np.float64)).sum())
    w = np.exp(lses - L)
    want = (w[:, None] * outs).sum(0)
    # float32: the weights' exponent argument rounds by u (|lse_i| + |L|),
    # exp by 2u, the n-term sums by (n + 1) u each (numerator and the
    # normaliser): relative <= (2 (max|lse| + |L|) + 2 + 2 (n + 2)) u of
    # sum_i w_i |out_i|; lse within (|L| + n + 2) u.
    rel = (2 * (abs(lses).max() + abs(L)) + 2 + 2 * (n + 2)) * U32
    assert_within("merge out", out, want, rel * (w[:, None] * abs(outs)).sum(0) + U32 * abs(want))
    assert abs(lse - L) <= (abs(L) + n + 2) * U32

    # -inf partials: ignored; all -inf: zeros, -inf.
    lses2 = lses.copy()
    lses2[[1, 3]] = -np.inf
    out2, lse2 = qkv.merge_partials(outs, lses2)
    keep = [0, 2, 4]
    out3, lse3 = qkv.merge_partials(outs[keep], lses[keep])
    assert np.array_equal(out2, out3) and lse2 == lse3
    out4, lse4 = qkv.merge_partials(outs, np.full(n, -np.inf, np.float32))
    assert np.all(out4 == 0) and lse4 == -np.inf

    # Chunks of one query's keys merge into the full attention.
    D, NK = 16, 30
    q, k, v = rand(rng, (1, 1, 1, D)), rand(rng, (1, 1, NK, D)), rand(rng, (1, 1, NK, dv))
    parts = [qkv.attention(q, k[:, :, a:b], v[:, :, a:b], return_lse=True)
             for a, b in ((0, 7), (7, 8), (8, 30))]
    po = np.stack([p[0][0, 0, 0] for p in parts])
    pl = np.array([p[1][0, 0, 0] for p in parts], np.float32)
    mo, ml = qkv.merge_partials(po, pl)
    o = forward_oracle(q, k, v)
    # Each part is within its own flash bound of the exact part; the merge
    # adds the bound above. Sum of parts' bounds (relative to sum p |v|) is at
    # most the full row's factor, doubled for the merge.
    assert_within("merged attention", mo, o["out"][0, 0, 0],
                  2 * out_bound(o, FLASH_U)[0, 0, 0] + rel * o["absv"][0, 0, 0])
    assert abs(ml - o["lse"][0, 0, 0]) <= 2 * lse_bound(o, FLASH_U)[0, 0, 0]


def test_merge_partials_errors():
    """Mismatched lengths and wrong ranks raise ValueError naming the argument."""
    with pytest.raises(ValueError, match="lse_parts"):
        qkv.merge_partials(np.ones((3, 4), np.float32), np.ones(2, np.float32))
    with pytest.raises(ValueError, match="out_parts"):
        qkv.merge_partials(np.ones(4, np.float32), np.ones(4, np.float32))
    with pytest.raises(ValueError, match="out_parts"):
        qkv.merge_partials(np.ones((3, 4), np.int32), np.ones(3, np.float32))


# ---------------------------------------------------------------------------
# memory_plan.

PRESETS = {  # layers, heads, kv_heads, head_dim, window (config.json values)
    "llama2-7b": (32, 32, 32, 128, 0),
    "llama3-8b": (32, 32, 8, 128, 0),
    "mistral-7b": (32, 32, 8, 128, 4096),
    "llama2-70b": (80, 64, 8, 128, 0),
}

PLANS = [
    dict(preset="llama3-8b", seq=4096),
    dict(preset="mistral-7b", seq=10000, batch=3, dtype="i8", threads=4),
    dict(preset="mistral-7b", seq=1000, dtype="f32"),
    dict(preset="llama2-70b", seq=2048, batch=2, dtype="bf16"),
    dict(preset="llama2-7b", seq=512, kv_heads=4, window=256),
    dict(heads=12, head_dim=64, seq=1024),
    dict(layers=3, heads=16, kv_heads=2, head_dim=80, seq=777, batch=5, dtype="i8", window=100,
         threads=3),
]


def hand_plan(preset=None, layers=None, heads=None, kv_heads=None, head_dim=None, window=None,
              seq=0, batch=1, dtype="f16", threads=0):
    """memory_plan.h's formulas, by hand (threads 0 = every core: not echoed as 0)."""
    L, Hh, KV, Dh, W = PRESETS[preset] if preset else (1, None, None, None, 0)
    L = layers if layers is not None else L
    Hh = heads if heads is not None else Hh
    Dh = head_dim if head_dim is not None else Dh
    KV = kv_heads if kv_heads is not None else (KV if preset else Hh)
    W = window if window is not None else W
    nbytes = {"f32": 4, "f16": 2, "bf16": 2, "i8": 1}[dtype]
    tokens = min(seq, W) if W > 0 else seq
    per_token = 2 * L * KV * (Dh * nbytes + (4 if dtype == "i8" else 0))
    out = dict(layers=L, heads=Hh, kv_heads=KV, head_dim=Dh, window=W, seq=seq, batch=batch,
                dtype=dtype, cached_tokens=tokens,
                kv_cache_bytes_per_token=per_token, kv_cache_bytes=per_token * tokens * batch,
                score_matrix_bytes_per_layer=batch * Hh * seq * seq * (4 if dtype == "i8" else nbytes),
                attention_flops_per_token=4 * L * Hh * Dh * tokens)
    if threads:
        out["threads"] = threads
    return out


@pytest.mark.parametrize("cfg", PLANS, ids=[str(i) for i in range(len(PLANS))])
def test_memory_plan_matches_hand_formulas(cfg):
    """KV cache bytes (with int8 scales and the window's token cap), the
    naive score matrix, flops per token and the config echo equal the
    formulas of memory_plan.h; the flash working set is per thread, times
    threads, and independent of seq and batch."""
    plan = qkv.memory_plan(**cfg)
    want = hand_plan(**cfg)
    for key, value in want.items():
        assert plan[key] == value, (key, plan[key], value)
    assert plan["preset"] == cfg.get("preset", "")
    per = plan["flash_working_set_bytes_per_thread"]
    # threads 0 (the default) is every core; the plan says how many.
    threads = cfg.get("threads", 0) or plan["threads"]
    assert threads >= 1 and plan["threads"] == threads
    assert per > 0 and plan["flash_working_set_bytes"] == per * threads
    other = dict(cfg, seq=cfg["seq"] * 2 + 1, batch=cfg.get("batch", 1) + 1)
    assert qkv.memory_plan(**other)["flash_working_set_bytes_per_thread"] == per


@pytest.mark.parametrize("kwargs, words", [
    (dict(seq=10), ["heads", "head_dim", "preset"]),
    (dict(heads=32, seq=10), ["head_dim"]),
    (dict(heads=32, kv_heads=5, head_dim=128, seq=10), ["kv_heads", "5", "divide", "heads"]),
    (dict(preset="llama3-8b", kv_heads=3, seq=10), ["kv_heads", "3", "divide"]),
    (dict(heads=32, kv_heads=0, head_dim=128, seq=10), ["kv_heads", "0"]),
    (dict(heads=32, head_dim=128, seq=0), ["seq", "0"]),
    (dict(heads=32, head_dim=128, seq=10, window=-1), ["window"]),
    (dict(heads=32, head_dim=128, seq=10, dtype="f8"), ["dtype", "f8"]),
    (dict(preset="gpt2", seq=10), ["preset", "gpt2"]),
], ids=["no_heads", "no_head_dim", "kv_heads_not_divisor", "preset_kv_heads",
        "kv_heads_zero", "seq_zero", "window_negative", "dtype", "preset"])
def test_memory_plan_errors_name_the_python_keyword(kwargs, words):
    """Invalid configurations raise ValueError naming the keyword as Python
    spells it (kv_heads, head_dim: no '--' flags)."""
    with pytest.raises(ValueError) as e:
        qkv.memory_plan(**kwargs)
    msg = str(e.value)
    assert "\n" not in msg and "--" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)


CLI = os.path.join(os.path.dirname(__file__), "..", "..", "build", "release", "qkv")


@pytest.mark.parametrize("cfg", PLANS, ids=[str(i) for i in range(len(PLANS))])
def test_memory_plan_equals_cli_json(cfg):
    """qkv.memory_plan prints the same numbers as `qkv memory --json`."""
    # threads 0 (every core) resolves per process (torch may have set this
    # one's OpenMP count): compare at an explicit count.
    cfg = dict(cfg)
    cfg.setdefault("threads", 1)
    args = [CLI, "memory", "--json"]
    for key, value in cfg.items():
        flag = {"window": "cache_window", "dtype": "cache_dtype"}.get(key, key)
        args += ["--" + flag.replace("_", "-"), str(value)]
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=20)
        cli = json.loads(r.stdout) if r.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError) as e:
        pytest.skip(f"CLI {CLI} not runnable: {e}")
    if cli is None:
        pytest.skip(f"CLI {CLI} failed (rc {r.returncode}): {r.stderr.strip()[:200]}")
    assert qkv.memory_plan(**cfg) == cli


# ---------------------------------------------------------------------------
# Binding bug (memory safety): decode releases the GIL while it reads the
# cache's storage, and nothing stops another Python thread from appending to
# the same cache meanwhile; a contiguous cache that grows reallocates (and
# frees) the storage the running decode is reading: use after free, SIGSEGV.
# Repro (segfaults 3 of 3 runs here, both venvs):
#   c = qkv.KvCache("contiguous", num_kv_heads=1, head_dim=64, capacity=1 << 20)
#   s = c.add_sequence(); kv = np.ones((1, 1 << 17, 64), np.float32); c.append(s, kv, kv)
#   q = np.ones((1, 64, 1, 64), np.float32)
#   t = threading.Thread(target=lambda: qkv.decode(q, c, [s], threads=1)); t.start()
#   time.sleep(0.05); c.append(s, kv, kv); t.join()
# Expected: no crash (the append waits for the decode or raises ValueError,
# or decode keeps the storage alive).

RACE_SCRIPT = """
import threading, time, numpy as np, qkv
G, D, N, H = 1, 64, 1 << 17, 64
c = qkv.KvCache("contiguous", num_kv_heads=G, head_dim=D, capacity=1 << 20)
s = c.add_sequence()
kv = np.ones((G, N, D), np.float32)
c.append(s, kv, kv)
q = np.ones((1, H, 1, D), np.float32)
result = []
def run():
    try:
        result.append(qkv.decode(q, c, [s], threads=1))
    except ValueError as e:
        result.append(e)
t = threading.Thread(target=run)
t.start()
time.sleep(0.05)  # the decode (~0.2 s) is now reading the cache without the GIL
try:
    c.append(s, kv, kv)  # grows the contiguous storage: reallocates it
except ValueError:
    pass
t.join()
r = result[0]
# All keys and values are ones: a completed decode returns exactly ones.
assert isinstance(r, ValueError) or np.array_equal(r, np.ones_like(q)), r
print("ok")
"""


def test_append_while_decode_runs_in_another_thread_does_not_crash():
    """A decode running in one thread (GIL released) and an append growing
    the same cache in another must not crash the interpreter."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", RACE_SCRIPT], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, f"child died (rc {r.returncode}): {r.stderr[-500:]}"
    assert r.stdout.strip().endswith("ok")


def test_memory_plan_figure_beyond_2_63_is_none_and_the_rest_is_answered():
    """--seq 2^31 - 1 overflows the score matrix (batch * heads * seq^2 * 2 bytes > 2^63),
    not the KV cache: the plan answers what fits (issue 18) and says None for the rest."""
    plan = qkv.memory_plan(preset="llama3-8b", seq=2147483647)
    assert plan["score_matrix_bytes_per_layer"] is None
    assert plan["kv_cache_bytes_per_token"] == 2 * 32 * 8 * 128 * 2
    assert plan["kv_cache_bytes"] == 2 * 32 * 8 * 128 * 2 * 2147483647
    huge = qkv.memory_plan(layers=2**31 - 1, heads=2**31 - 1, head_dim=2**31 - 1, seq=2**31 - 1)
    for key in ("kv_cache_bytes_per_token", "kv_cache_bytes", "score_matrix_bytes_per_layer",
                "attention_flops_per_token"):
        assert huge[key] is None, key
