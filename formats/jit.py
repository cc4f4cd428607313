"""The one place that sets numba's compiler flags. Every kernel in the project is `@kernel`.

- cache=True: compiled machine code is kept in __pycache__, so only the first run after a fresh
  clone (or an edit) pays the compile time.
- nogil=True: kernels can run on worker threads next to I/O.
- fastmath=False: bit-exactness with ggml needs IEEE float32 semantics: no reassociation, no
  FMA contraction, no "NaN cannot happen" assumptions.
- error_model="numpy": a float division by zero gives inf/nan instead of raising, as in C.
"""
from __future__ import annotations

import functools

import numba

kernel = functools.partial(numba.njit, cache=True, nogil=True, fastmath=False,
                           error_model="numpy")
