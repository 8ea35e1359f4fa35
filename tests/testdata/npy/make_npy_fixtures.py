#!/usr/bin/env python3
"""Writes the small .npy fixtures read by tests/npy_test.cc.

Run from any directory: python3 make_npy_fixtures.py (NumPy 1.24.2 wrote the
committed files). Values are exact in every dtype used, so the C++ test
compares them with ==.
"""
import os

import numpy as np

OUT = os.path.dirname(os.path.abspath(__file__))


def save(name, array, version=None):
    with open(os.path.join(OUT, name), "wb") as f:
        if version is None:
            np.save(f, array)  # version 1.0, as NumPy writes by default
        else:
            np.lib.format.write_array(f, array, version=version)


f32 = (np.arange(6, dtype="<f4") * 0.5 - 1.0).reshape(2, 3)
save("f32_2x3.npy", f32)  # [[-1, -0.5, 0], [0.5, 1, 1.5]]
save("f16_4.npy", np.array([1.0, -2.0, 0.5, 65504.0], dtype="<f2"))
save("bool_2x2.npy", np.array([[True, False], [False, True]]))
save("i64_3.npy", np.array([-1, 0, 1 << 40], dtype="<i8"))
save("i32_0d.npy", np.array(7, dtype="<i4"))
save("f32_0x3.npy", np.zeros((0, 3), dtype="<f4"))
save("f64_v2.npy", np.array([1.5, -2.25], dtype="<f8"), version=(2, 0))
save("f32_v3.npy", np.array([3.0, 4.0], dtype="<f4"), version=(3, 0))
# Refused by ReadNpy: Fortran order and big-endian data.
save("f32_fortran.npy", np.asfortranarray(f32))
save("f32_big_endian.npy", np.array([1.0, 2.0, 3.0], dtype=">f4"))
