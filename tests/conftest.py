"""Shared test helpers: hypothesis profiles, and running every pass through fastconv or the
reference with the same public arguments."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

# The tests run in two processes (pytest-xdist) on a machine of two cores, and some start
# training runs of their own: threads that wait for work sleep instead of spinning, or the
# processes' OpenMP threads take turns on each core.  Set before any kernel starts threads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import fastconv as fc
from fastconv import reference as ref
from fastconv.geometry import ConvGeometry

# JIT compilation makes first examples slow: no deadline.  CI runs a fixed, moderate budget.
settings.register_profile("default", deadline=None, max_examples=40,
                          suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.function_scoped_fixture])
settings.register_profile("ci", parent=settings.get_profile("default"), derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")


def central_differences(f, arrays: dict, which: str, g, eps: float = 1e-6) -> np.ndarray:
    """The gradient of ``sum(f(**arrays) * g)`` with respect to ``arrays[which]``, by
    float64 central differences (exact up to rounding where ``f`` is linear in it)."""
    a = arrays[which]
    grad = np.zeros_like(a)
    for idx in np.ndindex(a.shape):
        losses = []
        for step in (eps, -eps):
            moved = a.copy()
            moved[idx] += step
            losses.append(np.sum(f(**{**arrays, which: moved}) * g))
        grad[idx] = (losses[0] - losses[1]) / (2 * eps)
    return grad


def check_plan_by_differences(plan, x, w, b, dy, passes=("grad_input", "grad_weight")):
    """A float64 plan's dX and dW (those of ``passes``) against float64 central
    differences of its own forward pass."""
    f = lambda x, w: plan.forward(x, w, b)  # noqa: E731
    for name, got in [("x", plan.grad_input(dy, w) if "grad_input" in passes else None),
                      ("w", plan.grad_weight(x, dy) if "grad_weight" in passes else None)]:
        if got is not None:
            np.testing.assert_allclose(got, central_differences(f, {"x": x, "w": w}, name, dy),
                                       rtol=1e-6, atol=1e-8)


def check_plan_against_torch(plan, rng, tol=1e-4, atol=1e-4) -> None:
    """A plan's three passes on random float32 arrays of its shapes against
    ``torch.nn.functional.conv2d`` and autograd (skipped without torch)."""
    torch = pytest.importorskip("torch")
    g = plan.geometry
    x = rng.standard_normal((g.N, g.C, g.H, g.W)).astype(np.float32)
    w = rng.standard_normal((g.K, g.Cg, g.R, g.S)).astype(np.float32)
    b = rng.standard_normal(g.K).astype(np.float32)
    assert (g.pt, g.pl) == (g.pb, g.pr), "torch pads symmetrically"
    tx, tw, tb = (torch.from_numpy(a).requires_grad_() for a in (x, w, b))
    ty = torch.nn.functional.conv2d(tx, tw, tb, (g.sh, g.sw), (g.pt, g.pl), (g.dlh, g.dlw),
                                    g.G)
    dy = rng.standard_normal(ty.shape).astype(np.float32)
    ty.backward(torch.from_numpy(dy))
    for got, want in [(plan.forward(x, w, b), ty.detach()), (plan.grad_input(dy, w), tx.grad),
                      (plan.grad_weight(x, dy), tw.grad)]:
        np.testing.assert_allclose(got, want.numpy(), rtol=tol, atol=atol)


def check_non_finite_reach(plan, x, w, dy, bad, inputs, delta) -> None:
    """An inf or NaN reaches exactly the results it touches, and the others equal the
    reference without it, in float64 positive data (no inf - inf): ``bad`` put at each
    index of ``inputs`` of ``x`` in turn (forward, dW: the taps that read it for some
    output), then at index ``delta`` of ``dy`` (dX: the inputs its taps read; dW: every
    tap of its channel, the padding's zeros being multiplied as in the reference)."""
    g = plan.geometry
    n = dict(stride=(g.sh, g.sw), pads=g.pads, dilation=(g.dlh, g.dlw), groups=g.G)
    for index in inputs:
        xb = x.copy()
        xb[index] = bad
        where = ~np.isfinite(xb)
        touched = ref.conv2d_forward(where * 1.0, np.ones_like(w), **n) > 0
        assert np.array_equal(~np.isfinite(plan.forward(xb, w)), touched)
        taps = ref.conv2d_grad_weight(where * 1.0, np.ones_like(dy), w.shape, **n) > 0
        got = plan.grad_weight(xb, dy)
        assert np.array_equal(~np.isfinite(got), taps)
        want = ref.conv2d_grad_weight(np.where(where, 0.0, x), dy, w.shape, **n)
        np.testing.assert_allclose(got[~taps], want[~taps], rtol=1e-12)
    dyb = dy.copy()
    dyb[delta] = bad
    where = ~np.isfinite(dyb)
    dy0 = np.where(where, 0.0, dy)
    channel = np.arange(g.K)[:, None, None, None] == delta[1]
    for got, touched, want in [
            (plan.grad_input(dyb, w), ref.conv2d_grad_input(where * 1.0, np.ones_like(w),
                                                            x.shape, **n) > 0,
             ref.conv2d_grad_input(dy0, w, x.shape, **n)),
            (plan.grad_weight(x, dyb), channel + np.zeros(w.shape, bool),
             ref.conv2d_grad_weight(x, dy0, w.shape, **n))]:
        assert np.array_equal(~np.isfinite(got), touched)
        np.testing.assert_allclose(got[~touched], want[~touched], rtol=1e-12)


def kink_margin(layers, x) -> float:
    """The smallest distance of any ReLU input from 0, or of any 2x2 max-pool window's top
    two values from each other, as ``x`` runs through ``layers`` (fastconv.nn modules): a
    finite difference must not step across these kinks."""
    from fastconv import nn

    margin, a = np.inf, x
    for layer in layers:
        if isinstance(layer, nn.ReLU):
            margin = min(margin, np.abs(a).min())
        if isinstance(layer, nn.MaxPool2d):
            N, C, H, W = a.shape
            win = a.reshape(N, C, H // 2, 2, W // 2, 2).transpose(0, 1, 2, 4, 3, 5)
            top = np.sort(win.reshape(N, C, H // 2, W // 2, 4), axis=-1)
            live = top[..., -1] > 0  # all-zero windows (after ReLU) carry no gradient
            if live.any():
                margin = min(margin, (top[..., -1] - top[..., -2])[live].min())
        a = layer(a)
    return margin


def normalised(x_shape, w_shape, stride, padding, dilation, groups):
    """The reference's argument form, from the public one."""
    g = fc.conv_geometry(x_shape, w_shape, stride, padding, dilation, groups)
    return dict(stride=(g.sh, g.sw), pads=(g.pt, g.pb, g.pl, g.pr), dilation=(g.dlh, g.dlw),
                groups=groups)


def all_passes(x, w, b, dy, conv):
    """(y, dx, dw) from fastconv for ``conv = dict(stride, padding, dilation, groups)``."""
    y = fc.conv2d(x, w, b, **conv)
    dx = fc.conv2d_grad_input(dy, w, x.shape, **conv)
    dw = fc.conv2d_grad_weight(x, dy, w.shape, **conv)
    return y, dx, dw


def reference_passes(x, w, b, dy, conv):
    """(y, dx, dw) from the NumPy reference."""
    n = normalised(x.shape, w.shape, **conv)
    y = ref.conv2d_forward(x, w, b, **n)
    dx = ref.conv2d_grad_input(dy, w, x.shape, **n)
    dw = ref.conv2d_grad_weight(x, dy, w.shape, **n)
    return y, dx, dw


def check_filter_transform(transform, taps, K, C, CP, rotate, dtype, strided, rng):
    """``transform(w, CP, rotate)`` (a Winograd ``transform_filters``) gives ``G f G^T``
    in float64 rounded once to float32 (within half an ulp of the exact value plus
    float64 noise) for every filter ``f`` of a random ``w`` (K, C, taps, taps), rotated
    and transposed with ``rotate``, zero past the channels; ``strided`` hands it a view
    with a step of 2 along the last axis."""
    from fastconv.algorithms import winograd

    shape = (K, C, taps, 2 * taps) if strided else (K, C, taps, taps)
    w = (rng.standard_normal(shape) * 3).astype(dtype)
    if strided:
        w = w[..., ::2]
    U = transform(w, CP, rotate)
    f = w[:, :, ::-1, ::-1].astype(np.float64) if rotate else w.astype(np.float64)
    NI, NJ = (K, C) if rotate else (C, K)
    G = np.array(winograd.transforms(7 - taps, taps, winograd.POINTS)[1], float)  # F(7-r, r)
    want = np.einsum("xr,kcrs,ys->xykc", G, f, G).reshape(36, K, C)
    want = want if rotate else want.transpose(0, 2, 1)  # (36, NI, NJ)
    assert U.shape == (36, CP, -(-NJ // 32) * 32) and U.dtype == np.float32
    got = U[:, :NI, :NJ].astype(np.float64)
    assert (np.abs(got - want) <= 2.0**-24 * np.abs(want) + 1e-12 * np.abs(f).max()).all()
    assert not U[:, NI:].any() and not U[:, :, NJ:].any()


def random_problem(rng, N, C, H, W, K, R, S, conv, dtype=np.float64):
    """Random x, w, b and deltas of the right output shape for one configuration."""
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((K, C // conv["groups"], R, S)).astype(dtype)
    b = rng.standard_normal(K).astype(dtype)
    g = fc.conv_geometry(x.shape, w.shape, **conv)
    dy = rng.standard_normal((N, K, g.OH, g.OW)).astype(dtype)
    return x, w, b, dy


def assert_same_on_thread_counts(run, counts=(1, 2)) -> None:
    """``run()`` (an array or a tuple of arrays) gives bit-identical results on each thread
    count in ``counts``; the thread count is restored after."""
    threads = fc.get_num_threads()
    try:
        results = []
        for n in counts:
            fc.set_num_threads(n)
            got = run()
            results.append(got if isinstance(got, tuple) else (got,))
    finally:
        fc.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            np.testing.assert_array_equal(a, b)


def generated_geometry(N, G, Cg, Kg, H, W, R, S, sh, sw, dlh, dlw, pads):
    """The ConvGeometry of hypothesis-drawn sizes (``pads`` = (pt, pb, pl, pr)), or None
    where the padded input is smaller than the dilated filter."""
    pt, pb, pl, pr = pads
    Hp, Wp = H + pt + pb, W + pl + pr
    if Hp < dlh * (R - 1) + 1 or Wp < dlw * (S - 1) + 1:
        return None
    OH, OW = (Hp - dlh * (R - 1) - 1) // sh + 1, (Wp - dlw * (S - 1) - 1) // sw + 1
    return ConvGeometry(N, G * Cg, H, W, G * Kg, R, S, G, sh, sw, dlh, dlw, pt, pb, pl, pr,
                        OH, OW)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@contextlib.contextmanager
def winograd_enabled(flag: bool):
    """Run the block with the Winograd kernels on or off, then restore the setting."""
    was = fc.get_winograd()
    fc.set_winograd(flag)
    try:
        yield
    finally:
        fc.set_winograd(was)


@pytest.fixture
def direct_only():
    """Run the test with Winograd disabled (for tests of a direct kernel's path)."""
    with winograd_enabled(False):
        yield


@pytest.fixture
def parallel_paths(monkeypatch):
    """Run the test without the rules of speed that pass the parallel algorithms over on
    small shapes (the serial kernels below config.SMALL_WORK and DEPTHWISE_SMALL_WORK, the
    direct dW below config.WINOGRAD_DW_MIN_TILES), for tests of their layouts on small
    shapes; plans made before and during it are forgotten, since they remember their
    choices."""
    from fastconv import config, plan

    monkeypatch.setattr(config, "SMALL_WORK", 0)
    monkeypatch.setattr(config, "DEPTHWISE_SMALL_WORK", 0)
    monkeypatch.setattr(config, "WINOGRAD_DW_MIN_TILES", 0)
    plan.clear_plan_cache()
    yield
    plan.clear_plan_cache()


# ---- real Fashion-MNIST: a briefly trained checkpoint and the test set -----------------

REAL_DATA = Path(os.environ.get("FASTCONV_DATA", "../shared/data"))


#: What the real-data fixtures built, kept for the rest of the test run (made once each).
_REAL = {}


def _needs_fashion_mnist() -> Path:
    folder = REAL_DATA / "fashion-mnist"
    if not folder.is_dir():
        pytest.skip("needs the real Fashion-MNIST in $FASTCONV_DATA")
    return folder


@pytest.fixture
def fashion_ck(tmp_path_factory):
    """A checkpoint of the two-conv network after one epoch on the first 6,000 real
    Fashion-MNIST training images ($FASTCONV_DATA), trained once per test run; skips the
    test without them."""
    from fastconv import train

    _needs_fashion_mnist()
    if "ck" not in _REAL:
        path = tmp_path_factory.mktemp("ck") / "fashion.npz"
        train.train(train.TrainConfig(dataset="fashion-mnist", limit=6000),
                    data_dir=REAL_DATA, download=False, save=path, quiet=True,
                    log=lambda *a: None)
        _REAL["ck"] = path
    return _REAL["ck"]


@pytest.fixture
def fashion_test():
    """The real Fashion-MNIST test images (10000, 28, 28) and labels (10000,), uint8, read
    once per test run."""
    from fastconv import data

    folder = _needs_fashion_mnist()
    if "test" not in _REAL:
        _REAL["test"] = (data.read_idx(folder / "t10k-images-idx3-ubyte.gz"),
                         data.read_idx(folder / "t10k-labels-idx1-ubyte.gz"))
    return _REAL["test"]
