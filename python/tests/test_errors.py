"""Bad inputs from Python: a ValueError carrying the library's one-line
message (naming the argument and what was expected), nothing written to a
caller's `out`, and no crash on unusual but valid arrays (non-contiguous,
zero-size, read-only)."""

import numpy as np
import pytest

import qkv
from conftest import FLASH_U, U64, allowed_pairs, check_forward, forward_oracle, rand

RNG = np.random.default_rng(99)
B, H, G, NQ, NK, D = 2, 4, 2, 7, 9, 16
Q = rand(RNG, (B, H, NQ, D))
K = rand(RNG, (B, G, NK, D))
V = rand(RNG, (B, G, NK, D))
DOUT = rand(RNG, (B, H, NQ, D))


def expect_error(fn, *words):
    """Calls fn, expects ValueError whose message is one line containing `words`."""
    with pytest.raises(ValueError) as e:
        fn()
    msg = str(e.value)
    assert msg and "\n" not in msg, f"not one line: {msg!r}"
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    return msg


# (id, keyword arguments replacing the defaults, words the message must hold)
ATTENTION_ERRORS = [
    ("q_3d", dict(q=Q[0]), ["q:", "3-D", "4-D"]),
    ("k_5d", dict(k=K[None]), ["k:", "5-D", "4-D"]),
    ("q_int32", dict(q=Q.astype(np.int32)), ["q:", "int32", "float32"]),
    ("q_int8", dict(q=Q.astype(np.int8)), ["q:", "int8"]),
    ("v_complex", dict(v=V.astype(np.complex64)), ["v:", "complex"]),
    ("k_int64", dict(k=K.astype(np.int64)), ["k:", "int64"]),
    ("q_list", dict(q=Q.tolist()), ["q:", "list", "NumPy array"]),
    ("head_dim_mismatch", dict(k=K[..., :8]), ["k:", "head_dim"]),
    ("heads_not_multiple", dict(q=Q[:, :3]), ["num_kv_heads", "divide", "num_q_heads"]),
    ("v_seq_mismatch", dict(v=V[:, :, :8]), ["v:", "seq_kv"]),
    ("batch_mismatch", dict(k=K[:1], v=V[:1]), ["batch"]),
    ("mask_not_broadcasting", dict(mask=np.ones((3, NK), bool)), ["mask:", "broadcast", "(3, 9)"]),
    ("mask_5d", dict(mask=np.ones((1, 1, 1, NQ, NK), bool)), ["mask:", "5-D"]),
    ("mask_int32", dict(mask=np.ones((NQ, NK), np.int32)), ["mask:", "int32"]),
    ("mask_list", dict(mask=[[True] * NK] * NQ), ["mask:", "list"]),
    ("window_left_below_minus_1", dict(window=(-2, 0)), ["window", "-1"]),
    ("window_right_below_minus_1", dict(window=(0, -5)), ["window", "-1"]),
    ("window_not_pair", dict(window=5), ["window:", "pair"]),
    ("window_three_values", dict(window=(1, 2, 3)), ["window:", "3 values"]),
    ("window_float", dict(window=(1.5, 2)), ["window:", "float"]),
    ("window_bool", dict(window=(True, 2)), ["window:", "bool"]),
    ("layout_unknown", dict(layout="bsdh"), ["layout:", "'bsdh'", "bhsd", "bshd"]),
    ("kernel_unknown", dict(kernel="fast"), ["kernel", "fast", "flash", "reference"]),
    ("causal_unknown", dict(causal="yes"), ["causal:", "'yes'", "bottom_right", "top_left"]),
    ("causal_true_ambiguous", dict(causal=True), ["causal:", "ambiguous", "bottom_right",
                                                 "top_left"]),
    ("causal_int", dict(causal=1), ["causal:", "int"]),
    ("accumulate_unknown", dict(accumulate="float16"), ["accumulate:", "float16"]),
    ("key_lengths_too_long", dict(key_lengths=[NK + 1, 1]), ["key_lengths[0]", "10", "seq_kv"]),
    ("key_lengths_negative", dict(key_lengths=[3, -1]), ["key_lengths[1]", "-1"]),
    ("key_lengths_wrong_length", dict(key_lengths=[1]), ["key_lengths", "batch"]),
    ("key_lengths_2d", dict(key_lengths=np.array([[1, 2]])), ["key_lengths", "2-D", "1-D"]),
    ("key_lengths_float_array", dict(key_lengths=np.array([1.0, 2.0])), ["key_lengths", "float64"]),
    ("key_lengths_nested_list", dict(key_lengths=[[1, 2]]), ["key_lengths"]),
    ("scale_nan", dict(scale=float("nan")), ["scale", "finite"]),
    ("scale_inf", dict(scale=float("inf")), ["scale", "finite"]),
    ("threads_negative", dict(threads=-1), ["threads", "-1"]),
    ("flash_weights", dict(kernel="flash", return_weights=True), ["flash", "weights"]),
    ("flash_float64", dict(kernel="flash", accumulate="float64"), ["flash", "float64"]),
    ("out_wrong_shape", dict(out=np.zeros((B, H, NQ, D + 1), np.float32)), ["out:", "shape"]),
    ("out_int", dict(out=np.zeros((B, H, NQ, D), np.int32)), ["out:", "int32"]),
    ("out_list", dict(out=[0.0]), ["out:", "list"]),
]


@pytest.mark.parametrize("kwargs, words", [(kw, w) for _, kw, w in ATTENTION_ERRORS],
                         ids=[i for i, _, _ in ATTENTION_ERRORS])
def test_attention_bad_input_raises_one_line_value_error(kwargs, words):
    """Each bad argument gives a ValueError whose one-line message names the
    argument and what was wrong."""
    args = dict(q=Q, k=K, v=V)
    args.update(kwargs)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    expect_error(lambda: qkv.attention(q, k, v, **args), *words)


def test_read_only_out_is_refused():
    """A read-only out= cannot be written: ValueError naming out."""
    out = np.zeros((B, H, NQ, D), np.float32)
    out.flags.writeable = False
    expect_error(lambda: qkv.attention(Q, K, V, out=out), "out")


@pytest.mark.parametrize("kwargs", [
    dict(key_lengths=[NK + 1, 0]),
    dict(key_lengths=[1]),
    dict(window=(-3, 0)),
    dict(causal=True),
    dict(mask=np.ones((3, NK), bool)),
    dict(scale=float("nan")),
    dict(kernel="flash", return_weights=True),
    dict(kernel="flash", accumulate="float64"),
    dict(kernel="nope"),
    dict(k=K[..., :8]),
    dict(q=Q[:, :3]),
], ids=["key_lengths_range", "key_lengths_len", "window", "causal_true", "mask_shape", "scale",
        "flash_weights", "flash_float64", "kernel", "head_dim", "heads"])
def test_invalid_call_leaves_out_untouched(kwargs):
    """With out= given, a call that fails validation writes nothing: the
    sentinel in out (and around a non-contiguous out view) survives bitwise."""
    args = dict(q=Q, k=K, v=V)
    args.update(kwargs)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    buf = np.full((B, H, 2 * q.shape[2], D + 2), 7.0, dtype=np.float32)
    buf[..., 0] = np.nan
    view = buf[:, : q.shape[1], ::2, 1:D + 1]
    before = buf.tobytes()
    with pytest.raises(ValueError):
        qkv.attention(q, k, v, out=view, return_lse=True, **args)
    assert buf.tobytes() == before


# (id, keyword arguments of attention_backward, words)
BACKWARD_ERRORS = [
    ("dmask_without_mask", dict(return_dmask=True), ["return_dmask", "mask"]),
    ("dmask_bool_mask", dict(return_dmask=True, mask=np.ones((NQ, NK), bool)),
     ["dmask", "bool"]),
    ("dmask_flash", dict(return_dmask=True, mask=np.zeros((NQ, NK), np.float32), kernel="flash"),
     ["flash", "dmask"]),
    ("dout_shape", dict(dout=DOUT[..., :15]), ["dout:", "shape"]),
    ("lse_2d", dict(lse=np.zeros((B, H), np.float32)), ["lse:", "2-D"]),
    ("lse_shape", dict(lse=np.zeros((B, H, NQ + 1), np.float32)), ["lse"]),
    ("out_shape", dict(out=np.zeros((B, H, NQ, D + 1), np.float32)), ["out:", "shape"]),
    ("q_int", dict(q=Q.astype(np.int32)), ["q:", "int32"]),
    ("dout_list", dict(dout=DOUT.tolist()), ["dout:", "list"]),
    ("causal_true", dict(causal=True), ["causal:", "ambiguous"]),
    ("key_lengths_range", dict(key_lengths=[NK + 1, 0]), ["key_lengths[0]"]),
    ("heads", dict(q=Q[:, :3], dout=DOUT[:, :3]), ["num_kv_heads", "divide"]),
]


@pytest.mark.parametrize("kwargs, words", [(kw, w) for _, kw, w in BACKWARD_ERRORS],
                         ids=[i for i, _, _ in BACKWARD_ERRORS])
def test_backward_bad_input_raises_one_line_value_error(kwargs, words):
    """attention_backward's bad arguments: ValueError, one line, named."""
    args = dict(q=Q, k=K, v=V, out=None, dout=DOUT, lse=None)
    args.update(kwargs)
    pos = [args.pop(n) for n in ("q", "k", "v", "out", "dout", "lse")]
    expect_error(lambda: qkv.attention_backward(*pos, **args), *words)


def test_bad_array_memory_is_refused_not_misread():
    """Arrays qkv cannot read in place are refused with a ValueError naming
    the argument (never silently misread): a big-endian array and a field of
    a packed structured array (stride of 5 bytes, not whole elements)."""
    expect_error(lambda: qkv.attention(Q.astype(">f4"), K, V), "q")
    packed = np.zeros(Q.shape, dtype=[("pad", "i1"), ("x", "<f4")])
    packed["x"] = Q
    expect_error(lambda: qkv.attention(packed["x"], K, V), "q")


# Binding bug (message): an unsupported dtype for an argument that is not q,
# k or v is described with q's expectation "(expected float32, float16 or
# float64)", which is wrong for key_lengths (integers) and incomplete for
# mask (bool is accepted); a big-endian NumPy array is described as
# "ndarray (expected a NumPy array ...)". Repro:
#   qkv.attention(q, k, v, key_lengths=np.array([3, 4], np.uint8))
#   qkv.attention(q, k, v, mask=np.ones(9, np.uint8))
#   qkv.attention(q.astype('>f4'), k, v)
@pytest.mark.parametrize("call, words", [
    (lambda: qkv.attention(Q, K, V, key_lengths=np.array([3, 4], np.uint8)), ["key_lengths", "int64"]),
    (lambda: qkv.attention(Q, K, V, key_lengths=np.array([3, 4], np.int16)), ["key_lengths", "int32"]),
    (lambda: qkv.attention(Q, K, V, mask=np.ones(NK, np.uint8)), ["mask", "bool"]),
    (lambda: qkv.attention(Q.astype(">f4"), K, V), ["q", "byte order"]),
], ids=["key_lengths_uint8", "key_lengths_int16", "mask_uint8", "big_endian"])
def test_unsupported_dtype_message_says_what_the_argument_accepts(call, words):
    """The message for an unsupported dtype names what that argument accepts
    (integers for key_lengths, bool or float for mask, native byte order)."""
    msg = expect_error(call)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"


# ---------------------------------------------------------------------------
# Unusual but valid arrays: no crash, and the documented results.

@pytest.mark.parametrize("what", ["seq_q", "seq_kv", "batch", "heads", "head_dim", "head_dim_v"])
def test_zero_size_arrays_give_empty_or_documented_results(what):
    """Zero-size dims: outputs of the right (possibly empty) shape; seq_kv = 0
    gives zeros with lse -inf; head_dim = 0 gives scores 0 (uniform weights:
    the mean of v, lse = log(seq_kv)); backward returns matching shapes."""
    b, h, g, nq, nk, d, dv = 2, 4, 2, 5, 6, 8, 8
    if what == "seq_q":
        nq = 0
    elif what == "seq_kv":
        nk = 0
    elif what == "batch":
        b = 0
    elif what == "heads":
        h = g = 0
    elif what == "head_dim":
        d = 0
    else:
        dv = 0
    rng = np.random.default_rng(3)
    q, k, v = rand(rng, (b, h, nq, d)), rand(rng, (b, g, nk, d)), rand(rng, (b, g, nk, dv))
    for causal in (None, "bottom_right"):
        out, lse = qkv.attention(q, k, v, causal=causal, return_lse=True)
        assert out.shape == (b, h, nq, dv) and lse.shape == (b, h, nq)
        assert not np.isnan(out).any() and not np.isnan(lse).any()
        if what == "seq_kv":
            assert np.all(out == 0) and np.all(lse == -np.inf)
        if what == "head_dim" and causal is None:
            # head_dim 0: default scale 1, every score 0, lse = log(seq_kv).
            o = forward_oracle(q, k, v, scale=1.0)
            assert np.allclose(o["lse"], np.log(nk), rtol=0, atol=1e-15)
            check_forward(o, out, lse, u=FLASH_U, out_dtype=np.float32)
        dout = rand(rng, out.shape)
        dq, dk, dv_ = qkv.attention_backward(q, k, v, out, dout, lse, causal=causal)
        assert dq.shape == q.shape and dk.shape == k.shape and dv_.shape == v.shape
        for x in (dq, dk, dv_):
            assert not np.isnan(x).any()
        if what == "seq_kv":
            assert np.all(dq == 0)


def test_zero_size_batch_with_key_lengths_and_mask():
    """batch 0 with key_lengths=[] and a broadcast mask: an empty result."""
    q, k, v = (np.zeros((0, 2, 3, 4), np.float32) for _ in range(3))
    out = qkv.attention(q, k, v, key_lengths=[], mask=np.zeros((3, 3), np.float32))
    assert out.shape == (0, 2, 3, 4)


def test_non_contiguous_and_read_only_inputs_do_not_crash():
    """Fortran-ordered, negative-stride, stride-0 and read-only inputs (and a
    read-only mask and key_lengths) are read correctly."""
    rng = np.random.default_rng(4)
    q = np.asfortranarray(rand(rng, (B, H, NQ, D), np.float64))
    k = rand(rng, (B, G, NK, D), np.float64)[:, :, ::-1, ::-1]
    v = np.lib.stride_tricks.as_strided(rand(rng, (1, 1, 1, D), np.float64), (B, G, NK, D),
                                        (0, 0, 0, 8))
    mask = rng.random((NQ, NK)) < 0.7
    lens = np.array([NK, 4])
    for x in (q, mask, lens):
        x.flags.writeable = False
    out, lse = qkv.attention(q, k, v, mask=mask, key_lengths=lens, return_lse=True)
    allowed, add = allowed_pairs(B, H, NQ, NK, mask=mask, key_lengths=lens)
    o = forward_oracle(q, k, v, allowed=allowed, add=add)
    check_forward(o, out, lse, u=U64, out_dtype=np.float64, stat_dtype=np.float64)


def test_build_info_names_version_and_simd_target():
    info = qkv.build_info()
    assert info.startswith(f"qkv {qkv.__version__} (git ")
    assert "SIMD targets built: " in info and "; running: " in info
    assert "\n" not in info
