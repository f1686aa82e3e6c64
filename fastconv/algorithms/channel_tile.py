"""The direct channel tile: output channels as the vector lanes, 7 pixels x 32 channels
in registers, over zero-padded channels-last input and blocked weights.  It runs every
geometry (groups, dilation, any stride and padding), which makes it the last algorithm of
the list: the fallback of all the others.  dX runs it on the deltas, phase by phase, with
the rotated filters (see "dX, derived once" in :mod:`fastconv.geometry`)."""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np
from numba import prange

from .._jit import parallel_kernel, stack_tile, transpose16
from ..geometry import ConvGeometry, _dx_joins
from ..kernels import _chunk_task, _zeroed
from ..layouts import (
    _FRESH,
    DeltaLayout,
    _batch_chunks,
    _pack_input,
    _sum_chunks,
    _task_runs,
    delta_layout,
    pack_deltas,
)

NAME = "direct-channel-tile"


def why_not(geo, dtype, pass_):
    return None


def prepare(geo, w, pass_):
    """The weights as the forward pass or dX runs them: blocked (:func:`_blocked_weights`),
    and for dX one block per phase (:class:`PhaseWeights`)."""
    if pass_ == "forward":
        return _blocked_weights(w.reshape(geo.G, geo.Kg, geo.Cg, geo.R, geo.S))
    return _phase_weights(w, geo)


def forward(geo, x, wb, b):
    rows = TileMap(geo.OH, geo.OW, geo.sh, geo.sw, geo.dlh, geo.dlw)
    Wst, u0, iw0, wc = _staged_columns(rows, geo.S, geo.W, geo.pl)
    staged = _staged(rows, wc)
    Q = 0 if staged else _image_runs(geo)
    if not (staged or Q):
        return packed_forward(geo, _pack_input(x, geo), wb, b)
    y = np.empty((geo.N, geo.K, geo.OH, geo.OW), x.dtype)
    bb = _blocked_bias(geo, wb, b, x.dtype)
    if staged:
        scratch = np.empty((_task_runs(geo.N * geo.OH * geo.G), geo.R, Wst, wb.shape[4]),
                           x.dtype)
        conv_rows_staged(np.ascontiguousarray(x), wb, bb, y, rows, geo.pt, (u0, iw0, wc),
                         scratch)
    else:
        scratch = np.empty((Q, geo.G, geo.H + geo.pt + geo.pb, geo.W + geo.pl + geo.pr,
                            wb.shape[4]), x.dtype)
        conv_images_staged(np.ascontiguousarray(x), wb, bb, y, rows, (geo.pt, geo.pl), scratch)
    return y


def _image_runs(geo: ConvGeometry) -> int:
    """How many runs :func:`conv_images_staged` cuts the batch into, one per thread; 0
    where it does not run, and the whole input is laid out first for :func:`conv_tiles`,
    which shares out rows: images of fewer than ``TW`` outputs, fewer images than threads,
    a batch that leaves one thread more than a quarter more images than another, or a
    layout that would go one value at a time (input rows narrower than 16 pixels, groups
    of fewer than 16 channels: with 14-pixel rows and 256 channels it ran 0.95x the
    whole-input layout, which copies a cache line of channels at a time)."""
    Q = numba.get_num_threads()
    return Q if _by_image(geo, Q) else 0


def _by_image(geo: ConvGeometry, Q: int) -> bool:
    """The rule of :func:`_image_runs` on ``Q`` threads."""
    N = geo.N
    return not (geo.OH * geo.OW < TW or N < Q or (N % Q and N < 4 * Q) or geo.W < 16
                or geo.Cg < 16)


def _blocked_bias(geo: ConvGeometry, wb: np.ndarray, b, dtype) -> np.ndarray:
    """The bias as the forward kernels read it, ``(G, KBn*KB)`` like the blocked weights
    ``wb``, zero past ``Kg`` (and everywhere without a bias)."""
    bb = np.zeros((geo.G, wb.shape[1] * KB), dtype)
    if b is not None:
        bb[:, :geo.Kg] = b.reshape(geo.G, geo.Kg)
    return bb


def _staged(rows, wc: int) -> bool:
    """Whether :func:`conv_rows_staged` runs the outputs ``rows`` (a :class:`TileMap`),
    its staged rows holding ``wc`` input columns (:func:`_staged_columns`): where
    :func:`conv_tiles` would run row tiles (rows of at least ``TW`` pixels that its
    flattened tiles would not save a tenth of, its own rule), and the input rows it reads
    hold at least 16 pixels, so that its layout transposes 16 x 16 blocks (with 14-pixel
    rows and 256 channels, one value at a time, it ran 0.95x the packed pass)."""
    return not _flat(rows.OH, rows.OW) and wc >= 16


def _staged_columns(rows, S: int, W: int, pl: int) -> tuple:
    """``(Wst, u0, iw0, wc)`` for the outputs ``rows`` (a :class:`TileMap`) of a filter
    ``S`` wide, reading an input ``W`` wide padded by ``pl`` on the left: a staged row's
    width, and its columns ``u0 .. u0 + wc - 1``, which hold input columns ``iw0 ..
    iw0 + wc - 1`` (the others are padding; see :func:`conv_rows_staged`)."""
    Wst = (rows.OW - 1) * rows.sw + (S - 1) * rows.dlw + 1
    shift = pl - rows.xw0  # staged column u holds input column u - shift
    u0 = max(0, shift)
    return Wst, u0, u0 - shift, max(0, min(Wst, W + shift) - u0)


def grad_input(geo, dy, wp):
    layout = delta_layout(geo)
    return packed_grad_input(geo, pack_deltas(dy, layout), layout, wp)


def grad_weight(geo, x, dy):
    layout = delta_layout(geo, need_dx=False)
    return packed_grad_weight(geo, _pack_input(x, geo), pack_deltas(dy, layout), layout)


def _blocked_weights(wg: np.ndarray, CrP: int | None = None) -> np.ndarray:
    """``(G, Ko, Cr, R, S)`` weights (any strides) as ``(G, KBn, R, S, CrP, KB)``, zero past
    ``Ko`` and past ``Cr`` (``CrP >= Cr``, default ``Cr``): one strided copy."""
    G, Ko, Cr, R, S = wg.shape
    KBn, full = -(-Ko // KB), Ko // KB
    out = np.zeros((G, KBn, R, S, Cr if CrP is None else CrP, KB), wg.dtype)
    if full:
        out[:, :full, :, :, :Cr] = wg[:, :full * KB].reshape(
            G, full, KB, Cr, R, S).transpose(0, 1, 4, 5, 3, 2)
    if Ko > full * KB:
        out[:, full, :, :, :Cr, :Ko - full * KB] = wg[:, full * KB:].transpose(0, 3, 4, 2, 1)
    return out


def _taps(taps: list) -> slice:
    """A phase's kernel taps, a descending arithmetic progression, as a slice."""
    step = taps[1] - taps[0] if len(taps) > 1 else -1
    stop = taps[-1] + step
    return slice(taps[0], None if stop < 0 else stop, step)


class PhaseWeights(NamedTuple):
    """dX's weights: the rotated filters blocked per phase (``blocks[ph][pw]``, see "dX,
    derived once" in :mod:`fastconv.geometry`), and whether any weight is an inf or NaN
    (``exact``)."""

    blocks: tuple
    exact: bool


def _phase_weights(w: np.ndarray, geo: ConvGeometry) -> PhaseWeights:
    """The :class:`PhaseWeights` of ``w`` (K, Cg, R, S) for the phases of
    :func:`fastconv.layouts.delta_layout`."""
    layout = delta_layout(geo)
    # (K, Cg, R, S) -> (G, Cg, Kg, R, S): output channels are now c, the reduction runs
    # over k, including the layout's zero channels (KgP, with zero weights).
    wt = w.reshape(geo.G, geo.Kg, geo.Cg, geo.R, geo.S).transpose(0, 2, 1, 3, 4)
    blocks = tuple(tuple(_blocked_weights(wt[:, :, :, _taps(ph.taps), _taps(pw.taps)],
                                          layout.KgP) for pw in layout.cols)
                   for ph in layout.rows)
    # With finite weights, taps that land on dy's zero border add exact zeros; an inf or NaN
    # weight would turn them into NaN, so then the kernel skips them (slower, and exact).
    return PhaseWeights(blocks, not np.isfinite(w).all())


def packed_grad_input(geo: ConvGeometry, dyp: np.ndarray, layout: DeltaLayout,
                      wp: PhaseWeights) -> np.ndarray:
    """dX by the channel tile, phase by phase (see "dX, derived once" in
    :mod:`fastconv.geometry`), from deltas packed in ``layout`` (``delta_layout(geo)``).
    (Each phase from the NCHW deltas by :func:`conv_rows_staged` instead ran 0.94-1.1x as
    fast: the phases' rows are half as long as the forward pass's.)"""
    pt, pl = layout.top, layout.left
    # Uninitialised where the phases reach every pixel of dx: each tile writes all of its
    # own (zeroing a 64 x 64 x 28 x 28 dx first took a twentieth of its dX).
    covered = _dx_joins(layout.rows, layout.cols, geo.H, geo.W, geo.sw)[1]
    dx = (np.empty if covered else np.zeros)((geo.N, geo.C, geo.H, geo.W), dyp.dtype)
    zero_bias = np.zeros((geo.G, -(-geo.Cg // KB) * KB), dyp.dtype)
    for ph, blocks in zip(layout.rows, wp.blocks, strict=True):
        for pw, wb in zip(layout.cols, blocks, strict=True):
            rows = TileMap(ph.count, pw.count, 1, 1, ph.step, pw.step, pt + ph.start,
                           pl + pw.start, ph.out0, pw.out0, geo.sh, geo.sw)
            conv_tiles(dyp, wb, zero_bias, dx, rows,
                       Border(wp.exact, pt, pt + geo.OH, pl, pl + geo.OW))
    return dx


def packed_grad_weight(geo: ConvGeometry, xp: np.ndarray, dyp: np.ndarray,
                       layout: DeltaLayout, ws=_FRESH) -> np.ndarray:
    """dW by the channel tile (:func:`kernels.conv_dw_tiles`) from packed input and
    deltas."""
    G, Kg, Cg, C, R, S = geo.G, geo.Kg, geo.Cg, geo.C, geo.R, geo.S
    kernel, KBW, TC = _dw_tile(geo)
    KBn = -(-Kg // KBW)
    N, Hp, Wp, _ = xp.shape
    # Column t = s*Cg + c of filter row r reads the input row at s*dlw*C + g*Cg + c.  When
    # the columns of one row fill the tiles badly, the rows are folded in too (one "row" of
    # R*S*Cg columns, t = (r*S + s)*Cg + c, at r*dlh*Wp*C + s*dlw*C + g*Cg + c).
    fold = -(-R * S * Cg // TC) < R * -(-S * Cg // TC)  # fewer tiles of TC columns
    Rt, T = (1, R * S * Cg) if fold else (R, S * Cg)
    off = np.zeros((G, -(-T // TC) * TC), np.uint64)
    rs, c = np.divmod(np.arange(T), Cg)
    r, s = np.divmod(rs, S) if fold else (0, rs)
    off[:, :T] = (r * geo.dlh * Wp * C + s * geo.dlw * C + c) + (np.arange(G) * Cg)[:, None]
    # Batch chunks whose deltas fit in L2 (see kernels.conv_dw_tiles).
    P = _batch_chunks(N, geo.OH * geo.OW * G * KBn * KBW * dyp.itemsize)
    part = ws.empty("dw", (P, G, KBn, Rt, off.shape[1], KBW), dyp.dtype)
    kernel(xp.reshape(N, Hp * Wp * C), dyp.reshape(*dyp.shape[:3], G * KBn, KBW), off, part, C,
           Wp * C, geo.sh, geo.sw, geo.dlh, geo.OH, geo.OW, layout.top, layout.left)
    dwb = _sum_chunks(part)
    dw = dwb[:, :, :, :T].reshape(G, KBn, R, S, Cg, KBW).transpose(0, 1, 5, 4, 2, 3)
    return np.ascontiguousarray(dw.reshape(G, KBn * KBW, Cg, R, S)[:, :Kg]).reshape(
        geo.K, Cg, R, S)


def _grad_bias_packed(dyp: np.ndarray, layout: DeltaLayout, geo: ConvGeometry,
                      part=None) -> np.ndarray:
    """db (K,) in float64 from deltas in ``layout``, or from their per-image channel sums
    ``part`` (N, Cd) if given."""
    if part is None:
        part = np.empty((geo.N, dyp.shape[3]), np.float64)
        bias_grad_channels_last(dyp, layout.top, layout.left, geo.OH, geo.OW, part)
    return part.sum(axis=0).reshape(geo.G, layout.KgP)[:, :geo.Kg].reshape(geo.K)


def packed_forward(geo: ConvGeometry, xp: np.ndarray, wb: np.ndarray, b, ws=_FRESH,
                   pool_order=False) -> np.ndarray:
    """y (N, K, OH, OW) by the channel tile (:func:`conv_tiles`) from the packed input and
    the blocked weights (:func:`prepare`); ``y`` is the array ``"y"`` of workspace ``ws``.
    With ``pool_order``, y (N, K, 4, OH/2 * OW/2) in pool order: each plane a convolution
    of twice the stride (see "Pool order" in :mod:`fastconv.layouts`)."""
    bb = _blocked_bias(geo, wb, b, xp.dtype)
    if not pool_order:
        y = ws.empty("y", (geo.N, geo.K, geo.OH, geo.OW), xp.dtype)
        conv_tiles(xp, wb, bb, y, TileMap(geo.OH, geo.OW, geo.sh, geo.sw, geo.dlh, geo.dlw),
                   Border())
        return y
    OH2, OW2 = geo.OH // 2, geo.OW // 2
    y = ws.empty("y", (geo.N, geo.K, 4, OH2 * OW2), xp.dtype)
    planes = y.reshape(geo.N, geo.K, 4 * OH2, OW2)  # plane d is rows d*OH2 ... + OH2 - 1
    for d in range(4):
        a, c = divmod(d, 2)
        plane = TileMap(OH2, OW2, 2 * geo.sh, 2 * geo.sw, geo.dlh, geo.dlw, a * geo.sh,
                        c * geo.sw, d * OH2)
        conv_tiles(xp, wb, bb, planes, plane, Border())
    return y


# Kernels
# -------
# Activations are channels-last (NHWC) and zero padded, weights blocked as
# [G][KBn][R][S][Cg][KB].  Each tile keeps TW x KB outputs in registers (a stack array, see
# fastconv._jit.stack_tile), and the reduction over (r, s, c) does an *outer product*: TW
# input values, each broadcast, times one vector of KB weights, which LLVM turns into TW
# packed FMAs per step.
#
# KB: output channels per register tile (32: two zmm of fp32, 14 accumulators); KBn the
# number of such blocks per group; TW output pixels per tile (7); TC reduction columns per
# dW tile (8); KBW output channels per dW tile (32: two vectors, 16 accumulators); TCW, KBWW
# the wide dW tile for groups of more than 32 output channels: 6 x 64.

class TileMap(NamedTuple):
    """The outputs a :func:`conv_tiles` call computes, ``y[n, k, yh0 + i*ysh, yw0 + j*ysw]``
    for ``i < OH``, ``j < OW``, and where they read: input row ``xh0 + i*sh + r*dlh``,
    column ``xw0 + j*sw + s*dlw``.  The forward pass is ``TileMap(OH, OW, sh, sw, dlh,
    dlw)``; pool order and the dX phases set the offsets and steps."""

    OH: int
    OW: int
    sh: int
    sw: int
    dlh: int
    dlw: int
    xh0: int = 0
    xw0: int = 0
    yh0: int = 0
    yw0: int = 0
    ysh: int = 1
    ysw: int = 1


class Border(NamedTuple):
    """With ``exact``, :func:`conv_tiles` skips the taps that read outside
    ``x[:, h_lo:h_hi, w_lo:w_hi]`` (dX with non-finite weights)."""

    exact: bool = False
    h_lo: int = 0
    h_hi: int = 0
    w_lo: int = 0
    w_hi: int = 0


def _dw_tile(geo: ConvGeometry):
    """The dW kernel for a geometry and its channel block: the wide 6 x 64 tile for groups
    of more than 32 output channels, else 8 x 32."""
    if geo.Kg > KBW:
        return conv_dw_tiles_wide, KBWW, TCW
    return conv_dw_tiles, KBW, TC


KB = 32


TW = 7


TC = 8


KBW = 32


TCW = 6


KBWW = 64


@numba.njit(inline="always")
def _tile_inputs(i, j, OW, sh, sw, xh0, xw0, Wx, Cx):
    """Where the TW outputs from output pixel (i, j) on, in row-major order (rows of
    ``OW``), read their first tap, as unsigned offsets into an image of the channels-last
    input: a step to the right (or to the next row) per pixel."""
    o0 = _tile_input(i, j, sh, sw, xh0, xw0, Wx, Cx)
    i, j = _next_pixel(i, j, OW)
    o1 = _tile_input(i, j, sh, sw, xh0, xw0, Wx, Cx)
    i, j = _next_pixel(i, j, OW)
    o2 = _tile_input(i, j, sh, sw, xh0, xw0, Wx, Cx)
    i, j = _next_pixel(i, j, OW)
    o3 = _tile_input(i, j, sh, sw, xh0, xw0, Wx, Cx)
    i, j = _next_pixel(i, j, OW)
    o4 = _tile_input(i, j, sh, sw, xh0, xw0, Wx, Cx)
    i, j = _next_pixel(i, j, OW)
    o5 = _tile_input(i, j, sh, sw, xh0, xw0, Wx, Cx)
    i, j = _next_pixel(i, j, OW)
    o6 = _tile_input(i, j, sh, sw, xh0, xw0, Wx, Cx)
    return o0, o1, o2, o3, o4, o5, o6


@numba.njit(inline="always")
def _tile_products(xf, xn, w, g, kb, acc, offsets, R, S, Cg, rstep, sstep):
    """``acc[t, k] = sum_{r, s, c} xf[xn + offsets[t] + r*rstep + s*sstep + c] * w[g, kb,
    r, s, c, k]``: the TW x KB tile of :func:`conv_tiles`, TW broadcast inputs times one
    weight vector a step (TW packed FMAs), over channels-last input whose pixel ``t``
    reads its first tap at ``offsets[t]`` and whose channels are contiguous."""
    o0, o1, o2, o3, o4, o5, o6 = offsets
    for t in range(TW):
        for k in range(KB):
            acc[t, k] = 0
    for r in range(R):
        for s in range(S):
            d = xn + np.uint64(r * rstep + s * sstep)
            a0, a1, a2, a3, a4, a5, a6 = (o0 + d, o1 + d, o2 + d, o3 + d, o4 + d, o5 + d,
                                          o6 + d)
            for c in range(Cg):
                cu = np.uint64(c)
                x0 = xf[a0 + cu]
                x1 = xf[a1 + cu]
                x2 = xf[a2 + cu]
                x3 = xf[a3 + cu]
                x4 = xf[a4 + cu]
                x5 = xf[a5 + cu]
                x6 = xf[a6 + cu]
                for k in range(KB):
                    wk = w[g, kb, r, s, c, k]
                    acc[0, k] += x0 * wk
                    acc[1, k] += x1 * wk
                    acc[2, k] += x2 * wk
                    acc[3, k] += x3 * wk
                    acc[4, k] += x4 * wk
                    acc[5, k] += x5 * wk
                    acc[6, k] += x6 * wk


@numba.njit(inline="always")
def _store_tile(yf, acc, yt, b, g, kb, kn, plane0, pstep, done):
    """The tile's first ``kn`` channels plus their bias, channel ``k`` to plane ``plane0 +
    k*pstep`` of ``yf`` at the pixels ``yt[0, t]``, ``t >= done`` (the ones the tile
    before did not store): consecutive stores to one row, as they combine best."""
    for k in range(kn):
        bk = b[g, kb * KB + k]
        plane = plane0 + k * pstep
        for t in range(TW):
            if t >= done:  # a pixel this tile owns
                yf[plane + yt[0, t]] = acc[t, k] + bk


@numba.njit(inline="always")
def _flat(OH, OW):
    """Whether :func:`conv_tiles` runs the tiles of an image's flattened outputs (``OH``
    rows of ``OW``): where rows are narrower than a tile, or where row tiles, the last
    shifted left to end at ``OW``, would compute a tenth more outputs than flat ones."""
    TT = (OH * OW + TW - 1) // TW
    TR = (OW + TW - 1) // TW
    return OW < TW or 10 * TT < 9 * OH * TR


@numba.njit(inline="always")
def _tile_run(xf, xn, Wx, Cx, w, g, kb, kn, b, yf, plane0, Wy, pstep, tiles, i, t_lo, t_hi,
              flat, acc, yt):
    """Tiles ``t_lo .. t_hi - 1`` of channel block ``kb`` of group ``g``: those of the
    image's flattened outputs (``flat``), or of output row ``i``, over channels-last input
    ``xf[xn:]`` of ``Wx`` pixels a row and ``Cx`` channels a pixel, to the planes from
    ``plane0`` of ``yf``, ``pstep`` apart, ``Wy`` a row.  A flat tile's first pixel is
    ``tt*TW``, the image's last shifted back to end at its last pixel; a row's last tile
    ends at ``OW`` likewise: each stores only the pixels the tile before it did not."""
    OH, OW, sh, sw, dlh, dlw, xh0, xw0, yh0, yw0, ysh, ysw = tiles
    M = OH * OW
    R, S, Cg = w.shape[2], w.shape[3], w.shape[4]
    for tt in range(t_lo, t_hi):
        # The tile's first pixel and how many of its pixels the tile before it stored.
        if flat:
            p0 = min(tt * TW, M - TW)
            done = tt * TW - p0
            ti = p0 // OW
            tj = p0 - ti * OW
        else:
            tj = min(tt * TW, OW - TW)
            ti = i
            done = tt * TW - tj
        _tile_products(xf, xn, w, g, kb, acc, _tile_inputs(ti, tj, OW, sh, sw, xh0, xw0, Wx, Cx),
                       R, S, Cg, dlh * Wx * Cx, dlw * Cx)
        # Each pixel's place in an output plane, then plane by plane (consecutive stores to
        # one row, as they combine best).
        pi, pj = ti, tj
        for t in range(TW):
            yt[0, t] = (yh0 + pi * ysh) * Wy + yw0 + pj * ysw
            pi, pj = _next_pixel(pi, pj, OW)
        _store_tile(yf, acc, yt, b, g, kb, kn, plane0, pstep, done)


@numba.njit(inline="always")
def _next_pixel(i, j, OW):
    """The output pixel after (i, j) in row-major order."""
    return (i + 1, 0) if j + 1 == OW else (i, j + 1)


@numba.njit(inline="always")
def _tile_input(i, j, sh, sw, xh0, xw0, Wx, Cx):
    return np.uint64(((xh0 + i * sh) * Wx + xw0 + j * sw) * Cx)


@parallel_kernel
def conv_tiles(x, w, b, y, tiles, border):
    """Direct convolution with a register tile; the forward pass and every dX phase.

    ``tiles`` (:class:`TileMap`) says which outputs, and where they read:
    ``(OH, OW, sh, sw, dlh, dlw, xh0, xw0, yh0, yw0, ysh, ysw)``; ``border``
    (:class:`Border`) is ``(exact, h_lo, h_hi, w_lo, w_hi)``.  For ``i < OH``, ``j < OW``
    and every output channel ``g*Ko + ko`` (``ko < Ko``)::

        y[n, g*Ko + ko, yh0 + i*ysh, yw0 + j*ysw] = b[g, ko] + sum_{r, s, c}
            x[n, xh0 + i*sh + r*dlh, xw0 + j*sw + s*dlw, g*Cg + c] * w[g, ko//KB, r, s, c, ko%KB]

    x : (N, Hx, Wx, G*Cg)      channels-last, zero padded so that every index is in range.
    w : (G, KBn, R, S, Cg, KB) blocked weights, zero past ``Ko`` in the last block.
    b : (G, KBn*KB)            bias (zeros for none).
    y : (N, G*Ko, Hy, Wy)      NCHW; only the pixels named above are written.

    Parallel over ``(n, i, g, kb)``: task ``(n, i, g, kb)`` computes output row ``i`` of
    one channel block, in ``ceil(OW / TW)`` tiles, the last shifted left to end at ``OW``;
    or, where rows are narrower than a tile or that shift would waste a tenth of the work
    (rows of 16 pixels: 21 computed for 16), the ``TT = ceil(OH*OW / TW)`` tiles of the
    image's flattened outputs (a tile may span rows) are cut into ``OH`` bands and the task
    computes band ``i``, the image's last tile shifted back to end at its last pixel.  A
    shifted tile stores only the pixels the tile before it did not: each task owns its
    outputs, so no two threads write the same element.  A tile's pixels read the input at
    ``TW`` offsets of their own, each moved by the same amount per tap.  (Flattened tiles
    everywhere ran 0.9x on 32-pixel rows, 1.3x on 16 and 1.8x on 8; one thread, 64
    channels.)

    ``exact`` makes every pixel take the one-pixel path, which skips the taps that read
    outside ``x[:, h_lo:h_hi, w_lo:w_hi]`` (its zero border).  Products with the border are
    zero for finite weights, but ``inf * 0`` is NaN: with non-finite weights, dX uses this
    so that a NaN or inf reaches only the pixels that its tap really touches.  Images of
    fewer than ``TW`` outputs take it too.
    """
    OH, OW, sh, sw, dlh, dlw, xh0, xw0, yh0, yw0, ysh, ysw = tiles
    exact, h_lo, h_hi, w_lo, w_hi = border
    N, Hx, Wx, Cx = x.shape
    Hy, Wy = y.shape[2], y.shape[3]
    G, KBn, R, S, Cg = w.shape[:5]
    Ko = y.shape[1] // G
    M = OH * OW
    TT = (M + TW - 1) // TW  # tiles of an image's flattened outputs
    TR = (OW + TW - 1) // TW  # tiles of one row
    flat = _flat(OH, OW)
    xf = x.reshape(-1)
    yf = y.reshape(-1)
    for task in prange(N * OH * G * KBn):
        kb = task % KBn
        rest = task // KBn
        g = rest % G
        rest //= G
        i = rest % OH
        n = rest // OH
        c0 = g * Cg
        k0 = g * Ko + kb * KB
        kn = min(KB, Ko - kb * KB)
        acc = stack_tile(TW, KB, y.dtype)
        yt = stack_tile(1, 7, np.int64)  # TW output offsets
        if M >= TW and not exact:
            t_lo, t_hi = (i * TT // OH, (i + 1) * TT // OH) if flat else (0, TR)
            _tile_run(xf, np.uint64(n * Hx * Wx * Cx + c0), Wx, Cx, w, g, kb, kn, b, yf,
                      (n * y.shape[1] + k0) * Hy * Wy, Wy, Hy * Wy, tiles, i, t_lo, t_hi,
                      flat, acc, yt)
        else:
            # Images of fewer than TW outputs, or exact mode: row i one pixel at a time,
            # still vectorised over k.
            for j in range(OW):
                for k in range(KB):
                    acc[0, k] = 0
                for r in range(R):
                    ih = xh0 + i * sh + r * dlh
                    if exact and (ih < h_lo or ih >= h_hi):
                        continue
                    for s in range(S):
                        iw = xw0 + j * sw + s * dlw
                        if exact and (iw < w_lo or iw >= w_hi):
                            continue
                        for c in range(Cg):
                            xv = x[n, ih, iw, c0 + c]
                            for k in range(KB):
                                acc[0, k] += xv * w[g, kb, r, s, c, k]
                for k in range(kn):
                    y[n, k0 + k, yh0 + i * ysh, yw0 + j * ysw] = acc[0, k] + b[g, kb * KB + k]


@parallel_kernel
def conv_rows_staged(x, w, b, y, tiles, pt, columns, scratch):
    """:func:`conv_tiles` from NCHW input, each task laying out the input rows it reads:
    the forward pass of the functional API.

    ``tiles`` (:class:`TileMap`) says which outputs, and where they read in the input
    padded by ``pt`` rows and ``pl`` columns (``pl`` given through ``columns``); for ``i <
    OH``, ``j < OW`` and every output channel ``g*Ko + ko``::

        y[n, g*Ko + ko, yh0 + i*ysh, yw0 + j*ysw] = b[g, ko] + sum_{r, s, c < Cs}
            x[n, g*Cs + c, xh0 + i*sh + r*dlh - pt, xw0 + j*sw + s*dlw - pl]
            * w[g, ko//KB, r, s, c, ko%KB]

    zero outside the image.

    x : (N, G*Cs, H, W)          NCHW, C-contiguous.
    w : (G, KBn, R, S, Cw, KB)   blocked weights, zero past ``Ko``; ``Cw >= Cs`` (the
                                 weights of channels past ``Cs`` meet zeros).
    b : (G, KBn*KB)              bias (zeros for none).
    y : (N, G*Ko, Hy, Wy)        NCHW; only the pixels named above are written.
    columns : (u0, iw0, wc)      staged columns ``u0 .. u0 + wc - 1`` hold input columns
                                 ``iw0 ..`` (:func:`_staged_columns`), the others padding.
    scratch : (Q, R, Wst, Cw)    a run's staged rows, ``Wst = (OW-1)*sw + (S-1)*dlw + 1``;
                                 ``OW >= TW``.

    :func:`conv_tiles` reads zero-padded channels-last input, and laying the whole input
    out so is a pass over memory: 2.2-2.5 ms of a 8.1-8.5 ms stride-2 layer (64 channels,
    28 x 28, batch 64), on top of the kernel's 5.8-5.9 ms.  Here tasks are (n, i, g): a
    task lays out the ``R`` input rows that output row ``i`` reads, the group's channels
    of each pixel contiguous and the pads zero (:func:`_stage_row`), in a scratch that
    stays in cache, then runs the row's tiles (:func:`_tile_products`, the last shifted
    left to end at ``OW``) for every channel block.  Runs of tasks share a scratch, zeroed
    once: its pad columns and channels are never written, rows outside the image are
    zeroed where they occur.
    """
    OH, OW, sh, sw, dlh, dlw, xh0, xw0, yh0, yw0, ysh, ysw = tiles
    N, Cx, H, W = x.shape
    K, Hy, Wy = y.shape[1], y.shape[2], y.shape[3]
    G, KBn, R, S, Cw = w.shape[:5]
    Q, Wst = scratch.shape[0], scratch.shape[2]
    Cs, Ko = Cx // G, K // G
    TR = (OW + TW - 1) // TW
    u0, iw0, wc = columns
    xf = x.reshape(-1)
    yf = y.reshape(-1)
    NT = N * OH * G
    for q in prange(Q):
        sf = _zeroed(scratch[q])
        acc = stack_tile(TW, KB, y.dtype)
        yt = stack_tile(1, 7, np.int64)
        for task in range(q * NT // Q, (q + 1) * NT // Q):
            g = task % G
            rest = task // G
            i = rest % OH
            n = rest // OH
            for r in range(R):
                _stage_row(xf, (n * Cx + g * Cs) * H * W, H, W, xh0 + i * sh + r * dlh - pt,
                           u0, iw0, wc, Cs, Cw, sf, r * Wst * Cw)
            for kb in range(KBn):
                kn = min(KB, Ko - kb * KB)
                for tt in range(TR):
                    tj = min(tt * TW, OW - TW)
                    _tile_products(sf, np.uint64(0), w, g, kb, acc,
                                   _tile_inputs(0, tj, OW, 0, sw, 0, 0, Wst, Cw),
                                   R, S, Cw, Wst * Cw, dlw * Cw)
                    for t in range(TW):
                        yt[0, t] = (yh0 + i * ysh) * Wy + yw0 + (tj + t) * ysw
                    _store_tile(yf, acc, yt, b, g, kb, kn,
                                (n * K + g * Ko + kb * KB) * Hy * Wy, Hy * Wy, tt * TW - tj)


@parallel_kernel
def conv_images_staged(x, w, b, y, tiles, pads, scratch):
    """:func:`conv_tiles` from NCHW input, each run laying out one whole image at a time:
    the functional forward pass where the tiles are flattened, so :func:`conv_rows_staged`
    does not run (output rows of 16 pixels, say), and the batch gives each thread whole
    images (:func:`_image_runs`).

    ``tiles`` (:class:`TileMap`) says which outputs, and where they read in the input padded
    by ``pads = (pt, pl)`` rows and columns at the top and left; for ``i < OH``, ``j < OW``
    and every output channel ``g*Ko + ko``::

        y[n, g*Ko + ko, yh0 + i*ysh, yw0 + j*ysw] = b[g, ko] + sum_{r, s, c < Cs}
            x[n, g*Cs + c, xh0 + i*sh + r*dlh - pt, xw0 + j*sw + s*dlw - pl]
            * w[g, ko//KB, r, s, c, ko%KB]

    zero outside the image.

    x : (N, G*Cs, H, W)          NCHW, C-contiguous.
    w : (G, KBn, R, S, Cw, KB)   blocked weights, zero past ``Ko``; ``Cw >= Cs``.
    b : (G, KBn*KB)              bias (zeros for none).
    y : (N, G*Ko, Hy, Wy)        NCHW; only the pixels named above are written.
    scratch : (Q, G, Hp, Wp, Cw) a run's image, each group's channels-last and zero padded:
                                 every tap reads a row below ``Hp`` and a column below
                                 ``Wp``, and ``pt + H <= Hp``, ``pl + W <= Wp``.

    Run ``q`` takes images ``q*N//Q .. (q+1)*N//Q - 1``.  It zeroes its scratch once; per
    image it lays out each group's rows (:func:`_stage_row`, 16 x 16 blocks transposed in
    registers; the pads and the channels past ``Cs`` are never written), then runs every
    tile of every group and channel block from there (:func:`_tile_run`).  The image stays
    in the core's cache between its layout and its tiles.  Laying out the whole batch first
    and then running :func:`conv_tiles` made the same tiles 11% slower than on an input
    laid out long before (3x3 stride 2, 64 -> 128 channels at 32 x 32, batch 16): the
    tiles then read what the layout had just pushed out of cache.
    """
    OH, OW, sh, sw, dlh, dlw, xh0, xw0, yh0, yw0, ysh, ysw = tiles
    pt, pl = pads
    N, Cx, H, W = x.shape
    K, Hy, Wy = y.shape[1], y.shape[2], y.shape[3]
    G, KBn, R, S, Cw = w.shape[:5]
    Q, Hp, Wp = scratch.shape[0], scratch.shape[2], scratch.shape[3]
    Cs, Ko = Cx // G, K // G
    flat = _flat(OH, OW)
    # Flat: one run of the image's TT tiles; else OH runs of a row's TR tiles.
    bands, per_band = (1, (OH * OW + TW - 1) // TW) if flat else (OH, (OW + TW - 1) // TW)
    xf = x.reshape(-1)
    yf = y.reshape(-1)
    for q in prange(Q):
        sf = _zeroed(scratch[q])
        acc = stack_tile(TW, KB, y.dtype)
        yt = stack_tile(1, 7, np.int64)
        for n in range(q * N // Q, (q + 1) * N // Q):
            for g in range(G):
                for h in range(H):
                    _stage_row(xf, (n * Cx + g * Cs) * H * W, H, W, h, pl, 0, W, Cs, Cw, sf,
                               ((g * Hp + pt + h) * Wp) * Cw)
            for g in range(G):
                for kb in range(KBn):
                    for i in range(bands):
                        _tile_run(sf, np.uint64(g * Hp * Wp * Cw), Wp, Cw, w, g, kb,
                                  min(KB, Ko - kb * KB), b, yf,
                                  (n * K + g * Ko + kb * KB) * Hy * Wy, Wy, Hy * Wy, tiles, i,
                                  0, per_band, flat, acc, yt)


@numba.njit(inline="always")
def _stage_row(xf, plane0, H, W, ih, u0, iw0, wc, Cs, Cw, sf, d0):
    """Input row ``ih`` of the ``Cs`` planes from ``xf[plane0]`` (NCHW, ``H*W`` apart)
    into ``sf[d0:]`` channels-last, ``Cw`` channels a pixel: ``sf[d0 + (u0 + v)*Cw + c] =
    x[c, ih, iw0 + v]`` for ``v < wc``, ``c < Cs``; a row outside the image zeroes those
    places (the others are never written).  Whole blocks of 16 channels x 16 pixels are
    transposed in registers, the last pixel block shifted back to end at ``wc``; the rest
    goes one value at a time."""
    d = d0 + u0 * Cw
    if ih < 0 or ih >= H:
        for v in range(wc):
            for c in range(Cs):
                sf[d + v * Cw + c] = 0
        return
    src = plane0 + ih * W + iw0
    c = 0
    if wc >= 16:
        while c + 16 <= Cs:
            for v0 in range(0, wc, 16):
                v = min(v0, wc - 16)
                transpose16(xf, src + c * H * W + v, H * W, sf, d + v * Cw + c, Cw)
            c += 16
    for cc in range(c, Cs):
        for v in range(wc):
            sf[d + v * Cw + cc] = xf[src + cc * H * W + v]

@numba.njit(inline="always")
def _dw_task(task, NT, N, P, TBn, R, KBn):
    """Decode a dW task into (chunk p, its samples [n0, n1), column block, r, kb, g)."""
    p, n0, n1, tile = _chunk_task(task, NT, N, P)
    tb = tile % TBn
    rest = tile // TBn
    r = rest % R
    rest //= R
    return p, n0, n1, tb, r, rest % KBn, rest // KBn


@parallel_kernel
def conv_dw_tiles(x, dy, off, part, C, WpC, sh, sw, dlh, OH, OW, dh0, dw0):
    """Weight gradient as a correlation of the input with the deltas, per batch chunk.

    ``part[p, g, kb, r, t, k] = sum_{n in chunk p} sum_{i < OH, j < OW} x[n, (i*sh + r*dlh)*WpC
    + j*sw*C + off[g, t]] * dy[n, dh0 + i, dw0 + j, g*KBn + kb, k]``, chunk ``p`` holding
    samples ``[p*N//P, (p+1)*N//P)``; the weight gradient is ``part.sum(axis=0)``.

    x    : (N, Hp*Wp*C)               padded channels-last input, each sample flattened;
                                      ``C`` is its channel count, ``WpC = Wp*C`` a row.
    dy   : (N, Hd, Wd, G*KBn, KBW)    channels-last deltas at offset ``(dh0, dw0)``, each
                                      group's channels padded to ``KBn*KBW``.
    off  : (G, T) uint64              column offsets, ``T`` a multiple of ``TC``.  Unsigned,
                                      so Numba emits no negative-index wraparound for them.
    part : (P, G, KBn, R, T, KBW)     output, every element written once.

    Parallel over (chunk, tile) pairs, chunk-major: each thread gets a contiguous run of
    them, mostly within one chunk, and every pair owns its output tile in ``part``, so no two
    threads write the same memory.
    """
    N = dy.shape[0]
    P, G, KBn, R, T = part.shape[:5]
    TBn = T // TC
    NT = G * KBn * R * TBn
    for task in prange(P * NT):
        p, n0, n1, tb, r, kb, g = _dw_task(task, NT, N, P, TBn, R, KBn)
        gk = g * KBn + kb
        o0 = off[g, tb * TC + 0]
        o1 = off[g, tb * TC + 1]
        o2 = off[g, tb * TC + 2]
        o3 = off[g, tb * TC + 3]
        o4 = off[g, tb * TC + 4]
        o5 = off[g, tb * TC + 5]
        o6 = off[g, tb * TC + 6]
        o7 = off[g, tb * TC + 7]
        acc = stack_tile(TC, KBW, part.dtype)
        for t in range(TC):
            for k in range(KBW):
                acc[t, k] = 0
        for n in range(n0, n1):
            xn = x[n]
            for i in range(OH):
                row = np.uint64((i * sh + r * dlh) * WpC)
                for j in range(OW):
                    base = row + np.uint64(j * sw * C)
                    x0 = xn[base + o0]
                    x1 = xn[base + o1]
                    x2 = xn[base + o2]
                    x3 = xn[base + o3]
                    x4 = xn[base + o4]
                    x5 = xn[base + o5]
                    x6 = xn[base + o6]
                    x7 = xn[base + o7]
                    for k in range(KBW):
                        d = dy[n, dh0 + i, dw0 + j, gk, k]
                        acc[0, k] += x0 * d
                        acc[1, k] += x1 * d
                        acc[2, k] += x2 * d
                        acc[3, k] += x3 * d
                        acc[4, k] += x4 * d
                        acc[5, k] += x5 * d
                        acc[6, k] += x6 * d
                        acc[7, k] += x7 * d
        for t in range(TC):
            for k in range(KBW):
                part[p, g, kb, r, tb * TC + t, k] = acc[t, k]


@parallel_kernel
def conv_dw_tiles_wide(x, dy, off, part, C, WpC, sh, sw, dlh, OH, OW, dh0, dw0):
    """:func:`conv_dw_tiles` with a TCW x KBWW = 6 x 64 tile, for groups of more than 32
    output channels: 24 accumulators, 4 delta vectors and 6 broadcast inputs per 24 FMAs
    (about 30% faster there than 8 x 32; with 32 channels or fewer it would pad half the
    lanes).  Arguments and layout as :func:`conv_dw_tiles`, with KBWW channels per block
    and ``T`` a multiple of TCW.
    """
    N = dy.shape[0]
    P, G, KBn, R, T = part.shape[:5]
    TBn = T // TCW
    NT = G * KBn * R * TBn
    for task in prange(P * NT):
        p, n0, n1, tb, r, kb, g = _dw_task(task, NT, N, P, TBn, R, KBn)
        gk = g * KBn + kb
        o0 = off[g, tb * TCW + 0]
        o1 = off[g, tb * TCW + 1]
        o2 = off[g, tb * TCW + 2]
        o3 = off[g, tb * TCW + 3]
        o4 = off[g, tb * TCW + 4]
        o5 = off[g, tb * TCW + 5]
        acc = stack_tile(TCW, KBWW, part.dtype)
        for t in range(TCW):
            for k in range(KBWW):
                acc[t, k] = 0
        for n in range(n0, n1):
            xn = x[n]
            for i in range(OH):
                row = np.uint64((i * sh + r * dlh) * WpC)
                for j in range(OW):
                    base = row + np.uint64(j * sw * C)
                    x0 = xn[base + o0]
                    x1 = xn[base + o1]
                    x2 = xn[base + o2]
                    x3 = xn[base + o3]
                    x4 = xn[base + o4]
                    x5 = xn[base + o5]
                    for k in range(KBWW):
                        d = dy[n, dh0 + i, dw0 + j, gk, k]
                        acc[0, k] += x0 * d
                        acc[1, k] += x1 * d
                        acc[2, k] += x2 * d
                        acc[3, k] += x3 * d
                        acc[4, k] += x4 * d
                        acc[5, k] += x5 * d
        for t in range(TCW):
            for k in range(KBWW):
                part[p, g, kb, r, tb * TCW + t, k] = acc[t, k]


@parallel_kernel
def bias_grad_channels_last(dy, h0, w0, OH, OW, part):
    """``part[n, k] = sum_{i < OH, j < OW} dy[n, h0 + i, w0 + j, k]`` in float64, for
    channels-last deltas (N, Hd, Wd, Cd); ``part`` (N, Cd).  The caller sums over n."""
    N, Cd = part.shape
    for n in prange(N):
        for k in range(Cd):
            part[n, k] = 0
        for i in range(OH):
            for j in range(OW):
                for k in range(Cd):
                    part[n, k] += dy[n, h0 + i, w0 + j, k]
