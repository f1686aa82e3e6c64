"""The pointwise dW (1x1, stride-1, unpadded layers), forced through plans: against the
reference and hypothesis-generated shapes (both orientations of the product: fewer input
or fewer output channels), against PyTorch and finite differences, on an empty batch, with
non-finite values, on strided arrays, the same to the bit for any thread count, and its
hot loop's code."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastconv as fc
from fastconv import algorithms
from fastconv import reference as ref
from fastconv.algorithms import pointwise as PW

from conftest import assert_same_on_thread_counts, normalised, random_problem

NAME = PW.NAME
CONV = dict(stride=1, padding=0, dilation=1, groups=1)


def _ref_dw(x, dy, K):
    n = normalised(x.shape, (K, x.shape[1], 1, 1), **CONV)
    return ref.conv2d_grad_weight(x.astype(np.float64), dy.astype(np.float64),
                                  (K, x.shape[1], 1, 1), **n)


def _plan(N, C, H, W, K, dtype=np.float32):
    return fc.conv2d_plan((N, C, H, W), (K, C, 1, 1), dtype=dtype,
                          algorithm={"grad_weight": NAME})


def _check(N, C, H, W, K, dtype, rng):
    x, _, _, dy = random_problem(rng, N, C, H, W, K, 1, 1, CONV, dtype)
    want = _ref_dw(x, dy, K)
    plan = _plan(N, C, H, W, K, dtype)
    assert plan.algorithms["grad_weight"] == NAME
    got = plan.grad_weight(x, dy)
    assert got.dtype == dtype and got.shape == want.shape
    tol = 1e-10 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("N, C, H, W, K", [
    (2, 64, 7, 7, 128),  # C < K: the input laid out channels-last
    (3, 130, 5, 6, 40),  # C > K: the deltas laid out channels-last, dW transposed
    (1, 33, 9, 9, 33),  # lanes past 32: a second, padded lane block
    (4, 8, 3, 5, 13),  # rows past the 8-row tile, one pixel row
    (9, 16, 1, 1, 48),  # one pixel per image
    (40, 32, 16, 16, 64),  # several batch chunks
])
def test_pointwise_matches_the_reference(N, C, H, W, K, dtype, rng):
    _check(N, C, H, W, K, dtype, rng)


@given(N=st.integers(1, 5), C=st.integers(1, 70), K=st.integers(1, 70),
       H=st.integers(1, 9), W=st.integers(1, 9), f64=st.booleans(),
       seed=st.integers(0, 2**16))
def test_pointwise_matches_the_reference_on_generated_shapes(N, C, K, H, W, f64, seed):
    _check(N, C, H, W, K, np.float64 if f64 else np.float32, np.random.default_rng(seed))


def test_pointwise_matches_torch(rng):
    torch = pytest.importorskip("torch")
    x, _, _, dy = random_problem(rng, 8, 96, 14, 14, 160, 1, 1, CONV, np.float32)
    want = torch.nn.grad.conv2d_weight(torch.from_numpy(x), (160, 96, 1, 1),
                                       torch.from_numpy(dy))
    got = _plan(8, 96, 14, 14, 160).grad_weight(x, dy)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-3)


def test_pointwise_gradient_matches_finite_differences(rng):
    x, w, b, dy = random_problem(rng, 2, 20, 4, 5, 24, 1, 1, CONV, np.float64)
    plan = _plan(2, 20, 4, 5, 24, np.float64)
    dw = plan.grad_weight(x, dy)
    loss = lambda w_: float((plan.forward(x, w_, b) * dy).sum())  # noqa: E731
    eps = 1e-6
    for idx in [tuple(rng.integers(0, n) for n in w.shape) for _ in range(12)]:
        hi, lo = w.copy(), w.copy()
        hi[idx] += eps
        lo[idx] -= eps
        np.testing.assert_allclose((loss(hi) - loss(lo)) / (2 * eps), dw[idx], rtol=1e-6,
                                   atol=1e-8)


def test_pointwise_empty_batch():
    dw = _plan(0, 32, 5, 5, 48).grad_weight(np.zeros((0, 32, 5, 5), np.float32),
                                            np.zeros((0, 48, 5, 5), np.float32))
    assert dw.shape == (48, 32, 1, 1) and not dw.any()


@pytest.mark.parametrize("C, K", [(24, 40), (40, 24)])  # either operand laid out
def test_non_finite_values_reach_exactly_the_sums_they_enter(C, K, rng):
    x, _, _, dy = random_problem(rng, 3, C, 6, 6, K, 1, 1, CONV, np.float32)
    x[1, 5, 2, 3] = np.inf
    dy[2, 7, 0, 0] = np.nan
    got = _plan(3, C, 6, 6, K).grad_weight(x, dy)
    want = _ref_dw(x, dy, K)
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    assert not np.isfinite(got[:, 5]).all() and not np.isfinite(got[7]).all()
    assert np.isfinite(np.delete(np.delete(got, 5, axis=1), 7, axis=0)).all()


def test_pointwise_reads_strided_arrays(rng):
    x, _, _, dy = random_problem(rng, 3, 20, 6, 8, 36, 1, 1, CONV, np.float32)
    plan = _plan(3, 20, 6, 8, 36)
    xs = np.zeros((3, 20, 6, 16), np.float32)[..., ::2]
    xs[...] = x
    dys = np.asfortranarray(dy)
    np.testing.assert_array_equal(plan.grad_weight(xs, dys), plan.grad_weight(x, dy))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pointwise_results_do_not_depend_on_the_thread_count(dtype, rng):
    x, _, _, dy = random_problem(rng, 40, 48, 10, 10, 72, 1, 1, CONV, dtype)
    plan = _plan(40, 48, 10, 10, 72, dtype)
    assert_same_on_thread_counts(lambda: plan.grad_weight(x, dy))


def test_pointwise_layers_are_planned_on_it_and_others_refused():
    geo = fc.conv_geometry((16, 128, 16, 16), (256, 128, 1, 1))
    assert algorithms.choices(geo, np.float32, "grad_weight")[0].NAME == NAME
    # Few channels on one side: the lanes would be mostly padding, the pixel dW runs it.
    rgb = fc.conv_geometry((16, 3, 32, 32), (64, 3, 1, 1))
    assert algorithms.choices(rgb, np.float32, "grad_weight")[0].NAME == "pixel"
    for shape, conv in [((2, 32, 9, 9), dict(padding=1)), ((2, 32, 9, 9), dict(stride=2)),
                        ((2, 32, 9, 9), dict(groups=2))]:
        K, Cg = 32, 32 // conv.get("groups", 1)
        with pytest.raises(ValueError, match="1x1|group"):
            fc.conv2d_plan(shape, (K, Cg, 1, 1), **conv, algorithm={"grad_weight": NAME})
    with pytest.raises(ValueError, match="no forward pass"):
        fc.conv2d_plan((2, 32, 9, 9), (32, 32, 1, 1), algorithm=NAME)


def test_the_tile_keeps_its_accumulators_in_registers():
    """One vector load and 24 FMAs a pixel, each with its broadcast folded in, and no
    vector register spilled in the loop."""
    import re

    import numba

    from fastconv import _jit

    f = numba.njit(fastmath=_jit.FASTMATH, cache=False)(PW._pointwise_tile.py_func)
    f(np.zeros((2, 30 * 64), np.float32), np.zeros((2, 1, 64, PW.VL), np.float32),
      np.zeros((1, 2 * PW.TA), np.int64), 2, 1, np.zeros((PW.TA, PW.VL), np.float32))
    asm = f.inspect_asm(f.signatures[0])
    blocks = re.split(r"\n(?=\.LBB|\S)", asm)
    hot = max(blocks, key=lambda b: len(re.findall(r"vfmadd\d+ps", b)))
    hot = re.split(r"\n\tj", hot)[0]  # the loop, up to its back edge
    assert len(re.findall(r"vfmadd\d+ps\s[^\n]*\{1to16\}[^\n]*zmm", hot)) == PW.TA
    assert not re.search(r"[yz]mm[^\n]*\(%rsp\)|\(%rsp\)[^\n]*[yz]mm", hot)
    assert "vgather" not in asm and "vscatter" not in asm
