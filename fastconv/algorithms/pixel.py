"""The pixel-vectorised kernels: output pixels as the vector lanes, for layers whose
channels would leave the channel tile's vectors empty.

They run the forward pass and dW of layers with few input channels (``C`` at most
``config.PIXEL_MAX_C``, the first layer of an image network) or a 1x1, stride-1, unpadded
layer (a matrix product per image), and dX of the latter (the forward pass with the roles
of C and K swapped).  The input is laid out so that consecutive output pixels read
consecutive inputs for every tap (:func:`fastconv.conv._pixel_input`).
"""

from __future__ import annotations

import numpy as np

from .. import conv as _c

NAME = "pixel"


def why_not(geo, dtype, pass_):
    if geo.G != 1:
        return "it needs one group"
    one_by_one = _c._one_by_one(geo)
    if pass_ == "grad_input" and not one_by_one:
        return "its dX is a 1x1, stride-1, unpadded layer's only"
    if not (one_by_one or geo.C <= _c.config.PIXEL_MAX_C):
        return (f"it needs at most {_c.config.PIXEL_MAX_C} input channels or a 1x1, "
                "stride-1, unpadded layer")
    if not _c._pixel_ok(geo):
        return "its output rows are shorter than one vector of pixels"
    return None


def forward(geo, x, w, b):
    return _c._forward_pixels(x, w, b, geo)


def grad_input(geo, dy, w):
    # dx[n] = W^T dy[n] per image: the 1x1 forward pass with the roles of C and K swapped.
    tgeo = _c.conv_geometry((geo.N, geo.K, geo.H, geo.W), (geo.C, geo.K, 1, 1))
    return _c._forward_pixels(np.ascontiguousarray(dy), w.transpose(1, 0, 2, 3), None, tgeo)


def grad_weight(geo, x, dy):
    return _c._grad_weight_pixels(x, dy, geo)
