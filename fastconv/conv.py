"""The public convolution API, and the training path of the layers.

The functional API (:func:`conv2d`, :func:`conv2d_grad_input`, :func:`conv2d_grad_weight`,
:func:`conv2d_grad_bias`) validates and normalises its arguments, takes the plan of them
from the cache (:mod:`fastconv.plan`) and runs it.  Its semantics are those of
``torch.nn.functional.conv2d``, ``torch.nn.grad.conv2d_input`` and
``torch.nn.grad.conv2d_weight``: NCHW activations, ``(K, C/groups, R, S)`` weights,
cross-correlation (no kernel flip in the forward pass), zero padding.  The 1-D and
transposed convolutions, on the same plans, are in :mod:`fastconv.functional`.

The training path (:func:`conv2d_saving`, :func:`backward_saved`,
:func:`backward_pool_order`, :func:`backward_input`) is what :class:`fastconv.nn.Conv2d`
runs: the same plan's algorithms, keeping the layouts the backward passes read again
(:func:`saved_kind`) and writing pool order for a 2x2 max pool after the layer.  Shapes
and sizes are in :mod:`fastconv.geometry`, layouts in :mod:`fastconv.layouts`, the
algorithms in :mod:`fastconv.algorithms`.

Legend: ``x, w, b, y, dy, dx, dw`` and ``N, C, H, W, K, R, S, OH, OW, G`` as in
:mod:`fastconv.kernels`.
"""

from __future__ import annotations

import numba
import numpy as np

from . import _checks, algorithms, config, plan
from . import kernels as _k
from ._args import (
    _as_array,
    _as_float,
    _check_bias,
    _check_order,
    _check_rank,
    _describe,
    _is_int,
    _result_dtype,
    _shape4,
)
from .algorithms import small
from .algorithms.channel_tile import _grad_bias_packed
from .algorithms.pixel import (
    PX,
    _forward_pixel_input,
    _forward_pixels,
    _grad_weight_pixel_input,
    _pixel_ok,
)
from .config import get_winograd, set_winograd
from .geometry import (
    ConvGeometry,
    _check_geometry,
    _check_grad_output,
    conv_geometry,
    conv_output_size,
)
from .layouts import (
    _FRESH,
    DeltaLayout,
    NCHWLayout,
    PixelInput,
    PooledDeltas,
    PoolOrderLayout,
    _check_layout,
    _check_workspace,
    _pack_input,
    _parity_taps,
    _pool_order_input,
    delta_layout,
    from_pool_order,
    pack_deltas,
    to_pool_order,
)

__all__ = [
    "ConvGeometry",
    "DeltaLayout",
    "NCHWLayout",
    "PoolOrderLayout",
    "PooledDeltas",
    "backward_pool_order",
    "backward_input",
    "backward_saved",
    "conv2d_saving",
    "delta_layout",
    "pack_deltas",
    "conv2d",
    "conv2d_grad_bias",
    "conv2d_grad_input",
    "conv2d_grad_weight",
    "conv_geometry",
    "conv_output_size",
    "from_pool_order",
    "get_num_threads",
    "get_winograd",
    "pool_order_ok",
    "saved_kind",
    "set_num_threads",
    "set_winograd",
    "to_pool_order",
]


def _planned(geo: ConvGeometry, dtype, pass_: str) -> str:
    """The name of the algorithm the plan of ``geo`` in ``dtype`` runs ``pass_`` with
    (:mod:`fastconv.plan`): the training path asks here, so that it runs what the
    functional API runs."""
    return plan.plan_for(geo, dtype).algorithms[pass_]


def _grad_input_packed(dyp: np.ndarray, layout: DeltaLayout, w: np.ndarray,
                       geo: ConvGeometry) -> np.ndarray:
    """dX from deltas in ``layout`` by the plan's algorithm (Winograd or the channel
    tile); ``w`` (K, Cg, R, S) in the deltas' dtype."""
    return plan.plan_for(geo, dyp.dtype)._run_packed("grad_input", dyp, layout, w)


def _grad_weight_packed(xp: np.ndarray, dyp: np.ndarray, layout: DeltaLayout,
                        geo: ConvGeometry, ws=_FRESH) -> np.ndarray:
    """dW (K, Cg, R, S) from the packed input (:func:`_pack_input`) and packed deltas, by
    the plan's algorithm (Winograd or the channel tile)."""
    return plan.plan_for(geo, dyp.dtype)._run_packed("grad_weight", xp, dyp, layout, ws=ws)


def _forward_packed(xp: np.ndarray, w: np.ndarray, b, geo: ConvGeometry,
                    ws=_FRESH, pool_order=False, p=None) -> np.ndarray:
    """y (N, K, OH, OW) from the packed input by the plan's algorithm (Winograd or the
    channel tile); ``w``, ``b`` in its dtype; ``y`` is the array ``"y"`` of workspace
    ``ws``.  With ``pool_order``, y (N, K, 4, OH/2 * OW/2) in pool order: each plane a
    convolution of twice the stride (see "Pool order" in :mod:`fastconv.layouts`).
    ``p``, if given, is the plan of ``geo`` to run (a layer's held plan, with its kept
    weights) instead of the shared cache's."""
    p = plan.plan_for(geo, xp.dtype) if p is None else p
    return p._run_packed("forward", xp, w, b, ws=ws, pool_order=pool_order)


def pool_order_ok(geo: ConvGeometry) -> bool:
    """Whether ``conv2d_saving(..., pool_order=True)`` can run this layer: an even output
    size, a problem too large for the serial kernels (which write NCHW), for the pixel
    path (:func:`_pixel_ok`) stride 1 and planes of at least ``PX`` pixels, and otherwise
    a forward algorithm that writes pool order (Winograd, the channel tile): a layer whose
    forward pass reads and writes NCHW (depthwise, grouped) runs it, then the pool."""
    if geo.OH % 2 or geo.OW % 2 or geo.N == 0 or small.slower(geo, None, "forward") is None:
        return False
    if _pixel_ok(geo):
        return (geo.sh, geo.sw) == (1, 1) and geo.OH * geo.OW >= 4 * PX
    # Whether an algorithm reads NCHW or the packed layouts does not depend on the dtype.
    forward = plan.plan_for(geo, np.float32).algorithms["forward"]
    return hasattr(algorithms.BY_NAME[forward], "packed_forward")


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def _forward_args(input, weight, bias):
    """The forward pass's arrays checked: ``(x, w, b, dtype, unbatched)``, ``x`` batched
    (N, C, H, W) (an unbatched (C, H, W) image gets N = 1), all still in their dtypes."""
    x = _as_array("input", input)
    w = _as_array("weight", weight)
    b = None if bias is None else _as_array("bias", bias)
    dtype = _result_dtype(x, w, b)
    unbatched = x.ndim == 3
    if unbatched:
        x = x[None]
    _check_rank("input", x, "(N, C, H, W) or 3-D (C, H, W)")
    _check_rank("weight", w, "(K, C/groups, R, S)")
    return x, w, b, dtype, unbatched


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """2-D convolution (cross-correlation), like ``torch.nn.functional.conv2d``.

    ``y[n,k,i,j] = b[k] + sum_{c,r,s} x[n, g*Cg + c, i*sh + r*dlh - pt, j*sw + s*dlw - pl]
    * w[k, c, r, s]`` with ``g = k // (K/groups)`` and zeros outside the input.

    Parameters
    ----------
    input : array (N, C, H, W), or (C, H, W) for one unbatched image
    weight : array (K, C/groups, R, S)
    bias : array (K,), optional
    stride, dilation : int or (h, w) pair, >= 1
    padding : int or (h, w) pair >= 0, or ``'valid'`` or ``'same'`` (stride 1 only; for
        even kernels the extra row/column is at the bottom/right, as in PyTorch)
    groups : int dividing C and K; ``groups == C`` is a depthwise convolution

    Returns
    -------
    ndarray (N, K, OH, OW), or (K, OH, OW) for unbatched input
        float32 if all arguments are float16/float32, else float64.
    """
    x, w, b, dtype, unbatched = _forward_args(input, weight, bias)
    p = plan.cached(x.shape, w.shape, stride, padding, dilation, groups, dtype)
    _check_bias(b, p.geometry.K)
    y = p._run("forward", x.astype(dtype, copy=False), w.astype(dtype, copy=False),
               None if b is None else b.astype(dtype, copy=False))
    return y[0] if unbatched else y


def conv2d_saving(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1,
                  workspace=None, reuse_output=False, pool_order=False):
    """:func:`conv2d`, also returning what its backward passes reuse.

    Returns
    -------
    y : ndarray, as :func:`conv2d`
        With ``pool_order``, (N, K, 4, OH/2 * OW/2) in pool order instead (see
        :func:`pool_order_ok` and :func:`from_pool_order`), for a 2x2 max pool after it.
    xp : ndarray (N, H + pt + pb, W + pl + pr, C), PixelInput or None
        The input as the kernels read it (zero-padded channels-last, in the result dtype):
        :func:`backward_saved` reads it again for dW.  None for an empty batch.  With
        ``pool_order`` on the pixel path (few input channels), the :class:`PixelInput`
        that :func:`backward_pool_order` reads instead.
    geo : ConvGeometry
        With ``N = 1`` for unbatched input.

    ``xp`` lives in ``workspace`` (a :class:`Workspace`) if one is given: the next call
    with the same workspace overwrites it.  With ``reuse_output``, so does ``y``: for a
    caller that is done with ``y`` before its next call (a layer whose output only the
    next layer reads).
    """
    if reuse_output and workspace is None:
        raise ValueError("reuse_output=True needs a workspace to keep the output in")
    _check_workspace(workspace)
    return _conv2d_saving(input, weight, bias, stride, padding, dilation, groups, workspace,
                          workspace if reuse_output else _FRESH, pool_order)


def saved_kind(geo: ConvGeometry, dtype, pool_order: bool = False) -> str:
    """What the training path keeps of a layer's input for dW, by the dW algorithm of the
    layer's plan (so that the layer runs what the functional API runs):

    * ``'pixels'``: the :class:`PixelInput` of pool order (pixel path with pool order);
      deltas in :class:`PoolOrderLayout`;
    * ``'packed'``: the zero-padded channels-last input (Winograd's or the channel tile's
      dW); deltas in :func:`delta_layout`, which dX reads too;
    * ``'input'``: the NCHW input itself (the pixel and NCHW-delta dW, which lay it out
      their own way); deltas NCHW (:class:`NCHWLayout`), as the functional API takes them.
    """
    if pool_order and _pixel_ok(geo):
        return "pixels"
    if hasattr(algorithms.BY_NAME[_planned(geo, dtype, "grad_weight")], "packed_grad_weight"):
        return "packed"
    return "input"


def _conv2d_saving(input, weight, bias, stride, padding, dilation, groups, workspace,
                   out_ws=_FRESH, pool_order=False, held=None):
    """:func:`conv2d_saving`.  ``y`` is the array ``"y"`` of ``out_ws``; ``held`` (a
    :class:`fastconv.plan.HeldPlan`, a layer's in evaluation) supplies the plan that runs
    a serial, Winograd or channel-tile forward pass, keeping its prepared weights."""
    x, w, b, dtype, unbatched = _forward_args(input, weight, bias)
    geo = conv_geometry(x.shape, w.shape, stride, padding, dilation, groups)
    _check_bias(b, geo.K)

    if pool_order and (unbatched or not pool_order_ok(geo)):
        raise ValueError(f"pool_order needs a batch and an even, non-empty output size "
                         f"(stride 1 for input of at most {config.PIXEL_MAX_C} channels); got "
                         f"input {x.shape}, weight {w.shape}, output {geo.OH}x{geo.OW}")
    if geo.N == 0:
        return np.empty((0, geo.K, geo.OH, geo.OW), dtype), None, geo
    x, w = x.astype(dtype, copy=False), w.astype(dtype, copy=False)
    b = None if b is None else b.astype(dtype, copy=False)
    ws = workspace or _FRESH
    kind = saved_kind(geo, dtype, pool_order)
    if kind == "pixels":
        px = _pool_order_input(x, geo, ws)
        return _forward_pixel_input(px, w, b, geo, out_ws), px, geo
    p = plan.plan_for(geo, dtype) if held is None else held.get(geo, dtype)
    forward = p.algorithms["forward"]
    if forward == "pixel":  # its dW reads the input again
        y = _forward_pixels(x, w, b, geo, out_ws)
        return (y[0] if unbatched else y), x, geo
    if (kind == "input" and not pool_order
            and not hasattr(algorithms.BY_NAME[forward], "packed_forward")):
        # An algorithm that reads NCHW (serial, depthwise, grouped) runs as the functional
        # API runs it; so does its dW, from the input kept as it is.
        y = p._run("forward", x, w, b)
        return (y[0] if unbatched else y), x, geo
    xp = _pack_input(x, geo, ws)
    y = _forward_packed(xp, w, b, geo, out_ws, pool_order, p)
    return (y[0] if unbatched else y), xp if kind == "packed" else x, geo


def backward_saved(xp, geo, weight, dyp, layout, need_dx=True, workspace=None, dsum=None):
    """dX, dW and db of one convolution from :func:`conv2d_saving`'s packed input and
    deltas already in ``layout`` (:func:`delta_layout` of ``geo``, :func:`pack_deltas`).
    ``dsum`` (N, Cd) float64, if the caller has it, holds each image's sum of ``dyp`` per
    channel (``dyp.sum(axis=(1, 2))``); otherwise db sums ``dyp`` itself.

    Returns
    -------
    dx : ndarray (N, C, H, W), or None without ``need_dx``
    dw : ndarray (K, C/groups, R, S)
    db : ndarray (K,)
        In the deltas' dtype.
    """
    # Everything here comes back from the caller: checked before any kernel sees it.
    geo = _check_geometry(geo)
    layout = _check_layout(layout, geo, need_dx)
    _check_workspace(workspace)
    dyp = _checks.array("dyp", dyp, layout.shape, _checks.FLOATS)
    w = _weight_for(weight, geo, dyp.dtype)
    if geo.N == 0:
        return (np.zeros((0, geo.C, geo.H, geo.W), dyp.dtype) if need_dx else None,
                np.zeros(w.shape, dyp.dtype), np.zeros(geo.K, dyp.dtype))
    _checks.array("xp", xp, (geo.N, geo.H + geo.pt + geo.pb, geo.W + geo.pl + geo.pr, geo.C),
                  dyp.dtype)
    if dsum is not None:
        _checks.array("dsum", dsum, (geo.N, layout.shape[3]), np.float64)
    dw = _grad_weight_packed(xp, dyp, layout, geo, workspace or _FRESH)
    db = _grad_bias_packed(dyp, layout, geo, dsum).astype(dyp.dtype)
    dx = _grad_input_packed(dyp, layout, w, geo) if need_dx else None
    return dx, dw, db


def backward_pool_order(px: PixelInput, geo: ConvGeometry, weight, dy4, need_dx=True,
                        dsum=None):
    """dX, dW and db of a pixel-path convolution run by ``conv2d_saving(...,
    pool_order=True)``, from its :class:`PixelInput` and deltas in pool order ``dy4``:
    (N, K, 4, M) C-contiguous, or :class:`PooledDeltas`.  ``dsum`` (N, K) float64, if
    given, holds each image's sum of the deltas per channel.  Returns as
    :func:`backward_saved`."""
    geo = _check_geometry(geo)
    _check_pool_order_input(px, geo)
    dtype, M = px.xf.dtype, geo.OH * geo.OW // 4
    if isinstance(dy4, PooledDeltas):
        _checks.array("dy4.g", dy4.g, (geo.N, geo.K, M), dtype)
        _checks.array("dy4.sel", dy4.sel, (geo.N, geo.K, M), np.int8)  # compared, not indexed
    else:
        _checks.array("dy4", dy4, (geo.N, geo.K, 4, M), dtype)
    if dsum is not None:
        _checks.array("dsum", dsum, (geo.N, geo.K), np.float64)
    w = _weight_for(weight, geo, dtype)
    dw = _grad_weight_pixel_input(px, dy4, geo)
    if isinstance(dy4, PooledDeltas):
        if dsum is None:
            dsum = dy4.g.sum(axis=2, dtype=np.float64)
        dy4 = dy4.expand() if need_dx else None
    elif dsum is None:
        dsum = dy4.sum(axis=(2, 3), dtype=np.float64)
    db = dsum.sum(axis=0).astype(dtype)
    dx = None
    if need_dx:
        # Rare (a first layer needs no dX): the plan's dX on NCHW deltas, as the functional
        # API and the layer alone run it.
        dy = np.ascontiguousarray(from_pool_order(dy4, geo.OH, geo.OW))
        dx = plan.plan_for(geo, dtype)._run("grad_input", dy, w)
    return dx, dw, db


def _weight_for(weight, geo: ConvGeometry, dtype) -> np.ndarray:
    """The training path's ``weight``, checked against ``geo``, in ``dtype``."""
    w = _as_array("weight", weight)
    expected = (geo.K, geo.Cg, geo.R, geo.S)
    if w.shape != expected:
        raise ValueError(f"weight must have shape (K, C/groups, R, S) = {expected}, got "
                         f"{w.shape}")
    return w.astype(dtype, copy=False)


def _check_pool_order_input(px, geo: ConvGeometry) -> PixelInput:
    """``px`` itself if it is the :class:`PixelInput` that ``conv2d_saving(...,
    pool_order=True)`` makes for ``geo`` on the pixel path: its tap tables are the ones
    the kernels index ``px.xf`` by, so they must be exactly those."""
    _checks.instance("px", px, PixelInput)
    if not (geo.N > 0 and _pixel_ok(geo) and pool_order_ok(geo)):
        raise ValueError(f"geo {geo!r} is not a pixel-path layer with a pool-order output")
    offsets = ((0, 0), (0, 1), (1, 0), (1, 1))
    Hp2 = -(-(geo.H + geo.pt + geo.pb) // 2)
    width = geo.OW // 2
    qs, taps, toff = _parity_taps(geo.C, geo.R, geo.S, geo.dlh, geo.dlw, Hp2, width, offsets)
    _checks.array("px.xf", px.xf, (geo.N, geo.C * len(qs) * 2 * Hp2 * width), _checks.FLOATS)
    if not (px.OH == len(offsets) and px.OW == geo.OH // 2 * width
            and isinstance(px.taps, np.ndarray) and np.array_equal(px.taps, taps)
            and isinstance(px.toff, np.ndarray) and np.array_equal(px.toff, toff)):
        raise ValueError("px is not the pool-order input that conv2d_saving made for geo")
    return px


def backward_input(x, geo, weight, dy, need_dx=True, dsum=None):
    """dX, dW and db of a convolution whose saved input is the NCHW input ``x`` itself
    (:func:`saved_kind` ``'input'``), from NCHW deltas ``dy`` (N, K, OH, OW): the plan's
    algorithms, as the functional API runs them.  ``dsum`` (N, K) float64, if given, holds
    each image's sum of ``dy`` per channel.  Returns as :func:`backward_saved`."""
    geo = _check_geometry(geo)
    if not isinstance(dy, np.ndarray) or dy.dtype not in _checks.FLOATS:
        raise TypeError(f"dy must be a float32 or float64 array, got "
                        f"{getattr(dy, 'dtype', type(dy).__name__)}")
    p = plan.plan_for(geo, dy.dtype)
    dy = p._array("dy", dy, (geo.N, geo.K, geo.OH, geo.OW))
    w = _weight_for(weight, geo, p.dtype)
    if geo.N == 0:
        return (np.zeros((0, geo.C, geo.H, geo.W), p.dtype) if need_dx else None,
                np.zeros(w.shape, p.dtype), np.zeros(geo.K, p.dtype))
    x = p._array("x", x, (geo.N, geo.C, geo.H, geo.W))
    if dsum is not None:
        _checks.array("dsum", dsum, (geo.N, geo.K), np.float64)
    dw = p._run("grad_weight", x, dy)
    if dsum is None:
        dsum = dy.sum(axis=(2, 3), dtype=np.float64)
    db = dsum.sum(axis=0).astype(p.dtype)
    return (p._run("grad_input", dy, w) if need_dx else None), dw, db


def conv2d_grad_input(grad_output, weight, input_shape, stride=1, padding=0, dilation=1,
                      groups=1):
    """Gradient of :func:`conv2d` with respect to its input, like ``torch.nn.grad.conv2d_input``.

    Parameters
    ----------
    grad_output : array (N, K, OH, OW)
        The deltas ``dL/dy``.
    weight : array (K, C/groups, R, S)
    input_shape : (N, C, H, W)
        Needed because several input sizes can give the same output size when stride > 1.
    stride, padding, dilation, groups
        As given to :func:`conv2d`.

    Returns
    -------
    ndarray (N, C, H, W)
        ``dL/dx``: the full convolution of the 180-degree rotated filters with the
        stride-dilated deltas, cropped by the padding.
    """
    _check_order("conv2d_grad_input", "grad_output, weight, input_shape",
                 "torch.nn.grad.conv2d_input (input_size, weight, grad_output)",
                 "grad_output", grad_output, "input_shape", input_shape)
    dy = _as_array("grad_output", grad_output)
    w = _as_array("weight", weight)
    dtype = _result_dtype(dy, w)
    _check_rank("weight", w, "(K, C/groups, R, S)")
    input_shape = _shape4("input_shape", input_shape)
    p = plan.cached(input_shape, w.shape, stride, padding, dilation, groups, dtype)
    _check_grad_output(dy, p.geometry, f"input_shape {input_shape} with weight {w.shape}")
    return p._run("grad_input", dy.astype(dtype, copy=False), w.astype(dtype, copy=False))


def conv2d_grad_weight(input, grad_output, weight_shape, stride=1, padding=0, dilation=1,
                       groups=1):
    """Gradient of :func:`conv2d` with respect to its weight, like ``torch.nn.grad.conv2d_weight``.

    Parameters
    ----------
    input : array (N, C, H, W)
        The layer's input in the forward pass.
    grad_output : array (N, K, OH, OW)
        The deltas ``dL/dy``.
    weight_shape : (K, C/groups, R, S)
    stride, padding, dilation, groups
        As given to :func:`conv2d`.

    Returns
    -------
    ndarray (K, C/groups, R, S)
        ``dw[k,c,r,s] = sum_{n,i,j} dy[n,k,i,j] * x_pad[n, g*Cg + c, i*sh + r*dlh,
        j*sw + s*dlw]``: the correlation of the input with the deltas.
    """
    _check_order("conv2d_grad_weight", "input, grad_output, weight_shape",
                 "torch.nn.grad.conv2d_weight (input, weight_size, grad_output)",
                 "grad_output", grad_output, "weight_shape", weight_shape)
    x = _as_array("input", input)
    dy = _as_array("grad_output", grad_output)
    dtype = _result_dtype(x, dy)
    _check_rank("input", x, "(N, C, H, W)")
    weight_shape = _shape4("weight_shape", weight_shape)
    p = plan.cached(x.shape, weight_shape, stride, padding, dilation, groups, dtype)
    _check_grad_output(dy, p.geometry, f"input {x.shape} with weight_shape {weight_shape}")
    return p._run("grad_weight", x.astype(dtype, copy=False), dy.astype(dtype, copy=False))


def conv2d_grad_bias(grad_output):
    """Gradient of :func:`conv2d` with respect to its bias: ``db[k] = sum_{n,i,j} dy[n,k,i,j]``.

    Parameters
    ----------
    grad_output : array (N, K, OH, OW)

    Returns
    -------
    ndarray (K,)
        Summed in float64, returned in the result dtype: float32 for float16/float32
        deltas, float64 for the others.
    """
    dy = _as_float("grad_output", grad_output)
    _check_rank("grad_output", dy, "(N, K, OH, OW)")
    db = np.zeros(dy.shape[1], np.float64)
    if dy.size:
        _k.bias_grad(np.ascontiguousarray(dy), db)
    return db.astype(dy.dtype)


def set_num_threads(n: int) -> None:
    """Use ``n`` threads in the kernels (1 <= n <= the number Numba started with).

    Like ``numba.set_num_threads`` this applies to the calling Python thread.
    """
    if not _is_int(n):
        raise TypeError(f"n, the number of threads, must be an int, got {_describe(n)}")
    limit = numba.config.NUMBA_NUM_THREADS
    if not 1 <= n <= limit:
        raise ValueError(f"n, the number of threads, must be in [1, {limit}], got {n}")
    numba.set_num_threads(int(n))


def get_num_threads() -> int:
    """The number of threads the kernels use in the calling Python thread."""
    return numba.get_num_threads()

