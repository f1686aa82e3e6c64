"""fastconv.torch: the autograd bridge (gradcheck in float64 over a grid, float32 against
torch.nn.functional.conv2d), the drop-in Conv2d, convert(), the two-conv network trained
with either convolution, and the errors.  The import tests run without torch too."""

import copy
import itertools
import subprocess
import sys
import warnings

import numpy as np
import pytest

try:
    import torch

    import fastconv.torch as fct
except ImportError:  # pragma: no cover - depends on the environment
    torch = fct = None

requires_torch = pytest.mark.skipif(torch is None, reason="needs torch: pip install -e "
                                    "'.[torch]'")


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)


def test_importing_fastconv_never_imports_torch():
    r = _python("import sys, fastconv, fastconv.nn, fastconv.optim, fastconv.models, "
                "fastconv.train, fastconv.cli\n"
                "assert 'torch' not in sys.modules, 'fastconv imported torch'")
    assert r.returncode == 0, r.stderr


def test_fastconv_torch_without_torch_says_how_to_install_it():
    r = _python("import sys\nsys.modules['torch'] = None  # as if torch were not installed\n"
                "try:\n    import fastconv.torch\nexcept ImportError as e:\n    print(e)\n"
                "else:\n    raise SystemExit('no ImportError')")
    assert r.returncode == 0, r.stderr
    assert "pip install 'fastconv[torch]'" in r.stdout


# ---- gradcheck in float64 over a grid of geometries -----------------------------------

# (N, C, H, W, K, R, S, conv): strides, padding (pairs of two values, 'same', 'valid'),
# dilation, groups (grouped, depthwise, depthwise with a channel multiplier), batch 1, 1x1.
GRID = [
    (2, 3, 7, 6, 4, 3, 3, dict(stride=1, padding=1)),
    (2, 3, 8, 7, 4, 3, 2, dict(stride=2, padding=0)),
    (2, 2, 7, 9, 3, 3, 3, dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2))),
    (1, 3, 9, 8, 2, 3, 3, dict(stride=(1, 3), padding=(0, 1), dilation=2)),
    (2, 4, 6, 6, 6, 3, 3, dict(padding=1, groups=2)),
    (2, 4, 7, 7, 4, 3, 3, dict(stride=2, padding=1, groups=4)),
    (2, 3, 6, 5, 6, 3, 3, dict(padding=(1, 0), groups=3)),
    (1, 2, 6, 7, 3, 2, 4, dict(padding="same")),
    (2, 2, 6, 6, 3, 5, 5, dict(padding=2)),
    (1, 1, 8, 8, 4, 5, 5, dict(padding="valid")),
    (2, 5, 4, 4, 3, 1, 1, dict()),
]
_GRID_IDS = [f"{s[:7]}-{s[7]}" for s in GRID]
#: A geometry whose dW, on the parallel algorithms, is the channel tile's: it reads the
#: packed input the forward pass keeps.
PACKED = (2, 6, 7, 6, 4, 3, 3, dict(padding=1))


def _problem(shape, dtype, seed=0, contiguous=True):
    """x, w, b of one grid entry; non-contiguous views of larger tensors if asked."""
    N, C, H, W, K, R, S, conv = shape
    g = torch.Generator().manual_seed(seed)
    groups = conv.get("groups", 1)
    if contiguous:
        x = torch.randn(N, C, H, W, generator=g, dtype=dtype)
        w = torch.randn(K, C // groups, R, S, generator=g, dtype=dtype)
    else:  # x strided in W and channels-last; w transposed in memory
        x = torch.randn(N, H, 2 * W, C, generator=g, dtype=dtype)[:, :, ::2].permute(0, 3, 1, 2)
        w = torch.randn(K, C // groups, S, R, generator=g, dtype=dtype).transpose(2, 3)
        assert not x.is_contiguous() and not w.is_contiguous()
    b = torch.randn(K, generator=g, dtype=dtype)
    return x, w, b, conv


#: gradcheck's tolerances, tighter than its defaults (rtol 1e-3): the convolution is linear
#: in each argument, so float64 central differences are exact up to rounding.
TOL = dict(rtol=1e-6, atol=1e-7)


def _subsets():
    """Every non-empty subset of (input, weight, bias) that requires grad."""
    return [s for s in itertools.product([False, True], repeat=3) if any(s)]


@pytest.fixture(params=["as-planned", "parallel"])
def paths(request):
    """The plans as they choose (small shapes: the serial kernels), and the parallel
    algorithms (conftest's ``parallel_paths``), whose dW reads the packed input the
    forward pass keeps."""
    if request.param == "parallel":
        request.getfixturevalue("parallel_paths")
    return request.param


@pytest.fixture(params=["as-planned", "parallel"])
def gradcheck(request):
    """``torch.autograd.gradcheck`` on the grid as the plans run it (small shapes: the
    serial kernels), and on the parallel algorithms (conftest's ``parallel_paths``), whose
    dW reads the packed input the forward pass keeps.  The parallel passes cost a thread
    launch each, so there gradcheck runs in its fast mode (random projections of the
    Jacobians, ``v^T J u``, instead of every entry)."""
    if request.param == "parallel":
        request.getfixturevalue("parallel_paths")
    fast = request.param == "parallel"
    return lambda f, inputs: torch.autograd.gradcheck(f, inputs, fast_mode=fast, **TOL)


@requires_torch
@pytest.mark.parametrize("shape", GRID, ids=_GRID_IDS)
def test_gradcheck_grid(shape, gradcheck):
    x, w, b, conv = _problem(shape, torch.float64)
    inputs = tuple(t.requires_grad_() for t in (x, w, b))
    assert gradcheck(lambda x, w, b: fct.conv2d(x, w, b, **conv), inputs)
    assert gradcheck(lambda x, w: fct.conv2d(x, w, None, **conv), inputs[:2])


@requires_torch
@pytest.mark.parametrize("shape", [PACKED, GRID[2], GRID[5], GRID[9]],
                         ids=["packed"] + [_GRID_IDS[i] for i in (2, 5, 9)])
@pytest.mark.parametrize("needs", _subsets(), ids=lambda s: "".join("xwb"[i] for i in
                                                                      range(3) if s[i]))
def test_gradcheck_each_subset_of_requires_grad_non_contiguous(shape, needs, paths):
    x, w, b, conv = _problem(shape, torch.float64, contiguous=False)
    x, w, b = (t.detach().requires_grad_(n) for t, n in zip((x, w, b), needs, strict=True))
    assert not x.is_contiguous()

    def f(*wanted):
        it = iter(wanted)
        args = [next(it) if n else t for t, n in zip((x, w, b), needs, strict=True)]
        return fct.conv2d(*args, **conv)

    # fast mode (random projections of the Jacobians): the grid checks every entry
    assert torch.autograd.gradcheck(f, tuple(t for t, n in zip((x, w, b), needs, strict=True)
                                             if n), fast_mode=True, **TOL)


@requires_torch
def test_both_saved_forms_for_dw_are_exercised(parallel_paths):
    """The backward pass reads the packed input the forward pass kept (channel tile dW),
    or the input tensor itself (pixel dW): one geometry of each."""
    x, w, b, conv = _problem(PACKED, torch.float64)
    y = fct.conv2d(x, w.requires_grad_(), b, **conv)
    _, saved_input, xp = y.grad_fn.saved_tensors
    assert saved_input is None and xp.shape == (2, 9, 8, 6)  # only the packed copy
    x, w, b, conv = _problem((2, 1, 8, 8, 4, 3, 3, dict(padding=1)), torch.float64)
    y = fct.conv2d(x, w.requires_grad_(), b, **conv)
    _, saved_input, xp = y.grad_fn.saved_tensors
    assert saved_input is x and xp is None


def _grads(f, x, w, b, conv, calls):
    """The gradients of a loss over ``calls(f)``, a function of conv outputs."""
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    calls(lambda x_: f(x_, w, b, **conv), x).square().sum().backward()
    return x.grad, w.grad, b.grad


@requires_torch
@pytest.mark.parametrize("calls", [
    lambda f, x: f(x) + f(2 * x),                  # one layer twice before backward
    lambda f, x: f(x) * f(x + 1),
], ids=["twice", "product"])
def test_workspaces_of_calls_in_flight_are_their_own(calls, parallel_paths):
    """Each call owns the workspace its packed input lives in until its backward pass:
    several calls of one geometry in flight at once (one layer used twice) each keep
    theirs."""
    x, w, b, conv = _problem(PACKED, torch.float64)
    got = _grads(fct.conv2d, x, w, b, conv, calls)
    want = _grads(torch.nn.functional.conv2d, x, w, b, conv, calls)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e)


@requires_torch
def test_a_retained_graph_keeps_its_packed_input_and_hooks_may_copy_it(parallel_paths):
    x, w, b, conv = _problem(PACKED, torch.float64)
    w.requires_grad_()
    want = torch.autograd.grad(torch.nn.functional.conv2d(x, w, b, **conv).square().sum(), w)
    loss = fct.conv2d(x, w, b, **conv).square().sum()
    for _ in range(2):  # the second backward reads the same saved packed input
        fct.conv2d(x + 1, w, b, **conv).sum().backward()  # another call of this geometry
        torch.testing.assert_close(torch.autograd.grad(loss, w, retain_graph=True), want)
    # saved-tensor hooks that copy what is saved (offloading, say): the copy is read
    with torch.autograd.graph.saved_tensors_hooks(  # a copy in another layout
            lambda t: t.clone().transpose(0, -1).contiguous().transpose(0, -1),
            lambda t: t):
        loss = fct.conv2d(x, w, b, **conv).square().sum()
    fct.conv2d(x + 1, w, b, **conv).sum().backward()
    torch.testing.assert_close(torch.autograd.grad(loss, w), want)


@requires_torch
def test_an_input_changed_in_place_after_forward_is_an_error():
    """The saved input tensor goes through autograd's version check."""
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    w = torch.randn(4, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    y = fct.conv2d(x, w, padding=1)
    assert y.grad_fn.saved_tensors[2] is None  # the pixel dW reads the input itself
    x.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@requires_torch
@pytest.mark.parametrize("needs", _subsets(), ids=lambda s: "".join("xwb"[i] for i in
                                                                      range(3) if s[i]))
def test_backward_computes_only_the_gradients_it_needs(needs, monkeypatch, parallel_paths):
    calls = []

    def spy(name, fn):
        def wrapper(*args, **kwargs):
            calls.append((name, args, kwargs))
            return fn(*args, **kwargs)
        return wrapper

    from fastconv import plan

    monkeypatch.setattr(fct._conv, "backward_saved", spy("backward_saved",
                                                         fct._conv.backward_saved))
    for name in ("grad_input", "grad_weight", "grad_bias"):
        monkeypatch.setattr(plan.ConvPlan, name, spy(name, getattr(plan.ConvPlan, name)))
    need_x, need_w, need_b = needs
    # PACKED's dW reads the packed input; conv1's (one input channel) the input itself
    for shape in (PACKED, (2, 1, 8, 8, 4, 3, 3, dict(padding=1))):
        calls.clear()
        x, w, b, conv = _problem(shape, torch.float64)
        for t, n in zip((x, w, b), needs, strict=True):
            t.requires_grad_(n)
        fct.conv2d(x, w, b, **conv).sum().backward()
        names = [c[0] for c in calls]
        if need_w and shape is PACKED:  # dW from the packed input; dX only if asked
            assert names == ["backward_saved"] and calls[0][1][5] is need_x
        else:
            assert names == (["grad_weight"] * need_w + ["grad_input"] * need_x
                             + ["grad_bias"] * need_b)
        for t, n in zip((x, w, b), needs, strict=True):
            assert (t.grad is not None) is n


# ---- float32 against torch ------------------------------------------------------------

# Shapes that run each algorithm: Winograd 5x5 and 3x3, pixel (one input channel),
# depthwise, grouped, stride 2, and a batch of one.
F32 = [
    (8, 32, 14, 14, 64, 5, 5, dict(padding=2)),
    (4, 16, 12, 12, 32, 3, 3, dict(padding=1)),
    (16, 1, 28, 28, 32, 5, 5, dict(padding=2)),
    (4, 32, 14, 14, 32, 3, 3, dict(padding=1, groups=32)),
    (4, 32, 10, 10, 64, 3, 3, dict(stride=2, padding=1, groups=4)),
    (1, 24, 9, 11, 16, 3, 3, dict(stride=(2, 1), padding=(0, 1), dilation=(1, 2))),
]


@requires_torch
@pytest.mark.parametrize("shape", F32, ids=[f"{s[:7]}" for s in F32])
def test_float32_against_torch(shape):
    x, w, b, conv = _problem(shape, torch.float32)
    got = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    want = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    y = fct.conv2d(*got, **conv)
    yt = torch.nn.functional.conv2d(*want, **conv)
    assert y.dtype == torch.float32 and y.shape == yt.shape
    dy = torch.randn(yt.shape, generator=torch.Generator().manual_seed(1))
    y.backward(dy)
    yt.backward(dy)
    for a, e in [(y, yt)] + [(g.grad, t.grad) for g, t in zip(got, want, strict=True)]:
        scale = e.abs().max().item()
        torch.testing.assert_close(a, e, rtol=0, atol=2e-5 * scale)


@requires_torch
@pytest.mark.parametrize("layout", ["input", "weight", "neither"])
def test_channels_last_in_channels_last_out_as_in_torch(layout):
    x, w, b, conv = _problem(F32[1], torch.float32)
    cl = torch.channels_last
    x = x.contiguous(memory_format=cl) if layout == "input" else x
    w = w.contiguous(memory_format=cl) if layout == "weight" else w
    x.requires_grad_()
    y, yt = fct.conv2d(x, w, b, **conv), torch.nn.functional.conv2d(x, w, b, **conv)
    assert y.is_contiguous(memory_format=cl) == yt.is_contiguous(memory_format=cl)
    assert y.is_contiguous() == yt.is_contiguous()
    torch.testing.assert_close(y, yt, rtol=1e-4, atol=1e-4)
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    (ex,) = torch.autograd.grad(yt.square().sum(), x)
    torch.testing.assert_close(gx, ex, rtol=0, atol=2e-5 * ex.abs().max().item())


@requires_torch
def test_unbatched_input_and_no_grad():
    x, w, b, conv = _problem(GRID[0], torch.float64)
    want = torch.nn.functional.conv2d(x[0], w, b, **conv)
    torch.testing.assert_close(fct.conv2d(x[0], w, b, **conv), want)
    xg = x[0].clone().requires_grad_()
    y = fct.conv2d(xg, w, b, **conv)
    y.sum().backward()
    xt = x[0].clone().requires_grad_()
    torch.nn.functional.conv2d(xt, w, b, **conv).sum().backward()
    torch.testing.assert_close(xg.grad, xt.grad)
    with torch.no_grad():
        y = fct.conv2d(x, w.requires_grad_(), b, **conv)
    assert y.grad_fn is None and not y.requires_grad


@requires_torch
def test_double_backward_is_a_clear_error():
    x, w, b, conv = _problem(GRID[0], torch.float64)
    x.requires_grad_()
    w.requires_grad_()
    # create_graph=True alone works and gives the first derivatives
    gx, gw = torch.autograd.grad(fct.conv2d(x, w, b, **conv).square().sum(), (x, w),
                                 create_graph=True)
    ex, ew = torch.autograd.grad(torch.nn.functional.conv2d(x, w, b, **conv).square().sum(),
                                 (x, w))
    torch.testing.assert_close(gx.detach(), ex)
    torch.testing.assert_close(gw.detach(), ew)
    with pytest.raises(RuntimeError, match="no second derivative"):
        (gx.square().sum() + gw.sum()).backward()
    # deltas that do not require grad: dW still depends on x, so it is refused too
    (gw,) = torch.autograd.grad(fct.conv2d(x, w, b, **conv).sum(), (w,), create_graph=True)
    assert gw.requires_grad
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(gw.sum(), x)


# ---- errors ---------------------------------------------------------------------------


@requires_torch
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int32", "complex64"])
def test_other_dtypes_are_refused(dtype):
    dtype = getattr(torch, dtype)
    x = torch.ones(1, 2, 5, 5, dtype=dtype)
    w = torch.ones(3, 2, 3, 3, dtype=dtype)
    with pytest.raises(TypeError, match=f"input has dtype {dtype}; fastconv.torch.conv2d "
                       "computes in torch.float32 or torch.float64"):
        fct.conv2d(x, w)


@requires_torch
def test_mixed_dtypes_are_refused():
    x = torch.ones(1, 2, 5, 5)
    w = torch.ones(3, 2, 3, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="one dtype .*got input torch.float32, weight "
                       "torch.float64"):
        fct.conv2d(x, w)
    with pytest.raises(TypeError, match="bias torch.float64"):
        fct.conv2d(x, w.float(), torch.zeros(3, dtype=torch.float64))


@requires_torch
def test_tensors_off_the_cpu_are_refused():
    # A CPU-only torch has no CUDA tensors; the meta device takes the same check.
    x = torch.ones(1, 2, 5, 5, device="meta")
    with pytest.raises(ValueError, match="runs on the CPU only; input is on meta"):
        fct.conv2d(x, torch.ones(3, 2, 3, 3))
    with pytest.raises(ValueError, match="weight is on meta"):
        fct.conv2d(torch.ones(1, 2, 5, 5), torch.ones(3, 2, 3, 3, device="meta"))


@requires_torch
def test_other_arguments_are_refused_with_fastconvs_messages():
    x, w = torch.ones(1, 2, 5, 5), torch.ones(3, 2, 3, 3)
    with pytest.raises(TypeError, match="input must be a torch.Tensor, got ndarray"):
        fct.conv2d(x.numpy(), w)
    with pytest.raises(TypeError, match="dense .*torch.sparse_coo"):
        fct.conv2d(x.to_sparse(), w)
    with pytest.raises(ValueError, match="channel mismatch"):
        fct.conv2d(torch.ones(1, 4, 5, 5, requires_grad=True), w)
    with pytest.raises(ValueError, match="bias must have shape"):
        fct.conv2d(x, w, torch.ones(4))
    with pytest.raises(ValueError, match="stride must be >= 1"):
        fct.conv2d(x, w.requires_grad_(), stride=0)


# ---- the drop-in Conv2d and convert() --------------------------------------------------


@requires_torch
@pytest.mark.parametrize("kwargs", [
    dict(in_channels=3, out_channels=8, kernel_size=3, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=2, bias=False, groups=2),
    dict(in_channels=2, out_channels=4, kernel_size=3, padding="same", dilation=2),
    dict(in_channels=2, out_channels=3, kernel_size=3, padding=2, padding_mode="reflect"),
    dict(in_channels=2, out_channels=3, kernel_size=3, padding=(1, 2),
         padding_mode="circular"),
    dict(in_channels=2, out_channels=3, kernel_size=4, padding="same",
         padding_mode="replicate"),
], ids=["plain", "grouped-nobias", "same-dilated", "reflect", "circular", "replicate-same"])
def test_conv2d_module_is_a_drop_in(kwargs):
    torch.manual_seed(7)
    ours = fct.Conv2d(**kwargs, dtype=torch.float64)
    torch.manual_seed(7)
    theirs = torch.nn.Conv2d(**kwargs, dtype=torch.float64)
    assert isinstance(ours, torch.nn.Conv2d)
    # the same initialisation (the same random stream gives the same numbers)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v)
    assert repr(ours) == repr(theirs).replace("Conv2d", "fastconv.torch.Conv2d", 1)
    x = torch.randn(2, kwargs["in_channels"], 9, 8, dtype=torch.float64, requires_grad=True)
    xt = x.detach().clone().requires_grad_()
    y, yt = ours(x), theirs(xt)
    torch.testing.assert_close(y, yt)
    y.square().sum().backward()
    yt.square().sum().backward()
    torch.testing.assert_close(x.grad, xt.grad)
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


@requires_torch
def test_state_dicts_load_both_ways():
    ours, theirs = fct.Conv2d(3, 5, 3), torch.nn.Conv2d(3, 5, 3)
    ours.load_state_dict(theirs.state_dict())
    assert torch.equal(ours.weight, theirs.weight) and torch.equal(ours.bias, theirs.bias)
    with torch.no_grad():
        ours.weight.mul_(2)
    theirs.load_state_dict(ours.state_dict())
    assert torch.equal(ours.weight, theirs.weight)
    x = torch.randn(2, 3, 7, 7)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@requires_torch
def test_a_layer_of_a_model_can_be_replaced():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(1, 4, 3)
            self.fc = torch.nn.Linear(4 * 6 * 6, 2)

        def forward(self, x):
            return self.fc(torch.relu(self.conv1(x)).flatten(1))

    net = Net()
    keys = net.state_dict().keys()
    state = copy.deepcopy(net.state_dict())
    net.conv1 = fct.Conv2d(1, 4, 3)
    net.load_state_dict(state)
    assert net.state_dict().keys() == keys
    x = torch.randn(3, 1, 8, 8)
    reference = Net()
    reference.load_state_dict(state)
    torch.testing.assert_close(net(x), reference(x), rtol=1e-5, atol=1e-5)


class _MyConv(torch.nn.Conv2d if torch is not None else object):
    """A user's subclass, whose forward pass convert() must not replace."""

    def forward(self, x):
        return super().forward(x) * 2


@requires_torch
def test_convert_replaces_the_supported_layers_and_names_the_others():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3, padding_mode="reflect",
                                                             padding=1)),
        torch.nn.Conv2d(4, 4, 1, dtype=torch.float16),
        _MyConv(4, 4, 1),
        torch.nn.Conv2d(4, 4, 1, device="meta"),
        torch.nn.Conv2d(4, 4, 1, dtype=torch.float64),
    )
    first, hook_calls = model[0], []
    first.register_forward_hook(lambda *a: hook_calls.append(1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # made before: keeps working
    with pytest.warns(UserWarning) as record:
        assert fct.convert(model) is model
    assert len(record) == 1
    assert str(record[0].message) == (
        "fastconv.torch.convert left 3 torch.nn.Conv2d layer(s) to torch: 2 (dtype "
        "torch.float16); 3 (_MyConv, a subclass of torch.nn.Conv2d with its own behaviour); "
        "4 (parameters on meta)")
    assert model[0] is first and type(first) is fct.Conv2d
    assert type(model[1][1]) is fct.Conv2d and type(model[5]) is fct.Conv2d
    assert type(model[2]) is torch.nn.Conv2d and type(model[3]) is _MyConv
    # the converted layers compute as before, with their hooks
    x = torch.randn(2, 1, 6, 6)
    before = copy.deepcopy(first.weight)
    y = model[1](model[0](x))
    assert hook_calls == [1]
    y.sum().backward()
    opt.step()
    assert not torch.equal(first.weight, before)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fct.convert(model[:2])  # nothing left to convert, nothing to warn about


@requires_torch
def test_convert_takes_a_bare_layer_and_refuses_other_things():
    layer = torch.nn.Conv2d(2, 3, 3)
    assert fct.convert(layer) is layer and type(layer) is fct.Conv2d
    with pytest.warns(UserWarning, match=r"\(the model itself\) \(dtype torch.bfloat16\)"):
        fct.convert(torch.nn.Conv2d(2, 3, 3, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got list"):
        fct.convert([layer])


@requires_torch
def test_a_converted_layer_moved_to_another_dtype_is_refused_clearly():
    layer = fct.convert(torch.nn.Conv2d(2, 3, 3)).half()
    with pytest.raises(TypeError, match="input has dtype torch.float16"):
        layer(torch.ones(1, 2, 5, 5, dtype=torch.float16))


# ---- the two-conv network: fastconv's convolutions vs torch's, same weights and batches


def _two_conv():
    tnn = torch.nn
    return tnn.Sequential(
        tnn.Conv2d(1, 32, 5, padding=2), tnn.ReLU(), tnn.MaxPool2d(2),
        tnn.Conv2d(32, 64, 5, padding=2), tnn.ReLU(), tnn.MaxPool2d(2),
        tnn.Flatten(), tnn.Linear(3136, 128), tnn.ReLU(), tnn.Linear(128, 10))


@requires_torch
def test_two_conv_network_trains_as_with_torchs_convolutions():
    torch.manual_seed(0)
    reference = _two_conv()
    model = fct.convert(copy.deepcopy(reference))
    assert sum(type(m) is fct.Conv2d for m in model.modules()) == 2
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (model, reference)]
    rng = np.random.default_rng(0)
    losses = {id(model): [], id(reference): []}
    for _ in range(6):
        # images whose label is the quadrant holding a bright square, so that loss falls
        y = rng.integers(0, 4, 64)
        x = rng.random((64, 1, 28, 28), dtype=np.float32) * 0.2
        for i, q in enumerate(y):
            r, c = 14 * (q // 2) + 3, 14 * (q % 2) + 3
            x[i, 0, r:r + 8, c:c + 8] += 0.8
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        for m, opt in zip((model, reference), opts, strict=True):
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(m(xt), yt)
            loss.backward()
            opt.step()
            losses[id(m)].append(loss.item())
    ours, theirs = np.array(losses[id(model)]), np.array(losses[id(reference)])
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)
    assert ours[-1] < ours[0]
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4)


# ---- Conv2d, ReLU, MaxPool2d(2) runs fused by convert() --------------------------------

# (N, C, H, W, K, R, S, conv) whose convolution output fastconv writes in pool order (with
# the parallel_paths fixture), one for each kept form: the pixel path's PixelInput (few
# channels), the packed input (channel tile; grouped, on planes too small for the grouped
# kernels, whose NCHW forward pass is not fused), and the NCHW input (NCHW-delta dW), and
# a strided one.
FUSED = [
    (2, 1, 8, 8, 3, 3, 3, dict(padding=1)),
    (2, 3, 12, 10, 4, 3, 3, dict(padding=1)),
    (2, 6, 8, 8, 4, 3, 3, dict(padding=1)),
    (2, 4, 2, 2, 6, 3, 3, dict(padding=1, groups=2)),
    (2, 16, 6, 8, 8, 3, 3, dict(padding=1)),
    (2, 8, 11, 11, 8, 3, 3, dict(stride=2, padding=1)),
]


def _reference_fused(x, w, b, conv):
    return torch.nn.functional.max_pool2d(
        torch.relu(torch.nn.functional.conv2d(x, w, b, **conv)), 2)


@requires_torch
@pytest.mark.parametrize("shape", FUSED, ids=str)
def test_fused_function_gradcheck_and_matches_torch(shape, parallel_paths):
    x, w, b, conv = _problem(shape, torch.float64)
    assert fct.fused_ok(x, w, **conv)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    torch.autograd.gradcheck(lambda *a: fct.conv2d_relu_max_pool2d(*a, **conv), (x, w, b))
    ours = fct.conv2d_relu_max_pool2d(x, w, b, **conv)
    theirs = _reference_fused(x, w, b, conv)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ours)
    for a, c in zip(torch.autograd.grad(ours, (x, w, b), g),
                    torch.autograd.grad(theirs, (x, w, b), g), strict=True):
        torch.testing.assert_close(a, c, rtol=1e-11, atol=1e-11)


@requires_torch
@pytest.mark.parametrize("needs", list(itertools.product([False, True], repeat=3))[1:],
                         ids=str)
def test_fused_function_each_subset_of_requires_grad(needs, parallel_paths):
    for shape in (FUSED[0], FUSED[2], FUSED[4]):
        x, w, b, conv = _problem(shape, torch.float64, contiguous=False)
        args = [t.requires_grad_(n) for t, n in zip((x, w, b), needs, strict=True)]
        ours = fct.conv2d_relu_max_pool2d(*args, **conv)
        theirs = _reference_fused(*args, conv)
        want = [t for t in args if t.requires_grad]
        for a, c in zip(torch.autograd.grad(ours.square().sum(), want),
                        torch.autograd.grad(theirs.square().sum(), want), strict=True):
            torch.testing.assert_close(a, c, rtol=1e-11, atol=1e-11)


@requires_torch
def test_fused_function_without_grad_channels_last_and_refusals(parallel_paths):
    x, w, b, conv = _problem(FUSED[2], torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fct.conv2d_relu_max_pool2d(x, w, b, **conv),
                                   _reference_fused(x, w, b, conv), rtol=1e-12, atol=1e-12)
    xc = x.contiguous(memory_format=torch.channels_last)
    y = fct.conv2d_relu_max_pool2d(xc, w, b, **conv)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, _reference_fused(x, w, b, conv), rtol=1e-12, atol=1e-12)
    odd = x[:, :, :7, :7]
    assert not fct.fused_ok(odd, w, **conv) and not fct.fused_ok(x[0], w, **conv)
    assert not fct.fused_ok(x.float(), w, **conv) and not fct.fused_ok(x, "w")
    with pytest.raises(ValueError, match=r"even, non-empty size .* output 7x7"):
        fct.conv2d_relu_max_pool2d(odd, w, b, **conv)
    with pytest.raises(TypeError, match="dtype"):
        fct.conv2d_relu_max_pool2d(x.float(), w, b, **conv)
    with pytest.raises(ValueError, match=r"needs a batch \(N, C, H, W\), got input of shape"):
        fct.conv2d_relu_max_pool2d(x[0], w, b, **conv)
    y = fct.conv2d_relu_max_pool2d(x, w.requires_grad_(), b, **conv)
    (dw,) = torch.autograd.grad(y.sum(), w, create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        dw.sum().backward()


def _spy(monkeypatch):
    calls = []
    real = fct.conv2d_relu_max_pool2d

    def spy(*args, **kwargs):
        calls.append(tuple(args[0].shape))
        return real(*args, **kwargs)

    monkeypatch.setattr(fct, "conv2d_relu_max_pool2d", spy)
    return calls


def _compare(model, reference, x, rtol, atol):
    """Outputs and all gradients of ``model`` and ``reference`` on ``x`` are close."""
    for m in (model, reference):
        m.zero_grad(set_to_none=True)
    ours, theirs = model(x), reference(x)
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=atol)
    g = torch.randn_like(ours)
    ours.backward(g)
    theirs.backward(g)
    for (n, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=atol, msg=n)


@requires_torch
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_convert_fuses_the_two_conv_networks_runs(dtype, monkeypatch):
    torch.manual_seed(0)
    reference = _two_conv().to(dtype)
    model = fct.convert(copy.deepcopy(reference))
    assert type(model) is fct.Sequential and fct.fused_runs(model) == ["0", "3"]
    assert [type(m) for m in model][:3] == [fct.Conv2d, torch.nn.ReLU, torch.nn.MaxPool2d]
    assert list(model.state_dict()) == list(reference.state_dict())
    calls = _spy(monkeypatch)
    x = torch.randn(16, 1, 28, 28, dtype=dtype)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4,
                                                                           atol=1e-5)
    _compare(model, reference, x, **tol)
    assert calls == [(16, 1, 28, 28), (16, 32, 14, 14)]
    for m in (model, reference):
        m.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), **tol)
    assert len(calls) == 4
    # the modules called on their own compute as before, unfused
    torch.testing.assert_close(model[0](x), reference[0](x), **tol)
    torch.testing.assert_close(model[2](model[1](model[0](x))), reference[:3](x), **tol)
    torch.testing.assert_close(model[:3](x), reference[:3](x), **tol)
    assert len(calls) == 5  # the slice is a fastconv.torch.Sequential too


@requires_torch
def test_two_conv_network_trains_fused_as_with_torch(monkeypatch):
    calls = _spy(monkeypatch)
    test_two_conv_network_trains_as_with_torchs_convolutions()
    assert len(calls) == 12  # two runs, six steps


@requires_torch
def test_inplace_relu_odd_sizes_other_pools_and_hooks(monkeypatch, parallel_paths):
    tnn = torch.nn
    calls = _spy(monkeypatch)
    torch.manual_seed(0)

    def check(reference, x, fused):
        model = fct.convert(copy.deepcopy(reference))
        calls.clear()
        _compare(model, reference, x, rtol=1e-10, atol=1e-12)
        assert len(calls) == fused
        return model

    net = tnn.Sequential(tnn.Conv2d(3, 8, 3, padding=1), tnn.ReLU(inplace=True),
                         tnn.MaxPool2d(2, 2), tnn.Conv2d(8, 4, 3)).double()
    assert type(check(net, torch.randn(4, 3, 16, 12, dtype=torch.float64), 1)) is fct.Sequential
    check(net, torch.randn(4, 3, 15, 12, dtype=torch.float64), 0)  # odd: torch's relu, pool
    check(net, torch.randn(3, 16, 12, dtype=torch.float64), 0)  # unbatched
    for pool in (tnn.MaxPool2d(3), tnn.MaxPool2d(2, 1), tnn.MaxPool2d(2, ceil_mode=True),
                 tnn.MaxPool2d(2, padding=1), tnn.AvgPool2d(2)):
        other = tnn.Sequential(net[0], tnn.ReLU(), pool).double()
        assert type(check(other, torch.randn(2, 3, 12, 12, dtype=torch.float64), 0)) is \
            tnn.Sequential
    hooked = copy.deepcopy(net)
    seen = []
    hooked[1].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert type(check(hooked, torch.randn(2, 3, 8, 8, dtype=torch.float64), 0)) is \
        tnn.Sequential
    assert seen == [(2, 8, 8, 8)] * 2
    # a hook registered after convert() turns the fusion off at call time
    model = fct.convert(copy.deepcopy(net))
    handle = model[2].register_forward_pre_hook(lambda m, i: seen.append("pool"))
    model(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    assert seen[-1] == "pool" and not calls
    handle.remove()
    model(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    assert len(calls) == 1
    # nested Sequentials are converted too; subclasses are left alone
    nested = tnn.Sequential(tnn.Sequential(*copy.deepcopy(net)))
    assert fct.fused_runs(fct.convert(nested)) == ["0.0"]
    assert type(nested[0]) is fct.Sequential and type(nested) is tnn.Sequential


@requires_torch
def test_fused_cases_cover_each_kept_form_and_a_retained_graph(parallel_paths):
    from fastconv import conv as fconv

    kinds = set()
    for N, C, H, W, K, R, S, conv in FUSED:
        geo = fconv.conv_geometry((N, C, H, W), (K, C // conv.get("groups", 1), R, S), **conv)
        kinds.add(fconv.saved_kind(geo, np.float64, pool_order=True))
    assert kinds == {"pixels", "packed", "input"}
    for shape in FUSED[:3]:
        x, w, b, conv = _problem(shape, torch.float64)
        w.requires_grad_()
        y = fct.conv2d_relu_max_pool2d(x, w, b, **conv)
        (first,) = torch.autograd.grad(y.sum(), w, retain_graph=True)
        fct.conv2d_relu_max_pool2d(x * 2, w, b, **conv).sum().backward()  # same geometry
        (again,) = torch.autograd.grad(y.sum(), w)
        torch.testing.assert_close(first, again, rtol=0, atol=0)
