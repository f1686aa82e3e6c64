"""The layers run what the functional API runs: for every geometry, ``nn.Conv2d`` (alone,
and before a ReLU and a 2x2 max pool in a Sequential, where it writes pool order or takes
packed deltas) gets the algorithms of ``fc.conv2d_plan`` for the same arguments, and the
same results: bit for bit alone, up to the summation order of fused layers in a
Sequential."""

from __future__ import annotations

import numpy as np
import pytest

import fastconv as fc
from fastconv import conv, nn, pool

CASES = [  # (N, C, H, W, K, kernel, conv args): one per saved kind and algorithm
    (4, 1, 28, 28, 8, 5, dict(padding=2)),  # pixel: pool order's PixelInput
    (3, 3, 12, 12, 6, 3, dict(padding=1)),  # pixel dW from the input itself
    (2, 24, 8, 8, 16, 1, {}),  # 1x1: pixel in all three passes
    (2, 32, 14, 14, 32, 5, dict(padding=2)),  # Winograd: packed
    (2, 32, 8, 8, 12, 3, dict(padding=1)),  # NCHW-delta dW: the input itself
    (2, 64, 10, 10, 64, 3, dict(padding=1, groups=2)),  # channel tile: packed
    (8, 32, 12, 12, 32, 3, dict(padding=1, groups=4)),  # grouped, wide rows
    (4, 32, 6, 20, 48, 3, dict(padding=1, groups=8)),  # grouped: the input itself
    (4, 16, 5, 40, 16, 3, dict(stride=2, padding=1, groups=4)),  # grouped, strided dX by phases
    (4, 16, 23, 21, 24, 3, dict(stride=2, padding=1)),  # channel tile, strided, odd output
    (2, 8, 11, 9, 6, 3, dict(stride=2, padding=1)),  # serial: the input itself
    (8, 32, 28, 28, 32, 3, dict(padding=1, groups=32)),  # depthwise: the input itself
    (8, 16, 32, 31, 32, 3, dict(stride=2, padding=1, groups=16)),  # depthwise, multiplier 2
]


def _layer(C, K, k, conv_args, dtype, seed=0):
    layer = nn.Conv2d(C, K, k, **conv_args, rng=np.random.default_rng(seed), dtype=dtype)
    return layer, layer.params["weight"], layer.params["bias"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[:6]}{c[6]}")
def test_a_layer_alone_runs_the_functional_plan_bit_for_bit(case, dtype, rng):
    N, C, H, W, K, k, conv_args = case
    layer, w, b = _layer(C, K, k, conv_args, dtype)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    y = layer(x)
    plan = fc.conv2d_plan(x.shape, w.shape, **conv_args, dtype=dtype)
    assert layer.algorithms == plan.algorithms
    np.testing.assert_array_equal(y, fc.conv2d(x, w, b, **conv_args))
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = layer.backward(dy)
    np.testing.assert_array_equal(dx, fc.conv2d_grad_input(dy, w, x.shape, **conv_args))
    np.testing.assert_array_equal(layer.grads["weight"],
                                  fc.conv2d_grad_weight(x, dy, w.shape, **conv_args))
    np.testing.assert_allclose(layer.grads["bias"], fc.conv2d_grad_bias(dy), rtol=1e-6,
                               atol=1e-5 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[:6]}{c[6]}")
def test_a_layer_before_relu_and_pool_runs_the_functional_plan(case, dtype, rng):
    N, C, H, W, K, k, conv_args = case
    layer, w, b = _layer(C, K, k, conv_args, dtype)
    model = nn.Sequential(layer, nn.ReLU(), nn.MaxPool2d(2))
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    out = model(x)
    assert layer.algorithms == fc.conv2d_plan(x.shape, w.shape, **conv_args,
                                              dtype=dtype).algorithms
    y = fc.conv2d(x, w, b, **conv_args)
    want, idx = pool.max_pool2d(np.maximum(y, 0), 2, return_indices=True)
    tol = 2e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out, want, rtol=tol, atol=tol)
    dout = rng.standard_normal(out.shape).astype(dtype)
    dx = model.backward(dout)
    dy = pool.max_pool2d_backward(dout, idx, y.shape) * (y > 0)
    scale = lambda a: tol * max(1.0, float(np.abs(a).max()))  # noqa: E731
    for got, ref in [(dx, fc.conv2d_grad_input(dy, w, x.shape, **conv_args)),
                     (layer.grads["weight"], fc.conv2d_grad_weight(x, dy, w.shape, **conv_args)),
                     (layer.grads["bias"], fc.conv2d_grad_bias(dy))]:
        np.testing.assert_allclose(got, ref, rtol=tol, atol=scale(ref))


def test_what_each_case_keeps():
    kinds = []
    for N, C, H, W, K, k, conv_args in CASES:
        geo = fc.conv_geometry((N, C, H, W), (K, C // conv_args.get("groups", 1), k, k),
                               **conv_args)
        kinds.append(conv.saved_kind(geo, np.float32, conv.pool_order_ok(geo)))
    assert set(kinds) == {"pixels", "packed", "input"}


@pytest.mark.parametrize("case", [CASES[3], CASES[5]], ids=["winograd", "channel-tile"])
def test_a_layer_in_evaluation_prepares_its_weights_once_while_they_do_not_change(
        case, rng, monkeypatch):
    N, C, H, W, K, k, conv_args = case
    model = nn.Sequential(nn.Conv2d(C, K, k, **conv_args, rng=np.random.default_rng(0)),
                          nn.ReLU(), nn.MaxPool2d(2))
    layer, w = model[0], model[0].params["weight"]
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    module = fc.algorithms.BY_NAME[fc.conv2d_plan(x.shape, w.shape, **conv_args).algorithms[
        "forward"]]
    model.train(False)
    want, alone = model(x), fc.conv2d(x, w, layer.params["bias"], **conv_args)
    prepared = []
    real = module.prepare
    monkeypatch.setattr(module, "prepare", lambda geo, w, pass_: (
        prepared.append(pass_), real(geo, w, pass_))[1])
    for _ in range(2):  # pool order (in the Sequential) and alone: one plan, kept weights
        np.testing.assert_array_equal(model(x), want)
        np.testing.assert_array_equal(layer(x), alone)
    assert prepared == []  # the first model(x) prepared them
    w[0, 0, 0, 0] += 1.0  # as an optimizer step does, in place
    alone = fc.conv2d(x, w, layer.params["bias"], **conv_args)
    del prepared[:]
    np.testing.assert_array_equal(layer(x), alone)
    assert prepared == ["forward"]
    model.train(True)  # training steps prepare on every call, keeping nothing
    del prepared[:]
    model(x), model(x)
    assert prepared.count("forward") == 2
