"""Depthwise convolution (``groups == C``, each output channel reading one input channel):
one image plane at a time, with the plane's pixels as the vector lanes, on NCHW as given.

Legend: ``x`` (N, C, H, W) input, ``w`` (K, 1, R, S) weights, ``b`` (K,) bias, ``dy``
(N, K, OH, OW) deltas, ``dx`` and ``dw`` their gradients; ``M = K / C`` output channels
per input channel (the channel multiplier), output channel ``k`` reading input channel
``c = k // M``; strides ``sh, sw``, dilations ``dlh, dlw``, pads ``pt, pb, pl, pr``.

The math
--------
With ``xp`` the zero-padded input (``Hp = H + pt + pb`` rows, ``Wp = W + pl + pr``
columns)::

    y[n,k,i,j]  = b[k] + sum_{r<R, s<S} w[k,0,r,s] * xp[n, k//M, i*sh + r*dlh, j*sw + s*dlw]
    dw[k,0,r,s] = sum_{n, i<OH, j<OW} dy[n,k,i,j] * xp[n, k//M, i*sh + r*dlh, j*sw + s*dlw]
    dx[n,c,h,v] = sum_{m<M} sum_{(r,i): i*sh + r*dlh = h + pt} sum_{(s,j): j*sw + s*dlw = v + pl}
                  dy[n, c*M + m, i, j] * w[c*M + m, 0, r, s]

Every pass is a sum over taps of one plane read at a shifted position, and is computed
with *wide rows*: a plane laid out with a row pitch ``P`` (the padded width, or more), its
output row ``i`` computed for ``P`` columns at ``m = i*P + j``, of which the first ``OW``
are kept.  Then tap ``t`` reads the plane at ``m + off[t]`` for every output ``m``: one
contiguous run per tap, ``out[m] = sum_t wt[t] * src[m + off[t]]`` (:func:`_dw_taps`),
vectorised over ``m`` with no per-row tails or bounds tests.

* **Forward.** At stride 1, ``src`` is the padded plane (``P = Wp``) and ``off[t] =
  r*dlh*Wp + s*dlw``.  At stride ``(sh, sw)`` the padded plane is split into ``sh*sw``
  *phase planes* of ``ceil(Hp/sh) x ceil(Wp/sw)`` (plane ``(a, q)`` holding the padded
  rows ``a, a + sh, ...`` at the columns ``q, q + sw, ...``, ``P = ceil(Wp/sw)``): tap
  ``(r, s)`` reads phase ``((r*dlh) % sh, (s*dlw) % sw)`` at row ``i + (r*dlh)//sh`` and
  column ``j + (s*dlw)//sw``, again ``m + off[t]``.
* **dX** is, for each stride phase of dx (see "dX, derived once" in
  :mod:`fastconv.geometry`), a stride-1 correlation of the deltas, padded by the border
  the phases need, with the rotated taps of that phase; the ``M`` delta planes of an input
  channel lie one after the other in ``src`` and their taps are summed in one pass.  Each
  phase's wide rows are written to every ``sh``-th row and ``sw``-th column of dx.
* **dW** runs the same layout as the forward pass, as dot products: ``dw[k, t] += sum_m
  dyw[m] * src[m + off[t]]``, ``dyw`` being the deltas in wide rows, zero in the columns
  past ``OW`` (:func:`_dw_dots`).  An inf or NaN input times such a zero would be a NaN
  that no real product makes: a plane holding one runs the real columns only.

Non-finite values: the forward pass multiplies the zero padding as the reference does; dX
with an inf or NaN weight hands over to the next algorithm (the channel tile's exact path:
``inf * 0`` on the deltas' border would make NaNs that no real delta touches).

Parallelism: the planes ``(n, c)`` (forward, dX) or ``(batch chunk, k)`` (dW) are cut
into ``Q`` groups, each with its own scratch planes; each plane's outputs are written by
one task, and dW's per-chunk sums are added in a fixed order, so every result is the same
for any thread count.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numba
import numpy as np
from numba import prange

from .. import config
from .._jit import parallel_kernel, serial_kernel, stack_tile
from ..geometry import ConvGeometry, _dx_phases

NAME = "depthwise"

#: Lanes per vector step (one zmm of float32, two of float64).
VL = 16
#: Vectors per register tile of the forward pass and dX: TV x VL outputs.
TV = 8
TP = TV * VL
#: Taps per register tile of dW: DT vector accumulators.
DT = 9


def why_not(geo, dtype, pass_):
    if geo.Cg != 1 or geo.G != geo.C:
        return "it needs a depthwise layer: groups == C input channels (C/groups == 1)"
    return None


# ---- geometry of the wide rows ---------------------------------------------------------


class _Planes(NamedTuple):
    """The forward and dW layout of one input plane: ``nb`` column phases and ``na`` row
    phases of ``Hq x Wq`` each (one of ``Hp x Wp`` at stride 1), ``off`` (R*S,) uint64 the
    taps' offsets in it, ``M`` the wide output length ``OH*Wq``, ``ntiles`` its register
    tiles of ``TP``, ``L`` the scratch length every tile's reads fit in."""

    na: int
    nb: int
    Hq: int
    Wq: int
    off: np.ndarray
    M: int
    ntiles: int
    L: int


@functools.lru_cache(maxsize=64)
def _planes(geo: ConvGeometry) -> _Planes:
    Hp, Wp = geo.H + geo.pt + geo.pb, geo.W + geo.pl + geo.pr
    na, nb = min(geo.sh, Hp), min(geo.sw, Wp)
    Hq, Wq = -(-Hp // geo.sh), -(-Wp // geo.sw)
    r, s = np.divmod(np.arange(geo.R * geo.S), geo.S)
    rh, sv = r * geo.dlh, s * geo.dlw
    off = (((rh % geo.sh) * nb + sv % geo.sw) * Hq + rh // geo.sh) * Wq + sv // geo.sw
    M = geo.OH * Wq
    ntiles = -(-M // TP)
    L = max(na * nb * Hq * Wq, int(off.max()) + ntiles * TP)
    off = off.astype(np.uint64)
    off.flags.writeable = False
    return _Planes(na, nb, Hq, Wq, off, M, ntiles, L)


def _groups(tasks: int) -> int:
    return max(1, min(tasks, config.DEPTHWISE_GROUPS_PER_THREAD * numba.get_num_threads()))


# ---- forward ---------------------------------------------------------------------------


def prepare(geo, w, pass_):
    """The weights as the forward pass reads them, ``(K, R*S)``; for dX,
    :class:`DxWeights`."""
    if pass_ == "forward":
        return np.ascontiguousarray(w.reshape(geo.K, geo.R * geo.S))
    return _dx_weights(geo, w)


def forward(geo, x, wt, b):
    pl_ = _planes(geo)
    C, K = geo.C, geo.K
    bias = np.zeros(K, x.dtype) if b is None else np.ascontiguousarray(b)
    y = np.empty((geo.N, K, geo.OH, geo.OW), x.dtype)
    tasks = geo.N * C
    Q = _groups(tasks)
    src = np.zeros((Q, pl_.L), x.dtype)
    out = np.empty((Q, pl_.ntiles * TP), x.dtype)
    dw_forward(np.ascontiguousarray(x).reshape(geo.N, C, -1), wt, bias,
               y.reshape(geo.N, K, -1), src, out, pl_.off, geo.H, geo.W, geo.OW, geo.pt,
               geo.pl, geo.sh, geo.sw, pl_.nb, pl_.Hq, pl_.Wq, pl_.ntiles)
    return y


# ---- dX --------------------------------------------------------------------------------


class _DxTaps(NamedTuple):
    """dX's taps (see the module's docstring), cached per geometry: for phase ``p``, taps
    ``[tap0[p], tap0[p+1])`` of ``off`` (uint64, into ``M`` padded delta planes of ``Hd x
    Wd`` one after another), with the multiplier index ``m`` and flat tap ``r*S + s`` of
    each; its outputs are rows ``out0h[p] + u*sh``, ``u < cnth[p]``, columns ``out0w[p] +
    t*sw``, ``t < cntw[p]``."""

    off: np.ndarray
    m: np.ndarray
    rs: np.ndarray
    tap0: np.ndarray
    cnth: np.ndarray
    cntw: np.ndarray
    out0h: np.ndarray
    out0w: np.ndarray
    top: int
    left: int
    Hd: int
    Wd: int
    ntiles: int
    L: int
    covered: bool


class DxWeights(NamedTuple):
    """dX's prepared weights: the taps of the geometry (:class:`_DxTaps`) and ``wt``
    (C, T), the rotated weights of each input channel, in the taps' order; ``exact``:
    every weight is finite."""

    taps: _DxTaps
    wt: np.ndarray
    exact: bool


@functools.lru_cache(maxsize=64)
def _dx_taps(geo: ConvGeometry) -> _DxTaps:
    rows, ptd, pbd = _dx_phases(geo.H, geo.pt, geo.sh, geo.dlh, geo.R, geo.OH)
    cols, pld, prd = _dx_phases(geo.W, geo.pl, geo.sw, geo.dlw, geo.S, geo.OW)
    Hd, Wd = geo.OH + ptd + pbd, geo.OW + pld + prd
    Mult = geo.K // geo.C
    off, ms, rss, tap0, cnth, cntw, out0h, out0w = [], [], [], [0], [], [], [], []
    ntiles = 1
    for ph in rows:
        for pw in cols:
            for m in range(Mult):
                for e, r in enumerate(ph.taps):
                    for f, s in enumerate(pw.taps):
                        off.append(m * Hd * Wd + (ptd + ph.start + e * ph.step) * Wd
                                   + pld + pw.start + f * pw.step)
                        ms.append(m)
                        rss.append(r * geo.S + s)
            tap0.append(len(off))
            cnth.append(ph.count)
            cntw.append(pw.count)
            out0h.append(ph.out0)
            out0w.append(pw.out0)
            ntiles = max(ntiles, -(-ph.count * Wd // TP))
    off = np.array(off, np.uint64)
    L = max(Mult * Hd * Wd, int(off.max(initial=0)) + ntiles * TP)  # no phase: dx is 0
    covered = sum(ph.count for ph in rows) == geo.H and sum(pw.count for pw in cols) == geo.W
    out = _DxTaps(off, *(np.array(v, np.int64) for v in (ms, rss, tap0, cnth, cntw, out0h,
                                                          out0w)),
                  ptd, pld, Hd, Wd, ntiles, L, covered)
    for a in out[:8]:
        a.flags.writeable = False
    return out


def _dx_weights(geo: ConvGeometry, w: np.ndarray) -> DxWeights:
    t = _dx_taps(geo)
    wt = np.ascontiguousarray(w.reshape(geo.C, geo.K // geo.C, geo.R * geo.S)[:, t.m, t.rs])
    return DxWeights(t, wt, bool(np.isfinite(w).all()))


def grad_input(geo, dy, wd):
    if not wd.exact:
        return None  # the channel tile's exact path skips the deltas' zero border
    t = wd.taps
    make = np.empty if t.covered else np.zeros
    dx = make((geo.N, geo.C, geo.H, geo.W), dy.dtype)
    tasks = geo.N * geo.C
    Q = _groups(tasks)
    src = np.zeros((Q, t.L), dy.dtype)
    out = np.empty((Q, t.ntiles * TP), dy.dtype)
    dw_grad_input(np.ascontiguousarray(dy).reshape(geo.N, geo.K, -1), t.off, wd.wt,
                  t.tap0, t.cnth, t.cntw, t.out0h, t.out0w,
                  dx.reshape(geo.N, geo.C, -1), src, out, geo.OH, geo.OW, geo.W, t.top,
                  t.left, t.Hd, t.Wd, geo.sh, geo.sw)
    return dx


# ---- dW --------------------------------------------------------------------------------


def grad_weight(geo, x, dy):
    pl_ = _planes(geo)
    K, N = geo.K, geo.N
    T = geo.R * geo.S
    TB = -(-T // DT)
    off = np.zeros(TB * DT, np.uint64)
    off[:T] = pl_.off
    P = min(N, max(1, -(-config.DEPTHWISE_DW_TASKS // K)))  # batch chunks
    Q = _groups(P * K)
    Mp = pl_.ntiles * TP
    L = max(pl_.L, int(off.max()) + Mp)
    src = np.zeros((Q, L), x.dtype)
    dyw = np.zeros((Q, Mp), x.dtype)
    acc = np.empty((Q, 2, TB * DT, VL), x.dtype)
    part = np.empty((P, K, TB * DT), x.dtype)
    dw_grad_weight(np.ascontiguousarray(x).reshape(N, geo.C, -1),
                   np.ascontiguousarray(dy).reshape(N, K, -1), off, part, src, dyw, acc,
                   geo.H, geo.W, geo.OW, geo.pt, geo.pl, geo.sh, geo.sw, pl_.nb, pl_.Hq,
                   pl_.Wq, pl_.ntiles * TV)
    dw = part.sum(axis=0) if P > 1 else part[0]
    return np.ascontiguousarray(dw[:, :T]).reshape(K, 1, geo.R, geo.S)


# Kernels
# -------


@numba.njit(inline="always")
def _copy_row(dst, d0, src, s0, n):
    """``dst[d0 + v] = src[s0 + v]`` for ``v < n``, unsigned offsets (a vector copy)."""
    for v in range(np.uint64(0), np.uint64(n)):
        dst[d0 + v] = src[s0 + v]


@numba.njit(inline="always")
def _phase_plane(a, H, W, dst, pt, pl, sh, sw, nb, Hq, Wq):
    """Plane ``a`` (H*W,) into its zero-padded phase planes ``dst`` (flat, zero elsewhere
    already): padded pixel ``(h', v') = (h + pt, v + pl)`` to plane ``(h' % sh, v' % sw)``
    at ``(h' // sh, v' // sw)``."""
    for h in range(H):
        hp = h + pt
        rowbase = (hp % sh) * nb * Hq + hp // sh
        if sw == 1:
            _copy_row(dst, np.uint64(rowbase * Wq + pl), a, np.uint64(h * W), W)
        elif sw == 2:
            # Even and odd columns in one loop: LLVM loads whole vectors and splits them
            # (one strided loop per phase read them element by element).
            b0 = np.uint64((rowbase + (pl % 2) * Hq) * Wq + pl // 2)
            b1 = np.uint64((rowbase + ((pl + 1) % 2) * Hq) * Wq + (pl + 1) // 2)
            s0 = np.uint64(h * W)
            for u in range(np.uint64(0), np.uint64(W // 2)):
                dst[b0 + u] = a[s0 + np.uint64(2) * u]
                dst[b1 + u] = a[s0 + np.uint64(2) * u + np.uint64(1)]
            if W % 2:
                dst[b0 + np.uint64(W // 2)] = a[s0 + np.uint64(W - 1)]
        else:
            for q in range(nb):
                v0 = (q - pl) % sw  # first column of this phase
                base = ((rowbase + q * Hq) * Wq) + (v0 + pl) // sw
                for u in range((W - v0 + sw - 1) // sw):
                    dst[base + u] = a[h * W + v0 + u * sw]


@numba.njit(inline="always")
def _tap(acc, src, o, wv):
    """One tap of the :func:`_dw_taps` tile: ``acc[v, u] += wv * src[o + v*VL + u]``."""
    for u in range(VL):
        at = o + np.uint64(u)
        acc[0, u] += wv * src[at]
        acc[1, u] += wv * src[at + np.uint64(VL)]
        acc[2, u] += wv * src[at + np.uint64(2 * VL)]
        acc[3, u] += wv * src[at + np.uint64(3 * VL)]
        acc[4, u] += wv * src[at + np.uint64(4 * VL)]
        acc[5, u] += wv * src[at + np.uint64(5 * VL)]
        acc[6, u] += wv * src[at + np.uint64(6 * VL)]
        acc[7, u] += wv * src[at + np.uint64(7 * VL)]


@serial_kernel
def _dw_taps(src, off, wt, bias, out, ntiles):
    """``out[m] = bias + sum_t wt[t] * src[m + off[t]]`` for ``m < ntiles*TP``: a register
    tile of ``TV`` = 8 vectors of ``VL`` outputs (8 independent FMA chains, enough to hide
    the FMA latency on two pipes), a broadcast weight and ``TV`` loads per tap.

    src : (L,)  the plane(s), ``L >= max(off) + ntiles*TP``.   off : (T,) uint64.
    wt  : (T,)  the taps' weights.                              out : (>= ntiles*TP,).
    """
    T = off.shape[0]
    acc = stack_tile(TV, VL, out.dtype)
    for tile in range(ntiles):
        base = np.uint64(tile * TP)
        for u in range(VL):
            acc[0, u] = 0
            acc[1, u] = 0
            acc[2, u] = 0
            acc[3, u] = 0
            acc[4, u] = 0
            acc[5, u] = 0
            acc[6, u] = 0
            acc[7, u] = 0
        for t in range(T - 1):
            _tap(acc, src, base + off[t], wt[t])
        # The last tap stores the tile (a loop of its own was unrolled into scalar stores).
        wv = wt[T - 1]
        o = base + off[T - 1]
        for u in range(VL):
            at = o + np.uint64(u)
            to = base + np.uint64(u)
            out[to] = acc[0, u] + wv * src[at] + bias
            out[to + np.uint64(VL)] = acc[1, u] + wv * src[at + np.uint64(VL)] + bias
            out[to + np.uint64(2 * VL)] = acc[2, u] + wv * src[at + np.uint64(2 * VL)] + bias
            out[to + np.uint64(3 * VL)] = acc[3, u] + wv * src[at + np.uint64(3 * VL)] + bias
            out[to + np.uint64(4 * VL)] = acc[4, u] + wv * src[at + np.uint64(4 * VL)] + bias
            out[to + np.uint64(5 * VL)] = acc[5, u] + wv * src[at + np.uint64(5 * VL)] + bias
            out[to + np.uint64(6 * VL)] = acc[6, u] + wv * src[at + np.uint64(6 * VL)] + bias
            out[to + np.uint64(7 * VL)] = acc[7, u] + wv * src[at + np.uint64(7 * VL)] + bias


@parallel_kernel
def dw_forward(x, wt, b, y, src, out, off, H, W, OW, pt, pl, sh, sw, nb, Hq, Wq, ntiles):
    """The forward pass, plane by plane (see the module's docstring).

    x   : (N, C, H*W) C-contiguous.      wt : (K, R*S), K = M*C.     b : (K,).
    y   : (N, K, OH*OW), every element written.
    src : (Q, L) zeros, L as :class:`_Planes`.    out : (Q, >= ntiles*TP) scratch.
    off : (R*S,) uint64 the taps' offsets in the phase planes (:func:`_planes`).

    Group ``q`` of the ``Q`` groups takes planes ``[q*NC//Q, (q+1)*NC//Q)`` of the
    ``NC = N*C`` planes (n, c), with its own scratch: each plane's ``M`` output channels
    are written by one task.
    """
    N, C = x.shape[0], x.shape[1]
    K = y.shape[1]
    OH = y.shape[2] // OW
    Mult = K // C
    Q = src.shape[0]
    NC = N * C
    for q in prange(Q):
        sq = src[q]
        oq = out[q]
        for task in range(q * NC // Q, (q + 1) * NC // Q):
            n = task // C
            c = task % C
            _phase_plane(x[n, c], H, W, sq, pt, pl, sh, sw, nb, Hq, Wq)
            for mm in range(Mult):
                k = c * Mult + mm
                _dw_taps(sq, off, wt[k], b[k], oq, ntiles)
                yk = y[n, k]
                for i in range(OH):
                    _copy_row(yk, np.uint64(i * OW), oq, np.uint64(i * Wq), OW)


@parallel_kernel
def dw_grad_input(dy, off, wt, tap0, cnth, cntw, out0h, out0w, dx, src, out, OH, OW, W, top,
                  left, Hd, Wd, sh, sw):
    """dX, plane by plane and phase by phase (see the module's docstring and
    :class:`DxWeights`).

    dy  : (N, K, OH*OW) C-contiguous.    dx : (N, C, H*W), the phases' pixels written
                                         (the others zero already).
    src : (Q, L) zeros: the ``M`` delta planes of one input channel, each padded to
          ``Hd x Wd`` at ``(top, left)``.    out : (Q, >= ntiles*TP) scratch.
    """
    N, K = dy.shape[0], dy.shape[1]
    C = dx.shape[1]
    Mult = K // C
    Q = src.shape[0]
    NC = N * C
    nphase = tap0.shape[0] - 1
    zero = dx.dtype.type(0)
    for q in prange(Q):
        sq = src[q]
        oq = out[q]
        for task in range(q * NC // Q, (q + 1) * NC // Q):
            n = task // C
            c = task % C
            for mm in range(Mult):
                _phase_plane(dy[n, c * Mult + mm], OH, OW, sq[mm * Hd * Wd:], top, left, 1, 1,
                             1, Hd, Wd)
            wc = wt[c]
            for p in range(nphase):
                t0, t1 = tap0[p], tap0[p + 1]
                rows, cols = cnth[p], cntw[p]
                _dw_taps(sq, off[t0:t1], wc[t0:t1], zero, oq, (rows * Wd + TP - 1) // TP)
                h0, v0 = out0h[p], out0w[p]
                dxc = dx[n, c]
                for u in range(rows):
                    at = (h0 + u * sh) * W + v0
                    if sw == 1:
                        _copy_row(dxc, np.uint64(at), oq, np.uint64(u * Wd), cols)
                    else:
                        for t in range(cols):
                            dxc[at + t * sw] = oq[u * Wd + t]


@serial_kernel
def _dw_dots(src, dyw, off, acc, nvec):
    """``acc[t, u] = sum_{v < nvec} dyw[v*VL + u] * src[v*VL + u + off[t]]``, in tiles of
    ``DT`` taps: ``DT`` vector accumulators, one delta vector and ``DT`` input vectors per
    step.  The deltas are zero in the wide rows' columns past ``OW``, so for finite input
    those columns add exact zeros (:func:`_dots_exact` runs a plane with an inf or NaN).

    src : (L,) the phase planes.    dyw : (>= nvec*VL,) the deltas in wide rows.
    off : (T,) uint64, T a multiple of DT.    acc : (T, VL) output.
    """
    T = off.shape[0]
    tile = stack_tile(DT, VL, acc.dtype)
    for tb in range(T // DT):
        o0 = off[tb * DT + 0]
        o1 = off[tb * DT + 1]
        o2 = off[tb * DT + 2]
        o3 = off[tb * DT + 3]
        o4 = off[tb * DT + 4]
        o5 = off[tb * DT + 5]
        o6 = off[tb * DT + 6]
        o7 = off[tb * DT + 7]
        o8 = off[tb * DT + 8]
        for u in range(VL):
            tile[0, u] = 0
            tile[1, u] = 0
            tile[2, u] = 0
            tile[3, u] = 0
            tile[4, u] = 0
            tile[5, u] = 0
            tile[6, u] = 0
            tile[7, u] = 0
            tile[8, u] = 0
        for v in range(nvec):
            base = np.uint64(v * VL)
            for u in range(VL):
                m = base + np.uint64(u)
                d = dyw[m]
                tile[0, u] += d * src[m + o0]
                tile[1, u] += d * src[m + o1]
                tile[2, u] += d * src[m + o2]
                tile[3, u] += d * src[m + o3]
                tile[4, u] += d * src[m + o4]
                tile[5, u] += d * src[m + o5]
                tile[6, u] += d * src[m + o6]
                tile[7, u] += d * src[m + o7]
                tile[8, u] += d * src[m + o8]
        for u in range(VL):
            acc[tb * DT + 0, u] = tile[0, u]
            acc[tb * DT + 1, u] = tile[1, u]
            acc[tb * DT + 2, u] = tile[2, u]
            acc[tb * DT + 3, u] = tile[3, u]
            acc[tb * DT + 4, u] = tile[4, u]
            acc[tb * DT + 5, u] = tile[5, u]
            acc[tb * DT + 6, u] = tile[6, u]
            acc[tb * DT + 7, u] = tile[7, u]
            acc[tb * DT + 8, u] = tile[8, u]


@numba.njit(inline="always")
def _finite(a, n) -> bool:
    """Whether ``a[:n]`` holds no inf or NaN (``x*0`` is NaN for those only)."""
    z = a.dtype.type(0)
    for v in range(n):
        z += a[v] * 0
    return z == 0


@numba.njit(inline="always")
def _dots_exact(src, dyw, off, acc, OH, OW, Wq):
    """:func:`_dw_dots` over the real columns only (``j < OW`` of each wide row), into lane
    0: for a plane with an inf or NaN, which the zero deltas past ``OW`` must not meet."""
    T = off.shape[0]
    for t in range(T):
        for u in range(VL):
            acc[t, u] = 0
        o = off[t]
        s = acc.dtype.type(0)
        for i in range(OH):
            for j in range(OW):
                m = np.uint64(i * Wq + j)
                s += dyw[m] * src[m + o]
        acc[t, 0] = s


@parallel_kernel
def dw_grad_weight(x, dy, off, part, src, dyw, acc, H, W, OW, pt, pl, sh, sw, nb, Hq, Wq,
                   nvec):
    """dW per batch chunk: ``part[p, k, t] = sum_{n in chunk p} sum_{i, j} dy[n,k,i,j] *
    (tap t of the phase planes of x[n, k//M] at i*Wq + j)``; dW is ``part.sum(axis=0)``.

    x : (N, C, H*W), dy : (N, K, OH*OW) C-contiguous.   off : (T,) uint64, T a multiple
    of DT (taps past R*S read offset 0, their sums dropped by the caller).
    part : (P, K, T), every element written.   src : (Q, L) zeros; dyw : (Q, Mp) zeros,
    ``Mp = nvec*VL``;
    acc : (Q, 2, T, VL) scratch.

    Task ``(p, k)``, chunk ``p`` holding samples ``[p*N//P, (p+1)*N//P)``, sums its planes
    in order into the lanes of ``acc``, then the lanes: the same sums for any grouping.
    """
    N, C = x.shape[0], x.shape[1]
    K = dy.shape[1]
    OH = dy.shape[2] // OW
    Mult = K // C
    P, T = part.shape[0], part.shape[2]
    Q = src.shape[0]
    NT = P * K
    for q in prange(Q):
        sq = src[q]
        dq = dyw[q]
        aq = acc[q, 0]
        plane = acc[q, 1]
        for task in range(q * NT // Q, (q + 1) * NT // Q):
            p = task // K
            k = task % K
            c = k // Mult
            for t in range(T):
                for u in range(VL):
                    aq[t, u] = 0
            for n in range(p * N // P, (p + 1) * N // P):
                _phase_plane(x[n, c], H, W, sq, pt, pl, sh, sw, nb, Hq, Wq)
                dyk = dy[n, k]
                for i in range(OH):
                    _copy_row(dq, np.uint64(i * Wq), dyk, np.uint64(i * OW), OW)
                if _finite(x[n, c], H * W):
                    _dw_dots(sq, dq, off, plane, nvec)
                else:
                    _dots_exact(sq, dq, off, plane, OH, OW, Wq)
                for t in range(T):
                    for u in range(VL):
                        aq[t, u] += plane[t, u]
            for t in range(T):
                s = aq[t, 0]
                for u in range(1, VL):
                    s += aq[t, u]
                part[p, k, t] = s
