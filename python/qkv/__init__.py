"""qkv: exact, fast attention on NumPy arrays and CPU torch tensors.

The functions are the C++ library's own, called without copies and with the
GIL released (but for calls of a few microseconds):

- :func:`attention` / :func:`attention_backward`: scaled dot-product attention
  and its gradients, every mask kind, GQA/MQA, float32/float16/float64;
- :class:`KvCache` and :func:`decode`: KV caches (contiguous, sliding, sinks,
  paged; float32/float16/bfloat16/int8) and flash-decoding against them;
- :func:`merge_partials`: log-sum-exp merge of partial results;
- :func:`memory_plan`: the memory planner of ``qkv memory``.

``qkv.torch`` (imported on demand, needs torch) holds the drop-in
``scaled_dot_product_attention`` with autograd. Every library error is a
``ValueError`` with the library's one-line message. See docs/python.md.
"""

from ._qkv import (
    KvCache,
    __version__,
    attention,
    attention_backward,
    build_info,
    decode,
    memory_plan,
    merge_partials,
)

__all__ = [
    "KvCache",
    "__version__",
    "attention",
    "attention_backward",
    "build_info",
    "decode",
    "memory_plan",
    "merge_partials",
]
