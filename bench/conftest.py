"""Benchmark history: every timed run of ``pytest bench`` is saved (pytest-benchmark's
autosave) to ``.benchmarks/``, so that ``pytest bench --benchmark-compare`` shows the change
against the previous run and ``--benchmark-compare-fail=median:10%`` can guard it.
``--benchmark-disable`` (CI) saves nothing; ``--benchmark-save NAME`` names a run instead.
The timings run with :func:`cases.steady_malloc`, as the report does.
"""

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    import cases

    cases.steady_malloc()
    opt = config.option
    if hasattr(opt, "benchmark_autosave") and not (opt.benchmark_disable or opt.benchmark_save
                                                   or opt.benchmark_autosave):
        from pytest_benchmark.utils import get_tag

        opt.benchmark_autosave = get_tag()  # what --benchmark-autosave stores: commit + time
