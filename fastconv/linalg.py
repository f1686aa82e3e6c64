"""Matrix products for the Linear layers: a Numba kernel for float32, NumPy otherwise."""

from __future__ import annotations

import numpy as np

from . import kernels as _k
from ._args import _as_array, _result_dtype

__all__ = ["matmul"]


def matmul(a, b, out: np.ndarray | None = None) -> np.ndarray:
    """``a @ b`` for 2-D arrays, as a new C-contiguous array or into ``out``.

    Parameters
    ----------
    a : array (M, Q)
    b : array (Q, Nc)
    out : ndarray (M, Nc), optional
        Where to write the product (then returned): C-contiguous, writeable, of the result
        dtype, sharing no memory with ``a`` or ``b``.  :class:`fastconv.dist.GradientSync`
        has the Linear layers write their weight gradients straight into its buffer so.

    Returns
    -------
    ndarray (M, Nc)
        In the result dtype of :func:`fastconv.conv2d`: float32 if both operands are
        float16/float32, else float64 (integer and bool operands are computed as float64;
        big-endian ones are read as native).

    float32 products run on :func:`fastconv.kernels.matmul_tiles` over each full block of
    ``MC = 64`` columns, on Numba's threads; the columns past the last full block, and other
    dtypes, on NumPy.  Why not NumPy for all: its OpenBLAS picks its AVX2 kernel on this
    AVX-512 machine, about 100 GF/s on one core, and two BLAS threads fight Numba's for the
    cores (see docs/performance.md); the kernel reaches about 250 GF/s on two cores for the
    MNIST network's 3136 -> 128 layer.
    """
    a, b = _as_array("a", a), _as_array("b", b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"matmul needs arrays a, b of shapes (M, Q) and (Q, N), got "
                         f"a.shape = {a.shape} and b.shape = {b.shape}")
    dtype = _result_dtype(a, b)
    if out is not None:
        _check_out(out, (a.shape[0], b.shape[1]), dtype, a, b)
    a, b = a.astype(dtype, copy=False), b.astype(dtype, copy=False)
    if dtype != np.float32 or b.shape[1] < _k.MC:
        if out is None:
            return np.ascontiguousarray(a @ b)
        return np.matmul(a, b, out=out)
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    c = np.empty((a.shape[0], b.shape[1]), np.float32) if out is None else out
    _k.matmul_tiles(a, b, c)
    full = b.shape[1] // _k.MC * _k.MC
    if full < b.shape[1]:
        c[:, full:] = a @ b[:, full:]
    return c


def _check_out(out, shape, dtype, a, b) -> None:
    """``out`` can take the product ``a @ b`` of ``shape`` and ``dtype``, or a clear error."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a NumPy array, got {type(out).__name__}")
    if out.shape != shape or out.dtype != dtype:
        raise ValueError(f"out must have the product's shape {shape} and dtype {dtype}, got "
                         f"shape {out.shape} and dtype {out.dtype}")
    if not (out.flags.c_contiguous and out.flags.writeable):
        raise ValueError("out must be C-contiguous and writeable")
    if np.may_share_memory(out, a) or np.may_share_memory(out, b):
        raise ValueError("out must not share memory with a or b")
