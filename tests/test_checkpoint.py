"""Loading state dicts and checkpoints checks everything before it changes anything: a bad
entry is one clear error (one line and exit code 1 from the CLI), never a crash, a traceback
or a silently different run.  The last test fuzzes real checkpoints with hypothesis."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cli import _dataset

from fastconv import cli, models, nn, optim, train

# ---- helpers -------------------------------------------------------------------------


def cli_run(*args) -> tuple[int, str, str]:
    """``fastconv ARGS`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(code, err, *needles):
    assert code == 1, err
    assert err.startswith("fastconv: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def read_npz(path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def write_npz(path, arrays) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def snapshot(model, opt) -> dict:
    return {**{f"model/{k}": v for k, v in model.state_dict().items()},
            **{f"optim/{k}": v for k, v in opt.state_dict().items()}}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert np.asarray(a[k]).dtype == np.asarray(b[k]).dtype, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def assert_same_checkpoint(a: dict, b: dict) -> None:
    """Two ``load_checkpoint`` results hold the same run."""
    assert (a["config"], a["epoch"], a["rng"], a["history"]) == \
        (b["config"], b["epoch"], b["rng"], b["history"])
    assert_same_state(a["model"], b["model"])
    assert_same_state(a["optim"], b["optim"])


def stepped(make_opt, model=None, seed=0):
    """A model and optimizer after one step on random data (so the optimizer has state)."""
    model = model or models.tiny_net(seed=seed)
    opt = make_opt(model.parameters())
    rng = np.random.default_rng(seed)
    x = rng.random((4, 1, 28, 28), dtype=np.float32)
    loss = nn.SoftmaxCrossEntropy()
    loss(model(x), np.arange(4))
    model.backward(loss.backward())
    opt.step()
    return model, opt


# ---- Module.load_state_dict ----------------------------------------------------------


@pytest.mark.parametrize("bad, error, message", [
    (np.array(["a"] * 10), TypeError, "state_dict['8.bias'] has dtype <U1: expected real"),
    (np.zeros(10, complex), TypeError, "state_dict['8.bias'] has dtype complex128: expected "
                                       "real numbers (an integer or floating-point dtype)"),
    (np.zeros(10, bool), TypeError, "has dtype bool: expected real numbers"),
    (np.zeros(1), ValueError, "state_dict['8.bias'] has shape (1,), the model's parameter "
                              "has (10,)"),
    (np.float32(0), ValueError, "has shape (), the model's parameter has (10,)"),
    (np.full(10, 1e300), ValueError, "state_dict['8.bias'] has values beyond the range of "
                                     "float32"),
    ([[1, 2], [3]], TypeError, "state_dict['8.bias'] is not an array"),
])
def test_module_load_state_dict_checks_all_before_changing_any(bad, error, message):
    """The issue: 7 of 8 parameters were overwritten before the 8th raised."""
    model, source = models.tiny_net(seed=0), models.tiny_net(seed=1)
    before = model.state_dict()
    state = source.state_dict()
    assert list(state)[-1] == "8.bias"
    state["8.bias"] = bad
    with pytest.raises(error, match=re.escape(message)):
        model.load_state_dict(state)
    assert_same_state(model.state_dict(), before)


def test_module_load_state_dict_converts_and_copies():
    model = models.tiny_net(seed=0)
    state = {k: np.asfortranarray(v.astype(np.float64)) for k, v in
             models.tiny_net(seed=1).state_dict().items()}
    arrays = [p.data for p in model.parameters()]
    model.load_state_dict(state)
    for p, a in zip(model.parameters(), arrays, strict=True):
        assert p.data is a and a.dtype == np.float32  # in place, dtype kept
        np.testing.assert_array_equal(a, state[p.name].astype(np.float32))
    with pytest.raises(TypeError, match="mapping of names to arrays, got list"):
        model.load_state_dict(list(state.values()))


# ---- optimizers ----------------------------------------------------------------------


def sgd(params):
    return optim.SGD(params, lr=0.1, momentum=0.9)


def adam(params):
    return optim.Adam(params, lr=0.01)


def test_sgd_buffer_of_another_shape_is_refused_and_nothing_changes():
    """The issue: a (1,) buffer for a (64, 64) weight made the fused update write past the
    buffer's end (SIGSEGV)."""
    model, opt = stepped(sgd, nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(),
                                            nn.Linear(64, 64), nn.Linear(64, 10)))
    assert opt.params[2].data.shape == (64, 64)
    before = snapshot(model, opt)
    state = opt.state_dict()
    state["step_count"] = np.array(7)  # would change if anything were assigned
    for bad in (np.zeros(1, np.float32), np.zeros((64, 64, 1), np.float32), np.float32(0),
                np.zeros(64, np.float32)):
        with pytest.raises(ValueError, match=re.escape(
                f"state_dict['momentum_buffer.2'] has shape {bad.shape}, its parameter "
                "'3.weight' has (64, 64)")):
            opt.load_state_dict({**state, "momentum_buffer.2": bad})
    assert_same_state(snapshot(model, opt), before)
    assert opt.step_count == 1


def test_sgd_buffers_are_c_contiguous_copies_of_the_parameter_dtype():
    model, opt = stepped(sgd)
    state = opt.state_dict()
    # float64, Fortran order, and a buffer for only some parameters (as PyTorch allows)
    given = {k: (np.asfortranarray(v.astype(np.float64)) if v.ndim else v)
             for k, v in state.items() if k != "momentum_buffer.1"}
    fresh = sgd(models.tiny_net(seed=0).parameters())
    fresh.load_state_dict(given)
    assert fresh.buffers[1] is None
    for i, (buf, p) in enumerate(zip(fresh.buffers, fresh.params, strict=True)):
        if i != 1:
            assert buf.shape == p.data.shape and buf.dtype == p.data.dtype
            assert buf.flags.c_contiguous and buf.flags.writeable
            assert not np.shares_memory(buf, given[f"momentum_buffer.{i}"])
            np.testing.assert_array_equal(buf, state[f"momentum_buffer.{i}"])


@pytest.mark.parametrize("make", [sgd, adam])
@pytest.mark.parametrize("key, value, error, message", [
    ("step_count", np.array(-1), ValueError, "state_dict['step_count'] is -1; it must be >= 0"),
    ("step_count", np.array(2.0), TypeError, "has dtype float64; it must be an integer"),
    ("step_count", True, TypeError, "state_dict['step_count'] is a bool"),
    ("step_count", np.array([3]), ValueError, "has shape (1,); it must be a scalar"),
    ("lr", np.array(-0.1), ValueError, "state_dict['lr'] is -0.1; it must be a finite number"),
    ("lr", np.array(np.nan), ValueError, "state_dict['lr'] is nan; it must be a finite"),
    ("lr", np.array(np.inf), ValueError, "state_dict['lr'] is inf"),
    ("lr", np.array("0.1"), TypeError, "state_dict['lr'] has dtype <U3: expected real"),
    ("lr", None, TypeError, "state_dict['lr'] has dtype object"),
])
def test_optimizer_scalars_are_checked(make, key, value, error, message):
    model, opt = stepped(make)
    before = snapshot(model, opt)
    with pytest.raises(error, match=re.escape(message)):
        opt.load_state_dict({**opt.state_dict(), key: value})
    assert_same_state(snapshot(model, opt), before)


@pytest.mark.parametrize("make, change, error, message", [
    (sgd, lambda s: s.pop("step_count"), ValueError,
     "state_dict does not match the SGD optimizer: missing keys ['step_count'], unexpected "
     "keys []"),
    (sgd, lambda s: s.update({"momentum_buffer.8": np.zeros(3)}), ValueError,
     "missing keys [], unexpected keys ['momentum_buffer.8']"),
    (sgd, lambda s: s.update({"exp_avg.0": s["momentum_buffer.0"]}), ValueError,
     "unexpected keys ['exp_avg.0']"),
    (sgd, lambda s: s["momentum_buffer.4"].flat.__setitem__(0, np.nan), ValueError,
     "state_dict['momentum_buffer.4'] has non-finite values"),
    (adam, lambda s: s.pop("exp_avg_sq.3"), ValueError, "missing keys ['exp_avg_sq.3']"),
    (adam, lambda s: s["exp_avg_sq.3"].flat.__setitem__(0, -1e-30), ValueError,
     "state_dict['exp_avg_sq.3'] has negative or NaN values; they must be >= 0"),
    (adam, lambda s: s["exp_avg_sq.3"].flat.__setitem__(0, np.nan), ValueError,
     "state_dict['exp_avg_sq.3'] has negative or NaN values"),
    (adam, lambda s: s["exp_avg.5"].flat.__setitem__(0, np.inf), ValueError,
     "state_dict['exp_avg.5'] has non-finite values"),
    (adam, lambda s: s.update({"exp_avg.2": s["exp_avg.2"].reshape(-1)}), ValueError,
     "state_dict['exp_avg.2'] has shape (9,), its parameter '3.weight' has (1, 1, 3, 3)"),
])
def test_optimizer_arrays_are_checked(make, change, error, message):
    model, opt = stepped(make)
    before = snapshot(model, opt)
    state = opt.state_dict()
    change(state)
    with pytest.raises(error, match=re.escape(message)):
        opt.load_state_dict(state)
    assert_same_state(snapshot(model, opt), before)


def test_adam_refuses_a_0d_moment_instead_of_broadcasting_it():
    """The issue: a 0-d exp_avg was broadcast into a (2, 3) state."""
    lin = nn.Linear(3, 2)
    opt = optim.Adam(lin.parameters())
    state = opt.state_dict()
    with pytest.raises(ValueError, match=re.escape(
            "state_dict['exp_avg.0'] has shape (), its parameter 'weight' has (2, 3)")):
        opt.load_state_dict({**state, "exp_avg.0": np.array(5.0, np.float32)})
    assert not opt.m[0].any() and opt.step_count == 0


@pytest.mark.parametrize("make", [sgd, adam])
def test_optimizer_round_trip_and_exp_avg_sq_may_be_inf(make):
    model, opt = stepped(make)
    state = opt.state_dict()
    if make is adam:  # g**2 can overflow while m / sqrt(v) stays finite
        state["exp_avg_sq.0"].flat[0] = np.inf
    twin = make(models.tiny_net(seed=0).parameters())
    twin.load_state_dict(state)
    assert_same_state(twin.state_dict(), state)


# ---- checkpoints, targeted -----------------------------------------------------------


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return _dataset(tmp_path_factory.mktemp("toy"), n_train=96, n_test=32)


def make_checkpoint(toy, path, *extra):
    """A real checkpoint: the tiny model after 1 epoch of 2 steps on 64 toy images."""
    code, _, err = cli_run("train", "--model", "tiny", "--limit", 64, "--batch-size", 32,
                           "--epochs", 1, "--data-dir", toy, "--no-download", "--quiet",
                           "--save", path, *extra)
    assert code == 0, err
    return Path(path)


@pytest.fixture(scope="module", params=["sgd", "adam"])
def made(request, toy, tmp_path_factory):
    """A real checkpoint, and the checkpoint that resuming it for a second epoch writes."""
    folder = tmp_path_factory.mktemp(f"made-{request.param}")
    ck = make_checkpoint(toy, folder / "ck.npz", "--optimizer", request.param)
    out = folder / "resumed.npz"
    code, _, err = resume(toy, ck, out)
    assert code == 0, err
    return ck, out


@pytest.fixture(scope="module")
def sgd_ck(toy, tmp_path_factory):
    return make_checkpoint(toy, tmp_path_factory.mktemp("sgd") / "ck.npz")


def resume(toy, ck, out):
    return cli_run("train", "--resume", ck, "--epochs", 2, "--save", out, "--data-dir", toy,
                   "--no-download", "--quiet")


def edited(src, dst, **changes) -> Path:
    """A copy of checkpoint ``src`` with entries replaced (a value) or dropped (None)."""
    arrays = read_npz(src)
    for key, value in changes.items():
        key = key.replace("__", "/")
        if value is None:
            del arrays[key]
        else:
            arrays[key] = value
    write_npz(dst, arrays)
    return Path(dst)


def json_edited(src, dst, key, edit) -> Path:
    obj = json.loads(str(read_npz(src)[key]))
    edit(obj)
    return edited(src, dst, **{key: np.array(json.dumps(obj))})


def test_sgd_buffer_of_another_shape_in_a_checkpoint_is_one_line(sgd_ck, toy, tmp_path):
    """The issue's crash through the CLI: 'loss became nan', then glibc aborted."""
    bad = edited(sgd_ck, tmp_path / "bad.npz",
                 **{"optim__momentum_buffer.4": np.zeros(1, np.float32)})
    before = bad.read_bytes()
    code, _, err = resume(toy, bad, bad)
    assert_one_line_error(code, err, f"{bad}: not a valid fastconv checkpoint: "
                          "optim/momentum_buffer.4 has shape (1,), its parameter '7.weight' "
                          "has (49, 49)")
    assert bad.read_bytes() == before


@pytest.mark.parametrize("what, change, message", [
    ("no optim/step_count", dict(optim__step_count=None),
     "state_dict does not match the SGD optimizer: missing keys ['optim/step_count']"),
    ("no optim/lr", dict(optim__lr=None), "missing keys ['optim/lr']"),
    ("epoch -1", dict(epoch=np.array(-1)), "epoch is -1; it must be >= 0"),
    ("epoch 2 of 1", dict(epoch=np.array(2)), "epoch is 2, more than the config's 1 epochs"),
    ("epoch 1.0", dict(epoch=np.array(1.0)), "epoch has dtype float64; it must be an integer"),
    ("no epoch", dict(epoch=None), "missing entries ['epoch']"),
    ("an unknown entry", dict(notes=np.array("hi")), "unknown entries ['notes']"),
    ("an unknown model entry", {"model__9.weight": np.zeros(3)},
     "unexpected keys ['model/9.weight']"),
    ("a newer format", dict(format_version=np.array(2)),
     "format_version is 2: written by a newer fastconv; this one reads format_version 1"),
    ("format 0", dict(format_version=np.array(0)), "format_version is 0; it must be >= 1"),
    ("a float64 weight", {"model__7.weight": np.zeros((49, 49))},
     "model/7.weight has dtype float64; a checkpoint holds it as float32"),
    ("a float32 lr", dict(optim__lr=np.float32(0.05)),
     "optim/lr has dtype float32; a checkpoint holds it as float64"),
    ("a NaN weight", {"model__0.bias": np.array([np.nan], np.float32)},
     "model/0.bias has non-finite values"),
    ("a missing buffer", {"optim__momentum_buffer.3": None},
     "optim/ has 7 momentum buffers; SGD with momentum 0.9 after 2 steps has 8"),
    ("step_count 0", dict(optim__step_count=np.array(0)),
     "optim/step_count is 0; after 1 epochs it must be a positive multiple of 1"),
    ("config bytes", dict(config=np.array(b"{}")),
     "config has dtype |S2 and shape (); it must be a JSON text"),
    ("config not JSON", dict(config=np.array("{'a': 1}")), "config is not valid JSON"),
    ("history NaN", dict(history=np.array("[NaN]")), "history is not valid JSON (ValueError: "
     "NaN is not allowed)"),
])
def test_bad_checkpoint_entries_are_one_line(sgd_ck, toy, tmp_path, what, change, message):
    bad = edited(sgd_ck, tmp_path / "bad.npz", **change)
    with pytest.raises(ValueError) as e:
        train.load_checkpoint(bad)
    assert str(e.value).startswith(f"{bad}: not a valid fastconv checkpoint: ")
    assert message in str(e.value) and "\n" not in str(e.value)
    for args in (["train", "--resume", bad], ["evaluate", "--checkpoint", bad]):
        code, _, err = cli_run(*args, "--data-dir", toy, "--no-download")
        assert_one_line_error(code, err, message)


@pytest.mark.parametrize("key, edit, message", [
    ("rng", lambda r: r.pop("state"), "rng must be a JSON object with keys"),
    ("rng", lambda r: r.update(bit_generator="MT19937"), "rng is a 'MT19937' state; it must "
     "be 'PCG64'"),
    ("rng", lambda r: r["state"].update(inc=2), "rng 'inc' is even"),
    ("rng", lambda r: r["state"].update(state=-1), "rng 'state' is -1; it must be an integer "
     "in [0, 340282366920938463463374607431768211456)"),
    ("rng", lambda r: r.update(has_uint32=7), "rng 'has_uint32' is 7"),
    ("history", lambda h: h.__setitem__(0, {}), "history[0] must be an object with keys"),
    ("history", lambda h: h.append(h[0]), "history must be a JSON list of 1 rows (one per "
     "epoch done), got 2"),
    ("history", lambda h: h[0].update(test_accuracy=1.5), "history[0]['test_accuracy'] is "
     "1.5; it must be a number in [0, 1]"),
    ("history", lambda h: h[0].update(epoch=2), "history[0]['epoch'] is 2; it must be 1"),
    ("history", lambda h: h[0].update(train_samples=True), "history[0]['train_samples'] is "
     "True; it must be an integer >= 0"),
    ("config", lambda c: c.update(model="resnet"), "config: unknown model 'resnet'"),
    ("config", lambda c: c.update(dataset="cifar"), "config: unknown dataset 'cifar'"),
    ("config", lambda c: c.pop("lr"), "config does not match TrainConfig: missing keys "
     "['lr'], unknown keys []"),
    ("config", lambda c: c.update(colour="red"), "unknown keys ['colour']"),
    ("config", lambda c: c.update(epochs="2"), "config 'epochs' is '2'; it must be a JSON int"),
    ("config", lambda c: c.update(epochs=2.0), "config 'epochs' is 2.0; it must be a JSON int"),
    ("config", lambda c: c.update(lr=True), "config 'lr' is True; it must be a JSON number"),
    ("config", lambda c: c.update(lr=10**400), "config 'lr' is 1000"),
    ("history", lambda h: h[0].update(seconds=-10**400), "history[0]['seconds'] is -1000"),
    ("config", lambda c: c.update(seed=-1), "config 'seed' is -1; it must lie in [0, 2**63)"),
    ("config", lambda c: c.update(batch_size=0), "config: batch_size must be >= 1, got 0"),
    ("config", lambda c: c.update(optimizer="adam"), "missing keys ['optim/exp_avg.0'"),
])
def test_bad_checkpoint_json_is_one_line(sgd_ck, toy, tmp_path, key, edit, message):
    bad = json_edited(sgd_ck, tmp_path / "bad.npz", key, edit)
    for args in (["train", "--resume", bad], ["evaluate", "--checkpoint", bad]):
        code, _, err = cli_run(*args, "--data-dir", toy, "--no-download")
        assert_one_line_error(code, err, f"{bad}: not a valid fastconv checkpoint: ", message)


def test_checkpoint_without_format_version_is_version_1(sgd_ck, tmp_path):
    assert int(read_npz(sgd_ck)["format_version"]) == train.CHECKPOINT_VERSION == 1
    old = edited(sgd_ck, tmp_path / "old.npz", format_version=None)
    assert_same_checkpoint(train.load_checkpoint(old), train.load_checkpoint(sgd_ck))


def test_checkpoint_of_the_old_model_name_loads_and_resumes(sgd_ck, toy, tmp_path):
    """Checkpoints written when the tiny network was called 'seed' still load, as 'tiny',
    and resume (also with --model seed given again)."""
    assert json.loads(str(read_npz(sgd_ck)["config"]))["model"] == "tiny"
    old = json_edited(sgd_ck, tmp_path / "old.npz", "config",
                      lambda c: c.update(model="seed"))
    assert train.load_checkpoint(old)["config"].model == "tiny"
    assert_same_checkpoint(train.load_checkpoint(old), train.load_checkpoint(sgd_ck))
    for i, flags in enumerate(([], ["--model", "seed"], ["--model", "tiny"])):
        out = tmp_path / f"resumed{i}.npz"
        code, _, err = cli_run("train", "--resume", old, "--epochs", 2, "--save", out,
                               "--data-dir", toy, "--no-download", "--quiet", *flags)
        assert code == 0, err
        assert json.loads(str(read_npz(out)["config"]))["model"] == "tiny"
    code, _, err = cli_run("train", "--resume", old, "--model", "two-conv", "--data-dir", toy,
                           "--no-download", "--quiet")
    assert_one_line_error(code, err, "which has model='tiny'; got model='two-conv'")


def test_checkpoint_arrays_come_back_exactly(sgd_ck):
    ck = train.load_checkpoint(sgd_ck)
    raw = read_npz(sgd_ck)
    for part in ("model", "optim"):
        for k, v in ck[part].items():
            np.testing.assert_array_equal(v, raw[f"{part}/{k}"])
            assert np.asarray(v).dtype == raw[f"{part}/{k}"].dtype


def test_step_count_must_match_the_data(sgd_ck, toy, tmp_path):
    """A step count that another amount of data gives is refused before training."""
    bad = edited(sgd_ck, tmp_path / "bad.npz", optim__step_count=np.array(4))
    train.load_checkpoint(bad)  # 4 steps in 1 epoch: possible with other data
    code, _, err = resume(toy, bad, tmp_path / "out.npz")
    assert_one_line_error(code, err, f"{bad}: optim/step_count is 4, but 1 epochs of 2 steps "
                          "(on 64 training images) make 2")
    assert not (tmp_path / "out.npz").exists()


def test_unreadable_files_are_one_line(sgd_ck, toy, tmp_path):
    raw = sgd_ck.read_bytes()
    cases = {"missing.npz": None, "empty.npz": b"", "text.npz": b"hello",
             "cut.npz": raw[:len(raw) // 2], "flipped.npz": bytearray(raw)}
    cases["flipped.npz"][len(raw) // 3] ^= 0x10  # inside an array: the CRC catches it
    folder = tmp_path / "dir.npz"
    folder.mkdir()
    paths = [folder]
    for name, content in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(bytes(content))
        paths.append(tmp_path / name)
    npy = tmp_path / "array.npz"  # a plain .npy, not an archive
    np.save(npy.with_suffix(".npy"), np.zeros(3))
    npy.with_suffix(".npy").rename(npy)
    paths.append(npy)
    compressed = tmp_path / "compressed.npz"
    np.savez_compressed(compressed, **read_npz(sgd_ck))
    paths.append(compressed)
    pickled = tmp_path / "pickled.npz"
    write_npz(pickled, {**read_npz(sgd_ck), "notes": np.array([{"a": 1}], dtype=object)})
    paths.append(pickled)
    for path in paths:
        code, _, err = cli_run("evaluate", "--checkpoint", path, "--data-dir", toy, "--no-download")
        assert_one_line_error(code, err, f"{path}: not a readable fastconv checkpoint (")


def test_config_types_cover_train_config():
    assert set(train._CONFIG_TYPES) == {f.name for f in
                                        train.dataclasses.fields(train.TrainConfig)}


# ---- checkpoints, fuzzed -------------------------------------------------------------

NAMES = {"mnist", "fashion-mnist", "two-conv", "tiny", "seed", "sgd", "adam", "cosine",
         "constant", "PCG64"}


def wrong_json_for(value):
    """JSON values that are never valid where ``value`` is, in any checkpoint here.

    Every number in the schema is >= 0, so a negative one is always wrong; so are another
    JSON type (but null, which ``limit`` may be) and a string that names nothing.
    """
    kinds = {bool: st.booleans(), str: st.text(max_size=4).filter(lambda v: v not in NAMES),
             list: st.lists(st.integers(), max_size=2), dict: st.just({}),
             int: st.integers(0, 9), float: st.floats(0, 9)}
    if type(value) in (int, float):
        return st.one_of(kinds[bool], kinds[str], kinds[list], kinds[dict],
                         st.integers(max_value=-1), st.floats(max_value=-1e-300))
    return st.one_of([s for t, s in kinds.items() if t is not type(value)])


@st.composite
def json_path(draw, obj):
    """A path (list of keys/indices) to a value inside ``obj``, the root included."""
    path = []
    while isinstance(obj, (dict, list)) and obj and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(obj) if isinstance(obj, dict) else range(len(obj))))
        path.append(key)
        obj = obj[key]
    return path


def mutate_json(draw, text: str) -> str:
    obj = json.loads(text)
    kind = draw(st.sampled_from(["replace", "drop", "add", "truncate"]))
    if kind == "truncate":
        return text[:draw(st.integers(0, len(text) - 1))]
    path = draw(json_path(obj))
    if kind == "replace" or not path:
        if not path:
            return json.dumps(draw(wrong_json_for(obj)))
        parent = obj
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = draw(wrong_json_for(parent[path[-1]]))
        return json.dumps(obj)
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    if kind == "drop":
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent["unknown_" + draw(st.text("abc", max_size=3))] = draw(st.integers())
    else:
        parent.insert(path[-1], parent[path[-1]])
    return json.dumps(obj)


RETYPES = ["float16", "float32", "float64", "int8", "int32", "int64", "uint8", "bool",
           "complex64", "<U3", "S3", ">f4", ">i8"]


def mutate_arrays(draw, arrays: dict) -> dict:
    arrays = dict(arrays)
    kind = draw(st.sampled_from(["drop", "add", "reshape", "retype", "truncate", "json",
                                 "json"]))
    key = draw(st.sampled_from(["config", "rng", "history"] if kind == "json"
                               else sorted(arrays)))
    a = arrays[key]
    if kind == "drop":
        del arrays[key]
    elif kind == "add":
        # New names only: a valid array under an existing name is another checkpoint.
        name = draw(st.sampled_from([n for n in (
            "notes", "epochs", "model/", "optim/", "model/9.weight", "model/0.Weight",
            "optim/momentum_buffer.8", "optim/exp_avg.8", "optim/exp_avg_sq.0",
            "optim/momentum_buffer.0", "optim/step") if n not in arrays]))
        arrays[name] = draw(st.sampled_from([np.zeros(1, np.float32), np.array(1),
                                             np.array("{}"), a]))
    elif kind == "reshape":
        shapes = {(a.size,), (1, *a.shape), (*a.shape, 1), a.shape[::-1]}
        if a.ndim:
            shapes.add(a.shape[:-1] + (a.shape[-1] * 2,))
        shape = draw(st.sampled_from(sorted(shapes - {a.shape})))
        arrays[key] = np.resize(a, shape)
    elif kind == "retype":
        dtype = draw(st.sampled_from(RETYPES))
        with np.errstate(all="ignore"):
            try:
                arrays[key] = a.astype(dtype)
            except (ValueError, TypeError):  # a JSON text that is no number
                arrays[key] = np.array([str(a)])
    elif kind == "truncate":
        flat = a.reshape(-1)
        arrays[key] = flat[:draw(st.integers(0, max(flat.size - 1, 0)))]
    else:
        arrays[key] = np.array(mutate_json(draw, str(a)))
    return arrays


def mutate_bytes(draw, raw: bytes) -> bytes:
    kind = draw(st.sampled_from(["truncate", "flip", "append"]))
    if kind == "truncate":
        return raw[:draw(st.integers(0, len(raw) - 1))]
    if kind == "append":
        return raw + draw(st.binary(min_size=1, max_size=64))
    out = bytearray(raw)
    for _ in range(draw(st.integers(1, 3))):
        out[draw(st.integers(0, len(raw) - 1))] ^= draw(st.integers(1, 255))
    return bytes(out)


TIMING = {"seconds", "samples_per_second", "train_seconds"}


def assert_same_run(a_path, b_path):
    """Two checkpoints written by resumed runs hold the same weights, optimizer state,
    RNG, config and history (timings aside)."""
    a, b = read_npz(a_path), read_npz(b_path)
    a_hist, b_hist = (json.loads(str(x.pop("history"))) for x in (a, b))
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in a_hist] == \
        [{k: v for k, v in r.items() if k not in TIMING} for r in b_hist]
    assert_same_state(a, b)


@settings(max_examples=500)
@given(data=st.data())
def test_fuzzed_checkpoints_resume_correctly_or_fail_in_one_line(made, toy, data):
    """Mutate a real checkpoint (entries dropped, added, reshaped, retyped, truncated; JSON
    values replaced, dropped, added, truncated; the zip cut, extended or flipped): loading
    either gives exactly the original run or a one-line error with exit code 1."""
    ck, resumed = made
    folder = ck.parent
    bad, out = folder / "mutated.npz", folder / "out.npz"
    out.unlink(missing_ok=True)
    if data.draw(st.sampled_from(["file", "entries", "entries"])) == "file":
        bad.write_bytes(mutate_bytes(data.draw, ck.read_bytes()))
    else:
        write_npz(bad, mutate_arrays(data.draw, read_npz(ck)))
    try:
        loaded = train.load_checkpoint(bad)
    except ValueError as e:
        loaded = None
        assert str(e).startswith(f"{bad}: not a ") and "\n" not in str(e), str(e)
    if loaded is not None:
        assert_same_checkpoint(loaded, train.load_checkpoint(ck))
    code, _, err = resume(toy, bad, out)
    if loaded is None:
        assert_one_line_error(code, err, f"{bad}: not a ")
        assert not out.exists()
    else:
        assert code == 0, err
        assert_same_run(out, resumed)


def test_fuzz_oracle_sees_a_different_run(made, toy, tmp_path):
    """The fuzz test's comparison fails for a valid checkpoint with other weights."""
    ck, resumed = made
    arrays = read_npz(ck)
    arrays["model/8.bias"] = arrays["model/8.bias"] + np.float32(0.5)
    other = tmp_path / "other.npz"
    write_npz(other, arrays)
    code, _, err = resume(toy, other, tmp_path / "out.npz")
    assert code == 0, err
    with pytest.raises(AssertionError):
        assert_same_run(tmp_path / "out.npz", resumed)

