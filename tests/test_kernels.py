"""The kernels against the NumPy reference: a parameter grid, hypothesis-generated
configurations, float32 and float64, and finite-difference gradient checks."""

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastconv as fc
from fastconv import layouts

from conftest import all_passes, random_problem, reference_passes

# The parallel kernels' paths, on small shapes: not the serial kernels of small problems.
pytestmark = pytest.mark.usefixtures("parallel_paths")


def _grid():
    # (N, C, H, W, K, R, S, groups): odd and non-square sizes, batch 1, 1x1 kernels,
    # a kernel equal to the input, grouped and depthwise, C = 1 (narrow and wide rows),
    # K beyond one vector block.
    shapes = [
        (2, 3, 7, 9, 5, 3, 3, 1),
        (1, 4, 6, 5, 6, 2, 3, 2),
        (2, 4, 8, 7, 4, 3, 3, 4),  # depthwise
        (2, 4, 8, 7, 8, 3, 2, 4),  # depthwise, channel multiplier 2
        (1, 1, 11, 10, 20, 5, 5, 1),
        (2, 17, 6, 6, 33, 1, 1, 1),  # 1x1, K not a multiple of 16
        (1, 3, 5, 4, 2, 5, 4, 1),  # kernel equal to the input
        (3, 2, 16, 15, 3, 4, 2, 1),  # rows wider than one register tile
        (2, 1, 9, 21, 20, 5, 3, 1),  # C = 1 with rows of >= 16 pixels: the pixel kernel
        (2, 3, 7, 19, 18, 3, 2, 1),  # few channels, wide rows: the pixel kernel, padded copy
        (2, 5, 4, 5, 19, 1, 1, 1),  # 1x1 on 20 pixels: the pixel kernel on flattened rows
    ]
    for shape, stride, padding, dilation in itertools.product(
            shapes, [1, 2, 3, (1, 2), (2, 1)], [0, 1, 2, "valid", "same", (2, 0)], [1, 2]):
        N, C, H, W, K, R, S, groups = shape
        conv = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
        if padding == "same" and stride != 1:
            continue
        try:
            fc.conv_geometry((N, C, H, W), (K, C // groups, R, S), **conv)
        except ValueError:
            continue  # kernel larger than the padded input: covered in test_api
        yield pytest.param(shape, conv, id=f"{shape}-s{stride}-p{padding}-d{dilation}")


GRID = list(_grid())


def _compare(got, want, dtype):
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == np.float64 else dict(rtol=2e-4, atol=2e-4)
    for name, a, b in zip(("y", "dx", "dw"), got, want, strict=True):
        assert a.shape == b.shape, name
        assert a.dtype == dtype, name
        np.testing.assert_allclose(a, b, err_msg=name, **tol)


def test_grid_is_large():
    assert len(GRID) > 300


@pytest.mark.parametrize("shape, conv", GRID)
def test_grid_float64(shape, conv, rng):
    N, C, H, W, K, R, S, _ = shape
    x, w, b, dy = random_problem(rng, N, C, H, W, K, R, S, conv)
    _compare(all_passes(x, w, b, dy, conv), reference_passes(x, w, b, dy, conv), np.float64)


@pytest.mark.parametrize("shape, conv", GRID[::7])
def test_grid_float32(shape, conv, rng):
    N, C, H, W, K, R, S, _ = shape
    x, w, b, dy = random_problem(rng, N, C, H, W, K, R, S, conv, np.float32)
    want = reference_passes(*(a.astype(np.float64) for a in (x, w, b, dy)), conv)
    _compare(all_passes(x, w, b, dy, conv), want, np.float32)


@st.composite
def configurations(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    C = groups * draw(st.integers(1, 5))
    K = groups * draw(st.integers(1, 20))
    R, S = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    stride = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = draw(st.one_of(st.tuples(st.integers(0, 3), st.integers(0, 3)),
                             st.sampled_from(["valid", "same"])))
    if padding == "same":
        stride = (1, 1)
    H = draw(st.integers(1, 17))
    W = draw(st.integers(1, 17))
    N = draw(st.integers(1, 3))
    conv = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    try:
        fc.conv_geometry((N, C, H, W), (K, C // groups, R, S), **conv)
    except ValueError:
        from hypothesis import assume

        assume(False)
    return (N, C, H, W, K, R, S), conv


@given(configurations(), st.integers(0, 2**32 - 1))
def test_hypothesis_against_reference(cfg, seed):
    (N, C, H, W, K, R, S), conv = cfg
    rng = np.random.default_rng(seed)
    x, w, b, dy = random_problem(rng, N, C, H, W, K, R, S, conv)
    _compare(all_passes(x, w, b, dy, conv), reference_passes(x, w, b, dy, conv), np.float64)


def _pixel_cases():
    # (N, C, H, W, K, R, S, conv): stride-1 and stride-2 layers run each image's output as
    # one row (shifted planes, parity planes), rows narrower than a vector included; other
    # row strides > 1 run rows of exactly one vector (16), one and a bit (17), two (32)
    # and more, on column phases.  K and C*R*S not multiples of the 4 x 5 tile; column
    # strides 2 and 3, dilation, asymmetric padding.
    yield 2, 1, 5, 14, 5, 1, 1, dict(padding=1)  # 1x1, padded: not the flat 1x1 path
    yield 2, 3, 6, 9, 5, 3, 3, dict(padding=1)  # rows of 9 joined: 54 pixels
    yield 1, 2, 4, 4, 3, 1, 1, dict()  # 1x1 on 16 pixels: exactly one vector
    yield 2, 1, 5, 7, 6, 2, 3, dict(stride=(1, 2), padding=(1, 2), dilation=(2, 1))
    yield 1, 2, 36, 34, 3, 3, 3, dict(stride=(2, 1))  # rows of 32
    yield 1, 1, 3, 34, 2, 3, 3, dict(stride=(2, 2))  # rows of 16
    yield 1, 1, 4, 36, 2, 3, 3, dict(stride=(2, 2), padding=(0, 1))  # rows of 17
    yield 1, 1, 7, 20, 3, 3, 5, dict(padding=(1, 0))
    yield 2, 3, 6, 31, 7, 3, 3, dict(padding=1)
    yield 1, 2, 9, 34, 9, 4, 3, dict(dilation=(2, 1))
    yield 3, 4, 5, 33, 4, 2, 2, dict(stride=(1, 1), padding=(0, 1))
    yield 1, 1, 11, 40, 6, 5, 5, dict(stride=2, padding=2)
    yield 2, 3, 8, 70, 5, 3, 4, dict(stride=(2, 3), padding=(1, 2), dilation=(1, 2))
    yield 1, 2, 6, 50, 17, 2, 3, dict(stride=(1, 3), dilation=2)
    yield 2, 3, 13, 21, 33, 3, 3, dict(stride=2, padding=(1, 0), dilation=(1, 2))
    yield 2, 2, 9, 9, 5, 3, 3, dict(stride=2, padding=1)  # 5 x 5 outputs: 25 joined


@pytest.mark.parametrize("N, C, H, W, K, R, S, conv", list(_pixel_cases()))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_pixel_kernels_against_reference(N, C, H, W, K, R, S, conv, dtype, rng, monkeypatch):
    """Few input channels and rows of >= 16 output pixels: the forward pass and dW run
    the pixel-vectorised kernels (asserted; at stride 2 the forward pass in bands of rows),
    on column phases for column strides > 1, and dW reads the NCHW deltas; the shifted
    last vector of each row included."""
    from fastconv.algorithms import pixel as kernels

    calls = []
    for name in ("conv_pixel_tiles", "conv_pixel_bands", "conv_dw_pixels"):
        kernel = getattr(kernels, name)
        monkeypatch.setattr(kernels, name,
                            lambda *a, kernel=kernel, name=name: calls.append(name) or kernel(*a))
    conv = dict(dict(stride=1, padding=0, dilation=1, groups=1), **conv)
    x, w, b, dy = random_problem(rng, N, C, H, W, K, R, S, conv, dtype)
    y = fc.conv2d(x, w, b, **conv)
    dw = fc.conv2d_grad_weight(x, dy, w.shape, **conv)
    geo = fc.conv_geometry(x.shape, w.shape, **conv)
    bands = (geo.sh, geo.sw) == (2, 2) and geo.OW >= kernels.PX
    assert set(calls) == {"conv_pixel_bands" if bands else "conv_pixel_tiles", "conv_dw_pixels"}
    want = reference_passes(*(a.astype(np.float64) for a in (x, w, b, dy)), conv)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == np.float64 else dict(rtol=2e-4, atol=2e-4)
    for got, ref in ((y, want[0]), (dw, want[2])):
        assert got.dtype == dtype
        np.testing.assert_allclose(got, ref, **tol)


@pytest.mark.parametrize("band", [1, 3, 8, 100])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_stride_2_pixel_forward_in_bands_matches_the_reference(band, dtype, rng, monkeypatch):
    """The stride-2 pixel forward pass lays out each band's input rows in its own task:
    bands of one row, of a size that leaves a short last band, and wider than the output;
    padding wider than the filter reaches, dilation, K off the 8-channel blocks."""
    from fastconv import config
    from fastconv.algorithms import pixel

    monkeypatch.setattr(config, "PIXEL_BAND_ROWS", band)
    for N, C, H, W, K, R, S, conv in [
            (2, 3, 37, 36, 10, 7, 7, dict(padding=3)),
            (1, 2, 20, 41, 9, 3, 4, dict(padding=(2, 1), dilation=(2, 1))),
            (1, 1, 9, 33, 3, 3, 3, dict(padding=(4, 5))),
            (2, 4, 12, 40, 17, 5, 5, dict(padding=(0, 2), dilation=(1, 2)))]:
        conv = dict(stride=2, groups=1, **dict(dict(padding=0, dilation=1), **conv))
        x, w, b, _ = random_problem(rng, N, C, H, W, K, R, S, conv, dtype)
        geo = fc.conv_geometry(x.shape, w.shape, **conv)
        y = pixel._forward_pixels(x, w, b, geo)
        want = reference_passes(*(a.astype(np.float64) for a in (x, w, b, np.zeros(
            (N, K, geo.OH, geo.OW)))), conv)[0]
        tol = 1e-10 if dtype == np.float64 else 2e-4
        np.testing.assert_allclose(y, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("stride, joined", [(1, True), ((1, 2), True), ((2, 2), True),
                                             ((2, 1), False), (3, False)])
def test_pixel_input_joins_rows_for_row_stride_1_and_stride_2(stride, joined):
    """Row stride 1 (any column stride) and stride 2 lay the input out so that each
    image's output is one row of OH*OW pixels (no row tails); other strides keep one row
    per output row."""
    geo = fc.conv_geometry((2, 3, 20, 22), (4, 3, 3, 3), stride=stride, padding=1)
    px = layouts._pixel_input(np.zeros((2, 3, 20, 22), np.float32), geo)
    assert (px.OH, px.OW) == ((1, geo.OH * geo.OW) if joined else (geo.OH, geo.OW))


@pytest.mark.parametrize("flat", [True, False])
@given(data=st.data())
def test_shifted_planes_kernel_against_its_formula(flat, data):
    """``kernels.shifted_planes`` writes every element of ``dst`` as its docstring says:
    ``x[n, c, ih, j*sw + qoff[s] - pl]`` inside the input, else zero, with
    ``ih = h - pt`` (or the parity split's row).  Column offsets from left of the input
    to past its right edge, so that the flat path for rows as wide as the input's
    (stride 1, ``OW == W``, no parity split) meets every clipping case, and the general
    path the rest."""
    from fastconv import kernels

    draw = data.draw
    N, C = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    H, W = draw(st.integers(1, 9)), draw(st.integers(1, 20))
    pt, pl = draw(st.integers(0, 3)), draw(st.integers(0, 5))
    sw = 1 if flat else draw(st.integers(1, 3))
    OW = W if flat else draw(st.integers(1, 20))
    Hh = 0 if flat else draw(st.sampled_from([0, 1, 3]))
    Hp = 2 * Hh if Hh else H + pt + draw(st.integers(0, 3))
    qoff = np.array(draw(st.lists(st.integers(0, pl + sw * W + 2), min_size=1, max_size=6)))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    dst = np.full((N, C, len(qoff), Hp, OW), np.nan, np.float32)
    kernels.shifted_planes(x.reshape(N, C, H * W), W, dst, pt, pl, sw, qoff, Hh)

    want = np.zeros_like(dst)
    for h in range(Hp):
        ih = (2 * (h % Hh) + h // Hh if Hh else h) - pt
        for s, q in enumerate(qoff):
            iw = np.arange(OW) * sw + q - pl
            ok = (iw >= 0) & (iw < W)
            if 0 <= ih < H:
                want[:, :, s, h, ok] = x[:, :, ih, iw[ok]]
    np.testing.assert_array_equal(dst, want)


@pytest.fixture
def cvec_calls(monkeypatch):
    """The calls of the NCHW-delta dW kernel, conv_dw_cvec (which still runs)."""
    from fastconv.algorithms import nchw_delta_dw as kernels

    calls = []
    real = kernels.conv_dw_cvec
    monkeypatch.setattr(kernels, "conv_dw_cvec", lambda *a: calls.append(a) or real(*a))
    return calls


def _cvec_cases():
    # (N, C, H, W, K, R, S, conv): one group and C filling vectors of 16 channels (a
    # quarter of padding at most): dW reads the NCHW deltas against vectors of the input's
    # channels.  K not a multiple of the 4-channel tile, vector counts not multiples of the
    # 6-vector tile, padding channels (48 -> 48, 60 -> 64), strides, dilation, asymmetric
    # padding, and a batch of more than one chunk.
    yield 2, 16, 5, 6, 5, 3, 3, dict(padding=1)
    yield 1, 32, 14, 14, 64, 5, 5, dict(padding=2)  # MNIST conv2, one image
    yield 2, 48, 7, 9, 4, 1, 1, dict(stride=2)  # 1x1, stride 2: not the pixel path
    yield 3, 60, 6, 5, 7, 2, 3, dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    yield 1, 16, 9, 11, 9, 3, 4, dict(stride=3, dilation=2, padding=(2, 0))
    yield 7, 16, 20, 20, 40, 3, 3, dict(padding=1)  # 7 images in 2 chunks


@pytest.mark.parametrize("N, C, H, W, K, R, S, conv", list(_cvec_cases()))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_nchw_delta_dw_kernel_against_reference(N, C, H, W, K, R, S, conv, dtype, rng,
                                                 cvec_calls, direct_only):
    conv = dict(dict(stride=1, padding=0, dilation=1, groups=1), **conv)
    x, w, b, dy = random_problem(rng, N, C, H, W, K, R, S, conv, dtype)
    dw = fc.conv2d_grad_weight(x, dy, w.shape, **conv)
    assert len(cvec_calls) == 1
    want = reference_passes(*(a.astype(np.float64) for a in (x, w, b, dy)), conv)[2]
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == np.float64 else dict(rtol=2e-4, atol=2e-4)
    assert dw.dtype == dtype and dw.flags.c_contiguous
    np.testing.assert_allclose(dw, want, **tol)


@pytest.mark.parametrize("C, groups", [(20, 1), (32, 2), (12, 1)])
def test_nchw_delta_dw_kernel_only_where_channels_fill_vectors(C, groups, rng, cvec_calls):
    """20 channels would pad to 32 (60% more work), 2 groups have 16 channels each but the
    kernel has no groups, and 12 channels fill no vector: the channel tile runs them."""
    conv = dict(stride=1, padding=1, dilation=1, groups=groups)
    x, w, b, dy = random_problem(rng, 2, C, 6, 6, 8, 3, 3, conv)
    dw = fc.conv2d_grad_weight(x, dy, w.shape, **conv)
    assert not cvec_calls
    np.testing.assert_allclose(dw, reference_passes(x, w, b, dy, conv)[2], rtol=1e-10,
                               atol=1e-10)


# Finite differences, float64.  L(x, w, b) = sum(conv2d(x, w, b) * g) is linear in each
# argument, so a central difference is exact up to rounding.


@pytest.mark.parametrize("conv", [
    dict(stride=1, padding=1, dilation=1, groups=1),
    dict(stride=2, padding=(1, 2), dilation=(2, 1), groups=2),
    dict(stride=1, padding="same", dilation=(1, 3), groups=1),
])
def test_finite_differences(conv, rng):
    x, w, b, g = random_problem(rng, 2, 4, 7, 6, 4, 3, 2, conv)

    def loss(x_, w_, b_):
        return float(np.sum(fc.conv2d(x_, w_, b_, **conv) * g))

    def numeric(arr, which):
        grad = np.zeros_like(arr)
        eps = 1e-6
        for idx in np.ndindex(arr.shape):
            args = {"x": x, "w": w, "b": b}
            plus, minus = arr.copy(), arr.copy()
            plus[idx] += eps
            minus[idx] -= eps
            args[which] = plus
            lp = loss(args["x"], args["w"], args["b"])
            args[which] = minus
            lm = loss(args["x"], args["w"], args["b"])
            grad[idx] = (lp - lm) / (2 * eps)
        return grad

    tol = dict(rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(fc.conv2d_grad_input(g, w, x.shape, **conv), numeric(x, "x"), **tol)
    np.testing.assert_allclose(fc.conv2d_grad_weight(x, g, w.shape, **conv), numeric(w, "w"), **tol)
    np.testing.assert_allclose(fc.conv2d_grad_bias(g), numeric(b, "b"), **tol)


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_count_does_not_change_results(threads, rng):
    conv = dict(stride=1, padding=2, dilation=1, groups=1)
    x, w, b, dy = random_problem(rng, 4, 8, 14, 14, 32, 5, 5, conv, np.float32)
    before = fc.get_num_threads()
    try:
        fc.set_num_threads(threads)
        assert fc.get_num_threads() == threads
        got = all_passes(x, w, b, dy, conv)
    finally:
        fc.set_num_threads(before)
    for a, b_ in zip(got, all_passes(x, w, b, dy, conv), strict=True):
        np.testing.assert_array_equal(a, b_)
