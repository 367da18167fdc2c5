"""Process settings for XLA:CPU: make glibc's ``malloc`` keep freed memory.

XLA:CPU allocates each execution's scratch memory (0.8 GB for the benchmark
step) with ``malloc``, which by default maps it fresh from the kernel and
unmaps it again every step, so every step first-touches it page by page; that
was 0.5 CPU-seconds of page faults per 1.2 s step. Kept in the heap, the same
memory is reused: the step is ~1.4x faster, at the price of a higher peak RSS
(freed memory is not returned to the system). ``JAXTRAIN_MALLOC=off`` leaves
``malloc`` alone. The command line applies it only when the run's devices are
CPUs, before JAX starts its threads.

No XLA CPU flag or thread setting is applied: none of the ones measured on the
benchmark step beat the defaults by more than the noise (``benchmarks/HISTORY.md``
lists what was tried). :func:`xla_flags` is the one place to add such a flag.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Sequence

MALLOC_ENV = "JAXTRAIN_MALLOC"
_OFF = ("", "off", "0", "false", "none")


# mallopt(3) parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` reuse freed memory instead of returning it to the kernel; True if applied.

    One arena for all threads, no ``mmap`` for large blocks, and no trimming of
    the heap below 2 GiB of free memory: XLA:CPU's per-execution scratch buffer
    then comes back from the heap each step, already paged in. Call it before
    JAX creates its threads (:func:`configure` does, first); threads that
    already allocated keep their own arenas. Not applied (False) on non-glibc
    systems or with ``JAXTRAIN_MALLOC=off``.
    """
    if os.environ.get(MALLOC_ENV, "on").strip().lower() in _OFF or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all([mallopt(_M_ARENA_MAX, 1), mallopt(_M_MMAP_MAX, 0), mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)])


def xla_flags() -> Sequence[str]:
    """XLA flags :func:`configure` adds to ``XLA_FLAGS`` (none: the defaults measured best)."""
    return ()


def configure() -> bool:
    """Apply the process settings (before JAX creates its threads); True if ``malloc`` was changed."""
    flags = [f for f in xla_flags() if f.split("=")[0] not in os.environ.get("XLA_FLAGS", "")]
    if flags:
        os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()
    return keep_freed_memory()
