"""Checks shared by the ``load_state_dict`` methods of :mod:`fastconv.nn` and
:mod:`fastconv.optim`.

Each function checks one part of a state dict and returns it converted (a new C-contiguous
array of the target's dtype, or a Python number), or raises a ``ValueError`` or
``TypeError`` that names the key, what it received and the rule it breaks.  The
``load_state_dict`` methods run every check before they change anything.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def label(key, prefix: str | None) -> str:
    """How messages name ``key``: ``state_dict['0.weight']``, or ``model/0.weight`` with
    ``prefix='model/'`` (the key's name in a checkpoint file)."""
    return f"state_dict[{key!r}]" if prefix is None else f"{prefix}{key}"


def check_keys(state, required, optional=(), *, owner: str, prefix: str | None = None):
    """``state`` must be a mapping holding every key of ``required`` and nothing but those
    and ``optional`` ones."""
    if not isinstance(state, Mapping):
        raise TypeError(f"a state_dict must be a mapping of names to arrays, got "
                        f"{type(state).__name__}")
    required, optional = set(required), set(optional)
    missing = sorted(required - set(state))
    unexpected = sorted(set(state) - required - optional, key=str)
    if missing or unexpected:
        if prefix is not None:
            missing = [prefix + k for k in missing]
            unexpected = [prefix + str(k) for k in unexpected]
        raise ValueError(f"state_dict does not match {owner}: missing keys {missing}, "
                         f"unexpected keys {unexpected}")


def real_array(key, value, prefix: str | None = None) -> np.ndarray:
    """``value`` as an array of real numbers (integer or floating point; not bool)."""
    try:
        a = np.asarray(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{label(key, prefix)} is not an array ({e})") from None
    if a.dtype.kind not in "iuf":
        raise TypeError(f"{label(key, prefix)} has dtype {a.dtype}: expected real numbers "
                        "(an integer or floating-point dtype)")
    return a


def array_like(key, value, target: np.ndarray, owner: str, *, rule: str | None = None,
               prefix: str | None = None) -> np.ndarray:
    """``value`` as a new C-contiguous array of ``target``'s shape and dtype.

    Parameters
    ----------
    key, value
        The entry to check.
    target : ndarray
        The array it will be loaded into (its parameter).
    owner : str
        What ``target`` is, for messages ("the model's parameter").
    rule : {None, 'finite', 'nonnegative'}
        What the values must be besides representable: any, finite, or >= 0 (NaN is not;
        +inf is).
    prefix : str, optional
        See :func:`label`.

    Raises
    ------
    TypeError
        Not an array of real numbers, or a dtype that does not cast to ``target``'s with
        ``casting='same_kind'``.
    ValueError
        Another shape (there is no broadcasting), values beyond the range of ``target``'s
        dtype, or values that break ``rule``.
    """
    name = label(key, prefix)
    a = real_array(key, value, prefix)
    if not np.can_cast(a.dtype, target.dtype, "same_kind"):
        raise TypeError(f"{name} has dtype {a.dtype}, which does not cast to {owner}'s "
                        f"{target.dtype} (casting='same_kind')")
    if a.shape != target.shape:
        raise ValueError(f"{name} has shape {a.shape}, {owner} has {target.shape}")
    with np.errstate(over="ignore"):
        out = np.array(a, dtype=target.dtype, order="C", copy=True)
    if out.dtype.kind == "f" and not np.array_equal(np.isfinite(a), np.isfinite(out)):
        raise ValueError(f"{name} has values beyond the range of {target.dtype}")
    if rule == "finite" and not np.isfinite(out).all():
        raise ValueError(f"{name} has non-finite values (inf or NaN); they must be finite")
    if rule == "nonnegative" and not (out >= 0).all():
        raise ValueError(f"{name} has negative or NaN values; they must be >= 0")
    return out


def _scalar(key, value, what: str, prefix: str | None) -> tuple[str, np.ndarray]:
    """How messages name ``key``, and ``value`` as a 0-d array of real numbers (not a
    bool); ``what`` it must be, for messages ("an integer", "a number")."""
    name = label(key, prefix)
    if isinstance(value, bool):
        raise TypeError(f"{name} is a bool; it must be {what}")
    a = real_array(key, value, prefix)
    if a.shape != ():
        raise ValueError(f"{name} has shape {a.shape}; it must be a scalar (shape ())")
    return name, a


def integer(key, value, *, minimum: int = 0, prefix: str | None = None) -> int:
    """A scalar (shape ``()``) of an integer dtype, ``>= minimum``, as an ``int``."""
    name, a = _scalar(key, value, "an integer", prefix)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} has dtype {a.dtype}; it must be an integer")
    if int(a) < minimum:
        raise ValueError(f"{name} is {int(a)}; it must be >= {minimum}")
    return int(a)


def nonnegative_number(key, value, *, prefix: str | None = None) -> float:
    """A finite real scalar (shape ``()``) ``>= 0``, as a ``float``."""
    name, a = _scalar(key, value, "a number", prefix)
    x = float(a)
    if not (np.isfinite(x) and x >= 0):
        raise ValueError(f"{name} is {x}; it must be a finite number >= 0")
    return x
