"""The pixel-vectorised kernels: output pixels as the vector lanes, for layers whose
channels would leave the channel tile's vectors empty.

They run the forward pass and dW of layers with few input channels (``C`` at most
``config.PIXEL_MAX_C``, the first layer of an image network) or a 1x1, stride-1, unpadded
layer (a matrix product per image), and dX of the latter (the forward pass with the roles
of C and K swapped).  The input is laid out so that consecutive output pixels read
consecutive inputs for every tap (:func:`fastconv.layouts._pixel_input`).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from .. import config
from .._jit import copy_run, parallel_kernel, split_run, stack_tile
from ..geometry import ConvGeometry, conv_geometry
from ..kernels import _chunk_task
from ..layouts import (
    _FRESH,
    PixelInput,
    PooledDeltas,
    _batch_chunks,
    _parity_taps,
    _pixel_input,
    _sum_chunks,
    _task_runs,
)

NAME = "pixel"


def why_not(geo, dtype, pass_):
    if geo.G != 1:
        return "it needs one group"
    one_by_one = _one_by_one(geo)
    if pass_ == "grad_input" and not one_by_one:
        return "its dX is a 1x1, stride-1, unpadded layer's only"
    if not (one_by_one or geo.C <= config.PIXEL_MAX_C):
        return (f"it needs at most {config.PIXEL_MAX_C} input channels or a 1x1, "
                "stride-1, unpadded layer")
    if not _pixel_ok(geo):
        return "its output rows are shorter than one vector of pixels"
    return None


def slower(geo, dtype, pass_):
    from . import grouped_dw  # imported here: grouped_dw imports grouped, which imports this

    if (pass_ == "grad_weight" and grouped_dw.why_not(geo, dtype, pass_) is None
            and grouped_dw._rows7s2(geo)):
        return ("grouped-dw-lanes's tile for rows of 7 taps at stride 2 runs this dW (a "
                "7x7 stride-2 stem with output channels in multiples of 16) faster")
    return None


def forward(geo, x, w, b):
    return _forward_pixels(x, w, b, geo)


def grad_input(geo, dy, w):
    # dx[n] = W^T dy[n] per image: the 1x1 forward pass with the roles of C and K swapped.
    tgeo = conv_geometry((geo.N, geo.K, geo.H, geo.W), (geo.C, geo.K, 1, 1))
    return _forward_pixels(np.ascontiguousarray(dy), w.transpose(1, 0, 2, 3), None, tgeo)


def grad_weight(geo, x, dy):
    return _grad_weight_pixels(x, dy, geo)


def _one_by_one(geo: ConvGeometry) -> bool:
    """A 1x1, stride-1, unpadded layer: a matrix product per image."""
    return (geo.R, geo.S, geo.sh, geo.sw) == (1, 1, 1, 1) and geo.pads == (0, 0, 0, 0)


def _pixel_ok(geo: ConvGeometry) -> bool:
    """Whether the pixel-vectorised kernels run this layer's forward pass and dW.

    They need one group, and either few input channels (the first layer of an image
    network: the channel tile would have only ``C*R*S`` steps per tile, and its dW a
    transposing delta pack) or a 1x1, stride-1, unpadded layer (a matrix product per
    image, read as it is).  And rows of at least ``PX`` output pixels, a stride-1 layer's
    rows being joined into one (:func:`_pixel_input`).
    """
    if geo.G != 1:
        return False
    if not (_one_by_one(geo) or geo.C <= config.PIXEL_MAX_C):
        return False
    joined = geo.sh == 1 or (geo.sh, geo.sw) == (2, 2)  # see _pixel_input
    return (geo.OH * geo.OW if joined else geo.OW) >= PX


def _grad_weight_pixels(x: np.ndarray, dy: np.ndarray, geo: ConvGeometry) -> np.ndarray:
    """dW (K, C, R, S) by :func:`kernels.conv_dw_pixels` from NCHW ``x`` and ``dy`` in
    one dtype."""
    px = _pixel_input(x, geo)
    return _grad_weight_pixel_input(px, np.ascontiguousarray(dy).reshape(
        geo.N, geo.K, px.OH, px.OW), geo)


def _grad_weight_pixel_input(px: PixelInput, dy, geo: ConvGeometry) -> np.ndarray:
    """dW (K, C, R, S) from the input as the pixel kernels read it and C-contiguous deltas
    ``dy`` (N, K, px.OH, px.OW) in its rows, or :class:`PooledDeltas` of its four
    pool-order rows."""
    N, C, K, R, S = geo.N, geo.C, geo.K, geo.R, geo.S
    T = C * R * S
    TTn, KTn = -(-T // DT), -(-K // DK)
    toff = np.zeros((px.OH, TTn * DT), np.int64)
    toff[:, :T] = px.toff
    # Batch chunks of config.DW_PIXEL_CHUNK_BYTES of deltas, which stay in a core's L2
    # while the tasks sweep them (shapes only).  Each task ends with a horizontal sum of its
    # 20 vectors.
    dtype = px.xf.dtype
    P = _batch_chunks(N, K * px.OH * px.OW * dtype.itemsize, config.DW_PIXEL_CHUNK_BYTES)
    part = np.empty((P, KTn, TTn, DK, DT), dtype)
    if isinstance(dy, PooledDeltas):
        conv_dw_pool_planes(px.xf, dy.g, dy.sel, toff, part)
    else:
        conv_dw_pixels(px.xf, dy, toff, part)
    dw = np.empty((K, T), dtype)
    dw[:, px.taps] = _sum_chunks(part).transpose(0, 2, 1, 3).reshape(
        KTn * DK, TTn * DT)[:K, :T]
    return dw.reshape(K, C, R, S)


def _forward_pixels(x, w, b, geo: ConvGeometry, ws=_FRESH) -> np.ndarray:
    """y (N, K, OH, OW) by :func:`conv_pixel_bands` (stride 2, rows of at least ``PX``
    pixels) or :func:`conv_pixel_tiles`; ``x``, ``w``, ``b`` in the result dtype; ``y`` is
    the array ``"y"`` of workspace ``ws``."""
    if _in_bands(geo):
        return _forward_bands(x, w, b, geo, ws)
    y = _forward_pixel_input(_pixel_input(x, geo), w, b, geo, ws)
    return y.reshape(geo.N, geo.K, geo.OH, geo.OW)


def _pixel_weights(w, b, taps, K: int):
    """The weights (KPn, T, KP) and bias (KPn*KP,) as the pixel forward kernels read them:
    taps in the order ``taps``, channels blocked by ``KP``, zero past ``K``."""
    T = taps.shape[0]
    KPn = -(-K // KP)
    wp = np.zeros((KPn * KP, T), w.dtype)
    wp[:K] = w.reshape(K, T)[:, taps]
    wp = np.ascontiguousarray(wp.reshape(KPn, KP, T).transpose(0, 2, 1))
    bp = np.zeros(KPn * KP, w.dtype)
    if b is not None:
        bp[:K] = b
    return wp, bp


def _forward_pixel_input(px: PixelInput, w, b, geo: ConvGeometry, ws=_FRESH) -> np.ndarray:
    """y (N, K, px.OH, px.OW), the output in the rows of ``px``, by
    :func:`kernels.conv_pixel_tiles`; ``y`` is the array ``"y"`` of workspace ``ws``."""
    wp, bp = _pixel_weights(w, b, px.taps, geo.K)
    y = ws.empty("y", (geo.N, geo.K, px.OH, px.OW), w.dtype)
    conv_pixel_tiles(px.xf, px.toff, wp, bp, y)
    return y


def _in_bands(geo: ConvGeometry) -> bool:
    """Whether the forward pass runs in bands of output rows, each task laying out its own
    input (:func:`conv_pixel_bands`): stride 2, rows of at least ``PX`` pixels."""
    return (geo.sh, geo.sw) == (2, 2) and geo.OW >= PX


def _band_layout(geo: ConvGeometry, dtype):
    """What :func:`conv_pixel_bands` needs besides its operands: the rows per band, the
    column offsets ``qs``, the taps' order and offsets (``_parity_taps``, planes of the
    band's ``Hb`` rows), the runs ``Q`` of its ``N * bands`` tasks, and its scratch: a
    band's layout and a padded row (``Wr`` even, ``>= 2*OW + max(qs)``, ``> pl``) per
    run."""
    band = max(1, min(config.PIXEL_BAND_ROWS, geo.OH))
    Hb = band + (geo.R - 1) * geo.dlh // 2
    qs, taps, toff = _parity_taps(geo.C, geo.R, geo.S, geo.dlh, geo.dlw, Hb, geo.OW,
                                  ((0, 0),))
    Q = _task_runs(geo.N * -(-geo.OH // band))
    scratch = np.empty((Q, geo.C * len(qs) * 2 * Hb * geo.OW), dtype)
    Wr = 2 * (geo.OW + int(qs[-1]) // 2 + 1) + 2 * (geo.pl // 2)
    return band, qs, taps, toff[0], scratch, np.empty((Q, 2 * Wr), dtype)


def _forward_bands(x, w, b, geo: ConvGeometry, ws=_FRESH) -> np.ndarray:
    """y (N, K, OH, OW) of a stride-2 layer by :func:`conv_pixel_bands`: bands of
    ``config.PIXEL_BAND_ROWS`` output rows, each task laying out the input rows its band
    reads (``Hb`` rows of every parity plane of :func:`layouts._parity_input`)."""
    band, qs, taps, toff, scratch, rows = _band_layout(geo, w.dtype)
    wp, bp = _pixel_weights(w, b, taps, geo.K)
    y = ws.empty("y", (geo.N, geo.K, geo.OH, geo.OW), w.dtype)
    conv_pixel_bands(np.ascontiguousarray(x).reshape(geo.N, geo.C, -1), geo.W, geo.pt,
                     geo.pl, qs, toff, wp, bp, y, scratch, rows, band)
    return y


# Kernels
# -------
# PX pixels per vector; KP output channels per tile of the forward kernel (its tile: KP
# channels x 2 pixel vectors, or KH x 2 in a half tile); DK x DT output channels x taps per
# tile of the dW kernel.

PX = 16


KP = 8


KH = 4


DK = 4


DT = 5


@parallel_kernel
def conv_pixel_tiles(x, toff, w, b, y):
    """Forward pass vectorised over output pixels instead of output channels, for layers
    with few input channels (the first layer of an image network) and for 1x1 layers.

    ``y[n, k, i, j] = b[k] + sum_t x[n, toff[i, t] + j] * w[k // KP, t, k % KP]``
    over the taps ``t = (c, r, s)`` of the filter:

    x : (N, L)                 each image's input planes, flattened, laid out as for
                               :func:`conv_dw_pixels`, so that for every tap consecutive
                               pixels of an output row read consecutive inputs.
    toff : (OH, T) int64       where each output row reads each tap in an image's ``x``,
                               ``T = C*R*S``.
    w : (KPn, T, KP)           weights, blocked by ``KP`` output channels, zero past ``K``.
    b : (KPn*KP,)              bias.
    y : (N, K, OH, OW)         NCHW output, C-contiguous, ``OW >= PX``.

    With few channels, :func:`conv_tiles` has only ``C*R*S`` steps to amortise its
    transposing epilogue.  Here the tile is ``KP`` channels x two vectors of ``PX``
    pixels of one output row: each step loads the two input vectors and multiplies each by
    ``KP`` broadcast weights, 2*KP FMAs for KP + 2 loads, and every channel's row is
    stored as whole vectors.  The tap table keeps the step free of index arithmetic: with
    the plane, row and phase of each tap computed in the loop (an integer division by the
    stride), the scalar work outran the FMAs.  A vector that would cross the end of the
    row is shifted left to end at ``OW``, as in :func:`conv_tiles` (in a row's last tile
    both vectors may land on the same pixels, computed twice and stored twice, equal).
    Parallel over (n, i, channel block): each task owns its outputs.

    With ``C*R*S`` steps per tile (25 for MNIST's first layer) the epilogue weighs: its
    rows are unrolled, so that the tile is stored from registers
    with flat unsigned offsets and no slicing (it had taken about 40 instructions a row).
    That and the second vector made the kernel 1.2-1.3x faster on MNIST conv1.
    """
    N, K, OH, OW = y.shape
    KPn, T = w.shape[:2]
    yf = y.reshape(y.size)
    ustep = np.uint64(OH * OW)  # from one channel's output plane to the next
    for task in prange(N * OH * KPn):
        kt = task % KPn
        rest = task // KPn
        i = rest % OH
        n = rest // OH
        k0 = kt * KP
        kn = min(KP, K - k0)
        urow = np.uint64(((n * K + k0) * OH + i) * OW)  # y[n, k0, i, 0] in yf
        _pixel_span(x[n], toff[i], w[kt], kn, b, k0, yf, urow, ustep, OW)


@parallel_kernel
def conv_pixel_bands(x, W, pt, pl, qs, toff, w, b, y, scratch, rows, band):
    """The forward pass of :func:`conv_pixel_tiles` for a stride-2 layer (the 7x7 stem),
    ``band`` output rows per task, each task laying out the input its rows read.

    x : (N, C, H*W)          NCHW input, C-contiguous.
    qs : (nq,) int64         the column offsets of the parity planes
                             (``layouts._parity_taps``).
    toff : (T,) int64        each tap's offset into a band's layout, in which output pixel
                             ``m = i*OW + j`` of the band reads ``toff[t] + m``.
    w : (KPn, T, KP)         weights, taps in ``_parity_taps``' order;  b : (KPn*KP,).
    y : (N, K, OH, OW)       NCHW output, C-contiguous, ``OW >= PX``.
    scratch : (Q, C*nq*2*Hb*OW)  a band's layout per run of tasks.
    rows : (Q, 2*Wr)         a padded input row (``Wr`` even, ``Wr >= 2*OW + max(qs)``,
                             ``Wr > pl``) and its even and odd columns, per run.

    A band's layout is :func:`layouts._parity_input`'s, cut to the ``Hb`` rows its band
    reads: plane ``(c, iq, p)`` row ``v`` holds padded input row ``2*(i0 + v) + p`` at the
    columns ``2j + qs[iq]``: the row's even or odd columns (one split, :func:`split_run`)
    from ``qs[iq] // 2`` on, copied as vectors.  The band's rows are then one run of
    ``band*OW`` pixels for :func:`_pixel_span`, as an image's are in the whole layout.
    Laid out by the task that reads it, the layout stays in that core's cache; laid out
    for the whole image first, every task read what other cores had written.  Parallel
    over (n, band) in ``Q`` runs; each task owns its outputs.
    """
    N, C = x.shape[0], x.shape[1]
    H = x.shape[2] // W
    K, OH, OW = y.shape[1], y.shape[2], y.shape[3]
    KPn = w.shape[0]
    nq = qs.shape[0]
    Q = scratch.shape[0]
    Hb = scratch.shape[1] // (C * nq * 2 * OW)
    NB = (OH + band - 1) // band
    tasks = N * NB
    yf = y.reshape(y.size)
    ustep = np.uint64(OH * OW)
    for g in prange(Q):
        sg = scratch[g]
        rg = rows[g]
        rg[:rows.shape[1] // 2] = 0  # the padding columns; each row is copied in between
        for task in range(g * tasks // Q, (g + 1) * tasks // Q):
            n = task // NB
            i0 = (task % NB) * band
            _parity_band(x[n], H, W, pt, pl, qs, i0, Hb, OW, sg, rg)
            M = min(band, OH - i0) * OW
            for kt in range(KPn):
                k0 = kt * KP
                urow = np.uint64(((n * K + k0) * OH + i0) * OW)  # y[n, k0, i0, 0] in yf
                _pixel_span(sg, toff, w[kt], min(KP, K - k0), b, k0, yf, urow, ustep, M)


@numba.njit(inline="always")
def _parity_band(xn, H, W, pt, pl, qs, i0, Hb, OW, sg, rg):
    """Lay out the rows of a stride-2 band that start at output row ``i0`` (see
    :func:`conv_pixel_bands`): plane ``(c, iq, p)`` row ``v`` of ``sg`` gets padded input
    row ``2*(i0 + v) + p`` of ``xn`` (C, H*W) at the columns ``2j + qs[iq]``, ``j < OW``.
    ``rg`` (2*Wr): a padded input row, zero outside ``[pl, pl + W)``, and its even and odd
    columns."""
    C = xn.shape[0]
    nq = qs.shape[0]
    Wr = rg.shape[0] // 2
    half = Wr // 2
    for c in range(C):
        for v in range(Hb):
            for p in range(2):
                ih = 2 * (i0 + v) + p - pt
                if 0 <= ih < H:
                    # the padded row, split into its even and odd columns
                    copy_run(rg, pl, xn[c], ih * W, min(W, Wr - pl))
                    split_run(rg, Wr, Wr + half, rg, 0, Wr)
                for iq in range(nq):
                    q = qs[iq]
                    at = (((c * nq + iq) * 2 + p) * Hb + v) * OW
                    if 0 <= ih < H:
                        copy_run(sg, at, rg, Wr + (q % 2) * half + q // 2, OW)
                    else:
                        for j in range(OW):
                            sg[at + j] = 0


@numba.njit(inline="always")
def _pixel_span(xn, ti, wk, kn, b, k0, yf, urow, ustep, OW):
    """The tiles along one run of ``OW >= PX`` output pixels (a row, or rows joined), for
    channels ``k0 .. k0 + kn``, ``kn <= KP``: pixel ``j`` reads tap ``t < len(ti)`` at
    ``xn[ti[t] + j]`` with weights ``wk[t]`` (``KP`` of them, or ``KH`` for a block of at
    most ``KH`` channels), and channel ``k0 + kk`` is stored at ``yf[urow + kk*ustep + j]``
    with its bias ``b[k0 + kk]``.  The tile of the pixel forward kernels and of the grouped
    ones (:mod:`fastconv.algorithms.grouped`), two vectors of ``PX`` pixels at a time.

    Four register tiles of ``KH = KP/2`` channels x ``PX`` pixels: ``a0`` and ``b0`` hold
    channels ``k0 .. k0 + KH - 1`` over the first and the second vector, ``a1`` and ``b1``
    the next ``KH`` channels.  A block of at most ``KH`` channels (a group's last, or any
    block of the grouped kernels in float64, whose weights are blocked by ``KH``) runs the
    half tile.  Four small tiles, not one of 16 rows: LLVM gives up proving that a stack
    array with that many uses does not escape, and then, where the tile is inlined into a
    larger kernel (the grouped one), guards every step with run-time alias checks and
    reloads and stores every accumulator."""
    T = ti.shape[0]
    a0 = stack_tile(4, PX, yf.dtype)
    b0 = stack_tile(4, PX, yf.dtype)
    a1 = stack_tile(4, PX, yf.dtype)
    b1 = stack_tile(4, PX, yf.dtype)
    for jt in range((OW + 2 * PX - 1) // (2 * PX)):
        ua = np.uint64(min(jt * 2 * PX, OW - PX))
        ud = np.uint64(min(jt * 2 * PX + PX, OW - PX)) - ua  # PX, or 0 at the end
        for kk in range(KH):  # zeroed here, not in a helper (see the stores below)
            for p in range(PX):
                a0[kk, p] = 0
            for p in range(PX):
                b0[kk, p] = 0
        if kn > KH:
            for kk in range(KH):
                for p in range(PX):
                    a1[kk, p] = 0
                for p in range(PX):
                    b1[kk, p] = 0
            for t in range(T):
                oa = ua + np.uint64(ti[t])  # unsigned: no negative-index wraparound
                ob = oa + ud
                wv = wk[t]
                w0 = wv[0]
                w1 = wv[1]
                w2 = wv[2]
                w3 = wv[3]
                w4 = wv[4]
                w5 = wv[5]
                w6 = wv[6]
                w7 = wv[7]
                for p in range(PX):
                    up = np.uint64(p)
                    xa = xn[oa + up]
                    xb = xn[ob + up]
                    a0[0, p] += w0 * xa
                    a0[1, p] += w1 * xa
                    a0[2, p] += w2 * xa
                    a0[3, p] += w3 * xa
                    a1[0, p] += w4 * xa
                    a1[1, p] += w5 * xa
                    a1[2, p] += w6 * xa
                    a1[3, p] += w7 * xa
                    b0[0, p] += w0 * xb
                    b0[1, p] += w1 * xb
                    b0[2, p] += w2 * xb
                    b0[3, p] += w3 * xb
                    b1[0, p] += w4 * xb
                    b1[1, p] += w5 * xb
                    b1[2, p] += w6 * xb
                    b1[3, p] += w7 * xb
        else:
            for t in range(T):
                oa = ua + np.uint64(ti[t])
                ob = oa + ud
                wv = wk[t]
                w0 = wv[0]
                w1 = wv[1]
                w2 = wv[2]
                w3 = wv[3]
                for p in range(PX):
                    up = np.uint64(p)
                    xa = xn[oa + up]
                    xb = xn[ob + up]
                    a0[0, p] += w0 * xa
                    a0[1, p] += w1 * xa
                    a0[2, p] += w2 * xa
                    a0[3, p] += w3 * xa
                    b0[0, p] += w0 * xb
                    b0[1, p] += w1 * xb
                    b0[2, p] += w2 * xb
                    b0[3, p] += w3 * xb
        # The stores written out here, each row with constant indices (stored from its
        # registers), not in a helper: arrays handed to an inlined helper get
        # reference-count calls (and a vzeroupper) around it, which took a quarter of a
        # strided dX whose phases have 8-32 taps a step loop.
        npx = min(PX, OW)  # == PX; the bound lets LLVM vectorise the stores
        ya = urow + ua
        if kn > 0:
            bk = b[k0]
            yo = ya
            for p in range(npx):
                yf[yo + np.uint64(p)] = a0[0, p] + bk
            yo += ud
            for p in range(npx):
                yf[yo + np.uint64(p)] = b0[0, p] + bk
        if kn > 1:
            bk = b[k0 + 1]
            yo = ya + np.uint64(1) * ustep
            for p in range(npx):
                yf[yo + np.uint64(p)] = a0[1, p] + bk
            yo += ud
            for p in range(npx):
                yf[yo + np.uint64(p)] = b0[1, p] + bk
        if kn > 2:
            bk = b[k0 + 2]
            yo = ya + np.uint64(2) * ustep
            for p in range(npx):
                yf[yo + np.uint64(p)] = a0[2, p] + bk
            yo += ud
            for p in range(npx):
                yf[yo + np.uint64(p)] = b0[2, p] + bk
        if kn > 3:
            bk = b[k0 + 3]
            yo = ya + np.uint64(3) * ustep
            for p in range(npx):
                yf[yo + np.uint64(p)] = a0[3, p] + bk
            yo += ud
            for p in range(npx):
                yf[yo + np.uint64(p)] = b0[3, p] + bk
        if kn > 4:
            bk = b[k0 + 4]
            yo = ya + np.uint64(4) * ustep
            for p in range(npx):
                yf[yo + np.uint64(p)] = a1[0, p] + bk
            yo += ud
            for p in range(npx):
                yf[yo + np.uint64(p)] = b1[0, p] + bk
        if kn > 5:
            bk = b[k0 + 5]
            yo = ya + np.uint64(5) * ustep
            for p in range(npx):
                yf[yo + np.uint64(p)] = a1[1, p] + bk
            yo += ud
            for p in range(npx):
                yf[yo + np.uint64(p)] = b1[1, p] + bk
        if kn > 6:
            bk = b[k0 + 6]
            yo = ya + np.uint64(6) * ustep
            for p in range(npx):
                yf[yo + np.uint64(p)] = a1[2, p] + bk
            yo += ud
            for p in range(npx):
                yf[yo + np.uint64(p)] = b1[2, p] + bk
        if kn > 7:
            bk = b[k0 + 7]
            yo = ya + np.uint64(7) * ustep
            for p in range(npx):
                yf[yo + np.uint64(p)] = a1[3, p] + bk
            yo += ud
            for p in range(npx):
                yf[yo + np.uint64(p)] = b1[3, p] + bk


@parallel_kernel
def conv_dw_pixels(x, dy, toff, part):
    """dW for few input channels, vectorised over output pixels: the deltas are read in
    NCHW as they come, with no transposing pack.  1x1 stride-1 layers run it too, each
    image's pixels as one row (``OH = 1``) and one tap per input channel.

    ``part[p, kt, tt, a, b] = sum_{n in chunk p} sum_{i, j} dy[n, DK*kt + a, i, j]
    * x[n, toff[i, DT*tt + b] + j]``, chunk ``p`` holding samples
    ``[p*N//P, (p+1)*N//P)``; dW is ``part.sum(axis=0)``.

    x : (N, L)                 each image's zero-padded input planes, flattened; see below.
    dy : (N, K, OH, OW)        NCHW deltas, ``OW >= PX``.
    toff : (OH, ceil(T/DT)*DT) int64 offset of each tap into an image's ``x``, per row.
    part : (P, ceil(K/DK), ceil(T/DT), DK, DT)

    A tap ``t = (c, r, s)`` of the filter reads input row ``i*sh + r*dlh`` and column
    ``j*sw + s*dlw``.  The wrapper (``layouts._pixel_input``) lays the input out so that for
    every tap consecutive output pixels read consecutive inputs: a stride-1 layer as
    shifted planes, each image's output one row (``OH = 1``); otherwise each padded plane's
    columns split into ``sw`` phases of width ``Wq`` (plane ``c*sw + q`` holds columns
    ``u*sw + q``), so that the column is ``j + (s*dlw)//sw`` of phase ``(s*dlw) % sw``.
    ``toff[i]`` is each tap's plane, row and column offset in that layout for output row
    ``i``.  (The 2x2 pool's "pool order", ``layouts._pool_order_input``, gives each of its
    four rows a table of its own.)

    The tile is DK output channels x DT taps, each accumulator a vector of ``PX`` pixels of
    one output row: per step DK + DT vector loads and DK*DT FMAs; the lanes are summed at
    the end.  Rows are covered by ``PX``-wide vectors, the last shifted left to end at
    ``OW``, with the lanes it shares with the previous one zeroed in both operands (selects:
    0 * 0, never inf * 0).  Channels past ``K`` repeat the last one and padding taps read
    offset 0; the wrapper drops both.  Parallel over (chunk, channel block, tap block), taps
    fastest, so consecutive tasks of a thread reuse the same deltas from L2.
    """
    N, K, OH, OW = dy.shape
    P, KTn, TTn = part.shape[:3]
    NT = KTn * TTn
    JT = (OW + PX - 1) // PX
    for task in prange(P * NT):
        p, n0, n1, kt, tt, k0, k1, k2, k3 = _dw_pixel_task(task, NT, N, P, TTn, K)
        _dw_pixel_tile(x, dy, toff, n0, n1, k0, k1, k2, k3, tt, JT, part[p, kt, tt], True)


@numba.njit(inline="always")
def _dw_pixel_tile(x, dy, toff, n0, n1, k0, k1, k2, k3, tt, JT, out, split):
    """One pixel dW tile: channels ``k0 .. k3`` of ``dy`` (N, K, OH, OW) times tap block
    ``tt`` of ``toff`` over samples ``[n0, n1)`` of ``x`` (N, L), its lanes summed into
    ``out`` (DK, DT); ``split`` (a constant at the call site) as for
    :func:`_dw_pixel_row`."""
    OH, OW = dy.shape[2], dy.shape[3]
    zero = x.dtype.type(0)
    acc = stack_tile(20, PX, out.dtype)  # DK * DT rows
    for a in range(DK * DT):
        for q in range(PX):
            acc[a, q] = 0
    for n in range(n0, n1):
        xn = x[n]
        for i in range(OH):
            o0, o1, o2, o3, o4 = _dw_tap_offsets(toff[i], tt)
            _dw_pixel_row(acc, xn, np.uint64(0), dy[n, k0, i], dy[n, k1, i], dy[n, k2, i],
                          dy[n, k3, i], o0, o1, o2, o3, o4, JT, OW, zero, split)
    _dw_pixel_sums(acc, out, zero)


@numba.njit(inline="always")
def _dw_pixel_row(acc, xn, ux, d0, d1, d2, d3, o0, o1, o2, o3, o4, JT, OW, zero, split):
    """One output row of the pixel dW tile: the rows ``d0 .. d3`` of ``OW`` deltas times
    the DT input rows at ``xn[ux + o + j]``, covered by ``JT`` vectors of ``PX`` pixels,
    the last shifted left to end at ``OW`` with the lanes it shares with the previous one
    zeroed in both operands.

    With ``split`` (a constant at the call site) the vectors that share no lane run in a
    loop of their own, without selects: the 7x7 stem's dW 1.15x faster, whose rows are
    whole vectors.  Without it one loop runs every vector with its selects: 2.5x faster
    for the grouped dW on 28-pixel rows (one whole vector and a shifted one), whose tile
    the two loops pushed out of the registers."""
    full = OW // PX if split else 0  # vectors that share no lane with another
    for jt in range(full):
        uj = np.uint64(jt * PX)
        for q in range(PX):
            # unsigned indices: no negative-index wraparound to check
            uq = np.uint64(q)
            a0, a1, a2, a3, a4 = _dw_pixel_inputs(xn, ux + uj + uq, o0, o1, o2, o3, o4,
                                                  True, zero)
            _dw_pixel_step(acc, q, d0[uj + uq], d1[uj + uq], d2[uj + uq], d3[uj + uq],
                           a0, a1, a2, a3, a4)
    for jt in range(full, JT):  # with split: a row's last vector, if shifted
        j0 = min(jt * PX, OW - PX)
        lo = jt * PX - j0  # lanes below lo were counted by the previous vector
        uj = np.uint64(j0)
        for q in range(PX):
            uq = np.uint64(q)
            keep = q >= lo
            e0 = d0[uj + uq] if keep else zero
            e1 = d1[uj + uq] if keep else zero
            e2 = d2[uj + uq] if keep else zero
            e3 = d3[uj + uq] if keep else zero
            a0, a1, a2, a3, a4 = _dw_pixel_inputs(xn, ux + uj + uq, o0, o1, o2, o3, o4,
                                                  keep, zero)
            _dw_pixel_step(acc, q, e0, e1, e2, e3, a0, a1, a2, a3, a4)


@numba.njit(inline="always")
def _dw_pixel_task(task, NT, N, P, TTn, K):
    """A pixel dW task's batch chunk ``p`` (samples ``n0 .. n1 - 1``), its channel and tap
    blocks ``kt`` and ``tt``, and its DK output channels (past ``K``, the last repeated)."""
    p, n0, n1, t = _chunk_task(task, NT, N, P)
    kt = t // TTn
    return (p, n0, n1, kt, t % TTn, min(kt * DK + 0, K - 1), min(kt * DK + 1, K - 1),
            min(kt * DK + 2, K - 1), min(kt * DK + 3, K - 1))


@numba.njit(inline="always")
def _dw_tap_offsets(row, tt):
    """The DT offsets of tap block ``tt`` from one output row's tap table, unsigned (no
    negative-index wraparound to check in the loads)."""
    return (np.uint64(row[tt * DT + 0]), np.uint64(row[tt * DT + 1]),
            np.uint64(row[tt * DT + 2]), np.uint64(row[tt * DT + 3]),
            np.uint64(row[tt * DT + 4]))


@numba.njit(inline="always")
def _dw_pixel_inputs(xn, u, o0, o1, o2, o3, o4, keep, zero):
    """Lane ``u`` of the DT input vectors of a pixel dW step (zero unless ``keep``)."""
    return (xn[u + o0] if keep else zero, xn[u + o1] if keep else zero,
            xn[u + o2] if keep else zero, xn[u + o3] if keep else zero,
            xn[u + o4] if keep else zero)


@numba.njit(inline="always")
def _dw_pixel_step(acc, q, e0, e1, e2, e3, a0, a1, a2, a3, a4):
    """Lane ``q`` of one step of the pixel dW tile: DK deltas times DT inputs."""
    acc[0, q] += e0 * a0
    acc[1, q] += e0 * a1
    acc[2, q] += e0 * a2
    acc[3, q] += e0 * a3
    acc[4, q] += e0 * a4
    acc[5, q] += e1 * a0
    acc[6, q] += e1 * a1
    acc[7, q] += e1 * a2
    acc[8, q] += e1 * a3
    acc[9, q] += e1 * a4
    acc[10, q] += e2 * a0
    acc[11, q] += e2 * a1
    acc[12, q] += e2 * a2
    acc[13, q] += e2 * a3
    acc[14, q] += e2 * a4
    acc[15, q] += e3 * a0
    acc[16, q] += e3 * a1
    acc[17, q] += e3 * a2
    acc[18, q] += e3 * a3
    acc[19, q] += e3 * a4


@numba.njit(inline="always")
def _dw_pixel_sums(acc, out, zero):
    """``out[a, b]`` (DK, DT) = the sum of the lanes of the pixel dW tile's ``a*DT + b``."""
    for a in range(DK):
        for b in range(DT):
            tot = zero
            for q in range(PX):
                tot += acc[a * DT + b, q]
            out[a, b] = tot


@parallel_kernel
def conv_dw_pool_planes(x, g, sel, toff, part):
    """:func:`conv_dw_pixels` on deltas in pool order that it makes as it reads them from
    the pooled deltas, for the layer before a 2x2 max pool: the 4x larger pool-order
    deltas are never written.

    ``dy[n, k, d, m] = g[n, k, m]`` if ``sel[n, k, m] == d`` else 0, for the four planes
    ``d`` (rows of ``toff``, (4, ceil(T/DT)*DT)); g : (N, K, M) the pooled deltas, ReLU
    applied; sel : (N, K, M) int8 the window position of each maximum
    (:func:`max_pool_2x2_planes_fwd`).  x, part and the tile as in :func:`conv_dw_pixels`.
    Each pixel vector of ``g`` and ``sel`` is loaded once for all four planes; the selects
    cost less than the loads of the deltas they replace.
    """
    N, K, M = g.shape
    P, KTn, TTn = part.shape[:3]
    NT = KTn * TTn
    JT = (M + PX - 1) // PX
    for task in prange(P * NT):
        p, n0, n1, kt, tt, k0, k1, k2, k3 = _dw_pixel_task(task, NT, N, P, TTn, K)
        zero = x.dtype.type(0)
        acc = stack_tile(20, PX, part.dtype)  # DK * DT rows
        for a in range(DK * DT):
            for q in range(PX):
                acc[a, q] = 0
        for n in range(n0, n1):
            xn = x[n]
            g0 = g[n, k0]
            g1 = g[n, k1]
            g2 = g[n, k2]
            g3 = g[n, k3]
            s0 = sel[n, k0]
            s1 = sel[n, k1]
            s2 = sel[n, k2]
            s3 = sel[n, k3]
            for jt in range(JT):
                j0 = min(jt * PX, M - PX)
                lo = jt * PX - j0  # lanes below lo were counted by the previous vector
                uj = np.uint64(j0)
                for d in range(4):
                    o0, o1, o2, o3, o4 = _dw_tap_offsets(toff[d], tt)
                    for q in range(PX):
                        uq = np.uint64(q)
                        keep = q >= lo
                        e0 = g0[uj + uq] if keep & (s0[uj + uq] == d) else zero
                        e1 = g1[uj + uq] if keep & (s1[uj + uq] == d) else zero
                        e2 = g2[uj + uq] if keep & (s2[uj + uq] == d) else zero
                        e3 = g3[uj + uq] if keep & (s3[uj + uq] == d) else zero
                        a0, a1, a2, a3, a4 = _dw_pixel_inputs(xn, uj + uq, o0, o1, o2, o3,
                                                              o4, keep, zero)
                        _dw_pixel_step(acc, q, e0, e1, e2, e3, a0, a1, a2, a3, a4)
        _dw_pixel_sums(acc, part[p, kt, tt], zero)
