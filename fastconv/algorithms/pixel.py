"""The pixel-vectorised kernels: output pixels as the vector lanes, for layers whose
channels would leave the channel tile's vectors empty.

They run the forward pass and dW of layers with few input channels (``C`` at most
``config.PIXEL_MAX_C``, the first layer of an image network) or a 1x1, stride-1, unpadded
layer (a matrix product per image), and dX of the latter (the forward pass with the roles
of C and K swapped).  The input is laid out so that consecutive output pixels read
consecutive inputs for every tap (:func:`fastconv.layouts._pixel_input`).
"""

from __future__ import annotations

import numpy as np

from .. import config
from .. import kernels as _k
from ..geometry import ConvGeometry, conv_geometry
from ..layouts import _FRESH, PixelInput, PooledDeltas, _batch_chunks, _pixel_input, _sum_chunks

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
    return (geo.OH * geo.OW if joined else geo.OW) >= _k.PX


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
    TTn, KTn = -(-T // _k.DT), -(-K // _k.DK)
    toff = np.zeros((px.OH, TTn * _k.DT), np.int64)
    toff[:, :T] = px.toff
    # Batch chunks of config.DW_PIXEL_CHUNK_BYTES of deltas, which stay in a core's L2
    # while the tasks sweep them (shapes only).  Each task ends with a horizontal sum of its
    # 20 vectors.
    dtype = px.xf.dtype
    P = _batch_chunks(N, K * px.OH * px.OW * dtype.itemsize, config.DW_PIXEL_CHUNK_BYTES)
    part = np.empty((P, KTn, TTn, _k.DK, _k.DT), dtype)
    if isinstance(dy, PooledDeltas):
        _k.conv_dw_pool_planes(px.xf, dy.g, dy.sel, toff, part)
    else:
        _k.conv_dw_pixels(px.xf, dy, toff, part)
    dw = np.empty((K, T), dtype)
    dw[:, px.taps] = _sum_chunks(part).transpose(0, 2, 1, 3).reshape(
        KTn * _k.DK, TTn * _k.DT)[:K, :T]
    return dw.reshape(K, C, R, S)


def _forward_pixels(x, w, b, geo: ConvGeometry, ws=_FRESH) -> np.ndarray:
    """y (N, K, OH, OW) by :func:`kernels.conv_pixel_tiles`; ``x``, ``w``, ``b`` in the
    result dtype; ``y`` is the array ``"y"`` of workspace ``ws``."""
    y = _forward_pixel_input(_pixel_input(x, geo), w, b, geo, ws)
    return y.reshape(geo.N, geo.K, geo.OH, geo.OW)


def _forward_pixel_input(px: PixelInput, w, b, geo: ConvGeometry, ws=_FRESH) -> np.ndarray:
    """y (N, K, px.OH, px.OW), the output in the rows of ``px``, by
    :func:`kernels.conv_pixel_tiles`; ``y`` is the array ``"y"`` of workspace ``ws``."""
    N, C, K, R, S = geo.N, geo.C, geo.K, geo.R, geo.S
    KPn = -(-K // _k.KP)
    wp = np.zeros((KPn * _k.KP, C * R * S), w.dtype)
    wp[:K] = w.reshape(K, C * R * S)[:, px.taps]
    wp = np.ascontiguousarray(wp.reshape(KPn, _k.KP, C * R * S).transpose(0, 2, 1))
    bp = np.zeros(KPn * _k.KP, w.dtype)
    if b is not None:
        bp[:K] = b
    y = ws.empty("y", (N, K, px.OH, px.OW), w.dtype)
    _k.conv_pixel_tiles(px.xf, px.toff, wp, bp, y)
    return y
