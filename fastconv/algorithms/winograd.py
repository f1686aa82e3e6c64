"""Winograd F(2x2, 5x5) for fp32 5x5 stride-1 layers: forward, dX and dW.

The transforms are derived exactly in :mod:`fastconv.winograd`, and the kernels (with
the derivation of dW as F(5, 2)) are in :mod:`fastconv.winograd_kernels`.  All three
passes read the zero-padded channels-last layout of the direct kernels.
"""

from __future__ import annotations

import numpy as np

from .. import config
from .. import conv as _c
from .. import winograd as _wino
from .. import winograd_kernels as _wk

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
    if pass_ == "grad_input" and _c.delta_layout(geo).shape[1:3] != (geo.H + 4, geo.W + 4):
        return "its dX needs the deltas padded by 4 on every side"
    return None


def forward(geo, x, w, b):
    return _c._forward_winograd(_c._pack_input(x, geo), w, b, geo)


def grad_input(geo, dy, w):
    layout = _c.delta_layout(geo)
    return _c._grad_input_winograd(_c.pack_deltas(dy, layout), layout, w, geo)


def grad_weight(geo, x, dy):
    layout = _c.delta_layout(geo, need_dx=False)
    return _wino.grad_weight(_c._pack_input(x, geo), _c.pack_deltas(dy, layout), layout.top,
                             layout.left, geo.K, geo.C)
