#!/usr/bin/env python3
"""Writes the safetensors fixture read by tests/safetensors_test.cc.

Run from any directory: python3 make_safetensors_fixtures.py (safetensors
0.8.0 from PyPI wrote the committed file). Only the reference serializer is
needed, not NumPy or PyTorch: data is packed with struct and handed over as
raw buffers. Values are exact in every dtype used, so the C++ test compares
them with ==.
"""
import ctypes
import os
import struct

import safetensors

OUT = os.path.dirname(os.path.abspath(__file__))


def bf16(values):
    """Packs floats that are exact in bfloat16 as its little-endian bits."""
    return b"".join(struct.pack("<f", v)[2:] for v in values)


TENSORS = {
    "f32_2x3": ("float32", [2, 3], struct.pack("<6f", -1, -0.5, 0, 0.5, 1, 1.5)),
    "f16_4": ("float16", [4], struct.pack("<4e", 1, -2, 0.5, 65504)),
    "bf16_2x2": ("bfloat16", [2, 2], bf16([1, -2, 0.5, 3])),
    "i64_3": ("int64", [3], struct.pack("<3q", -1, 0, 1 << 40)),
    "scalar": ("float32", [], struct.pack("<f", 7)),
    "empty_0x3": ("float32", [0, 3], b""),
    "u8_3": ("uint8", [3], bytes([1, 2, 255])),
}

buffers = {}  # keeps each buffer alive while serialize() reads it
specs = {}
for name, (dtype, shape, data) in TENSORS.items():
    buffers[name] = ctypes.create_string_buffer(data, max(len(data), 1))
    specs[name] = safetensors.TensorSpec(
        dtype=dtype, shape=shape, data_ptr=ctypes.addressof(buffers[name]), data_len=len(data))
blob = safetensors.serialize(specs, metadata={"format": "pt", "source": "qkv"})
with open(os.path.join(OUT, "python_mixed.safetensors"), "wb") as f:
    f.write(blob)
