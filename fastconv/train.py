"""Training and evaluation loops, checkpoints and plots, used by ``fastconv train``.

:func:`train` runs the loop:

* it shuffles every epoch from the seed and normalises pixels to [0, 1];
* it compiles (or loads from Numba's cache) every kernel the run uses before the first
  step, saying so on stderr while it compiles (a cold cache takes tens of seconds);
* it shows a tqdm bar when stderr is a terminal and prints one line per epoch, and can
  append each epoch's results to a JSON-lines log as they happen;
* it writes atomic ``.npz`` checkpoints that hold the weights, the optimizer state, the
  epoch, the RNG state and the history.  ``resume`` continues a killed run from its last
  checkpoint;
* under ``mpiexec -n R`` it trains data-parallel over the R processes
  (:mod:`fastconv.dist`, docs/distributed.md).

A NaN or inf loss stops the run with :class:`TrainingDiverged`, and the last good
checkpoint is kept.

:func:`precompile` compiles every kernel that training and evaluation run, for every model
preset, into Numba's cache (``fastconv precompile``, for Docker images and clusters).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import platform
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

from . import (
    _args,
    _compiling,
    _jit,
    _state,
    algorithms,
    conv,
    data,
    dist,
    models,
    nn,
    optim,
    pool,
)

__all__ = ["TrainConfig", "TrainingDiverged", "cpu_model", "evaluate", "load_checkpoint",
           "precompile", "save_checkpoint", "train"]

#: The batch size :func:`evaluate` runs by default (and ``fastconv train`` evaluates with).
EVAL_BATCH_SIZE = 500


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf."""


@dataclasses.dataclass
class TrainConfig:
    """What a run trains: everything a checkpoint needs to rebuild and continue it.

    Validated when made (:meth:`validate`): a config that could not run is refused.
    """

    dataset: str = "mnist"
    model: str = "two-conv"
    epochs: int = 1
    batch_size: int = 64
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    schedule: str = "cosine"
    seed: int = 0
    limit: int | None = None

    def __post_init__(self):
        self.model = models.model_name(self.model)  # an old name ('seed') reads as its new one
        self.validate()

    def validate(self) -> None:
        """Check every field's type and range: ``TypeError`` or ``ValueError`` naming the
        field and the value it has."""
        for name, choices in (("dataset", sorted(data.DATASETS)),
                              ("model", sorted(models.MODELS)),
                              ("schedule", ["constant", "cosine"]),
                              ("optimizer", ["adam", "sgd"])):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TypeError(f"{name} must be a string, one of {choices}; got {value!r}")
            if value not in choices:
                raise ValueError(f"unknown {name} {value!r}; choose one of {choices}")
        for name in ("epochs", "batch_size"):
            _args._int(name, getattr(self, name), 1)
        if self.limit is not None:
            _args._int("limit", self.limit, 1)
        if not _args._is_int(self.seed):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must lie in [0, 2**63), got {self.seed}")
        if _args._real("lr", self.lr, -np.inf) <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        _args._real("momentum", self.momentum, 0.0, 1.0)


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> optim.Optimizer:
    if cfg.optimizer == "sgd":
        return optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    return optim.Adam(model.parameters(), lr=cfg.lr)


def learning_rate(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """The learning rate of a step: ``lr`` throughout (``'constant'``), or annealed along a
    half cosine from ``lr`` at the first step to 0 after the last (``'cosine'``)."""
    if cfg.schedule == "constant":
        return cfg.lr
    return cfg.lr * 0.5 * (1.0 + np.cos(np.pi * step / total_steps))


def normalise(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28) in [0, 1]."""
    return (images.astype(np.float32) / np.float32(255.0))[:, None]


def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray,
             batch_size: int = EVAL_BATCH_SIZE, *, comm: dist.Communicator | None = None):
    """Mean loss and accuracy of ``model`` (in eval mode) over uint8 images, in batches of
    ``batch_size`` (an int >= 1).  No images is a ValueError: their mean is undefined.

    With ``comm`` (a :class:`fastconv.dist.Communicator` of R ranks), each rank evaluates
    its contiguous R-th of the images and the sums are reduced: every rank returns the
    result over all of them."""
    _args._int("batch_size", batch_size, 1)
    if not len(images):
        raise ValueError("there are no images to evaluate (the test set is empty)")
    lo, hi = (0, len(images)) if comm is None else comm.bounds(len(images))
    was_training = model.training
    model.eval()
    loss_fn = nn.SoftmaxCrossEntropy("sum")
    total_loss, correct = 0.0, 0
    try:
        for start in range(lo, hi, batch_size):
            x = normalise(images[start:min(start + batch_size, hi)])
            y = labels[start:min(start + batch_size, hi)].astype(np.int64)
            logits = model(x)
            total_loss += float(loss_fn(logits, y))
            correct += int((logits.argmax(axis=1) == y).sum())
    finally:
        model.train(was_training)
    if comm is not None and comm.distributed:
        total_loss, correct = comm.allreduce_sum([total_loss, correct])
    return float(total_loss) / len(images), float(correct) / len(images)


# ---- checkpoints ---------------------------------------------------------------------


def _atomic_write(path: Path, write) -> None:
    """Call ``write(file)`` on a temp file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: The layout :func:`save_checkpoint` writes (docs/checkpoints.md).  Files without a
#: ``format_version`` entry have this layout too: they are read as version 1.
CHECKPOINT_VERSION = 1


def save_checkpoint(path, cfg: TrainConfig, model, optimizer, epoch: int, rng, history) -> None:
    """Write an ``.npz`` checkpoint atomically (temp file + rename).

    The layout is documented in docs/checkpoints.md and checked by :func:`load_checkpoint`.
    """
    arrays = {f"model/{k}": v for k, v in model.state_dict().items()}
    arrays |= {f"optim/{k}": v for k, v in optimizer.state_dict().items()}
    arrays["format_version"] = np.array(CHECKPOINT_VERSION)
    arrays["epoch"] = np.array(epoch)
    arrays["config"] = np.array(json.dumps(dataclasses.asdict(cfg)))
    arrays["rng"] = np.array(json.dumps(rng.bit_generator.state))
    arrays["history"] = np.array(json.dumps(history))
    _atomic_write(Path(path), lambda f: np.savez(f, **arrays))


def load_checkpoint(path) -> dict:
    """Read a checkpoint and check all of it against its schema before returning.

    The schema is in docs/checkpoints.md: every entry must be there, none may be unknown,
    and each must have its dtype, shape and range; the config must be valid, and the model
    and optimizer state must fit the model and optimizer that the config builds.

    Parameters
    ----------
    path : str or Path
        An ``.npz`` file from :func:`save_checkpoint`; read with ``allow_pickle=False``.

    Returns
    -------
    dict
        ``config`` (a :class:`TrainConfig`), ``epoch`` (int), ``rng`` (a PCG64 state dict),
        ``history`` (list of dicts), ``model`` and ``optim`` (state dicts, the arrays as
        C-contiguous arrays of their parameters' dtypes).

    Raises
    ------
    ValueError
        ``"<path>: not a readable fastconv checkpoint (...)"`` when the file cannot be
        read as an ``.npz`` of plain arrays, or ``"<path>: not a valid fastconv checkpoint:
        <the first problem>"``.
    """
    items = _read_npz(path)
    try:
        return _checked_checkpoint(items)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: not a valid fastconv checkpoint: {e}") from None


def _read_npz(path) -> dict[str, np.ndarray]:
    """The arrays of an uncompressed ``.npz`` file (``np.savez``); every member's CRC is
    checked first.  Compressed members are refused: no member can expand beyond the file."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if len(set(names)) != len(names):
                raise ValueError("the zip archive holds a name twice")
            for info in zf.infolist():
                if info.compress_type != zipfile.ZIP_STORED:
                    raise ValueError(f"member {info.filename!r} is compressed; checkpoints "
                                     "are written uncompressed (np.savez)")
            bad = zf.testzip()
            if bad is not None:
                raise ValueError(f"member {bad!r} is corrupt (CRC mismatch)")
        with np.load(path, allow_pickle=False) as z:
            items = {k: z[k] for k in z.files}
    # The file is untrusted input to zipfile and NumPy's format reader, which raise many
    # kinds of exception on malformed bytes (BadZipFile, EOFError, zlib.error,
    # NotImplementedError, struct.error, MemoryError, ...): any of them means unreadable.
    except Exception as e:
        raise ValueError(f"{path}: not a readable fastconv checkpoint ({_describe(e)})") from None
    for key, value in items.items():
        if not isinstance(value, np.ndarray):
            raise ValueError(f"{path}: not a readable fastconv checkpoint ({key!r} is not an "
                             ".npy array)")
    return items


def _describe(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


_ENTRIES = ("format_version", "epoch", "config", "rng", "history")

# The JSON type of each TrainConfig field ("number": an int or a float; never a bool).
_CONFIG_TYPES = {"dataset": "str", "model": "str", "epochs": "int", "batch_size": "int",
                 "lr": "number", "optimizer": "str", "momentum": "number", "schedule": "str",
                 "seed": "int", "limit": "int or null"}

# Each history row: the JSON type of each key ("fraction": a number in [0, 1]).
_HISTORY_TYPES = {"epoch": "int", "train_loss": "number", "train_accuracy": "fraction",
                  "test_loss": "number", "test_accuracy": "fraction", "seconds": "number",
                  "samples_per_second": "number", "train_seconds": "number",
                  "train_samples": "int"}


def _checked_checkpoint(items: dict[str, np.ndarray]) -> dict:
    """The parts of a checkpoint's arrays, checked in the order of docs/checkpoints.md;
    raises ValueError or TypeError for the first problem."""
    version = (_state.integer("format_version", items["format_version"], minimum=1, prefix="")
               if "format_version" in items else 1)
    if version > CHECKPOINT_VERSION:
        raise ValueError(f"format_version is {version}: written by a newer fastconv; this one "
                         f"reads format_version {CHECKPOINT_VERSION}")
    unknown = sorted(k for k in items
                     if k not in _ENTRIES and not k.startswith(("model/", "optim/")))
    if unknown:
        raise ValueError(f"unknown entries {unknown}")
    missing = [k for k in _ENTRIES[1:] if k not in items]
    if missing:
        raise ValueError(f"missing entries {missing}")

    cfg = _config_from_json(_json_entry(items, "config"))
    epoch = _state.integer("epoch", items["epoch"], prefix="")
    if epoch > cfg.epochs:
        raise ValueError(f"epoch is {epoch}, more than the config's {cfg.epochs} epochs")
    rng = _checked_rng_state(_json_entry(items, "rng"))
    history = _checked_history(_json_entry(items, "history"), epoch)

    model, opt = build(cfg)
    model_state = model.check_state_dict(
        {k[6:]: v for k, v in items.items() if k.startswith("model/")}, prefix="model/")
    optim_state = opt.check_state_dict(
        {k[6:]: v for k, v in items.items() if k.startswith("optim/")}, prefix="optim/")
    # What save_checkpoint writes, beyond what load_state_dict accepts: the parameters'
    # own dtypes (nothing rounded on the way in), float64 lr, finite weights, and a
    # momentum buffer for every parameter once SGD with momentum has taken a step.
    for p in model.parameters():
        _exact_float_dtype(f"model/{p.name}", items[f"model/{p.name}"], p.data.dtype)
    for key in optim_state:
        if "." in key:  # "exp_avg.3": an array of parameter 3
            _exact_float_dtype(f"optim/{key}", items[f"optim/{key}"],
                               opt.params[int(key.rsplit(".", 1)[1])].data.dtype)
    _exact_float_dtype("optim/lr", items["optim/lr"], np.dtype(np.float64))
    for key, value in model_state.items():
        if not np.isfinite(value).all():
            raise ValueError(f"model/{key} has non-finite values (inf or NaN); training "
                             "never saves those")
    steps = optim_state["step_count"]
    if (steps % epoch if epoch else steps) or steps < epoch:
        raise ValueError(f"optim/step_count is {steps}; after {epoch} epochs it must be "
                         f"{'0' if not epoch else f'a positive multiple of {epoch}'}")
    if cfg.optimizer == "sgd":
        buffers = [k for k in optim_state if k.startswith("momentum_buffer.")]
        expected = len(opt.params) if cfg.momentum and steps else 0
        if len(buffers) != expected:
            raise ValueError(f"optim/ has {len(buffers)} momentum buffers; SGD with momentum "
                             f"{cfg.momentum} after {steps} steps has {expected}")
    return {"config": cfg, "epoch": epoch, "rng": rng, "history": history,
            "model": model_state, "optim": optim_state}


def _exact_float_dtype(key: str, value: np.ndarray, dtype: np.dtype) -> None:
    if value.dtype.newbyteorder("=") != dtype:
        raise TypeError(f"{key} has dtype {value.dtype}; a checkpoint holds it as {dtype}")


def _json_entry(items: dict[str, np.ndarray], key: str):
    """A JSON text entry (a 0-d unicode array), parsed; NaN and Infinity are refused."""
    a = items[key]
    if a.dtype.kind != "U" or a.shape != ():
        raise TypeError(f"{key} has dtype {a.dtype} and shape {a.shape}; it must be a JSON "
                        "text (a 0-d unicode array)")

    def no_constants(name):
        raise ValueError(f"{name} is not allowed")

    try:
        return json.loads(a.item(), parse_constant=no_constants)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{key} is not valid JSON ({_describe(e)})") from None


def _json_type_ok(value, kind: str) -> bool:
    if isinstance(value, bool):
        return False
    if kind == "str":
        return isinstance(value, str)
    if kind == "int":
        return isinstance(value, int)
    if kind == "int or null":
        return value is None or isinstance(value, int)
    if isinstance(value, int):  # a Python int may be too large for a float
        number = abs(value) <= sys.float_info.max
    else:
        number = isinstance(value, float) and math.isfinite(value)
    return number and (kind == "number" or 0 <= value <= 1)


def _config_from_json(obj) -> TrainConfig:
    if not isinstance(obj, dict):
        raise TypeError(f"config is a JSON {type(obj).__name__}; it must be an object")
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    missing = [k for k in fields if k not in obj]
    unknown = sorted(k for k in obj if k not in fields)
    if missing or unknown:
        raise ValueError(f"config does not match TrainConfig: missing keys {missing}, "
                         f"unknown keys {unknown}")
    for key in fields:
        if not _json_type_ok(obj[key], _CONFIG_TYPES[key]):
            raise TypeError(f"config {key!r} is {obj[key]!r}; it must be a JSON "
                            f"{_CONFIG_TYPES[key]}")
    if not 0 <= obj["seed"] < 2**63:
        raise ValueError(f"config 'seed' is {obj['seed']}; it must lie in [0, 2**63)")
    try:  # TrainConfig validates itself
        return TrainConfig(**{**obj, "lr": float(obj["lr"]), "momentum": float(obj["momentum"])})
    except (TypeError, ValueError) as e:
        raise type(e)(f"config: {e}") from None


def _checked_rng_state(state) -> dict:
    """A PCG64 state dict as ``bit_generator.state`` writes it (the shuffling stream)."""
    keys = {"bit_generator", "state", "has_uint32", "uinteger"}
    if not (isinstance(state, dict) and set(state) == keys
            and isinstance(state["state"], dict) and set(state["state"]) == {"state", "inc"}):
        raise ValueError("rng must be a JSON object with keys 'bit_generator', 'state' "
                         "({'state', 'inc'}), 'has_uint32' and 'uinteger', as numpy's "
                         "PCG64 writes it")
    if state["bit_generator"] != "PCG64":
        raise ValueError(f"rng is a {state['bit_generator']!r} state; it must be 'PCG64'")
    ranges = {"state": 2**128, "inc": 2**128, "has_uint32": 2, "uinteger": 2**32}
    values = {**state["state"], "has_uint32": state["has_uint32"],
              "uinteger": state["uinteger"]}
    for key, end in ranges.items():
        v = values[key]
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < end:
            raise ValueError(f"rng {key!r} is {v!r}; it must be an integer in [0, {end})")
    if values["inc"] % 2 == 0:
        raise ValueError("rng 'inc' is even; a PCG64 increment is odd")
    probe = np.random.default_rng(0)  # a throwaway generator: does numpy take it as it is?
    try:
        probe.bit_generator.state = state
    except (TypeError, ValueError, KeyError, OverflowError) as e:
        raise ValueError(f"rng is not a state numpy accepts ({_describe(e)})") from None
    if probe.bit_generator.state != state:
        raise ValueError("rng is not a state numpy reads back unchanged")
    return state


def _checked_history(history, epoch: int) -> list:
    if not isinstance(history, list) or len(history) != epoch:
        n = len(history) if isinstance(history, list) else type(history).__name__
        raise ValueError(f"history must be a JSON list of {epoch} rows (one per epoch "
                         f"done), got {n}")
    for i, row in enumerate(history):
        if not isinstance(row, dict) or set(row) != set(_HISTORY_TYPES):
            got = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(f"history[{i}] must be an object with keys "
                             f"{sorted(_HISTORY_TYPES)}, got {got}")
        for key, kind in _HISTORY_TYPES.items():
            v = row[key]
            if not _json_type_ok(v, kind) or v < 0:
                rule = "a finite number >= 0" if kind == "number" else (
                    "a number in [0, 1]" if kind == "fraction" else "an integer >= 0")
                raise ValueError(f"history[{i}][{key!r}] is {v!r}; it must be {rule}")
        if row["epoch"] != i + 1:
            raise ValueError(f"history[{i}]['epoch'] is {row['epoch']}; it must be {i + 1}")
    return history


def resume_config(saved: TrainConfig, done: int, given: dict) -> TrainConfig:
    """The config to continue a checkpoint with.

    ``--resume`` continues the saved run: its settings stay, and every setting given again
    must agree with them.  Only ``epochs`` (the total to reach, by default the saved one)
    may change; raising it extends the cosine schedule over the new total.
    """
    if "model" in given:
        given = {**given, "model": models.model_name(given["model"])}
    for key, value in given.items():
        if key != "epochs" and value != getattr(saved, key):
            raise ValueError(f"--resume continues the saved run, which has {key}="
                             f"{getattr(saved, key)!r}; got {key}={value!r}")
    epochs = given.get("epochs", saved.epochs)
    if epochs < done:
        raise ValueError(f"the checkpoint has already trained {done} epochs; --epochs "
                         f"{epochs} is fewer")
    return dataclasses.replace(saved, epochs=epochs)


def build(cfg: TrainConfig):
    """The model and optimizer a config describes."""
    model = models.MODELS[cfg.model](seed=cfg.seed)
    model[0].needs_input_grad = False  # nobody needs dL/d(pixels)
    return model, make_optimizer(cfg, model)


# ---- the loop ------------------------------------------------------------------------


def _blas_single_thread():
    """BLAS on one thread while the conv kernels use all of them.

    The Linear layers' float32 products run on Numba (:func:`fastconv.linalg.matmul`);
    what is left to BLAS is small, and OpenBLAS workers busy-wait after each call and
    would steal the cores from the Numba kernels that run next.  Needs ``threadpoolctl``
    (the ``train`` extra); without it, BLAS keeps its own setting.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _progress(total, desc, quiet):
    """A tqdm bar over ``total`` images (None without tqdm), shown on a terminal.  Its one
    throughput figure is the postfix the loop sets (images per second of step time, as in
    the epoch line), not tqdm's own rate."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} images "
                           "[{elapsed}<{remaining}{postfix}]",
                disable=quiet or not sys.stderr.isatty())


def train(cfg: TrainConfig, *, data_dir=None, download=True, threads=None, save=None,
          resume=None, metrics_json=None, log_jsonl=None, plot=None, quiet=False,
          log=print, distributed="auto") -> dict:
    """Train ``cfg`` and return the metrics dict (also written to ``metrics_json``).

    ``log_jsonl`` (a path) gets one JSON object per line for each epoch as it ends, flushed
    at once, so a killed run leaves the history of the epochs it finished: ``epoch``,
    ``epochs`` (the total), ``train_loss``, ``train_accuracy``, ``test_loss``,
    ``test_accuracy``, ``seconds``, ``samples_per_second``, ``lr`` (of the epoch's last
    step) and ``time`` (UTC, ISO 8601).  A new run starts the file afresh; with ``resume``
    the lines of the epochs it trains are appended.  ``quiet`` turns off the progress bar
    and the notice on stderr while kernels compile; ``log`` prints the other lines.

    Under ``mpiexec -n R`` (R > 1) the run is data-parallel (``distributed='auto'``, the
    default; ``'off'`` trains alone in every process; a :class:`fastconv.dist.Communicator`
    is used as it is): each rank takes ``batch_size / R`` images of every batch, the
    gradients are averaged over the ranks, ``threads`` (default: the rank's share of the
    cores) is per rank, and rank 0 alone logs and writes ``save``, ``metrics_json``,
    ``log_jsonl`` and ``plot`` (docs/distributed.md).
    """
    comm = dist.init(distributed)
    with comm.fail_together():  # one rank's failure ends every rank
        return _train(comm, cfg, data_dir=data_dir, download=download, threads=threads,
                      save=save, resume=resume, metrics_json=metrics_json,
                      log_jsonl=log_jsonl, plot=plot, quiet=quiet, log=log)


def _train(comm, cfg, *, data_dir, download, threads, save, resume, metrics_json, log_jsonl,
           plot, quiet, log) -> dict:
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    cfg.validate()
    for name, path in (("metrics_json", metrics_json), ("log_jsonl", log_jsonl)):
        if path is not None:
            data._path_arg(name, path)
    if threads is not None:
        conv.set_num_threads(threads)
    elif comm.distributed:
        conv.set_num_threads(comm.default_threads())
    if plot is not None:
        _require_matplotlib()
    if comm.distributed:  # rank 0 alone prints and writes
        log = _flushed(log) if comm.is_root else (lambda *a: None)
        quiet = quiet or not comm.is_root
        if not comm.is_root:
            save = metrics_json = log_jsonl = plot = None

    ck = None
    if resume is not None:
        ck = load_checkpoint(resume)
        cfg = resume_config(ck["config"], ck["epoch"], {"epochs": cfg.epochs})
    model, opt = build(cfg)
    rng = np.random.default_rng([cfg.seed, 1])  # the shuffling stream
    history, start_epoch = [], 0
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optim"])
        rng.bit_generator.state = ck["rng"]
        history, start_epoch = ck["history"], ck["epoch"]
        log(f"resumed {resume} after epoch {start_epoch} of {cfg.epochs}")

    xtr, ytr, xte, yte = data.load_dataset(cfg.dataset, data_dir, download=download)
    if cfg.limit is not None:
        xtr, ytr = xtr[:cfg.limit], ytr[:cfg.limit]
    for split, images in (("training", xtr), ("test", xte)):
        if not len(images):
            raise ValueError(f"{cfg.dataset}: the {split} set has no images")
    ytr, yte = ytr.astype(np.int64), yte.astype(np.int64)
    loss_fn = nn.SoftmaxCrossEntropy()
    step_seconds = sum(e["train_seconds"] for e in history)
    step_samples = sum(e["train_samples"] for e in history)
    curve, first_step = [], None
    steps_per_epoch = -(-len(xtr) // cfg.batch_size)
    if ck is not None and opt.step_count != start_epoch * steps_per_epoch:
        raise ValueError(f"{resume}: optim/step_count is {opt.step_count}, but {start_epoch} "
                         f"epochs of {steps_per_epoch} steps (on {len(xtr)} training images) "
                         f"make {start_epoch * steps_per_epoch}")
    if cfg.batch_size % comm.size:
        raise ValueError(f"the batch size {cfg.batch_size} is the global batch, split over "
                         f"{comm.size} MPI processes: it must be a multiple of {comm.size}")
    comm.setup_done()  # the collective check: any rank's error so far stops every rank
    sync = None
    if comm.distributed:
        comm.check_same("checkpoint", ck and _digest(ck["model"]))
        comm.check_same("training set", _digest({"x": xtr, "y": ytr}))
        comm.broadcast_parameters(model)  # as DDP: one set of weights, whatever happened

    # The loop checks the loss itself (TrainingDiverged): no NumPy float warnings on the way.
    with (_blas_single_thread(),
          np.errstate(over="ignore", invalid="ignore", divide="ignore"),
          _jsonl(log_jsonl, append=ck is not None) as jsonl):
        t_warm = time.perf_counter()
        with _compiling.notice(quiet) as compiled:
            # Each rank's batches: its shard of the global ones (of the test set, likewise).
            per_rank = -(-len(xtr) // comm.size), -(-len(xte) // comm.size)
            conv_algorithms = _warm_up(
                cfg, _batch_sizes(per_rank[0], max(1, cfg.batch_size // comm.size)),
                _batch_sizes(per_rank[1], EVAL_BATCH_SIZE))
        warm_up = {"warm_up_seconds": time.perf_counter() - t_warm,
                   "compile_seconds": compiled.seconds, "kernels_compiled": compiled.compiled}
        if compiled.compiled:
            log(f"compiled {compiled.compiled} kernels in {compiled.seconds:.1f} s (kept in "
                "Numba's cache for later runs)")
        if comm.distributed:
            sync = dist.GradientSync(model, comm)
        for epoch in range(start_epoch, cfg.epochs):
            t_epoch = time.perf_counter()
            order = rng.permutation(len(xtr))
            bar = _progress(len(xtr), f"epoch {epoch + 1}/{cfg.epochs}", quiet)
            seen, loss_sum, correct, busy = 0, 0.0, 0, 0.0
            for start in range(0, len(order), cfg.batch_size):
                idx = order[start:start + cfg.batch_size]
                mine = comm.shard(idx)  # this rank's part of the global batch
                x, y = normalise(xtr[mine]), ytr[mine]
                t0 = time.perf_counter()
                opt.zero_grad()  # drops the gradients: this backward stores its own
                if sync is None:
                    logits = model(x)
                    loss = float(loss_fn(logits, y))
                else:  # forward, backward and the gradients' allreduce: every rank alike
                    loss, hits = sync.train_step(model, loss_fn, x, y, len(idx))
                if not np.isfinite(loss):
                    if bar is not None:
                        bar.close()
                    raise _diverged(f"loss became {loss} in epoch {epoch + 1} after {seen} "
                                    "samples", cfg, save)
                if sync is None:
                    model.backward(loss_fn.backward())
                    hits = int((logits.argmax(axis=1) == y).sum())
                opt.lr = learning_rate(cfg, epoch * steps_per_epoch + start // cfg.batch_size,
                                       cfg.epochs * steps_per_epoch)
                opt.step()
                busy += time.perf_counter() - t0
                if first_step is None:
                    first_step = _since_process_start()
                seen += len(idx)
                loss_sum += loss * len(idx)
                correct += hits
                curve.append((epoch + seen / len(xtr), loss))
                if bar is not None:
                    bar.update(len(idx))
                    bar.set_postfix_str(f"loss {loss:.4f}, {seen / busy:.0f} images/s")
            if bar is not None:
                bar.close()
            test_loss, test_acc = evaluate(model, xte, yte, comm=comm)
            if not (np.isfinite(test_loss)
                    and all(np.isfinite(p.data).all() for p in model.parameters())):
                raise _diverged(f"the weights became non-finite in epoch {epoch + 1} (test "
                                f"loss {test_loss})", cfg, save)
            step_seconds += busy
            step_samples += seen
            row = {"epoch": epoch + 1, "train_loss": loss_sum / seen,
                   "train_accuracy": correct / seen, "test_loss": test_loss,
                   "test_accuracy": test_acc, "seconds": time.perf_counter() - t_epoch,
                   "samples_per_second": seen / busy, "train_seconds": busy,
                   "train_samples": seen}
            history.append(row)
            if jsonl is not None:
                _write_line(jsonl, _epoch_line(row, cfg, opt.lr))
            log(f"epoch {row['epoch']}: train loss {row['train_loss']:.4f} acc "
                f"{row['train_accuracy']:.4f} | test loss {test_loss:.4f} acc {test_acc:.4f} | "
                f"{row['seconds']:.1f} s, {row['samples_per_second']:.0f} samples/s")
            if save is not None:
                save_checkpoint(save, cfg, model, opt, epoch + 1, rng, history)
        if sync is not None:
            sync.close()  # every rank is here: the shared-memory window is freed together

    metrics = _metrics(cfg, history, step_samples, step_seconds, first_step, warm_up,
                       conv_algorithms)
    metrics["processes"] = comm.size
    if metrics_json is not None:
        _atomic_write(Path(metrics_json),
                      lambda f: f.write(json.dumps(metrics, indent=2).encode()))
    if plot is not None:
        write_plot(plot, history, curve, model)
    return metrics


#: The batch sizes :func:`precompile` plans for: each group of them that runs the same
#: algorithms gets one batch.  The plans' choices change at thresholds of work or tiles
#: well below this (``fastconv.config``), so larger batches run what 1024 runs.
PRECOMPILE_MAX_BATCH = 1024


def precompile(presets=None, *, log=print) -> dict:
    """Compile every kernel that training and evaluation run into Numba's cache.

    For each model preset, in float32 as ``fastconv train`` and ``fastconv evaluate``
    run it: training steps (forward, backward, an SGD and an Adam step) and evaluation's
    forward pass, each at one batch size of every group of batch sizes (1 to
    :data:`PRECOMPILE_MAX_BATCH`) whose convolutions run the same algorithms.  Kernels
    already in the cache are loaded, not compiled: a second call is quick.  The thread
    count is not compiled in, so any ``--threads`` uses the same kernels.

    Parameters
    ----------
    presets : None or list of str
        Model presets (names of :data:`fastconv.models.MODELS`, or their old names);
        None for all of them.
    log : callable
        Prints a line per model and one for the total.

    Returns
    -------
    dict
        ``{model: {'train_batch_sizes', 'eval_batch_sizes', 'compiled', 'loaded',
        'seconds'}}``: the batch sizes it ran, how many kernels it compiled and loaded from
        the cache, and the seconds it took.

    Raises
    ------
    RuntimeError
        If Numba's cache is off (``FASTCONV_NO_CACHE=1``): nothing compiled would be kept.
    """
    names = list(models.MODELS) if presets is None else _preset_names(presets)
    if not _jit.CACHE:
        raise RuntimeError("the JIT cache is off (FASTCONV_NO_CACHE=1): kernels compiled "
                           "now would not be kept for later runs")
    report, t_all = {}, time.perf_counter()
    with _blas_single_thread(), np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for name in names:
            cfg = TrainConfig(model=name)
            train_sizes, eval_sizes = _plan_groups(cfg)
            t0, before = time.perf_counter(), _compiling.signatures()
            with _compiling.CompileWatch() as watch:
                for optimizer in ("sgd", "adam"):
                    _warm_up(dataclasses.replace(cfg, optimizer=optimizer), train_sizes,
                             eval_sizes if optimizer == "sgd" else [])
            seconds = time.perf_counter() - t0
            loaded = len(_compiling.signatures() - before - watch.functions)
            report[name] = {"train_batch_sizes": train_sizes, "eval_batch_sizes": eval_sizes,
                            "compiled": watch.compiled, "loaded": loaded, "seconds": seconds}
            log(f"{name}: {watch.compiled} kernels compiled, {loaded} loaded from the cache, "
                f"in {seconds:.1f} s (training steps at batch sizes "
                f"{_sizes(train_sizes)}; evaluation at {_sizes(eval_sizes)})")
    dirs = _compiling.cache_dirs()
    log(f"precompiled {', '.join(names)} in {time.perf_counter() - t_all:.1f} s; the "
        f"kernels are cached in {' and '.join(dirs) if dirs else 'no folder'}")
    return report


def _preset_names(names) -> list[str]:
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise TypeError(f"presets must be a list of model names or None, got {names!r}")
    out = []
    for name in names:
        name = models.model_name(name)
        if not isinstance(name, str):
            raise TypeError(f"presets must hold model names (str), got {name!r}")
        if name not in models.MODELS:
            raise ValueError(f"unknown model {name!r} in presets; choose from "
                             f"{sorted(models.MODELS)}")
        out.append(name)
    if not out:
        raise ValueError("presets is empty: name at least one model, or pass None for all")
    return list(dict.fromkeys(out))


def _sizes(sizes) -> str:
    return ", ".join(map(str, sizes))


def _plan_groups(cfg: TrainConfig) -> tuple[list[int], list[int]]:
    """The smallest batch size of each group of sizes (1 to :data:`PRECOMPILE_MAX_BATCH`)
    whose training steps, and of each whose evaluation, run the same algorithms in every
    Conv2d of ``cfg``'s model, as their plans would choose them (no kernel runs)."""
    model = models.MODELS[cfg.model]()
    seen_train, seen_eval = {}, {}
    for n in range(1, PRECOMPILE_MAX_BATCH + 1):
        train_key, eval_key = [], []
        for geo in _conv_geometries(model, (n, 1, 28, 28)):
            pool_order = conv.pool_order_ok(geo)  # the layout the pool after it reads
            passes = tuple(algorithms.choices(geo, np.float32, p)[0].NAME
                           for p in algorithms.PASSES)
            train_key.append((pool_order, passes))
            eval_key.append((pool_order, passes[0]))
        seen_train.setdefault(tuple(train_key), n)
        seen_eval.setdefault(tuple(eval_key), n)
    return sorted(seen_train.values()), sorted(seen_eval.values())


def _conv_geometries(model, shape) -> list:
    """The geometry of each Conv2d of a Sequential of convolutions, pools and
    shape-keeping layers, for an input of ``shape``, up to its Flatten."""
    geos = []
    for layer in model:
        if isinstance(layer, nn.Flatten):
            break
        if isinstance(layer, nn.Conv2d):
            geo = conv.conv_geometry(shape, layer.weight.shape, **layer.conv)
            geos.append(geo)
            shape = (geo.N, geo.K, geo.OH, geo.OW)
        elif isinstance(layer, (nn.MaxPool2d, nn.AvgPool2d)):
            g = pool.pool_geometry(shape, **layer.args)
            shape = (*shape[:2], g.OH, g.OW)
    return geos


def _diverged(what: str, cfg: TrainConfig, save) -> TrainingDiverged:
    kept = f"; the last good checkpoint is kept in {save}" if save else ""
    # Every rank sees the same reduced loss and weights: no rank aborts the job for it.
    return dist.all_ranks(TrainingDiverged(f"{what}; try a smaller --lr (now {cfg.lr}){kept}"))


def _flushed(log):
    """``log``, then a flush of stdout: under ``mpiexec`` stdout is a pipe."""
    def flushed(*args):
        log(*args)
        sys.stdout.flush()
    return flushed


def _digest(arrays: dict) -> str:
    """A SHA-256 of named arrays, to check that every rank read the same."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        h.update(key.encode())
        h.update(np.ascontiguousarray(arrays[key]).tobytes())
    return h.hexdigest()[:16]


def _batch_sizes(n: int, batch_size: int) -> list[int]:
    """The sizes of the batches ``n`` images are cut into: the full one and the last."""
    return sorted({min(n, batch_size), n % batch_size} - {0}, reverse=True)


def _warm_up(cfg: TrainConfig, train_sizes, eval_sizes) -> dict:
    """Compile (or load from the cache) every kernel of ``cfg``'s training steps on batches
    of ``train_sizes`` images and of its evaluation on ``eval_sizes``, outside the timed
    steps: the plans, and so the kernels, depend on the batch size.  It trains a model and
    optimizer of its own, built from ``cfg``: the run's are untouched.

    Returns the algorithms of each Conv2d layer's plan in a step on the first of
    ``train_sizes``, by the layer's index: ``{'0': {'forward': ..., ...}, ...}``.
    """
    model, opt = build(cfg)
    loss_fn = nn.SoftmaxCrossEntropy()
    conv_algorithms = {}
    for n in train_sizes:
        opt.zero_grad()
        loss_fn(model(normalise(np.zeros((n, 28, 28), np.uint8))), np.zeros(n, np.int64))
        model.backward(loss_fn.backward())
        opt.step()
        if not conv_algorithms:
            conv_algorithms = {str(i): layer.algorithms for i, layer in enumerate(model)
                               if isinstance(layer, nn.Conv2d)}
    for n in eval_sizes:
        evaluate(model, np.zeros((n, 28, 28), np.uint8), np.zeros(n, np.int64), batch_size=n)
    return conv_algorithms


def _since_process_start() -> float | None:
    """Seconds since this process started (Linux ``/proc``), or None where unknown."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def cpu_model() -> str:
    """The CPU's model name, from ``/proc/cpuinfo`` (Linux) or :mod:`platform`; never
    fails (``'unknown'``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "cpu model") and value.strip():
                    return " ".join(value.split())
    except OSError:
        pass
    try:
        return platform.processor() or platform.machine() or "unknown"
    except Exception:  # platform shells out on some systems: whatever goes wrong there
        return "unknown"


def _environment() -> dict:
    """The versions and the machine a run's metrics were measured with."""
    import numba

    from . import __version__

    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        layer = None
    return {"fastconv": __version__, "numpy": np.__version__, "numba": numba.__version__,
            "python": platform.python_version(), "cpu": cpu_model(),
            "numba_threading_layer": layer}


def _jsonl(path, append: bool):
    """The JSON-lines log open for appending (``append``) or afresh, or a null context."""
    if path is None:
        return contextlib.nullcontext()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "a" if append else "w", encoding="utf-8")


def _epoch_line(row: dict, cfg: TrainConfig, lr: float) -> dict:
    """An epoch's line of the JSON-lines log: the epoch and the total, its train and test
    loss and accuracy, its seconds and training images per second, the learning rate of
    its last step, and the time it ended (UTC, ISO 8601)."""
    return {"epoch": row["epoch"], "epochs": cfg.epochs,
            **{k: row[k] for k in ("train_loss", "train_accuracy", "test_loss",
                                   "test_accuracy", "seconds", "samples_per_second")},
            "lr": float(lr),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _write_line(f, obj: dict) -> None:
    f.write(json.dumps(obj) + "\n")
    f.flush()  # the line is the kernel's now: a killed process keeps it


def _metrics(cfg, history, samples, seconds, first_step=None, warm_up=None,
             conv_algorithms=None) -> dict:
    last = history[-1] if history else {}
    return {
        "first_step_seconds": first_step,
        **(warm_up or {"warm_up_seconds": None, "compile_seconds": None,
                       "kernels_compiled": None}),
        "dataset": cfg.dataset, "model": cfg.model, "batch_size": cfg.batch_size,
        "threads": conv.get_num_threads(), "optimizer": cfg.optimizer, "lr": cfg.lr,
        "seed": cfg.seed,
        "config": dataclasses.asdict(cfg),
        "environment": _environment(),
        "conv_algorithms": conv_algorithms or {},
        "epochs": [{k: e[k] for k in ("epoch", "train_loss", "train_accuracy", "test_loss",
                                      "test_accuracy", "seconds", "samples_per_second")}
                   for e in history],
        "test_accuracy": last.get("test_accuracy"), "test_loss": last.get("test_loss"),
        "train_samples_per_second": samples / seconds if seconds else None,
    }


# ---- plots ---------------------------------------------------------------------------


def _require_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'fastconv[train]'") from None


def write_plot(path, history, curve, model) -> None:
    """A PNG with loss and accuracy curves and the learned first-layer filters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(12, 4), layout="constrained")
    grid = fig.add_gridspec(1, 3)
    ax = fig.add_subplot(grid[0])
    if curve:
        t, v = np.array(curve).T
        ax.plot(t, v, lw=0.5, alpha=0.5, label="train (per batch)")
    epochs = [e["epoch"] for e in history]
    ax.plot(epochs, [e["train_loss"] for e in history], "o-", label="train (epoch mean)")
    ax.plot(epochs, [e["test_loss"] for e in history], "s-", label="test")
    ax.set(xlabel="epoch", ylabel="loss", title="loss", yscale="log")
    ax.legend()
    ax = fig.add_subplot(grid[1])
    ax.plot(epochs, [e["train_accuracy"] for e in history], "o-", label="train")
    ax.plot(epochs, [e["test_accuracy"] for e in history], "s-", label="test")
    ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    ax.legend()
    w = model[0].params["weight"][:, 0]  # (K, R, S) first-layer filters
    cols = int(np.ceil(np.sqrt(len(w))))
    rows = int(np.ceil(len(w) / cols))
    sub = grid[2].subgridspec(rows, cols, wspace=0.05, hspace=0.05)
    for k in range(len(w)):
        a = fig.add_subplot(sub[k // cols, k % cols])
        a.imshow(w[k], cmap="gray")
        a.set_axis_off()
    fig.suptitle(f"conv1 filters (right), {len(history)} epoch(s)")
    _atomic_write(Path(path), lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
