"""dW from deltas as they are (NCHW), for the functional API: the input packed with its
channels as the vector lanes, the deltas broadcast (:func:`fastconv.kernels.conv_dw_cvec`),
so no transposing copy of the deltas is made."""

from __future__ import annotations

import functools

import numpy as np
from numba import prange

from .. import kernels as _k
from .._jit import parallel_kernel, stack_tile
from ..geometry import ConvGeometry
from ..kernels import CL, _chunk_task
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
    off, CP, Wp = _cvec_offsets(geo)
    V = R * S * (CP // CL)
    xp = _channels_last(x, 1, CP, geo.pads)
    KTn = -(-K // CK)
    P = _batch_chunks(N, K * geo.OH * geo.OW * dy.itemsize)
    part = np.empty((P, KTn * CK, off.size, CL), dy.dtype)
    conv_dw_cvec(xp.reshape(N, -1), np.ascontiguousarray(dy), off, part, CP, Wp * CP,
                 geo.sh, geo.sw, geo.OH, geo.OW)
    # (K, (r*S + s)*CP/CL + c/CL, c % CL) -> (K, C, R, S): one copy.
    dwv = _sum_chunks(part)[:K, :V].reshape(K, R, S, CP)
    return np.ascontiguousarray(dwv[:, :, :, :C].transpose(0, 3, 1, 2))


@functools.lru_cache(maxsize=64)
def _cvec_offsets(geo: ConvGeometry) -> tuple:
    """Where each vector of ``CL`` channels of the filter reads the packed input, ``off``
    (a multiple of ``CV`` vectors, read-only), with the packed channel count ``CP`` and
    width ``Wp``: vector ``v = (r*S + s)*CP/CL + c/CL`` reads the padded input row
    ``r*dlh`` at column ``s*dlw``, channels ``c .. c + CL - 1``."""
    CP = -(-geo.C // CL) * CL
    Wp = geo.W + geo.pl + geo.pr
    V = geo.R * geo.S * (CP // CL)
    off = np.zeros(-(-V // CV) * CV, np.uint64)
    rs, cv = np.divmod(np.arange(V), CP // CL)
    r, s = np.divmod(rs, geo.S)
    off[:V] = (r * geo.dlh * Wp + s * geo.dlw) * CP + cv * CL
    off.flags.writeable = False
    return off, CP, Wp


# Kernels
# -------
# CK output channels x CV input-channel vectors (of CL channels) per tile.

CK = 4


CV = 6


@parallel_kernel
def conv_dw_cvec(x, dy, off, part, C, WpC, sh, sw, OH, OW):
    """Weight gradient from NCHW deltas, with vectors over input channels: no delta pack.

    ``part[p, kt*CK + t, vt*CV + v, l] = sum_{n in chunk p} sum_{i < OH, j < OW}
    dy[n, min(kt*CK + t, K - 1), i, j] * x[n, i*sh*WpC + j*sw*C + off[vt*CV + v] + l]``,
    chunks as in :func:`conv_dw_tiles`; the weight gradient is ``part.sum(axis=0)``, its
    rows the output channels and its columns the filter's vectors, as dW orders them.

    x    : (N, Hp*Wp*C)     padded channels-last input, each sample flattened; ``C``, a
                            multiple of ``CL``, is its channel count, ``WpC = Wp*C`` a row.
    dy   : (N, K, OH, OW)   deltas as the caller has them, C-contiguous.
    off  : (V,) uint64      where each vector of ``CL`` channels of the filter starts
                            reading: ``r*dlh*WpC + s*dlw*C + c0`` (``V`` a multiple of CV).
    part : (P, KTn*CK, V, CL)  output, every element written once.

    The roles of :func:`conv_dw_tiles` swapped: each step broadcasts ``CK`` deltas, one
    pixel of ``CK`` delta planes, against ``CV`` vectors of the input's channels at that
    pixel: 24 FMAs for 4 broadcasts and 6 vector loads, as in the 6 x 64 tile.  The deltas
    are read where they are, so the functional ``conv2d_grad_weight`` skips transposing
    them to channels-last (0.94-1.38x on the whole call, above 1.05x on most shapes).
    The last channel tile repeats channel ``K - 1`` past ``K``; the caller drops those
    rows.
    """
    N, K = dy.shape[0], dy.shape[1]
    P = part.shape[0]
    KTn = part.shape[1] // CK
    VTn = part.shape[2] // CV
    NT = KTn * VTn
    for task in prange(P * NT):
        p, n0, n1, tile = _chunk_task(task, NT, N, P)
        vt = tile % VTn
        kt = tile // VTn
        k0 = kt * CK
        k1 = min(k0 + 1, K - 1)
        k2 = min(k0 + 2, K - 1)
        k3 = min(k0 + 3, K - 1)
        o0 = off[vt * CV + 0]
        o1 = off[vt * CV + 1]
        o2 = off[vt * CV + 2]
        o3 = off[vt * CV + 3]
        o4 = off[vt * CV + 4]
        o5 = off[vt * CV + 5]
        acc = stack_tile(24, CL, part.dtype)  # CK * CV rows
        for t in range(CK * CV):
            for l in range(CL):
                acc[t, l] = 0
        for n in range(n0, n1):
            xn = x[n]
            for i in range(OH):
                row = np.uint64(i * sh * WpC)
                for j in range(OW):
                    base = row + np.uint64(j * sw * C)
                    d0 = dy[n, k0, i, j]
                    d1 = dy[n, k1, i, j]
                    d2 = dy[n, k2, i, j]
                    d3 = dy[n, k3, i, j]
                    for l in range(CL):
                        at = base + np.uint64(l)
                        v0 = xn[at + o0]
                        v1 = xn[at + o1]
                        v2 = xn[at + o2]
                        v3 = xn[at + o3]
                        v4 = xn[at + o4]
                        v5 = xn[at + o5]
                        acc[0, l] += d0 * v0
                        acc[1, l] += d0 * v1
                        acc[2, l] += d0 * v2
                        acc[3, l] += d0 * v3
                        acc[4, l] += d0 * v4
                        acc[5, l] += d0 * v5
                        acc[6, l] += d1 * v0
                        acc[7, l] += d1 * v1
                        acc[8, l] += d1 * v2
                        acc[9, l] += d1 * v3
                        acc[10, l] += d1 * v4
                        acc[11, l] += d1 * v5
                        acc[12, l] += d2 * v0
                        acc[13, l] += d2 * v1
                        acc[14, l] += d2 * v2
                        acc[15, l] += d2 * v3
                        acc[16, l] += d2 * v4
                        acc[17, l] += d2 * v5
                        acc[18, l] += d3 * v0
                        acc[19, l] += d3 * v1
                        acc[20, l] += d3 * v2
                        acc[21, l] += d3 * v3
                        acc[22, l] += d3 * v4
                        acc[23, l] += d3 * v5
        for t in range(CK):
            for v in range(CV):
                for l in range(CL):
                    part[p, k0 + t, vt * CV + v, l] = acc[t * CV + v, l]
