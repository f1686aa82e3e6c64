"""Start-up times (target 5 of the performance issue), each in a new process.

    python bench/startup.py [--data-dir DIR] [--precompile]

* **warm cache**: a new process imports fastconv and finishes its first ``conv2d`` (the
  JIT cache already holds the kernels);
* **first batch**: ``fastconv train`` from process start to the end of its first training
  step (its ``first_step_seconds`` metric), warm cache;
* **cold cache**: the same two, with ``NUMBA_CACHE_DIR`` pointing at an empty directory,
  so every kernel they use is compiled;
* **precompile** (``--precompile``): ``fastconv precompile`` with a cold cache, then again
  with the cache it filled.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FIRST_CONV = ("import numpy as np, fastconv as fc; "
              "x = np.ones((2, 3, 16, 16), np.float32); w = np.ones((8, 3, 3, 3), np.float32); "
              "fc.conv2d(x, w, padding=1)")


def _first_conv(env) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", FIRST_CONV], env=env, check=True)
    return time.perf_counter() - t0


def _first_batch(env, data_dir) -> tuple[float, float]:
    """(first_step_seconds, whole run seconds) of a 1-batch ``fastconv train``."""
    with tempfile.TemporaryDirectory() as tmp:
        m = Path(tmp) / "m.json"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "fastconv", "train", "--dataset", "fashion-mnist",
                        "--data-dir", str(data_dir), "--limit", "64", "--no-download",
                        "--quiet", "--metrics-json", str(m)], env=env, check=True)
        return json.loads(m.read_text())["first_step_seconds"], time.perf_counter() - t0


def _precompile(env) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fastconv", "precompile", "--quiet"], env=env,
                   check=True)
    return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("FASTCONV_DATA"))
    p.add_argument("--precompile", action="store_true",
                   help="also time 'fastconv precompile', cold and warm (a minute or more)")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        cold = _first_conv(env)
        warm = min(_first_conv(env) for _ in range(3))
        print(f"first conv2d in a new process: cold cache {cold:.1f} s, warm cache {warm:.2f} s")
    if a.data_dir:
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, NUMBA_CACHE_DIR=cache)
            cold_step, cold_run = _first_batch(env, a.data_dir)
            warm_step, _ = min(_first_batch(env, a.data_dir) for _ in range(2))
            print(f"fastconv train, first training step done after: cold cache "
                  f"{cold_step:.1f} s (whole 1-batch run {cold_run:.1f} s), warm cache "
                  f"{warm_step:.2f} s")
    if a.precompile:
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, NUMBA_CACHE_DIR=cache)
            cold, warm = (_precompile(env) for _ in range(2))
            print(f"fastconv precompile: cold cache {cold:.1f} s, warm cache {warm:.2f} s")


if __name__ == "__main__":
    main()
