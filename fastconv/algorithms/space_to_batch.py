"""Dilated convolutions as undilated ones on the input's dilation phases, stacked in the
batch (``tf.nn.atrous_conv2d``'s space-to-batch), so that Winograd runs them.

Legend: ``x`` (N, C, H, W) input, ``w`` (K, C/G, R, S) weights, ``b`` (K,) bias, ``y``
(N, K, OH, OW) output, ``dy``, ``dx``, ``dw`` the gradients; dilations ``dlh, dlw``,
stride 1, pads ``pt, pb, pl, pr``.

Why an algorithm of its own
---------------------------
Winograd needs an undilated filter; a 3x3 layer with dilation 2 (DeepLab's) ran on the
direct channel tile at 0.80-0.97x PyTorch.  But with stride 1, an output pixel reads only
input pixels of its own dilation phase, so the layer is ``dlh*dlw`` undilated layers on
planes ``dlh x dlw`` times smaller, which the plan's list then runs as it would any
other: a 3x3 one on Winograd F(4x4, 3x3).

The math
--------
Write ``i = dlh*u + a`` (``0 <= a < dlh``) for an output row and take ``pt = dlh*pt'``.
Output row ``i`` reads, for filter row ``r``, input row ``i + dlh*r - pt = dlh*(u + r -
pt') + a``: row ``u + r - pt'`` of the input's row phase ``a``, the rows ``a, a + dlh,
...``.  The same holds along the width.  So with the phases stacked in the batch,
``xs[(n, a, b), c, u, v] = x[n, c, dlh*u + a, dlw*v + b]`` (:func:`phases_to_batch`), and
``ys`` the undilated convolution of ``xs`` with the same weights, pads ``pt/dlh, pb/dlh,
pl/dlw, pr/dlw`` and stride 1::

    y[n, k, dlh*u + a, dlw*v + b] = ys[(n, a, b), k, u, v]        (batch_to_phases)

Each phase has ``H/dlh`` rows (``H`` a multiple of ``dlh``), and ``OH/dlh = H/dlh + (pt +
pb)/dlh - (R - 1)`` output rows, the same for every phase, which is why the pads must be
multiples of the dilation.  The gradients follow by the chain rule through these two
permutations: ``dx = batch_to_phases(dX_s(phases_to_batch(dy)))`` and ``dw = dW_s(xs,
phases_to_batch(dy))``, the sum over the stacked batch adding up the phases.

The undilated passes run on the algorithm the plan's list gives their geometry
(:func:`_inner`); where that is not a Winograd algorithm, the two layout passes would cost
more than they save, and this one is passed over (:func:`slower`), as it is for a dW whose
input and deltas outgrow ``config.SPACE_TO_BATCH_DW_MAX_BYTES``.  Winograd hands a
result holding an inf or NaN back, and so does this algorithm, to the next one.  The
layout kernels run a task per plane and only move numbers.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import prange

from .. import config
from .._jit import copy_run, merge_run, parallel_kernel, split_run
from ..geometry import ConvGeometry

NAME = "space-to-batch"


def why_not(geo, dtype, pass_):
    if geo.dlh == geo.dlw == 1:
        return "it needs a dilation > 1"
    if (geo.sh, geo.sw) != (1, 1):
        return f"it needs stride 1; got {(geo.sh, geo.sw)}"
    if geo.H % geo.dlh or geo.W % geo.dlw:
        return (f"it needs the input's height and width in multiples of the dilation "
                f"{(geo.dlh, geo.dlw)}; got {geo.H}x{geo.W}")
    if geo.pt % geo.dlh or geo.pb % geo.dlh or geo.pl % geo.dlw or geo.pr % geo.dlw:
        return (f"it needs pads in multiples of the dilation {(geo.dlh, geo.dlw)}; got "
                f"(top, bottom, left, right) {geo.pads}")
    return None


def slower(geo, dtype, pass_):
    inner = _inner(geo, np.dtype(dtype).str, pass_)
    if not inner.NAME.startswith("winograd"):
        return (f"its undilated phases would run on {inner.NAME}, where the layout passes "
                "cost more than they save")
    nbytes = geo.N * (geo.C * geo.H * geo.W + geo.K * geo.OH * geo.OW) * np.dtype(dtype).itemsize
    if pass_ == "grad_weight" and geo.Cg < config.SPACE_TO_BATCH_DW_MIN_C:
        return (f"its dW on the phases ran slower than the direct dW with fewer than "
                f"config.SPACE_TO_BATCH_DW_MIN_C = {config.SPACE_TO_BATCH_DW_MIN_C} input "
                f"channels; got {geo.Cg}")
    if pass_ == "grad_weight" and nbytes > config.SPACE_TO_BATCH_DW_MAX_BYTES:
        return (f"its dW lays out {nbytes} bytes of input and deltas, more than "
                f"config.SPACE_TO_BATCH_DW_MAX_BYTES = {config.SPACE_TO_BATCH_DW_MAX_BYTES}")
    return None


@functools.lru_cache(maxsize=256)
def _phases(geo: ConvGeometry) -> ConvGeometry:
    """The undilated convolution of the stacked phases (see the module docstring)."""
    dh, dw = geo.dlh, geo.dlw
    return ConvGeometry(geo.N * dh * dw, geo.C, geo.H // dh, geo.W // dw, geo.K, geo.R,
                        geo.S, geo.G, 1, 1, 1, 1, geo.pt // dh, geo.pb // dh, geo.pl // dw,
                        geo.pr // dw, geo.OH // dh, geo.OW // dw)


@functools.lru_cache(maxsize=256)
def _inner(geo: ConvGeometry, dtype: str, pass_: str):
    """The algorithm the plan's list chooses for ``pass_`` of the phases' convolution."""
    from . import choices  # the list holds this module

    return choices(_phases(geo), np.dtype(dtype), pass_)[0]


def prepare(geo, w, pass_):
    """The weights as the phases' algorithm runs ``pass_`` with them."""
    inner = _inner(geo, w.dtype.str, pass_)
    prep = getattr(inner, "prepare", None)
    return w if prep is None else prep(_phases(geo), w, pass_)


def forward(geo, x, wp, b):
    ys = _inner(geo, x.dtype.str, "forward").forward(_phases(geo), _to_batch(x, geo), wp, b)
    return None if ys is None else _from_batch(ys, geo)


def grad_input(geo, dy, wp):
    dxs = _inner(geo, dy.dtype.str, "grad_input").grad_input(_phases(geo),
                                                             _to_batch(dy, geo), wp)
    return None if dxs is None else _from_batch(dxs, geo)


def grad_weight(geo, x, dy):
    return _inner(geo, x.dtype.str, "grad_weight").grad_weight(
        _phases(geo), _to_batch(x, geo), _to_batch(dy, geo))


def _to_batch(a, geo):
    """``a`` (N, C, H, W) as its ``dlh x dlw`` phases stacked in the batch: (N*dlh*dlw,
    C, H/dlh, W/dlw)."""
    N, C, H, W = a.shape
    dh, dw = geo.dlh, geo.dlw
    out = np.empty((N * dh * dw, C, H // dh, W // dw), a.dtype)
    phases_to_batch(np.ascontiguousarray(a).reshape(a.size), N, C, H, W, dh, dw,
                    out.reshape(out.size))
    return out


def _from_batch(a, geo):
    """The inverse of :func:`_to_batch`: (N*dlh*dlw, C, Hs, Ws) to (N, C, Hs*dlh,
    Ws*dlw)."""
    NP, C, Hs, Ws = a.shape
    dh, dw = geo.dlh, geo.dlw
    out = np.empty((NP // (dh * dw), C, Hs * dh, Ws * dw), a.dtype)
    batch_to_phases(np.ascontiguousarray(a).reshape(a.size), NP // (dh * dw), C, Hs, Ws,
                    dh, dw, out.reshape(out.size))
    return out


# ---- kernels ---------------------------------------------------------------------------


@parallel_kernel
def phases_to_batch(x, N, C, H, W, dh, dw, out):
    """``out[((n*dh + a)*dw + b, c, u, v] = x[n, c, dh*u + a, dw*v + b]``: the dilation
    phases of each plane stacked in the batch.

    x : (N*C*H*W,)          NCHW planes, flattened.
    out : (N*dh*dw*C*Hs*Ws,)   ``Hs = H/dh``, ``Ws = W/dw``.

    A task per plane ``(n, c)``: each input row goes to its row phase, its columns split
    into the ``dw`` column phases (``dw == 2``: two shuffles per 32 elements,
    :func:`fastconv._jit.split_run`).  Every element of ``out`` is written once.
    """
    Hs, Ws = H // dh, W // dw
    for task in prange(N * C):
        n = task // C
        c = task % C
        for u in range(Hs):
            for a in range(dh):
                src = ((n * C + c) * H + u * dh + a) * W
                dst = (((n * dh + a) * dw * C + c) * Hs + u) * Ws  # phase (a, 0)
                pstep = C * Hs * Ws  # from column phase b to b + 1
                if dw == 1:
                    copy_run(out, dst, x, src, W)
                elif dw == 2:
                    split_run(out, dst, dst + pstep, x, src, W)
                else:
                    for b in range(dw):
                        for v in range(Ws):
                            out[dst + b * pstep + v] = x[src + v * dw + b]


@parallel_kernel
def batch_to_phases(a, N, C, Hs, Ws, dh, dw, out):
    """``out[n, c, dh*u + p, dw*v + q] = a[(n*dh + p)*dw + q, c, u, v]``: the inverse of
    :func:`phases_to_batch`, a task per output plane (``dw == 2``: two shuffles per 32
    elements, :func:`fastconv._jit.merge_run`).

    a : (N*dh*dw*C*Hs*Ws,)   the phases, stacked in the batch, flattened.
    out : (N*C*H*W,)         ``H = Hs*dh``, ``W = Ws*dw``.
    """
    H, W = Hs * dh, Ws * dw
    for task in prange(N * C):
        n = task // C
        c = task % C
        for u in range(Hs):
            for p in range(dh):
                dst = ((n * C + c) * H + u * dh + p) * W
                src = (((n * dh + p) * dw * C + c) * Hs + u) * Ws
                pstep = C * Hs * Ws
                if dw == 1:
                    copy_run(out, dst, a, src, W)
                elif dw == 2:
                    merge_run(out, dst, a, src, src + pstep, W)
                else:
                    for q in range(dw):
                        for v in range(Ws):
                            out[dst + v * dw + q] = a[src + q * pstep + v]
