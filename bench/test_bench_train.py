"""pytest-benchmark: one training step of the MNIST two-conv network, batch 64, SGD with
momentum, fastconv vs PyTorch.  ``extra_info`` records samples/s."""

import math

import pytest

import cases


@pytest.mark.parametrize("impl", list(cases.TRAINERS))
def test_train_step(benchmark, impl):
    cases.sync_threads()
    step = cases.TRAINERS[impl](batch=64)
    if step is None:
        pytest.skip(f"{impl} is not installed")
    with cases.blas_single_thread():
        step()  # warm up: JIT compilation, thread pools
        benchmark.group = "two-conv train step, batch 64"
        loss = benchmark(step)
    assert math.isfinite(loss)
    if not benchmark.disabled:
        benchmark.extra_info["samples_per_second"] = 64 / benchmark.stats.stats.median
