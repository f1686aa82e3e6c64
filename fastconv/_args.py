"""Argument checks shared by every public function: ints, pairs, shapes, arrays and the
dtype rules (float16 -> float32, integers and bool -> float64, big-endian -> native).
Each raises a ``TypeError`` or ``ValueError`` that names the argument, what was received
and the rule it breaks."""

from __future__ import annotations

import math
import numbers
import os
import sys
import warnings

import numpy as np


def _is_int(v) -> bool:
    if type(v) is int:  # the common case, without the slower ABC check
        return True
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


_INT_MAX = 2**31 - 1  # kernel index arithmetic stays far from int64 overflow


def _describe(value) -> str:
    """``value`` for an error message: an array (NumPy's, or anything with a shape and a
    dtype, such as a torch tensor) by its type, shape and dtype, never its elements;
    anything else by its ``repr``, cut at 80 characters."""
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is not None and dtype is not None and len(shape) > 0:
        return f"{type(value).__name__} of shape {tuple(shape)} and dtype {dtype}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _pair(name: str, value, minimum: int) -> tuple[int, int]:
    """Normalise an int or an ``(h, w)`` pair of ints, each in ``[minimum, 2**31 - 1]``."""
    if _is_int(value):
        pair = (int(value), int(value))
    elif (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(_is_int(v) for v in value)
    ):
        pair = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints (h, w), got "
                        f"{_describe(value)}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {_describe(value)}")
    if max(pair) > _INT_MAX:
        raise ValueError(f"{name} must be <= {_INT_MAX}, got {_describe(value)}")
    return pair


def _int(name: str, value, minimum: int) -> int:
    """Validate a scalar int argument (not a bool) in ``[minimum, 2**31 - 1]``."""
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {_describe(value)}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {_describe(value)}")
    if value > _INT_MAX:
        raise ValueError(f"{name} must be <= {_INT_MAX}, got {_describe(value)}")
    return int(value)


def _real(name: str, value, minimum: float = 0.0, below: float | None = None) -> float:
    """Validate a finite real number (not a bool) ``>= minimum`` and, if given,
    ``< below``; returned as a float."""
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a real number, got {_describe(value)}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {_describe(value)}")
    if below is not None and not minimum <= v < below:
        raise ValueError(f"{name} must lie in [{minimum:g}, {below:g}), got {_describe(value)}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum:g}, got {_describe(value)}")
    return v


def _bool(name: str, value) -> bool:
    """Validate a flag: ``True`` or ``False`` (NumPy's bools too), nothing truthy."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {_describe(value)}")
    return bool(value)


def _shape(name: str, shape, n: int) -> tuple[int, ...]:
    """Validate a user-given shape of ``n`` sizes, such as ``input_shape`` or
    ``weight_shape``: a sequence of ints >= 0 (a tuple, a list, ``torch.Size``, a 1-D
    integer array).  An array of another rank is refused by its shape and dtype (it is
    what a call in another argument order hands in), never printed whole."""
    if type(shape) is tuple and len(shape) == n and all(
            type(d) is int and d >= 0 for d in shape):  # the common case, checked fast
        return shape
    if getattr(shape, "ndim", 1) != 1:
        raise TypeError(f"{name} must be a shape, a sequence of {n} ints, got "
                        f"{_describe(shape)}")
    try:
        dims = tuple(shape)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of {n} ints, got {_describe(shape)}"
                        ) from None
    if len(dims) != n or not all(_is_int(d) for d in dims):
        raise ValueError(f"{name} must be {n} ints, got {_shown(shape, dims)}")
    if min(dims, default=0) < 0:
        raise ValueError(f"{name} must not have negative sizes, got {_shown(shape, dims)}")
    return tuple(int(d) for d in dims)


def _shown(shape, dims: tuple) -> str:
    """How :func:`_shape`'s messages show a refused shape: an array by its shape and
    dtype, anything else as the tuple of its items."""
    return _describe(shape if hasattr(shape, "dtype") else dims)


def _shape4(name: str, shape) -> tuple[int, int, int, int]:
    """:func:`_shape` of 4 sizes: a 2-D convolution's or pool's shapes."""
    return _shape(name, shape, 4)


def _is_shape(value) -> bool:
    """Whether ``value`` is a shape as torch passes one: a tuple (``torch.Size`` is one) or
    list of ints."""
    return isinstance(value, (tuple, list)) and all(_is_int(v) for v in value)


def _check_order(function: str, ours: str, theirs: str, array_arg: str, array_value,
                 shape_arg: str, shape_value) -> None:
    """TypeError if a call of ``function`` (arguments ``ours``) passed a shape for
    ``array_arg`` and an array of two or more dimensions for ``shape_arg``: the argument
    order ``theirs`` of the torch function it mirrors.  The message says which argument
    got what, by shapes and dtypes."""
    if _is_shape(array_value) and getattr(shape_value, "ndim", 0) >= 2:
        raise TypeError(
            f"{function} takes ({ours}); it got the shape {_describe(tuple(array_value))} as "
            f"{array_arg} and {_describe(shape_value)} as {shape_arg}: the argument order of "
            f"{theirs}, where fastconv takes the shape last"
        )


def _as_array(name: str, value) -> np.ndarray:
    """``value`` as an ndarray of a supported kind (float, integer or bool)."""
    a = np.asarray(value)
    if a.dtype.kind not in "fiub" or (a.dtype.kind == "f" and a.dtype.itemsize > 8):
        raise TypeError(
            f"{name} must be a real numeric array (float16/32/64, integer or bool), "
            f"got dtype {a.dtype}"
        )
    return a


def _as_float(name: str, value) -> np.ndarray:
    """``value`` (:func:`_as_array`) in its result dtype (:func:`_result_dtype`), native
    byte order: the normalisation of every public function that takes one array (the
    others convert all their arrays to the result dtype of them all)."""
    a = _as_array(name, value)
    return a.astype(_result_dtype(a), copy=False)


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _caller_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn`` from the caller of this function that names
    the first frame outside fastconv: the user's line, however deep the call."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(
            _PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level


def _result_dtype(*arrays: np.ndarray | None) -> np.dtype:
    """float32 if every array is float16/float32; float64 if any is float64, int or bool.

    Where an integer or bool array is what makes the result float64 (no float64 array
    among them), a ``UserWarning`` says so, once per line of the caller's code (Python's
    default filter, as NumPy's warnings): torch refuses integer convolutions, and float64
    is the slower dtype (half the numbers per vector)."""
    promoted = None
    for a in arrays:
        if a is None or (a.dtype.kind == "f" and a.dtype.itemsize <= 4):
            continue
        if a.dtype.kind == "f":
            return np.dtype(np.float64)
        promoted = promoted or a.dtype
    if promoted is not None:
        warnings.warn(
            f"fastconv computes integer and bool arrays in float64 (got {promoted}); "
            "convert them to float32 or float64 to choose the dtype (torch refuses "
            "integer convolutions)", UserWarning, stacklevel=_caller_stacklevel())
        return np.dtype(np.float64)
    return np.dtype(np.float32)


def _check_bias(b: np.ndarray | None, size: int, name: str = "K") -> None:
    """ValueError unless the bias ``b`` is None or of shape ``(size,)``; ``name`` is what
    ``size`` counts (``K``, ``C_out``, ``out_features``)."""
    if b is not None and b.shape != (size,):
        raise ValueError(f"bias must have shape ({name},) = ({size},), got {b.shape}")


def _check_rank(name: str, a: np.ndarray, layout: str, ndim: int = 4) -> None:
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {a.shape} ({a.ndim}-D)")
