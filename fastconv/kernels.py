"""Numba kernels for direct 2-D convolution: forward, dX and dW, and a layout packer.

This module holds only ``@njit`` kernels: no validation, no Python objects, no allocation
of outputs.  The public wrappers in :mod:`fastconv.conv` check arguments, choose the
layouts, allocate, and call these.  Numba options come from :mod:`fastconv._jit`.

Legend
------
``x, w, b``      input, weight, bias           ``N``       batch
``y``            output                        ``C, K``    input / output channels
``dy``           output deltas (grad_output)   ``G``       groups; ``Cg = C/G``, ``Kg = K/G``
``dx, dw``       gradients of ``x`` and ``w``  ``H, W``    input height / width
``R, S``         kernel height / width         ``OH, OW``  output height / width
``sh, sw``       strides                       ``dlh, dlw`` dilations
``KB``           output channels per register tile (32: two zmm of fp32, 14 accumulators)
``KBn``          number of such blocks per group
``TW``           output pixels per register tile (7)
``TC``           reduction columns per dW register tile (8)
``KBW``          output channels per dW register tile (32: two vectors, 16 accumulators)
``TCW, KBWW``    the wide dW tile for groups of more than 32 output channels: 6 x 64
``PX, KP``       pixels per vector, output channels per tile of the pixel-vectorised
                 forward kernel (its tile: KP channels x 2 vectors)
``DK, DT``       output channels x taps per tile of the pixel-vectorised dW kernel
``CL``           channels per pass of the channels-last packer (one 64-byte line of fp32)
``MR, MC``       rows x columns per register tile of the matrix product (Linear layers)
``CK, CV``       output channels x input-channel vectors per tile of the NCHW-delta dW kernel

Design
------
Activations are channels-last (NHWC) and zero padded, weights are blocked as
``[G][KBn][R][S][Cg][KB]``.  Each tile keeps ``TW x KB`` outputs in registers (a stack
array, see :func:`fastconv._jit.stack_tile`), and the reduction over ``(r, s, c)`` does
an *outer product*: ``TW`` input values, each broadcast, times one vector of ``KB``
weights, which LLVM turns into ``TW`` packed FMAs per step.
"""

import numba
import numpy as np
from numba import prange

from ._jit import parallel_kernel, stack_tile

KB = 32
TW = 7
TC = 8
KBW = 32
TCW = 6
KBWW = 64
PX = 16
KP = 8
CL = 16
DK = 4
DT = 5
MR = 6
MC = 64
CK = 4
CV = 6


@parallel_kernel
def pack_channels_last(src, dst, pt, pl, G, CgP):
    """Copy NCHW ``src`` into the pre-zeroed, padded, channels-last ``dst``.

    ``dst[n, pt + h, pl + w, g*CgP + c] = src[n, g*Cg + c, h, w]`` for ``c < Cg = C/G``;
    ``CgP >= Cg`` leaves zero channels at the end of every group.

    src : (N, C, H, W), any strides.    dst : (N, Hd, Wd, G*CgP), zeros outside the copy.
    """
    N, C, H, W = src.shape
    Cg = C // G
    for task in prange(N * H):
        n = task // H
        h = task % H
        for g in range(G):
            # CL channels at a time, pixel by pixel: each pixel's CL outputs fill one cache
            # line of dst, read from CL rows of src walked in step (1.4-1.7x faster than one
            # channel at a time, which touches a new dst line for every element).
            c = 0
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
    """
    N, C = src.shape[:2]
    H = src.shape[2] // W
    S, Hp, OW = dst.shape[2:]
    flat = sw == 1 and Hh == 0 and OW == W  # rows as wide as the input's: see below
    for task in prange(N * C):
        n = task // C
        c = task % C
        xs = src[n, c]
        for s in range(S):
            # Output columns [j0, j1) read input columns j*sw + qoff[s] - pl inside [0, W).
            q = qoff[s]
            if flat and abs(q - pl) < W:
                _shifted_plane_flat(xs, dst[n, c, s].reshape(Hp * W), H, W, pt, q - pl)
                continue
            j0 = min(OW, max(0, (pl - q + sw - 1) // sw))
            j1 = max(j0, min(OW, (W - 1 + pl - q) // sw + 1))
            u0 = j0 * sw + q - pl
            for h in range(Hp):
                drow = dst[n, c, s, h]
                ih = (2 * (h % Hh) + h // Hh if Hh > 0 else h) - pt
                if ih < 0 or ih >= H:
                    for j in range(OW):
                        drow[j] = 0
                    continue
                for j in range(j0):
                    drow[j] = 0
                for j in range(j1, OW):
                    drow[j] = 0
                if sw == 1:
                    # Unsigned indices: no negative-index wraparound, so this vectorises
                    # (about 4x faster than the general loop below).
                    b = np.uint64(ih * W + u0)
                    for j in range(np.uint64(0), np.uint64(j1 - j0)):
                        drow[np.uint64(j0) + j] = xs[b + j]
                else:
                    b = np.uint64(ih * W + u0)
                    usw = np.uint64(sw)
                    for j in range(np.uint64(0), np.uint64(j1 - j0)):
                        drow[np.uint64(j0) + j] = xs[b + j * usw]


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


@parallel_kernel
def conv_tiles(x, w, b, y, OH, OW, sh, sw, dlh, dlw, xh0, xw0, yh0, yw0, ysh, ysw,
               exact, h_lo, h_hi, w_lo, w_hi):
    """Direct convolution with a register tile; the forward pass and every dX phase.

    For ``i < OH``, ``j < OW`` and every output channel ``g*Ko + ko`` (``ko < Ko``)::

        y[n, g*Ko + ko, yh0 + i*ysh, yw0 + j*ysw] = b[g, ko] + sum_{r, s, c}
            x[n, xh0 + i*sh + r*dlh, xw0 + j*sw + s*dlw, g*Cg + c] * w[g, ko//KB, r, s, c, ko%KB]

    x : (N, Hx, Wx, G*Cg)      channels-last, zero padded so that every index is in range.
    w : (G, KBn, R, S, Cg, KB) blocked weights, zero past ``Ko`` in the last block.
    b : (G, KBn*KB)            bias (zeros for none).
    y : (N, G*Ko, Hy, Wy)      NCHW; only the pixels named above are written.

    Parallel over ``(n, i, g, kb)``: each task owns one output row of one channel block, so
    no two threads write the same element.  Rows are covered by ``TW``-wide tiles; the last
    tile is shifted left to end at ``OW`` (it recomputes a few pixels, identically), so no
    pixel falls to a slow path unless ``OW < TW``.

    ``exact`` makes every pixel take the one-pixel path, which skips the taps that read
    outside ``x[:, h_lo:h_hi, w_lo:w_hi]`` (its zero border).  Products with the border are
    zero for finite weights, but ``inf * 0`` is NaN: with non-finite weights, dX uses this
    so that a NaN or inf reaches only the pixels that its tap really touches.
    """
    N = x.shape[0]
    G, KBn, R, S, Cg = w.shape[:5]
    Ko = y.shape[1] // G
    for task in prange(N * OH * G * KBn):
        kb = task % KBn
        rest = task // KBn
        g = rest % G
        rest //= G
        i = rest % OH
        n = rest // OH
        c0 = g * Cg
        k0 = g * Ko + kb * KB
        kn = min(KB, Ko - kb * KB)
        acc = stack_tile(TW, KB, y.dtype)
        if OW >= TW and not exact:
            for jt in range((OW + TW - 1) // TW):
                j0 = min(jt * TW, OW - TW)
                for t in range(TW):
                    for k in range(KB):
                        acc[t, k] = 0
                for r in range(R):
                    ih = xh0 + i * sh + r * dlh
                    for s in range(S):
                        iw = xw0 + j0 * sw + s * dlw
                        for c in range(Cg):
                            # TW broadcast inputs times one weight vector: TW packed FMAs.
                            x0 = x[n, ih, iw, c0 + c]
                            x1 = x[n, ih, iw + sw, c0 + c]
                            x2 = x[n, ih, iw + 2 * sw, c0 + c]
                            x3 = x[n, ih, iw + 3 * sw, c0 + c]
                            x4 = x[n, ih, iw + 4 * sw, c0 + c]
                            x5 = x[n, ih, iw + 5 * sw, c0 + c]
                            x6 = x[n, ih, iw + 6 * sw, c0 + c]
                            for k in range(KB):
                                wk = w[g, kb, r, s, c, k]
                                acc[0, k] += x0 * wk
                                acc[1, k] += x1 * wk
                                acc[2, k] += x2 * wk
                                acc[3, k] += x3 * wk
                                acc[4, k] += x4 * wk
                                acc[5, k] += x5 * wk
                                acc[6, k] += x6 * wk
                for k in range(kn):
                    bk = b[g, kb * KB + k]
                    for t in range(TW):
                        y[n, k0 + k, yh0 + i * ysh, yw0 + (j0 + t) * ysw] = acc[t, k] + bk
        else:
            # Rows narrower than one tile, or exact mode: one pixel at a time, still
            # vectorised over k.
            for j in range(OW):
                for k in range(KB):
                    acc[0, k] = 0
                for r in range(R):
                    ih = xh0 + i * sh + r * dlh
                    if exact and (ih < h_lo or ih >= h_hi):
                        continue
                    for s in range(S):
                        iw = xw0 + j * sw + s * dlw
                        if exact and (iw < w_lo or iw >= w_hi):
                            continue
                        for c in range(Cg):
                            xv = x[n, ih, iw, c0 + c]
                            for k in range(KB):
                                acc[0, k] += xv * w[g, kb, r, s, c, k]
                for k in range(kn):
                    y[n, k0 + k, yh0 + i * ysh, yw0 + j * ysw] = acc[0, k] + b[g, kb * KB + k]


@parallel_kernel
def conv_pixel_tiles(x, toff, w, b, y):
    """Forward pass vectorised over output pixels instead of output channels, for layers
    with few input channels (the first layer of an image network) and for 1x1 layers.

    ``y[n, k, i, j] = b[k] + sum_t x[n, toff[i, t] + j] * w[k // KP, t, k % KP]``
    over the taps ``t = (c, r, s)`` of the filter:

    x : (N, L)                 each image's input planes, flattened, laid out as for
                               :func:`conv_dw_pixels`, so that for every tap consecutive
                               pixels of an output row read consecutive inputs.
    toff : (OH, T) int64       where each output row reads each tap in an image's ``x``,
                               ``T = C*R*S``.
    w : (KPn, T, KP)           weights, blocked by ``KP`` output channels, zero past ``K``.
    b : (KPn*KP,)              bias.
    y : (N, K, OH, OW)         NCHW output, C-contiguous, ``OW >= PX``.

    With few channels, :func:`conv_tiles` has only ``C*R*S`` steps to amortise its
    transposing epilogue.  Here the tile is ``KP`` channels x two vectors of ``PX``
    pixels of one output row: each step loads the two input vectors and multiplies each by
    ``KP`` broadcast weights, 2*KP FMAs for KP + 2 loads, and every channel's row is
    stored as whole vectors.  The tap table keeps the step free of index arithmetic: with
    the plane, row and phase of each tap computed in the loop (an integer division by the
    stride), the scalar work outran the FMAs.  A vector that would cross the end of the
    row is shifted left to end at ``OW``, as in :func:`conv_tiles` (in a row's last tile
    both vectors may land on the same pixels, computed twice and stored twice, equal).
    Parallel over (n, i, channel block): each task owns its outputs.

    With ``C*R*S`` steps per tile (25 for MNIST's first layer) the epilogue weighs: its
    rows are unrolled (:func:`_pixel_row`), so that the tile is stored from registers
    with flat unsigned offsets and no slicing (it had taken about 40 instructions a row).
    That and the second vector made the kernel 1.2-1.3x faster on MNIST conv1.
    """
    N, K, OH, OW = y.shape
    KPn, T = w.shape[:2]
    yf = y.reshape(y.size)
    ustep = np.uint64(OH * OW)  # from one channel's output plane to the next
    for task in prange(N * OH * KPn):
        kt = task % KPn
        rest = task // KPn
        i = rest % OH
        n = rest // OH
        k0 = kt * KP
        kn = min(KP, K - k0)
        xn = x[n]
        wk = w[kt]
        ti = toff[i]
        urow = np.uint64(((n * K + k0) * OH + i) * OW)  # y[n, k0, i, 0] in yf
        acc = stack_tile(16, PX, y.dtype)  # 2*KP rows: kk the first vector, KP + kk the second
        for jt in range((OW + 2 * PX - 1) // (2 * PX)):
            ua = np.uint64(min(jt * 2 * PX, OW - PX))
            ud = np.uint64(min(jt * 2 * PX + PX, OW - PX)) - ua  # PX, or 0 at the end
            for kk in range(2 * KP):
                for p in range(PX):
                    acc[kk, p] = 0
            for t in range(T):
                oa = ua + np.uint64(ti[t])  # unsigned: no negative-index wraparound
                ob = oa + ud
                wv = wk[t]
                # KP broadcast weights times two vectors of PX inputs: 2*KP packed FMAs.
                w0 = wv[0]
                w1 = wv[1]
                w2 = wv[2]
                w3 = wv[3]
                w4 = wv[4]
                w5 = wv[5]
                w6 = wv[6]
                w7 = wv[7]
                for p in range(PX):
                    up = np.uint64(p)
                    xa = xn[oa + up]
                    xb = xn[ob + up]
                    acc[0, p] += w0 * xa
                    acc[1, p] += w1 * xa
                    acc[2, p] += w2 * xa
                    acc[3, p] += w3 * xa
                    acc[4, p] += w4 * xa
                    acc[5, p] += w5 * xa
                    acc[6, p] += w6 * xa
                    acc[7, p] += w7 * xa
                    acc[8, p] += w0 * xb
                    acc[9, p] += w1 * xb
                    acc[10, p] += w2 * xb
                    acc[11, p] += w3 * xb
                    acc[12, p] += w4 * xb
                    acc[13, p] += w5 * xb
                    acc[14, p] += w6 * xb
                    acc[15, p] += w7 * xb
            # npx == PX (OW >= PX), but LLVM cannot know it: a loop of constant trip count
            # this short is fully unrolled into scalar stores, and Numba runs no SLP
            # vectoriser to merge them again.  With this bound the loop vectoriser turns each
            # row into vector stores (1.4-1.6x on the whole kernel for conv1-sized layers).
            npx = min(PX, OW)
            ya = urow + ua
            _pixel_row(yf, acc, 0, kn, b, k0, ya, ud, ustep, npx)
            _pixel_row(yf, acc, 1, kn, b, k0, ya, ud, ustep, npx)
            _pixel_row(yf, acc, 2, kn, b, k0, ya, ud, ustep, npx)
            _pixel_row(yf, acc, 3, kn, b, k0, ya, ud, ustep, npx)
            _pixel_row(yf, acc, 4, kn, b, k0, ya, ud, ustep, npx)
            _pixel_row(yf, acc, 5, kn, b, k0, ya, ud, ustep, npx)
            _pixel_row(yf, acc, 6, kn, b, k0, ya, ud, ustep, npx)
            _pixel_row(yf, acc, 7, kn, b, k0, ya, ud, ustep, npx)


@numba.njit(inline="always")
def _pixel_row(yf, acc, kk, kn, b, k0, ya, ud, ustep, npx):
    """Store channel ``k0 + kk``'s two vectors of the pixel forward tile plus its bias,
    if ``kk < kn``: ``yf[ya + kk*ustep + p]`` and ``yf[ya + kk*ustep + ud + p]``.  Called
    with a constant ``kk``, so that the tile's rows stay in registers."""
    if kk < kn:
        bk = b[k0 + kk]
        yo = ya + np.uint64(kk) * ustep
        for p in range(npx):
            yf[yo + np.uint64(p)] = acc[kk, p] + bk
        yo += ud
        for p in range(npx):
            yf[yo + np.uint64(p)] = acc[KP + kk, p] + bk


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


@numba.njit(inline="always")
def _dw_task(task, NT, N, P, TBn, R, KBn):
    """Decode a dW task into (chunk p, its samples [n0, n1), column block, r, kb, g)."""
    p, n0, n1, tile = _chunk_task(task, NT, N, P)
    tb = tile % TBn
    rest = tile // TBn
    r = rest % R
    rest //= R
    return p, n0, n1, tb, r, rest % KBn, rest // KBn


@parallel_kernel
def conv_dw_tiles(x, dy, off, part, C, WpC, sh, sw, dlh, OH, OW, dh0, dw0):
    """Weight gradient as a correlation of the input with the deltas, per batch chunk.

    ``part[p, g, kb, r, t, k] = sum_{n in chunk p} sum_{i < OH, j < OW} x[n, (i*sh + r*dlh)*WpC
    + j*sw*C + off[g, t]] * dy[n, dh0 + i, dw0 + j, g*KBn + kb, k]``, chunk ``p`` holding
    samples ``[p*N//P, (p+1)*N//P)``; the weight gradient is ``part.sum(axis=0)``.

    x    : (N, Hp*Wp*C)               padded channels-last input, each sample flattened;
                                      ``C`` is its channel count, ``WpC = Wp*C`` a row.
    dy   : (N, Hd, Wd, G*KBn, KBW)    channels-last deltas at offset ``(dh0, dw0)``, each
                                      group's channels padded to ``KBn*KBW``.
    off  : (G, T) uint64              column offsets, ``T`` a multiple of ``TC``.  Unsigned,
                                      so Numba emits no negative-index wraparound for them.
    part : (P, G, KBn, R, T, KBW)     output, every element written once.

    Parallel over (chunk, tile) pairs, chunk-major: each thread gets a contiguous run of
    them, mostly within one chunk, and every pair owns its output tile in ``part``, so no two
    threads write the same memory.
    """
    N = dy.shape[0]
    P, G, KBn, R, T = part.shape[:5]
    TBn = T // TC
    NT = G * KBn * R * TBn
    for task in prange(P * NT):
        p, n0, n1, tb, r, kb, g = _dw_task(task, NT, N, P, TBn, R, KBn)
        gk = g * KBn + kb
        o0 = off[g, tb * TC + 0]
        o1 = off[g, tb * TC + 1]
        o2 = off[g, tb * TC + 2]
        o3 = off[g, tb * TC + 3]
        o4 = off[g, tb * TC + 4]
        o5 = off[g, tb * TC + 5]
        o6 = off[g, tb * TC + 6]
        o7 = off[g, tb * TC + 7]
        acc = stack_tile(TC, KBW, part.dtype)
        for t in range(TC):
            for k in range(KBW):
                acc[t, k] = 0
        for n in range(n0, n1):
            xn = x[n]
            for i in range(OH):
                row = np.uint64((i * sh + r * dlh) * WpC)
                for j in range(OW):
                    base = row + np.uint64(j * sw * C)
                    x0 = xn[base + o0]
                    x1 = xn[base + o1]
                    x2 = xn[base + o2]
                    x3 = xn[base + o3]
                    x4 = xn[base + o4]
                    x5 = xn[base + o5]
                    x6 = xn[base + o6]
                    x7 = xn[base + o7]
                    for k in range(KBW):
                        d = dy[n, dh0 + i, dw0 + j, gk, k]
                        acc[0, k] += x0 * d
                        acc[1, k] += x1 * d
                        acc[2, k] += x2 * d
                        acc[3, k] += x3 * d
                        acc[4, k] += x4 * d
                        acc[5, k] += x5 * d
                        acc[6, k] += x6 * d
                        acc[7, k] += x7 * d
        for t in range(TC):
            for k in range(KBW):
                part[p, g, kb, r, tb * TC + t, k] = acc[t, k]


@parallel_kernel
def conv_dw_tiles_wide(x, dy, off, part, C, WpC, sh, sw, dlh, OH, OW, dh0, dw0):
    """:func:`conv_dw_tiles` with a TCW x KBWW = 6 x 64 tile, for groups of more than 32
    output channels: 24 accumulators, 4 delta vectors and 6 broadcast inputs per 24 FMAs
    (about 30% faster there than 8 x 32; with 32 channels or fewer it would pad half the
    lanes).  Arguments and layout as :func:`conv_dw_tiles`, with KBWW channels per block
    and ``T`` a multiple of TCW.
    """
    N = dy.shape[0]
    P, G, KBn, R, T = part.shape[:5]
    TBn = T // TCW
    NT = G * KBn * R * TBn
    for task in prange(P * NT):
        p, n0, n1, tb, r, kb, g = _dw_task(task, NT, N, P, TBn, R, KBn)
        gk = g * KBn + kb
        o0 = off[g, tb * TCW + 0]
        o1 = off[g, tb * TCW + 1]
        o2 = off[g, tb * TCW + 2]
        o3 = off[g, tb * TCW + 3]
        o4 = off[g, tb * TCW + 4]
        o5 = off[g, tb * TCW + 5]
        acc = stack_tile(TCW, KBWW, part.dtype)
        for t in range(TCW):
            for k in range(KBWW):
                acc[t, k] = 0
        for n in range(n0, n1):
            xn = x[n]
            for i in range(OH):
                row = np.uint64((i * sh + r * dlh) * WpC)
                for j in range(OW):
                    base = row + np.uint64(j * sw * C)
                    x0 = xn[base + o0]
                    x1 = xn[base + o1]
                    x2 = xn[base + o2]
                    x3 = xn[base + o3]
                    x4 = xn[base + o4]
                    x5 = xn[base + o5]
                    for k in range(KBWW):
                        d = dy[n, dh0 + i, dw0 + j, gk, k]
                        acc[0, k] += x0 * d
                        acc[1, k] += x1 * d
                        acc[2, k] += x2 * d
                        acc[3, k] += x3 * d
                        acc[4, k] += x4 * d
                        acc[5, k] += x5 * d
        for t in range(TCW):
            for k in range(KBWW):
                part[p, g, kb, r, tb * TCW + t, k] = acc[t, k]


@parallel_kernel
def conv_dw_cvec(x, dy, off, part, C, WpC, sh, sw, OH, OW):
    """Weight gradient from NCHW deltas, with vectors over input channels: no delta pack.

    ``part[p, kt, vt, t, v, l] = sum_{n in chunk p} sum_{i < OH, j < OW}
    dy[n, min(kt*CK + t, K - 1), i, j] * x[n, i*sh*WpC + j*sw*C + off[vt*CV + v] + l]``,
    chunks as in :func:`conv_dw_tiles`; the weight gradient is ``part.sum(axis=0)``.

    x    : (N, Hp*Wp*C)     padded channels-last input, each sample flattened; ``C``, a
                            multiple of ``CL``, is its channel count, ``WpC = Wp*C`` a row.
    dy   : (N, K, OH, OW)   deltas as the caller has them, C-contiguous.
    off  : (V,) uint64      where each vector of ``CL`` channels of the filter starts
                            reading: ``r*dlh*WpC + s*dlw*C + c0`` (``V`` a multiple of CV).
    part : (P, KTn, V/CV, CK, CV, CL)  output, every element written once.

    The roles of :func:`conv_dw_tiles` swapped: each step broadcasts ``CK`` deltas, one
    pixel of ``CK`` delta planes, against ``CV`` vectors of the input's channels at that
    pixel: 24 FMAs for 4 broadcasts and 6 vector loads, as in the 6 x 64 tile.  The deltas
    are read where they are, so the functional ``conv2d_grad_weight`` skips transposing
    them to channels-last (0.94-1.38x on the whole call, above 1.05x on most shapes).
    The last channel tile repeats channel ``K - 1`` past ``K``; the caller drops those
    rows.
    """
    N, K = dy.shape[0], dy.shape[1]
    P, KTn, VTn = part.shape[:3]
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
                    part[p, kt, vt, t, v, l] = acc[t * CV + v, l]


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


@parallel_kernel
def bias_grad_channels_last(dy, h0, w0, OH, OW, part):
    """``part[n, k] = sum_{i < OH, j < OW} dy[n, h0 + i, w0 + j, k]`` in float64, for
    channels-last deltas (N, Hd, Wd, Cd); ``part`` (N, Cd).  The caller sums over n."""
    N, Cd = part.shape
    for n in prange(N):
        for k in range(Cd):
            part[n, k] = 0
        for i in range(OH):
            for j in range(OW):
                for k in range(Cd):
                    part[n, k] += dy[n, h0 + i, w0 + j, k]


@parallel_kernel
def conv_dw_pixels(x, dy, toff, part):
    """dW for few input channels, vectorised over output pixels: the deltas are read in
    NCHW as they come, with no transposing pack.  1x1 stride-1 layers run it too, each
    image's pixels as one row (``OH = 1``) and one tap per input channel.

    ``part[p, kt, tt, a, b] = sum_{n in chunk p} sum_{i, j} dy[n, DK*kt + a, i, j]
    * x[n, toff[i, DT*tt + b] + j]``, chunk ``p`` holding samples
    ``[p*N//P, (p+1)*N//P)``; dW is ``part.sum(axis=0)``.

    x : (N, L)                 each image's zero-padded input planes, flattened; see below.
    dy : (N, K, OH, OW)        NCHW deltas, ``OW >= PX``.
    toff : (OH, ceil(T/DT)*DT) int64 offset of each tap into an image's ``x``, per row.
    part : (P, ceil(K/DK), ceil(T/DT), DK, DT)

    A tap ``t = (c, r, s)`` of the filter reads input row ``i*sh + r*dlh`` and column
    ``j*sw + s*dlw``.  The wrapper (``layouts._pixel_input``) lays the input out so that for
    every tap consecutive output pixels read consecutive inputs: a stride-1 layer as
    shifted planes, each image's output one row (``OH = 1``); otherwise each padded plane's
    columns split into ``sw`` phases of width ``Wq`` (plane ``c*sw + q`` holds columns
    ``u*sw + q``), so that the column is ``j + (s*dlw)//sw`` of phase ``(s*dlw) % sw``.
    ``toff[i]`` is each tap's plane, row and column offset in that layout for output row
    ``i``.  (The 2x2 pool's "pool order", ``layouts._pool_order_input``, gives each of its
    four rows a table of its own.)

    The tile is DK output channels x DT taps, each accumulator a vector of ``PX`` pixels of
    one output row: per step DK + DT vector loads and DK*DT FMAs; the lanes are summed at
    the end.  Rows are covered by ``PX``-wide vectors, the last shifted left to end at
    ``OW``, with the lanes it shares with the previous one zeroed in both operands (selects:
    0 * 0, never inf * 0).  Channels past ``K`` repeat the last one and padding taps read
    offset 0; the wrapper drops both.  Parallel over (chunk, channel block, tap block), taps
    fastest, so consecutive tasks of a thread reuse the same deltas from L2.
    """
    N, K, OH, OW = dy.shape
    P, KTn, TTn = part.shape[:3]
    NT = KTn * TTn
    JT = (OW + PX - 1) // PX
    for task in prange(P * NT):
        p, n0, n1, kt, tt, k0, k1, k2, k3 = _dw_pixel_task(task, NT, N, P, TTn, K)
        zero = x.dtype.type(0)
        acc = stack_tile(20, PX, part.dtype)  # DK * DT rows
        for a in range(DK * DT):
            for q in range(PX):
                acc[a, q] = 0
        for n in range(n0, n1):
            xn = x[n]
            for i in range(OH):
                d0 = dy[n, k0, i]
                d1 = dy[n, k1, i]
                d2 = dy[n, k2, i]
                d3 = dy[n, k3, i]
                o0, o1, o2, o3, o4 = _dw_tap_offsets(toff[i], tt)
                for jt in range(JT):
                    j0 = min(jt * PX, OW - PX)
                    lo = jt * PX - j0  # lanes below lo were counted by the previous vector
                    uj = np.uint64(j0)
                    for q in range(PX):
                        # unsigned indices: no negative-index wraparound to check
                        uq = np.uint64(q)
                        keep = q >= lo
                        e0 = d0[uj + uq] if keep else zero
                        e1 = d1[uj + uq] if keep else zero
                        e2 = d2[uj + uq] if keep else zero
                        e3 = d3[uj + uq] if keep else zero
                        a0, a1, a2, a3, a4 = _dw_pixel_inputs(xn, uj + uq, o0, o1, o2, o3,
                                                              o4, keep, zero)
                        _dw_pixel_step(acc, q, e0, e1, e2, e3, a0, a1, a2, a3, a4)
        _dw_pixel_sums(acc, part[p, kt, tt], zero)


@numba.njit(inline="always")
def _dw_pixel_task(task, NT, N, P, TTn, K):
    """A pixel dW task's batch chunk ``p`` (samples ``n0 .. n1 - 1``), its channel and tap
    blocks ``kt`` and ``tt``, and its DK output channels (past ``K``, the last repeated)."""
    p, n0, n1, t = _chunk_task(task, NT, N, P)
    kt = t // TTn
    return (p, n0, n1, kt, t % TTn, min(kt * DK + 0, K - 1), min(kt * DK + 1, K - 1),
            min(kt * DK + 2, K - 1), min(kt * DK + 3, K - 1))


@numba.njit(inline="always")
def _dw_tap_offsets(row, tt):
    """The DT offsets of tap block ``tt`` from one output row's tap table, unsigned (no
    negative-index wraparound to check in the loads)."""
    return (np.uint64(row[tt * DT + 0]), np.uint64(row[tt * DT + 1]),
            np.uint64(row[tt * DT + 2]), np.uint64(row[tt * DT + 3]),
            np.uint64(row[tt * DT + 4]))


@numba.njit(inline="always")
def _dw_pixel_inputs(xn, u, o0, o1, o2, o3, o4, keep, zero):
    """Lane ``u`` of the DT input vectors of a pixel dW step (zero unless ``keep``)."""
    return (xn[u + o0] if keep else zero, xn[u + o1] if keep else zero,
            xn[u + o2] if keep else zero, xn[u + o3] if keep else zero,
            xn[u + o4] if keep else zero)


@numba.njit(inline="always")
def _dw_pixel_step(acc, q, e0, e1, e2, e3, a0, a1, a2, a3, a4):
    """Lane ``q`` of one step of the pixel dW tile: DK deltas times DT inputs."""
    acc[0, q] += e0 * a0
    acc[1, q] += e0 * a1
    acc[2, q] += e0 * a2
    acc[3, q] += e0 * a3
    acc[4, q] += e0 * a4
    acc[5, q] += e1 * a0
    acc[6, q] += e1 * a1
    acc[7, q] += e1 * a2
    acc[8, q] += e1 * a3
    acc[9, q] += e1 * a4
    acc[10, q] += e2 * a0
    acc[11, q] += e2 * a1
    acc[12, q] += e2 * a2
    acc[13, q] += e2 * a3
    acc[14, q] += e2 * a4
    acc[15, q] += e3 * a0
    acc[16, q] += e3 * a1
    acc[17, q] += e3 * a2
    acc[18, q] += e3 * a3
    acc[19, q] += e3 * a4


@numba.njit(inline="always")
def _dw_pixel_sums(acc, out, zero):
    """``out[a, b]`` (DK, DT) = the sum of the lanes of the pixel dW tile's ``a*DT + b``."""
    for a in range(DK):
        for b in range(DT):
            tot = zero
            for q in range(PX):
                tot += acc[a * DT + b, q]
            out[a, b] = tot


@parallel_kernel
def conv_dw_pool_planes(x, g, sel, toff, part):
    """:func:`conv_dw_pixels` on deltas in pool order that it makes as it reads them from
    the pooled deltas, for the layer before a 2x2 max pool: the 4x larger pool-order
    deltas are never written.

    ``dy[n, k, d, m] = g[n, k, m]`` if ``sel[n, k, m] == d`` else 0, for the four planes
    ``d`` (rows of ``toff``, (4, ceil(T/DT)*DT)); g : (N, K, M) the pooled deltas, ReLU
    applied; sel : (N, K, M) int8 the window position of each maximum
    (:func:`max_pool_2x2_planes_fwd`).  x, part and the tile as in :func:`conv_dw_pixels`.
    Each pixel vector of ``g`` and ``sel`` is loaded once for all four planes; the selects
    cost less than the loads of the deltas they replace.
    """
    N, K, M = g.shape
    P, KTn, TTn = part.shape[:3]
    NT = KTn * TTn
    JT = (M + PX - 1) // PX
    for task in prange(P * NT):
        p, n0, n1, kt, tt, k0, k1, k2, k3 = _dw_pixel_task(task, NT, N, P, TTn, K)
        zero = x.dtype.type(0)
        acc = stack_tile(20, PX, part.dtype)  # DK * DT rows
        for a in range(DK * DT):
            for q in range(PX):
                acc[a, q] = 0
        for n in range(n0, n1):
            xn = x[n]
            g0 = g[n, k0]
            g1 = g[n, k1]
            g2 = g[n, k2]
            g3 = g[n, k3]
            s0 = sel[n, k0]
            s1 = sel[n, k1]
            s2 = sel[n, k2]
            s3 = sel[n, k3]
            for jt in range(JT):
                j0 = min(jt * PX, M - PX)
                lo = jt * PX - j0  # lanes below lo were counted by the previous vector
                uj = np.uint64(j0)
                for d in range(4):
                    o0, o1, o2, o3, o4 = _dw_tap_offsets(toff[d], tt)
                    for q in range(PX):
                        uq = np.uint64(q)
                        keep = q >= lo
                        e0 = g0[uj + uq] if keep & (s0[uj + uq] == d) else zero
                        e1 = g1[uj + uq] if keep & (s1[uj + uq] == d) else zero
                        e2 = g2[uj + uq] if keep & (s2[uj + uq] == d) else zero
                        e3 = g3[uj + uq] if keep & (s3[uj + uq] == d) else zero
                        a0, a1, a2, a3, a4 = _dw_pixel_inputs(xn, uj + uq, o0, o1, o2, o3,
                                                              o4, keep, zero)
                        _dw_pixel_step(acc, q, e0, e1, e2, e3, a0, a1, a2, a3, a4)
        _dw_pixel_sums(acc, part[p, kt, tt], zero)


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
