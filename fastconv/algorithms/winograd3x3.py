"""Winograd F(4x4, 3x3) for fp32 3x3 stride-1 layers: the forward pass, dX and dW.

The math
--------
A 4 x 4 tile of outputs ``y`` reads a 6 x 6 tile of input ``d``; with the transforms of
F(4, 3) (``A^T`` 4 x 6, ``G`` 6 x 3, ``B^T`` 6 x 6, derived exactly by
:func:`fastconv.algorithms.winograd.transforms` from the points 0, 1, -1, 1/2, -2 and
infinity)::

    y = A^T [ sum_c (G w[k, c] G^T) (.) (B^T d_c B) ] A          ((.) elementwise)

so each of the 36 points is a matrix product over channels with 36 multiplications per
16 outputs instead of 144: 4x fewer than the direct convolution.  ``B`` depends on the
points only, and these are the points of the 5x5 path's F(2, 5): the input transform is
that path's (``winograd_kernels._input_tile``, with its rows scaled to small integers),
and so is the product of the 36 points (``winograd_kernels._product``, a 7-tile x 32
channel register tile).  Only ``A^T`` (here 4 outputs per axis) and ``G`` differ; ``G``
is ``diag(1/scale) V`` with the same ``scale``, so the filter transform is the 5x5
path's kernel for 3 taps (:func:`transform_filters`).

dX of a stride-1 layer is the valid correlation of the deltas, padded by ``2 - pad``,
with the filters rotated by 180 degrees and the channel roles swapped: the same kernel
on the deltas' layout (:func:`fastconv.layouts.delta_layout`).

dW is F(3, 4) from the same points, as the 5x5 path's dW is F(5, 2) (see
:mod:`fastconv.algorithms.winograd_kernels`): one tile's contribution ``dw[r, s] =
sum_{i, j < 4} d[i + r, j + s] * dy[i, j]`` is the 3 x 3 correlation of its 6 x 6 input
with its 4 x 4 deltas, so::

    dw = G^T [ sum_tiles (A dy A^T) (.) (B^T d B) ] G

with ``A`` (6 x 4) the points' Vandermonde matrix for 4 coefficients (``A^T`` of the
forward pass, transposed) and ``G`` (6 x 3) the forward's.  The input transform and the
product over tiles are the 5x5 path's (``winograd_kernels._input_tile``,
``winograd_kernels._dw_product``), and so is the back-transform, for 3 taps
(``winograd_kernels.dw_transform``).  An edge tile shifted back inside the output (see
Tiles) zeroes the deltas of the rows and columns its neighbour counted, so that every
output pixel enters the sum once.

Why these points and this tile: fp32 error against float64 (relative L2, random data,
64 channels) is 1.3e-6 for these points, 1.9e-6 for 0, +-1, +-2 and 2.0e-6 for 0, +-1,
+-1/2; F(2x2, 3x3) errs less but saves only 2.25x and needs a 4 x 4 input transform of
its own.  The tests bound the error against the direct kernels' (see
``tests/test_winograd3x3.py``).

Tiles
-----
Tile ``(a, q)`` of an image owns output rows ``4a .. 4a + 3`` and columns ``4q .. 4q + 3``
(fewer at the bottom and right edges).  Its 6 x 6 input starts at row ``i0 = min(4a, OH
- 4)`` and column ``j0 = min(4q, OW - 4)``: a tile at an edge is shifted back inside the
output, computes some outputs of its neighbour again and stores only its own, so every
output size of at least 4 runs without extra padding.  The tiles of all images are one
list; a task is ``TT`` consecutive tiles of it (the last task shifted back to end at the
list's end, storing only its own tiles), so narrow layers fill the register tile too.

Legend as in :mod:`fastconv.kernels`.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from .. import _checks, config
from .._jit import parallel_kernel, stack_tile
from ..geometry import ConvGeometry
from ..layouts import _FRESH, DeltaLayout, _pack_input, delta_layout, pack_deltas
from . import winograd as _w5
from . import winograd_kernels as _wk

NAME = "winograd-f4x4-3x3"

TT, KW, VL, NCH, TB = _wk.TT, _wk.KW, _wk.VL, _wk.NCH, _wk.TB


def why_not(geo, dtype, pass_):
    reason = _w5.common_rule(geo, dtype, 3)
    if reason is not None:
        return reason
    OH, OW = (geo.OH, geo.OW) if pass_ == "forward" else (geo.H, geo.W)
    if min(OH, OW) < 4 or geo.N * -(-OH // 4) * -(-OW // 4) < TT:
        return f"it needs outputs at least 4 wide and high, and at least {TT} tiles of 4x4"
    if pass_ != "grad_input" and geo.C % VL:  # dX reads the deltas' channels
        return f"it needs input channels in multiples of {VL}"
    if pass_ == "grad_input" and (max(geo.pads) > 2 or delta_layout(geo).shape[1:3] != (
            geo.H + 2, geo.W + 2)):
        return "its dX needs padding of at most 2, the deltas padded by 2 - pad"
    return None


def slower(geo, dtype, pass_):
    reason = _w5.few_channel_rule(geo, pass_)
    if reason is not None:
        return reason
    tiles = geo.N * -(-geo.OH // 4) * -(-geo.OW // 4)
    if pass_ == "grad_weight" and tiles < config.WINOGRAD43_DW_MIN_TILES:
        return (f"its dW needs at least {config.WINOGRAD43_DW_MIN_TILES} output tiles "
                f"(config.WINOGRAD43_DW_MIN_TILES) to pay for its transforms; this has "
                f"{tiles}")
    return None


def prepare(geo, w, pass_):
    """``U`` (36, CP, KP), the transformed filters: of ``w`` for the forward pass; for dX,
    of the filters rotated by 180 degrees with the channel roles swapped, over the
    deltas' channels."""
    if pass_ == "forward":
        return transform_filters(w, geo.C)
    return transform_filters(w, delta_layout(geo).KgP, rotate=True)


def forward(geo, x, U, b):
    return packed_forward(geo, _pack_input(x, geo), U, b)


def grad_input(geo, dy, U):
    layout = delta_layout(geo)
    return packed_grad_input(geo, pack_deltas(dy, layout), layout, U)


def grad_weight(geo, x, dy):
    layout = delta_layout(geo, need_dx=False)
    return packed_grad_weight(geo, _pack_input(x, geo), pack_deltas(dy, layout), layout)


def packed_forward(geo: ConvGeometry, xp, U, b, ws=_FRESH, pool_order=False):
    """y from the packed input, in NCHW or pool order, as the channel tile's
    ``packed_forward``; None if it has an inf or NaN (the plan then runs the next
    algorithm)."""
    return _w5.forward_by(run_forward, geo, xp, U, b, ws, pool_order)


def packed_grad_input(geo: ConvGeometry, dyp, layout: DeltaLayout, U):
    """dX from deltas in ``layout`` (padded by ``2 - pad``): the forward kernel on the
    deltas with dX's ``U``; None if it has an inf or NaN."""
    return _w5.grad_input_by(run_forward, geo, dyp, U)


def packed_grad_weight(geo: ConvGeometry, xp, dyp, layout: DeltaLayout, ws=_FRESH):
    """dW from the packed input and deltas in ``layout``; None if it has an inf or NaN."""
    return run_grad_weight(xp, dyp, layout.top, layout.left, geo.K, geo.C)


# ---- the transforms and the kernel's wrappers ------------------------------------------

def output_constants(dtype) -> np.ndarray:
    """The constants ``ka`` of the kernel's output transform ``A^T``, in ``dtype``."""
    return np.array([0.5, 2, 0.25, 4, 0.125, 8, 0], dtype)


def transform_filters(w: np.ndarray, CP: int, rotate: bool = False) -> np.ndarray:
    """``U`` (36, CP, KP) float32 = ``G w G^T`` per point for weights ``w`` (K, C, 3, 3)
    (any strides and float dtype), computed in float64 and rounded once; zero past the
    channels, ``KP`` a multiple of ``KW``.  With ``rotate``, of the filters rotated by 180
    degrees with the channel roles swapped (dX), read from ``w`` in place.  The 5x5 path's
    kernel (:func:`fastconv.algorithms.winograd.transform_filters` with ``taps=3``):
    ``G = diag(1/scale) V`` with the same points and ``scale``, ``V`` 6 x 3."""
    return _w5.transform_filters(w, CP, np.float32, rotate, taps=3)


def _check_packed(name: str, xp) -> tuple[int, int, int, int]:
    """The shape of a packed input (or delta array) the kernels can run: float32,
    C-contiguous, channels a multiple of ``VL``, an output ``(Hp - 2, Wp - 2)`` of at
    least 4 x 4 and at least ``TT`` tiles."""
    if not isinstance(xp, np.ndarray) or xp.ndim != 4:
        raise TypeError(f"{name} must be a 4-D array (N, Hp, Wp, C), got "
                        f"{getattr(xp, 'shape', type(xp).__name__)}")
    N, Hp, Wp, CP = _checks.array(name, xp, xp.shape, np.float32).shape
    OH, OW = Hp - 2, Wp - 2
    if not (CP % VL == 0 and min(OH, OW) >= 4 and N * -(-OH // 4) * -(-OW // 4) >= TT):
        raise ValueError(f"{name} of shape {xp.shape} is not a packed input this kernel runs: "
                         f"channels a multiple of {VL}, an output at least 4 x 4, and at "
                         f"least {TT} tiles")
    return N, Hp, Wp, CP


def run_forward(xp: np.ndarray, U: np.ndarray, b, y: np.ndarray,
                pool_order: bool = False) -> bool:
    """The valid 3x3 correlation of the packed input ``xp`` (N, OH+2, OW+2, CP) with the
    filters whose transform is ``U`` (36, CP, KP) (:func:`transform_filters`), plus ``b``
    (K,) or None, into ``y``: (N, K, OH, OW) with ``K <= KP``, or with ``pool_order``
    (N, K, 4, OH/2 * OW/2).  False (and ``y`` to be overwritten) if the result has an
    inf or NaN."""
    N, Hp, Wp, CP = _check_packed("xp", xp)
    bp, chk = _w5.check_product_arrays(U, y, b, N, CP, Hp - 2, Wp - 2, pool_order)
    winograd43_tiles(xp, U, bp, y, _w5.kernel_constants(np.float32),
                     output_constants(np.float32), pool_order, chk)
    return bool(np.isfinite(chk).all())


def run_grad_weight(xp: np.ndarray, dyp: np.ndarray, top: int, left: int, K: int,
                    C: int) -> np.ndarray | None:
    """dW (K, C, 3, 3) from the packed input ``xp`` (N, OH+2, OW+2, CP) and the
    channels-last deltas ``dyp`` (N, Hd, Wd, KP), ``dy[n, k, i, j]`` at ``[n, top + i,
    left + j, k]``; None if it has an inf or NaN.  The 5x5 path's wrapper
    (:func:`fastconv.algorithms.winograd.grad_weight_by`) with :func:`winograd43_dw`."""
    N, Hp, Wp, _ = _check_packed("xp", xp)
    ntile = N * -(-(Hp - 2) // 4) * -(-(Wp - 2) // 4)
    return _w5.grad_weight_by(winograd43_dw, xp, dyp, top, left, K, C, 3, ntile)


# ---- the kernel ------------------------------------------------------------------------

_u = np.uint64


@numba.njit(inline="always")
def _at4(m0, m1, m2, m3, m4, m5, ka):
    """The four rows of ``A^T`` applied to (m0, ..., m5); ``ka`` holds (1/2, 2, 1/4, 4,
    1/8, 8, 0) in the data's dtype."""
    s12, d12 = m1 + m2, m1 - m2
    return (m0 + s12 + m3 + m4,
            d12 + ka[0] * m3 - ka[1] * m4,
            s12 + ka[2] * m3 + ka[3] * m4,
            d12 + ka[4] * m3 - ka[5] * m4 + m5)


@numba.njit(inline="always")
def _tile(tile, TH, TWn, OH, OW):
    """Tile ``tile`` of the list: its image ``n``, tile row ``a`` and column ``q``, and
    the origin ``(i0, j0)`` of its 4 x 4 outputs, shifted back inside the output."""
    q = tile % TWn
    rest = tile // TWn
    a = rest % TH
    n = rest // TH
    return n, a, q, min(4 * a, OH - 4), min(4 * q, OW - 4)


@parallel_kernel
def winograd43_tiles(x, U, b, y, kc, ka, pool_order, chk):
    """Winograd F(4x4, 3x3) correlation of a padded channels-last input.

    For ``i < OH = Hp - 2``, ``j < OW = Wp - 2`` and ``k < K``::

        y[n, k, i, j] = b[k] + sum_{r, s < 3, c} x[n, i + r, j + s, c] * w[k, c, r, s]

    x : (N, Hp, Wp, C)     channels-last, zero padded; ``C`` a multiple of ``VL``.
    U : (36, C, KP)        ``G w G^T`` per point, zero past ``K``; ``KP`` a multiple of
                           ``KW``.
    b : (KP,)              bias (zeros for none).
    kc : (6,)              the input transform's constants (see ``winograd_kernels``).
    ka : (7,)              the output transform's (1/2, 2, 1/4, 4, 1/8, 8, 0).
    y : (N, K, OH, OW)     NCHW; or with ``pool_order`` (N, K, 4, OH/2 * OW/2): pixel
                           (2i + a, 2j + q) in plane 2a + q at i*OW/2 + j.
    chk : (NCH, VL)        overwritten: a sum of every output times zero, NaN if any
                           output is inf or NaN (the wrapper then runs the direct kernel).

    ``OH, OW >= 4`` (even with ``pool_order``) and at least ``TT`` tiles.  See the module
    docstring for the tiles and tasks; each task stores only the outputs its tiles own,
    so no two tasks write the same element.
    """
    N, Hp, Wp, C = x.shape
    KP = U.shape[2]
    K = y.shape[1]
    OH, OW = Hp - 2, Wp - 2
    TH, TWn = (OH + 3) // 4, (OW + 3) // 4
    ntile = N * TH * TWn
    ntask = (ntile + TT - 1) // TT
    nch = min(ntask, NCH)
    xf = x.reshape(-1)
    Uf = U.reshape(-1)
    rstep, cstep = _u(Wp * C), _u(C)
    n36 = min(36 * VL, C * 36)  # == 36*VL (see winograd_kernels._input_tile)
    half = OW // 2
    for ch in prange(nch):
        V = np.empty(36 * TT * C, x.dtype)
        M = np.empty(36 * TT * KP, x.dtype)
        tmp = stack_tile(36, VL, x.dtype)
        vt = stack_tile(36, VL, x.dtype)
        # 16 outputs x TT tiles of VL channels: a row per output (plane-major), so that
        # the transform, vectorised over channels, stores whole vectors.
        ot = stack_tile(112, VL, x.dtype)
        rt = stack_tile(24, VL, x.dtype)
        ck = stack_tile(1, VL, x.dtype)
        for c in range(VL):
            ck[0, c] = 0
        for task in range(ch * ntask // nch, (ch + 1) * ntask // nch):
            t0 = min(task * TT, ntile - TT)
            for t in range(TT):
                n, a, q, i0, j0 = _tile(t0 + t, TH, TWn, OH, OW)
                o = _u(((n * Hp + i0) * Wp + j0) * C)
                for cv in range(C // VL):
                    _wk._input_tile(xf, o + _u(cv * VL), rstep, cstep, V,
                                    _u((t * C // VL + cv) * 36 * VL), kc, tmp, vt, n36)
            _wk._product(V, Uf, M, C, KP)
            st = _u(TT * KP)
            for kv in range((K + VL - 1) // VL):
                for t in range(TT):
                    for c in range(VL):
                        o = _u(t * KP + kv * VL + c)
                        # Rows xi of the 6 x 6 product, each to 4 values (along nu).
                        for xi in range(6):
                            ox = o + _u(6 * xi) * st
                            r0, r1, r2, r3 = _at4(M[ox], M[ox + st], M[ox + _u(2) * st],
                                                  M[ox + _u(3) * st], M[ox + _u(4) * st],
                                                  M[ox + _u(5) * st], ka)
                            rt[xi * 4, c] = r0
                            rt[xi * 4 + 1, c] = r1
                            rt[xi * 4 + 2, c] = r2
                            rt[xi * 4 + 3, c] = r3
                        bk = b[kv * VL + c]
                        for v in range(4):
                            y0, y1, y2, y3 = _at4(rt[v, c], rt[4 + v, c], rt[8 + v, c],
                                                  rt[12 + v, c], rt[16 + v, c],
                                                  rt[20 + v, c], ka)
                            ck[0, c] += (y0 + y1 + y2 + y3 + bk) * ka[6]
                            ot[v * TT + t, c] = y0 + bk  # output (u, v) at (4u + v)*TT + t
                            ot[(4 + v) * TT + t, c] = y1 + bk
                            ot[(8 + v) * TT + t, c] = y2 + bk
                            ot[(12 + v) * TT + t, c] = y3 + bk
                for t in range(max(0, task * TT - t0), TT):  # the tiles this task owns
                    n, a, q, i0, j0 = _tile(t0 + t, TH, TWn, OH, OW)
                    u0, v0 = 4 * a - i0, 4 * q - j0
                    for c in range(min(VL, K - kv * VL)):
                        k = kv * VL + c
                        for u in range(u0, 4):
                            i = i0 + u
                            o = (4 * u) * TT + t  # ot's row of output (u, 0)
                            # Four stores spelt out: as a loop of at most 4 steps LLVM
                            # vectorised it into gathers from ot.
                            if pool_order:
                                # i0, j0 and v0 are even: columns (j, j + 1) are one pixel
                                # of planes 2*(i % 2) and 2*(i % 2) + 1.
                                p0, m0 = 2 * (i % 2), i // 2 * half + j0 // 2
                                if v0 == 0:
                                    y[n, k, p0, m0] = ot[o, c]
                                    y[n, k, p0 + 1, m0] = ot[o + TT, c]
                                y[n, k, p0, m0 + 1] = ot[o + 2 * TT, c]
                                y[n, k, p0 + 1, m0 + 1] = ot[o + 3 * TT, c]
                            else:
                                if v0 == 0:
                                    y[n, k, i, j0] = ot[o, c]
                                if v0 <= 1:
                                    y[n, k, i, j0 + 1] = ot[o + TT, c]
                                if v0 <= 2:
                                    y[n, k, i, j0 + 2] = ot[o + 2 * TT, c]
                                y[n, k, i, j0 + 3] = ot[o + 3 * TT, c]
        for c in range(VL):
            chk[ch, c] = ck[0, c]


@numba.njit(inline="always")
def _a64(e0, e1, e2, e3, kc):
    """The six rows of ``A`` (the points' Vandermonde matrix for 4 coefficients) applied
    to (e0, ..., e3), the points 1/2 and -2 by Horner's rule: the deltas' transform in
    dW.  ``kc`` as for ``winograd_kernels._bt6``: (1/2, 2, ...)."""
    h, c2 = kc[0], kc[1]
    return (e0, e0 + e1 + e2 + e3, e0 - e1 + e2 - e3, e0 + h * (e1 + h * (e2 + h * e3)),
            e0 - c2 * (e1 - c2 * (e2 - c2 * e3)), e3)


@numba.njit(inline="always")
def _dy_row(dyf, o, kp, v0, kc):
    """``A`` applied to the four deltas of one row of a tile (``dyf[o + v * kp]``,
    ``v < 4``), those of the columns ``v < v0`` taken as zero (its neighbour counted them)."""
    z = kc[5]
    return _a64(dyf[o] if v0 == 0 else z, dyf[o + kp] if v0 <= 1 else z,
                dyf[o + _u(2) * kp] if v0 <= 2 else z, dyf[o + _u(3) * kp], kc)


@parallel_kernel
def winograd43_dw(x, dy, top, left, part, kc):
    """The transform-domain weight gradient of F(4x4, 3x3), summed per chunk of tiles.

    For the 36 points p, every input channel c and every ``k < KP``::

        part[h, c, p, k] = sum over the tiles of chunk h of (B^T d B)[p] * (A dy A^T)[p]

    where ``d`` is the tile's 6 x 6 input of channel c and ``dy`` its 4 x 4 deltas of
    channel k, those an edge tile shares with its neighbour zeroed; ``dw_transform`` sums
    the chunks and applies ``G^T (.) G``.

    x : (N, Hp, Wp, C)     the forward's packed input; ``C`` a multiple of ``VL``.
    dy : (N, Hd, Wd, KP)   channels-last deltas, ``dy[n, top + i, left + j, k]`` for
                           ``i < OH = Hp - 2``, ``j < OW = Wp - 2``; ``KP`` a multiple of
                           ``KW``.
    part : (P, C, 36, KP)  one sum per chunk, overwritten.
    kc : (6,)              the input transform's constants (see ``winograd_kernels``).

    The tiles (see the module docstring) are cut into ``P`` chunks of consecutive tiles, a
    number chosen from the shapes only; each chunk transforms blocks of ``TB`` tiles into
    ``V`` and ``D`` and adds their products into its own ``part[h]``, as
    ``winograd_kernels.winograd_dw`` does.
    """
    N, Hp, Wp, C = x.shape
    KP = dy.shape[3]
    Hd, Wd = dy.shape[1], dy.shape[2]
    OH, OW = Hp - 2, Wp - 2
    TH, TWn = (OH + 3) // 4, (OW + 3) // 4
    P = part.shape[0]
    ntile = N * TH * TWn
    xf = x.reshape(-1)
    dyf = dy.reshape(-1)
    rstep, cstep = _u(Wp * C), _u(C)
    kw = min(KW, KP)  # == KW, a bound LLVM cannot see: the copy below vectorises
    n36 = min(36 * VL, C * 36)  # == 36*VL (see winograd_kernels._input_tile)
    kp, rs = _u(KP), _u(Wd * KP)
    for h in prange(P):
        V = np.empty(36 * TB * C, x.dtype)
        D = np.empty(36 * TB * KP, x.dtype)
        tmp = stack_tile(36, VL, x.dtype)
        vt = stack_tile(36, VL, x.dtype)
        dt = stack_tile(36, KW, x.dtype)  # one tile's transformed deltas, KW channels
        dtf = dt.reshape(-1)
        acc_out = part[h].reshape(-1)
        for e in range(36 * C * KP):
            acc_out[e] = 0
        g1 = (h + 1) * ntile // P
        for g0 in range(h * ntile // P, g1, TB):
            nt = min(TB, g1 - g0)
            for t in range(nt):
                n, a, q, i0, j0 = _tile(g0 + t, TH, TWn, OH, OW)
                u0, v0 = 4 * a - i0, 4 * q - j0  # rows and columns the neighbour counted
                o = _u(((n * Hp + i0) * Wp + j0) * C)
                for cv in range(C // VL):
                    _wk._input_tile(xf, o + _u(cv * VL), rstep, cstep, V,
                                    _u((t * C // VL + cv) * 36 * VL), kc, tmp, vt, n36)
                # The deltas' transform A dy A^T: along each row (nu), then down (xi).
                r0 = _u(((n * Hd + top + i0) * Wd + left + j0) * KP)
                z = kc[5]
                for kb in range(KP // KW):
                    for hv in range(KW // VL):
                        for c in range(VL):
                            ku = _u(kb * KW + hv * VL + c)
                            cc = hv * VL + c
                            zs = (z, z, z, z, z, z)
                            a0 = _dy_row(dyf, r0 + ku, kp, v0, kc) if u0 == 0 else zs
                            a1 = _dy_row(dyf, r0 + rs + ku, kp, v0, kc) if u0 <= 1 else zs
                            a2 = (_dy_row(dyf, r0 + _u(2) * rs + ku, kp, v0, kc) if u0 <= 2
                                  else zs)
                            a3 = _dy_row(dyf, r0 + _u(3) * rs + ku, kp, v0, kc)
                            for nu in range(6):
                                z0, z1, z2, z3, z4, z5 = _a64(a0[nu], a1[nu], a2[nu], a3[nu],
                                                              kc)
                                dt[nu, cc] = z0
                                dt[6 + nu, cc] = z1
                                dt[12 + nu, cc] = z2
                                dt[18 + nu, cc] = z3
                                dt[24 + nu, cc] = z4
                                dt[30 + nu, cc] = z5
                    # One contiguous block of D: a copy loop long enough to vectorise.
                    do = _u((t * (KP // KW) + kb) * 36 * KW)
                    for e in range(36 * kw):
                        D[do + _u(e)] = dtf[e]
            _wk._dw_product(V, D, acc_out, nt, C, KP)
