"""The ``fastconv`` command: ``fastconv train`` and ``fastconv evaluate``.

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
    p = _Parser(prog="fastconv", description="Train and evaluate CNNs with fastconv.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    t = sub.add_parser("train", help="train a model on MNIST or Fashion-MNIST",
                       description="Train a model; one line per epoch, a progress bar on a "
                       "terminal.  Datasets are found in --data-dir, $FASTCONV_DATA/<name>, "
                       "~/.cache/fastconv/<name>, /usr/share/datasets, or downloaded.")
    # Settings default to None so that --resume can tell given flags from defaults.
    t.add_argument("--dataset", choices=["mnist", "fashion-mnist"], help="default: mnist")
    t.add_argument("--data-dir", help="folder with the IDX files (or a <dataset> subfolder)")
    t.add_argument("--model", type=_model, choices=["two-conv", "tiny"],
                   help="default: two-conv ('seed' is read as 'tiny', its old name)")
    t.add_argument("--epochs", type=_positive_int,
                   help="total epochs (default 1; with --resume, the saved total)")
    t.add_argument("--batch-size", type=_positive_int, help="default: 64")
    t.add_argument("--lr", type=_positive_float, help="peak learning rate (default 0.05)")
    t.add_argument("--optimizer", choices=["sgd", "adam"], help="default: sgd")
    t.add_argument("--momentum", type=_fraction, help="SGD momentum (default 0.9)")
    t.add_argument("--schedule", choices=["cosine", "constant"],
                   help="learning rate: annealed to 0 over --epochs along a half cosine "
                   "(default), or constant")
    t.add_argument("--threads", type=_threads,
                   help="kernel threads (per process under mpiexec; default: all cores, or "
                   "each process's share of them)")
    t.add_argument("--distributed", choices=["auto", "off"], default="auto",
                   help="under 'mpiexec -n R' (R > 1), train data-parallel over the R "
                   "processes, splitting each --batch-size batch (auto, the default), or "
                   "train alone in each process (off)")
    t.add_argument("--seed", type=_seed, help="default: 0")
    t.add_argument("--limit", type=_positive_int, help="train on the first N images only")
    t.add_argument("--metrics-json", metavar="PATH", help="write per-epoch metrics as JSON")
    t.add_argument("--save", metavar="PATH", help="checkpoint (.npz) after every epoch")
    t.add_argument("--resume", metavar="PATH", help="continue from a checkpoint")
    t.add_argument("--plot", metavar="PATH", help="PNG of loss/accuracy and conv1 filters")
    t.add_argument("--no-download", action="store_true", help="never use the network")
    t.add_argument("--quiet", action="store_true", help="no progress bar, no epoch lines")
    e = sub.add_parser("evaluate", help="evaluate a saved checkpoint on a test set")
    e.add_argument("--model", required=True, metavar="PATH", help="checkpoint from --save")
    e.add_argument("--dataset", choices=["mnist", "fashion-mnist"],
                   help="default: the dataset it was trained on")
    e.add_argument("--data-dir")
    e.add_argument("--threads", type=_threads, help="kernel threads (default: all cores)")
    e.add_argument("--no-download", action="store_true")
    return p


def _one_line(e: BaseException) -> str:
    return "; ".join(line.strip() for line in str(e).splitlines() if line.strip())


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from . import conv, data, dist, train  # after parsing: --help stays instant

    comm = dist.Communicator()  # one process, unless train runs under mpiexec
    try:
        if args.command == "train":
            comm = dist.init(args.distributed)
        if args.threads is not None:
            conv.set_num_threads(args.threads)
        if args.command == "train":
            with comm.fail_together():  # under mpiexec, one rank's failure ends every rank
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
                            metrics_json=args.metrics_json, plot=args.plot, quiet=args.quiet,
                            log=(lambda *a: None) if args.quiet else print, distributed=comm)
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
        if comm.is_root:  # every rank raises it alike: rank 0 says it
            print("fastconv: interrupted", file=sys.stderr)
        return 130
    except data.DatasetNotFoundError as e:  # where it looked and what to do: its lines
        if comm.is_root:
            print(f"fastconv: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, RuntimeError, OSError) as e:
        if comm.is_root:
            print(f"fastconv: error: {_one_line(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
