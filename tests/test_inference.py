"""``fastconv evaluate`` and ``fastconv predict`` (fastconv.inference), on a checkpoint
trained briefly on the real Fashion-MNIST ($FASTCONV_DATA), and on untrained checkpoints
where the weights do not matter."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_data import idx_bytes

from fastconv import data, inference, models, train
from fastconv.cli import main
from fastconv.train import TrainConfig

REAL = Path(os.environ.get("FASTCONV_DATA", "../shared/data"))
FASHION = REAL / "fashion-mnist"
needs_fashion = pytest.mark.skipif(not FASHION.is_dir(),
                                   reason="needs the real Fashion-MNIST in $FASTCONV_DATA")
needs_mnist = pytest.mark.skipif(not (REAL / "mnist").is_dir(),
                                 reason="needs the real MNIST test files in $FASTCONV_DATA")

EVALUATE_KEYS = {"checkpoint", "model", "epoch", "dataset", "split", "limit", "n_images",
                 "loss", "accuracy", "per_class_accuracy", "confusion_matrix", "class_names"}


def untrained(path, dataset="mnist", model="tiny"):
    """A valid checkpoint of an untrained network (epoch 0)."""
    cfg = TrainConfig(dataset=dataset, model=model)
    net, opt = train.build(cfg)
    train.save_checkpoint(path, cfg, net, opt, 0, np.random.default_rng(0), [])
    return path


def cli(capsys, *args):
    """``fastconv ARGS`` in this process: (exit code, stdout, stderr)."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


# ---- evaluate ------------------------------------------------------------------------


@needs_fashion
def test_evaluate_prints_and_writes_per_class_results(capsys, tmp_path, fashion_ck,
                                                      fashion_test):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (the train extra)")
    m, png = tmp_path / "m.json", tmp_path / "cm.png"
    code, out, err = cli(capsys, "evaluate", "--checkpoint", fashion_ck, "--data-dir", REAL,
                         "--no-download", "--limit", 1000, "--metrics-json", m, "--plot", png)
    assert code == 0 and err == "", err
    metrics = json.loads(m.read_text())
    assert set(metrics) == EVALUATE_KEYS
    assert metrics["checkpoint"] == str(fashion_ck) and metrics["dataset"] == "fashion-mnist"
    assert metrics["model"] == "two-conv" and metrics["epoch"] == 1
    assert metrics["limit"] == 1000 and metrics["n_images"] == 1000
    assert metrics["class_names"] == list(data.CLASS_NAMES["fashion-mnist"])
    cm = np.array(metrics["confusion_matrix"])
    images, labels = fashion_test[0][:1000], fashion_test[1][:1000]
    assert cm.shape == (10, 10) and cm.sum() == 1000
    np.testing.assert_array_equal(cm.sum(axis=1), np.bincount(labels, minlength=10))
    for c in range(10):
        assert metrics["per_class_accuracy"][c] == cm[c, c] / cm[c].sum()
    assert metrics["accuracy"] == np.trace(cm) / 1000
    # the same numbers as the training loop's evaluation, and predictions as predict's
    model, _ = inference.load_model(fashion_ck)
    assert (metrics["loss"], metrics["accuracy"]) == train.evaluate(model, images, labels)
    predicted = inference.predict(model, images).argmax(axis=1)
    np.testing.assert_array_equal(cm, np.histogram2d(labels, predicted, bins=10,
                                                     range=[[0, 10], [0, 10]])[0])
    assert metrics["accuracy"] > 0.5  # it has learned (chance is 0.1)

    lines = out.splitlines()
    assert lines[0] == (f"fashion-mnist test: loss {metrics['loss']:.4f}, accuracy "
                        f"{metrics['accuracy']:.4f} (1000 images)")
    assert lines[2].split() == ["class", "accuracy", "images"]
    for c, name in enumerate(data.CLASS_NAMES["fashion-mnist"]):
        row = lines[3 + c]
        assert row.startswith(f"{c} {name} ")
        assert row.split()[-2:] == [f"{metrics['per_class_accuracy'][c]:.4f}",
                                    str(cm[c].sum())]
        assert lines[16 + c].startswith(f"{c} {name} ")
        assert [int(v) for v in lines[16 + c][len(f"{c} {name}"):].split()] == list(cm[c])
    assert lines[14] == "confusion matrix (rows: true class, columns: predicted class)"
    assert lines[15].split() == [str(c) for c in range(10)]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert no_temp_files(tmp_path)


@needs_mnist
def test_evaluate_names_mnist_classes_by_their_digits(capsys, tmp_path):
    ck = untrained(tmp_path / "ck.npz")
    code, out, _ = cli(capsys, "evaluate", "--checkpoint", ck, "--data-dir", REAL,
                       "--no-download", "--limit", 30)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("mnist test: loss ") and lines[0].endswith("(30 images)")
    assert [ln.split()[0] for ln in lines[3:13]] == [str(d) for d in range(10)]
    assert len(lines[3].split()) == 3  # "0  0.5000  3": the digit is the name


@needs_fashion
def test_evaluate_model_is_a_deprecated_alias_of_checkpoint(capsys, fashion_ck):
    args = ["--data-dir", REAL, "--no-download", "--limit", 100]
    code, new, err = cli(capsys, "evaluate", "--checkpoint", fashion_ck, *args)
    assert code == 0 and err == ""
    code, old, err = cli(capsys, "evaluate", "--model", fashion_ck, "--model", fashion_ck,
                         *args)
    assert code == 0 and old == new
    assert err == ("fastconv evaluate: warning: option '--model' is deprecated; use "
                   "'--checkpoint' ('fastconv train --model' names the architecture)\n")


@needs_fashion
def test_evaluate_runs_as_a_command(fashion_ck, tmp_path):
    """The installed entry point, with the old option name: the warning, then the results."""
    env = dict(os.environ, FASTCONV_DATA=str(REAL))
    r = subprocess.run([sys.executable, "-m", "fastconv", "evaluate", "--model",
                        str(fashion_ck), "--no-download", "--limit", "50"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0
    assert "deprecated" in r.stderr and len(r.stderr.splitlines()) == 1
    assert r.stdout.startswith("fashion-mnist test: loss ") and "Ankle boot" in r.stdout


def test_evaluate_errors(capsys, tmp_path, monkeypatch):
    code, _, err = cli(capsys, "evaluate")
    assert code == 2 and "the following arguments are required: --checkpoint" in err
    code, _, err = cli(capsys, "evaluate", "--checkpoint", tmp_path / "none.npz")
    assert code == 1 and err.startswith("fastconv: error: ") and len(err.splitlines()) == 1
    assert "not a readable fastconv checkpoint" in err
    code, _, err = cli(capsys, "evaluate", "--checkpoint", "ck.npz", "--limit", 0)
    assert code == 2 and "argument --limit: expected a positive integer, got '0'" in err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    code, _, err = cli(capsys, "evaluate", "--checkpoint", untrained(tmp_path / "ck.npz"),
                       "--plot", tmp_path / "p.png", "--data-dir", tmp_path, "--no-download")
    assert (code, err) == (1, "fastconv: error: --plot needs matplotlib: pip install "
                              "'fastconv[train]'\n")


def test_evaluate_counts_classes_without_images_as_none():
    model = models.tiny_net(seed=0)
    images = np.zeros((4, 28, 28), np.uint8)
    result = inference.evaluate(model, images, np.array([1, 1, 3, 3]), batch_size=3)
    assert result["n_images"] == 4 and sum(map(sum, result["confusion_matrix"])) == 4
    acc = result["per_class_accuracy"]
    assert [acc[c] for c in (0, 2, 4, 5, 6, 7, 8, 9)] == [None] * 8
    assert acc[1] is not None and acc[3] is not None
    text = inference.format_evaluation(result, data.CLASS_NAMES["mnist"])
    assert text.splitlines()[1].split() == ["0", "-", "0"]
    with pytest.raises(ValueError, match="labels must lie in"):
        inference.evaluate(model, images, np.array([0, 1, 2, 10]))
    with pytest.raises(ValueError, match="4 images but 3 labels"):
        inference.evaluate(model, images, np.array([0, 1, 2]))


# ---- images --------------------------------------------------------------------------


def _png(path: Path, array):
    from PIL import Image

    Image.fromarray(array).save(path)
    return path


def test_read_images_prepares_them_as_the_training_data(tmp_path):
    pytest.importorskip("PIL", reason="needs Pillow (the images extra)")
    from PIL import Image

    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    big = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    paths = [_png(tmp_path / "gray.png", gray),
             _png(tmp_path / "rgb.png", np.repeat(gray[..., None], 3, axis=2)),
             _png(tmp_path / "rgba.png", np.dstack([np.repeat(gray[..., None], 3, axis=2),
                                                    np.zeros((28, 28), np.uint8)])),
             _png(tmp_path / "gray16.png", gray.astype(np.uint16) * 257),
             _png(tmp_path / "big.png", big)]
    images, sources = inference.read_images(paths)
    assert images.shape == (5, 28, 28) and images.dtype == np.uint8
    assert sources == [(str(p), None) for p in paths]
    for i in range(4):  # gray, gray as RGB, alpha dropped, 16 bits scaled to 8
        np.testing.assert_array_equal(images[i], gray)
    # other sizes and colours: luminance, then a bilinear resize to 28x28 (torchvision's
    # Grayscale() and Resize((28, 28)) on a PIL image)
    expected = Image.fromarray(big).convert("L").resize((28, 28), Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(images[4], np.asarray(expected))
    # an icon starts with two zero bytes, as IDX files do: it is still an image
    Image.fromarray(gray).save(tmp_path / "icon.ico", sizes=[(28, 28)])
    icon, _ = inference.read_images([tmp_path / "icon.ico"])
    np.testing.assert_array_equal(icon[0], gray)
    inverted, _ = inference.read_images(paths[:1], invert=True)
    np.testing.assert_array_equal(inverted[0], 255 - gray)


def test_read_images_reads_idx_files(tmp_path):
    stack = np.random.default_rng(1).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    raw, gz = tmp_path / "x-idx3-ubyte", tmp_path / "y-idx3-ubyte.gz"
    raw.write_bytes(idx_bytes(stack))
    gz.write_bytes(gzip.compress(idx_bytes(stack[0])))  # one (28, 28) image
    images, sources = inference.read_images([raw, gz])
    np.testing.assert_array_equal(images, np.concatenate([stack, stack[:1]]))
    assert sources == [(str(raw), 0), (str(raw), 1), (str(raw), 2), (str(gz), 0)]


def test_light_background():
    images = np.zeros((2, 28, 28), np.uint8)
    images[1] = 255
    images[1, 5:20, 5:20] = 0  # dark ink on white paper
    assert inference.light_background(images).tolist() == [False, True]


# ---- predict -------------------------------------------------------------------------


@needs_fashion
def test_predict_png_files_and_an_idx_file(capsys, tmp_path, fashion_ck, fashion_test):
    pytest.importorskip("PIL", reason="needs Pillow (the images extra)")
    images = fashion_test[0][:6]
    pngs = [_png(tmp_path / f"{i}.png", a) for i, a in enumerate(images[:3])]
    idx = tmp_path / "some-images-idx3-ubyte.gz"
    idx.write_bytes(gzip.compress(idx_bytes(images[3:])))
    model, _ = inference.load_model(fashion_ck)
    probs = inference.predict(model, images)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    names = data.CLASS_NAMES["fashion-mnist"]

    code, out, err = cli(capsys, "predict", "--checkpoint", fashion_ck, *pngs, idx)
    assert code == 0 and err == "", err
    sources = [str(p) for p in pngs] + [f"{idx}[{i}]" for i in range(3)]
    expected = [f"{s}: {c} {names[c]} ({p[c]:.4f})"
                for s, p, c in zip(sources, probs, probs.argmax(axis=1), strict=True)]
    assert out.splitlines() == expected

    code, out, err = cli(capsys, "predict", "--checkpoint", fashion_ck, *pngs, idx, "--json",
                         "--top-k", 3)
    assert code == 0 and err == ""
    rows = json.loads(out)
    assert [r["file"] for r in rows] == [str(p) for p in pngs] + [str(idx)] * 3
    assert [r["index"] for r in rows] == [None, None, None, 0, 1, 2]
    for row, p in zip(rows, probs, strict=True):
        order = np.argsort(-p, kind="stable")[:3]
        assert [t["class"] for t in row["top_k"]] == order.tolist()
        assert [t["name"] for t in row["top_k"]] == [names[c] for c in order]
        assert [t["probability"] for t in row["top_k"]] == pytest.approx(p[order], rel=1e-12)
        assert (row["class"], row["name"], row["probability"]) == (
            order[0], names[order[0]], row["top_k"][0]["probability"])


@needs_fashion
def test_predict_notes_images_on_a_light_background(capsys, tmp_path, fashion_ck,
                                                    fashion_test):
    idx = tmp_path / "inverted-idx3-ubyte"
    idx.write_bytes(idx_bytes(255 - fashion_test[0][:2]))
    code, out, err = cli(capsys, "predict", "--checkpoint", fashion_ck, idx)
    assert code == 0 and len(out.splitlines()) == 2
    assert err == ("fastconv: note: 2 of 2 images look dark on a light background; the "
                   "network was trained on light objects on black: --invert turns them "
                   "around\n")
    code, inverted, err = cli(capsys, "predict", "--checkpoint", fashion_ck, idx, "--invert")
    assert code == 0 and err == ""
    plain = tmp_path / "plain-idx3-ubyte"
    plain.write_bytes(idx_bytes(fashion_test[0][:2]))
    code, out, _ = cli(capsys, "predict", "--checkpoint", fashion_ck, plain)
    assert out == inverted.replace("inverted", "plain")


def test_predict_errors_are_one_line(capsys, tmp_path, monkeypatch):
    ck = untrained(tmp_path / "ck.npz", dataset="fashion-mnist")
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    labels = tmp_path / "labels-idx1-ubyte"
    labels.write_bytes(idx_bytes(np.arange(5, dtype=np.uint8)))
    wrong_size = tmp_path / "big-idx3-ubyte"
    wrong_size.write_bytes(idx_bytes(np.zeros((2, 32, 32), np.uint8)))
    floats = tmp_path / "float-idx3-ubyte"
    floats.write_bytes(idx_bytes(np.zeros((2, 28, 28), np.float32)))
    cases = [
        ([tmp_path / "missing.png"], f"{tmp_path / 'missing.png'}: no such file"),
        ([tmp_path], f"{tmp_path}: not a file; give image files (PNG, JPEG, ...) or IDX files"),
        ([labels], f"{labels}: an IDX file of images holds uint8 (n, 28, 28) or (28, 28); "
                   "this one holds uint8 (5,) (a labels file?)"),
        ([wrong_size], f"{wrong_size}: an IDX file of images holds uint8 (n, 28, 28) or "
                       "(28, 28); this one holds uint8 (2, 32, 32)"),
        ([floats], f"{floats}: an IDX file of images holds uint8 (n, 28, 28) or (28, 28); "
                   "this one holds float32 (2, 28, 28)"),
    ]
    if _has_pillow():
        noise = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
        truncated = _png(tmp_path / "t.png", noise)
        truncated.write_bytes(truncated.read_bytes()[:400])
        cases += [([text], f"{text}: neither an image file Pillow can read (PNG, JPEG, ...) "
                           "nor an IDX file"),
                  ([truncated], f"{truncated}: unreadable image (")]
    for images, message in cases:
        code, out, err = cli(capsys, "predict", "--checkpoint", ck, *images)
        assert code == 1 and out == "", err
        assert err.startswith(f"fastconv: error: {message}") and len(err.splitlines()) == 1

    bad_idx = tmp_path / "bad-idx3-ubyte"
    bad_idx.write_bytes(b"\x00\x00\x08\x03\x00")
    code, _, err = cli(capsys, "predict", "--checkpoint", ck, bad_idx)
    assert code == 1 and "truncated header" in err and str(bad_idx) in err

    ok = tmp_path / "ok-idx3-ubyte"
    ok.write_bytes(idx_bytes(np.zeros((1, 28, 28), np.uint8)))
    code, _, err = cli(capsys, "predict", "--checkpoint", tmp_path / "no.npz", ok)
    assert code == 1 and "not a readable fastconv checkpoint" in err
    code, _, err = cli(capsys, "predict", "--checkpoint", tmp_path / "no.npz", wrong_size)
    assert code == 1 and "IDX file of images" in err  # the images are read first
    code, _, err = cli(capsys, "predict", "--checkpoint", ck)
    assert code == 2 and "the following arguments are required: IMAGE" in err
    for k in (0, 11, "two"):
        code, _, err = cli(capsys, "predict", "--checkpoint", ck, labels, "--top-k", k)
        assert code == 2 and "argument --top-k: expected an integer in [1, 10]" in err

    monkeypatch.setitem(sys.modules, "PIL", None)  # as if Pillow were not installed
    code, _, err = cli(capsys, "predict", "--checkpoint", ck, text)
    assert code == 1 and err == (f"fastconv: error: {text}: reading image files (PNG, "
                                 "JPEG, ...) needs Pillow: pip install 'fastconv[images]' "
                                 "(IDX files need nothing)\n")
    code, out, _ = cli(capsys, "predict", "--checkpoint", ck, ok)
    assert code == 0 and out.startswith(f"{ok}[0]: ")


def _has_pillow() -> bool:
    try:
        import PIL  # noqa: F401
    except ImportError:
        return False
    return True
