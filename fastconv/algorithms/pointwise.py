"""dW of a pointwise (1x1, stride-1, unpadded) layer as one matrix product over every
pixel of the batch, with channels as the vector lanes.

Legend: ``x`` (N, C, H, W) input, ``dy`` (N, K, H, W) deltas, ``dw`` (K, C, 1, 1); ``M =
H*W`` pixels per image.

The math
--------
A 1x1 layer's output pixel ``m`` reads input pixel ``m`` only, so::

    dw[k, c] = sum_n sum_{m < M} dy[n, k, m] * x[n, c, m]

a product of the (K, N*M) deltas with the transposed (C, N*M) input.  In NCHW both have
the pixels contiguous, the reduction axis: a kernel with pixels as the lanes (the pixel
dW) must sum its lanes at the end and reads ``DK + DT`` vectors per ``DK * DT`` FMAs, most
of them from L2.  Here one operand's channels are the lanes, and the
register tile is the channel-lane grouped dW's (:mod:`fastconv.algorithms.grouped_dw`):
``TA = 24`` rows of the other operand (``A``) times one vector of ``VL = 16`` channels of
this one (``B``), and each pixel is one vector load of ``B`` and 24 FMAs, each with its
value of ``A`` folded in as a broadcast (``vfmadd231ps m32{1to16}``).  The
sums in the tile are final (no horizontal sums), and the tile stays in registers over a
whole batch chunk.

``B`` is the operand with fewer channels: with ``C <= K`` the input, and the product is
``dw[k, c]`` directly; otherwise the deltas, and the product is ``dw`` transposed.  Its
channels need to be pixel-major, which NCHW is not.  A pass laying all of ``B`` out
channels-last ran at memory speed, a quarter of the whole dW of 128 -> 128 channels at
14 x 14, batch 64; here each task transposes its own block of 16 channels of its batch
chunk into a scratch that stays in cache (:func:`fastconv._jit.transpose16`), and runs
every row block of ``A`` on it.

Parallel over (batch chunk, lane block of ``B``), cut into runs with their own scratch,
consecutive tasks of a run reading the same chunk of ``A``; each chunk sums into its own
buffer, added in a fixed order: results do not depend on the thread count.  Rows past
``A``'s last and lanes past ``B``'s last repeat the last one and are dropped, so an inf or
NaN reaches exactly the sums it enters.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .. import config
from .._jit import parallel_kernel, serial_kernel
from ..layouts import _batch_chunks, _sum_chunks, _task_runs
from .grouped_dw import TB, VL, _lanes_deltas, _lanes_products

NAME = "pointwise-dw"

#: Rows of A per register tile (24 accumulators); the lanes of B are one vector, ``VL``.
TA = TB


def why_not(geo, dtype, pass_):
    if pass_ != "grad_weight":
        return "it computes dW only"
    if geo.G != 1:
        return "it needs one group"
    if (geo.R, geo.S, geo.sh, geo.sw, geo.dlh, geo.dlw) != (1, 1, 1, 1, 1, 1) or any(geo.pads):
        return "it needs a 1x1, stride-1, unpadded layer"
    return None


def slower(geo, dtype, pass_):
    if min(geo.C, geo.K) < VL:
        return (f"with {min(geo.C, geo.K)} channels on one side its {VL} lanes are mostly "
                "padding: the pixel dW is faster")
    if np.dtype(dtype) == np.float64:
        return ("in float64 its tile (24 rows of two vectors) spills its registers: the "
                "pixel dW is faster")
    return None


def grad_weight(geo, x, dy):
    N, C, K, M = geo.N, geo.C, geo.K, geo.H * geo.W
    x, dy = np.ascontiguousarray(x), np.ascontiguousarray(dy)
    if C <= K:  # dw[k, c] = sum dy[k, m] x[m, c]: x in the lanes
        a, b = dy.reshape(N, K * M), x.reshape(N, C * M)
        NA, NB = K, C
    else:  # dw^T[c, k] = sum x[c, m] dy[m, k]: dy in the lanes
        a, b = x.reshape(N, C * M), dy.reshape(N, K * M)
        NA, NB = C, K
    RBn, LBn = -(-NA // TA), -(-NB // VL)
    P = _batch_chunks(N, (NA + NB) * M * x.itemsize, config.DW_PIXEL_CHUNK_BYTES)
    nimg = -(-N // P)  # the most samples in a chunk
    Q = _task_runs(P * LBn)
    scratch = np.empty((Q, nimg, 1, M, VL), x.dtype)
    part = np.empty((P, RBn, LBn, TA, VL), x.dtype)
    # The tile reads row i of block rb of A at roff[0, rb*TA + i] (rows past NA: the last).
    roff = (np.minimum(np.arange(RBn * TA), NA - 1) * M)[None].astype(np.int64)
    pointwise_dw(a, b, NA, NB, M, roff, scratch, part)
    ab = _sum_chunks(part).transpose(0, 2, 1, 3).reshape(RBn * TA, LBn * VL)[:NA, :NB]
    dw = ab if C <= K else ab.T
    return np.ascontiguousarray(dw).reshape(K, C, 1, 1)


@parallel_kernel
def pointwise_dw(a, b, NA, NB, M, roff, scratch, part):
    """``part[h, rb, lb, i, j] = sum_{n in chunk h} sum_{m < M} a[n, roff[0, rb*TA + i] +
    m] * b[n, (lb*VL + j)*M + m]``, lanes past ``NB`` repeating the last; chunk ``h``
    holds images ``[h*N//P, (h+1)*N//P)``.

    a : (N, NA*M)                   one operand, NCHW planes flattened per image.
    b : (N, NB*M)                   the other, likewise.
    roff : (1, RBn*TA) int64        where each row of ``a`` starts in an image.
    scratch : (Q, nimg, 1, M, VL)   a run's block of ``b``, pixel-major.
    part : (P, RBn, LBn, TA, VL)    one sum per chunk, overwritten.

    Task (h, lb): ``b``'s block ``lb`` of each image of the chunk transposed to
    pixel-major as the channel-lane grouped dW transposes its deltas
    (:func:`fastconv.algorithms.grouped_dw._lanes_deltas`; a last, partial block one value
    at a time, its lanes past ``NB`` repeating the last), then every row block of ``a``
    (:func:`_pointwise_tile`).
    """
    N = a.shape[0]
    P, RBn, LBn = part.shape[:3]
    Q = scratch.shape[0]
    NT = P * LBn
    for q in prange(Q):
        bt = scratch[q]
        for task in range(q * NT // Q, (q + 1) * NT // Q):
            lb = task % LBn
            h = task // LBn
            n0, n1 = h * N // P, (h + 1) * N // P
            j0 = lb * VL
            for n in range(n0, n1):
                dst = bt[n - n0].reshape(M * VL)
                if j0 + VL <= NB:
                    _lanes_deltas(b[n], j0, M, dst)
                else:
                    for u in range(M):
                        for j in range(VL):
                            dst[u * VL + j] = b[n, min(j0 + j, NB - 1) * M + u]
            for rb in range(RBn):
                _pointwise_tile(a[n0:n1], bt, roff, n1 - n0, rb, part[h, rb, lb])


@serial_kernel
def _pointwise_tile(a, bt, roff, nimg, rb, out):
    """One tile of :func:`pointwise_dw`: the channel-lane grouped dW's tile
    (:func:`fastconv.algorithms.grouped_dw._lanes_products`) on one output row of ``M``
    pixels whose ``TA`` taps are rows of ``a``.  Compiled on its own, so that its tile
    stays in registers."""
    _lanes_products(a, bt, roff, nimg, rb, out)
