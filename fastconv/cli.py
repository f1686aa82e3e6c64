"""The ``fastconv`` command: ``train``, ``evaluate``, ``predict``, ``export`` and
``precompile`` (``fastconv --help`` lists them).

Errors go to stderr, with exit code 2 for bad arguments and 1 for failures (missing or
corrupt data, a diverged run); never a traceback.  Each is one line, except data that
cannot be found or downloaded: that message says on a few lines where it looked, why the
download failed and what to do.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _checked(convert, ok, expected: str):
    """An argparse type: ``convert(text)``, which must satisfy ``ok``."""

    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
_positive_float = _checked(float, lambda v: 0 < v < float("inf"), "a positive number")
_fraction = _checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
_seed = _checked(int, lambda v: 0 <= v < 2**63, "a non-negative integer")


def _threads(text):
    """An argparse type: a thread count in [1, the threads Numba starts with]."""
    from numba.core.config import NUMBA_NUM_THREADS  # lazily: --help stays instant

    return _checked(int, lambda v: 1 <= v <= NUMBA_NUM_THREADS,
                    f"an integer in [1, {NUMBA_NUM_THREADS}] (the threads available to "
                    "Numba)")(text)


def _model(text):
    """An argparse type: a model preset's name, with old names read as their new ones."""
    from .models import model_name  # lazily: --help stays instant

    return model_name(text)


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    p = _Parser(prog="fastconv", description="Train small CNNs on MNIST and Fashion-MNIST "
                "with fastconv's CPU convolution kernels, and use what they learned.")
    p.add_argument("--version", action="version", version=f"fastconv {__version__}",
                   help="print fastconv's version and exit")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser,
                           title="commands", metavar="COMMAND",
                           help="'fastconv COMMAND --help' describes its options")
    _train_parser(sub)
    _add_evaluate(sub)
    _add_predict(sub)
    _add_export(sub)
    _precompile_parser(sub)
    return p


class _CheckpointOption(argparse.Action):
    """``--checkpoint PATH``, which ``evaluate`` also takes under its old name ``--model``:
    that one works, with one deprecation warning on stderr."""

    warned = False

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string == "--model" and not self.warned:
            self.warned = True
            print(f"{parser.prog}: warning: option '--model' is deprecated; use "
                  "'--checkpoint' ('fastconv train --model' names the architecture)",
                  file=sys.stderr)
        setattr(namespace, self.dest, values)


_CHECKPOINT_HELP = "a checkpoint (.npz) written by 'fastconv train --save'"
_top_k = _checked(int, lambda v: 1 <= v <= 10, "an integer in [1, 10] (the classes)")


def _export_path(text):
    """An argparse type: a path whose suffix names an export format."""
    from .inference import EXPORT_FORMATS  # lazily: --help stays instant

    if Path(text).suffix.lower() not in EXPORT_FORMATS:
        raise argparse.ArgumentTypeError(
            f"expected a file name ending in {', '.join(EXPORT_FORMATS)} (the format), got "
            f"{text!r}")
    return text


def _add_evaluate(sub) -> None:
    e = sub.add_parser(
        "evaluate", help="evaluate a checkpoint on a test set, per class",
        description="Evaluate a checkpoint on the test set of its dataset: loss, accuracy, "
        "accuracy per class and the confusion matrix (rows: true class, columns: "
        "predicted class).  The test files are found as 'fastconv train' finds its data.")
    e.add_argument("--checkpoint", "--model", dest="checkpoint", required=True,
                   metavar="PATH", action=_CheckpointOption,
                   help=f"{_CHECKPOINT_HELP} (--model is its deprecated old name)")
    e.add_argument("--dataset", choices=["mnist", "fashion-mnist"],
                   help="default: the dataset it was trained on")
    e.add_argument("--data-dir", metavar="DIR",
                   help="folder with the IDX test files (or a <dataset> subfolder)")
    e.add_argument("--limit", type=_positive_int, metavar="N",
                   help="evaluate the first N test images only")
    e.add_argument("--metrics-json", metavar="PATH",
                   help="write the results as JSON: loss, accuracy, per-class accuracy, "
                   "confusion matrix, number of images, dataset, checkpoint")
    e.add_argument("--plot", metavar="PATH",
                   help="PNG of the confusion matrix (needs matplotlib: the train extra)")
    e.add_argument("--threads", type=_threads, help="kernel threads (default: all cores)")
    e.add_argument("--no-download", action="store_true", help="never use the network")


def _add_predict(sub) -> None:
    p = sub.add_parser(
        "predict", help="classify images with a checkpoint",
        description="Classify images: print each one's most probable class (with the "
        "dataset's class names) and its probability.  Image files (PNG, JPEG, ...; needs "
        "Pillow: pip install 'fastconv[images]') are turned grayscale and resized to "
        "28x28 without keeping the aspect ratio, as torchvision's Grayscale() and "
        "Resize((28, 28)) do; IDX files (.gz too) must hold uint8 28x28 images.  MNIST "
        "and Fashion-MNIST images are light on a black background: use --invert for dark "
        "ink on white paper.")
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="an image file, or an IDX file of images (each of its images in turn)")
    p.add_argument("--checkpoint", required=True, metavar="PATH", action=_CheckpointOption,
                   help=_CHECKPOINT_HELP)
    p.add_argument("--top-k", type=_top_k, default=1, metavar="K",
                   help="print the K most probable classes per image (default 1)")
    p.add_argument("--invert", action="store_true",
                   help="invert the pixels (255 - p) first: for dark objects on a light "
                   "background")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list instead: one object per image with its file, "
                   "index in an IDX file (or null), class, name, probability and top_k")
    p.add_argument("--threads", type=_threads, help="kernel threads (default: all cores)")


def _add_export(sub) -> None:
    x = sub.add_parser(
        "export", help="write a checkpoint's weights for PyTorch or as safetensors",
        description="Write the network's state_dict (PyTorch's keys) in the format the file "
        "name says: .pt or .pth, torch.save of the tensors (needs PyTorch: pip install "
        "'fastconv[torch]'), or .safetensors (needs safetensors: pip install "
        "'fastconv[safetensors]').  fastconv.torch.twin(MODEL) is the plain PyTorch "
        "network that loads it.")
    x.add_argument("--checkpoint", required=True, metavar="PATH", action=_CheckpointOption,
                   help=_CHECKPOINT_HELP)
    x.add_argument("--to", required=True, metavar="PATH", type=_export_path,
                   help="the file to write (atomically): model.pt, model.pth or "
                   "model.safetensors")


def _evaluate(args) -> None:
    """``fastconv evaluate``: print the results, and write the JSON and the plot asked for."""
    from . import data, inference, train

    if args.plot is not None:
        train._require_matplotlib()
    model, ck = inference.load_model(args.checkpoint)
    name = args.dataset or ck["config"].dataset
    images, labels = data.load_dataset(name, args.data_dir, download=not args.no_download,
                                       split="test")
    if args.limit is not None:
        images, labels = images[:args.limit], labels[:args.limit]
    result = inference.evaluate(model, images, labels)
    names = data.CLASS_NAMES[name]
    headline = (f"{name} test: loss {result['loss']:.4f}, accuracy {result['accuracy']:.4f} "
                f"({result['n_images']} images)")
    print(headline)
    print()
    print(inference.format_evaluation(result, names))
    metrics = {"checkpoint": str(args.checkpoint), "model": ck["config"].model,
               "epoch": ck["epoch"], "dataset": name, "split": "test", "limit": args.limit,
               **result, "class_names": list(names)}
    if args.metrics_json is not None:
        text = json.dumps(metrics, indent=2)
        train._atomic_write(Path(args.metrics_json), lambda f: f.write(text.encode()))
    if args.plot is not None:
        inference.write_confusion_plot(args.plot, result, names,
                                       f"{Path(args.checkpoint).name}: {headline}")


def _predict(args) -> None:
    """``fastconv predict``: one line (or JSON object) per image."""
    from . import data, inference

    images, sources = inference.read_images(args.images, invert=args.invert)
    model, ck = inference.load_model(args.checkpoint)
    names = data.CLASS_NAMES[ck["config"].dataset]
    probs = inference.predict(model, images)
    top = inference.top_k(probs, args.top_k)
    light = int(inference.light_background(images).sum())
    if light and not args.invert:
        print(f"fastconv: note: {light} of {len(images)} images look dark on a light "
              "background; the network was trained on light objects on black: --invert "
              "turns them around", file=sys.stderr)
    if args.json:
        rows = []
        for (file, index), p, t in zip(sources, probs, top, strict=True):
            best = [{"class": int(c), "name": names[c], "probability": float(p[c])}
                    for c in t]
            rows.append({"file": file, "index": index, **best[0], "top_k": best})
        print(json.dumps(rows, indent=2))
        return
    for (file, index), p, t in zip(sources, probs, top, strict=True):
        where = file if index is None else f"{file}[{index}]"
        print(f"{where}: " + ", ".join(f"{inference._label(names, c)} ({p[c]:.4f})"
                                       for c in t))


def _export(args) -> None:
    """``fastconv export``: the state_dict in the format of ``--to``'s suffix."""
    from . import inference

    model, ck = inference.load_model(args.checkpoint)
    cfg = ck["config"]
    kind = inference.export(model, args.to, metadata={
        "format": "pt", "fastconv_model": cfg.model, "dataset": cfg.dataset,
        "epoch": str(ck["epoch"])})
    state = model.state_dict()
    print(f"wrote {args.to}: the {cfg.model} network's state_dict ({len(state)} tensors, "
          f"{sum(a.size for a in state.values()):,} parameters)")
    load = (f"torch.load({str(args.to)!r})" if kind == "torch"
            else f"safetensors.torch.load_file({str(args.to)!r})")
    print(f"load it in PyTorch: net = fastconv.torch.twin({cfg.model!r}); "
          f"net.load_state_dict({load})")


def _train_parser(sub) -> None:
    t = sub.add_parser("train", help="train a model on MNIST or Fashion-MNIST",
                       description="Train a model: one line per epoch, a progress bar on a "
                       "terminal.  Datasets are found in --data-dir, $FASTCONV_DATA/<name>, "
                       "~/.cache/fastconv/<name>, /usr/share/datasets, or downloaded.  The "
                       "first run on a machine compiles the kernels (tens of seconds; "
                       "'fastconv precompile' does it ahead of time).")
    # Settings default to None so that --resume can tell given flags from defaults.
    t.add_argument("--dataset", choices=["mnist", "fashion-mnist"],
                   help="the dataset to train and test on (default: mnist)")
    t.add_argument("--data-dir", metavar="DIR",
                   help="a folder with the dataset's IDX files, or with a <dataset> "
                   "subfolder holding them (default: searched, see above)")
    t.add_argument("--model", type=_model, choices=["two-conv", "tiny"],
                   help="the network (default: two-conv; 'seed' is read as 'tiny', its old "
                   "name)")
    t.add_argument("--epochs", type=_positive_int, metavar="E",
                   help="total epochs (default 1; with --resume, the saved total)")
    t.add_argument("--batch-size", type=_positive_int, metavar="B",
                   help="images per training step (default: 64)")
    t.add_argument("--lr", type=_positive_float, help="peak learning rate (default: 0.05)")
    t.add_argument("--optimizer", choices=["sgd", "adam"],
                   help="the optimizer, with PyTorch's update rule (default: sgd)")
    t.add_argument("--momentum", type=_fraction, metavar="M", help="SGD's momentum (default: 0.9)")
    t.add_argument("--schedule", choices=["cosine", "constant"],
                   help="learning rate: annealed to 0 over --epochs along a half cosine "
                   "(default), or constant")
    t.add_argument("--threads", type=_threads, metavar="T",
                   help="threads of the kernels (per process under mpiexec; default: all "
                   "cores, or each process's share of them)")
    t.add_argument("--distributed", choices=["auto", "off"], default="auto",
                   help="under 'mpiexec -n R' (R > 1), train data-parallel over the R "
                   "processes, splitting each --batch-size batch (auto, the default), or "
                   "train alone in each process (off)")
    t.add_argument("--seed", type=_seed, metavar="S",
                   help="seed of the initial weights and the shuffling (default: 0)")
    t.add_argument("--limit", type=_positive_int, metavar="N",
                   help="train on the first N training images only (default: all)")
    t.add_argument("--metrics-json", metavar="PATH",
                   help="write the run's results as JSON at the end: each epoch's loss, "
                   "accuracy and speed, every setting, the versions of fastconv, NumPy, "
                   "Numba and Python, the CPU, each conv layer's algorithms, and the "
                   "compile time")
    t.add_argument("--log-jsonl", metavar="PATH",
                   help="write one JSON object per line for each epoch as it ends, flushed "
                   "at once (a killed run keeps the lines of its finished epochs): epoch, "
                   "epochs (the total), train_loss, train_accuracy, test_loss, "
                   "test_accuracy, seconds, samples_per_second, lr (of the epoch's last "
                   "step) and time (UTC).  A new run starts the file afresh; with --resume "
                   "the lines of the epochs it trains are appended")
    t.add_argument("--save", metavar="PATH",
                   help="write a checkpoint (.npz) after every epoch")
    t.add_argument("--resume", metavar="PATH",
                   help="continue the run of a checkpoint from --save (only --epochs may "
                   "change)")
    t.add_argument("--plot", metavar="PATH",
                   help="write a PNG of the loss and accuracy curves and the conv1 filters")
    t.add_argument("--no-download", action="store_true",
                   help="never use the network: fail if the dataset is not on disk")
    t.add_argument("--quiet", action="store_true",
                   help="print nothing but errors: no progress bar, no notice while "
                   "kernels compile, no epoch lines")


def _precompile_parser(sub) -> None:
    c = sub.add_parser("precompile", help="compile the kernels ahead of the first run",
                       description="Compile every kernel that 'fastconv train' and "
                       "'fastconv evaluate' run (training steps and evaluation, for every "
                       "batch size), for every model preset, into Numba's cache, and print "
                       "what was compiled and how long it took.  Later runs load the "
                       "kernels instead of compiling them for tens of seconds: run it when "
                       "building a Docker image, or once per machine type of a cluster "
                       "(the compiled code is specific to the CPU).")
    c.add_argument("--model", type=_model, choices=["two-conv", "tiny"], action="append",
                   help="compile for this model only (repeat it for several; default: "
                   "every model)")
    c.add_argument("--quiet", action="store_true",
                   help="print nothing but errors")


def _one_line(e: BaseException) -> str:
    return "; ".join(line.strip() for line in str(e).splitlines() if line.strip())


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from . import conv, data, dist  # after parsing: --help stays instant

    comm = dist.Communicator()  # one process, unless train runs under mpiexec
    try:
        if args.command == "train":
            comm = dist.init(args.distributed)
        if getattr(args, "threads", None) is not None:
            conv.set_num_threads(args.threads)
        if args.command == "train":
            with comm.fail_together():  # under mpiexec, one rank's failure ends every rank
                _train(args, comm)
        elif args.command == "precompile":
            _precompile(args)
        elif args.command == "evaluate":
            _evaluate(args)
        elif args.command == "predict":
            _predict(args)
        else:
            _export(args)
    except KeyboardInterrupt:
        if comm.is_root:  # every rank raises it alike: rank 0 says it
            print("fastconv: interrupted", file=sys.stderr)
        return 130
    except data.DatasetNotFoundError as e:  # where it looked and what to do: its lines
        if comm.is_root:
            print(f"fastconv: error: {e.cli_message}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, RuntimeError, OSError) as e:
        if comm.is_root:
            print(f"fastconv: error: {_one_line(e)}", file=sys.stderr)
        return 1
    return 0


def _train(args, comm) -> None:
    """``fastconv train``: the run its flags describe, or the one ``--resume`` continues,
    data-parallel over ``comm`` (a :class:`fastconv.dist.Communicator`) under mpiexec."""
    from . import train

    given = {k: getattr(args, k) for k in (
        "dataset", "model", "epochs", "batch_size", "lr", "optimizer", "momentum",
        "schedule", "seed", "limit") if getattr(args, k) is not None}
    if args.resume is not None:
        ck = train.load_checkpoint(args.resume)
        cfg = train.resume_config(ck["config"], ck["epoch"], given)
    else:
        cfg = train.TrainConfig(**given)
    train.train(cfg, data_dir=args.data_dir, download=not args.no_download,
                threads=args.threads, save=args.save, resume=args.resume,
                metrics_json=args.metrics_json, log_jsonl=args.log_jsonl, plot=args.plot,
                quiet=args.quiet, log=(lambda *a: None) if args.quiet else print,
                distributed=comm)


def _precompile(args) -> None:
    """``fastconv precompile``: :func:`fastconv.train.precompile`."""
    from . import train

    train.precompile(args.model, log=(lambda *a: None) if args.quiet else print)


if __name__ == "__main__":
    raise SystemExit(main())
