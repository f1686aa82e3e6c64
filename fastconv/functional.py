"""More of ``torch.nn.functional``, with its signatures: :func:`conv1d` and its two
gradients, :func:`conv_transpose2d` and its two gradients, :func:`linear`, :func:`relu`,
:func:`max_pool2d` and :func:`avg_pool2d`.

None has a kernel of its own.  The convolutions run the 2-D plans (:mod:`fastconv.plan`):
a 1-D convolution is a 2-D one of height 1 (:func:`fastconv.geometry.conv1d_geometry`),
and a transposed convolution is the dX of a conv2d
(:func:`fastconv.geometry.conv_transpose2d_geometry`), its gradients that conv2d's forward
pass and dW.  :func:`linear` runs :func:`fastconv.linalg.matmul`, the others the ops of
:mod:`fastconv.ops` and :mod:`fastconv.pool`.

Legend: ``x, w, b, y, dy, dx, dw`` and ``N, C, K, R, S, H, W``; ``L`` and ``OL`` the
input and output lengths of a 1-D convolution; ``C_in, C_out`` a transposed convolution's
input and output channels.
"""

from __future__ import annotations

import numpy as np

from . import _checks, ops, plan, pool
from ._args import (
    _as_array,
    _as_float,
    _bool,
    _check_bias,
    _check_order,
    _check_rank,
    _describe,
    _pair,
    _result_dtype,
    _shape,
    _shape4,
)
from .geometry import (
    ConvGeometry,
    _check_grad_output,
    conv1d_geometry,
    conv_transpose2d_geometry,
)
from .linalg import matmul

__all__ = ["avg_pool2d", "conv1d", "conv1d_grad_input", "conv1d_grad_weight",
           "conv_transpose2d", "conv_transpose2d_grad_input", "conv_transpose2d_grad_weight",
           "linear", "max_pool2d", "relu"]


# ---- 1-D convolution -------------------------------------------------------------------


def conv1d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """1-D convolution (cross-correlation), like ``torch.nn.functional.conv1d``.

    ``y[n,k,j] = b[k] + sum_{c,s} x[n, g*Cg + c, j*stride + s*dilation - p] * w[k, c, s]``
    with ``g = k // (K/groups)`` and zeros outside the input.

    Parameters
    ----------
    input : array (N, C, L), or (C, L) for one unbatched sequence
    weight : array (K, C/groups, R)
    bias : array (K,), optional
    stride, dilation : int or (int,), >= 1
    padding : int or (int,) >= 0, or ``'valid'`` or ``'same'`` (stride 1 only; for even
        kernels the extra element is at the end, as in PyTorch)
    groups : int dividing C and K

    Returns
    -------
    ndarray (N, K, OL), or (K, OL) for unbatched input
        float32 if all arguments are float16/float32, else float64.
    """
    x = _as_array("input", input)
    w = _as_array("weight", weight)
    b = None if bias is None else _as_array("bias", bias)
    unbatched = x.ndim == 2
    if unbatched:
        x = x[None]
    _check_rank("input", x, "(N, C, L) or 2-D (C, L)", 3)
    _check_rank("weight", w, "(K, C/groups, R)", 3)
    geo = conv1d_geometry(x.shape, w.shape, stride, padding, dilation, groups)
    _check_bias(b, geo.K, "K")
    dtype = _result_dtype(x, w, b)
    y = plan.plan_for(geo, dtype)._run(
        "forward", x[:, :, None].astype(dtype, copy=False), w[:, :, None].astype(dtype, copy=False),
        None if b is None else b.astype(dtype, copy=False))
    y = y.reshape(geo.N, geo.K, geo.OW)
    return y[0] if unbatched else y


def conv1d_grad_input(grad_output, weight, input_shape, stride=1, padding=0, dilation=1,
                      groups=1):
    """Gradient of :func:`conv1d` with respect to its input, like
    ``torch.nn.grad.conv1d_input`` (whose arguments come in another order: ``(input_size,
    weight, grad_output)``).

    Parameters
    ----------
    grad_output : array (N, K, OL)
        The deltas ``dL/dy``.
    weight : array (K, C/groups, R)
    input_shape : (N, C, L)
    stride, padding, dilation, groups
        As given to :func:`conv1d`.

    Returns
    -------
    ndarray (N, C, L)
    """
    _check_order("conv1d_grad_input", "grad_output, weight, input_shape",
                 "torch.nn.grad.conv1d_input (input_size, weight, grad_output)",
                 "grad_output", grad_output, "input_shape", input_shape)
    dy = _as_array("grad_output", grad_output)
    w = _as_array("weight", weight)
    _check_rank("weight", w, "(K, C/groups, R)", 3)
    input_shape = _shape("input_shape", input_shape, 3)
    geo = conv1d_geometry(input_shape, w.shape, stride, padding, dilation, groups)
    _check_grad_output(dy, geo, f"input_shape {input_shape} with weight {w.shape}",
                       "(N, K, OL)", (geo.N, geo.K, geo.OW))
    dtype = _result_dtype(dy, w)
    dx = plan.plan_for(geo, dtype)._run(
        "grad_input", dy[:, :, None].astype(dtype, copy=False),
        w[:, :, None].astype(dtype, copy=False))
    return dx.reshape(input_shape)


def conv1d_grad_weight(input, grad_output, weight_shape, stride=1, padding=0, dilation=1,
                       groups=1):
    """Gradient of :func:`conv1d` with respect to its weight, like
    ``torch.nn.grad.conv1d_weight`` (whose arguments come in another order: ``(input,
    weight_size, grad_output)``).

    Parameters
    ----------
    input : array (N, C, L)
    grad_output : array (N, K, OL)
    weight_shape : (K, C/groups, R)
    stride, padding, dilation, groups
        As given to :func:`conv1d`.

    Returns
    -------
    ndarray (K, C/groups, R)
    """
    _check_order("conv1d_grad_weight", "input, grad_output, weight_shape",
                 "torch.nn.grad.conv1d_weight (input, weight_size, grad_output)",
                 "grad_output", grad_output, "weight_shape", weight_shape)
    x = _as_array("input", input)
    dy = _as_array("grad_output", grad_output)
    _check_rank("input", x, "(N, C, L)", 3)
    weight_shape = _shape("weight_shape", weight_shape, 3)
    geo = conv1d_geometry(x.shape, weight_shape, stride, padding, dilation, groups)
    _check_grad_output(dy, geo, f"input {x.shape} with weight_shape {weight_shape}",
                       "(N, K, OL)", (geo.N, geo.K, geo.OW))
    dtype = _result_dtype(x, dy)
    dw = plan.plan_for(geo, dtype)._run(
        "grad_weight", x[:, :, None].astype(dtype, copy=False),
        dy[:, :, None].astype(dtype, copy=False))
    return dw.reshape(weight_shape)


# ---- transposed 2-D convolution --------------------------------------------------------


def _grown(a: np.ndarray, geo: ConvGeometry) -> np.ndarray:
    """``a`` (N, C_in, H, W), the deltas of the conv2d of ``geo``, with the zero rows and
    columns that ``output_padding >= stride`` adds to them (``geo.OH x geo.OW``)."""
    H, W = a.shape[2:]
    if (H, W) == (geo.OH, geo.OW):
        return a
    return np.pad(a, ((0, 0), (0, 0), (0, geo.OH - H), (0, geo.OW - W)))


def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0,
                     groups=1, dilation=1):
    """Transposed 2-D convolution, like ``torch.nn.functional.conv_transpose2d``: the
    gradient of :func:`fastconv.conv2d` with respect to its input
    (:func:`fastconv.conv2d_grad_input`), with ``input`` as the deltas.

    Parameters
    ----------
    input : array (N, C_in, H, W), or (C_in, H, W) for one unbatched image
    weight : array (C_in, C_out/groups, R, S)
    bias : array (C_out,), optional
    stride, dilation : int or (h, w) pair, >= 1
    padding : int or (h, w) pair, >= 0: taken off each side of the output
    output_padding : int or (h, w) pair, >= 0: added to the bottom and right of the
        output; each smaller than the stride or the dilation
    groups : int dividing C_in

    Returns
    -------
    ndarray (N, C_out, OH, OW), or (C_out, OH, OW) for unbatched input
        ``OH = (H - 1)*stride - 2*padding + dilation*(R - 1) + output_padding + 1``, ``OW``
        likewise.  float32 if all arguments are float16/float32, else float64.
    """
    x = _as_array("input", input)
    w = _as_array("weight", weight)
    b = None if bias is None else _as_array("bias", bias)
    unbatched = x.ndim == 3
    if unbatched:
        x = x[None]
    _check_rank("input", x, "(N, C_in, H, W) or 3-D (C_in, H, W)")
    _check_rank("weight", w, "(C_in, C_out/groups, R, S)")
    geo = conv_transpose2d_geometry(x.shape, w.shape, stride, padding, output_padding, groups,
                                    dilation)
    _check_bias(b, geo.C, "C_out")
    dtype = _result_dtype(x, w, b)
    y = plan.plan_for(geo, dtype)._run("grad_input", _grown(x.astype(dtype, copy=False), geo),
                                       w.astype(dtype, copy=False))
    if b is not None:
        y += b.astype(dtype, copy=False)[:, None, None]
    return y[0] if unbatched else y


def conv_transpose2d_grad_input(grad_output, weight, input_shape, stride=1, padding=0,
                                output_padding=0, groups=1, dilation=1):
    """Gradient of :func:`conv_transpose2d` with respect to its input: the conv2d forward
    pass of ``grad_output`` with the same weights.

    Parameters
    ----------
    grad_output : array (N, C_out, OH, OW)
    weight : array (C_in, C_out/groups, R, S)
    input_shape : (N, C_in, H, W)
    stride, padding, output_padding, groups, dilation
        As given to :func:`conv_transpose2d`.

    Returns
    -------
    ndarray (N, C_in, H, W)
    """
    _check_order("conv_transpose2d_grad_input", "grad_output, weight, input_shape",
                 "torch.nn.grad's functions (input_size, weight, grad_output)",
                 "grad_output", grad_output, "input_shape", input_shape)
    dy = _as_array("grad_output", grad_output)
    w = _as_array("weight", weight)
    _check_rank("weight", w, "(C_in, C_out/groups, R, S)")
    input_shape = _shape4("input_shape", input_shape)
    geo = conv_transpose2d_geometry(input_shape, w.shape, stride, padding, output_padding,
                                    groups, dilation)
    _check_grad_output(dy, geo, f"input_shape {input_shape} with weight {w.shape}",
                       "(N, C_out, OH, OW)", (geo.N, geo.C, geo.H, geo.W))
    dtype = _result_dtype(dy, w)
    dx = plan.plan_for(geo, dtype)._run("forward", dy.astype(dtype, copy=False),
                                        w.astype(dtype, copy=False), None)
    H, W = input_shape[2:]
    return dx if dx.shape[2:] == (H, W) else np.ascontiguousarray(dx[:, :, :H, :W])


def conv_transpose2d_grad_weight(input, grad_output, weight_shape, stride=1, padding=0,
                                 output_padding=0, groups=1, dilation=1):
    """Gradient of :func:`conv_transpose2d` with respect to its weight: the conv2d dW with
    the roles swapped (``grad_output`` as that conv2d's input, ``input`` as its deltas).

    Parameters
    ----------
    input : array (N, C_in, H, W)
    grad_output : array (N, C_out, OH, OW)
    weight_shape : (C_in, C_out/groups, R, S)
    stride, padding, output_padding, groups, dilation
        As given to :func:`conv_transpose2d`.

    Returns
    -------
    ndarray (C_in, C_out/groups, R, S)
    """
    _check_order("conv_transpose2d_grad_weight", "input, grad_output, weight_shape",
                 "torch.nn.grad's functions (input, weight_size, grad_output)",
                 "grad_output", grad_output, "weight_shape", weight_shape)
    x = _as_array("input", input)
    dy = _as_array("grad_output", grad_output)
    _check_rank("input", x, "(N, C_in, H, W)")
    weight_shape = _shape4("weight_shape", weight_shape)
    geo = conv_transpose2d_geometry(x.shape, weight_shape, stride, padding, output_padding,
                                    groups, dilation)
    _check_grad_output(dy, geo, f"input {x.shape} with weight_shape {weight_shape}",
                       "(N, C_out, OH, OW)", (geo.N, geo.C, geo.H, geo.W))
    dtype = _result_dtype(x, dy)
    return plan.plan_for(geo, dtype)._run("grad_weight", dy.astype(dtype, copy=False),
                                          _grown(x.astype(dtype, copy=False), geo))


# ---- linear, relu, pools ---------------------------------------------------------------


def linear(input, weight, bias=None):
    """``y = x w^T + b``, like ``torch.nn.functional.linear``.

    Parameters
    ----------
    input : array (*, in_features): any number of leading axes, none included
    weight : array (out_features, in_features)
    bias : array (out_features,), optional

    Returns
    -------
    ndarray (*, out_features)
        In the dtype rules of :func:`fastconv.conv2d`; the product runs on
        :func:`fastconv.linalg.matmul`.
    """
    x = _as_array("input", input)
    w = _as_array("weight", weight)
    b = None if bias is None else _as_array("bias", bias)
    if w.ndim != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape "
                         f"{w.shape}")
    M, Q = w.shape
    if x.ndim < 1 or x.shape[-1] != Q:
        raise ValueError(f"input must have in_features = {Q} elements on its last axis "
                         f"(weight shape {w.shape}), got shape {x.shape}")
    _check_bias(b, M, "out_features")
    dtype = _result_dtype(x, w, b)
    x2 = x.reshape(int(np.prod(x.shape[:-1])), Q).astype(dtype, copy=False)
    if x2.shape[0] == 0 or Q == 0:
        y = np.zeros((x2.shape[0], M), dtype)
    else:
        y = matmul(x2, w.T.astype(dtype, copy=False))
    if b is not None:
        y += b.astype(dtype, copy=False)
    return y.reshape(*x.shape[:-1], M)


def relu(input, inplace=False):
    """``max(input, 0)``, like ``torch.nn.functional.relu`` (a NaN stays NaN).

    Parameters
    ----------
    input : array of any shape
    inplace : bool
        Write the result into ``input`` and return it: a C-contiguous, writeable float32
        or float64 array.

    Returns
    -------
    ndarray of the input's shape, in the dtype rules of :func:`fastconv.conv2d` (integer
    input gives float64, where torch keeps the integers).
    """
    if _bool("inplace", inplace):
        x = _checks.array("input", input, np.shape(input), _checks.FLOATS, writeable=True)
        flat = x.reshape(-1)  # a view: x is C-contiguous
        ops.relu(flat, out=flat)
        return x
    return ops.relu(input)


def _refuse(name: str, value, only: str) -> None:
    raise ValueError(f"{name}={_describe(value)} is not supported by fastconv's pools (only "
                     f"{only})")


def _pool_input(input):
    """``(x, unbatched)``: ``x`` (N, C, H, W), an unbatched (C, H, W) image with N = 1."""
    x = _as_float("input", input)
    unbatched = x.ndim == 3
    if unbatched:
        x = x[None]
    _check_rank("input", x, "(N, C, H, W) or 3-D (C, H, W)")
    return x, unbatched


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False):
    """2-D max pooling, like ``torch.nn.functional.max_pool2d`` (:func:`fastconv.pool.
    max_pool2d`, which has no ``dilation`` or ``ceil_mode``).

    Parameters
    ----------
    input : array (N, C, H, W), or (C, H, W)
    kernel_size : int or (h, w) pair
    stride : int or (h, w) pair, or None for ``kernel_size``
    padding : int or (h, w) pair, at most half the kernel (padded with -inf)
    dilation : 1 only
    ceil_mode : False only
    return_indices : bool
        Also return the flat index ``h*W + w`` of each maximum in its plane, int64.

    Returns
    -------
    ndarray (N, C, OH, OW), or (C, OH, OW); with the indices of that shape if asked
    """
    if _pair("dilation", dilation, 1) != (1, 1):
        _refuse("dilation", dilation, "dilation=1")
    if _bool("ceil_mode", ceil_mode):
        _refuse("ceil_mode", ceil_mode, "ceil_mode=False")
    x, unbatched = _pool_input(input)
    result = pool.max_pool2d(x, kernel_size, stride, padding, return_indices)
    if not unbatched:
        return result
    return (result[0][0], result[1][0]) if return_indices else result[0]


def avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False,
               count_include_pad=True, divisor_override=None):
    """2-D average pooling, like ``torch.nn.functional.avg_pool2d``
    (:func:`fastconv.pool.avg_pool2d`): zero padding counted in the divisor.

    Parameters
    ----------
    input : array (N, C, H, W), or (C, H, W)
    kernel_size : int or (h, w) pair
    stride : int or (h, w) pair, or None for ``kernel_size``
    padding : int or (h, w) pair, at most half the kernel
    ceil_mode : False only
    count_include_pad : True only
    divisor_override : None only

    Returns
    -------
    ndarray (N, C, OH, OW), or (C, OH, OW)
    """
    if _bool("ceil_mode", ceil_mode):
        _refuse("ceil_mode", ceil_mode, "ceil_mode=False")
    if not _bool("count_include_pad", count_include_pad):
        _refuse("count_include_pad", count_include_pad, "count_include_pad=True")
    if divisor_override is not None:
        _refuse("divisor_override", divisor_override, "divisor_override=None")
    x, unbatched = _pool_input(input)
    y = pool.avg_pool2d(x, kernel_size, stride, padding)
    return y[0] if unbatched else y
