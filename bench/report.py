"""Print fastconv vs PyTorch (and NumPy im2col) GF/s per shape and pass, interleaved.

    python bench/report.py [--reps 15] [--impl numpy-im2col] [--cases mnist-conv2 ...]

For each (shape, pass) the implementations are timed in turn, round after round, so that
machine noise hits them alike; the table shows the median GF/s of each and the ratio
``t_torch / t_fastconv`` (> 1 means fastconv is faster), the median of per-round ratios.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import cases


def _time(fn, case, arrays, min_seconds=0.1):
    """Seconds per call, averaged over enough calls to take ``min_seconds``.

    One untimed call first: the other library's OpenMP threads may still be spinning from
    its last call, and they should not be charged to this one.
    """
    fn(case, arrays)
    calls, t0 = 0, time.perf_counter()
    while True:
        fn(case, arrays)
        calls += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            return elapsed / calls


def measure(case, pass_, interleaved, extra, reps):
    """Seconds per call of each implementation, ``reps`` samples each.

    ``interleaved`` implementations alternate round by round.  ``extra`` ones (the NumPy
    baseline) are timed afterwards in a block of their own: OpenBLAS worker threads
    busy-wait after every call and would steal the cores from the next implementation.
    """
    arrays = cases.make_arrays(case)
    fns = {name: cases.IMPLS[name](pass_) for name in interleaved + extra}
    fns = {k: v for k, v in fns.items() if v is not None}
    times = {k: [] for k in fns}
    inter = [k for k in interleaved if k in fns]
    for name in inter:  # warm up: JIT compilation, caches, thread pools
        fns[name](case, arrays)
    for _ in range(reps):
        for name in inter:
            times[name].append(_time(fns[name], case, arrays))
    for name in extra:
        for _ in range(reps):
            times[name].append(_time(fns[name], case, arrays))
        time.sleep(0.5)  # let its spinning threads go to sleep
    return times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=15, help="interleaved rounds (default 15)")
    p.add_argument("--cases", nargs="*", default=[c.name for c in cases.CASES])
    p.add_argument("--passes", nargs="*", default=cases.PASSES)
    p.add_argument("--impl", action="append", default=[],
                   help="extra implementation to show, e.g. numpy-im2col (timed in its own "
                        "block after the interleaved rounds)")
    args = p.parse_args(argv)
    threads = cases.sync_threads()
    have_torch = cases.torch is not None
    interleaved = ["fastconv"] + (["torch"] if have_torch else [])
    impls = interleaved + args.impl
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{threads} threads, fp32, median of {args.reps} interleaved rounds")
    if have_torch:
        print(f"# torch {cases.torch.__version__}")
    head = ["shape", "pass"] + [f"{i} GF/s" for i in impls]
    if have_torch:
        head.append("ratio vs torch")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    by_name = {c.name: c for c in cases.CASES}
    for name in args.cases:
        case = by_name[name]
        for pass_ in args.passes:
            times = measure(case, pass_, interleaved, args.impl, args.reps)
            row = [name, pass_] + [f"{case.flops() / statistics.median(times[i]) / 1e9:.1f}"
                                   for i in impls]
            if have_torch:
                ratio = statistics.median(t / f for t, f in zip(times["torch"], times["fastconv"],
                                                                 strict=True))
                row.append(f"{ratio:.2f}x")
            print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
