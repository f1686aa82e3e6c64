"""Dilated layers on their stacked dilation phases (``space-to-batch``), forced through
plans: against the reference over a grid and hypothesis-generated shapes, against PyTorch
and finite differences, with non-finite values (Winograd's hand-over included), and the
choices and refusals of the plan."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastconv as fc
from fastconv import config
from fastconv import reference as ref
from fastconv.algorithms import space_to_batch as SB

from conftest import (
    check_non_finite_reach,
    check_plan_against_torch,
    check_plan_by_differences,
    generated_geometry,
    random_problem,
)

S2B = "space-to-batch"


def _check(plan, x, w, b, dy):
    g = plan.geometry
    n = dict(stride=(1, 1), pads=g.pads, dilation=(g.dlh, g.dlw), groups=g.G)
    x64, w64, dy64 = (a.astype(np.float64) for a in (x, w, dy))
    tol = 1e-10 if x.dtype == np.float64 else 5e-5
    for got, want in [(plan.forward(x, w, b), ref.conv2d_forward(x64, w64, b, **n)),
                      (plan.grad_input(dy, w), ref.conv2d_grad_input(dy64, w64, x.shape, **n)),
                      (plan.grad_weight(x, dy), ref.conv2d_grad_weight(x64, dy64, w.shape, **n))]:
        assert got.dtype == x.dtype and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, np.abs(want).max()))


def _grid():
    shapes = [  # (N, C, H, W, K, G, R, S)
        (2, 16, 8, 12, 16, 1, 3, 3),
        (1, 32, 12, 12, 16, 2, 3, 3),    # groups
        (2, 16, 6, 9, 8, 1, 3, 2),       # a 3 x 2 filter
        (1, 16, 12, 12, 32, 1, 5, 5),    # 5 x 5: Winograd F(2x2, 5x5) on the phases
    ]
    for shape, dilation, padding in itertools.product(
            shapes, [2, (2, 1), (1, 3), 3], [0, "same", (2, 0), (3, 6)]):
        N, C, H, W, K, G, R, S = shape
        conv = dict(padding=padding, dilation=dilation, groups=G)
        try:
            geo = fc.conv_geometry((N, C, H, W), (K, C // G, R, S), **conv)
        except ValueError:
            continue
        if SB.why_not(geo, np.float32, "forward") is None:
            yield pytest.param(shape, conv, id=f"{shape}-d{dilation}-p{padding}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, conv", list(_grid()))
def test_space_to_batch_matches_the_reference(shape, conv, dtype, rng):
    N, C, H, W, K, G, R, S = shape
    x, w, b, dy = random_problem(rng, N, C, H, W, K, R, S, conv, dtype)
    plan = fc.conv2d_plan(x.shape, w.shape, **conv, dtype=dtype, algorithm=S2B)
    _check(plan, x, w, b, dy)


@given(N=st.integers(1, 2), G=st.integers(1, 2), Cg=st.sampled_from([1, 16]),
       Kg=st.integers(1, 9), Hs=st.integers(1, 7), Ws=st.integers(1, 7), R=st.integers(1, 4),
       S=st.integers(1, 4), dlh=st.integers(1, 3), dlw=st.integers(2, 3),
       pads=st.tuples(*[st.integers(0, 2)] * 4), f64=st.booleans())
def test_space_to_batch_matches_the_reference_on_generated_shapes(N, G, Cg, Kg, Hs, Ws, R, S,
                                                                  dlh, dlw, pads, f64):
    pt, pb, pl, pr = pads
    geo = generated_geometry(N, G, Cg, Kg, Hs * dlh, Ws * dlw, R, S, 1, 1, dlh, dlw,
                             (pt * dlh, pb * dlh, pl * dlw, pr * dlw))
    if geo is None:
        return
    dtype = np.float64 if f64 else np.float32
    assert SB.why_not(geo, dtype, "forward") is None
    rng = np.random.default_rng(N * 1000 + Hs * 10 + Ws)
    x = rng.standard_normal((N, G * Cg, geo.H, geo.W)).astype(dtype)
    w = rng.standard_normal((G * Kg, Cg, R, S)).astype(dtype)
    dy = rng.standard_normal((N, G * Kg, geo.OH, geo.OW)).astype(dtype)
    _check(fc.ConvPlan(geo, dtype, S2B), x, w, None, dy)


def test_space_to_batch_matches_torch_and_finite_differences(rng):
    plan = fc.conv2d_plan((2, 32, 28, 28), (32, 32, 3, 3), padding=2, dilation=2,
                          algorithm=S2B)
    check_plan_against_torch(plan, rng, atol=5e-4)
    conv = dict(padding=(2, 3), dilation=(2, 3), groups=1)
    x, w, b, dy = random_problem(rng, 1, 2, 4, 6, 3, 3, 2, conv)
    plan = fc.conv2d_plan(x.shape, w.shape, **conv, dtype=np.float64, algorithm=S2B)
    check_plan_by_differences(plan, x, w, b, dy)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_value_reaches_exactly_the_results_it_touches(bad, rng):
    conv = dict(padding=2, dilation=2, groups=1)
    x, w, _, dy = random_problem(rng, 2, 16, 8, 10, 8, 3, 3, conv)
    x, w, dy = np.abs(x) + 0.5, np.abs(w) + 0.5, np.abs(dy) + 0.5
    plan = fc.conv2d_plan(x.shape, w.shape, **conv, dtype=np.float64, algorithm=S2B)
    check_non_finite_reach(plan, x, w, dy, bad,
                           [(1, 3, h, v) for h, v in [(0, 0), (7, 9), (4, 5)]],
                           (0, 7, 1, dy.shape[3] - 1))


def test_winograd_on_the_phases_hands_a_non_finite_result_over(rng):
    """On float32 the phases run on Winograd, which hands a result with an inf or NaN to
    the plan's next algorithm: the non-finite outputs are exactly the reference's."""
    conv = dict(padding=2, dilation=2, groups=1)
    x, w, b, dy = random_problem(rng, 4, 32, 28, 28, 32, 3, 3, conv, np.float32)
    plan = fc.conv2d_plan(x.shape, w.shape, **conv)
    assert plan.algorithms["forward"] == S2B
    assert SB._inner(plan.geometry, "<f4", "forward").NAME == "winograd-f4x4-3x3"
    n = dict(pads=plan.geometry.pads, dilation=(2, 2))
    want = ref.conv2d_forward(x.astype(np.float64), w.astype(np.float64), b, **n)
    bad = np.zeros(x.shape)
    bad[1, 3, 10, 17] = 1
    x[1, 3, 10, 17] = np.inf
    touched = ref.conv2d_forward(bad, np.ones(w.shape), **n) > 0  # the outputs it reaches
    got = plan.forward(x, w, b)
    np.testing.assert_array_equal(~np.isfinite(got), touched)
    np.testing.assert_allclose(got[~touched], want[~touched], rtol=5e-5,
                               atol=5e-5 * np.abs(want).max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("dl", [(1, 2), (2, 2), (3, 1), (2, 4)])
def test_the_phase_layout_round_trips(dl, dtype, rng):
    geo = fc.conv_geometry((3, 5, 12, 16), (2, 5, 1, 1), dilation=dl)
    x = rng.standard_normal((3, 5, 12, 16)).astype(dtype)
    xs = SB._to_batch(x, geo)
    a, b = 1, dl[1] - 1  # one phase, checked against slicing
    np.testing.assert_array_equal(xs.reshape(3, dl[0], dl[1], 5, 12 // dl[0], 16 // dl[1])
                                  [:, a % dl[0], b], x[:, :, a % dl[0]::dl[0], b::dl[1]])
    np.testing.assert_array_equal(SB._from_batch(xs, geo), x)


def test_dilated_layers_are_planned_on_it_where_winograd_runs_the_phases():
    plan = fc.conv2d_plan((8, 128, 28, 28), (128, 128, 3, 3), padding=2, dilation=2)
    assert set(plan.algorithms.values()) == {S2B}
    # fewer input channels: the phases' Winograd dW is slower than the direct dW
    few = fc.conv2d_plan((16, 64, 28, 28), (64, 64, 3, 3), padding=2, dilation=2)
    assert few.algorithms["forward"] == few.algorithms["grad_input"] == S2B
    assert few.algorithms["grad_weight"] != S2B
    assert 64 < config.SPACE_TO_BATCH_DW_MIN_C <= 128
    # float64: no Winograd on the phases
    assert S2B not in fc.conv2d_plan((16, 64, 28, 28), (64, 64, 3, 3), padding=2, dilation=2,
                                     dtype=np.float64).algorithms.values()
    # a dW whose input and deltas outgrow the budget stays on the direct kernels
    big = fc.conv2d_plan((8, 128, 56, 56), (128, 128, 3, 3), padding=4, dilation=4)
    assert big.algorithms["forward"] == S2B and big.algorithms["grad_weight"] != S2B
    assert 2 * 8 * 128 * 56 * 56 * 4 > config.SPACE_TO_BATCH_DW_MAX_BYTES
    for shape, conv, why in [((2, 16, 12, 12), dict(padding=1), "dilation > 1"),
                             ((2, 16, 12, 12), dict(stride=2, dilation=2), "stride 1"),
                             ((2, 16, 11, 12), dict(dilation=2), "got 11x12"),
                             ((2, 16, 12, 12), dict(padding=1, dilation=2),
                              r"pads in multiples of the dilation \(2, 2\)")]:
        with pytest.raises(ValueError, match=why):
            fc.conv2d_plan(shape, (8, 16, 3, 3), **conv, algorithm=S2B)
