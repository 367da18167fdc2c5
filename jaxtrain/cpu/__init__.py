"""The opt-in CPU backend: MKL matmuls, fused attention / GELU / LayerNorm and a fused clip + AdamW.

Nothing here is imported by the core. Research code turns it on with one call::

    import jaxtrain.cpu
    jaxtrain.cpu.enable()          # registers with jaxtrain.ops and jaxtrain.optim

and the command line does so itself (``backend=auto``, the default) where it can
run. It takes float32 work in a process with one CPU device and leaves
everything else (bfloat16, several devices, GPUs) to plain XLA, op by op. It
needs Intel MKL (``pip install -e ".[cpu]"``) and a C++ compiler: the kernels
in ``_cpu_kernels.cc`` are compiled on first use and cached. The results are
the plain ops' and optax's to float rounding.

- :mod:`jaxtrain.cpu.blas`: MKL sgemm as an XLA FFI call; builds and loads the kernels.
- :mod:`jaxtrain.cpu.kernels`: fused causal attention, bias + GELU, LayerNorm.
- :mod:`jaxtrain.cpu.adamw`: ``make_optimizer``'s clip + AdamW in one in-place pass per parameter.
- :mod:`jaxtrain.cpu.ops`: the implementations registered with :mod:`jaxtrain.ops`.
- :mod:`jaxtrain.cpu.process`: glibc ``malloc`` settings for XLA:CPU's scratch memory.
"""

from __future__ import annotations

__all__ = ["enable", "disable", "is_enabled", "status", "describe"]

_enabled = False


def status() -> tuple[bool, str]:
    """``(True, path of the BLAS)`` if the kernels can run in this process, else ``(False, why not)``."""
    from jaxtrain.cpu import blas

    return blas.status()


def enable(*, require: bool = False, all_devices: bool = False) -> bool:
    """Register the CPU implementations with :mod:`jaxtrain.ops` and the fused AdamW with
    :mod:`jaxtrain.optim`; True if the kernels can run here.

    Where they cannot (no MKL, no compiler, not a CPU backend, ``JAXTRAIN_BLAS=off``)
    nothing is registered and False is returned, or with ``require=True`` a
    ``RuntimeError`` says why. The kernels take float32 work in a process with one
    device; ``all_devices=True`` runs them with several too (each call then gathers
    its operands onto every device: for tests, or one-device work in a
    multi-device process). Registering clears JAX's in-memory compilation caches,
    so jitted functions trace again with the kernels.
    """
    global _enabled
    from jaxtrain import ops, optim
    from jaxtrain.cpu import adamw, blas
    from jaxtrain.cpu import ops as cpu_ops

    ok, why = blas.status()
    if not ok:
        if require:
            raise RuntimeError(f"the CPU backend cannot run here: {why}")
        return False
    if cpu_ops.all_devices() != all_devices:
        cpu_ops.set_all_devices(all_devices)
        _clear_caches()
    for name, impl in cpu_ops.IMPLEMENTATIONS.items():
        ops.register(name, impl)
    optim.register_update(adamw.fused_update)
    _enabled = True
    return True


def disable() -> None:
    """Back to plain XLA ops and optax's update; clears JAX's in-memory compilation caches, so jitted
    steps trace again without the kernels."""
    global _enabled
    from jaxtrain import ops, optim
    from jaxtrain.cpu import adamw
    from jaxtrain.cpu import ops as cpu_ops

    for name in cpu_ops.IMPLEMENTATIONS:
        if ops.registered().get(name) is cpu_ops.IMPLEMENTATIONS[name]:
            ops.unregister(name)
    if optim.registered_update() is adamw.fused_update:
        optim.register_update(None)
    cpu_ops.set_all_devices(False)
    _enabled = False


def _clear_caches() -> None:
    import jax

    jax.clear_caches()


def prebuild(*, bfloat16: bool = False) -> None:
    """Start compiling the kernels (and with ``bfloat16`` the oneDNN handler) in background processes, if
    they are not built yet, so that a process with other work first (reading a corpus) does not wait for
    the compiler later. :func:`enable` collects them. Call it before JAX starts its threads."""
    from jaxtrain.cpu import blas, onednn

    blas.prebuild()
    if bfloat16:
        onednn.prebuild()


def is_enabled() -> bool:
    return _enabled


def describe(dtype: str = "float32", precision: str = "float32") -> str:
    """What runs a ``dtype`` model's matmuls in this process at ``precision`` (``float32`` | ``bfloat16``, as
    ``jax.default_matmul_precision``), for a run's header: ``MKL``, ``oneDNN bfloat16`` or ``XLA (why)``."""
    from jaxtrain.cpu import blas, onednn

    if not _enabled:
        ok, why = blas.status()
        return "XLA (the CPU backend is not enabled)" if ok else f"XLA ({why})"
    words = blas.describe(dtype)
    if precision in onednn.PRECISIONS and dtype == "float32" and not words.startswith("XLA"):
        ok, why = onednn.status()
        return "oneDNN bfloat16 (float32 accumulation)" if ok else f"{words} float32 (not bfloat16: {why})"
    return words
