"""Layers, losses and optimizers that behave like torch's: gradient accumulation and
zero_grad, parameters and Parameter, Sequential as a list, param groups, CrossEntropyLoss,
Dropout and BatchNorm2d (each against torch), and whole-network finite differences
through Dropout and BatchNorm2d."""

import re

import numpy as np
import pytest

from fastconv import models, nn, optim

from conftest import kink_margin


def _torch():
    return pytest.importorskip("torch")


def _step(model, x, y, loss=None):
    """One forward and backward (no zero_grad); returns the loss."""
    loss = loss or nn.CrossEntropyLoss()
    value = loss(model(x), y)
    model.backward(loss.backward())
    return value


# ---- gradient accumulation and zero_grad -----------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_two_backward_calls_give_twice_the_gradient(dtype, rng):
    model = models.two_conv(seed=0, dtype=dtype)
    x = rng.random((4, 1, 28, 28)).astype(dtype)
    y = np.array([1, 2, 3, 4])
    _step(model, x, y)
    once = {p.name: p.grad.copy() for p in model.parameters()}
    held = {p.name: p.grad for p in model.parameters()}
    _step(model, x, y)
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == np.float32 else dict(rtol=1e-13, atol=0)
    for p in model.parameters():
        assert p.grad is held[p.name]  # added in place, into the array the first one left
        np.testing.assert_allclose(p.grad, 2 * once[p.name], **tol)
    # zero_grad() drops them: the next backward stores new arrays, equal to one call's
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters()) and model[0].grads == {}
    _step(model, x, y)
    for p in model.parameters():
        assert p.grad is not held[p.name]
        np.testing.assert_array_equal(p.grad, once[p.name])
    # zero_grad(set_to_none=False) fills the held arrays with zeros; backward adds to them
    held = {p.name: p.grad for p in model.parameters()}
    model.zero_grad(set_to_none=False)
    assert all(p.grad is held[p.name] and not p.grad.any() for p in model.parameters())
    _step(model, x, y)
    for p in model.parameters():
        assert p.grad is held[p.name]
        np.testing.assert_array_equal(p.grad, once[p.name])


def test_accumulation_matches_torch(rng):
    torch = _torch()
    model = models.tiny_net(seed=3, dtype=np.float64)
    twin = _twin(model)
    xs = [rng.random((3, 1, 28, 28)) for _ in range(2)]
    ys = [rng.integers(0, 10, 3) for _ in range(2)]
    for x, y in zip(xs, ys, strict=True):  # two different batches, no zero_grad between
        _step(model, x, y)
        torch.nn.functional.cross_entropy(twin(torch.from_numpy(x)),
                                          torch.from_numpy(y)).backward()
    for (name, p), (tname, tp) in zip(model.named_parameters(), twin.named_parameters(),
                                      strict=True):
        assert name == tname
        np.testing.assert_allclose(p.grad, tp.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_optimizer_zero_grad_clears_its_parameters_only(rng):
    model = models.tiny_net(seed=0)
    x, y = rng.random((2, 1, 28, 28), dtype=np.float32), np.array([0, 1])
    _step(model, x, y)
    opt = optim.SGD(model[7].parameters(), lr=0.1)  # the first Linear only
    opt.zero_grad()
    assert model[7].weight.grad is None and model[7].bias.grad is None
    assert model[0].weight.grad is not None and model[8].weight.grad is not None
    _step(model, x, y)
    opt.zero_grad(set_to_none=False)
    assert not model[7].weight.grad.any() and model[8].weight.grad.any()
    with pytest.raises(TypeError, match="set_to_none must be True or False"):
        opt.zero_grad(set_to_none=None)
    with pytest.raises(TypeError, match="set_to_none must be True or False"):
        model.zero_grad(1)


def test_step_skips_parameters_without_a_gradient_and_needs_one(rng):
    model = models.tiny_net(seed=0)
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(RuntimeError, match="has no gradient: run backward"):
        opt.step()
    _step(model, np.ones((2, 1, 28, 28), np.float32), np.array([0, 1]))
    model[0].weight.grad = None  # as a frozen layer in torch: not updated, no buffer
    before = model[0].weight.data.copy()
    opt.step()
    np.testing.assert_array_equal(model[0].weight.data, before)
    assert opt.buffers[0] is None and opt.buffers[1] is not None
    opt.zero_grad()
    with pytest.raises(RuntimeError, match="has no gradient: run backward"):
        opt.step()


# ---- Parameter, weight / bias, parameters() ------------------------------------------


def test_weight_and_bias_are_parameters_of_the_layer(rng):
    conv = nn.Conv2d(3, 4, 3, rng=0)
    w = conv.weight
    assert isinstance(w, nn.Parameter) and w.name == "weight" and w.key == "weight"
    assert w.data is conv.params["weight"] and w.shape == (4, 3, 3, 3)
    assert w.numel() == 108 and w.size() == (4, 3, 3, 3) and w.size(0) == 4
    assert w.dim() == w.ndim == 4 and len(w) == 4 and w.dtype == np.float32
    assert np.asarray(w) is conv.params["weight"]
    assert np.array(w, np.float64).dtype == np.float64
    assert w.grad is None and conv.bias.numel() == 4
    np.testing.assert_array_equal(w[1], conv.params["weight"][1])
    w[0] = 0.5  # writes into the layer's array
    assert (conv.params["weight"][0] == 0.5).all()
    assert w == conv.weight and w != conv.bias and len({w, conv.weight, conv.bias}) == 2
    assert nn.Conv2d(3, 4, 3, bias=False).bias is None
    assert nn.Linear(3, 2, bias=False).bias is None
    # assigning replaces the array, in the parameter's dtype
    conv.weight = np.ones((4, 3, 3, 3))
    assert conv.params["weight"].dtype == np.float32 and (conv.params["weight"] == 1).all()
    lin = nn.Linear(3, 2)
    lin.bias.data = np.array([1.0, 2.0], np.float32)
    np.testing.assert_array_equal(lin.params["bias"], [1, 2])
    with pytest.raises(ValueError, match=re.escape("weight.data must have the parameter's "
                                                   "shape (4, 3, 3, 3), got (4, 3)")):
        conv.weight = np.ones((4, 3))
    with pytest.raises(TypeError, match="has dtype <U1"):
        lin.bias = np.array(["a", "b"])
    with pytest.raises(AttributeError, match="built without a bias"):
        nn.Linear(3, 2, bias=False).bias = np.zeros(2)
    with pytest.raises(ValueError, match=re.escape("bias.grad must have the parameter's "
                                                   "shape (2,), got (3,)")):
        lin.bias.grad = np.zeros(3)
    lin.bias.grad = np.array([1, 2])
    assert lin.grads["bias"].dtype == np.float32
    lin.bias.grad = None
    assert "bias" not in lin.grads


def test_parameters_and_named_parameters_as_torch():
    model = models.two_conv(seed=0)
    twin = _twin(model)
    ours = list(model.named_parameters())
    assert [n for n, _ in ours] == [n for n, _ in twin.named_parameters()]
    assert all(isinstance(p, nn.Parameter) and p.name == n for n, p in ours)
    assert [p.shape for p in model.parameters()] == [tuple(p.shape) for p in twin.parameters()]
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in twin.parameters()) == 454922
    assert model.parameters(recurse=False) == [] and len(model[0].parameters()) == 2
    assert [n for n, _ in model[3].named_parameters(prefix="3.")] == ["3.weight", "3.bias"]
    assert model.parameters()[0] == model[0].weight  # the same array of the same layer


# ---- Sequential as a list ------------------------------------------------------------


def test_sequential_indexing_iteration_and_editing(rng):
    layers = [nn.Conv2d(1, 2, 3, rng=0), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3, rng=1)]
    seq = nn.Sequential(*layers)
    assert len(seq) == 4 and list(seq) == layers and [m for m in seq] == layers
    assert seq[0] is layers[0] and seq[-1] is layers[3] and seq[-4] is layers[0]
    head = seq[:2]
    assert isinstance(head, nn.Sequential) and list(head) == layers[:2]
    assert head[0] is seq[0]  # the same layer objects, as torch
    assert list(seq[::-1]) == layers[::-1] and len(seq[5:]) == 0
    x = rng.random((2, 1, 4, 4), dtype=np.float32)
    np.testing.assert_array_equal(seq[2:](seq[:2](x)), seq(x))
    for bad in (4, -5):
        with pytest.raises(IndexError, match=f"index {bad} is out of range for a "
                                             "Sequential of 4 layers"):
            seq[bad]
    with pytest.raises(TypeError, match="Sequential indices must be ints or slices"):
        seq["0"]
    relu = nn.ReLU()
    assert seq.append(relu) is seq and seq[-1] is relu and len(seq) == 5
    assert seq(x).min() >= 0
    assert [n for n, _ in seq.named_parameters()] == ["0.weight", "0.bias", "3.weight",
                                                      "3.bias"]
    del seq[-1]
    assert len(seq) == 4
    seq.insert(-1, nn.Flatten())  # before the last, as list.insert and torch
    assert isinstance(seq[3], nn.Flatten) and isinstance(seq[4], nn.Linear)
    del seq[3]
    seq.extend([nn.ReLU(), nn.Linear(3, 2, rng=2)])
    assert len(seq) == 6 and seq(x).shape == (2, 2)
    seq[4] = nn.Flatten()
    assert isinstance(seq[4], nn.Flatten)
    for call in (lambda: seq.append(nn.CrossEntropyLoss()), lambda: seq.append(3),
                 lambda: seq.insert(0, None), lambda: seq.extend([nn.ReLU(), "x"])):
        with pytest.raises(TypeError, match="layer"):
            call()
    with pytest.raises(TypeError, match="is a loss"):
        nn.Sequential(nn.ReLU(), nn.CrossEntropyLoss())
    with pytest.raises(IndexError, match="out of range for inserting"):
        seq.insert(9, nn.ReLU())


# ---- param_groups --------------------------------------------------------------------


def _twin(model):
    """A torch Sequential with ``model``'s layers and weights (float64 if it is)."""
    torch = _torch()
    tnn = torch.nn
    layers = []
    for layer in model:
        if isinstance(layer, nn.Conv2d):
            t = tnn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                           padding=layer.conv["padding"], bias=layer.bias is not None)
        elif isinstance(layer, nn.Linear):
            t = tnn.Linear(layer.in_features, layer.out_features)
        elif isinstance(layer, nn.BatchNorm2d):
            t = tnn.BatchNorm2d(layer.num_features, layer.eps, layer.momentum, layer.affine,
                                layer.track_running_stats)
        elif isinstance(layer, nn.Dropout):
            t = tnn.Dropout(layer.p)
        else:
            t = {nn.ReLU: tnn.ReLU, nn.Flatten: tnn.Flatten}.get(type(layer))
            t = t() if t else tnn.MaxPool2d(layer.args["kernel_size"])
        layers.append(t)
    twin = tnn.Sequential(*layers)
    if model.parameters()[0].dtype == np.float64:
        twin = twin.double()
    twin.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in model.state_dict().items()})
    return twin


def _groups(params, convs_lr=None):
    """Conv layers' parameters in one group, the Linear layers' in another."""
    convs = [p for p in params if p.ndim == 4 or p.name.startswith(("0.", "3."))]
    rest = [p for p in params if all(p is not c for c in convs)]
    first = {"params": convs}
    if convs_lr is not None:
        first["lr"] = convs_lr
    return [first, {"params": rest}]


@pytest.mark.parametrize("kind", ["sgd", "nesterov", "adam"])
def test_param_groups_and_a_schedule_against_torch(kind, rng):
    torch = _torch()
    model = models.tiny_net(seed=4, dtype=np.float64)
    twin = _twin(model)
    ours_groups = _groups(model.parameters(), convs_lr=0.2)
    named = dict(twin.named_parameters())
    theirs_groups = [{**{k: v for k, v in g.items() if k != "params"},
                      "params": [named[p.name] for p in g["params"]]} for g in ours_groups]
    if kind == "adam":
        ours_groups[1]["betas"] = theirs_groups[1]["betas"] = (0.8, 0.99)
        ours_groups[1]["weight_decay"] = theirs_groups[1]["weight_decay"] = 0.01
        opt = optim.Adam(ours_groups, lr=0.01)
        topt = torch.optim.Adam(theirs_groups, lr=0.01)
    else:
        ours_groups[1]["momentum"] = theirs_groups[1]["momentum"] = 0.5
        kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=kind == "nesterov")
        opt = optim.SGD(ours_groups, **kw)
        topt = torch.optim.SGD(theirs_groups, **kw)
    assert [sorted(g) for g in opt.param_groups] == [
        sorted(k for k in g if k in {"params", *opt.defaults}) for g in topt.param_groups]
    for g, tg in zip(opt.param_groups, topt.param_groups, strict=True):
        for key in opt.defaults:
            assert g[key] == tg[key], key
    assert opt.param_groups[0]["lr"] == 0.2 and opt.param_groups[1]["lr"] == opt.defaults["lr"]
    x = rng.random((4, 1, 28, 28))
    y = rng.integers(0, 10, 4)
    for step in range(4):
        opt.zero_grad()
        topt.zero_grad()
        _step(model, x, y)
        torch.nn.functional.cross_entropy(twin(torch.from_numpy(x)),
                                          torch.from_numpy(y)).backward()
        if step == 2:  # a parameter without a gradient is skipped (and Adam's count stays)
            model[7].bias.grad = None
            twin[7].bias.grad = None
        opt.step()
        topt.step()
        for g, tg in zip(opt.param_groups, topt.param_groups, strict=True):
            g["lr"] *= 0.5  # a schedule, as torch's schedulers set it
            tg["lr"] *= 0.5
    for p, tp in zip(model.parameters(), twin.parameters(), strict=True):
        np.testing.assert_allclose(p.data, tp.detach().numpy(), rtol=1e-10, atol=1e-12,
                                   err_msg=p.name)
    # the state round trip keeps each group's lr (and Adam's skipped count)
    state = opt.state_dict()
    assert state["lr"] == 0.2 / 16 and state["lr_group1"] == opt.defaults["lr"] / 16
    twin_opt = type(opt)(_groups(models.tiny_net(seed=4, dtype=np.float64).parameters()),
                         **({"lr": 0.01} if kind == "adam" else kw))
    twin_opt.load_state_dict(state)
    assert [g["lr"] for g in twin_opt.param_groups] == [g["lr"] for g in opt.param_groups]
    if kind == "adam":
        assert state["step.5"] == 3 and twin_opt.steps == opt.steps


def test_param_group_rules():
    model = models.tiny_net(seed=0)
    params = model.parameters()
    opt = optim.SGD(params[:2], lr=0.1, momentum=0.9)
    assert opt.param_groups == [{"params": params[:2], "lr": 0.1, "momentum": 0.9,
                                 "weight_decay": 0.0, "nesterov": False}]
    opt.add_param_group({"params": params[2:4], "lr": 0.01})
    assert opt.params == params[:4] and len(opt.buffers) == 4
    assert opt.param_groups[1]["momentum"] == 0.9
    with pytest.raises(ValueError, match="different learning rates"):
        opt.lr  # noqa: B018
    opt.lr = 0.5  # sets every group's, as the training loop's schedule does
    assert opt.lr == 0.5 and [g["lr"] for g in opt.param_groups] == [0.5, 0.5]
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [params[0]]})
    with pytest.raises(ValueError, match="holds a parameter more than once"):
        optim.SGD([params[0], params[0]], lr=0.1)
    with pytest.raises(TypeError, match="all Parameters or all parameter-group dicts"):
        optim.SGD([params[0], {"params": params[1:]}], lr=0.1)
    with pytest.raises(TypeError, match=re.escape("params[1]['params'][0] must be a "
                                                  "fastconv.nn.Parameter")):
        optim.Adam([{"params": params[:1]}, {"params": [np.zeros(3)]}])
    with pytest.raises(ValueError, match=re.escape("params[1]['lr'] must be >= 0, got -1")):
        optim.SGD([{"params": params[:1]}, {"params": params[1:], "lr": -1}], lr=0.1)
    with pytest.raises(TypeError, match=re.escape("params[0]['betas'] must be a pair")):
        optim.Adam([{"params": params, "betas": 0.9}])
    with pytest.raises(TypeError, match="must be a dict with a 'params' entry"):
        opt.add_param_group({"lr": 0.1})
    with pytest.raises(ValueError, match="every group's 'params' is empty"):
        optim.SGD([{"params": []}], lr=0.1)
    # a group's hyperparameters are checked at each step, before any update
    _step(model, np.ones((2, 1, 28, 28), np.float32), np.array([0, 1]))
    before = [p.data.copy() for p in params]
    opt.param_groups[1]["lr"] = float("nan")
    with pytest.raises(ValueError, match=re.escape("param_groups[1]['lr'] must be a finite")):
        opt.step()
    opt.param_groups[1]["lr"] = 0.1
    opt.param_groups[0]["nesterov"] = "yes"
    with pytest.raises(TypeError, match=re.escape("param_groups[0]['nesterov'] must be True")):
        opt.step()
    assert all((p.data == b).all() for p, b in zip(params, before, strict=True))
    # ... also after steps that ran with valid values, and after a change in place
    opt.param_groups[0]["nesterov"] = False
    opt.step()
    opt.param_groups[0]["momentum"] = -0.5
    with pytest.raises(ValueError, match=re.escape("param_groups[0]['momentum'] must be >= 0")):
        opt.step()
    adam = optim.Adam([{"params": params, "betas": [0.9, 0.999]}])
    adam.step()
    adam.param_groups[0]["betas"][1] = 1.0
    with pytest.raises(ValueError, match=re.escape("param_groups[0]['betas'][1] must lie in")):
        adam.step()
    # named_parameters() is taken as torch takes it
    named = optim.SGD(model.named_parameters(), lr=0.1)
    assert named.params == params and named.param_groups[0]["param_names"][0] == "0.weight"
    # SGD's lr defaults to torch's 1e-3
    assert optim.SGD(params).lr == 1e-3


# ---- CrossEntropyLoss ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_loss_against_torch(dtype, reduction, rng):
    torch = _torch()
    z = (rng.standard_normal((5, 7)) * 3).astype(dtype)
    y = rng.integers(0, 7, 5)
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    assert isinstance(loss_fn, nn.Module) and nn.SoftmaxCrossEntropy is nn.CrossEntropyLoss
    loss = loss_fn(z, y)
    assert isinstance(loss, np.float64) and np.ndim(loss) == 0 and loss.shape == ()
    assert isinstance(loss.item(), float)
    zt = torch.from_numpy(z).requires_grad_()
    lt = torch.nn.CrossEntropyLoss(reduction=reduction)(zt, torch.from_numpy(y))
    lt.backward()
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-14)
    assert lt.dim() == 0
    np.testing.assert_allclose(loss, lt.item(), **tol)
    d = loss_fn.backward()
    assert d.dtype == dtype
    np.testing.assert_allclose(d, zt.grad.numpy(), **tol)
    np.testing.assert_allclose(loss_fn.backward(2.5), 2.5 * d, **tol)
    with pytest.raises(TypeError, match="grad_output must be a real number"):
        loss_fn.backward(np.ones(3))
    assert repr(loss_fn) == f"CrossEntropyLoss(reduction={reduction!r})"


# ---- Dropout -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dropout_against_torch(dtype, rng):
    torch = _torch()
    p = 0.3
    x = (rng.random((64, 8, 10, 10)) + 0.5).astype(dtype)  # no zeros: a zero output is a drop
    drop = nn.Dropout(p, rng=1)
    tdrop = torch.nn.Dropout(p)
    y = drop(x)
    xt = torch.from_numpy(x).requires_grad_()
    yt = tdrop(xt)
    assert y.dtype == dtype
    for out in (y, yt.detach().numpy()):
        kept = out != 0
        # the kept elements scaled by 1/(1-p), the same value on both sides ...
        np.testing.assert_allclose(out[kept], x[kept] / (1 - p), rtol=1e-6)
        assert abs(kept.mean() - (1 - p)) < 0.01  # ... and about 1-p of them kept
    # backward: the deltas through the same scaled mask as the forward pass, in both
    dy = rng.standard_normal(x.shape).astype(dtype)
    yt.backward(torch.from_numpy(dy))
    for out, dx in ((y, drop.backward(dy)), (yt.detach().numpy(), xt.grad.numpy())):
        assert dx.dtype == dtype
        np.testing.assert_allclose(dx, dy * (out != 0) / (1 - p), rtol=1e-6)
    # eval: the input itself, in both
    drop.eval()
    tdrop.eval()
    assert drop(x) is x
    np.testing.assert_array_equal(tdrop(torch.from_numpy(x)).numpy(), x)


def test_dropout_edge_cases_and_seeds(rng):
    torch = _torch()
    x = rng.standard_normal((4, 5)).astype(np.float32)
    x[0, 0] = np.nan
    for p in (0.0, 1.0):
        ours = nn.Dropout(p)(x)
        theirs = torch.nn.Dropout(p)(torch.from_numpy(x)).numpy()
        np.testing.assert_array_equal(ours, theirs)
    zero = nn.Dropout(0.0)
    assert zero(x) is x
    np.testing.assert_array_equal(zero.backward(x), x)
    one = nn.Dropout(1.0)
    one(x)
    assert not one.backward(np.ones_like(x)).any()
    # a seed gives the same masks; the stream goes on from one call to the next
    a, b = nn.Dropout(0.5, rng=7), nn.Dropout(0.5, rng=7)
    first = a(np.ones((50, 50)))
    np.testing.assert_array_equal(first, b(np.ones((50, 50))))
    assert not np.array_equal(first, a(np.ones((50, 50))))
    c = nn.Dropout(0.5, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(c(np.ones((50, 50))), first)
    # inplace writes the output into the input
    z = np.ones((10, 10))
    out = nn.Dropout(0.5, inplace=True, rng=0)(z)
    assert out is z and set(np.unique(z)) <= {0.0, 2.0}
    with pytest.raises(ValueError, match="writeable"):
        nn.Dropout(0.5, inplace=True)(np.broadcast_to(np.ones(3), (2, 3)))
    assert repr(nn.Dropout(0.25)) == "Dropout(p=0.25)"


@pytest.mark.parametrize("p, exc, message", [
    (-0.1, ValueError, "p must be >= 0"), (1.5, ValueError, "p must lie in [0, 1]"),
    (float("nan"), ValueError, "p must be a finite number"), ("0.5", TypeError, "p must be a real"),
    (True, TypeError, "p must be a real"), (None, TypeError, "p must be a real")])
def test_dropout_refuses_a_bad_p(p, exc, message):
    with pytest.raises(exc, match=re.escape(message)):
        nn.Dropout(p)


def test_dropout_backward_errors():
    d = nn.Dropout(0.5, rng=0)
    with pytest.raises(RuntimeError, match=r"backward\(\) needs a forward\(\) in training"):
        d.backward(np.ones(3))
    d(np.ones((2, 3)))
    with pytest.raises(ValueError, match=re.escape("Dropout.backward got grad_output of shape "
                                                   "(3, 2), the forward output had shape "
                                                   "(2, 3)")):
        d.backward(np.ones((3, 2)))
    with pytest.raises(TypeError, match="inplace must be True or False"):
        nn.Dropout(0.5, inplace=1)
    with pytest.raises(TypeError, match="rng must be None"):
        nn.Dropout(0.5, rng="seed")


# ---- BatchNorm2d ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("momentum, affine, track", [
    (0.1, True, True), (None, True, True), (0.3, False, True), (0.1, True, False)])
def test_batchnorm2d_against_torch(dtype, momentum, affine, track, rng):
    torch = _torch()
    C = 5
    bn = nn.BatchNorm2d(C, eps=1e-3, momentum=momentum, affine=affine,
                        track_running_stats=track, dtype=dtype)
    tbn = torch.nn.BatchNorm2d(C, eps=1e-3, momentum=momentum, affine=affine,
                               track_running_stats=track)
    if dtype == np.float64:
        tbn = tbn.double()
    if affine:  # not the initial ones and zeros
        bn.weight.data[...] = rng.uniform(0.5, 1.5, C)
        bn.bias.data[...] = rng.standard_normal(C)
        tbn.load_state_dict({k: torch.from_numpy(v.copy())
                             for k, v in bn.state_dict().items()})
    assert list(bn.state_dict()) == list(tbn.state_dict())
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-11, atol=1e-12)
    for _ in range(3):
        x = (rng.standard_normal((4, C, 6, 7)) * 2 + np.arange(C)[:, None, None]).astype(dtype)
        dy = rng.standard_normal(x.shape).astype(dtype)
        bn.zero_grad()
        tbn.zero_grad()
        xt = torch.from_numpy(x).requires_grad_()
        yt = tbn(xt)
        yt.backward(torch.from_numpy(dy))
        y = bn(x)
        assert y.dtype == dtype and y.shape == x.shape
        np.testing.assert_allclose(y, yt.detach().numpy(), **tol)
        np.testing.assert_allclose(bn.backward(dy), xt.grad.numpy(), **tol)
        if affine:
            np.testing.assert_allclose(bn.weight.grad, tbn.weight.grad.numpy(), **tol)
            np.testing.assert_allclose(bn.bias.grad, tbn.bias.grad.numpy(), **tol)
        for key, value in tbn.state_dict().items():
            np.testing.assert_allclose(bn.state_dict()[key], value.numpy(), **tol,
                                       err_msg=key)
    bn.eval()
    tbn.eval()
    x = rng.standard_normal((3, C, 4, 4)).astype(dtype)
    np.testing.assert_allclose(bn(x), tbn(torch.from_numpy(x)).detach().numpy(), **tol)
    with pytest.raises(RuntimeError, match=r"backward\(\) needs a forward\(\) in training"):
        bn.backward(np.ones_like(x))


def test_batchnorm2d_state_dict_round_trip_in_a_network(rng):
    torch = _torch()

    def net(seed):
        return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, rng=seed), nn.BatchNorm2d(3),
                             nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 4, rng=seed))

    a, b = net(0), net(1)
    for _ in range(2):  # move the running statistics
        a(rng.standard_normal((4, 2, 4, 4)).astype(np.float32))
    state = a.state_dict()
    assert list(state) == ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean",
                           "1.running_var", "1.num_batches_tracked", "4.weight", "4.bias"]
    assert state["1.num_batches_tracked"].dtype == np.int64 and state["1.num_batches_tracked"] == 2
    b.load_state_dict(state)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        np.testing.assert_array_equal(va, vb, err_msg=k)
    assert [n for n, _ in a.named_buffers()] == ["1.running_mean", "1.running_var",
                                                 "1.num_batches_tracked"]
    # torch takes the state dict, and gives it back
    twin = _twin(a)
    back = {k: v.numpy() for k, v in twin.state_dict().items()}
    c = net(2)
    c.load_state_dict(back)
    x = rng.standard_normal((2, 2, 4, 4)).astype(np.float32)
    a.eval(), c.eval(), twin.eval()
    np.testing.assert_array_equal(a(x), c(x))
    np.testing.assert_allclose(a(x), twin(torch.from_numpy(x)).detach().numpy(), rtol=1e-5,
                               atol=1e-5)
    # checked before anything changes
    with pytest.raises(TypeError, match=re.escape("state_dict['1.num_batches_tracked'] has "
                                                  "dtype float64, which does not cast to the "
                                                  "model's buffer's int64")):
        c.load_state_dict({**state, "1.num_batches_tracked": np.array(2.0)})
    with pytest.raises(ValueError, match=re.escape("state_dict['1.running_var'] has shape "
                                                   "(4,), the model's buffer has (3,)")):
        c.load_state_dict({**state, "1.running_var": np.ones(4)})
    with pytest.raises(ValueError, match=re.escape("missing keys ['1.running_mean']")):
        c.load_state_dict({k: v for k, v in state.items() if k != "1.running_mean"})
    np.testing.assert_array_equal(c.state_dict()["1.running_var"], back["1.running_var"])


def test_batchnorm2d_errors():
    bn = nn.BatchNorm2d(3)
    with pytest.raises(ValueError, match=re.escape("BatchNorm2d(3) needs input of shape "
                                                   "(N, 3, H, W), got shape (2, 4, 5, 5)")):
        bn(np.zeros((2, 4, 5, 5), np.float32))
    with pytest.raises(ValueError, match=re.escape("got shape (3, 5, 5)")):
        bn(np.zeros((3, 5, 5), np.float32))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(np.zeros((1, 3, 1, 1), np.float32))
    with pytest.raises(TypeError, match="input must be a real numeric array"):
        bn(np.zeros((2, 3, 2, 2), complex))
    bn(np.ones((2, 3, 2, 2), np.float32))
    with pytest.raises(ValueError, match=re.escape("BatchNorm2d.backward got grad_output of "
                                                   "shape (2, 3, 2, 1)")):
        bn.backward(np.ones((2, 3, 2, 1)))
    bn.eval()
    assert bn(np.ones((1, 3, 1, 1), np.float32)).shape == (1, 3, 1, 1)  # running stats
    for kwargs, exc, message in [
            (dict(num_features=0), ValueError, "num_features must be >= 1"),
            (dict(num_features=2.0), TypeError, "num_features must be an int"),
            (dict(num_features=2, eps=-1), ValueError, "eps must be >= 0"),
            (dict(num_features=2, momentum=1.5), ValueError, "momentum must lie in [0, 1]"),
            (dict(num_features=2, momentum="0.1"), TypeError, "momentum must be a real"),
            (dict(num_features=2, affine=1), TypeError, "affine must be True or False"),
            (dict(num_features=2, track_running_stats=None), TypeError,
             "track_running_stats must be True or False"),
            (dict(num_features=2, dtype=np.int32), TypeError, "dtype must be float32")]:
        with pytest.raises(exc, match=re.escape(message)):
            nn.BatchNorm2d(**kwargs)


# ---- whole networks ------------------------------------------------------------------


def _small_net(dtype):
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, rng=0, dtype=dtype), nn.BatchNorm2d(4, dtype=dtype),
        nn.ReLU(), nn.Dropout(0.3), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1, rng=1, dtype=dtype), nn.BatchNorm2d(6, dtype=dtype),
        nn.ReLU(), nn.Flatten(), nn.Dropout(0.25), nn.Linear(6 * 4 * 4, 5, rng=2, dtype=dtype))


def test_whole_network_finite_differences_through_dropout_and_batchnorm(rng):
    """float64 directional derivatives of every parameter and the input, with each
    Dropout's mask fixed (its generator reseeded before every forward pass) and
    BatchNorm2d on batch statistics."""
    model = _small_net(np.float64)
    drops = [m for m in model if isinstance(m, nn.Dropout)]
    for bn in (model[1], model[6]):  # not the initial ones and zeros
        bn.weight.data[...] = rng.uniform(0.5, 1.5, bn.num_features)
        bn.bias.data[...] = rng.standard_normal(bn.num_features) * 0.3
    y = np.array([0, 3, 4])
    loss = nn.CrossEntropyLoss()

    def f(x):
        for i, d in enumerate(drops):
            d.rng = np.random.default_rng(100 + i)
        return loss(model(x), y)

    def kinks(x):
        for i, d in enumerate(drops):
            d.rng = np.random.default_rng(100 + i)
        return kink_margin(model, x)

    for _ in range(100):
        x = rng.standard_normal((3, 2, 8, 8))
        if kinks(x) > 1e-4:
            break
    assert kinks(x) > 1e-4
    model.zero_grad()
    f(x)
    dx = model.backward(loss.backward())
    grads = {p.name: p.grad.copy() for p in model.parameters()}
    assert {"1.weight", "1.bias", "6.weight", "6.bias"} <= set(grads)
    eps = 1e-6
    for p in model.parameters():
        for _ in range(3):
            v = rng.standard_normal(p.shape)
            v /= np.sqrt(v.size)
            p.data[...] += eps * v
            lp = f(x)
            p.data[...] -= 2 * eps * v
            lm = f(x)
            p.data[...] += eps * v
            assert (lp - lm) / (2 * eps) == pytest.approx(float(np.sum(grads[p.name] * v)),
                                                          rel=1e-5, abs=1e-9), p.name
    v = rng.standard_normal(x.shape) / 8
    numeric = (f(x + eps * v) - f(x - eps * v)) / (2 * eps)
    assert numeric == pytest.approx(float(np.sum(dx * v)), rel=1e-5, abs=1e-9)


def test_a_network_with_batchnorm_trains_like_torch(rng):
    """Three SGD steps of a conv network with BatchNorm2d (Dropout at p = 0.3 in eval
    mode is identity in both; here p = 0 keeps the training steps deterministic)."""
    torch = _torch()
    model = _small_net(np.float64)
    for m in model:
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    twin = _twin(model)
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    topt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        x = rng.standard_normal((4, 2, 8, 8))
        y = rng.integers(0, 5, 4)
        opt.zero_grad()
        topt.zero_grad()
        loss = _step(model, x, y)
        lt = torch.nn.functional.cross_entropy(twin(torch.from_numpy(x)), torch.from_numpy(y))
        lt.backward()
        assert loss == pytest.approx(lt.item(), rel=1e-10)
        opt.step()
        topt.step()
    for (k, v), tv in zip(model.state_dict().items(), twin.state_dict().values(), strict=True):
        np.testing.assert_allclose(v, tv.numpy(), rtol=1e-9, atol=1e-11, err_msg=k)
    model.eval()
    twin.eval()
    x = rng.standard_normal((2, 2, 8, 8))
    np.testing.assert_allclose(model(x), twin(torch.from_numpy(x)).detach().numpy(),
                               rtol=1e-9, atol=1e-11)
