"""Winograd F(2x2, 5x5): exact transforms, when it runs, its results against the float64
reference and against the direct kernels, non-finite values, thread counts."""

from __future__ import annotations

import re
from fractions import Fraction

import numba
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastconv as fc
from fastconv import _jit, conv
from fastconv.algorithms import winograd as W
from fastconv.algorithms import winograd as winograd_algorithm
from fastconv.algorithms import winograd_kernels as WK

from conftest import all_passes, check_filter_transform, reference_passes, winograd_enabled

# Winograd's dW on batches smaller than it is chosen for (config.WINOGRAD_DW_MIN_TILES).
pytestmark = pytest.mark.usefixtures("parallel_paths")


def _usable(geo, dtype) -> bool:
    """Whether plans run Winograd for this geometry (its rule, forward pass)."""
    return winograd_algorithm.why_not(geo, dtype, "forward") is None


PACKED_FMA = re.compile(r"vfmadd\d+ps\s[^\n]*zmm")


def _frac_vector(rng, n):
    return [Fraction(int(v), int(d)) for v, d in zip(rng.integers(-9, 10, n),
                                                     rng.integers(1, 7, n), strict=True)]


def _mat(m, v):
    return [sum(a * b for a, b in zip(row, v, strict=True)) for row in m]


def test_transforms_compute_the_correlation_exactly(rng):
    """F(2, 5): y = AT ((G g) * (BT d)); and F(5, 2) with A and G swapped, which is dW's
    formula: dw = G^T ((AT^T e) * (BT d)).  In fractions, with the scaled rows."""
    AT, G, BT, scale = W.transforms()
    A = [list(col) for col in zip(*AT, strict=True)]
    GT = [list(col) for col in zip(*G, strict=True)]
    for _ in range(20):
        d, g, e = _frac_vector(rng, 6), _frac_vector(rng, 5), _frac_vector(rng, 2)
        y = _mat(AT, [a * b for a, b in zip(_mat(G, g), _mat(BT, d), strict=True)])
        assert y == [sum(d[i + k] * g[k] for k in range(5)) for i in range(2)]
        dw = _mat(GT, [a * b for a, b in zip(_mat(A, e), _mat(BT, d), strict=True)])
        assert dw == [sum(d[i + r] * e[i] for i in range(2)) for r in range(5)]
    # The scaling made BT small integers (what the kernels hard-code).
    assert all(v.denominator == 1 and abs(v) <= 5 for row in BT for v in row)
    assert scale == [2, 6, 6, Fraction(15, 16), 30, 2]


def test_kernel_transforms_are_the_derived_matrices():
    AT, G, BT, _ = W.transforms()
    kc = W.kernel_constants(np.float64)
    eye = np.eye(6)
    bt = np.array([WK._bt6.py_func(*eye[j], kc) for j in range(6)]).T
    at = np.array([WK._at6.py_func(*eye[j], kc) for j in range(6)]).T
    a = np.array([WK._a6.py_func(*np.eye(2)[j], kc) for j in range(2)]).T
    np.testing.assert_array_equal(bt, np.array(BT, float))
    np.testing.assert_array_equal(at, np.array(AT, float))
    np.testing.assert_array_equal(a, np.array(AT, float).T)
    # The weight transforms: the unscaled V (G = diag(1/scale) V) and the scale products.
    scale = W.transforms()[3]
    V = np.array([[g * s for g in row] for row, s in zip(G, scale, strict=True)], float)
    v = np.array([WK._v6.py_func(*np.eye(5)[j]) for j in range(5)]).T
    vt = np.array([WK._vt5.py_func(*np.eye(6)[j]) for j in range(6)]).T
    np.testing.assert_array_equal(v, V)
    np.testing.assert_array_equal(vt, V.T)
    np.testing.assert_array_equal(W._GS, [float(1 / (a * b)) for a in scale for b in scale])



@pytest.mark.parametrize("P, C, CP, K, KP", [
    (2, 32, 32, 64, 64),  # MNIST conv2 at batch 1: whole blocks of 16 filters
    (3, 20, 32, 33, 64),  # an odd number of chunks, a partial block, padded channels
    (1, 16, 16, 7, 32),  # one chunk, K below one block
])
def test_dw_transform_is_float64_rounded_once(P, C, CP, K, KP, rng):
    """dW = G^T (sum of the chunks) G in float64, rounded once to float32; the check
    stays finite."""
    part = (rng.standard_normal((P, CP, 36, KP)) * 100).astype(np.float32)
    dw = np.empty((K, C, 5, 5), np.float32)
    chk = np.zeros((WK.TCH, WK.FB), np.float32)
    WK.dw_transform(part, W._GS, W.kernel_constants(np.float32), dw, chk)
    S = part.astype(np.float64).sum(0)[:C, :, :K].reshape(C, 6, 6, K)
    G = np.array(W.transforms()[1], float)
    want = np.einsum("xr,cxyk,ys->kcrs", G, S, G)
    scale = np.einsum("xr,cxyk,ys->kcrs", np.abs(G), np.abs(S), np.abs(G))
    assert (np.abs(dw - want) <= 2.0**-24 * np.abs(want) + 1e-12 * scale).all()
    assert np.isfinite(chk).all()

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_transpose16_moves_a_block_through_registers(dtype):
    @numba.njit
    def run(src, so, ss, dst, do, ds):
        _jit.transpose16(src, so, ss, dst, do, ds)

    src = np.arange(2000, dtype=dtype)
    for so, ss, do, ds in [(0, 16, 0, 16), (7, 40, 3, 25), (5, 25, 16 * 24 + 1, -16)]:
        dst = np.full(2000, -1, dtype)
        run(src, so, ss, dst, do, ds)
        want = np.full(2000, -1, dtype)
        for r in range(16):
            want[do + ds * np.arange(16) + r] = src[so + ss * r:so + ss * r + 16]
        np.testing.assert_array_equal(dst, want)
    # In registers: whole-vector loads, stores and two-row shuffles, no scalar moves.
    asm = run.inspect_asm(run.signatures[0])
    shuffles = re.findall(r"^\s+v(?:perm|shuf|unpck|insert)\w*\s[^\n]*zmm", asm, re.M)
    assert 48 <= len(shuffles) <= 80 * (dst.itemsize // 4), len(shuffles)
    assert not re.search(r"vmovs[sd]\s|gather", asm)


@pytest.mark.parametrize("K, C, CP, rotate, dtype, strided", [
    (64, 32, 32, False, np.float32, False),  # MNIST conv2's forward pass: whole blocks
    (64, 32, 64, True, np.float32, False),  # and its dX
    (33, 20, 48, False, np.float32, False),  # a partial block, padding rows and columns
    (33, 20, 48, True, np.float32, False),  # rotated: partial block, padding
    (7, 16, 16, True, np.float64, False),  # float64 weights, read as they are
    (40, 16, 16, False, np.float32, True),  # a strided view: copied contiguous
])
def test_filter_transform_is_float64_rounded_once(K, C, CP, rotate, dtype, strided, rng):
    """U is G f G^T in float64 rounded once to float32 (within half an ulp of the exact
    value plus float64 noise), for every filter f, zero past the channels."""
    check_filter_transform(lambda w, CP, rotate: W.transform_filters(w, CP, np.float32, rotate),
                           5, K, C, CP, rotate, dtype, strided, rng)


def _geo(N=64, C=32, H=14, Wd=14, K=64, R=5, S=5, **conv_args):
    conv_args = dict(dict(padding=2), **conv_args)
    return fc.conv_geometry((N, C, H, Wd), (K, C // conv_args.get("groups", 1), R, S),
                            **conv_args)


@pytest.mark.parametrize("geo, dtype, want", [
    (_geo(), np.float32, True),  # MNIST conv2
    (_geo(C=16, K=5, H=20, Wd=16, padding=(1, 3)), np.float32, True),
    (_geo(padding=4), np.float32, True),
    (_geo(), np.float64, False),  # fp64 keeps the direct kernels
    (_geo(groups=2), np.float32, False),
    (_geo(R=3, S=3, padding=1), np.float32, False),
    (_geo(stride=2), np.float32, False),
    (_geo(dilation=2, padding=4), np.float32, False),
    (_geo(H=13, padding=2), np.float32, False),  # odd output height
    (_geo(Wd=12, padding=2), np.float32, False),  # output narrower than one task's tiles
    (_geo(Wd=12, padding=(2, 3)), np.float32, False),  # so is dX's output
    (_geo(C=20), np.float32, False),  # channels do not fill vectors of 16
    (_geo(padding=5), np.float32, False),
    (_geo(N=0), np.float32, True),  # the rule; an empty batch runs no algorithm at all
])
def test_where_winograd_runs(geo, dtype, want):
    assert _usable(geo, dtype) is want


def test_switch(rng):
    assert fc.get_winograd() is True
    with pytest.raises(TypeError, match="takes True or False, got 'no'"):
        fc.set_winograd("no")
    geo = _geo()
    try:
        fc.set_winograd(False)
        assert fc.get_winograd() is False and not _usable(geo, np.float32)
    finally:
        fc.set_winograd(True)
    assert _usable(geo, np.float32)


@pytest.fixture
def wino_calls(monkeypatch):
    """Names of the Winograd kernels that ran (they still run)."""
    calls = []
    for name in ("winograd_tiles", "winograd_dw"):
        real = getattr(WK, name)
        monkeypatch.setattr(WK, name, lambda *a, real=real, name=name:
                            calls.append(name) or real(*a))
    return calls


CASES = [  # (N, C, H, W, K, padding)
    (2, 32, 14, 14, 64, 2),  # MNIST conv2
    (3, 16, 16, 20, 40, 2),  # K off the 32-channel tile, rows of 2 tasks (shifted)
    (1, 48, 18, 14, 33, (1, 3)),  # padding different per axis
    (2, 16, 18, 18, 70, 0),  # no padding, K over two tiles plus a tail
    (1, 32, 14, 22, 7, (4, 0)),  # the most padding, K below one vector
]


def _scaled_close(got, want, rtol):
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


@pytest.mark.parametrize("N, C, H, Wd, K, pad", CASES)
def test_passes_against_reference(N, C, H, Wd, K, pad, rng, wino_calls):
    conv_args = dict(stride=1, padding=pad, dilation=1, groups=1)
    x = rng.standard_normal((N, C, H, Wd))
    w = rng.standard_normal((K, C, 5, 5)) * 0.2
    b = rng.standard_normal(K)
    geo = fc.conv_geometry(x.shape, w.shape, padding=pad)
    dy = rng.standard_normal((N, K, geo.OH, geo.OW))
    refs = reference_passes(x, w, b, dy, conv_args)
    passes = all_passes(*(a.astype(np.float32) for a in (x, w, b, dy)), conv_args)
    assert wino_calls == ["winograd_tiles", "winograd_tiles", "winograd_dw"]
    for got, want in zip(passes, refs, strict=True):
        assert got.dtype == np.float32 and got.shape == want.shape and got.flags.c_contiguous
        _scaled_close(got, want, 2e-5)


@pytest.mark.parametrize("N, C, H, Wd, K, pad", CASES[:3])
def test_pool_order_output(N, C, H, Wd, K, pad, rng, wino_calls):
    x = rng.standard_normal((N, C, H, Wd)).astype(np.float32)
    w = rng.standard_normal((K, C, 5, 5)).astype(np.float32)
    b = rng.standard_normal(K).astype(np.float32)
    y = fc.conv2d(x, w, b, padding=pad)
    y4, _, geo = conv.conv2d_saving(x, w, b, padding=pad, pool_order=True)
    assert wino_calls == ["winograd_tiles", "winograd_tiles"]
    np.testing.assert_array_equal(conv.from_pool_order(y4, geo.OH, geo.OW), y)


def test_rounding_error_is_of_the_direct_kernels_size(rng):
    """MNIST conv2, random data: the largest error against float64, Winograd over direct."""
    N, C, K, pad = 16, 32, 64, 2
    x = rng.standard_normal((N, C, 14, 14))
    w = rng.standard_normal((K, C, 5, 5)) * 0.1
    dy = rng.standard_normal((N, K, 14, 14))
    conv_args = dict(stride=1, padding=pad, dilation=1, groups=1)
    want = reference_passes(x, w, np.zeros(K), dy, conv_args)

    def errors():
        x32, w32, dy32 = (a.astype(np.float32) for a in (x, w, dy))
        got = all_passes(x32, w32, None, dy32, conv_args)
        return [np.abs(g - r).max() / np.abs(r).max() for g, r in zip(got, want, strict=True)]

    wino = errors()
    with winograd_enabled(False):
        direct = errors()
    ratio = np.array(wino) / np.array(direct)
    # Measured: forward and dX 1.0-1.5x, dW 4-8x (still ~5e-6 of the largest weight).
    assert ratio[0] < 3 and ratio[1] < 3 and ratio[2] < 20, (wino, direct)
    assert max(wino) < 2e-5


@pytest.mark.parametrize("where", ["x", "w", "dy"])
@pytest.mark.parametrize("value", [np.inf, np.nan, 3e38])
def test_non_finite_values_reach_the_same_outputs_as_direct(where, value, rng, direct_only):
    """An inf or NaN, or a value whose transform overflows, falls back to the direct
    kernels: they reach exactly the outputs the direct kernels give them."""
    x = rng.standard_normal((2, 16, 14, 14)).astype(np.float32)
    w = rng.standard_normal((16, 16, 5, 5)).astype(np.float32)
    dy = rng.standard_normal((2, 16, 14, 14)).astype(np.float32)
    {"x": x, "w": w, "dy": dy}[where][1, 3, 4, 4] = value

    def passes():
        return all_passes(x, w, None, dy, dict(stride=1, padding=2, dilation=1, groups=1))

    direct = passes()
    with winograd_enabled(True):
        wino = passes()
    for got, want in zip(wino, direct, strict=True):
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
        fin = np.isfinite(want)
        _scaled_close(got[fin], want[fin], 2e-5)


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_count_does_not_change_results(threads, rng):
    x = rng.standard_normal((5, 32, 14, 16)).astype(np.float32)
    w = rng.standard_normal((40, 32, 5, 5)).astype(np.float32)
    dy = rng.standard_normal((5, 40, 14, 16)).astype(np.float32)
    before = fc.get_num_threads()
    try:
        fc.set_num_threads(1)
        want = (fc.conv2d(x, w, padding=2), fc.conv2d_grad_weight(x, dy, w.shape, padding=2))
        fc.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        got = (fc.conv2d(x, w, padding=2), fc.conv2d_grad_weight(x, dy, w.shape, padding=2))
    finally:
        fc.set_num_threads(before)
    for g, wnt in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, wnt)


@given(N=st.integers(1, 3), C=st.sampled_from([16, 32]), K=st.integers(1, 70),
       OH=st.integers(1, 6).map(lambda v: 2 * v), OW=st.integers(7, 11).map(lambda v: 2 * v),
       pads=st.tuples(st.integers(0, 4), st.integers(0, 4)), seed=st.integers(0, 2**32 - 1))
def test_random_shapes_against_reference(N, C, K, OH, OW, pads, seed):
    rng = np.random.default_rng(seed)
    H, Wd = OH + 4 - 2 * pads[0], OW + 4 - 2 * pads[1]
    if H < 1 or Wd < 14:  # Winograd needs dX's output 14 wide too
        return
    x = rng.standard_normal((N, C, H, Wd))
    w = rng.standard_normal((K, C, 5, 5)) * 0.2
    b = rng.standard_normal(K)
    dy = rng.standard_normal((N, K, OH, OW))
    geo = fc.conv_geometry(x.shape, w.shape, padding=pads)
    assert _usable(geo, np.float32)
    conv_args = dict(stride=1, padding=pads, dilation=1, groups=1)
    want = reference_passes(x, w, b, dy, conv_args)
    x32, w32, b32, dy32 = (a.astype(np.float32) for a in (x, w, b, dy))
    got = all_passes(x32, w32, b32, dy32, conv_args)
    for g, r in zip(got, want, strict=True):
        _scaled_close(g, r, 2e-5)


def _fresh_serial(kernel):
    return numba.njit(fastmath=_jit.FASTMATH, cache=False)(kernel.py_func)


def _fma_loops(asm):
    """(FMAs, instructions, gathers) of every innermost loop with packed FMAs."""
    lines = asm.splitlines()
    labels = {line[:-1]: i for i, line in enumerate(lines) if re.match(r"^\.\w+:$", line)}
    out = []
    for i, line in enumerate(lines):
        jump = re.match(r"^\s+j\w+\s+(\.\w+)$", line)
        if jump and labels.get(jump.group(1), i) < i:
            body = lines[labels[jump.group(1)]:i + 1]
            fmas = sum(bool(PACKED_FMA.search(b)) for b in body)
            if fmas:
                out.append((fmas, len(body), sum("gather" in b for b in body)))
    return out


@pytest.mark.parametrize("name, args, fmas", [
    ("_product", lambda: (np.zeros(36 * WK.TT * 32, np.float32),
                          np.zeros(36 * 32 * 64, np.float32),
                          np.zeros(36 * WK.TT * 64, np.float32), 32, 64), 14),
    ("_dw_product", lambda: (np.zeros(36 * WK.TB * 32, np.float32),
                             np.zeros(36 * WK.TB * 64, np.float32),
                             np.zeros(36 * 32 * 64, np.float32), WK.TB, 32, 64), 16),
])
def test_products_are_packed_fma_loops(name, args, fmas):
    """The two products' inner loops: the register tile's FMAs on whole zmm vectors, no
    gathers, and few other instructions."""
    f = _fresh_serial(getattr(WK, name))
    f(*args())
    loops = _fma_loops(f.inspect_asm(f.signatures[0]))
    inner = min(loops, key=lambda L: L[1])
    assert inner[0] >= fmas and inner[2] == 0, loops
    assert inner[1] <= 3 * inner[0], loops


def test_forward_output_transform_stores_without_scatters():
    """The forward kernel's output transform, vectorised over channels, stores whole
    vectors into its stack tile: no scatters anywhere in the kernel (with the channels as
    the tile's rows it stored through vscatter, 1.07-1.11x slower)."""
    f = numba.njit(parallel=True, fastmath=_jit.FASTMATH, cache=False)(
        WK.winograd_tiles.py_func)
    x = np.zeros((1, 18, 18, 32), np.float32)
    U = np.zeros((36, 32, 64), np.float32)
    chk = np.zeros((WK.NCH, WK.VL), np.float32)
    for pool_order in (False, True):
        y = np.zeros((1, 64, 4, 49) if pool_order else (1, 64, 14, 14), np.float32)
        f(x, U, np.zeros(64, np.float32), y, np.zeros(6, np.float32), pool_order, chk)
    asm = f.inspect_asm(f.signatures[0])
    assert len(PACKED_FMA.findall(asm)) > 0
    assert "vscatter" not in asm
