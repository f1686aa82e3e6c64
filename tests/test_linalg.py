"""fastconv.linalg.matmul against NumPy in float64, and the Linear layer that uses it."""

import numpy as np
import pytest

from fastconv import kernels as K
from fastconv.linalg import matmul
from fastconv.nn import Linear


@pytest.fixture
def kernel_calls(monkeypatch):
    """How often the Numba kernel ran (it still runs)."""
    calls = []
    real = K.matmul_tiles

    def spy(a, b, c):
        calls.append((a.shape, b.shape))
        return real(a, b, c)

    monkeypatch.setattr(K, "matmul_tiles", spy)
    return calls


def _check(a, b, got):
    want = a.astype(np.float64) @ b.astype(np.float64)
    assert got.shape == want.shape and got.flags.c_contiguous
    scale = np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64) + 1e-30
    assert np.all(np.abs(got - want) <= 1e-5 * scale)


# Rows around the 6-row tile (M - 1 repeated in the last block), reductions of 0, 1 and
# odd lengths, columns of exactly one and several 64-column blocks, and leftovers past them.
@pytest.mark.parametrize("M", [1, 5, 6, 7, 13, 64])
@pytest.mark.parametrize("Q", [0, 1, 17])
@pytest.mark.parametrize("Nc", [64, 100, 192])
def test_float32_products_match_numpy(M, Q, Nc, kernel_calls):
    rng = np.random.default_rng(M * 1000 + Q * 10 + Nc)
    a = rng.standard_normal((M, Q)).astype(np.float32)
    b = rng.standard_normal((Q, Nc)).astype(np.float32)
    got = matmul(a, b)
    assert got.dtype == np.float32
    _check(a, b, got)
    assert kernel_calls  # the full 64-column blocks ran on the kernel


def test_non_contiguous_operands_and_the_linear_layer_shapes(kernel_calls):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 3136)).astype(np.float32)
    w = rng.standard_normal((128, 3136)).astype(np.float32)
    dy = rng.standard_normal((64, 128)).astype(np.float32)
    _check(w, x.T, matmul(w, x.T))  # forward, y.T = w @ x.T
    _check(dy.T, x, matmul(dy.T, x))  # dW
    _check(dy, w, matmul(dy, w))  # dX
    _check(x[::2, ::3].T, x[::2, :64], matmul(x[::2, ::3].T, x[::2, :64]))
    assert len(kernel_calls) == 4


@pytest.mark.parametrize("dtypes", [(np.float32, np.float32), (np.float64, np.float64)])
@pytest.mark.parametrize("Nc", [64, 100, 30])
def test_out_receives_the_product_and_is_returned(dtypes, Nc, kernel_calls):
    rng = np.random.default_rng(Nc)
    a = rng.standard_normal((7, 9)).astype(dtypes[0])
    b = rng.standard_normal((9, Nc)).astype(dtypes[1])
    out = np.full((7, Nc), np.nan, dtypes[0])
    got = matmul(a, b, out=out)
    assert got is out
    _check(a, b, out)
    assert bool(kernel_calls) == (dtypes[0] == np.float32 and Nc >= K.MC)


def test_out_may_not_overlap_the_operands():
    a = np.ones((64, 64), np.float32)
    with pytest.raises(ValueError, match="must not share memory with a or b"):
        matmul(a, a.copy(), out=a)


@pytest.mark.parametrize("dtypes", [(np.float64, np.float64), (np.float32, np.float64),
                                    (np.float32, np.int64)])
def test_other_dtypes_run_on_numpy_in_numpy_result_dtype(dtypes, kernel_calls):
    rng = np.random.default_rng(2)
    a = (rng.standard_normal((7, 5)) * 4).astype(dtypes[0])
    b = (rng.standard_normal((5, 130)) * 4).astype(dtypes[1])
    if np.issubdtype(dtypes[1], np.integer):
        with pytest.warns(UserWarning, match="integer and bool arrays in float64"):
            got = matmul(a, b)
    else:
        got = matmul(a, b)
    assert got.dtype == np.result_type(*dtypes)
    np.testing.assert_array_equal(got, a @ b)
    assert not kernel_calls


def test_narrow_products_run_on_numpy(kernel_calls):
    a = np.ones((3, 4), np.float32)
    np.testing.assert_array_equal(matmul(a, np.ones((4, 63), np.float32)), np.full((3, 63), 4))
    assert not kernel_calls


def test_nan_and_inf_propagate_to_the_outputs_they_touch():
    a = np.ones((7, 3), np.float32)
    b = np.ones((3, 128), np.float32)
    a[6, 1] = np.nan  # the last row block, which repeats row 6 for its missing rows
    b[2, 70] = np.inf
    got = matmul(a, b)
    assert np.isnan(got[6]).all() and not np.isnan(got[:6]).any()
    assert np.isposinf(got[:6, 70]).all()
    assert np.isfinite(np.delete(got[:6], 70, axis=1)).all()


@pytest.mark.parametrize("a_shape, b_shape", [((3, 4), (5, 64)), ((3,), (3, 64)),
                                              ((2, 3, 4), (4, 64))])
def test_shape_errors_name_the_shapes(a_shape, b_shape):
    with pytest.raises(ValueError, match=rf"\(M, Q\) and \(Q, N\).*{a_shape[0]}"):
        matmul(np.ones(a_shape, np.float32), np.ones(b_shape, np.float32))


@pytest.mark.parametrize("N", [1, 64, 70])
def test_linear_layer_matches_its_float64_twin(N, kernel_calls):
    rng = np.random.default_rng(N)
    lin = Linear(300, 130, rng=rng)
    twin = Linear(300, 130, dtype=np.float64)
    twin.load_state_dict({k: v.astype(np.float64) for k, v in lin.state_dict().items()})
    x = rng.standard_normal((N, 300)).astype(np.float32)
    dy = rng.standard_normal((N, 130)).astype(np.float32)
    y, y64 = lin(x), twin(x.astype(np.float64))
    np.testing.assert_allclose(y, y64, rtol=1e-4, atol=1e-4)
    dx, dx64 = lin.backward(dy), twin.backward(dy.astype(np.float64))
    np.testing.assert_allclose(dx, dx64, rtol=1e-4, atol=1e-4)
    for name in ("weight", "bias"):
        assert lin.grads[name].dtype == np.float32
        np.testing.assert_allclose(lin.grads[name], twin.grads[name], rtol=1e-4, atol=1e-4)
    assert y.flags.c_contiguous and dx.shape == x.shape
    assert kernel_calls  # dX and dW have 300 and 130 columns


@pytest.mark.parametrize("shape", [(4, 9), (5, 10), (4,)])
def test_linear_backward_checks_the_delta_shape(shape):
    lin = Linear(6, 10)
    lin(np.ones((4, 6), np.float32))
    with pytest.raises(ValueError, match=r"grad_output of shape .*\(4, 10\)"):
        lin.backward(np.ones(shape, np.float32))
    assert "weight" not in lin.grads


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_linear_writes_its_gradients_into_offered_arrays(dtype):
    """``Module._grad_into`` (what fastconv.dist.GradientSync offers): written in place
    while no gradient is held, added to a held one, ignored in another dtype."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 70)).astype(dtype)
    dy = rng.standard_normal((5, 64)).astype(dtype)
    plain = Linear(70, 64, dtype=dtype)
    plain(x)
    plain.backward(dy)
    lin = Linear(70, 64, dtype=dtype)
    offered = {"weight": np.full((64, 70), np.nan, dtype), "bias": np.full(64, np.nan, dtype)}
    lin._grad_into = offered
    lin(x)
    lin.backward(dy)
    for k in offered:
        assert lin.grads[k] is offered[k]
        np.testing.assert_array_equal(offered[k], plain.grads[k])
    lin(x)
    lin.backward(dy)  # held: added, still in the offered arrays
    for k in offered:
        assert lin.grads[k] is offered[k]
        np.testing.assert_allclose(offered[k], 2 * plain.grads[k], rtol=1e-6)
    lin.zero_grad()
    other = np.float64 if dtype == np.float32 else np.float32
    lin._grad_into = {k: v.astype(other) for k, v in offered.items()}
    lin(x)
    lin.backward(dy)
    for k in offered:
        assert lin.grads[k].dtype == dtype and not np.shares_memory(lin.grads[k],
                                                                     lin._grad_into[k])
        np.testing.assert_array_equal(lin.grads[k], plain.grads[k])
