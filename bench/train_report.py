"""``fastconv train`` against its PyTorch twin on the same data: throughput and peak RSS.

    python bench/train_report.py --data-dir ../shared/data [--dataset fashion-mnist]
        [--limit 12800] [--rounds 3]

Each round runs ``fastconv train`` and ``bench/torch_train.py`` one after the other as
separate processes (same dataset, limit, batch 64, SGD momentum 0.9, threads), so noise
hits both alike.  Throughput is each run's ``train_samples_per_second`` (training steps
only); the ratio is the median of per-round ratios.  Peak RSS is the child's ``ru_maxrss``.
Run this script as its own small process: a child forked from a large parent (one that
has imported torch, say) reports the parent's RSS as its own peak.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _run(cmd, metrics_path):
    """Run ``cmd``; return (its metrics JSON, its peak RSS in MB)."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            raise SystemExit(f"{' '.join(cmd)} failed: {err.read().decode()}")
    return json.loads(Path(metrics_path).read_text()), usage.ru_maxrss / 1024


def compare(data_dir, *, dataset="fashion-mnist", limit=12800, epochs=1, threads=None,
            rounds=3, verbose=True) -> dict:
    """Alternate ``rounds`` pairs of runs; return samples/s and peak RSS (MB) per library,
    the median per-round ratio, and the final test accuracies.  Prints the table."""
    threads = threads or os.cpu_count()

    def args(n):  # the flags both scripts take, training on the first n images
        a = ["--dataset", dataset, "--limit", str(n), "--epochs", str(epochs),
             "--batch-size", "64", "--threads", str(threads)]
        return a + (["--data-dir", str(data_dir)] if data_dir else [])

    common = args(limit)
    res = {"fastconv": [], "torch": []}
    with tempfile.TemporaryDirectory() as tmp:
        m = str(Path(tmp) / "m.json")
        # One short untimed run first, so that no round pays for (or measures the memory
        # of) filling the JIT cache.
        _run([sys.executable, "-m", "fastconv", "train", *args(64), "--no-download", "--quiet",
              "--metrics-json", m], m)
        for _ in range(rounds):
            res["fastconv"].append(_run([sys.executable, "-m", "fastconv", "train", *common,
                                         "--no-download", "--quiet", "--metrics-json", m], m))
            res["torch"].append(_run([sys.executable, str(HERE / "torch_train.py"), *common,
                                      "--metrics-json", m], m))
    sps = {k: [r[0]["train_samples_per_second"] for r in v] for k, v in res.items()}
    out = {
        "samples_per_second": {k: statistics.median(v) for k, v in sps.items()},
        "rss": {k: max(r[1] for r in v) for k, v in res.items()},
        "accuracy": {k: v[-1][0]["test_accuracy"] for k, v in res.items()},
        "ratio": statistics.median(f / t for f, t in zip(sps["fastconv"], sps["torch"],
                                                         strict=True)),
        "rounds": list(zip(sps["fastconv"], sps["torch"], strict=True)),
    }
    if verbose:
        sp, rss, acc = out["samples_per_second"], out["rss"], out["accuracy"]
        print(f"# {dataset}, {limit} training images x {epochs} epoch(s), batch 64, SGD "
              f"momentum 0.9, {threads} threads, {rounds} alternating rounds")
        print("| | fastconv | torch | ratio |")
        print("|---|---|---|---|")
        print(f"| train samples/s (median) | {sp['fastconv']:.0f} | {sp['torch']:.0f} | "
              f"{out['ratio']:.2f}x |")
        print(f"| peak RSS (MB) | {rss['fastconv']:.0f} | {rss['torch']:.0f} | "
              f"{rss['fastconv'] / rss['torch']:.2f}x |")
        print(f"| test accuracy | {acc['fastconv']:.4f} | {acc['torch']:.4f} | |")
        print("\nper round, samples/s: " + ", ".join(f"{f:.0f} vs {t:.0f}"
                                                     for f, t in out["rounds"]))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir", default=os.environ.get("FASTCONV_DATA"))
    p.add_argument("--limit", type=int, default=12800)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", help="also write the results to this file")
    a = p.parse_args(argv)
    out = compare(a.data_dir, dataset=a.dataset, limit=a.limit, epochs=a.epochs,
                  threads=a.threads, rounds=a.rounds)
    if a.json:
        Path(a.json).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
