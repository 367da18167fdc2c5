"""Float32 matrix products on CPU through an optimised BLAS (Intel MKL), as XLA FFI calls.

On the CPUs this library is developed on, XLA:CPU's own dots reach ~70% of
MKL's sgemm on a GPT's shapes, and its batched attention dots 25-50%
(``benchmarks/RESULTS.md``). :func:`matmul` runs ``op(a) @ op(b)`` (``op`` an
optional transpose of the last two axes, any number of leading batch axes)
as one ``cblas_sgemm`` / ``cblas_sgemm_batch_strided`` call inside the
jitted program, through a small C++ FFI handler (``_cpu_kernels.cc``). It is
differentiable (reverse mode: every gradient is again such a call, with the
transposes passed to BLAS as flags instead of being materialised; higher
orders differentiate ``jnp.matmul``, see :func:`with_reference_jvp`).

Where it applies by default: float32 operands in a process with one CPU
device. Everywhere else (GPUs, bfloat16, several devices, where sharded
operands would be gathered into each custom call) :func:`matmul` is the plain
``jnp.matmul``, and so it is when the BLAS path is unavailable: no MKL, no C++
compiler, or ``JAXTRAIN_BLAS=off``. :func:`status` and :func:`why_not` say why.
The same handler library holds the fused attention, GELU and LayerNorm
kernels of :mod:`jaxtrain.cpu.kernels`, which run under the same conditions.

Set-up, once: MKL comes from PyPI (``pip install mkl``; the ``cpu`` extra of
this package pulls it in); the handler is compiled on first use with the
system's ``c++`` against the FFI headers that ship with jaxlib (~9 s) and
cached in ``~/.cache/jaxtrain/ext`` (``$JAXTRAIN_EXT_CACHE`` overrides).
``JAXTRAIN_BLAS`` may also name a CBLAS shared library to use instead of MKL
(with the 32-bit-integer LP64 interface; it must export ``cblas_sgemm``, and
``cblas_sgemm_batch_strided`` is used when present).

Threads: with MKL a 2-D product is split into one band of rows (or columns)
per thread of XLA's intra-op pool, each an sgemm made single-threaded with
``MKL_Set_Num_Threads_Local``: the pool's threads are already awake, and two
products XLA runs side by side share the cores instead of each starting its
own threads (3.5% faster GPT steps than MKL's own threads, measured alternating
in one process; ``benchmarks/RESULTS.md``). Batched products and other BLAS
libraries use the library's own threads (one per core; ``MKL_NUM_THREADS``
overrides), which sleep as soon as a product ends (``KMP_BLOCKTIME=0`` unless
set) so that they leave the cores to XLA's threads in between.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import os
from pathlib import Path
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from jaxtrain.cpu import build

__all__ = ["matmul", "status", "enabled", "why_not", "resolve", "describe", "BLAS_ENV"]

BLAS_ENV = "JAXTRAIN_BLAS"
EXT_CACHE_ENV = build.EXT_CACHE_ENV
_TARGET = "jaxtrain_blas_gemm"
# FFI target -> handler symbol in _cpu_kernels.cc (the fused kernels are used by jaxtrain.cpu.kernels)
_HANDLERS = {
    _TARGET: "JaxtrainGemm",
    "jaxtrain_attention_fwd": "JaxtrainAttentionFwd",
    "jaxtrain_attention_bwd": "JaxtrainAttentionBwd",
    "jaxtrain_gelu_fwd": "JaxtrainGeluFwd",
    "jaxtrain_gelu_bwd": "JaxtrainGeluBwd",
    "jaxtrain_layer_norm_fwd": "JaxtrainLayerNormFwd",
    "jaxtrain_layer_norm_bwd": "JaxtrainLayerNormBwd",
    "jaxtrain_adamw": "JaxtrainAdamW",
}
_SOURCE = Path(__file__).with_name("_cpu_kernels.cc")


class _Unavailable(RuntimeError):
    pass


def _find_mkl() -> Path:
    """``libmkl_rt`` from the ``mkl`` wheel (installed under ``sys.prefix/lib``)."""
    try:
        files = importlib.metadata.files("mkl") or []
    except importlib.metadata.PackageNotFoundError:
        raise _Unavailable("MKL is not installed (pip install mkl, or pip install 'jaxtrain[cpu]')") from None
    for f in files:
        if f.name.startswith("libmkl_rt.so"):
            path = Path(f.locate()).resolve()
            if path.exists():
                return path
    raise _Unavailable("the mkl package is installed but has no libmkl_rt.so")


def _turned_off() -> bool:
    return os.environ.get(BLAS_ENV, "").strip().lower() in ("off", "0", "false", "none", "xla")


def prebuild() -> None:
    """Start compiling the handler library in the background if it is not built yet (:func:`build.start`)."""
    if not _turned_off():
        build.start(_SOURCE, "cpu_kernels", what="the BLAS handler")


def _compile_handler() -> Path:
    """The FFI handler as a shared library, compiled once per source and jaxlib version."""
    try:
        return build.compile_library(_SOURCE, "cpu_kernels", what="the BLAS handler")
    except build.BuildError as e:
        raise _Unavailable(str(e)) from None


def _load_blas() -> tuple[ctypes.CDLL, str]:
    choice = os.environ.get(BLAS_ENV, "").strip()
    if choice and choice.lower() not in ("mkl", "on", "1", "auto"):
        path = Path(choice).expanduser()
        if not path.exists():
            raise _Unavailable(f"{BLAS_ENV}={choice!r} is neither 'off', 'mkl' nor an existing shared library")
    else:
        path = _find_mkl()
    try:
        lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        raise _Unavailable(f"cannot load {path}: {e}") from None
    # MKL's OpenMP threads would otherwise spin for 200 ms after each product and
    # take the cores from XLA's own threads (read when MKL first starts threads).
    os.environ.setdefault("KMP_BLOCKTIME", "0")
    return lib, str(path)


def _setup() -> str:
    """Load the BLAS, build and register the handler; the BLAS path on success, else raise _Unavailable."""
    if _turned_off():
        raise _Unavailable(f"turned off by {BLAS_ENV}")
    blas, blas_path = _load_blas()
    try:
        sgemm = ctypes.cast(blas.cblas_sgemm, ctypes.c_void_p)
    except AttributeError:
        raise _Unavailable(f"{blas_path} exports no cblas_sgemm") from None
    batched = ctypes.cast(getattr(blas, "cblas_sgemm_batch_strided", None) or 0, ctypes.c_void_p)
    # MKL's per-thread thread count lets the fused kernels run one single-threaded
    # BLAS call per pool thread; without it they run their blocks one after another.
    threads_local = ctypes.cast(getattr(blas, "MKL_Set_Num_Threads_Local", None) or 0, ctypes.c_void_p)
    handler = ctypes.CDLL(str(_compile_handler()))
    handler.jaxtrain_gemm_set(sgemm, batched, threads_local)
    for target, symbol in _HANDLERS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(handler, symbol)), platform="cpu")
    return blas_path


@functools.cache
def status() -> tuple[bool, str]:
    """``(True, path of the BLAS)`` if the BLAS path can run here, else ``(False, why not)``.

    Decided once per process (the first call loads the BLAS and may compile the handler).
    """
    if jax.default_backend() != "cpu":
        return False, f"the default backend is {jax.default_backend()}, not cpu"
    try:
        return True, _setup()
    except _Unavailable as e:
        return False, str(e)


def why_not(*arrays: jax.Array, devices: bool = False) -> Optional[str]:
    """None if :func:`matmul` can run these operands on the BLAS path, else the reason it cannot.

    ``devices=True`` also requires a process with one device, as the default
    (``use_blas=None``) does: under a multi-device sharding XLA would gather
    the operands of a custom call onto every device.
    """
    dtypes = {str(jnp.result_type(a)) for a in arrays}
    if dtypes - {"float32"}:
        return f"the BLAS matmul takes float32 operands, not {', '.join(sorted(dtypes - {'float32'}))}"
    if devices and jax.device_count() != 1:
        return f"the BLAS path runs each product on one device and this process has {jax.device_count()}"
    ok, why = status()
    return None if ok else why


def enabled(*arrays: jax.Array) -> bool:
    """Whether :func:`matmul` on these operands takes the BLAS path by default (``use_blas=None``)."""
    return why_not(*arrays, devices=True) is None


def resolve(use_blas: Optional[bool], *arrays: jax.Array, setting: str = "use_blas=True") -> bool:
    """``use_blas`` made definite for these operands: None means :func:`enabled`; True when the
    BLAS path cannot run raises ``RuntimeError`` naming ``setting`` and the reason."""
    if use_blas is None:
        return enabled(*arrays)
    if use_blas and (why := why_not(*arrays)) is not None:
        raise RuntimeError(f"{setting} but the BLAS path cannot run: {why}")
    return bool(use_blas)


def describe(dtype: str = "float32") -> str:
    """Which library runs a model's matmuls by default in this process, for a run's header line."""
    why = why_not(jnp.zeros((), dtype), devices=True)
    if why is not None:
        return f"XLA ({why})"
    return "MKL" if "mkl" in status()[1].lower() else f"BLAS ({status()[1]})"


def with_reference_jvp(kernel: Callable, reference: Callable) -> Callable:
    """``kernel`` (FFI calls, which JAX cannot differentiate) with the derivatives of ``reference``.

    ``reference`` is the same function of the same arrays in plain JAX. The
    values stay the kernel's; forward-mode derivatives come from
    ``jax.jvp(reference)``, and with them every higher-order derivative of the
    kernels' custom VJPs (``jax.grad`` of a gradient, Hessian-vector products).
    Plain evaluation and first-order gradients never trace ``reference``.
    """
    fn = jax.custom_jvp(kernel)

    def jvp(primals, tangents):
        return kernel(*primals), jax.jvp(reference, primals, tangents)[1]

    fn.defjvp(jvp)
    return fn


def _plain_matmul(a, b, transpose_a: bool, transpose_b: bool):
    return (jnp.swapaxes(a, -1, -2) if transpose_a else a) @ (jnp.swapaxes(b, -1, -2) if transpose_b else b)


def _ffi_matmul(a, b, transpose_a: bool, transpose_b: bool):
    m = a.shape[-1] if transpose_a else a.shape[-2]
    n = b.shape[-2] if transpose_b else b.shape[-1]
    out = jax.ShapeDtypeStruct(a.shape[:-2] + (m, n), jnp.float32)
    call = jax.ffi.ffi_call(_TARGET, out, vmap_method="broadcast_all")
    kernel = functools.partial(call, trans_a=transpose_a, trans_b=transpose_b)
    reference = functools.partial(_plain_matmul, transpose_a=transpose_a, transpose_b=transpose_b)
    return with_reference_jvp(kernel, reference)(a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _blas_matmul(a, b, transpose_a, transpose_b):
    return _ffi_matmul(a, b, transpose_a, transpose_b)


def _blas_matmul_fwd(a, b, transpose_a, transpose_b):
    return _ffi_matmul(a, b, transpose_a, transpose_b), (a, b)


def _blas_matmul_bwd(transpose_a, transpose_b, res, g):
    # C = op_a(A) op_b(B); every cotangent is again one product with the transposes as flags.
    a, b = res
    if transpose_a:  # dA = (G op_b(B)^T)^T = op_b(B) G^T
        da = _ffi_matmul(b, g, transpose_b, True)
    else:  # dA = G op_b(B)^T
        da = _ffi_matmul(g, b, False, not transpose_b)
    if transpose_b:  # dB = (op_a(A)^T G)^T = G^T op_a(A)
        db = _ffi_matmul(g, a, True, transpose_a)
    else:  # dB = op_a(A)^T G
        db = _ffi_matmul(a, g, not transpose_a, False)
    return da, db


_blas_matmul.defvjp(_blas_matmul_fwd, _blas_matmul_bwd)


def matmul(a: jax.Array, b: jax.Array, *, transpose_a: bool = False, transpose_b: bool = False,
           use_blas: Optional[bool] = None) -> jax.Array:
    """``op(a) @ op(b)`` over the last two axes, with equal leading (batch) axes.

    Args:
      a, b: arrays of equal rank >= 2 with the same leading shape.
      transpose_a, transpose_b: use the operand's last two axes transposed.
      use_blas: None picks the BLAS path when :func:`enabled`; False forces
        ``jnp.matmul``; True requires the BLAS path and raises ``RuntimeError``
        saying why (:func:`why_not`) if it cannot run. True also applies with
        several devices, where sharded operands are gathered for each product.
    """
    if a.ndim < 2 or a.ndim != b.ndim or a.shape[:-2] != b.shape[:-2]:
        raise ValueError(f"matmul needs operands of equal rank >= 2 with equal batch axes, got {a.shape} and {b.shape}")
    k_a = a.shape[-2] if transpose_a else a.shape[-1]
    k_b = b.shape[-1] if transpose_b else b.shape[-2]
    if k_a != k_b:
        raise ValueError(f"matmul contraction sizes differ: {a.shape} (transpose_a={transpose_a}) and "
                         f"{b.shape} (transpose_b={transpose_b})")
    if resolve(use_blas, a, b):
        return _blas_matmul(a, b, transpose_a, transpose_b)
    return _plain_matmul(a, b, transpose_a, transpose_b)
