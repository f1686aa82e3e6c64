"""The ``fastconv`` command (``fastconv --help`` lists its subcommands).

Errors go to stderr, with exit code 2 for bad arguments and 1 for failures (missing or
corrupt data, a diverged run); never a traceback.  Each is one line, except data that
cannot be found or downloaded: that message says on a few lines where it looked, why the
download failed and what to do.
"""

from __future__ import annotations

import argparse
import sys

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
    e = sub.add_parser("evaluate", help="evaluate a saved checkpoint on a test set")
    e.add_argument("--model", required=True, metavar="PATH", help="checkpoint from --save")
    e.add_argument("--dataset", choices=["mnist", "fashion-mnist"],
                   help="default: the dataset it was trained on")
    e.add_argument("--data-dir")
    e.add_argument("--threads", type=_threads, help="kernel threads (default: all cores)")
    e.add_argument("--no-download", action="store_true")
    _precompile_parser(sub)
    return p


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
                   help="threads of the kernels (default: all cores)")
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
    from . import conv, data, train  # after parsing: --help stays instant

    try:
        if getattr(args, "threads", None) is not None:
            conv.set_num_threads(args.threads)
        if args.command == "train":
            _train(args)
        elif args.command == "precompile":
            _precompile(args)
        else:
            ck = train.load_checkpoint(args.model)
            cfg = ck["config"]
            model, _ = train.build(cfg)
            model.load_state_dict(ck["model"])
            name = args.dataset or cfg.dataset
            xte, yte = data.load_dataset(name, args.data_dir, download=not args.no_download,
                                         split="test")
            loss, acc = train.evaluate(model, xte, yte.astype("int64"))
            print(f"{name} test: loss {loss:.4f}, accuracy {acc:.4f} ({len(xte)} images)")
    except KeyboardInterrupt:
        print("fastconv: interrupted", file=sys.stderr)
        return 130
    except data.DatasetNotFoundError as e:  # where it looked and what to do: its lines
        print(f"fastconv: error: {e.cli_message}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, RuntimeError, OSError) as e:
        print(f"fastconv: error: {_one_line(e)}", file=sys.stderr)
        return 1
    return 0


def _train(args) -> None:
    """``fastconv train``: the run its flags describe, or the one ``--resume`` continues."""
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
                save=args.save, resume=args.resume, metrics_json=args.metrics_json,
                log_jsonl=args.log_jsonl, plot=args.plot, quiet=args.quiet,
                log=(lambda *a: None) if args.quiet else print)


def _precompile(args) -> None:
    """``fastconv precompile``: :func:`fastconv.train.precompile`."""
    from . import train

    train.precompile(args.model, log=(lambda *a: None) if args.quiet else print)


if __name__ == "__main__":
    raise SystemExit(main())
