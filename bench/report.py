"""The performance report: fastconv vs PyTorch, interleaved, for the four speed targets.

    python bench/report.py [--reps 15] [--targets 1 2 3 4] [--data-dir DIR]
        [--impl numpy-im2col] [--cases mnist-conv2 ...]

Targets (see the performance issue; ratio = t_torch / t_fastconv, > 1 means fastconv is
faster, the median of per-round ratios):

1. every pass of the MNIST two-conv layers at batch 64 is >= 1.0x torch (conv1 needs no dX);
2. over the wider shape set (``cases.GENERAL``) the geometric mean ratio is >= 0.8x and
   no shape is below 0.5x (input layers, C <= 3, need no dX);
3. MNIST conv2 forward, dX and dW each reach >= 60% of the measured FMA peak
   (``bench/peak.py``);
4. ``fastconv train`` samples/s is >= 1.5x its PyTorch twin's, with a lower peak RSS
   (``bench/train_report.py``, alternating processes; needs the Fashion-MNIST files in
   ``--data-dir`` or ``$FASTCONV_DATA``);
5. small calls (``cases.SMALL``): the tiny layer's forward takes <= 1.2x torch's time
   through ``fc.conv2d`` and <= 1.0x through a held plan; every batch-1 pass of the MNIST
   layers and of the 3x3 64 -> 64 layer at 32x32 is >= 1.0x torch.

For each (shape, pass) the implementations are timed in turn, round after round, so that
machine noise hits them alike.  ``--impl numpy-im2col`` adds the NumPy baseline, timed in
a block of its own afterwards (its OpenBLAS threads busy-wait and would distort the rest).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numba

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


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def conv_table(names, passes, impls, extra, reps, ratio_of=("fastconv",)):
    """Print one row per (shape, pass), with the algorithm fastconv's plan runs it with;
    return {(name, pass): (GF/s by impl, ratio)}: ``t_torch / t_impl`` for the one
    implementation of ``ratio_of``, or a dict of them by implementation for several."""
    interleaved = [i for i in impls if i not in extra]
    head = ["shape", "pass", "algorithm"] + [f"{i} GF/s" for i in impls]
    have_torch = "torch" in impls
    if have_torch:
        head += [f"{i} vs torch" for i in ratio_of]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    by_name = {c.name: c for c in cases.CASES}
    out = {}
    for name in names:
        case = by_name[name]
        for pass_ in passes:
            if pass_ == "dX" and not cases.needs_dx(case):
                continue
            times = measure(case, pass_, interleaved, extra, reps)
            gf = {i: case.flops() / statistics.median(times[i]) / 1e9 for i in impls}
            row = [name, pass_, cases.algorithm(case, pass_)] + [f"{gf[i]:.1f}" for i in impls]
            ratio = None
            if have_torch:
                ratios = {i: statistics.median(t / f for t, f in zip(
                    times["torch"], times[i], strict=True)) for i in ratio_of}
                row += [f"{ratios[i]:.2f}x" for i in ratio_of]
                ratio = ratios if len(ratio_of) > 1 else ratios[ratio_of[0]]
            out[name, pass_] = (gf, ratio)
            print("| " + " | ".join(row) + " |", flush=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=15, help="interleaved rounds (default 15)")
    p.add_argument("--targets", nargs="*", type=int, default=[1, 2, 3, 4, 5])
    p.add_argument("--cases", nargs="*",
                   help="just these shapes, no target verdicts (names from bench/cases.py)")
    p.add_argument("--passes", nargs="*", default=cases.PASSES)
    p.add_argument("--impl", action="append", default=[],
                   help="extra implementation to show, e.g. numpy-im2col")
    p.add_argument("--data-dir", default=os.environ.get("FASTCONV_DATA"),
                   help="Fashion-MNIST for target 4 (default $FASTCONV_DATA)")
    p.add_argument("--train-rounds", type=int, default=5)
    args = p.parse_args(argv)
    threads = cases.sync_threads()
    have_torch = cases.torch is not None
    impls = ["fastconv"] + (["torch"] if have_torch else []) + args.impl
    print(f"# {_cpu_name()}, {os.cpu_count()} CPUs, {threads} threads, fp32, "
          f"median of {args.reps} interleaved rounds")
    print(f"# Python {platform.python_version()}, Numba {numba.__version__}"
          + (f", torch {cases.torch.__version__}" if have_torch else ", no torch"))
    if args.cases:
        conv_table(args.cases, args.passes, impls, args.impl, args.reps)
        return
    if not have_torch:
        print("# torch is not installed (pip install torch==2.13.0): no ratios, no verdicts")

    verdicts = []
    if 3 in args.targets:
        from peak import measured_peak

        peak = measured_peak(threads)
        print(f"\n# measured fp32 FMA peak ({threads} threads, bench/peak.py): {peak:.0f} GF/s")
    if 1 in args.targets or 3 in args.targets:
        print("\n## Target 1: MNIST layers, every pass >= 1.0x torch\n")
        # GF/s count a direct convolution's FLOPs, whatever the algorithm (Winograd does
        # 36% of them on 5x5 layers); fastconv-direct is fastconv with Winograd off.
        mnist_impls = impls[:1] + ["fastconv-direct"] + impls[1:]
        res = conv_table([c.name for c in cases.MNIST], args.passes, mnist_impls, args.impl,
                         args.reps)
        if have_torch and 1 in args.targets:
            worst = min(r for _, r in res.values())
            verdicts.append(f"1. MNIST passes >= 1.0x torch: worst {worst:.2f}x -> "
                            f"{_verdict(worst >= 1.0)}")
        if 3 in args.targets:
            for impl, what in (("fastconv", "Winograd, effective"), ("fastconv-direct",
                                                                     "direct kernels")):
                conv2 = {ps: gf[impl] for (n, ps), (gf, _) in res.items()
                         if n == "mnist-conv2"}
                low = min(conv2.values())
                verdicts.append(f"3. conv2 >= 60% of peak ({what}): " + ", ".join(
                    f"{ps} {gf:.0f} GF/s ({gf / peak:.0%})" for ps, gf in conv2.items())
                    + f" of {peak:.0f} -> {_verdict(low >= 0.6 * peak)}")
    if 2 in args.targets:
        print("\n## Target 2: wider shapes, geometric mean >= 0.8x torch, none below 0.5x\n")
        res = conv_table([c.name for c in cases.GENERAL], args.passes, impls, args.impl,
                         args.reps)
        if have_torch:
            ratios = [r for _, r in res.values()]
            geo = math.exp(statistics.fmean(math.log(r) for r in ratios))
            worst = min(res, key=lambda k: res[k][1])
            verdicts.append(f"2. wider shapes: geomean {geo:.2f}x, worst {res[worst][1]:.2f}x "
                            f"({worst[0]} {worst[1]}) -> "
                            f"{_verdict(geo >= 0.8 and res[worst][1] >= 0.5)}")
    if 5 in args.targets and have_torch:
        print("\n## Target 5: small calls\n")
        res = conv_table([c.name for c in cases.SMALL], args.passes,
                         impls[:1] + ["fastconv-plan"] + impls[1:], args.impl, args.reps,
                         ratio_of=("fastconv", "fastconv-plan"))
        tiny = res["tiny-rgb-8px", "forward"][1]
        batch1 = {k: r["fastconv"] for k, (_, r) in res.items() if k[0] != "tiny-rgb-8px"}
        worst = min(batch1, key=batch1.get)
        ok = (1 / tiny["fastconv"] <= 1.2 and 1 / tiny["fastconv-plan"] <= 1.0
              and batch1[worst] >= 1.0)
        verdicts.append(f"5. small calls: tiny forward {1 / tiny['fastconv']:.2f}x torch's "
                        f"time (fc.conv2d), {1 / tiny['fastconv-plan']:.2f}x (held plan); "
                        f"batch-1 worst {batch1[worst]:.2f}x ({worst[0]} {worst[1]}) -> "
                        f"{_verdict(ok)}")
    if 4 in args.targets and have_torch:
        print("\n## Target 4: fastconv train >= 1.5x torch, lower peak RSS\n")
        if not args.data_dir:
            print("skipped: no --data-dir or $FASTCONV_DATA with Fashion-MNIST")
        else:
            # In a small process of its own: children forked from this one (torch loaded)
            # would count its memory in their peak RSS.
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "train.json"
                subprocess.run([sys.executable, str(Path(__file__).with_name("train_report.py")),
                                "--data-dir", str(args.data_dir), "--rounds",
                                str(args.train_rounds), "--threads", str(threads),
                                "--json", str(out)], check=True)
                r = json.loads(out.read_text())
            rss = r["rss"]
            ok = r["ratio"] >= 1.5 and rss["fastconv"] < rss["torch"]
            verdicts.append(f"4. training: {r['ratio']:.2f}x torch, peak RSS "
                            f"{rss['fastconv']:.0f} vs {rss['torch']:.0f} MB -> {_verdict(ok)}")
    if verdicts:
        print("\n## Verdicts\n")
        for v in verdicts:
            print(f"* {v}")


if __name__ == "__main__":
    main()
