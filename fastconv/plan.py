"""Convolution plans: choose once, run many (as FFTW's plans and oneDNN's primitives).

A plan is made from what fixes the work: the input and weight shapes, stride, padding,
dilation, groups and the dtype.  Making it validates them once, computes the geometry once
and chooses, for each pass, the first algorithm of :data:`fastconv.algorithms.ALGORITHMS`
that supports it.  Running it checks only that the arrays are the plan's (shape and dtype)
and calls the algorithm.

>>> import numpy as np, fastconv as fc
>>> plan = fc.conv2d_plan((8, 32, 14, 14), (64, 32, 5, 5), padding=2)
>>> plan.algorithms["forward"]
'winograd-f2x2-5x5'

The functional API (:func:`fastconv.conv2d` and its gradients) gets its plans from a cache
of the last ``config.PLAN_CACHE_SIZE`` argument sets, whose prepared weights are kept up to
``config.PLAN_CACHE_WEIGHT_BYTES`` in all (calls with unchanged weights, an inference
loop, prepare them once), and the training path asks the plan of its geometry
(:func:`plan_for`, keeping no weights: a layer's change every step) which algorithm to
run, so both choose alike.
"""

from __future__ import annotations

import collections
from typing import NamedTuple

import numpy as np

from . import algorithms, config
from ._args import _shape4
from .geometry import ConvGeometry, conv_geometry

__all__ = ["ConvPlan", "clear_plan_cache", "conv2d_plan", "plan_cache_info"]


class ConvPlan:
    """The plan of one convolution: its geometry, dtype and an algorithm per pass.

    Make it with :func:`conv2d_plan`.  Its arrays are NCHW: ``x`` (N, C, H, W), ``w``
    (K, C/groups, R, S), ``b`` (K,), ``dy`` (N, K, OH, OW), all of the plan's dtype (any
    strides); other shapes or dtypes are refused with a ValueError or TypeError.

    Attributes
    ----------
    geometry : ConvGeometry
        Every size (:func:`fastconv.conv_geometry`).
    dtype : numpy.dtype
        float32 or float64.
    algorithms : dict
        The name of the algorithm of each pass, ``'forward'``, ``'grad_input'`` and
        ``'grad_weight'``.
    """

    def __init__(self, geo: ConvGeometry, dtype, algorithm=None, *, keep_weights=True):
        self.geometry = geo
        self.dtype = np.dtype(dtype)
        # (algorithm name, pass) -> (a copy of the weights, their prepared form); see
        # _weights.  The training path's plans keep none (keep_weights=False); the
        # functional API's share a byte budget (_budget, a _KeptWeights).
        self._kept = {} if keep_weights else None
        self._budget = None
        self._run_order = {p: _order(geo, self.dtype, p, _forced(algorithm, p))
                           for p in algorithms.PASSES}
        self.algorithms = {p: order[0].NAME for p, order in self._run_order.items()}

    def __repr__(self) -> str:
        g = self.geometry
        return (f"ConvPlan(input {(g.N, g.C, g.H, g.W)}, weight {(g.K, g.Cg, g.R, g.S)}, "
                f"{self.dtype}, {self.algorithms})")

    # ---- running ------------------------------------------------------------------------

    def forward(self, x, w, b=None, *, out=None) -> np.ndarray:
        """``y`` (N, K, OH, OW) of :func:`fastconv.conv2d`, written into ``out`` if given (a
        C-contiguous, writeable array of that shape and the plan's dtype)."""
        g = self.geometry
        x = self._array("input", x, (g.N, g.C, g.H, g.W))
        w = self._array("weight", w, (g.K, g.Cg, g.R, g.S))
        if b is not None:
            b = self._array("bias", b, (g.K,))
        return self._finish(self._run("forward", x, w, b), out, (g.N, g.K, g.OH, g.OW))

    def grad_input(self, dy, w, *, out=None) -> np.ndarray:
        """``dx`` (N, C, H, W) of :func:`fastconv.conv2d_grad_input`, into ``out`` if
        given."""
        g = self.geometry
        dy = self._array("grad_output", dy, (g.N, g.K, g.OH, g.OW))
        w = self._array("weight", w, (g.K, g.Cg, g.R, g.S))
        return self._finish(self._run("grad_input", dy, w), out, (g.N, g.C, g.H, g.W))

    def grad_weight(self, x, dy, *, out=None) -> np.ndarray:
        """``dw`` (K, C/groups, R, S) of :func:`fastconv.conv2d_grad_weight`, into ``out``
        if given."""
        g = self.geometry
        x = self._array("input", x, (g.N, g.C, g.H, g.W))
        dy = self._array("grad_output", dy, (g.N, g.K, g.OH, g.OW))
        return self._finish(self._run("grad_weight", x, dy), out, (g.K, g.Cg, g.R, g.S))

    def grad_bias(self, dy) -> np.ndarray:
        """``db`` (K,) of :func:`fastconv.conv2d_grad_bias`."""
        g = self.geometry
        from .conv import conv2d_grad_bias

        return conv2d_grad_bias(self._array("grad_output", dy, (g.N, g.K, g.OH, g.OW)))

    def _run(self, pass_: str, *arrays) -> np.ndarray:
        """``pass_`` by the plan's algorithm, or by the next one where it hands over (an
        inf or NaN in Winograd's result); zeros for an empty batch.  ``arrays`` are the
        pass's NCHW arrays, ``(x, w, b)``, ``(dy, w)`` or ``(x, dy)``."""
        g = self.geometry
        if g.N == 0:
            shape = {"forward": (0, g.K, g.OH, g.OW), "grad_input": (0, g.C, g.H, g.W),
                     "grad_weight": (g.K, g.Cg, g.R, g.S)}[pass_]
            return np.zeros(shape, self.dtype)
        return self._first(pass_, pass_, arrays, {})

    def _run_packed(self, pass_: str, *arrays, **options) -> np.ndarray:
        """``pass_`` on the training path's layouts, as :meth:`_run`, by the first
        algorithm of the run order that reads them (``packed_forward(geo, xp, w, b, ws,
        pool_order)``, ``packed_grad_input(geo, dyp, layout, w)``,
        ``packed_grad_weight(geo, xp, dyp, layout, ws)``): Winograd or the channel tile."""
        return self._first(pass_, "packed_" + pass_, arrays, options)

    def _first(self, pass_: str, entry: str, arrays: tuple, options: dict) -> np.ndarray:
        """The first result that is not None of the run order's algorithms that have
        ``entry``, each given ``arrays`` with its own form of the weights."""
        for algorithm in self._run_order[pass_]:
            run = getattr(algorithm, entry, None)
            if run is not None:
                result = run(self.geometry, *self._with_weights(algorithm, pass_, arrays),
                             **options)
                if result is not None:
                    return result
        raise AssertionError("the channel tile, last in every run order, returned None")

    def _with_weights(self, algorithm, pass_: str, arrays: tuple) -> tuple:
        """``arrays`` with the weights (the forward pass's second array, dX's last)
        replaced by their form for ``algorithm`` (:meth:`_weights`)."""
        if pass_ == "grad_weight":
            return arrays
        i = 1 if pass_ == "forward" else len(arrays) - 1
        return (*arrays[:i], self._weights(algorithm, pass_, arrays[i]), *arrays[i + 1:])

    def _weights(self, algorithm, pass_: str, w: np.ndarray):
        """``w`` as ``algorithm`` runs ``pass_`` with it: ``algorithm.prepare(geo, w,
        pass_)`` (blocked, or Winograd-transformed), or ``w`` itself for an algorithm that
        reads the weights as they are.

        A plan made by :func:`conv2d_plan` keeps the last prepared weights of each
        algorithm and pass with a copy of the weights they came from, and prepares again
        only when the weights differ from it, bit for bit: an inference loop prepares once,
        a training step (whose weights change) each time.  The copy costs a read of the
        weights a call (about 7 us for 200 KB) against a preparation of 20-65 us.
        """
        prepare = getattr(algorithm, "prepare", None)
        if prepare is None:
            return w
        if self._kept is None:
            return prepare(self.geometry, w, pass_)
        key = (algorithm.NAME, pass_)
        kept = self._kept.get(key)
        if kept is not None and _same_bits(kept[0], w):
            if self._budget is not None:
                self._budget.used(self, key)
            return kept[1]
        prepared = prepare(self.geometry, w, pass_)
        self._kept[key] = (w.copy(), prepared)
        if self._budget is not None:
            self._budget.add(self, key, w.nbytes + _nbytes(prepared))
        return prepared

    def _array(self, name: str, a, shape) -> np.ndarray:
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{name} must be a NumPy array of dtype {self.dtype}, got "
                            f"{type(a).__name__}")
        if a.dtype != self.dtype:
            raise TypeError(f"{name} has dtype {a.dtype}; this plan computes in {self.dtype} "
                            "(native byte order): convert it, or make a plan for its dtype")
        if a.shape != shape:
            raise ValueError(f"{name} has shape {a.shape}; this plan's is {shape}")
        return a

    def _finish(self, result: np.ndarray, out, shape) -> np.ndarray:
        if out is None:
            return result
        from . import _checks

        _checks.array("out", out, shape, self.dtype, writeable=True)
        np.copyto(out, result)
        return out


def _nbytes(prepared) -> int:
    """The bytes of an algorithm's prepared weights: an array, or a tuple of them (and of
    other values)."""
    if isinstance(prepared, np.ndarray):
        return prepared.nbytes
    if isinstance(prepared, tuple):
        return sum(_nbytes(p) for p in prepared)
    return 0


class _KeptWeights:
    """The prepared weights the functional API's cached plans keep, least recently used
    dropped once they pass ``config.PLAN_CACHE_WEIGHT_BYTES`` in all (a copy of the
    weights and their prepared form per plan and pass)."""

    def __init__(self):
        self._lru: collections.OrderedDict = collections.OrderedDict()
        self.nbytes = 0

    def used(self, plan: ConvPlan, key) -> None:
        self._lru.move_to_end((id(plan), key))

    def add(self, plan: ConvPlan, key, nbytes: int) -> None:
        entry = (id(plan), key)
        if entry in self._lru:
            self.nbytes -= self._lru.pop(entry)[1]
        self._lru[entry] = (plan, nbytes)
        self.nbytes += nbytes
        while self.nbytes > config.PLAN_CACHE_WEIGHT_BYTES and self._lru:
            (_, old_key), (old_plan, n) = self._lru.popitem(last=False)
            old_plan._kept.pop(old_key, None)
            self.nbytes -= n

    def drop(self, plan: ConvPlan) -> None:
        """Forget what ``plan`` keeps (it left the plan cache)."""
        for key in list(plan._kept or ()):
            self.nbytes -= self._lru.pop((id(plan), key))[1]
        if plan._kept:
            plan._kept.clear()

    def clear(self) -> None:
        self._lru.clear()
        self.nbytes = 0


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two float arrays of one shape and dtype hold the same bits (a NaN equals
    itself, 0.0 differs from -0.0)."""
    u = np.dtype(f"u{a.itemsize}")
    return np.array_equal(a.view(u), b.view(u))


def _forced(algorithm, pass_: str):
    """The algorithm ``algorithm=`` forces on ``pass_``: a name for every pass, or a dict
    of names by pass (passes it leaves out choose as usual)."""
    if algorithm is None:
        return None
    if isinstance(algorithm, dict):
        unknown = set(algorithm) - set(algorithms.PASSES)
        if unknown:
            raise ValueError(f"algorithm keys must be passes {list(algorithms.PASSES)}, got "
                             f"{sorted(map(str, unknown))}")
        algorithm = algorithm.get(pass_)
        if algorithm is None:
            return None
    if not isinstance(algorithm, str):
        raise TypeError(f"algorithm must be a name, a dict of names by pass, or None; got "
                        f"{algorithm!r}")
    if algorithm not in algorithms.BY_NAME:
        raise ValueError(f"unknown algorithm {algorithm!r}; the algorithms are "
                         f"{list(algorithms.BY_NAME)}")
    return algorithms.BY_NAME[algorithm]


def _order(geo, dtype, pass_: str, forced) -> list:
    """The algorithms that run ``pass_``, in order: the chosen one, then its fallbacks."""
    if forced is None:
        return algorithms.choices(geo, dtype, pass_)
    supported = algorithms.supporting(geo, dtype, pass_)
    reason = algorithms.why_not(forced, geo, dtype, pass_)
    if reason is not None:
        raise ValueError(f"algorithm {forced.NAME!r} cannot run the {pass_} pass of this "
                         f"convolution: {reason} (geometry {geo})")
    return [forced, *(a for a in supported[supported.index(forced) + 1:])]


# ---- making plans ----------------------------------------------------------------------


def _plan_dtype(dtype) -> np.dtype:
    try:
        d = np.dtype(dtype)
    except TypeError:
        d = None
    if dtype is None or d is None or d not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"dtype must be float32 or float64 (the dtypes the kernels compute "
                        f"in), got {dtype!r}")
    return d


def conv2d_plan(input_shape, weight_shape, stride=1, padding=0, dilation=1, groups=1,
                dtype=np.float32, *, algorithm=None, keep_weights=True) -> ConvPlan:
    """A plan for many convolutions of one geometry.

    Parameters
    ----------
    input_shape : (N, C, H, W)
    weight_shape : (K, C/groups, R, S)
    stride, padding, dilation, groups
        As for :func:`fastconv.conv2d`.
    dtype : float32 or float64
        What the plan computes in; its arrays must have it.
    algorithm : str or dict, optional
        Force an algorithm (a name from ``fastconv.algorithms.BY_NAME``) on every pass, or
        per pass (``{'grad_weight': 'direct-channel-tile'}``), for testing and
        benchmarking.  A forced algorithm that does not support the geometry is a
        ValueError that says why.
    keep_weights : bool, default True
        Keep the weights as the algorithms run them (blocked, or Winograd-transformed)
        between calls, with a copy of the weights to tell when they change: calls with the
        same weights (an inference loop) prepare them once.  It costs the prepared weights
        and a copy of the weights in memory, and a comparison per call; turn it off for
        weights that change on every call.

    Returns
    -------
    ConvPlan
    """
    geo = conv_geometry(_shape4("input_shape", input_shape),
                           _shape4("weight_shape", weight_shape), stride, padding,
                           dilation, groups)
    return ConvPlan(geo, _plan_dtype(dtype), algorithm, keep_weights=bool(keep_weights))


class PlanCacheInfo(NamedTuple):
    hits: int
    misses: int
    size: int
    maxsize: int


_cache: collections.OrderedDict = collections.OrderedDict()
_stats = [0, 0]  # hits, misses
_kept_weights = _KeptWeights()


def _freeze(value):
    """A hashable key for an argument that keeps its type (``1``, ``1.0`` and ``True``
    are different arguments: only one of them is valid), or None if it has none."""
    if isinstance(value, (tuple, list)):
        parts = tuple(_freeze(v) for v in value)
        return None if None in parts else (type(value), parts)
    try:
        hash(value)
    except TypeError:
        return None
    return (type(value), value)


def cached(input_shape, weight_shape, stride, padding, dilation, groups, dtype) -> ConvPlan:
    """The plan of these arguments from the cache, made (and validated) on a miss.  The
    Winograd switch is part of the key: turning it off makes new plans."""
    args = (stride, padding, dilation, groups)
    if all(type(a) is int or type(a) is str for a in args):  # the common case, fast
        key = (input_shape, weight_shape, *args, dtype, config.get_winograd())
    else:  # keys of other types hold (type, value) pairs: they never equal the ones above
        key = (tuple(input_shape), tuple(weight_shape), *map(_freeze, args), dtype,
               config.get_winograd())
        if None in key[2:6]:
            return conv2d_plan(input_shape, weight_shape, stride, padding, dilation, groups,
                               dtype, keep_weights=False)
    plan = _recall(key)
    if plan is not None:
        _stats[0] += 1
        return plan
    _stats[1] += 1
    made = conv2d_plan(input_shape, weight_shape, stride, padding, dilation, groups, dtype)
    made._budget = _kept_weights
    return _keep(key, made)


def plan_for(geo: ConvGeometry, dtype) -> ConvPlan:
    """The plan of a validated geometry (the training path's), from the same cache."""
    key = (geo, np.dtype(dtype).str, config.get_winograd())
    plan = _recall(key)
    return plan if plan is not None else _keep(key, ConvPlan(geo, dtype, keep_weights=False))


class HeldPlan:
    """The plan a layer holds for its evaluation calls: one :class:`ConvPlan` that keeps
    its prepared weights (an inference loop prepares them once), made again when the
    geometry, dtype or Winograd switch of a call differs from its own."""

    def __init__(self):
        self._key, self._plan = None, None

    def get(self, geo: ConvGeometry, dtype) -> ConvPlan:
        """The plan of a validated geometry in ``dtype``."""
        key = (geo, np.dtype(dtype), config.get_winograd())
        if key != self._key:
            self._key, self._plan = key, ConvPlan(geo, dtype)
        return self._plan


def _recall(key) -> ConvPlan | None:
    """The cached plan of ``key``, now the most recently used, or None."""
    plan = _cache.get(key)
    if plan is not None:
        _cache.move_to_end(key)
    return plan


def _keep(key, plan: ConvPlan) -> ConvPlan:
    """``plan``, cached under ``key``; the least recently used dropped past the bound."""
    _cache[key] = plan
    while len(_cache) > config.PLAN_CACHE_SIZE:
        _, dropped = _cache.popitem(last=False)
        if dropped._budget is not None:
            dropped._budget.drop(dropped)
    return plan


def clear_plan_cache() -> None:
    """Forget every cached plan (after changing :mod:`fastconv.config`)."""
    _cache.clear()
    _kept_weights.clear()
    _stats[:] = [0, 0]


def plan_cache_info() -> PlanCacheInfo:
    """Hits and misses of the functional API's plan cache, its size and its bound."""
    return PlanCacheInfo(_stats[0], _stats[1], len(_cache), config.PLAN_CACHE_SIZE)
