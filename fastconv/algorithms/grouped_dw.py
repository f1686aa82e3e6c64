"""dW of grouped convolutions with the output channels as the vector lanes.

Legend: ``x`` (N, C, H, W) input, ``dy`` (N, K, OH, OW) deltas, ``dw`` (K, Cg, R, S) the
weight gradient; ``G`` groups of ``Cg = C/G`` input and ``Kg = K/G`` output channels; ``T =
Cg*R*S`` taps ``t = (c, r, s)`` per group; ``VL = 16`` lanes; strides, dilations and pads
as in :mod:`fastconv.algorithms.grouped`.

Why an algorithm of its own
---------------------------
The grouped algorithm's dW (:func:`fastconv.algorithms.grouped.grouped_dw_pixels`) puts
output pixels in the lanes: each step of its 4 x 5 tile loads 4 delta vectors and 5 input
vectors for 20 FMAs, the input loads unaligned (most split a cache line), and each tile
ends in lane sums.  In cache, on one thread, it makes 64-73 GF/s of the core's ~115 on 8
groups of 16 channels.  Here, as in oneDNN's AVX-512 weight gradient, the lanes are
output channels: a step loads one vector of ``VL`` deltas (one pixel of ``VL`` channels)
and multiplies it by ``TB = 24`` taps' inputs, each a broadcast folded into its FMA
(``vfmadd231ps m32{1to16}``).  That is one load per FMA, but a 4-byte one that never
splits a cache line, and there are no lane sums: 110-116 GF/s.  Every pixel is useful,
whatever the row length.

The layout needs ``Kg`` to be a multiple of ``VL``.  One group runs it too where it has
at most ``config.PIXEL_MAX_C`` input channels: a 7x7 stride-2 stem (3 channels, 64
outputs), whose taps come in rows of seven that :func:`_lanes_tile7s2` reads at two
offsets each, where the pixel dW's tile of 4 channels x 5 taps of pixel vectors ran at
0.68-0.89x PyTorch.  Groups of 8 (ResNeXt's 32 groups of
8) could hold a pair of pixels of 8 channels in a vector, with the pair of inputs
broadcast as one 8-byte value; that broadcast cannot be folded into the FMA, and the tile
made 68-80 GF/s, no faster on the whole pass than the grouped algorithm's.  Those groups
run :mod:`fastconv.algorithms.grouped_dw_windows`, whose lanes are a filter row's window
of input pixels and channels.

The math
--------
With ``xg[n]`` group ``g``'s input planes of image ``n`` split into stride phases and
flattened, and ``toff[i, t]`` where output row ``i`` reads tap ``t``
(:func:`fastconv.algorithms.grouped._rows`, rows not joined)::

    dw[g*Kg + kb*VL + k, t] = sum_{n, i, j} d[n, i, j, k] * xg[n][toff[i, t] + j],
    d[n, i, j, k] = dy[n, g*Kg + kb*VL + k, i, j]

``d`` is a transpose of each block of ``VL`` delta planes.  Taps past ``T`` (up to a
multiple of ``TB``) read offset 0, and the wrapper drops them.  Every product is one the
reference makes, so an inf or NaN reaches exactly the sums it is in.

Parallelism: tasks are (batch chunk, group, block of ``VL`` channels), cut into runs with
their own scratch; a task splits its chunk's ``Cg`` planes into stride phases
(:func:`fastconv.algorithms.grouped._group_planes`), unless the run's previous task did
so for the same chunk and group, transposes its block's deltas and runs every tap block,
writing its own partial sums, which are added in a fixed order: results do not depend on
the thread count.  The blocks as tasks of their own give one image of one group (a
stem's dW at batch 1) as many tasks as it has blocks.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from .. import config
from .._jit import parallel_kernel, serial_kernel, stack_tile, transpose16
from ..layouts import _batch_chunks, _sum_chunks, _task_runs
from .grouped import (
    _group_planes,
    _rows,
    slower,  # noqa: F401  (the same rule: large groups fill the channel tile)
)

NAME = "grouped-dw-lanes"

#: Lanes of the tile (float32 vectors of 16; float64 runs two vectors per row).
VL = 16

#: Taps per tile: 24 accumulators, one delta vector and a broadcast each.
TB = 24

#: Taps per tile of 7-tap rows at stride 2 (:func:`_lanes_tile7s2`): 4 rows, 28
#: accumulators.
TB7 = 28

#: The tiles :func:`_tile` chooses from: :func:`_lanes_tile`, :func:`_lanes_tile3`,
#: :func:`_lanes_tile7s2`.
GENERIC, ROWS3, ROWS7S2 = 0, 1, 2


def why_not(geo, dtype, pass_):
    if pass_ != "grad_weight":
        return "it computes dW only"
    if geo.G == 1 and geo.C > config.PIXEL_MAX_C:
        return (f"it needs groups > 1, or one group of at most {config.PIXEL_MAX_C} input "
                "channels")
    if geo.Kg % VL:
        return f"it needs output channels per group in multiples of {VL}; got {geo.Kg}"
    return None


def grad_weight(geo, x, dy):
    rows = _rows(geo, join=False)
    G, Kg, T = geo.G, geo.Kg, geo.Cg * geo.R * geo.S
    tile = _tile(geo)
    TBw = TB7 if tile == ROWS7S2 else TB
    KBn, TBn = Kg // VL, -(-T // TBw)
    toff = np.zeros((geo.OH, TBn * TBw), np.int64)  # taps past T read offset 0: dropped
    toff[:, :T] = rows.toff
    P = _batch_chunks(geo.N, geo.K * geo.OH * geo.OW * dy.dtype.itemsize,
                      config.DW_PIXEL_CHUNK_BYTES)
    nimg = -(-geo.N // P)  # the most samples in a chunk
    Q = _task_runs(P * G * KBn)
    grid = np.empty((Q, nimg, *rows.grid), x.dtype)  # each run zeroes its own
    d = np.empty((Q, nimg, geo.OH, geo.OW, VL), dy.dtype)
    part = np.empty((P, G, KBn, TBn, TBw, VL), dy.dtype)
    grouped_dw_lanes(np.ascontiguousarray(x).reshape(geo.N, geo.C, geo.H * geo.W), geo.W,
                     geo.pt, geo.pl, np.ascontiguousarray(dy), toff, grid, d, part, tile)
    dw = _sum_chunks(part).transpose(0, 1, 4, 2, 3).reshape(G, Kg, TBn * TBw)[:, :, :T]
    return np.ascontiguousarray(dw).reshape(geo.K, geo.Cg, geo.R, geo.S)


def _tile(geo) -> int:
    """Which tile runs ``geo``: ``ROWS3`` for rows of three taps (:func:`_rows3`),
    ``ROWS7S2`` for rows of seven at stride 2 (:func:`_rows7s2`), else ``GENERIC``."""
    return ROWS3 if _rows3(geo) else ROWS7S2 if _rows7s2(geo) else GENERIC


def _rows7s2(geo) -> bool:
    """Whether the taps come in rows of seven at stride 2 along the width, undilated (the
    7x7 stride-2 stem): tap ``(c, r, s)`` reads column ``s // 2`` of phase plane ``s %
    2`` (:func:`fastconv.algorithms.grouped._rows`), so a row's taps are its first tap's
    offset plus 0, 1, 2, 3 (``s`` even) and its second tap's plus 0, 1, 2 (``s`` odd)."""
    return geo.S == 7 and geo.sw == 2 and geo.dlw == 1


def _rows3(geo) -> bool:
    """Whether the taps ``t = (c, r, s)`` come in rows of three whose inputs are
    consecutive: ``S == 3`` (so that the blocks of ``TB = 24`` taps hold whole rows) at
    stride and dilation 1 along the width, where tap ``(c, r, s)`` reads ``toff[i, (c, r,
    0)] + s`` (:func:`fastconv.algorithms.grouped._rows`: ``sw == 1`` puts column ``s*dlw``
    at offset ``s*dlw``)."""
    return geo.S == 3 and geo.sw == 1 and geo.dlw == 1


# ---- kernels ---------------------------------------------------------------------------


@parallel_kernel
def grouped_dw_lanes(x, W, pt, pl, dy, toff, grid, d, part, tile):
    """dW of a grouped convolution, vectorised over output channels.

    ``part[p, g, kb, tb, a, k] = sum_{n in chunk p} sum_{i, j} dy[n, g*Kg + kb*VL + k, i,
    j] * xg[n][toff[i, tb*TB + a] + j]``; dW is ``part.sum(axis=0)``.

    x : (N, C, H*W)                 NCHW input, each plane flattened, C-contiguous.
    W, pt, pl : int                 the input's width, its top and left padding.
    dy : (N, K, OH, OW)             NCHW deltas, C-contiguous.
    toff : (OH, TBn*TBw) int64      the taps of one group (:func:`_rows`, rows not joined);
                                    ``TBw`` is ``TB7`` for ``ROWS7S2``, else ``TB``.
    grid : (Q, nimg, Cg, sh, sw, Hq, Wq)   scratch: a chunk's phase planes of a group.
    d : (Q, nimg, OH, OW, VL)       scratch: a block's deltas, pixel-major.
    part : (P, G, KBn, TBn, TBw, VL)
    tile : int                      :func:`_tile`: the taps in rows of 3 reading
                                    consecutive inputs run :func:`_lanes_tile3`, rows of 7
                                    at stride 2 :func:`_lanes_tile7s2`, which read each row
                                    at one or two offsets; others :func:`_lanes_tile`.
    """
    N, K, OH, OW = dy.shape
    P, G, KBn, TBn = part.shape[:4]
    Q, nimg, Cg = grid.shape[:3]
    Kg = K // G
    NT = P * G * KBn
    for q in prange(Q):
        gq = grid[q]
        xq = gq.reshape(nimg, gq.size // nimg)
        xq[:] = 0  # the padding, zero for every task of the run (a thread's own memset)
        dq = d[q]
        laid = -1  # the (chunk, group) whose planes the run's scratch holds
        for task in range(q * NT // Q, (q + 1) * NT // Q):
            kb = task % KBn
            pg = task // KBn
            g = pg % G
            p = pg // G
            n0, n1 = p * N // P, (p + 1) * N // P
            if pg != laid:
                for n in range(n0, n1):
                    _group_planes(x, n, g * Cg, W, gq[n - n0], pt, pl, False)
                laid = pg
            k0 = g * Kg + kb * VL
            for n in range(n0, n1):
                _lanes_deltas(dy[n].reshape(K * OH * OW), k0, OH * OW,
                              dq[n - n0].reshape(OH * OW * VL))
            for tb in range(TBn):
                if tile == ROWS3:
                    _lanes_tile3(xq, dq, toff, n1 - n0, tb, part[p, g, kb, tb])
                elif tile == ROWS7S2:
                    _lanes_tile7s2(xq, dq, toff, n1 - n0, tb, part[p, g, kb, tb])
                else:
                    _lanes_tile(xq, dq, toff, n1 - n0, tb, part[p, g, kb, tb])


@numba.njit(inline="always")
def _lanes_deltas(dyn, k0, M, df):
    """``df[u*VL + k] = dyn[(k0 + k)*M + u]`` for the ``M`` pixels of one image's block of
    ``VL`` channels, ``dyn`` its planes flattened: blocks of 16 pixels transposed in
    registers (:func:`fastconv._jit.transpose16`), the rest element by element."""
    done = M // VL * VL
    for u in range(0, done, VL):
        transpose16(dyn, k0 * M + u, M, df, u * VL, VL)
    for u in range(done, M):
        for k in range(VL):
            df[u * VL + k] = dyn[(k0 + k) * M + u]


@serial_kernel
def _lanes_tile(x, d, toff, nimg, tb, out):
    """One tile of :func:`grouped_dw_lanes` (:func:`_lanes_products`), compiled on its
    own, so that its tile stays in registers."""
    _lanes_products(x, d, toff, nimg, tb, out)


@numba.njit(inline="always")
def _lanes_products(x, d, toff, nimg, tb, out):
    """``out[a, k] = sum_{n, i, j} d[n, i, j, k] * x[n, toff[i, tb*TB + a] + j]``, ``TB``
    taps times ``VL`` channels in registers, each input a broadcast folded into its FMA."""
    OH = toff.shape[0]
    acc = stack_tile(24, 16, out.dtype)  # TB rows of VL lanes
    for a in range(TB):
        for q in range(VL):
            acc[a, q] = 0
    for n in range(nimg):
        xn = x[n]
        for i in range(OH):
            ro = toff[i]
            dr = d[n, i]
            o0 = np.uint64(ro[tb * TB + 0])
            o1 = np.uint64(ro[tb * TB + 1])
            o2 = np.uint64(ro[tb * TB + 2])
            o3 = np.uint64(ro[tb * TB + 3])
            o4 = np.uint64(ro[tb * TB + 4])
            o5 = np.uint64(ro[tb * TB + 5])
            o6 = np.uint64(ro[tb * TB + 6])
            o7 = np.uint64(ro[tb * TB + 7])
            o8 = np.uint64(ro[tb * TB + 8])
            o9 = np.uint64(ro[tb * TB + 9])
            o10 = np.uint64(ro[tb * TB + 10])
            o11 = np.uint64(ro[tb * TB + 11])
            o12 = np.uint64(ro[tb * TB + 12])
            o13 = np.uint64(ro[tb * TB + 13])
            o14 = np.uint64(ro[tb * TB + 14])
            o15 = np.uint64(ro[tb * TB + 15])
            o16 = np.uint64(ro[tb * TB + 16])
            o17 = np.uint64(ro[tb * TB + 17])
            o18 = np.uint64(ro[tb * TB + 18])
            o19 = np.uint64(ro[tb * TB + 19])
            o20 = np.uint64(ro[tb * TB + 20])
            o21 = np.uint64(ro[tb * TB + 21])
            o22 = np.uint64(ro[tb * TB + 22])
            o23 = np.uint64(ro[tb * TB + 23])
            for j in range(dr.shape[0]):
                dv = dr[j]
                uj = np.uint64(j)
                x0 = xn[o0 + uj]
                x1 = xn[o1 + uj]
                x2 = xn[o2 + uj]
                x3 = xn[o3 + uj]
                x4 = xn[o4 + uj]
                x5 = xn[o5 + uj]
                x6 = xn[o6 + uj]
                x7 = xn[o7 + uj]
                x8 = xn[o8 + uj]
                x9 = xn[o9 + uj]
                x10 = xn[o10 + uj]
                x11 = xn[o11 + uj]
                x12 = xn[o12 + uj]
                x13 = xn[o13 + uj]
                x14 = xn[o14 + uj]
                x15 = xn[o15 + uj]
                x16 = xn[o16 + uj]
                x17 = xn[o17 + uj]
                x18 = xn[o18 + uj]
                x19 = xn[o19 + uj]
                x20 = xn[o20 + uj]
                x21 = xn[o21 + uj]
                x22 = xn[o22 + uj]
                x23 = xn[o23 + uj]
                for q in range(VL):
                    e = dv[q]
                    acc[0, q] += e * x0
                    acc[1, q] += e * x1
                    acc[2, q] += e * x2
                    acc[3, q] += e * x3
                    acc[4, q] += e * x4
                    acc[5, q] += e * x5
                    acc[6, q] += e * x6
                    acc[7, q] += e * x7
                    acc[8, q] += e * x8
                    acc[9, q] += e * x9
                    acc[10, q] += e * x10
                    acc[11, q] += e * x11
                    acc[12, q] += e * x12
                    acc[13, q] += e * x13
                    acc[14, q] += e * x14
                    acc[15, q] += e * x15
                    acc[16, q] += e * x16
                    acc[17, q] += e * x17
                    acc[18, q] += e * x18
                    acc[19, q] += e * x19
                    acc[20, q] += e * x20
                    acc[21, q] += e * x21
                    acc[22, q] += e * x22
                    acc[23, q] += e * x23
    for a in range(TB):
        for q in range(VL):
            out[a, q] = acc[a, q]


@serial_kernel
def _lanes_tile3(x, d, toff, nimg, tb, out):
    """:func:`_lanes_tile` for taps in rows of three consecutive inputs (:func:`_rows3`):
    ``TB = 24`` taps as 8 rows, each read at its first tap's offset and the next two.
    The generic tile holds 24 offsets, more than the 16 general registers: LLVM reloaded
    12 of them from the stack at every step, 37 loads for 24 FMAs.  Eight offsets fit, and
    the step is one delta vector and 24 broadcasts folded into their FMAs, their
    displacements 0, 4 and 8 bytes from the row's offset: the 8 groups of 16 channels of
    ``bench/cases.py`` (3x3, 28², batch 16) took 1.9-2.0 ms for dW, 2.2-2.3 with the
    generic tile."""
    OH = toff.shape[0]
    acc = stack_tile(24, 16, out.dtype)  # TB rows of VL lanes: tap 3*row + column
    for a in range(TB):
        for q in range(VL):
            acc[a, q] = 0
    u1 = np.uint64(1)
    u2 = np.uint64(2)
    for n in range(nimg):
        xn = x[n]
        for i in range(OH):
            ro = toff[i]
            dr = d[n, i]
            o0 = np.uint64(ro[tb * TB + 0])
            o1 = np.uint64(ro[tb * TB + 3])
            o2 = np.uint64(ro[tb * TB + 6])
            o3 = np.uint64(ro[tb * TB + 9])
            o4 = np.uint64(ro[tb * TB + 12])
            o5 = np.uint64(ro[tb * TB + 15])
            o6 = np.uint64(ro[tb * TB + 18])
            o7 = np.uint64(ro[tb * TB + 21])
            for j in range(dr.shape[0]):
                dv = dr[j]
                uj = np.uint64(j)
                a0 = o0 + uj
                a1 = o1 + uj
                a2 = o2 + uj
                a3 = o3 + uj
                a4 = o4 + uj
                a5 = o5 + uj
                a6 = o6 + uj
                a7 = o7 + uj
                x00 = xn[a0]
                x01 = xn[a0 + u1]
                x02 = xn[a0 + u2]
                x10 = xn[a1]
                x11 = xn[a1 + u1]
                x12 = xn[a1 + u2]
                x20 = xn[a2]
                x21 = xn[a2 + u1]
                x22 = xn[a2 + u2]
                x30 = xn[a3]
                x31 = xn[a3 + u1]
                x32 = xn[a3 + u2]
                x40 = xn[a4]
                x41 = xn[a4 + u1]
                x42 = xn[a4 + u2]
                x50 = xn[a5]
                x51 = xn[a5 + u1]
                x52 = xn[a5 + u2]
                x60 = xn[a6]
                x61 = xn[a6 + u1]
                x62 = xn[a6 + u2]
                x70 = xn[a7]
                x71 = xn[a7 + u1]
                x72 = xn[a7 + u2]
                for q in range(VL):
                    e = dv[q]
                    acc[0, q] += e * x00
                    acc[1, q] += e * x01
                    acc[2, q] += e * x02
                    acc[3, q] += e * x10
                    acc[4, q] += e * x11
                    acc[5, q] += e * x12
                    acc[6, q] += e * x20
                    acc[7, q] += e * x21
                    acc[8, q] += e * x22
                    acc[9, q] += e * x30
                    acc[10, q] += e * x31
                    acc[11, q] += e * x32
                    acc[12, q] += e * x40
                    acc[13, q] += e * x41
                    acc[14, q] += e * x42
                    acc[15, q] += e * x50
                    acc[16, q] += e * x51
                    acc[17, q] += e * x52
                    acc[18, q] += e * x60
                    acc[19, q] += e * x61
                    acc[20, q] += e * x62
                    acc[21, q] += e * x70
                    acc[22, q] += e * x71
                    acc[23, q] += e * x72
    for a in range(TB):
        for q in range(VL):
            out[a, q] = acc[a, q]


@serial_kernel
def _lanes_tile7s2(x, d, toff, nimg, tb, out):
    """:func:`_lanes_tile` for rows of seven taps at stride 2 (:func:`_rows7s2`): ``TB7 =
    28`` taps as 4 rows, row ``k`` read at two offsets, ``e`` of its even taps (then
    ``+1, +2, +3``) and ``f`` of its odd ones (``+1, +2``): 8 offsets in general
    registers, one delta vector and 28 folded broadcasts a step.  On the 7x7 stride-2 stem
    of ``bench/cases.py`` (batch 8) it took 7.7-7.9 ms for dW, the generic tile 8.7-9.4
    and the pixel dW 10.5-11.2."""
    OH = toff.shape[0]
    acc = stack_tile(28, 16, out.dtype)  # TB7 rows of VL lanes: tap 7*row + s
    for a in range(TB7):
        for q in range(VL):
            acc[a, q] = 0
    u1 = np.uint64(1)
    u2 = np.uint64(2)
    u3 = np.uint64(3)
    for n in range(nimg):
        xn = x[n]
        for i in range(OH):
            ro = toff[i]
            dr = d[n, i]
            e0 = np.uint64(ro[tb * TB7 + 0])
            f0 = np.uint64(ro[tb * TB7 + 1])
            e1 = np.uint64(ro[tb * TB7 + 7])
            f1 = np.uint64(ro[tb * TB7 + 8])
            e2 = np.uint64(ro[tb * TB7 + 14])
            f2 = np.uint64(ro[tb * TB7 + 15])
            e3 = np.uint64(ro[tb * TB7 + 21])
            f3 = np.uint64(ro[tb * TB7 + 22])
            for j in range(dr.shape[0]):
                dv = dr[j]
                uj = np.uint64(j)
                a0 = e0 + uj
                b0 = f0 + uj
                a1 = e1 + uj
                b1 = f1 + uj
                a2 = e2 + uj
                b2 = f2 + uj
                a3 = e3 + uj
                b3 = f3 + uj
                x00 = xn[a0]
                x01 = xn[b0]
                x02 = xn[a0 + u1]
                x03 = xn[b0 + u1]
                x04 = xn[a0 + u2]
                x05 = xn[b0 + u2]
                x06 = xn[a0 + u3]
                x10 = xn[a1]
                x11 = xn[b1]
                x12 = xn[a1 + u1]
                x13 = xn[b1 + u1]
                x14 = xn[a1 + u2]
                x15 = xn[b1 + u2]
                x16 = xn[a1 + u3]
                x20 = xn[a2]
                x21 = xn[b2]
                x22 = xn[a2 + u1]
                x23 = xn[b2 + u1]
                x24 = xn[a2 + u2]
                x25 = xn[b2 + u2]
                x26 = xn[a2 + u3]
                x30 = xn[a3]
                x31 = xn[b3]
                x32 = xn[a3 + u1]
                x33 = xn[b3 + u1]
                x34 = xn[a3 + u2]
                x35 = xn[b3 + u2]
                x36 = xn[a3 + u3]
                for q in range(VL):
                    e = dv[q]
                    acc[0, q] += e * x00
                    acc[1, q] += e * x01
                    acc[2, q] += e * x02
                    acc[3, q] += e * x03
                    acc[4, q] += e * x04
                    acc[5, q] += e * x05
                    acc[6, q] += e * x06
                    acc[7, q] += e * x10
                    acc[8, q] += e * x11
                    acc[9, q] += e * x12
                    acc[10, q] += e * x13
                    acc[11, q] += e * x14
                    acc[12, q] += e * x15
                    acc[13, q] += e * x16
                    acc[14, q] += e * x20
                    acc[15, q] += e * x21
                    acc[16, q] += e * x22
                    acc[17, q] += e * x23
                    acc[18, q] += e * x24
                    acc[19, q] += e * x25
                    acc[20, q] += e * x26
                    acc[21, q] += e * x30
                    acc[22, q] += e * x31
                    acc[23, q] += e * x32
                    acc[24, q] += e * x33
                    acc[25, q] += e * x34
                    acc[26, q] += e * x35
                    acc[27, q] += e * x36
    for a in range(TB7):
        for q in range(VL):
            out[a, q] = acc[a, q]
