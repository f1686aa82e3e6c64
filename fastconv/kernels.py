"""Numba kernels shared by the algorithms and the layers: the layout kernels (channels-last
packing, shifted planes), the bias gradient, pooling, ReLU, the matrix product of the
Linear layers and the fused SGD update, and the task decoding of the dW kernels.

The convolution kernels live with their algorithms in :mod:`fastconv.algorithms` (the
channel tile, the pixel kernels, the NCHW-delta dW, the serial kernels, Winograd's
:mod:`fastconv.algorithms.winograd_kernels`).  Like those, this module holds only
``@njit`` kernels: no validation, no Python objects, no allocation of outputs; the
wrappers check arguments, choose the layouts, allocate, and call these
(docs/memory-safety.md).  Numba options come
from :mod:`fastconv._jit`.

Legend
------
``x, w, b``      input, weight, bias           ``N``       batch
``y``            output                        ``C, K``    input / output channels
``dy``           output deltas (grad_output)   ``G``       groups; ``Cg = C/G``, ``Kg = K/G``
``dx, dw``       gradients of ``x`` and ``w``  ``H, W``    input height / width
``R, S``         kernel height / width         ``OH, OW``  output height / width
``sh, sw``       strides                       ``dlh, dlw`` dilations
``CL``           channels per pass of the channels-last packer (one 64-byte line of fp32)
``MR, MC``       rows x columns per register tile of the matrix product (Linear layers)
"""

import numba
import numpy as np
from numba import prange

from ._jit import copy_run, parallel_kernel, split_run, stack_tile, transpose16

CL = 16
MR = 6
MC = 64


@parallel_kernel
def pack_channels_last(src, dst, pt, pl, G, CgP):
    """Copy NCHW ``src`` into the padded, channels-last ``dst``, zero everywhere else.

    ``dst[n, pt + h, pl + w, g*CgP + c] = src[n, g*Cg + c, h, w]`` for ``c < Cg = C/G``;
    every other element of ``dst`` (the border rows and columns, and the ``CgP - Cg`` zero
    channels at the end of every group) is set to zero, so ``dst`` may come uninitialised.

    src : (N, C, H, W), C-contiguous.    dst : (N, Hd, Wd, G*CgP), C-contiguous.

    Parallel over the rows ``(n, hd)`` of ``dst``.  Blocks of 16 channels x 16 pixels are
    transposed in registers (:func:`fastconv._jit.transpose16`: 16 row loads, 16 row
    stores), the last block of a row shifted back to end at ``W`` (it copies some pixels
    again, within the task); rows narrower than 16 pixels and the channels past the last
    whole block go one value at a time, ``CL`` channels of a pixel in step so that each
    pixel's values fill a cache line of ``dst``.
    """
    N, C, H, W = src.shape
    Hd, Wd, CD = dst.shape[1], dst.shape[2], dst.shape[3]
    Cg = C // G
    sf = src.reshape(-1)
    df = dst.reshape(-1)
    for task in prange(N * Hd):
        n = task // Hd
        h = task % Hd - pt
        drow = (n * Hd + h + pt) * Wd * CD
        if h < 0 or h >= H:
            for e in range(Wd * CD):
                df[drow + e] = 0
            continue
        for e in range(pl * CD):
            df[drow + e] = 0
        for e in range((pl + W) * CD, Wd * CD):
            df[drow + e] = 0
        drow += pl * CD
        for g in range(G):
            if CgP > Cg:
                for j in range(W):
                    for u in range(Cg, CgP):
                        df[drow + j * CD + g * CgP + u] = 0
            c = 0
            if W >= 16:
                while c + 16 <= Cg:
                    so = ((n * C + g * Cg + c) * H + h) * W
                    for jb in range((W + 15) // 16):
                        j0 = min(16 * jb, W - 16)
                        transpose16(sf, so + j0, H * W, df, drow + j0 * CD + g * CgP + c, CD)
                    c += 16
            while c + CL <= Cg:
                for j in range(W):
                    for u in range(CL):
                        dst[n, pt + h, pl + j, g * CgP + c + u] = src[n, g * Cg + c + u, h, j]
                c += CL
            for u in range(c, Cg):
                for j in range(W):
                    dst[n, pt + h, pl + j, g * CgP + u] = src[n, g * Cg + u, h, j]


@parallel_kernel
def shifted_planes(src, W, dst, pt, pl, sw, qoff, Hh):
    """The input of a stride-1 layer as the pixel kernels read it (``layouts._pixel_input``,
    and ``layouts._pool_order_input``).

    ``dst[n, c, s, h, j] = x[n, c, h - pt, j*sw + qoff[s] - pl]`` where that is inside the
    input ``x``, else zero: for every filter column ``s`` (column offset ``qoff[s]``), the
    columns it reads for output columns ``j < OW``, in every row of the input padded by
    ``pt`` above.  With ``Hh > 0`` the rows come split by parity instead: ``dst`` row ``h``
    holds padded row ``2*(h % Hh) + h // Hh`` (the even rows, then the odd ones).

    src : (N, C, H*W)      the input ``x``, C-contiguous, each plane flattened.
    dst : (N, C, S, Hp, OW), every element written.

    One task per output plane ``(n, c, s)``: an RGB image's layout is 21 tasks for the
    7x7 stem, where one per input plane gave the two cores 2 and 1.
    """
    N, C = src.shape[:2]
    H = src.shape[2] // W
    S, Hp, OW = dst.shape[2:]
    flat = sw == 1 and Hh == 0 and OW == W  # rows as wide as the input's: see below
    for task in prange(N * C * S):
        s = task % S
        c = (task // S) % C
        n = task // (S * C)
        xs = src[n, c]
        # Output columns [j0, j1) read input columns j*sw + qoff[s] - pl inside [0, W).
        q = qoff[s]
        if flat and abs(q - pl) < W:
            _shifted_plane_flat(xs, dst[n, c, s].reshape(Hp * W), H, W, pt, q - pl)
            continue
        j0, j1 = _row_span(W, OW, pl - q, sw)
        for h in range(Hp):
            # padded row 2*(h % Hh) + h // Hh, without dividing
            ih = (h if Hh == 0 else 2 * h if h < Hh else 2 * (h - Hh) + 1) - pt
            _shifted_row(dst[n, c, s, h], xs, ih, H, W, j0, j1, j0 * sw + q - pl, sw)


@numba.njit(inline="always")
def _row_span(W, OW, dl, sw):
    """The output columns ``[j0, j1)`` whose input column ``j*sw - dl`` lies in ``[0,
    W)``, for ``j < OW``."""
    j0 = min(OW, max(0, (dl + sw - 1) // sw))
    return j0, max(j0, min(OW, (W - 1 + dl) // sw + 1))


@numba.njit(inline="always")
def _shifted_row(drow, xs, ih, H, W, j0, j1, u0, sw):
    """``drow[j] = xs[ih*W + u0 + (j - j0)*sw]`` for ``j`` in ``[j0, j1)``, zero for the
    other ``j < drow.size`` and for the whole row if input row ``ih`` lies outside ``[0,
    H)``: one row of a plane as the pixel kernels read it."""
    OW = drow.shape[0]
    if ih < 0 or ih >= H:
        for j in range(OW):
            drow[j] = 0
        return
    for j in range(j0):
        drow[j] = 0
    for j in range(j1, OW):
        drow[j] = 0
    b = np.uint64(ih * W + u0)
    if sw == 1:
        # Unsigned indices: no negative-index wraparound, so this vectorises (about 4x
        # faster than the general loop below).
        for j in range(np.uint64(0), np.uint64(j1 - j0)):
            drow[np.uint64(j0) + j] = xs[b + j]
    else:
        usw = np.uint64(sw)
        for j in range(np.uint64(0), np.uint64(j1 - j0)):
            drow[np.uint64(j0) + j] = xs[b + j * usw]


@parallel_kernel
def phase_grid(src, W, dst, pt, pl):
    """The input split into stride phases (``layouts._phase_grid``).

    ``dst[n, c, p, q, v, u] = x[n, c, v*sh + p - pt, u*sw + q - pl]`` where that is inside
    the input ``x``, else zero.

    src : (N, C, H*W)               the input ``x``, C-contiguous, each plane flattened.
    dst : (N, C, sh, sw, Hr, Wq)    every element written.

    One task per plane ``(n, c)`` (:func:`_phase_fill`).
    """
    N, C = src.shape[:2]
    for task in prange(N * C):
        n = task // C
        c = task % C
        _phase_fill(src[n, c], W, dst[n, c], pt, pl, False)


@numba.njit(inline="always")
def _finite(a) -> bool:
    """Whether the 1-D array ``a`` holds no inf or NaN (``v*0`` is NaN for those only):
    one vectorised pass, for the kernels whose zero operands must not meet one."""
    z = a.dtype.type(0)
    for v in range(a.shape[0]):
        z += a[v] * 0
    return z == 0


@numba.njit(inline="always")
def _zeroed(a):
    """``a`` (any C-contiguous shape), zeroed, as one flat array: a run's scratch, zeroed
    once before its tasks."""
    flat = a.reshape(a.size)
    for u in range(flat.size):
        flat[u] = 0
    return flat


@numba.njit(inline="always")
def _phase_fill(xs, W, dst, pt, pl, zeroed):
    """One plane ``xs`` (H*W,) into its stride phases ``dst`` (sh, sw, Hr, Wq),
    C-contiguous: ``dst[p, q, v, u] = x[v*sh + p - pt, u*sw + q - pl]`` inside the plane,
    else zero.

    ``dst`` is zeroed in one run, then each input row goes to its phase rows.  With
    ``zeroed`` the caller promises that the elements no input row reaches are zero already
    (a scratch zeroed once and filled only with planes of this shape: the same elements
    are padding in every one), and the zeroing is skipped: it took half of the layout of
    a 14 x 14 plane (32 groups of 8 channels, batch 16: 0.29 -> 0.16 ms).  Rows are
    short (14-28 pixels in the layers this serves), too short for a vector loop with a
    scalar remainder, so they are copied as masked vectors (:func:`fastconv._jit.copy_run`;
    at ``sw == 2`` :func:`fastconv._jit.split_run`, the even and odd columns split by two
    shuffles): a ResNeXt stride-2 layer's input (16 x 256 x 28 x 28) in 0.6 ms, against
    2.0 ms for fixed blocks of scalar copies (a strided loop per phase compiles to gathers,
    slower still)."""
    H = xs.shape[0] // W
    sh, sw, Hr, Wq = dst.shape
    flat = dst.reshape(dst.size) if zeroed else _zeroed(dst)
    # Padded row ih + pt is row v of row phase p, stepped row by row: two integer divisions
    # a row took 3.7x as long as the copies of a 14 x 14 plane.
    p = pt % sh
    v = pt // sh
    for ih in range(H):
        s0 = ih * W
        if sw == 1:
            copy_run(flat, (p * Hr + v) * Wq + pl, xs, s0, W)
        elif sw == 2:
            # input column 2u to phase pl % 2 at u + pl // 2, column 2u + 1 to phase
            # (pl + 1) % 2 at u + (pl + 1) // 2
            split_run(flat, ((p * 2 + pl % 2) * Hr + v) * Wq + pl // 2,
                      ((p * 2 + (pl + 1) % 2) * Hr + v) * Wq + (pl + 1) // 2, xs, s0, W)
        else:
            for q in range(sw):
                # Phase columns [u0, u1) read input columns u*sw + q - pl in [0, W).
                u0 = min(Wq, max(0, (pl - q + sw - 1) // sw))
                u1 = max(u0, min(Wq, (W - 1 + pl - q) // sw + 1))
                j0 = u0 * sw + q - pl
                drow = dst[p, q, v]
                usw = np.uint64(sw)
                for u in range(np.uint64(0), np.uint64(u1 - u0)):
                    drow[np.uint64(u0) + u] = xs[np.uint64(s0 + j0) + u * usw]
        p += 1
        if p == sh:
            p = 0
            v += 1


@numba.njit(inline="always")
def _shifted_plane_flat(xs, d, H, W, pt, dl):
    """One plane of :func:`shifted_planes` for stride 1 and rows as wide as the input's
    (``OW == W``): ``d[(h + pt)*W + j] = xs[h*W + j + dl]`` where ``0 <= j + dl < W``, zero
    elsewhere and in the padding rows; ``|dl| < W``.  The rows are copied as one run of
    ``H*W`` inputs, which vectorises, and the ``|dl|`` columns that the run carried over
    from the neighbouring rows are zeroed after; row by row, copies of 28 inputs fell to
    the vectoriser's scalar remainder (MNIST conv1's five planes: 0.029 -> 0.016 ms)."""
    M = H * W
    u0 = np.uint64(pt * W)
    for m in range(np.uint64(0), u0):
        d[m] = 0
    for m in range(u0 + np.uint64(M), np.uint64(d.size)):
        d[m] = 0
    lo = max(0, -dl)  # the run: d[u0 + m] = xs[m + dl] for m in [lo, hi)
    hi = min(M, M - dl)
    ub = np.uint64(lo + dl)
    ua = u0 + np.uint64(lo)
    for m in range(np.uint64(0), np.uint64(hi - lo)):
        d[ua + m] = xs[ub + m]
    # The columns [c0, c0 + |dl|) of every row read outside the input: carried over from
    # the neighbouring rows by the run, or (the first row's left, the last row's right)
    # not written by it at all.
    c0 = W - dl if dl > 0 else 0
    for h in range(H):
        for j in range(c0, c0 + abs(dl)):
            d[u0 + np.uint64(h * W + j)] = 0


# dW, derived once
# ----------------
# y[n,k,i,j] = b[k] + sum_{c,r,s} x[n, c, i*sh + r*dlh - ph, j*sw + s*dlw - pw] * w[k,c,r,s],
# so  dL/dw[k,c,r,s] = sum_{n,i,j} dy[n,k,i,j] * x[n, c, i*sh + r*dlh - ph, j*sw + s*dlw - pw]:
# every weight is shared by all output positions and collects the sum over all of them.
# That is the correlation of the (padded) input with the deltas.  db[k] = sum_{n,i,j} dy.
#
# For a fixed filter row r, the pair (s, c) only moves the read by a constant offset
# s*dlw*C + c inside the padded input row, so the kernel flattens (s, c) into "columns" with
# a table of offsets and tiles TC columns x KBW output channels.  Each step is two vectors
# of deltas times TC broadcast inputs.  With few channels (S*C of a row fills a tile badly:
# 5 of 8 columns for conv1) the wrapper folds the filter rows into the columns as well,
# offset r*dlh*Wp*C + s*dlw*C + c, and runs the kernel with a single "row".
#
# The batch is cut into chunks whose deltas fit in a core's L2 cache; each chunk computes
# every tile over its own samples into its own buffer, and the wrapper adds the buffers up
# serially.  Without chunks every tile streamed all the deltas from L3 again (~150 GF/s on
# MNIST conv2, ~280 with them).  The chunking depends only on the shapes, never on the
# thread count, so results are identical for any number of threads.


@numba.njit(inline="always")
def _chunk_task(task, NT, N, P):
    """Decode a task of the dW kernels, (batch chunk, tile) pairs with ``NT`` tiles per
    chunk, into (chunk p, its samples [n0, n1), tile): chunk ``p`` of ``P`` holds samples
    ``[p*N//P, (p+1)*N//P)``."""
    p = task // NT
    return p, p * N // P, (p + 1) * N // P, task % NT


@parallel_kernel
def bias_grad(dy, db):
    """``db[k] = sum_{n, i, j} dy[n, k, i, j]``, accumulated in float64 (see the derivation
    above).  dy : (N, K, OH, OW), C-contiguous;  db : (K,) float64.  One task per channel."""
    N, K, OH, OW = dy.shape
    for k in prange(K):
        total = 0.0
        for n in range(N):
            for i in range(OH):
                for j in range(OW):
                    total += np.float64(dy[n, k, i, j])
        db[k] = total


# Pooling, derived once
# ---------------------
# Max: y[n,c,i,j] = max over the window of x, so dL/dx routes each delta to the position of
# the window's maximum (the first one on ties) and every other position gets nothing.
# Average: y = (1/(kh*kw)) * sum over the window (zero padding counted), so each delta is
# spread evenly, dy/(kh*kw), over the window's positions inside the input.
# Windows overlap when stride < kernel: each task owns whole (n, c) planes, so its += never
# meets another thread's writes.


@numba.njit(inline="always")
def _take(v, best, idx, where, first):
    """Keep the larger value and its index; a NaN wins over numbers; ties keep the first.
    ``first`` takes ``v`` unconditionally (the window's first element).

    Written as selects, not branches: on real data ``v > best`` is unpredictable, and a
    mispredicted branch per comparison made max pooling ten times slower.
    """
    take = first | (v > best) | ((v != v) & (best == best))
    return (v if take else best), (idx if take else where)


@parallel_kernel
def max_pool_fwd(x, y, arg, kh, kw, sh, sw, ph, pw):
    """``y[n,c,i,j] = max x[n, c, i*sh - ph + r, j*sw - pw + s]`` over the window in the input.

    x : (N, C, H, W);  y : (N, C, OH, OW);  arg : (N, C, OH, OW) int64 flat index
    ``h*W + w`` of the maximum (the first on ties; a NaN wins, the first NaN).

    Taps are the outer loops and output columns the inner one, so every inner loop runs the
    row's full width whatever the window size; the window is visited in row-major order, so
    the strict comparison keeps the first maximum.
    """
    N, C, H, W = x.shape
    OH, OW = y.shape[2], y.shape[3]
    for p in prange(N * C):
        n = p // C
        c = p % C
        for i in range(OH):
            for j in range(OW):
                y[n, c, i, j] = -np.inf
                arg[n, c, i, j] = -1
            h0 = i * sh - ph
            for r in range(max(0, -h0), min(kh, H - h0)):
                h = h0 + r
                for s in range(kw):
                    # the output columns whose tap s lands inside the row
                    for j in range(max(0, (pw - s + sw - 1) // sw),
                                   min(OW, (W - 1 + pw - s) // sw + 1)):
                        w = j * sw + s - pw
                        y[n, c, i, j], arg[n, c, i, j] = _take(
                            x[n, c, h, w], y[n, c, i, j], h * W + w, arg[n, c, i, j],
                            arg[n, c, i, j] < 0)


@parallel_kernel
def max_pool_2x2_fwd(x, y, arg):
    """:func:`max_pool_fwd` for 2x2 windows, stride 2, no padding: the common case, fully
    unrolled so that LLVM vectorises it."""
    N, C, H, W = x.shape
    OH, OW = y.shape[2], y.shape[3]
    for p in prange(N * C):
        n = p // C
        c = p % C
        for i in range(OH):
            h = 2 * i
            for j in range(OW):
                w = 2 * j
                best, where = x[n, c, h, w], h * W + w
                best, where = _take(x[n, c, h, w + 1], best, h * W + w + 1, where, False)
                best, where = _take(x[n, c, h + 1, w], best, (h + 1) * W + w, where, False)
                best, where = _take(x[n, c, h + 1, w + 1], best, (h + 1) * W + w + 1, where, False)
                y[n, c, i, j] = best
                arg[n, c, i, j] = where


@parallel_kernel
def max_pool_2x2_planes_fwd(y4, out, arg):
    """:func:`max_pool_2x2_fwd` then ReLU, on a convolution's output in *pool order*.

    y4 : (N, C, 4, M)     plane ``d = 2*a + b`` holds the pixels ``(2*i + a, 2*j + b)`` of
                          every 2x2 window, at ``m = i*OW + j`` (``conv2d_saving``'s
                          ``pool_order``).
    out : (N, C, M)       ``relu(max_d y4[n, c, d, m])``, the pooled NCHW output.
    arg : (N, C, M) int8  the window position ``d`` of the maximum.

    The planes run in the window's row-major order, so the strict comparison keeps the
    first maximum and a NaN wins, as in :func:`max_pool_2x2_fwd`.  Every loop runs along
    ``m``, contiguous in all three arrays: whole vectors of windows at a time.
    """
    N, C, _, M = y4.shape
    for task in prange(N * C):
        n = task // C
        c = task % C
        p0 = y4[n, c, 0]
        p1 = y4[n, c, 1]
        p2 = y4[n, c, 2]
        p3 = y4[n, c, 3]
        o = out[n, c]
        g = arg[n, c]
        for m in range(M):
            best, where = _take(p1[m], p0[m], 1, 0, False)
            best, where = _take(p2[m], best, 2, where, False)
            best, where = _take(p3[m], best, 3, where, False)
            o[m] = best if (best > 0) | (best != best) else 0
            g[m] = where


@parallel_kernel
def max_pool_2x2_planes_bwd(dy, out, g, dsum):
    """The ReLU part of the backward of :func:`max_pool_2x2_planes_fwd`: the pooled deltas
    that pass, ``g = dy where out > 0 else 0``, and their sums per image and channel,
    ``dsum`` (N, C) float64 (the convolution's bias gradient in parts).  dy, out, g :
    (N, C, M).  The routing to the window positions is left to the reader (pool order:
    ``dy4[n, c, d, m] = g[n, c, m]`` where ``arg[n, c, m] == d``, else 0).
    """
    N, C, M = dy.shape
    for task in prange(N * C):
        n = task // C
        c = task % C
        e = dy[n, c]
        o = out[n, c]
        gr = g[n, c]
        tot = 0.0
        for m in range(M):
            v = e[m] if o[m] > 0 else 0
            gr[m] = v
            tot += v
        dsum[n, c] = tot


@parallel_kernel
def max_pool_bwd(dy, arg, dx, mask, use_mask):
    """``dx[n, c, arg // W, arg % W] += dy[n, c, i, j]``, and zero everywhere else.

    With ``use_mask``, only deltas where ``mask > 0`` pass: the backward of ReLU followed by
    max pooling, fused (``mask`` is the pooled, rectified output).  Each task zeroes and
    fills whole planes of ``dx`` (N, C, H, W), which may be uninitialised.
    """
    N, C, OH, OW = dy.shape
    W = dx.shape[3]
    for p in prange(N * C):
        n = p // C
        c = p % C
        dx[n, c] = 0
        for i in range(OH):
            for j in range(OW):
                a = arg[n, c, i, j]
                g = dy[n, c, i, j]
                if use_mask:
                    g = g if mask[n, c, i, j] > 0 else 0
                dx[n, c, a // W, a % W] += g


@parallel_kernel
def max_pool_2x2_bwd_channels_last(dy, arg, mask, use_mask, dst, top, left, H, W, KgP, dsum,
                                    planes):
    """:func:`max_pool_bwd` after :func:`max_pool_2x2_fwd`, written straight into the
    channels-last deltas of the convolution before the pool (``conv.DeltaLayout``), with
    each image's sum of them per channel (the convolution's bias gradient, in parts).

    ``dst[n, top + h, left + w, g*KgP + c] = dx[n, g*Kg + c, h, w]`` for ``h < H``,
    ``w < W``, ``c < Kg``, where ``G = Cd // KgP`` groups of ``Kg = C // G`` channels; every
    other element of ``dst`` (N, Hd, Wd, Cd) is set to zero.  The 2x2 windows do not
    overlap, so each element reads the one window it belongs to: a select, no scatter.
    ``dsum[n, cd] = sum_{h, w} dst[n, h, w, cd]`` in float64, ``dsum`` (N, Cd): each
    window passes its delta to exactly one element, so this sums the (4x fewer) deltas
    that pass.  ``arg`` holds flat indices ``h*W + w`` (:func:`max_pool_2x2_fwd`), or with
    ``planes`` window positions ``d = 2*(h % 2) + w % 2`` (:func:`max_pool_2x2_planes_fwd`).
    """
    N, C, OH, OW = dy.shape
    Hd, Wd, Cd = dst.shape[1:]
    G = Cd // KgP
    Kg = C // G
    for n in prange(N):
        val = np.empty((OW, Cd), dst.dtype)
        pos = np.empty((OW, Cd), arg.dtype)  # int64 flat indices, or int8 positions
        for cd in range(Cd):
            dsum[n, cd] = 0
        for hd in range(Hd):
            h = hd - top
            i = h // 2
            row = dst[n, hd]  # (Wd, Cd)
            if h < 0 or h >= H or i >= OH:
                row[:] = 0
                continue
            if h % 2 == 0:  # rows 2i and 2i + 1 share pooled row i
                # Pooled row i transposed to channels-last (reads along j, writes into L1),
                # so that the output loop below runs over contiguous channels on both sides.
                for g in range(G):
                    for c in range(KgP):
                        cd = g * KgP + c
                        if c < Kg:
                            k = g * Kg + c
                            for j in range(OW):
                                pass_ = (not use_mask) | (mask[n, k, i, j] > 0)
                                val[j, cd] = dy[n, k, i, j] if pass_ else 0
                                pos[j, cd] = arg[n, k, i, j]
                        else:
                            for j in range(OW):
                                val[j, cd] = 0
                                pos[j, cd] = -1
                for j in range(OW):
                    for cd in range(Cd):
                        dsum[n, cd] += val[j, cd]
            for wd in range(Wd):
                w = wd - left
                j = w // 2
                if w < 0 or w >= W or j >= OW:
                    row[wd] = 0
                    continue
                p = 2 * (h % 2) + w % 2 if planes else h * W + w
                for cd in range(Cd):
                    row[wd, cd] = val[j, cd] if pos[j, cd] == p else 0


@parallel_kernel
def avg_pool_fwd(x, y, kh, kw, sh, sw, ph, pw):
    """``y[n,c,i,j] = sum of x over the window / (kh*kw)`` (zero padding counted)."""
    N, C, H, W = x.shape
    OH, OW = y.shape[2], y.shape[3]
    scale = 1.0 / (kh * kw)
    for p in prange(N * C):
        n = p // C
        c = p % C
        for i in range(OH):
            h0 = i * sh - ph
            for j in range(OW):
                w0 = j * sw - pw
                total = 0.0
                for r in range(max(0, -h0), min(kh, H - h0)):
                    for s in range(max(0, -w0), min(kw, W - w0)):
                        total += x[n, c, h0 + r, w0 + s]
                y[n, c, i, j] = total * scale


@parallel_kernel
def avg_pool_bwd(dy, dx, kh, kw, sh, sw, ph, pw):
    """``dx[window of (i, j)] += dy[n,c,i,j] / (kh*kw)``; ``dx`` is pre-zeroed (N, C, H, W)."""
    N, C, OH, OW = dy.shape
    H, W = dx.shape[2], dx.shape[3]
    scale = 1.0 / (kh * kw)
    for p in prange(N * C):
        n = p // C
        c = p % C
        for i in range(OH):
            h0 = i * sh - ph
            for j in range(OW):
                w0 = j * sw - pw
                g = dy[n, c, i, j] * scale
                for r in range(max(0, -h0), min(kh, H - h0)):
                    for s in range(max(0, -w0), min(kw, W - w0)):
                        dx[n, c, h0 + r, w0 + s] += g


# ReLU: y = max(x, 0), so dL/dx = dy where y > 0 and 0 elsewhere (the saved output is the
# mask; at x = 0 the gradient is 0, as in PyTorch).  NaN propagates: max(NaN, 0) is NaN.


@parallel_kernel
def relu_fwd(x, y):
    """``y = max(x, 0)`` elementwise, NaN kept; 1-D contiguous arrays."""
    for i in prange(x.size):
        v = x[i]
        y[i] = v if (v > 0) | (v != v) else 0


@parallel_kernel
def relu_bwd(dy, y, dx):
    """``dx = dy where y > 0 else 0``; 1-D contiguous arrays."""
    for i in prange(dy.size):
        dx[i] = dy[i] if y[i] > 0 else 0


@parallel_kernel
def matmul_tiles(a, b, c):
    """``c[:, :NCn*MC] = a @ b[:, :NCn*MC]`` with ``NCn = b.shape[1] // MC``: the matrix
    product over the full blocks of ``MC`` columns (the caller does the rest).

    a : (M, Q), b : (Q, Nc), c : (M, Nc), all C-contiguous

    The outer-product form of the conv kernels: each ``MR x MC`` tile of ``c`` (24 vectors
    of 16 fp32) stays in registers while ``q`` runs over the whole reduction, adding ``MR``
    broadcast values of ``a``'s column ``q`` times one row segment of ``b``: 6 broadcasts
    and 4 vector loads per 24 FMAs.  The last row block repeats row ``M - 1`` for the rows
    past ``M`` and stores only the real ones.  Parallel over tiles, row blocks innermost
    (their tasks share ``b``'s column block); each tile writes its own part of ``c``.

    The tile's rows are stored from registers (:func:`_matmul_row`, unrolled): with a loop
    over them, LLVM stored the tile through scatters, which cost the products with a short
    reduction a third of their time (the Linear layers' backward: 1.3-1.55x faster since).
    """
    M, Q = a.shape
    Nc = c.shape[1]
    NCn = b.shape[1] // MC
    MRn = -(-M // MR)
    cf = c.reshape(c.size)
    mc = min(MC, Nc)  # == MC; a bound LLVM cannot see keeps the row stores vectorised
    for task in prange(MRn * NCn):
        nc = task // MRn
        m0 = (task % MRn) * MR
        r0 = m0
        r1 = min(m0 + 1, M - 1)
        r2 = min(m0 + 2, M - 1)
        r3 = min(m0 + 3, M - 1)
        r4 = min(m0 + 4, M - 1)
        r5 = min(m0 + 5, M - 1)
        # An unsigned column offset: Numba then emits no negative-index wraparound, and
        # LLVM sees the row segment as contiguous (with a signed one it emitted gathers).
        c0 = np.uint64(nc * MC)
        acc = stack_tile(MR, MC, c.dtype)
        for t in range(MR):
            for k in range(MC):
                acc[t, k] = 0
        for q in range(Q):
            a0 = a[r0, q]
            a1 = a[r1, q]
            a2 = a[r2, q]
            a3 = a[r3, q]
            a4 = a[r4, q]
            a5 = a[r5, q]
            bq = b[q]
            for k in range(MC):
                v = bq[c0 + np.uint64(k)]
                acc[0, k] += a0 * v
                acc[1, k] += a1 * v
                acc[2, k] += a2 * v
                acc[3, k] += a3 * v
                acc[4, k] += a4 * v
                acc[5, k] += a5 * v
        mr = min(MR, M - m0)
        co = np.uint64(m0 * Nc) + c0  # c[m0, nc*MC] in cf
        _matmul_row(cf, acc, 0, mr, co, Nc, mc)
        _matmul_row(cf, acc, 1, mr, co, Nc, mc)
        _matmul_row(cf, acc, 2, mr, co, Nc, mc)
        _matmul_row(cf, acc, 3, mr, co, Nc, mc)
        _matmul_row(cf, acc, 4, mr, co, Nc, mc)
        _matmul_row(cf, acc, 5, mr, co, Nc, mc)


@numba.njit(inline="always")
def _matmul_row(cf, acc, t, mr, co, Nc, mc):
    """Row ``t`` of the matrix product's tile into ``cf[co + t*Nc : ... + mc]``, if
    ``t < mr``.  Called with a constant ``t``, so that the tile stays in registers."""
    if t < mr:
        o = co + np.uint64(t * Nc)
        for k in range(mc):
            cf[o + np.uint64(k)] = acc[t, k]


# SGD with momentum, as torch.optim.SGD: g = grad + wd*p; buf = g on the first step, else
# momentum*buf + g; the step is g + momentum*buf (Nesterov) or buf, or g without momentum.


@parallel_kernel
def sgd_update(p, g, buf, lr, momentum, weight_decay, nesterov, first):
    """One SGD step on 1-D contiguous ``p`` (in place), its gradient ``g`` and momentum
    buffer ``buf`` (in place; unused when ``momentum == 0``), in a single pass."""
    for i in prange(p.size):
        d = g[i] + weight_decay * p[i]
        if momentum != 0:
            m = d if first else momentum * buf[i] + d
            buf[i] = m
            d = d + momentum * m if nesterov else m
        p[i] -= lr * d
