"""Layouts: how the kernels read activations, weights and deltas, and where they keep them.

* zero-padded channels-last (NHWC) input, packed per group (:func:`_pack_input`);
* the deltas of the backward passes, channels-last with the border dX needs
  (:class:`DeltaLayout`, :func:`delta_layout`, :func:`pack_deltas`);
* the pixel kernels' input, laid out so that consecutive output pixels read consecutive
  inputs for every tap (:class:`PixelInput`, :func:`_pixel_input`);
* pool order, the output as the 2x2 max pool after a layer reads it (below);
* :class:`Workspace`, a layer's arrays for these, reused while the shapes stay.

Every function that takes one of these back from a caller checks it against its geometry
first (docs/memory-safety.md).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numba
import numpy as np

from . import _checks, config
from . import kernels as _k
from ._args import _is_int
from .geometry import ConvGeometry, _dx_phases


def _batch_chunks(N: int, per_sample: int, budget: int | None = None) -> int:
    """How many batch chunks a dW kernel runs: as many as keep each chunk's deltas
    (``per_sample`` bytes per sample) within ``budget`` (default
    ``config.DW_CHUNK_BYTES``), at least one sample each.  Shapes only, so results do not
    depend on the thread count."""
    budget = config.DW_CHUNK_BYTES if budget is None else budget
    return -(-N // max(1, budget // per_sample))


def _task_runs(tasks: int) -> int:
    """How many runs a kernel cuts its ``tasks`` into, each run with a scratch of its own
    and its tasks in order: ``config.GROUPED_TASKS_PER_THREAD`` per thread (the scratch
    count stays small while threads balance), at most one per task, at least one."""
    return max(1, min(tasks, config.GROUPED_TASKS_PER_THREAD * numba.get_num_threads()))


def _sum_chunks(part: np.ndarray) -> np.ndarray:
    """A dW kernel's per-chunk buffers (axis 0) added up."""
    return part.sum(axis=0) if part.shape[0] > 1 else part[0]


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

#: The page whose offsets :func:`empty_apart` spaces (the 12 address bits a core compares
#: between loads and stores in flight).
_PAGE = 4096


def empty_apart(shape, dtype, other: np.ndarray) -> np.ndarray:
    """An uninitialised C-contiguous array of ``shape`` and ``dtype`` whose data start
    ``config.APART_BYTES`` after ``other``'s modulo 4 KiB: the output of a kernel that
    stores each plane at the offsets it has just read from ``other``'s (see
    ``config.APART_BYTES``).  A view into a buffer one page longer."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64))
    buf = np.empty(n + _PAGE // dtype.itemsize, dtype)
    want = (other.ctypes.data + config.APART_BYTES - buf.ctypes.data) % _PAGE
    skip = want // dtype.itemsize
    return buf[skip:skip + n].reshape(shape)


def _channels_last(a: np.ndarray, G: int, CgP: int, pads=(0, 0, 0, 0), ws=_FRESH,
                   name="") -> np.ndarray:
    """NCHW ``a`` as zero-padded NHWC, each of the ``G`` channel groups padded to ``CgP``
    (the array ``name`` of workspace ``ws``)."""
    N, _, H, W = a.shape
    pt, pb, pl, pr = pads
    out = ws.empty(name, (N, H + pt + pb, W + pl + pr, G * CgP), a.dtype)
    _k.pack_channels_last(np.ascontiguousarray(a), out, pt, pl, G, CgP)  # zeroes the rest
    return out


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


@functools.lru_cache(maxsize=256)
def delta_layout(geo: ConvGeometry, need_dx: bool = True) -> DeltaLayout:
    """The layout in which the backward passes of ``geo`` read their deltas (immutable,
    cached: a training step asks for the same one several times)."""
    rows, cols, (pt, pb, pl, pr) = (), (), (0, 0, 0, 0)
    if need_dx:
        rows, pt, pb = _dx_phases(geo.H, geo.pt, geo.sh, geo.dlh, geo.R, geo.OH)
        cols, pl, pr = _dx_phases(geo.W, geo.pl, geo.sw, geo.dlw, geo.S, geo.OW)
    from .algorithms.channel_tile import _dw_tile  # the dW tile reads the deltas' blocks

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
        raise TypeError(f"workspace must be a fastconv.layouts.Workspace or None, got "
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
    ``c*sw + q`` holding padded columns ``q, q + sw, ...``: :func:`_phase_grid` with one
    row phase."""
    N, C = a.shape[:2]
    grid = _phase_grid(a, pads, 1, sw)
    return grid.reshape(N, C * sw, *grid.shape[4:])


def _phase_grid(a: np.ndarray, pads, sh: int, sw: int, extra_rows: int = 0) -> np.ndarray:
    """NCHW ``a`` (any strides) zero-padded by ``pads`` (top, bottom, left, right), each
    plane split into ``sh x sw`` phase planes: ``(N, C, sh, sw, Hq + extra_rows, Wq)``
    with ``Hq = ceil(Hp/sh)``, ``Wq = ceil(Wp/sw)``, phase ``(p, q)`` holding the padded
    rows ``p, p + sh, ...`` at the columns ``q, q + sw, ...``, and ``extra_rows`` zero
    rows under each.  At any stride, consecutive output rows and columns of a tap then
    read consecutive rows and columns of one phase plane."""
    N, C, H, W = a.shape
    pt, pb, pl, pr = pads
    Hq, Wq = -(-(H + pt + pb) // sh), -(-(W + pl + pr) // sw)
    if a.size == 0:
        return np.zeros((N, C, sh, sw, Hq + extra_rows, Wq), a.dtype)
    out = np.empty((N, C, sh, sw, Hq + extra_rows, Wq), a.dtype)
    _k.phase_grid(np.ascontiguousarray(a).reshape(N, C, H * W), W, out, pt, pl)
    return out


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


def _pack_input(x: np.ndarray, geo: ConvGeometry, ws=_FRESH) -> np.ndarray:
    """The input as the forward and dW kernels read it: zero-padded channels-last."""
    return _channels_last(x, geo.G, geo.Cg, geo.pads, ws, "x")


# Pool order
# ----------
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
