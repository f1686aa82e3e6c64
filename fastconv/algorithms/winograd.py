"""Winograd F(2x2, 5x5) for fp32 5x5 stride-1 layers: forward, dX and dW.

The transforms are derived exactly in :mod:`fastconv.winograd`, and the kernels (with
the derivation of dW as F(5, 2)) are in :mod:`fastconv.winograd_kernels`.  All three
passes read the zero-padded channels-last layout of the direct kernels.
"""

from __future__ import annotations

import numpy as np

from .. import config
from .. import winograd as _wino
from .. import winograd_kernels as _wk
from ..geometry import ConvGeometry
from ..layouts import _FRESH, DeltaLayout, _pack_input, delta_layout, pack_deltas

NAME = "winograd-f2x2-5x5"


def why_not(geo, dtype, pass_):
    if not config.get_winograd():
        return "Winograd is turned off (fastconv.set_winograd(False))"
    if np.dtype(dtype) != np.float32:
        return f"it computes in float32 only, not {np.dtype(dtype)}"
    if geo.G != 1:
        return "it needs one group"
    if (geo.R, geo.S, geo.sh, geo.sw, geo.dlh, geo.dlw) != (5, 5, 1, 1, 1, 1):
        return "it needs a 5x5 filter at stride 1 without dilation"
    if max(geo.pads) > 4:
        return "it needs padding of at most 4"
    if geo.OH % 2 or geo.OW % 2:
        return "it needs an even output size"
    if min(geo.OW, geo.W) < 2 * _wk.TT:
        return f"it needs input and output at least {2 * _wk.TT} wide"
    if geo.C % _wk.VL:
        return f"it needs input channels in multiples of {_wk.VL}"
    if pass_ == "grad_input" and delta_layout(geo).shape[1:3] != (geo.H + 4, geo.W + 4):
        return "its dX needs the deltas padded by 4 on every side"
    return None


def forward(geo, x, w, b):
    return _forward_winograd(_pack_input(x, geo), w, b, geo)


def grad_input(geo, dy, w):
    layout = delta_layout(geo)
    return _grad_input_winograd(pack_deltas(dy, layout), layout, w, geo)


def grad_weight(geo, x, dy):
    layout = delta_layout(geo, need_dx=False)
    return _wino.grad_weight(_pack_input(x, geo), pack_deltas(dy, layout), layout.top,
                             layout.left, geo.K, geo.C)


def _grad_input_winograd(dyp, layout: DeltaLayout, w, geo: ConvGeometry):
    """dX by Winograd from deltas in ``layout`` (padded by 4, as the full correlation
    needs), or None if it has an inf or NaN."""
    dx = np.empty((geo.N, geo.C, geo.H, geo.W), dyp.dtype)
    return dx if _wino.grad_input(dyp, w, dx) else None


def _forward_winograd(xp, w, b, geo: ConvGeometry, ws=_FRESH, pool_order=False):
    """y by Winograd from the packed input, as :func:`_forward_packed`; None if it has an
    inf or NaN (the caller runs the next algorithm)."""
    shape = (geo.N, geo.K, 4, geo.OH * geo.OW // 4) if pool_order else (
        geo.N, geo.K, geo.OH, geo.OW)
    y = ws.empty("y", shape, xp.dtype)
    return y if _wino.forward(xp, w, b, y, pool_order) else None
