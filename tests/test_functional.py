"""The top-level functional ops with torch's signatures (relu, linear, max_pool2d,
avg_pool2d) against PyTorch; calls in torch.nn.grad's argument order; error messages that
never print an array's elements; the warning on integer input."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

import fastconv as fc
from fastconv import nn, pool


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


def test_exported_at_the_top_level():
    for name in ("conv1d", "conv1d_grad_input", "conv1d_grad_weight", "conv_transpose2d",
                 "conv_transpose2d_grad_input", "conv_transpose2d_grad_weight", "linear",
                 "relu", "max_pool2d", "avg_pool2d"):
        assert name in fc.__all__ and callable(getattr(fc, name))


# ---- relu, linear, pools against torch ----------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (7,), (0, 3), ()])
def test_relu(shape, dtype, rng, torch):
    x = rng.standard_normal(shape).astype(dtype)
    if x.size:
        x.flat[0] = np.nan
    want = torch.nn.functional.relu(torch.from_numpy(x)).numpy()
    y = fc.relu(x)
    assert y.dtype == dtype and y.shape == shape
    np.testing.assert_array_equal(y, want)
    same = x.copy()
    assert fc.relu(same, inplace=True) is same
    np.testing.assert_array_equal(same, want)


def test_relu_inplace_needs_a_float_array():
    with pytest.raises(TypeError, match="input must have dtype float32 or float64"):
        fc.relu(np.zeros(3, np.int64), inplace=True)
    with pytest.raises(ValueError, match="input must be writeable"):
        x = np.zeros(3)
        x.flags.writeable = False
        fc.relu(x, inplace=True)
    with pytest.raises(TypeError, match="inplace must be True or False"):
        fc.relu(np.zeros(3), inplace=1)


@pytest.mark.parametrize("x_shape, w_shape, bias", [
    ((3, 5), (4, 5), True), ((2, 3, 5), (4, 5), False), ((5,), (4, 5), True),
    ((0, 5), (4, 5), True), ((6, 0), (3, 0), True), ((10, 20), (130, 20), True),
    ((64, 3136), (128, 3136), True), ((2, 2, 7), (65, 7), False)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_linear(x_shape, w_shape, bias, dtype, rng, torch):
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype) if bias else None
    want = torch.nn.functional.linear(torch.from_numpy(x), torch.from_numpy(w),
                                      None if b is None else torch.from_numpy(b)).numpy()
    y = fc.linear(x, w, b)
    assert y.dtype == dtype and y.shape == want.shape
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(y, want, **tol)


@pytest.mark.parametrize("call, message", [
    (lambda: fc.linear(np.zeros((2, 5)), np.zeros((4, 6))),
     "input must have in_features = 6 elements on its last axis (weight shape (4, 6)), got "
     "shape (2, 5)"),
    (lambda: fc.linear(np.zeros((2, 5)), np.zeros(5)),
     "weight must be 2-D (out_features, in_features), got shape (5,)"),
    (lambda: fc.linear(np.zeros((2, 5)), np.zeros((4, 5)), np.zeros(5)),
     "bias must have shape (out_features,) = (4,), got (5,)"),
    (lambda: fc.linear(np.zeros(()), np.zeros((4, 5))), "got shape ()"),
])
def test_linear_errors(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


POOLS = [dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1),
         dict(kernel_size=(3, 2), stride=(1, 2), padding=(1, 0)), dict(kernel_size=2, stride=1)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("args", POOLS)
@pytest.mark.parametrize("shape", [(2, 3, 8, 7), (3, 6, 6), (0, 2, 4, 4)])
def test_max_pool2d(shape, args, dtype, rng, torch):
    x = rng.standard_normal(shape).astype(dtype)
    tx = torch.from_numpy(x).requires_grad_()
    yt, it = torch.nn.functional.max_pool2d(tx, **args, return_indices=True)
    y, idx = fc.max_pool2d(x, **args, return_indices=True)
    assert y.dtype == dtype and y.shape == tuple(yt.shape)
    np.testing.assert_array_equal(y, yt.detach().numpy())
    np.testing.assert_array_equal(idx, it.numpy())
    np.testing.assert_array_equal(fc.max_pool2d(x, **args), y)
    if len(shape) == 4:  # the backward pass of fastconv.pool, against torch's
        dy = rng.standard_normal(y.shape).astype(dtype)
        yt.backward(torch.from_numpy(dy))
        np.testing.assert_allclose(pool.max_pool2d_backward(dy, idx, x.shape), tx.grad.numpy(),
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("args", POOLS)
@pytest.mark.parametrize("shape", [(2, 3, 8, 7), (3, 6, 6), (0, 2, 4, 4)])
def test_avg_pool2d(shape, args, dtype, rng, torch):
    x = rng.standard_normal(shape).astype(dtype)
    tx = torch.from_numpy(x).requires_grad_()
    yt = torch.nn.functional.avg_pool2d(tx, **args)
    y = fc.avg_pool2d(x, **args)
    assert y.dtype == dtype and y.shape == tuple(yt.shape)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-6, atol=1e-6)
    if len(shape) == 4:
        dy = rng.standard_normal(y.shape).astype(dtype)
        yt.backward(torch.from_numpy(dy))
        np.testing.assert_allclose(pool.avg_pool2d_backward(dy, x.shape, **args),
                                   tx.grad.numpy(), rtol=1e-6, atol=1e-6)


def test_pools_take_torchs_positional_arguments(rng, torch):
    x = rng.standard_normal((2, 3, 9, 9))
    tx = torch.from_numpy(x)
    F = torch.nn.functional
    np.testing.assert_array_equal(fc.max_pool2d(x, 3, 2, 1, 1, False),
                                  F.max_pool2d(tx, 3, 2, 1, 1, False).numpy())
    np.testing.assert_allclose(fc.avg_pool2d(x, 3, 2, 1, False, True, None),
                               F.avg_pool2d(tx, 3, 2, 1, False, True, None).numpy(), rtol=1e-12)


@pytest.mark.parametrize("call, exc, message", [
    (lambda: fc.max_pool2d(np.zeros((1, 1, 4, 4)), 2, dilation=2), ValueError,
     "dilation=2 is not supported by fastconv's pools (only dilation=1)"),
    (lambda: fc.max_pool2d(np.zeros((1, 1, 4, 4)), 2, dilation=0), ValueError,
     "dilation must be >= 1"),
    (lambda: fc.max_pool2d(np.zeros((1, 1, 4, 4)), 2, ceil_mode=True), ValueError,
     "ceil_mode=True is not supported"),
    (lambda: fc.max_pool2d(np.zeros((1, 1, 4, 4)), 2, ceil_mode=None), TypeError,
     "ceil_mode must be True or False"),
    (lambda: fc.avg_pool2d(np.zeros((1, 1, 4, 4)), 2, count_include_pad=False), ValueError,
     "count_include_pad=False is not supported"),
    (lambda: fc.avg_pool2d(np.zeros((1, 1, 4, 4)), 2, divisor_override=3), ValueError,
     "divisor_override=3 is not supported"),
    (lambda: fc.avg_pool2d(np.zeros((4, 4)), 2), ValueError,
     "input must be 4-D (N, C, H, W) or 3-D (C, H, W), got shape (4, 4) (2-D)"),
])
def test_pool_options_fastconv_lacks(call, exc, message):
    with pytest.raises(exc, match=re.escape(message)):
        call()


# ---- calls in torch.nn.grad's argument order ------------------------------------------------

X = np.zeros((2, 4, 9, 8), np.float32)
W = np.zeros((6, 4, 3, 3), np.float32)
DY = np.zeros((2, 6, 7, 6), np.float32)


@pytest.mark.parametrize("call, message", [
    (lambda: fc.conv2d_grad_input(X.shape, W, DY),
     "conv2d_grad_input takes (grad_output, weight, input_shape); it got the shape "
     "(2, 4, 9, 8) as grad_output and ndarray of shape (2, 6, 7, 6) and dtype float32 as "
     "input_shape: the argument order of torch.nn.grad.conv2d_input (input_size, weight, "
     "grad_output)"),
    (lambda: fc.conv2d_grad_input(list(X.shape), W, DY), "it got the shape (2, 4, 9, 8) as"),
    (lambda: fc.conv2d_grad_weight(X, W.shape, DY),
     "conv2d_grad_weight takes (input, grad_output, weight_shape); it got the shape "
     "(6, 4, 3, 3) as grad_output and ndarray of shape (2, 6, 7, 6) and dtype float32 as "
     "weight_shape: the argument order of torch.nn.grad.conv2d_weight (input, weight_size, "
     "grad_output)"),
    (lambda: fc.conv1d_grad_input((2, 4, 9), W[..., 0], DY[..., 0]),
     "conv1d_grad_input takes (grad_output, weight, input_shape)"),
    (lambda: fc.conv1d_grad_weight(X[..., 0], (6, 4, 3), DY[..., 0]),
     "conv1d_grad_weight takes (input, grad_output, weight_shape)"),
    (lambda: fc.conv_transpose2d_grad_input(X.shape, W, DY),
     "conv_transpose2d_grad_input takes (grad_output, weight, input_shape)"),
    (lambda: fc.conv_transpose2d_grad_weight(X, W.shape, DY),
     "conv_transpose2d_grad_weight takes (input, grad_output, weight_shape)"),
])
def test_torch_argument_order_is_named(call, message):
    with pytest.raises(TypeError, match=re.escape(message)) as info:
        call()
    assert len(str(info.value)) < 400 and "[" not in str(info.value)


def test_torch_argument_order_with_torch_tensors(torch):
    x, w, dy = (torch.zeros(a.shape) for a in (X, W, DY))
    with pytest.raises(TypeError, match=re.escape(
            "it got the shape (2, 4, 9, 8) as grad_output and Tensor of shape (2, 6, 7, 6) and "
            "dtype torch.float32 as input_shape")):
        fc.conv2d_grad_input(x.shape, w, dy)  # torch.Size is a tuple
    with pytest.raises(TypeError, match="conv2d_grad_weight takes"):
        fc.conv2d_grad_weight(x, w.shape, dy)


BIG = np.arange(10000.0).reshape(100, 100)


@pytest.mark.parametrize("call", [
    lambda: fc.conv2d(X, W, stride=BIG),
    lambda: fc.conv2d(X, W, padding=BIG),
    lambda: fc.conv2d(X, W, dilation=BIG),
    lambda: fc.conv2d(X, W, groups=BIG),
    lambda: fc.conv2d_grad_input(DY, W, BIG),
    lambda: fc.conv2d_grad_input(DY, W, BIG[0]),
    lambda: fc.conv2d_grad_weight(X, DY, BIG),
    lambda: fc.conv_geometry(BIG, W.shape),
    lambda: fc.conv2d_plan(X.shape, BIG),
    lambda: fc.conv1d(X[..., 0], W[..., 0], stride=BIG),
    lambda: fc.conv1d(X[..., 0], W[..., 0], padding=BIG),
    lambda: fc.conv1d_grad_input(DY[..., 0], W[..., 0], BIG),
    lambda: fc.conv_transpose2d(DY, W, output_padding=BIG),
    lambda: fc.set_num_threads(BIG),
    lambda: fc.max_pool2d(X, BIG),
    lambda: fc.max_pool2d(X, 2, dilation=BIG),
    lambda: fc.avg_pool2d(X, 2, stride=BIG),
    lambda: fc.relu(X, inplace=BIG),
    lambda: pool.max_pool2d_backward(DY, DY.astype(int), BIG),
    lambda: nn.Conv2d(4, 6, BIG),
])
def test_messages_give_shapes_not_elements(call):
    """An array where a number or shape belongs is named by its shape and dtype."""
    with pytest.raises((TypeError, ValueError)) as info:
        call()
    text = str(info.value)
    assert len(text) < 300 and "\n" not in text, text
    assert "(100, 100)" in text or "(100,)" in text, text
    assert "9999" not in text and "[" not in text, text


# ---- integer input ---------------------------------------------------------------------------


def _caught(call):
    """The warnings ``call`` gives under Python's default filter (once per location)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        call()
    return [w for w in caught if issubclass(w.category, UserWarning)]


XI = np.ones((2, 3, 6, 6), np.int64)
WF = np.ones((4, 3, 3, 3), np.float32)


@pytest.mark.parametrize("call", [
    lambda: fc.conv2d(XI, WF),
    lambda: fc.conv2d(XI.astype(bool), WF),
    lambda: fc.conv2d(XI.astype(np.float32), WF.astype(np.uint8)),
    lambda: fc.conv2d_grad_input(np.ones((2, 4, 4, 4), np.int32), WF, XI.shape),
    lambda: fc.conv2d_grad_weight(XI, np.ones((2, 4, 4, 4), np.float32), WF.shape),
    lambda: fc.conv2d_grad_bias(np.ones((2, 4, 4, 4), np.int32)),
    lambda: fc.conv1d(XI[..., 0], WF[..., 0]),
    lambda: fc.conv_transpose2d(XI, WF.transpose(1, 0, 2, 3)),
    lambda: fc.linear(XI, np.ones((5, 6), np.float32)),
    lambda: fc.relu(XI),
    lambda: fc.max_pool2d(XI, 2),
    lambda: fc.avg_pool2d(XI, 2),
    lambda: nn.Conv2d(3, 4, 3)(XI),
])
def test_integer_input_warns_once_per_call_site(call):
    with warnings.catch_warnings():  # compiling a kernel resets the registry of warnings given
        warnings.simplefilter("ignore")
        call()

    def three_calls():
        for _ in range(3):
            y = call()
        return y

    caught = _caught(three_calls)
    assert len(caught) == 1, [str(w.message) for w in caught]
    assert re.match(r"fastconv computes integer and bool arrays in float64 \(got \w+\)",
                    str(caught[0].message))
    assert caught[0].filename == __file__  # the caller's line, not fastconv's


def test_integer_input_result_is_float64():
    with pytest.warns(UserWarning, match="integer and bool arrays in float64"):
        y = fc.conv2d(XI, WF)
    assert y.dtype == np.float64
    np.testing.assert_array_equal(y, fc.conv2d(XI.astype(np.float64), WF))


@pytest.mark.parametrize("call", [
    lambda: fc.conv2d(XI.astype(np.float32), WF),
    lambda: fc.conv2d(XI.astype(np.float16), WF),
    lambda: fc.conv2d(XI, WF.astype(np.float64)),  # float64 anyway: nothing to tell
    lambda: fc.linear(np.ones((2, 6)), np.ones((3, 6), np.int8)),
])
def test_no_warning_without_integer_promotion(call):
    assert _caught(call) == []


def test_each_call_site_warns_once():
    def two_sites():
        fc.conv2d(XI, WF)
        fc.conv2d(XI, WF)

    assert len(_caught(two_sites)) == 2
