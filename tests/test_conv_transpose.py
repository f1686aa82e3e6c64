"""conv_transpose2d and its two gradients: against PyTorch over a grid (strides, padding,
output_padding, dilation, groups, bias, float32 and float64, batch 1, an empty batch), by
float64 finite differences, and its errors."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

import fastconv as fc
from fastconv.geometry import conv_transpose2d_geometry

from conftest import central_differences


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


def _pairs(v):
    return (v, v) if isinstance(v, int) else v


def _valid(conv):
    (sh, sw), (oph, opw), (dh, dw) = (_pairs(conv[k]) for k in ("stride", "output_padding",
                                                                 "dilation"))
    return (oph < sh or oph < dh) and (opw < sw or opw < dw)


def _grid():
    """((N, C_in, H, W, C_out, R, S), conv) pairs."""
    for stride, padding, output_padding, dilation, groups in itertools.product(
            (1, 2, 3, (2, 1)), (0, 1, (1, 2)), (0, 1, (1, 0)), (1, 2), (1, 2)):
        conv = dict(stride=stride, padding=padding, output_padding=output_padding,
                    groups=groups, dilation=dilation)
        if _valid(conv):
            yield (2, 4, 5, 6, 6, 3, 2), conv
    one = dict(stride=1, padding=0, output_padding=0, groups=1, dilation=1)
    yield (1, 3, 4, 4, 5, 3, 3), dict(one, stride=2, padding=1, output_padding=1)  # batch 1
    yield (0, 3, 4, 4, 5, 3, 3), dict(one, stride=2)  # an empty batch
    yield (2, 4, 3, 5, 4, 1, 1), one  # 1x1
    yield (2, 4, 4, 4, 4, 3, 3), dict(one, groups=4)  # depthwise
    yield (2, 2, 3, 3, 3, 3, 3), dict(one, output_padding=(1, 2), dilation=(2, 3))  # op >= stride
    yield (2, 2, 3, 4, 2, 2, 3), dict(one, stride=2, output_padding=(2, 1), dilation=3)
    yield (2, 3, 4, 4, 2, 5, 5), dict(one, padding=2)  # the shape of a 'same' conv2d's dX


GRID = list(_grid())


def _ids(case):
    (N, Ci, H, W, Co, R, S), conv = case
    return f"N{N}Ci{Ci}H{H}W{W}Co{Co}R{R}S{S}-" + "-".join(f"{k}{v}" for k, v in conv.items())


def _problem(rng, shape, conv, dtype):
    N, Ci, H, W, Co, R, S = shape
    x = rng.standard_normal((N, Ci, H, W)).astype(dtype)
    w = rng.standard_normal((Ci, Co // conv["groups"], R, S)).astype(dtype)
    b = rng.standard_normal(Co).astype(dtype)
    geo = conv_transpose2d_geometry(x.shape, w.shape, **conv)
    dy = rng.standard_normal((N, Co, geo.H, geo.W)).astype(dtype)
    return x, w, b, dy


def test_grid_is_large():
    assert len(GRID) > 100


# float64 on every configuration, float32 on every third; a bias on every other one.
RUNS = [(i, np.dtype(np.float64)) for i in range(len(GRID))] + [
    (i, np.dtype(np.float32)) for i in range(0, len(GRID), 3)]


@pytest.mark.parametrize("i, dtype", RUNS, ids=[f"{_ids(GRID[i])}-{d}" for i, d in RUNS])
def test_against_torch(i, dtype, rng, torch):
    shape, conv = GRID[i]
    x, w, b, dy = _problem(rng, shape, conv, dtype)
    with_bias = i % 2 == 0
    tx, tw, tb = (torch.from_numpy(a).requires_grad_() for a in (x, w, b))
    yt = torch.nn.functional.conv_transpose2d(tx, tw, tb if with_bias else None, **conv)
    yt.backward(torch.from_numpy(dy))
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == np.float64 else dict(rtol=1e-4, atol=1e-4)
    y = fc.conv_transpose2d(x, w, b if with_bias else None, **conv)
    assert y.dtype == dtype and y.shape == tuple(yt.shape)
    np.testing.assert_allclose(y, yt.detach().numpy(), **tol)
    dx = fc.conv_transpose2d_grad_input(dy, w, x.shape, **conv)
    assert dx.dtype == dtype and dx.shape == x.shape
    np.testing.assert_allclose(dx, tx.grad.numpy(), **tol)
    dw = fc.conv_transpose2d_grad_weight(x, dy, w.shape, **conv)
    assert dw.dtype == dtype and dw.shape == w.shape
    np.testing.assert_allclose(dw, tw.grad.numpy(), **tol)
    if with_bias:
        np.testing.assert_allclose(fc.conv2d_grad_bias(dy), tb.grad.numpy(), **tol)


def test_positional_arguments_in_torchs_order(rng, torch):
    """stride, padding, output_padding, groups, dilation: torch's positional order."""
    x, w, b, _ = _problem(rng, (2, 4, 5, 5, 6, 3, 3), dict(
        stride=2, padding=1, output_padding=1, groups=2, dilation=2), np.float64)
    want = torch.nn.functional.conv_transpose2d(*map(torch.from_numpy, (x, w, b)), 2, 1, 1, 2, 2)
    np.testing.assert_allclose(fc.conv_transpose2d(x, w, b, 2, 1, 1, 2, 2), want.numpy(),
                               rtol=1e-12, atol=1e-12)


def test_layer_sized_against_torch(rng, torch):
    """A decoder's upsampling layer, float32: the parallel algorithms the plans choose."""
    conv = dict(stride=2, padding=1, output_padding=1, groups=1, dilation=1)
    x, w, b, dy = _problem(rng, (8, 64, 14, 14, 32, 3, 3), conv, np.float32)
    tx, tw = (torch.from_numpy(a).requires_grad_() for a in (x, w))
    yt = torch.nn.functional.conv_transpose2d(tx, tw, torch.from_numpy(b), **conv)
    yt.backward(torch.from_numpy(dy))
    np.testing.assert_allclose(fc.conv_transpose2d(x, w, b, **conv), yt.detach().numpy(),
                               rtol=1e-4, atol=2e-4)
    np.testing.assert_allclose(fc.conv_transpose2d_grad_input(dy, w, x.shape, **conv),
                               tx.grad.numpy(), rtol=1e-4, atol=2e-4)
    np.testing.assert_allclose(fc.conv_transpose2d_grad_weight(x, dy, w.shape, **conv),
                               tw.grad.numpy(), rtol=1e-4, atol=5e-3)


def test_is_conv2d_grad_input():
    """The same numbers as conv2d_grad_input with the weights and deltas given alike."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 6, 4, 4))
    w = rng.standard_normal((6, 4, 3, 3))
    np.testing.assert_array_equal(fc.conv_transpose2d(x, w, stride=2, padding=1),
                                  fc.conv2d_grad_input(x, w, (2, 4, 7, 7), stride=2, padding=1))


@pytest.mark.parametrize("conv", [
    dict(stride=1, padding=0, output_padding=0, groups=1, dilation=1),
    dict(stride=2, padding=1, output_padding=1, groups=2, dilation=1),
    dict(stride=(1, 2), padding=(0, 1), output_padding=(1, 0), groups=1, dilation=(2, 1)),
])
def test_finite_differences(conv, rng):
    x, w, b, g = _problem(rng, (2, 4, 3, 4, 4, 3, 2), conv, np.float64)

    def f(**arrays):
        return fc.conv_transpose2d(**arrays, **conv)

    arrays = dict(input=x, weight=w, bias=b)
    tol = dict(rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(fc.conv_transpose2d_grad_input(g, w, x.shape, **conv),
                               central_differences(f, arrays, "input", g), **tol)
    np.testing.assert_allclose(fc.conv_transpose2d_grad_weight(x, g, w.shape, **conv),
                               central_differences(f, arrays, "weight", g), **tol)
    np.testing.assert_allclose(fc.conv2d_grad_bias(g),
                               central_differences(f, arrays, "bias", g), **tol)


def test_unbatched_input(rng):
    x = rng.standard_normal((4, 3, 3)).astype(np.float32)
    w = rng.standard_normal((4, 2, 2, 2)).astype(np.float32)
    y = fc.conv_transpose2d(x, w, np.ones(2, np.float32), stride=2)
    assert y.shape == (2, 6, 6) and y.dtype == np.float32
    np.testing.assert_array_equal(y, fc.conv_transpose2d(x[None], w, np.ones(2, np.float32),
                                                         stride=2)[0])


X = np.zeros((2, 4, 5, 5))
W = np.zeros((4, 3, 3, 3))


@pytest.mark.parametrize("call, exc, message", [
    (lambda: fc.conv_transpose2d(X, W, stride=2, output_padding=2), ValueError,
     "output_padding must be smaller than either stride or dilation, got output_padding="
     "(2, 2) with stride=(2, 2) and dilation=(1, 1)"),
    (lambda: fc.conv_transpose2d(X, W, output_padding=(0, 1)), ValueError,
     "output_padding must be smaller than either stride or dilation"),
    (lambda: fc.conv_transpose2d(X, W, output_padding=-1), ValueError,
     "output_padding must be >= 0, got -1"),
    (lambda: fc.conv_transpose2d(X, W, padding="same"), TypeError,
     "padding must be an int or a pair of ints (h, w), got 'same'"),
    (lambda: fc.conv_transpose2d(X, W, padding=4), ValueError,
     "output size would be -1x-1 (< 1)"),
    (lambda: fc.conv_transpose2d(X, np.zeros((3, 3, 3, 3))), ValueError,
     "channel mismatch: input has C_in=4 channels, weight shape (3, 3, 3, 3) "
     "(C_in, C_out/groups, R, S) expects C_in = 3"),
    (lambda: fc.conv_transpose2d(X, W, groups=3), ValueError,
     "groups=3 must divide the input channels C_in=4"),
    (lambda: fc.conv_transpose2d(X, W, np.zeros(4)), ValueError,
     "bias must have shape (C_out,) = (3,), got (4,)"),
    (lambda: fc.conv_transpose2d(X[0, 0], W), ValueError,
     "input must be 4-D (N, C_in, H, W) or 3-D (C_in, H, W), got shape (5, 5) (2-D)"),
    (lambda: fc.conv_transpose2d_grad_input(np.zeros((2, 3, 6, 6)), W, X.shape), ValueError,
     "grad_output has shape (2, 3, 6, 6), but input_shape (2, 4, 5, 5) with weight "
     "(4, 3, 3, 3) gives the output shape (N, C_out, OH, OW) = (2, 3, 7, 7)"),
    (lambda: fc.conv_transpose2d_grad_weight(X, np.zeros((2, 3, 7, 7)), (4, 3, 3)),
     ValueError, "weight_shape must be 4 ints, got (4, 3, 3)"),
])
def test_bad_input_message(call, exc, message):
    with pytest.raises(exc, match=re.escape(message)):
        call()
