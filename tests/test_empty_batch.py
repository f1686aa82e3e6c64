"""An empty batch (N = 0) through every layer, both models and a training step: outputs
of the right shapes, gradients of zeros, as PyTorch gives."""

import numpy as np
import pytest

from fastconv import models, nn, optim


def _zero_grads(model):
    for p in model.parameters():
        assert p.grad is not None, p.name
        assert p.grad.shape == p.data.shape and p.grad.dtype == p.data.dtype, p.name
        assert not p.grad.any(), p.name


@pytest.mark.parametrize("make", [models.two_conv, models.tiny_net])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_models_take_an_empty_batch(make, dtype):
    model = make(seed=0, dtype=dtype)
    x = np.zeros((0, 1, 28, 28), dtype)
    y = model(x)
    assert y.shape == (0, 10) and y.dtype == dtype
    loss_fn = nn.SoftmaxCrossEntropy()
    assert loss_fn(y, np.zeros(0, np.int64)) == 0.0
    d = loss_fn.backward()
    assert d.shape == (0, 10)
    dx = model.backward(d)
    assert dx.shape == x.shape and dx.dtype == dtype
    _zero_grads(model)
    before = [p.data.copy() for p in model.parameters()]
    optim.SGD(model.parameters(), lr=0.1).step()  # zero gradients: nothing moves
    for b, p in zip(before, model.parameters(), strict=True):
        np.testing.assert_array_equal(b, p.data)
    model.eval()
    assert model(x).shape == (0, 10)
    with pytest.raises(RuntimeError, match="needs a forward"):
        model.backward(d)


def test_training_model_without_input_gradient():
    """The CLI's build(): the first layer computes no dX, on an empty batch too."""
    model = models.two_conv(seed=0)
    model[0].needs_input_grad = False
    y = model(np.zeros((0, 1, 28, 28), np.float32))
    assert model.backward(np.zeros_like(y)) is None
    _zero_grads(model)


@pytest.mark.parametrize("layers, shape", [
    # Sequential's fused paths: conv + ReLU + 2x2 pool (pool order for N > 0), on the
    # pixel path (C <= 4) and the channel tile, a conv before a pool without ReLU, a
    # 3x3 pool, an average pool.
    ((nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)), (1, 8, 8)),
    ((nn.Conv2d(16, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)), (16, 8, 8)),
    ((nn.Conv2d(16, 8, 3, stride=2), nn.MaxPool2d(2)), (16, 9, 9)),
    ((nn.Conv2d(2, 4, 3, groups=2), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1)),
     (2, 9, 9)),
    ((nn.Conv2d(3, 4, 3), nn.AvgPool2d(2), nn.ReLU()), (3, 10, 10)),
    ((nn.Flatten(), nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 3)), (3, 2, 2)),
    ((nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5, rng=0)), (3, 6, 6)),
])
def test_every_layer_and_fused_path_takes_an_empty_batch(layers, shape, rng):
    model = nn.Sequential(*layers)
    full = model(rng.standard_normal((2, *shape)).astype(np.float32))  # the shapes to expect
    model.backward(np.ones_like(full))
    model.zero_grad()
    y = model(np.zeros((0, *shape), np.float32))
    assert y.shape == (0, *full.shape[1:]) and y.dtype == np.float32
    dx = model.backward(np.zeros_like(y))
    assert dx.shape == (0, *shape)
    _zero_grads(model)
    # and each layer alone
    x = np.zeros((0, *shape), np.float32)
    for layer in layers:
        out = layer(x)
        assert out.shape[0] == 0
        assert layer.backward(np.zeros_like(out)).shape == x.shape
        x = out


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_softmax_cross_entropy_of_no_rows(reduction):
    loss_fn = nn.SoftmaxCrossEntropy(reduction)
    assert loss_fn(np.zeros((0, 10), np.float32), np.zeros(0, np.int64)) == 0.0
    d = loss_fn.backward()
    assert d.shape == (0, 10) and d.dtype == np.float32


@pytest.mark.parametrize("n", [0, 3, 70])
def test_linear_with_no_inputs_or_no_outputs(n):
    """PyTorch builds Linear(0, k) (bound 0: zero weights and bias) and Linear(k, 0)."""
    empty_in = nn.Linear(0, 4, rng=0)
    assert empty_in.params["weight"].shape == (4, 0) and not empty_in.params["bias"].any()
    y = empty_in(np.zeros((n, 0), np.float32))
    np.testing.assert_array_equal(y, np.zeros((n, 4), np.float32))
    assert empty_in.backward(np.ones((n, 4), np.float32)).shape == (n, 0)
    assert empty_in.grads["weight"].shape == (4, 0)
    np.testing.assert_array_equal(empty_in.grads["bias"], np.full(4, n, np.float32))
    empty_out = nn.Linear(4, 0, rng=0)
    assert empty_out(np.ones((n, 4), np.float32)).shape == (n, 0)
    dx = empty_out.backward(np.zeros((n, 0), np.float32))
    np.testing.assert_array_equal(dx, np.zeros((n, 4), np.float32))
    assert empty_out.grads["weight"].shape == (0, 4)


def test_flatten_keeps_its_shape_only_in_training_mode():
    flat = nn.Flatten()
    with pytest.raises(RuntimeError, match=r"backward\(\) needs a forward\(\) in training mode"):
        flat.backward(np.zeros((2, 12)))  # it used to return its input
    x = np.zeros((0, 3, 2, 2))
    assert flat(x).shape == (0, 12)  # numpy: "cannot reshape array of size 0" with -1
    assert flat.backward(np.zeros((0, 12))).shape == x.shape
    flat.eval()
    flat(x)
    with pytest.raises(RuntimeError, match="needs a forward"):
        flat.backward(np.zeros((0, 12)))
