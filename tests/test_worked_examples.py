"""The classic worked examples (the 1-D example, on conv1d and conv2d; the 3x3 dX formula),
exactly, and the convolution as a sparse matrix product."""

import numpy as np
import pytest

import fastconv as fc
from fastconv import reference as ref


@pytest.mark.parametrize("impl", ["conv1d", "conv2d", "reference"])
def test_1d_example(impl):
    # Input [1,2,3], filter [0.3,0.5], stride 1, no padding, bias 0.
    x = np.array([1.0, 2.0, 3.0]).reshape(1, 1, 1, 3)
    w = np.array([0.3, 0.5]).reshape(1, 1, 1, 2)
    dy = np.array([-0.1, 0.2]).reshape(1, 1, 1, 2)
    if impl == "conv1d":  # (N, C, L) and (K, C, R)
        x, w, dy = x[:, :, 0], w[:, :, 0], dy[:, :, 0]
        y = fc.conv1d(x, w, np.zeros(1))
        dw = fc.conv1d_grad_weight(x, dy, w.shape)
        dx = fc.conv1d_grad_input(dy, w, x.shape)
        db = dy.sum(axis=(0, 2))
        assert y.shape == dy.shape and dw.shape == w.shape and dx.shape == x.shape
    elif impl == "conv2d":
        y = fc.conv2d(x, w, np.zeros(1))
        dw = fc.conv2d_grad_weight(x, dy, w.shape)
        dx = fc.conv2d_grad_input(dy, w, x.shape)
        db = fc.conv2d_grad_bias(dy)
    else:
        y = ref.conv2d_forward(x, w, np.zeros(1))
        dw = ref.conv2d_grad_weight(x, dy, w.shape)
        dx = ref.conv2d_grad_input(dy, w, x.shape)
        db = ref.conv2d_grad_bias(dy)
    np.testing.assert_allclose(y.ravel(), [1.3, 2.1], rtol=0, atol=1e-15)
    np.testing.assert_allclose(dw.ravel(), [0.3, 0.4], rtol=0, atol=1e-15)
    np.testing.assert_allclose(dx.ravel(), [-0.03, 0.01, 0.1], rtol=0, atol=1e-15)
    np.testing.assert_allclose(db, [0.1], rtol=0, atol=1e-15)


# 3x3 input, 2x2 filter, 1-based names as in the write-up.  Powers of two keep every
# product and sum exact in float64, so the checks are equalities.
X = {(i, j): 2.0 ** (3 * (i - 1) + j) for i in (1, 2, 3) for j in (1, 2, 3)}
Wt = {(1, 1): 3.0, (1, 2): 5.0, (2, 1): 7.0, (2, 2): 11.0}
D = {(1, 1): 0.5, (1, 2): -0.25, (2, 1): 0.125, (2, 2): -2.0}


def _arr(d, n):
    return np.array([[d[i, j] for j in range(1, n + 1)] for i in range(1, n + 1)])


def test_3x3_input_2x2_filter_term_by_term():
    xa = _arr(X, 3)[None, None]
    wa = _arr(Wt, 2)[None, None]
    da = _arr(D, 2)[None, None]
    y = fc.conv2d(xa, wa)[0, 0]
    dx = fc.conv2d_grad_input(da, wa, xa.shape)[0, 0]
    dw = fc.conv2d_grad_weight(xa, da, wa.shape)[0, 0]
    x, w, d = X, Wt, D
    # Forward: each output is the filter laid on the input, summed.
    assert y[0, 0] == x[1, 1] * w[1, 1] + x[1, 2] * w[1, 2] + x[2, 1] * w[2, 1] + x[2, 2] * w[2, 2]
    assert y[1, 1] == x[2, 2] * w[1, 1] + x[2, 3] * w[1, 2] + x[3, 2] * w[2, 1] + x[3, 3] * w[2, 2]
    # dX = zero-padded deltas correlated with the 180-degree rotated filter.
    assert dx[1, 1] == d[1, 1] * w[2, 2] + d[1, 2] * w[2, 1] + d[2, 1] * w[1, 2] + d[2, 2] * w[1, 1]
    assert dx[0, 0] == d[1, 1] * w[1, 1]
    assert dx[0, 1] == d[1, 1] * w[1, 2] + d[1, 2] * w[1, 1]
    assert dx[0, 2] == d[1, 2] * w[1, 2]
    assert dx[1, 0] == d[1, 1] * w[2, 1] + d[2, 1] * w[1, 1]
    assert dx[1, 2] == d[1, 2] * w[2, 2] + d[2, 2] * w[1, 2]
    assert dx[2, 0] == d[2, 1] * w[2, 1]
    assert dx[2, 1] == d[2, 1] * w[2, 2] + d[2, 2] * w[2, 1]
    assert dx[2, 2] == d[2, 2] * w[2, 2]
    # dW = the input correlated with the deltas.
    for r in (1, 2):
        for s in (1, 2):
            expected = sum(x[i + r - 1, j + s - 1] * d[i, j] for i in (1, 2) for j in (1, 2))
            assert dw[r - 1, s - 1] == expected


def test_stride_2_dx_is_full_convolution_of_zero_inserted_deltas():
    # For stride S, insert S-1 zeros between the deltas, then the stride-1 rule applies.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 1, 5, 5))
    w = rng.standard_normal((1, 1, 3, 3))
    dy = rng.standard_normal((1, 1, 2, 2))
    dx = fc.conv2d_grad_input(dy, w, x.shape, stride=2)
    dilated = np.zeros((3, 3))
    dilated[::2, ::2] = dy[0, 0]  # [[d11, 0, d12], [0, 0, 0], [d21, 0, d22]]
    padded = np.pad(dilated, 2)
    rot = w[0, 0, ::-1, ::-1]
    expected = np.array([[np.sum(padded[h:h + 3, v:v + 3] * rot) for v in range(5)]
                         for h in range(5)])
    np.testing.assert_allclose(dx[0, 0], expected, rtol=1e-13, atol=1e-13)


def _conv_matrix(w2d, H, W, stride, padding):
    """The (OH*OW x H*W) matrix M with forward = M @ x.ravel(); rows share the weights."""
    R, S = w2d.shape
    g = fc.conv_geometry((1, 1, H, W), (1, 1, R, S), stride, padding)
    M = np.zeros((g.OH * g.OW, H * W))
    for i in range(g.OH):
        for j in range(g.OW):
            for r in range(R):
                for s in range(S):
                    h, v = i * g.sh + r - g.pt, j * g.sw + s - g.pl
                    if 0 <= h < H and 0 <= v < W:
                        M[i * g.OW + j, h * W + v] = w2d[r, s]
    return M, g


@pytest.mark.parametrize("H, W, R, S, stride, padding",
                         [(3, 3, 2, 2, 1, 0), (5, 5, 3, 3, 2, 1), (6, 4, 3, 2, (2, 1), (1, 0))])
def test_convolution_as_sparse_matrix(H, W, R, S, stride, padding):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((1, 1, R, S))
    x = rng.standard_normal((1, 1, H, W))
    M, g = _conv_matrix(w[0, 0], H, W, stride, padding)
    y = fc.conv2d(x, w, stride=stride, padding=padding)
    np.testing.assert_allclose(y.ravel(), M @ x.ravel(), rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(y.shape)
    dx = fc.conv2d_grad_input(dy, w, x.shape, stride=stride, padding=padding)
    np.testing.assert_allclose(dx.ravel(), M.T @ dy.ravel(), rtol=1e-12, atol=1e-12)
    # Weight sharing: only the R*S filter values fill M.
    assert set(np.unique(M[M != 0])) <= set(w.ravel())
    if (H, W, R, S) == (3, 3, 2, 2):
        assert len(np.unique(M[M != 0])) == 4
