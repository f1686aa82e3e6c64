"""Slow, obviously correct NumPy convolutions: the oracle the kernels are tested against.

Written the way the classic write-ups of CNN back-propagation derive them, with zero
padding, zeros inserted between strided deltas, 180-degree rotated filters and explicit
sums.  Loops run over output pixels or filter taps; only the batch and channel sums are
vectorised (``einsum``), so the tests stay quick on small shapes.

All functions take normalised arguments: ``stride`` and ``dilation`` as ``(h, w)`` pairs,
``pads`` as ``(top, bottom, left, right)``.  :func:`fastconv.conv_geometry` turns the
public arguments (ints, ``'same'``, ...) into these.

Legend: ``x, w, b, y, dy, dx, dw``; ``N, C, H, W, K, R, S, OH, OW``; ``G`` groups.
"""

from __future__ import annotations

import numpy as np


def pad(a, pads):
    """Zero-pad the last two axes of ``a`` by ``(top, bottom, left, right)``."""
    pt, pb, pl, pr = pads
    return np.pad(a, [(0, 0)] * (a.ndim - 2) + [(pt, pb), (pl, pr)])


def insert_zeros(a, step_h, step_w):
    """Insert ``step-1`` zeros between neighbouring elements of the last two axes.

    This is how a stride (on deltas) or a dilation (on filters) becomes a stride-1,
    undilated problem: ``[a, b]`` with step 3 becomes ``[a, 0, 0, b]``.
    """
    *lead, h, w = a.shape
    out = np.zeros((*lead, (h - 1) * step_h + 1, (w - 1) * step_w + 1), a.dtype)
    out[..., ::step_h, ::step_w] = a
    return out


def rotate180(w):
    """Rotate filters by 180 degrees: flip both spatial axes."""
    return w[..., ::-1, ::-1]


def conv2d_forward(x, w, b=None, stride=(1, 1), pads=(0, 0, 0, 0), dilation=(1, 1), groups=1):
    """Forward pass: a strided correlation of the padded input with the dilated filter.

    ``y[n,k,i,j] = b[k] + sum_{c,r,s} x_pad[n, g*Cg + c, i*sh + r*dlh, j*sw + s*dlw] w[k,c,r,s]``

    x : (N, C, H, W); w : (K, C/groups, R, S); b : (K,) or None -> y : (N, K, OH, OW).
    """
    sh, sw = stride
    xp = pad(x, pads)
    wd = insert_zeros(w, *dilation)  # the dilated filter, zeros between taps
    N, C, Hp, Wp = xp.shape
    K, Cg, Rd, Sd = wd.shape
    Kg = K // groups
    OH, OW = (Hp - Rd) // sh + 1, (Wp - Sd) // sw + 1
    y = np.zeros((N, K, OH, OW), np.result_type(x, w))
    for g in range(groups):
        ks, cs = slice(g * Kg, (g + 1) * Kg), slice(g * Cg, (g + 1) * Cg)
        for i in range(OH):
            for j in range(OW):
                patch = xp[:, cs, i * sh:i * sh + Rd, j * sw:j * sw + Sd]
                y[:, ks, i, j] = np.einsum("ncrs,kcrs->nk", patch, wd[ks])
    if b is not None:
        y += np.asarray(b)[None, :, None, None]
    return y


def conv2d_grad_weight(x, dy, weight_shape, stride=(1, 1), pads=(0, 0, 0, 0),
                       dilation=(1, 1), groups=1):
    """dW: the correlation of the padded input with the stride-dilated deltas.

    Each weight is shared by every output position, so its gradient is the sum over all
    of them: ``dw[k,c,r,s] = sum_{n,i,j} dy[n,k,i,j] x_pad[n, g*Cg + c, i*sh + r*dlh,
    j*sw + s*dlw]``.  With ``sh-1`` zeros inserted between the deltas, that is a plain
    stride-1 correlation ``x_pad * dy_dilated``, read at the dilated tap positions.

    x : (N, C, H, W); dy : (N, K, OH, OW) -> dw : weight_shape = (K, C/groups, R, S).
    """
    K, Cg, R, S = weight_shape
    dlh, dlw = dilation
    xp = pad(x, pads)
    dyd = insert_zeros(dy, *stride)
    Kg = K // groups
    Hd, Wd = dyd.shape[2:]
    dw = np.zeros(weight_shape, np.result_type(x, dy))
    for g in range(groups):
        ks, cs = slice(g * Kg, (g + 1) * Kg), slice(g * Cg, (g + 1) * Cg)
        for r in range(R):
            for s in range(S):
                patch = xp[:, cs, r * dlh:r * dlh + Hd, s * dlw:s * dlw + Wd]
                dw[ks, :, r, s] = np.einsum("nkij,ncij->kc", dyd[:, ks], patch)
    return dw


def conv2d_grad_input(dy, w, input_shape, stride=(1, 1), pads=(0, 0, 0, 0), dilation=(1, 1),
                      groups=1):
    """dX: the full convolution of the 180-degree rotated filters with the deltas.

    1. insert ``stride-1`` zeros between the deltas;
    2. pad them by the dilated kernel size minus one on every side (a *full* convolution);
    3. correlate with the rotated, dilated filters, summing over all K filters of the group;
    4. place the result on the padded input grid and crop the padding away.

    dy : (N, K, OH, OW); w : (K, C/groups, R, S) -> dx : input_shape = (N, C, H, W).
    """
    N, C, H, W = input_shape
    pt, pb, pl, pr = pads
    dyd = insert_zeros(dy, *stride)
    wr = rotate180(insert_zeros(w, *dilation))
    K, Cg, Rd, Sd = wr.shape
    Kg = K // groups
    dyp = pad(dyd, (Rd - 1, Rd - 1, Sd - 1, Sd - 1))
    Hc, Wc = dyp.shape[2] - Rd + 1, dyp.shape[3] - Sd + 1  # rows/cols reached by any output
    dx_pad = np.zeros((N, C, H + pt + pb, W + pl + pr), np.result_type(dy, w))
    for g in range(groups):
        ks, cs = slice(g * Kg, (g + 1) * Kg), slice(g * Cg, (g + 1) * Cg)
        for h in range(Hc):
            for v in range(Wc):
                patch = dyp[:, ks, h:h + Rd, v:v + Sd]
                dx_pad[:, cs, h, v] = np.einsum("nkrs,kcrs->nc", patch, wr[ks])
    return dx_pad[:, :, pt:pt + H, pl:pl + W]


def conv2d_grad_bias(dy):
    """db: every bias is added to every output position of its channel, ``db[k] = sum dy``."""
    return dy.sum(axis=(0, 2, 3))


def max_pool2d(x, kernel, stride, padding):
    """Max pooling with -inf padding, and for each output the flat input index of the first
    maximum in row-major window order.  Returns ``(y, indices)``."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    N, C, H, W = x.shape
    xp = np.pad(x.astype(np.float64), [(0, 0), (0, 0), (ph, ph), (pw, pw)],
                constant_values=-np.inf)
    OH, OW = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    y = np.empty((N, C, OH, OW))
    idx = np.empty((N, C, OH, OW), np.int64)
    for n in range(N):
        for c in range(C):
            for i in range(OH):
                for j in range(OW):
                    win = xp[n, c, i * sh:i * sh + kh, j * sw:j * sw + kw]
                    k = int(np.argmax(win))  # first occurrence of the maximum (or a NaN)
                    r, s = divmod(k, kw)
                    y[n, c, i, j] = win[r, s]
                    idx[n, c, i, j] = (i * sh + r - ph) * W + (j * sw + s - pw)
    return y.astype(x.dtype), idx


def max_pool2d_backward(dy, idx, input_shape):
    """Each delta goes to the position its window's maximum came from."""
    dx = np.zeros(input_shape, dy.dtype)
    N, C, H, W = input_shape
    for n, c, i, j in np.ndindex(dy.shape):
        h, w = divmod(int(idx[n, c, i, j]), W)
        dx[n, c, h, w] += dy[n, c, i, j]
    return dx


def avg_pool2d(x, kernel, stride, padding):
    """Average over each window, zero padding counted in the divisor ``kh*kw``."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    xp = pad(x, (ph, ph, pw, pw))
    OH, OW = (xp.shape[2] - kh) // sh + 1, (xp.shape[3] - kw) // sw + 1
    y = np.empty((*x.shape[:2], OH, OW), x.dtype)
    for i in range(OH):
        for j in range(OW):
            y[:, :, i, j] = xp[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw].mean(axis=(2, 3))
    return y


def avg_pool2d_backward(dy, input_shape, kernel, stride, padding):
    """Each delta is spread evenly, ``dy/(kh*kw)``, over its window; padding is dropped."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    N, C, H, W = input_shape
    dxp = np.zeros((N, C, H + 2 * ph, W + 2 * pw), dy.dtype)
    for i in range(dy.shape[2]):
        for j in range(dy.shape[3]):
            dxp[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw] += (
                dy[:, :, i, j, None, None] / (kh * kw))
    return dxp[:, :, ph:ph + H, pw:pw + W]
