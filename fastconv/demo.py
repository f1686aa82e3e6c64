"""A two-minute tour: ``python -m fastconv.demo [--threads T]``.

Runs the worked examples of the classic back-propagation write-ups through fastconv and
times the three passes on the MNIST network's second convolution (batch 64, 32 -> 64
channels, 14x14, 5x5, padding 2).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import fastconv as fc


def _gflops(fn, flops, seconds=0.5):
    fn()  # compile (or load from the cache) and warm up
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        calls += 1
    return flops * calls / (time.perf_counter() - t0) / 1e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastconv.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None, help="kernel threads (default: all)")
    args = p.parse_args(argv)
    if args.threads is not None:
        try:
            fc.set_num_threads(args.threads)
        except (TypeError, ValueError) as e:
            p.error(str(e))

    print("1-D example: input [1,2,3], filter [0.3,0.5], deltas [-0.1,0.2]")
    x = np.array([1.0, 2.0, 3.0]).reshape(1, 1, 3)  # (N, C, L)
    w = np.array([0.3, 0.5]).reshape(1, 1, 2)  # (K, C, R)
    dy = np.array([-0.1, 0.2]).reshape(1, 1, 2)
    print("  forward", np.round(fc.conv1d(x, w).ravel(), 12))
    print("  dW     ", np.round(fc.conv1d_grad_weight(x, dy, w.shape).ravel(), 12))
    print("  dX     ", np.round(fc.conv1d_grad_input(dy, w, x.shape).ravel(), 12))

    print("3x3 input, 2x2 filter: dX = zero-padded deltas * 180-degree rotated filter")
    w2 = np.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)
    d2 = np.array([[1.0, 10.0], [100.0, 1000.0]]).reshape(1, 1, 2, 2)
    print("  dX =\n" + str(fc.conv2d_grad_input(d2, w2, (1, 1, 3, 3))[0, 0]))

    N, C, H, K, R = 64, 32, 14, 64, 5
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, C, H, H), dtype=np.float32)
    w = rng.standard_normal((K, C, R, R), dtype=np.float32)
    dy = rng.standard_normal((N, K, H, H), dtype=np.float32)
    flops = 2.0 * N * K * C * R * R * H * H
    t0 = time.perf_counter()
    fc.conv2d(x, w, padding=2)
    print(f"MNIST conv2 (N64 32->64 14x14 5x5 pad 2), {fc.get_num_threads()} threads, "
          f"first call {time.perf_counter() - t0:.2f} s (JIT or cache load)")
    for name, fn in [("forward", lambda: fc.conv2d(x, w, padding=2)),
                     ("dX", lambda: fc.conv2d_grad_input(dy, w, x.shape, padding=2)),
                     ("dW", lambda: fc.conv2d_grad_weight(x, dy, w.shape, padding=2))]:
        print(f"  {name:8s}{_gflops(fn, flops):7.1f} GF/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
