"""Public API behaviour: argument forms, dtypes, memory layouts, edge cases and bad input."""

import re

import numpy as np
import pytest

import fastconv as fc
from fastconv import reference as ref

import conftest


@pytest.fixture
def data(rng):
    x = rng.standard_normal((2, 4, 9, 8))
    w = rng.standard_normal((6, 2, 3, 3))
    b = rng.standard_normal(6)
    return x, w, b


# ---- argument forms, dtypes, layouts --------------------------------------------------


def test_int_and_pair_arguments_agree(data):
    x, w, b = data
    a = fc.conv2d(x, w, b, stride=2, padding=1, dilation=1, groups=2)
    p = fc.conv2d(x, w, b, stride=(2, 2), padding=[1, 1], dilation=(1, 1), groups=2)
    np.testing.assert_array_equal(a, p)
    assert fc.conv2d(x, w, padding="valid", groups=2).shape == (2, 6, 7, 6)
    assert fc.conv2d(x, w, padding="same", groups=2).shape == (2, 6, 9, 8)


def test_unbatched_input(data):
    x, w, b = data
    np.testing.assert_array_equal(fc.conv2d(x[0], w, b, groups=2), fc.conv2d(x, w, b, groups=2)[0])


@pytest.mark.filterwarnings("ignore:fastconv computes integer")  # test_functional.py tests it
@pytest.mark.parametrize("xd, wd, bd, expected", [
    (np.float32, np.float32, np.float32, np.float32),
    (np.float64, np.float64, np.float64, np.float64),
    (np.float32, np.float64, None, np.float64),
    (np.float64, np.float32, np.float32, np.float64),
    (np.float32, np.float32, np.float64, np.float64),
    (np.float16, np.float32, None, np.float32),
    (np.int64, np.int64, None, np.float64),
    (np.uint8, np.float32, None, np.float64),
    (np.bool_, np.int32, None, np.float64),
])
def test_dtype_rules(xd, wd, bd, expected, rng):
    x = (rng.standard_normal((1, 2, 5, 5)) * 3).astype(xd)
    w = (rng.standard_normal((3, 2, 2, 2)) * 3).astype(wd)
    b = None if bd is None else np.ones(3, bd)
    y = fc.conv2d(x, w, b)
    assert y.dtype == expected
    want = ref.conv2d_forward(x.astype(np.float64), w.astype(np.float64),
                              None if b is None else b.astype(np.float64))
    np.testing.assert_allclose(y, want, rtol=1e-3 if expected == np.float32 else 1e-12, atol=1e-3)


@pytest.mark.filterwarnings("ignore:fastconv computes integer")
def test_grad_dtypes_follow_their_arguments(rng):
    x32 = rng.standard_normal((1, 2, 5, 5)).astype(np.float32)
    w32 = rng.standard_normal((3, 2, 2, 2)).astype(np.float32)
    dy32 = rng.standard_normal((1, 3, 4, 4)).astype(np.float32)
    assert fc.conv2d_grad_input(dy32, w32, x32.shape).dtype == np.float32
    assert fc.conv2d_grad_weight(x32, dy32, w32.shape).dtype == np.float32
    assert fc.conv2d_grad_bias(dy32).dtype == np.float32
    assert fc.conv2d_grad_input(dy32.astype(np.float64), w32, x32.shape).dtype == np.float64
    assert fc.conv2d_grad_weight(x32, dy32.astype(int), w32.shape).dtype == np.float64
    assert fc.conv2d_grad_bias(dy32.astype(int)).dtype == np.float64


def test_non_contiguous_and_read_only_inputs(data, rng):
    x, w, b = data
    conv = dict(stride=(2, 1), padding=(1, 2), groups=2)
    y = fc.conv2d(x, w, b, **conv)
    dy = rng.standard_normal(y.shape)
    want = (y, fc.conv2d_grad_input(dy, w, x.shape, **conv),
            fc.conv2d_grad_weight(x, dy, w.shape, **conv))

    xf, wf, dyf = np.asfortranarray(x), np.asfortranarray(w), np.asfortranarray(dy)
    xs = np.zeros((2, 4, 18, 8))
    xs[:, :, ::2] = x  # a strided view
    xs = xs[:, :, ::2]
    b_view = np.repeat(b, 2)[::2]
    for arr in (xf, wf, dyf, xs, x):
        arr.setflags(write=False)
    got_x = [fc.conv2d(xx, w, b, **conv) for xx in (xf, xs, x)]
    for g in got_x:
        np.testing.assert_allclose(g, want[0], rtol=1e-13)
    np.testing.assert_allclose(fc.conv2d(x, wf, b_view, **conv), want[0], rtol=1e-13)
    np.testing.assert_allclose(fc.conv2d_grad_input(dyf, wf, x.shape, **conv), want[1], rtol=1e-13)
    np.testing.assert_allclose(fc.conv2d_grad_weight(xs, dyf, w.shape, **conv), want[2],
                               rtol=1e-13)
    assert x.flags.writeable is False  # inputs are never modified or unlocked


def test_list_inputs_work():
    y = fc.conv2d([[[[1, 2, 3]]]], [[[[0.3, 0.5]]]])
    np.testing.assert_allclose(y.ravel(), [1.3, 2.1])


def test_inputs_are_not_modified(data):
    x, w, b = data
    copies = [a.copy() for a in data]
    fc.conv2d(x, w, b, padding=1, groups=2)
    for a, c in zip(data, copies, strict=True):
        np.testing.assert_array_equal(a, c)


# ---- legitimate edge cases ------------------------------------------------------------


def test_nan_propagates_only_to_outputs_it_touches(rng):
    x = rng.standard_normal((1, 2, 10, 11)).astype(np.float32)
    w = rng.standard_normal((20, 2, 3, 3)).astype(np.float32)
    x[0, 1, 4, 6] = np.nan
    conv = dict(stride=1, padding=1)
    y = fc.conv2d(x, w, **conv)
    touched = ref.conv2d_forward(np.isnan(x).astype(float), np.ones(w.shape), **dict(
        stride=(1, 1), pads=(1, 1, 1, 1))) > 0
    assert np.array_equal(np.isnan(y), touched)
    assert touched.sum() == 20 * 9

    dy = rng.standard_normal(y.shape).astype(np.float32)
    dy[0, 3, 0, 10] = np.inf * 0  # NaN in a corner delta
    dx = fc.conv2d_grad_input(dy, w, x.shape, **conv)
    assert np.array_equal(np.isnan(dx[0, :, :2, 9:]), np.ones((2, 2, 2), bool))
    assert np.isnan(dx).sum() == 2 * 4


def test_inf_delta_in_the_shared_lanes_of_1x1_dw_stays_inf():
    """1x1 dW runs the pixel dW kernel with each image's pixels as one row; the row's last
    vector overlaps the one before it, and an inf delta there must give inf (inf * x
    counted once), not NaN (inf * a zeroed lane)."""
    x = np.full((1, 2, 4, 5), 0.5)  # 20 pixels: vectors at 0..15 and 4..19
    dy = np.ones((1, 3, 4, 5))
    dy[0, 1, 1, 2] = np.inf  # pixel 7: in both vectors
    dw = fc.conv2d_grad_weight(x, dy, (3, 2, 1, 1))
    want = ref.conv2d_grad_weight(x, dy, (3, 2, 1, 1), stride=(1, 1), pads=(0, 0, 0, 0),
                                  dilation=(1, 1), groups=1)
    assert np.isposinf(dw[1]).all()
    np.testing.assert_array_equal(dw, want)


def test_inf_delta_in_the_shared_lanes_of_pixel_dw_stays_inf():
    """The few-channel dW kernel's last vector of a row overlaps the one before it (20
    pixels: 0..15 and 4..19); an inf delta there must give inf, not NaN."""
    x = np.full((1, 1, 3, 22), 0.5)
    dy = np.ones((1, 3, 1, 20))
    dy[0, 2, 0, 7] = np.inf
    dw = fc.conv2d_grad_weight(x, dy, (3, 1, 3, 3))
    want = ref.conv2d_grad_weight(x, dy, (3, 1, 3, 3), stride=(1, 1), pads=(0, 0, 0, 0),
                                  dilation=(1, 1), groups=1)
    assert np.isposinf(dw[2]).all()
    np.testing.assert_array_equal(dw, want)


@pytest.mark.parametrize("conv", [dict(), dict(padding=1), dict(stride=2),
                                  dict(stride=2, padding=1), dict(dilation=2, padding=2)])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weight_reaches_only_what_it_touches_in_dx(conv, bad):
    # inf * (a zero of the padding) would be NaN: dX must not multiply the border.
    rng = np.random.default_rng(3)
    w = rng.uniform(0.5, 1.5, (2, 3, 3, 3))
    w[1, 2, 0, 0] = bad
    shape = (1, 3, 7, 7)
    g = fc.conv_geometry(shape, w.shape, **conv)
    dy = rng.uniform(0.5, 1.5, (1, 2, g.OH, g.OW))
    dx = fc.conv2d_grad_input(dy, w, shape, **conv)
    # Input pixels the bad tap (r, s) = (0, 0) reads, for some output pixel.
    touched = np.zeros(shape, bool)
    for i in range(g.OH):
        for j in range(g.OW):
            h, v = i * g.sh - g.pt, j * g.sw - g.pl
            if 0 <= h < 7 and 0 <= v < 7:
                touched[0, 2, h, v] = True
    assert np.array_equal(~np.isfinite(dx), touched)
    assert np.isfinite(dx[0, :2]).all()
    # The exact path's numbers: channels without the bad tap match the reference.
    w_ok = np.where(np.isfinite(w), w, 0.0)
    n = conftest.normalised(shape, w.shape, groups=1, **{"stride": 1, "padding": 0,
                                                           "dilation": 1} | conv)
    want = ref.conv2d_grad_input(dy, w_ok, shape, **n)
    np.testing.assert_allclose(dx[0, :2], want[0, :2], rtol=1e-13)


def test_huge_stride_is_fast_and_exact():
    x_shape, w = (1, 1, 4, 4), np.ones((1, 1, 2, 2))
    dx = fc.conv2d_grad_input(np.ones((1, 1, 1, 1)), w, x_shape, stride=10**9)
    np.testing.assert_array_equal(dx[0, 0], [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0] * 4])


def test_empty_batch(data):
    x, w, b = data
    y = fc.conv2d(x[:0], w, b, padding=1, groups=2)
    assert y.shape == (0, 6, 9, 8)
    dx = fc.conv2d_grad_input(y, w, (0, 4, 9, 8), padding=1, groups=2)
    assert dx.shape == (0, 4, 9, 8)
    dw = fc.conv2d_grad_weight(x[:0], y, w.shape, padding=1, groups=2)
    assert dw.shape == w.shape and not dw.any()
    assert fc.conv2d_grad_bias(y).shape == (6,)


def test_same_padding_even_kernel_puts_extra_at_bottom_right():
    x = np.arange(16.0).reshape(1, 1, 4, 4)
    w = np.zeros((1, 1, 2, 2))
    w[0, 0, 0, 0] = 1.0  # picks x[i - top, j - left]
    y = fc.conv2d(x, w, padding="same")
    np.testing.assert_array_equal(y, x)  # top = left = 0: the padding is all bottom/right


def test_threads_api():
    n = fc.get_num_threads()
    assert 1 <= n
    fc.set_num_threads(n)
    with pytest.raises(ValueError, match=r"\[1, \d+\], got 0"):
        fc.set_num_threads(0)
    with pytest.raises(TypeError, match="must be an int, got '2'"):
        fc.set_num_threads("2")


# ---- bad input: a clear error naming what was received and the rule ------------------

X = np.zeros((2, 4, 9, 8))
Wt = np.zeros((6, 2, 3, 3))
DY = np.zeros((2, 6, 7, 6))


@pytest.mark.parametrize("call, exc, message", [
    (lambda: fc.conv2d(np.zeros((4, 9)), Wt), ValueError,
     "input must be 4-D (N, C, H, W) or 3-D (C, H, W), got shape (4, 9) (2-D)"),
    (lambda: fc.conv2d(X, np.zeros((6, 2, 3))), ValueError, "weight must be 4-D"),
    (lambda: fc.conv2d(X, np.zeros((6, 3, 3, 3))), ValueError,
     "channel mismatch: input has C=4 channels, weight shape (6, 3, 3, 3) with groups=1"),
    (lambda: fc.conv2d(X, Wt, groups=3), ValueError, "groups=3 must divide the input channels C=4"),
    (lambda: fc.conv2d(X, np.zeros((5, 2, 3, 3)), groups=2), ValueError,
     "groups=2 must divide the output channels K=5"),
    (lambda: fc.conv2d(X, Wt, groups=0), ValueError, "groups must be >= 1, got 0"),
    (lambda: fc.conv2d(X, Wt, groups=2.0), TypeError, "groups must be an int, got 2.0"),
    (lambda: fc.conv2d(X, Wt, stride=0, groups=2), ValueError, "stride must be >= 1, got 0"),
    (lambda: fc.conv2d(X, Wt, stride=(1, 0), groups=2), ValueError,
     "stride must be >= 1, got (1, 0)"),
    (lambda: fc.conv2d(X, Wt, dilation=0, groups=2), ValueError, "dilation must be >= 1, got 0"),
    (lambda: fc.conv2d(X, Wt, stride=2**63, groups=2), ValueError,
     f"stride must be <= 2147483647, got {2**63}"),
    (lambda: fc.conv2d(X, Wt, dilation=(1, 2**40), groups=2), ValueError,
     "dilation must be <= 2147483647"),
    (lambda: fc.conv2d(np.zeros((2, 4, 0, 8)), Wt, padding=3, groups=2), ValueError,
     "input spatial size must be at least 1x1, got 0x8 (input shape (2, 4, 0, 8)); only the "
     "batch may be empty"),
    (lambda: fc.conv2d_grad_input(DY, Wt, iter((2, 4, 9)), groups=2), ValueError,
     "input_shape must be 4 ints, got (2, 4, 9)"),
    (lambda: fc.conv2d(X, Wt, stride=1.5, groups=2), TypeError,
     "stride must be an int or a pair of ints (h, w), got 1.5"),
    (lambda: fc.conv2d(X, Wt, stride=(1, 2, 3), groups=2), TypeError, "got (1, 2, 3)"),
    (lambda: fc.conv2d(X, Wt, padding=-1, groups=2), ValueError, "padding must be >= 0, got -1"),
    (lambda: fc.conv2d(X, Wt, padding="full", groups=2), ValueError,
     "padding must be 'valid', 'same', an int or a pair, got 'full'"),
    (lambda: fc.conv2d(X, Wt, padding="same", stride=2, groups=2), ValueError,
     "padding='same' needs stride 1, got stride=(2, 2)"),
    (lambda: fc.conv2d(X, np.zeros((6, 2, 10, 3)), groups=2), ValueError,
     "output size would be 0x6 (< 1): input 9x8 padded by (0+0, 0+0) is smaller than the "
     "dilated kernel 10x3"),
    (lambda: fc.conv2d(X, Wt, dilation=5, groups=2), ValueError, "dilated kernel 11x11"),
    (lambda: fc.conv2d(X, Wt, np.zeros(5), groups=2), ValueError,
     "bias must have shape (K,) = (6,), got (5,)"),
    (lambda: fc.conv2d(X, Wt, np.zeros((6, 1)), groups=2), ValueError, "got (6, 1)"),
    (lambda: fc.conv2d(X.astype(complex), Wt, groups=2), TypeError,
     "input must be a real numeric array (float16/32/64, integer or bool), got dtype complex128"),
    (lambda: fc.conv2d(X, Wt.astype(object), groups=2), TypeError, "weight must be a real numeric"),
    (lambda: fc.conv2d(np.full(X.shape, "a"), Wt, groups=2), TypeError, "got dtype <U1"),
    (lambda: fc.conv2d(X, Wt, np.zeros(6, complex), groups=2), TypeError, "bias must be a real"),
    (lambda: fc.conv2d(X, np.zeros((0, 2, 3, 3))), ValueError, "must have every size >= 1"),
    # grad_output inconsistent with input_shape / weight_shape
    (lambda: fc.conv2d_grad_input(DY[:, :, :5], Wt, X.shape, groups=2), ValueError,
     "grad_output has shape (2, 6, 5, 6), but input_shape (2, 4, 9, 8) with weight (6, 2, 3, 3) "
     "gives the output shape (N, K, OH, OW) = (2, 6, 7, 6)"),
    (lambda: fc.conv2d_grad_input(DY[:, :5], Wt, X.shape, groups=2), ValueError,
     "grad_output has shape (2, 5, 7, 6)"),
    (lambda: fc.conv2d_grad_input(DY[:1], Wt, X.shape, groups=2), ValueError,
     "grad_output has shape (1, 6, 7, 6)"),
    (lambda: fc.conv2d_grad_input(DY[0], Wt, X.shape, groups=2), ValueError,
     "grad_output must be 4-D (N, K, OH, OW), got shape (6, 7, 6) (3-D)"),
    (lambda: fc.conv2d_grad_input(DY, Wt, (2, 4, 9), groups=2), ValueError,
     "input_shape must be 4 ints, got (2, 4, 9)"),
    (lambda: fc.conv2d_grad_input(DY, Wt, (2, 4, -9, 8), groups=2), ValueError,
     "input_shape must not have negative sizes"),
    (lambda: fc.conv2d_grad_input(DY, Wt, None, groups=2), TypeError,
     "input_shape must be a sequence of 4 ints, got None"),
    (lambda: fc.conv2d_grad_input(DY, Wt, X.shape, groups=2, stride=2), ValueError,
     "gives the output shape (N, K, OH, OW) = (2, 6, 4, 3)"),
    (lambda: fc.conv2d_grad_weight(X, DY[:, :, :, :5], Wt.shape, groups=2), ValueError,
     "grad_output has shape (2, 6, 7, 5), but input (2, 4, 9, 8) with weight_shape "
     "(6, 2, 3, 3) gives the output shape (N, K, OH, OW) = (2, 6, 7, 6)"),
    (lambda: fc.conv2d_grad_weight(X, DY, (6, 4, 3, 3), groups=2), ValueError, "channel mismatch"),
    (lambda: fc.conv2d_grad_weight(X[0], DY, Wt.shape, groups=2), ValueError,
     "input must be 4-D (N, C, H, W), got shape (4, 9, 8)"),
    (lambda: fc.conv2d_grad_weight(X, DY.astype(complex), Wt.shape, groups=2), TypeError,
     "grad_output must be a real numeric"),
    (lambda: fc.conv2d_grad_bias(DY[0]), ValueError, "grad_output must be 4-D"),
    (lambda: fc.conv2d_grad_bias(DY.astype(complex)), TypeError, "grad_output must be a real"),
])
def test_bad_input_message(call, exc, message):
    with pytest.raises(exc, match=re.escape(message)):
        call()
