"""dW from deltas as they are (NCHW), for the functional API: the input packed with its
channels as the vector lanes, the deltas broadcast (:func:`fastconv.kernels.conv_dw_cvec`),
so no transposing copy of the deltas is made."""

from __future__ import annotations

from .. import conv as _c

NAME = "nchw-delta-dw"


def why_not(geo, dtype, pass_):
    if pass_ != "grad_weight":
        return "it computes dW only"
    if not _c._cvec_ok(geo):
        return (f"it needs one group and input channels that fill vectors of {_c._k.CL} "
                "with at most a quarter of padding")
    return None


def grad_weight(geo, x, dy):
    return _c._grad_weight_cvec(x, dy, geo)
