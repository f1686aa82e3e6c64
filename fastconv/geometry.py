"""Geometry: the sizes of a convolution, validated, and the shape rules of its passes.

Small pure helpers (as ``jax.lax``'s convolution rules): :func:`conv_output_size` is the one
output-size formula every pass uses, :func:`conv_geometry` validates a convolution and
returns all its sizes, :func:`conv1d_geometry` and :func:`conv_transpose2d_geometry` give the
conv2d that computes torch's 1-D and transposed convolutions, and :func:`_dx_phases` derives
how dX reads the deltas (each derived below).
Legend: ``N, C, H, W, K, R, S, OH, OW``; ``G`` groups, ``sh, sw`` strides, ``dlh, dlw``
dilations, ``pt, pb, pl, pr`` pads.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import _checks
from ._args import _INT_MAX, _check_rank, _describe, _int, _is_int, _pair, _shape, _shape4


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
        raise ValueError(f"padding must be 'valid', 'same', an int or a pair, got "
                         f"{_describe(padding)}")
    ph, pw = _pair("padding", padding, 0)
    return ph, ph, pw, pw


def _check_sizes(input_shape: tuple, weight_shape: tuple, groups) -> None:
    """``groups`` an int >= 1, every weight size >= 1 and every spatial size of the input
    (N, C, *spatial) >= 1: the rules every convolution, plain or transposed, shares."""
    spatial = input_shape[2:]
    if not _is_int(groups):
        raise TypeError(f"groups must be an int, got {_describe(groups)}")
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    if min(weight_shape) < 1:
        raise ValueError(f"weight shape {tuple(weight_shape)} must have every size >= 1")
    if min(spatial) < 1:
        raise ValueError(f"input spatial size must be at least {'x'.join('1' * len(spatial))}, "
                         f"got {'x'.join(map(str, spatial))} (input shape {tuple(input_shape)}); "
                         "only the batch may be empty")


def _check_channels(input_shape: tuple, weight_shape: tuple, groups) -> None:
    """The rules between a convolution's shapes (N, C, *spatial) and (K, C/groups,
    *kernel) and its ``groups``, for any number of spatial axes."""
    C = input_shape[1]
    K, Cg = weight_shape[:2]
    _check_sizes(input_shape, weight_shape, groups)
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
    _check_channels(input_shape, weight_shape, groups)
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
        bad = ", ".join(f"{k}={_describe(v)}" for k, v in geo._asdict().items()
                        if not (type(v) is int or _is_int(v)))
        raise TypeError(f"geo must hold ints, got {bad}")
    N, C, H, W, K, R, S, G, sh, sw, dlh, dlw, pt, pb, pl, pr, OH, OW = geo
    if not (N >= 0 and min(C, H, W, K, R, S, G, sh, sw, dlh, dlw) >= 1
            and min(pt, pb, pl, pr) >= 0 and max(geo) <= _INT_MAX
            and C % G == 0 and K % G == 0
            and OH == _output_size(H, R, sh, pt, pb, dlh) >= 1
            and OW == _output_size(W, S, sw, pl, pr, dlw) >= 1):
        raise ValueError(f"geo is not a consistent ConvGeometry (as conv_geometry makes it): "
                         f"{geo!r}")
    return geo


def _check_grad_output(dy: np.ndarray, geo: ConvGeometry, given: str,
                       layout: str = "(N, K, OH, OW)", expected: tuple | None = None) -> None:
    """ValueError unless the deltas ``dy`` have the output shape that ``given`` (the other
    arguments, for the message) gives: ``expected`` in ``layout``, by default the conv2d
    output of ``geo`` (a 1-D or transposed convolution passes its own)."""
    if expected is None:
        expected = (geo.N, geo.K, geo.OH, geo.OW)
    _check_rank("grad_output", dy, layout, len(expected))
    if dy.shape != expected:
        raise ValueError(
            f"grad_output has shape {dy.shape}, but {given} gives the output shape "
            f"{layout} = {expected}"
        )


# 1-D convolutions, as 2-D ones
# -----------------------------
# torch's conv1d: y[n,k,j] = b[k] + sum_{c,s} x_pad[n, g*Cg + c, j*st + s*dl] * w[k,c,s],
# x_pad the input (N, C, L) padded along L.  The 2-D convolution of the one-row image
# x[:, :, None, :] (H = 1) with the one-row filters w[:, :, None, :] (R = 1), stride
# (1, st), padding (0, p) and dilation (1, dl) has one output row, OH = (1 - 0 - 1)//1 + 1
# = 1, and one row tap, r = 0, which reads row i*1 + 0*1 = 0:
#     y2[n,k,0,j] = b[k] + sum_{c,s} x_pad[n, g*Cg + c, 0, j*st + s*dl] * w[k,c,0,s],
# the 1-D formula term by term, with OL = OW.  dX and dW are sums of the same products
# over other indices, so all three passes of a 1-D convolution are the 2-D plan's on those
# views.  'same' pads the R - 1 = 0 extra rows of the one-row kernel by nothing.


def _single(name: str, value, minimum: int) -> int:
    """An int, or a tuple or list of one int (torch's conv1d takes both), in
    ``[minimum, 2**31 - 1]``."""
    if isinstance(value, (tuple, list)) and len(value) == 1:
        return _int(name, value[0], minimum)
    if not _is_int(value):
        raise TypeError(f"{name} must be an int or a tuple of one int, got {_describe(value)}")
    return _int(name, value, minimum)


def conv1d_geometry(input_shape, weight_shape, stride=1, padding=0, dilation=1,
                    groups=1) -> ConvGeometry:
    """Validate a 1-D convolution's arguments (as ``torch.nn.functional.conv1d`` takes
    them) and return the geometry of the 2-D convolution that computes it (above).

    Parameters
    ----------
    input_shape : (N, C, L)
    weight_shape : (K, C/groups, R)
    stride, dilation : int or (int,), >= 1
    padding : int or (int,) >= 0, or ``'valid'`` / ``'same'`` (stride 1 only)
    groups : int >= 1 dividing both C and K

    Returns
    -------
    ConvGeometry
        Of input (N, C, 1, L) and weight (K, C/groups, 1, R): ``H = R = OH = 1``, and the
        output length ``OL`` is its ``OW``.
    """
    N, C, L = input_shape = _shape("input_shape", input_shape, 3)
    K, Cg, R = weight_shape = _shape("weight_shape", weight_shape, 3)
    _check_channels(input_shape, weight_shape, groups)
    st = _single("stride", stride, 1)
    dl = _single("dilation", dilation, 1)
    if isinstance(padding, str):
        if padding not in ("valid", "same"):
            raise ValueError(f"padding must be 'valid', 'same', an int or a tuple of one int, "
                             f"got {_describe(padding)}")
        if padding == "same" and st != 1:
            raise ValueError(f"padding='same' needs stride 1, got stride={st}; give explicit "
                             "padding for strided convolutions")
        total = dl * (R - 1) if padding == "same" else 0
        lo, hi, padding2 = total // 2, total - total // 2, padding
    else:
        lo = hi = _single("padding", padding, 0)
        padding2 = (0, lo)
    OL = _output_size(L, R, st, lo, hi, dl)
    if OL < 1:
        raise ValueError(f"output length would be {OL} (< 1): input length {L} padded by "
                         f"{lo}+{hi} is shorter than the dilated kernel {dl * (R - 1) + 1} "
                         f"(kernel {R}, dilation {dl})")
    return conv_geometry((N, C, 1, L), (K, Cg, 1, R), (1, st), padding2, (1, dl), groups)


# Transposed convolutions, as dX
# ------------------------------
# torch's conv_transpose2d(x, w), x (N, C_in, H, W) and w (C_in, C_out/G, R, S), scatters
# each input pixel through the filters:
#     y[n, g*Cog + c, h, v] = sum_{k in group g} sum_{(i,r): i*sh + r*dlh - ph = h}
#                             sum_{(j,s): j*sw + s*dlw - pw = v} x[n,k,i,j] * w[k,c,r,s],
# which is dX of the conv2d with weight w (K = C_in, Cg = C_out/G) whose deltas are x
# (see "dX, derived once" below).  That conv2d's input has C_out channels and torch's
#     OH_t = (H - 1)*sh - 2*ph + dlh*(R - 1) + oph + 1  rows  (OW_t likewise),
# and its output OH = (OH_t + 2*ph - dlh*(R - 1) - 1)//sh + 1 = ((H - 1)*sh + oph)//sh + 1
# = H + oph//sh rows.  With oph < sh that is H: x is exactly its deltas.  torch also takes
# sh <= oph < dlh; then the conv2d has oph//sh more output rows than x, and the sums above
# run over x's H rows only: the deltas are x followed by zero rows.


def conv_transpose2d_geometry(input_shape, weight_shape, stride=1, padding=0,
                              output_padding=0, groups=1, dilation=1) -> ConvGeometry:
    """Validate a transposed convolution's arguments (as
    ``torch.nn.functional.conv_transpose2d`` takes them) and return the geometry of the
    conv2d whose dX it is (above).

    Parameters
    ----------
    input_shape : (N, C_in, H, W)
    weight_shape : (C_in, C_out/groups, R, S)
    stride, dilation : int or (h, w), each >= 1
    padding : int or (h, w), >= 0
    output_padding : int or (h, w), >= 0, each smaller than the stride or the dilation
    groups : int >= 1 dividing C_in

    Returns
    -------
    ConvGeometry
        Of the conv2d with input (N, C_out, OH_t, OW_t), the transposed convolution's
        output, and weight ``weight_shape``; its output ``OH x OW`` is ``H x W`` grown by
        ``output_padding // stride`` (zero deltas).
    """
    N, Ci, H, W = input_shape = _shape4("input_shape", input_shape)
    Cw, Cog, R, S = weight_shape = _shape4("weight_shape", weight_shape)
    _check_sizes(input_shape, weight_shape, groups)
    if Ci % groups:
        raise ValueError(f"groups={groups} must divide the input channels C_in={Ci}")
    if Cw != Ci:
        raise ValueError(f"channel mismatch: input has C_in={Ci} channels, weight shape "
                         f"{weight_shape} (C_in, C_out/groups, R, S) expects C_in = {Cw}")
    sh, sw = _pair("stride", stride, 1)
    ph, pw = _pair("padding", padding, 0)
    dlh, dlw = _pair("dilation", dilation, 1)
    oph, opw = _pair("output_padding", output_padding, 0)
    if not ((oph < sh or oph < dlh) and (opw < sw or opw < dlw)):
        raise ValueError(f"output_padding must be smaller than either stride or dilation, got "
                         f"output_padding={(oph, opw)} with stride={(sh, sw)} and "
                         f"dilation={(dlh, dlw)}")
    OH = (H - 1) * sh - 2 * ph + dlh * (R - 1) + oph + 1
    OW = (W - 1) * sw - 2 * pw + dlw * (S - 1) + opw + 1
    if OH < 1 or OW < 1:
        raise ValueError(f"output size would be {OH}x{OW} (< 1): input {H}x{W} with stride "
                         f"{(sh, sw)}, kernel {R}x{S} and dilation {(dlh, dlw)} spans less "
                         f"than padding {(ph, pw)} takes off each side")
    if max(OH, OW) > _INT_MAX:
        raise ValueError(f"output size would be {OH}x{OW}, more than {_INT_MAX} along an axis")
    return conv_geometry((N, Cog * groups, OH, OW), weight_shape, (sh, sw), (ph, pw),
                         (dlh, dlw), groups)


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


def _dx_joins(rows, cols, H: int, W: int, sw: int):
    """How dx is assembled from its phases (``rows`` x ``cols`` of :func:`_dx_phases`,
    pass ``p = a*len(cols) + b``): ``pairs`` (len(rows), 2) int64, for each row phase the
    passes of its even and odd columns, which dx rows join at ``sw == 2`` when both column
    phases exist ((0, 2) otherwise); and ``covered``, whether the phases reach every pixel
    of dx (else the rest stays zero)."""
    pairs = np.zeros((0, 2), np.int64)
    if sw == 2 and sorted(pw.out0 for pw in cols) == [0, 1]:
        even = 0 if cols[0].out0 == 0 else 1
        pairs = np.array([[2 * a + even, 2 * a + 1 - even] for a in range(len(rows))],
                         np.int64).reshape(-1, 2)
    pairs.flags.writeable = False
    covered = sum(ph.count for ph in rows) == H and sum(pw.count for pw in cols) == W
    return pairs, covered
