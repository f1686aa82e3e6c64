"""Winograd F(2x2, 5x5) for fp32 5x5 stride-1 layers: forward, dX and dW.

A 5x5, stride-1 convolution computes each 2x2 tile of outputs from a 6x6 tile of input
with 36 multiplications per channel pair instead of 100.  This module holds the plan rule,
the passes, the exact derivation of the transforms (below) and the wrappers that check
the kernels' arguments; the kernels, with the formulas and the derivation of dW as
F(5, 2), are in :mod:`fastconv.algorithms.winograd_kernels`.  All three passes read the
zero-padded channels-last layout of the direct kernels.  Results equal the direct
convolution's up to rounding, of a similar size: on MNIST conv2 the forward pass and dX
within 1.5x the direct kernels' error, dW within 8x (see ``tests/test_winograd.py``).

Legend as in :mod:`fastconv.kernels`; ``CP`` and ``KP`` are channel counts padded for the
kernels' vectors.
"""

from __future__ import annotations

from fractions import Fraction
from functools import cache

import numpy as np

from .. import _checks, config
from ..geometry import ConvGeometry
from ..layouts import _FRESH, DeltaLayout, _pack_input, delta_layout, pack_deltas
from . import winograd_kernels as _wk

NAME = "winograd-f2x2-5x5"


def why_not(geo, dtype, pass_):
    reason = common_rule(geo, dtype, 5)
    if reason is not None:
        return reason
    if max(geo.pads) > 4:
        return "it needs padding of at most 4"
    if geo.OH % 2 or geo.OW % 2:
        return "it needs an even output size"
    if min(geo.OW, geo.W) < 2 * _wk.TT:
        return f"it needs input and output at least {2 * _wk.TT} wide"
    if pass_ != "grad_input" and geo.C % _wk.VL:  # dX reads the deltas' channels
        return f"it needs input channels in multiples of {_wk.VL}"
    if pass_ == "grad_input" and delta_layout(geo).shape[1:3] != (geo.H + 4, geo.W + 4):
        return "its dX needs the deltas padded by 4 on every side"
    return None


def common_rule(geo, dtype, R: int) -> str | None:
    """What every Winograd path needs (this one and F(4x4, 3x3)): the switch on, float32,
    one group, an ``R x R`` filter at stride 1 without dilation; None if ``geo`` has it."""
    if not config.get_winograd():
        return "Winograd is turned off (fastconv.set_winograd(False))"
    if np.dtype(dtype) != np.float32:
        return f"it computes in float32 only, not {np.dtype(dtype)}"
    if geo.G != 1:
        return "it needs one group"
    if (geo.R, geo.S, geo.sh, geo.sw, geo.dlh, geo.dlw) != (R, R, 1, 1, 1, 1):
        return f"it needs a {R}x{R} filter at stride 1 without dilation"
    return None


def few_channel_rule(geo, pass_) -> str | None:
    """Why a Winograd path passes over dX of a layer with few input channels: its product
    fills one lane of 16 per channel there.  The depthwise kernels ran MNIST conv1's dX
    (1 -> 32, 5x5, batch 64) in 0.89 ms against Winograd's 6.4 ms; the grouped kernels
    (pixels as the lanes) a CIFAR input layer's (3 -> 32, 3x3, 32x32, batch 32) in 1.2 ms
    against F(4x4, 3x3)'s 4.8 ms, on one thread."""
    if pass_ == "grad_input" and geo.Cg == 1:
        return "dX of one input channel runs faster on the depthwise kernels"
    if pass_ == "grad_input" and geo.C <= config.PIXEL_MAX_C:
        return (f"dX of at most {config.PIXEL_MAX_C} input channels (config.PIXEL_MAX_C) "
                "runs faster on the grouped kernels")
    return None


def slower(geo, dtype, pass_):
    reason = few_channel_rule(geo, pass_)
    if reason is not None:
        return reason
    tiles = geo.N * (geo.OH // 2) * (geo.OW // 2)
    if pass_ == "grad_weight" and tiles < config.WINOGRAD_DW_MIN_TILES:
        return (f"its dW needs at least {config.WINOGRAD_DW_MIN_TILES} output tiles "
                f"(config.WINOGRAD_DW_MIN_TILES) to pay for its transforms; this has {tiles}")
    return None


def prepare(geo, w, pass_):
    """``U``, the transformed filters (:func:`transform_filters`): of ``w`` for the forward
    pass; for dX, of the filters rotated by 180 degrees with the channel roles swapped,
    over the deltas' channels."""
    if pass_ == "forward":
        return transform_filters(w, geo.C, np.float32)
    return transform_filters(w, delta_layout(geo).KgP, np.float32, rotate=True)


def forward(geo, x, U, b):
    return packed_forward(geo, _pack_input(x, geo), U, b)


def grad_input(geo, dy, U):
    layout = delta_layout(geo)
    return packed_grad_input(geo, pack_deltas(dy, layout), layout, U)


def grad_weight(geo, x, dy):
    layout = delta_layout(geo, need_dx=False)
    return packed_grad_weight(geo, _pack_input(x, geo), pack_deltas(dy, layout), layout)


def packed_forward(geo: ConvGeometry, xp, U, b, ws=_FRESH, pool_order=False):
    """y from the packed input and ``U`` (:func:`prepare`), in NCHW or pool order, as
    the channel tile's ``packed_forward``; None if it has an inf or NaN (the plan then
    runs the next algorithm)."""
    return forward_by(run_forward, geo, xp, U, b, ws, pool_order)


def packed_grad_input(geo: ConvGeometry, dyp, layout: DeltaLayout, U):
    """dX from deltas in ``layout`` (padded by 4, as the full correlation needs): the
    forward kernel on the deltas with dX's ``U``; None if it has an inf or NaN."""
    return grad_input_by(run_forward, geo, dyp, U)


def forward_by(run, geo: ConvGeometry, xp, U, b, ws=_FRESH, pool_order=False):
    """The output of either Winograd path's ``run(xp, U, b, y, pool_order)`` (its
    ``run_forward``) in a new ``y`` (N, K, OH, OW), or in pool order (N, K, 4, OH/2 *
    OW/2), the array ``"y"`` of ``ws``; None if ``run`` reports an inf or NaN."""
    shape = (geo.N, geo.K, 4, geo.OH * geo.OW // 4) if pool_order else (
        geo.N, geo.K, geo.OH, geo.OW)
    y = ws.empty("y", shape, xp.dtype)
    return y if run(xp, U, b, y, pool_order) else None


def grad_input_by(run, geo: ConvGeometry, dyp, U):
    """dX (N, C, H, W) by either Winograd path's ``run`` on the deltas ``dyp`` with dX's
    ``U``; None if it reports an inf or NaN."""
    dx = np.empty((geo.N, geo.C, geo.H, geo.W), dyp.dtype)
    return dx if run(dyp, U, None, dx) else None


def packed_grad_weight(geo: ConvGeometry, xp, dyp, layout: DeltaLayout, ws=_FRESH):
    """dW from the packed input and deltas in ``layout``; None if it has an inf or NaN."""
    return run_grad_weight(xp, dyp, layout.top, layout.left, geo.K, geo.C)


# ---- the transforms and the kernels' wrappers ------------------------------------------

#: Interpolation points of F(2, 5) (and of F(5, 2) for dW), plus the point at infinity.
POINTS = (0, 1, -1, Fraction(1, 2), -2)

def _vandermonde(points, n):
    """Rows (1, p, ..., p**(n-1)) for each point, then the point at infinity (0, ..., 0, 1)."""
    rows = [[Fraction(p) ** i for i in range(n)] for p in points]
    return rows + [[Fraction(0)] * (n - 1) + [Fraction(1)]]


def _inverse(m):
    """Exact inverse of a square matrix of Fractions (Gauss-Jordan)."""
    n = len(m)
    a = [row[:] + [Fraction(int(i == j)) for j in range(n)] for i, row in enumerate(m)]
    for col in range(n):
        piv = next(i for i in range(col, n) if a[i][col] != 0)
        a[col], a[piv] = a[piv], a[col]
        a[col] = [v / a[col][col] for v in a[col]]
        for i in range(n):
            if i != col and a[i][col] != 0:
                f = a[i][col]
                a[i] = [vi - f * vc for vi, vc in zip(a[i], a[col], strict=True)]
    return [row[n:] for row in a]


@cache
def transforms(m: int = 2, r: int = 5, points=POINTS):
    """Exact Toom-Cook matrices of F(m, r) as lists of Fractions: ``(AT, G, BT, scale)``.

    ``AT`` (m, a), ``G`` (a, r), ``BT`` (a, a), ``a = m + r - 1``, with
    ``y = AT @ ((G @ g) * (BT @ d))`` the correlation ``y[i] = sum_k d[i + k] * g[k]``.
    ``AT`` and ``G`` are the Vandermonde matrices of the points (with infinity) for
    degrees below m and r; ``BT`` is the transposed inverse of the full one.  Each row of
    ``BT`` is then multiplied by ``scale[row]`` to make it small integers, and the same
    row of ``G`` divided by it.
    """
    a = m + r - 1
    AT = [list(col) for col in zip(*_vandermonde(points, m), strict=True)]
    G = _vandermonde(points, r)
    BT = [list(col) for col in zip(*_inverse(_vandermonde(points, a)), strict=True)]
    scale = []
    for i, row in enumerate(BT):
        den = np.lcm.reduce([v.denominator for v in row])
        num = np.gcd.reduce([(v * int(den)).numerator for v in row])
        s = Fraction(int(den), int(num))
        scale.append(s)
        BT[i] = [v * s for v in row]
        G[i] = [v / s for v in G[i]]
    return AT, G, BT, scale


def _scale_products() -> np.ndarray:
    """``1 / (scale[xi] * scale[nu])`` at ``6*xi + nu``, exact then rounded once.  The
    kernels hard-code ``B^T``, ``A^T`` and the unscaled ``V`` of ``G = diag(1/scale) V``;
    the weight transforms apply ``V`` on both sides and multiply by these."""
    scale = transforms()[3]
    return np.array([float(1 / (a * b)) for a in scale for b in scale])


_GS = _scale_products()


def kernel_constants(dtype) -> np.ndarray:
    """The constants ``kc`` of the kernels' transforms, in ``dtype``."""
    return np.array([0.5, 2, 3, 4, 5, 0], dtype)


def transform_filters(w: np.ndarray, CP: int, dtype, rotate: bool = False,
                      taps: int = 5) -> np.ndarray:
    """The transformed filters ``U`` (36, CP, KP) of ``w`` (K, C, taps, taps), computed in
    float64 and rounded once to ``dtype``, zero past the channels.

    ``taps`` is 5 (F(2, 5), this module) or 3 (F(4, 3),
    :mod:`fastconv.algorithms.winograd3x3`): the points, and so ``B^T`` and the scale
    products, are the same; ``G`` is the points' Vandermonde matrix for ``taps``
    coefficients (:func:`transforms`).  Without ``rotate``, ``U[p, c, k] = (G w[k, c]
    G^T)[p]`` (``C <= CP``, ``KP`` is ``K`` rounded up to a multiple of ``KW``): the
    forward pass.  With ``rotate``, ``U[p, k, c] = (G w[k, c, ::-1, ::-1] G^T)[p]``
    (``K <= CP``, ``KP`` from ``C``): dX, the filters rotated by 180 degrees and the
    channel roles swapped, read from ``w`` itself.  ``w`` is read in its dtype (float32
    or float64; anything else is converted to float64).
    """
    if taps not in (3, 5):
        raise ValueError(f"taps must be 3 or 5, got {taps!r}")
    if (np.ndim(w) != 4 or np.shape(w)[2:] != (taps, taps)
            or np.shape(w)[1 - rotate] > CP):
        raise ValueError(f"w must have shape (K, C, {taps}, {taps}) with "
                         f"{'K' if rotate else 'C'} <= {CP}, got {np.shape(w)}")
    w = np.asarray(w)
    if w.dtype not in _checks.FLOATS or not w.flags.c_contiguous:
        w = np.ascontiguousarray(w, w.dtype if w.dtype in _checks.FLOATS else np.float64)
    _checks.array("w", w, w.shape, _checks.FLOATS)
    NJ = w.shape[1] if rotate else w.shape[0]
    U = np.empty((36, CP, -(-NJ // _wk.KW) * _wk.KW), dtype)
    _wk.filter_transform(w, bool(rotate), _GS, U)
    return U


# Non-finite values.  The direct kernels propagate an inf or NaN to exactly the outputs
# whose sums it enters; a transform spreads it over the whole 2x2 tile (or, for dW, over
# the whole filter), and can overflow where the direct sums do not.  Any of these leaves
# an inf or NaN in the result, which the kernels report (``chk``) or the wrapper sees,
# and the caller then runs the direct kernel instead.


def _check_packed(name: str, xp) -> tuple[int, int, int, int]:
    """The shape of a packed input or delta array the kernels can run: float32,
    C-contiguous, channels a multiple of ``VL``, an even output at least ``2*TT`` wide."""
    if not isinstance(xp, np.ndarray) or xp.ndim != 4:
        raise TypeError(f"{name} must be a 4-D array (N, Hp, Wp, C), got "
                        f"{getattr(xp, 'shape', type(xp).__name__)}")
    N, Hp, Wp, C = _checks.array(name, xp, xp.shape, np.float32).shape
    if not (C % _wk.VL == 0 and Hp >= 6 and Hp % 2 == 0 and Wp % 2 == 0
            and Wp - 4 >= 2 * _wk.TT):
        raise ValueError(f"{name} of shape {xp.shape} is not a packed input Winograd runs: "
                         f"channels a multiple of {_wk.VL}, an even output (Hp - 4, Wp - 4) "
                         f"at least {2 * _wk.TT} wide")
    return N, Hp, Wp, C


def run_forward(xp: np.ndarray, U: np.ndarray, b, y: np.ndarray,
                pool_order: bool = False) -> bool:
    """The valid 5x5 correlation of the packed input ``xp`` (N, OH+4, OW+4, CP) with the
    filters whose transform is ``U`` (36, CP, KP) (:func:`transform_filters`), plus ``b``
    (K,) or None, into ``y``: (N, K, OH, OW) with ``K <= KP``, or with ``pool_order``
    (N, K, 4, OH/2 * OW/2).  False (and ``y`` to be overwritten) if the result has an
    inf or NaN (see above).  dX is this on the deltas, with the rotated filters."""
    N, Hp, Wp, CP = _check_packed("xp", xp)
    bp, chk = check_product_arrays(U, y, b, N, CP, Hp - 4, Wp - 4, pool_order)
    _wk.winograd_tiles(xp, U, bp, y, kernel_constants(xp.dtype), pool_order, chk)
    return bool(np.isfinite(chk).all())


def check_product_arrays(U, y, b, N: int, CP: int, OH: int, OW: int, pool_order: bool):
    """Check what a forward kernel of either Winograd path takes besides its input, for
    an input of ``N`` images of ``CP`` channels and an output of ``OH x OW``: ``U`` (36,
    CP, KP) float32, ``KP`` a multiple of ``KW``; ``y`` (N, K, OH, OW), or (N, K, 4, OH/2
    * OW/2) with ``pool_order``, ``K <= KP``; ``b`` (K,) or None.  Returns the bias
    padded to ``KP`` (zeros for none) and the kernel's zeroed ``chk`` (NCH, VL)."""
    KP = np.shape(U)[2] if np.ndim(U) == 3 else 0
    if KP % _wk.KW or not KP:
        raise ValueError(f"U must have shape (36, {CP}, KP), KP a multiple of {_wk.KW}, got "
                         f"{np.shape(U)}")
    _checks.array("U", U, (36, CP, KP), np.float32)
    K = np.shape(y)[1] if np.ndim(y) == 4 else -1
    if not 0 < K <= KP:
        raise ValueError(f"y must have shape (N, K, ...) with K <= {KP}, got {np.shape(y)}")
    if pool_order and (OH % 2 or OW % 2):
        raise ValueError(f"pool order needs an even output size, got {OH} x {OW}")
    _checks.array("y", y, (N, K, 4, OH * OW // 4) if pool_order else (N, K, OH, OW),
                  np.float32, writeable=True)
    if b is not None and np.shape(b) != (K,):
        raise ValueError(f"b must have shape ({K},), got {np.shape(b)}")
    bp = np.zeros(KP, np.float32)
    if b is not None:
        bp[:K] = b
    return bp, np.zeros((_wk.NCH, _wk.VL), np.float32)


def run_grad_weight(xp: np.ndarray, dyp: np.ndarray, top: int, left: int, K: int,
                    C: int) -> np.ndarray | None:
    """dW (K, C, 5, 5) from the packed input ``xp`` (N, OH+4, OW+4, CP) and the
    channels-last deltas ``dyp`` (N, Hd, Wd, KP), ``dy[n, k, i, j]`` at
    ``[n, top + i, left + j, k]``; in ``xp``'s dtype.  None if it has an inf or NaN."""
    N, Hp, Wp, _ = _check_packed("xp", xp)
    ntile = N * ((Hp - 4) // 2) * ((Wp - 4) // 2)
    return grad_weight_by(_wk.winograd_dw, xp, dyp, top, left, K, C, 5, ntile)


def grad_weight_by(kernel, xp: np.ndarray, dyp: np.ndarray, top: int, left: int, K: int,
                   C: int, taps: int, ntile: int) -> np.ndarray | None:
    """dW (K, C, taps, taps) of either Winograd path from its checked packed input ``xp``
    (N, OH + taps - 1, OW + taps - 1, CP), cut into ``ntile`` tiles, and the deltas
    ``dyp`` (checked here), by its chunk kernel ``kernel(xp, dyp, top, left, part, kc)``;
    None if the result has an inf or NaN.

    The chunk sums are added in float64, transformed back with ``G`` in float64 and
    rounded once (:func:`winograd_kernels.dw_transform`).
    """
    N, Hp, Wp, CP = xp.shape
    OH, OW = Hp - taps + 1, Wp - taps + 1
    if np.ndim(dyp) != 4:
        raise ValueError(f"dyp must be 4-D (N, Hd, Wd, KP), got shape {np.shape(dyp)}")
    Hd, Wd, KP = _checks.array("dyp", dyp, (N, *np.shape(dyp)[1:]), np.float32).shape[1:]
    if not (KP % _wk.KW == 0 and K <= KP and C <= CP and 0 <= top
            and top + OH <= Hd and 0 <= left and left + OW <= Wd):
        raise ValueError(f"deltas {dyp.shape} at ({top}, {left}) do not cover the output of "
                         f"the packed input {xp.shape}, or K={K} > {KP} or C={C} > {CP}")
    # config.WINOGRAD_DW_CHUNKS chunks, fewer only where a chunk would hold less than a
    # block of TB tiles: a number from the shapes only, and from 2 blocks on, work for
    # two cores.
    P = max(1, min(config.WINOGRAD_DW_CHUNKS, -(-ntile // _wk.TB)))
    part = np.empty((P, CP, 36, KP), xp.dtype)
    kc = kernel_constants(xp.dtype)
    kernel(xp, dyp, top, left, part, kc)
    dw = np.empty((K, C, taps, taps), xp.dtype)
    chk = np.zeros((_wk.TCH, _wk.FB), xp.dtype)
    _wk.dw_transform(part, _GS, kc, dw, chk)
    return dw if np.isfinite(chk).all() else None
