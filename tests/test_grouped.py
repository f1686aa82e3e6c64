"""The grouped algorithm (groups > 1, few channels per group), forced through plans: against
the reference over a grid and hypothesis-generated shapes, against PyTorch, against finite
differences, on an empty batch, with non-finite values, on strided arrays, and the same to
the bit for any thread count."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastconv as fc
from fastconv import algorithms
from fastconv import reference as ref
from fastconv.algorithms import grouped
from fastconv.plan import ConvPlan

from conftest import (
    assert_same_on_thread_counts,
    check_non_finite_reach,
    check_plan_against_torch,
    check_plan_by_differences,
    generated_geometry,
    random_problem,
    reference_passes,
)

GR = "grouped"
TILE = "direct-channel-tile"


def _forced(geo, dtype) -> dict:
    """The passes the grouped algorithm runs for ``geo``, each forced onto it."""
    return {p: GR for p in algorithms.PASSES if grouped.why_not(geo, dtype, p) is None}


def _check(N, C, H, W, K, G, R, S, conv, dtype, rng):
    conv = dict(dict(stride=1, padding=0, dilation=1), **conv, groups=G)
    x, w, b, dy = random_problem(rng, N, C, H, W, K, R, S, conv, dtype)
    want = reference_passes(*(a.astype(np.float64) for a in (x, w, b, dy)), conv)
    geo = fc.conv_geometry(x.shape, w.shape, **conv)
    forced = _forced(geo, dtype)
    assert {"forward", "grad_weight"} <= set(forced)
    assert ("grad_input" in forced) == all(grouped._rows_ok(p.geo)
                                           for p in grouped._dx_plan(geo))
    plan = fc.conv2d_plan(x.shape, w.shape, **conv, dtype=dtype, algorithm=forced)
    tol = 1e-10 if dtype == np.float64 else 2e-5
    got = (plan.forward(x, w, b), plan.grad_input(dy, w), plan.grad_weight(x, dy))
    for name, a, ref_ in zip(("y", "dx", "dw"), got, want, strict=True):
        assert a.dtype == dtype and a.shape == ref_.shape, name
        scale = max(1.0, float(np.abs(ref_).max()))
        np.testing.assert_allclose(a, ref_, rtol=tol, atol=tol * scale, err_msg=name)


def _grid():
    shapes = [  # (N, C, H, W, K, G, R, S): channels per group off the tile's 4; rows of 16
        # pixels or more, and shorter ones (joined into wide rows at stride 1)
        (2, 8, 6, 18, 8, 2, 3, 3),     # Cg = Kg = 4
        (2, 16, 7, 7, 16, 4, 3, 3),    # 7x7: wide rows
        (1, 12, 9, 13, 20, 4, 3, 2),
        (1, 12, 5, 20, 18, 6, 3, 3),   # Cg = 2, Kg = 3: a part block
        (2, 16, 4, 33, 32, 4, 3, 2),   # Kg = 8: two blocks; 33 columns: a shifted vector
        (2, 9, 7, 17, 6, 3, 1, 5),
        (1, 64, 5, 16, 64, 16, 3, 3),  # ResNeXt-like, 16 groups of 4
        (3, 6, 5, 24, 30, 2, 5, 5),    # Kg = 15
    ]
    for shape, stride, padding, dilation in itertools.product(
            shapes, [1, 2, (1, 3)], [0, 1, (2, 0), "same"], [1, 2]):
        N, C, H, W, K, G, R, S = shape
        conv = dict(stride=stride, padding=padding, dilation=dilation)
        if padding == "same" and stride != 1:
            continue
        if stride != 1 and W > 16:  # rows of a vector or more, and wide rows
            W = W * (stride if isinstance(stride, int) else stride[1]) + 4
        try:
            geo = fc.conv_geometry((N, C, H, W), (K, C // G, R, S), **conv, groups=G)
        except ValueError:
            continue
        if not grouped._rows_ok(geo):
            continue
        yield pytest.param((N, C, H, W, K, G, R, S), conv,
                           id=f"{(N, C, H, W, K, G, R, S)}-s{stride}-p{padding}-d{dilation}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, conv", list(_grid()))
def test_grouped_matches_the_reference(shape, conv, dtype, rng):
    _check(*shape, conv, dtype, rng)


@pytest.mark.parametrize("shape, conv", [
    p for p in _grid() if p.values[1]["stride"] != 1])
def test_strided_dx_phase_by_phase_matches_the_reference(shape, conv, monkeypatch, rng):
    """A strided dX runs its phases in one pass while a group's padded deltas fit
    config.GROUPED_DX_FUSED_BYTES, else one by one: the second path, forced."""
    monkeypatch.setattr(fc.config, "GROUPED_DX_FUSED_BYTES", 0)
    _check(*shape, conv, np.float64, rng)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, conv", [
    ((2, 3, 40, 36, 16, 7, 7), dict(stride=2, padding=3)),  # a stem
    ((2, 3, 12, 20, 32, 3, 3), dict(padding=1)),  # an image network's input layer
    ((1, 4, 9, 35, 5, 3, 2), dict(stride=(1, 3), padding=(0, 1), dilation=2)),
])
def test_dx_of_few_input_channels_in_one_group_matches_the_reference(shape, conv, dtype,
                                                                      rng):
    N, C, H, W, K, R, S = shape
    conv = dict(dict(stride=1, padding=0, dilation=1), **conv, groups=1)
    x, w, b, dy = random_problem(rng, N, C, H, W, K, R, S, conv, dtype)
    want = reference_passes(*(a.astype(np.float64) for a in (x, w, b, dy)), conv)[1]
    plan = fc.conv2d_plan(x.shape, w.shape, **conv, dtype=dtype,
                          algorithm={"grad_input": GR})
    tol = 1e-10 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(plan.grad_input(dy, w), want, rtol=tol,
                               atol=tol * max(1.0, float(np.abs(want).max())))


@given(N=st.integers(1, 3), G=st.integers(2, 5), Cg=st.integers(1, 6), Kg=st.integers(1, 9),
       H=st.integers(1, 9), W=st.integers(1, 40), R=st.integers(1, 4), S=st.integers(1, 4),
       sh=st.integers(1, 2), sw=st.integers(1, 2), dlh=st.integers(1, 2),
       dlw=st.integers(1, 2), pads=st.tuples(*[st.integers(0, 3)] * 4), f64=st.booleans())
def test_grouped_matches_the_reference_on_generated_shapes(N, G, Cg, Kg, H, W, R, S, sh, sw,
                                                           dlh, dlw, pads, f64):
    geo = generated_geometry(N, G, Cg, Kg, H, W, R, S, sh, sw, dlh, dlw, pads)
    if geo is None:
        return
    dtype = np.float64 if f64 else np.float32
    forced = _forced(geo, dtype)
    if not forced:
        return
    rng = np.random.default_rng(N * 1000 + G * 10 + Cg)
    x = rng.standard_normal((N, G * Cg, H, W)).astype(dtype)
    w = rng.standard_normal((G * Kg, Cg, R, S)).astype(dtype)
    b = rng.standard_normal(G * Kg).astype(dtype)
    dy = rng.standard_normal((N, G * Kg, geo.OH, geo.OW)).astype(dtype)
    n = dict(stride=(sh, sw), pads=pads, dilation=(dlh, dlw), groups=G)
    x64, w64, dy64 = (a.astype(np.float64) for a in (x, w, dy))
    want = {"forward": lambda: ref.conv2d_forward(x64, w64, b.astype(np.float64), **n),
            "grad_input": lambda: ref.conv2d_grad_input(dy64, w64, x.shape, **n),
            "grad_weight": lambda: ref.conv2d_grad_weight(x64, dy64, w.shape, **n)}
    plan = ConvPlan(geo, dtype, forced)
    got = {"forward": lambda: plan.forward(x, w, b), "grad_input": lambda: plan.grad_input(dy, w),
           "grad_weight": lambda: plan.grad_weight(x, dy)}
    tol = 1e-10 if f64 else 2e-5
    for p in forced:
        ref_ = want[p]()
        scale = max(1.0, float(np.abs(ref_).max()))
        np.testing.assert_allclose(got[p](), ref_, rtol=tol, atol=tol * scale, err_msg=p)


def test_grouped_matches_torch(rng):
    for N, C, H, K, G, R, stride, padding in [(4, 64, 28, 64, 16, 3, 1, 1),
                                               (2, 32, 20, 48, 8, 5, 1, 2),
                                               (2, 24, 40, 24, 3, 3, 2, 1)]:
        geo = fc.conv_geometry((N, C, H, H), (K, C // G, R, R), stride, padding, groups=G)
        check_plan_against_torch(fc.conv2d_plan((N, C, H, H), (K, C // G, R, R), stride,
                                                padding, groups=G,
                                                algorithm=_forced(geo, np.float32)),
                                 rng, atol=2e-4)


def test_grouped_gradients_match_finite_differences(rng):
    N, C, H, K, G, R, S = 1, 6, 4, 9, 3, 3, 3
    for W, conv in [(18, dict(stride=1, padding=(1, 2), dilation=(1, 2))),
                    (34, dict(stride=(1, 2), padding=1, dilation=1))]:
        x, w, b, dy = random_problem(rng, N, C, H, W, K, R, S, dict(conv, groups=G))
        geo = fc.conv_geometry(x.shape, w.shape, **conv, groups=G)
        forced = _forced(geo, np.float64)
        assert set(forced) == set(algorithms.PASSES)
        plan = fc.conv2d_plan(x.shape, w.shape, **conv, groups=G, dtype=np.float64,
                              algorithm=forced)
        check_plan_by_differences(plan, x, w, b, dy)


def test_grouped_empty_batch():
    plan = fc.conv2d_plan((0, 8, 9, 20), (8, 2, 3, 3), padding=1, groups=4, algorithm=GR)
    x, w = np.zeros((0, 8, 9, 20), np.float32), np.ones((8, 2, 3, 3), np.float32)
    y = plan.forward(x, w)
    assert y.shape == (0, 8, 9, 20)
    assert plan.grad_input(y, w).shape == (0, 8, 9, 20)
    dw = plan.grad_weight(x, y)
    assert dw.shape == (8, 2, 3, 3) and not dw.any()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("conv", [dict(padding=1), dict(stride=2, padding=1),
                                  dict(padding=(0, 2), dilation=2)])
@pytest.mark.parametrize("H, W", [(7, 37), (9, 11)])  # rows of a vector or more; wide rows
def test_a_non_finite_value_reaches_exactly_the_outputs_it_touches(bad, conv, H, W, rng):
    N, C, K, G, R, S = 2, 12, 18, 3, 3, 3
    conv = dict(dict(stride=1, padding=0, dilation=1), **conv, groups=G)
    x, w, _, dy = random_problem(rng, N, C, H, W, K, R, S, conv)
    x = np.abs(x) + 0.5  # positive data: an inf stays inf, no inf - inf
    w, dy = np.abs(w) + 0.5, np.abs(dy) + 0.5
    geo = fc.conv_geometry(x.shape, w.shape, **conv)
    forced = _forced(geo, np.float64)
    assert set(forced) == set(algorithms.PASSES)
    plan = fc.conv2d_plan(x.shape, w.shape, **conv, dtype=np.float64, algorithm=forced)
    # Input pixels at a row's ends and in the columns a row's last, shifted vector repeats.
    check_non_finite_reach(plan, x, w, dy, bad,
                           [(1, 5, h, v) for h, v in [(4, 0), (3, W - 1), (0, W - 6),
                                                      (H - 1, W - 2)]],
                           (0, 7, 1, dy.shape[3] - 3))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_weight_in_dx_reaches_only_the_inputs_its_tap_touches(bad, rng):
    """dX with an inf or NaN weight hands over to the channel tile's exact path (the zero
    border of the deltas times inf would be NaN): the same result as a forced tile."""
    conv = dict(stride=1, padding=1, dilation=1, groups=4)
    x, w, _, dy = random_problem(rng, 2, 8, 6, 20, 12, 3, 3, conv)
    w[7, 1, 0, 2] = bad
    plan = fc.conv2d_plan(x.shape, w.shape, padding=1, groups=4, dtype=np.float64,
                          algorithm=GR)
    tile = fc.conv2d_plan(x.shape, w.shape, padding=1, groups=4, dtype=np.float64,
                          algorithm=TILE)
    got, want = plan.grad_input(dy, w), tile.grad_input(dy, w)
    assert not np.isfinite(got).all()
    np.testing.assert_array_equal(got, want)
    assert np.isfinite(np.delete(got, 5, axis=1)).all()  # only channel 2*2 + 1: group 7 // 3


def test_grouped_reads_strided_arrays(rng):
    conv = dict(stride=1, padding=1, dilation=1, groups=5)
    x, w, b, dy = random_problem(rng, 3, 20, 6, 24, 10, 3, 3, conv, np.float32)
    plan = fc.conv2d_plan(x.shape, w.shape, padding=1, groups=5, algorithm=GR)
    passes = lambda x_, w_, b_, dy_: (plan.forward(x_, w_, b_), plan.grad_input(dy_, w_),  # noqa: E731
                                      plan.grad_weight(x_, dy_))
    want = passes(x, w, b, dy)
    xs = np.zeros((3, 20, 6, 48), np.float32)[..., ::2]
    xs[...] = x
    dys = np.zeros((3, 10, 6, 24, 2), np.float32)[..., 0]
    dys[...] = dy
    for got, ref_ in zip(passes(xs, np.asfortranarray(w), b[::-1].copy()[::-1], dys), want,
                         strict=True):
        np.testing.assert_array_equal(got, ref_)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("N", [1, 40])  # dW: one batch chunk, and several
def test_grouped_results_do_not_depend_on_the_thread_count(N, dtype, rng):
    conv = dict(stride=1, padding=1, dilation=1, groups=8)
    x, w, b, dy = random_problem(rng, N, 32, 16, 16, 32, 3, 3, conv, dtype)
    plan = fc.conv2d_plan(x.shape, w.shape, padding=1, groups=8, dtype=dtype, algorithm=GR)
    assert_same_on_thread_counts(lambda: (plan.forward(x, w, b), plan.grad_input(dy, w),
                                          plan.grad_weight(x, dy)))


def test_grouped_layers_are_planned_on_it():
    for x_shape, w_shape, groups in [((16, 128, 28, 28), (128, 16, 3, 3), 8),
                                     ((16, 128, 28, 28), (128, 4, 3, 3), 32)]:
        plan = fc.conv2d_plan(x_shape, w_shape, padding=1, groups=groups)
        assert plan.algorithms["forward"] == plan.algorithms["grad_input"] == GR
        # dW: on the channel-lane kernel where output channels fill its 16 lanes
        assert plan.algorithms["grad_weight"] == (GR if groups == 32 else "grouped-dw-lanes")
    # groups of 32+ input and output channels fill the channel tile's vectors
    assert fc.conv2d_plan((4, 64, 20, 20), (64, 32, 3, 3), padding=1,
                          groups=2).algorithms["forward"] == TILE
    # rows shorter than a vector are joined, at any stride
    for shape, stride in [((4, 64, 14, 14), 1), ((16, 64, 28, 28), 2), ((4, 64, 56, 56), 2)]:
        assert set(fc.conv2d_plan(shape, (64, 4, 3, 3), stride, 1,
                                  groups=16).algorithms.values()) == {GR}
    with pytest.raises(ValueError, match="groups > 1"):
        fc.conv2d_plan((2, 8, 20, 20), (8, 8, 3, 3), padding=1, algorithm=GR)
    # dX of few input channels, one group (a stem's): its stride phases as grouped layers
    stem = fc.conv2d_plan((2, 3, 224, 224), (64, 3, 7, 7), 2, 3).algorithms
    assert stem["grad_input"] == GR
    with pytest.raises(ValueError, match="at least 16 pixels"):
        fc.conv2d_plan((2, 8, 3, 3), (8, 2, 1, 1), groups=4, algorithm=GR)


@pytest.mark.parametrize("shape, pads, sh, sw, extra", [
    ((2, 3, 7, 9), (1, 2, 3, 0), 2, 3, 1), ((1, 2, 5, 5), (0, 0, 0, 0), 1, 1, 0),
    ((2, 4, 11, 6), (3, 3, 2, 2), 3, 2, 0), ((1, 1, 1, 1), (2, 0, 0, 4), 2, 2, 1),
    ((2, 3, 0, 4), (1, 1, 1, 1), 2, 1, 1),
])
def test_the_phase_grid_is_the_padded_input_split_by_stride_phases(shape, pads, sh, sw, extra,
                                                                    rng):
    from fastconv.layouts import _phase_grid

    a = rng.standard_normal(shape).astype(np.float32)
    N, C, H, W = shape
    pt, pb, pl, pr = pads
    padded = np.zeros((N, C, H + pt + pb, W + pl + pr), np.float32)
    padded[:, :, pt:pt + H, pl:pl + W] = a
    for x in (a, a[:, :, :, ::-1]):  # and strided
        padded[:, :, pt:pt + H, pl:pl + W] = x
        got = _phase_grid(x, pads, sh, sw, extra)
        assert got.shape[4:] == (-(-(H + pt + pb) // sh) + extra, -(-(W + pl + pr) // sw))
        for p, q in np.ndindex(sh, sw):
            plane = padded[:, :, p::sh, q::sw]
            np.testing.assert_array_equal(got[:, :, p, q, :plane.shape[2], :plane.shape[3]],
                                          plane)
            assert not got[:, :, p, q, plane.shape[2]:].any()
            assert not got[:, :, p, q, :, plane.shape[3]:].any()
