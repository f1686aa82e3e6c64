"""NumPy code around fastconv: a loop that alternates a NumPy matrix product and a
convolution, against the two parts timed alone, under the thread settings that decide it.

Two thread pools share the cores in such a loop: OpenBLAS's (NumPy's ``@``) and the
OpenMP pool of Numba's ``omp`` threading layer (fastconv's kernels).  Each keeps its
workers busy-waiting for a while after a call, so that the next call starts at once; a
worker that spins while the *other* library computes takes a core from it.  Every
setting runs in a fresh process, because both libraries read their environment once,
when they load::

    python interplay.py                 # every setting, a Markdown table
    python interplay.py --reps 30

Columns: the matrix product alone, the convolution alone, their sum, one iteration of the
alternating loop, and ``loop / sum`` (1.00x: the two parts do not disturb each other).
"small conv" times a small parallel convolution alone, where waking the pool is a visible
part of the call (what a passive wait policy costs), and the last column is the CPU time
the process burns in a 50 ms sleep right after the loop: workers still busy-waiting
(50 ms per spinning worker).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

#: The settings compared: environment variables set before NumPy and Numba load, and
#: whether the loop runs inside ``threadpoolctl.threadpool_limits(1, "blas")``.
SETTINGS = {
    "default": ({}, False),
    "OPENBLAS_NUM_THREADS=1": ({"OPENBLAS_NUM_THREADS": "1"}, False),
    "threadpool_limits(1, 'blas')": ({}, True),
    "OMP_WAIT_POLICY=PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, False),
    "OPENBLAS_THREAD_TIMEOUT=4": ({"OPENBLAS_THREAD_TIMEOUT": "4"}, False),
    "both passive": ({"OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_THREAD_TIMEOUT": "4"}, False),
}


def measure(reps: int, blas_limit: bool) -> dict:
    """In this process: median milliseconds of the product alone, the convolution alone,
    one alternating iteration, and a small convolution alone, in interleaved rounds."""
    import contextlib
    import time

    import numpy as np

    import fastconv as fc

    rng = np.random.default_rng(0)
    a = rng.standard_normal((512, 512), dtype=np.float32)
    bm = rng.standard_normal((512, 512), dtype=np.float32)
    # MNIST conv2's forward pass at batch 64, and a depthwise layer at batch 1 (~30 us).
    x = rng.standard_normal((64, 32, 14, 14), dtype=np.float32)
    w = rng.standard_normal((64, 32, 5, 5), dtype=np.float32)
    xs = rng.standard_normal((1, 128, 28, 28), dtype=np.float32)
    ws = rng.standard_normal((128, 1, 3, 3), dtype=np.float32)

    def product():
        return a @ bm

    def conv():
        return fc.conv2d(x, w, padding=2)

    def small():
        return fc.conv2d(xs, ws, padding=1, groups=128)

    def loop():
        product()
        conv()

    def timed(f, inner):
        t0 = time.perf_counter()
        for _ in range(inner):
            f()
        return (time.perf_counter() - t0) / inner * 1e3

    def idle_cpu():
        """CPU milliseconds the process burns in 50 ms of sleep right after the loop: the
        workers still busy-waiting."""
        loop()
        c0 = time.process_time()
        time.sleep(0.05)
        return (time.process_time() - c0) * 1e3

    limit = contextlib.nullcontext()
    if blas_limit:
        from threadpoolctl import threadpool_limits
        limit = threadpool_limits(limits=1, user_api="blas")
    runs = {"product": (product, 20), "conv": (conv, 20), "loop": (loop, 20),
            "small": (small, 100)}
    times = {k: [] for k in [*runs, "idle_cpu"]}
    with limit:
        for f, inner in runs.values():  # warm up: compile, plan, fault the pages in
            timed(f, inner)
        for _ in range(reps):
            for k, (f, inner) in runs.items():
                # A pause first, so that no pool is still spinning from the block before:
                # each part is timed alone, as in a loop of its own.
                time.sleep(0.3)
                times[k].append(timed(f, inner))
            times["idle_cpu"].append(idle_cpu())
    return {k: float(np.median(v)) for k, v in times.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=15, help="interleaved rounds per setting")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(measure(args.reps, args.child == "limit")))
        return
    print(f"# {os.cpu_count()} CPUs; median of {args.reps} interleaved rounds per setting; "
          "ms per iteration")
    print("| setting | 512x512 product | conv2 forward | sum | alternating loop | loop / sum "
          "| small conv (us) | CPU ms in 50 ms idle |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (env, blas_limit) in SETTINGS.items():
        out = subprocess.run(
            [sys.executable, __file__, "--reps", str(args.reps),
             "--child", "limit" if blas_limit else "none"],
            env={**os.environ, **env}, capture_output=True, text=True, check=True)
        m = json.loads(out.stdout.strip().splitlines()[-1])
        total = m["product"] + m["conv"]
        print(f"| {name} | {m['product']:.2f} | {m['conv']:.2f} | {total:.2f} | "
              f"{m['loop']:.2f} | {m['loop'] / total:.2f}x | {m['small'] * 1e3:.0f} | "
              f"{m['idle_cpu']:.0f} |")


if __name__ == "__main__":
    main()
