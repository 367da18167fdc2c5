"""JAX's persistent compilation cache for the command line, set before JAX initialises its backend.

The compiled train, eval, init and decode steps are written to disk, so the
second start of the same config loads them instead of recompiling (see
``benchmarks/bench_startup.py``; numbers in ``benchmarks/RESULTS.md``).

The cache lives in ``~/.cache/jaxtrain/xla`` unless the environment variable
``JAXTRAIN_COMPILATION_CACHE`` names another directory; ``off`` (or an empty
value) disables it. Entries are keyed by the computation, the jax/jaxlib
version, the devices and the XLA flags, so a stale entry is never loaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

CACHE_ENV = "JAXTRAIN_COMPILATION_CACHE"
DEFAULT_CACHE_DIR = "~/.cache/jaxtrain/xla"
_OFF = ("", "off", "0", "false", "none")


def compilation_cache_dir() -> Optional[Path]:
    """The persistent-cache directory in force: ``$JAXTRAIN_COMPILATION_CACHE`` or the default; None if off."""
    value = os.environ.get(CACHE_ENV, DEFAULT_CACHE_DIR)
    if value.strip().lower() in _OFF:
        return None
    return Path(value).expanduser()


def configure(cache_dir: Optional[str | os.PathLike] = None, *, use_cache: bool = True) -> Optional[Path]:
    """Turn the persistent compilation cache on; call once, before the first jax computation.

    Args:
      cache_dir: persistent compilation cache directory; None means
        :func:`compilation_cache_dir` (environment variable, else the default).
      use_cache: False leaves the compilation cache off.
    Returns:
      The cache directory in use, or None when caching is off.
    """
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
