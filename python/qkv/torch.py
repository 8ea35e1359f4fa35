"""qkv.torch: qkv's attention inside PyTorch, forward and backward.

- :func:`scaled_dot_product_attention` has the signature and semantics of
  ``torch.nn.functional.scaled_dot_product_attention`` (``is_causal`` is
  top-left, a bool mask is True = attend, a float mask is added, masks
  broadcast, ``enable_gqa`` lets query heads share key/value heads) and is a
  ``torch.autograd.Function`` whose backward is qkv's.
- :func:`use_qkv` routes ``torch.nn.functional.scaled_dot_product_attention``
  to qkv inside a ``with`` block, so that an unmodified model runs on qkv.

Dtypes: float32 and float16 run qkv's flash kernels (float16 read and written
as float16, computed in float32); float64 runs the float64 reference kernel
(so ``torch.autograd.gradcheck`` works); bfloat16 tensors are widened to a
float32 copy, computed as float32 and rounded back (qkv's attention kernels
read float16 and float32, not bfloat16: the copy is the only extra cost).

Differences from PyTorch, on purpose: ``dropout_p != 0`` is a ``ValueError``
(qkv has no dropout; it is never silently ignored); a query row whose every
key is masked out gives zeros, never NaN. Threads: ``torch.get_num_threads()``;
results are bitwise identical for any count.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F

from . import _qkv

__all__ = ["scaled_dot_product_attention", "use_qkv", "RouteStats"]

_QKV_DTYPES = (torch.float32, torch.float16, torch.float64)


def _check_dropout(dropout_p: float) -> None:
    if dropout_p != 0.0:
        raise ValueError(
            f"dropout_p: {dropout_p} (expected 0.0: qkv has no attention dropout; "
            "call the model in eval mode or set its attention dropout to 0)"
        )


def _as_4d(t: torch.Tensor, name: str) -> torch.Tensor:
    """(N, ..., H, L, E) -> [batch, heads, seq, dim] without copying when possible."""
    if t.dim() < 2:
        raise ValueError(f"{name}: {t.dim()}-D tensor (expected at least 2-D (..., L, E))")
    if t.dim() == 2:
        return t.unsqueeze(0).unsqueeze(0)
    if t.dim() == 3:
        return t.unsqueeze(1)
    if t.dim() == 4:
        return t
    return t.reshape(-1, *t.shape[-3:])


def _strided_broadcast(mask: torch.Tensor) -> bool:
    """True when the mask has a dim of size > 1 with stride 0 (an expand)."""
    return any(st == 0 and sz > 1 for st, sz in zip(mask.stride(), mask.shape))


class _QkvAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: Optional[torch.Tensor], causal: Optional[str], scale: Optional[float],
                threads: int) -> torch.Tensor:
        out, lse = _qkv.attention(q, k, v, causal=causal, mask=mask, scale=scale,
                                  threads=threads, return_lse=True)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.causal, ctx.scale, ctx.threads = causal, scale, threads
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor):  # type: ignore[override]
        q, k, v, out, lse, mask = ctx.saved_tensors
        want_dmask = mask is not None and ctx.needs_input_grad[3]
        grads = _qkv.attention_backward(q, k, v, out, dout, lse, causal=ctx.causal, mask=mask,
                                        scale=ctx.scale, threads=ctx.threads,
                                        return_dmask=want_dmask)
        dmask = grads[3] if want_dmask else None
        return grads[0], grads[1], grads[2], dmask, None, None, None


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` computed by qkv.

    query (N, ..., Hq, L, E), key (N, ..., Hkv, S, E), value (N, ..., Hkv, S, Ev) CPU
    tensors; Hq == Hkv unless ``enable_gqa`` (then Hq a multiple of Hkv). Returns
    (N, ..., Hq, L, Ev) in query's dtype; differentiable in query, key, value and a
    float ``attn_mask``. Raises ValueError (qkv's one-line message) on bad input.
    """
    _check_dropout(dropout_p)
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: {type(t).__name__} (expected a torch.Tensor)")
        if t.device.type != "cpu":
            raise ValueError(f"{name}: tensor on {t.device} (expected a CPU tensor)")
    if attn_mask is not None and is_causal:
        raise ValueError("attn_mask: given with is_causal=True (expected one of them, as torch)")
    if query.dim() != key.dim() or key.dim() != value.dim():
        raise ValueError(f"query, key, value: {query.dim()}-D, {key.dim()}-D, {value.dim()}-D "
                         "(expected the same rank)")
    if query.dim() >= 3 and not enable_gqa and query.shape[-3] != key.shape[-3]:
        raise ValueError(f"key: {key.shape[-3]} heads for query's {query.shape[-3]} "
                         "(expected equal, or enable_gqa=True with a divisor)")
    out_dtype = query.dtype
    compute = torch.float32 if out_dtype == torch.bfloat16 else out_dtype
    if compute not in _QKV_DTYPES:
        raise ValueError(f"query: dtype {out_dtype} (expected float32, float16, bfloat16 or "
                         "float64)")

    def prep(t: torch.Tensor) -> torch.Tensor:
        return t if t.dtype == compute else t.to(compute)

    q4, k4, v4 = _as_4d(prep(query), "query"), _as_4d(prep(key), "key"), _as_4d(prep(value),
                                                                               "value")
    mask = attn_mask
    if mask is not None:
        if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
            raise ValueError(f"attn_mask: dtype {mask.dtype} (expected bool, True = attend, or a "
                             "float mask added to the scores, as torch)")
        if mask.dtype != torch.bool and mask.dtype not in _QKV_DTYPES:
            mask = mask.to(compute)
        if query.dim() != 4:
            # Broadcast to (N, ..., L, S) and fold the leading dims as q was.
            full = tuple(query.shape[:-1]) + (key.shape[-2],)
            mask = _as_4d(mask.expand(full), "attn_mask")
        if mask.requires_grad and _strided_broadcast(mask):
            # dmask sums over stride-0 dims; an expanded view needs its own
            # per-element gradient (autograd sums it back through expand).
            mask = mask.contiguous()
    causal = "top_left" if is_causal else None
    threads = torch.get_num_threads()
    needs_grad = torch.is_grad_enabled() and (
        q4.requires_grad or k4.requires_grad or v4.requires_grad
        or (mask is not None and mask.requires_grad))
    if needs_grad:
        out = _QkvAttention.apply(q4, k4, v4, mask, causal, scale, threads)
    else:
        out = _qkv.attention(q4, k4, v4, causal=causal, mask=mask, scale=scale, threads=threads)
    out = out.reshape(*query.shape[:-1], value.shape[-1])
    return out if out.dtype == out_dtype else out.to(out_dtype)


@dataclasses.dataclass
class RouteStats:
    """What :func:`use_qkv` routed: calls qkv computed, calls left to torch and why."""

    qkv_calls: int = 0
    torch_calls: int = 0
    torch_reasons: dict = dataclasses.field(default_factory=dict)

    def _passed(self, reason: str) -> None:
        self.torch_calls += 1
        self.torch_reasons[reason] = self.torch_reasons.get(reason, 0) + 1


@contextlib.contextmanager
def use_qkv(verbose: bool = False) -> Iterator[RouteStats]:
    """Route ``torch.nn.functional.scaled_dot_product_attention`` to qkv in this block.

    CPU tensors of float32/float16/bfloat16/float64 go to qkv; anything else (CUDA
    tensors, other dtypes) goes to torch's own function, counted in the yielded
    :class:`RouteStats` with the reason (and printed when ``verbose``): no call takes
    another path silently. ``dropout_p != 0`` raises ValueError, as in
    :func:`scaled_dot_product_attention`. Code that calls torch's fused kernels
    directly (``nn.MultiheadAttention``'s inference fast path) is not affected.
    """
    original = getattr(F, "scaled_dot_product_attention", None)
    stats = RouteStats()

    def routed(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False):
        tensors = [t for t in (query, key, value, attn_mask) if t is not None]
        reason = None
        if any(t.device.type != "cpu" for t in tensors):
            reason = "not a CPU tensor"
        elif query.dtype not in _QKV_DTYPES + (torch.bfloat16,):
            reason = f"dtype {query.dtype}"
        if reason is None:
            stats.qkv_calls += 1
            return scaled_dot_product_attention(query, key, value, attn_mask, dropout_p,
                                                is_causal, scale, enable_gqa)
        if original is None:
            raise ValueError(f"query: {reason} (expected CPU tensors of float32, float16, "
                             f"bfloat16 or float64; torch {torch.__version__} has no "
                             "scaled_dot_product_attention of its own to take the call)")
        stats._passed(reason)
        if verbose:
            print(f"qkv.torch.use_qkv: torch computes this call ({reason})")
        kwargs = {"scale": scale} if scale is not None else {}
        if enable_gqa:
            kwargs["enable_gqa"] = True
        return original(query, key, value, attn_mask, dropout_p, is_causal, **kwargs)

    F.scaled_dot_product_attention = routed
    try:
        yield stats
    finally:
        if original is None:
            del F.scaled_dot_product_attention
        else:
            F.scaled_dot_product_attention = original
