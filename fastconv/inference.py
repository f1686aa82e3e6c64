"""Using a trained checkpoint: evaluation per class, image classification and export.

What ``fastconv evaluate``, ``fastconv predict`` and ``fastconv export`` run:

* :func:`load_model` rebuilds a checkpoint's network (checked whole, as ``--resume`` does)
  in eval mode;
* :func:`evaluate` gives the mean loss, the accuracy, the accuracy per class and the
  confusion matrix; :func:`format_evaluation` prints them, :func:`write_confusion_plot`
  draws the matrix (matplotlib, the ``train`` extra);
* :func:`read_images` reads PNG/JPEG files (Pillow, the ``images`` extra) or IDX image
  files and prepares them as the training data was; :func:`predict` gives the class
  probabilities;
* :func:`export` writes the network's ``state_dict`` for PyTorch (``.pt``/``.pth``, the
  ``torch`` extra) or as safetensors (``.safetensors``, the ``safetensors`` extra).

Images as the networks see them: 28x28 grayscale, one byte per pixel, a light object on a
black background (MNIST's digits and Fashion-MNIST's clothes both are), scaled to [0, 1]
(:func:`fastconv.train.normalise`).

Legend: N images, C classes; ``confusion[i, j]`` counts the images of true class ``i``
predicted as class ``j``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import _args, data, models, nn, train

__all__ = ["EXPORT_FORMATS", "ImageError", "evaluate", "export", "format_evaluation",
           "light_background", "load_model", "predict", "read_images", "top_k",
           "write_confusion_plot"]

#: The side of the square images the networks take.
SIZE = 28


class ImageError(ValueError):
    """An image file is missing, unreadable, or an IDX file that does not hold images."""


def load_model(path):
    """The network of a checkpoint, with its weights, in eval mode.

    Parameters
    ----------
    path : str or Path
        A checkpoint from ``fastconv train --save`` (:func:`fastconv.train.save_checkpoint`),
        checked whole by :func:`fastconv.train.load_checkpoint`.

    Returns
    -------
    model : fastconv.nn.Sequential
    checkpoint : dict
        What :func:`fastconv.train.load_checkpoint` returns (``config``, ``epoch``, ...).
    """
    ck = train.load_checkpoint(path)
    model = models.MODELS[ck["config"].model](seed=ck["config"].seed)
    model[0].needs_input_grad = False
    model.load_state_dict(ck["model"])
    return model.eval(), ck


def _label(names, c: int) -> str:
    """``'7'`` for MNIST's class 7, ``'9 Ankle boot'`` for Fashion-MNIST's class 9."""
    return names[c] if names[c] == str(c) else f"{c} {names[c]}"


# ---- evaluation ----------------------------------------------------------------------


def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int = 500,
             num_classes: int = data.NUM_CLASSES) -> dict:
    """Loss, accuracy, accuracy per class and confusion matrix of ``model`` on images.

    The loss and accuracy are those of :func:`fastconv.train.evaluate` (the same batches and
    sums); ``model`` is run in eval mode and left in the mode it had.

    Parameters
    ----------
    model : fastconv.nn.Module
        Maps float32 (N, 1, 28, 28) to logits (N, C).
    images : uint8 array (N, 28, 28)
    labels : integer array (N,), each in [0, C)
    batch_size : int >= 1
    num_classes : int >= 1
        C.

    Returns
    -------
    dict
        ``n_images`` (N), ``loss`` (the mean cross-entropy), ``accuracy``,
        ``per_class_accuracy`` (a list of C: the fraction of each true class predicted
        right, None for a class with no images) and ``confusion_matrix`` (C lists of C
        ints: row ``i`` counts the images of class ``i`` by predicted class; it sums to N).

    Raises
    ------
    ValueError
        No images (their mean is undefined), or labels outside [0, C).
    """
    _args._int("batch_size", batch_size, 1)
    _args._int("num_classes", num_classes, 1)
    labels = np.asarray(labels)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if not len(images):
        raise ValueError("there are no images to evaluate (the test set is empty)")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), found {labels.min()} to "
                         f"{labels.max()}")
    labels = labels.astype(np.int64)
    was_training = model.training
    model.eval()
    loss_fn = nn.SoftmaxCrossEntropy("sum")
    total_loss, predicted = 0.0, []
    try:
        for start in range(0, len(images), batch_size):
            logits = model(train.normalise(images[start:start + batch_size]))
            total_loss += float(loss_fn(logits, labels[start:start + batch_size]))
            predicted.append(logits.argmax(axis=1))
    finally:
        model.train(was_training)
    predicted = np.concatenate(predicted)
    confusion = np.bincount(labels * num_classes + predicted,
                            minlength=num_classes * num_classes).reshape(num_classes,
                                                                         num_classes)
    per_class = confusion.sum(axis=1)
    right = np.diagonal(confusion)
    return {
        "n_images": len(images),
        "loss": total_loss / len(images),
        "accuracy": int(right.sum()) / len(images),
        "per_class_accuracy": [int(r) / int(n) if n else None
                               for r, n in zip(right, per_class, strict=True)],
        "confusion_matrix": confusion.tolist(),
    }


def format_evaluation(result: dict, class_names) -> str:
    """The accuracy per class and the confusion matrix of :func:`evaluate`'s ``result`` as
    aligned text, the classes named (``class_names``, one per class)."""
    labels = [_label(class_names, c) for c in range(len(class_names))]
    confusion = np.array(result["confusion_matrix"])
    head = max(len("class"), *map(len, labels))
    lines = [f"{'class':<{head}}  accuracy  images"]
    for label, acc, n in zip(labels, result["per_class_accuracy"], confusion.sum(axis=1),
                             strict=True):
        lines.append(f"{label:<{head}}  {'-' if acc is None else f'{acc:.4f}':>8}  {n:>6}")
    width = max(4, len(str(confusion.max())))
    lines += ["", "confusion matrix (rows: true class, columns: predicted class)",
              " " * head + "".join(f" {c:>{width}}" for c in range(len(labels)))]
    for label, row in zip(labels, confusion, strict=True):
        lines.append(f"{label:<{head}}" + "".join(f" {v:>{width}}" for v in row))
    return "\n".join(lines)


def write_confusion_plot(path, result: dict, class_names, title: str = "") -> None:
    """A PNG of :func:`evaluate`'s confusion matrix: counts in the cells, coloured by the
    fraction of their row (true class).  Needs matplotlib (the ``train`` extra); written
    atomically."""
    train._require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    confusion = np.array(result["confusion_matrix"])
    rows = confusion.sum(axis=1, keepdims=True)
    share = confusion / np.maximum(rows, 1)
    C = len(class_names)
    fig, ax = plt.subplots(figsize=(7.5, 6.5), layout="constrained")
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, label="fraction of the true class", shrink=0.8)
    for i in range(C):
        for j in range(C):
            if confusion[i, j]:
                ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(C), class_names, rotation=45, ha="right")
    ax.set_yticks(range(C), class_names)
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    train._atomic_write(Path(path), lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


# ---- images --------------------------------------------------------------------------


def read_images(paths, invert: bool = False):
    """Read images as the networks take them: uint8 (N, 28, 28), light on black.

    Each path is an IDX file of images (``(n, 28, 28)`` or one ``(28, 28)`` uint8, gzipped
    or raw, as :func:`fastconv.data.read_idx` reads them; the MNIST test files are such
    files), or an image file Pillow reads (PNG, JPEG, BMP, GIF, ...; needs Pillow, the
    ``images`` extra), prepared as torchvision's ``Grayscale()`` and ``Resize((28, 28))``
    would:

    * colour becomes luminance (Pillow's ``convert('L')``, ITU-R 601-2); an alpha channel
      is dropped; 16-bit grayscale is scaled to 8 bits;
    * any other size is resized to 28x28 (bilinear, antialiased when shrinking), without
      keeping the aspect ratio: crop or pad to a square first to keep it.

    The networks were trained on light objects on a black background: give dark ink on
    white paper with ``invert=True`` (each pixel ``p`` becomes ``255 - p``), or see
    :func:`light_background`.

    Parameters
    ----------
    paths : sequence of str or Path
    invert : bool

    Returns
    -------
    images : uint8 array (N, 28, 28)
    sources : list of N (str, int or None) pairs
        Each image's path, and its index in an IDX file (None for an image file).

    Raises
    ------
    ImageError
        A path that does not exist or is not a file, an image Pillow cannot read, or an
        IDX file that does not hold uint8 28x28 images; the message names the file.
    RuntimeError
        An image file (not IDX) without Pillow installed; the message names the extra.
    """
    invert = _args._bool("invert", invert)
    if isinstance(paths, (str, Path)):
        raise TypeError(f"paths must be a sequence of paths, got the single path {paths!r}")
    arrays, sources = [], []
    for p in paths:
        p = Path(data._path_arg("path", p))
        if not p.exists():
            raise ImageError(f"{p}: no such file")
        if not p.is_file():
            raise ImageError(f"{p}: not a file; give image files (PNG, JPEG, ...) or IDX files")
        with open(p, "rb") as f:
            head = f.read(4)
        # gzip, or an IDX magic number (0x0000TTNN: an IDX type code TT); ICO and TGA files
        # also start with two zero bytes
        if head[:2] == b"\x1f\x8b" or (head[:2] == b"\x00\x00" and len(head) > 2
                                       and head[2] in data._IDX_TYPES):
            a = _idx_images(p)
            arrays.append(a)
            sources += [(str(p), i) for i in range(len(a))]
        else:
            arrays.append(_pillow_image(p)[None])
            sources.append((str(p), None))
    images = (np.concatenate(arrays) if arrays
              else np.zeros((0, SIZE, SIZE), np.uint8))
    if invert:
        images = 255 - images
    return images, sources


def _idx_images(p: Path) -> np.ndarray:
    a = data.read_idx(p)
    if a.ndim == 2:
        a = a[None]
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[1:] != (SIZE, SIZE):
        what = " (a labels file?)" if a.ndim == 1 else ""
        raise ImageError(f"{p}: an IDX file of images holds uint8 (n, {SIZE}, {SIZE}) or "
                         f"({SIZE}, {SIZE}); this one holds {a.dtype} {a.shape}{what}")
    return a


def _require_pillow(p: Path):
    try:
        from PIL import Image
    except ImportError:
        raise RuntimeError(f"{p}: reading image files (PNG, JPEG, ...) needs Pillow: pip "
                           "install 'fastconv[images]' (IDX files need nothing)") from None
    return Image


def _pillow_image(p: Path) -> np.ndarray:
    """One image file as uint8 (28, 28): luminance, resized (see :func:`read_images`)."""
    Image = _require_pillow(p)
    # Pillow raises many kinds of exception on malformed files (UnidentifiedImageError,
    # OSError 'image file is truncated', SyntaxError, ValueError, DecompressionBombError,
    # ...): any of them means unreadable.
    try:
        with Image.open(p) as img:
            img.load()
            if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit grayscale
                a = np.asarray(img, dtype=np.float64)
                img = Image.fromarray(np.rint(np.clip(a, 0, 65535) / 257).astype(np.uint8))
            else:
                img = img.convert("L")
            if img.size != (SIZE, SIZE):
                img = img.resize((SIZE, SIZE), Image.Resampling.BILINEAR)
            return np.asarray(img, dtype=np.uint8).copy()
    except Exception as e:
        if type(e).__name__ == "UnidentifiedImageError":
            raise ImageError(f"{p}: neither an image file Pillow can read (PNG, JPEG, ...) "
                             "nor an IDX file") from None
        raise ImageError(f"{p}: unreadable image ({train._describe(e)})") from None


def light_background(images: np.ndarray) -> np.ndarray:
    """Whether each uint8 (N, 28, 28) image looks dark on light (the mean of its border
    pixels above 127), the opposite of what the networks were trained on."""
    border = np.concatenate([images[:, 0], images[:, -1], images[:, 1:-1, 0],
                             images[:, 1:-1, -1]], axis=1)
    return border.mean(axis=1) > 127


# ---- prediction ----------------------------------------------------------------------


def predict(model: nn.Module, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """The class probabilities (softmax of the logits) of uint8 (N, 28, 28) images.

    Returns
    -------
    float64 array (N, C)
        Each row sums to 1.
    """
    _args._int("batch_size", batch_size, 1)
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(images), batch_size):
            out.append(np.asarray(model(train.normalise(images[start:start + batch_size])),
                                  np.float64))
    finally:
        model.train(was_training)
    if not out:
        return np.zeros((0, data.NUM_CLASSES))
    z = np.concatenate(out)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def top_k(probabilities: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` most probable classes of each row, most probable first (ties: the lower
    class first): int array (N, k)."""
    k = _args._int("k", k, 1)
    if k > probabilities.shape[1]:
        raise ValueError(f"k={k} is more than the {probabilities.shape[1]} classes")
    return np.argsort(-probabilities, axis=1, kind="stable")[:, :k]


# ---- export --------------------------------------------------------------------------

#: The file suffixes :func:`export` writes, and their formats.
EXPORT_FORMATS = {".pt": "torch", ".pth": "torch", ".safetensors": "safetensors"}


def export(model: nn.Module, path, metadata: dict | None = None) -> str:
    """Write ``model.state_dict()`` (PyTorch's keys) for PyTorch, atomically.

    The format follows the suffix of ``path``:

    * ``.pt`` or ``.pth``: ``torch.save`` of the state dict (an ordered dict of CPU
      tensors), which ``torch.load`` (``weights_only=True`` too) reads back and the
      model's plain PyTorch twin loads (:func:`fastconv.torch.twin`).  Needs PyTorch (the
      ``torch`` extra).
    * ``.safetensors``: the arrays in the safetensors format, with ``metadata`` (str to
      str) in its header; read with ``safetensors.numpy.load_file`` or
      ``safetensors.torch.load_file``.  Needs safetensors (the ``safetensors`` extra).

    Returns
    -------
    str
        The format written: ``'torch'`` or ``'safetensors'``.
    """
    path = Path(data._path_arg("path", path))
    kind = EXPORT_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: unknown export format {path.suffix!r}; the file name must "
                         f"end in one of {', '.join(EXPORT_FORMATS)}")
    state = {k: np.ascontiguousarray(v) for k, v in model.state_dict().items()}
    if kind == "torch":
        try:
            import torch
        except ImportError:
            raise RuntimeError(f"{path}: writing a .pt file needs PyTorch: pip install "
                               "'fastconv[torch]'") from None
        import collections

        tensors = collections.OrderedDict((k, torch.from_numpy(v)) for k, v in state.items())
        train._atomic_write(path, lambda f: torch.save(tensors, f))
    else:
        try:
            from safetensors.numpy import save
        except ImportError:
            raise RuntimeError(f"{path}: writing a .safetensors file needs safetensors: pip "
                               "install 'fastconv[safetensors]'") from None
        blob = save(state, metadata=metadata)
        train._atomic_write(path, lambda f: f.write(blob))
    return kind
