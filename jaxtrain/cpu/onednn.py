"""Bfloat16 matrix products on CPU through oneDNN, as XLA FFI calls: float32 matmuls at bfloat16 precision.

XLA:CPU ignores ``jax.default_matmul_precision``: a float32 product always runs
in float32. On CPUs with AVX512-BF16 (AMD Zen 4 and later, Intel Cooper Lake and
Sapphire Rapids and later) oneDNN's bfloat16 matmul runs faster than any
float32 one: the default model's training step is 1.61x faster on a 2-core Zen 4
(``benchmarks/bench_bf16.py``, ``benchmarks/RESULTS.md``). :func:`matmul` rounds both
float32 operands to bfloat16 (round to nearest even, in XLA, where the rounding
fuses into whatever produced them), multiplies them with float32 accumulation
and returns float32: one bfloat16 pass, what ``jax.default_matmul_precision
("bfloat16")`` asks for on accelerators and ``torch.set_float32_matmul_precision
("medium")`` in PyTorch. Its gradients are again such products.

The backend (:mod:`jaxtrain.cpu.ops`) uses it for ``dense`` and ``matmul`` when
the trace runs under ``jax.default_matmul_precision("bfloat16")`` (or
``"BF16_BF16_F32"``) and :func:`status` says it can run: oneDNN from PyPI (the
``cpu`` extra: ``onednn-cpu-gomp`` and its headers, ``onednn-devel-cpu-gomp``), a
C++ compiler, and a CPU with AVX512-BF16 or AMX. Anywhere else the products stay
float32. ``JAXTRAIN_ONEDNN=off`` turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import os
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp

from jaxtrain.cpu import blas, build

__all__ = ["matmul", "status", "requested", "prebuild", "ONEDNN_ENV", "PRECISIONS"]

ONEDNN_ENV = "JAXTRAIN_ONEDNN"
# jax.default_matmul_precision values that ask for one bfloat16 pass with float32 accumulation
PRECISIONS = ("bfloat16", "BF16_BF16_F32")
_TARGET = "jaxtrain_bf16_gemm"
_SOURCE = Path(__file__).with_name("_onednn_gemm.cc")
_RUNTIME, _HEADERS = "onednn-cpu-gomp", "onednn-devel-cpu-gomp"


class _Unavailable(RuntimeError):
    pass


def _package_file(dist: str, suffix: str) -> Path:
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise _Unavailable(f"{dist} is not installed (pip install {dist}, or pip install 'jaxtrain[cpu]')") from None
    for f in files:
        if str(f).endswith(suffix):
            path = Path(f.locate()).resolve()
            if path.exists():
                return path
    raise _Unavailable(f"the {dist} package has no {suffix}")


def _cpu_has_bf16() -> bool:
    try:
        flags = " ".join(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
    except OSError:
        return False
    return any(f" {f}" in flags for f in ("avx512_bf16", "amx_bf16"))


def _build_inputs() -> tuple[Path, tuple[str, ...]]:
    """libdnnl and the handler's extra compile flags; raises _Unavailable where it cannot run."""
    if os.environ.get(ONEDNN_ENV, "").strip().lower() in ("off", "0", "false", "none"):
        raise _Unavailable(f"turned off by {ONEDNN_ENV}")
    if not _cpu_has_bf16():
        raise _Unavailable("this CPU has neither AVX512-BF16 nor AMX, so bfloat16 products would be no faster")
    library = _package_file(_RUNTIME, "libdnnl.so.3")
    include = _package_file(_HEADERS, "oneapi/dnnl/dnnl.hpp").parent.parent.parent
    return library, (f"-I{include}", "-fopenmp", str(library), f"-Wl,-rpath,{library.parent}")


def prebuild() -> None:
    """Start compiling the handler in the background where it could run and is not built yet."""
    try:
        _, flags = _build_inputs()
    except _Unavailable:
        return
    build.start(_SOURCE, "onednn_gemm", what="the oneDNN handler", extra_flags=flags)


def _setup() -> str:
    library, flags = _build_inputs()
    if jax.default_backend() != "cpu":
        raise _Unavailable(f"the default backend is {jax.default_backend()}, not cpu")
    try:
        ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
        path = build.compile_library(_SOURCE, "onednn_gemm", what="the oneDNN handler", extra_flags=flags)
        handler = ctypes.CDLL(str(path))
    except build.BuildError as e:
        raise _Unavailable(str(e)) from None
    except OSError as e:
        raise _Unavailable(f"cannot load oneDNN ({e})") from None
    jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(handler.JaxtrainBf16Gemm), platform="cpu")
    return str(library)


@functools.cache
def status() -> tuple[bool, str]:
    """``(True, path of libdnnl)`` if bfloat16 products can run here, else ``(False, why not)``; decided once."""
    try:
        return True, _setup()
    except _Unavailable as e:
        return False, str(e)


def requested() -> bool:
    """True while tracing under ``jax.default_matmul_precision("bfloat16")`` (or ``"BF16_BF16_F32"``)."""
    return jax.config.jax_default_matmul_precision in PRECISIONS


def why_not(*arrays: jax.Array) -> Optional[str]:
    """None if :func:`matmul` can take these operands, else why not."""
    ok, why = status()
    if not ok:
        return why
    if any(a.dtype != jnp.float32 or a.ndim != 2 for a in arrays):
        return "the bfloat16 products take 2-D float32 operands"
    return None


def _call(a_bf16, b_bf16, transpose_a: bool, transpose_b: bool) -> jax.Array:
    m = a_bf16.shape[1] if transpose_a else a_bf16.shape[0]
    n = b_bf16.shape[0] if transpose_b else b_bf16.shape[1]
    call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((m, n), jnp.float32), vmap_method="sequential")
    return call(a_bf16, b_bf16, trans_a=transpose_a, trans_b=transpose_b)


def _reference(a, b, transpose_a: bool, transpose_b: bool):
    a, b = (x.astype(jnp.bfloat16) for x in (a, b))
    return jnp.dot(a.T if transpose_a else a, b.T if transpose_b else b, preferred_element_type=jnp.float32)


def _product(a16, b16, transpose_a: bool, transpose_b: bool) -> jax.Array:
    """The FFI product of bfloat16 operands, with the derivatives of the same product in XLA."""
    kernel = functools.partial(_call, transpose_a=transpose_a, transpose_b=transpose_b)
    reference = functools.partial(_reference, transpose_a=transpose_a, transpose_b=transpose_b)
    return blas.with_reference_jvp(kernel, reference)(a16, b16)


def _forward(a, b, transpose_a, transpose_b):
    a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
    return _product(a16, b16, transpose_a, transpose_b), (a16, b16)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul(a, b, transpose_a, transpose_b):
    return _forward(a, b, transpose_a, transpose_b)[0]


def _matmul_fwd(a, b, transpose_a, transpose_b):
    return _forward(a, b, transpose_a, transpose_b)  # the residuals are the bfloat16 operands: half the memory


def _matmul_bwd(transpose_a, transpose_b, res, g):
    a16, b16 = res
    g16 = g.astype(jnp.bfloat16)
    if transpose_a:  # C = A^T op(B): dA = op(B) G^T
        da = _product(b16, g16, transpose_b, True)
    else:  # dA = G op(B)^T
        da = _product(g16, b16, False, not transpose_b)
    if transpose_b:  # C = op(A) B^T: dB = G^T op(A)
        db = _product(g16, a16, True, transpose_a)
    else:  # dB = op(A)^T G
        db = _product(a16, g16, not transpose_a, False)
    return da, db


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def matmul(a: jax.Array, b: jax.Array, *, transpose_a: bool = False, transpose_b: bool = False) -> jax.Array:
    """``op(a) @ op(b)`` for 2-D float32 ``a``, ``b``: operands rounded to bfloat16, float32 accumulation and result.

    Raises ``RuntimeError`` saying why when the oneDNN path cannot run here
    (:func:`status`); :mod:`jaxtrain.cpu.ops` checks first and falls back to
    float32 products.
    """
    if (why := why_not(a, b)) is not None:
        raise RuntimeError(f"jaxtrain.cpu.onednn.matmul cannot run: {why}")
    k_a = a.shape[0] if transpose_a else a.shape[1]
    k_b = b.shape[1] if transpose_b else b.shape[0]
    if k_a != k_b:
        raise ValueError(f"matmul contraction sizes differ: {a.shape} (transpose_a={transpose_a}) and "
                         f"{b.shape} (transpose_b={transpose_b})")
    return _matmul(a, b, transpose_a, transpose_b)
