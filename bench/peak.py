"""The machine's measured fp32 FMA peak, the yardstick for target 3 of the performance issue.

    python bench/peak.py

A Numba kernel runs independent packed FMA chains (12 rows x 32 lanes, in registers
through ``fastconv._jit.stack_tile``) on every thread, with no memory traffic; its
GF/s is the most that Numba-generated code can reach on this machine.
"""

from __future__ import annotations

import time

import numba
import numpy as np
from numba import prange

from fastconv._jit import FASTMATH, stack_tile

ROWS, LANES = 12, 32  # 24 zmm accumulators: more independent chains than FMA latency needs


@numba.njit(parallel=True, fastmath=FASTMATH)
def _fma_chains(out, iters):
    for t in prange(out.shape[0]):
        acc = stack_tile(ROWS, LANES, out.dtype)
        for a in range(ROWS):
            for k in range(LANES):
                acc[a, k] = 0
        m = np.float32(0.9999999)
        c = np.float32(1e-7)
        for _ in range(iters):
            for k in range(LANES):
                acc[0, k] = acc[0, k] * m + c
                acc[1, k] = acc[1, k] * m + c
                acc[2, k] = acc[2, k] * m + c
                acc[3, k] = acc[3, k] * m + c
                acc[4, k] = acc[4, k] * m + c
                acc[5, k] = acc[5, k] * m + c
                acc[6, k] = acc[6, k] * m + c
                acc[7, k] = acc[7, k] * m + c
                acc[8, k] = acc[8, k] * m + c
                acc[9, k] = acc[9, k] * m + c
                acc[10, k] = acc[10, k] * m + c
                acc[11, k] = acc[11, k] * m + c
        total = 0.0
        for a in range(ROWS):
            for k in range(LANES):
                total += acc[a, k]
        out[t] = total


def measured_peak(threads: int | None = None, seconds: float = 0.3, reps: int = 5) -> float:
    """Best GF/s over ``reps`` runs of about ``seconds`` each, one chain set per thread."""
    n = threads or numba.get_num_threads()
    out = np.zeros(n, np.float32)
    _fma_chains(out, 10)  # compile
    iters = 100_000
    while True:
        t0 = time.perf_counter()
        _fma_chains(out, iters)
        if time.perf_counter() - t0 > seconds / 4:
            break
        iters *= 2
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        _fma_chains(out, iters)
        dt = time.perf_counter() - t0
        best = max(best, n * iters * ROWS * LANES * 2 / dt / 1e9)
    return best


if __name__ == "__main__":
    print(f"measured fp32 FMA peak, {numba.get_num_threads()} threads: {measured_peak():.0f} GF/s")
