"""The same grid against PyTorch, when it is installed (``pip install -e '.[bench]'``)."""

import numpy as np
import pytest

from conftest import random_problem
from test_kernels import GRID

torch = pytest.importorskip("torch")

import fastconv as fc  # noqa: E402


@pytest.fixture(params=["as-planned", "parallel"])
def paths(request):
    """The grid as the plans run it (small shapes: the serial kernels), and once more on
    the parallel algorithms (``parallel_paths``)."""
    if request.param == "parallel":
        request.getfixturevalue("parallel_paths")
    return request.param


@pytest.mark.filterwarnings("ignore:Using padding='same'")  # torch's own note on even kernels
@pytest.mark.parametrize("shape, conv", GRID)
def test_grid_against_torch(shape, conv, rng, paths):
    N, C, H, W, K, R, S, _ = shape
    x, w, b, dy = random_problem(rng, N, C, H, W, K, R, S, conv)
    tx = torch.from_numpy(x).requires_grad_()
    tw = torch.from_numpy(w).requires_grad_()
    tb = torch.from_numpy(b).requires_grad_()
    yt = torch.nn.functional.conv2d(tx, tw, tb, **conv)
    yt.backward(torch.from_numpy(dy))
    tol = dict(rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(fc.conv2d(x, w, b, **conv), yt.detach().numpy(), **tol)
    np.testing.assert_allclose(fc.conv2d_grad_input(dy, w, x.shape, **conv), tx.grad.numpy(), **tol)
    np.testing.assert_allclose(fc.conv2d_grad_weight(x, dy, w.shape, **conv), tw.grad.numpy(),
                               **tol)
    np.testing.assert_allclose(fc.conv2d_grad_bias(dy), tb.grad.numpy(), **tol)


@pytest.mark.parametrize("conv", [dict(stride=2, padding=1), dict(stride=(3, 2), padding=(0, 2),
                                                                   dilation=(1, 2))])
def test_torch_grad_functions(conv, rng):
    # torch.nn.grad takes the same arguments as ours, for integer padding.
    x, w, _, dy = random_problem(rng, 2, 3, 9, 8, 5, 3, 3, conv | {"groups": 1})
    tdy, tw, tx = map(torch.from_numpy, (dy, w, x))
    np.testing.assert_allclose(fc.conv2d_grad_input(dy, w, x.shape, **conv),
                               torch.nn.grad.conv2d_input(x.shape, tw, tdy, **conv).numpy(),
                               rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(fc.conv2d_grad_weight(x, dy, w.shape, **conv),
                               torch.nn.grad.conv2d_weight(tx, w.shape, tdy, **conv).numpy(),
                               rtol=1e-10, atol=1e-10)

