"""Compiling the CPU backend's C++ FFI handlers: once per source, flags, jaxlib and CPU, cached on disk.

The libraries go to ``~/.cache/jaxtrain/ext`` (``$JAXTRAIN_EXT_CACHE`` overrides)
under a name keyed by everything that changes the build; each is compiled into a
temporary file and renamed, so concurrent processes never load a half-written one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

import jax
from jaxlib import version as _jaxlib_version

__all__ = ["EXT_CACHE_ENV", "BuildError", "build_dir", "compile_library"]

EXT_CACHE_ENV = "JAXTRAIN_EXT_CACHE"
# -fno-math-errno: without it every vectorised sqrt also checks for a negative
# argument to set errno, which made the AdamW kernel 3x slower.
CXXFLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-std=c++17", "-shared", "-fPIC", "-w")


class BuildError(RuntimeError):
    """A handler library cannot be built here; the message says why."""


def build_dir() -> Path:
    return Path(os.environ.get(EXT_CACHE_ENV, "~/.cache/jaxtrain/ext")).expanduser()


def _cpu_id() -> str:
    """The CPU's model and feature flags (Linux), or the platform's machine name elsewhere."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        import platform
        return platform.machine() + platform.processor()
    return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))


def _plan(source: Path, name: str, extra_flags: Sequence[str]) -> tuple[Path, list[str]]:
    """The library's cached path and its compile command (without ``-o``)."""
    include = jax.ffi.include_dir()
    flags = [*CXXFLAGS, f"-I{include}"]
    # -march=native: the build is for this CPU, so the CPU is part of the key; the headers next to the
    # source (the ones it can include) are part of it too.
    headers = b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))
    key = hashlib.sha256(source.read_bytes() + headers + _jaxlib_version.__version__.encode() + include.encode()
                         + " ".join([*flags, *extra_flags]).encode() + _cpu_id().encode()).hexdigest()[:16]
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    return build_dir() / f"{name}-{key}.so", [compiler or "", *flags, str(source), *extra_flags]


# Builds started by start() and not yet collected: the library's path -> (compiler process, temporary file)
_running: dict[Path, tuple[subprocess.Popen, str]] = {}


def _launch(out: Path, cmd: list[str], what: str) -> None:
    if not cmd[0]:
        raise BuildError(f"no C++ compiler found (set CXX or install g++) to build {what}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
    except OSError as e:
        raise BuildError(f"cannot write {what} to {out.parent} ({e}); set {EXT_CACHE_ENV} to a writable "
                         "directory") from None
    proc = subprocess.Popen([*cmd, "-o", tmp], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _running[out] = (proc, tmp)


def start(source: Path, name: str, *, what: str, extra_flags: Sequence[str] = ()) -> None:
    """Begin compiling ``source`` in the background, if it is not built yet; :func:`compile_library` collects it.

    For a process that has other work to do first (a command line reading its
    corpus): the compiler runs meanwhile. Problems are left for
    :func:`compile_library` to report.
    """
    out, cmd = _plan(source, name, extra_flags)
    if out.exists() or out in _running:
        return
    try:
        _launch(out, cmd, what)
    except BuildError:
        pass


def compile_library(source: Path, name: str, *, what: str, extra_flags: Sequence[str] = ()) -> Path:
    """``source`` (which may include the ``.h`` files next to it) compiled against jaxlib's FFI headers into ``name-<key>.so``; the cached file if it exists.

    ``extra_flags`` (include and library paths, libraries) come after the source
    on the command line and are part of the key; ``what`` names the library in
    errors. Waits for a build :func:`start` began. Raises :class:`BuildError`.
    """
    out, cmd = _plan(source, name, extra_flags)
    if out.exists() and out not in _running:
        return out
    if out not in _running:
        _launch(out, cmd, what)
    proc, tmp = _running.pop(out)
    _, stderr = proc.communicate()
    if proc.returncode != 0:
        os.unlink(tmp)
        raise BuildError(f"compiling {source.name} failed ({' '.join([*cmd, '-o', tmp])}):\n{stderr[-2000:]}")
    os.replace(tmp, out)  # concurrent processes never load a half-written file
    return out
