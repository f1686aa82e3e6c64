"""Plans: which algorithm each pass gets, every algorithm forced through a plan against the
reference, forced algorithms refused with their reason, plan reuse, the plan cache, and
arrays a plan refuses."""

from __future__ import annotations

import numpy as np
import pytest

import fastconv as fc
from fastconv import algorithms, config
from fastconv import plan as plan_mod

from conftest import random_problem, reference_passes, winograd_enabled

TILE, PIXEL, WINO, NCHW, SMALL, DW = ("direct-channel-tile", "pixel", "winograd-f2x2-5x5",
                                      "nchw-delta-dw", "serial-direct", "depthwise")
PW = "pointwise-dw"
GR = "grouped"
GRL = "grouped-dw-lanes"
GRW = "grouped-dw-windows"
S2B = "space-to-batch"
WINO3 = "winograd-f4x4-3x3"


@pytest.mark.parametrize("x_shape, w_shape, conv, dtype, want", [
    ((8, 32, 14, 14), (64, 32, 5, 5), dict(padding=2), np.float32, (WINO, WINO, WINO)),
    ((8, 1, 28, 28), (32, 1, 5, 5), dict(padding=2), np.float32, (PIXEL, DW, PIXEL)),
    ((8, 32, 14, 14), (64, 32, 3, 3), dict(padding=1), np.float32, (WINO3, WINO3, WINO3)),
    ((8, 32, 14, 14), (64, 32, 3, 3), dict(padding=1), np.float64, (TILE, TILE, NCHW)),
    ((8, 64, 14, 14), (32, 64, 1, 1), {}, np.float32, (PIXEL, PIXEL, PW)),
    ((8, 32, 14, 14), (64, 32, 5, 5), dict(padding=2), np.float64, (TILE, TILE, NCHW)),
    ((8, 32, 14, 14), (64, 8, 3, 3), dict(padding=1, groups=4), np.float32, (GR, GR, GRL)),
    ((8, 32, 14, 14), (32, 8, 3, 3), dict(padding=1, groups=4), np.float32, (GR, GR, GRW)),
    ((8, 64, 14, 14), (64, 32, 3, 3), dict(padding=1, groups=2), np.float32,
     (TILE, TILE, TILE)),
    ((8, 3, 64, 64), (32, 3, 3, 3), dict(stride=2, padding=1), np.float32,
     (PIXEL, GR, PIXEL)),
    # dX of few input channels: the grouped kernels (one group), before Winograd
    ((8, 3, 32, 32), (32, 3, 3, 3), dict(padding=1), np.float32, (PIXEL, GR, PIXEL)),
    ((1, 3, 8, 8), (8, 3, 3, 3), dict(padding=1), np.float32, (SMALL, SMALL, SMALL)),
    ((16, 128, 28, 28), (128, 1, 3, 3), dict(padding=1, groups=128), np.float32, (DW, DW, DW)),
    ((8, 32, 56, 56), (64, 1, 5, 5), dict(stride=2, padding=2, groups=32), np.float64,
     (DW, DW, DW)),
    # depthwise above config.DEPTHWISE_SMALL_WORK (226k multiply-adds), and below it
    ((1, 128, 14, 14), (128, 1, 3, 3), dict(padding=1, groups=128), np.float32, (DW, DW, DW)),
    ((1, 16, 8, 8), (16, 1, 3, 3), dict(padding=1, groups=16), np.float32,
     (SMALL, SMALL, SMALL)),
    ((2, 16, 9, 9), (8, 4, 3, 3), dict(stride=2, groups=4), np.float64, (SMALL, SMALL, SMALL)),
    # grouped, few channels per group
    ((8, 64, 28, 28), (64, 4, 3, 3), dict(padding=1, groups=16), np.float32, (GR, GR, GR)),
    # dilated: Winograd on the dilation phases stacked in the batch
    ((8, 32, 28, 28), (32, 32, 3, 3), dict(padding=2, dilation=2), np.float32, (S2B, S2B, NCHW)),
    ((2, 128, 28, 28), (32, 128, 3, 3), dict(padding=2, dilation=2), np.float32,
     (S2B, S2B, S2B)),
    ((8, 64, 56, 56), (64, 8, 3, 3), dict(stride=2, padding=1, groups=8), np.float64,
     (GR, GR, GRW)),
])
def test_each_pass_gets_the_first_algorithm_that_supports_it(x_shape, w_shape, conv, dtype,
                                                               want):
    p = fc.conv2d_plan(x_shape, w_shape, **conv, dtype=dtype)
    assert tuple(p.algorithms[k] for k in algorithms.PASSES) == want
    with winograd_enabled(False):
        off = fc.conv2d_plan(x_shape, w_shape, **conv, dtype=dtype)
    assert WINO not in off.algorithms.values()


def test_the_order_is_the_policy():
    assert [a.NAME for a in algorithms.ALGORITHMS] == [SMALL, WINO, WINO3, S2B, PW, PIXEL, DW,
                                                       GRL, GRW, GR, NCHW, TILE]
    geo = fc.conv_geometry((2, 3, 9, 9), (4, 3, 3, 3), padding=1)
    for p in algorithms.PASSES:  # the last one runs everything: every list ends with it
        assert algorithms.supporting(geo, np.float32, p)[-1].NAME == TILE


def test_an_algorithm_passed_over_as_slower_still_runs_when_forced(rng, monkeypatch):
    """Winograd's dW below config.WINOGRAD_DW_MIN_TILES and the serial kernels above
    config.SMALL_WORK are rules of speed: the plan chooses another algorithm, a forced
    plan runs them."""
    x = rng.standard_normal((1, 32, 14, 14)).astype(np.float32)  # 49 tiles
    w = rng.standard_normal((64, 32, 5, 5)).astype(np.float32)
    dy = rng.standard_normal((1, 64, 14, 14)).astype(np.float32)
    geo = fc.conv_geometry(x.shape, w.shape, padding=2)
    assert "WINOGRAD_DW_MIN_TILES" in algorithms.slower(algorithms.BY_NAME[WINO], geo,
                                                       np.float32, "grad_weight")
    with winograd_enabled(True):
        assert fc.conv2d_plan(x.shape, w.shape, padding=2).algorithms == {
            "forward": WINO, "grad_input": WINO, "grad_weight": NCHW}
        want = fc.conv2d_grad_weight(x, dy, w.shape, padding=2)
        for forced in (WINO, SMALL):
            plan = fc.conv2d_plan(x.shape, w.shape, padding=2, algorithm={"grad_weight": forced})
            assert plan.algorithms["grad_weight"] == forced
            np.testing.assert_allclose(plan.grad_weight(x, dy), want, rtol=1e-4, atol=1e-3)
        monkeypatch.setattr(config, "WINOGRAD_DW_MIN_TILES", 49)
        assert fc.conv2d_plan(x.shape, w.shape, padding=2).algorithms["grad_weight"] == WINO
    for p in algorithms.PASSES:  # the choices are the supporting algorithms, in order
        chosen = algorithms.choices(geo, np.float32, p)
        supported = algorithms.supporting(geo, np.float32, p)
        assert chosen == [a for a in supported if a in chosen] and chosen[-1].NAME == TILE


GEOMETRIES = [  # (N, C, H, W, K, R, S, conv): every algorithm supports some pass of some
    (2, 32, 14, 14, 32, 5, 5, dict(padding=2)),
    (2, 16, 16, 18, 5, 5, 5, dict(padding=(1, 3))),
    (3, 1, 20, 20, 8, 5, 5, dict(padding=2)),
    (2, 3, 17, 19, 6, 3, 3, dict(stride=2, padding=1)),
    (2, 3, 37, 36, 10, 7, 7, dict(stride=2, padding=3)),  # a stem: pixel bands, 3 of 8 rows
    (1, 2, 20, 41, 9, 3, 4, dict(stride=2, padding=(2, 1), dilation=(2, 1))),
    (2, 3, 12, 40, 5, 3, 2, dict(stride=(1, 3), padding=(1, 0), dilation=(2, 1))),
    (2, 24, 9, 10, 16, 1, 1, {}),
    (2, 32, 9, 9, 12, 3, 3, dict(padding=1)),
    (2, 16, 9, 9, 12, 3, 3, dict(padding=1, groups=4)),
    (4, 32, 16, 16, 32, 3, 3, dict(padding=1, groups=4)),  # grouped, beyond the serial kernels
    (2, 12, 7, 20, 18, 3, 3, dict(padding=(1, 0), groups=6)),  # Kg = 3: a part block
    (2, 8, 9, 40, 12, 3, 2, dict(stride=(1, 2), dilation=(2, 1), padding=(2, 1), groups=2)),
    (2, 12, 7, 9, 32, 3, 3, dict(stride=(2, 1), padding=1, groups=2)),  # Kg = 16: lanes dW
    (2, 4, 7, 9, 3, 4, 2, dict(stride=(2, 1), padding=(2, 0), dilation=(1, 3))),
    (2, 16, 8, 12, 8, 3, 3, dict(padding=(2, 3), dilation=(2, 3))),  # space-to-batch
    # depthwise: channels off the 16-lane vectors, multiplier 2, strides 1-3, dilation 2,
    # asymmetric padding ('same' with an even kernel), batch 1
    (2, 3, 9, 11, 3, 3, 3, dict(padding=1, groups=3)),
    (2, 20, 13, 12, 40, 3, 3, dict(stride=2, padding=1, groups=20)),
    (1, 33, 14, 13, 33, 4, 4, dict(padding="same", groups=33)),
    (2, 17, 16, 15, 17, 3, 3, dict(stride=3, dilation=2, padding=(2, 1), groups=17)),
    (3, 32, 20, 20, 64, 5, 5, dict(stride=(1, 2), padding=2, groups=32)),  # beyond serial
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", GEOMETRIES, ids=lambda c: f"{c[:7]}{c[7]}")
def test_every_algorithm_forced_through_a_plan_matches_the_reference(case, dtype, rng):
    """Each algorithm on every pass it supports, forced, so that no choice or fallback can
    hide it; and forced on a pass it does not support, refused with its reason."""
    N, C, H, W, K, R, S, conv = case
    conv = dict(dict(stride=1, padding=0, dilation=1, groups=1), **conv)
    x, w, b, dy = random_problem(rng, N, C, H, W, K, R, S, conv, dtype)
    want = reference_passes(*(a.astype(np.float64) for a in (x, w, b, dy)), conv)
    geo = fc.conv_geometry(x.shape, w.shape, **conv)
    tol = 1e-9 if dtype == np.float64 else 5e-4
    ran = 0
    for a in algorithms.ALGORITHMS:
        for k, p in enumerate(algorithms.PASSES):
            reason = algorithms.why_not(a, geo, dtype, p)
            if reason is not None:
                with pytest.raises(ValueError, match="cannot run the"):
                    fc.conv2d_plan(x.shape, w.shape, **conv, dtype=dtype,
                                   algorithm={p: a.NAME})
                continue
            plan = fc.conv2d_plan(x.shape, w.shape, **conv, dtype=dtype, algorithm={p: a.NAME})
            assert plan.algorithms[p] == a.NAME
            got = (plan.forward(x, w, b) if p == "forward" else
                   plan.grad_input(dy, w) if p == "grad_input" else plan.grad_weight(x, dy))
            scale = max(1.0, float(np.abs(want[k]).max()))
            np.testing.assert_allclose(got, want[k], rtol=tol, atol=tol * scale)
            assert got.dtype == dtype
            ran += 1
    assert ran >= 3


def test_each_algorithm_runs_somewhere_in_the_grid():
    seen = set()
    for dtype in (np.float32, np.float64):
        for N, C, H, W, K, R, S, conv in GEOMETRIES:
            geo = fc.conv_geometry((N, C, H, W), (K, C // conv.get("groups", 1), R, S), **conv)
            for p in algorithms.PASSES:
                seen |= {a.NAME for a in algorithms.supporting(geo, dtype, p)}
    assert seen == set(algorithms.BY_NAME)


@pytest.mark.parametrize("algorithm, words", [
    (WINO, "5x5 filter"), (PIXEL, "at most 4 input channels"), (NCHW, "it has no forward pass"),
    ("fft", "unknown algorithm 'fft'"), (3, "must be a name"),
    ({"backward": TILE}, "algorithm keys must be passes"),
])
def test_forced_algorithms_that_cannot_run_are_refused_with_the_reason(algorithm, words):
    with pytest.raises((ValueError, TypeError), match=words):
        fc.conv2d_plan((32, 32, 9, 9), (12, 32, 3, 3), padding=1, algorithm=algorithm)


def test_a_forced_winograd_still_hands_non_finite_results_to_the_direct_kernel(rng):
    x = rng.standard_normal((2, 32, 14, 14)).astype(np.float32)
    w = rng.standard_normal((32, 32, 5, 5)).astype(np.float32)
    x[0, 3, 5, 6] = np.inf
    p = fc.conv2d_plan(x.shape, w.shape, padding=2, algorithm=WINO)
    direct = fc.conv2d_plan(x.shape, w.shape, padding=2, algorithm=TILE)
    y, want = p.forward(x, w), direct.forward(x, w)
    np.testing.assert_array_equal(np.isfinite(y), np.isfinite(want))
    assert not np.isfinite(y).all()


def test_a_plan_runs_again_with_new_weights_and_equals_the_functional_api(rng):
    p = fc.conv2d_plan((4, 32, 14, 14), (64, 32, 5, 5), padding=2)
    x = rng.standard_normal((4, 32, 14, 14)).astype(np.float32)
    dy = rng.standard_normal((4, 64, 14, 14)).astype(np.float32)
    for _ in range(2):
        w = rng.standard_normal((64, 32, 5, 5)).astype(np.float32)
        b = rng.standard_normal(64).astype(np.float32)
        np.testing.assert_array_equal(p.forward(x, w, b), fc.conv2d(x, w, b, padding=2))
        np.testing.assert_array_equal(p.grad_input(dy, w),
                                      fc.conv2d_grad_input(dy, w, x.shape, padding=2))
        np.testing.assert_array_equal(p.grad_weight(x, dy),
                                      fc.conv2d_grad_weight(x, dy, w.shape, padding=2))
        np.testing.assert_array_equal(p.grad_bias(dy), fc.conv2d_grad_bias(dy))


@pytest.mark.parametrize("x_shape, w_shape, padding, algorithm", [
    ((2, 32, 14, 14), (64, 32, 5, 5), 2, WINO),
    ((2, 16, 9, 9), (24, 16, 3, 3), 1, TILE),
])
def test_a_plan_prepares_weights_once_and_again_when_they_change(
        x_shape, w_shape, padding, algorithm, rng, monkeypatch):
    module = algorithms.BY_NAME[algorithm]
    prepared = []
    real = module.prepare
    monkeypatch.setattr(module, "prepare", lambda geo, w, pass_: (
        prepared.append(pass_), real(geo, w, pass_))[1])
    p = fc.conv2d_plan(x_shape, w_shape, padding=padding, algorithm=algorithm)
    fresh = fc.conv2d_plan(x_shape, w_shape, padding=padding, algorithm=algorithm,
                           keep_weights=False)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    dy = rng.standard_normal(p.forward(x, w).shape).astype(np.float32)

    def want():
        return fresh.forward(x, w), fresh.grad_input(dy, w)

    expected = want()
    del prepared[:]
    for _ in range(3):  # the same weights, also as a copy: prepared once per pass
        y, dx = p.forward(x, w.copy()), p.grad_input(dy, w)
    assert sorted(prepared) == ["grad_input"]  # the forward pass's was kept above
    np.testing.assert_array_equal(y, expected[0])
    np.testing.assert_array_equal(dx, expected[1])
    # Changed in place (one element, then a sign of zero): prepared again, and right.
    for change in [lambda a: a.__setitem__((1, 2, 0, 1), 0.5),
                   lambda a: a.__setitem__((0, 0, 0, 0), -0.0),
                   lambda a: a.__setitem__((0, 0, 0, 0), 0.0)]:
        change(w)
        expected = want()
        del prepared[:]
        got = p.forward(x, w), p.grad_input(dy, w)
        assert sorted(prepared) == ["forward", "grad_input"]
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1], expected[1])
    # Strided weights equal to the kept ones are the same weights.
    wide = np.zeros((*w_shape[:3], 2 * w_shape[3]), np.float32)
    wide[..., ::2] = w
    del prepared[:]
    y = p.forward(x, wide[..., ::2])
    assert prepared == []
    np.testing.assert_array_equal(y, expected[0])


def test_the_functional_api_keeps_weights_within_its_budget(rng, monkeypatch):
    prepared = []
    real = algorithms.BY_NAME[TILE].prepare
    monkeypatch.setattr(algorithms.BY_NAME[TILE], "prepare", lambda geo, w, pass_: (
        prepared.append((geo.C, pass_)), real(geo, w, pass_))[1])
    fc.clear_plan_cache()
    x = rng.standard_normal((2, 16, 9, 9)).astype(np.float32)
    w = rng.standard_normal((24, 16, 3, 3)).astype(np.float32)
    p = fc.conv2d_plan(x.shape, w.shape, padding=1, algorithm=TILE, keep_weights=False)
    with winograd_enabled(False):
        want = p.forward(x, w)
        for _ in range(3):  # the functional API prepares once, an unkept plan every call
            np.testing.assert_array_equal(fc.conv2d(x, w, padding=1), want)
            p.forward(x, w)
        assert prepared == [(16, "forward")] * 5
        w[0, 0, 0, 0] += 1  # changed in place: prepared again
        np.testing.assert_array_equal(fc.conv2d(x, w, padding=1), p.forward(x, w))
        assert prepared[5:] == [(16, "forward")] * 2
        # Past the budget, the least recently used plan's weights are dropped.
        kept = plan_mod._kept_weights.nbytes
        assert kept > 0
        monkeypatch.setattr(config, "PLAN_CACHE_WEIGHT_BYTES", kept + 1)
        fc.conv2d(x, w, padding=2)  # another plan, whose weights take as many bytes
        del prepared[:]
        fc.conv2d(x, w, padding=2)  # kept
        fc.conv2d(x, w, padding=1)  # dropped: prepared again
        assert prepared == [(16, "forward")]
        assert plan_mod._kept_weights.nbytes <= kept + 1
        # A plan that leaves the cache takes its weights along.
        monkeypatch.setattr(config, "PLAN_CACHE_SIZE", 1)
        fc.conv2d(x, w[:8], padding=1)  # another plan, made without weights kept yet
        assert plan_mod._kept_weights.nbytes < kept
    fc.clear_plan_cache()
    assert plan_mod._kept_weights.nbytes == 0
    assert all(q._kept is None for q in [p])


def test_a_kept_plan_with_non_finite_weights_still_hands_over_to_the_direct_kernel(rng):
    x = rng.standard_normal((2, 32, 14, 14)).astype(np.float32)
    w = rng.standard_normal((32, 32, 5, 5)).astype(np.float32)
    w[3, 1, 2, 2] = np.nan
    p = fc.conv2d_plan(x.shape, w.shape, padding=2, algorithm=WINO)
    want = fc.conv2d_plan(x.shape, w.shape, padding=2, algorithm=TILE).forward(x, w)
    for _ in range(2):  # the second call runs on the kept (NaN) transform
        y = p.forward(x, w)
        np.testing.assert_array_equal(np.isfinite(y), np.isfinite(want))
        np.testing.assert_allclose(y[np.isfinite(y)], want[np.isfinite(want)], rtol=1e-4,
                                   atol=1e-4)


def test_out_receives_the_result(rng):
    p = fc.conv2d_plan((2, 3, 9, 9), (4, 3, 3, 3), padding=1)
    x = rng.standard_normal((2, 3, 9, 9)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    out = np.full((2, 4, 9, 9), np.nan, np.float32)
    assert p.forward(x, w, out=out) is out
    np.testing.assert_array_equal(out, fc.conv2d(x, w, padding=1))
    for bad, kind in [(np.zeros((2, 4, 9, 8), np.float32), ValueError),
                      (np.zeros((2, 4, 9, 9), np.float64), TypeError),
                      (np.zeros((2, 4, 9, 18), np.float32)[..., ::2], ValueError)]:
        with pytest.raises(kind, match="out"):
            p.forward(x, w, out=bad)


def test_a_plan_refuses_arrays_that_are_not_its_own(rng):
    p = fc.conv2d_plan((2, 3, 9, 9), (4, 3, 3, 3), padding=1)
    x = np.zeros((2, 3, 9, 9), np.float32)
    w = np.zeros((4, 3, 3, 3), np.float32)
    cases = [
        (lambda: p.forward(x[:1], w), ValueError, "input has shape (1, 3, 9, 9)"),
        (lambda: p.forward(x.astype(np.float64), w), TypeError, "plan computes in float32"),
        (lambda: p.forward(x.astype(">f4"), w), TypeError, "native byte order"),
        (lambda: p.forward(x.tolist(), w), TypeError, "input must be a NumPy array"),
        (lambda: p.forward(x, w[:, :2]), ValueError, "weight has shape"),
        (lambda: p.forward(x, w, np.zeros(3, np.float32)), ValueError, "bias has shape"),
        (lambda: p.grad_input(x, w), ValueError, "grad_output has shape"),
        (lambda: p.grad_weight(x, np.zeros((2, 4, 9, 9))), TypeError, "grad_output has dtype"),
    ]
    for call, kind, words in cases:
        with pytest.raises(kind, match=words.replace("(", r"\(").replace(")", r"\)")):
            call()


def test_plans_are_made_from_validated_arguments():
    with pytest.raises(ValueError, match="channel mismatch"):
        fc.conv2d_plan((2, 4, 9, 9), (4, 3, 3, 3))
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        fc.conv2d_plan((2, 3, 9, 9), (4, 3, 3, 3), dtype=np.int32)
    p = fc.conv2d_plan((0, 3, 9, 9), (4, 3, 3, 3), dtype="float64")
    assert p.forward(np.zeros((0, 3, 9, 9)), np.ones((4, 3, 3, 3))).shape == (0, 4, 7, 7)
    assert p.grad_weight(np.zeros((0, 3, 9, 9)), np.zeros((0, 4, 7, 7))).shape == (4, 3, 3, 3)


def test_the_functional_api_caches_plans(rng, monkeypatch):
    plan_mod.clear_plan_cache()
    x = rng.standard_normal((2, 3, 9, 9)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    for _ in range(3):
        fc.conv2d(x, w, padding=1)
    info = fc.plan_cache_info()
    assert (info.hits, info.misses, info.size) == (2, 1, 1)
    # The arguments' types are part of the key: a float padding is refused every time.
    for _ in range(2):
        with pytest.raises(TypeError, match="padding must be an int"):
            fc.conv2d(x, w, padding=1.0)
    # So is the Winograd switch, and the bound holds (least recently used dropped first).
    monkeypatch.setattr(config, "PLAN_CACHE_SIZE", 3)
    for pad in range(5):
        fc.conv2d(x, w, padding=pad)
    assert fc.plan_cache_info().size == 3
    x5 = rng.standard_normal((2, 32, 14, 14)).astype(np.float32)
    w5 = rng.standard_normal((32, 32, 5, 5)).astype(np.float32)
    fc.conv2d(x5, w5, padding=2)
    with winograd_enabled(False):
        y_direct = fc.conv2d(x5, w5, padding=2)
    np.testing.assert_allclose(fc.conv2d(x5, w5, padding=2), y_direct, rtol=2e-4, atol=2e-4)
    assert not np.array_equal(fc.conv2d(x5, w5, padding=2), y_direct)  # two plans ran
    plan_mod.clear_plan_cache()
    assert fc.plan_cache_info() == (0, 0, 0, 3)
