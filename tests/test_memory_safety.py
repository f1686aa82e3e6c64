"""The memory-safety rule (docs/memory-safety.md): nothing a caller hands in reaches a
kernel unchecked.

Every case here would, without its check, make a kernel index outside an array (a wrong
result, a corrupted heap or a segmentation fault that takes the test run down); with it,
the call raises ValueError or TypeError and changes nothing.
"""

from __future__ import annotations

import ast
import pathlib
import re

import numpy as np
import pytest

from fastconv import _checks, conv, models, nn, optim, pool
from fastconv.algorithms import winograd

# The training path's layouts on small shapes: not the serial kernels of small problems.
pytestmark = pytest.mark.usefixtures("parallel_paths")

PACKAGE = pathlib.Path(conv.__file__).parent
DOC = PACKAGE.parent / "docs" / "memory-safety.md"


# ---- the audit stays complete ----------------------------------------------------------


def _is_kernel(node) -> bool:
    """A function compiled by ``_jit.parallel_kernel`` or ``_jit.serial_kernel``."""
    return isinstance(node, ast.FunctionDef) and any(
        getattr(d, "id", getattr(d, "attr", "")).endswith("_kernel")
        for d in node.decorator_list)


def _modules():
    """(dotted name below the package, parsed module) of every module of the package."""
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        yield name.removesuffix(".__init__"), ast.parse(path.read_text())


def _kernels_by_module() -> dict[str, set[str]]:
    return {module: {node.name for node in tree.body if _is_kernel(node)}
            for module, tree in _modules()}


def _kernel_names() -> set[str]:
    return set().union(*_kernels_by_module().values())


class _KernelCalls(ast.NodeVisitor):
    """(module.function, kernel) for every call of a kernel from a function that is not a
    kernel itself: ``_k.name(...)``, ``_wk.name(...)``, or ``name(...)`` of a kernel of the
    same module."""

    def __init__(self, module: str, kernels: set[str], own: set[str]):
        self.module, self.kernels, self.own = module, kernels, own
        self.stack, self.sites = [], set()

    def visit_FunctionDef(self, node):
        if _is_kernel(node):
            return  # kernels calling kernels run inside the checked call
        self.stack.append(node.name)
        self.generic_visit(node)
        self.stack.pop()

    visit_ClassDef = visit_FunctionDef

    def visit_Call(self, node):
        f = node.func
        if isinstance(f, ast.Name):  # a kernel of this module, by its name
            name = f.id if f.id in self.own else None
        elif (isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
              and f.value.id in ("_k", "_wk")):  # kernels.kernel, winograd_kernels.kernel
            name = f.attr if f.attr in self.kernels else None
        else:
            name = None
        if name is not None:
            self.sites.add((f"{self.module}.{'.'.join(self.stack)}", name))
        self.generic_visit(node)


def _kernel_call_sites() -> set[tuple[str, str]]:
    by_module, sites = _kernels_by_module(), set()
    kernels = set().union(*by_module.values())
    for module, tree in _modules():
        visitor = _KernelCalls(module, kernels, by_module[module])
        visitor.visit(tree)
        sites |= visitor.sites
    return sites


def _audited() -> set[tuple[str, str]]:
    rows = re.findall(r"^\| `([\w.]+)` \| ([^|]+) \|", DOC.read_text(), re.M)
    return {(site, k) for site, kernels in rows for k in re.findall(r"`(\w+)`", kernels)}


def test_every_kernel_call_site_is_in_the_audit():
    sites, audited = _kernel_call_sites(), _audited()
    assert len(sites) >= 25  # the parser found the calls
    assert sites - audited == set(), "kernel calls missing from docs/memory-safety.md"
    # Rows with no such call, but for those that reach their kernels through a variable.
    by_variable = {"algorithms.channel_tile.packed_grad_weight", "algorithms.small._run",
                   "algorithms.winograd.grad_weight_by"}
    stale = {(s, k) for s, k in audited - sites if s not in by_variable}
    assert stale == set(), "rows of docs/memory-safety.md with no such call"


def test_every_kernel_is_in_the_audit():
    """From the other side: each public kernel has a row (a kernel picked through a
    variable, as the dW tiles are, is found this way)."""
    kernels = {k for k in _kernel_names() if not k.startswith("_")}
    assert len(kernels) >= 28
    assert kernels - {k for _, k in _audited()} == set()


def test_kernel_modules_are_only_called_through_their_names():
    """The audit finds calls as ``_k.name(...)``, ``_wk.name(...)`` or a module's own
    kernels by name: no module imports another's kernel by name."""
    kernels = _kernel_names()
    for module, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                imported = {a.name for a in node.names} & kernels
                assert not imported, f"{module} imports kernels {imported} by name"


# ---- the checks themselves -------------------------------------------------------------


def test_array_check_names_the_argument_and_the_rule():
    a = np.zeros((2, 3), np.float32)
    assert _checks.array("a", a, (2, 3), np.float32) is a
    for bad, kind, words in [
        ([[0.0] * 3] * 2, TypeError, "NumPy array"),
        (a.astype(np.float64), TypeError, "float32"),
        (a.astype(">f4"), TypeError, "native byte order"),
        (np.zeros((3, 2), np.float32), ValueError, "shape (2, 3)"),
        (np.zeros((2, 6), np.float32)[:, ::2], ValueError, "C-contiguous"),
    ]:
        with pytest.raises(kind, match=re.escape(words)) as e:
            _checks.array("a", bad, (2, 3), np.float32)
        assert "a " in str(e.value) or str(e.value).startswith("a ")
    ro = a.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        _checks.array("out", ro, (2, 3), np.float32, writeable=True)


# ---- the training path: saved state handed back ----------------------------------------


@pytest.fixture
def saved(rng):
    """A channel-tile layer's saved state: (x, w, xp, geo, layout, dyp)."""
    x = rng.standard_normal((2, 8, 9, 9)).astype(np.float32)
    w = rng.standard_normal((6, 8, 3, 3)).astype(np.float32)
    _, xp, geo = conv.conv2d_saving(x, w, padding=1, stride=2)
    layout = conv.delta_layout(geo)
    dy = rng.standard_normal((geo.N, geo.K, geo.OH, geo.OW)).astype(np.float32)
    return x, w, xp, geo, layout, conv.pack_deltas(dy, layout)


def test_backward_saved_runs_on_what_conv2d_saving_made(saved):
    _, w, xp, geo, layout, dyp = saved
    dx, dw, db = conv.backward_saved(xp, geo, w, dyp, layout)
    assert dx.shape == (2, 8, 9, 9) and dw.shape == w.shape and db.shape == (6,)


def _forged_backward_saved(saved):
    x, w, xp, geo, layout, dyp = saved
    other = conv.conv_geometry((2, 8, 30, 30), w.shape, padding=1, stride=2)
    return {
        "xp smaller": dict(xp=xp[:, :-1].copy()),
        "xp float64": dict(xp=xp.astype(np.float64)),
        "xp big-endian": dict(xp=xp.astype(">f4")),
        "xp strided": dict(xp=np.repeat(xp, 2, axis=3)[..., ::2]),
        "xp a list": dict(xp=xp.tolist()),
        "dyp smaller": dict(dyp=dyp[:1].copy()),
        "dyp other dtype": dict(dyp=dyp.astype(np.float64)),
        "geo taller output": dict(geo=geo._replace(OH=geo.OH + 40)),
        "geo more channels": dict(geo=geo._replace(C=64)),
        "geo a tuple": dict(geo=tuple(geo)),
        "geo of floats": dict(geo=geo._replace(sh=2.0)),
        "layout of another geometry": dict(layout=conv.delta_layout(other)),
        "layout moved": dict(layout=layout._replace(top=layout.top + 30)),
        "layout a tuple": dict(layout=tuple(layout)),
        "weight of another shape": dict(weight=np.zeros((6, 8, 5, 5), np.float32)),
        "dsum smaller": dict(dsum=np.zeros((1, layout.shape[3]))),
        "dsum float32": dict(dsum=np.zeros((2, layout.shape[3]), np.float32)),
        "workspace not a Workspace": dict(workspace=object()),
    }


FORGED = ["xp smaller", "xp float64", "xp big-endian", "xp strided", "xp a list",
          "dyp smaller", "dyp other dtype", "geo taller output", "geo more channels",
          "geo a tuple", "geo of floats", "layout of another geometry", "layout moved",
          "layout a tuple", "weight of another shape", "dsum smaller", "dsum float32",
          "workspace not a Workspace"]


@pytest.mark.parametrize("case", FORGED)
def test_backward_saved_refuses_forged_state(saved, case):
    x, w, xp, geo, layout, dyp = saved
    args = dict(xp=xp, geo=geo, weight=w, dyp=dyp, layout=layout)
    forged = _forged_backward_saved(saved)
    assert sorted(forged) == sorted(FORGED)
    args.update(forged[case])
    before = {k: v.copy() for k, v in args.items() if isinstance(v, np.ndarray)}
    with pytest.raises((ValueError, TypeError)):
        conv.backward_saved(**args)
    for k, v in before.items():
        np.testing.assert_array_equal(args[k], v)


def test_backward_saved_without_dx_takes_either_layout(saved):
    _, w, xp, geo, layout, dyp = saved
    small = conv.delta_layout(geo, need_dx=False)
    dyp_small = np.ascontiguousarray(
        dyp[:, layout.top:layout.top + geo.OH, layout.left:layout.left + geo.OW])
    _, dw, _ = conv.backward_saved(xp, geo, w, dyp_small, small, need_dx=False)
    np.testing.assert_allclose(dw, conv.backward_saved(xp, geo, w, dyp, layout)[1],
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="delta_layout"):
        conv.backward_saved(xp, geo, w, dyp_small, small, need_dx=True)


def test_delta_layouts_are_immutable():
    geo = conv.conv_geometry((2, 8, 9, 9), (6, 8, 3, 3), padding=1, stride=2)
    layout = conv.delta_layout(geo)
    assert isinstance(layout.rows, tuple) and isinstance(layout.rows[0].taps, tuple)
    assert conv.delta_layout(geo) is layout  # cached


@pytest.mark.parametrize("dy_shape, change", [
    ((2, 6, 5, 5), dict(shape=(1, 7, 7, 32))),  # fewer images in the layout
    ((2, 6, 9, 5), {}),  # taller than the layout's interior
    ((2, 40, 5, 5), {}),  # more channels than its groups hold
    ((2, 6, 5, 5), dict(KgP=0)),
    ((2, 6, 5, 5), dict(top=-1)),
])
def test_pack_deltas_refuses_deltas_that_do_not_fit(dy_shape, change):
    geo = conv.conv_geometry((2, 8, 9, 9), (6, 8, 3, 3), padding=1, stride=2)
    layout = conv.delta_layout(geo)._replace(**change)
    with pytest.raises(ValueError, match="do not fit"):
        conv.pack_deltas(np.zeros(dy_shape, np.float32), layout)


def test_pack_deltas_refuses_non_float_deltas_and_foreign_workspaces():
    geo = conv.conv_geometry((2, 8, 9, 9), (6, 8, 3, 3), padding=1, stride=2)
    layout = conv.delta_layout(geo)
    with pytest.raises(TypeError, match="float32 or float64"):
        conv.pack_deltas(np.zeros((2, 6, 5, 5), np.int64), layout)
    with pytest.raises(TypeError, match="Workspace"):
        conv.pack_deltas(np.zeros((2, 6, 5, 5), np.float32), layout, ws=object())
    with pytest.raises(TypeError, match="Workspace"):
        conv.conv2d_saving(np.zeros((1, 1, 5, 5)), np.zeros((1, 1, 3, 3)), workspace={})


@pytest.fixture
def pool_order_state(rng):
    x = rng.standard_normal((2, 1, 12, 12)).astype(np.float32)
    w = rng.standard_normal((4, 1, 3, 3)).astype(np.float32)
    y4, px, geo = conv.conv2d_saving(x, w, padding=1, pool_order=True)
    assert isinstance(px, conv.PixelInput)
    return w, y4, px, geo


def test_backward_pool_order_refuses_forged_inputs(pool_order_state):
    w, y4, px, geo = pool_order_state
    dy4 = np.ones_like(y4)
    M = y4.shape[3]
    g, sel = np.ones((2, 4, M), np.float32), np.zeros((2, 4, M), np.int8)
    conv.backward_pool_order(px, geo, w, dy4)  # the real thing runs
    conv.backward_pool_order(px, geo, w, conv.PooledDeltas(g, sel))
    forged = [
        (px._replace(toff=px.toff + 10**6), dy4, geo),  # taps past the input's end
        (px._replace(xf=px.xf[:, :-1].copy()), dy4, geo),
        (px._replace(OW=px.OW + 64), dy4, geo),
        (px._replace(taps=px.taps[::-1].copy()), dy4, geo),
        (tuple(px), dy4, geo),
        (px, dy4[:, :, :2].copy(), geo),
        (px, dy4.astype(np.float64), geo),
        (px, conv.PooledDeltas(g[:1].copy(), sel[:1].copy()), geo),
        (px, conv.PooledDeltas(g, sel.astype(np.int64)), geo),
        (px, dy4, geo._replace(OH=geo.OH + 2, H=geo.H + 2)),  # consistent, but not px's
        (px, dy4, geo._replace(K=8)),
    ]
    for i, (p, d, gg) in enumerate(forged):
        with pytest.raises((ValueError, TypeError)):
            conv.backward_pool_order(p, gg, w, d)
            pytest.fail(f"forged case {i} ran")
    with pytest.raises(ValueError, match="dsum"):
        conv.backward_pool_order(px, geo, w, dy4, dsum=np.zeros((2, 3)))


# ---- layers: the packed protocol between layers -----------------------------------------


def test_max_pool_pool_order_forward_refuses_a_short_input():
    p = nn.MaxPool2d(2)
    y4 = np.zeros((2, 4, 4, 9), np.float32)
    assert p.forward_pool_order(y4, (2, 4, 6, 6)).shape == (2, 4, 3, 3)
    for bad, shape in [(y4[:, :, :, :4].copy(), (2, 4, 6, 6)), (y4, (2, 4, 8, 8)),
                       (y4, (3, 4, 6, 6)), (y4.astype(np.int32), (2, 4, 6, 6)),
                       (y4, (2, 4, 7, 6)), (y4, "shape")]:
        with pytest.raises((ValueError, TypeError)):
            p.forward_pool_order(bad, shape)


def test_max_pool_packed_backward_refuses_layouts_and_buffers_that_do_not_fit(rng):
    conv_layer = nn.Conv2d(8, 20, 3, padding=1)  # the channel tile: packed deltas
    pool_layer = nn.MaxPool2d(2)
    x = rng.standard_normal((3, 8, 8, 10)).astype(np.float32)
    out = pool_layer(conv_layer(x))
    layout = conv_layer.delta_layout()
    dy = np.ones_like(out)
    pool_layer.backward_packed(dy, layout)  # fits
    with pytest.raises(ValueError, match="do not fit"):
        pool_layer.backward_packed(dy, layout._replace(shape=(1, *layout.shape[1:])))
    for KgP in (64, 3, 0):  # no groups, groups that do not tile the channels, none
        with pytest.raises(ValueError, match="do not fit"):
            pool_layer.backward_packed(dy, layout._replace(KgP=KgP))
    with pytest.raises(ValueError, match="shape"):
        pool_layer.backward_packed(dy, layout, out=np.zeros((3, 2, 2, 32), np.float32))
    with pytest.raises(TypeError, match="dtype"):
        pool_layer.backward_packed(dy, layout, out=np.zeros(layout.shape, np.float64))


def test_conv_packed_backward_checks_the_deltas_it_is_handed(rng):
    layer = nn.Conv2d(8, 6, 3, padding=1)
    layer(rng.standard_normal((2, 8, 9, 9)).astype(np.float32))
    layout = layer.delta_layout()
    with pytest.raises(ValueError, match="dyp"):
        layer.backward_packed(np.zeros((1, 2, 3, 4), np.float32), layout)
    with pytest.raises(ValueError, match="dsum"):
        layer.backward_packed(np.zeros(layout.shape, np.float32), layout, np.zeros((2, 1)))
    with pytest.raises(TypeError, match="PixelInput"):  # a layout of the other path
        layer.backward_packed(np.zeros(layout.shape, np.float32),
                              conv.PoolOrderLayout((2, 6, 4, 20)))


# ---- Winograd's wrappers ---------------------------------------------------------------


def test_winograd_wrappers_check_what_they_hand_the_kernels():
    xp = np.zeros((1, 18, 18, 16), np.float32)  # a 14 x 14 output
    U = winograd.transform_filters(np.zeros((32, 16, 5, 5), np.float32), 16, np.float32)
    y = np.zeros((1, 32, 14, 14), np.float32)
    assert winograd.run_forward(xp, U, None, y)
    for args in [(xp, U, None, y[:, :, :7].copy()), (xp[..., :8].copy(), U, None, y),
                 (xp, U[:, :8].copy(), None, y), (xp, U[:, :, :16].copy(), None, y),
                 (xp, U.astype(np.float64), None, y), (xp, U[::2], None, y),
                 (xp, U, None, np.zeros((1, 40, 14, 14), np.float32)),
                 (xp.astype(np.float64), U, None, y), (xp, U, np.zeros(5, np.float32), y)]:
        with pytest.raises((ValueError, TypeError)):
            winograd.run_forward(*args)
    for w in [np.zeros((32, 24, 5, 5), np.float32), np.zeros((32, 16, 3, 5), np.float32)]:
        with pytest.raises(ValueError):
            winograd.transform_filters(w, 16, np.float32)
    dyp = np.zeros((1, 14, 14, 32), np.float32)
    assert winograd.run_grad_weight(xp, dyp, 0, 0, 32, 16) is not None
    for args in [(xp, dyp[:, :8].copy(), 0, 0, 32, 16), (xp, dyp, 1, 0, 32, 16),
                 (xp, dyp, 0, 0, 64, 16), (xp, dyp[..., :16].copy(), 0, 0, 16, 16),
                 (xp, dyp[0], 0, 0, 32, 16)]:
        with pytest.raises((ValueError, TypeError)):
            winograd.run_grad_weight(*args)


# ---- optimizers ------------------------------------------------------------------------


def _model_with_grads(rng):
    model = models.tiny_net(seed=1)
    x = rng.random((2, 1, 28, 28)).astype(np.float32)
    loss = nn.SoftmaxCrossEntropy()
    loss(model(x), np.array([1, 2]))
    model.backward(loss.backward())
    return model


def test_sgd_checks_its_momentum_buffers_before_every_update(rng):
    """A buffer of the wrong size (set by hand, or by a crafted state dict that got past
    the loader) would make the fused kernel write past its end."""
    model = _model_with_grads(rng)
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.step()
    before = [p.data.copy() for p in model.parameters()]
    for bad in [np.zeros(1, np.float32), np.zeros((49, 49), np.float64),
                np.zeros((98, 49), np.float32)[::2], [0.0]]:
        opt.buffers[-2] = bad  # Linear 49 -> 10's weight is (10, 49); any wrong buffer
        opt.buffers[5] = bad
        with pytest.raises((ValueError, TypeError), match="momentum buffer"):
            opt.step()
        for p, b in zip(model.parameters(), before, strict=True):
            np.testing.assert_array_equal(p.data, b)  # nothing updated


@pytest.mark.parametrize("make", [lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9),
                                  lambda ps: optim.Adam(ps)])
def test_optimizers_refuse_gradients_of_another_shape_before_any_update(make, rng):
    model = _model_with_grads(rng)
    opt = make(model.parameters())
    before = [p.data.copy() for p in model.parameters()]
    last = model.parameters()[-1]
    last.module.grads[last.key] = np.zeros(1, np.float32)  # would broadcast silently
    with pytest.raises(ValueError, match="gradient of parameter"):
        opt.step()
    for p, b in zip(model.parameters(), before, strict=True):
        np.testing.assert_array_equal(p.data, b)


# ---- pooling indices -------------------------------------------------------------------


def test_max_pool_indices_are_int64_and_do_not_wrap_on_planes_over_2_31_elements():
    """A zero-stride view of 3 x (2**30 + 1) elements: the third row's window starts at
    flat index 2 * (2**30 + 1), past int32's range."""
    W = 2**30 + 1
    x = np.broadcast_to(np.float32(0), (1, 1, 3, W))
    y, idx = pool.max_pool2d(x, (1, 2), stride=(1, 2**30), return_indices=True)
    assert idx.dtype == np.int64 and y.shape == (1, 1, 3, 1)
    assert idx[0, 0, :, 0].tolist() == [0, W, 2 * W]
    assert 2 * W > np.iinfo(np.int32).max


@pytest.mark.parametrize("dtype", [np.int64, np.uint64, np.int32, np.uint8])
def test_max_pool_backward_takes_any_integer_indices_in_range(dtype, rng):
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    y, idx = pool.max_pool2d(x, 2, return_indices=True)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    want = pool.max_pool2d_backward(dy, idx, x.shape)
    np.testing.assert_array_equal(pool.max_pool2d_backward(dy, idx.astype(dtype), x.shape),
                                  want)
    for bad in [idx + 36, idx - 37, np.full_like(idx, 2**40)]:
        with pytest.raises(ValueError, match=r"indices must lie in \[0, H\*W\)"):
            pool.max_pool2d_backward(dy, bad, x.shape)


def test_the_fused_pool_backward_agrees_with_the_scatter(rng):
    """The channels-last pool backward (its row buffer of indices now int64) writes what
    the plain backward, packed, holds."""
    conv_layer = nn.Conv2d(8, 4, 3, padding=1)
    pool_layer = nn.MaxPool2d(2)
    x = rng.standard_normal((2, 8, 8, 8)).astype(np.float32)
    out = pool_layer(conv_layer(x))
    dyp, _ = pool_layer.backward_packed(np.ones_like(out), conv_layer.delta_layout())
    want = conv.pack_deltas(pool_layer.backward(np.ones_like(out)), conv_layer.delta_layout())
    np.testing.assert_array_equal(dyp, want)


def test_backward_input_checks_what_it_is_handed(rng):
    """The NCHW training path (a layer whose dW reads the input itself)."""
    x = rng.standard_normal((2, 3, 12, 12)).astype(np.float32)
    w = rng.standard_normal((6, 3, 3, 3)).astype(np.float32)
    _, saved, geo = conv.conv2d_saving(x, w, padding=1)
    assert conv.saved_kind(geo, np.float32) == "input" and saved is x
    dy = rng.standard_normal((2, 6, 12, 12)).astype(np.float32)
    conv.backward_input(x, geo, w, dy)  # runs
    forged = [
        dict(x=x[:, :, :6]), dict(x=x.astype(np.float64)), dict(x=None),
        dict(dy=dy[:1]), dict(dy=dy.astype(np.float64)), dict(dy=dy.astype(np.int32)),
        dict(geo=geo._replace(OH=40)), dict(geo=tuple(geo)),
        dict(weight=w[:3]), dict(dsum=np.zeros((2, 5))),
    ]
    for change in forged:
        args = dict(x=x, geo=geo, weight=w, dy=dy) | change
        with pytest.raises((ValueError, TypeError)):
            conv.backward_input(**args)
