"""Public convolution API: validate, normalise arguments, choose layouts, allocate, call.

The semantics are those of ``torch.nn.functional.conv2d``, ``torch.nn.grad.conv2d_input``
and ``torch.nn.grad.conv2d_weight``: NCHW activations, ``(K, C/groups, R, S)`` weights,
cross-correlation (no kernel flip in the forward pass), zero padding.

Legend: ``x, w, b, y, dy, dx, dw`` and ``N, C, H, W, K, R, S, OH, OW, G`` as in
:mod:`fastconv.kernels`.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import NamedTuple

import numba
import numpy as np

from . import _checks, config
from . import kernels as _k
from . import winograd as _wino
from .config import get_winograd, set_winograd

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


# --------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


_INT_MAX = 2**31 - 1  # kernel index arithmetic stays far from int64 overflow


def _batch_chunks(N: int, per_sample: int, budget: int | None = None) -> int:
    """How many batch chunks a dW kernel runs: as many as keep each chunk's deltas
    (``per_sample`` bytes per sample) within ``budget`` (default
    ``config.DW_CHUNK_BYTES``), at least one sample each.  Shapes only, so results do not
    depend on the thread count."""
    budget = config.DW_CHUNK_BYTES if budget is None else budget
    return -(-N // max(1, budget // per_sample))


def _sum_chunks(part: np.ndarray) -> np.ndarray:
    """A dW kernel's per-chunk buffers (axis 0) added up."""
    return part.sum(axis=0) if part.shape[0] > 1 else part[0]


def _pair(name: str, value, minimum: int) -> tuple[int, int]:
    """Normalise an int or an ``(h, w)`` pair of ints, each in ``[minimum, 2**31 - 1]``."""
    if _is_int(value):
        pair = (int(value), int(value))
    elif (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(_is_int(v) for v in value)
    ):
        pair = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints (h, w), got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    if max(pair) > _INT_MAX:
        raise ValueError(f"{name} must be <= {_INT_MAX}, got {value!r}")
    return pair


def _int(name: str, value, minimum: int) -> int:
    """Validate a scalar int argument (not a bool) in ``[minimum, 2**31 - 1]``."""
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    if value > _INT_MAX:
        raise ValueError(f"{name} must be <= {_INT_MAX}, got {value!r}")
    return int(value)


def _real(name: str, value, minimum: float = 0.0, below: float | None = None) -> float:
    """Validate a finite real number (not a bool) ``>= minimum`` and, if given,
    ``< below``; returned as a float."""
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if below is not None and not minimum <= v < below:
        raise ValueError(f"{name} must lie in [{minimum:g}, {below:g}), got {value!r}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum:g}, got {value!r}")
    return v


def _bool(name: str, value) -> bool:
    """Validate a flag: ``True`` or ``False`` (NumPy's bools too), nothing truthy."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _shape4(name: str, shape) -> tuple[int, int, int, int]:
    """Validate a user-given 4-D shape such as ``input_shape`` or ``weight_shape``."""
    try:
        dims = tuple(shape)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of 4 ints, got {shape!r}") from None
    if len(dims) != 4 or not all(_is_int(d) for d in dims):
        raise ValueError(f"{name} must be 4 ints, got {dims!r}")
    if min(dims) < 0:
        raise ValueError(f"{name} must not have negative sizes, got {dims!r}")
    return tuple(int(d) for d in dims)


def _as_array(name: str, value) -> np.ndarray:
    """``value`` as an ndarray of a supported kind (float, integer or bool)."""
    a = np.asarray(value)
    if a.dtype.kind not in "fiub" or (a.dtype.kind == "f" and a.dtype.itemsize > 8):
        raise TypeError(
            f"{name} must be a real numeric array (float16/32/64, integer or bool), "
            f"got dtype {a.dtype}"
        )
    return a


def _as_float(name: str, value) -> np.ndarray:
    """``value`` (:func:`_as_array`) in its result dtype (:func:`_result_dtype`), native
    byte order: the normalisation of every public function that takes one array (the
    others convert all their arrays to the result dtype of them all)."""
    a = _as_array(name, value)
    return a.astype(_result_dtype(a), copy=False)


def _result_dtype(*arrays: np.ndarray | None) -> np.dtype:
    """float32 if every array is float16/float32; float64 if any is float64, int or bool."""
    for a in arrays:
        if a is not None and not (a.dtype.kind == "f" and a.dtype.itemsize <= 4):
            return np.dtype(np.float64)
    return np.dtype(np.float32)


def _check_rank(name: str, a: np.ndarray, layout: str) -> None:
    if a.ndim != 4:
        raise ValueError(f"{name} must be 4-D {layout}, got shape {a.shape} ({a.ndim}-D)")


# --------------------------------------------------------------------------------------
# Geometry: the one place that computes output sizes
# --------------------------------------------------------------------------------------


def conv_output_size(size: int, kernel: int, stride: int, pad_lo: int, pad_hi: int,
                     dilation: int) -> int:
    """Output length along one axis, for every pass.

    ``(size + pad_lo + pad_hi - dilation*(kernel - 1) - 1) // stride + 1``; a result < 1
    means the dilated kernel does not fit in the padded input.

    Parameters
    ----------
    size : int >= 0
    kernel, stride, dilation : int >= 1
    pad_lo, pad_hi : int >= 0
    """
    for name, value, minimum in (("size", size, 0), ("kernel", kernel, 1),
                                 ("stride", stride, 1), ("pad_lo", pad_lo, 0),
                                 ("pad_hi", pad_hi, 0), ("dilation", dilation, 1)):
        _int(name, value, minimum)
    return _output_size(size, kernel, stride, pad_lo, pad_hi, dilation)


def _output_size(size, kernel, stride, pad_lo, pad_hi, dilation) -> int:
    """:func:`conv_output_size` of arguments already validated (by the geometries)."""
    return (size + pad_lo + pad_hi - dilation * (kernel - 1) - 1) // stride + 1


class ConvGeometry(NamedTuple):
    """Every size of one convolution, validated.  Pads are ``(top, bottom, left, right)``."""

    N: int
    C: int
    H: int
    W: int
    K: int
    R: int
    S: int
    G: int
    sh: int
    sw: int
    dlh: int
    dlw: int
    pt: int
    pb: int
    pl: int
    pr: int
    OH: int
    OW: int

    @property
    def Cg(self) -> int:
        return self.C // self.G

    @property
    def Kg(self) -> int:
        return self.K // self.G

    @property
    def pads(self) -> tuple[int, int, int, int]:
        return self.pt, self.pb, self.pl, self.pr


def _resolve_padding(padding, R, S, sh, sw, dlh, dlw) -> tuple[int, int, int, int]:
    if isinstance(padding, str):
        if padding == "valid":
            return 0, 0, 0, 0
        if padding == "same":
            if (sh, sw) != (1, 1):
                raise ValueError(
                    f"padding='same' needs stride 1, got stride={(sh, sw)}; "
                    "give explicit padding for strided convolutions"
                )
            # Like PyTorch: total padding dilation*(k-1), the odd one at the bottom/right.
            th, tw = dlh * (R - 1), dlw * (S - 1)
            return th // 2, th - th // 2, tw // 2, tw - tw // 2
        raise ValueError(f"padding must be 'valid', 'same', an int or a pair, got {padding!r}")
    ph, pw = _pair("padding", padding, 0)
    return ph, ph, pw, pw


def conv_geometry(input_shape, weight_shape, stride=1, padding=0, dilation=1,
                  groups=1) -> ConvGeometry:
    """Validate a convolution's arguments and compute all its sizes.

    Parameters
    ----------
    input_shape : (N, C, H, W)
    weight_shape : (K, C/groups, R, S)
    stride, dilation : int or (h, w), each >= 1
    padding : int or (h, w) >= 0, or ``'valid'`` / ``'same'`` (stride 1 only)
    groups : int >= 1 dividing both C and K

    Returns
    -------
    ConvGeometry
        With the output size ``OH x OW`` (each >= 1, or ``ValueError``).
    """
    N, C, H, W = input_shape = _shape4("input_shape", input_shape)
    K, Cg, R, S = weight_shape = _shape4("weight_shape", weight_shape)
    if not _is_int(groups):
        raise TypeError(f"groups must be an int, got {groups!r}")
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    if min(K, Cg, R, S) < 1:
        raise ValueError(f"weight shape {tuple(weight_shape)} must have every size >= 1")
    if min(H, W) < 1:
        raise ValueError(f"input spatial size must be at least 1x1, got {H}x{W} "
                         f"(input shape {tuple(input_shape)}); only the batch may be empty")
    if C % groups:
        raise ValueError(f"groups={groups} must divide the input channels C={C}")
    if K % groups:
        raise ValueError(
            f"groups={groups} must divide the output channels K={K} "
            f"(weight shape {tuple(weight_shape)})"
        )
    if Cg * groups != C:
        raise ValueError(
            f"channel mismatch: input has C={C} channels, weight shape "
            f"{tuple(weight_shape)} with groups={groups} expects C = {Cg}*{groups} = "
            f"{Cg * groups}"
        )
    sh, sw = _pair("stride", stride, 1)
    dlh, dlw = _pair("dilation", dilation, 1)
    pt, pb, pl, pr = _resolve_padding(padding, R, S, sh, sw, dlh, dlw)
    OH = _output_size(H, R, sh, pt, pb, dlh)
    OW = _output_size(W, S, sw, pl, pr, dlw)
    if OH < 1 or OW < 1:
        raise ValueError(
            f"output size would be {OH}x{OW} (< 1): input {H}x{W} padded by "
            f"({pt}+{pb}, {pl}+{pr}) is smaller than the dilated kernel "
            f"{dlh * (R - 1) + 1}x{dlw * (S - 1) + 1} (kernel {R}x{S}, dilation {(dlh, dlw)})"
        )
    return ConvGeometry(N, C, H, W, K, R, S, groups, sh, sw, dlh, dlw, pt, pb, pl, pr, OH, OW)


def _check_geometry(geo) -> ConvGeometry:
    """``geo`` itself if it is a :class:`ConvGeometry` whose sizes agree with each other as
    :func:`conv_geometry` makes them.  The training-path functions take a geometry back
    from their caller and size their kernels' loops by it: an edited or made-up one would
    make the kernels index outside their arrays."""
    _checks.instance("geo", geo, ConvGeometry)
    if not all(type(v) is int or _is_int(v) for v in geo):
        raise TypeError(f"geo must hold ints, got {geo!r}")
    N, C, H, W, K, R, S, G, sh, sw, dlh, dlw, pt, pb, pl, pr, OH, OW = geo
    if not (N >= 0 and min(C, H, W, K, R, S, G, sh, sw, dlh, dlw) >= 1
            and min(pt, pb, pl, pr) >= 0 and max(geo) <= _INT_MAX
            and C % G == 0 and K % G == 0
            and OH == _output_size(H, R, sh, pt, pb, dlh) >= 1
            and OW == _output_size(W, S, sw, pl, pr, dlw) >= 1):
        raise ValueError(f"geo is not a consistent ConvGeometry (as conv_geometry makes it): "
                         f"{geo!r}")
    return geo


def _planned(geo: ConvGeometry, dtype, pass_: str) -> str:
    """The name of the algorithm the plan of ``geo`` in ``dtype`` runs ``pass_`` with
    (:mod:`fastconv.plan`): the training path asks here, so that it runs what the
    functional API runs."""
    from . import plan

    return plan.plan_for(geo, dtype).algorithms[pass_]


def _check_grad_output(dy: np.ndarray, geo: ConvGeometry, given: str) -> None:
    _check_rank("grad_output", dy, "(N, K, OH, OW)")
    expected = (geo.N, geo.K, geo.OH, geo.OW)
    if dy.shape != expected:
        raise ValueError(
            f"grad_output has shape {dy.shape}, but {given} gives the output shape "
            f"(N, K, OH, OW) = {expected}"
        )


# --------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------


class Workspace:
    """Arrays for the internal layouts of one convolution, kept and reused by name.

    :class:`fastconv.nn.Conv2d` keeps one, so that its packed input, packed deltas and dW
    partial sums are allocated once and reused while the shapes stay the same (a new shape
    replaces the array).  Only arrays that never leave the layer live here: outputs
    returned to callers (``y``, ``dx``, ``dw``, ``db``) are new, so callers may keep them.
    The one exception is asked for by name: ``conv2d_saving(..., reuse_output=True)``
    keeps ``y`` here too, for a caller whose next layer is done with it before the next
    call (:meth:`fastconv.nn.Conv2d.forward_scratch`).  Without a workspace (the functional
    API) every call allocates.
    """

    def __init__(self):
        self._arrays: dict[str, np.ndarray] = {}

    def zeros(self, name: str, shape, dtype) -> np.ndarray:
        """Zeros when first allocated, then the same array as the last caller left it: for
        layouts whose callers rewrite the same elements every time (zero borders stay zero)."""
        return self._get(name, shape, dtype, np.zeros)

    def empty(self, name: str, shape, dtype) -> np.ndarray:
        """An array whose every element the caller overwrites."""
        return self._get(name, shape, dtype, np.empty)

    def _get(self, name, shape, dtype, make):
        a = self._arrays.get(name)
        if (a is None or a.shape != tuple(shape) or a.dtype != dtype
                or not a.flags.c_contiguous):
            a = self._arrays[name] = make(shape, dtype)
        return a


class _Fresh:
    """The workspace of the functional API: new arrays every call."""

    @staticmethod
    def zeros(name, shape, dtype):
        return np.zeros(shape, dtype)

    @staticmethod
    def empty(name, shape, dtype):
        return np.empty(shape, dtype)


_FRESH = _Fresh()


def _channels_last(a: np.ndarray, G: int, CgP: int, pads=(0, 0, 0, 0), ws=_FRESH,
                   name="") -> np.ndarray:
    """NCHW ``a`` as zero-padded NHWC, each of the ``G`` channel groups padded to ``CgP``
    (the array ``name`` of workspace ``ws``)."""
    N, _, H, W = a.shape
    pt, pb, pl, pr = pads
    out = ws.zeros(name, (N, H + pt + pb, W + pl + pr, G * CgP), a.dtype)
    _k.pack_channels_last(a, out, pt, pl, G, CgP)
    return out


def _blocked_weights(wg: np.ndarray, CrP: int | None = None) -> np.ndarray:
    """``(G, Ko, Cr, R, S)`` weights (any strides) as ``(G, KBn, R, S, CrP, KB)``, zero past
    ``Ko`` and past ``Cr`` (``CrP >= Cr``, default ``Cr``): one strided copy."""
    G, Ko, Cr, R, S = wg.shape
    KB = _k.KB
    KBn, full = -(-Ko // KB), Ko // KB
    out = np.zeros((G, KBn, R, S, Cr if CrP is None else CrP, KB), wg.dtype)
    if full:
        out[:, :full, :, :, :Cr] = wg[:, :full * KB].reshape(
            G, full, KB, Cr, R, S).transpose(0, 1, 4, 5, 3, 2)
    if Ko > full * KB:
        out[:, full, :, :, :Cr, :Ko - full * KB] = wg[:, full * KB:].transpose(0, 3, 4, 2, 1)
    return out


def _taps(taps: list) -> slice:
    """A phase's kernel taps, a descending arithmetic progression, as a slice."""
    step = taps[1] - taps[0] if len(taps) > 1 else -1
    stop = taps[-1] + step
    return slice(taps[0], None if stop < 0 else stop, step)


class DeltaLayout(NamedTuple):
    """Where the backward passes read the deltas ``dy`` (N, K, OH, OW): a zero-bordered
    channels-last array of ``shape`` (N, Hd, Wd, Cd), holding ``dy[n, k, i, j]`` at
    ``[n, top + i, left + j, k]``.

    One layout serves both passes.  dX reads ``dy`` padded by the border that its stride
    phases need (:func:`_dx_phases`); dW reads the interior in vectors of ``KBW`` channels,
    so each group's ``Kg`` channels are zero-padded to ``KgP``, a multiple of ``KBW``
    (``Cd = G * KgP``).
    """

    shape: tuple[int, int, int, int]
    top: int
    left: int
    KgP: int
    rows: tuple  # dX phases of each axis (empty without dX)
    cols: tuple


def _dw_tile(geo: ConvGeometry):
    """The dW kernel for a geometry and its channel block: the wide 6 x 64 tile for groups
    of more than 32 output channels, else 8 x 32."""
    if geo.Kg > _k.KBW:
        return _k.conv_dw_tiles_wide, _k.KBWW, _k.TCW
    return _k.conv_dw_tiles, _k.KBW, _k.TC


@functools.lru_cache(maxsize=256)
def delta_layout(geo: ConvGeometry, need_dx: bool = True) -> DeltaLayout:
    """The layout in which the backward passes of ``geo`` read their deltas (immutable,
    cached: a training step asks for the same one several times)."""
    rows, cols, (pt, pb, pl, pr) = (), (), (0, 0, 0, 0)
    if need_dx:
        rows, pt, pb = _dx_phases(geo.H, geo.pt, geo.sh, geo.dlh, geo.R, geo.OH)
        cols, pl, pr = _dx_phases(geo.W, geo.pl, geo.sw, geo.dlw, geo.S, geo.OW)
    _, KBW, _ = _dw_tile(geo)
    KgP = -(-geo.Kg // KBW) * KBW
    return DeltaLayout((geo.N, geo.OH + pt + pb, geo.OW + pl + pr, geo.G * KgP), pt, pl, KgP,
                       tuple(rows), tuple(cols))


def _check_layout(layout, geo: ConvGeometry, need_dx: bool) -> DeltaLayout:
    """``layout`` itself if it is ``delta_layout(geo)`` (or, without dX, also
    ``delta_layout(geo, need_dx=False)``): the deltas' shape, border and phases that the
    backward kernels of ``geo`` index by."""
    _checks.instance("layout", layout, DeltaLayout)
    if layout != delta_layout(geo) and (need_dx or layout != delta_layout(geo, False)):
        raise ValueError(f"layout {layout!r} is not delta_layout(geo"
                         f"{'' if need_dx else ', need_dx=False'}) for geo {geo!r}")
    return layout


def _check_workspace(ws):
    """A :class:`Workspace` or None (its arrays are what kernels read and write)."""
    if ws is not None and not isinstance(ws, Workspace):
        raise TypeError(f"workspace must be a fastconv.conv.Workspace or None, got "
                        f"{type(ws).__name__}")
    return ws


def _check_fits(layout, N: int, K: int, OH: int, OW: int) -> None:
    """That deltas (N, K, OH, OW) fit ``layout``: inside its border, and their K channels
    in its groups of ``KgP`` (what the packing kernels index by)."""
    _checks.instance("layout", layout, DeltaLayout)
    Nd, Hd, Wd, Cd = layout.shape
    top, left, KgP = layout.top, layout.left, layout.KgP
    fields = (Nd, Hd, Wd, Cd, top, left, KgP)
    G = Cd // KgP if all(_is_int(v) for v in fields) and KgP >= 1 else 0
    if not (G >= 1 and Cd == G * KgP and N == Nd and K % G == 0 and K // G <= KgP
            and 0 <= top and top + OH <= Hd and 0 <= left and left + OW <= Wd):
        raise ValueError(f"deltas of shape {(N, K, OH, OW)} do not fit layout {layout!r}")


def pack_deltas(dy: np.ndarray, layout: DeltaLayout, ws=_FRESH) -> np.ndarray:
    """NCHW deltas ``dy`` (N, K, OH, OW) float32 or float64 in ``layout`` (in workspace
    ``ws``, a :class:`Workspace`): ``dy`` must fit inside the layout's border, and its K
    channels into the layout's groups of ``KgP``."""
    if not isinstance(ws, _Fresh):
        _check_workspace(ws)
    if not isinstance(dy, np.ndarray) or dy.ndim != 4 or dy.dtype not in _checks.FLOATS:
        raise TypeError(f"dy must be a 4-D float32 or float64 array (N, K, OH, OW), got "
                        f"{getattr(dy, 'dtype', type(dy).__name__)} "
                        f"{getattr(dy, 'shape', '')}")
    _check_fits(layout, *dy.shape)
    N, Hd, Wd, Cd = layout.shape
    OH, OW = dy.shape[2:]
    pads = (layout.top, Hd - OH - layout.top, layout.left, Wd - OW - layout.left)
    return _channels_last(dy, Cd // layout.KgP, layout.KgP, pads, ws, "dy")


def _grad_input_packed(dyp: np.ndarray, layout: DeltaLayout, w: np.ndarray,
                       geo: ConvGeometry) -> np.ndarray:
    """dX from deltas in ``layout`` by the plan's algorithm (Winograd, else the channel
    tile); ``w`` (K, Cg, R, S) in the deltas' dtype."""
    if _planned(geo, dyp.dtype, "grad_input") == "winograd-f2x2-5x5":
        dx = _grad_input_winograd(dyp, layout, w, geo)
        if dx is not None:
            return dx
    return _grad_input_tile(dyp, layout, w, geo)


def _grad_input_winograd(dyp, layout: DeltaLayout, w, geo: ConvGeometry):
    """dX by Winograd from deltas in ``layout`` (padded by 4, as the full correlation
    needs), or None if it has an inf or NaN."""
    dx = np.empty((geo.N, geo.C, geo.H, geo.W), dyp.dtype)
    return dx if _wino.grad_input(dyp, w, dx) else None


def _grad_input_tile(dyp: np.ndarray, layout: DeltaLayout, w: np.ndarray,
                     geo: ConvGeometry) -> np.ndarray:
    """dX by the channel tile, phase by phase (see "dX, derived once" below)."""
    G, Kg, Cg, pt, pl = geo.G, geo.Kg, geo.Cg, layout.top, layout.left
    dx = np.zeros((geo.N, geo.C, geo.H, geo.W), dyp.dtype)
    # (K, Cg, R, S) -> (G, Cg, Kg, R, S): output channels are now c, the reduction runs
    # over k, including the layout's zero channels (KgP, with zero weights).
    wt = w.reshape(G, Kg, Cg, geo.R, geo.S).transpose(0, 2, 1, 3, 4)
    zero_bias = np.zeros((G, -(-Cg // _k.KB) * _k.KB), dyp.dtype)
    # With finite weights, taps that land on dy's zero border add exact zeros; an inf or NaN
    # weight would turn them into NaN, so then the kernel skips them (slower, and exact).
    exact = not np.isfinite(w).all()
    for ph in layout.rows:
        for pw in layout.cols:
            wb = _blocked_weights(wt[:, :, :, _taps(ph.taps), _taps(pw.taps)], layout.KgP)
            _k.conv_tiles(dyp, wb, zero_bias, dx, ph.count, pw.count, 1, 1, ph.step, pw.step,
                          pt + ph.start, pl + pw.start, ph.out0, pw.out0, geo.sh, geo.sw,
                          exact, pt, pt + geo.OH, pl, pl + geo.OW)
    return dx


def _grad_weight_packed(xp: np.ndarray, dyp: np.ndarray, layout: DeltaLayout,
                        geo: ConvGeometry, ws=_FRESH) -> np.ndarray:
    """dW (K, Cg, R, S) from the packed input (:func:`_pack_input`) and packed deltas, by
    the plan's algorithm (Winograd, else the channel tile)."""
    if _planned(geo, dyp.dtype, "grad_weight") == "winograd-f2x2-5x5":
        dw = _wino.grad_weight(xp, dyp, layout.top, layout.left, geo.K, geo.C)
        if dw is not None:
            return dw
    return _grad_weight_tile(xp, dyp, layout, geo, ws)


def _grad_weight_tile(xp: np.ndarray, dyp: np.ndarray, layout: DeltaLayout,
                      geo: ConvGeometry, ws=_FRESH) -> np.ndarray:
    """dW by the channel tile (:func:`kernels.conv_dw_tiles`) from packed input and
    deltas."""
    G, Kg, Cg, C, R, S = geo.G, geo.Kg, geo.Cg, geo.C, geo.R, geo.S
    kernel, KBW, TC = _dw_tile(geo)
    KBn = -(-Kg // KBW)
    N, Hp, Wp, _ = xp.shape
    # Column t = s*Cg + c of filter row r reads the input row at s*dlw*C + g*Cg + c.  When
    # the columns of one row fill the tiles badly, the rows are folded in too (one "row" of
    # R*S*Cg columns, t = (r*S + s)*Cg + c, at r*dlh*Wp*C + s*dlw*C + g*Cg + c).
    fold = -(-R * S * Cg // TC) < R * -(-S * Cg // TC)  # fewer tiles of TC columns
    Rt, T = (1, R * S * Cg) if fold else (R, S * Cg)
    off = np.zeros((G, -(-T // TC) * TC), np.uint64)
    rs, c = np.divmod(np.arange(T), Cg)
    r, s = np.divmod(rs, S) if fold else (0, rs)
    off[:, :T] = (r * geo.dlh * Wp * C + s * geo.dlw * C + c) + (np.arange(G) * Cg)[:, None]
    # Batch chunks whose deltas fit in L2 (see kernels.conv_dw_tiles).
    P = _batch_chunks(N, geo.OH * geo.OW * G * KBn * KBW * dyp.itemsize)
    part = ws.empty("dw", (P, G, KBn, Rt, off.shape[1], KBW), dyp.dtype)
    kernel(xp.reshape(N, Hp * Wp * C), dyp.reshape(*dyp.shape[:3], G * KBn, KBW), off, part, C,
           Wp * C, geo.sh, geo.sw, geo.dlh, geo.OH, geo.OW, layout.top, layout.left)
    dwb = _sum_chunks(part)
    dw = dwb[:, :, :, :T].reshape(G, KBn, R, S, Cg, KBW).transpose(0, 1, 5, 4, 2, 3)
    return np.ascontiguousarray(dw.reshape(G, KBn * KBW, Cg, R, S)[:, :Kg]).reshape(
        geo.K, Cg, R, S)


def _cvec_ok(geo: ConvGeometry) -> bool:
    """Whether :func:`kernels.conv_dw_cvec` runs the functional dW: one group, and input
    channels that fill vectors of ``CL`` with at most a quarter of padding."""
    CP = -(-geo.C // _k.CL) * _k.CL
    return geo.G == 1 and 4 * CP <= 5 * geo.C


def _grad_weight_cvec(x: np.ndarray, dy: np.ndarray, geo: ConvGeometry) -> np.ndarray:
    """dW (K, C, R, S) by :func:`kernels.conv_dw_cvec` from NCHW ``x`` and ``dy`` in one
    dtype: the input packed (its channels padded to a multiple of ``CL``), the deltas as
    they are."""
    N, C, K, R, S = geo.N, geo.C, geo.K, geo.R, geo.S
    CL, CK, CV = _k.CL, _k.CK, _k.CV
    CP = -(-C // CL) * CL
    xp = _channels_last(x, 1, CP, geo.pads)
    Wp = xp.shape[2]
    # Vector v = (r*S + s)*CP/CL + c/CL of the filter reads the padded input row r*dlh at
    # column s*dlw, channels c .. c + CL - 1.
    V = R * S * (CP // CL)
    off = np.zeros(-(-V // CV) * CV, np.uint64)
    rs, cv = np.divmod(np.arange(V), CP // CL)
    r, s = np.divmod(rs, S)
    off[:V] = (r * geo.dlh * Wp + s * geo.dlw) * CP + cv * CL
    KTn = -(-K // CK)
    P = _batch_chunks(N, K * geo.OH * geo.OW * dy.itemsize)
    part = np.empty((P, KTn, off.size // CV, CK, CV, CL), dy.dtype)
    _k.conv_dw_cvec(xp.reshape(N, -1), np.ascontiguousarray(dy), off, part, CP, Wp * CP,
                    geo.sh, geo.sw, geo.OH, geo.OW)
    dwv = _sum_chunks(part).transpose(0, 2, 1, 3, 4).reshape(KTn * CK, off.size * CL)
    dwv = dwv[:K, :V * CL]
    return np.ascontiguousarray(dwv.reshape(K, R, S, CP)[:, :, :, :C].transpose(0, 3, 1, 2))




def _one_by_one(geo: ConvGeometry) -> bool:
    """A 1x1, stride-1, unpadded layer: a matrix product per image."""
    return (geo.R, geo.S, geo.sh, geo.sw) == (1, 1, 1, 1) and geo.pads == (0, 0, 0, 0)


def _pixel_ok(geo: ConvGeometry) -> bool:
    """Whether the pixel-vectorised kernels run this layer's forward pass and dW.

    They need one group, and either few input channels (the first layer of an image
    network: the channel tile would have only ``C*R*S`` steps per tile, and its dW a
    transposing delta pack) or a 1x1, stride-1, unpadded layer (a matrix product per
    image, read as it is).  And rows of at least ``PX`` output pixels, a stride-1 layer's
    rows being joined into one (:func:`_pixel_input`).
    """
    if geo.G != 1:
        return False
    if not (_one_by_one(geo) or geo.C <= config.PIXEL_MAX_C):
        return False
    joined = geo.sh == 1 or (geo.sh, geo.sw) == (2, 2)  # see _pixel_input
    return (geo.OH * geo.OW if joined else geo.OW) >= _k.PX


def _shifted_planes(a: np.ndarray, geo: ConvGeometry) -> np.ndarray:
    """NCHW ``a`` (any strides) as ``(N, C*S, Hp, OW)``: plane ``c*S + s`` holds, for every
    padded row, the padded columns that filter column ``s`` reads, ``j*sw + s*dlw`` for
    ``j < OW`` (:func:`kernels.shifted_planes`).  No copy for a 1x1, stride-1, unpadded
    layer with a contiguous ``a``."""
    N, C, H, W = a.shape
    pt, pb, pl, _ = geo.pads
    if (geo.S, geo.sw) == (1, 1) and geo.pads == (0, 0, 0, 0) and a.flags.c_contiguous:
        return a
    out = np.empty((N, C, geo.S, H + pt + pb, geo.OW), a.dtype)
    _k.shifted_planes(np.ascontiguousarray(a).reshape(N, C, H * W), W, out, pt, pl, geo.sw,
                      np.arange(geo.S) * geo.dlw, 0)
    return out.reshape(N, C * geo.S, H + pt + pb, geo.OW)


def _phase_planes(a: np.ndarray, pads, sw: int) -> np.ndarray:
    """NCHW ``a`` (any strides) zero-padded by ``pads`` (top, bottom, left, right), each
    plane's columns split into ``sw`` phases: ``(N, C*sw, Hp, ceil(Wp/sw))``, plane
    ``c*sw + q`` holding padded columns ``q, q + sw, ...``."""
    N, C, H, W = a.shape
    pt, pb, pl, pr = pads
    Hp, Wp = H + pt + pb, W + pl + pr
    Wq = -(-Wp // sw)
    out = np.zeros((N, C, sw, Hp, Wq), a.dtype)
    for q in range(sw):
        u0 = max(0, -(-(pl - q) // sw))  # first phase column that holds an input column,
        j0 = u0 * sw + q - pl            # this one
        if j0 < W:
            cols = a[:, :, :, j0::sw]
            out[:, :, q, pt:pt + H, u0:u0 + cols.shape[3]] = cols
    return out.reshape(N, C * sw, Hp, Wq)


class PixelInput(NamedTuple):
    """The input as the pixel kernels read it (:func:`_pixel_input`): each image's planes
    flattened, ``xf`` (N, L); the kernels' taps, ``taps`` (C*R*S,), the index of filter
    tap ``(c, r, s)`` in ``w.reshape(K, -1)`` for each; and the ``OH x OW`` rows of output
    pixels the kernels run over, with where each row starts reading each tap, ``toff``
    (OH, C*R*S) int64: pixel ``j`` of row ``i`` reads ``xf[n, toff[i, t] + j]``."""

    xf: np.ndarray
    taps: np.ndarray
    toff: np.ndarray
    OH: int
    OW: int


def _pixel_input(x: np.ndarray, geo: ConvGeometry) -> PixelInput:
    """NCHW ``x`` laid out so that, for every tap, consecutive output pixels read
    consecutive inputs.

    Stride 1 (``sh == 1``): :func:`_shifted_planes`, whose rows are as wide as the
    output's, so that tap ``(c, r, s)`` reads plane ``c*S + s`` at ``r*dlh*OW + m`` for
    output pixel ``m = i*OW + j``: each image's output is one row of ``OH*OW`` pixels, with
    no row tails to mask or recompute.  It costs ``S`` copies of the padded rows (C <= 4
    here, or none for 1x1).  The taps run in the order ``(c, s, r)``, so that a tile's taps
    read one plane, a few rows apart (the dW kernel 1.2x faster than in ``(c, r, s)``
    order, five planes per tile).  Stride 2 (both axes): :func:`_parity_input`, planes of
    the padded rows of one parity at the columns ``2j + s*dlw``, as wide as the output, so
    that again each image's output is one row of ``OH*OW`` pixels.  Else
    :func:`_phase_planes`: tap ``(c, r, s)`` reads phase ``(s*dlw) % sw`` of plane ``c`` at
    row ``i*sh + r*dlh``, column ``(s*dlw) // sw``, rows of ``OW`` pixels.
    """
    N, C = geo.N, geo.C
    R, S, sw, dlw = geo.R, geo.S, geo.sw, geo.dlw
    if geo.sh == 1:
        xs = _shifted_planes(x, geo)
        Hp = xs.shape[2]
        c, sr = np.divmod(np.arange(C * R * S), S * R)
        s, r = np.divmod(sr, R)
        toff = ((c * S + s) * Hp + r * geo.dlh) * geo.OW
        M = geo.OH * geo.OW
        return PixelInput(xs.reshape(N, -1), (c * R + r) * S + s, toff[None], 1, M)
    if (geo.sh, sw) == (2, 2):
        return _parity_input(x, geo, ((0, 0),), geo.OH, geo.OW)
    xq = _phase_planes(x, geo.pads, sw)
    Hp, Wq = xq.shape[2:]
    c, rs = np.divmod(np.arange(C * R * S), R * S)
    r, s = np.divmod(rs, S)
    toff = ((c * sw + s * dlw % sw) * Hp + r * geo.dlh) * Wq + s * dlw // sw
    rows = np.arange(geo.OH)[:, None] * (geo.sh * Wq)
    return PixelInput(xq.reshape(N, -1), np.arange(C * R * S), rows + toff, geo.OH, geo.OW)


def _grad_weight_pixels(x: np.ndarray, dy: np.ndarray, geo: ConvGeometry) -> np.ndarray:
    """dW (K, C, R, S) by :func:`kernels.conv_dw_pixels` from NCHW ``x`` and ``dy`` in
    one dtype."""
    px = _pixel_input(x, geo)
    return _grad_weight_pixel_input(px, np.ascontiguousarray(dy).reshape(
        geo.N, geo.K, px.OH, px.OW), geo)


def _grad_weight_pixel_input(px: PixelInput, dy, geo: ConvGeometry) -> np.ndarray:
    """dW (K, C, R, S) from the input as the pixel kernels read it and C-contiguous deltas
    ``dy`` (N, K, px.OH, px.OW) in its rows, or :class:`PooledDeltas` of its four
    pool-order rows."""
    N, C, K, R, S = geo.N, geo.C, geo.K, geo.R, geo.S
    T = C * R * S
    TTn, KTn = -(-T // _k.DT), -(-K // _k.DK)
    toff = np.zeros((px.OH, TTn * _k.DT), np.int64)
    toff[:, :T] = px.toff
    # Batch chunks of config.DW_PIXEL_CHUNK_BYTES of deltas, which stay in a core's L2
    # while the tasks sweep them (shapes only).  Each task ends with a horizontal sum of its
    # 20 vectors.
    dtype = px.xf.dtype
    P = _batch_chunks(N, K * px.OH * px.OW * dtype.itemsize, config.DW_PIXEL_CHUNK_BYTES)
    part = np.empty((P, KTn, TTn, _k.DK, _k.DT), dtype)
    if isinstance(dy, PooledDeltas):
        _k.conv_dw_pool_planes(px.xf, dy.g, dy.sel, toff, part)
    else:
        _k.conv_dw_pixels(px.xf, dy, toff, part)
    dw = np.empty((K, T), dtype)
    dw[:, px.taps] = _sum_chunks(part).transpose(0, 2, 1, 3).reshape(
        KTn * _k.DK, TTn * _k.DT)[:K, :T]
    return dw.reshape(K, C, R, S)


def _grad_bias_packed(dyp: np.ndarray, layout: DeltaLayout, geo: ConvGeometry,
                      part=None) -> np.ndarray:
    """db (K,) in float64 from deltas in ``layout``, or from their per-image channel sums
    ``part`` (N, Cd) if given."""
    if part is None:
        part = np.empty((geo.N, dyp.shape[3]), np.float64)
        _k.bias_grad_channels_last(dyp, layout.top, layout.left, geo.OH, geo.OW, part)
    return part.sum(axis=0).reshape(geo.G, layout.KgP)[:, :geo.Kg].reshape(geo.K)


def _pack_input(x: np.ndarray, geo: ConvGeometry, ws=_FRESH) -> np.ndarray:
    """The input as the forward and dW kernels read it: zero-padded channels-last."""
    return _channels_last(x, geo.G, geo.Cg, geo.pads, ws, "x")


def _forward_pixels(x, w, b, geo: ConvGeometry, ws=_FRESH) -> np.ndarray:
    """y (N, K, OH, OW) by :func:`kernels.conv_pixel_tiles`; ``x``, ``w``, ``b`` in the
    result dtype; ``y`` is the array ``"y"`` of workspace ``ws``."""
    y = _forward_pixel_input(_pixel_input(x, geo), w, b, geo, ws)
    return y.reshape(geo.N, geo.K, geo.OH, geo.OW)


def _forward_pixel_input(px: PixelInput, w, b, geo: ConvGeometry, ws=_FRESH) -> np.ndarray:
    """y (N, K, px.OH, px.OW), the output in the rows of ``px``, by
    :func:`kernels.conv_pixel_tiles`; ``y`` is the array ``"y"`` of workspace ``ws``."""
    N, C, K, R, S = geo.N, geo.C, geo.K, geo.R, geo.S
    KPn = -(-K // _k.KP)
    wp = np.zeros((KPn * _k.KP, C * R * S), w.dtype)
    wp[:K] = w.reshape(K, C * R * S)[:, px.taps]
    wp = np.ascontiguousarray(wp.reshape(KPn, _k.KP, C * R * S).transpose(0, 2, 1))
    bp = np.zeros(KPn * _k.KP, w.dtype)
    if b is not None:
        bp[:K] = b
    y = ws.empty("y", (N, K, px.OH, px.OW), w.dtype)
    _k.conv_pixel_tiles(px.xf, px.toff, wp, bp, y)
    return y


def _forward_packed(xp: np.ndarray, w: np.ndarray, b, geo: ConvGeometry,
                    ws=_FRESH, pool_order=False) -> np.ndarray:
    """y (N, K, OH, OW) from the packed input by the channel tile; ``w``, ``b`` in its
    dtype; ``y`` is the array ``"y"`` of workspace ``ws``.  With ``pool_order``, y
    (N, K, 4, OH/2 * OW/2) in pool order: each plane a convolution of twice the stride
    (see "Pool order" below).  Winograd instead where the plan chose it."""
    if _planned(geo, xp.dtype, "forward") == "winograd-f2x2-5x5":
        y = _forward_winograd(xp, w, b, geo, ws, pool_order)
        if y is not None:
            return y
    return _forward_tile(xp, w, b, geo, ws, pool_order)


def _forward_winograd(xp, w, b, geo: ConvGeometry, ws=_FRESH, pool_order=False):
    """y by Winograd from the packed input, as :func:`_forward_packed`; None if it has an
    inf or NaN (the caller runs the next algorithm)."""
    shape = (geo.N, geo.K, 4, geo.OH * geo.OW // 4) if pool_order else (
        geo.N, geo.K, geo.OH, geo.OW)
    y = ws.empty("y", shape, xp.dtype)
    return y if _wino.forward(xp, w, b, y, pool_order) else None


def _forward_tile(xp: np.ndarray, w: np.ndarray, b, geo: ConvGeometry, ws=_FRESH,
                  pool_order=False) -> np.ndarray:
    """y by the channel tile (:func:`kernels.conv_tiles`), as :func:`_forward_packed`."""
    G, Kg = geo.G, geo.Kg
    wb = _blocked_weights(w.reshape(G, Kg, geo.Cg, geo.R, geo.S))
    bb = np.zeros((G, wb.shape[1] * _k.KB), xp.dtype)
    if b is not None:
        bb[:, :Kg] = b.reshape(G, Kg)
    if not pool_order:
        y = ws.empty("y", (geo.N, geo.K, geo.OH, geo.OW), xp.dtype)
        _k.conv_tiles(xp, wb, bb, y, geo.OH, geo.OW, geo.sh, geo.sw, geo.dlh, geo.dlw,
                      0, 0, 0, 0, 1, 1, False, 0, 0, 0, 0)
        return y
    OH2, OW2 = geo.OH // 2, geo.OW // 2
    y = ws.empty("y", (geo.N, geo.K, 4, OH2 * OW2), xp.dtype)
    planes = y.reshape(geo.N, geo.K, 4 * OH2, OW2)  # plane d is rows d*OH2 ... + OH2 - 1
    for d in range(4):
        a, c = divmod(d, 2)
        _k.conv_tiles(xp, wb, bb, planes, OH2, OW2, 2 * geo.sh, 2 * geo.sw, geo.dlh, geo.dlw,
                      a * geo.sh, c * geo.sw, d * OH2, 0, 1, 1, False, 0, 0, 0, 0)
    return y


# --------------------------------------------------------------------------------------
# Pool order: the output as a 2x2, stride-2 max pool after the layer reads it
# --------------------------------------------------------------------------------------
# The pool compares the four pixels (2i + a, 2j + b) of each window.  In NCHW they sit two
# columns apart in two rows, so no loop over windows runs along contiguous memory and the
# pool stays scalar (a gather version was 3x slower still).  In *pool order* the layer
# writes its output as (N, K, 4, M), M = OH/2 * OW/2: plane d = 2a + b holds pixel
# (2i + a, 2j + b) at m = i*OW/2 + j.  The pool is then a max over four contiguous planes
# (kernels.max_pool_2x2_planes_fwd) whose result is NCHW, and its backward writes the
# deltas back in pool order for dW, or channels-last for the channel tile's backward.
#
# Output row 2i + a reads input row (2i + a)*sh + r*dlh, column likewise: each plane is a
# convolution with twice the stride, starting a*sh rows and b*sw columns further in.  The
# channel tile runs the four as they are (:func:`_forward_packed`).  The pixel kernels
# need, for every tap, the plane's consecutive pixels m to read consecutive inputs;
# :func:`_pool_order_input` lays the input out so (stride 1 only).


class PoolOrderLayout(NamedTuple):
    """Deltas in pool order, ``shape`` (N, K, 4, M): the layout in which a pixel-path
    convolution run with ``pool_order`` takes them in backward (see the section above),
    as an array or as :class:`PooledDeltas`."""

    shape: tuple[int, int, int, int]


class NCHWLayout(NamedTuple):
    """Deltas as they are, NCHW ``shape`` (N, K, OH, OW): the layout of a layer whose dW
    reads the input itself (:func:`saved_kind` ``'input'``), taken by
    :func:`backward_input`."""

    shape: tuple[int, int, int, int]


class PooledDeltas(NamedTuple):
    """Deltas in pool order as the 2x2 pool's backward hands them over, unexpanded:
    ``dy4[n, k, d, m] = g[n, k, m]`` if ``sel[n, k, m] == d`` else 0.

    g : (N, K, M) the pooled deltas that pass the ReLU;  sel : (N, K, M) int8 the window
    position of each maximum.  :func:`kernels.conv_dw_pool_planes` reads them as they
    are, a quarter of the memory of ``dy4``.
    """

    g: np.ndarray
    sel: np.ndarray

    def expand(self) -> np.ndarray:
        """``dy4`` (N, K, 4, M)."""
        d = np.arange(4, dtype=np.int8)[:, None]
        return np.where(self.sel[:, :, None] == d, self.g[:, :, None], 0).astype(self.g.dtype)


def pool_order_ok(geo: ConvGeometry) -> bool:
    """Whether ``conv2d_saving(..., pool_order=True)`` can run this layer: an even output
    size, a problem too large for the serial kernels (which write NCHW), and for the pixel
    path (:func:`_pixel_ok`) stride 1 and planes of at least ``PX`` pixels."""
    from .algorithms import small

    if geo.OH % 2 or geo.OW % 2 or geo.N == 0 or small.why_not(geo, None, "forward") is None:
        return False
    if _pixel_ok(geo):
        return (geo.sh, geo.sw) == (1, 1) and geo.OH * geo.OW >= 4 * _k.PX
    return True


def _pool_order_input(x: np.ndarray, geo: ConvGeometry, ws=_FRESH) -> PixelInput:
    """NCHW ``x`` laid out for the pixel kernels to write pool order, stride 1: rows
    ``d = 2a + b`` of ``M = OH/2 * OW/2`` pixels, pixel (i, j) of row d being output pixel
    (2i + a, 2j + b) (:func:`_parity_input`)."""
    return _parity_input(x, geo, ((0, 0), (0, 1), (1, 0), (1, 1)), geo.OH // 2, geo.OW // 2,
                         ws)


def _parity_input(x: np.ndarray, geo: ConvGeometry, offsets, rows: int, width: int,
                  ws=_FRESH) -> PixelInput:
    """NCHW ``x`` laid out so that pixel (i, j), ``i < rows``, ``j < width``, of output row
    ``d`` reads, for tap (c, r, s), padded input row 2i + u with u = a + r*dlh and column
    2j + q with q = b + s*dlw, ``(a, b) = offsets[d]``, at consecutive addresses.

    Plane (c, q, u % 2) holds the padded rows of parity u % 2 at the columns 2j + q,
    ``width`` wide, so that the tap reads it at ``(u // 2) * width + m`` for pixel
    m = i*width + j: consecutive pixels, consecutive inputs, rows joined.  One plane pair
    per distinct q.  Pool order (:func:`_pool_order_input`) has the four window positions
    as offsets; a layer of stride 2 has the one offset (0, 0), its output rows as they
    are.
    """
    N, C, H, W = x.shape
    pt, pb, pl, _ = geo.pads
    Hp2 = -(-(H + pt + pb) // 2)
    qs, taps, toff = _parity_taps(C, geo.R, geo.S, geo.dlh, geo.dlw, Hp2, width, offsets)
    xq = ws.empty("xq", (N, C, len(qs), 2, Hp2, width), x.dtype)
    _k.shifted_planes(np.ascontiguousarray(x).reshape(N, C, H * W), W,
                      xq.reshape(N, C, len(qs), 2 * Hp2, width), pt, pl, 2, qs, Hp2)
    return PixelInput(xq.reshape(N, -1), taps, toff, len(offsets), rows * width)


@functools.lru_cache(maxsize=64)
def _parity_taps(C, R, S, dlh, dlw, Hp2, width, offsets):
    """:func:`_parity_input`'s column offsets ``qs`` and tap tables (read-only, cached: a
    training step asks for the same ones every time)."""
    a, b = np.array(offsets).T[:, :, None]  # (D, 1) each
    qs = np.array(sorted({int(bd) + s * dlw for bd in b[:, 0] for s in range(S)}))
    # Taps in the order (c, s, r), as :func:`_pixel_input` has them for stride 1: the same
    # sums in the same order, so pool order gives the same outputs to the bit.
    c, s, r = np.unravel_index(np.arange(C * R * S), (C, S, R))
    u = a + r * dlh  # (D, T)
    iq = np.searchsorted(qs, b + s * dlw)
    toff = (((c * len(qs) + iq) * 2 + u % 2) * Hp2 + u // 2) * width
    out = qs, (c * R + r) * S + s, toff
    for arr in out:
        arr.flags.writeable = False
    return out


def to_pool_order(y: np.ndarray) -> np.ndarray:
    """NCHW (N, K, OH, OW), OH and OW even, in pool order (N, K, 4, OH/2 * OW/2) (a copy)."""
    N, K, OH, OW = y.shape
    return np.ascontiguousarray(y.reshape(N, K, OH // 2, 2, OW // 2, 2).transpose(
        0, 1, 3, 5, 2, 4)).reshape(N, K, 4, OH * OW // 4)


def from_pool_order(y4: np.ndarray, OH: int, OW: int) -> np.ndarray:
    """(N, K, 4, OH/2 * OW/2) in pool order as NCHW (N, K, OH, OW) (a copy)."""
    N, K = y4.shape[:2]
    return np.ascontiguousarray(y4.reshape(N, K, 2, 2, OH // 2, OW // 2).transpose(
        0, 1, 4, 2, 5, 3)).reshape(N, K, OH, OW)


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


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
    from . import plan

    x = _as_array("input", input)
    w = _as_array("weight", weight)
    b = None if bias is None else _as_array("bias", bias)
    dtype = _result_dtype(x, w, b)
    unbatched = x.ndim == 3
    if unbatched:
        x = x[None]
    _check_rank("input", x, "(N, C, H, W) or 3-D (C, H, W)")
    _check_rank("weight", w, "(K, C/groups, R, S)")
    p = plan.cached(x.shape, w.shape, stride, padding, dilation, groups, dtype)
    if b is not None and b.shape != (p.geometry.K,):
        raise ValueError(f"bias must have shape (K,) = ({p.geometry.K},), got {b.shape}")
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
    if _planned(geo, dtype, "grad_weight") in ("winograd-f2x2-5x5", "direct-channel-tile"):
        return "packed"
    return "input"


def _conv2d_saving(input, weight, bias, stride, padding, dilation, groups, workspace,
                   out_ws=_FRESH, pool_order=False):
    """:func:`conv2d_saving`.  ``y`` is the array ``"y"`` of ``out_ws``."""
    x = _as_array("input", input)
    w = _as_array("weight", weight)
    b = None if bias is None else _as_array("bias", bias)
    dtype = _result_dtype(x, w, b)
    unbatched = x.ndim == 3
    if unbatched:
        x = x[None]
    _check_rank("input", x, "(N, C, H, W) or 3-D (C, H, W)")
    _check_rank("weight", w, "(K, C/groups, R, S)")
    geo = conv_geometry(x.shape, w.shape, stride, padding, dilation, groups)
    if b is not None and b.shape != (geo.K,):
        raise ValueError(f"bias must have shape (K,) = ({geo.K},), got {b.shape}")

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
    forward = _planned(geo, dtype, "forward")
    if forward == "pixel":  # its dW reads the input again
        y = _forward_pixels(x, w, b, geo, out_ws)
        return (y[0] if unbatched else y), x, geo
    if forward == "serial-direct":  # so does its dW, serial too
        from . import plan

        y = plan.plan_for(geo, dtype)._run("forward", x, w, b)
        return (y[0] if unbatched else y), x, geo
    xp = _pack_input(x, geo, ws)
    y = _forward_packed(xp, w, b, geo, out_ws, pool_order=pool_order)
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
        # Rare (a first layer needs no dX): through the channel tile's layout.
        layout = delta_layout(geo)
        dyp = pack_deltas(from_pool_order(dy4, geo.OH, geo.OW), layout)
        dx = _grad_input_packed(dyp, layout, w, geo)
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
    from . import plan

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


# dX, derived once
# ----------------
# From y[n,k,i,j] = sum_{c,r,s} x_pad[n,c, i*sh + r*dlh, j*sw + s*dlw] * w[k,c,r,s]:
#     dx_pad[n,c,h,v] = sum_k sum_{(i,r): i*sh + r*dlh = h} sum_{(j,s): j*sw + s*dlw = v}
#                       dy[n,k,i,j] * w[k,c,r,s].
# That is the *full* convolution of the stride-dilated deltas (sh-1 zeros inserted
# between rows, sw-1 between columns, padded by the dilated kernel size - 1) with the
# 180-degree rotated filters, summed over the K filters, then cropped by the padding.
#
# The kernel never multiplies an inserted zero.  For an output row h with phase
# a = h mod sh, only taps with r*dlh = a (mod sh) meet a real delta row, at
# i = (h - r*dlh)/sh.  Those taps form an arithmetic progression, consecutive rows of the
# same phase read consecutive delta rows, so each (row phase, column phase) is an ordinary
# stride-1 correlation of the padded deltas with the rotated sub-filter of those taps
# (dilated by the delta-row step D between taps), writing every sh-th row and sw-th
# column of dx.  conv_tiles computes it with the channel roles swapped: the reduction
# runs over K, the vector block over C.


class _Phase(NamedTuple):
    taps: tuple  # kernel taps, in rotated (descending) order
    step: int  # delta rows between consecutive taps (dilation of the sub-filter)
    start: int  # delta row read by the first output row and first tap, before padding
    count: int  # output rows in this phase
    out0: int  # first output (unpadded dx) row of this phase


def _dx_phases(size, pad_lo, stride, dilation, kernel, out_size):
    """Per phase of one axis: the taps that meet real deltas, and how dy is padded."""
    phases, pad_lo_dy, pad_hi_dy = [], 0, 0
    # Only phases that some input row h (padded position pad_lo + h) has: O(min(size, stride)).
    for a in sorted({(pad_lo + h) % stride for h in range(min(size, stride))}):
        taps = [r for r in range(kernel) if (r * dilation - a) % stride == 0]
        u_lo = -((a - pad_lo) // stride)  # first u with a + stride*u >= pad_lo
        u_hi = (pad_lo + size - 1 - a) // stride
        if not taps or u_hi < u_lo:
            continue  # these dx rows get no delta at all: they stay zero
        q = [(r * dilation - a) // stride for r in taps]  # delta row = u - q
        step = q[1] - q[0] if len(q) > 1 else 1
        phases.append(_Phase(tuple(taps[::-1]), step, u_lo - q[-1], u_hi - u_lo + 1,
                             a + stride * u_lo - pad_lo))
        pad_lo_dy = max(pad_lo_dy, q[-1] - u_lo)
        pad_hi_dy = max(pad_hi_dy, u_hi - q[0] - out_size + 1)
    return phases, pad_lo_dy, pad_hi_dy


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
    dy = _as_array("grad_output", grad_output)
    w = _as_array("weight", weight)
    dtype = _result_dtype(dy, w)
    _check_rank("weight", w, "(K, C/groups, R, S)")
    input_shape = _shape4("input_shape", input_shape)
    from . import plan

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
    x = _as_array("input", input)
    dy = _as_array("grad_output", grad_output)
    dtype = _result_dtype(x, dy)
    _check_rank("input", x, "(N, C, H, W)")
    weight_shape = _shape4("weight_shape", weight_shape)
    from . import plan

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
        raise TypeError(f"n, the number of threads, must be an int, got {n!r}")
    limit = numba.config.NUMBA_NUM_THREADS
    if not 1 <= n <= limit:
        raise ValueError(f"n, the number of threads, must be in [1, {limit}], got {n}")
    numba.set_num_threads(int(n))


def get_num_threads() -> int:
    """The number of threads the kernels use in the calling Python thread."""
    return numba.get_num_threads()

