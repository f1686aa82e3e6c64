"""Max and average pooling against the reference, torch, ties, NaN and bad input."""

import itertools
import re

import numpy as np
import pytest

from fastconv import pool
from fastconv import reference as ref

CONFIGS = [
    (H, W, k, s, p)
    for (H, W), k, s, p in itertools.product([(28, 28), (7, 9), (5, 4), (1, 3)],
                                             [1, 2, 3, (2, 3)], [None, 1, 2, (1, 2)],
                                             [0, 1, (1, 0)])
    if (lambda kk, pp: pp[0] <= kk[0] // 2 and pp[1] <= kk[1] // 2)(
        pool._pair("k", k, 1), pool._pair("p", p, 0))
    and H + 2 * pool._pair("p", p, 0)[0] >= pool._pair("k", k, 1)[0]
    and W + 2 * pool._pair("p", p, 0)[1] >= pool._pair("k", k, 1)[1]
]


def _norm(k, s, p):
    kk = pool._pair("k", k, 1)
    return kk, kk if s is None else pool._pair("s", s, 1), pool._pair("p", p, 0)


@pytest.mark.parametrize("H, W, k, s, p", CONFIGS)
def test_against_reference(H, W, k, s, p, rng):
    x = rng.standard_normal((2, 3, H, W))
    y, idx = pool.max_pool2d(x, k, s, p, return_indices=True)
    ry, ridx = ref.max_pool2d(x, *_norm(k, s, p))
    np.testing.assert_array_equal(y, ry)
    np.testing.assert_array_equal(idx, ridx)
    dy = rng.standard_normal(y.shape)
    np.testing.assert_allclose(pool.max_pool2d_backward(dy, idx, x.shape),
                               ref.max_pool2d_backward(dy, ridx, x.shape), rtol=1e-14)
    ya = pool.avg_pool2d(x, k, s, p)
    np.testing.assert_allclose(ya, ref.avg_pool2d(x, *_norm(k, s, p)), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(pool.avg_pool2d_backward(dy, x.shape, k, s, p),
                               ref.avg_pool2d_backward(dy, x.shape, *_norm(k, s, p)),
                               rtol=1e-13, atol=1e-15)


def test_config_grid_is_large():
    assert len(CONFIGS) > 100


def test_ties_go_to_the_first_maximum():
    x = np.array([[[[1.0, 3.0, 3.0], [3.0, 0.0, 3.0]]]])
    y, idx = pool.max_pool2d(x, (2, 3), return_indices=True)
    assert y.ravel().tolist() == [3.0] and idx.ravel().tolist() == [1]
    dx = pool.max_pool2d_backward(np.array([[[[5.0]]]]), idx, x.shape)
    assert dx.tolist() == [[[[0.0, 5.0, 0.0], [0.0, 0.0, 0.0]]]]


def test_overlapping_windows_accumulate():
    x = np.array([[[[0.0, 9.0, 0.0, 0.0]]]])
    y, idx = pool.max_pool2d(x, (1, 2), stride=1, return_indices=True)
    dx = pool.max_pool2d_backward(np.ones(y.shape), idx, x.shape)
    assert dx.ravel().tolist() == [0.0, 2.0, 1.0, 0.0]


def test_nan_wins_max_pool():
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    x[0, 0, 0, 1] = np.nan
    y = pool.max_pool2d(x, 2)
    assert np.isnan(y[0, 0, 0, 0]) and np.isfinite(y.ravel()[1:]).all()


@pytest.mark.filterwarnings("ignore:fastconv computes integer")  # test_functional.py tests it
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtypes_preserved(dtype):
    x = np.ones((1, 2, 4, 4), dtype)
    assert pool.max_pool2d(x, 2).dtype == dtype and pool.avg_pool2d(x, 2).dtype == dtype
    assert pool.max_pool2d(x.astype(int), 2).dtype == np.float64


def test_finite_differences_avg_and_max(rng):
    x = rng.standard_normal((1, 2, 5, 6))
    g = rng.standard_normal((1, 2, 3, 4))  # 5x6 pooled by 2, stride 2, padding 1
    for fwd, bwd in [
        (lambda a: pool.avg_pool2d(a, 2, 2, 1),
         lambda: pool.avg_pool2d_backward(g, x.shape, 2, 2, 1)),
        (lambda a: pool.max_pool2d(a, 2, 2, 1),
         lambda: pool.max_pool2d_backward(g, pool.max_pool2d(x, 2, 2, 1, True)[1], x.shape)),
    ]:
        num = np.zeros_like(x)
        for i in np.ndindex(x.shape):
            e = np.zeros_like(x)
            e[i] = 1e-6
            num[i] = (np.sum(fwd(x + e) * g) - np.sum(fwd(x - e) * g)) / 2e-6
        np.testing.assert_allclose(bwd(), num, rtol=1e-6, atol=1e-8)


def test_against_torch(rng):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((2, 3, 9, 7))
    tx = torch.from_numpy(x).requires_grad_()
    for k, s, p in [(2, None, 0), (3, 2, 1), ((3, 2), (1, 2), (1, 1))]:
        yt, it = torch.nn.functional.max_pool2d(tx, k, s, p, return_indices=True)
        y, idx = pool.max_pool2d(x, k, s, p, return_indices=True)
        np.testing.assert_array_equal(y, yt.detach().numpy())
        np.testing.assert_array_equal(idx, it.numpy())
        ya = torch.nn.functional.avg_pool2d(tx, k, s, p)
        np.testing.assert_allclose(pool.avg_pool2d(x, k, s, p), ya.detach().numpy(), rtol=1e-13)


X = np.zeros((2, 3, 6, 6))


@pytest.mark.parametrize("call, exc, message", [
    (lambda: pool.max_pool2d(X[0], 2), ValueError, "input must be 4-D (N, C, H, W), got shape"),
    (lambda: pool.max_pool2d(X, 0), ValueError, "kernel_size must be >= 1, got 0"),
    (lambda: pool.max_pool2d(X, 2, stride=0), ValueError, "stride must be >= 1, got 0"),
    (lambda: pool.max_pool2d(X, 2, padding=2), ValueError,
     "padding (2, 2) must be at most half the kernel size (2, 2)"),
    (lambda: pool.avg_pool2d(X, 7), ValueError,
     "output size would be 0x0 (< 1): input 6x6 with padding (0, 0) is smaller than the "
     "pooling window 7x7"),
    (lambda: pool.avg_pool2d(X.astype(complex), 2), TypeError, "input must be a real numeric"),
    (lambda: pool.max_pool2d_backward(np.zeros((2, 3, 3, 3)), np.zeros((2, 3, 3, 2), int),
                                      X.shape), ValueError,
     "indices must be integers of the grad_output shape (2, 3, 3, 3)"),
    (lambda: pool.max_pool2d_backward(np.zeros((2, 3, 3, 3)), np.full((2, 3, 3, 3), 36),
                                      X.shape), ValueError,
     "indices must lie in [0, H*W) = [0, 36), got values in [36, 36]"),
    (lambda: pool.max_pool2d_backward(np.zeros((2, 3, 3, 3)), np.zeros((2, 3, 3, 3), int),
                                      (1, 3, 6, 6)), ValueError, "differ in (N, C)"),
    (lambda: pool.avg_pool2d_backward(np.zeros((2, 3, 2, 3)), X.shape, 2), ValueError,
     "grad_output has shape (2, 3, 2, 3), but input_shape (2, 3, 6, 6) gives the pooled "
     "shape (2, 3, 3, 3)"),
])
def test_bad_input(call, exc, message):
    with pytest.raises(exc, match=re.escape(message)):
        call()
