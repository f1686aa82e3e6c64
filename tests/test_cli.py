"""The ``fastconv`` command end to end, on small synthetic IDX datasets (fast) and, where
$FASTCONV_DATA is set, on real ones."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_data import write_dataset

from fastconv import train

REAL = Path(os.environ.get("FASTCONV_DATA", "../shared/data"))


def _dataset(folder: Path, n_train=256, n_test=64, seed=0):
    """A learnable toy dataset: the label is drawn as a bright bar at row 2*label."""
    rng = np.random.default_rng(seed)
    write_dataset(folder, n_train, n_test)
    for stem, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = (rng.random((n, 28, 28)) * 60).astype(np.uint8)
        for i, lab in enumerate(labels):
            images[i, 2 * lab + 3:2 * lab + 5, 4:24] = 255
        import gzip

        from test_data import idx_bytes
        (folder / f"{stem}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
        (folder / f"{stem}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    return folder


def run(*args, timeout=300, **kw):
    env = dict(os.environ, FASTCONV_DATA="/nonexistent")
    return subprocess.run([sys.executable, "-m", "fastconv", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env, **kw)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return _dataset(tmp_path_factory.mktemp("toy"))


def _common(toy):
    return ["--dataset", "mnist", "--data-dir", toy, "--no-download", "--batch-size", 32,
            "--threads", 2]


def _no_timing(metrics):
    drop = {"seconds", "samples_per_second", "train_samples_per_second",
            "first_step_seconds", "warm_up_seconds", "compile_seconds", "kernels_compiled"}
    return {k: ([{kk: vv for kk, vv in e.items() if kk not in drop} for e in v]
                if k == "epochs" else v) for k, v in metrics.items() if k not in drop}


def test_train_writes_metrics_checkpoint_and_plot(toy, tmp_path):
    m, ck, png = tmp_path / "m.json", tmp_path / "ck.npz", tmp_path / "p.png"
    r = run("train", *_common(toy), "--epochs", 2, "--metrics-json", m, "--save", ck,
            "--plot", png)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("epoch")]
    assert len(lines) == 2 and "test loss" in lines[0] and "samples/s" in lines[0]
    metrics = json.loads(m.read_text())
    assert {"dataset", "model", "batch_size", "threads", "epochs", "test_accuracy", "test_loss",
            "train_samples_per_second"} <= set(metrics)
    assert metrics["batch_size"] == 32 and metrics["threads"] == 2
    # from process start to the first step's end: after the imports, well before the end
    assert 0 < metrics["first_step_seconds"] < metrics["epochs"][0]["seconds"] + 60
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert set(metrics["epochs"][0]) == {"epoch", "train_loss", "train_accuracy", "test_loss",
                                         "test_accuracy", "seconds", "samples_per_second"}
    assert metrics["test_accuracy"] > 0.5  # the toy task is easy
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ev = run("evaluate", "--checkpoint", ck, "--data-dir", toy, "--no-download")
    assert ev.returncode == 0, ev.stderr
    assert f"accuracy {metrics['test_accuracy']:.4f}" in ev.stdout
    # the checkpoint is plain arrays: loadable without pickle
    with np.load(ck, allow_pickle=False) as z:
        assert "model/0.weight" in z.files and int(z["epoch"]) == 2


def test_same_seed_same_threads_same_metrics(toy, tmp_path):
    out = []
    for i in range(2):
        m = tmp_path / f"m{i}.json"
        r = run("train", *_common(toy), "--seed", 3, "--metrics-json", m, "--quiet")
        assert r.returncode == 0 and r.stdout == "", r.stderr
        out.append(_no_timing(json.loads(m.read_text())))
    assert out[0] == out[1]


def test_killed_run_resumes_to_the_same_result(toy, tmp_path):
    ck = tmp_path / "ck.npz"
    full = tmp_path / "full.json"
    r = run("train", *_common(toy), "--epochs", 3, "--metrics-json", full, "--quiet")
    assert r.returncode == 0, r.stderr
    env = dict(os.environ, FASTCONV_DATA="/nonexistent")
    cmd = ["train", *_common(toy), "--epochs", 3, "--save", ck, "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "fastconv", *map(str, cmd)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not ck.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ck.exists(), "no checkpoint appeared"
    done = train.load_checkpoint(ck)["epoch"]
    resumed = tmp_path / "resumed.json"
    r = run("train", *_common(toy), "--epochs", 3, "--resume", ck, "--save", ck,
            "--metrics-json", resumed)
    assert r.returncode == 0, r.stderr
    assert f"resumed {ck} after epoch {done} of 3" in r.stdout
    assert _no_timing(json.loads(resumed.read_text())) == _no_timing(json.loads(full.read_text()))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(toy, tmp_path):
    ck = tmp_path / "ck.npz"
    assert run("train", *_common(toy), "--save", ck, "--quiet").returncode == 0
    state = train.load_checkpoint(ck)
    model, opt = train.build(state["config"])
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optim"])
    bad = train.TrainConfig(**{**state["config"].__dict__, "lr": 1e30})
    opt.lr = 1e30  # the optimizer's state carries the lr, as in PyTorch
    rng = np.random.default_rng()
    rng.bit_generator.state = state["rng"]
    train.save_checkpoint(ck, bad, model, opt, 1, rng, state["history"])
    before = ck.read_bytes()
    r = run("train", *_common(toy), "--epochs", 2, "--resume", ck, "--save", ck)
    assert r.returncode == 1
    assert "loss became" in r.stderr and "try a smaller --lr" in r.stderr
    # one line, beside the notice a cold kernel cache prints while the kernels compile
    errors = [line for line in r.stderr.strip().splitlines()
              if not line.startswith("compiling kernels")]
    assert len(errors) == 1 and "Traceback" not in r.stderr
    assert ck.read_bytes() == before


@pytest.mark.parametrize("args, code, message", [
    (["train", "--dataset", "cifar"], 2, "argument --dataset: invalid choice: 'cifar'"),
    (["train", "--epochs", "0"], 2, "argument --epochs: expected a positive integer, got '0'"),
    (["train", "--lr", "abc"], 2, "argument --lr: expected a positive number, got 'abc'"),
    (["train", "--momentum", "1.5"], 2, "expected a number in [0, 1), got '1.5'"),
    (["train", "--schedule", "step"], 2, "argument --schedule: invalid choice: 'step'"),
    (["train", "--threads", "1000"], 2, "argument --threads: expected an integer in [1, "),
    (["train", "--threads", "0"], 2, "argument --threads: expected an integer in [1, "),
    (["evaluate", "--checkpoint", "m.npz", "--threads", "1000"], 2,
     "argument --threads: expected an integer in [1, "),
    (["evaluate", "--checkpoint", "/nonexistent.npz"], 1, "not a readable fastconv checkpoint"),
    (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
    (["train", "--model", "resnet"], 2, "argument --model: invalid choice: 'resnet'"),
])
def test_bad_cli_input_is_one_line(args, code, message):
    r = run(*args)
    assert r.returncode == code
    assert message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_data_not_found_is_a_few_lines(tmp_path):
    """Where it looked, that downloading was off, and the ways out; exit code 1."""
    r = run("train", "--no-download", "--data-dir", tmp_path / "none")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert lines[0] == ("fastconv: error: mnist: could not find train-images-idx3-ubyte, "
                        "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                        "t10k-labels-idx1-ubyte (each .gz or raw IDX) in one folder.")
    assert lines[1:4] == ["Looked in:", f"  {tmp_path / 'none' / 'mnist'}",
                          f"  {tmp_path / 'none'}"]
    assert "  /nonexistent/mnist" in lines  # $FASTCONV_DATA, as run() sets it
    assert "Downloading was turned off (--no-download)." in lines
    assert "data_dir=" not in r.stderr  # the command's options, not the Python arguments
    assert lines[-2].startswith("  --data-dir DIR") and lines[-1].startswith(
        "  export FASTCONV_DATA=DIR")


def test_an_empty_training_set_is_one_line(tmp_path):
    write_dataset(tmp_path, n_train=0, n_test=4)
    r = run("train", "--data-dir", tmp_path, "--no-download")
    assert r.returncode == 1
    assert r.stderr == "fastconv: error: mnist: the training set has no images\n"


def test_an_empty_test_set_is_one_line_for_train_and_evaluate(toy, tmp_path):
    """The mean loss and accuracy of no images are undefined: a data error, not 0."""
    empty = tmp_path / "empty"
    write_dataset(empty, n_train=4, n_test=0)
    r = run("train", "--data-dir", empty, "--no-download")
    assert r.returncode == 1
    assert r.stderr == "fastconv: error: mnist: the test set has no images\n"
    ck = tmp_path / "ck.npz"
    assert run("train", *_common(toy), "--save", ck, "--quiet", "--limit", 32).returncode == 0
    r = run("evaluate", "--checkpoint", ck, "--data-dir", empty, "--no-download")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr == ("fastconv: error: there are no images to evaluate (the test set is "
                        "empty)\n")


def test_corrupt_file_is_one_line(tmp_path):
    folder = _dataset(tmp_path / "d", 32, 16)
    p = folder / "train-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[:100])
    r = run("train", "--data-dir", folder, "--no-download")
    assert r.returncode == 1 and str(p) in r.stderr and "corrupt or truncated gzip" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(not (REAL / "mnist").is_dir(), reason="no FASTCONV_DATA")
def test_learns_real_mnist_digits(tmp_path):
    """MNIST's training images are not available offline, so: our own split of the real
    MNIST test set, 8,000 images to train on and 2,000 held out."""
    from fastconv import data

    images = data.read_idx(REAL / "mnist" / "t10k-images-idx3-ubyte.gz")
    labels = data.read_idx(REAL / "mnist" / "t10k-labels-idx1-ubyte.gz")
    import gzip

    from test_data import idx_bytes

    split = tmp_path / "mnist-split"
    split.mkdir()
    for stem, sl in (("train", slice(0, 8000)), ("t10k", slice(8000, None))):
        (split / f"{stem}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images[sl])))
        (split / f"{stem}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels[sl])))
    m = tmp_path / "m.json"
    r = run("train", "--dataset", "mnist", "--data-dir", split, "--no-download", "--epochs", 2,
            "--metrics-json", m, "--quiet", timeout=600)
    assert r.returncode == 0, r.stderr
    assert json.loads(m.read_text())["test_accuracy"] >= 0.95


@pytest.mark.skipif(not (REAL / "fashion-mnist").is_dir(), reason="no FASTCONV_DATA")
def test_fashion_mnist_two_epochs_with_defaults_reaches_90_percent(tmp_path):
    """The issue's bar, on the real data, with every default (about 90 s here)."""
    m = tmp_path / "m.json"
    r = run("train", "--dataset", "fashion-mnist", "--data-dir", REAL, "--no-download",
            "--epochs", 2, "--metrics-json", m, "--quiet", timeout=1200)
    assert r.returncode == 0, r.stderr
    assert json.loads(m.read_text())["test_accuracy"] >= 0.90


def test_resume_keeps_the_saved_settings(toy, tmp_path):
    ck = tmp_path / "ck.npz"
    assert run("train", *_common(toy), "--epochs", 2, "--save", ck, "--quiet").returncode == 0
    again = run("train", "--data-dir", toy, "--no-download", "--resume", ck)
    assert again.returncode == 0 and "after epoch 2 of 2" in again.stdout  # the saved total
    r = run("train", "--data-dir", toy, "--no-download", "--resume", ck, "--lr", "0.1")
    assert r.returncode == 1
    assert "--resume continues the saved run, which has lr=0.05; got lr=0.1" in r.stderr
    r = run("train", "--data-dir", toy, "--no-download", "--resume", ck, "--epochs", 1)
    assert r.returncode == 1 and "already trained 2 epochs; --epochs 1 is fewer" in r.stderr


def test_corrupt_checkpoint_is_one_line(toy, tmp_path):
    ck = tmp_path / "ck.npz"
    assert run("train", *_common(toy), "--save", ck, "--quiet").returncode == 0
    ck.write_bytes(ck.read_bytes()[:3000])
    for args in (["evaluate", "--checkpoint", ck], ["train", "--resume", ck]):
        r = run(*args, "--data-dir", toy, "--no-download")
        assert r.returncode == 1 and "not a readable fastconv checkpoint" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_divergence_on_the_last_step_is_caught(toy, tmp_path):
    ck, m = tmp_path / "d.npz", tmp_path / "d.json"
    r = run("train", *_common(toy), "--model", "tiny", "--limit", 32, "--lr", "1e38",
            "--save", ck, "--metrics-json", m)
    assert r.returncode == 1 and ("non-finite" in r.stderr or "loss became" in r.stderr)
    assert not ck.exists() and not m.exists()


def test_the_tiny_model_answers_to_its_old_name(toy, tmp_path):
    """``--model seed`` (the tiny network's old name) trains the tiny network."""
    for name in ("tiny", "seed"):
        m = tmp_path / f"{name}.json"
        r = run("train", *_common(toy), "--model", name, "--limit", 32, "--quiet",
                "--metrics-json", m)
        assert r.returncode == 0, r.stderr
        assert json.loads(m.read_text())["model"] == "tiny"
    assert _no_timing(json.loads((tmp_path / "seed.json").read_text())) == \
        _no_timing(json.loads((tmp_path / "tiny.json").read_text()))


def test_evaluate_needs_only_the_test_files(toy, tmp_path):
    ck = tmp_path / "ck.npz"
    assert run("train", *_common(toy), "--save", ck, "--quiet").returncode == 0
    only_test = tmp_path / "t"
    only_test.mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (only_test / name).write_bytes((toy / name).read_bytes())
    r = run("evaluate", "--checkpoint", ck, "--data-dir", only_test, "--no-download")
    assert r.returncode == 0 and "mnist test: loss" in r.stdout, r.stderr


def test_negative_seed_is_a_usage_error():
    r = run("train", "--seed", "-1")
    assert r.returncode == 2 and "argument --seed: expected a non-negative integer" in r.stderr
