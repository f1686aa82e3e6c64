"""Checks on the arrays a wrapper hands to a kernel: the memory-safety rule.

Numba kernels index without bounds checks, and they take their loop bounds from the shapes
of some arguments and index others with them.  An array smaller than those bounds, or of
another layout than the kernel assumes, makes the kernel read or write past its end:
wrong numbers at best, a corrupted heap or a segmentation fault at worst.  Hence the rule
(docs/memory-safety.md): every array that reaches a kernel was either allocated by the
wrapper that passes it, with the shape the kernel's docstring states, or checked by it
with :func:`array` (shape, dtype in native byte order, C-contiguity).  Anything a caller
can hand in, state dicts and the training path's saved layouts included, is checked where
it enters; index arrays are ``int64`` (or checked against the sizes they index).
"""

from __future__ import annotations

import numpy as np

FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def array(name: str, a, shape, dtype, *, writeable: bool = False) -> np.ndarray:
    """``a`` itself, if it is a C-contiguous ndarray of exactly ``shape`` and ``dtype``
    (native byte order; a tuple of dtypes allows any of them), writeable if asked.

    Raises
    ------
    TypeError
        Not an ndarray, or another dtype.
    ValueError
        Another shape, not C-contiguous, or read-only where the kernel writes.
    """
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array, got {type(a).__name__}")
    allowed = tuple(np.dtype(d) for d in dtype) if isinstance(dtype, tuple) else (
        np.dtype(dtype),)
    if a.dtype not in allowed:
        want = " or ".join(str(d) for d in allowed)
        raise TypeError(f"{name} must have dtype {want} (native byte order), got {a.dtype}")
    if a.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous, got strides {a.strides}")
    if writeable and not a.flags.writeable:
        raise ValueError(f"{name} must be writeable: the kernel writes into it")
    return a


def instance(name: str, value, cls):
    """``value`` itself if it is a ``cls``, else TypeError naming ``name``."""
    if not isinstance(value, cls):
        raise TypeError(f"{name} must be a {cls.__name__}, got {type(value).__name__}")
    return value
