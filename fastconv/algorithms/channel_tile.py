"""The direct channel tile: output channels as the vector lanes, 7 pixels x 32 channels
in registers, over zero-padded channels-last input and blocked weights.  It runs every
geometry (groups, dilation, any stride and padding), which makes it the last algorithm of
the list: the fallback of all the others.  dX runs it on the deltas, phase by phase, with
the rotated filters (see "dX, derived once" in :mod:`fastconv.geometry`)."""

from __future__ import annotations

import numpy as np

from .. import kernels as _k
from ..geometry import ConvGeometry
from ..layouts import (
    _FRESH,
    DeltaLayout,
    _batch_chunks,
    _dw_tile,
    _pack_input,
    _sum_chunks,
    delta_layout,
    pack_deltas,
)

NAME = "direct-channel-tile"


def why_not(geo, dtype, pass_):
    return None


def forward(geo, x, w, b):
    return _forward_tile(_pack_input(x, geo), w, b, geo)


def grad_input(geo, dy, w):
    layout = delta_layout(geo)
    return _grad_input_tile(pack_deltas(dy, layout), layout, w, geo)


def grad_weight(geo, x, dy):
    layout = delta_layout(geo, need_dx=False)
    return _grad_weight_tile(_pack_input(x, geo), pack_deltas(dy, layout), layout,
                                geo)


def _blocked_weights(wg: np.ndarray, CrP: int | None = None) -> np.ndarray:
    """``(G, Ko, Cr, R, S)`` weights (any strides) as ``(G, KBn, R, S, CrP, KB)``, zero past
    ``Ko`` and past ``Cr`` (``CrP >= Cr``, default ``Cr``): one strided copy."""
    G, Ko, Cr, R, S = wg.shape
    KB = _k.KB
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


def _grad_input_tile(dyp: np.ndarray, layout: DeltaLayout, w: np.ndarray,
                     geo: ConvGeometry) -> np.ndarray:
    """dX by the channel tile, phase by phase (see "dX, derived once" below)."""
    G, Kg, Cg, pt, pl = geo.G, geo.Kg, geo.Cg, layout.top, layout.left
    dx = np.zeros((geo.N, geo.C, geo.H, geo.W), dyp.dtype)
    # (K, Cg, R, S) -> (G, Cg, Kg, R, S): output channels are now c, the reduction runs
    # over k, including the layout's zero channels (KgP, with zero weights).
    wt = w.reshape(G, Kg, Cg, geo.R, geo.S).transpose(0, 2, 1, 3, 4)
    zero_bias = np.zeros((G, -(-Cg // _k.KB) * _k.KB), dyp.dtype)
    # With finite weights, taps that land on dy's zero border add exact zeros; an inf or NaN
    # weight would turn them into NaN, so then the kernel skips them (slower, and exact).
    exact = not np.isfinite(w).all()
    for ph in layout.rows:
        for pw in layout.cols:
            wb = _blocked_weights(wt[:, :, :, _taps(ph.taps), _taps(pw.taps)], layout.KgP)
            _k.conv_tiles(dyp, wb, zero_bias, dx, ph.count, pw.count, 1, 1, ph.step, pw.step,
                          pt + ph.start, pl + pw.start, ph.out0, pw.out0, geo.sh, geo.sw,
                          exact, pt, pt + geo.OH, pl, pl + geo.OW)
    return dx


def _grad_weight_tile(xp: np.ndarray, dyp: np.ndarray, layout: DeltaLayout,
                      geo: ConvGeometry, ws=_FRESH) -> np.ndarray:
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
        _k.bias_grad_channels_last(dyp, layout.top, layout.left, geo.OH, geo.OW, part)
    return part.sum(axis=0).reshape(geo.G, layout.KgP)[:, :geo.Kg].reshape(geo.K)


def _forward_tile(xp: np.ndarray, w: np.ndarray, b, geo: ConvGeometry, ws=_FRESH,
                  pool_order=False) -> np.ndarray:
    """y by the channel tile (:func:`kernels.conv_tiles`), as :func:`_forward_packed`."""
    G, Kg = geo.G, geo.Kg
    wb = _blocked_weights(w.reshape(G, Kg, geo.Cg, geo.R, geo.S))
    bb = np.zeros((G, wb.shape[1] * _k.KB), xp.dtype)
    if b is not None:
        bb[:, :Kg] = b.reshape(G, Kg)
    if not pool_order:
        y = ws.empty("y", (geo.N, geo.K, geo.OH, geo.OW), xp.dtype)
        _k.conv_tiles(xp, wb, bb, y, geo.OH, geo.OW, geo.sh, geo.sw, geo.dlh, geo.dlw,
                      0, 0, 0, 0, 1, 1, False, 0, 0, 0, 0)
        return y
    OH2, OW2 = geo.OH // 2, geo.OW // 2
    y = ws.empty("y", (geo.N, geo.K, 4, OH2 * OW2), xp.dtype)
    planes = y.reshape(geo.N, geo.K, 4 * OH2, OW2)  # plane d is rows d*OH2 ... + OH2 - 1
    for d in range(4):
        a, c = divmod(d, 2)
        _k.conv_tiles(xp, wb, bb, planes, OH2, OW2, 2 * geo.sh, 2 * geo.sw, geo.dlh, geo.dlw,
                      a * geo.sh, c * geo.sw, d * OH2, 0, 1, 1, False, 0, 0, 0, 0)
    return y
