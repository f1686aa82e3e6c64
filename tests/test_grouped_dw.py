"""The channel-lane grouped dW (``grouped-dw-lanes``), forced through plans: against the
reference over a grid and hypothesis-generated shapes, against PyTorch and finite
differences, with non-finite values, and the same to the bit for any thread count."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastconv as fc
from fastconv import algorithms
from fastconv import reference as ref
from fastconv.algorithms import grouped_dw

from conftest import (
    assert_same_on_thread_counts,
    check_non_finite_reach,
    check_plan_against_torch,
    check_plan_by_differences,
    generated_geometry,
    random_problem,
)

LANES = "grouped-dw-lanes"
FORCED = {"grad_weight": LANES}


def _want(x, dy, w_shape, geo):
    n = dict(stride=(geo.sh, geo.sw), pads=geo.pads, dilation=(geo.dlh, geo.dlw),
             groups=geo.G)
    return ref.conv2d_grad_weight(x.astype(np.float64), dy.astype(np.float64), w_shape, **n)


def _check(x, dy, w_shape, plan, dtype):
    want = _want(x, dy, w_shape, plan.geometry)
    got = plan.grad_weight(x, dy)
    assert got.dtype == dtype and got.shape == want.shape
    tol = 1e-10 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, np.abs(want).max()))


def _grid():
    shapes = [  # (N, C, H, W, K, G, R, S)
        (2, 32, 5, 18, 32, 2, 3, 3),    # Kg = 16: one block of 16 channels
        (1, 12, 6, 7, 64, 2, 3, 2),     # Kg = 32: two blocks; Cg = 6
        (2, 16, 7, 9, 48, 3, 3, 3),     # Kg = 16, three groups; planes of 7 x 9: a pixel
                                        # count that is not a multiple of 16
        (1, 4, 5, 33, 64, 4, 5, 5),     # Cg = 1: a tap block of 25 taps and padding taps
    ]
    for shape, stride, padding, dilation in itertools.product(
            shapes, [1, 2, (1, 3)], [0, 1, (2, 0)], [1, 2]):
        N, C, H, W, K, G, R, S = shape
        conv = dict(stride=stride, padding=padding, dilation=dilation, groups=G)
        try:
            fc.conv_geometry((N, C, H, W), (K, C // G, R, S), **conv)
        except ValueError:
            continue
        yield pytest.param(shape, conv, id=f"{shape}-s{stride}-p{padding}-d{dilation}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, conv", list(_grid()))
def test_channel_lane_dw_matches_the_reference(shape, conv, dtype, rng):
    N, C, H, W, K, G, R, S = shape
    x, _, _, dy = random_problem(rng, N, C, H, W, K, R, S, conv, dtype)
    plan = fc.conv2d_plan(x.shape, (K, C // G, R, S), **conv, dtype=dtype, algorithm=FORCED)
    _check(x, dy, (K, C // G, R, S), plan, dtype)


@pytest.mark.parametrize("generic", [False, True])
@pytest.mark.parametrize("shape, conv, tile", [
    ((2, 32, 5, 18, 32, 2, 3, 3), dict(padding=1), grouped_dw.ROWS3),
    ((2, 24, 7, 9, 48, 3, 3, 3), dict(stride=(2, 1), padding=(2, 0), dilation=(2, 1)),
     grouped_dw.ROWS3),
    ((1, 20, 6, 17, 32, 2, 3, 3), dict(padding=0), grouped_dw.ROWS3),  # 30 rows: a part
    ((2, 3, 20, 37, 32, 1, 7, 7), dict(stride=2, padding=3), grouped_dw.ROWS7S2),  # a stem
    ((1, 4, 9, 30, 32, 2, 2, 7), dict(stride=(1, 2), padding=(0, 2), dilation=(3, 1)),
     grouped_dw.ROWS7S2),
])
def test_each_channel_lane_dw_tile_matches_the_reference(shape, conv, tile, generic,
                                                         monkeypatch, rng):
    """Taps in rows of three consecutive inputs run ``_lanes_tile3``, rows of seven at
    stride 2 ``_lanes_tile7s2``, each reading a row at one or two offsets; the generic
    tile, forced on the same layers, agrees."""
    N, C, H, W, K, G, R, S = shape
    conv = dict(conv, groups=G)
    plan = fc.conv2d_plan((N, C, H, W), (K, C // G, R, S), **conv, algorithm=FORCED)
    assert grouped_dw._tile(plan.geometry) == tile
    if generic:
        monkeypatch.setattr(grouped_dw, "_tile", lambda geo: grouped_dw.GENERIC)
    x, _, _, dy = random_problem(rng, N, C, H, W, K, R, S, conv, np.float32)
    _check(x, dy, (K, C // G, R, S), plan, np.float32)


def test_a_stem_runs_its_dw_on_the_channel_lanes_and_other_dense_layers_do_not():
    stem = fc.conv2d_plan((1, 3, 64, 64), (64, 3, 7, 7), stride=2, padding=3)
    assert stem.algorithms["grad_weight"] == LANES
    for w_shape, conv in [((32, 3, 3, 3), dict(padding=1)),  # an RGB input layer: pixel
                          ((24, 3, 7, 7), dict(stride=2, padding=3)),  # 24: not 16s
                          ((64, 16, 7, 7), dict(stride=2, padding=3))]:  # 16 channels
        plan = fc.conv2d_plan((1, w_shape[1], 64, 64), w_shape, **conv)
        assert plan.algorithms["grad_weight"] != LANES, w_shape
    reason = algorithms.why_not(algorithms.BY_NAME[LANES], fc.conv_geometry(
        (1, 16, 64, 64), (64, 16, 7, 7), stride=2, padding=3), np.float32, "grad_weight")
    assert reason is not None and "one group of at most" in reason


@given(N=st.integers(1, 3), G=st.integers(2, 4), Cg=st.integers(1, 5),
       Kg=st.sampled_from([16, 32]), H=st.integers(1, 8), W=st.integers(1, 30),
       R=st.integers(1, 4), S=st.integers(1, 4), sh=st.integers(1, 2), sw=st.integers(1, 3),
       dlh=st.integers(1, 2), dlw=st.integers(1, 2), pads=st.tuples(*[st.integers(0, 3)] * 4),
       f64=st.booleans())
def test_channel_lane_dw_matches_the_reference_on_generated_shapes(N, G, Cg, Kg, H, W, R, S,
                                                                   sh, sw, dlh, dlw, pads,
                                                                   f64):
    geo = generated_geometry(N, G, Cg, Kg, H, W, R, S, sh, sw, dlh, dlw, pads)
    if geo is None:
        return
    dtype = np.float64 if f64 else np.float32
    assert grouped_dw.why_not(geo, dtype, "grad_weight") is None
    rng = np.random.default_rng(N * 1000 + G * 10 + Cg)
    x = rng.standard_normal((N, G * Cg, H, W)).astype(dtype)
    dy = rng.standard_normal((N, G * Kg, geo.OH, geo.OW)).astype(dtype)
    _check(x, dy, (G * Kg, Cg, R, S), fc.ConvPlan(geo, dtype, FORCED), dtype)


def test_channel_lane_dw_matches_torch_and_finite_differences(rng):
    for N, C, H, K, G, stride in [(4, 64, 14, 128, 8, 1), (2, 64, 15, 64, 4, 2)]:
        plan = fc.conv2d_plan((N, C, H, H), (K, C // G, 3, 3), stride, 1, groups=G,
                              algorithm=FORCED)
        check_plan_against_torch(plan, rng, atol=2e-4)
    conv = dict(stride=(1, 2), padding=1, dilation=(2, 1), groups=2)
    x, w, b, dy = random_problem(rng, 1, 4, 5, 11, 32, 3, 3, conv)
    plan = fc.conv2d_plan(x.shape, w.shape, **conv, dtype=np.float64, algorithm=FORCED)
    check_plan_by_differences(plan, x, w, b, dy, passes=("grad_weight",))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("K, W", [(32, 20), (32, 9)])
def test_a_non_finite_value_reaches_exactly_the_dw_taps_it_touches(bad, K, W, rng):
    N, C, H, G = 2, 6, 6, 2
    conv = dict(stride=1, padding=1, dilation=1, groups=G)
    x, w, _, dy = random_problem(rng, N, C, H, W, K, 3, 3, conv)
    x = np.abs(x) + 0.5  # positive data: an inf stays inf, no inf - inf
    w, dy = np.abs(w) + 0.5, np.abs(dy) + 0.5
    plan = fc.conv2d_plan(x.shape, w.shape, **conv, dtype=np.float64, algorithm=FORCED)
    # A row's ends, and a pixel inside.
    check_non_finite_reach(plan, x, w, dy, bad,
                           [(1, 4, h, v) for h, v in [(4, 0), (3, W - 1), (0, W - 2)]],
                           (0, K - 1, 1, dy.shape[3] - 1))


@pytest.mark.parametrize("K", [32, 64])
def test_channel_lane_dw_does_not_depend_on_the_thread_count(K, rng):
    conv = dict(stride=1, padding=1, dilation=1, groups=2)
    x, _, _, dy = random_problem(rng, 40, 8, 9, 13, K, 3, 3, conv, np.float32)
    plan = fc.conv2d_plan(x.shape, (K, 4, 3, 3), padding=1, groups=2, algorithm=FORCED)
    assert_same_on_thread_counts(lambda: plan.grad_weight(x, dy))


def test_grouped_layers_run_their_dw_on_it_where_the_channels_fill_the_lanes():
    for w_shape, groups, dw in [((128, 16, 3, 3), 8, LANES), ((512, 8, 3, 3), 16, LANES),
                                ((256, 4, 3, 3), 32, "grouped"),
                                ((128, 64, 3, 3), 2, "direct-channel-tile")]:
        plan = fc.conv2d_plan((16, 128, 28, 28), w_shape, padding=1, groups=groups)
        assert plan.algorithms["grad_weight"] == dw, w_shape
    with pytest.raises(ValueError, match="multiples of 16; got 8"):
        fc.conv2d_plan((2, 16, 9, 9), (16, 8, 3, 3), groups=2, algorithm=FORCED)
    with pytest.raises(ValueError, match="groups > 1"):
        fc.conv2d_plan((2, 16, 9, 9), (16, 16, 3, 3), algorithm=FORCED)
    with pytest.raises(ValueError, match="no forward pass"):
        fc.conv2d_plan((2, 16, 9, 9), (32, 8, 3, 3), groups=2,
                       algorithm={"forward": LANES})
