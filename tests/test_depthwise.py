"""The depthwise algorithm (groups == C), forced through plans: against the reference over
a grid and hypothesis-generated shapes, against PyTorch, against finite differences, on
an empty batch, with non-finite values, on strided arrays, and the same to the bit for
any thread count."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastconv as fc
from fastconv import algorithms
from fastconv import reference as ref
from fastconv.geometry import ConvGeometry
from fastconv.plan import ConvPlan

from conftest import (
    assert_same_on_thread_counts,
    check_non_finite_reach,
    check_plan_against_torch,
    random_problem,
    reference_passes,
)

DW = "depthwise"


def _plan(x_shape, K, R, S, conv, dtype, algorithm=DW):
    C = x_shape[1]
    return fc.conv2d_plan(x_shape, (K, 1, R, S), **conv, groups=C, dtype=dtype,
                          algorithm=algorithm)


def _passes(plan, x, w, b, dy):
    return plan.forward(x, w, b), plan.grad_input(dy, w), plan.grad_weight(x, dy)


def _check(N, C, H, W, M, R, S, conv, dtype, rng):
    conv = dict(dict(stride=1, padding=0, dilation=1), **conv, groups=C)
    x, w, b, dy = random_problem(rng, N, C, H, W, C * M, R, S, conv, dtype)
    want = reference_passes(*(a.astype(np.float64) for a in (x, w, b, dy)), conv)
    plan = fc.conv2d_plan(x.shape, w.shape, **conv, dtype=dtype, algorithm=DW)
    assert set(plan.algorithms.values()) == {DW}
    tol = 1e-10 if dtype == np.float64 else 2e-5
    for name, got, ref_ in zip(("y", "dx", "dw"), _passes(plan, x, w, b, dy), want,
                               strict=True):
        assert got.dtype == dtype and got.shape == ref_.shape, name
        scale = max(1.0, float(np.abs(ref_).max()))
        np.testing.assert_allclose(got, ref_, rtol=tol, atol=tol * scale, err_msg=name)


def _grid():
    shapes = [  # (N, C, H, W, M, R, S): channel counts off the 16-lane vectors, multipliers
        (2, 3, 7, 9, 1, 3, 3),
        (1, 20, 14, 14, 1, 3, 3),
        (2, 33, 11, 13, 1, 3, 3),
        (2, 5, 12, 10, 2, 5, 5),
        (1, 4, 9, 17, 3, 3, 2),
        (2, 1, 10, 10, 4, 3, 3),  # C = 1: one group, multiplier 4
        (1, 16, 5, 4, 1, 1, 1),
        (1, 2, 23, 37, 1, 7, 7),  # row groups of 5 and 2, three column blocks, 4 row tiles
        (2, 3, 16, 18, 1, 4, 6),  # row groups of 3 and 1
        (2, 3, 14, 32, 1, 3, 3),  # padding 1: dW reads the deltas in place (whole tiles)
    ]
    for shape, stride, padding, dilation in itertools.product(
            shapes, [1, 2, 3, (1, 2)], [0, 1, (2, 0), "same"], [1, 2]):
        N, C, H, W, M, R, S = shape
        conv = dict(stride=stride, padding=padding, dilation=dilation)
        if padding == "same" and stride != 1:
            continue
        try:
            fc.conv_geometry((N, C, H, W), (C * M, 1, R, S), **conv, groups=C)
        except ValueError:
            continue
        yield pytest.param(shape, conv, id=f"{shape}-s{stride}-p{padding}-d{dilation}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, conv", list(_grid()))
def test_depthwise_matches_the_reference(shape, conv, dtype, rng):
    _check(*shape, conv, dtype, rng)


@given(N=st.integers(1, 3), C=st.integers(1, 40), H=st.integers(1, 20),
       W=st.integers(1, 20), M=st.integers(1, 3), R=st.integers(1, 5), S=st.integers(1, 5),
       sh=st.integers(1, 3), sw=st.integers(1, 3), dlh=st.integers(1, 2),
       dlw=st.integers(1, 2), pads=st.tuples(*[st.integers(0, 3)] * 4),
       f64=st.booleans())
def test_depthwise_matches_the_reference_on_generated_shapes(N, C, H, W, M, R, S, sh, sw, dlh,
                                                             dlw, pads, f64):
    pt, pb, pl, pr = pads
    Hp, Wp = H + pt + pb, W + pl + pr
    if Hp < dlh * (R - 1) + 1 or Wp < dlw * (S - 1) + 1:
        return
    rng = np.random.default_rng(N * 1000 + C)
    dtype = np.float64 if f64 else np.float32
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((C * M, 1, R, S)).astype(dtype)
    b = rng.standard_normal(C * M).astype(dtype)
    n = dict(stride=(sh, sw), pads=pads, dilation=(dlh, dlw), groups=C)
    y_ref = ref.conv2d_forward(x.astype(np.float64), w.astype(np.float64),
                               b.astype(np.float64), **n)
    dy = rng.standard_normal(y_ref.shape).astype(dtype)
    dx_ref = ref.conv2d_grad_input(dy.astype(np.float64), w.astype(np.float64), x.shape, **n)
    dw_ref = ref.conv2d_grad_weight(x.astype(np.float64), dy.astype(np.float64), w.shape, **n)
    geo = ConvGeometry(N, C, H, W, C * M, R, S, C, sh, sw, dlh, dlw, pt, pb, pl, pr,
                       *y_ref.shape[2:])
    plan = ConvPlan(geo, dtype, DW)
    tol = 1e-10 if f64 else 2e-5
    for got, want in [(plan.forward(x, w, b), y_ref), (plan.grad_input(dy, w), dx_ref),
                      (plan.grad_weight(x, dy), dw_ref)]:
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale)


def test_depthwise_matches_torch(rng):
    for N, C, H, M, R, stride, padding in [(4, 32, 28, 1, 3, 1, 1), (2, 24, 15, 2, 5, 2, 2),
                                           (1, 70, 14, 1, 3, 2, 1)]:
        check_plan_against_torch(fc.conv2d_plan((N, C, H, H), (C * M, 1, R, R), stride,
                                                padding, groups=C, algorithm=DW), rng)


def test_depthwise_gradients_match_finite_differences(rng):
    N, C, H, W, M, R, S = 2, 3, 6, 7, 2, 3, 3
    conv = dict(stride=2, padding=(1, 2), dilation=(1, 2))
    x, w, b, dy = random_problem(rng, N, C, H, W, C * M, R, S, dict(conv, groups=C))
    plan = fc.conv2d_plan(x.shape, w.shape, **conv, groups=C, dtype=np.float64, algorithm=DW)
    loss = lambda x_, w_: float((plan.forward(x_, w_, b) * dy).sum())  # noqa: E731
    dx, dw = plan.grad_input(dy, w), plan.grad_weight(x, dy)
    eps = 1e-6
    for a, grad, pick in [(x, dx, lambda a_: loss(a_, w)), (w, dw, lambda a_: loss(x, a_))]:
        for idx in [tuple(rng.integers(0, n) for n in a.shape) for _ in range(12)]:
            hi, lo = a.copy(), a.copy()
            hi[idx] += eps
            lo[idx] -= eps
            np.testing.assert_allclose((pick(hi) - pick(lo)) / (2 * eps), grad[idx],
                                       rtol=1e-6, atol=1e-8)


def test_depthwise_empty_batch():
    plan = fc.conv2d_plan((0, 5, 9, 9), (10, 1, 3, 3), padding=1, groups=5, algorithm=DW)
    x, w = np.zeros((0, 5, 9, 9), np.float32), np.ones((10, 1, 3, 3), np.float32)
    y = plan.forward(x, w)
    assert y.shape == (0, 10, 9, 9)
    assert plan.grad_input(y, w).shape == (0, 5, 9, 9)
    dw = plan.grad_weight(x, y)
    assert dw.shape == (10, 1, 3, 3) and not dw.any()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("conv, H, W", [
    (dict(padding=1), 9, 11), (dict(stride=2), 9, 11), (dict(padding=(0, 2)), 9, 11),
    (dict(stride=(1, 3), dilation=2, padding=2), 9, 11),
    (dict(padding=1), 7, 16),  # dW reads the deltas in place
])
def test_a_non_finite_value_reaches_exactly_the_outputs_it_touches(bad, conv, H, W, rng):
    N, C, M, R, S = 2, 17, 2, 3, 3
    conv = dict(dict(stride=1, padding=0, dilation=1), **conv)
    x, w, _, dy = random_problem(rng, N, C, H, W, C * M, R, S, dict(conv, groups=C))
    x = np.abs(x) + 0.5  # positive data: an inf stays inf, no inf - inf
    w, dy = np.abs(w) + 0.5, np.abs(dy) + 0.5
    plan = fc.conv2d_plan(x.shape, w.shape, **conv, groups=C, dtype=np.float64, algorithm=DW)
    # An input pixel at a row end: the wide rows' extra columns read it too; one in the
    # last row: dW's last row tile reads it also for delta rows past OH (zero).
    check_non_finite_reach(plan, x, w, dy, bad, [(1, 6, h, v) for h, v in [(4, 0), (3, W - 1),
                                                                          (0, 5), (H - 1, 2)]],
                           (0, 13, 1, dy.shape[3] - 1))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_weight_in_dx_reaches_only_the_inputs_its_tap_touches(bad, rng):
    """dX with an inf or NaN weight hands over to the channel tile's exact path (the zero
    border of the deltas times inf would be NaN): the same result as a forced tile."""
    C, M = 6, 2
    x, w, _, dy = random_problem(rng, 2, C, 8, 9, C * M, 3, 3,
                                 dict(stride=2, padding=1, dilation=1, groups=C))
    w[7, 0, 0, 2] = bad
    plan = fc.conv2d_plan(x.shape, w.shape, 2, 1, groups=C, dtype=np.float64, algorithm=DW)
    tile = fc.conv2d_plan(x.shape, w.shape, 2, 1, groups=C, dtype=np.float64,
                          algorithm="direct-channel-tile")
    got, want = plan.grad_input(dy, w), tile.grad_input(dy, w)
    assert not np.isfinite(got).all()
    np.testing.assert_array_equal(got, want)
    assert np.isfinite(np.delete(got, 3, axis=1)).all()  # only channel 7 // M = 3


def test_depthwise_reads_strided_arrays(rng):
    x, w, b, dy = random_problem(rng, 3, 20, 10, 12, 20, 3, 3,
                                 dict(stride=1, padding=1, dilation=1, groups=20), np.float32)
    plan = fc.conv2d_plan(x.shape, w.shape, padding=1, groups=20, algorithm=DW)
    want = _passes(plan, x, w, b, dy)
    xs = np.zeros((3, 20, 10, 24), np.float32)[..., ::2]
    xs[...] = x
    ws = np.asfortranarray(w)
    dys = np.zeros((3, 20, 10, 12, 2), np.float32)[..., 0]
    dys[...] = dy
    for got, ref_ in zip(_passes(plan, xs, ws, b[::-1].copy()[::-1], dys), want, strict=True):
        np.testing.assert_array_equal(got, ref_)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("C, M", [(24, 2), (3, 1)])  # dW: one batch chunk, and 8
def test_depthwise_results_do_not_depend_on_the_thread_count(C, M, dtype, rng):
    x, w, b, dy = random_problem(rng, 9, C, 14, 14, C * M, 3, 3,
                                 dict(stride=1, padding=1, dilation=1, groups=C), dtype)
    plan = fc.conv2d_plan(x.shape, w.shape, padding=1, groups=C, dtype=dtype, algorithm=DW)
    assert_same_on_thread_counts(lambda: _passes(plan, x, w, b, dy))


def test_depthwise_layers_are_planned_on_it():
    geo = fc.conv_geometry((16, 128, 28, 28), (128, 1, 3, 3), padding=1, groups=128)
    for p in algorithms.PASSES:
        assert algorithms.choices(geo, np.float32, p)[0].NAME == DW
    grouped = fc.conv_geometry((2, 32, 9, 9), (32, 2, 3, 3), padding=1, groups=16)
    with pytest.raises(ValueError, match="depthwise"):
        fc.conv2d_plan((2, 32, 9, 9), (32, 2, 3, 3), padding=1, groups=16, algorithm=DW)
    assert algorithms.why_not(algorithms.BY_NAME[DW], grouped, np.float32, "forward")


#: (R, stride): (N, C, H, W, M, (pt, pb, pl, pr)) for the in-place forward kernel.
IN_PLACE_FORWARD = {
    (3, 1): [(2, 5, 14, 14, 1, (1, 1, 1, 1)), (1, 3, 5, 16, 2, (0, 2, 2, 0)),
             (2, 4, 19, 35, 1, (2, 0, 1, 2)), (1, 2, 3, 3, 1, (0, 0, 0, 0))],
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("in_place", [True, False])
@pytest.mark.parametrize("R, stride", list(IN_PLACE_FORWARD))
def test_both_forward_paths_match_the_reference(R, stride, in_place, dtype, rng,
                                                monkeypatch):
    """3x3 stride-1 layers read their planes in place up to a size, through a zero-padded
    copy above it: each path on planes narrower than, as wide as and wider than a vector,
    shorter than a row tile, with padding of 0-2 on either side."""
    from fastconv import config
    from fastconv.algorithms import depthwise

    monkeypatch.setattr(config, "DEPTHWISE_IN_PLACE_BYTES", 1 << 30 if in_place else 0)
    monkeypatch.setattr(config, "DEPTHWISE_IN_PLACE_INPUT_BYTES", 0)
    for N, C, H, W, M, pads in IN_PLACE_FORWARD[R, stride]:
        OH = (H + pads[0] + pads[1] - R) // stride + 1
        OW = (W + pads[2] + pads[3] - R) // stride + 1
        geo = ConvGeometry(N, C, H, W, C * M, R, R, C, stride, stride, 1, 1, *pads, OH, OW)
        plan = ConvPlan(geo, dtype, DW)
        x = rng.standard_normal((N, C, H, W)).astype(dtype)
        w = rng.standard_normal((C * M, 1, R, R)).astype(dtype)
        b = rng.standard_normal(C * M).astype(dtype)
        prepared = depthwise.prepare(geo, w, "forward")
        assert isinstance(prepared, depthwise.InPlaceWeights) == in_place
        want = ref.conv2d_forward(*(a.astype(np.float64) for a in (x, w, b)),
                                  stride=(stride, stride), pads=pads, dilation=(1, 1),
                                  groups=C)
        tol = 1e-10 if dtype == np.float64 else 2e-5
        np.testing.assert_allclose(plan.forward(x, w, b), want, rtol=tol,
                                   atol=tol * max(1.0, float(np.abs(want).max())))

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("in_place", [True, False])
@pytest.mark.parametrize("stride", [1, 2])
def test_both_3x3_dw_paths_match_the_reference(stride, in_place, dtype, rng, monkeypatch):
    """dW of 3x3 layers at stride 1 and 2 reads its planes in place; the copy into
    scratch planes (forced here) is what other layers run: each on planes narrower than,
    as wide as and wider than a vector (of outputs; at stride 2 also of the split input),
    shorter than a row tile and odd-sized, with padding of 0-2 on either side."""
    from fastconv.algorithms import depthwise

    if not in_place:
        monkeypatch.setattr(depthwise, "_dw_in_place", lambda geo: False)
    calls, kernel = [], depthwise.dw_grad_weight_3x3
    monkeypatch.setattr(depthwise, "dw_grad_weight_3x3",
                        lambda *a, k=kernel, c=calls: c.append(1) or k(*a))
    for N, C, H, W, M, pads in [(2, 5, 14, 14, 1, (1, 1, 1, 1)), (1, 3, 5, 16, 2, (0, 2, 2, 0)),
                                (2, 4, 19, 35, 1, (2, 0, 1, 2)), (1, 2, 3, 3, 1, (0, 0, 0, 0)),
                                (3, 2, 9, 17, 3, (1, 1, 1, 1)), (1, 1, 30, 12, 1, (2, 2, 0, 0)),
                                (1, 2, 31, 67, 1, (1, 1, 1, 1)), (2, 1, 1, 1, 1, (1, 1, 1, 1))]:
        OH = (H + pads[0] + pads[1] - 3) // stride + 1
        OW = (W + pads[2] + pads[3] - 3) // stride + 1
        geo = ConvGeometry(N, C, H, W, C * M, 3, 3, C, stride, stride, 1, 1, *pads, OH, OW)
        plan = ConvPlan(geo, dtype, DW)
        x = rng.standard_normal((N, C, H, W)).astype(dtype)
        dy = rng.standard_normal((N, C * M, OH, OW)).astype(dtype)
        want = ref.conv2d_grad_weight(x.astype(np.float64), dy.astype(np.float64),
                                      (C * M, 1, 3, 3), stride=(stride, stride), pads=pads,
                                      dilation=(1, 1), groups=C)
        tol = 1e-10 if dtype == np.float64 else 2e-5
        np.testing.assert_allclose(plan.grad_weight(x, dy), want, rtol=tol,
                                   atol=tol * max(1.0, float(np.abs(want).max())))
    assert bool(calls) == in_place


def test_dw_reads_3x3_planes_in_place_at_stride_1_and_2_of_any_size():
    from fastconv.algorithms import depthwise

    def geo(N, C, H, **conv):
        return fc.conv_geometry((N, C, H, H), (C, 1, 3, 3), groups=C, **conv)

    assert depthwise._dw_in_place(geo(16, 32, 112, padding=1))  # 26 MB: the forward copies
    assert depthwise._dw_in_place(geo(32, 256, 28, padding=1, stride=2))
    assert not depthwise._dw_in_place(geo(2, 8, 28, padding=1, stride=3))
    assert not depthwise._dw_in_place(geo(2, 8, 28, padding=2, dilation=2))
    assert not depthwise._dw_in_place(fc.conv_geometry((2, 8, 28, 28), (8, 1, 5, 5),
                                                       padding=2, groups=8))
    assert not depthwise._dw_in_place(fc.conv_geometry((2, 8, 28, 28), (8, 1, 3, 3),
                                                       stride=(1, 2), padding=1, groups=8))


def test_large_planes_are_read_in_place_while_the_whole_input_is_small():
    from fastconv.algorithms import depthwise

    def geo(N, C, H):
        return fc.conv_geometry((N, C, H, H), (C, 1, 3, 3), padding=1, groups=C)

    # 112 x 112 planes (49 KB): in place at batch 1 (1.6 MB), copied at batch 16 (26 MB).
    assert depthwise._in_place(geo(1, 32, 112), np.float32)
    assert not depthwise._in_place(geo(16, 32, 112), np.float32)
    assert depthwise._in_place(geo(64, 64, 28), np.float32)  # small planes: any batch
    assert not depthwise._in_place(fc.conv_geometry((1, 8, 28, 28), (8, 1, 3, 3), stride=2,
                                                    padding=1, groups=8), np.float32)
