"""Winograd F(4x4, 3x3): its transforms against their exact derivation, the forward pass,
dX and dW forced through plans against the float64 reference (error within a few times the
direct kernels'), edge tiles, pool order, non-finite values, and the wrappers' checks."""

from __future__ import annotations

import numpy as np
import pytest

import fastconv as fc
from fastconv import layouts
from fastconv.algorithms import winograd as W5
from fastconv.algorithms import winograd3x3 as W3
from fastconv.algorithms import winograd_kernels as WK

from conftest import check_filter_transform, reference_passes, winograd_enabled

NAME, TILE = W3.NAME, "direct-channel-tile"
FORCED = {"forward": NAME, "grad_input": NAME, "grad_weight": NAME}


def test_the_kernel_transforms_are_the_derived_ones():
    from fractions import Fraction

    AT, G, BT, _ = W5.transforms(4, 3, W5.POINTS)
    # The input transform is the 5x5 path's: B depends on the points only.
    assert BT == W5.transforms(2, 5, W5.POINTS)[2]
    ka = W3.output_constants(np.float64)
    at = np.array([W3._at4.py_func(*np.eye(6)[j], ka) for j in range(6)]).T
    np.testing.assert_array_equal(at, np.array(AT, float))
    # The filter transform: G = diag(1/scale) V with the 5x5 path's scale (so its scale
    # products), V the points' Vandermonde rows for three coefficients.
    scale = W5.transforms()[3]
    assert W5.transforms(4, 3, W5.POINTS)[3] == scale
    V = np.array([[g * s for g in row] for row, s in zip(G, scale, strict=True)], float)
    v = np.array([WK._v6_3.py_func(*np.eye(3)[j]) for j in range(3)]).T
    np.testing.assert_array_equal(v, V)
    # Exactly, in Fractions: A^T [(G g G^T) (.) (B^T d B)] A is the 3x3 correlation.
    rng = np.random.default_rng(1)
    d = [[Fraction(int(v), 7) for v in row] for row in rng.integers(-9, 10, (6, 6))]
    g = [[Fraction(int(v), 5) for v in row] for row in rng.integers(-9, 10, (3, 3))]

    def mm(a, b):
        return [[sum(a[i][k] * b[k][j] for k in range(len(b))) for j in range(len(b[0]))]
                for i in range(len(a))]

    def tr(a):
        return [list(col) for col in zip(*a, strict=True)]

    u = mm(mm(G, g), tr(G))
    v = mm(mm(BT, d), tr(BT))
    y = mm(mm(AT, [[u[i][j] * v[i][j] for j in range(6)] for i in range(6)]), tr(AT))
    want = [[sum(d[i + r][j + s] * g[r][s] for r in range(3) for s in range(3))
             for j in range(4)] for i in range(4)]
    assert y == want

    # dW is F(3, 4) from the same points: A (6 x 4) is A^T transposed, the back-transform
    # V^T for three coefficients, and G^T [(A dy A^T) (.) (B^T d B)] G is one tile's
    # 3 x 3 correlation of its input with its 4 x 4 deltas.
    kc = W5.kernel_constants(np.float64)
    a = np.array([W3._a64.py_func(*np.eye(4)[j], kc) for j in range(4)]).T
    np.testing.assert_array_equal(a, np.array(AT, float).T)
    vt3 = np.array([WK._vt3.py_func(*np.eye(6)[j]) for j in range(6)]).T
    np.testing.assert_array_equal(vt3, V.T)
    e = [[Fraction(int(v), 3) for v in row] for row in rng.integers(-9, 10, (4, 4))]
    m = mm(mm(tr(AT), e), AT)
    dw = mm(mm(tr(G), [[m[i][j] * v[i][j] for j in range(6)] for i in range(6)]), G)
    want = [[sum(d[i + r][j + s] * e[i][j] for i in range(4) for j in range(4))
             for s in range(3)] for r in range(3)]
    assert dw == want


@pytest.mark.parametrize("K, C, CP, rotate, dtype, strided", [
    (64, 64, 64, False, np.float32, False),  # (64, 64, 3, 3) forward: whole blocks of 16
    (64, 64, 64, True, np.float32, False),  # and its dX, rotated and transposed in place
    (33, 20, 48, False, np.float32, False),  # a partial block, padding rows and columns
    (33, 20, 48, True, np.float32, False),  # rotated: partial block, padding
    (16, 16, 16, False, np.float32, False),  # the last block's window would pass w's end
    (16, 16, 16, True, np.float32, False),  # so would the rotated one's
    (7, 16, 16, True, np.float64, False),  # float64 weights, read as they are
    (40, 16, 16, False, np.float32, True),  # a strided view: copied contiguous
])
def test_filter_transform_is_float64_rounded_once(K, C, CP, rotate, dtype, strided, rng):
    """U is G f G^T in float64 rounded once to float32 (within half an ulp of the exact
    value plus float64 noise), for every filter f, zero past the channels."""
    check_filter_transform(W3.transform_filters, 3, K, C, CP, rotate, dtype, strided, rng)


def test_dx_filters_are_read_in_place(rng):
    """prepare's dX transform reads w rotated and transposed by index: the same bits as
    the transform of that view made contiguous."""
    w = rng.standard_normal((24, 32, 3, 3)).astype(np.float32)
    geo = fc.conv_geometry((2, 32, 12, 12), w.shape, padding=1)
    KgP = layouts.delta_layout(geo).KgP
    view = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
    np.testing.assert_array_equal(W3.prepare(geo, w, "grad_input"),
                                  W3.transform_filters(view, KgP))


CASES = [  # (N, C, H, W, K, padding): edge tiles of every kind
    (2, 32, 14, 14, 64, 1),  # 14 = 3 tiles + 2: shifted edge tiles
    (1, 16, 13, 11, 20, 1),  # 13 and 11 rows/columns, K below a vector block
    (3, 16, 7, 9, 33, 0),  # 5 x 7 outputs, K over a block
    (1, 64, 32, 32, 64, 1),  # batch 1, whole tiles
    (2, 32, 10, 10, 16, 2),  # padding 2: dX's deltas unpadded
    (1, 16, 6, 30, 8, (0, 2)),  # one tile row, asymmetric padding
]


def _rel(a, want):
    return float(np.linalg.norm(a - want) / np.linalg.norm(want))


@pytest.mark.parametrize("N, C, H, Wd, K, pad", CASES)
def test_every_pass_against_the_reference(N, C, H, Wd, K, pad, rng):
    x = rng.standard_normal((N, C, H, Wd)).astype(np.float32)
    w = rng.standard_normal((K, C, 3, 3)).astype(np.float32)
    b = rng.standard_normal(K).astype(np.float32)
    plan = fc.conv2d_plan(x.shape, w.shape, padding=pad, algorithm=FORCED)
    direct = fc.conv2d_plan(x.shape, w.shape, padding=pad, algorithm=TILE)
    y = plan.forward(x, w, b)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    want_y, want_dx, want_dw = reference_passes(
        *(a.astype(np.float64) for a in (x, w, b, dy)),
        dict(stride=1, padding=pad, dilation=1, groups=1))
    for got, base, want, bound in [
            (y, direct.forward(x, w, b), want_y, 6),
            (plan.grad_input(dy, w), direct.grad_input(dy, w), want_dx, 6),
            (plan.grad_weight(x, dy), direct.grad_weight(x, dy), want_dw, 8)]:
        assert got.dtype == np.float32 and got.shape == want.shape
        # F(4x4, 3x3) errs about 3x the direct kernels (1.3e-6 relative on 64 channels);
        # dW, a sum over every tile, 1.3-5x (as the 5x5 path's dW is bounded by 8x).
        assert _rel(got, want) < max(bound * _rel(base, want), 1e-6)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_pool_order_holds_the_nchw_output_in_planes(rng):
    x = rng.standard_normal((2, 16, 14, 10)).astype(np.float32)
    w = rng.standard_normal((24, 16, 3, 3)).astype(np.float32)
    geo = fc.conv_geometry(x.shape, w.shape, padding=1)
    U = W3.prepare(geo, w, "forward")
    xp = layouts._pack_input(x, geo)
    y = W3.packed_forward(geo, xp, U, None)
    y4 = W3.packed_forward(geo, xp, U, None, pool_order=True)
    np.testing.assert_array_equal(y4, layouts.to_pool_order(y))


def test_plans_choose_it_for_fp32_3x3_stride_1_and_not_elsewhere():
    plan = fc.conv2d_plan((8, 64, 28, 28), (64, 64, 3, 3), padding=1)
    assert set(plan.algorithms.values()) == {NAME}
    # dW pays for its transforms from config.WINOGRAD43_DW_MIN_TILES 4x4 tiles.
    few = fc.conv2d_plan((1, 64, 12, 12), (64, 64, 3, 3), padding=1)
    assert few.algorithms["forward"] == NAME and few.algorithms["grad_weight"] != NAME
    for shape, conv, dtype in [((8, 64, 28, 28), dict(stride=2, padding=1), np.float32),
                               ((8, 64, 28, 28), dict(padding=1), np.float64),
                               ((8, 64, 28, 28), dict(padding=1, dilation=2), np.float32),
                               ((8, 24, 28, 28), dict(padding=1), np.float32)]:
        p = fc.conv2d_plan(shape, (64, shape[1], 3, 3), **conv, dtype=dtype)
        assert p.algorithms["forward"] != NAME
    with winograd_enabled(False):
        assert fc.conv2d_plan((8, 64, 28, 28), (64, 64, 3, 3),
                              padding=1).algorithms["forward"] == TILE
    with pytest.raises(ValueError, match="tiles of 4x4"):
        fc.conv2d_plan((1, 16, 6, 6), (8, 16, 3, 3), padding=1, algorithm={"forward": NAME})


@pytest.mark.parametrize("where", ["input", "weight"])
def test_non_finite_values_reach_what_they_touch(where, rng):
    x = rng.standard_normal((2, 16, 12, 12)).astype(np.float32)
    w = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
    if where == "input":
        x[1, 3, 5, 6] = np.inf
    else:
        w[2, 1, 0, 2] = np.nan
    plan = fc.conv2d_plan(x.shape, w.shape, padding=1, algorithm=FORCED)
    direct = fc.conv2d_plan(x.shape, w.shape, padding=1, algorithm=TILE)
    y, want = plan.forward(x, w), direct.forward(x, w)
    np.testing.assert_array_equal(np.isfinite(y), np.isfinite(want))
    np.testing.assert_allclose(y[np.isfinite(y)], want[np.isfinite(want)], rtol=1e-4,
                               atol=1e-4)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx, want = plan.grad_input(dy, w), direct.grad_input(dy, w)
    np.testing.assert_array_equal(np.isfinite(dx), np.isfinite(want))
    if where == "input":  # dW reads the input and the deltas
        dw, want = plan.grad_weight(x, dy), direct.grad_weight(x, dy)
        np.testing.assert_array_equal(np.isfinite(dw), np.isfinite(want))
        assert not np.isfinite(dw).all()


def test_the_wrapper_checks_what_it_hands_the_kernel():
    xp = np.zeros((1, 16, 16, 16), np.float32)  # a 14 x 14 output
    U = W3.transform_filters(np.zeros((24, 16, 3, 3), np.float32), 16)
    y = np.zeros((1, 24, 14, 14), np.float32)
    assert W3.run_forward(xp, U, None, y)
    for args in [(xp, U, None, y[:, :, :7].copy()), (xp[..., :8].copy(), U, None, y),
                 (xp, U[:, :8].copy(), None, y), (xp, U[:, :, :16].copy(), None, y),
                 (xp, U.astype(np.float64), None, y), (xp[:, :5, :5].copy(), U, None, y),
                 (xp, U, None, np.zeros((1, 40, 14, 14), np.float32)),
                 (xp.astype(np.float64), U, None, y), (xp, U, np.zeros(5, np.float32), y),
                 (xp[:, :15].copy(), U, None, np.zeros((1, 24, 4, 7 * 13 // 4), np.float32),
                  True)]:
        with pytest.raises((ValueError, TypeError)):
            W3.run_forward(*args)
    for w in [np.zeros((32, 24, 3, 3), np.float32), np.zeros((32, 16, 5, 5), np.float32)]:
        with pytest.raises(ValueError):
            W3.transform_filters(w, 16)
    dyp = np.zeros((1, 14, 14, 32), np.float32)  # the 14 x 14 deltas of 24 channels
    assert W3.run_grad_weight(xp, dyp, 0, 0, 24, 16) is not None
    for args in [(xp, dyp[:, :13].copy(), 0, 0, 24, 16), (xp, dyp, 1, 0, 24, 16),
                 (xp, dyp, 0, -1, 24, 16), (xp, dyp[..., :16].copy(), 0, 0, 16, 16),
                 (xp, dyp, 0, 0, 40, 16), (xp, dyp, 0, 0, 24, 32),
                 (xp, dyp.astype(np.float64), 0, 0, 24, 16), (xp[..., :8].copy(), dyp, 0, 0,
                                                              24, 8),
                 (xp, dyp[0], 0, 0, 24, 16)]:
        with pytest.raises((ValueError, TypeError)):
            W3.run_grad_weight(*args)


def test_the_kernel_transforms_with_packed_fmas_and_stores_without_scatters():
    """The output transform, vectorised over channels, writes whole vectors into its
    stack tiles: packed FMAs, no gathers or scatters anywhere in the kernel."""
    import re

    import numba

    from fastconv import _jit

    f = numba.njit(parallel=True, fastmath=_jit.FASTMATH, cache=False)(
        W3.winograd43_tiles.py_func)
    x = np.zeros((1, 16, 16, 32), np.float32)
    U = np.zeros((36, 32, 64), np.float32)
    chk = np.zeros((W3.NCH, W3.VL), np.float32)
    y = np.zeros((1, 64, 14, 14), np.float32)
    f(x, U, np.zeros(64, np.float32), y, W5.kernel_constants(np.float32),
      W3.output_constants(np.float32), False, chk)
    asm = f.inspect_asm(f.signatures[0])
    assert len(re.findall(r"vfmadd\d+ps\s[^\n]*zmm", asm)) > 0
    assert "vscatter" not in asm and "vgather" not in asm


def test_the_dw_kernel_transforms_the_deltas_with_packed_fmas_and_no_gathers():
    """dW's delta transform, vectorised over channels (the edge tiles' zeroed rows and
    columns as selects, not branches per value), and the product: packed FMAs, no gathers
    or scatters."""
    import re

    import numba

    from fastconv import _jit

    f = numba.njit(parallel=True, fastmath=_jit.FASTMATH, cache=False)(
        W3.winograd43_dw.py_func)
    x = np.zeros((1, 16, 16, 32), np.float32)
    dy = np.zeros((1, 14, 14, 64), np.float32)
    part = np.zeros((1, 32, 36, 64), np.float32)
    f(x, dy, 0, 0, part, W5.kernel_constants(np.float32))
    asm = f.inspect_asm(f.signatures[0])
    assert len(re.findall(r"vfmadd\d+ps\s[^\n]*zmm", asm)) > 0
    assert "vscatter" not in asm and "vgather" not in asm
