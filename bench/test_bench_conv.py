"""pytest-benchmark suite: fastconv vs NumPy im2col + BLAS vs PyTorch, per shape and pass.

    pytest bench                                      # run; saved to .benchmarks/ (conftest)
    pytest bench --benchmark-compare                  # compare with the last saved run
    pytest bench --benchmark-disable                  # run each once, as plain tests (CI)

Each (shape, pass) is one benchmark group, so the report puts the implementations side by
side; ``extra_info`` records GF/s.  ``bench/report.py`` gives ratios measured interleaved.
"""

import numpy as np
import pytest

import cases


@pytest.fixture(scope="module", autouse=True)
def _threads():
    cases.sync_threads()


@pytest.fixture(scope="module")
def expected():
    """The NumPy baseline's answer per (shape, pass): every implementation must match it."""
    memo = {}

    def get(case, pass_):
        if (case, pass_) not in memo:
            memo[case, pass_] = np.asarray(cases.numpy_pass(pass_)(case, cases.make_arrays(case)))
        return memo[case, pass_]

    return get


# The baseline exists only in report.py --baseline runs.
@pytest.mark.parametrize("impl", [i for i in cases.IMPLS if i != "baseline"])
@pytest.mark.parametrize("pass_", cases.PASSES)
@pytest.mark.parametrize("case", cases.CASES, ids=lambda c: c.name)
def test_conv(benchmark, case, pass_, impl, expected):
    fn = cases.IMPLS[impl](pass_)
    if fn is None:
        pytest.skip(f"{impl} is not installed")
    arrays = cases.make_arrays(case)
    fn(case, arrays)  # warm up: JIT compilation and thread pools are not timed
    benchmark.group = f"{case.name} {pass_}"
    benchmark.extra_info["flops"] = case.flops()
    result = np.asarray(benchmark(fn, case, arrays))
    if not benchmark.disabled:
        benchmark.extra_info["gflops"] = case.flops() / benchmark.stats.stats.median / 1e9
    want = expected(case, pass_)
    scale = np.abs(want).max()
    np.testing.assert_allclose(result, want, rtol=0, atol=1e-4 * scale)
