"""MNIST-family datasets: an IDX reader and a loader that finds or downloads the files.

:func:`load_dataset` looks for the four standard files in this order:

1. the ``data_dir`` argument (its ``<name>`` subfolder, then the folder itself);
2. ``$FASTCONV_DATA/<name>``;
3. the user cache, ``~/.cache/fastconv/<name>`` (``$XDG_CACHE_HOME`` is honoured);
4. Debian's ``/usr/share/datasets/fashion-mnist`` (package ``dataset-fashion-mnist``);
5. a download from the dataset's public mirrors into the user cache, verified by SHA-256,
   with a timeout, written to a temporary file and renamed into place only when complete.

Each file may be gzipped (``*.gz``) or raw.  A file is verified on download by the SHA-256
of the gzip file as published or of its decompressed IDX payload (which does not change
when a distribution such as Debian recompresses the archive).
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import os
import tempfile
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["CLASS_NAMES", "DATASETS", "NUM_CLASSES", "DatasetNotFoundError", "IDXError",
           "load_dataset", "read_idx"]

NUM_CLASSES = 10  # both datasets: digits 0-9, or ten kinds of clothing

#: Each dataset's class names, by label: MNIST's digits and Fashion-MNIST's ten kinds of
#: clothing (the names its authors and torchvision use).
CLASS_NAMES = {
    "mnist": tuple(str(d) for d in range(10)),
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"),
}


class IDXError(ValueError):
    """An IDX file is truncated, corrupt or not an IDX file."""


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are neither on disk nor downloadable.

    Its message has several lines (where it looked, why the download failed, what to do)
    and names the Python arguments (``data_dir=``, ``download=False``).
    :attr:`cli_message` says the same with the ``fastconv`` command's options
    (``--data-dir``, ``--no-download``); the command prints it as it is.
    """

    def __init__(self, message: str, cli_message: str | None = None):
        super().__init__(message)
        self.cli_message = message if cli_message is None else cli_message


# IDX type codes -> big-endian numpy dtypes.
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _parse_idx(raw: bytes, name: str) -> np.ndarray:
    if len(raw) < 4:
        raise IDXError(f"{name}: {len(raw)} bytes is too short for an IDX header")
    zero, code, ndim = raw[0:2], raw[2], raw[3]
    if zero != b"\x00\x00" or code not in _IDX_TYPES or ndim == 0:
        raise IDXError(f"{name}: bad IDX magic number 0x{raw[:4].hex()} "
                       "(expected 0x0000TTNN: type code TT, NN dimensions)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IDXError(f"{name}: truncated header: {len(raw)} bytes, need {header}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_TYPES[code])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise IDXError(f"{name}: the header says dims {dims} of {dtype.name} "
                       f"({expected} bytes with the header), but the data has {len(raw)} bytes"
                       + (" (truncated)" if len(raw) < expected else ""))
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _read_payload(path: Path) -> bytes:
    """The file's bytes, decompressed if it is gzip."""
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise IDXError(f"{path}: corrupt or truncated gzip file ({e})") from None
    return data


def read_idx(path) -> np.ndarray:
    """Read an IDX file (gzipped or raw) into a native-endian array.

    The magic number, the dimensions and the file length are checked against each other;
    a truncated or corrupt file raises :class:`IDXError` naming the file.
    """
    path = Path(_path_arg("path", path))
    return _parse_idx(_read_payload(path), str(path))


def _path_arg(name: str, value):
    """``value`` if it is a path (``str`` or ``os.PathLike``), else ``TypeError``."""
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path (str or os.PathLike), got {value!r}")
    return value


@dataclass(frozen=True)
class _File:
    stem: str  # e.g. "train-images-idx3-ubyte"
    shape: tuple  # expected array shape
    sha256: frozenset = field(default_factory=frozenset)  # accepted digests, gz or payload


@dataclass(frozen=True)
class _Dataset:
    name: str
    mirrors: tuple
    files: tuple  # train images, train labels, test images, test labels
    system_dirs: tuple = ()


def _standard_files(*digests) -> tuple:
    """The four files of the MNIST layout (train images, train labels, test images, test
    labels), each with its set of accepted SHA-256 digests."""
    layout = (("train-images-idx3-ubyte", (60000, 28, 28)), ("train-labels-idx1-ubyte", (60000,)),
              ("t10k-images-idx3-ubyte", (10000, 28, 28)), ("t10k-labels-idx1-ubyte", (10000,)))
    return tuple(_File(stem, shape, frozenset(d))
                 for (stem, shape), d in zip(layout, digests, strict=True))


DATASETS = {
    "mnist": _Dataset(
        "mnist",
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/",
                 "https://storage.googleapis.com/cvdf-datasets/mnist/"),
        files=_standard_files(
            {"440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"},
            {"3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"},
            {"8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
             "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"},
            {"f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
             "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"},
        ),
    ),
    "fashion-mnist": _Dataset(
        "fashion-mnist",
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        files=_standard_files(
            {"c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"},
            {"bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"},
            {"5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"},
            {"0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"},
        ),
        system_dirs=("/usr/share/datasets/fashion-mnist",),
    ),
}


def _cache_dir(name: str) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fastconv" / name


def _candidate_dirs(ds: _Dataset, data_dir) -> list[Path]:
    dirs = []
    if data_dir is not None:
        dirs += [Path(data_dir) / ds.name, Path(data_dir)]
    if os.environ.get("FASTCONV_DATA"):
        dirs.append(Path(os.environ["FASTCONV_DATA"]) / ds.name)
    dirs.append(_cache_dir(ds.name))
    dirs += [Path(d) for d in ds.system_dirs]
    return dirs


def _find(folder: Path, f: _File) -> Path | None:
    for candidate in (folder / f"{f.stem}.gz", folder / f.stem):
        if candidate.is_file():
            return candidate
    return None


def _digests(data: bytes) -> set[str]:
    """SHA-256 of the bytes, and of the payload too when they are gzip."""
    found = {hashlib.sha256(data).hexdigest()}
    if data[:2] == b"\x1f\x8b":
        try:
            found.add(hashlib.sha256(gzip.decompress(data)).hexdigest())
        except (OSError, EOFError, zlib.error):
            pass
    return found


def download(url: str, dest: Path, sha256: frozenset, timeout: float = 30.0) -> Path:
    """Fetch ``url`` to ``dest`` atomically, accepting it only if a digest matches.

    The bytes go to a temporary file beside ``dest``, which is renamed into place only
    after the transfer completed and the checksum matched; on any failure it is removed,
    so an interrupted or corrupt download leaves nothing behind.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            buf = io.BytesIO()
            while chunk := resp.read(1 << 20):
                buf.write(chunk)
            data = buf.getvalue()
            length = resp.headers.get("Content-Length")
            if length is not None and len(data) != int(length):
                raise OSError(f"incomplete download: got {len(data)} of {length} bytes")
            if sha256 and not (_digests(data) & sha256):
                raise OSError(f"checksum mismatch: got sha256 {hashlib.sha256(data).hexdigest()}")
            out.write(data)
        os.replace(tmp, dest)
        return dest
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_dataset(name: str, data_dir=None, download: bool = True, timeout: float = 30.0,
                 *, split: str = "both"):
    """Load an MNIST-family dataset as uint8 arrays.

    All the files come from one folder: the first in the search order that holds every
    file needed (``data_dir/<name>`` before ``data_dir`` itself).  Failing that, and with
    ``download``, the missing files are fetched into the user cache.

    Parameters
    ----------
    name : ``'mnist'`` or ``'fashion-mnist'``
    data_dir : folder holding the IDX files (or a ``<name>`` subfolder), optional
    download : fetch missing files from the public mirrors into the user cache
    timeout : seconds per network operation
    split : ``'both'`` (default), or ``'test'`` to need only the two test files

    Returns
    -------
    train_images (60000, 28, 28) uint8, train_labels (60000,) uint8,
    test_images (10000, 28, 28) uint8, test_labels (10000,) uint8
        (the sizes of the standard files; a user's own split may differ).  With
        ``split='test'``: test_images, test_labels.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a dataset name, one of {sorted(DATASETS)}; got {name!r}")
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    if data_dir is not None:
        _path_arg("data_dir", data_dir)
    if not isinstance(download, (bool, np.bool_)):
        raise TypeError(f"download must be True or False, got {download!r}")
    if (not isinstance(timeout, (int, float, np.integer, np.floating))
            or isinstance(timeout, (bool, np.bool_))):
        raise TypeError(f"timeout must be a number of seconds, got {timeout!r}")
    if not 0 < timeout < float("inf"):
        raise ValueError(f"timeout must be a positive, finite number of seconds, got {timeout!r}")
    if not isinstance(split, str) or split not in ("both", "test"):
        raise ValueError(f"split must be 'both' or 'test', got {split!r}")
    ds = DATASETS[name]
    files = ds.files if split == "both" else ds.files[2:]
    dirs = _candidate_dirs(ds, data_dir)
    paths, errors = None, []
    for d in dirs:
        found = [_find(d, f) for f in files]
        if all(found):
            paths = found
            break
    if paths is None and download:
        cache = _cache_dir(ds.name)
        paths = [_find(cache, f) or _download_any(ds, f, timeout, errors) for f in files]
    if paths is None or not all(paths):
        missing = [f.stem for f in files] if paths is None else [
            f.stem for f, p in zip(files, paths, strict=True) if p is None]
        raise DatasetNotFoundError(_not_found(ds, missing, dirs, download, errors, False),
                                   _not_found(ds, missing, dirs, download, errors, True))
    arrays = [read_idx(p) for p in paths]
    for a, f, p in zip(arrays, files, paths, strict=True):
        if a.ndim != len(f.shape) or a.shape[1:] != f.shape[1:] or a.dtype != np.uint8:
            raise IDXError(f"{p}: expected {f.stem} of shape (n, {f.shape[1:]}) uint8, got "
                           f"{a.shape} {a.dtype}")
    for k in range(0, len(arrays), 2):
        images, labels, pi, pl = arrays[k], arrays[k + 1], paths[k], paths[k + 1]
        if len(images) != len(labels):
            raise IDXError(f"{pi} has {len(images)} images but {pl} has {len(labels)} labels")
        if labels.size and labels.max() >= NUM_CLASSES:
            raise IDXError(f"{pl}: labels must lie in [0, {NUM_CLASSES}), found "
                           f"{int(labels.max())}")
    return tuple(arrays)


def _download_any(ds: _Dataset, f: _File, timeout: float, errors: list) -> Path | None:
    """Download ``f`` from the first mirror that has it; each failure is appended to
    ``errors`` as (url, reason)."""
    dest = _cache_dir(ds.name) / f"{f.stem}.gz"
    for mirror in ds.mirrors:
        url = f"{mirror}{f.stem}.gz"
        try:
            return download(url, dest, f.sha256, timeout)
        except (OSError, http.client.HTTPException, ValueError) as e:  # timeouts are OSError
            errors.append((url, " ".join(str(e).split()) or type(e).__name__))
    return None


def _download_line(errors: list) -> str:
    """One line for every failed download: the distinct reasons (at most two), how many
    downloads failed and from which hosts."""
    reasons = list(dict.fromkeys(reason for _, reason in errors))
    hosts = list(dict.fromkeys(urllib.parse.urlsplit(url).netloc or url for url, _ in errors))
    why = "; ".join(reasons[:2]) + (f"; and {len(reasons) - 2} other errors"
                                    if len(reasons) > 2 else "")
    tries = f"{len(errors)} attempt{'s' if len(errors) > 1 else ''}"
    return f"Download failed: {why} ({tries}, from {', '.join(hosts)})."


def _not_found(ds: _Dataset, missing: list, dirs: list, download: bool, errors: list,
               cli: bool) -> str:
    """The message of :class:`DatasetNotFoundError`: what is missing, where it looked (each
    folder once), why the download failed, and the ways out, named as the ``fastconv``
    command's options (``cli``) or as the Python arguments."""
    lines = [f"{ds.name}: could not find {', '.join(missing)} (each .gz or raw IDX) in one "
             "folder.", "Looked in:", *(f"  {d}" for d in dict.fromkeys(dirs))]
    if errors:
        lines.append(_download_line(errors))
    elif not download:
        off = "--no-download" if cli else "download=False"
        lines.append(f"Downloading was turned off ({off}).")
    lines += ["Point fastconv at a folder that holds the files (or a "
              f"'{ds.name}' subfolder with them):",
              "  --data-dir DIR" if cli else
              "  data_dir=DIR             (an argument of load_dataset and train)",
              f"  export FASTCONV_DATA=DIR (the files in DIR/{ds.name})"]
    if ds.name == "fashion-mnist":
        lines.append("On Debian, the package dataset-fashion-mnist installs them where "
                     "fastconv looks: apt-get install dataset-fashion-mnist")
    return "\n".join(lines)
