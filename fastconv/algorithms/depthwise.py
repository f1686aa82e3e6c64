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

Every pass is a sum over taps of one plane read at a shifted position.  A task copies
its plane (zero-padded) into a scratch plane of row pitch ``P``, in which tap ``t`` of
output pixel ``(i, j)`` reads ``src[base[t] + i*P + j]``:

* **Forward.** At stride 1, ``src`` is the padded plane (``P = Wp``) and ``base[t] =
  r*dlh*Wp + s*dlw``.  At stride ``(sh, sw)`` the padded plane is split into ``sh*sw``
  *phase planes* of ``ceil(Hp/sh) x ceil(Wp/sw)`` (plane ``(a, q)`` holding the padded
  rows ``a, a + sh, ...`` at the columns ``q, q + sw, ...``, ``P = ceil(Wp/sw)``): tap
  ``(r, s)`` reads phase ``((r*dlh) % sh, (s*dlw) % sw)`` at row ``i + (r*dlh)//sh`` and
  column ``j + (s*dlw)//sw``.
* **Forward, 3x3 at stride 1, in place** (planes of at most
  ``config.DEPTHWISE_IN_PLACE_BYTES``; MobileNet's layers): no scratch plane.  For each
  filter column the tile's ``TR + 2`` input rows are loaded straight from ``x`` under a
  lane mask (:func:`fastconv._jit.load_row`): lanes whose column falls outside the plane,
  and rows above or below it, are zero and read nothing, so the zero padding is never
  written (:func:`_plane_3x3`).  The same 27 loads for 63 FMAs as the row groups below;
  the copy into the scratch plane had taken a quarter to a third of the pass on 14x14
  planes.  Its output is placed ``config.APART_BYTES`` after the input modulo 4 KiB
  (:func:`fastconv.layouts.empty_apart`): loads of the next rows then never wait on
  stores to the same page offsets.
* **dX** is, for each stride phase of dx (see "dX, derived once" in
  :mod:`fastconv.geometry`), a stride-1 correlation of the deltas, padded by the border
  the phases need, with the rotated taps of that phase; the ``M`` delta planes of an input
  channel lie one after the other in ``src`` and their taps are summed in one pass.  Each
  phase's outputs are every ``sh``-th row and ``sw``-th column of dx; at ``sw == 2`` the
  phases' rows go to scratch and each dx row is joined from its two column phases
  (:func:`fastconv._jit.merge_run`).

**Row groups.**  Taps of one column ``s`` whose rows are consecutive rows of one (phase)
plane, ``base[t + e] = base[t] + e*P``, form a *row group* of ``Rg`` rows.  A register
tile of ``TR`` output rows by ``VL`` columns then needs ``TR + Rg - 1`` row loads for
``TR*Rg`` FMAs, since input row ``i + e`` is tap ``e`` of output row ``i`` and tap ``e - 1``
of row ``i + 1`` (:func:`_rows3` and its siblings, unrolled for ``Rg`` in
:data:`ROW_SIZES`; longer runs are split).  3x3 at stride 1 is three groups of 3: 27 loads
for 63 FMAs, where one load per FMA is what a tap-by-tap tile needs.  At stride 2 a
column's taps fall into two phase planes: groups of 2 and 1 (3x3) or 3 and 2 (5x5).
With dilation ``dlh > sh`` every group is one row.

* **dW** runs the forward pass's row groups as dot products: ``dw[k, slot g+e] += sum_(i,
  j) dyw[i*DP + j] * src[base[g] + (i + e)*P + j]``, ``dyw`` being the deltas in rows of
  whole vectors, zero past ``OW`` and past ``OH`` (:func:`_dots3` and its siblings).  An
  inf or NaN input times such a zero would be a NaN that no real product makes: a task
  whose sums come out inf or NaN runs again over the real pixels only
  (:func:`_dots_exact`).

* **dW, 3x3 at stride 1 or 2, in place** (:func:`_dw_in_place`): no scratch plane and
  no copy of the deltas.  Each tile loads its ``TR`` delta rows and the input rows it
  reads straight from ``dy`` and ``x`` under lane and row masks: at stride 1, per filter
  column, ``TR + 2`` rows for the column's three taps (:func:`_plane_dw_3x3`); at stride
  2, ``2*TR + 1`` rows, each loaded as 32 elements and split into its even and odd
  columns in registers (:func:`fastconv._jit.load_split`) for every tap row that reads it
  (:func:`_plane_dw_3x3s2`).  A task whose sums are not finite runs again one product
  per term (:func:`_plane_dw_exact`).

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
from .._jit import (
    copy_run,
    load_row,
    load_split,
    merge_run,
    parallel_kernel,
    serial_kernel,
    split_run,
    stack_tile,
    store_row,
)
from ..geometry import ConvGeometry, _dx_joins, _dx_phases
from ..kernels import _finite
from ..layouts import _sum_chunks, empty_apart

NAME = "depthwise"

#: Lanes per vector step (one zmm of float32, two of float64).
VL = 16
#: Output rows per register tile of the forward pass and dX: ``TR x VL`` outputs in
#: ``TR`` accumulators (7 rows: 14, 28, 56 and 112 are multiples, and 7 chains of FMAs
#: hide the FMA latency).
TR = 7
#: The row-group sizes with a kernel of their own (:func:`_rows5` ...), largest first.
ROW_SIZES = (5, 3, 2, 1)
#: Scratch elements between two tasks' tile buffers: no cache line shared by two threads.
SEPARATE = 32


def why_not(geo, dtype, pass_):
    if geo.Cg != 1 or geo.G != geo.C:
        return "it needs a depthwise layer: groups == C input channels (C/groups == 1)"
    return None


# ---- geometry of the planes and the row groups -----------------------------------------


class _Planes(NamedTuple):
    """The layout of one input plane: ``nb`` column phases and ``na`` row phases of ``Hq x
    Wq`` each (one of ``Hp x Wp`` at stride 1)."""

    na: int
    nb: int
    Hq: int
    Wq: int


@functools.lru_cache(maxsize=64)
def _planes(geo: ConvGeometry) -> _Planes:
    Hp, Wp = geo.H + geo.pt + geo.pb, geo.W + geo.pl + geo.pr
    return _Planes(min(geo.sh, Hp), min(geo.sw, Wp), -(-Hp // geo.sh), -(-Wp // geo.sw))


class _RowGroups(NamedTuple):
    """Taps packed as row groups (see the module's docstring) for ``npass`` passes of
    :func:`_rows_plane` (the forward pass: one; dX: one per stride phase).

    Group ``g`` reads rows ``base[g] + e*P``, ``e < rows``, with weights ``wk[w0[g] + e]``;
    pass ``p``'s groups of ``ROW_SIZES[c]`` rows are ``[ends[p, c], ends[p, c + 1])``.
    ``widx`` (T,): the weight (a flat index the caller defines) of each packed slot, so a
    channel's weights in kernel order are ``w_flat[widx]``; ``slot`` (T,) uint64: each
    slot's first read, ``base[g] + e*P``; ``reach``: the largest
    ``base[g] + (rows - 1)*P``, for sizing the scratch plane."""

    base: np.ndarray
    w0: np.ndarray
    ends: np.ndarray
    widx: np.ndarray
    slot: np.ndarray
    reach: int


def _row_groups(passes, P: int) -> _RowGroups:
    """Pack ``passes``, each a list of runs ``(base, [weight index of row e, ...])`` of
    consecutive rows, splitting every run into groups of :data:`ROW_SIZES` (largest first:
    7 rows are 5 + 2) and ordering each pass's groups by size."""
    base, w0, widx, slot, ends, reach = [], [], [], [], [], 0
    for runs in passes:
        split = []
        for b, ws in runs:
            e = 0
            while e < len(ws):
                n = next(r for r in ROW_SIZES if r <= len(ws) - e)
                split.append((b + e * P, ws[e:e + n]))
                e += n
        row = [len(base)]
        for size in ROW_SIZES:
            for b, ws in split:
                if len(ws) == size:
                    base.append(b)
                    w0.append(len(widx))
                    widx.extend(ws)
                    slot.extend(b + e * P for e in range(size))
                    reach = max(reach, b + (size - 1) * P)
            row.append(len(base))
        ends.append(row)
    out = _RowGroups(np.array(base, np.uint64), np.array(w0, np.int64),
                     np.array(ends, np.int64).reshape(len(passes), len(ROW_SIZES) + 1),
                     np.array(widx, np.int64), np.array(slot, np.uint64), reach)
    for a in out[:5]:
        a.flags.writeable = False
    return out


def _scratch_length(groups: _RowGroups, P: int, OHc: int, OWc: int) -> int:
    """Elements a scratch plane needs so that every tile's reads stay inside it: a tile
    reads ``TR`` rows from its first (the last tile starts at ``max(OHc - TR, 0)``) and
    ``VL`` columns from each column block's start."""
    return groups.reach + (max(OHc, TR) - 1) * P + -(-max(OWc, 1) // VL) * VL


@functools.lru_cache(maxsize=64)
def _forward_groups(geo: ConvGeometry) -> _RowGroups:
    """The forward pass's row groups in the phase-plane layout of :func:`_planes`; weight
    index ``r*S + s``."""
    pl_ = _planes(geo)
    runs = []
    for s in range(geo.S):
        sv = s * geo.dlw
        by_phase = {}
        for r in range(geo.R):
            rh = r * geo.dlh
            by_phase.setdefault(rh % geo.sh, []).append((rh // geo.sh, r * geo.S + s))
        for a, rows in sorted(by_phase.items()):
            plane = ((a * pl_.nb + sv % geo.sw) * pl_.Hq) * pl_.Wq + sv // geo.sw
            start = 0
            for e in range(1, len(rows) + 1):
                if e == len(rows) or rows[e][0] != rows[e - 1][0] + 1:
                    runs.append((plane + rows[start][0] * pl_.Wq,
                                 [t for _, t in rows[start:e]]))
                    start = e
    return _row_groups([runs], pl_.Wq)


def _groups(tasks: int) -> int:
    return max(1, min(tasks, config.DEPTHWISE_GROUPS_PER_THREAD * numba.get_num_threads()))


# ---- forward ---------------------------------------------------------------------------


def prepare(geo, w, pass_):
    """The weights as the forward pass reads them: :class:`InPlaceWeights`, or ``(K,
    R*S)`` in row-group order; for dX, :class:`DxWeights`."""
    if pass_ == "forward":
        if _in_place(geo, w.dtype):
            return InPlaceWeights(np.ascontiguousarray(w.reshape(geo.K, 9)))
        g = _forward_groups(geo)
        return np.ascontiguousarray(w.reshape(geo.K, geo.R * geo.S)[:, g.widx])
    return _dx_weights(geo, w)


class InPlaceWeights(NamedTuple):
    """The forward pass's prepared weights when it reads the input in place
    (:func:`_in_place`): ``w`` (K, 9), each channel's taps row by row.  The choice is
    made once, in :func:`prepare`, and travels with the weights."""

    w: np.ndarray


def _in_place(geo: ConvGeometry, dtype) -> bool:
    """Whether the forward pass reads the input in place (:func:`dw_forward_3x3`): a 3x3
    layer at stride 1, undilated, with planes of at most
    ``config.DEPTHWISE_IN_PLACE_BYTES`` or an input of at most
    ``config.DEPTHWISE_IN_PLACE_INPUT_BYTES``."""
    plane = geo.H * geo.W * np.dtype(dtype).itemsize
    return ((geo.R, geo.S, geo.sh, geo.sw, geo.dlh, geo.dlw) == (3, 3, 1, 1, 1, 1)
            and (plane <= config.DEPTHWISE_IN_PLACE_BYTES
                 or geo.N * geo.C * plane <= config.DEPTHWISE_IN_PLACE_INPUT_BYTES))


def forward(geo, x, wt, b):
    C, K = geo.C, geo.K
    bias = np.zeros(K, x.dtype) if b is None else np.ascontiguousarray(b)
    x = np.ascontiguousarray(x)
    y = empty_apart((geo.N, K, geo.OH, geo.OW), x.dtype, x)
    Q = _groups(geo.N * C)
    if isinstance(wt, InPlaceWeights):
        dw_forward_3x3(x.reshape(geo.N, C, -1), wt.w, bias,
                       y.reshape(geo.N, K, -1), geo.H, geo.W, geo.OW, geo.pt, geo.pl, Q)
        return y
    pl_ = _planes(geo)
    g = _forward_groups(geo)
    L = max(pl_.na * pl_.nb * pl_.Hq * pl_.Wq, _scratch_length(g, pl_.Wq, geo.OH, geo.OW))
    src = np.zeros((Q, L + SEPARATE), x.dtype)
    tile = np.empty((Q, TR * VL + SEPARATE), x.dtype)
    dw_forward(np.ascontiguousarray(x).reshape(geo.N, C, -1), wt, bias,
               y.reshape(geo.N, K, -1), src, tile, g.base, g.w0, g.ends, geo.H, geo.W,
               geo.OW, geo.pt, geo.pl, geo.sh, geo.sw, pl_.nb, pl_.Hq, pl_.Wq)
    return y


# ---- dX --------------------------------------------------------------------------------


class _DxTaps(NamedTuple):
    """dX's row groups (see the module's docstring), cached per geometry: pass ``p`` (a
    stride phase of dx) reads the ``M`` padded delta planes of ``Hd x Wd``, one after
    another, with rows ``top`` and columns ``left`` of padding; its outputs are rows
    ``out0h[p] + u*sh``, ``u < cnth[p]``, columns ``out0w[p] + t*sw``, ``t < cntw[p]``.
    Weight index ``m*R*S + r*S + s``.

    At ``sw == 2`` with both column phases (``pairs``, one row per row phase: the passes
    of its even and odd columns), the passes write rows of pitch ``PW`` at ``pbase[p]``
    in a scratch of ``PL`` elements, and each dx row is joined from its two phases'
    rows (:func:`merge_run`): strided stores of single elements would be scalar."""

    groups: _RowGroups
    cnth: np.ndarray
    cntw: np.ndarray
    out0h: np.ndarray
    out0w: np.ndarray
    pairs: np.ndarray
    pbase: np.ndarray
    PW: int
    PL: int
    top: int
    left: int
    Hd: int
    Wd: int
    L: int
    covered: bool


class DxWeights(NamedTuple):
    """dX's prepared weights: the taps of the geometry (:class:`_DxTaps`) and ``wt``
    (C, T), the rotated weights of each input channel in row-group order; ``exact``:
    every weight is finite."""

    taps: _DxTaps
    wt: np.ndarray
    exact: bool


@functools.lru_cache(maxsize=64)
def _dx_taps(geo: ConvGeometry) -> _DxTaps:
    rows, ptd, pbd = _dx_phases(geo.H, geo.pt, geo.sh, geo.dlh, geo.R, geo.OH)
    cols, pld, prd = _dx_phases(geo.W, geo.pl, geo.sw, geo.dlw, geo.S, geo.OW)
    Hd, Wd = geo.OH + ptd + pbd, geo.OW + pld + prd
    Mult, RS = geo.K // geo.C, geo.R * geo.S
    passes, cnth, cntw, out0h, out0w = [], [], [], [], []
    for ph in rows:
        for pw in cols:
            runs = []
            for m in range(Mult):
                for f, s in enumerate(pw.taps):
                    b = m * Hd * Wd + (ptd + ph.start) * Wd + pld + pw.start + f * pw.step
                    ws = [m * RS + r * geo.S + s for r in ph.taps]
                    if ph.step == 1:
                        runs.append((b, ws))
                    else:
                        runs.extend((b + e * ph.step * Wd, [t]) for e, t in enumerate(ws))
            passes.append(runs)
            cnth.append(ph.count)
            cntw.append(pw.count)
            out0h.append(ph.out0)
            out0w.append(pw.out0)
    groups = _row_groups(passes, Wd)
    L = max([Mult * Hd * Wd] + [_scratch_length(groups, Wd, a, b)
                                for a, b in zip(cnth, cntw, strict=True)])
    pairs, covered = _dx_joins(rows, cols, geo.H, geo.W, geo.sw)
    PW = max(cntw, default=0)
    pbase = np.concatenate([[0], np.cumsum(np.array(cnth, np.int64) * PW)]).astype(np.int64)
    arrays = [np.array(v, np.int64) for v in (cnth, cntw, out0h, out0w)] + [pairs, pbase]
    for a in arrays:
        a.flags.writeable = False
    return _DxTaps(groups, *arrays, PW, int(pbase[-1]), ptd, pld, Hd, Wd, L, covered)


def _dx_weights(geo: ConvGeometry, w: np.ndarray) -> DxWeights:
    t = _dx_taps(geo)
    wt = np.ascontiguousarray(w.reshape(geo.C, -1)[:, t.groups.widx])
    return DxWeights(t, wt, bool(np.isfinite(w).all()))


def grad_input(geo, dy, wd):
    if not wd.exact:
        return None  # the channel tile's exact path skips the deltas' zero border
    t = wd.taps
    make = np.empty if t.covered else np.zeros
    dx = make((geo.N, geo.C, geo.H, geo.W), dy.dtype)
    Q = _groups(geo.N * geo.C)
    src = np.zeros((Q, t.L + SEPARATE), dy.dtype)
    tile = np.empty((Q, TR * VL + SEPARATE), dy.dtype)
    phases = np.empty((Q, (t.PL if len(t.pairs) else 0) + SEPARATE), dy.dtype)
    g = t.groups
    dw_grad_input(np.ascontiguousarray(dy).reshape(geo.N, geo.K, -1), wd.wt, g.base, g.w0,
                  g.ends, t.cnth, t.cntw, t.out0h, t.out0w, t.pairs, t.pbase, t.PW,
                  dx.reshape(geo.N, geo.C, -1), src, tile, phases, geo.OH, geo.OW, geo.W,
                  t.top, t.left, t.Hd, t.Wd, geo.sh, geo.sw)
    return dx


# ---- dW --------------------------------------------------------------------------------


def _dw_in_place(geo: ConvGeometry) -> bool:
    """Whether dW reads its planes in place (:func:`dw_grad_weight_3x3`): a 3x3 layer,
    undilated, at stride 1 or 2 on both axes, of any size (1.2-2.7x the copy's speed from
    14x14 to 224x224 planes, batch 1 to 64, where the forward pass's copy streams better
    on large inputs)."""
    return ((geo.R, geo.S, geo.dlh, geo.dlw) == (3, 3, 1, 1) and geo.sh == geo.sw
            and geo.sh in (1, 2))


def grad_weight(geo, x, dy):
    K, N = geo.K, geo.N
    T = geo.R * geo.S
    P = min(N, max(1, -(-config.DEPTHWISE_DW_TASKS // K)))  # batch chunks
    Q = _groups(P * K)
    acc = np.empty((Q, -(-P * K // Q), T + 2, VL), x.dtype)  # no cache line shared
    part = np.empty((P, K, T), x.dtype)
    x3 = np.ascontiguousarray(x).reshape(N, geo.C, -1)
    dy3 = np.ascontiguousarray(dy).reshape(N, K, -1)
    if _dw_in_place(geo):
        dw_grad_weight_3x3(x3, dy3, part, acc, geo.H, geo.W, geo.OW, geo.pt, geo.pl, geo.sh)
        return _sum_chunks(part).reshape(K, 1, 3, 3)  # taps already in weight order
    pl_ = _planes(geo)
    g = _forward_groups(geo)
    nblk = -(-geo.OW // VL)
    DP = nblk * VL  # the deltas' row pitch: whole vectors, zero past OW
    OHt = -(-geo.OH // TR) * TR  # the deltas' rows: whole tiles, zero past OH
    L = max(pl_.na * pl_.nb * pl_.Hq * pl_.Wq, _scratch_length(g, pl_.Wq, OHt, DP))
    src = np.zeros((Q, L + SEPARATE), x.dtype)
    dyw = np.zeros((Q, OHt * DP + SEPARATE), x.dtype)
    dw_grad_weight(x3, dy3, g.base, g.w0, g.ends, g.slot, part, src, dyw, acc, geo.H, geo.W,
                   geo.OW, geo.pt, geo.pl, geo.sh, geo.sw, pl_.nb, pl_.Hq, pl_.Wq, DP,
                   DP == geo.OW and OHt == geo.OH)
    out = np.empty((K, T), x.dtype)
    out[:, g.widx] = _sum_chunks(part)
    return out.reshape(K, 1, geo.R, geo.S)


# Kernels
# -------


@numba.njit(inline="always")
def _phase_plane(a, H, W, dst, pt, pl, sh, sw, nb, Hq, Wq):
    """Plane ``a`` (H*W,) into its zero-padded phase planes ``dst`` (flat, zero elsewhere
    already): padded pixel ``(h', v') = (h + pt, v + pl)`` to plane ``(h' % sh, v' % sw)``
    at ``(h' // sh, v' // sw)``.  Rows are copied as masked vectors (:func:`copy_run`,
    :func:`split_run` for the even and odd columns at ``sw == 2``): a 14-pixel row is one
    load and one store, where a loop over it runs element by element."""
    if sh == 1 and sw == 1:  # one loop per case: the rows are short
        for h in range(H):
            copy_run(dst, (h + pt) * Wq + pl, a, h * W, W)
        return
    p = pt % sh  # the row phase and row of padded row h + pt
    v = pt // sh
    even = (pl % 2) * Hq * Wq + pl // 2  # sw == 2: input column 2u's phase and column u
    odd = ((pl + 1) % 2) * Hq * Wq + (pl + 1) // 2  # and column 2u + 1's
    if sw == 2:
        for h in range(H):
            rowbase = (p * nb * Hq + v) * Wq
            split_run(dst, rowbase + even, rowbase + odd, a, h * W, W)
            p += 1
            if p == sh:
                p = 0
                v += 1
        return
    for h in range(H):
        rowbase = (p * nb * Hq + v) * Wq
        s0 = h * W
        if sw == 1:
            copy_run(dst, rowbase + pl, a, s0, W)
        else:
            for q in range(nb):
                v0 = (q - pl) % sw  # first column of this phase
                base = rowbase + q * Hq * Wq + (v0 + pl) // sw
                for u in range((W - v0 + sw - 1) // sw):
                    dst[base + u] = a[s0 + v0 + u * sw]
        p += 1
        if p == sh:
            p = 0
            v += 1


@numba.njit(inline="always")
def _rows5(acc, src, b, P, w0, w1, w2, w3, w4):
    """``acc[v] += sum_(e<5) w_e * src[b + (v + e)*P : +VL]`` for ``v < TR``: 11 row
    loads for 35 FMAs."""
    for uu in range(VL):
        u = np.uint64(uu)
        x0 = src[b + u]
        x1 = src[b + P + u]
        x2 = src[b + np.uint64(2) * P + u]
        x3 = src[b + np.uint64(3) * P + u]
        x4 = src[b + np.uint64(4) * P + u]
        x5 = src[b + np.uint64(5) * P + u]
        x6 = src[b + np.uint64(6) * P + u]
        x7 = src[b + np.uint64(7) * P + u]
        x8 = src[b + np.uint64(8) * P + u]
        x9 = src[b + np.uint64(9) * P + u]
        x10 = src[b + np.uint64(10) * P + u]
        acc[0, uu] += w0 * x0
        acc[0, uu] += w1 * x1
        acc[0, uu] += w2 * x2
        acc[0, uu] += w3 * x3
        acc[0, uu] += w4 * x4
        acc[1, uu] += w0 * x1
        acc[1, uu] += w1 * x2
        acc[1, uu] += w2 * x3
        acc[1, uu] += w3 * x4
        acc[1, uu] += w4 * x5
        acc[2, uu] += w0 * x2
        acc[2, uu] += w1 * x3
        acc[2, uu] += w2 * x4
        acc[2, uu] += w3 * x5
        acc[2, uu] += w4 * x6
        acc[3, uu] += w0 * x3
        acc[3, uu] += w1 * x4
        acc[3, uu] += w2 * x5
        acc[3, uu] += w3 * x6
        acc[3, uu] += w4 * x7
        acc[4, uu] += w0 * x4
        acc[4, uu] += w1 * x5
        acc[4, uu] += w2 * x6
        acc[4, uu] += w3 * x7
        acc[4, uu] += w4 * x8
        acc[5, uu] += w0 * x5
        acc[5, uu] += w1 * x6
        acc[5, uu] += w2 * x7
        acc[5, uu] += w3 * x8
        acc[5, uu] += w4 * x9
        acc[6, uu] += w0 * x6
        acc[6, uu] += w1 * x7
        acc[6, uu] += w2 * x8
        acc[6, uu] += w3 * x9
        acc[6, uu] += w4 * x10


@numba.njit(inline="always")
def _rows3(acc, src, b, P, w0, w1, w2):
    """``acc[v] += sum_(e<3) w_e * src[b + (v + e)*P : +VL]`` for ``v < TR``: 9 row
    loads for 21 FMAs."""
    for uu in range(VL):
        u = np.uint64(uu)
        x0 = src[b + u]
        x1 = src[b + P + u]
        x2 = src[b + np.uint64(2) * P + u]
        x3 = src[b + np.uint64(3) * P + u]
        x4 = src[b + np.uint64(4) * P + u]
        x5 = src[b + np.uint64(5) * P + u]
        x6 = src[b + np.uint64(6) * P + u]
        x7 = src[b + np.uint64(7) * P + u]
        x8 = src[b + np.uint64(8) * P + u]
        acc[0, uu] += w0 * x0
        acc[0, uu] += w1 * x1
        acc[0, uu] += w2 * x2
        acc[1, uu] += w0 * x1
        acc[1, uu] += w1 * x2
        acc[1, uu] += w2 * x3
        acc[2, uu] += w0 * x2
        acc[2, uu] += w1 * x3
        acc[2, uu] += w2 * x4
        acc[3, uu] += w0 * x3
        acc[3, uu] += w1 * x4
        acc[3, uu] += w2 * x5
        acc[4, uu] += w0 * x4
        acc[4, uu] += w1 * x5
        acc[4, uu] += w2 * x6
        acc[5, uu] += w0 * x5
        acc[5, uu] += w1 * x6
        acc[5, uu] += w2 * x7
        acc[6, uu] += w0 * x6
        acc[6, uu] += w1 * x7
        acc[6, uu] += w2 * x8


@numba.njit(inline="always")
def _rows2(acc, src, b, P, w0, w1):
    """``acc[v] += sum_(e<2) w_e * src[b + (v + e)*P : +VL]`` for ``v < TR``: 8 row
    loads for 14 FMAs."""
    for uu in range(VL):
        u = np.uint64(uu)
        x0 = src[b + u]
        x1 = src[b + P + u]
        x2 = src[b + np.uint64(2) * P + u]
        x3 = src[b + np.uint64(3) * P + u]
        x4 = src[b + np.uint64(4) * P + u]
        x5 = src[b + np.uint64(5) * P + u]
        x6 = src[b + np.uint64(6) * P + u]
        x7 = src[b + np.uint64(7) * P + u]
        acc[0, uu] += w0 * x0
        acc[0, uu] += w1 * x1
        acc[1, uu] += w0 * x1
        acc[1, uu] += w1 * x2
        acc[2, uu] += w0 * x2
        acc[2, uu] += w1 * x3
        acc[3, uu] += w0 * x3
        acc[3, uu] += w1 * x4
        acc[4, uu] += w0 * x4
        acc[4, uu] += w1 * x5
        acc[5, uu] += w0 * x5
        acc[5, uu] += w1 * x6
        acc[6, uu] += w0 * x6
        acc[6, uu] += w1 * x7


@numba.njit(inline="always")
def _rows1(acc, src, b, P, w0):
    """``acc[v] += sum_(e<1) w_e * src[b + (v + e)*P : +VL]`` for ``v < TR``: 7 row
    loads for 7 FMAs."""
    for uu in range(VL):
        u = np.uint64(uu)
        x0 = src[b + u]
        x1 = src[b + P + u]
        x2 = src[b + np.uint64(2) * P + u]
        x3 = src[b + np.uint64(3) * P + u]
        x4 = src[b + np.uint64(4) * P + u]
        x5 = src[b + np.uint64(5) * P + u]
        x6 = src[b + np.uint64(6) * P + u]
        acc[0, uu] += w0 * x0
        acc[1, uu] += w0 * x1
        acc[2, uu] += w0 * x2
        acc[3, uu] += w0 * x3
        acc[4, uu] += w0 * x4
        acc[5, uu] += w0 * x5
        acc[6, uu] += w0 * x6


@numba.njit(inline="always")
def _store_rows(out, at, pitch, acc, nj, nv):
    """The first ``nv`` rows of the ``TR x VL`` tile ``acc`` to ``out[at + v*pitch:]``,
    ``nj`` lanes each, every row straight from its registers under a mask (a store loop
    over a runtime row count would index the tile at runtime and keep it in memory)."""
    store_row(out, at, acc[0], nj)
    if nv > 1:
        store_row(out, at + pitch, acc[1], nj)
    if nv > 2:
        store_row(out, at + 2 * pitch, acc[2], nj)
    if nv > 3:
        store_row(out, at + 3 * pitch, acc[3], nj)
    if nv > 4:
        store_row(out, at + 4 * pitch, acc[4], nj)
    if nv > 5:
        store_row(out, at + 5 * pitch, acc[5], nj)
    if nv > 6:
        store_row(out, at + 6 * pitch, acc[6], nj)


@serial_kernel
def _rows_plane(src, P, base, w0, ends, wk, bias, out, o0, orow, ocol, OHc, OWc, tile):
    """``out[o0 + i*orow + j*ocol] = bias + sum_g sum_(e < rows_g) wk[w0[g] + e] *
    src[base[g] + (i + e)*P + j]`` for ``i < OHc``, ``j < OWc``: register tiles of ``TR``
    rows by ``VL`` columns over the row groups (:class:`_RowGroups`) of one pass.

    src  : (L,) the scratch plane(s), ``L`` as :func:`_scratch_length`.
    base, w0 : (G,) the groups;  ends : (5,) this pass's group ranges by size.
    wk   : (T,) one channel's weights in group order.     out : (>= ...,) flat output.
    tile : (>= TR*VL,) scratch for ``ocol > 1``: the tile is stored whole, then its
           elements copied out one by one.

    The last row tile starts at ``OHc - TR`` (rows computed twice, written the same) and
    the last column block stores its first ``OWc % VL`` lanes: the lanes and rows past the
    output read scratch that no stored value depends on.
    """
    acc = stack_tile(TR, VL, tile.dtype)
    Pu = np.uint64(P)
    for ti in range((OHc + TR - 1) // TR):
        i0 = ti * TR
        if OHc >= TR:
            i0 = min(i0, OHc - TR)
        for j0 in range(0, OWc, VL):
            for u in range(VL):
                acc[0, u] = 0
                acc[1, u] = 0
                acc[2, u] = 0
                acc[3, u] = 0
                acc[4, u] = 0
                acc[5, u] = 0
                acc[6, u] = 0
            at = np.uint64(i0 * P + j0)
            for g in range(ends[0], ends[1]):
                k = w0[g]
                _rows5(acc, src, base[g] + at, Pu, wk[k], wk[k + 1], wk[k + 2], wk[k + 3],
                       wk[k + 4])
            for g in range(ends[1], ends[2]):
                k = w0[g]
                _rows3(acc, src, base[g] + at, Pu, wk[k], wk[k + 1], wk[k + 2])
            for g in range(ends[2], ends[3]):
                k = w0[g]
                _rows2(acc, src, base[g] + at, Pu, wk[k], wk[k + 1])
            for g in range(ends[3], ends[4]):
                _rows1(acc, src, base[g] + at, Pu, wk[w0[g]])
            for u in range(VL):
                acc[0, u] += bias
                acc[1, u] += bias
                acc[2, u] += bias
                acc[3, u] += bias
                acc[4, u] += bias
                acc[5, u] += bias
                acc[6, u] += bias
            nj = min(VL, OWc - j0)
            nv = min(TR, OHc - i0)
            at = o0 + i0 * orow + j0 * ocol
            if ocol == 1:
                _store_rows(out, at, orow, acc, nj, nv)
            else:
                for u in range(VL):
                    tile[0 * VL + u] = acc[0, u]
                    tile[1 * VL + u] = acc[1, u]
                    tile[2 * VL + u] = acc[2, u]
                    tile[3 * VL + u] = acc[3, u]
                    tile[4 * VL + u] = acc[4, u]
                    tile[5 * VL + u] = acc[5, u]
                    tile[6 * VL + u] = acc[6, u]
                for v in range(nv):
                    for j in range(nj):
                        out[at + v * orow + j * ocol] = tile[v * VL + j]


@numba.njit(inline="always")
def _span_bits(start, n, size):
    """Bit ``e`` for each ``e < n`` with ``0 <= start + e < size``: the rows or columns of
    a run that lie in the plane, as a mask of lanes or rows."""
    lo, hi = max(0, -start), min(n, size - start)
    return ((1 << hi) - 1) & ~((1 << lo) - 1) if hi > lo else 0


@numba.njit(inline="always")
def _tile_start(ti, rows, OH):
    """The first output row of row tile ``ti`` of ``rows`` rows: the last tile starts
    ``rows`` rows from the end (rows computed twice, stored the same), where ``OH`` holds
    a whole tile."""
    i0 = ti * rows
    return min(i0, OH - rows) if OH >= rows else i0


@numba.njit(inline="always")
def _row_bits(h0, H):
    """Bit ``e`` (``e < TR + 2``): input row ``h0 + e`` lies in the plane (``0 <= h < H``)."""
    return _span_bits(h0, TR + 2, H)


@numba.njit(inline="always")
def _input_rows(xr, x, o, W, rows, lanes):
    """The ``TR + 2`` input rows of a tile into ``xr``, ``W`` apart from ``x[o:]``, under
    the column mask ``lanes``; a row whose bit in ``rows`` is clear is zero and read
    nothing (:func:`_row_bits`)."""
    load_row(xr[0], x, o, lanes if rows & 1 else 0)
    load_row(xr[1], x, o + W, lanes if rows & 2 else 0)
    load_row(xr[2], x, o + 2 * W, lanes if rows & 4 else 0)
    load_row(xr[3], x, o + 3 * W, lanes if rows & 8 else 0)
    load_row(xr[4], x, o + 4 * W, lanes if rows & 16 else 0)
    load_row(xr[5], x, o + 5 * W, lanes if rows & 32 else 0)
    load_row(xr[6], x, o + 6 * W, lanes if rows & 64 else 0)
    load_row(xr[7], x, o + 7 * W, lanes if rows & 128 else 0)
    load_row(xr[8], x, o + 8 * W, lanes if rows & 256 else 0)


@serial_kernel
def _plane_3x3(x, xo, H, W, pt, pl, wk, bias, y, yo, OH, OW):
    """``y[yo + i*OW + j] = bias + sum_(r, s < 3) wk[r*3 + s] * x[xo + (i + r - pt)*W + j + s
    - pl]`` for ``i < OH``, ``j < OW``, a term being zero where its input pixel lies
    outside the ``H x W`` plane at ``x[xo:]``: one plane of a 3x3, stride-1 layer, read in
    place.

    x, y : flat arrays;  wk : (9,) the weights, row by row.

    Register tiles of ``TR`` rows by ``VL`` columns, as :func:`_rows_plane`.  For each
    filter column ``s`` the tile's ``TR + 2`` input rows are loaded under a lane mask
    (:func:`fastconv._jit.load_row`): the lanes whose column lies outside the plane, and
    whole rows above or below it, are zero and read nothing.  Each row serves three output
    rows, 9 loads for 21 FMAs.  The rows of the interior tiles share one mask.
    """
    acc = stack_tile(TR, VL, y.dtype)
    xr = stack_tile(9, VL, y.dtype)  # TR + 2 rows
    for ti in range((OH + TR - 1) // TR):
        i0 = _tile_start(ti, TR, OH)
        h0 = i0 - pt  # the input row of the tile's first read
        rows = _row_bits(h0, H)
        for j0 in range(0, OW, VL):
            for u in range(VL):
                acc[0, u] = bias
                acc[1, u] = bias
                acc[2, u] = bias
                acc[3, u] = bias
                acc[4, u] = bias
                acc[5, u] = bias
                acc[6, u] = bias
            for s in range(3):
                c0 = j0 + s - pl  # the input column of lane 0
                _input_rows(xr, x, xo + h0 * W + c0, W, rows, _col_lanes(c0, W, VL))
                w0 = wk[s]
                w1 = wk[3 + s]
                w2 = wk[6 + s]
                for u in range(VL):
                    acc[0, u] += w0 * xr[0, u] + w1 * xr[1, u] + w2 * xr[2, u]
                    acc[1, u] += w0 * xr[1, u] + w1 * xr[2, u] + w2 * xr[3, u]
                    acc[2, u] += w0 * xr[2, u] + w1 * xr[3, u] + w2 * xr[4, u]
                    acc[3, u] += w0 * xr[3, u] + w1 * xr[4, u] + w2 * xr[5, u]
                    acc[4, u] += w0 * xr[4, u] + w1 * xr[5, u] + w2 * xr[6, u]
                    acc[5, u] += w0 * xr[5, u] + w1 * xr[6, u] + w2 * xr[7, u]
                    acc[6, u] += w0 * xr[6, u] + w1 * xr[7, u] + w2 * xr[8, u]
            nj = min(VL, OW - j0)
            nv = min(TR, OH - i0)
            _store_rows(y, yo + i0 * OW + j0, OW, acc, nj, nv)


@parallel_kernel
def dw_forward_3x3(x, w, b, y, H, W, OW, pt, pl, Q):
    """The forward pass of a 3x3, stride-1 layer, each plane read in place by
    :func:`_plane_3x3` (see the module's docstring).

    x  : (N, C, H*W) C-contiguous.     w : (K, 9) the weights, K = M*C, row by row.
    b  : (K,).                         y : (N, K, OH*OW), every element written.

    The ``N*C`` planes are cut into ``Q`` runs; each plane's ``M`` output channels are
    written by one task.
    """
    N, C = x.shape[0], x.shape[1]
    K = y.shape[1]
    OH = y.shape[2] // OW
    Mult = K // C
    NC = N * C
    xf = x.reshape(x.size)
    yf = y.reshape(y.size)
    for q in prange(Q):
        for task in range(q * NC // Q, (q + 1) * NC // Q):
            n = task // C
            c = task % C
            for mm in range(Mult):
                k = c * Mult + mm
                _plane_3x3(xf, task * H * W, H, W, pt, pl, w[k], b[k], yf,
                           (n * K + k) * OH * OW, OH, OW)


@parallel_kernel
def dw_forward(x, wt, b, y, src, tile, base, w0, ends, H, W, OW, pt, pl, sh, sw, nb, Hq, Wq):
    """The forward pass, plane by plane (see the module's docstring).

    x    : (N, C, H*W) C-contiguous.    wt : (K, R*S) in row-group order, K = M*C.
    b    : (K,).                        y  : (N, K, OH*OW), every element written.
    src  : (Q, L) zeros, L as :func:`forward` sizes it.    tile : (Q, >= TR*VL) scratch.
    base, w0, ends : the row groups (:func:`_forward_groups`), ``ends`` (1, 5).

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
        tq = tile[q]
        for task in range(q * NC // Q, (q + 1) * NC // Q):
            n = task // C
            c = task % C
            _phase_plane(x[n, c], H, W, sq, pt, pl, sh, sw, nb, Hq, Wq)
            for mm in range(Mult):
                k = c * Mult + mm
                _rows_plane(sq, Wq, base, w0, ends[0], wt[k], b[k], y[n, k], 0, OW, 1, OH,
                            OW, tq)


@parallel_kernel
def dw_grad_input(dy, wt, base, w0, ends, cnth, cntw, out0h, out0w, pairs, pbase, PW, dx, src,
                  tile, phases, OH, OW, W, top, left, Hd, Wd, sh, sw):
    """dX, plane by plane and phase by phase (see the module's docstring and
    :class:`_DxTaps`).

    dy   : (N, K, OH*OW) C-contiguous.    dx : (N, C, H*W), the phases' pixels written
                                          (the others zero already).
    wt   : (C, T) in row-group order.     src : (Q, L) zeros: the ``M`` delta planes of
           one input channel, each padded to ``Hd x Wd`` at ``(top, left)``.
    tile : (Q, >= TR*VL) scratch.
    pairs, pbase, PW : the column phases joined by rows, as :class:`_DxTaps`; ``phases``
           (Q, >= PL) scratch for them (``pairs`` empty: each pass writes dx itself).
    """
    N, K = dy.shape[0], dy.shape[1]
    C = dx.shape[1]
    Mult = K // C
    Q = src.shape[0]
    NC = N * C
    zero = dx.dtype.type(0)
    for q in prange(Q):
        sq = src[q]
        tq = tile[q]
        for task in range(q * NC // Q, (q + 1) * NC // Q):
            n = task // C
            c = task % C
            for mm in range(Mult):
                _phase_plane(dy[n, c * Mult + mm], OH, OW, sq[mm * Hd * Wd:], top, left, 1, 1,
                             1, Hd, Wd)
            dxc = dx[n, c]
            if pairs.shape[0] == 0:
                for p in range(ends.shape[0]):
                    _rows_plane(sq, Wd, base, w0, ends[p], wt[c], zero, dxc,
                                out0h[p] * W + out0w[p], sh * W, sw, cnth[p], cntw[p], tq)
            else:
                pq = phases[q]
                for p in range(ends.shape[0]):
                    _rows_plane(sq, Wd, base, w0, ends[p], wt[c], zero, pq, pbase[p], PW, 1,
                                cnth[p], cntw[p], tq)
                for a in range(pairs.shape[0]):
                    pe, po = pairs[a, 0], pairs[a, 1]
                    for u in range(cnth[pe]):
                        merge_run(dxc, (out0h[pe] + u * sh) * W, pq, pbase[pe] + u * PW,
                                  pbase[po] + u * PW, W)


@numba.njit(inline="always")
def _dots5(src, P, dy, DP, b, acc, t0, OHc, nblk):
    """``acc[t0 + e] += sum_(i < OHc, j) dy[i*DP + j] * src[b + (i + e)*P + j]`` per lane,
    ``e < 5``: tiles of ``TR`` delta rows by ``VL`` columns, 7 delta and 11 input row
    loads for 35 FMAs, into 10 accumulators (even and odd delta rows apart: shorter
    FMA chains)."""
    a = stack_tile(10, VL, acc.dtype)
    for uu in range(VL):
        a[0, uu] = 0
        a[1, uu] = 0
        a[2, uu] = 0
        a[3, uu] = 0
        a[4, uu] = 0
        a[5, uu] = 0
        a[6, uu] = 0
        a[7, uu] = 0
        a[8, uu] = 0
        a[9, uu] = 0
    Pu, Du = np.uint64(P), np.uint64(DP)
    for i0 in range(0, OHc, TR):
        for jb in range(nblk):
            bb = b + np.uint64(i0 * P + jb * VL)
            dd = np.uint64(i0 * DP + jb * VL)
            for uu in range(VL):
                u = np.uint64(uu)
                d0 = dy[dd + u]
                d1 = dy[dd + Du + u]
                d2 = dy[dd + np.uint64(2) * Du + u]
                d3 = dy[dd + np.uint64(3) * Du + u]
                d4 = dy[dd + np.uint64(4) * Du + u]
                d5 = dy[dd + np.uint64(5) * Du + u]
                d6 = dy[dd + np.uint64(6) * Du + u]
                x0 = src[bb + u]
                x1 = src[bb + Pu + u]
                x2 = src[bb + np.uint64(2) * Pu + u]
                x3 = src[bb + np.uint64(3) * Pu + u]
                x4 = src[bb + np.uint64(4) * Pu + u]
                x5 = src[bb + np.uint64(5) * Pu + u]
                x6 = src[bb + np.uint64(6) * Pu + u]
                x7 = src[bb + np.uint64(7) * Pu + u]
                x8 = src[bb + np.uint64(8) * Pu + u]
                x9 = src[bb + np.uint64(9) * Pu + u]
                x10 = src[bb + np.uint64(10) * Pu + u]
                a[0, uu] += d0 * x0
                a[1, uu] += d0 * x1
                a[2, uu] += d0 * x2
                a[3, uu] += d0 * x3
                a[4, uu] += d0 * x4
                a[5, uu] += d1 * x1
                a[6, uu] += d1 * x2
                a[7, uu] += d1 * x3
                a[8, uu] += d1 * x4
                a[9, uu] += d1 * x5
                a[0, uu] += d2 * x2
                a[1, uu] += d2 * x3
                a[2, uu] += d2 * x4
                a[3, uu] += d2 * x5
                a[4, uu] += d2 * x6
                a[5, uu] += d3 * x3
                a[6, uu] += d3 * x4
                a[7, uu] += d3 * x5
                a[8, uu] += d3 * x6
                a[9, uu] += d3 * x7
                a[0, uu] += d4 * x4
                a[1, uu] += d4 * x5
                a[2, uu] += d4 * x6
                a[3, uu] += d4 * x7
                a[4, uu] += d4 * x8
                a[5, uu] += d5 * x5
                a[6, uu] += d5 * x6
                a[7, uu] += d5 * x7
                a[8, uu] += d5 * x8
                a[9, uu] += d5 * x9
                a[0, uu] += d6 * x6
                a[1, uu] += d6 * x7
                a[2, uu] += d6 * x8
                a[3, uu] += d6 * x9
                a[4, uu] += d6 * x10
    for uu in range(VL):
        acc[t0 + 0, uu] += a[0, uu] + a[5, uu]
        acc[t0 + 1, uu] += a[1, uu] + a[6, uu]
        acc[t0 + 2, uu] += a[2, uu] + a[7, uu]
        acc[t0 + 3, uu] += a[3, uu] + a[8, uu]
        acc[t0 + 4, uu] += a[4, uu] + a[9, uu]


@numba.njit(inline="always")
def _dots3(src, P, dy, DP, b, acc, t0, OHc, nblk):
    """``acc[t0 + e] += sum_(i < OHc, j) dy[i*DP + j] * src[b + (i + e)*P + j]`` per lane,
    ``e < 3``: tiles of ``TR`` delta rows by ``VL`` columns, 7 delta and 9 input row
    loads for 21 FMAs, into 6 accumulators (even and odd delta rows apart: shorter
    FMA chains)."""
    a = stack_tile(6, VL, acc.dtype)
    for uu in range(VL):
        a[0, uu] = 0
        a[1, uu] = 0
        a[2, uu] = 0
        a[3, uu] = 0
        a[4, uu] = 0
        a[5, uu] = 0
    Pu, Du = np.uint64(P), np.uint64(DP)
    for i0 in range(0, OHc, TR):
        for jb in range(nblk):
            bb = b + np.uint64(i0 * P + jb * VL)
            dd = np.uint64(i0 * DP + jb * VL)
            for uu in range(VL):
                u = np.uint64(uu)
                d0 = dy[dd + u]
                d1 = dy[dd + Du + u]
                d2 = dy[dd + np.uint64(2) * Du + u]
                d3 = dy[dd + np.uint64(3) * Du + u]
                d4 = dy[dd + np.uint64(4) * Du + u]
                d5 = dy[dd + np.uint64(5) * Du + u]
                d6 = dy[dd + np.uint64(6) * Du + u]
                x0 = src[bb + u]
                x1 = src[bb + Pu + u]
                x2 = src[bb + np.uint64(2) * Pu + u]
                x3 = src[bb + np.uint64(3) * Pu + u]
                x4 = src[bb + np.uint64(4) * Pu + u]
                x5 = src[bb + np.uint64(5) * Pu + u]
                x6 = src[bb + np.uint64(6) * Pu + u]
                x7 = src[bb + np.uint64(7) * Pu + u]
                x8 = src[bb + np.uint64(8) * Pu + u]
                a[0, uu] += d0 * x0
                a[1, uu] += d0 * x1
                a[2, uu] += d0 * x2
                a[3, uu] += d1 * x1
                a[4, uu] += d1 * x2
                a[5, uu] += d1 * x3
                a[0, uu] += d2 * x2
                a[1, uu] += d2 * x3
                a[2, uu] += d2 * x4
                a[3, uu] += d3 * x3
                a[4, uu] += d3 * x4
                a[5, uu] += d3 * x5
                a[0, uu] += d4 * x4
                a[1, uu] += d4 * x5
                a[2, uu] += d4 * x6
                a[3, uu] += d5 * x5
                a[4, uu] += d5 * x6
                a[5, uu] += d5 * x7
                a[0, uu] += d6 * x6
                a[1, uu] += d6 * x7
                a[2, uu] += d6 * x8
    for uu in range(VL):
        acc[t0 + 0, uu] += a[0, uu] + a[3, uu]
        acc[t0 + 1, uu] += a[1, uu] + a[4, uu]
        acc[t0 + 2, uu] += a[2, uu] + a[5, uu]


@numba.njit(inline="always")
def _dots2(src, P, dy, DP, b, acc, t0, OHc, nblk):
    """``acc[t0 + e] += sum_(i < OHc, j) dy[i*DP + j] * src[b + (i + e)*P + j]`` per lane,
    ``e < 2``: tiles of ``TR`` delta rows by ``VL`` columns, 7 delta and 8 input row
    loads for 14 FMAs, into 4 accumulators (even and odd delta rows apart: shorter
    FMA chains)."""
    a = stack_tile(4, VL, acc.dtype)
    for uu in range(VL):
        a[0, uu] = 0
        a[1, uu] = 0
        a[2, uu] = 0
        a[3, uu] = 0
    Pu, Du = np.uint64(P), np.uint64(DP)
    for i0 in range(0, OHc, TR):
        for jb in range(nblk):
            bb = b + np.uint64(i0 * P + jb * VL)
            dd = np.uint64(i0 * DP + jb * VL)
            for uu in range(VL):
                u = np.uint64(uu)
                d0 = dy[dd + u]
                d1 = dy[dd + Du + u]
                d2 = dy[dd + np.uint64(2) * Du + u]
                d3 = dy[dd + np.uint64(3) * Du + u]
                d4 = dy[dd + np.uint64(4) * Du + u]
                d5 = dy[dd + np.uint64(5) * Du + u]
                d6 = dy[dd + np.uint64(6) * Du + u]
                x0 = src[bb + u]
                x1 = src[bb + Pu + u]
                x2 = src[bb + np.uint64(2) * Pu + u]
                x3 = src[bb + np.uint64(3) * Pu + u]
                x4 = src[bb + np.uint64(4) * Pu + u]
                x5 = src[bb + np.uint64(5) * Pu + u]
                x6 = src[bb + np.uint64(6) * Pu + u]
                x7 = src[bb + np.uint64(7) * Pu + u]
                a[0, uu] += d0 * x0
                a[1, uu] += d0 * x1
                a[2, uu] += d1 * x1
                a[3, uu] += d1 * x2
                a[0, uu] += d2 * x2
                a[1, uu] += d2 * x3
                a[2, uu] += d3 * x3
                a[3, uu] += d3 * x4
                a[0, uu] += d4 * x4
                a[1, uu] += d4 * x5
                a[2, uu] += d5 * x5
                a[3, uu] += d5 * x6
                a[0, uu] += d6 * x6
                a[1, uu] += d6 * x7
    for uu in range(VL):
        acc[t0 + 0, uu] += a[0, uu] + a[2, uu]
        acc[t0 + 1, uu] += a[1, uu] + a[3, uu]


@numba.njit(inline="always")
def _dots1(src, P, dy, DP, b, acc, t0, OHc, nblk):
    """``acc[t0 + e] += sum_(i < OHc, j) dy[i*DP + j] * src[b + (i + e)*P + j]`` per lane,
    ``e < 1``: tiles of ``TR`` delta rows by ``VL`` columns, 7 delta and 7 input row
    loads for 7 FMAs, into 2 accumulators (even and odd delta rows apart: shorter
    FMA chains)."""
    a = stack_tile(2, VL, acc.dtype)
    for uu in range(VL):
        a[0, uu] = 0
        a[1, uu] = 0
    Pu, Du = np.uint64(P), np.uint64(DP)
    for i0 in range(0, OHc, TR):
        for jb in range(nblk):
            bb = b + np.uint64(i0 * P + jb * VL)
            dd = np.uint64(i0 * DP + jb * VL)
            for uu in range(VL):
                u = np.uint64(uu)
                d0 = dy[dd + u]
                d1 = dy[dd + Du + u]
                d2 = dy[dd + np.uint64(2) * Du + u]
                d3 = dy[dd + np.uint64(3) * Du + u]
                d4 = dy[dd + np.uint64(4) * Du + u]
                d5 = dy[dd + np.uint64(5) * Du + u]
                d6 = dy[dd + np.uint64(6) * Du + u]
                x0 = src[bb + u]
                x1 = src[bb + Pu + u]
                x2 = src[bb + np.uint64(2) * Pu + u]
                x3 = src[bb + np.uint64(3) * Pu + u]
                x4 = src[bb + np.uint64(4) * Pu + u]
                x5 = src[bb + np.uint64(5) * Pu + u]
                x6 = src[bb + np.uint64(6) * Pu + u]
                a[0, uu] += d0 * x0
                a[1, uu] += d1 * x1
                a[0, uu] += d2 * x2
                a[1, uu] += d3 * x3
                a[0, uu] += d4 * x4
                a[1, uu] += d5 * x5
                a[0, uu] += d6 * x6
    for uu in range(VL):
        acc[t0 + 0, uu] += a[0, uu] + a[1, uu]


@serial_kernel
def _rows_dots(src, P, dyw, DP, base, w0, ends, acc, OHc, nblk):
    """dW's dot products over the row groups of one plane: ``acc[w0[g] + e] += sum_(i, j)
    dyw[i*DP + j] * src[base[g] + (i + e)*P + j]`` per lane (:func:`_dots3` and its
    siblings), ``i`` over whole tiles of ``TR`` rows (the deltas are zero past ``OHc``
    and past ``OW`` in each row).

    src : (L,) the phase planes.    dyw : (>= ceil(OHc/TR)*TR*DP,) the deltas.
    acc : (T, VL) the sums, one row per packed slot, added to.
    """
    for g in range(ends[0], ends[1]):
        _dots5(src, P, dyw, DP, base[g], acc, w0[g], OHc, nblk)
    for g in range(ends[1], ends[2]):
        _dots3(src, P, dyw, DP, base[g], acc, w0[g], OHc, nblk)
    for g in range(ends[2], ends[3]):
        _dots2(src, P, dyw, DP, base[g], acc, w0[g], OHc, nblk)
    for g in range(ends[3], ends[4]):
        _dots1(src, P, dyw, DP, base[g], acc, w0[g], OHc, nblk)


@numba.njit(inline="always")
def _dots_exact(src, slot, dyw, DP, P, acc, OH, OW):
    """:func:`_rows_dots` over the real pixels only (``i < OH``, ``j < OW``), added to
    lane 0, slot ``t`` reading ``src`` from ``slot[t]``: for a plane with an inf or NaN,
    which the zero deltas past ``OW`` must not meet."""
    for t in range(slot.shape[0]):
        o = slot[t]
        s = acc.dtype.type(0)
        for i in range(OH):
            for j in range(OW):
                s += dyw[i * DP + j] * src[o + np.uint64(i * P + j)]
        acc[t, 0] += s


@parallel_kernel
def dw_grad_weight(x, dy, base, w0, ends, slot, part, src, dyw, acc, H, W, OW, pt, pl, sh, sw,
                   nb, Hq, Wq, DP, direct):
    """dW per batch chunk: ``part[p, k, t] = sum_{n in chunk p} sum_{i, j} dy[n,k,i,j] *
    (slot t of the phase planes of x[n, k//M] at i*Wq + j)``, the slots those of the
    forward pass's row groups; dW is ``part.sum(axis=0)`` in weight order.

    x : (N, C, H*W), dy : (N, K, OH*OW) C-contiguous.   base, w0, ends : the row groups
    (:func:`_forward_groups`), ``slot`` (T,) uint64 each slot's first read.
    part : (P, K, T), every element written.   src : (Q, L) zeros; dyw : (Q, >=
    ceil(OH/TR)*TR*DP) zeros;  acc : (Q, >= ceil(P*K/Q), >= T, VL) scratch.
    direct : the delta planes are read where they are, unpadded (``DP == OW`` and ``OH`` a
    multiple of ``TR``: rows of whole vectors, whole tiles of rows), else copied to ``dyw``.

    Task ``(p, k)``, chunk ``p`` holding samples ``[p*N//P, (p+1)*N//P)``, sums its planes
    in order into the lanes of ``acc``, then the lanes: the same sums for any grouping.
    Group ``q`` runs its tasks of one chunk together, image by image and channel by
    channel within an image: the planes it reads lie one after another in memory (task by
    task, each plane would start a new stream ``C*H*W`` elements from the last), and a
    channel multiplier's ``M`` channels share one copy of their input plane.

    An inf or NaN input makes every sum that reads it an inf or NaN, also where it meets
    only the zero deltas past ``OW`` or ``OH``, which no real product makes.  So a task
    whose sums are all finite read no such input and is exact; one with an inf or NaN
    sum runs its planes again over the real pixels only (:func:`_dots_exact`).  A check
    of every plane for inf and NaN before its dots had taken a tenth of the pass.
    """
    N, C = x.shape[0], x.shape[1]
    K = dy.shape[1]
    OH = dy.shape[2] // OW
    Mult = K // C
    P, T = part.shape[0], part.shape[2]
    Q = src.shape[0]
    NT = P * K
    nblk = DP // VL
    for q in prange(Q):
        sq = src[q]
        dq = dyw[q]
        t0, t1 = q * NT // Q, (q + 1) * NT // Q
        for p in range(t0 // K, (t1 + K - 1) // K):
            k0, k1 = max(t0 - p * K, 0), min(t1 - p * K, K)  # this chunk's channels
            a0 = p * K + k0 - t0  # their sums: acc[q, a0 + k - k0]
            for k in range(k0, k1):
                for t in range(T):
                    for u in range(VL):
                        acc[q, a0 + k - k0, t, u] = 0
            for n in range(p * N // P, (p + 1) * N // P):
                c_in = -1
                for k in range(k0, k1):
                    c = k // Mult
                    if c != c_in:
                        _phase_plane(x[n, c], H, W, sq, pt, pl, sh, sw, nb, Hq, Wq)
                        c_in = c
                    _rows_dots(sq, Wq, _dw_deltas(dy[n, k], dq, OH, OW, DP, direct), DP, base,
                               w0, ends[0], acc[q, a0 + k - k0], OH, nblk)
            for k in range(k0, k1):
                aq = acc[q, a0 + k - k0]
                _lane_sums(aq, part[p, k])
                if not _finite(part[p, k]):
                    # An inf or NaN among the inputs: again over the real pixels only.
                    for t in range(T):
                        for u in range(VL):
                            aq[t, u] = 0
                    for n in range(p * N // P, (p + 1) * N // P):
                        _phase_plane(x[n, k // Mult], H, W, sq, pt, pl, sh, sw, nb, Hq, Wq)
                        _dots_exact(sq, slot, _dw_deltas(dy[n, k], dq, OH, OW, DP, direct), DP,
                                    Wq, aq, OH, OW)
                    _lane_sums(aq, part[p, k])


@numba.njit(inline="always")
def _dw_deltas(dyk, dq, OH, OW, DP, direct):
    """One plane of deltas ``dyk`` (OH*OW,) as the dots read them, rows ``DP`` apart:
    itself where ``direct``, else copied into ``dq`` (zero past ``OW`` and ``OH``)."""
    if direct:
        return dyk
    for i in range(OH):
        copy_run(dq, i * DP, dyk, i * OW, OW)
    return dq


@numba.njit(inline="always")
def _lane_sums(aq, out):
    """``out[t]`` = the sum of ``aq[t]``'s lanes, in lane order, for every ``t < len(out)``."""
    for t in range(out.shape[0]):
        s = aq[t, 0]
        for u in range(1, VL):
            s += aq[t, u]
        out[t] = s


# ---- dW of a 3x3 layer at stride 1 or 2, read in place -----------------------------------


@numba.njit(inline="always")
def _dw_column(a, d, xr, x, o, W, rows, lanes):
    """The three taps ``r`` of one filter column: ``a[r] += sum_(v < TR) d[v] * (input row
    v + r)``, the ``TR + 2`` input rows loaded into ``xr`` from ``x[o:]``, ``W`` apart,
    under the column mask ``lanes`` and the row mask ``rows`` (bit ``e``: row ``e`` lies
    in the plane, else it is zero): each row serves up to three taps."""
    _input_rows(xr, x, o, W, rows, lanes)
    for u in range(VL):
        a[0, u] += d[0, u] * xr[0, u] + d[1, u] * xr[1, u] + d[2, u] * xr[2, u] + \
            d[3, u] * xr[3, u] + d[4, u] * xr[4, u] + d[5, u] * xr[5, u] + d[6, u] * xr[6, u]
        a[1, u] += d[0, u] * xr[1, u] + d[1, u] * xr[2, u] + d[2, u] * xr[3, u] + \
            d[3, u] * xr[4, u] + d[4, u] * xr[5, u] + d[5, u] * xr[6, u] + d[6, u] * xr[7, u]
        a[2, u] += d[0, u] * xr[2, u] + d[1, u] * xr[3, u] + d[2, u] * xr[4, u] + \
            d[3, u] * xr[5, u] + d[4, u] * xr[6, u] + d[5, u] * xr[7, u] + d[6, u] * xr[8, u]


@numba.njit(inline="always")
def _col_lanes(c0, W, nj):
    """The lanes ``u < nj`` whose input column ``c0 + u`` lies in ``0 <= c < W``."""
    return _span_bits(c0, nj, W)


@numba.njit(inline="always")
def _delta_rows(d, dy, o, OW, dl, left):
    """The ``TR`` delta rows of a tile, ``OW`` apart from ``dy[o:]``, under the lane mask
    ``dl``; rows from ``left`` on (past ``OH``) are zero."""
    load_row(d[0], dy, o, dl)
    load_row(d[1], dy, o + OW, dl if left > 1 else 0)
    load_row(d[2], dy, o + 2 * OW, dl if left > 2 else 0)
    load_row(d[3], dy, o + 3 * OW, dl if left > 3 else 0)
    load_row(d[4], dy, o + 4 * OW, dl if left > 4 else 0)
    load_row(d[5], dy, o + 5 * OW, dl if left > 5 else 0)
    load_row(d[6], dy, o + 6 * OW, dl if left > 6 else 0)


@numba.njit(inline="always")
def _zero_sums(a0, a1, a2):
    """Three tiles of three sums, zeroed (each row by a constant index: in registers)."""
    for u in range(VL):
        a0[0, u] = 0
        a0[1, u] = 0
        a0[2, u] = 0
        a1[0, u] = 0
        a1[1, u] = 0
        a1[2, u] = 0
        a2[0, u] = 0
        a2[1, u] = 0
        a2[2, u] = 0


@numba.njit(inline="always")
def _add_sums(acc, t, i, step):
    """``acc[i + e*step] += t[e]`` for ``e < 3``: one tile's sums to their taps."""
    for u in range(VL):
        acc[i, u] += t[0, u]
        acc[i + step, u] += t[1, u]
        acc[i + 2 * step, u] += t[2, u]


@serial_kernel
def _plane_dw_3x3(x, xo, H, W, pt, pl, dy, do, OH, OW, acc):
    """``acc[r*3 + s, lane] += sum_(i < OH, j < OW) dy[do + i*OW + j] * x[xo + (i + r -
    pt)*W + j + s - pl]``, lane ``j % VL``, a term being zero where its input pixel lies
    outside the ``H x W`` plane: dW's dot products of one plane of a 3x3, stride-1 layer,
    both planes read in place.

    x, dy : flat arrays.    acc : (>= 9, VL) the sums, added to.

    Tiles of ``TR`` delta rows by ``VL`` columns: the tile's delta rows (lanes ``j < OW``,
    rows ``i < OH``) and, for each filter column, its ``TR + 2`` input rows, loaded under
    lane masks (:func:`fastconv._jit.load_row`: a masked-out lane reads nothing and is
    zero), 7 + 27 loads for 63 FMAs into 9 sums (one per tap) kept in registers for the
    whole plane; each input row is loaded once per filter column and serves up to three
    taps.  With the 7 delta and 9 input rows that is 25 of the 32 vector registers.
    Past ``OH`` the deltas are zero; an inf or NaN input there makes the sum NaN, which
    :func:`dw_grad_weight_3x3` recomputes exactly.
    """
    a0 = stack_tile(3, VL, acc.dtype)  # filter column 0, taps r = 0, 1, 2
    a1 = stack_tile(3, VL, acc.dtype)
    a2 = stack_tile(3, VL, acc.dtype)
    d = stack_tile(TR, VL, acc.dtype)
    xr = stack_tile(9, VL, acc.dtype)  # TR + 2 rows
    _zero_sums(a0, a1, a2)
    for i0 in range(0, OH, TR):
        h0 = i0 - pt  # the input row of the tile's first read
        rows = _row_bits(h0, H)
        for j0 in range(0, OW, VL):
            nj = min(VL, OW - j0)
            dl = (1 << nj) - 1
            o = do + i0 * OW + j0
            _delta_rows(d, dy, o, OW, dl, OH - i0)
            c0 = j0 - pl
            xo0 = xo + h0 * W + c0
            _dw_column(a0, d, xr, x, xo0, W, rows, _col_lanes(c0, W, nj))
            _dw_column(a1, d, xr, x, xo0 + 1, W, rows, _col_lanes(c0 + 1, W, nj))
            _dw_column(a2, d, xr, x, xo0 + 2, W, rows, _col_lanes(c0 + 2, W, nj))
    _add_sums(acc, a0, 0, 3)  # filter column s: acc[r*3 + s]
    _add_sums(acc, a1, 1, 3)
    _add_sums(acc, a2, 2, 3)


@numba.njit(inline="always")
def _s2_row(xs, x, o, m01, m2, ok):
    """Input row ``x[o:]`` split for the three filter columns of a stride-2 tile:
    ``xs[s, u] = x[o + 2u + s]`` (``s < 3``), element ``o + v`` read where bit ``v`` of
    ``m01`` (columns 0 and 1) or bit ``v - 2`` of ``m2`` (column 2) is set, all zero
    unless ``ok`` (the row lies in the plane)."""
    load_split(xs[0], xs[1], x, o, m01 if ok else 0)
    load_split(xs[2], xs[3], x, o + 2, m2 if ok else 0)


@numba.njit(inline="always")
def _s2_add(t, dv, xs):
    """``t[s] += dv * xs[s]`` for the three filter columns ``s``: one tap row ``r``."""
    for u in range(VL):
        t[0, u] += dv[u] * xs[0, u]
        t[1, u] += dv[u] * xs[1, u]
        t[2, u] += dv[u] * xs[2, u]


@numba.njit(inline="always")
def _s2_pair(t0, t1, t2, dp, dc, xs, x, o, W, m01, m2, h, H):
    """Input rows ``h`` (odd in the tile: tap row 1 of delta row ``dp``) and ``h + 1``
    (even: tap row 0 of ``dc``, tap row 2 of ``dp``), read at ``x[o:]`` and ``W`` on."""
    _s2_row(xs, x, o, m01, m2, 0 <= h < H)
    _s2_add(t1, dp, xs)
    _s2_row(xs, x, o + W, m01, m2, 0 <= h + 1 < H)
    _s2_add(t0, dc, xs)
    _s2_add(t2, dp, xs)


@serial_kernel
def _plane_dw_3x3s2(x, xo, H, W, pt, pl, dy, do, OH, OW, acc):
    """:func:`_plane_dw_3x3` at stride 2: ``acc[r*3 + s, lane] += sum_(i < OH, j < OW)
    dy[do + i*OW + j] * x[xo + (2i + r - pt)*W + 2j + s - pl]``, lane ``j % VL``, a term
    being zero where its input pixel lies outside the ``H x W`` plane.

    Tiles of ``TR`` delta rows by ``VL`` columns: the delta rows loaded under lane masks,
    then the ``2*TR + 1`` input rows the tile reads, each loaded once as 32 elements and
    split into its even and odd columns in registers (:func:`fastconv._jit.load_split`;
    filter columns 0 and 1, and 2 from two elements on), for every tap row that reads
    it: 60 masked loads and 45 shuffles for 63 FMAs, no copy of the plane.  Input row
    ``e`` of the tile is tap row 0 of delta row ``e/2`` and tap row 2 of ``e/2 - 1`` (``e``
    even), tap row 1 of ``(e - 1)/2`` (``e`` odd).  Past ``OH`` and ``OW`` the deltas are
    zero, and the input elements past ``OW``'s columns are not read.
    """
    t0 = stack_tile(3, VL, acc.dtype)  # tap row 0, filter columns s = 0, 1, 2
    t1 = stack_tile(3, VL, acc.dtype)
    t2 = stack_tile(3, VL, acc.dtype)
    d = stack_tile(TR, VL, acc.dtype)
    xs = stack_tile(4, VL, acc.dtype)
    _zero_sums(t0, t1, t2)
    for i0 in range(0, OH, TR):
        h0 = 2 * i0 - pt  # the input row of the tile's first read
        for j0 in range(0, OW, VL):
            nj = min(VL, OW - j0)
            dl = (1 << nj) - 1
            o = do + i0 * OW + j0
            _delta_rows(d, dy, o, OW, dl, OH - i0)
            c0 = 2 * j0 - pl  # the input column of filter column 0, lane 0
            lanes = _span_bits(c0, 2 * nj + 2, W)  # columns c0 + v
            m01 = lanes & ((1 << (2 * nj)) - 1)
            m2 = lanes >> 2
            xo0 = xo + h0 * W + c0
            _s2_row(xs, x, xo0, m01, m2, 0 <= h0 < H)
            _s2_add(t0, d[0], xs)
            _s2_pair(t0, t1, t2, d[0], d[1], xs, x, xo0 + W, W, m01, m2, h0 + 1, H)
            _s2_pair(t0, t1, t2, d[1], d[2], xs, x, xo0 + 3 * W, W, m01, m2, h0 + 3, H)
            _s2_pair(t0, t1, t2, d[2], d[3], xs, x, xo0 + 5 * W, W, m01, m2, h0 + 5, H)
            _s2_pair(t0, t1, t2, d[3], d[4], xs, x, xo0 + 7 * W, W, m01, m2, h0 + 7, H)
            _s2_pair(t0, t1, t2, d[4], d[5], xs, x, xo0 + 9 * W, W, m01, m2, h0 + 9, H)
            _s2_pair(t0, t1, t2, d[5], d[6], xs, x, xo0 + 11 * W, W, m01, m2, h0 + 11, H)
            _s2_row(xs, x, xo0 + 13 * W, m01, m2, 0 <= h0 + 13 < H)
            _s2_add(t1, d[6], xs)
            _s2_row(xs, x, xo0 + 14 * W, m01, m2, 0 <= h0 + 14 < H)
            _s2_add(t2, d[6], xs)
    _add_sums(acc, t0, 0, 1)  # tap row r: acc[r*3 + s]
    _add_sums(acc, t1, 3, 1)
    _add_sums(acc, t2, 6, 1)


@numba.njit(inline="always")
def _plane_dw_exact(x, xo, H, W, pt, pl, dy, do, OH, OW, st, out):
    """``out[r*3 + s] += sum_(i < OH, j < OW) dy[do + i*OW + j] * xp[i*st + r, j*st + s]``
    over the real pixels, ``xp`` the plane at ``x[xo:]`` zero-padded (``pt``, ``pl``),
    ``st`` the stride: one product per term, as the reference makes them."""
    zero = out.dtype.type(0)
    for r in range(3):
        for s in range(3):
            t = zero
            for i in range(OH):
                for j in range(OW):
                    h, v = i * st + r - pt, j * st + s - pl
                    xv = x[xo + h * W + v] if 0 <= h < H and 0 <= v < W else zero
                    t += dy[do + i * OW + j] * xv
            out[r * 3 + s] += t


@parallel_kernel
def dw_grad_weight_3x3(x, dy, part, acc, H, W, OW, pt, pl, st):
    """dW of a 3x3 layer at stride ``st`` (1 or 2, both axes) per batch chunk, each plane
    read in place by :func:`_plane_dw_3x3` or :func:`_plane_dw_3x3s2`: ``part[p, k, r*3 +
    s] = sum_{n in chunk p} sum_{i, j} dy[n,k,i,j] * xp[n, k//M, i*st + r, j*st + s]``;
    dW is ``part.sum(axis=0)``.

    x : (N, C, H*W), dy : (N, K, OH*OW) C-contiguous.   part : (P, K, 9), every element
    written.   acc : (Q, >= ceil(P*K/Q), >= 9, VL) scratch.

    The tasks and their order are :func:`dw_grad_weight`'s: task ``(p, k)`` sums its
    planes in order into the lanes of ``acc``, then the lanes, so the result is the same
    for any grouping.  A task whose sums are not all finite read an inf or NaN, maybe one
    that met only the zero deltas past ``OH``: it runs its planes again, one product per
    term (:func:`_plane_dw_exact`).
    """
    N, C = x.shape[0], x.shape[1]
    K = dy.shape[1]
    OH = dy.shape[2] // OW
    Mult = K // C
    P = part.shape[0]
    Q = acc.shape[0]
    NT = P * K
    xf = x.reshape(x.size)
    dyf = dy.reshape(dy.size)
    HW, OHW = H * W, OH * OW
    for q in prange(Q):
        t0, t1 = q * NT // Q, (q + 1) * NT // Q
        for p in range(t0 // K, (t1 + K - 1) // K):
            k0, k1 = max(t0 - p * K, 0), min(t1 - p * K, K)  # this chunk's channels
            a0 = p * K + k0 - t0  # their sums: acc[q, a0 + k - k0]
            for k in range(k0, k1):
                for t in range(9):
                    for u in range(VL):
                        acc[q, a0 + k - k0, t, u] = 0
            for n in range(p * N // P, (p + 1) * N // P):
                for k in range(k0, k1):
                    if st == 1:
                        _plane_dw_3x3(xf, (n * C + k // Mult) * HW, H, W, pt, pl, dyf,
                                      (n * K + k) * OHW, OH, OW, acc[q, a0 + k - k0])
                    else:
                        _plane_dw_3x3s2(xf, (n * C + k // Mult) * HW, H, W, pt, pl, dyf,
                                        (n * K + k) * OHW, OH, OW, acc[q, a0 + k - k0])
            for k in range(k0, k1):
                _lane_sums(acc[q, a0 + k - k0], part[p, k])
                if not _finite(part[p, k]):
                    for t in range(9):
                        part[p, k, t] = 0
                    for n in range(p * N // P, (p + 1) * N // P):
                        _plane_dw_exact(xf, (n * C + k // Mult) * HW, H, W, pt, pl, dyf,
                                        (n * K + k) * OHW, OH, OW, st, part[p, k])
