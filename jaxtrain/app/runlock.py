"""One writer per run directory: an advisory lock on ``run_dir/.jaxtrain.lock``.

The lock is ``fcntl.flock`` on that file, so the kernel releases it whenever its
holder ends, however it ends (normal exit, error, SIGTERM, ``kill -9``): a lock
left by a dead run is simply free, and taking it is one atomic system call. The
file itself stays (removing it would race with the next holder) and says who
holds it: ``{"pid", "host", "started"}``, written by each holder and emptied on
release, so a record found by the next run means its holder died holding it.

Example::

    with RunLock(run_dir) as lock:      # RunDirBusy (one line) when another run holds it
        ...train...

In a multi-process run only process 0 takes it (the caller decides; see
:func:`jaxtrain.app.loop.train`), and the others learn its answer through
``parallel.together``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Optional

from jaxtrain.app.config import ConfigError

LOCK_FILE = ".jaxtrain.lock"
log = logging.getLogger(__name__)


class RunDirBusy(ConfigError):
    """Another live run holds the run directory's lock; the message names it (pid@host)."""


class RunLock:
    """The lock on ``run_dir``. :meth:`acquire` takes it (or raises :class:`RunDirBusy`);
    :meth:`release` (also on ``__exit__``) gives it back; both are idempotent."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir).expanduser().absolute() / LOCK_FILE
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, *, create: bool = True) -> bool:
        """Take the lock; True when held afterwards.

        ``create=False`` only tries an existing lock file and writes nothing when
        there is none (returns False): a cheap early check before the run
        directory may be created. Raises :class:`RunDirBusy` naming the holder.
        """
        if self._fd is not None:
            return True
        if not create and not self.path.exists():
            return False
        try:
            if create:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
        except FileNotFoundError:
            if not create:
                return False
            raise
        except OSError as e:
            if not create:  # e.g. a read-only run_dir: the real attempt below says so
                return False
            raise ConfigError(f"run_dir '{self.path.parent}': cannot create its lock file '{self.path.name}' "
                              f"({e.strerror or e}); pass a run_dir you can write to") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirBusy(f"run_dir '{self.path.parent}' is in use by another run ({holder}); wait for it "
                             "to finish or stop it, or pass another run_dir") from None
        except OSError as e:  # a file system without locks: say so rather than run unprotected silently
            os.close(fd)
            if not create:
                return False
            raise ConfigError(f"run_dir '{self.path.parent}': cannot lock '{self.path}' ({e.strerror}); "
                              "use a run_dir on a file system that supports flock") from None
        stale = _read_holder(fd) if os.fstat(fd).st_size else None
        if stale is not None:  # a holder that ended without releasing (kill -9, power loss): its lock is free
            log.warning("run_dir '%s': taking over the lock left by %s, which is no longer running",
                        self.path.parent, stale)
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode() + b"\n", 0)
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # an empty file: released properly (a record left behind means a crash)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    """``"pid 123 on host h, since 2026-12-05 03:01:02"`` from the lock file, or what can be said."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["started"])))
        return f"pid {int(info['pid'])} on host {info['host']}, since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that is still starting"


def holder(run_dir: str | Path) -> Optional[dict]:
    """The lock file's record (``pid``, ``host``, ``started``) or None; says nothing about liveness."""
    try:
        return json.loads((Path(run_dir).expanduser() / LOCK_FILE).read_text() or "null")
    except (OSError, ValueError):
        return None
