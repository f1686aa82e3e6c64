"""The window-lane grouped dW (``grouped-dw-windows``, groups of 8 input channels), forced
through plans: against the reference over a grid and hypothesis-generated shapes, against
PyTorch and finite differences, with non-finite values, and the same to the bit for any
thread count."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastconv as fc
from fastconv import reference as ref
from fastconv.algorithms import grouped_dw_windows

from conftest import (
    assert_same_on_thread_counts,
    check_non_finite_reach,
    check_plan_against_torch,
    check_plan_by_differences,
    generated_geometry,
    random_problem,
)

WINDOWS = "grouped-dw-windows"
FORCED = {"grad_weight": WINDOWS}


def _check(x, dy, w_shape, plan, dtype):
    geo = plan.geometry
    want = ref.conv2d_grad_weight(x.astype(np.float64), dy.astype(np.float64), w_shape,
                                  stride=(geo.sh, geo.sw), pads=geo.pads,
                                  dilation=(geo.dlh, geo.dlw), groups=geo.G)
    got = plan.grad_weight(x, dy)
    assert got.dtype == dtype and got.shape == want.shape
    tol = 1e-10 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, np.abs(want).max()))


def _grid():
    shapes = [  # (N, G, Kg, H, W, R, S)
        (2, 2, 8, 6, 7, 3, 3),      # ResNeXt's groups of 8 and 8, short rows
        (1, 3, 5, 9, 20, 3, 4),     # Kg = 5: a last block of one channel; 4 taps wide
        (3, 2, 12, 5, 33, 5, 3),    # five filter rows: a last block of two rows
        (1, 2, 1, 4, 4, 1, 3),      # one output channel, one filter row
    ]
    for shape, stride, padding, dilation in itertools.product(
            shapes, [1, 2, (2, 3)], [0, 1, "same"], [1, (2, 1)]):
        N, G, Kg, H, W, R, S = shape
        conv = dict(stride=stride, padding=padding, dilation=dilation, groups=G)
        try:
            fc.conv_geometry((N, 8 * G, H, W), (G * Kg, 8, R, S), **conv)
        except ValueError:
            continue
        yield pytest.param(shape, conv, id=f"{shape}-s{stride}-p{padding}-d{dilation}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, conv", list(_grid()))
def test_window_lane_dw_matches_the_reference(shape, conv, dtype, rng):
    N, G, Kg, H, W, R, S = shape
    x, _, _, dy = random_problem(rng, N, 8 * G, H, W, G * Kg, R, S, conv, dtype)
    plan = fc.conv2d_plan(x.shape, (G * Kg, 8, R, S), **conv, dtype=dtype, algorithm=FORCED)
    _check(x, dy, (G * Kg, 8, R, S), plan, dtype)


@given(N=st.integers(1, 3), G=st.integers(2, 4), Kg=st.integers(1, 12),
       H=st.integers(1, 9), W=st.integers(1, 30), R=st.integers(1, 4), S=st.integers(3, 4),
       sh=st.integers(1, 3), sw=st.integers(1, 3), dlh=st.integers(1, 2),
       pads=st.tuples(*[st.integers(0, 3)] * 4), f64=st.booleans())
def test_window_lane_dw_matches_the_reference_on_generated_shapes(N, G, Kg, H, W, R, S, sh,
                                                                  sw, dlh, pads, f64):
    geo = generated_geometry(N, G, 8, Kg, H, W, R, S, sh, sw, dlh, 1, pads)
    if geo is None:
        return
    dtype = np.float64 if f64 else np.float32
    assert grouped_dw_windows.why_not(geo, dtype, "grad_weight") is None
    rng = np.random.default_rng(N * 1000 + G * 10 + Kg)
    x = rng.standard_normal((N, G * 8, H, W)).astype(dtype)
    dy = rng.standard_normal((N, G * Kg, geo.OH, geo.OW)).astype(dtype)
    _check(x, dy, (G * Kg, 8, R, S), fc.ConvPlan(geo, dtype, FORCED), dtype)


def test_window_lane_dw_matches_torch_and_finite_differences(rng):
    for N, H, G, stride in [(4, 14, 32, 1), (2, 15, 4, 2)]:
        plan = fc.conv2d_plan((N, 8 * G, H, H), (8 * G, 8, 3, 3), stride, 1, groups=G,
                              algorithm=FORCED)
        check_plan_against_torch(plan, rng, atol=2e-4)
    conv = dict(stride=(1, 2), padding=1, dilation=(2, 1), groups=2)
    x, w, b, dy = random_problem(rng, 1, 16, 5, 11, 6, 3, 3, conv)
    plan = fc.conv2d_plan(x.shape, w.shape, **conv, dtype=np.float64, algorithm=FORCED)
    check_plan_by_differences(plan, x, w, b, dy, passes=("grad_weight",))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("W", [7, 20])
def test_a_non_finite_value_reaches_exactly_the_dw_taps_it_touches(bad, W, rng):
    """Among them the last pixel of a row, whose column the dropped fourth tap of the
    previous windows reads, and a pixel in the row after the tile's last."""
    N, C, H, G, K = 2, 16, 6, 2, 10
    conv = dict(stride=1, padding=1, dilation=1, groups=G)
    x, w, _, dy = random_problem(rng, N, C, H, W, K, 3, 3, conv)
    x = np.abs(x) + 0.5  # positive data: an inf stays inf, no inf - inf
    w, dy = np.abs(w) + 0.5, np.abs(dy) + 0.5
    plan = fc.conv2d_plan(x.shape, w.shape, **conv, dtype=np.float64, algorithm=FORCED)
    check_non_finite_reach(plan, x, w, dy, bad,
                           [(1, 12, h, v) for h, v in [(4, 0), (3, W - 1), (0, W - 2)]],
                           (0, K - 1, 1, dy.shape[3] - 1))


def test_window_lane_dw_does_not_depend_on_the_thread_count(rng):
    conv = dict(stride=1, padding=1, dilation=1, groups=4)
    x, _, _, dy = random_problem(rng, 40, 32, 9, 13, 32, 3, 3, conv, np.float32)
    plan = fc.conv2d_plan(x.shape, (32, 8, 3, 3), padding=1, groups=4, algorithm=FORCED)
    assert_same_on_thread_counts(lambda: plan.grad_weight(x, dy))


def test_groups_of_8_run_their_dw_on_it():
    for w_shape, groups, dw in [((256, 8, 3, 3), 32, WINDOWS), ((64, 8, 3, 3), 8, WINDOWS),
                                ((128, 4, 3, 3), 32, "grouped"),
                                ((256, 8, 1, 1), 32, "grouped")]:
        plan = fc.conv2d_plan((16, w_shape[1] * groups, 14, 14), w_shape, padding=1,
                              groups=groups)
        assert plan.algorithms["grad_weight"] == dw, w_shape
    for w_shape, conv, why in [((16, 4, 3, 3), dict(groups=4),
                                "8 input channels per group; got 4"),
                               ((16, 8, 3, 5), dict(groups=2),
                                "3 or 4 taps wide, two vectors a filter row; got 5"),
                               ((16, 8, 3, 3), dict(groups=2, dilation=(1, 2)),
                                "dilation 1 along the width; got 2"),
                               ((16, 16, 3, 3), {}, "groups > 1")]:
        with pytest.raises(ValueError, match=why):
            fc.conv2d_plan((2, 16, 12, 12), w_shape, **conv, algorithm=FORCED)
    with pytest.raises(ValueError, match="no forward pass"):
        fc.conv2d_plan((2, 16, 9, 9), (16, 8, 3, 3), groups=2,
                       algorithm={"forward": WINDOWS})
