"""conv1d and its two gradients: against PyTorch over a grid (strides 1-3, padding,
dilation, groups, batch 1, an empty batch, float32 and float64), against the 2-D
reference of height 1, and by float64 finite differences."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

import fastconv as fc
from fastconv import reference as ref
from fastconv.geometry import conv1d_geometry

from conftest import central_differences


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


def _grid():
    """((N, C, L, K, R), conv) pairs."""
    for stride, padding, dilation, groups in itertools.product((1, 2, 3), (0, 1, 2), (1, 2),
                                                               (1, 2)):
        yield (2, 4, 11, 6, 3), dict(stride=stride, padding=padding, dilation=dilation,
                                     groups=groups)
    one = dict(stride=1, padding=0, dilation=1, groups=1)
    yield (1, 3, 8, 5, 3), one  # batch 1
    yield (0, 3, 8, 5, 3), dict(one, stride=2, padding=1)  # an empty batch
    yield (3, 2, 9, 4, 1), one  # a 1-tap filter
    yield (2, 3, 10, 4, 4), dict(one, padding="same")  # even kernel: the extra pad at the end
    yield (2, 3, 10, 4, 3), dict(one, padding="same", dilation=3)
    yield (2, 3, 10, 4, 5), dict(one, padding="valid")
    yield (2, 4, 6, 4, 3), dict(one, groups=4)  # depthwise
    yield (2, 2, 2, 3, 5), dict(one, padding=2)  # kernel longer than the input
    yield (2, 3, 7, 2, 2), dict(stride=(2,), padding=(1,), dilation=(3,), groups=1)  # 1-tuples


GRID = list(_grid())


def _ids(case):
    (N, C, L, K, R), conv = case
    return f"N{N}C{C}L{L}K{K}R{R}-" + "-".join(f"{k}{v}" for k, v in conv.items())


def _problem(rng, shape, conv, dtype):
    N, C, L, K, R = shape
    x = rng.standard_normal((N, C, L)).astype(dtype)
    w = rng.standard_normal((K, C // conv["groups"], R)).astype(dtype)
    b = rng.standard_normal(K).astype(dtype)
    geo = conv1d_geometry(x.shape, w.shape, **conv)
    dy = rng.standard_normal((N, K, geo.OW)).astype(dtype)
    return x, w, b, dy


def _tol(dtype):
    return dict(rtol=1e-10, atol=1e-10) if dtype == np.float64 else dict(rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore:Using padding='same'")  # torch's note on even kernels
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", GRID, ids=[_ids(c) for c in GRID])
def test_against_torch(case, dtype, rng, torch):
    shape, conv = case
    x, w, b, dy = _problem(rng, shape, conv, dtype)
    tx, tw, tb = (torch.from_numpy(a).requires_grad_() for a in (x, w, b))
    yt = torch.nn.functional.conv1d(tx, tw, tb, **conv)
    yt.backward(torch.from_numpy(dy))
    tol = _tol(dtype)
    y = fc.conv1d(x, w, b, **conv)
    assert y.dtype == dtype and y.shape == tuple(yt.shape)
    np.testing.assert_allclose(y, yt.detach().numpy(), **tol)
    dx = fc.conv1d_grad_input(dy, w, x.shape, **conv)
    assert dx.dtype == dtype and dx.shape == x.shape
    np.testing.assert_allclose(dx, tx.grad.numpy(), **tol)
    dw = fc.conv1d_grad_weight(x, dy, w.shape, **conv)
    assert dw.dtype == dtype and dw.shape == w.shape
    np.testing.assert_allclose(dw, tw.grad.numpy(), **tol)


@pytest.mark.parametrize("conv", [dict(stride=2, padding=1), dict(stride=3, padding=2,
                                                                   dilation=2, groups=2)])
def test_torch_grad_functions(conv, rng, torch):
    """``torch.nn.grad.conv1d_input`` and ``conv1d_weight``, in their argument order."""
    x, w, _, dy = _problem(rng, (3, 4, 13, 6, 3), dict(dict(groups=1) | conv), np.float64)
    tx, tw, tdy = map(torch.from_numpy, (x, w, dy))
    np.testing.assert_allclose(fc.conv1d_grad_input(dy, w, x.shape, **conv),
                               torch.nn.grad.conv1d_input(x.shape, tw, tdy, **conv).numpy(),
                               rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(fc.conv1d_grad_weight(x, dy, w.shape, **conv),
                               torch.nn.grad.conv1d_weight(tx, w.shape, tdy, **conv).numpy(),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", [GRID[0], GRID[17], GRID[-1]], ids=_ids)
def test_on_the_parallel_algorithms(case, rng, parallel_paths, torch):
    """The 2-D plans' parallel algorithms on rows of height 1, float32 and float64."""
    shape, conv = case
    for dtype in (np.float64, np.float32):
        x, w, b, dy = _problem(rng, shape, conv, dtype)
        tx, tw = (torch.from_numpy(a).requires_grad_() for a in (x, w))
        yt = torch.nn.functional.conv1d(tx, tw, torch.from_numpy(b), **conv)
        yt.backward(torch.from_numpy(dy))
        tol = _tol(dtype)
        np.testing.assert_allclose(fc.conv1d(x, w, b, **conv), yt.detach().numpy(), **tol)
        np.testing.assert_allclose(fc.conv1d_grad_input(dy, w, x.shape, **conv),
                                   tx.grad.numpy(), **tol)
        np.testing.assert_allclose(fc.conv1d_grad_weight(x, dy, w.shape, **conv),
                                   tw.grad.numpy(), **tol)


@pytest.mark.parametrize("shape, conv", [
    ((16, 32, 200, 64, 5), dict(stride=1, padding=2, dilation=1, groups=1)),
    ((8, 64, 150, 64, 3), dict(stride=2, padding=1, dilation=2, groups=4)),
    ((8, 3, 300, 32, 7), dict(stride=1, padding=3, dilation=1, groups=1)),
], ids=["5tap", "strided-grouped", "3ch"])
def test_layer_sized_against_torch(shape, conv, rng, torch):
    """Sizes of a real 1-D layer, float32: the parallel algorithms the plans choose."""
    x, w, b, dy = _problem(rng, shape, conv, np.float32)
    tx, tw = (torch.from_numpy(a).requires_grad_() for a in (x, w))
    yt = torch.nn.functional.conv1d(tx, tw, torch.from_numpy(b), **conv)
    yt.backward(torch.from_numpy(dy))
    tol = dict(rtol=1e-4, atol=2e-4)
    np.testing.assert_allclose(fc.conv1d(x, w, b, **conv), yt.detach().numpy(), **tol)
    np.testing.assert_allclose(fc.conv1d_grad_input(dy, w, x.shape, **conv), tx.grad.numpy(),
                               **tol)
    np.testing.assert_allclose(fc.conv1d_grad_weight(x, dy, w.shape, **conv), tw.grad.numpy(),
                               rtol=1e-4, atol=2e-3)


@pytest.mark.parametrize("case", GRID[::5], ids=[_ids(c) for c in GRID[::5]])
def test_against_the_reference_of_height_1(case, rng):
    """The NumPy reference of the 2-D convolution, on a one-row image and filters."""
    shape, conv = case
    x, w, b, dy = _problem(rng, shape, conv, np.float64)
    geo = conv1d_geometry(x.shape, w.shape, **conv)
    n = dict(stride=(geo.sh, geo.sw), pads=geo.pads, dilation=(geo.dlh, geo.dlw),
             groups=geo.G)
    x4, w4, dy4 = x[:, :, None], w[:, :, None], dy[:, :, None]
    tol = dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(fc.conv1d(x, w, b, **conv),
                               ref.conv2d_forward(x4, w4, b, **n)[:, :, 0], **tol)
    np.testing.assert_allclose(fc.conv1d_grad_input(dy, w, x.shape, **conv),
                               ref.conv2d_grad_input(dy4, w4, x4.shape, **n)[:, :, 0], **tol)
    np.testing.assert_allclose(fc.conv1d_grad_weight(x, dy, w.shape, **conv),
                               ref.conv2d_grad_weight(x4, dy4, w4.shape, **n)[:, :, 0], **tol)


@pytest.mark.parametrize("conv", [
    dict(stride=1, padding=1, dilation=1, groups=1),
    dict(stride=2, padding=2, dilation=2, groups=2),
    dict(stride=1, padding="same", dilation=1, groups=1),
])
def test_finite_differences(conv, rng):
    """L = sum(conv1d(x, w, b) * g) is linear in each argument: central differences in
    float64 are exact up to rounding."""
    x, w, b, g = _problem(rng, (2, 4, 9, 4, 4), conv, np.float64)

    def f(**arrays):
        return fc.conv1d(**arrays, **conv)

    arrays = dict(input=x, weight=w, bias=b)
    tol = dict(rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(fc.conv1d_grad_input(g, w, x.shape, **conv),
                               central_differences(f, arrays, "input", g), **tol)
    np.testing.assert_allclose(fc.conv1d_grad_weight(x, g, w.shape, **conv),
                               central_differences(f, arrays, "weight", g), **tol)
    np.testing.assert_allclose(g.sum(axis=(0, 2)), central_differences(f, arrays, "bias", g), **tol)


def test_unbatched_input(rng):
    x, w, b, _ = _problem(rng, (1, 4, 9, 6, 3), dict(groups=2), np.float32)
    y = fc.conv1d(x[0], w, b, stride=2, groups=2)
    assert y.shape == (6, 4)
    np.testing.assert_array_equal(y, fc.conv1d(x, w, b, stride=2, groups=2)[0])


def test_empty_batch_gives_zero_gradients(rng):
    x, w, _, dy = _problem(rng, (0, 4, 9, 6, 3), dict(groups=1), np.float32)
    assert fc.conv1d(x, w).shape == (0, 6, 7)
    assert fc.conv1d_grad_input(dy, w, x.shape).shape == (0, 4, 9)
    dw = fc.conv1d_grad_weight(x, dy, w.shape)
    assert dw.shape == w.shape and dw.dtype == np.float32 and not dw.any()


@pytest.mark.parametrize("call, exc, message", [
    (lambda: fc.conv1d(np.zeros(9), np.zeros((6, 4, 3))), ValueError,
     "input must be 3-D (N, C, L) or 2-D (C, L), got shape (9,) (1-D)"),
    (lambda: fc.conv1d(np.zeros((2, 4, 9)), np.zeros((6, 4, 3, 3))), ValueError,
     "weight must be 3-D (K, C/groups, R), got shape (6, 4, 3, 3) (4-D)"),
    (lambda: fc.conv1d(np.zeros((2, 4, 9)), np.zeros((6, 3, 3))), ValueError,
     "channel mismatch: input has C=4 channels, weight shape (6, 3, 3) with groups=1"),
    (lambda: fc.conv1d(np.zeros((2, 4, 2)), np.zeros((6, 4, 3))), ValueError,
     "output length would be 0 (< 1): input length 2 padded by 0+0 is shorter than the "
     "dilated kernel 3 (kernel 3, dilation 1)"),
    (lambda: fc.conv1d(np.zeros((2, 4, 0)), np.zeros((6, 4, 3))), ValueError,
     "input spatial size must be at least 1, got 0 (input shape (2, 4, 0))"),
    (lambda: fc.conv1d(np.zeros((2, 4, 9)), np.zeros((6, 4, 3)), stride=(1, 2)), TypeError,
     "stride must be an int or a tuple of one int, got (1, 2)"),
    (lambda: fc.conv1d(np.zeros((2, 4, 9)), np.zeros((6, 4, 3)), stride=0), ValueError,
     "stride must be >= 1, got 0"),
    (lambda: fc.conv1d(np.zeros((2, 4, 9)), np.zeros((6, 4, 3)), padding="same", stride=2),
     ValueError, "padding='same' needs stride 1, got stride=2"),
    (lambda: fc.conv1d(np.zeros((2, 4, 9)), np.zeros((6, 4, 3)), padding="full"), ValueError,
     "padding must be 'valid', 'same', an int or a tuple of one int, got 'full'"),
    (lambda: fc.conv1d(np.zeros((2, 4, 9)), np.zeros((6, 4, 3)), np.zeros(5)), ValueError,
     "bias must have shape (K,) = (6,), got (5,)"),
    (lambda: fc.conv1d_grad_input(np.zeros((2, 6, 6)), np.zeros((6, 4, 3)), (2, 4, 9)),
     ValueError, "grad_output has shape (2, 6, 6), but input_shape (2, 4, 9) with weight "
     "(6, 4, 3) gives the output shape (N, K, OL) = (2, 6, 7)"),
    (lambda: fc.conv1d_grad_input(np.zeros((2, 6, 7)), np.zeros((6, 4, 3)), (2, 4, 9, 1)),
     ValueError, "input_shape must be 3 ints, got (2, 4, 9, 1)"),
    (lambda: fc.conv1d_grad_weight(np.zeros((2, 4, 9)), np.zeros((2, 6, 7)), (6, 4)),
     ValueError, "weight_shape must be 3 ints, got (6, 4)"),
    (lambda: fc.conv1d_grad_weight(np.zeros((2, 4, 9)), np.zeros((2, 6, 7, 1)), (6, 4, 3)),
     ValueError, "grad_output must be 3-D (N, K, OL), got shape (2, 6, 7, 1) (4-D)"),
])
def test_bad_input_message(call, exc, message):
    with pytest.raises(exc, match=re.escape(message)):
        call()
