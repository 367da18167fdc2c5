"""Process-wide speed settings, applied before JAX initialises its backend.

:func:`configure` turns on JAX's persistent compilation cache: the compiled
train, eval, init and decode steps are written to disk, so the second start of
the same config loads them instead of recompiling (see
``benchmarks/bench_startup.py``; numbers in ``benchmarks/RESULTS.md``).

The cache lives in ``~/.cache/jaxtrain/xla`` unless the environment variable
``JAXTRAIN_COMPILATION_CACHE`` names another directory; ``off`` (or an empty
value) disables it. Entries are keyed by the computation, the jax/jaxlib
version, the devices and the XLA flags, so a stale entry is never loaded.

It also makes glibc's ``malloc`` keep freed memory (:func:`keep_freed_memory`):
XLA:CPU allocates each execution's scratch memory (0.8 GB for the benchmark
step) with ``malloc``, which by default maps it fresh from the kernel and
unmaps it again every step, so every step first-touches it page by page; that
was 0.5 CPU-seconds of page faults per 1.2 s step. Kept in the heap, the same
memory is reused: the step is ~1.4x faster, at the price of a higher peak RSS
(freed memory is not returned to the system). ``JAXTRAIN_MALLOC=off`` leaves
``malloc`` alone.

No XLA CPU flag or thread setting is applied: none of the ones measured on the
benchmark step beat the defaults by more than the noise (``benchmarks/RESULTS.md``
lists what was tried). :func:`xla_flags` is the one place to add such a flag.

Example::

    from jaxtrain import perf
    perf.configure()          # first, before any jax array exists
    import jaxtrain.loop      # ... then build and compile as usual
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

CACHE_ENV = "JAXTRAIN_COMPILATION_CACHE"
MALLOC_ENV = "JAXTRAIN_MALLOC"
DEFAULT_CACHE_DIR = "~/.cache/jaxtrain/xla"
_OFF = ("", "off", "0", "false", "none")


def compilation_cache_dir() -> Optional[Path]:
    """The persistent-cache directory in force: ``$JAXTRAIN_COMPILATION_CACHE`` or the default; None if off."""
    value = os.environ.get(CACHE_ENV, DEFAULT_CACHE_DIR)
    if value.strip().lower() in _OFF:
        return None
    return Path(value).expanduser()


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


def configure(cache_dir: Optional[str | os.PathLike] = None, *, use_cache: bool = True) -> Optional[Path]:
    """Apply the settings; call once, before the first jax computation.

    Args:
      cache_dir: persistent compilation cache directory; None means
        :func:`compilation_cache_dir` (environment variable, else the default).
      use_cache: False leaves the compilation cache off.
    Returns:
      The cache directory in use, or None when caching is off.
    """
    keep_freed_memory()
    flags = [f for f in xla_flags() if f.split("=")[0] not in os.environ.get("XLA_FLAGS", "")]
    if flags:
        os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()
    import jax

    path = (Path(cache_dir).expanduser() if cache_dir is not None else compilation_cache_dir()) if use_cache else None
    if path is None:
        return None
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    # The defaults only persist compilations slower than 1 s; a small model's steps
    # compile faster than that but their sum still dominates start-up.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
