"""``fastconv train``'s run record and first run, ``fastconv precompile`` and
``fastconv --version``, through the command where they can be, on small toy datasets."""

import argparse
import dataclasses
import importlib.metadata
import io
import json
import os
import signal
import subprocess
import sys
import time

import numba
import numpy as np
import pytest
from test_cli import _dataset, run

import fastconv
from fastconv import _compiling, algorithms, cli, train


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return _dataset(tmp_path_factory.mktemp("toy"))


def _args(toy, *more):
    return ["train", "--dataset", "mnist", "--data-dir", toy, "--no-download", "--threads", 2,
            *more]


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---- --version and help --------------------------------------------------------------


def test_version():
    r = run("--version")
    assert r.returncode == 0 and r.stdout == f"fastconv {fastconv.__version__}\n", r.stderr
    try:
        installed = importlib.metadata.version("fastconv")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    assert installed in (None, fastconv.__version__)  # one version, the package's


def _subparsers(parser):
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


@pytest.mark.parametrize("command", [None, "train", "precompile"])
def test_every_option_has_help(command):
    top = cli._parser()
    parser = top if command is None else _subparsers(top).choices[command]
    assert parser.description
    for action in parser._actions:
        assert action.help and action.help != argparse.SUPPRESS, action.option_strings
    if command is None:  # and every command a line in the list
        assert {c.dest for c in _subparsers(top)._choices_actions} >= {"train", "precompile"}
        assert all(c.help for c in _subparsers(top)._choices_actions)


def test_help_names_the_log_and_precompile():
    r = run("train", "--help")
    assert r.returncode == 0 and "--log-jsonl PATH" in r.stdout and "precompile" in r.stdout
    r = run("precompile", "--help")
    assert r.returncode == 0 and "Docker" in r.stdout


# ---- metrics and the JSON-lines log ----------------------------------------------------


def test_metrics_hold_the_settings_versions_cpu_and_algorithms(toy, tmp_path):
    m, log = tmp_path / "m.json", tmp_path / "log.jsonl"
    settings = dict(model="two-conv", epochs=2, batch_size=16, lr=0.02, optimizer="sgd",
                    momentum=0.5, schedule="constant", seed=3, limit=48)
    flags = [x for k, v in settings.items() for x in (f"--{k.replace('_', '-')}", v)]
    r = run(*_args(toy, *flags, "--metrics-json", m, "--log-jsonl", log))
    assert r.returncode == 0, r.stderr
    metrics = json.loads(m.read_text())
    assert metrics["config"] == {**dataclasses.asdict(train.TrainConfig()), "dataset": "mnist",
                                 **settings}
    assert metrics["threads"] == 2 and metrics["batch_size"] == 16 and metrics["lr"] == 0.02
    env = metrics["environment"]
    assert env["fastconv"] == fastconv.__version__ and env["numpy"] == np.__version__
    assert env["numba"] == numba.__version__
    assert env["python"] == ".".join(map(str, sys.version_info[:3]))
    assert isinstance(env["cpu"], str) and env["cpu"] and env["cpu"] == train.cpu_model()
    convs = metrics["conv_algorithms"]
    assert set(convs) == {"0", "3"}  # the two Conv2d layers of two-conv, by index
    for plan in convs.values():
        assert set(plan) == set(algorithms.PASSES) and set(plan.values()) <= set(
            algorithms.BY_NAME)
    # what conv2d_plan chooses for conv1 on a batch of 16
    assert convs["0"] == fastconv.conv2d_plan((16, 1, 28, 28), (32, 1, 5, 5),
                                              padding=2).algorithms
    assert metrics["warm_up_seconds"] > 0 and metrics["compile_seconds"] >= 0
    assert isinstance(metrics["kernels_compiled"], int)
    assert metrics["first_step_seconds"] >= metrics["warm_up_seconds"]  # from process start

    lines = _lines(log)  # one per epoch, the same numbers as the metrics
    assert [line["epoch"] for line in lines] == [1, 2]
    assert all(line["epochs"] == 2 and line["lr"] == 0.02 for line in lines)
    for line, epoch in zip(lines, metrics["epochs"], strict=True):
        assert {k: line[k] for k in epoch} == epoch
        assert time.strptime(line["time"], "%Y-%m-%dT%H:%M:%SZ")
    assert set(lines[0]) == set(metrics["epochs"][0]) | {"epochs", "lr", "time"}


def test_the_log_keeps_the_finished_epochs_of_a_killed_run(toy, tmp_path):
    log = tmp_path / "log.jsonl"
    cmd = _args(toy, "--model", "tiny", "--limit", 32, "--batch-size", 32, "--epochs", 100,
                "--log-jsonl", log, "--quiet")
    env = dict(os.environ, FASTCONV_DATA="/nonexistent")
    proc = subprocess.Popen([sys.executable, "-m", "fastconv", *map(str, cmd)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while (not log.exists() or not log.read_text()) and time.time() < deadline \
            and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    lines = _lines(log)  # whole lines only, each valid JSON
    assert 1 <= len(lines) < 100
    assert [line["epoch"] for line in lines] == list(range(1, len(lines) + 1))


def test_resume_appends_to_the_log_and_a_new_run_starts_it_afresh(toy, tmp_path):
    log, ck = tmp_path / "log.jsonl", tmp_path / "ck.npz"
    common = ["--limit", 32, "--batch-size", 32, "--log-jsonl", log, "--quiet"]
    assert run(*_args(toy, *common, "--save", ck)).returncode == 0
    assert [line["epoch"] for line in _lines(log)] == [1]
    r = run(*_args(toy, *common, "--resume", ck, "--save", ck, "--epochs", 3))
    assert r.returncode == 0, r.stderr
    lines = _lines(log)
    assert [(line["epoch"], line["epochs"]) for line in lines] == [(1, 1), (2, 3), (3, 3)]
    assert run(*_args(toy, *common)).returncode == 0
    assert [line["epoch"] for line in _lines(log)] == [1]


def test_a_log_that_cannot_be_written_is_one_line(toy, tmp_path):
    r = run(*_args(toy, "--limit", 32, "--log-jsonl", tmp_path))  # a folder
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("fastconv: error: ") and str(tmp_path) in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    with pytest.raises(TypeError, match="log_jsonl must be a path"):
        train.train(train.TrainConfig(limit=1), data_dir=toy, download=False, log_jsonl=3)


# ---- the first run and precompile ------------------------------------------------------


def test_a_cold_cache_says_it_compiles_and_a_warm_one_does_not(toy, tmp_path):
    """The one run with an empty JIT cache ($NUMBA_CACHE_DIR): slow (the tiny model's
    kernels for one batch size compile), so the smallest there is."""
    env = dict(os.environ, FASTCONV_DATA="/nonexistent", NUMBA_CACHE_DIR=str(tmp_path / "c"))
    out = []
    for i in range(2):
        m = tmp_path / f"m{i}.json"
        cmd = _args(toy, "--model", "tiny", "--limit", 64, "--batch-size", 64,
                    "--metrics-json", m)
        r = subprocess.run([sys.executable, "-m", "fastconv", *map(str, cmd)], env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        out.append((r, json.loads(m.read_text())))
    (cold, cold_m), (warm, warm_m) = out
    # not a terminal: the notice is one line on stderr, before the compilation
    assert cold.stderr == f"{_compiling.MESSAGE}\n"
    assert cold_m["kernels_compiled"] > 0 and cold_m["compile_seconds"] > 0
    assert cold_m["warm_up_seconds"] >= cold_m["compile_seconds"]
    assert (f"compiled {cold_m['kernels_compiled']} kernels in "
            f"{cold_m['compile_seconds']:.1f} s") in cold.stdout
    assert warm.stderr == "" and "compiled" not in warm.stdout
    assert warm_m["kernels_compiled"] == 0 and warm_m["compile_seconds"] == 0


def _fresh_function():
    """A Numba function no process has compiled (its source is new each time)."""
    scope = {}
    exec(f"def f(x):\n    return x + {time.time_ns()}", scope)  # noqa: S102
    return numba.njit(scope["f"])


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("quiet, stream, shown", [
    (True, _Terminal, ""), (False, io.StringIO, _compiling.MESSAGE + "\n"),
    (False, _Terminal, _compiling.MESSAGE)])
def test_the_compile_notice(quiet, stream, shown):
    out = stream()
    with _compiling.notice(quiet, out) as watch:
        assert out.getvalue() == ""  # nothing before a compilation
        _fresh_function()(1)
        time.sleep(0.3)  # the spinner turns
    assert watch.compiled >= 1 and watch.seconds > 0
    if stream is _Terminal:
        assert shown in out.getvalue()  # tqdm's line, with a spinner and the seconds
    else:
        assert out.getvalue() == shown
    with _compiling.notice(False, out := stream()) as watch:
        np.ones(3).sum()  # nothing to compile: nothing said
    assert out.getvalue() == "" and watch.compiled == 0


def test_the_progress_bar_shows_one_throughput(monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Terminal())
    bar = train._progress(100, "epoch 1/1", quiet=False)
    bar.update(50)
    bar.set_postfix_str("loss 0.1234, 567 images/s")
    line = str(bar)
    bar.close()
    assert "567 images/s" in line and line.count("/s") == 1, line


def test_precompile_compiles_what_training_and_evaluation_run(toy):
    """After precompile, training and evaluation at other batch sizes load or compile
    nothing more (in this process)."""
    from fastconv import data

    printed = []
    report = train.precompile(["tiny", "seed", "two-conv"], log=printed.append)
    assert list(report) == ["tiny", "two-conv"]  # 'seed' is tiny's old name
    assert report["tiny"]["train_batch_sizes"][0] == 1
    assert len(printed) == 3 and printed[0].startswith("tiny: ")
    assert printed[-1].startswith("precompiled tiny, two-conv in ")

    def signatures():
        return {(id(d), s) for d in _compiling.dispatchers() for s in d.signatures}

    before = signatures()
    xte, yte = data.load_dataset("mnist", toy, download=False, split="test")
    for name, batch, limit in (("tiny", 100, 130), ("two-conv", 64, 70), ("two-conv", 5, 7)):
        cfg = train.TrainConfig(model=name, batch_size=batch, limit=limit)
        metrics = train.train(cfg, data_dir=toy, download=False, quiet=True,
                              log=lambda *a: None)
        assert metrics["kernels_compiled"] == 0
        model, _ = train.build(cfg)
        train.evaluate(model, xte, yte, batch_size=7)
    assert signatures() == before


def test_precompile_command(tmp_path):
    r = run("precompile", "--model", "tiny")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("tiny: ") and " kernels compiled, " in lines[0]
    assert "loaded from the cache, in " in lines[0] and "batch sizes 1, " in lines[0]
    assert lines[-1].startswith("precompiled tiny in ") and "cached in " in lines[-1]
    assert run("precompile", "--model", "tiny", "--quiet").stdout == ""
    r = subprocess.run([sys.executable, "-m", "fastconv", "precompile"], capture_output=True,
                       text=True, env=dict(os.environ, FASTCONV_NO_CACHE="1"))
    assert r.returncode == 1 and r.stderr == (
        "fastconv: error: the JIT cache is off (FASTCONV_NO_CACHE=1): kernels compiled now "
        "would not be kept for later runs\n")


@pytest.mark.parametrize("presets, exc, message", [
    ("tiny", TypeError, "presets must be a list of model names"),
    ([3], TypeError, "presets must hold model names"),
    (["resnet"], ValueError, "unknown model 'resnet' in presets"),
    ([], ValueError, "presets is empty"),
])
def test_precompile_refuses_bad_presets(presets, exc, message):
    with pytest.raises(exc, match=message):
        train.precompile(presets)


def test_cpu_model_never_fails(monkeypatch):
    assert isinstance(train.cpu_model(), str) and train.cpu_model()

    def broken(*a, **k):
        raise OSError("no /proc here")

    monkeypatch.setattr("builtins.open", broken)
    monkeypatch.setattr(train.platform, "processor", lambda: "")
    monkeypatch.setattr(train.platform, "machine", lambda: "")
    assert train.cpu_model() == "unknown"
