"""Data-parallel training over MPI: ``mpiexec -n R fastconv train``.

Each of the R processes (ranks) holds the whole model, takes a disjoint shard of every
global batch and computes the gradient of its shard; an allreduce sums the gradients so
that every rank takes the same optimizer step as one process with the whole batch would.
The transport is MPI through mpi4py (the ``dist`` extra); this module imports mpi4py only
when a run is launched by an MPI launcher, so ``import fastconv`` never does.

Legend: R ranks, r this rank, B the global batch, n the samples of one global batch (B,
or fewer in an epoch's last batch), n_r the samples of rank r's shard (n / R, or differing
by at most one in a last batch).

:class:`Communicator`
    The rank, the number of ranks and the collective checks :func:`fastconv.train.train`
    needs; one process is a communicator of size 1 that never touches MPI.
:class:`GradientSync`
    The gradients of a model in one flat, preallocated buffer.  When every rank runs on one
    machine, the buffers live in an MPI shared-memory window and the ranks sum them
    directly (``method='shared'``); across machines the buffer is cut into buckets and,
    during ``model.backward``, each bucket's ``Iallreduce`` starts as soon as the layers
    that own it have produced their gradients (``method='iallreduce'``).
:func:`allreduce_gradients`
    The same averaging, at once, for a loop of your own.

The design, the failure handling and a scaling model are in docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import weakref

import numpy as np

from . import _args

__all__ = ["Communicator", "GradientSync", "RankFailed", "all_ranks", "allreduce_gradients",
           "init", "launched_by_mpi"]

#: Environment variables an MPI launcher sets in the processes it starts, with the number
#: of processes (or None where the variable does not give it): Open MPI's mpiexec,
#: MPICH's and Intel MPI's Hydra, PMIx launchers (Open MPI 5, ``srun --mpi=pmix``), MVAPICH.
_LAUNCHER_SIZE = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
_LAUNCHER_OTHER = ("PMIX_RANK", "PMI_RANK")

#: The default bucket size in MiB (PyTorch DDP's first bucket): see docs/distributed.md.
BUCKET_MB = 1.0


class RankFailed(RuntimeError):
    """Another rank failed while the run was being set up; the message names it."""


def launched_by_mpi() -> int | None:
    """The number of processes an MPI launcher started (from its environment variables),
    0 when the number is not in the environment but a launcher's variables are, and None
    when this process was not started by an MPI launcher.  Imports nothing."""
    for key in _LAUNCHER_SIZE:
        value = os.environ.get(key, "")
        if value.isdigit():
            return int(value)
    return 0 if any(k in os.environ for k in _LAUNCHER_OTHER) else None


def init(distributed="auto") -> Communicator:
    """The communicator a run uses.

    Parameters
    ----------
    distributed : ``'auto'``, ``'off'`` or a :class:`Communicator`
        ``'auto'``: data-parallel over ``MPI.COMM_WORLD`` when an MPI launcher started more
        than one process, else one process (mpi4py is then not imported).  ``'off'``: one
        process, even under ``mpiexec`` (each rank then trains on its own).  A
        :class:`Communicator` is returned as it is.

    Raises
    ------
    RuntimeError
        Under a launcher with more than one process when mpi4py cannot be imported.
    """
    if isinstance(distributed, Communicator):
        return distributed
    if not isinstance(distributed, str):
        raise TypeError(f"distributed must be 'auto', 'off' or a fastconv.dist.Communicator, "
                        f"got {_args._describe(distributed)}")
    if distributed not in ("auto", "off"):
        raise ValueError(f"distributed must be 'auto', 'off' or a fastconv.dist.Communicator, "
                         f"got {distributed!r}")
    size = launched_by_mpi()
    if distributed == "off" or size is None or size == 1:
        return Communicator()
    # Open MPI's UCX one-sided component prints an error on machines without UCX devices
    # when a window is made; the shared-memory windows of GradientSync are served by its
    # 'sm' component.  A setting of the user's own wins.  MPICH ignores the variable.
    os.environ.setdefault("OMPI_MCA_osc", "^ucx")
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise RuntimeError(f"this process was started by an MPI launcher "
                           f"({size or 'several'} processes), but mpi4py cannot be imported "
                           f"({e}): pip install 'fastconv[dist]', or pass --distributed off"
                           ) from None
    return Communicator(MPI.COMM_WORLD)


def all_ranks(exc: BaseException) -> BaseException:
    """``exc``, marked as an error every rank raises alike at the same point (a diverged
    loss that every rank computed from the same reduced numbers):
    :meth:`Communicator.fail_together` lets it through instead of aborting the job."""
    exc.fastconv_all_ranks = True
    return exc


def _one_line(e: BaseException) -> str:
    text = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class Communicator:
    """The ranks of a run: ``rank``, ``size`` and the few collectives training needs.

    Parameters
    ----------
    comm : mpi4py ``Intracomm`` or None
        None (the default) is one process: rank 0 of 1, and every method works without MPI.
    """

    def __init__(self, comm=None):
        self.comm = comm
        self.rank = comm.Get_rank() if comm is not None else 0
        self.size = comm.Get_size() if comm is not None else 1
        self.local_size = 1  # ranks on this node
        if self.size > 1:
            from mpi4py import MPI

            node = comm.Split_type(MPI.COMM_TYPE_SHARED)
            self.local_size = node.Get_size()
            node.Free()
        self._depth, self._setup_over = 0, True

    def __repr__(self):
        return f"Communicator(rank={self.rank}, size={self.size})"

    @property
    def distributed(self) -> bool:
        """More than one rank."""
        return self.size > 1

    @property
    def is_root(self) -> bool:
        """Rank 0: the one that prints and writes files."""
        return self.rank == 0

    def default_threads(self) -> int:
        """This rank's share of the cores: the cores it may run on (its CPU affinity, which
        the launcher's binding sets), at most the node's cores divided by the ranks on the
        node, at least 1, at most the threads Numba started with."""
        import numba

        cores = os.cpu_count() or 1
        try:
            mine = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            mine = cores
        share = min(mine, cores // self.local_size)
        return max(1, min(share, numba.config.NUMBA_NUM_THREADS))

    def shard(self, a):
        """This rank's part of ``a`` (a global batch's indices): ``np.array_split(a, R)[r]``,
        contiguous; all of it on one rank.  Equal parts when R divides ``len(a)``, else
        they differ by at most one (an epoch's last batch)."""
        if self.size == 1:
            return a
        lo, hi = self.bounds(len(a))
        return a[lo:hi]

    def bounds(self, n: int) -> tuple[int, int]:
        """``[lo, hi)``: this rank's part of ``n`` items, as :meth:`shard` splits them."""
        q, extra = divmod(n, self.size)
        lo = self.rank * q + min(self.rank, extra)
        return lo, lo + q + (self.rank < extra)

    def allreduce_sum(self, values) -> np.ndarray:
        """The sum over ranks of a small float64 vector (every rank gets it)."""
        values = np.asarray(values, dtype=np.float64)
        if self.size == 1:
            return values.copy()
        out = np.empty_like(values)
        from mpi4py import MPI

        self.comm.Allreduce(values, out, op=MPI.SUM)
        return out

    def broadcast_parameters(self, model) -> None:
        """Copy rank 0's parameters and buffers into every rank's (in place)."""
        if self.size == 1:
            return
        for _, a, _ in model._state():
            self.comm.Bcast(a, root=0)

    def check_same(self, what: str, value) -> None:
        """ValueError on every rank unless every rank holds an equal ``value`` (a small
        picklable value, such as a checkpoint's digest)."""
        if self.size == 1:
            return
        values = self.comm.allgather(value)
        odd = [r for r, v in enumerate(values) if v != values[0]]
        if odd:
            raise all_ranks(ValueError(
                f"rank {odd[0]} of {self.size} has a different {what} than rank 0 "
                f"({values[odd[0]]!r} against {values[0]!r}): every rank must read the same"))

    # ---- failures ------------------------------------------------------------------

    @contextlib.contextmanager
    def fail_together(self):
        """Make an exception on one rank end the whole job, never a hang.

        While the run is being set up (until :meth:`setup_done`), an exception on any rank
        is exchanged at the collective check: every rank then raises an error, its own
        exception where every rank failed alike (a bad setting), else :class:`RankFailed`
        naming the first rank that failed and its message, so rank 0 can print it and every
        rank exits.  After the setup, the other ranks may be waiting in a collective: an
        exception prints one line to stderr, naming this rank, and ``MPI_Abort`` ends every
        process of the job.  Exceptions marked by :func:`all_ranks` pass through.  On one
        process it does nothing.
        """
        if self.size == 1:
            yield
            return
        if not self._depth:
            self._setup_over = False
        self._depth += 1
        try:
            yield
        except BaseException as e:
            if getattr(e, "fastconv_all_ranks", False):
                raise
            if self._setup_over:
                self.abort(e)
            error = self._exchange(e)
            if error is e:
                raise
            raise error from None
        finally:
            self._depth -= 1

    def setup_done(self) -> None:
        """The collective check at the end of a run's setup: raises on every rank when any
        rank failed before it (see :meth:`fail_together`)."""
        if self.size == 1 or self._setup_over:
            return
        error = self._exchange(None)
        if error is not None:
            raise error

    def _exchange(self, error: BaseException | None) -> BaseException | None:
        """Every rank's error (or None) to every rank; the error to raise, or None."""
        messages = self.comm.allgather(None if error is None else _one_line(error))
        self._setup_over = True
        failed = [r for r, m in enumerate(messages) if m is not None]
        if not failed:
            return None
        if len(failed) == self.size and len(set(messages)) == 1:
            return all_ranks(error)  # the same error on every rank: its own
        others = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        return all_ranks(RankFailed(
            f"rank {failed[0]} of {self.size} failed{others}: {messages[failed[0]]}"))

    def abort(self, error: BaseException) -> None:
        """Print ``error`` as one line naming this rank, then ``MPI_Abort`` the job
        (exit code 130 for an interrupt, else 1)."""
        code = 130 if isinstance(error, KeyboardInterrupt) else 1
        try:
            sys.stdout.flush()
        finally:
            print(f"fastconv: error on rank {self.rank} of {self.size}: {_one_line(error)}; "
                  f"stopping all {self.size} processes", file=sys.stderr, flush=True)
            self.comm.Abort(code)


class GradientSync:
    """A model's gradients, averaged over the ranks during its backward pass.

    The gradients live in one flat, preallocated buffer in reverse parameter order (the
    order backward produces them).  :meth:`train_step` scales the loss's deltas by
    ``n_r / n``, so that every gradient backward makes is this rank's share of the mean
    gradient of the global batch, and the sum over ranks is that mean.  Layers that can
    (``Linear``, which holds most of the two-conv network's weights) write their gradients
    straight into the buffer; a hook that ``nn.Sequential.backward`` calls after each layer
    copies the others in.  Two methods sum the buffers:

    ``'shared'`` (every rank on one machine)
        Each rank's buffer is its segment of one MPI shared-memory window
        (``MPI.Win.Allocate_shared``).  After backward, rank r sums the r-th of R equal
        chunks of every rank's buffer into its own, then copies the other chunks' sums
        from their owners: a reduce-scatter and an allgather by plain loads and stores,
        three barriers, no message.  It is the node-local step of the hierarchical
        allreduces of NCCL and Horovod.  There is nothing to overlap: the ranks' own cores
        would do the copying MPI's transports do.
    ``'iallreduce'`` (ranks on several machines)
        The buffer is cut into buckets of about ``bucket_mb`` MiB at parameter boundaries,
        and the hook starts a nonblocking ``Iallreduce`` (sum) of every bucket whose
        gradients are all there, in bucket order on every rank, so the network's time
        overlaps the rest of backward.  After backward the rest is started and awaited.

    In both, each parameter's ``.grad`` then becomes a view of the buffer: the mean
    gradient of the global batch.  Models that are not a Sequential get no hook calls:
    their gradients are copied after their backward.  docs/distributed.md has the
    measurements behind the choice.

    Parameters
    ----------
    model : fastconv.nn.Module
        Its parameters must share one dtype.
    comm : Communicator
    bucket_mb : float > 0
        ``'iallreduce'``: the bucket size in MiB (1 by default, as PyTorch DDP's first
        bucket; the two-conv network's 1.8 MB of gradients make two buckets).
    progress : bool
        ``'iallreduce'``: drive the started allreduces from a helper thread while backward
        runs (True, the default, where MPI allows calls from several threads one at a
        time): MPI libraries move a nonblocking collective's data only inside MPI calls,
        and the kernels make none.  Without it, the hook tests the requests between layers.
    method : {'auto', 'shared', 'iallreduce'}
        ``'auto'`` (the default): ``'shared'`` when every rank runs on one machine and the
        MPI library makes shared-memory windows, else ``'iallreduce'``.  ``'shared'`` on
        ranks of several machines is a ValueError.

    Attributes
    ----------
    method : str
        The method in use: ``'shared'`` or ``'iallreduce'`` (also on one process).
    buckets : list of (start, stop)
        The element ranges of the flat buffer reduced as one, in the order they start
        (``'shared'``: the whole buffer).
    timers : dict of str to float
        Seconds summed over steps (reported by bench/dist_report.py): ``copy`` (gradients
        into the buffer), ``mpi`` (starting and testing the allreduces during backward),
        ``wait`` (after backward until every gradient is reduced: the last bucket's
        allreduce, or the whole shared-memory reduction, with any wait for a slower rank),
        ``in_flight`` (from the first bucket's start to the end of backward), ``bytes``
        (of gradients reduced), ``copied_bytes`` (of those, copied into the buffer: the
        rest was written there by its layer), ``overlapped_bytes`` (of those, the buckets
        whose allreduce started and finished during backward), and ``steps``.
    """

    def __init__(self, model, comm: Communicator, bucket_mb: float = BUCKET_MB,
                 progress: bool = True, method: str = "auto"):
        progress = _args._bool("progress", progress)
        bucket_mb = _args._real("bucket_mb", bucket_mb, 0.0)
        if bucket_mb <= 0:
            raise ValueError(f"bucket_mb must be > 0, got {bucket_mb!r}")
        if not isinstance(comm, Communicator):
            raise TypeError(f"comm must be a fastconv.dist.Communicator, got "
                            f"{type(comm).__name__}")
        if not isinstance(method, str) or method not in ("auto", "shared", "iallreduce"):
            raise ValueError(f"method must be 'auto', 'shared' or 'iallreduce', got "
                             f"{method!r}")
        if method == "shared" and comm.local_size < comm.size:
            raise ValueError(f"method='shared' needs every rank on one machine; these "
                             f"{comm.size} ranks run {comm.local_size} to a machine: use "
                             "'iallreduce' or 'auto'")
        self.model, self.comm = model, comm
        params = list(reversed(model.parameters()))
        if not params:
            raise ValueError("the model has no parameters to average")
        dtypes = {p.data.dtype for p in params}
        if len(dtypes) > 1:
            raise TypeError(f"the parameters have dtypes {sorted(map(str, dtypes))}; "
                            "averaging gradients needs one dtype")
        self.params = params
        self.dtype = dtypes.pop()
        self.offsets = np.cumsum([0] + [p.data.size for p in params])
        size = int(self.offsets[-1])
        self._shared = None
        if comm.distributed and comm.local_size == comm.size and method != "iallreduce":
            self._shared = _SharedBuffers.make(comm, size, self.dtype,
                                               required=method == "shared")
        self.method = "shared" if self._shared is not None else "iallreduce"
        if self._shared is not None:
            self.flat = self._shared.mine
            self.buckets = [(0, size)]
            self._bucket_of = [0] * len(params)
        else:
            self.flat = np.zeros(size, self.dtype)
            # Buckets close at the first parameter boundary at or past bucket_mb, as DDP's.
            limit = bucket_mb * 2**20 / self.dtype.itemsize
            self.buckets, self._bucket_of, start = [], [], 0
            for i in range(len(params)):
                self._bucket_of.append(len(self.buckets))
                if self.offsets[i + 1] - start >= limit or i == len(params) - 1:
                    self.buckets.append((start, int(self.offsets[i + 1])))
                    start = int(self.offsets[i + 1])
        # Each parameter's place in the buffer, and the same views by module, which
        # train_step offers the layers to write their gradients into (Module._grad_into).
        self._views = [self.flat[self.offsets[i]:self.offsets[i + 1]].reshape(p.shape)
                       for i, p in enumerate(params)]
        self._into = {}
        for p, view in zip(params, self._views, strict=True):
            self._into.setdefault(id(p.module), (p.module, {}))[1][p.key] = view
        # Which parameters each top-level layer holds (children included).
        index = {(id(p.module), p.key): i for i, p in enumerate(params)}
        self._of_layer = {}
        for layer in getattr(model, "layers", []):
            self._of_layer[id(layer)] = [index[(id(p.module), p.key)]
                                         for p in layer.parameters()]
        self.timers = dict.fromkeys(("copy", "mpi", "wait", "in_flight", "steps", "bytes",
                                     "copied_bytes", "overlapped_bytes"), 0.0)
        self._progress = None
        if progress and comm.distributed and self._shared is None:
            from mpi4py import MPI

            if MPI.Query_thread() >= MPI.THREAD_SERIALIZED:
                self._progress = _Progress(MPI)

    def close(self) -> None:
        """Free the shared-memory window (``'shared'``), on every rank at the same point:
        it is a collective call.  The gradients the parameters hold stay valid (copied
        out).  The sync cannot be used afterwards."""
        if self._shared is not None:
            for p in self.params:
                g = p.module.grads.get(p.key)
                if g is not None and np.shares_memory(g, self.flat):
                    p.module.grads[p.key] = g.copy()
            self._views, self._into = [], {}
            self._shared.free()
            self._shared, self.flat = None, None

    # ---- one step ------------------------------------------------------------------

    def train_step(self, model, loss_fn, x, y, n: int) -> tuple[float, int]:
        """Forward and backward of this rank's shard ``(x, y)`` of a global batch of ``n``
        samples, with the gradients' allreduce.

        Call it after ``zero_grad``.  On return every parameter's ``.grad`` holds the mean
        gradient of the global batch (every rank the same), and the returned loss and
        number of correct predictions are the global batch's.  A rank with an empty shard
        (an epoch's last batch smaller than R) runs no forward and adds zeros.
        """
        n_r = len(x)
        loss, hits = 0.0, 0
        if n_r:
            logits = model(x)
            loss = float(loss_fn(logits, y))
            hits = int((logits.argmax(axis=1) == y).sum())
        # The weight n_r / n is applied to the loss's deltas (a (n_r, classes) array): every
        # gradient backward makes is then already this rank's share of the mean, and the
        # layers that can (Linear) write theirs straight into the buffer.  For equal
        # shards the weight is 1/R, a power of two for R = 2, 4, ...: exact.
        self._begin(1.0, (loss * n_r, hits))
        if n_r:
            dy = loss_fn.backward()
            if n_r != n:
                dy = dy * dy.dtype.type(n_r / n)
            for module, views in self._into.values():
                module._grad_into = views
            try:
                model.backward(dy)
            except BaseException:
                self.model._grad_hook = None
                raise
            finally:
                for module, _ in self._into.values():
                    module._grad_into = None
        total = self._end()
        return float(total[0] / n), int(round(total[1]))

    def average(self) -> None:
        """Average the gradients the parameters hold now over the ranks, in place."""
        self._begin(1.0 / self.comm.size, None)
        self._end()

    def _begin(self, weight: float, stats) -> None:
        from mpi4py import MPI

        if self.flat is None:
            raise RuntimeError("this GradientSync was closed")
        self._mpi = MPI
        self._weight = weight
        self._ready = [False] * len(self.params)
        self._pending = [0] * len(self.buckets)
        for b in self._bucket_of:
            self._pending[b] += 1
        self._requests, self._next = _Requests(), 0
        self._first_start = None
        self._stats = None
        if stats is not None:
            self._stats = np.array(stats, np.float64)
            if self._shared is None:
                self._submit(self.comm.comm.Iallreduce, MPI.IN_PLACE, self._stats,
                             op=MPI.SUM)
        self.model._grad_hook = self._layer_done

    def _layer_done(self, layer) -> None:
        """The hook: ``layer``'s backward has produced its gradients."""
        indices = self._of_layer.get(id(layer))
        if indices:
            t0 = time.perf_counter()
            for i in indices:
                self._take(i)
            t1 = time.perf_counter()
            self.timers["copy"] += t1 - t0
            if self._shared is None:  # 'iallreduce': start the buckets now complete
                self._start_ready()
                self.timers["mpi"] += time.perf_counter() - t1
        elif self._requests and self._progress is None:  # let the allreduces progress
            t0 = time.perf_counter()
            _pop_done(self._requests)
            self.timers["mpi"] += time.perf_counter() - t0

    def _take(self, i: int) -> None:
        """Copy parameter i's gradient into the buffer, times the rank's weight."""
        if self._ready[i]:
            return
        out, g = self._views[i], self.params[i].grad
        if g is out:  # the layer wrote it there (train_step)
            pass
        elif g is None:  # no gradient on this rank: it adds zeros
            out.fill(0)
        elif self._weight == 1.0:
            np.copyto(out, g, casting="same_kind")
            self.timers["copied_bytes"] += out.nbytes
        else:
            np.multiply(g, self._weight, out=out, casting="same_kind")
            self.timers["copied_bytes"] += out.nbytes
        self._ready[i] = True
        self._pending[self._bucket_of[i]] -= 1

    def _start_ready(self) -> None:
        """Start, in order, every bucket whose gradients are all in the buffer."""
        MPI = self._mpi
        while self._next < len(self.buckets) and not self._pending[self._next]:
            lo, hi = self.buckets[self._next]
            if self._first_start is None:
                self._first_start = time.perf_counter()
            self._submit(self.comm.comm.Iallreduce, MPI.IN_PLACE, self.flat[lo:hi],
                         op=MPI.SUM)
            self._next += 1
        if self._requests and self._progress is None:
            _pop_done(self._requests)

    def _submit(self, start, *args, **kwargs) -> None:
        """Start a nonblocking collective; the progress thread (if any) drives it."""
        if self._progress is None:
            self._requests.append(start(*args, **kwargs))
        else:
            self._progress.submit(start, *args, **kwargs)

    def _end(self):
        self.model._grad_hook = None
        if self._shared is None and self._first_start is not None:
            self.timers["in_flight"] += time.perf_counter() - self._first_start
            # The buckets whose allreduce finished before backward did (the stats first).
            done = (self._progress.completed() if self._progress is not None
                    else _pop_done(self._requests)) - (self._stats is not None)
            if done > 0:
                self.timers["overlapped_bytes"] += self.buckets[done - 1][1] * \
                    self.dtype.itemsize
        t0 = time.perf_counter()
        for i in range(len(self.params)):
            self._take(i)
        t1 = time.perf_counter()
        if self._shared is not None:
            self._stats = self._shared.allreduce(self._stats)
        else:
            self._start_ready()
            if self._progress is not None:
                self._requests = self._progress.take()
            self._mpi.Request.Waitall(self._requests)
        self.timers["copy"] += t1 - t0
        self.timers["wait"] += time.perf_counter() - t1
        self.timers["bytes"] += self.flat.nbytes
        self.timers["steps"] += 1
        # Every parameter's .grad: its view of the reduced buffer.
        for i, p in enumerate(self.params):
            p.module.grads[p.key] = self.flat[self.offsets[i]:self.offsets[i + 1]].reshape(
                p.shape)
        return self._stats

    def reset_timers(self) -> None:
        for key in self.timers:
            self.timers[key] = 0.0


class _SharedBuffers:
    """Every rank's buffer of ``n`` elements in one MPI shared-memory window, and their
    sum by loads and stores.

    Each rank's segment is a 64-byte header (two float64: the step's loss sum and correct
    count) and its buffer; ``alloc_shared_noncontig`` lets the MPI library place each
    segment in memory local to its rank.  The chunks that ranks sum are multiples of 16
    elements, so no two ranks write one cache line.  Reading another rank's segment is
    ordered by ``Win.Sync`` (a memory barrier) and a barrier, the MPI-3 shared-memory
    pattern, inside one passive epoch (``Lock_all``) that lasts as long as the window.
    """

    HEADER = 64  # bytes

    @classmethod
    def make(cls, comm: Communicator, n: int, dtype, required: bool):
        """The buffers, or None where the MPI library refuses shared-memory windows (on
        every rank alike) and ``required`` is false."""
        from mpi4py import MPI

        try:
            made = cls(comm, n, dtype)
            error = None
        except MPI.Exception as e:
            made, error = None, e
        failed = comm.comm.allreduce(error is not None, op=MPI.LOR)
        if not failed:
            return made
        if made is not None:
            made.free()
        if required:
            raise RuntimeError(f"method='shared': this MPI library could not make a shared-"
                               f"memory window ({error or 'on another rank'}): use "
                               "'iallreduce'") from None
        return None

    def __init__(self, comm: Communicator, n: int, dtype):
        from mpi4py import MPI

        self.comm, self.dtype = comm.comm, np.dtype(dtype)
        info = MPI.Info.Create()
        info.Set("alloc_shared_noncontig", "true")
        try:
            self.win = MPI.Win.Allocate_shared(self.HEADER + n * self.dtype.itemsize, 1,
                                               info=info, comm=self.comm)
        finally:
            info.Free()
        self.win.Lock_all(MPI.MODE_NOCHECK)
        self.rank, size = self.comm.Get_rank(), self.comm.Get_size()
        self.stats, self.buffers = [], []
        for q in range(size):
            memory, _ = self.win.Shared_query(q)
            self.stats.append(np.frombuffer(memory, np.float64, 2))
            self.buffers.append(np.frombuffer(memory, self.dtype, n, offset=self.HEADER))
        self.mine = self.buffers[self.rank]
        self.mine.fill(0)
        edges = [n * q // size // 16 * 16 for q in range(size)] + [n]
        self.chunks = list(zip(edges[:-1], edges[1:], strict=True))

    def _barrier(self) -> None:
        self.win.Sync()
        self.comm.Barrier()
        self.win.Sync()

    def allreduce(self, stats):
        """Sum every rank's buffer into every rank's (and ``stats``, two float64 or None,
        likewise: the sum is returned)."""
        if stats is not None:
            self.stats[self.rank][:] = stats
        self._barrier()  # every buffer written
        total = None if stats is None else np.sum(self.stats, axis=0)
        lo, hi = self.chunks[self.rank]
        mine = self.mine[lo:hi]
        for q, other in enumerate(self.buffers):
            if q != self.rank:
                np.add(mine, other[lo:hi], out=mine)
        self._barrier()  # every chunk summed by its owner
        for q, (lo, hi) in enumerate(self.chunks):
            if q != self.rank:
                self.mine[lo:hi] = self.buffers[q][lo:hi]
        self._barrier()  # every sum copied: the buffers may be written again
        return total

    def free(self) -> None:
        self.stats = self.buffers = self.mine = None
        self.win.Unlock_all()
        self.win.Free()


class _Progress:
    """A daemon thread that tests the started collectives (in order) every ``interval``
    seconds until they are done, so their data moves while the kernels run
    (they release the GIL).  Every MPI call of a step goes through one lock: MPI sees one
    call at a time (``MPI_THREAD_SERIALIZED`` suffices)."""

    def __init__(self, MPI, interval: float = 2e-4):
        self.MPI, self.interval = MPI, interval
        self.cv = threading.Condition()
        self.requests = _Requests()
        self.thread = threading.Thread(target=self._run, name="fastconv-mpi-progress",
                                       daemon=True)
        self.thread.start()

    def submit(self, start, *args, **kwargs) -> None:
        with self.cv:
            self.requests.append(start(*args, **kwargs))
            self.cv.notify()

    def completed(self) -> int:
        """How many of the requests submitted since the last :meth:`take` have completed."""
        with self.cv:
            return self.requests.done

    def take(self) -> list:
        """The started requests, which the thread no longer touches: the caller waits."""
        with self.cv:
            requests, self.requests = self.requests, _Requests()
        return requests

    def _run(self) -> None:
        with self.cv:
            while True:
                if not self.requests:
                    self.cv.wait()
                    continue
                _pop_done(self.requests)
                if self.requests:
                    self.cv.wait(self.interval)


class _Requests(list):
    """Started requests in order, those done popped from the front and counted."""

    done = 0


def _pop_done(requests: _Requests) -> int:
    """Test ``requests`` from the front, popping those complete; how many ever were."""
    while requests and requests[0].Test():
        requests.pop(0)
        requests.done += 1
    return requests.done


_SYNCS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (key, sync)


def allreduce_gradients(model, comm: Communicator | None = None) -> None:
    """Average every parameter's gradient over the ranks, in place: for your own loop, after
    the backward pass(es) of a step and before ``opt.step()``.

    Every rank must call it at the same point, with the same model.  Parameters without a
    gradient on a rank count as zeros there, and every parameter has a gradient afterwards
    (a view of one flat buffer, kept per model between calls).  On one process it does
    nothing.

    Parameters
    ----------
    model : fastconv.nn.Module
    comm : Communicator, optional
        Default: ``init('auto')``, over ``MPI.COMM_WORLD`` under an MPI launcher.

    Examples
    --------
    >>> opt.zero_grad()                                       # doctest: +SKIP
    >>> loss = loss_fn(model(x_shard), y_shard)                 # doctest: +SKIP
    >>> model.backward(loss_fn.backward())                      # doctest: +SKIP
    >>> fastconv.dist.allreduce_gradients(model)                # doctest: +SKIP
    >>> opt.step()                                              # doctest: +SKIP
    """
    comm = init("auto") if comm is None else init(comm)
    if comm.size == 1:
        return
    key = [(id(p.module), p.key, p.shape, p.data.dtype) for p in model.parameters()]
    held = _SYNCS.get(model)
    if held is None or held[0] != key or held[1].comm is not comm:
        held = _SYNCS[model] = (key, GradientSync(model, comm))
    held[1].average()
