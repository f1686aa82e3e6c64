"""Serial direct convolution for problems too small to share between threads.

A call of the parallel kernels costs a parallel region (about 2.6 us with OpenMP) per
kernel and a layout pass (packing, shifted planes) with its NumPy set-up, 15-20 us in all
before any arithmetic; PyTorch's smallest convolution takes 5-6 us here.  Below
``config.SMALL_WORK`` multiply-adds a pass instead runs one serial kernel on the NCHW
arrays as they are: no layout, no allocation besides the result, no threads.

The math, for every geometry (groups, stride, padding, dilation), with ``g = k // Kg``::

    y[n,k,i,j]  = b[k] + sum_{c<Cg, r, s} x[n, g*Cg + c, i*sh - pt + r*dlh, j*sw - pl + s*dlw]
                                          * w[k, c, r, s]
    dx[n, g*Cg + c, h, v] = sum over (k in group g, r, s, i, j) with h = i*sh - pt + r*dlh,
                            v = j*sw - pl + s*dlw of dy[n,k,i,j] * w[k,c,r,s]
    dw[k,c,r,s] = sum_{n,i,j} dy[n,k,i,j] * x[n, g*Cg + c, i*sh - pt + r*dlh,
                                               j*sw - pl + s*dlw]

terms outside the input being zero.  Each loop nest ends in a loop over the output
columns ``j`` of one tap, over the columns whose input lies inside the row: ``j0 <= j <
j1`` with ``0 <= j*sw + s*dlw - pl < W`` (:func:`_columns`), so no test runs per element
and, at stride 1, the loop is a vectorisable axpy or dot product.  The kernels take their
sizes from the arrays, which the plan has checked against its geometry.
"""

from __future__ import annotations

import numba
import numpy as np

from .. import config
from .._jit import serial_kernel

NAME = "serial-direct"


def work(geo) -> int:
    """Multiply-adds of one pass (all three do the same number)."""
    return geo.N * geo.K * geo.Cg * geo.R * geo.S * geo.OH * geo.OW


def why_not(geo, dtype, pass_):
    return None


def slower(geo, dtype, pass_):
    if geo.G == geo.C > 1:  # depthwise
        name, bound = "DEPTHWISE_SMALL_WORK", config.DEPTHWISE_SMALL_WORK
    else:
        name, bound = "SMALL_WORK", config.SMALL_WORK
    if work(geo) > bound:
        return (f"it is for problems of at most {bound} multiply-adds "
                f"(config.{name}); this one has {work(geo)}")
    return None


_NO_BIAS = {np.dtype(np.float32): np.zeros(1, np.float32),
            np.dtype(np.float64): np.zeros(1, np.float64)}


def _run(geo, wide, rows, *args):
    """``wide`` (the stride-1 kernel on wide rows) or ``rows`` (any stride) on ``args``,
    then the geometry each takes."""
    if (geo.sh, geo.sw) == (1, 1):
        wide(*args, geo.dlh, geo.dlw, geo.pt, geo.pb, geo.pl, geo.pr)
    else:
        rows(*args, geo.sh, geo.sw, geo.dlh, geo.dlw, geo.pt, geo.pl)


def forward(geo, x, w, b):
    y = np.empty((geo.N, geo.K, geo.OH, geo.OW), x.dtype)
    bias = _NO_BIAS[x.dtype] if b is None else b
    _run(geo, small_forward_wide, small_forward, x, w, bias, b is not None, y)
    return y


def grad_input(geo, dy, w):
    dx = np.empty((geo.N, geo.C, geo.H, geo.W), dy.dtype)
    _run(geo, small_grad_input_wide, small_grad_input, dy, w, dx)
    return dx


def grad_weight(geo, x, dy):
    dw = np.empty((geo.K, geo.Cg, geo.R, geo.S), x.dtype)
    _run(geo, small_grad_weight_wide, small_grad_weight, x, dy, dw)
    return dw


@numba.njit(inline="always")
def _columns(off, sw, W, OW):
    """The output columns ``[j0, j1)`` whose input column ``j*sw + off`` lies in
    ``[0, W)``."""
    j0 = max(0, (sw - 1 - off) // sw)
    j1 = min(OW, (W - 1 - off) // sw + 1) if W - 1 - off >= 0 else 0
    return j0, max(j0, j1)


@numba.njit(inline="always")
def _axpy(out, a, oo, os_, v, n0, n1, av, ao, as_):
    """``out[oo + j*os_] += v * a[ao + j*as_]`` for ``n0 <= j < n1``: the inner loop of all
    three kernels, with a unit-stride version that vectorises."""
    if os_ == 1 and as_ == 1:
        for j in range(n0, n1):
            out[oo + j] += v * a[ao + j]
    else:
        for j in range(n0, n1):
            out[oo + j * os_] += v * a[ao + j * as_]


@serial_kernel
def small_forward(x, w, b, has_bias, y, sh, sw, dlh, dlw, pt, pl):
    """``y`` (N, K, OH, OW) of ``x`` (N, C, H, W) and ``w`` (K, Cg, R, S), plus ``b`` (K,)
    if ``has_bias``: every element of ``y`` written.  The taps are the outer loops, so
    each tap's valid rows and columns are computed once."""
    N, C, H, W = x.shape
    K, Cg, R, S = w.shape
    OH, OW = y.shape[2], y.shape[3]
    Kg = K // (C // Cg)
    zero = y.dtype.type(0)
    for n in range(N):
        for k in range(K):
            g = k // Kg
            bk = b[k] if has_bias else zero
            yk = y[n, k]
            for i in range(OH):
                for j in range(OW):
                    yk[i, j] = bk
            for c in range(Cg):
                xc = x[n, g * Cg + c]
                for r in range(R):
                    i0, i1 = _columns(r * dlh - pt, sh, H, OH)
                    for s in range(S):
                        wv = w[k, c, r, s]
                        off = s * dlw - pl
                        j0, j1 = _columns(off, sw, W, OW)
                        for i in range(i0, i1):
                            _axpy(yk[i], xc[i * sh + r * dlh - pt], 0, 1, wv, j0, j1, 0,
                                  off, sw)


@serial_kernel
def small_grad_input(dy, w, dx, sh, sw, dlh, dlw, pt, pl):
    """``dx`` (N, C, H, W) of ``dy`` (N, K, OH, OW) and ``w`` (K, Cg, R, S): zeroed, then
    each delta added to the inputs its taps read."""
    N, K, OH, OW = dy.shape
    C, H, W = dx.shape[1], dx.shape[2], dx.shape[3]
    Cg, R, S = w.shape[1], w.shape[2], w.shape[3]
    Kg = K // (C // Cg)
    zero = dx.dtype.type(0)
    for n in range(N):
        for c in range(C):
            for h in range(H):
                for v in range(W):
                    dx[n, c, h, v] = zero
        for k in range(K):
            g = k // Kg
            dyk = dy[n, k]
            for c in range(Cg):
                dxc = dx[n, g * Cg + c]
                for r in range(R):
                    i0, i1 = _columns(r * dlh - pt, sh, H, OH)
                    for s in range(S):
                        wv = w[k, c, r, s]
                        off = s * dlw - pl
                        j0, j1 = _columns(off, sw, W, OW)
                        for i in range(i0, i1):
                            _axpy(dxc[i * sh + r * dlh - pt], dyk[i], off, sw, wv, j0, j1,
                                  0, 0, 1)


@serial_kernel
def small_grad_weight(x, dy, dw, sh, sw, dlh, dlw, pt, pl):
    """``dw`` (K, Cg, R, S) of ``x`` (N, C, H, W) and ``dy`` (N, K, OH, OW): every element
    written."""
    N, C, H, W = x.shape
    K, OH, OW = dy.shape[1], dy.shape[2], dy.shape[3]
    Cg, R, S = dw.shape[1], dw.shape[2], dw.shape[3]
    Kg = K // (C // Cg)
    for k in range(K):
        g = k // Kg
        for c in range(Cg):
            for r in range(R):
                i0, i1 = _columns(r * dlh - pt, sh, H, OH)
                for s in range(S):
                    off = s * dlw - pl
                    j0, j1 = _columns(off, sw, W, OW)
                    acc = dw.dtype.type(0)
                    for n in range(N):
                        xc = x[n, g * Cg + c]
                        dyk = dy[n, k]
                        for i in range(i0, i1):
                            xrow = xc[i * sh + r * dlh - pt]
                            dyrow = dyk[i]
                            if sw == 1:
                                for j in range(j0, j1):
                                    acc += dyrow[j] * xrow[j + off]
                            else:
                                for j in range(j0, j1):
                                    acc += dyrow[j] * xrow[j * sw + off]
                    dw[k, c, r, s] = acc


# Stride 1: wide rows
# -------------------
# An image's rows of few pixels make short inner loops, which LLVM leaves scalar.  At stride
# 1 the kernels below work on *wide rows* instead: each plane zero-padded to Hp x Wp and
# flattened, the output computed for all Wp columns of its OH rows (the last Wp - OW of
# each row are discarded, or, for deltas, zero).  Output pixel m = i*Wp + j then reads
# padded input m + r*dlh*Wp + s*dlw for tap (r, s): one contiguous axpy (or dot product) of
# OH*Wp elements per tap, over a plane that reaches (S - 1)*dlw elements past Hp*Wp.  Its
# indices are unsigned: with signed ones (which may wrap around) LLVM loaded through
# gathers, and the kernel of the tiny call (1, 3, 8, 8) * (8, 3, 3, 3) took 5.7 us instead
# of 1.9 us.


@numba.njit(inline="always")
def _pad_plane(src, dst, pt, pl, Wp):
    """``dst[(h + pt)*Wp + pl + v] = src[h, v]``; ``dst`` zero elsewhere already."""
    H, W = src.shape
    for h in range(H):
        for v in range(W):
            dst[(h + pt) * Wp + pl + v] = src[h, v]


@serial_kernel
def small_forward_wide(x, w, b, has_bias, y, dlh, dlw, pt, pb, pl, pr):
    """:func:`small_forward` at stride 1, on wide rows."""
    N, C, H, W = x.shape
    K, Cg, R, S = w.shape
    OH, OW = y.shape[2], y.shape[3]
    Kg = K // (C // Cg)
    Hp, Wp = H + pt + pb, W + pl + pr
    M = OH * Wp
    xp = np.zeros((C, Hp * Wp + (S - 1) * dlw), x.dtype)
    acc = np.empty(M, y.dtype)
    zero = y.dtype.type(0)
    for n in range(N):
        for c in range(C):
            _pad_plane(x[n, c], xp[c], pt, pl, Wp)
        for k in range(K):
            g = k // Kg
            bk = b[k] if has_bias else zero
            for m in range(M):
                acc[m] = bk
            for c in range(Cg):
                xc = xp[g * Cg + c]
                for r in range(R):
                    for s in range(S):
                        wv = w[k, c, r, s]
                        shift = np.uint64(r * dlh * Wp + s * dlw)
                        for m in range(np.uint64(0), np.uint64(M)):  # unsigned: no gathers
                            acc[m] += wv * xc[m + shift]
            for i in range(OH):
                for j in range(OW):
                    y[n, k, i, j] = acc[i * Wp + j]


@numba.njit(inline="always")
def _finite(a) -> bool:
    for v in a.flat:
        if not np.isfinite(v):
            return False
    return True


@serial_kernel
def small_grad_input_wide(dy, w, dx, dlh, dlw, pt, pb, pl, pr):
    """:func:`small_grad_input` at stride 1: the deltas in wide rows (zero past OW), each
    tap's contribution one axpy into the padded plane, which is then cropped.  The zeros
    past OW, times an inf or NaN weight, would be NaN in the next row's inputs: then the
    row kernel runs instead, which multiplies only real deltas."""
    if not _finite(w):
        small_grad_input(dy, w, dx, 1, 1, dlh, dlw, pt, pl)
        return
    N, K, OH, OW = dy.shape
    C, H, W = dx.shape[1], dx.shape[2], dx.shape[3]
    Cg, R, S = w.shape[1], w.shape[2], w.shape[3]
    Kg = K // (C // Cg)
    Hp, Wp = H + pt + pb, W + pl + pr
    M = OH * Wp
    dyw = np.zeros((K, M), dy.dtype)
    plane = np.empty(Hp * Wp + (S - 1) * dlw, dx.dtype)
    zero = dx.dtype.type(0)
    for n in range(N):
        for k in range(K):
            for i in range(OH):
                for j in range(OW):
                    dyw[k, i * Wp + j] = dy[n, k, i, j]
        for cc in range(C):
            g = cc // Cg
            c = cc - g * Cg
            for e in range(plane.size):
                plane[e] = zero
            for k in range(g * Kg, (g + 1) * Kg):
                dk = dyw[k]
                for r in range(R):
                    for s in range(S):
                        wv = w[k, c, r, s]
                        shift = np.uint64(r * dlh * Wp + s * dlw)
                        for m in range(np.uint64(0), np.uint64(M)):
                            plane[m + shift] += wv * dk[m]
            for h in range(H):
                for v in range(W):
                    dx[n, cc, h, v] = plane[(h + pt) * Wp + pl + v]


@serial_kernel
def small_grad_weight_wide(x, dy, dw, dlh, dlw, pt, pb, pl, pr):
    """:func:`small_grad_weight` at stride 1: a dot product of each tap's shifted padded
    plane with the deltas in wide rows (zero past OW), summed over the batch.  Those zeros
    meet real inputs, so an inf or NaN input sends it to the row kernel, as in
    :func:`small_grad_input_wide`."""
    if not _finite(x):
        small_grad_weight(x, dy, dw, 1, 1, dlh, dlw, pt, pl)
        return
    N, C, H, W = x.shape
    K, OH, OW = dy.shape[1], dy.shape[2], dy.shape[3]
    Cg, R, S = dw.shape[1], dw.shape[2], dw.shape[3]
    Kg = K // (C // Cg)
    Hp, Wp = H + pt + pb, W + pl + pr
    M = OH * Wp
    xp = np.zeros((N, C, Hp * Wp + (S - 1) * dlw), x.dtype)
    dyw = np.zeros((N, K, M), dy.dtype)
    for n in range(N):
        for c in range(C):
            _pad_plane(x[n, c], xp[n, c], pt, pl, Wp)
        for k in range(K):
            for i in range(OH):
                for j in range(OW):
                    dyw[n, k, i * Wp + j] = dy[n, k, i, j]
    for k in range(K):
        g = k // Kg
        for c in range(Cg):
            for r in range(R):
                for s in range(S):
                    shift = np.uint64(r * dlh * Wp + s * dlw)
                    acc = dw.dtype.type(0)
                    for n in range(N):
                        xc = xp[n, g * Cg + c]
                        dk = dyw[n, k]
                        for m in range(np.uint64(0), np.uint64(M)):
                            acc += dk[m] * xc[m + shift]
                    dw[k, c, r, s] = acc
