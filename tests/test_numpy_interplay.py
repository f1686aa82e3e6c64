"""NumPy code around fastconv: the remedies README gives for a loop that alternates NumPy
matrix products and convolutions.

OpenBLAS's workers busy-wait for about 2**28 cycles (~0.1 s) after each product, and take
a core from the convolution that follows (``bench/interplay.py`` measures the loop).
These tests check what the remedies do to the threads, not their speed: a busy-waiting
worker shows as CPU time the process burns while its main thread sleeps (50 ms per
spinning worker in a 50 ms sleep), a sleeping one does not.  Each case runs in a fresh
process, since OpenBLAS and libgomp read their environment when they load.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

threadpoolctl = pytest.importorskip("threadpoolctl")

#: Prints the CPU milliseconds burnt in 50 ms of sleep after ``work()`` (median of 5).
_PROBE = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    import fastconv as fc

    a = np.random.default_rng(0).standard_normal((512, 512), dtype=np.float32)
    x = np.random.default_rng(1).standard_normal((64, 32, 14, 14), dtype=np.float32)
    w = np.random.default_rng(2).standard_normal((64, 32, 5, 5), dtype=np.float32)
    work = {"product": lambda: a @ a, "conv": lambda: fc.conv2d(x, w, padding=2)}[sys.argv[1]]
    burnt = []
    for _ in range(6):
        work()
        c0 = time.process_time()
        time.sleep(0.05)
        burnt.append((time.process_time() - c0) * 1e3)
    print(json.dumps(sorted(burnt[1:])[2]))
""")


def _idle_cpu_ms(work: str, **env) -> float:
    # libgomp's default wait policy, not the passive one conftest sets for the test run.
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", _PROBE, work], capture_output=True,
                         text=True, check=True, env={**base, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


def _openblas_threads() -> int:
    pools = [p for p in threadpoolctl.threadpool_info() if p["internal_api"] == "openblas"]
    return max((p["num_threads"] for p in pools), default=0)


needs_threaded_openblas = pytest.mark.skipif(
    _openblas_threads() < 2 or (os.cpu_count() or 1) < 2,
    reason="NumPy's BLAS is not a multi-threaded OpenBLAS here")


@needs_threaded_openblas
def test_a_short_openblas_thread_timeout_lets_its_workers_sleep_after_a_product():
    # README's first remedy: OPENBLAS_THREAD_TIMEOUT=4 (2**4 cycles) before Python starts.
    assert _idle_cpu_ms("product", OPENBLAS_THREAD_TIMEOUT="4") < 15


@needs_threaded_openblas
def test_limiting_blas_to_one_thread_leaves_no_worker_spinning():
    # README's second remedy: the loop inside threadpool_limits(1, "blas").
    assert _idle_cpu_ms("product", OPENBLAS_NUM_THREADS="1") < 15


def test_fastconvs_threads_sleep_soon_after_a_convolution():
    # The other side: libgomp's workers spin for 300k iterations (well under a
    # millisecond) and then sleep, so they take nothing from the NumPy code that follows.
    assert _idle_cpu_ms("conv") < 15


def test_readmes_threadpool_limits_snippet_runs_and_limits_blas(rng):
    import fastconv as fc

    x = rng.standard_normal((2, 3, 9, 9), dtype=np.float32)
    w = rng.standard_normal((4, 3, 3, 3), dtype=np.float32)
    expected = fc.conv2d(x, w, padding=1)
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        inside = [p["num_threads"] for p in threadpoolctl.threadpool_info()
                  if p["user_api"] == "blas"]
        y = fc.conv2d(x, w, padding=1)
        h = x.reshape(2, -1) @ x.reshape(2, -1).T
    assert all(n == 1 for n in inside)
    np.testing.assert_array_equal(y, expected)
    assert h.shape == (2, 2)
