"""Numba kernels for Winograd F(2x2, 5x5) convolution: forward (and dX, a forward pass of
the deltas) and dW.

This module holds only ``@njit`` kernels: no validation, no Python objects.  The transform
matrices are derived, and the wrappers check arguments, in
:mod:`fastconv.algorithms.winograd`.

Legend
------
``x, U, b, y``   input, transformed weights, bias, output
``dy, dw``       output deltas and the weight gradient
``N, C, K``      batch, input and output channels (``C`` a multiple of ``VL``, ``KP`` the
                 output channels padded to a multiple of ``KW``)
``OH, OW``       output size, both even; ``TH, TWn = OH/2, OW/2`` tiles of 2 x 2 outputs
``p = 6*xi + nu`` one of the 36 points of the 6 x 6 transform domain
``TT``           tiles per task of the forward kernel: one register tile of the product
``KW``           output channels per register tile of the forward product (two vectors)
``VL``           lanes of one vector of fp32 (zmm)
``TB``           tiles per block of the dW kernel
``DC``           input channels per register tile of the dW product
``NCH``          chunks of the forward's tasks, each with its own scratch
``FB``           filters per block of the weight transforms: one vector of fp32
``RUN``          values of each point of ``U`` a group of the filter transform writes
``TCH``          chunks of the weight transforms, each with its own scratch

The algorithm (one tile, one input channel c, one output channel k)
-----------------------------------------------------------------
A 2 x 2 output tile ``y`` reads a 6 x 6 input tile ``d``.  With the 6 x 6 input transform
``B^T``, the 6 x 5 filter transform ``G`` and the 2 x 6 output transform ``A^T``::

    y = A^T [ (G w G^T) (.) (B^T d B) ] A          ((.) elementwise, summed over c)

so each of the 36 points p is a matrix product over channels,
``M[p][tile, k] = sum_c V[p][tile, c] * U[p][c, k]``, with 36 multiplications per 4
outputs instead of 100.  ``U = G w G^T`` is computed once per call, in float64
(:func:`filter_transform`).

Derivation of dW.  Winograd's F(5, 2) from the same interpolation points computes the
5 x 5 correlation of a 6 x 6 input tile with a 2 x 2 "filter", and that is exactly one
tile's contribution to dW: ``dw[r, s] = sum_{i,j} d[i + r, j + s] * dy[i, j]``.  Its
transforms are those of F(2, 5) with the roles of ``A`` and ``G`` swapped (both are the
interpolation points' Vandermonde matrices; ``B`` depends on the points only)::

    dw = G^T [ sum_tiles (A dy A^T) (.) (B^T d B) ] G

so dW reuses the forward's input transform, sums products over all tiles (a long
reduction, unlike the forward's over ``C``), and transforms back once per call.
The wrapper scales the rows of ``B^T`` to small integers and divides ``G``'s rows by the
same factors, which leaves both formulas unchanged.

Points 0, 1, -1, 1/2, -2 and infinity keep the fp32 rounding error of F(2x2, 5x5) close
to the direct convolution's (see the tests).  The transforms' constants come in ``kc``,
an array of the data's dtype: a Python float literal would turn fp32 arithmetic into fp64.
"""

import numba
import numpy as np
from numba import prange

from .._jit import parallel_kernel, serial_kernel, stack_tile, transpose16

TT = 7
KW = 32
VL = 16
TB = 28
DC = 8
NCH = 32
FB = 16
RUN = 128
TCH = 8

_u = np.uint64


@numba.njit(inline="always")
def _bt6(d0, d1, d2, d3, d4, d5, kc):
    """The six rows of the scaled ``B^T`` applied to (d0, ..., d5); ``kc`` holds
    (1/2, 2, 3, 4, 5, 0) in the data's dtype."""
    c2, c3, c4, c5 = kc[1], kc[2], kc[3], kc[4]
    return (c2 * d0 - c3 * d1 - c4 * d2 + c3 * d3 + c2 * d4,
            -c2 * d1 + d2 + c5 * d3 + c2 * d4,
            -c2 * d1 + c5 * d2 - d3 - c2 * d4,
            c2 * d1 + d2 - c2 * d3 - d4,
            d1 - c2 * d2 - d3 + c2 * d4,
            c2 * d1 - c3 * d2 - c4 * d3 + c3 * d4 + c2 * d5)


@numba.njit(inline="always")
def _at6(m0, m1, m2, m3, m4, m5, kc):
    """The two rows of ``A^T`` applied to (m0, ..., m5)."""
    return m0 + m1 + m2 + m3 + m4, m1 - m2 + kc[0] * m3 - kc[1] * m4 + m5


@numba.njit(inline="always")
def _a6(e0, e1, kc):
    """The six rows of ``A`` applied to (e0, e1): the deltas' transform in dW."""
    return e0, e0 + e1, e0 - e1, e0 + kc[0] * e1, e0 - kc[1] * e1, e1


@numba.njit(inline="always")
def _a6_store(dt, nu, c, e0, e1, kc):
    """``dt[6*xi + nu, c] = (A (e0, e1))[xi]`` for the six xi."""
    z0, z1, z2, z3, z4, z5 = _a6(e0, e1, kc)
    dt[nu, c] = z0
    dt[6 + nu, c] = z1
    dt[12 + nu, c] = z2
    dt[18 + nu, c] = z3
    dt[24 + nu, c] = z4
    dt[30 + nu, c] = z5


@numba.njit(inline="always")
def _input_tile(xf, o, rstep, cstep, V, vo, kc, tmp, vt, n36):
    """``V[vo + p*VL + c] = (B^T d B)[p]`` for the 6 x 6 tile of ``VL`` channels whose
    element (i, j) is ``xf[o + i*rstep + j*cstep + c]``: rows first, then columns,
    through the stack tiles ``tmp`` and ``vt`` (36, VL), then one contiguous copy of
    ``n36 == 36*VL`` values (a bound LLVM cannot see: the copy vectorises, where 36 short
    rows would be unrolled into scalar moves)."""
    for i in range(6):
        oi = o + _u(i) * rstep
        for c in range(VL):
            cu = _u(c)
            u0, u1, u2, u3, u4, u5 = _bt6(
                xf[oi + cu], xf[oi + cstep + cu], xf[oi + _u(2) * cstep + cu],
                xf[oi + _u(3) * cstep + cu], xf[oi + _u(4) * cstep + cu],
                xf[oi + _u(5) * cstep + cu], kc)
            tmp[i * 6, c] = u0
            tmp[i * 6 + 1, c] = u1
            tmp[i * 6 + 2, c] = u2
            tmp[i * 6 + 3, c] = u3
            tmp[i * 6 + 4, c] = u4
            tmp[i * 6 + 5, c] = u5
    for nu in range(6):
        for c in range(VL):
            v0, v1, v2, v3, v4, v5 = _bt6(tmp[nu, c], tmp[6 + nu, c], tmp[12 + nu, c],
                                          tmp[18 + nu, c], tmp[24 + nu, c], tmp[30 + nu, c],
                                          kc)
            vt[nu, c] = v0
            vt[6 + nu, c] = v1
            vt[12 + nu, c] = v2
            vt[18 + nu, c] = v3
            vt[24 + nu, c] = v4
            vt[30 + nu, c] = v5
    vtf = vt.reshape(-1)
    for e in range(n36):
        V[vo + _u(e)] = vtf[e]


@serial_kernel
def _product(V, U, M, C, KP):
    """``M[p, t, k] = sum_c V[t, c // VL, p, c % VL] * U[p, c, k]`` for the 36 points and
    ``TT`` tiles: V (TT, C/VL, 36, VL), U (36, C, KP), M (36, TT, KP), all flat.

    The register tile is ``TT`` tiles x ``KW`` channels: ``TT`` broadcast values of V times
    two vectors of U, 14 packed FMAs per channel c.
    """
    acc = stack_tile(TT, KW, V.dtype)
    kw = min(KW, KP)  # == KW; a bound LLVM cannot see keeps the stores vectorised
    ts = _u(36 * C)  # from one tile to the next in V
    for p in range(36):
        for kb in range(KP // KW):
            ub = _u(p * C * KP + kb * KW)
            for t in range(TT):
                for k in range(KW):
                    acc[t, k] = 0
            for c in range(C):
                cu = _u(c)
                vo = _u((c // VL * 36 + p) * VL + c % VL)
                v0 = V[vo]
                v1 = V[vo + ts]
                v2 = V[vo + _u(2) * ts]
                v3 = V[vo + _u(3) * ts]
                v4 = V[vo + _u(4) * ts]
                v5 = V[vo + _u(5) * ts]
                v6 = V[vo + _u(6) * ts]
                uo = ub + cu * _u(KP)
                for k in range(KW):
                    uk = U[uo + _u(k)]
                    acc[0, k] += v0 * uk
                    acc[1, k] += v1 * uk
                    acc[2, k] += v2 * uk
                    acc[3, k] += v3 * uk
                    acc[4, k] += v4 * uk
                    acc[5, k] += v5 * uk
                    acc[6, k] += v6 * uk
            for t in range(TT):
                mo = _u((p * TT + t) * KP + kb * KW)
                for k in range(kw):
                    M[mo + _u(k)] = acc[t, k]


@parallel_kernel
def winograd_tiles(x, U, b, y, kc, pool_order, chk):
    """Winograd F(2x2, 5x5) correlation of a padded channels-last input.

    For ``i < OH = Hp - 4``, ``j < OW = Wp - 4`` and ``k < K``::

        y[n, k, i, j] = b[k] + sum_{r, s < 5, c} x[n, i + r, j + s, c] * w[k, c, r, s]

    x : (N, Hp, Wp, C)     channels-last, zero padded; ``C`` a multiple of ``VL``.
    U : (36, C, KP)        ``G w G^T`` per point, zero past ``K``; ``KP`` a multiple of
                           ``KW``.
    b : (KP,)              bias (zeros for none).
    kc : (6,)              transform constants (1/2, 2, 3, 4, 5, 0) in the data's dtype.
    y : (N, K, OH, OW)     NCHW; or with ``pool_order`` (N, K, 4, TH*TWn): pixel
                           (2a + i, 2q + j) of the 2 x 2 tile (a, q) in plane 2i + j at
                           a*TWn + q (see :mod:`fastconv.layouts`, "Pool order").
    chk : (NCH, VL)        overwritten: a sum of every output times zero, NaN if any output
                           is inf or NaN (the wrapper then runs the direct kernel).

    ``OH`` and ``OW`` are even and ``OW >= 2*TT``.  Each task is ``TT`` tiles of one tile
    row (the last task of a row shifted left to end at the row's end, recomputing a few
    tiles identically): input transform into ``V`` (36, TT, C), the 36 products
    (:func:`_product`) into ``M`` (36, TT, KP), the output transform of ``VL`` channels
    at a time into a stack tile, and whole rows of it stored.  The tasks are cut into
    chunks, each with its own scratch; each task owns its outputs.
    """
    N, Hp, Wp, C = x.shape
    KP = U.shape[2]
    K = y.shape[1]
    TH, TWn = (Hp - 4) // 2, (Wp - 4) // 2
    TG = -(-TWn // TT)
    ntask = N * TH * TG
    nch = min(ntask, NCH)
    xf = x.reshape(-1)
    rstep, cstep = _u(Wp * C), _u(C)
    n36 = min(36 * VL, C * 36)  # == 36*VL (see _input_tile)
    for ch in prange(nch):
        V = np.empty(36 * TT * C, x.dtype)
        M = np.empty(36 * TT * KP, x.dtype)
        tmp = stack_tile(36, VL, x.dtype)
        vt = stack_tile(36, VL, x.dtype)
        # 4 * TT outputs (plane-major) of VL channels: a row per output, so that the
        # transform, vectorised over channels, stores whole vectors (with the channels as
        # rows it stored through scatters: 1.07-1.11x on the whole kernel).
        ot = stack_tile(28, VL, x.dtype)
        ck = stack_tile(1, VL, x.dtype)
        for c in range(VL):
            ck[0, c] = 0
        for task in range(ch * ntask // nch, (ch + 1) * ntask // nch):
            tg = task % TG
            rest = task // TG
            a = rest % TH
            n = rest // TH
            q0 = min(tg * TT, TWn - TT)
            for t in range(TT):
                o = _u(((n * Hp + 2 * a) * Wp + 2 * (q0 + t)) * C)
                for cv in range(C // VL):
                    _input_tile(xf, o + _u(cv * VL), rstep, cstep, V,
                                _u((t * C // VL + cv) * 36 * VL), kc, tmp, vt, n36)
            _product(V, U.reshape(-1), M, C, KP)
            st = _u(TT * KP)
            for kv in range(-(-K // VL)):
                for t in range(TT):
                    for c in range(VL):
                        o = _u(t * KP + kv * VL + c)
                        a0, b0 = _at6(M[o], M[o + st], M[o + _u(2) * st], M[o + _u(3) * st],
                                      M[o + _u(4) * st], M[o + _u(5) * st], kc)
                        a1, b1 = _at6(M[o + _u(6) * st], M[o + _u(7) * st],
                                      M[o + _u(8) * st], M[o + _u(9) * st],
                                      M[o + _u(10) * st], M[o + _u(11) * st], kc)
                        a2, b2 = _at6(M[o + _u(12) * st], M[o + _u(13) * st],
                                      M[o + _u(14) * st], M[o + _u(15) * st],
                                      M[o + _u(16) * st], M[o + _u(17) * st], kc)
                        a3, b3 = _at6(M[o + _u(18) * st], M[o + _u(19) * st],
                                      M[o + _u(20) * st], M[o + _u(21) * st],
                                      M[o + _u(22) * st], M[o + _u(23) * st], kc)
                        a4, b4 = _at6(M[o + _u(24) * st], M[o + _u(25) * st],
                                      M[o + _u(26) * st], M[o + _u(27) * st],
                                      M[o + _u(28) * st], M[o + _u(29) * st], kc)
                        a5, b5 = _at6(M[o + _u(30) * st], M[o + _u(31) * st],
                                      M[o + _u(32) * st], M[o + _u(33) * st],
                                      M[o + _u(34) * st], M[o + _u(35) * st], kc)
                        y00, y10 = _at6(a0, a1, a2, a3, a4, a5, kc)
                        y01, y11 = _at6(b0, b1, b2, b3, b4, b5, kc)
                        bk = b[kv * VL + c]
                        ck[0, c] += (y00 + y01 + y10 + y11 + bk) * kc[5]
                        ot[t, c] = y00 + bk  # plane 2i + j, tile t
                        ot[TT + t, c] = y01 + bk
                        ot[2 * TT + t, c] = y10 + bk
                        ot[3 * TT + t, c] = y11 + bk
                for c in range(min(VL, K - kv * VL)):
                    k = kv * VL + c
                    if pool_order:
                        for d in range(4):
                            yrow = y[n, k, d, a * TWn + q0:a * TWn + q0 + TT]
                            for t in range(TT):
                                yrow[t] = ot[d * TT + t, c]
                    else:
                        for i in range(2):
                            yrow = y[n, k, 2 * a + i, 2 * q0:2 * q0 + 2 * TT]
                            for t in range(TT):
                                yrow[2 * t] = ot[2 * i * TT + t, c]
                                yrow[2 * t + 1] = ot[(2 * i + 1) * TT + t, c]
        for c in range(VL):
            chk[ch, c] = ck[0, c]


@serial_kernel
def _dw_product(V, D, acc_out, nt, C, KP):
    """``acc_out[c, p, k] += sum_{t < nt} V[t, c // VL, p, c % VL] * D[t, k // KW, p,
    k % KW]``: V (TB, C/VL, 36, VL), D (TB, KP/KW, 36, KW), acc_out (C, 36, KP), all flat.

    The register tile is ``DC`` channels c x ``KW`` channels k: ``DC`` broadcast values of
    V times two vectors of D per tile t, reduced over the block's tiles.
    """
    acc = stack_tile(DC, KW, V.dtype)
    kw = min(KW, KP)
    for p in range(36):
        for cb in range(C // DC):
            for kb in range(KP // KW):
                ab = _u((cb * DC * 36 + p) * KP + kb * KW)
                for i in range(DC):
                    for k in range(kw):
                        acc[i, k] = acc_out[ab + _u(i * 36 * KP + k)]
                vb = _u((cb * DC // VL * 36 + p) * VL + cb * DC % VL)
                db = _u((kb * 36 + p) * KW)
                for t in range(nt):
                    vo = vb + _u(t * 36 * C)
                    v0 = V[vo]
                    v1 = V[vo + _u(1)]
                    v2 = V[vo + _u(2)]
                    v3 = V[vo + _u(3)]
                    v4 = V[vo + _u(4)]
                    v5 = V[vo + _u(5)]
                    v6 = V[vo + _u(6)]
                    v7 = V[vo + _u(7)]
                    do = db + _u(t * 36 * KP)
                    for k in range(KW):
                        dk = D[do + _u(k)]
                        acc[0, k] += v0 * dk
                        acc[1, k] += v1 * dk
                        acc[2, k] += v2 * dk
                        acc[3, k] += v3 * dk
                        acc[4, k] += v4 * dk
                        acc[5, k] += v5 * dk
                        acc[6, k] += v6 * dk
                        acc[7, k] += v7 * dk
                for i in range(DC):
                    for k in range(kw):
                        acc_out[ab + _u(i * 36 * KP + k)] = acc[i, k]


@parallel_kernel
def winograd_dw(x, dy, top, left, part, kc):
    """The transform-domain weight gradient of F(2x2, 5x5), summed per chunk of tiles.

    For the 36 points p, every input channel c and every ``k < KP``::

        part[h, c, p, k] = sum over the tiles of chunk h of (B^T d B)[p] * (A dy A^T)[p]

    where ``d`` is the tile's 6 x 6 input of channel c and ``dy`` its 2 x 2 deltas of
    channel k; :func:`dw_transform` sums the chunks and applies ``G^T (.) G``.

    x : (N, Hp, Wp, C)     the forward's packed input (:func:`winograd_tiles`).
    dy : (N, Hd, Wd, KP)   channels-last deltas, ``dy[n, top + i, left + j, k]`` for
                           ``i < OH = Hp - 4``, ``j < OW = Wp - 4``; ``KP`` a multiple of
                           ``KW``.
    part : (P, C, 36, KP)  one sum per chunk, overwritten; channel-major, so that the
                           back-transform reads each channel's 36 points in one run.
    kc : (6,)              transform constants, as for :func:`winograd_tiles`.

    The ``N*TH*TWn`` tiles are cut into ``P`` chunks of consecutive tiles (a number chosen
    from the shapes only, so the sums do not depend on the thread count); each chunk
    transforms blocks of ``TB`` tiles into ``V`` and ``D`` and adds their products into its
    own ``part[h]`` (:func:`_dw_product`).
    """
    N, Hp, Wp, C = x.shape
    KP = dy.shape[3]
    Hd, Wd = dy.shape[1], dy.shape[2]
    TH, TWn = (Hp - 4) // 2, (Wp - 4) // 2
    P = part.shape[0]
    ntile = N * TH * TWn
    xf = x.reshape(-1)
    dyf = dy.reshape(-1)
    rstep, cstep = _u(Wp * C), _u(C)
    kw = min(KW, KP)  # == KW, a bound LLVM cannot see: the copy below vectorises
    n36 = min(36 * VL, C * 36)  # == 36*VL (see _input_tile)
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
                g = g0 + t
                q = g % TWn
                rest = g // TWn
                a = rest % TH
                n = rest // TH
                o = _u(((n * Hp + 2 * a) * Wp + 2 * q) * C)
                for cv in range(C // VL):
                    _input_tile(xf, o + _u(cv * VL), rstep, cstep, V,
                                _u((t * C // VL + cv) * 36 * VL), kc, tmp, vt, n36)
                # The deltas' transform A dy A^T: columns, then rows.
                r0 = _u(((n * Hd + top + 2 * a) * Wd + left + 2 * q) * KP)
                r1 = r0 + _u(Wd * KP)
                for kb in range(KP // KW):
                    for hv in range(KW // VL):
                        for c in range(VL):
                            ku = _u(kb * KW + hv * VL + c)
                            cc = hv * VL + c
                            e0, e1, e2, e3, e4, e5 = _a6(dyf[r0 + ku], dyf[r0 + _u(KP) + ku],
                                                         kc)
                            f0, f1, f2, f3, f4, f5 = _a6(dyf[r1 + ku], dyf[r1 + _u(KP) + ku],
                                                         kc)
                            _a6_store(dt, 0, cc, e0, f0, kc)
                            _a6_store(dt, 1, cc, e1, f1, kc)
                            _a6_store(dt, 2, cc, e2, f2, kc)
                            _a6_store(dt, 3, cc, e3, f3, kc)
                            _a6_store(dt, 4, cc, e4, f4, kc)
                            _a6_store(dt, 5, cc, e5, f5, kc)
                    # One contiguous block of D: a copy loop long enough to vectorise.
                    do = _u((t * (KP // KW) + kb) * 36 * KW)
                    for e in range(36 * kw):
                        D[do + _u(e)] = dtf[e]
            _dw_product(V, D, acc_out, nt, C, KP)


@numba.njit(inline="always")
def _v6(w0, w1, w2, w3, w4):
    """The six rows of the unscaled filter transform ``V`` applied to (w0, ..., w4), in
    float64: ``V`` is the points' Vandermonde matrix (0, 1, -1, 1/2, -2, then infinity)
    and ``G = diag(1/scale) V``.  Rows 1 and 2 share the even and odd sums, rows 3 and 4
    are Horner's scheme: 13 operations instead of 30 for the matrix product."""
    e = w0 + w2 + w4
    o = w1 + w3
    h = (((w4 * 0.5 + w3) * 0.5 + w2) * 0.5 + w1) * 0.5 + w0
    m = (((w4 * -2.0 + w3) * -2.0 + w2) * -2.0 + w1) * -2.0 + w0
    return w0, e + o, e - o, h, m, w4


@numba.njit(inline="always")
def _v6_3(w0, w1, w2):
    """:func:`_v6` for a 3-tap filter (F(4, 3), the 3x3 path): the first three columns of
    the same Vandermonde rows, the point at infinity taking the last tap; 7 operations
    instead of 18."""
    e = w0 + w2
    h = (w2 * 0.5 + w1) * 0.5 + w0
    m = (w2 * -2.0 + w1) * -2.0 + w0
    return w0, e + w1, e - w1, h, m, w2


@numba.njit(inline="always")
def _v_taps(a, o, step, j, taps):
    """``V`` (:func:`_v6`, or :func:`_v6_3` for ``taps == 3``) applied to the ``taps``
    values ``a[o + s*step, j]``, ``s < taps``, in float64.  ``taps`` is a compile-time
    constant: each kernel that calls this is compiled for one filter size."""
    if taps == 3:
        return _v6_3(np.float64(a[o, j]), np.float64(a[o + step, j]),
                     np.float64(a[o + 2 * step, j]))
    return _v6(np.float64(a[o, j]), np.float64(a[o + step, j]),
               np.float64(a[o + 2 * step, j]), np.float64(a[o + 3 * step, j]),
               np.float64(a[o + 4 * step, j]))


@numba.njit(inline="always")
def _transpose_block(wf, ob, sj, wtf, flip, ne):
    """The ``ne`` elements of ``FB`` filters, filter ``j`` from ``wf[ob + j*sj]``, into
    the rows of the stack tile ``wtf`` (flat, ``max(ne, FB)`` rows of ``FB``), in
    registers (:func:`transpose16`); returns the row of element 0.

    A window of 16 elements per filter, and for ``ne > 16`` a second one ending at the
    filter's end (elements ``ne - 16 .. 15`` twice); rotated (``flip``), element ``e``
    goes to row ``max(ne, FB) - 1 - e``, so element ``e`` of the rotated filter is at
    row ``max(ne, FB) - ne + e``.  The windows read ``wf[ob + j*sj + e]`` for
    ``e < max(ne, FB)``: the caller keeps them inside ``wf``."""
    top = max(ne, FB) - 1
    if flip:
        transpose16(wf, ob, sj, wtf, top * FB, -FB)
    else:
        transpose16(wf, ob, sj, wtf, 0, FB)
    if ne > FB:
        e0 = ne - FB
        if flip:
            transpose16(wf, ob + e0, sj, wtf, (top - e0) * FB, -FB)
        else:
            transpose16(wf, ob + e0, sj, wtf, e0 * FB, FB)
    return top + 1 - ne if flip else 0


@serial_kernel
def _filter_groups(w, flip, gs, U, sc, g0, g1, taps):
    """The rows ``U[:, i, :]`` of the groups ``g0 <= g < g1`` of ``GI = max(1, RUN // KP)``
    consecutive input channels ``i`` (see :func:`filter_transform`), for filters of
    ``taps`` x ``taps`` (a constant at the call: compiled once for 5 and once for 3).

    Each block of ``FB`` filters is transposed into the stack tile ``wt`` (25, FB), in
    registers (:func:`_transpose_block`; a partial block, or one whose window would read
    past ``w``'s end, one value at a time), so that the transforms run on vectors of
    ``FB`` filters: ``V`` along the rows into ``t`` (6*taps, FB), then along the
    columns, times ``gs``, rounded into ``sc`` (36, GI, KP), the group's share of every
    point.  ``sc`` then goes to ``U`` as 36 runs of ``GI*KP`` values: written straight
    from the blocks, each block's 36 rows of ``FB`` values would land in the same cache
    set (the points are a multiple of 4 KiB apart), 3x slower here.
    """
    K, C = w.shape[0], w.shape[1]
    CP, KP = U.shape[1], U.shape[2]
    ne = taps * taps
    NI, NJ = (K, C) if flip else (C, K)
    si, sj = (C * ne, ne) if flip else (ne, C * ne)
    wf = w.reshape(-1)
    Uf = U.reshape(-1)
    last = wf.size - (FB - 1) * sj - max(ne, FB)  # the last block start a window may read
    gi_n = max(1, RUN // KP)
    ps = _u(gi_n * KP)  # from one point to the next in sc
    wt = stack_tile(25, FB, w.dtype)
    wtf = wt.reshape(-1)
    t = stack_tile(30, FB, np.float64)
    for g in range(g0, g1):
        i0 = g * gi_n
        gn = min(gi_n, CP - i0)
        for gi in range(gn):
            i = i0 + gi
            for jb in range(0, KP, FB):
                so = _u(gi * KP + jb)
                if i >= NI or jb >= NJ:
                    for p in range(36):
                        for j in range(FB):
                            sc[so + _u(p) * ps + _u(j)] = 0
                    continue
                nj = min(FB, NJ - jb)
                ob = i * si + jb * sj
                o = _u(ob)
                wb = 0  # wt's row of element 0 of the (rotated) filters
                if nj == FB and ob <= last:
                    wb = _transpose_block(wf, ob, sj, wtf, flip, ne)
                else:
                    for j in range(nj):
                        oj = o + _u(j) * _u(sj)
                        for e in range(ne):
                            wt[e, j] = wf[oj + _u(ne - 1 - e if flip else e)]
                    for j in range(nj, FB):
                        for e in range(ne):
                            wt[e, j] = 0
                for r in range(taps):
                    for j in range(FB):
                        a0, a1, a2, a3, a4, a5 = _v_taps(wt, wb + taps * r, 1, j, taps)
                        t[6 * r, j] = a0
                        t[6 * r + 1, j] = a1
                        t[6 * r + 2, j] = a2
                        t[6 * r + 3, j] = a3
                        t[6 * r + 4, j] = a4
                        t[6 * r + 5, j] = a5
                for nu in range(6):
                    s0, s1, s2 = gs[nu], gs[6 + nu], gs[12 + nu]
                    s3, s4, s5 = gs[18 + nu], gs[24 + nu], gs[30 + nu]
                    for j in range(FB):
                        b0, b1, b2, b3, b4, b5 = _v_taps(t, nu, 6, j, taps)
                        sjo = so + _u(j)
                        sc[sjo + _u(nu) * ps] = b0 * s0
                        sc[sjo + _u(6 + nu) * ps] = b1 * s1
                        sc[sjo + _u(12 + nu) * ps] = b2 * s2
                        sc[sjo + _u(18 + nu) * ps] = b3 * s3
                        sc[sjo + _u(24 + nu) * ps] = b4 * s4
                        sc[sjo + _u(30 + nu) * ps] = b5 * s5
        n = gn * KP
        for p in range(36):
            uo = _u((p * CP + i0) * KP)
            so = _u(p) * ps
            for e in range(n):
                Uf[uo + _u(e)] = sc[so + _u(e)]


@parallel_kernel
def filter_transform(w, flip, gs, U):
    """``U[6*xi + nu, i, j] = (G f G^T)[xi, nu]`` for the filters ``f`` of ``w``, in
    float64 and rounded once to ``U``'s dtype; zero for ``i >= NI`` or ``j >= NJ``.

    w : (K, C, R, R)        ``R`` 5 (F(2, 5), ``G`` 6 x 5) or 3 (F(4, 3), ``G`` 6 x 3);
                            float32 or float64, C-contiguous, read as it is.  Without
                            ``flip`` the filter of (i, j) is ``w[j, i]`` (``NI, NJ = C,
                            K``: the forward pass); with ``flip`` it is ``w[i, j]`` rotated
                            by 180 degrees (``NI, NJ = K, C``: dX, channel roles swapped).
    gs : (36,) float64      ``1 / (scale[xi] * scale[nu])`` at ``6*xi + nu``: ``G f G^T`` is
                            ``gs * (V f V^T)`` (:func:`_v6`, :func:`_v6_3`); both sizes
                            share the points, so ``scale`` and ``gs``.
    U : (36, CP, KP)        overwritten; ``CP >= NI``, ``KP >= NJ`` a multiple of ``FB``.

    The ``CP`` rows are cut into groups of ``GI = max(1, RUN // KP)``, and the groups
    into at most ``TCH`` chunks, each with its own scratch (36, GI, KP)
    (:func:`_filter_groups`, compiled for each filter size); each chunk writes its own
    rows of ``U``.
    """
    CP, KP = U.shape[1], U.shape[2]
    gi_n = max(1, RUN // KP)
    ngroup = -(-CP // gi_n)
    nch = min(TCH, ngroup)
    for ch in prange(nch):
        sc = np.empty(36 * gi_n * KP, U.dtype)
        g0, g1 = ch * ngroup // nch, (ch + 1) * ngroup // nch
        if w.shape[2] == 3:
            _filter_groups(w, flip, gs, U, sc, g0, g1, 3)
        else:
            _filter_groups(w, flip, gs, U, sc, g0, g1, 5)


@numba.njit(inline="always")
def _vt5(u0, u1, u2, u3, u4, u5):
    """The five rows of ``V^T`` (see :func:`_v6`) applied to (u0, ..., u5), in float64:
    14 operations instead of 25."""
    p = u1 + u2
    m = u1 - u2
    return (u0 + p + u3 + u4, m + u3 * 0.5 - u4 * 2.0, p + u3 * 0.25 + u4 * 4.0,
            m + u3 * 0.125 - u4 * 8.0, p + u3 * 0.0625 + u4 * 16.0 + u5)


@numba.njit(inline="always")
def _vt3(u0, u1, u2, u3, u4, u5):
    """The three rows of ``V^T`` for 3 taps (see :func:`_v6_3`) applied to (u0, ..., u5),
    in float64."""
    p = u1 + u2
    return u0 + p + u3 + u4, u1 - u2 + u3 * 0.5 - u4 * 2.0, p + u3 * 0.25 + u4 * 4.0 + u5


@serial_kernel
def _dw_blocks(part, gs, kc, dw, chk, ch, b0, b1):
    """The blocks ``b0 <= b < b1`` of :func:`dw_transform`, block ``b`` being the ``FB``
    output channels from ``b % nkb * FB`` of input channel ``b // nkb``; ``chk[ch]`` the
    sum of their outputs times zero.

    The chunk sums go into the stack tile ``S`` (36, FB), ``V^T`` along ``xi`` (times
    ``gs``) into ``t`` (6 * taps, FB), along ``nu`` into ``out`` (taps * taps, FB) in
    ``dw``'s dtype.  For 5 taps a whole block is transposed in registers into its 16
    filters (:func:`transpose16`), a partial one written a value at a time; the 9 values
    of a 3-tap filter are written a value at a time (9 of 16 rows would not fill a
    transpose).
    """
    P, CP, _, KP = part.shape
    K, C, taps = dw.shape[0], dw.shape[1], dw.shape[2]
    T2 = taps * taps
    nkb = -(-K // FB)
    partf = part.reshape(-1)
    dwf = dw.reshape(-1)
    hs = _u(CP * 36 * KP)  # from one chunk to the next
    jn = min(FB, KP)  # == FB; a bound LLVM cannot see keeps the loops vectorised
    z = kc[5]
    S = stack_tile(36, FB, np.float64)
    t = stack_tile(30, FB, np.float64)
    out = stack_tile(25, FB, dw.dtype)
    outf = out.reshape(-1)
    ck = stack_tile(1, FB, dw.dtype)
    for j in range(FB):
        ck[0, j] = z
    for b in range(b0, b1):
        c = b // nkb
        kb = b % nkb * FB
        for p in range(36):
            po = _u((c * 36 + p) * KP + kb)
            for j in range(jn):
                S[p, j] = np.float64(partf[po + _u(j)])
            for h in range(1, P):
                ph = po + _u(h) * hs
                for j in range(jn):
                    S[p, j] += np.float64(partf[ph + _u(j)])
        if taps == 5:
            for nu in range(6):
                s0, s1, s2 = gs[nu], gs[6 + nu], gs[12 + nu]
                s3, s4, s5 = gs[18 + nu], gs[24 + nu], gs[30 + nu]
                for j in range(FB):
                    a0, a1, a2, a3, a4 = _vt5(S[nu, j] * s0, S[6 + nu, j] * s1,
                                              S[12 + nu, j] * s2, S[18 + nu, j] * s3,
                                              S[24 + nu, j] * s4, S[30 + nu, j] * s5)
                    t[nu, j] = a0
                    t[6 + nu, j] = a1
                    t[12 + nu, j] = a2
                    t[18 + nu, j] = a3
                    t[24 + nu, j] = a4
            for r in range(5):
                for j in range(FB):
                    q0, q1, q2, q3, q4 = _vt5(t[6 * r, j], t[6 * r + 1, j], t[6 * r + 2, j],
                                              t[6 * r + 3, j], t[6 * r + 4, j],
                                              t[6 * r + 5, j])
                    out[5 * r, j] = q0
                    out[5 * r + 1, j] = q1
                    out[5 * r + 2, j] = q2
                    out[5 * r + 3, j] = q3
                    out[5 * r + 4, j] = q4
        else:
            for nu in range(6):
                s0, s1, s2 = gs[nu], gs[6 + nu], gs[12 + nu]
                s3, s4, s5 = gs[18 + nu], gs[24 + nu], gs[30 + nu]
                for j in range(FB):
                    a0, a1, a2 = _vt3(S[nu, j] * s0, S[6 + nu, j] * s1, S[12 + nu, j] * s2,
                                      S[18 + nu, j] * s3, S[24 + nu, j] * s4,
                                      S[30 + nu, j] * s5)
                    t[nu, j] = a0
                    t[6 + nu, j] = a1
                    t[12 + nu, j] = a2
            for r in range(3):
                for j in range(FB):
                    q0, q1, q2 = _vt3(t[6 * r, j], t[6 * r + 1, j], t[6 * r + 2, j],
                                      t[6 * r + 3, j], t[6 * r + 4, j], t[6 * r + 5, j])
                    out[3 * r, j] = q0
                    out[3 * r + 1, j] = q1
                    out[3 * r + 2, j] = q2
        for j in range(jn):
            a = ck[0, j]
            for e in range(T2):
                a += out[e, j] * z
            ck[0, j] = a
        if taps == 5 and kb + FB <= K:
            # Rows 0-15 and 9-24 of out, each to 16 filters (values 9-15 twice).
            o = (kb * C + c) * 25
            transpose16(outf, 0, FB, dwf, o, C * 25)
            transpose16(outf, 9 * FB, FB, dwf, o + 9, C * 25)
        else:
            for j in range(min(FB, K - kb)):
                o = _u(((kb + j) * C + c) * T2)
                for e in range(T2):
                    dwf[o + _u(e)] = out[e, j]
    for j in range(FB):
        chk[ch, j] = ck[0, j]


@parallel_kernel
def dw_transform(part, gs, kc, dw, chk):
    """``dw[k, c] = G^T S[c, k] G`` with ``S`` the chunk sums of :func:`winograd_dw` (or of
    F(4x4, 3x3)'s ``winograd43_dw``) added in float64, ``S[c, p, k] = sum_h part[h, c, p,
    k]``; computed in float64 and rounded once to ``dw``'s dtype.  ``G`` is 6 x 5 or 6 x 3
    (the points' Vandermonde matrix for ``taps`` coefficients, divided by the scales).

    part : (P, CP, 36, KP)   chunk sums; ``KP`` a multiple of ``FB``.
    gs : (36,) float64       scale products, as for :func:`filter_transform`: ``G^T S G``
                             is ``V^T (gs * S) V``.
    kc : (6,)                transform constants in ``dw``'s dtype (``kc[5]`` is zero).
    dw : (K, C, taps, taps)  overwritten; ``taps`` 5 or 3, ``K <= KP``, ``C <= CP``.
    chk : (TCH, FB)          overwritten: sums of every output times zero, NaN if any
                             output is inf or NaN (the wrapper then returns None).

    The ``C * ceil(K / FB)`` blocks of ``FB`` output channels are cut into at most ``TCH``
    chunks of consecutive blocks (:func:`_dw_blocks`); each writes its own filters and its
    own row of ``chk``.
    """
    K, C = dw.shape[0], dw.shape[1]
    nblock = C * -(-K // FB)
    nch = min(TCH, nblock)
    for ch in prange(nch):
        _dw_blocks(part, gs, kc, dw, chk, ch, ch * nblock // nch, (ch + 1) * nblock // nch)
