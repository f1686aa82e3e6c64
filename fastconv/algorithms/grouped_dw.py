"""dW of grouped convolutions with the output channels as the vector lanes.

Legend: ``x`` (N, C, H, W) input, ``dy`` (N, K, OH, OW) deltas, ``dw`` (K, Cg, R, S) the
weight gradient; ``G`` groups of ``Cg = C/G`` input and ``Kg = K/G`` output channels; ``T =
Cg*R*S`` taps ``t = (c, r, s)`` per group; ``VL = 16`` lanes; strides, dilations and pads
as in :mod:`fastconv.algorithms.grouped`.

Why an algorithm of its own
---------------------------
The grouped algorithm's dW (:func:`fastconv.algorithms.grouped.grouped_dw_pixels`) puts
output pixels in the lanes: each step of its 4 x 5 tile loads 4 delta vectors and 5 input
vectors for 20 FMAs, and each tile ends in lane sums; rows of 14 or 28 pixels also leave
lanes idle.  In cache, on one thread, it makes 64-73 GF/s of the core's ~115 on 8 groups
of 16 channels, 49-56 GF/s on 32 groups of 8.  Here, as in oneDNN's AVX-512 weight
gradient, the lanes are output channels: a step loads one vector of ``VL`` deltas (one
pixel of ``VL`` channels) and multiplies it by ``TB = 24`` taps' inputs, each a broadcast
folded into its FMA (``vfmadd231ps m32{1to16}``).  That is one load per FMA, but a
4-byte one that never splits a cache line, and no lane sums: 100 GF/s and 81 GF/s on the
two shapes above.  Every pixel is useful, whatever the row length.

The math
--------
With ``xg[n]`` group ``g``'s input planes of image ``n`` split into stride phases and
flattened, and ``toff[i, t]`` where output row ``i`` reads tap ``t``
(:func:`fastconv.algorithms.grouped._rows`, rows not joined)::

    dw[g*Kg + k, t] = sum_{n, i, j} dy[n, g*Kg + k, i, j] * xg[n][toff[i, t] + j]

Lanes hold ``L`` pixels of ``VL / L`` channels, lane ``q = k*L + v`` pixel ``j = L*jp +
v`` of channel ``k``:

* ``L = 1`` when ``Kg`` is a multiple of ``VL``: blocks of ``VL`` channels, and the input
  operand is one value broadcast to every lane.
* ``L = 2`` when ``Kg = VL/2`` (32 groups of 8, ResNeXt's): both pixels of a pair, and
  the input operand is the pair ``xg[n][toff[i, t] + 2*jp + (0, 1)]``, adjacent in memory,
  broadcast as one 8-byte value (``vbroadcastsd``).  Each lane sums its own pixel, and the
  two lanes of a channel are added at the end.  Rows of odd length get a zero delta past
  their end, whose input is the element after the row; an inf or NaN there would make a
  NaN that no real product makes, so such an input goes to the next algorithm.

The deltas are laid out as ``d[n, i, jp, q]`` (a transpose of each block's planes).  Taps
past ``T`` (up to a multiple of ``TB``) read offset 0, and the wrapper drops them.
Non-finite values otherwise reach exactly the sums of the products they are in.

Parallelism: tasks are (batch chunk, group), cut into runs with their own scratch; a task
splits its chunk's ``Cg`` planes into stride phases (:func:`fastconv.kernels._phase_fill`)
and, for each block of channels, transposes its deltas and runs every tap block, writing
its own partial sums, which are added in a fixed order: results do not depend on the thread
count.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from .. import config
from .._jit import parallel_kernel, serial_kernel, stack_tile, transpose16
from ..geometry import ConvGeometry
from ..kernels import _finite, _phase_fill
from ..layouts import _batch_chunks, _sum_chunks
from .grouped import _rows

NAME = "grouped-dw-lanes"

#: Lanes of the tile (float32 vectors of 16; float64 runs two vectors per row).
VL = 16

#: Taps per tile: 24 accumulators, one delta vector and a broadcast each.
TB = 24


def _pixels_per_vector(geo: ConvGeometry) -> int:
    """``L``, the pixels one vector holds, or 0 where ``Kg`` fits neither layout."""
    if geo.Kg % VL == 0:
        return 1
    if 2 * geo.Kg == VL:
        return 2
    return 0


def why_not(geo, dtype, pass_):
    if pass_ != "grad_weight":
        return "it computes dW only"
    if geo.G == 1:
        return "it needs groups > 1"
    if not _pixels_per_vector(geo):
        return (f"it needs output channels per group that are a multiple of {VL} or "
                f"{VL // 2}; got {geo.Kg}")
    return None


def slower(geo, dtype, pass_):
    if np.dtype(dtype) == np.float64 and _pixels_per_vector(geo) == 2:
        return ("float64 pairs of pixels fill two vectors a step, whose broadcasts cost more "
                "than the grouped algorithm's pixel tile")
    if geo.Cg >= config.GROUPED_MAX_CG and geo.Kg >= config.GROUPED_MAX_CG:
        return (f"groups of at least {config.GROUPED_MAX_CG} input and output channels fill "
                "the channel tile's vectors (config.GROUPED_MAX_CG)")
    return None


def grad_weight(geo, x, dy):
    L = _pixels_per_vector(geo)
    rows = _rows(geo, join=False)
    G, Kg, T = geo.G, geo.Kg, geo.Cg * geo.R * geo.S
    KB = VL // L  # channels per block
    KBn, TBn = Kg // KB, -(-T // TB)
    toff = np.zeros((geo.OH, TBn * TB), np.int64)  # taps past T read offset 0: dropped
    toff[:, :T] = rows.toff
    P = _batch_chunks(geo.N, geo.K * geo.OH * geo.OW * dy.dtype.itemsize,
                      config.DW_PIXEL_CHUNK_BYTES)
    nimg = -(-geo.N // P)  # the most samples in a chunk
    Q = max(1, min(P * G, config.GROUPED_TASKS_PER_THREAD * numba.get_num_threads()))
    # One element past each image's planes: the input after an odd row's last pixel.
    grid = np.empty((Q, nimg, rows.gstep + 1), x.dtype)
    d = np.empty((Q, nimg, geo.OH, -(-geo.OW // L), VL), dy.dtype)
    bad = np.zeros(Q, np.bool_)
    part = np.empty((P, G, KBn, TBn, TB, VL), dy.dtype)
    grouped_dw_lanes(np.ascontiguousarray(x).reshape(geo.N, geo.C, geo.H * geo.W), geo.W,
                     geo.pt, geo.pl, np.ascontiguousarray(dy), toff, rows.grid[1:], L, grid,
                     d, bad, part)
    if bad.any():
        return None
    s = _sum_chunks(part)  # (G, KBn, TBn, TB, VL): lane q = k*L + v
    if L > 1:
        s = s.reshape(G, KBn, TBn, TB, KB, L).sum(axis=5)
    dw = s.transpose(0, 1, 4, 2, 3).reshape(G, Kg, TBn * TB)[:, :, :T]
    return np.ascontiguousarray(dw).reshape(geo.K, geo.Cg, geo.R, geo.S)


# ---- kernels ---------------------------------------------------------------------------


@parallel_kernel
def grouped_dw_lanes(x, W, pt, pl, dy, toff, phases, L, grid, d, bad, part):
    """dW of a grouped convolution, vectorised over output channels.

    ``part[p, g, kb, tb, a, k*L + v] = sum_{n in chunk p} sum_{i, jp} dy[n, g*Kg + kb*KB
    + k, i, L*jp + v] * xg[n][toff[i, tb*TB + a] + L*jp + v]`` (zero deltas past ``OW``),
    ``KB = VL / L``.

    x : (N, C, H*W)                 NCHW input, each plane flattened, C-contiguous.
    W, pt, pl : int                 the input's width, its top and left padding.
    dy : (N, K, OH, OW)             NCHW deltas, C-contiguous.
    toff : (OH, TBn*TB) int64       the taps of one group (:func:`_rows`, rows not joined).
    phases : (sh, sw, Hq, Wq)       the shape of one plane's stride phases.
    L : int                         the pixels per vector, 1 or 2.
    grid : (Q, nimg, >= Cg*sh*sw*Hq*Wq + 1)   scratch: a chunk's phase planes of a group.
    d : (Q, nimg, OH, OWp, VL)      scratch: a block's deltas, lanes ``k*L + v``.
    bad : (Q,) bool                 set where an odd row's padding pixel met an inf or NaN.
    part : (P, G, KBn, TBn, TB, VL)
    """
    N, K, OH, OW = dy.shape
    P, G, KBn, TBn = part.shape[:4]
    Q, nimg = grid.shape[:2]
    OWp = d.shape[3]
    KB = VL // L
    Kg = K // G
    Cg = x.shape[1] // G
    sh, sw, Hq, Wq = phases
    plane = sh * sw * Hq * Wq
    odd = L * OWp > OW
    NT = P * G
    for q in prange(Q):
        gq = grid[q]
        dq = d[q]
        for task in range(q * NT // Q, (q + 1) * NT // Q):
            g = task % G
            p = task // G
            n0, n1 = p * N // P, (p + 1) * N // P
            for n in range(n0, n1):
                gn = gq[n - n0]
                gn[Cg * plane] = 0
                for c in range(Cg):
                    xc = x[n, g * Cg + c]
                    _phase_fill(xc, W, gn[c * plane:(c + 1) * plane].reshape(sh, sw, Hq, Wq),
                                pt, pl)
                    if odd and not _finite(xc):
                        bad[q] = True
            for kb in range(KBn):
                k0 = g * Kg + kb * KB
                for n in range(n0, n1):
                    _lanes_deltas(dy[n].reshape(K * OH * OW), k0, OH, OW, L, dq[n - n0])
                for tb in range(TBn):
                    if L == 1:
                        _lanes_tile1(gq, dq, toff, n1 - n0, tb, part[p, g, kb, tb])
                    else:
                        _lanes_tile2(gq, dq, toff, n1 - n0, tb, part[p, g, kb, tb])


@numba.njit(inline="always")
def _lanes_deltas(dyn, k0, OH, OW, L, dn):
    """``dn[i, jp, k*L + v] = dy[k0 + k, i, L*jp + v]`` (zero past ``OW``) for one image's
    block of ``VL / L`` channels, ``dyn`` its planes flattened: with ``L = 1`` (and with
    ``L = 2`` on rows of even length, as 8-byte pairs) blocks of 16 pixels transposed in
    registers (:func:`fastconv._jit.transpose16`), the rest element by element."""
    M = OH * OW
    df = dn.reshape(dn.size)
    if L == 1:
        done = M // VL * VL
        for u in range(0, done, VL):
            transpose16(dyn, k0 * M + u, M, df, u * VL, VL)
        for u in range(done, M):
            for k in range(VL):
                df[u * VL + k] = dyn[(k0 + k) * M + u]
    elif OW % 2 == 0:
        for pp in range(M // 2):
            for k in range(VL // 2):
                df[pp * VL + 2 * k] = dyn[(k0 + k) * M + 2 * pp]
                df[pp * VL + 2 * k + 1] = dyn[(k0 + k) * M + 2 * pp + 1]
    else:
        OWp = dn.shape[1]
        for i in range(OH):
            for jp in range(OWp):
                for k in range(VL // 2):
                    for v in range(2):
                        j = 2 * jp + v
                        df[(i * OWp + jp) * VL + 2 * k + v] = (
                            dyn[((k0 + k) * OH + i) * OW + j] if j < OW else 0)


@serial_kernel
def _lanes_tile1(x, d, toff, nimg, tb, out):
    """One tile of :func:`grouped_dw_lanes` with ``L = 1``: ``out[a, k] = sum_{n, i, j}
    d[n, i, j, k] * x[n, toff[i, tb*TB + a] + j]``, ``TB`` taps times ``VL`` channels,
    each input broadcast.  Compiled on its own, so that its tile stays in registers."""
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
            for jp in range(dr.shape[0]):
                dv = dr[jp]
                uj = np.uint64(jp)
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
def _lanes_tile2(x, d, toff, nimg, tb, out):
    """One tile of :func:`grouped_dw_lanes` with ``L = 2``: lane ``2*k + v`` of ``out[a]``
    sums ``d[n, i, jp, 2*k + v] * x[n, toff[i, tb*TB + a] + 2*jp + v]``, the input pair of
    each step broadcast as one 8-byte value."""
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
            for jp in range(dr.shape[0]):
                dv = dr[jp]
                uj = np.uint64(2 * jp)
                uk = uj + np.uint64(1)
                x0, y0 = xn[o0 + uj], xn[o0 + uk]
                x1, y1 = xn[o1 + uj], xn[o1 + uk]
                x2, y2 = xn[o2 + uj], xn[o2 + uk]
                x3, y3 = xn[o3 + uj], xn[o3 + uk]
                x4, y4 = xn[o4 + uj], xn[o4 + uk]
                x5, y5 = xn[o5 + uj], xn[o5 + uk]
                x6, y6 = xn[o6 + uj], xn[o6 + uk]
                x7, y7 = xn[o7 + uj], xn[o7 + uk]
                x8, y8 = xn[o8 + uj], xn[o8 + uk]
                x9, y9 = xn[o9 + uj], xn[o9 + uk]
                x10, y10 = xn[o10 + uj], xn[o10 + uk]
                x11, y11 = xn[o11 + uj], xn[o11 + uk]
                x12, y12 = xn[o12 + uj], xn[o12 + uk]
                x13, y13 = xn[o13 + uj], xn[o13 + uk]
                x14, y14 = xn[o14 + uj], xn[o14 + uk]
                x15, y15 = xn[o15 + uj], xn[o15 + uk]
                x16, y16 = xn[o16 + uj], xn[o16 + uk]
                x17, y17 = xn[o17 + uj], xn[o17 + uk]
                x18, y18 = xn[o18 + uj], xn[o18 + uk]
                x19, y19 = xn[o19 + uj], xn[o19 + uk]
                x20, y20 = xn[o20 + uj], xn[o20 + uk]
                x21, y21 = xn[o21 + uj], xn[o21 + uk]
                x22, y22 = xn[o22 + uj], xn[o22 + uk]
                x23, y23 = xn[o23 + uj], xn[o23 + uk]
                for q in range(VL):
                    e = dv[q]
                    odd = (q & 1) == 1
                    acc[0, q] += e * (y0 if odd else x0)
                    acc[1, q] += e * (y1 if odd else x1)
                    acc[2, q] += e * (y2 if odd else x2)
                    acc[3, q] += e * (y3 if odd else x3)
                    acc[4, q] += e * (y4 if odd else x4)
                    acc[5, q] += e * (y5 if odd else x5)
                    acc[6, q] += e * (y6 if odd else x6)
                    acc[7, q] += e * (y7 if odd else x7)
                    acc[8, q] += e * (y8 if odd else x8)
                    acc[9, q] += e * (y9 if odd else x9)
                    acc[10, q] += e * (y10 if odd else x10)
                    acc[11, q] += e * (y11 if odd else x11)
                    acc[12, q] += e * (y12 if odd else x12)
                    acc[13, q] += e * (y13 if odd else x13)
                    acc[14, q] += e * (y14 if odd else x14)
                    acc[15, q] += e * (y15 if odd else x15)
                    acc[16, q] += e * (y16 if odd else x16)
                    acc[17, q] += e * (y17 if odd else x17)
                    acc[18, q] += e * (y18 if odd else x18)
                    acc[19, q] += e * (y19 if odd else x19)
                    acc[20, q] += e * (y20 if odd else x20)
                    acc[21, q] += e * (y21 if odd else x21)
                    acc[22, q] += e * (y22 if odd else x22)
                    acc[23, q] += e * (y23 if odd else x23)
    for a in range(TB):
        for q in range(VL):
            out[a, q] = acc[a, q]
