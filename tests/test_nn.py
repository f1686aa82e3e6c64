"""Layers, loss, optimizers and model presets: gradient checks, torch parity, contracts."""

import re

import numpy as np
import pytest

from fastconv import conv as conv_mod
from fastconv import models, nn, optim

from conftest import kink_margin


def _loss_and_grads(model, x, y):
    model.zero_grad()
    loss = nn.SoftmaxCrossEntropy()
    value = loss(model(x), y)
    dx = model.backward(loss.backward())
    return value, dx



@pytest.mark.parametrize("make", [models.two_conv, models.tiny_net])
def test_whole_network_finite_differences(make, rng):
    """Every parameter (and the input): random directional derivatives, float64."""
    model = make(seed=1, dtype=np.float64)
    eps = 1e-7
    for _ in range(50):  # an input whose kinks are far from where the steps reach
        x = rng.standard_normal((2, 1, 28, 28))
        if kink_margin(model.layers, x) > 1e-5:
            break
    assert kink_margin(model.layers, x) > 1e-5
    y = np.array([3, 7])
    _, dx = _loss_and_grads(model, x, y)
    grads = {p.name: p.grad.copy() for p in model.parameters()}
    loss = nn.SoftmaxCrossEntropy()
    for p in model.parameters():
        for _ in range(3):
            v = rng.standard_normal(p.data.shape)
            v /= np.sqrt(v.size)  # steps of size eps in parameter space
            p.data[...] += eps * v
            lp = loss(model(x), y)
            p.data[...] -= 2 * eps * v
            lm = loss(model(x), y)
            p.data[...] += eps * v
            numeric = (lp - lm) / (2 * eps)
            analytic = float(np.sum(grads[p.name] * v))
            assert numeric == pytest.approx(analytic, rel=1e-5, abs=1e-8), p.name
        # and one coordinate, the largest gradient entry
        i = np.unravel_index(np.argmax(np.abs(grads[p.name])), p.data.shape)
        old = p.data[i]
        p.data[i] = old + eps
        lp = loss(model(x), y)
        p.data[i] = old - eps
        lm = loss(model(x), y)
        p.data[i] = old
        assert (lp - lm) / (2 * eps) == pytest.approx(grads[p.name][i], rel=1e-5, abs=1e-8)
    v = rng.standard_normal(x.shape) / 28
    numeric = (loss(model(x + eps * v), y) - loss(model(x - eps * v), y)) / (2 * eps)
    assert numeric == pytest.approx(float(np.sum(dx * v)), rel=1e-5, abs=1e-8)


def test_first_layer_can_skip_dx(rng):
    model = models.two_conv(seed=0)
    model[0].needs_input_grad = False
    x = rng.random((2, 1, 28, 28), dtype=np.float32)
    _, dx = _loss_and_grads(model, x, np.array([1, 2]))
    assert dx is None and model[0].grads["weight"].shape == (32, 1, 5, 5)


def test_init_matches_pytorch_bounds():
    model = models.two_conv(seed=0)
    for layer, fan_in in [(model[0], 25), (model[3], 32 * 25), (model[7], 3136), (model[9], 128)]:
        for key in ("weight", "bias"):
            a = layer.params[key]
            assert a.dtype == np.float32
            assert np.abs(a).max() <= 1 / np.sqrt(fan_in)
            assert np.abs(a).max() > 0.5 / np.sqrt(fan_in)  # really uses the range
    assert np.array_equal(models.two_conv(seed=5)[3].params["weight"],
                          models.two_conv(seed=5)[3].params["weight"])


def test_state_dict_round_trip_and_errors():
    a, b = models.two_conv(seed=0), models.two_conv(seed=1)
    b.load_state_dict(a.state_dict())
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        np.testing.assert_array_equal(pa.data, pb.data)
    state = a.state_dict()
    state["0.weight"][...] = 7  # a copy: the model is untouched
    assert not (a[0].params["weight"] == 7).any()
    with pytest.raises(ValueError, match=re.escape("missing keys ['9.bias'], unexpected keys "
                                                   "['9.b']")):
        b.load_state_dict({**{k: v for k, v in state.items() if k != "9.bias"}, "9.b": 0})
    with pytest.raises(ValueError, match=re.escape("state_dict['0.bias'] has shape (3,), the "
                                                   "model's parameter has (32,)")):
        b.load_state_dict({**state, "0.bias": np.zeros(3)})


def test_train_eval_modes(rng):
    model = models.tiny_net(seed=0)
    x = rng.random((2, 1, 28, 28), dtype=np.float32)
    model.eval()
    assert not model[0].training
    y_eval = model(x)
    with pytest.raises(RuntimeError, match="needs a forward"):
        model.backward(np.ones_like(y_eval))
    model.train()
    np.testing.assert_array_equal(model(x), y_eval)
    model.backward(np.ones_like(y_eval))


def test_softmax_cross_entropy_is_stable_and_checks_labels():
    loss = nn.SoftmaxCrossEntropy()
    z = np.array([[1000.0, 0.0, -1000.0], [0.0, 0.0, 0.0]])
    value = loss(z, np.array([0, 2]))
    assert value == pytest.approx((0.0 + np.log(3)) / 2)
    d = loss.backward()
    np.testing.assert_allclose(d, [[0, 0, 0], [1 / 6, 1 / 6, -1 / 3]], atol=1e-12)
    assert nn.SoftmaxCrossEntropy("sum")(z, np.array([0, 2])) == pytest.approx(np.log(3))
    with pytest.raises(ValueError, match=re.escape("labels must lie in [0, 3), got values in "
                                                   "[0, 3]")):
        loss(z, np.array([0, 3]))
    with pytest.raises(ValueError, match="labels must be 2 integers, got float64"):
        loss(z, np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        nn.SoftmaxCrossEntropy("none")


def test_optimizer_argument_errors():
    params = models.tiny_net(seed=0).parameters()
    with pytest.raises(ValueError, match="lr must be >= 0, got -1"):
        optim.SGD(params, lr=-1)
    with pytest.raises(ValueError, match="nesterov momentum needs momentum > 0"):
        optim.SGD(params, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match=re.escape("betas[1] must lie in [0, 1), got 1.0")):
        optim.Adam(params, betas=(0.9, 1.0))
    with pytest.raises(RuntimeError, match="has no gradient: run backward"):
        optim.SGD(params, lr=0.1).step()


# ---- against torch -------------------------------------------------------------------


def _torch_twin(model):
    torch = pytest.importorskip("torch")
    tnn = torch.nn
    layers = []
    for layer in model.layers:
        if isinstance(layer, nn.Conv2d):
            t = tnn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                           padding=layer.conv["padding"])
        elif isinstance(layer, nn.Linear):
            t = tnn.Linear(layer.in_features, layer.out_features)
        elif isinstance(layer, nn.ReLU):
            t = tnn.ReLU()
        elif isinstance(layer, nn.MaxPool2d):
            t = tnn.MaxPool2d(2)
        else:
            t = tnn.Flatten()
        layers.append(t)
    twin = tnn.Sequential(*layers)
    if model[0].params["weight"].dtype == np.float64:
        twin = twin.double()
    twin.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in model.state_dict().items()})
    return torch, twin


@pytest.mark.parametrize("make", [models.two_conv, models.tiny_net])
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_layer_by_layer_and_one_step_against_torch(make, opt, rng):
    # SGD in float32 ("within fp32 tolerance").  Adam divides each gradient by its own
    # magnitude, which amplifies fp32 rounding in near-zero gradients up to a whole step, so
    # its rule is compared in float64, tightly.
    dtype = np.float32 if opt == "sgd" else np.float64
    model = make(seed=2, dtype=dtype)
    torch, twin = _torch_twin(model)
    x = rng.random((8, 1, 28, 28)).astype(dtype)
    y = rng.integers(0, 10, 8)
    # layer by layer, forward
    a, t = x, torch.from_numpy(x)
    for ours, theirs in zip(model.layers, twin, strict=True):
        a, t = ours(a), theirs(t)
        np.testing.assert_allclose(a, t.detach().numpy(), rtol=1e-4, atol=1e-5)
    # one training step on the same batch
    if opt == "sgd":
        ours_opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        their_opt = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    else:
        ours_opt = optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
        their_opt = torch.optim.Adam(twin.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(2):  # the second step exercises momentum / moment buffers
        loss_ours, _ = _loss_and_grads(model, x, y)
        their_opt.zero_grad()
        loss_t = torch.nn.functional.cross_entropy(twin(torch.from_numpy(x)),
                                                   torch.from_numpy(y))
        loss_t.backward()
        assert loss_ours == pytest.approx(loss_t.item(), rel=1e-5)
        for p, (name, tp) in zip(model.parameters(), twin.named_parameters(), strict=True):
            assert p.name == name
            np.testing.assert_allclose(p.grad, tp.grad.numpy(), rtol=1e-4, atol=1e-6)
        ours_opt.step()
        their_opt.step()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-12)
    for p, tp in zip(model.parameters(), twin.parameters(), strict=True):
        np.testing.assert_allclose(p.data, tp.detach().numpy(), **tol)


def test_optimizer_state_round_trip(rng):
    for make_opt in (lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9),
                     lambda ps: optim.Adam(ps, lr=0.01)):
        m1, m2 = models.tiny_net(seed=0), models.tiny_net(seed=0)
        o1, o2 = make_opt(m1.parameters()), make_opt(m2.parameters())
        x = rng.random((4, 1, 28, 28), dtype=np.float32)
        y = np.arange(4)
        for m, o in ((m1, o1), (m2, o2)):
            _loss_and_grads(m, x, y)
            o.step()
        o2.load_state_dict({k: v.copy() for k, v in o1.state_dict().items()})
        for m, o in ((m1, o1), (m2, o2)):
            _loss_and_grads(m, x, y)
            o.step()
        for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
            np.testing.assert_array_equal(a.data, b.data)


def test_fused_relu_maxpool_equals_the_separate_layers(rng):
    """Sequential runs ReLU -> MaxPool2d as pool-then-ReLU; values and gradients must be
    bit-identical to the layers run one by one, including all-negative windows, zeros,
    NaN and ties."""
    x = rng.standard_normal((2, 3, 8, 9)).astype(np.float32)
    x[0, 0, :2, :2] = -1.0  # a window with no positive value
    x[0, 1, 2:4, 2:4] = 0.0  # zeros only
    x[1, 0, 4, 4] = np.nan
    x[1, 2, 0, 0:2] = 5.0  # a tie
    for pool_args in [dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1)]:
        fused = nn.Sequential(nn.ReLU(), nn.MaxPool2d(**pool_args))
        relu, mp = nn.ReLU(), nn.MaxPool2d(**pool_args)
        y_f = fused(x)
        y_s = mp(relu(x))
        np.testing.assert_array_equal(y_f, y_s)
        dy = rng.standard_normal(y_f.shape).astype(np.float32)
        np.testing.assert_array_equal(fused.backward(dy), relu.backward(mp.backward(dy)))


def test_fused_backward_checks_the_delta_shape():
    fused = nn.Sequential(nn.ReLU(), nn.MaxPool2d(2))
    fused(np.ones((2, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match=re.escape("grad_output of shape (2, 3, 4, 40000), but "
                                                   "the forward output had shape (2, 3, 4, 4)")):
        fused.backward(np.ones((2, 3, 4, 40000), np.float32))


def test_conv_backward_checks_the_delta_shape(rng):
    conv = nn.Conv2d(2, 3, 3, padding=1)
    conv(rng.standard_normal((2, 2, 5, 5)).astype(np.float32))
    with pytest.raises(ValueError, match=re.escape("Conv2d.backward got grad_output of shape "
                                                   "(2, 3, 5, 4), the forward output had "
                                                   "shape (2, 3, 5, 5)")):
        conv.backward(np.ones((2, 3, 5, 4), np.float32))


def test_relu_dtypes_follow_the_conv_rules():
    assert nn.ReLU()(np.ones(3, np.float16)).dtype == np.float32
    with pytest.warns(UserWarning, match="integer and bool arrays in float64"):
        assert nn.ReLU()(np.ones(3, np.int64)).dtype == np.float64
    fused = nn.Sequential(nn.ReLU(), nn.MaxPool2d(2))
    assert fused(np.ones((1, 1, 4, 4), np.float16)).dtype == np.float32


@pytest.mark.usefixtures("parallel_paths")  # the packed layouts, on small shapes
@pytest.mark.parametrize("conv_args, shape, pool_args, relu, dx, dtype, planes", [
    (dict(in_channels=1, out_channels=32, kernel_size=5, padding=2), (3, 1, 12, 12),
     dict(kernel_size=2), True, False, np.float32, True),  # conv1 of two_conv
    (dict(in_channels=4, out_channels=64, kernel_size=5, padding=2), (2, 4, 10, 10),
     dict(kernel_size=2), True, True, np.float32, True),  # the wide dW tile
    (dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, groups=2),
     (2, 4, 5, 5), dict(kernel_size=2), True, True, np.float64, False),  # groups, odd, strided
    # (planes too small for the grouped kernels: the channel tile's packed layouts)
    (dict(in_channels=3, out_channels=5, kernel_size=3), (2, 3, 9, 8),
     dict(kernel_size=2), False, True, np.float32, False),  # a pool straight after the conv
    (dict(in_channels=3, out_channels=5, kernel_size=3, padding=1), (2, 3, 9, 8),
     dict(kernel_size=3, stride=2, padding=1), True, True, np.float32, False),  # the general pool
    (dict(in_channels=8, out_channels=40, kernel_size=3, padding=1), (2, 8, 10, 12),
     dict(kernel_size=2), True, True, np.float32, True),  # pool order, channel tile
    (dict(in_channels=8, out_channels=6, kernel_size=3, stride=2, padding=1, dilation=2),
     (2, 8, 14, 17), dict(kernel_size=2, stride=2), True, True, np.float64, True),  # ... strided
])
def test_conv_pool_packed_backward_equals_the_layers_one_by_one(conv_args, shape, pool_args,
                                                                relu, dx, dtype, planes, rng):
    """In a Sequential, the pool after a conv writes the conv's deltas straight in its packed
    layout (or the conv writes its output in pool order and the pool its deltas likewise),
    and the conv reuses its workspace; over several steps, with a batch size change,
    outputs and dX must be bit-identical to fresh layers run one by one.  dW too, except
    after a pool-order pixel layer: its dW runs the pixel kernel on pool-order deltas, the
    layer alone the channel tile, the same float sums in another order."""

    def layers():
        conv = nn.Conv2d(**conv_args, rng=np.random.default_rng(1), dtype=dtype)
        conv.needs_input_grad = dx
        return [conv, *([nn.ReLU()] if relu else []), nn.MaxPool2d(**pool_args)]

    seq = nn.Sequential(*layers())
    for n in (shape[0], shape[0] + 1, shape[0]):
        x = rng.standard_normal((n, *shape[1:])).astype(dtype)
        single = layers()
        seq.zero_grad()
        y = seq(x)
        a = x
        for layer in single:
            a = layer(a)
        np.testing.assert_array_equal(y, a)
        assert seq[-1]._saved[3] == planes  # the pool ran on pool order
        dy = rng.standard_normal(y.shape).astype(dtype)
        dx_seq = seq.backward(dy)
        for layer in reversed(single):
            dy = layer.backward(dy)
        if dx:
            np.testing.assert_array_equal(dx_seq, dy)
        else:
            assert dx_seq is None and dy is None
        # The 2x2 pool sums the deltas it passes for the bias gradient: the same float64
        # sum as the conv's own, in another order.
        tol = 1e-12 if dtype == np.float64 else 1e-6
        if isinstance(seq[0]._saved[0], conv_mod.PixelInput):
            np.testing.assert_allclose(seq[0].grads["weight"], single[0].grads["weight"],
                                       rtol=10 * tol, atol=10 * tol)
        else:
            np.testing.assert_array_equal(seq[0].grads["weight"], single[0].grads["weight"])
        np.testing.assert_allclose(seq[0].grads["bias"], single[0].grads["bias"], rtol=tol,
                                   atol=tol)
    assert "y" in seq[0]._workspace._arrays  # the conv's output was scratch, reused


@pytest.mark.usefixtures("parallel_paths")  # the packed layouts, on small shapes
@pytest.mark.parametrize("relu", [True, False])
def test_pool_sums_the_deltas_it_writes_per_image_and_channel(relu, rng):
    """The 2x2 pool's packed backward returns each image's channel sums of the deltas it
    wrote (the conv's bias gradient, in parts), padding channels and border included."""
    conv = nn.Conv2d(8, 20, 3, padding=1, rng=np.random.default_rng(1))  # channel tile
    pool = nn.MaxPool2d(2)
    x = rng.standard_normal((3, 8, 9, 10)).astype(np.float32)
    y = conv(x)
    out = pool.forward_after_relu(y) if relu else pool(y)
    layout = conv.delta_layout()
    dyp, dsum = pool.backward_packed(rng.standard_normal(out.shape).astype(np.float32), layout)
    assert dsum.shape == (3, layout.shape[3]) and dsum.dtype == np.float64
    np.testing.assert_allclose(dsum, dyp.astype(np.float64).sum(axis=(1, 2)), rtol=1e-12,
                               atol=1e-12)
    assert np.count_nonzero(dsum[:, 20:]) == 0 < np.count_nonzero(dsum[:, :20])
    # Other pools leave the sum to the conv.
    pool3 = nn.MaxPool2d(3, stride=2, padding=1)
    out3 = pool3(y)
    assert pool3.backward_packed(np.ones_like(out3), layout)[1] is None


@pytest.mark.usefixtures("parallel_paths")  # the packed layouts, on small shapes
def test_conv_output_is_scratch_only_where_nothing_keeps_it(rng):
    """A conv's output lives in its workspace only in training, and only when the next
    layer keeps no reference to it; outputs that callers or Linear keep are new arrays."""
    x = rng.standard_normal((2, 1, 6, 6)).astype(np.float32)
    seq = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(2, 2, 3), nn.Flatten(), nn.Linear(32, 3))
    seq(x)
    assert "y" in seq[0]._workspace._arrays and "y" not in seq[2]._workspace._arrays
    conv = nn.Conv2d(1, 2, 3)
    conv.eval()
    assert conv.forward_scratch(x) is not conv.forward_scratch(x)
    with pytest.raises(ValueError, match="reuse_output=True needs a workspace"):
        conv_mod.conv2d_saving(x, conv.params["weight"], reuse_output=True)


def test_sgd_kernel_equals_the_numpy_update(rng):
    """The fused SGD kernel and the NumPy path (taken for non-contiguous parameters) agree."""
    models_ = [models.tiny_net(seed=3) for _ in range(2)]
    for p in models_[1].parameters():  # Fortran order: not C-contiguous, so the NumPy path
        p.module.params[p.key] = np.asfortranarray(p.data)
    opts = [optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)
            for m in models_]
    x = rng.random((4, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 4)
    for _ in range(3):
        for m, o in zip(models_, opts, strict=True):
            _loss_and_grads(m, x, y)
            o.step()
    for a, b in zip(models_[0].parameters(), models_[1].parameters(), strict=True):
        assert not b.data.flags.c_contiguous or b.data.ndim == 1 or min(b.data.shape) == 1
        np.testing.assert_allclose(a.data, b.data, rtol=1e-5, atol=1e-7)
