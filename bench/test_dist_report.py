"""``bench/dist_report.py --tiny``: the benchmark runs end to end (a few steps on random
images, 1 and 2 ranks), as a plain test; nothing is timed against a target."""

import subprocess
import sys

import pytest

import dist_report

pytestmark = pytest.mark.skipif(
    dist_report.mpiexec() is None
    or subprocess.run([sys.executable, "-c", "import mpi4py"]).returncode != 0,
    reason="needs mpi4py and mpiexec: pip install -e '.[dist]'")


def test_tiny_report(capsys):
    res = dist_report.main(["--tiny"])
    assert {k: len(v) for k, v in res["runs"].items()} == {"1x2": 1, "1x1": 1, "2x1": 1}
    two = res["runs"]["2x1"][0]
    assert two["ranks"] == 2 and two["threads"] == 1 and two["samples_per_second"] > 0
    # one machine: the shared-memory sum, the whole buffer at once
    assert two["method"] == "shared" and two["alone_ms"] > 0 and len(two["buckets"]) == 1
    assert res["compute"][8]["backward_tail_ms"] > 0
    out = capsys.readouterr().out
    assert "scaling efficiency 2x1 / (2 x 1x1)" in out and "method 'shared'" in out


def test_tiny_report_with_iallreduce(capsys):
    res = dist_report.main(["--tiny", "--method", "iallreduce", "--compute-batches", ""])
    two = res["runs"]["2x1"][0]
    assert two["method"] == "iallreduce" and two["alone_ms"] > 0 and len(two["buckets"]) == 2
    out = capsys.readouterr().out
    assert "method 'iallreduce'" in out and "reduced while backward ran" in out
