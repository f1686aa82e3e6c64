"""Argument checks shared by every public function: ints, pairs, shapes, arrays and the
dtype rules (float16 -> float32, integers and bool -> float64, big-endian -> native).
Each raises a ``TypeError`` or ``ValueError`` that names the argument, what was received
and the rule it breaks."""

from __future__ import annotations

import math
import numbers

import numpy as np


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


_INT_MAX = 2**31 - 1  # kernel index arithmetic stays far from int64 overflow


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
        raise TypeError(f"{name} must be an int or a pair of ints (h, w), got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    if max(pair) > _INT_MAX:
        raise ValueError(f"{name} must be <= {_INT_MAX}, got {value!r}")
    return pair


def _int(name: str, value, minimum: int) -> int:
    """Validate a scalar int argument (not a bool) in ``[minimum, 2**31 - 1]``."""
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    if value > _INT_MAX:
        raise ValueError(f"{name} must be <= {_INT_MAX}, got {value!r}")
    return int(value)


def _real(name: str, value, minimum: float = 0.0, below: float | None = None) -> float:
    """Validate a finite real number (not a bool) ``>= minimum`` and, if given,
    ``< below``; returned as a float."""
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if below is not None and not minimum <= v < below:
        raise ValueError(f"{name} must lie in [{minimum:g}, {below:g}), got {value!r}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum:g}, got {value!r}")
    return v


def _bool(name: str, value) -> bool:
    """Validate a flag: ``True`` or ``False`` (NumPy's bools too), nothing truthy."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _shape4(name: str, shape) -> tuple[int, int, int, int]:
    """Validate a user-given 4-D shape such as ``input_shape`` or ``weight_shape``."""
    try:
        dims = tuple(shape)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of 4 ints, got {shape!r}") from None
    if len(dims) != 4 or not all(_is_int(d) for d in dims):
        raise ValueError(f"{name} must be 4 ints, got {dims!r}")
    if min(dims) < 0:
        raise ValueError(f"{name} must not have negative sizes, got {dims!r}")
    return tuple(int(d) for d in dims)


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


def _result_dtype(*arrays: np.ndarray | None) -> np.dtype:
    """float32 if every array is float16/float32; float64 if any is float64, int or bool."""
    for a in arrays:
        if a is not None and not (a.dtype.kind == "f" and a.dtype.itemsize <= 4):
            return np.dtype(np.float64)
    return np.dtype(np.float32)


def _check_rank(name: str, a: np.ndarray, layout: str) -> None:
    if a.ndim != 4:
        raise ValueError(f"{name} must be 4-D {layout}, got shape {a.shape} ({a.ndim}-D)")
