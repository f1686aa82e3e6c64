"""Data-parallel training over MPI (fastconv.dist).

The distributed runs are subprocesses under ``mpiexec -n 2`` (Open MPI or MPICH), each
with a timeout; without mpi4py or mpiexec they are skipped.  The rest runs everywhere.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_cli import _dataset

from fastconv import dist, models, nn
from fastconv import train as T

HERE = Path(__file__).parent


def _mpiexec():
    """The mpiexec beside this Python (the ``dist`` extra's), else one on PATH."""
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def _has_mpi4py() -> bool:
    return subprocess.run([sys.executable, "-c", "import mpi4py"],
                          capture_output=True).returncode == 0


MPIEXEC = _mpiexec()
needs_mpi = pytest.mark.skipif(
    MPIEXEC is None or not _has_mpi4py(),
    reason="needs mpi4py and mpiexec: pip install -e '.[dist]'")


def _env():
    # Open MPI refuses to run as root without these two; MPICH ignores them.
    return dict(os.environ, FASTCONV_DATA="/nonexistent", OMPI_ALLOW_RUN_AS_ROOT="1",
                OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONPATH=str(HERE.parent))


def _launcher(n: int) -> list[str]:
    """``mpiexec -n n``; Open MPI also gets --oversubscribe, so 2 ranks start on a machine
    with fewer cores (it then binds no process to a core)."""
    version = subprocess.run([MPIEXEC, "--version"], capture_output=True, text=True).stdout
    extra = ["--oversubscribe"] if "Open MPI" in version or "OpenRTE" in version else []
    return [MPIEXEC, *extra, "-n", str(n)]


def mpirun(n, *args, timeout=300):
    """``mpiexec -n n python ARGS`` (n = 1: plain python, no launcher)."""
    cmd = [sys.executable, *map(str, args)]
    if n > 1:
        cmd = _launcher(n) + cmd
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return _dataset(tmp_path_factory.mktemp("toy"), n_train=256, n_test=64)


def _weights(path):
    return T.load_checkpoint(path)["model"]


def _assert_close(a, b):
    """Equal up to fp32 rounding, which training amplifies step by step: every difference
    within 1% of how far training moved that array from its initial weights (a run without
    the gradients' averaging, or with other data, differs by about the whole move)."""
    start = models.two_conv(seed=0).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        moved = np.abs(a[k] - start[k]).max()
        assert moved > 1e-3, k
        assert np.abs(a[k] - b[k]).max() <= 1e-2 * moved, k


# ---- without MPI ---------------------------------------------------------------------


def test_importing_fastconv_never_imports_mpi4py():
    code = ("import sys, fastconv, fastconv.train, fastconv.cli, fastconv.dist, fastconv.nn; "
            "from fastconv import dist; dist.init('auto'); print('mpi4py' in sys.modules)")
    env = {k: v for k, v in _env().items()
           if k not in dist._LAUNCHER_SIZE + dist._LAUNCHER_OTHER}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_one_process_is_a_communicator_of_one(monkeypatch):
    for key in dist._LAUNCHER_SIZE + dist._LAUNCHER_OTHER:
        monkeypatch.delenv(key, raising=False)
    assert dist.launched_by_mpi() is None
    comm = dist.init("auto")
    assert (comm.rank, comm.size, comm.distributed, comm.is_root) == (0, 1, False, True)
    idx = np.arange(10)
    assert comm.shard(idx) is idx and comm.bounds(7) == (0, 7)
    np.testing.assert_array_equal(comm.allreduce_sum([1.0, 2.0]), [1.0, 2.0])
    with comm.fail_together(), pytest.raises(ValueError):  # passes through: one process
        raise ValueError("x")
    comm.setup_done()
    assert dist.init(comm) is comm and dist.init("off").size == 1


def test_the_launchers_environment_is_read(monkeypatch):
    for key in dist._LAUNCHER_SIZE + dist._LAUNCHER_OTHER:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PMI_SIZE", "4")
    assert dist.launched_by_mpi() == 4
    monkeypatch.delenv("PMI_SIZE")
    monkeypatch.setenv("PMIX_RANK", "0")
    assert dist.launched_by_mpi() == 0
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "1")
    assert dist.init("auto").size == 1  # one process: no MPI at all


def test_without_mpi4py_under_a_launcher_is_a_clear_error():
    code = ("import sys; sys.modules['mpi4py'] = None; from fastconv import dist; "
            "dist.init('auto')")
    env = dict(_env(), OMPI_COMM_WORLD_SIZE="2")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 1
    assert "started by an MPI launcher (2 processes), but mpi4py cannot be imported" in r.stderr
    assert "pip install 'fastconv[dist]'" in r.stderr and "--distributed off" in r.stderr


@pytest.mark.parametrize("n", [0, 1, 5, 7, 64, 65])
@pytest.mark.parametrize("size", [1, 2, 3])
def test_shards_are_disjoint_contiguous_and_cover_the_batch(n, size):
    idx = np.random.default_rng(n).permutation(100)[:n]
    parts = []
    for rank in range(size):
        comm = dist.Communicator()
        comm.rank, comm.size = rank, size
        parts.append(comm.shard(idx))
        assert comm.bounds(n) == (sum(map(len, parts[:-1])), sum(map(len, parts)))
    np.testing.assert_array_equal(np.concatenate(parts), idx)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    for want, got in zip(np.array_split(idx, size), parts, strict=True):
        np.testing.assert_array_equal(want, got)


def test_buckets_follow_the_backward_order():
    model = models.two_conv(seed=0)
    sync = dist.GradientSync(model, dist.Communicator())
    sizes = [p.data.size for p in reversed(model.parameters())]
    assert [p.name for p in sync.params] == [p.name for p in reversed(model.parameters())]
    assert sync.flat.size == sum(sizes) and sync.flat.dtype == np.float32
    # 1 MiB: Linear(128, 10) and Linear(3136, 128) (1.6 MB) close the first bucket; the
    # convolutions (0.2 MB) make the second.
    assert sync.buckets == [(0, sum(sizes[:4])), (sum(sizes[:4]), sum(sizes))]
    small = dist.GradientSync(model, dist.Communicator(), bucket_mb=1e-6)
    assert len(small.buckets) == len(sizes)  # one per parameter
    assert dist.GradientSync(model, dist.Communicator(), bucket_mb=100).buckets == [
        (0, sum(sizes))]
    top = {id(layer) for layer in model.layers if layer.params}
    assert set(sync._of_layer) >= top


@pytest.mark.parametrize("kwargs, error, message", [
    ({"bucket_mb": 0}, ValueError, "bucket_mb must be > 0, got 0"),
    ({"bucket_mb": "1"}, TypeError, "bucket_mb"),
    ({"comm": "world"}, TypeError, "comm must be a fastconv.dist.Communicator, got str"),
    ({"method": "ring"}, ValueError,
     "method must be 'auto', 'shared' or 'iallreduce', got 'ring'"),
])
def test_bad_gradient_sync_arguments(kwargs, error, message):
    args = {"model": models.two_conv(seed=0), "comm": dist.Communicator(), **kwargs}
    with pytest.raises(error, match=message):
        dist.GradientSync(**args)


def test_shared_memory_needs_every_rank_on_one_machine():
    comm = dist.Communicator()
    comm.size, comm.local_size = 4, 2  # two machines of two ranks
    with pytest.raises(ValueError, match="method='shared' needs every rank on one machine; "
                       "these 4 ranks run 2 to a machine"):
        dist.GradientSync(models.two_conv(seed=0), comm, method="shared")


def test_bad_distributed_setting():
    with pytest.raises(ValueError, match="distributed must be 'auto', 'off' or a fastconv.dist"
                       r".Communicator, got 'on'"):
        dist.init("on")
    with pytest.raises(TypeError, match="distributed must be .* got True"):
        dist.init(True)


def test_the_backward_hook_sees_each_layer_after_its_gradients():
    model = models.two_conv(seed=0)
    seen = []

    def hook(layer):
        seen.append((type(layer).__name__, all(layer.grads.get(k) is not None
                                               for k in layer.params)))

    x = np.random.default_rng(0).random((4, 1, 28, 28), np.float32)
    loss_fn = nn.CrossEntropyLoss()
    loss_fn(model(x), np.arange(4))
    model._grad_hook = hook
    model.backward(loss_fn.backward())
    del model._grad_hook
    # ReLU + MaxPool2d run as one step (the pool is called); every layer with parameters
    # has all its gradients when it is called.
    assert seen == [("Linear", True), ("ReLU", True), ("Linear", True), ("Flatten", True),
                    ("MaxPool2d", True), ("Conv2d", True), ("MaxPool2d", True),
                    ("Conv2d", True)]
    assert nn.Sequential._grad_hook is None


def test_allreduce_gradients_on_one_process_changes_nothing():
    model = models.two_conv(seed=0)
    x = np.random.default_rng(0).random((2, 1, 28, 28), np.float32)
    loss_fn = nn.CrossEntropyLoss()
    loss_fn(model(x), np.arange(2))
    model.backward(loss_fn.backward())
    before = [p.grad.copy() for p in model.parameters()]
    dist.allreduce_gradients(model, dist.Communicator())
    for b, p in zip(before, model.parameters(), strict=True):
        np.testing.assert_array_equal(b, p.grad)


# ---- under mpiexec -n 2 --------------------------------------------------------------


def _order(out):
    return json.loads((out / "order.json").read_text())


@needs_mpi
@pytest.mark.parametrize("limit", [256, 193])  # 193 = 6 * 32 + 1: one rank's last shard is empty
def test_two_ranks_train_as_one_process(toy, tmp_path, limit):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    for n, out in ((1, one), (2, two)):
        r = mpirun(n, HERE / "dist_worker.py", "order", toy, out, limit, 32, 2)
        assert r.returncode == 0, r.stderr
    a, b = _order(one), _order(two)
    # the same global batches in the same order, each split into disjoint halves
    assert a["steps"] == b["steps"] and len(a["steps"]) == 2 * -(-limit // 32)
    assert sorted(sum(a["steps"][:len(a["steps"]) // 2], [])) == list(range(limit))
    assert b["per_rank"][0][:2] == b["per_rank"][1][:2] == [16, 16]
    if limit == 193:
        assert b["per_rank"][0][6] == 1 and b["per_rank"][1][6] == 0
    assert b["same_weights_on_every_rank"]
    _assert_close(_weights(one / "ck0.npz"), _weights(two / "ck0.npz"))
    # rank 0 alone writes: rank 1 was given its own file names
    assert sorted(p.name for p in two.iterdir()) == ["ck0.npz", "m0.json", "order.json"]
    m1, m2 = (json.loads((d / "m0.json").read_text()) for d in (one, two))
    assert m2["processes"] == 2 and m1["processes"] == 1
    for e1, e2 in zip(m1["epochs"], m2["epochs"], strict=True):
        assert e1["train_accuracy"] == e2["train_accuracy"]
        assert e1["test_accuracy"] == e2["test_accuracy"]
        assert e1["train_loss"] == pytest.approx(e2["train_loss"], rel=1e-4)
        assert e1["test_loss"] == pytest.approx(e2["test_loss"], rel=1e-4)


@needs_mpi
def test_allreduce_gradients_and_each_sync_method_give_the_whole_batch():
    r = mpirun(2, HERE / "dist_worker.py", "api")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "api ok"


def _cli(toy, *more):
    return ["-m", "fastconv", "train", "--dataset", "mnist", "--data-dir", toy,
            "--no-download", "--batch-size", 32, *more]


@needs_mpi
def test_cli_under_mpiexec_writes_once_from_rank_0(toy, tmp_path):
    m, ck, png = tmp_path / "m.json", tmp_path / "ck.npz", tmp_path / "p.png"
    r = mpirun(2, *_cli(toy, "--epochs", 2, "--metrics-json", m, "--save", ck, "--plot", png))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [ln.split(":")[0] for ln in lines if ln.startswith("epoch")] == ["epoch 1", "epoch 2"]
    assert "Traceback" not in r.stderr
    metrics = json.loads(m.read_text())
    assert metrics["processes"] == 2 and metrics["batch_size"] == 32
    assert 1 <= metrics["threads"] <= max(1, (os.cpu_count() or 1) // 2)  # each rank's share
    assert metrics["test_accuracy"] > 0.5
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and T.load_checkpoint(ck)["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.npz", "m.json", "p.png"]


@needs_mpi
def test_distributed_resume_with_other_rank_counts(toy, tmp_path):
    """Stop after epoch 1 of 1, continue to epoch 2 (a new cosine over 2 epochs), with each
    pair of rank counts: the same weights as one process doing the same."""
    common = ("--threads", 1, "--quiet")
    for first, second in ((1, 1), (2, 1), (1, 2), (2, 2)):
        ck = tmp_path / f"ck{first}{second}.npz"
        r = mpirun(first, *_cli(toy, "--epochs", 1, "--save", ck, *common))
        assert r.returncode == 0, r.stderr
        r = mpirun(second, *_cli(toy, "--epochs", 2, "--resume", ck, "--save", ck,
                                 "--threads", 1))
        assert r.returncode == 0, r.stderr
        assert r.stdout.count(f"resumed {ck} after epoch 1 of 2") == 1
        assert T.load_checkpoint(ck)["epoch"] == 2
        _assert_close(_weights(tmp_path / "ck11.npz"), _weights(ck))


@needs_mpi
def test_a_batch_the_ranks_cannot_split_is_one_error(toy):
    r = mpirun(2, *_cli(toy, "--batch-size", 33, "--quiet"))
    assert r.returncode == 1
    message = ("fastconv: error: the batch size 33 is the global batch, split over 2 MPI "
               "processes: it must be a multiple of 2")
    assert r.stderr.count(message) == 1, r.stderr  # rank 0 says it, once
    assert "Traceback" not in r.stderr


@needs_mpi
def test_distributed_off_trains_alone_in_each_process(toy, tmp_path):
    r = mpirun(2, *_cli(toy, "--distributed", "off", "--quiet", "--threads", 1))
    assert r.returncode == 0, r.stderr
    r = mpirun(2, *_cli(toy, "--distributed", "off", "--threads", 1))
    assert r.stdout.count("epoch 1:") == 2  # each process trained the whole run


@needs_mpi
def test_a_rank_that_fails_during_setup_stops_every_rank(toy):
    """MPMD: rank 1 alone gets a data folder without the files."""
    cmd = [*_launcher(1), sys.executable, *map(str, _cli(toy)),
           ":", "-n", "1", sys.executable, *map(str, _cli("/nonexistent/data"))]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    assert r.returncode == 1
    assert r.stderr.count("fastconv: error: rank 1 of 2 failed: DatasetNotFoundError") == 1, \
        r.stderr
    assert "Traceback" not in r.stderr


@needs_mpi
def test_a_rank_that_fails_during_training_stops_the_job(toy, tmp_path):
    r = mpirun(2, HERE / "dist_worker.py", "fail", toy, tmp_path, timeout=180)
    assert r.returncode != 0
    assert ("fastconv: error on rank 1 of 2: RuntimeError: injected failure on rank 1; "
            "stopping all 2 processes") in r.stderr
    assert "Traceback" not in r.stderr
