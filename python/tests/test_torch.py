"""qkv.torch against PyTorch: forward, backward, gradcheck, errors, use_qkv, threads.

Every result is compared with the math formula softmax(q k^T * scale + mask) v written
with plain torch ops and evaluated in float64 (autograd gives the reference gradients),
on the same (already rounded) inputs; and, where this torch has it, with
torch.nn.functional.scaled_dot_product_attention itself (torch >= 2.0; Debian's torch
1.13 has none), which pins the semantics the formula encodes (top-left is_causal,
True = attend, GQA head grouping, broadcasting).

Tolerances (TOL below) are multiples of the unit roundoff u of the dtype results are
stored in, applied to max(1, max |reference|):
- float64 (qkv's float64 reference kernel): 256 u = 2.8e-14. Sums run over at most 16
  terms here, so the classical n*u bounds stay far below it.
- float32 (flash kernels, float32 accumulation): 256 u = 1.5e-5. Observed ~10 u
  (5e-7 on values of size ~2): the online softmax rescales and the O(S + E) term
  sums each add a few u.
- float16 (read/written as float16, computed in float32): 4 u = 2e-3. The final
  rounding to float16 alone costs up to u relative to the largest element; observed
  up to ~1.2 u on gradients.
- bfloat16 (widened to float32, rounded back): 4 u = 1.6e-2; observed up to ~1 u.
Against torch's own function (its own rounding, its own order of additions) the bound
is doubled: both are within TOL of the exact result. A wrong mask, scale, head mapping
or causal alignment moves outputs by O(0.1 .. 1), far above every bound.
"""
from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import qkv.torch as qt  # noqa: E402

# One thread for the value tests: test_bitwise_equal_for_1_and_2_threads proves qkv's results
# do not depend on the count, so these hold for any. (On a loaded 2-core machine a 2-thread
# OpenMP region on these tiny inputs can stall for a scheduler time slice: ~50 ms a call.)
torch.set_num_threads(1)

# Captured before any use_qkv block can add or replace it.
TORCH_SDPA = getattr(F, "scaled_dot_product_attention", None)

TOL = {
    torch.float64: 256 * 2.0**-53,
    torch.float32: 256 * 2.0**-24,
    torch.float16: 4 * 2.0**-11,
    torch.bfloat16: 4 * 2.0**-8,
}


def _torch_supports(**kwargs) -> bool:
    if TORCH_SDPA is None:
        return False
    q = torch.zeros(1, 2, 1, 4)
    k = torch.zeros(1, 1 if kwargs.get("enable_gqa") else 2, 1, 4)
    try:
        TORCH_SDPA(q, k, k, **kwargs)
        return True
    except (TypeError, RuntimeError):
        return False


TORCH_HAS_SCALE = _torch_supports(scale=0.5)  # torch >= 2.1
TORCH_HAS_GQA = _torch_supports(enable_gqa=True)  # torch >= 2.5


# ---------------------------------------------------------------------------
# References


def reference_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False):
    """softmax(q k^T * scale + mask) v with plain torch ops (PyTorch's documented semantics)."""
    assert dropout_p == 0.0
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    if enable_gqa:  # query head h reads key/value head h // (Hq / Hkv)
        group = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(group, dim=-3)
        value = value.repeat_interleave(group, dim=-3)
    scores = query @ key.transpose(-2, -1) * scale
    if is_causal:  # top-left: query i sees keys 0..i
        keep = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    return torch.softmax(scores, dim=-1) @ value


def torch_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False):
    """torch's own function, with scale / enable_gqa emulated where this torch lacks them."""
    kwargs = {}
    if scale is not None:
        if TORCH_HAS_SCALE:
            kwargs["scale"] = scale
        else:
            query = query * (scale * math.sqrt(query.shape[-1]))
    if enable_gqa:
        if TORCH_HAS_GQA:
            kwargs["enable_gqa"] = True
        else:
            group = query.shape[-3] // key.shape[-3]
            key = key.repeat_interleave(group, dim=-3)
            value = value.repeat_interleave(group, dim=-3)
    return TORCH_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                      is_causal=is_causal, **kwargs)


def evaluate(fn, leaves, build, dout, **kwargs):
    """Output of fn(*build(*leaves), **kwargs) and its gradients (for dout) w.r.t. the leaves
    that require grad. build makes the actual arguments (views, expands, casts) from leaves."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in leaves]
    q, k, v, mask = build(*leaves)
    out = fn(q, k, v, attn_mask=mask, **kwargs)
    wrt = [t for t in leaves if t.requires_grad]
    grads = torch.autograd.grad(out, wrt, dout) if wrt else ()
    return out.detach(), [g for g in grads]


def as64(t):
    return t if t.dtype == torch.bool else t.double()


def max_err(actual, expected):
    return (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0


def bound(expected, dtype, factor=1.0):
    largest = expected.double().abs().max().item() if expected.numel() else 0.0
    return factor * TOL[dtype] * max(1.0, largest)


def assert_close(actual, expected, dtype, what, factor=1.0):
    assert actual.shape == expected.shape, \
        f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err, tol = max_err(actual, expected), bound(expected, dtype, factor)
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g}"


# ---------------------------------------------------------------------------
# Cases: shapes, masks, layouts


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(shape, dtype, g, requires_grad=True):
    t = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    return t.requires_grad_(requires_grad)


def bool_mask(shape, g):
    m = torch.rand(*shape, generator=g) < 0.6
    m[..., 0] = True  # every query row keeps a key (no fully masked rows here)
    return m


def float_mask(shape, dtype, g, requires_grad=True):
    m = torch.randn(*shape, generator=g, dtype=torch.float64)
    m[torch.rand(*shape, generator=g) < 0.2] = float("-inf")  # some -inf entries...
    m[..., 0] = 0.0  # ...never a whole row
    return m.to(dtype).requires_grad_(requires_grad)


# name: q, k, v shapes (as stored), kwargs, mask spec ("bool"/"float"/"float_nograd", shape),
# layout ("bhsd": as is; "bshd": stored [N, L, H, E] and transposed; "sliced": stored with
# a padded last dim and sliced; "expand": float mask given as an expand() view).
N, H, L, S, E = 2, 3, 5, 7, 8
CASES = {
    "plain": ((N, H, L, E), (N, H, S, E), (N, H, S, E), {}, None, "bhsd"),
    "value_dim_differs": ((N, H, L, E), (N, H, S, E), (N, H, S, 4), {}, None, "bhsd"),
    "causal_L<S": ((N, H, L, E), (N, H, S, E), (N, H, S, E), {"is_causal": True}, None, "bhsd"),
    "causal_L>S": ((N, H, S + 4, E), (N, H, L, E), (N, H, L, E), {"is_causal": True}, None, "bhsd"),
    "causal_L=S": ((N, H, S, E), (N, H, S, E), (N, H, S, E), {"is_causal": True}, None, "bhsd"),
    "scale": ((N, H, L, E), (N, H, S, E), (N, H, S, E), {"scale": 0.3}, None, "bhsd"),
    "scale_causal": ((N, H, L, E), (N, H, S, E), (N, H, S, E), {"scale": 1.7, "is_causal": True},
                     None, "bhsd"),
    "bool_LS": ((N, H, L, E), (N, H, S, E), (N, H, S, E), {}, ("bool", (L, S)), "bhsd"),
    "bool_11LS": ((N, H, L, E), (N, H, S, E), (N, H, S, E), {}, ("bool", (1, 1, L, S)), "bhsd"),
    "bool_N11S": ((N, H, L, E), (N, H, S, E), (N, H, S, E), {}, ("bool", (N, 1, 1, S)), "bhsd"),
    "bool_NHLS": ((N, H, L, E), (N, H, S, E), (N, H, S, E), {}, ("bool", (N, H, L, S)), "bhsd"),
    "float_LS": ((N, H, L, E), (N, H, S, E), (N, H, S, E), {}, ("float", (L, S)), "bhsd"),
    "float_11LS": ((N, H, L, E), (N, H, S, E), (N, H, S, E), {}, ("float", (1, 1, L, S)), "bhsd"),
    "float_N11S": ((N, H, L, E), (N, H, S, E), (N, H, S, E), {}, ("float", (N, 1, 1, S)), "bhsd"),
    "float_NHLS": ((N, H, L, E), (N, H, S, E), (N, H, S, E), {}, ("float", (N, H, L, S)), "bhsd"),
    "float_nograd": ((N, H, L, E), (N, H, S, E), (N, H, S, E), {}, ("float_nograd", (N, 1, L, S)),
                     "bhsd"),
    "float_expanded_view": ((N, H, L, E), (N, H, S, E), (N, H, S, E), {}, ("float", (1, 1, 1, S)),
                            "expand"),
    "float_scale": ((N, H, L, E), (N, H, S, E), (N, H, S, E), {"scale": 0.5}, ("float", (L, S)),
                    "bhsd"),
    "gqa": ((N, 6, L, E), (N, 2, S, E), (N, 2, S, E), {"enable_gqa": True}, None, "bhsd"),
    "gqa_causal": ((N, 6, L, E), (N, 3, S, E), (N, 3, S, E),
                   {"enable_gqa": True, "is_causal": True}, None, "bhsd"),
    "mqa_float_mask": ((N, 4, L, E), (N, 1, S, E), (N, 1, S, E), {"enable_gqa": True},
                       ("float", (N, 4, L, S)), "bhsd"),
    "gqa_equal_heads": ((N, H, L, E), (N, H, S, E), (N, H, S, E), {"enable_gqa": True}, None,
                        "bhsd"),
    "3d": ((N, L, E), (N, S, E), (N, S, E), {}, None, "bhsd"),
    "3d_causal": ((N, S, E), (N, L, E), (N, L, E), {"is_causal": True}, None, "bhsd"),
    "3d_float_LS": ((N, L, E), (N, S, E), (N, S, E), {}, ("float", (L, S)), "bhsd"),
    "3d_bool_NLS": ((N, L, E), (N, S, E), (N, S, E), {}, ("bool", (N, L, S)), "bhsd"),
    "5d": ((N, 2, H, L, E), (N, 2, H, S, E), (N, 2, H, S, E), {}, None, "bhsd"),
    "5d_causal": ((N, 2, H, L, E), (N, 2, H, S, E), (N, 2, H, S, E), {"is_causal": True}, None,
                  "bhsd"),
    "5d_float_mask": ((N, 2, H, L, E), (N, 2, H, S, E), (N, 2, H, S, E), {},
                      ("float", (N, 1, H, 1, S)), "bhsd"),
    "5d_bool_mask": ((N, 2, H, L, E), (N, 2, H, S, E), (N, 2, H, S, E), {}, ("bool", (L, S)),
                     "bhsd"),
    "bshd": ((N, H, L, E), (N, H, S, E), (N, H, S, E), {}, None, "bshd"),
    "bshd_float_mask": ((N, H, L, E), (N, H, S, E), (N, H, S, E), {},
                               ("float", (N, 1, L, S)), "bshd"),
    "bshd_gqa_causal": ((N, 4, L, E), (N, 2, S, E), (N, 2, S, E),
                        {"enable_gqa": True, "is_causal": True}, None, "bshd"),
    "sliced_last_dim": ((N, H, L, E), (N, H, S, E), (N, H, S, E), {"is_causal": True}, None,
                        "sliced"),
}
LOW_PRECISION = ["plain", "causal_L<S", "causal_L>S", "float_NHLS", "bool_LS", "gqa_causal",
                 "bshd_float_mask", "3d_causal", "5d_float_mask"]


def make_case(name, dtype, seed=0):
    """(leaves, build, kwargs): leaves are the tensors gradients are taken for."""
    qs, ks, vs, kwargs, mask_spec, layout = CASES[name]
    g = gen(seed)

    def stored(shape):
        if layout == "bshd":  # [..., L, H, E] in memory, given as the [..., H, L, E] transpose
            shape = shape[:-3] + (shape[-2], shape[-3], shape[-1])
        elif layout == "sliced":
            shape = shape[:-1] + (shape[-1] + 5,)
        return randn(shape, dtype, g)

    leaves = [stored(qs), stored(ks), stored(vs)]
    if mask_spec is not None:
        kind, shape = mask_spec
        if kind == "bool":
            leaves.append(bool_mask(shape, g))
        else:
            leaves.append(float_mask(shape, dtype, g, requires_grad=kind == "float"))

    def view(t, want):
        if layout == "bshd":
            return t.transpose(-3, -2)
        if layout == "sliced":
            return t[..., : want[-1]]
        return t

    def build(q, k, v, mask=None):
        q, k, v = view(q, qs), view(k, ks), view(v, vs)
        if mask is not None and layout == "expand":
            mask = mask.expand(q.shape[:-1] + (k.shape[-2],))
        return q, k, v, mask

    return leaves, build, kwargs


def check_case(name, dtype):
    leaves, build, kwargs = make_case(name, dtype)
    q, k, v, mask = build(*leaves)
    out = qt.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kwargs)
    assert out.dtype == dtype
    dout = torch.randn(out.shape, generator=gen(1), dtype=torch.float64).to(dtype)

    got_out, got_grads = evaluate(qt.scaled_dot_product_attention, leaves, build, dout, **kwargs)
    assert torch.equal(got_out, out.detach())
    ref_out, ref_grads = evaluate(reference_sdpa, [as64(t) for t in leaves], build, dout.double(),
                                  **kwargs)
    names = ["dq", "dk", "dv", "dmask"][: len(got_grads)]
    assert len(got_grads) == len(ref_grads)
    assert_close(got_out, ref_out, dtype, f"{name} {dtype} out vs formula")
    for n, gq, gr in zip(names, got_grads, ref_grads):
        assert gq.dtype == dtype, f"{n} dtype {gq.dtype}"
        assert_close(gq, gr, dtype, f"{name} {dtype} {n} vs formula")

    if TORCH_SDPA is not None:
        t_out, t_grads = evaluate(torch_sdpa, leaves, build, dout, **kwargs)
        assert_close(got_out, t_out, dtype, f"{name} {dtype} out vs torch", factor=2)
        for n, gq, gt in zip(names, got_grads, t_grads):
            assert_close(gq, gt, dtype, f"{name} {dtype} {n} vs torch", factor=2)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_matches_formula_and_torch(name, dtype):
    check_case(name, dtype)


@pytest.mark.parametrize("name", LOW_PRECISION)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_low_precision_matches(name, dtype):
    check_case(name, dtype)


def test_two_dim_inputs():
    """(L, E) inputs (no batch, no heads), with a float mask: the rank-2 path of _as_4d."""
    g = gen(3)
    q, k, v = (randn(s, torch.float64, g) for s in ((L, E), (S, E), (S, 4)))
    m = float_mask((L, S), torch.float64, g)
    out = qt.scaled_dot_product_attention(q, k, v, attn_mask=m)
    ref = reference_sdpa(q, k, v, attn_mask=m)
    assert out.shape == (L, 4)
    assert_close(out, ref, torch.float64, "2-D out")
    gq = torch.autograd.grad(out.sum(), (q, k, v, m))
    gr = torch.autograd.grad(ref.sum(), (q, k, v, m))
    for n, a, b in zip(("dq", "dk", "dv", "dmask"), gq, gr):
        assert_close(a, b, torch.float64, f"2-D {n}")


def test_stride0_dout_from_sum():
    """out.sum().backward() hands backward a stride-0 (expanded) gradient."""
    leaves, build, kwargs = make_case("bshd_float_mask", torch.float32)
    q, k, v, m = build(*leaves)
    qt.scaled_dot_product_attention(q, k, v, attn_mask=m, **kwargs).sum().backward()
    ref_leaves = [as64(t).detach().requires_grad_() for t in leaves]
    rq, rk, rv, rm = build(*ref_leaves)
    reference_sdpa(rq, rk, rv, attn_mask=rm, **kwargs).sum().backward()
    for n, a, b in zip(("dq", "dk", "dv", "dmask"), leaves, ref_leaves):
        assert_close(a.grad, b.grad, torch.float32, f"sum-backward {n}")


def test_partial_requires_grad():
    """Only some inputs require grad: only those get gradients, and they are right."""
    g = gen(4)
    q = randn((N, H, L, E), torch.float64, g, requires_grad=False)
    k = randn((N, H, S, E), torch.float64, g, requires_grad=False)
    v = randn((N, H, S, E), torch.float64, g)
    m = float_mask((L, S), torch.float64, g)
    out = qt.scaled_dot_product_attention(q, k, v, attn_mask=m)
    dv, dm = torch.autograd.grad(out.square().sum(), (v, m))
    rv, rm = torch.autograd.grad(reference_sdpa(q, k, v, attn_mask=m).square().sum(), (v, m))
    assert_close(dv, rv, torch.float64, "dv")
    assert_close(dm, rm, torch.float64, "dmask")
    # Only the mask requires grad.
    v2 = v.detach()
    out = qt.scaled_dot_product_attention(q, k, v2, attn_mask=m)
    assert out.requires_grad
    (dm2,) = torch.autograd.grad(out.sum(), (m,))
    (rm2,) = torch.autograd.grad(reference_sdpa(q, k, v2, attn_mask=m).sum(), (m,))
    assert_close(dm2, rm2, torch.float64, "dmask only")
    # Nothing requires grad (or no_grad): a plain tensor, same values.
    with torch.no_grad():
        out_ng = qt.scaled_dot_product_attention(q, k, v, attn_mask=m)
    assert not out_ng.requires_grad
    assert torch.equal(out_ng, qt.scaled_dot_product_attention(q, k, v2, attn_mask=m.detach()))


def test_bfloat16_mask_gradient():
    """A bfloat16 float mask is widened to float32 with the inputs; its gradient comes back
    as bfloat16 and matches the formula."""
    g = gen(5)
    q, k, v = (randn(s, torch.bfloat16, g) for s in ((N, H, L, E), (N, H, S, E), (N, H, S, E)))
    m = float_mask((N, 1, L, S), torch.bfloat16, g)
    out = qt.scaled_dot_product_attention(q, k, v, attn_mask=m)
    dm = torch.autograd.grad(out.sum(), (m,))[0]
    assert out.dtype == dm.dtype == torch.bfloat16
    m64 = m.detach().double().requires_grad_()
    ref = reference_sdpa(*(t.detach().double() for t in (q, k, v)), attn_mask=m64)
    (rm,) = torch.autograd.grad(ref.sum(), (m64,))
    assert_close(dm, rm, torch.bfloat16, "bf16 dmask")


# ---------------------------------------------------------------------------
# gradcheck (float64: qkv's float64 reference kernel)


@pytest.mark.parametrize("kwargs", [{}, {"is_causal": True}, {"scale": 0.7},
                                    {"enable_gqa": True, "is_causal": True}],
                        ids=["plain", "causal", "scale", "gqa_causal"])
def test_gradcheck_qkv(kwargs):
    g = gen(6)
    hk = 1 if kwargs.get("enable_gqa") else 2
    q = randn((1, 2, 3, 4), torch.float64, g)
    k = randn((1, hk, 4, 4), torch.float64, g)
    v = randn((1, hk, 4, 3), torch.float64, g)
    assert torch.autograd.gradcheck(
        lambda q, k, v: qt.scaled_dot_product_attention(q, k, v, **kwargs), (q, k, v))


@pytest.mark.parametrize("mask_shape", [(3, 4), (1, 2, 3, 4), (1, 1, 1, 4)])
def test_gradcheck_float_mask(mask_shape):
    g = gen(7)
    q, k, v = randn((1, 2, 3, 4), torch.float64, g), randn((1, 2, 4, 4), torch.float64, g), \
        randn((1, 2, 4, 3), torch.float64, g)
    m = randn(mask_shape, torch.float64, g)
    assert torch.autograd.gradcheck(
        lambda q, k, v, m: qt.scaled_dot_product_attention(q, k, v, attn_mask=m), (q, k, v, m))


# ---------------------------------------------------------------------------
# Errors


def _qkv_inputs(hq=2, hk=2, dtype=torch.float32):
    g = gen(8)
    return tuple(torch.randn(*shape, generator=g).to(dtype)
                 for shape in ((1, hq, 3, 4), (1, hk, 5, 4), (1, hk, 5, 4)))


def test_dropout_is_an_error():
    q, k, v = _qkv_inputs()
    with pytest.raises(ValueError, match="dropout"):
        qt.scaled_dot_product_attention(q, k, v, dropout_p=0.1)
    assert qt.scaled_dot_product_attention(q, k, v, dropout_p=0.0).shape == (1, 2, 3, 4)


def test_mask_with_is_causal_is_an_error():
    q, k, v = _qkv_inputs()
    with pytest.raises(ValueError, match="is_causal"):
        qt.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(3, 5, dtype=torch.bool),
                                        is_causal=True)


def test_head_mismatch_is_an_error():
    q, k, v = _qkv_inputs(hq=4, hk=2)
    with pytest.raises(ValueError, match="heads"):
        qt.scaled_dot_product_attention(q, k, v)
    assert qt.scaled_dot_product_attention(q, k, v, enable_gqa=True).shape == (1, 4, 3, 4)
    q, k, v = _qkv_inputs(hq=3, hk=2)  # not a multiple: the library refuses it
    with pytest.raises(ValueError):
        qt.scaled_dot_product_attention(q, k, v, enable_gqa=True)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool], ids=str)
def test_non_float_inputs_are_an_error(dtype):
    q, k, v = _qkv_inputs(dtype=dtype)
    with pytest.raises(ValueError, match="dtype"):
        qt.scaled_dot_product_attention(q, k, v)


def test_bad_shapes_are_errors():
    q, k, v = _qkv_inputs()
    with pytest.raises(ValueError):  # head dims of q and k differ
        qt.scaled_dot_product_attention(q, k[..., :3], v)
    with pytest.raises(ValueError):  # ranks differ
        qt.scaled_dot_product_attention(q, k[0], v[0])
    with pytest.raises(ValueError):  # 1-D
        qt.scaled_dot_product_attention(q[0, 0, 0], k[0, 0, 0], v[0, 0, 0])
    with pytest.raises(ValueError):  # k and v lengths differ
        qt.scaled_dot_product_attention(q, k, v[:, :, :4])


def test_non_cpu_tensor_is_an_error():
    """No GPU needed: a 'meta' tensor is not a CPU tensor either."""
    q, k, v = _qkv_inputs()
    with pytest.raises(ValueError, match="CPU"):
        qt.scaled_dot_product_attention(q.to("meta"), k, v)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_tensor_is_an_error():
    q, k, v = _qkv_inputs()
    with pytest.raises(ValueError, match="CPU"):
        qt.scaled_dot_product_attention(q.cuda(), k.cuda(), v.cuda())


def test_integer_mask_is_an_error():
    """torch refuses an integer attn_mask ("Expected attn_mask dtype to be bool or float or to
    match query dtype"); an int/uint8 0/1 mask is ambiguous (old byte masks meant True =
    masked out) and must not be silently added to the scores as a float."""
    q, k, v = _qkv_inputs()
    for dtype in (torch.int64, torch.uint8):
        mask = torch.ones(3, 5, dtype=dtype)
        if TORCH_SDPA is not None:
            with pytest.raises(RuntimeError):
                TORCH_SDPA(q, k, v, attn_mask=mask)
        with pytest.raises(ValueError, match="attn_mask|mask"):
            qt.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# ---------------------------------------------------------------------------
# Rows with no allowed key


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fully_masked_row_is_zero_not_nan(kind):
    """qkv gives 0 for a query row whose every key is masked (and zero gradients through it).
    The math formula gives NaN there (softmax of all -inf), as torch 1.x / torch < 2.5's math
    path does; newer torch returns zeros as well. So the formula is compared on the other rows."""
    g = gen(9)
    q, k, v = randn((N, H, L, E), torch.float32, g), randn((N, H, S, E), torch.float32, g), \
        randn((N, H, S, E), torch.float32, g)
    if kind == "bool":
        m = bool_mask((L, S), g)
        m[2] = False
    else:
        m = float_mask((L, S), torch.float32, g)
        with torch.no_grad():
            m[2] = float("-inf")
    out = qt.scaled_dot_product_attention(q, k, v, attn_mask=m)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    wrt = (q, k, v) + ((m,) if kind == "float" else ())
    grads = torch.autograd.grad(out.square().sum(), wrt)
    for gr in grads:
        assert torch.isfinite(gr).all()
    assert torch.equal(grads[0][:, :, 2], torch.zeros_like(grads[0][:, :, 2]))
    ref = reference_sdpa(*(t.detach().double() for t in (q, k, v)), attn_mask=as64(m.detach()))
    assert torch.isnan(ref[:, :, 2]).all()  # the formula's NaN, which qkv does not produce
    keep = [0, 1, 3, 4]
    assert_close(out[:, :, keep].detach(), ref[:, :, keep], torch.float32, "other rows")


# ---------------------------------------------------------------------------
# use_qkv


class TinyModel(nn.Module):
    """Two attention layers written against torch.nn.functional.scaled_dot_product_attention
    (looked up at call time, as models do)."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.inp = nn.Linear(dim, 3 * dim)
        self.mid = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def attend(self, proj, x, **kwargs):
        b, t, d = x.shape
        q, k, v = proj(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, **kwargs)
        return y.transpose(1, 2).reshape(b, t, d)

    def forward(self, x, mask=None):
        x = x + self.attend(self.inp, x, is_causal=True)
        x = x + self.attend(self.mid, x, attn_mask=mask)
        return self.out(x)


def _patched_reference(fn):
    """Runs fn() with F.scaled_dot_product_attention set to the math formula."""
    had = hasattr(F, "scaled_dot_product_attention")
    saved = getattr(F, "scaled_dot_product_attention", None)
    F.scaled_dot_product_attention = reference_sdpa
    try:
        return fn()
    finally:
        if had:
            F.scaled_dot_product_attention = saved
        else:
            del F.scaled_dot_product_attention


def test_use_qkv_routes_a_model():
    torch.manual_seed(0)
    model = TinyModel()
    x = torch.randn(2, 6, 16)
    mask = float_mask((6, 6), torch.float32, gen(11), requires_grad=False)  # additive, some -inf
    assert getattr(F, "scaled_dot_product_attention", None) is TORCH_SDPA

    expected = _patched_reference(lambda: model(x, mask))
    exp_grads = _patched_reference(lambda: torch.autograd.grad(model(x, mask).sum(),
                                                               list(model.parameters())))
    with qt.use_qkv() as stats:
        assert F.scaled_dot_product_attention is not TORCH_SDPA
        assert callable(F.scaled_dot_product_attention)  # also on torch 1.13, for the block
        got = model(x, mask)
        assert stats.qkv_calls == 2
        got_grads = torch.autograd.grad(model(x, mask).sum(), list(model.parameters()))
        assert stats.qkv_calls == 4 and stats.torch_calls == 0 and stats.torch_reasons == {}

    # Restored: the very same object, or absent again on torch without it.
    assert getattr(F, "scaled_dot_product_attention", None) is TORCH_SDPA
    assert hasattr(F, "scaled_dot_product_attention") == (TORCH_SDPA is not None)

    assert_close(got.detach(), expected.detach(), torch.float32, "model out vs formula")
    for a, b in zip(got_grads, exp_grads):
        assert_close(a, b, torch.float32, "model grads vs formula")
    if TORCH_SDPA is not None:  # outside the block: torch's own attention
        outside = model(x, mask)
        assert_close(got.detach(), outside.detach(), torch.float32, "model out vs torch", factor=2)


def test_use_qkv_gqa_scale_and_dropout():
    q, k, v = _qkv_inputs(hq=4, hk=2)
    with qt.use_qkv() as stats:
        out = F.scaled_dot_product_attention(q, k, v, scale=0.4, enable_gqa=True)
        assert stats.qkv_calls == 1
        with pytest.raises(ValueError, match="dropout"):
            F.scaled_dot_product_attention(q, k, v, dropout_p=0.2, enable_gqa=True)
    ref = reference_sdpa(q.double(), k.double(), v.double(), scale=0.4, enable_gqa=True)
    assert_close(out, ref, torch.float32, "routed gqa")


def test_use_qkv_restores_after_an_exception():
    with pytest.raises(KeyError):
        with qt.use_qkv():
            raise KeyError("boom")
    assert getattr(F, "scaled_dot_product_attention", None) is TORCH_SDPA
    assert hasattr(F, "scaled_dot_product_attention") == (TORCH_SDPA is not None)


def test_use_qkv_nested():
    q, k, v = _qkv_inputs()
    with qt.use_qkv() as outer:
        with qt.use_qkv() as inner:
            F.scaled_dot_product_attention(q, k, v)
        assert inner.qkv_calls == 1
        F.scaled_dot_product_attention(q, k, v)
        assert outer.qkv_calls == 1
    assert getattr(F, "scaled_dot_product_attention", None) is TORCH_SDPA


@pytest.mark.skipif(TORCH_SDPA is None, reason="this torch has no scaled_dot_product_attention")
def test_use_qkv_leaves_non_cpu_to_torch(capsys):
    q, k, v = (t.to("meta") for t in _qkv_inputs())
    with qt.use_qkv(verbose=True) as stats:
        out = F.scaled_dot_product_attention(q, k, v)
    assert out.device.type == "meta" and out.shape == (1, 2, 3, 4)
    assert stats.qkv_calls == 0 and stats.torch_calls == 1
    assert stats.torch_reasons == {"not a CPU tensor": 1}
    assert "not a CPU tensor" in capsys.readouterr().out  # verbose: never silently


def test_use_qkv_unsupported_dtype_raises_a_clear_error():
    """An int call is not qkv's: with torch's function to fall back on, torch raises its
    RuntimeError; without one (torch 1.13) it must still be a clear error, not a call of None."""
    q, k, v = _qkv_inputs(dtype=torch.int32)
    with qt.use_qkv() as stats:
        with pytest.raises((ValueError, RuntimeError)) as info:
            F.scaled_dot_product_attention(q, k, v)
    assert "NoneType" not in str(info.value)
    assert stats.qkv_calls == 0


# ---------------------------------------------------------------------------
# Threads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_bitwise_equal_for_1_and_2_threads(dtype):
    g = gen(10)
    q = randn((2, 4, 96, 32), dtype, g)
    k = randn((2, 2, 130, 32), dtype, g)
    v = randn((2, 2, 130, 32), dtype, g)
    m = float_mask((2, 1, 96, 130), dtype, g)
    dout = torch.randn(2, 4, 96, 32, generator=g).to(dtype)
    saved = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert torch.get_num_threads() == threads
            leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, m)]
            o1 = qt.scaled_dot_product_attention(*leaves[:3], attn_mask=leaves[3], enable_gqa=True)
            o2 = qt.scaled_dot_product_attention(*leaves[:3], is_causal=True, enable_gqa=True)
            grads = torch.autograd.grad((o1, o2), leaves, (dout, dout))
            results.append([o1.detach(), o2.detach(), *grads])
    finally:
        torch.set_num_threads(saved)
    for n, a, b in zip(("out", "out causal", "dq", "dk", "dv", "dmask"), *results):
        assert torch.equal(a, b), f"{n}: differs between 1 and 2 threads"
