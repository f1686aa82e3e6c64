"""Grouped convolution with few channels per group: output pixels as the vector lanes,
each group's few channels as the rows of the register tile.

Legend: ``x`` (N, C, H, W) input, ``w`` (K, Cg, R, S) weights, ``b`` (K,) bias, ``dy``
(N, K, OH, OW) deltas, ``dx`` and ``dw`` their gradients; ``G`` groups of ``Cg = C/G``
input and ``Kg = K/G`` output channels, output channel ``k`` in group ``g = k // Kg``;
strides ``sh, sw``, dilations ``dlh, dlw``, pads ``pt, pb, pl, pr``.

Why an algorithm of its own
---------------------------
The channel tile vectorises over output channels (32 per tile) and steps over input
channels in blocks of 16, within one group: a group of 4 input and 4 output channels
fills 4 of its 32 output lanes and 4 of 16 input steps, so 31 of 32 multiply-adds are
padding (it ran ResNeXt's 32-group 3x3 layer at 0.04-0.2x PyTorch).  Here the lanes are
output *pixels*, which every group has plenty of, and a tile holds ``KT`` output
channels of one group times two vectors of ``PX`` pixels: each step loads two input
vectors (one tap of one input channel of the group) and multiplies them by ``KT``
broadcast weights.  Nothing is padded except the last channel block of a group whose
``Kg`` is not a multiple of ``KT`` (a block of at most ``KH = KT/2`` channels runs a half
tile).  ``KT = 8`` makes 16 FMAs a step for 2 vector loads and 8 broadcasts; the half
tile's 8 FMAs take 2 vector loads and 4 broadcasts, and ran the 8 groups of 16 channels
of ``bench/cases.py`` 13-15% slower on the Xeon host of ``docs/benchmarks.md``.

The math
--------
The input is laid out as :func:`fastconv.layouts._phase_grid` lays it out: zero-padded
planes, each split into ``sh x sw`` phase planes of ``Hq x Wq`` (phase ``(p, q)`` holding
the padded rows ``p, p + sh, ...`` at the columns ``q, q + sw, ...``), so that for every
tap consecutive output pixels of a row, and consecutive rows, read consecutive inputs.
Tap ``t = (c, r, s)`` of group ``g`` (``c < Cg``) reads, for output pixel ``(i, j)``::

    xq[n, g*Cg + c, (r*dlh) % sh, (s*dlw) % sw, i + (r*dlh)//sh, j + (s*dlw)//sw]
      = xf[n, g*gstep + toff[i, t] + j],    gstep = Cg*sh*sw*Hq*Wq

with ``xf`` each image's planes flattened (the forward kernel lays out one group of one
image at a time, so ``g*gstep`` drops out of its offsets).  Rows shorter than a vector
are joined (:func:`_rows`): pixel ``(i, j)`` is pixel ``i*Wq + j`` of one wide row, whose
columns from ``OW`` on in each ``Wq`` are computed and dropped.  Then::

    y[n,k,i,j]  = b[k] + sum_t w[k, t] * xf[n, g*gstep + toff[i, t] + j]
    dw[k, t]    = sum_{n,i,j} dy[n,k,i,j] * xf[n, g*gstep + toff[i, t] + j]

**dX** is, for each stride phase of dx (see "dX, derived once" in
:mod:`fastconv.geometry`), a stride-1 grouped convolution of its own: the deltas, cropped
or zero-padded to the rows and columns the phase reads, correlated with the phase's taps
of each group's filters, transposed (``Kg`` inputs to ``Cg`` outputs) and rotated::

    dx[n, g*Cg + c, a + sh*u, b + sw*v] = sum_{kg<Kg, i, j} dyp[n, g*Kg + kg, u + i*Dr,
                                              v + j*Ds] * w[g*Kg + kg, c, taps_r[i], taps_s[j]]

(``Dr``, ``Ds`` the delta rows and columns between the phase's taps), so it runs the
forward kernel and never multiplies the zeros a strided dX would insert.  At stride 1 the
one phase is the whole of dx.

Non-finite values: the forward pass multiplies the zero padding as the reference does;
dW zeroes both operands of the lanes a row's shifted last vector shares with the previous
one (selects, never ``inf * 0``), and on wide rows, whose dropped columns multiply input
pixels by zero deltas, hands an input holding an inf or NaN to the next algorithm; dX
with an inf or NaN weight hands over to the next algorithm (the channel tile's exact
path), since the weight times the deltas' zero border would make NaNs that no real delta
touches.

Parallelism: forward tasks are (image, group), each splitting its group's planes into
stride phases in a scratch of its own and writing its own outputs; dW tasks are (batch
chunk, group), each splitting its chunk's planes of the group likewise and writing its
own partial sums, which are added in a fixed order, so results do not depend on the
thread count.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numba
import numpy as np
from numba import prange

from .. import config
from .._jit import copy_run, merge_run, parallel_kernel, serial_kernel
from ..geometry import ConvGeometry, _dx_joins, _dx_phases
from ..kernels import _finite, _phase_fill
from ..layouts import _batch_chunks, _sum_chunks, _task_runs
from .pixel import (
    DK,
    DT,
    KH,
    KP,
    PX,
    _dw_pixel_tile,
    _pixel_span,
)

NAME = "grouped"

#: Output channels per forward tile (:func:`fastconv.algorithms.pixel._pixel_span`), in
#: two register tiles of ``KH`` (float32: 16 accumulators, two input vectors and ``KT``
#: broadcast weights a step).  ``KH`` channels make a half tile: the blocks of float64
#: weights (whose vectors take two registers each, so that a whole tile would not fit the
#: register file) and a block of at most ``KH`` channels.
KT = KP


def _block(dtype) -> int:
    """Output channels per block of the forward weights in ``dtype``: ``KT``, or ``KH``
    for float64."""
    return KT if np.dtype(dtype).itemsize == 4 else KH


def why_not(geo, dtype, pass_):
    if geo.G == 1 and not (pass_ == "grad_input" and geo.C <= config.PIXEL_MAX_C):
        return (f"it needs groups > 1 (or, for dX, at most {config.PIXEL_MAX_C} input "
                "channels)")
    if pass_ == "grad_input":
        if not all(_rows_ok(p.geo) for p in _dx_plan(geo)):
            return (f"its dX needs at least {PX} pixels in each stride phase of the input, "
                    f"or rows of {PX}")
    elif not _rows_ok(geo):
        return f"it needs output rows of at least {PX} pixels, or {PX} pixels in all"
    return None


def slower(geo, dtype, pass_):
    if geo.Cg >= config.GROUPED_MAX_CG and geo.Kg >= config.GROUPED_MAX_CG:
        return (f"groups of at least {config.GROUPED_MAX_CG} input and output channels fill "
                "the channel tile's vectors (config.GROUPED_MAX_CG)")
    return None


# ---- layouts ---------------------------------------------------------------------------


class _Rows(NamedTuple):
    """How the kernels read one group's input (:func:`_rows`): its ``Cg`` planes split
    into stride phases, ``(Cg, sh, sw, Hr, Wq)`` flattened to ``gstep`` elements
    (:func:`fastconv.layouts._phase_grid`, ``Hr`` being ``Hq`` or, for wide rows, ``Hq +
    1``); the ``OH x OW`` rows of output pixels the kernels run over, with where each row
    reads each tap, ``toff`` (OH, Cg*R*S) int64 (pixel ``j`` of row ``i`` reads element
    ``toff[i, t] + j``); ``Wq`` the phase planes' width; and ``wide``, whether the output's
    rows are joined into one wide row of ``Wq``-pixel rows."""

    grid: tuple
    gstep: int
    toff: np.ndarray
    OH: int
    OW: int
    Wq: int
    wide: bool


def _wide(geo: ConvGeometry) -> bool:
    """Whether the kernels run the output as one wide row: rows shorter than a vector."""
    return geo.OW < PX


def _rows_ok(geo: ConvGeometry) -> bool:
    """Whether the kernels' rows hold at least one vector of pixels."""
    return geo.OW >= PX or geo.OH * -(-(geo.W + geo.pl + geo.pr) // geo.sw) >= PX


@functools.lru_cache(maxsize=256)
def _rows(geo: ConvGeometry, join: bool = True) -> _Rows:
    """The rows and taps of ``geo`` (see the module docstring), the taps in ``(c, r, s)``
    order.  With ``join``, rows shorter than a vector are joined (:func:`_wide`): output
    pixel ``(i, j)`` is pixel ``i*Wq + j`` of one row of ``OH*Wq``, the columns from ``OW``
    on of each output row computed and dropped; a zero row below each phase plane keeps
    the last plane's reads of those columns inside the grid."""
    wide = join and _wide(geo)
    sh, sw, dlh, dlw = geo.sh, geo.sw, geo.dlh, geo.dlw
    Hq = -(-(geo.H + geo.pt + geo.pb) // sh)
    Wq = -(-(geo.W + geo.pl + geo.pr) // sw)
    Hr = Hq + int(wide)
    c, rs = np.divmod(np.arange(geo.Cg * geo.R * geo.S), geo.R * geo.S)
    r, s = np.divmod(rs, geo.S)
    rh, sv = r * dlh, s * dlw
    toff = (((c * sh + rh % sh) * sw + sv % sw) * Hr + rh // sh) * Wq + sv // sw
    if wide:
        toff, OH, OW = toff[None], 1, geo.OH * Wq
    else:
        toff, OH, OW = np.arange(geo.OH)[:, None] * Wq + toff, geo.OH, geo.OW
    toff = np.ascontiguousarray(toff, np.int64)
    toff.flags.writeable = False
    return _Rows((geo.Cg, sh, sw, Hr, Wq), geo.Cg * sh * sw * Hr * Wq, toff, OH, OW, Wq,
                 wide)


def prepare(geo, w, pass_):
    """The weights as the forward kernel reads them (:func:`_blocked`); for dX,
    :class:`_DxWeights`."""
    if pass_ == "forward":
        return _blocked(w.reshape(geo.G, geo.Kg, geo.Cg * geo.R * geo.S))
    return _dx_weights(geo, w)


def _blocked(w: np.ndarray) -> np.ndarray:
    """Each group's filters, ``w`` (G, Kg, T) with ``T`` taps, as the forward kernel
    reads them, ``(G, KTn, T, KB)``: the output channels in blocks of ``KB =
    _block(w.dtype)``, zero past ``Kg``."""
    G, Kg, T = w.shape
    KB = _block(w.dtype)
    KTn = -(-Kg // KB)
    wp = np.zeros((G, KTn * KB, T), w.dtype)
    wp[:, :Kg] = w
    return np.ascontiguousarray(wp.reshape(G, KTn, KB, T).transpose(0, 1, 3, 2))


class _DxPhase(NamedTuple):
    """One (row phase, column phase) of dX (see "dX, derived once" in
    :mod:`fastconv.geometry`): a stride-1 grouped convolution ``geo`` of the deltas' rows
    ``rows`` and columns ``cols`` (slices), with the filter taps ``taps_r`` x ``taps_s``
    (rotated), writing dx's rows ``out0h, out0h + sh, ...`` and columns likewise."""

    geo: ConvGeometry
    rows: slice
    cols: slice
    taps_r: tuple
    taps_s: tuple
    out0h: int
    out0w: int


def _axis(start: int, count: int, taps: int, step: int, size: int):
    """The delta slice and pads of one axis of a phase: output ``u`` reads deltas
    ``start + u + t*step`` for tap ``t``, of which ``0 .. size-1`` exist."""
    end = start + count + (taps - 1) * step  # one past the last delta read
    lo = max(start, 0)
    hi = max(lo, min(size, end))
    return slice(lo, hi), lo - start, end - hi


@functools.lru_cache(maxsize=64)
def _dx_plan(geo: ConvGeometry) -> tuple:
    """dX's phases (:class:`_DxPhase`): one per stride phase of the input that meets a
    delta; the rows and columns of the others stay zero."""
    rows = _dx_phases(geo.H, geo.pt, geo.sh, geo.dlh, geo.R, geo.OH)[0]
    cols = _dx_phases(geo.W, geo.pl, geo.sw, geo.dlw, geo.S, geo.OW)[0]
    out = []
    for a in rows:
        rs, pt, pb = _axis(a.start, a.count, len(a.taps), a.step, geo.OH)
        for c in cols:
            cs, pl, pr = _axis(c.start, c.count, len(c.taps), c.step, geo.OW)
            pgeo = ConvGeometry(geo.N, geo.K, rs.stop - rs.start, cs.stop - cs.start, geo.C,
                                len(a.taps), len(c.taps), geo.G, 1, 1, a.step, c.step,
                                pt, pb, pl, pr, a.count, c.count)
            out.append(_DxPhase(pgeo, rs, cs, a.taps, c.taps, a.out0, c.out0))
    return tuple(out)


class _DxFused(NamedTuple):
    """dX of a strided layer in one pass (:func:`grouped_dx_phases`): each task pads its
    group's ``Kg`` delta planes once to ``Hd x Wd`` (one more zero row under each, for the
    wide rows' reads), and every phase reads them.  Phase ``p`` runs its taps
    ``[t0[p], t0[p+1])`` of ``toff`` (the offset of tap ``(kg, e, f)`` in those planes) over
    one wide row of ``cnth[p]`` rows of pitch ``Wd``; its outputs are dx's rows ``out0h[p]
    + u*sh`` and columns ``out0w[p] + t*sw``, ``t < cntw[p]``, through a scratch of
    ``Cg x cnth[p]*Wd`` at ``obase[p]``.  ``pairs``: for each row phase, its phases of
    the even and odd columns, joined into dx rows by :func:`merge_run` (``sw == 2`` with
    both); empty otherwise."""

    pads: tuple
    Hd: int
    Wd: int
    toff: np.ndarray
    t0: np.ndarray
    cnth: np.ndarray
    cntw: np.ndarray
    out0h: np.ndarray
    out0w: np.ndarray
    obase: np.ndarray
    pairs: np.ndarray
    covered: bool


@functools.lru_cache(maxsize=64)
def _dx_fused(geo: ConvGeometry):
    """:class:`_DxFused` for ``geo``, or None where a phase's wide row is shorter than a
    vector (the phases then run one by one)."""
    rows, ptd, pbd = _dx_phases(geo.H, geo.pt, geo.sh, geo.dlh, geo.R, geo.OH)
    cols, pld, prd = _dx_phases(geo.W, geo.pl, geo.sw, geo.dlw, geo.S, geo.OW)
    Hd, Wd = geo.OH + ptd + pbd, geo.OW + pld + prd
    plane = (Hd + 1) * Wd
    toff, t0, cnth, cntw, out0h, out0w, obase = [], [0], [], [], [], [], [0]
    for ph in rows:
        for pw in cols:
            if ph.count * Wd < PX:
                return None
            for kg in range(geo.Kg):  # the taps in the order of _dx_weights: (kg, e, f)
                for e in range(len(ph.taps)):
                    for f in range(len(pw.taps)):
                        toff.append(kg * plane + (ptd + ph.start + e * ph.step) * Wd + pld
                                    + pw.start + f * pw.step)
            t0.append(len(toff))
            cnth.append(ph.count)
            cntw.append(pw.count)
            out0h.append(ph.out0)
            out0w.append(pw.out0)
            obase.append(obase[-1] + geo.Cg * ph.count * Wd)
    pairs, covered = _dx_joins(rows, cols, geo.H, geo.W, geo.sw)
    arrays = [np.array(v, np.int64) for v in (toff, t0, cnth, cntw, out0h, out0w, obase)]
    for a in arrays:
        a.flags.writeable = False
    return _DxFused((ptd, pbd, pld, prd), Hd, Wd, *arrays, pairs, covered)


class _DxWeights(NamedTuple):
    """dX's prepared weights: each phase's filters (:func:`_blocked`), the same side by
    side for :func:`grouped_dx_phases` where it may run (``(G, KTn, phases, max T_p,
    KB)``, zero past a phase's taps; else None), and whether every weight is finite."""

    phases: tuple
    joined: np.ndarray | None
    finite: bool


def _dx_weights(geo: ConvGeometry, w: np.ndarray) -> _DxWeights:
    """Group ``g``'s output ``c`` of a phase reads delta channel ``kg`` at its tap
    ``(i, j)`` with ``w[g*Kg + kg, c, taps_r[i], taps_s[j]]``: the filters transposed
    (``Kg`` inputs, ``Cg`` outputs) and rotated (the phase's taps are in rotated order)."""
    G, Kg, Cg = geo.G, geo.Kg, geo.Cg
    wg = w.reshape(G, Kg, Cg, geo.R, geo.S)
    phases = []
    for p in _dx_plan(geo):
        sub = wg[:, :, :, list(p.taps_r)][:, :, :, :, list(p.taps_s)]
        T = Kg * len(p.taps_r) * len(p.taps_s)
        phases.append(_blocked(np.ascontiguousarray(sub.transpose(0, 2, 1, 3, 4)).reshape(
            G, Cg, T)))
    joined = None  # only the one-pass strided dX reads them
    if _dx_fused(geo) is not None:
        Tmax = max((a.shape[2] for a in phases), default=0)
        KB = _block(w.dtype)
        joined = np.zeros((G, -(-Cg // KB), len(phases), Tmax, KB), w.dtype)
        for p, a in enumerate(phases):
            joined[:, :, p, :a.shape[2]] = a
    return _DxWeights(tuple(phases), joined, bool(np.isfinite(w).all()))


# ---- the passes ------------------------------------------------------------------------


def forward(geo, x, wp, b):
    return _forward(geo, x, wp, b)


def grad_input(geo, dy, wd):
    if not wd.finite:
        return None  # inf * the deltas' zero border would be NaN: the channel tile's path
    phases = _dx_plan(geo)
    if len(phases) == 1 and phases[0].geo.OH == geo.H and phases[0].geo.OW == geo.W:
        p = phases[0]  # stride 1: one phase, the whole of dx
        return _forward(p.geo, dy[:, :, p.rows, p.cols], wd.phases[0], None)
    fz = _dx_fused(geo)
    if fz is not None and (geo.Kg * (fz.Hd + 1) * fz.Wd * dy.itemsize
                           <= config.GROUPED_DX_FUSED_BYTES):
        make = np.empty if fz.covered else np.zeros
        dx = make((geo.N, geo.C, geo.H, geo.W), dy.dtype)
        Q = _task_runs(geo.N * geo.G)
        grid = np.zeros((Q, geo.Kg, 1, 1, fz.Hd + 1, fz.Wd), dy.dtype)  # pads: zero
        outs = np.empty((Q, int(fz.obase[-1]) + PX), dy.dtype)
        grouped_dx_phases(np.ascontiguousarray(dy).reshape(geo.N, geo.K, -1), geo.OW,
                          fz.pads[0], fz.pads[2], fz.toff, fz.t0, wd.joined, fz.cnth,
                          fz.cntw, fz.out0h, fz.out0w, fz.obase, fz.pairs, geo.sh, geo.sw,
                          dx.reshape(geo.N, geo.C, -1), geo.W, grid, outs)
        return dx
    dx = np.zeros((geo.N, geo.C, geo.H, geo.W), dy.dtype)
    for p, wp in zip(phases, wd.phases, strict=True):
        dx[:, :, p.out0h::geo.sh, p.out0w::geo.sw][:, :, :p.geo.OH, :p.geo.OW] = _forward(
            p.geo, dy[:, :, p.rows, p.cols], wp, None)
    return dx


def _forward(geo, x, wp, b):
    rows = _rows(geo)
    bias = np.zeros(geo.K, x.dtype) if b is None else np.ascontiguousarray(b)
    y = np.empty((geo.N, geo.K, rows.OH, rows.OW), x.dtype)
    Q = _task_runs(geo.N * geo.G)
    scratch = np.empty((Q, *rows.grid), x.dtype)  # each run zeroes its own
    grouped_pixel_tiles(np.ascontiguousarray(x).reshape(geo.N, geo.C, geo.H * geo.W),
                        geo.W, geo.pt, geo.pl, rows.toff, wp, bias, y, scratch)
    if not rows.wide:
        return y
    out = np.empty((geo.N, geo.K, geo.OH, geo.OW), x.dtype)
    grouped_wide_rows_out(y.reshape(geo.N * geo.K, geo.OH * rows.Wq), rows.Wq,
                          out.reshape(geo.N * geo.K, geo.OH * geo.OW), geo.OW)
    return out


def grad_weight(geo, x, dy):
    rows = _rows(geo)
    G, Kg, T = geo.G, geo.Kg, geo.Cg * geo.R * geo.S
    TTn, KTn = -(-T // DT), -(-Kg // DK)
    tt = np.zeros((rows.OH, TTn * DT), np.int64)  # padding taps read offset 0: dropped
    tt[:, :T] = rows.toff
    P = _batch_chunks(geo.N, geo.K * rows.OH * rows.OW * dy.dtype.itemsize,
                      config.DW_PIXEL_CHUNK_BYTES)
    nimg = -(-geo.N // P)  # the most samples in a chunk
    Q = _task_runs(P * G)
    grid = np.zeros((Q, nimg, *rows.grid), x.dtype)  # its padding stays zero
    # Each task's deltas as the rows of ``tt``; wide rows are zero in the dropped columns,
    # which read input pixels: an inf or NaN there times such a zero would be a NaN that
    # no real product makes (such an input goes to the next algorithm).
    dyw = np.zeros((Q, nimg, DK, rows.OH, rows.OW), dy.dtype)
    bad = np.zeros(Q, np.bool_)
    part = np.empty((P, G, KTn, TTn, DK, DT), dy.dtype)
    grouped_dw_pixels(np.ascontiguousarray(x).reshape(geo.N, geo.C, geo.H * geo.W), geo.W,
                      geo.pt, geo.pl, np.ascontiguousarray(dy), tt, grid, dyw, bad, part)
    if bad.any():
        return None
    dw = _sum_chunks(part).transpose(0, 1, 3, 2, 4).reshape(G, KTn * DK, TTn * DT)
    return np.ascontiguousarray(dw[:, :Kg, :T]).reshape(geo.K, geo.Cg, geo.R, geo.S)


# ---- kernels ---------------------------------------------------------------------------


@parallel_kernel
def grouped_pixel_tiles(x, W, pt, pl, toff, w, b, y, scratch):
    """Forward pass of a grouped convolution, vectorised over output pixels.

    ``y[n, k, i, j] = b[k] + sum_t xg[toff[i, t] + j] * w[g, kb, t, kk]``,
    ``k = g*Kg + kb*KB + kk``, over the taps ``t = (c, r, s)`` of group ``g``, ``xg`` being
    group ``g``'s input planes of image ``n`` split into stride phases and flattened:

    x : (N, C, H*W)            NCHW input, each plane flattened, C-contiguous.
    W, pt, pl : int            the input's width, its top and left padding.
    toff : (OH, T) int64       where output row ``i`` reads tap ``t`` in ``xg``.
    w : (G, KTn, T, KB)        weights (:func:`_blocked`), zero past ``Kg``; ``KB`` is
                               ``KT`` or ``KH``.
    b : (K,)                   bias.
    y : (N, K, OH, OW)         NCHW output, C-contiguous, ``OW >= PX``.
    scratch : (Q, Cg, sh, sw, Hr, Wq)   one group's phase grid for each of ``Q`` task groups.

    Tasks are (image, group), cut into ``Q`` runs: a task splits its group's ``Cg`` planes
    into stride phases in its run's scratch (:func:`fastconv.kernels._phase_fill`, some
    tens of KB that stay in the core's cache), then computes every output of the group
    from it, each block of ``KB`` channels and each row in turn, with the pixel forward
    kernels' tile, row covering and stores (:func:`fastconv.algorithms.pixel._pixel_span`):
    each step loads two vectors of ``PX`` inputs and makes ``2*KT`` FMAs with ``KT``
    broadcast weights (``2*KH`` with ``KH`` in a half tile).  Each task owns its outputs.
    """
    N, K, OH, OW = y.shape
    G, KTn, T, KB = w.shape
    Q, Cg = scratch.shape[:2]
    Kg = K // G
    yf = y.reshape(y.size)
    ustep = np.uint64(OH * OW)  # from one channel's output plane to the next
    tasks = N * G
    for q in prange(Q):
        grid = scratch[q]
        xg = grid.reshape(grid.size)
        xg[:] = 0  # the padding, zero for every task of the run (a thread's own memset)
        for task in range(q * tasks // Q, (q + 1) * tasks // Q):
            n = task // G
            g = task % G
            _group_planes(x, n, g * Cg, W, grid, pt, pl, False)
            for kt in range(KTn):
                k0 = g * Kg + kt * KB
                kn = min(KB, Kg - kt * KB)
                wk = w[g, kt]
                for i in range(OH):
                    _pixel_span(xg, toff[i], wk, kn, b, k0, yf,
                                np.uint64(((n * K + k0) * OH + i) * OW), ustep, OW)


@numba.njit(inline="always")
def _group_planes(src, n, c0, W, dst, pt, pl, check):
    """Planes ``c0 .. c0 + len(dst) - 1`` of image ``n`` of ``src`` (N, C, H*W) into their
    stride phases ``dst[c]`` (:func:`fastconv.kernels._phase_fill`): one group's input or
    deltas, as every grouped kernel lays them out.  ``dst`` is part of a run's scratch,
    zeroed by the wrapper and filled only with planes of this shape, so its padding is
    zero and never written.  With ``check``, whether those planes hold no inf or NaN (True
    without)."""
    finite = True
    for c in range(dst.shape[0]):
        _phase_fill(src[n, c0 + c], W, dst[c], pt, pl, True)
        if check and not _finite(src[n, c0 + c]):
            finite = False
    return finite


@serial_kernel
def _span_serial(xg, ti, wk, kn, b, k0, yf, urow, ustep, OW):
    """:func:`fastconv.algorithms.pixel._pixel_span` compiled on its own: inlined into
    :func:`grouped_dx_phases`'s loop body, its tile stayed in memory."""
    _pixel_span(xg, ti, wk, kn, b, k0, yf, urow, ustep, OW)


@parallel_kernel
def grouped_dx_phases(dy, OW, ptd, pld, toff, t0, w, cnth, cntw, out0h, out0w, obase, pairs,
                      sh, sw, dx, W, grid, outs):
    """dX of a strided grouped convolution, every stride phase in one pass (see
    :class:`_DxFused`).

    dy : (N, K, OH*OW)           deltas, C-contiguous.
    toff, t0 : int64             the phases' taps in a task's padded delta planes.
    w : (G, KTn, phases, T, KB)  the phases' filters (:class:`_DxWeights`).
    dx : (N, C, H*W)             the phases' pixels written (the others zero already).
    grid : (Q, Kg, 1, 1, Hd + 1, Wd)   scratch: one group's padded delta planes.
    outs : (Q, >= obase[-1])     scratch: the phases' outputs, in wide rows.

    Tasks are (image, group), cut into ``Q`` runs: a task pads its group's ``Kg`` delta
    planes (:func:`fastconv.kernels._phase_fill`), computes each phase's ``Cg`` output
    planes with the forward tile (:func:`_span_serial`, ``KB`` channels at a time) into its
    scratch, then writes dx's rows: at ``sw == 2`` each row joined from its two column
    phases by masked vectors and shuffles (:func:`merge_run`), where a phase at a time
    would store every other element.  Each task owns its outputs.
    """
    N = dy.shape[0]
    C = dx.shape[1]
    G, KTn = w.shape[:2]
    KB = w.shape[4]
    Q, Kg = grid.shape[:2]
    Cg = C // G
    Wd = grid.shape[5]
    nphase = t0.shape[0] - 1
    zb = np.zeros(KB * KTn, dx.dtype)  # no bias
    tasks = N * G
    for q in prange(Q):
        gq = grid[q]
        xg = gq.reshape(gq.size)
        oq = outs[q]
        for task in range(q * tasks // Q, (q + 1) * tasks // Q):
            n = task // G
            g = task % G
            _group_planes(dy, n, g * Kg, OW, gq, ptd, pld, False)
            for p in range(nphase):
                L = cnth[p] * Wd  # one wide row per channel
                ti = toff[t0[p]:t0[p + 1]]
                for kt in range(KTn):
                    _span_serial(xg, ti, w[g, kt, p], min(KB, Cg - kt * KB), zb, kt * KB,
                                 oq, np.uint64(obase[p] + kt * KB * L), np.uint64(L), L)
            for c in range(Cg):
                dxc = dx[n, g * Cg + c]
                if pairs.shape[0] > 0:
                    for a in range(pairs.shape[0]):
                        pe, po = pairs[a, 0], pairs[a, 1]
                        L = cnth[pe] * Wd
                        for u in range(cnth[pe]):
                            merge_run(dxc, (out0h[pe] + u * sh) * W, oq,
                                      obase[pe] + c * L + u * Wd, obase[po] + c * L + u * Wd,
                                      W)
                else:
                    for p in range(nphase):
                        L = cnth[p] * Wd
                        for u in range(cnth[p]):
                            at = (out0h[p] + u * sh) * W + out0w[p]
                            src = obase[p] + c * L + u * Wd
                            if sw == 1:
                                copy_run(dxc, at, oq, src, cntw[p])
                            else:
                                for t in range(cntw[p]):
                                    dxc[at + t * sw] = oq[src + t]


@parallel_kernel
def grouped_wide_rows_out(src, Wq, dst, OW):
    """The first ``OW`` columns of each ``Wq``-pixel row of wide rows, in parallel:
    ``dst[p, i*OW + j] = src[p, i*Wq + j]`` for ``j < OW``.

    src : (P, OH*Wq), dst : (P, OH*OW), both C-contiguous, ``OW <= Wq``.
    """
    P = src.shape[0]
    OH = dst.shape[1] // OW
    for p in prange(P):
        s = src[p]
        d = dst[p]
        for i in range(OH):
            copy_run(d, i * OW, s, i * Wq, OW)  # masked vectors: rows shorter than one


@serial_kernel
def _group_dw_tile(x, dy, toff, n0, n1, k0, k1, k2, k3, tt, JT, out):
    """One tile of :func:`grouped_dw_pixels`:
    :func:`fastconv.algorithms.pixel._dw_pixel_tile`, every row's vectors through one loop
    with its selects.  Compiled on its own, so that LLVM keeps the tile in registers:
    inlined into the kernel's loop body, each FMA also loaded and stored its
    accumulator."""
    _dw_pixel_tile(x, dy, toff, n0, n1, k0, k1, k2, k3, tt, JT, out, False)


@parallel_kernel
def grouped_dw_pixels(x, W, pt, pl, dy, toff, grid, dyw, bad, part):
    """dW of a grouped convolution, vectorised over output pixels.

    ``part[p, g, kb, tb, a, c] = sum_{n in chunk p} sum_{i, j} dy[n, g*Kg + DK*kb + a, i, j]
    * xg[n, toff[i, DT*tb + c] + j]``, ``xg[n]`` group ``g``'s planes of image ``n`` split
    into stride phases and flattened (:func:`_rows`); dW is ``part.sum(axis=0)``.

    x : (N, C, H*W)              NCHW input, each plane flattened, C-contiguous.
    W, pt, pl : int              the input's width, its top and left padding.
    dy : (N, K, OH, OW)          NCHW deltas, C-contiguous.
    toff : (R_, TTn*DT) int64    the taps of one group, padding taps reading offset 0, for
                                 ``R_`` rows of ``OW_`` pixels: ``OH x OW``, or with wide
                                 rows (``OW < PX``) one row of ``OH*Wq``.
    grid : (Q, nimg, Cg, sh, sw, Hr, Wq)   scratch: a chunk's phase grids of one group.
    dyw : (Q, nimg, DK, R_, OW_)  zeros: a channel block's deltas as the rows of ``toff``.
    bad : (Q,) bool              set where a task met an inf or NaN input on wide rows.
    part : (P, G, KTn, TTn, DK, DT)

    Tasks are (chunk, group), cut into ``Q`` runs, each with its own scratch: a task
    splits its chunk's ``Cg`` planes of the group into stride phases
    (:func:`fastconv.kernels._phase_fill`), some tens of KB that stay in the core's cache,
    and for each block of ``DK`` channels copies their deltas and runs every tap block
    (:func:`_group_dw_tile`); one global phase grid cost a pass over memory as large as the
    input, and a check of it for inf and NaN another.  Channels past the group's last
    repeat it, and the wrapper drops them.
    """
    N, K, OHd, OWd = dy.shape
    P, G, KTn, TTn = part.shape[:4]
    Q, nimg, Cg = grid.shape[:3]
    Kg = K // G
    OH, OW = dyw.shape[3], dyw.shape[4]
    wide = OH < OHd
    Wq = grid.shape[6]
    JT = (OW + PX - 1) // PX
    NT = P * G
    for q in prange(Q):
        gq = grid[q]
        xq = gq.reshape(nimg, gq.size // nimg)
        dq = dyw[q]
        for task in range(q * NT // Q, (q + 1) * NT // Q):
            g = task % G
            p = task // G
            n0, n1 = p * N // P, (p + 1) * N // P
            last = g * Kg + Kg - 1
            for n in range(n0, n1):
                if not _group_planes(x, n, g * Cg, W, gq[n - n0], pt, pl, wide):
                    bad[q] = True
            for kt in range(KTn):
                for n in range(n0, n1):
                    for a in range(DK):
                        k = min(g * Kg + kt * DK + a, last)
                        da = dq[n - n0, a].reshape(OH * OW)
                        for i in range(OHd):
                            copy_run(da, i * Wq if wide else i * OWd, dy[n, k, i], 0, OWd)
                for tt in range(TTn):
                    _group_dw_tile(xq, dq, toff, 0, n1 - n0, 0, 1, 2, 3, tt, JT,
                                   part[p, g, kt, tt])
