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
of them from L2.  Here, as in the channel-lane grouped dW
(:mod:`fastconv.algorithms.grouped_dw`), one operand's channels are the lanes: the
register tile is ``TA = 24`` rows of the other operand (``A``) times one vector of ``VL =
16`` channels of this one (``B``), and each pixel is one vector load of ``B`` and 24 FMAs,
each with its value of ``A`` folded in as a broadcast (``vfmadd231ps m32{1to16}``).  The
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

import numba
import numpy as np
from numba import prange

from .. import config
from .._jit import parallel_kernel, serial_kernel, stack_tile, transpose16
from ..layouts import _batch_chunks, _sum_chunks

NAME = "pointwise-dw"

#: Rows of A per register tile (24 accumulators) and lanes of B (one vector).
TA, VL = 24, 16


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
    Q = max(1, min(P * LBn, config.GROUPED_TASKS_PER_THREAD * numba.get_num_threads()))
    scratch = np.empty((Q, nimg, M, VL), x.dtype)
    part = np.empty((P, RBn, LBn, TA, VL), x.dtype)
    pointwise_dw(a, b, NA, NB, M, scratch, part)
    ab = _sum_chunks(part).transpose(0, 2, 1, 3).reshape(RBn * TA, LBn * VL)[:NA, :NB]
    dw = ab if C <= K else ab.T
    return np.ascontiguousarray(dw).reshape(K, C, 1, 1)


@parallel_kernel
def pointwise_dw(a, b, NA, NB, M, scratch, part):
    """``part[h, rb, lb, i, j] = sum_{n in chunk h} sum_{m < M} a[n, (rb*TA + i)*M + m] *
    b[n, (lb*VL + j)*M + m]``, rows and lanes past ``NA`` and ``NB`` repeating the last;
    chunk ``h`` holds images ``[h*N//P, (h+1)*N//P)``.

    a : (N, NA*M)                  one operand, NCHW planes flattened per image.
    b : (N, NB*M)                  the other, likewise.
    scratch : (Q, nimg, M, VL)     a run's block of ``b``, pixel-major.
    part : (P, RBn, LBn, TA, VL)   one sum per chunk, overwritten.

    Task (h, lb): ``b``'s block ``lb`` of each image of the chunk transposed to
    pixel-major (blocks of 16 pixels in registers), then every row block of ``a``
    (:func:`_pointwise_tile`).
    """
    N = a.shape[0]
    P, RBn, LBn = part.shape[:3]
    Q = scratch.shape[0]
    NT = P * LBn
    done = M // VL * VL
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
                    for u in range(0, done, VL):
                        transpose16(b[n], j0 * M + u, M, dst, u * VL, VL)
                    for u in range(done, M):
                        for j in range(VL):
                            dst[u * VL + j] = b[n, (j0 + j) * M + u]
                else:
                    for u in range(M):
                        for j in range(VL):
                            dst[u * VL + j] = b[n, min(j0 + j, NB - 1) * M + u]
            for rb in range(RBn):
                _pointwise_tile(a, bt, n0, n1 - n0, rb * TA, NA, M, part[h, rb, lb])


@serial_kernel
def _pointwise_tile(a, bt, n0, nimg, i0, NA, M, out):
    """One tile of :func:`pointwise_dw`: ``out[i, j] = sum_{n, m} a[n0 + n, min(i0 + i,
    NA - 1)*M + m] * bt[n, m, j]``, ``TA`` rows times ``VL`` lanes, each value of ``a``
    broadcast.  Compiled on its own, so that its tile stays in registers."""
    acc = stack_tile(24, 16, out.dtype)
    for i in range(TA):
        for j in range(VL):
            acc[i, j] = 0
    um = np.uint64(M)
    o0 = np.uint64(min(i0 + 0, NA - 1)) * um
    o1 = np.uint64(min(i0 + 1, NA - 1)) * um
    o2 = np.uint64(min(i0 + 2, NA - 1)) * um
    o3 = np.uint64(min(i0 + 3, NA - 1)) * um
    o4 = np.uint64(min(i0 + 4, NA - 1)) * um
    o5 = np.uint64(min(i0 + 5, NA - 1)) * um
    o6 = np.uint64(min(i0 + 6, NA - 1)) * um
    o7 = np.uint64(min(i0 + 7, NA - 1)) * um
    o8 = np.uint64(min(i0 + 8, NA - 1)) * um
    o9 = np.uint64(min(i0 + 9, NA - 1)) * um
    o10 = np.uint64(min(i0 + 10, NA - 1)) * um
    o11 = np.uint64(min(i0 + 11, NA - 1)) * um
    o12 = np.uint64(min(i0 + 12, NA - 1)) * um
    o13 = np.uint64(min(i0 + 13, NA - 1)) * um
    o14 = np.uint64(min(i0 + 14, NA - 1)) * um
    o15 = np.uint64(min(i0 + 15, NA - 1)) * um
    o16 = np.uint64(min(i0 + 16, NA - 1)) * um
    o17 = np.uint64(min(i0 + 17, NA - 1)) * um
    o18 = np.uint64(min(i0 + 18, NA - 1)) * um
    o19 = np.uint64(min(i0 + 19, NA - 1)) * um
    o20 = np.uint64(min(i0 + 20, NA - 1)) * um
    o21 = np.uint64(min(i0 + 21, NA - 1)) * um
    o22 = np.uint64(min(i0 + 22, NA - 1)) * um
    o23 = np.uint64(min(i0 + 23, NA - 1)) * um
    for n in range(nimg):
        an = a[n0 + n]
        bn = bt[n]
        for m in range(M):
            dv = bn[m]
            u = np.uint64(m)
            x0 = an[o0 + u]
            x1 = an[o1 + u]
            x2 = an[o2 + u]
            x3 = an[o3 + u]
            x4 = an[o4 + u]
            x5 = an[o5 + u]
            x6 = an[o6 + u]
            x7 = an[o7 + u]
            x8 = an[o8 + u]
            x9 = an[o9 + u]
            x10 = an[o10 + u]
            x11 = an[o11 + u]
            x12 = an[o12 + u]
            x13 = an[o13 + u]
            x14 = an[o14 + u]
            x15 = an[o15 + u]
            x16 = an[o16 + u]
            x17 = an[o17 + u]
            x18 = an[o18 + u]
            x19 = an[o19 + u]
            x20 = an[o20 + u]
            x21 = an[o21 + u]
            x22 = an[o22 + u]
            x23 = an[o23 + u]
            for j in range(VL):
                e = dv[j]
                acc[0, j] += e * x0
                acc[1, j] += e * x1
                acc[2, j] += e * x2
                acc[3, j] += e * x3
                acc[4, j] += e * x4
                acc[5, j] += e * x5
                acc[6, j] += e * x6
                acc[7, j] += e * x7
                acc[8, j] += e * x8
                acc[9, j] += e * x9
                acc[10, j] += e * x10
                acc[11, j] += e * x11
                acc[12, j] += e * x12
                acc[13, j] += e * x13
                acc[14, j] += e * x14
                acc[15, j] += e * x15
                acc[16, j] += e * x16
                acc[17, j] += e * x17
                acc[18, j] += e * x18
                acc[19, j] += e * x19
                acc[20, j] += e * x20
                acc[21, j] += e * x21
                acc[22, j] += e * x22
                acc[23, j] += e * x23
    for i in range(TA):
        for j in range(VL):
            out[i, j] = acc[i, j]
