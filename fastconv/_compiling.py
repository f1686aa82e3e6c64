"""Watching Numba compile fastconv's kernels: how many and for how long, and a notice on
stderr while it happens.

With a cold JIT cache (a new install, a new CPU, an empty ``$NUMBA_CACHE_DIR``) the first
training step compiles every kernel it runs, which takes tens of seconds; later processes
load them from the cache (``fastconv._jit``).  Numba announces each compilation with a
``numba:compile`` event (its event API, ``numba.core.event``), and only a compilation: a
kernel loaded from the cache raises none.  :class:`CompileWatch` listens to those events;
:func:`notice` shows "compiling kernels (first run only)…" from the first of them until
its block ends.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import threading
import time

from numba.core import event
from numba.core.dispatcher import Dispatcher

MESSAGE = "compiling kernels (first run only)…"


class CompileWatch(event.Listener):
    """Counts what Numba compiles while installed (``with CompileWatch() as w:``).

    Attributes
    ----------
    compiled : int
        Kernels compiled: compilations of functions called from Python.  The helpers a
        kernel calls are compiled with it (Numba starts a compilation inside the other)
        and are not counted here.
    seconds : float
        Seconds spent compiling, helpers included.
    functions : set
        ``(id(dispatcher), argument types)`` of every compilation, helpers included.
    """

    def __init__(self, on_first=None):
        self.compiled, self.seconds, self.functions = 0, 0.0, set()
        self._depth, self._t0 = 0, 0.0
        self._on_first = on_first  # called before the first compilation starts

    def on_start(self, ev):
        if self._depth == 0:
            if self.compiled == 0 and self._on_first is not None:
                self._on_first()
            self._t0 = time.perf_counter()
            self.compiled += 1
        self._depth += 1
        data = ev.data or {}
        self.functions.add((id(data.get("dispatcher")), tuple(data.get("args", ()))))

    def on_end(self, ev):
        self._depth -= 1
        if self._depth == 0:
            self.seconds += time.perf_counter() - self._t0

    def __enter__(self) -> CompileWatch:
        event.register("numba:compile", self)
        return self

    def __exit__(self, *exc) -> None:
        event.unregister("numba:compile", self)


class _Notice:
    """:data:`MESSAGE` on ``stream``: a tqdm line with a spinner and the seconds on a
    terminal (while :meth:`stop` is not called), else the message as one line."""

    def __init__(self, stream):
        self.stream = stream
        self._bar = self._thread = None
        self._stop = threading.Event()

    def start(self) -> None:
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        if tqdm is None or not _isatty(self.stream):
            print(MESSAGE, file=self.stream, flush=True)
            return
        self._bar = tqdm(total=None, desc=MESSAGE, bar_format="{desc} {elapsed}",
                         file=self.stream, leave=False)
        self._thread = threading.Thread(target=self._spin, name="fastconv-compile-notice",
                                        daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        for mark in itertools.cycle("|/-\\"):
            if self._stop.wait(0.25):
                return
            self._bar.set_description_str(f"{MESSAGE} {mark}")  # redraws the line

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._bar.close()


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no such method, or a closed stream
        return False


@contextlib.contextmanager
def notice(quiet: bool = False, stream=None):
    """Watch compilations in the block (yields its :class:`CompileWatch`) and, unless
    ``quiet``, say :data:`MESSAGE` on ``stream`` (default stderr) when the first starts: a
    spinner and the seconds on a terminal, until the block ends; one line elsewhere.  A
    block that compiles nothing (a warm cache) says nothing."""
    shown = _Notice(sys.stderr if stream is None else stream)
    watch = CompileWatch(on_first=None if quiet else shown.start)
    try:
        with watch:
            yield watch
    finally:
        shown.stop()


def dispatchers() -> list[Dispatcher]:
    """The Numba functions of fastconv's imported modules (its kernels and helpers)."""
    found = {}
    for name, module in list(sys.modules.items()):
        if name == "fastconv" or name.startswith("fastconv."):
            for value in list(vars(module).values()):
                if isinstance(value, Dispatcher):
                    found[id(value)] = value
    return list(found.values())


def signatures() -> set:
    """``(id(dispatcher), argument types)`` of each of fastconv's Numba functions for each
    signature compiled or loaded from the cache in this process."""
    return {(id(d), tuple(sig)) for d in dispatchers() for sig in d.signatures}


def cache_dirs() -> list[str]:
    """The folders Numba keeps fastconv's compiled kernels in (none with caching off)."""
    dirs = {getattr(getattr(d, "_cache", None), "cache_path", None) for d in dispatchers()}
    return sorted(d for d in dirs if d)
