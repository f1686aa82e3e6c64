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
of them from L2.  Here one operand is laid out channels-last first (one pass over it),
so that its channels are the lanes: the register tile is ``TA`` rows of the other operand
x ``TB`` lanes, and each pixel is ``TA`` broadcast values times two vectors: 16 FMAs for
ten loads, eight of them broadcasts from the same few lines (a 12-row tile spilled its
accumulators: 12 broadcasts and 24 accumulators are more than 32 registers; 6 rows x 64
lanes ran no faster).  The sums in the tile are final (no horizontal sums), and the tile
stays in registers over a whole batch chunk.  One thread, batch 16, 128 -> 256 at 16x16:
the kernel 150-157 GF/s (about 2/3 of one core's FMA peak), the pass with its layout pass
and chunk sums 1.7-2x the pixel dW's speed.

Of ``dy`` and ``x``, the one with fewer channels is laid out channels-last (``B``, padded
to ``BP``, a multiple of ``TB``, with zeros); the other (``A``) is read as it comes.  With
``C <= K`` that is ``x``, and the product is ``dw[k, c]`` directly; otherwise ``dy``, and
the product is ``dw`` transposed.

Parallel over (batch chunk, row block of A, lane block of B), lane blocks fastest, so that
consecutive tasks of a thread read the same rows of A; each chunk sums into its own
buffer, added in a fixed order: results do not depend on the thread count.  An inf or NaN
reaches exactly the sums it enters (the padding lanes of B are zeros times finite values
of A, and are dropped).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .. import config
from .._jit import parallel_kernel, stack_tile
from ..layouts import _batch_chunks, _channels_last, _sum_chunks

NAME = "pointwise-dw"

#: Rows of A x lanes of B per register tile: 16 vector accumulators.
TA, TB = 8, 32


def why_not(geo, dtype, pass_):
    if pass_ != "grad_weight":
        return "it computes dW only"
    if geo.G != 1:
        return "it needs one group"
    if (geo.R, geo.S, geo.sh, geo.sw, geo.dlh, geo.dlw) != (1, 1, 1, 1, 1, 1) or any(geo.pads):
        return "it needs a 1x1, stride-1, unpadded layer"
    return None


def slower(geo, dtype, pass_):
    if min(geo.C, geo.K) < TB // 2:
        return (f"with {min(geo.C, geo.K)} channels on one side its {TB} lanes are mostly "
                "padding: the pixel dW is faster")
    return None


def grad_weight(geo, x, dy):
    N, C, K, M = geo.N, geo.C, geo.K, geo.H * geo.W
    x, dy = np.ascontiguousarray(x), np.ascontiguousarray(dy)
    if C <= K:  # dw[k, c] = sum dy[k, m] x[m, c]: x channels-last
        a, b, nb = dy.reshape(N, K, M), x, C
    else:  # dw^T[c, k] = sum x[c, m] dy[m, k]: dy channels-last
        a, b, nb = x.reshape(N, C, M), dy, K
    BP = -(-nb // TB) * TB
    bt = _channels_last(b, 1, BP).reshape(N, M, BP)
    P = _batch_chunks(N, (a.shape[1] + BP) * M * a.itemsize, config.DW_PIXEL_CHUNK_BYTES)
    part = np.empty((P, a.shape[1], BP), x.dtype)
    pointwise_dw(a, bt, part)
    ab = _sum_chunks(part)[:, :nb]
    dw = ab if C <= K else ab.T
    return np.ascontiguousarray(dw).reshape(K, C, 1, 1)


@parallel_kernel
def pointwise_dw(a, bt, part):
    """``part[h, i, j] = sum_{n in chunk h} sum_{m < M} a[n, i, m] * bt[n, m, j]``, chunk
    ``h`` holding images ``[h*N//P, (h+1)*N//P)``.

    a : (N, NA, M)       one operand, pixels contiguous (NCHW as it comes).
    bt : (N, M, BP)      the other, channels-last; ``BP`` a multiple of ``TB``.
    part : (P, NA, BP)   one sum per chunk, overwritten.

    Task (h, row block, lane block): a stack tile of TA rows x TB lanes; per pixel, TA
    broadcast values of ``a`` times the two vectors of ``bt``.  Rows past ``NA`` repeat
    the last one and are not stored.
    """
    N, NA, M = a.shape
    BP = bt.shape[2]
    P = part.shape[0]
    RBn, LBn = -(-NA // TA), BP // TB
    af = a.reshape(-1)
    bf = bt.reshape(-1)
    pf = part.reshape(-1)
    um, ubp = np.uint64(M), np.uint64(BP)
    for task in prange(P * RBn * LBn):
        lb = task % LBn
        rest = task // LBn
        rb = rest % RBn
        h = rest // RBn
        i0 = rb * TA
        acc = stack_tile(TA, TB, part.dtype)
        for i in range(TA):
            for j in range(TB):
                acc[i, j] = 0
        tb = min(TB, BP)  # == TB; a bound LLVM cannot see keeps the stores vectorised
        for n in range(h * N // P, (h + 1) * N // P):
            # The TA rows of a (past NA, the last repeated), as unsigned offsets.
            r = np.uint64(n * NA)
            o0 = (r + np.uint64(min(i0, NA - 1))) * um
            o1 = (r + np.uint64(min(i0 + 1, NA - 1))) * um
            o2 = (r + np.uint64(min(i0 + 2, NA - 1))) * um
            o3 = (r + np.uint64(min(i0 + 3, NA - 1))) * um
            o4 = (r + np.uint64(min(i0 + 4, NA - 1))) * um
            o5 = (r + np.uint64(min(i0 + 5, NA - 1))) * um
            o6 = (r + np.uint64(min(i0 + 6, NA - 1))) * um
            o7 = (r + np.uint64(min(i0 + 7, NA - 1))) * um
            bo = np.uint64(n) * um * ubp + np.uint64(lb * TB)
            for m in range(M):
                mu = np.uint64(m)
                e0 = af[o0 + mu]
                e1 = af[o1 + mu]
                e2 = af[o2 + mu]
                e3 = af[o3 + mu]
                e4 = af[o4 + mu]
                e5 = af[o5 + mu]
                e6 = af[o6 + mu]
                e7 = af[o7 + mu]
                bm = bo + mu * ubp
                for j in range(TB):
                    v = bf[bm + np.uint64(j)]
                    acc[0, j] += e0 * v
                    acc[1, j] += e1 * v
                    acc[2, j] += e2 * v
                    acc[3, j] += e3 * v
                    acc[4, j] += e4 * v
                    acc[5, j] += e5 * v
                    acc[6, j] += e6 * v
                    acc[7, j] += e7 * v
        for i in range(min(TA, NA - i0)):
            po = np.uint64((h * NA + i0 + i) * BP + lb * TB)
            for j in range(tb):
                pf[po + np.uint64(j)] = acc[i, j]
