"""The direct channel tile: output channels as the vector lanes, 7 pixels x 32 channels
in registers, over zero-padded channels-last input and blocked weights.  It runs every
geometry (groups, dilation, any stride and padding), which makes it the last algorithm of
the list: the fallback of all the others.  dX runs it on the deltas, phase by phase, with
the rotated filters (see "dX, derived once" in :mod:`fastconv.conv`)."""

from __future__ import annotations

from .. import conv as _c

NAME = "direct-channel-tile"


def why_not(geo, dtype, pass_):
    return None


def forward(geo, x, w, b):
    return _c._forward_tile(_c._pack_input(x, geo), w, b, geo)


def grad_input(geo, dy, w):
    layout = _c.delta_layout(geo)
    return _c._grad_input_tile(_c.pack_deltas(dy, layout), layout, w, geo)


def grad_weight(geo, x, dy):
    layout = _c.delta_layout(geo, need_dx=False)
    return _c._grad_weight_tile(_c._pack_input(x, geo), _c.pack_deltas(dy, layout), layout,
                                geo)
