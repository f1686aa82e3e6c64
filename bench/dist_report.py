"""Data-parallel training on one machine: 1 rank x 2 threads, 1 rank x 1 thread, 2 ranks x 1
thread, on the same global batch.

    python bench/dist_report.py [--rounds 5] [--steps 200] [--batch-size 64]
        [--method auto|shared|iallreduce] [--compute-batches 16,32,64,128] [--json FILE]
        [--tiny]

Each configuration is a fresh process (the 2-rank one under ``mpiexec -n 2``; the 1-rank
ones without a launcher, which would bind them to one core), run in interleaved rounds (the
order rotates every round) so that noise hits every configuration alike.  A run trains the
two-conv network for ``--steps`` timed steps of the training loop's own step (shard,
forward, backward, the gradients' sum by :class:`fastconv.dist.GradientSync` with
``--method``, SGD) on Fashion-MNIST or MNIST
(``$FASTCONV_DATA``, else random images), after a warm-up, between two barriers.

Reported: median samples/s of each configuration (and its range), the ratio 2x1 / 1x2
(target >= 0.9), the scaling efficiency 2x1 / (2 * 1x1) (target >= 90%), and per step of
the 2-rank run, from the timers of :class:`fastconv.dist.GradientSync`: the copies into the
buffer and the reduction after backward (with the wait for the slower rank); for
``iallreduce`` also the MPI calls during backward, the time the allreduces were in flight
during backward and the share of the gradient bytes whose allreduce finished before backward
did (overlapped); and the same reduction alone (no compute).
``--compute-batches`` also times one rank on one thread at several batch sizes: the compute
side of the scaling model in
docs/distributed.md, with the part of backward left after the Linear(3136, 128) gradients
(the window the first bucket's allreduce overlaps).  ``--tiny`` runs a few steps on random
images: a check that the script works, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS = {"1x2": (1, 2), "1x1": (1, 1), "2x1": (2, 1)}  # name: (ranks, threads per rank)


# ---- the worker: one run, under mpiexec or alone -------------------------------------


def worker(args) -> None:
    import numpy as np

    from fastconv import conv, data, dist, nn
    from fastconv import train as T

    comm = dist.init("auto")
    conv.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    xtr, source = None, "random"
    for name in () if args.tiny else ("fashion-mnist", "mnist"):
        try:
            xtr, ytr, _, _ = data.load_dataset(name, download=False)
            source = name
            break
        except data.DatasetNotFoundError:
            pass
    if xtr is None:
        xtr = rng.integers(0, 256, (max(4096, 4 * args.batch_size), 28, 28), np.uint8)
        ytr = rng.integers(0, 10, len(xtr))
    ytr = ytr.astype(np.int64)
    cfg = T.TrainConfig(batch_size=args.batch_size, schedule="constant", lr=0.01)
    model, opt = T.build(cfg)
    loss_fn = nn.CrossEntropyLoss()
    T._warm_up(cfg, [args.batch_size // comm.size], [])  # compile outside the timed steps
    sync = (dist.GradientSync(model, comm, bucket_mb=args.bucket_mb,
                              progress=not args.no_progress, method=args.method)
            if comm.distributed else None)
    tail = []  # single process: backward time after the Linear(3136, 128) gradients
    big = model[7]

    def step(k):
        idx = order[(k * args.batch_size) % (len(xtr) - args.batch_size):][:args.batch_size]
        mine = comm.shard(idx)
        x, y = T.normalise(xtr[mine]), ytr[mine]
        opt.zero_grad()
        if sync is None and args.tail:
            loss_fn(model(x), y)
            mark = []
            model._grad_hook = lambda layer: mark.append(time.perf_counter()) if (
                layer is big) else None
            model.backward(loss_fn.backward())
            tail.append(time.perf_counter() - mark[0])
            model._grad_hook = None
        elif sync is None:
            loss_fn(model(x), y)
            model.backward(loss_fn.backward())
        else:
            sync.train_step(model, loss_fn, x, y, len(idx))
        opt.step()

    order = rng.permutation(len(xtr))
    for k in range(args.warmup):
        step(k)
    if sync is not None:
        sync.reset_timers()
        comm.comm.Barrier()
    tail.clear()
    times = []
    t0 = time.perf_counter()
    for k in range(args.steps):
        t1 = time.perf_counter()
        step(k)
        times.append(time.perf_counter() - t1)
    if sync is not None:
        comm.comm.Barrier()
    seconds = time.perf_counter() - t0
    out = {"ranks": comm.size, "threads": args.threads, "batch": args.batch_size,
           "steps": args.steps, "data": source, "seconds": seconds,
           "samples_per_second": args.steps * args.batch_size / seconds,
           "ms_per_step": 1e3 * seconds / args.steps, "fastest_step_ms": 1e3 * min(times),
           "median_step_ms": 1e3 * statistics.median(times)}
    if sync is not None:
        n = sync.timers["steps"]
        out |= {f"{k}_ms": 1e3 * v / n for k, v in sync.timers.items()
                if k not in ("steps", "bytes", "overlapped_bytes")}
        out["overlapped"] = sync.timers["overlapped_bytes"] / sync.timers["bytes"]
        out["alone_ms"] = 1e3 * _allreduce_alone(sync, comm, reps=max(5, args.steps // 4))
        out["buckets"] = [(hi - lo) * sync.dtype.itemsize for lo, hi in sync.buckets]
        out["method"] = sync.method
    elif tail:
        out["backward_tail_ms"] = 1e3 * statistics.median(tail)
        out["backward_tail_fastest_ms"] = 1e3 * min(tail)
    if comm.is_root:
        print("RESULT " + json.dumps(out), flush=True)


def _allreduce_alone(sync, comm, reps) -> float:
    """Seconds of one step's allreduces, blocking, with nothing else running."""
    from mpi4py import MPI

    times = []
    for _ in range(reps):
        comm.comm.Barrier()
        t0 = time.perf_counter()
        if sync.method == "shared":
            sync._shared.allreduce(None)
        else:
            for lo, hi in sync.buckets:
                comm.comm.Allreduce(MPI.IN_PLACE, sync.flat[lo:hi], op=MPI.SUM)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---- the driver ----------------------------------------------------------------------


def mpiexec() -> str | None:
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def _env():
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    # Open MPI refuses to run as root without these; MPICH ignores them.
    return env | {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def run(ranks, threads, args, batch=None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--threads", str(threads),
           "--batch-size", str(batch or args.batch_size), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--bucket-mb", str(args.bucket_mb),
           "--method", args.method]
    if args.no_progress:
        cmd.append("--no-progress")
    if args.tiny:
        cmd.append("--tiny")
    if batch:
        cmd.append("--tail")
    if ranks > 1:
        cmd = [mpiexec(), "-n", str(ranks), *args.mpiexec_args.split()] + cmd
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=1800)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode or not lines:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr}")
    return json.loads(lines[-1][7:])


def measure(args) -> dict:
    runs = {name: [] for name in CONFIGS}
    names = list(CONFIGS)
    for i in range(args.rounds):
        for name in names[i % len(names):] + names[:i % len(names)]:
            runs[name].append(run(*CONFIGS[name], args))
    compute = {b: run(1, 1, args, batch=b) for b in args.compute_batches}
    return {"runs": runs, "compute": compute}


def summary(res, args) -> str:
    runs = res["runs"]
    sps = {k: [r["samples_per_second"] for r in v] for k, v in runs.items()}
    med = {k: statistics.median(v) for k, v in sps.items()}
    two = runs["2x1"]
    lines = [f"# two-conv network, global batch {args.batch_size}, {runs['1x1'][0]['data']} "
             f"images, {args.steps} steps per run, median of {args.rounds} interleaved rounds",
             f"# {os.cpu_count()} CPUs; 2 ranks: mpiexec -n 2 {args.mpiexec_args}".rstrip(),
             "", "| configuration | samples/s (median) | range | ms per step | fastest step "
             "ms |", "|---|---|---|---|---|"]
    label = {"1x2": "1 rank x 2 threads", "1x1": "1 rank x 1 thread",
             "2x1": "2 ranks x 1 thread"}
    for k in CONFIGS:
        ms = statistics.median(r["ms_per_step"] for r in runs[k])
        fastest = min(r["fastest_step_ms"] for r in runs[k])
        lines.append(f"| {label[k]} | {med[k]:.0f} | {min(sps[k]):.0f}-{max(sps[k]):.0f} | "
                     f"{ms:.1f} | {fastest:.1f} |")
    ratio = med["2x1"] / med["1x2"]
    eff = med["2x1"] / (2 * med["1x1"])
    per_round = [a / b for a, b in zip(sps["2x1"], sps["1x2"], strict=True)]
    lines += ["", f"2 ranks x 1 thread / 1 rank x 2 threads: {ratio:.2f}x "
              f"(per round {min(per_round):.2f}-{max(per_round):.2f}; target >= 0.90) -> "
              f"{'met' if ratio >= 0.9 else 'NOT met'}",
              f"scaling efficiency 2x1 / (2 x 1x1): {100 * eff:.0f}% (target >= 90%) -> "
              f"{'met' if eff >= 0.9 else 'NOT met'}"]
    best = {k: min(r["fastest_step_ms"] for r in v) for k, v in runs.items()}
    lines += [f"from the fastest steps (the least disturbed): 2x1 / 1x2 "
              f"{best['1x2'] / best['2x1']:.2f}x, efficiency "
              f"{100 * best['1x1'] / (2 * best['2x1']):.0f}%"]

    def m(key):
        return statistics.median(r[key] for r in two)

    if two[0]["method"] == "shared":
        lines += ["", f"per step of the 2-rank run (method 'shared', "
                  f"{two[0]['buckets'][0]} bytes of gradients in a shared-memory window): "
                  f"the reduction alone (nothing else running) {m('alone_ms'):.2f} ms; in the "
                  f"step: copies into the buffer {m('copy_ms'):.2f} ms, reduction after "
                  f"backward {m('wait_ms'):.2f} ms (with the wait for the slower rank)"]
    else:
        lines += ["", f"per step of the 2-rank run (method 'iallreduce', buckets of "
                  f"{two[0]['buckets']} bytes): the allreduces alone (blocking, nothing "
                  f"else running) {m('alone_ms'):.2f} ms; in the step: copies into the "
                  f"buffer {m('copy_ms'):.2f} ms, MPI calls during backward "
                  f"{m('mpi_ms'):.2f} ms, in flight during backward {m('in_flight_ms'):.2f}"
                  f" ms, wait after backward {m('wait_ms'):.2f} ms (the last bucket, and "
                  f"the slower rank); {100 * m('overlapped'):.0f}% of the gradient bytes "
                  f"were reduced while backward ran (overlapped)"]
    if res["compute"]:
        lines += ["", "1 rank x 1 thread (the compute side of docs/distributed.md's model):",
                  "", "| batch | ms per step (median) | fastest step ms | ms per sample "
                  "(fastest) | backward after Linear(3136, 128) ms (fastest) |",
                  "|---|---|---|---|---|"]
        for b, r in res["compute"].items():
            lines.append(f"| {b} | {r['median_step_ms']:.2f} | {r['fastest_step_ms']:.2f} | "
                         f"{r['fastest_step_ms'] / b:.3f} | {r['backward_tail_fastest_ms']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--bucket-mb", type=float, default=1.0)
    p.add_argument("--method", default="auto", choices=("auto", "shared", "iallreduce"),
                   help="GradientSync(method=...): how the 2-rank run sums gradients")
    p.add_argument("--no-progress", action="store_true",
                   help="GradientSync(progress=False): no progress thread")
    p.add_argument("--compute-batches", default="16,32,64,128",
                   help="batch sizes for the 1-thread compute table ('' for none)")
    p.add_argument("--mpiexec-args", default="", help="extra mpiexec flags, e.g. "
                   "'--bind-to none'")
    p.add_argument("--json", help="also write the raw runs here")
    p.add_argument("--tiny", action="store_true", help="a few steps on random images")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--tail", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    if args.tiny:
        args.rounds, args.steps, args.warmup, args.batch_size = 1, 3, 1, 8
        args.compute_batches = "8" if args.compute_batches else ""
    args.compute_batches = [int(b) for b in args.compute_batches.split(",") if b]
    if mpiexec() is None:
        raise SystemExit("no mpiexec: pip install -e '.[dist]'")
    res = measure(args)
    print(summary(res, args), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
