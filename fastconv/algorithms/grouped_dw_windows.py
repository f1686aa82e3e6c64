"""dW of grouped convolutions with 8 input channels per group: a filter row's window of
input pixels and channels as the vector lanes.

Legend: ``x`` (N, C, H, W) input, ``dy`` (N, K, OH, OW) deltas, ``dw`` (K, Cg, R, S) the
weight gradient; ``G`` groups of ``Cg = C/G = 8`` input and ``Kg = K/G`` output channels;
strides ``sh, sw``, dilations ``dlh, dlw`` (``dlw = 1``), pads ``pt, pb, pl, pr``; ``VL =
16`` lanes.

Why an algorithm of its own
---------------------------
ResNeXt's 3x3 layers have 32 groups of 8 input and 8 output channels.  The channel-lane
dW (:mod:`fastconv.algorithms.grouped_dw`) needs 16 output channels per group; the
grouped algorithm's pixel tile (:func:`fastconv.algorithms.grouped.grouped_dw_pixels`)
loads 9 vectors for 20 FMAs, most of them unaligned, splits every plane into stride
phases, and on rows shorter than a vector (14 x 14 planes) computes columns it drops: it
ran those layers at 0.66-0.79x PyTorch.  Here the input of a group is laid out
pixel-major (HWC, eight channels a pixel, zero-padded), so that the ``S`` taps of one
filter row, for one output pixel, are ``S*8`` consecutive numbers: two vectors for ``S``
of 3 or 4.  A tile holds ``KB = 4`` output channels times ``RB = 3`` filter rows times
those two vectors, 24 accumulators; each step (one output pixel) loads six input vectors,
broadcasts four deltas (read in place, NCHW, folded into the FMAs) and makes 24 FMAs.
There are no lane sums, no stride phases (a stride only moves the window further) and no
dropped columns; with ``S = 3`` a quarter of the lanes hold the next pixel's taps and are
dropped.  The layout is made by :func:`fastconv._jit.interleave_run`, eight planes'
rows shuffled to pixel-major order in registers.

The math
--------
With ``xh[n]`` group ``g``'s planes of image ``n`` zero-padded and laid out as ``xh[n,
hp, wp, c] = x[n, g*8 + c, hp - pt, wp - pl]`` (zero outside the image), the window of
output pixel ``(i, j)`` in filter row ``r`` starts at ``((i*sh + r*dlh)*Wp + j*sw)*8``
and lane ``l = s*8 + c`` of it is ``xh[n, i*sh + r*dlh, j*sw + s, c]``, the input tap
``(c, r, s)`` reads.  So::

    dw[g*Kg + k, c, r, s] = sum_{n, i, j} dy[n, g*Kg + k, i, j]
                                          * xhf[n][((i*sh + r*dlh)*Wp + j*sw)*8 + s*8 + c]

``Wp = (OW - 1)*sw + 4`` columns keep the two vectors of the last pixel of a row inside
its row; the padded image has ``Hp = (OH - 1)*sh + (R - 1)*dlh + 1`` rows, only the input
rows and columns some tap reads are copied.  Lanes ``l >= S*8`` (the fourth pixel of a
3-wide window) and the rows and channels that fill a last, partial block of ``RB`` rows
or ``KB`` channels (they repeat row ``rb*RB`` and the group's last channel) are computed
and dropped by the wrapper.  Every kept lane is a sum of the products the reference
makes, and no kept lane shares an accumulator with a dropped one, so an inf or NaN
reaches exactly the sums it is in.

Parallelism: tasks are (batch chunk, group), cut into runs with their own scratch, which
a run zeroes once (the padding is never written afterwards); a task lays out its chunk's
planes of the group and runs every block of channels and rows, writing its own partial
sums, which are added in a fixed order: results do not depend on the thread count.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .. import config
from .._jit import interleave_run, parallel_kernel, serial_kernel, stack_tile
from ..kernels import _zeroed
from ..layouts import _batch_chunks, _sum_chunks, _task_runs
from .grouped import slower  # noqa: F401  (the same rule: large groups fill the channel tile)

NAME = "grouped-dw-windows"

#: Input channels per group: one pixel's channels are half a vector.
CG = 8

#: Output channels and filter rows per tile: with two vectors a row, 24 accumulators.
KB = 4
RB = 3


def why_not(geo, dtype, pass_):
    if pass_ != "grad_weight":
        return "it computes dW only"
    if geo.G == 1:
        return "it needs groups > 1"
    if geo.Cg != CG:
        return f"it needs {CG} input channels per group; got {geo.Cg}"
    if geo.S not in (3, 4):
        return f"it needs filters 3 or 4 taps wide, two vectors a filter row; got {geo.S}"
    if geo.dlw != 1:
        return f"it needs dilation 1 along the width; got {geo.dlw}"
    return None


def _padded(geo):
    """``(Hp, Wp)``: the rows and columns of the padded image the taps read (see the
    module docstring)."""
    return ((geo.OH - 1) * geo.sh + (geo.R - 1) * geo.dlh + 1, (geo.OW - 1) * geo.sw + 4)


def grad_weight(geo, x, dy):
    G, Kg, R, S = geo.G, geo.Kg, geo.R, geo.S
    Hp, Wp = _padded(geo)
    KBn, RBn = -(-Kg // KB), -(-R // RB)
    # Where each tile row starts in the padded image, rows past R repeating the block's
    # first: (RBn, RB) offsets in elements.
    r = np.arange(RBn)[:, None] * RB + np.arange(RB)
    r = np.where(r < R, r, np.arange(RBn)[:, None] * RB)
    ro = np.ascontiguousarray(r * geo.dlh * Wp * CG, np.int64)
    P = _batch_chunks(geo.N, geo.K * geo.OH * geo.OW * dy.dtype.itemsize,
                      config.DW_PIXEL_CHUNK_BYTES)
    nimg = -(-geo.N // P)  # the most samples in a chunk
    Q = _task_runs(P * G)
    xh = np.empty((Q, nimg, Hp * Wp * CG), x.dtype)
    part = np.empty((P, G, KBn, RBn, KB * RB * 2, 16), dy.dtype)
    grouped_window_dw(np.ascontiguousarray(x).reshape(geo.N * geo.C * geo.H * geo.W),
                       geo.C, geo.H, geo.W, geo.pt, geo.pl, geo.sh, geo.sw,
                       min(geo.H, Hp - geo.pt), min(geo.W, Wp - geo.pl), Wp,
                       np.ascontiguousarray(dy), ro, xh, part)
    # lanes (v, q) of a tile row are window lanes s*8 + c
    s = _sum_chunks(part).reshape(G, KBn, RBn, KB, RB, 32)[..., :S * CG]
    s = s.reshape(G, KBn, RBn, KB, RB, S, CG).transpose(0, 1, 3, 6, 2, 4, 5)
    s = s.reshape(G, KBn * KB, CG, RBn * RB, S)[:, :Kg, :, :R]
    return np.ascontiguousarray(s).reshape(geo.K, CG, R, S)


# ---- kernels ---------------------------------------------------------------------------


@parallel_kernel
def grouped_window_dw(x, C, H, W, pt, pl, sh, sw, hc, wc, Wp, dy, ro, xh, part):
    """dW of a grouped convolution with 8 input channels per group, vectorised over
    filter-row windows.

    ``part[p, g, kb, rb, (k*RB + rr)*2 + v, q] = sum_{n in chunk p} sum_{i, j} dy[n, g*Kg
    + min(kb*KB + k, Kg - 1), i, j] * xhf[n][(i*sh*Wp + j*sw)*8 + ro[rb, rr] + 16*v + q]``
    (module docstring); dW is ``part.sum(axis=0)``, its lanes rearranged.

    x : (N*C*H*W,)                  NCHW input, flattened, C-contiguous.
    C, H, W : int                   its channels, height and width.
    pt, pl, sh, sw : int            top and left padding, strides.
    hc, wc : int                    the input rows and columns a tap reads (from the first).
    Wp : int                        the padded image's width.
    dy : (N, K, OH, OW)             NCHW deltas, C-contiguous.
    ro : (RBn, RB) int64            where each tile row starts in a padded image.
    xh : (Q, nimg, Hp*Wp*8)         scratch: a chunk's padded images of one group.
    part : (P, G, KBn, RBn, 24, 16)
    """
    N, K, OH, OW = dy.shape
    P, G, KBn, RBn = part.shape[:4]
    Q, nimg = xh.shape[:2]
    Kg = K // G
    HW = H * W
    NT = P * G
    for q in prange(Q):
        xq = xh[q]
        _zeroed(xq)  # the padding, never written again
        for task in range(q * NT // Q, (q + 1) * NT // Q):
            g = task % G
            p = task // G
            n0, n1 = p * N // P, (p + 1) * N // P
            for n in range(n0, n1):
                xn = xq[n - n0]
                src = (n * C + g * CG) * HW
                for ih in range(hc):
                    interleave_run(xn, ((ih + pt) * Wp + pl) * CG, x, src + ih * W, HW, wc)
            for kb in range(KBn):
                for rb in range(RBn):
                    _windows_tile(xq, dy, n0, n1 - n0, g * Kg + kb * KB, g * Kg + Kg - 1,
                                  ro[rb], sh * Wp * CG, sw * CG, part[p, g, kb, rb])


@serial_kernel
def _windows_tile(xh, dy, n0, nimg, k0, kl, ro, rs, js, out):
    """One tile of :func:`grouped_window_dw`: ``out[(k*RB + rr)*2 + v, q] = sum_{n, i,
    j} dy[n0 + n, min(k0 + k, kl), i, j] * xh[n, i*rs + j*js + ro[rr] + 16*v + q]``, four
    channels times three rows times two vectors.  Compiled on its own, so that its tile
    stays in registers."""
    OH, OW = dy.shape[2], dy.shape[3]
    acc = stack_tile(24, 16, out.dtype)
    for a in range(24):
        for q in range(16):
            acc[a, q] = 0
    k1, k2, k3 = min(k0 + 1, kl), min(k0 + 2, kl), min(k0 + 3, kl)
    ujs = np.uint64(js)
    u16 = np.uint64(16)
    for n in range(nimg):
        xn = xh[n]
        for i in range(OH):
            d0 = dy[n0 + n, k0, i]
            d1 = dy[n0 + n, k1, i]
            d2 = dy[n0 + n, k2, i]
            d3 = dy[n0 + n, k3, i]
            b0 = np.uint64(i * rs + ro[0])
            b1 = np.uint64(i * rs + ro[1])
            b2 = np.uint64(i * rs + ro[2])
            for j in range(OW):
                e0 = d0[j]
                e1 = d1[j]
                e2 = d2[j]
                e3 = d3[j]
                o = np.uint64(j) * ujs
                for q in range(16):
                    uq = o + np.uint64(q)
                    x0 = xn[b0 + uq]
                    x1 = xn[b0 + uq + u16]
                    x2 = xn[b1 + uq]
                    x3 = xn[b1 + uq + u16]
                    x4 = xn[b2 + uq]
                    x5 = xn[b2 + uq + u16]
                    acc[0, q] += e0 * x0
                    acc[1, q] += e0 * x1
                    acc[2, q] += e0 * x2
                    acc[3, q] += e0 * x3
                    acc[4, q] += e0 * x4
                    acc[5, q] += e0 * x5
                    acc[6, q] += e1 * x0
                    acc[7, q] += e1 * x1
                    acc[8, q] += e1 * x2
                    acc[9, q] += e1 * x3
                    acc[10, q] += e1 * x4
                    acc[11, q] += e1 * x5
                    acc[12, q] += e2 * x0
                    acc[13, q] += e2 * x1
                    acc[14, q] += e2 * x2
                    acc[15, q] += e2 * x3
                    acc[16, q] += e2 * x4
                    acc[17, q] += e2 * x5
                    acc[18, q] += e3 * x0
                    acc[19, q] += e3 * x1
                    acc[20, q] += e3 * x2
                    acc[21, q] += e3 * x3
                    acc[22, q] += e3 * x4
                    acc[23, q] += e3 * x5
    for a in range(24):
        for q in range(16):
            out[a, q] = acc[a, q]
