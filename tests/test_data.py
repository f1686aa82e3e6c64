"""IDX reading, the dataset search order, and downloads from a real local HTTP server."""

import gzip
import hashlib
import http.server
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from fastconv import data
from fastconv.data import DatasetNotFoundError, IDXError, load_dataset, read_idx

REAL = Path(os.environ.get("FASTCONV_DATA", "../shared/data"))


def idx_bytes(a: np.ndarray) -> bytes:
    code = {np.uint8: 0x08, np.int32: 0x0C, np.float32: 0x0D}[a.dtype.type]
    header = bytes([0, 0, code, a.ndim]) + b"".join(d.to_bytes(4, "big") for d in a.shape)
    return header + a.astype(a.dtype.newbyteorder(">")).tobytes()


def write_dataset(folder: Path, n_train=6, n_test=4, value=0, gz=True):
    folder.mkdir(parents=True, exist_ok=True)
    arrays = [np.full((n_train, 28, 28), value, np.uint8), np.arange(n_train, dtype=np.uint8) % 10,
              np.full((n_test, 28, 28), value, np.uint8), np.arange(n_test, dtype=np.uint8) % 10]
    for stem, a in zip(["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                        "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"], arrays, strict=True):
        raw = idx_bytes(a)
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / stem).write_bytes(raw)
    return arrays


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No real user cache, no FASTCONV_DATA unless a test sets it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTCONV_DATA", raising=False)


# ---- IDX -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32])
@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, dtype, gz):
    a = (np.arange(24).reshape(2, 3, 4) * 3).astype(dtype)
    raw = idx_bytes(a)
    p = tmp_path / "f.idx"
    p.write_bytes(gzip.compress(raw) if gz else raw)
    b = read_idx(p)
    np.testing.assert_array_equal(a, b)
    assert b.dtype == dtype and b.dtype.isnative


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r[:-1], r"has 35 bytes \(truncated\)"),
    (lambda r: r + b"\0", "but the data has 37 bytes"),
    (lambda r: b"\x01" + r[1:], "bad IDX magic number 0x01000803"),
    (lambda r: r[:2] + b"\x07" + r[3:], "bad IDX magic number"),
    (lambda r: r[:10], "truncated header: 10 bytes, need 16"),
    (lambda r: r[:3], "too short for an IDX header"),
])
def test_bad_idx_files_name_the_file(tmp_path, mutate, message):
    p = tmp_path / "bad-images-idx3-ubyte"
    p.write_bytes(mutate(idx_bytes(np.zeros((1, 4, 5), np.uint8))))
    with pytest.raises(IDXError, match=message) as e:
        read_idx(p)
    assert str(p) in str(e.value)


def test_truncated_gzip_names_the_file(tmp_path):
    p = tmp_path / "x.gz"
    pixels = np.random.default_rng(0).integers(0, 256, (50, 28, 28), dtype=np.uint8)
    p.write_bytes(gzip.compress(idx_bytes(pixels))[:2000])
    with pytest.raises(IDXError, match=f"{p}: corrupt or truncated gzip"):
        read_idx(p)


@pytest.mark.skipif(not (REAL / "fashion-mnist").is_dir(), reason="no FASTCONV_DATA")
def test_real_files():
    xtr, ytr, xte, yte = load_dataset("fashion-mnist", REAL, download=False)
    assert xtr.shape == (60000, 28, 28) and xte.shape == (10000, 28, 28)
    assert xtr.dtype == np.uint8 and set(np.unique(ytr)) == set(range(10))
    assert np.bincount(yte).tolist() == [1000] * 10
    images = read_idx(REAL / "mnist" / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(REAL / "mnist" / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and labels[:5].tolist() == [7, 2, 1, 0, 4]


# ---- search order --------------------------------------------------------------------


def test_search_order(tmp_path, monkeypatch):
    write_dataset(tmp_path / "cache" / "fastconv" / "mnist", value=3)
    assert load_dataset("mnist", download=False)[0][0, 0, 0] == 3
    write_dataset(tmp_path / "env" / "mnist", value=2, gz=False)
    monkeypatch.setenv("FASTCONV_DATA", str(tmp_path / "env"))
    assert load_dataset("mnist", download=False)[0][0, 0, 0] == 2
    write_dataset(tmp_path / "arg", value=1)
    assert load_dataset("mnist", tmp_path / "arg", download=False)[0][0, 0, 0] == 1
    # data_dir may also be the parent of a <name> folder.
    assert load_dataset("mnist", tmp_path / "env", download=False)[0][0, 0, 0] == 2


def test_own_split_sizes(tmp_path):
    arrays = write_dataset(tmp_path / "d", n_train=7, n_test=3)
    got = load_dataset("fashion-mnist", tmp_path / "d", download=False)
    for a, b in zip(arrays, got, strict=True):
        np.testing.assert_array_equal(a, b)


def test_mismatched_images_and_labels(tmp_path):
    write_dataset(tmp_path, n_train=6)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.zeros(5, np.uint8))))
    with pytest.raises(IDXError, match="has 6 images but .* has 5 labels"):
        load_dataset("mnist", tmp_path, download=False)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'cifar'; choose one of"):
        load_dataset("cifar")


def test_not_found_offline_says_where_it_looked(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("mnist", tmp_path / "nowhere", download=False)
    lines = str(e.value).splitlines()
    assert lines[0] == ("mnist: could not find train-images-idx3-ubyte, "
                        "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                        "t10k-labels-idx1-ubyte (each .gz or raw IDX) in one folder.")
    assert lines[1:5] == ["Looked in:", f"  {tmp_path / 'nowhere' / 'mnist'}",
                          f"  {tmp_path / 'nowhere'}",
                          f"  {tmp_path / 'cache' / 'fastconv' / 'mnist'}"]
    assert lines[5] == "Downloading was turned off (download=False)."
    assert lines[-2:] == ["  data_dir=DIR             (an argument of load_dataset and train)",
                          "  export FASTCONV_DATA=DIR (the files in DIR/mnist)"]
    assert "--" not in str(e.value)  # the Python arguments, not the command's options
    cli = e.value.cli_message.splitlines()  # the same, with the options of `fastconv`
    assert cli[:5] == lines[:5] and cli[5] == "Downloading was turned off (--no-download)."
    assert cli[-2:] == ["  --data-dir DIR", "  export FASTCONV_DATA=DIR (the files in DIR/mnist)"]
    assert "data_dir" not in e.value.cli_message and "download=" not in e.value.cli_message
    assert not any("Download failed" in line or "dataset-fashion-mnist" in line
                   for line in lines)  # no download tried; the Debian package is not MNIST's


def test_not_found_message_for_fashion_mnist(tmp_path, monkeypatch):
    """Each folder once, one line for eight failed downloads (4 files x 2 mirrors), the
    two ways out and Debian's package."""
    debian = tmp_path / "debian"
    fake = data._Dataset("fashion-mnist", mirrors=("http://127.0.0.1:9/a/", "http://127.0.0.1:9/b/"),
                         files=data.DATASETS["fashion-mnist"].files,
                         system_dirs=(str(debian),))
    monkeypatch.setitem(data.DATASETS, "fashion-mnist", fake)
    monkeypatch.setenv("FASTCONV_DATA", str(tmp_path / "d"))  # the same folder as data_dir
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("fashion-mnist", tmp_path / "d", timeout=2)
    lines = str(e.value).splitlines()
    looked = lines[lines.index("Looked in:") + 1:]
    looked = looked[:next(i for i, line in enumerate(looked) if not line.startswith("  "))]
    assert looked == [f"  {tmp_path / 'd' / 'fashion-mnist'}", f"  {tmp_path / 'd'}",
                      f"  {tmp_path / 'cache' / 'fastconv' / 'fashion-mnist'}", f"  {debian}"]
    failed = [line for line in lines if "Download failed" in line]
    assert len(failed) == 1 and "127.0.0.1" not in failed[0].split("(")[0]
    assert failed[0].startswith("Download failed: <urlopen error")
    assert failed[0].endswith("(8 attempts, from 127.0.0.1:9).")
    assert lines[-4:] == [
        "Point fastconv at a folder that holds the files (or a 'fashion-mnist' subfolder "
        "with them):",
        "  data_dir=DIR             (an argument of load_dataset and train)",
        "  export FASTCONV_DATA=DIR (the files in DIR/fashion-mnist)",
        "On Debian, the package dataset-fashion-mnist installs them where fastconv looks: "
        "apt-get install dataset-fashion-mnist"]


def test_the_cli_prints_the_not_found_message_on_its_lines(tmp_path, monkeypatch, capsys):
    from fastconv import cli

    fake = data._Dataset("fashion-mnist", mirrors=("http://127.0.0.1:9/",),
                         files=data.DATASETS["fashion-mnist"].files)
    monkeypatch.setitem(data.DATASETS, "fashion-mnist", fake)
    code = cli.main(["train", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("fashion-mnist", tmp_path / "d", timeout=2)
    assert err == f"fastconv: error: {e.value.cli_message}\n"
    assert len(err.splitlines()) == 10  # the first, 1 + 4 places, the download, 3 + 1 ways out
    assert "  --data-dir DIR" in err.splitlines() and "data_dir=" not in err


# ---- downloads from a real HTTP server on 127.0.0.1 ----------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict = {}
    cut: set = set()

    def do_GET(self):  # noqa: N802 (http.server's name)
        name = self.path.rsplit("/", 1)[-1]
        body = self.files.get(name)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if name in self.cut:
            self.wfile.write(body[: len(body) // 2])  # then the connection closes
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    _Handler.files, _Handler.cut = {}, set()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", _Handler
    httpd.shutdown()
    httpd.server_close()


def _serve_dataset(tmp_path, handler, monkeypatch, url, corrupt=None, cut=None):
    src = tmp_path / "src"
    write_dataset(src, value=9)
    files = []
    for real in data.DATASETS["mnist"].files:
        stem = real.stem
        body = (src / f"{stem}.gz").read_bytes()
        digest = hashlib.sha256(body).hexdigest()
        if stem == corrupt:
            body = gzip.compress(gzip.decompress(body)[:-1] + b"\x01")
        handler.files[f"{stem}.gz"] = body
        if stem == cut:
            handler.cut.add(f"{stem}.gz")
        files.append(data._File(stem, real.shape, frozenset({digest})))
    fake = data._Dataset("mnist", mirrors=(url,), files=tuple(files))
    monkeypatch.setitem(data.DATASETS, "mnist", fake)
    return tmp_path / "cache" / "fastconv" / "mnist"


def test_download_good_files(tmp_path, server, monkeypatch):
    url, handler = server
    cache = _serve_dataset(tmp_path, handler, monkeypatch, url)
    xtr, *_ = load_dataset("mnist", timeout=5)
    assert xtr[0, 0, 0] == 9
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{s}.gz" for s in [
        "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte"])
    handler.files.clear()  # now served from the cache, without the network
    assert load_dataset("mnist", timeout=5)[0][0, 0, 0] == 9


@pytest.mark.parametrize("fault", ["corrupt", "cut"])
def test_failed_download_leaves_nothing_behind(tmp_path, server, monkeypatch, fault):
    url, handler = server
    stem = "t10k-images-idx3-ubyte"
    cache = _serve_dataset(tmp_path, handler, monkeypatch, url, **{fault: stem})
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("mnist", timeout=5)
    msg = str(e.value)
    assert msg.startswith(f"mnist: could not find {stem} (each .gz or raw IDX) in one folder.")
    failed = [line for line in msg.splitlines() if line.startswith("Download failed: ")]
    assert len(failed) == 1, msg
    assert ("checksum mismatch" if fault == "corrupt" else "incomplete download: got") in failed[0]
    assert failed[0].endswith(f"(1 attempt, from {url.split('/')[2]}).")
    left = sorted(p.name for p in cache.iterdir())
    assert f"{stem}.gz" not in left
    assert not [n for n in left if n.endswith(".part")]  # no partial temp files


def test_download_unreachable_is_a_clear_error(tmp_path, monkeypatch):
    fake = data._Dataset("mnist", mirrors=("http://127.0.0.1:9/",),
                         files=(data._File("train-images-idx3-ubyte", (0,)),) * 4)
    monkeypatch.setitem(data.DATASETS, "mnist", fake)
    with pytest.raises(DatasetNotFoundError,
                       match=r"\nDownload failed: <urlopen error .*> \(4 attempts, from "
                             r"127\.0\.0\.1:9\)\.\n"):
        load_dataset("mnist", timeout=2)


def test_all_files_come_from_one_folder(tmp_path):
    write_dataset(tmp_path / "cache" / "fastconv" / "mnist", value=3)
    partial = tmp_path / "arg"
    write_dataset(partial, value=1)
    (partial / "t10k-labels-idx1-ubyte.gz").unlink()  # incomplete: not used at all
    xtr, _, xte, _ = load_dataset("mnist", partial, download=False)
    assert xtr[0, 0, 0] == 3 and xte[0, 0, 0] == 3


def test_labels_out_of_range_name_the_file(tmp_path):
    write_dataset(tmp_path)
    bad = tmp_path / "train-labels-idx1-ubyte.gz"
    bad.write_bytes(gzip.compress(idx_bytes(np.full(6, 200, np.uint8))))
    with pytest.raises(IDXError, match=f"{bad}: labels must lie in \\[0, 10\\), found 200"):
        load_dataset("mnist", tmp_path, download=False)


def test_test_split_only(tmp_path):
    write_dataset(tmp_path, n_test=5)
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (tmp_path / f"{stem}.gz").unlink()
    xte, yte = load_dataset("mnist", tmp_path, download=False, split="test")
    assert xte.shape == (5, 28, 28) and yte.shape == (5,)
