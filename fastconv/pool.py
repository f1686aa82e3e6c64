"""2-D max and average pooling with their backward passes, like ``torch.nn.functional``.

Windows are ``kernel_size`` (int or pair), ``stride`` defaults to ``kernel_size``, and
``padding`` (at most half the kernel, as in PyTorch) pads with -inf for max pooling and with
zeros, counted in the divisor, for average pooling.  Output sizes come from
:func:`fastconv.conv_output_size`, like every convolution's.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import _checks
from . import kernels as _k
from ._args import _as_float, _bool, _check_rank, _pair, _shape4
from .geometry import _output_size

__all__ = ["avg_pool2d", "avg_pool2d_backward", "max_pool2d", "max_pool2d_backward",
           "max_pool2d_relu_backward", "max_pool2x2_backward_packed",
           "max_pool2x2_relu_pool_order", "max_pool2x2_relu_pool_order_backward",
           "pool_geometry"]


class PoolGeometry(NamedTuple):
    kh: int
    kw: int
    sh: int
    sw: int
    ph: int
    pw: int
    OH: int
    OW: int


def pool_geometry(input_shape, kernel_size, stride=None, padding=0) -> PoolGeometry:
    """Validate pooling arguments for an (N, C, H, W) input and compute the output size.

    Parameters
    ----------
    input_shape : (N, C, H, W)
    kernel_size : int or (h, w) pair, >= 1
    stride : int or (h, w) pair >= 1, or None for ``kernel_size``
    padding : int or (h, w) pair, >= 0 and at most half the kernel

    Returns
    -------
    PoolGeometry
        With the output size ``OH x OW`` (each >= 1, or ``ValueError``).
    """
    input_shape = _shape4("input_shape", input_shape)
    kh, kw = _pair("kernel_size", kernel_size, 1)
    sh, sw = (kh, kw) if stride is None else _pair("stride", stride, 1)
    ph, pw = _pair("padding", padding, 0)
    if ph > kh // 2 or pw > kw // 2:
        raise ValueError(f"padding {(ph, pw)} must be at most half the kernel size "
                         f"{(kh, kw)}, so that every window holds an input element")
    H, W = input_shape[2], input_shape[3]
    OH = _output_size(H, kh, sh, ph, ph, 1)
    OW = _output_size(W, kw, sw, pw, pw, 1)
    if OH < 1 or OW < 1:
        raise ValueError(f"output size would be {OH}x{OW} (< 1): input {H}x{W} with padding "
                         f"{(ph, pw)} is smaller than the pooling window {kh}x{kw}")
    return PoolGeometry(kh, kw, sh, sw, ph, pw, OH, OW)


def _input(name, value):
    a = _as_float(name, value)
    _check_rank(name, a, "(N, C, H, W)")
    return a


def max_pool2d(input, kernel_size, stride=None, padding=0, return_indices=False):
    """Max pooling: the largest value of each window (a NaN wins).

    Parameters
    ----------
    input : array (N, C, H, W)
    kernel_size, stride, padding : int or (h, w) pair; ``stride`` defaults to the kernel

    Returns
    -------
    y : ndarray (N, C, OH, OW)
    indices : ndarray (N, C, OH, OW) int64, if ``return_indices``
        The flat index ``h*W + w`` of each maximum in its input plane (the first on ties),
        as :func:`max_pool2d_backward` takes it; int64 as in PyTorch, wide enough for any
        plane that fits in memory.
    """
    x = _input("input", input)
    return_indices = _bool("return_indices", return_indices)
    g = pool_geometry(x.shape, kernel_size, stride, padding)
    N, C = x.shape[:2]
    y = np.empty((N, C, g.OH, g.OW), x.dtype)
    arg = np.empty((N, C, g.OH, g.OW), np.int64)
    if y.size and g[:6] == (2, 2, 2, 2, 0, 0):
        _k.max_pool_2x2_fwd(x, y, arg)
    elif y.size:
        _k.max_pool_fwd(x, y, arg, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw)
    return (y, arg) if return_indices else y


def max_pool2d_backward(grad_output, indices, input_shape):
    """Route each delta to its window's maximum: ``dx[n, c, idx] += dy[n, c, i, j]``.

    Parameters
    ----------
    grad_output : array (N, C, OH, OW)
    indices : int array (N, C, OH, OW), from ``max_pool2d(..., return_indices=True)``;
        each in ``[0, H*W)``
    input_shape : (N, C, H, W)

    Returns
    -------
    ndarray (N, C, H, W)
    """
    dy = _input("grad_output", grad_output)
    arg = np.asarray(indices)
    shape = _shape4("input_shape", input_shape)
    if arg.dtype.kind not in "iu":
        raise TypeError(f"indices must be an integer array, got dtype {arg.dtype}")
    if arg.shape != dy.shape:
        raise ValueError(f"indices must be integers of the grad_output shape {dy.shape}, got "
                         f"{arg.dtype} {arg.shape}")
    if dy.shape[:2] != shape[:2]:
        raise ValueError(f"grad_output {dy.shape} and input_shape {shape} differ in (N, C)")
    if arg.size and (arg.min() < 0 or arg.max() >= shape[2] * shape[3]):
        raise ValueError(f"indices must lie in [0, H*W) = [0, {shape[2] * shape[3]}), got "
                         f"values in [{arg.min()}, {arg.max()}]")
    dx = np.empty(shape, dy.dtype)
    if dy.size:
        _k.max_pool_bwd(dy, arg.astype(np.int64, copy=False), dx, dy, False)
    else:
        dx[...] = 0
    return dx


def avg_pool2d(input, kernel_size, stride=None, padding=0):
    """Average pooling; zero padding is counted in the divisor (``count_include_pad``).

    Parameters
    ----------
    input : array (N, C, H, W)
    kernel_size, stride, padding : int or (h, w) pair; ``stride`` defaults to the kernel

    Returns
    -------
    ndarray (N, C, OH, OW)
    """
    x = _input("input", input)
    g = pool_geometry(x.shape, kernel_size, stride, padding)
    y = np.empty((*x.shape[:2], g.OH, g.OW), x.dtype)
    if y.size:
        _k.avg_pool_fwd(x, y, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw)
    return y


def avg_pool2d_backward(grad_output, input_shape, kernel_size, stride=None, padding=0):
    """Spread each delta evenly over its window: ``dx[window] += dy / (kh*kw)``.

    Parameters
    ----------
    grad_output : array (N, C, OH, OW)
    input_shape : (N, C, H, W)
    kernel_size, stride, padding : as given to :func:`avg_pool2d`

    Returns
    -------
    ndarray (N, C, H, W)
    """
    dy = _input("grad_output", grad_output)
    shape = _shape4("input_shape", input_shape)
    g = pool_geometry(shape, kernel_size, stride, padding)
    expected = (*shape[:2], g.OH, g.OW)
    if dy.shape != expected:
        raise ValueError(f"grad_output has shape {dy.shape}, but input_shape {shape} gives "
                         f"the pooled shape {expected}")
    dx = np.zeros(shape, dy.dtype)
    if dy.size:
        _k.avg_pool_bwd(dy, dx, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw)
    return dx


# ---- ReLU and a 2x2 max pool, fused, for the layers -------------------------------------
# relu(max_pool(x)) == max_pool(relu(x)) (max and ReLU commute), so a Sequential pools first
# and rectifies the 4x smaller output, and the backward of both is one pass: each delta
# goes to its window's maximum where the pooled output is positive.  These are the ops the
# layers run; each checks what it is handed against the forward's output ``y`` and
# ``indices`` (docs/memory-safety.md).


def _fused_state(dy, indices, y, kinds: str):
    """``dy`` C-contiguous in ``y``'s dtype, after checking that ``dy``, ``indices`` (an
    integer dtype of ``kinds``) and ``y`` have one shape."""
    y = _checks.array("y", y, np.shape(y), _checks.FLOATS)
    indices = np.asarray(indices)
    if indices.shape != y.shape or indices.dtype.kind not in kinds:
        raise ValueError(f"indices must be integers of y's shape {y.shape}, got "
                         f"{indices.dtype} {indices.shape}")
    dy = np.ascontiguousarray(dy, dtype=y.dtype)
    if dy.shape != y.shape:
        raise ValueError(f"backward got grad_output of shape {dy.shape}, but the forward "
                         f"output had shape {y.shape}")
    return dy, indices


def max_pool2d_relu_backward(grad_output, indices, y, input_shape) -> np.ndarray:
    """The backward of ``relu(max_pool2d(x))`` (any window), ``y`` its output and
    ``indices`` the pool's (flat indices in ``[0, H*W)``, :func:`max_pool2d`): dx
    (N, C, H, W)."""
    dy, arg = _fused_state(grad_output, indices, y, "iu")
    shape = _shape4("input_shape", input_shape)
    if arg.size and (arg.min() < 0 or arg.max() >= shape[2] * shape[3]):
        raise ValueError(f"indices must lie in [0, H*W) = [0, {shape[2] * shape[3]})")
    if dy.shape[:2] != shape[:2]:
        raise ValueError(f"grad_output {dy.shape} and input_shape {shape} differ in (N, C)")
    dx = np.empty(shape, dy.dtype)
    _k.max_pool_bwd(dy, arg.astype(np.int64, copy=False), dx, y, True)
    return dx


def max_pool2x2_relu_pool_order(y4, shape):
    """``relu(max_pool2d(y, 2))`` of a convolution output given in pool order ``y4``
    (N, C, 4, M) (:mod:`fastconv.layouts`, "Pool order") whose NCHW shape ``shape`` has an
    even height and width.

    Returns
    -------
    y : ndarray (N, C, H/2, W/2)
    positions : ndarray (N, C, H/2, W/2) int8
        Each maximum's window position ``2*(h % 2) + w % 2``.
    """
    N, C, H, W = _shape4("shape", shape)
    if H % 2 or W % 2:
        raise ValueError(f"pool order needs an even output size, got shape {shape}")
    _checks.array("y4", y4, (N, C, 4, H // 2 * W // 2), _checks.FLOATS)
    y = np.empty((N, C, H // 2, W // 2), y4.dtype)
    positions = np.empty((N, C, H // 2, W // 2), np.int8)
    _k.max_pool_2x2_planes_fwd(y4, y.reshape(N, C, -1), positions.reshape(N, C, -1))
    return y, positions


def max_pool2x2_relu_pool_order_backward(grad_output, positions, y):
    """The ReLU part of the backward of :func:`max_pool2x2_relu_pool_order`: the pooled
    deltas that pass, ``g`` (N, C, M), and their sums per image and channel (N, C)
    float64; the window positions route them (``layouts.PooledDeltas(g, positions)``)."""
    dy, _ = _fused_state(grad_output, positions, y, "i")
    N, C = y.shape[:2]
    g = np.empty((N, C, y[0, 0].size), y.dtype)
    dsum = np.empty((N, C), np.float64)
    _k.max_pool_2x2_planes_bwd(dy.reshape(N, C, -1), y.reshape(N, C, -1), g, dsum)
    return g, dsum


def max_pool2x2_backward_packed(grad_output, indices, y, relu: bool, layout, input_shape,
                                out=None, positions: bool = False):
    """The backward of a 2x2, stride-2 max pool (of ReLU and the pool if ``relu``), written
    straight into the channels-last delta ``layout`` of the convolution before it
    (``layouts.DeltaLayout``), into ``out`` if given.

    ``indices`` are the pool's flat indices (:func:`max_pool2d`), or with ``positions``
    the window positions of :func:`max_pool2x2_relu_pool_order`; ``y`` the forward's
    output; ``input_shape`` the pool's input (the convolution's output) shape.

    Returns
    -------
    dyp : ndarray of ``layout.shape``
    dsum : ndarray (N, Cd) float64
        Each image's sum of ``dyp`` per channel: the convolution's bias gradient in parts.
    """
    from .layouts import _check_fits

    dy, arg = _fused_state(grad_output, indices, y, "i" if positions else "iu")
    shape = _shape4("input_shape", input_shape)
    _check_fits(layout, *shape)  # the kernel writes (N, C, H, W) into the layout
    if dy.shape != (*shape[:2], shape[2] // 2, shape[3] // 2):
        raise ValueError(f"grad_output {dy.shape} is not the 2x2 pool of {shape}")
    dyp = np.empty(layout.shape, dy.dtype) if out is None else _checks.array(
        "out", out, layout.shape, dy.dtype, writeable=True)
    dsum = np.empty((layout.shape[0], layout.shape[3]), np.float64)
    _k.max_pool_2x2_bwd_channels_last(dy, arg, y, bool(relu), dyp, layout.top, layout.left,
                                      shape[2], shape[3], layout.KgP, dsum, bool(positions))
    return dyp, dsum
