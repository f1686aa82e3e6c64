"""dW from deltas as they are (NCHW), for the functional API: the input packed with its
channels as the vector lanes, the deltas broadcast (:func:`fastconv.kernels.conv_dw_cvec`),
so no transposing copy of the deltas is made."""

from __future__ import annotations

import numpy as np

from .. import kernels as _k
from ..geometry import ConvGeometry
from ..layouts import _batch_chunks, _channels_last, _sum_chunks

NAME = "nchw-delta-dw"


def why_not(geo, dtype, pass_):
    if pass_ != "grad_weight":
        return "it computes dW only"
    if not _cvec_ok(geo):
        return (f"it needs one group and input channels that fill vectors of {_k.CL} "
                "with at most a quarter of padding")
    return None


def grad_weight(geo, x, dy):
    return _grad_weight_cvec(x, dy, geo)


def _cvec_ok(geo: ConvGeometry) -> bool:
    """Whether :func:`kernels.conv_dw_cvec` runs the functional dW: one group, and input
    channels that fill vectors of ``CL`` with at most a quarter of padding."""
    CP = -(-geo.C // _k.CL) * _k.CL
    return geo.G == 1 and 4 * CP <= 5 * geo.C


def _grad_weight_cvec(x: np.ndarray, dy: np.ndarray, geo: ConvGeometry) -> np.ndarray:
    """dW (K, C, R, S) by :func:`kernels.conv_dw_cvec` from NCHW ``x`` and ``dy`` in one
    dtype: the input packed (its channels padded to a multiple of ``CL``), the deltas as
    they are."""
    N, C, K, R, S = geo.N, geo.C, geo.K, geo.R, geo.S
    CL, CK, CV = _k.CL, _k.CK, _k.CV
    CP = -(-C // CL) * CL
    xp = _channels_last(x, 1, CP, geo.pads)
    Wp = xp.shape[2]
    # Vector v = (r*S + s)*CP/CL + c/CL of the filter reads the padded input row r*dlh at
    # column s*dlw, channels c .. c + CL - 1.
    V = R * S * (CP // CL)
    off = np.zeros(-(-V // CV) * CV, np.uint64)
    rs, cv = np.divmod(np.arange(V), CP // CL)
    r, s = np.divmod(rs, S)
    off[:V] = (r * geo.dlh * Wp + s * geo.dlw) * CP + cv * CL
    KTn = -(-K // CK)
    P = _batch_chunks(N, K * geo.OH * geo.OW * dy.itemsize)
    part = np.empty((P, KTn, off.size // CV, CK, CV, CL), dy.dtype)
    _k.conv_dw_cvec(xp.reshape(N, -1), np.ascontiguousarray(dy), off, part, CP, Wp * CP,
                    geo.sh, geo.sw, geo.OH, geo.OW)
    dwv = _sum_chunks(part).transpose(0, 2, 1, 3, 4).reshape(KTn * CK, off.size * CL)
    dwv = dwv[:K, :V * CL]
    return np.ascontiguousarray(dwv.reshape(K, R, S, CP)[:, :, :, :C].transpose(0, 3, 1, 2))
