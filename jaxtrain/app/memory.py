"""Does the run fit? The compiled steps' memory plan against what the devices (or the machine) have.

The loop compiles its steps ahead of time, and XLA's plan for a compiled
program says how many bytes each device needs for its arguments (the state and
the batch), temporaries and outputs. :func:`check_fits` compares the largest of
those with the device's memory (``memory_stats()["bytes_limit"]`` on GPUs and
TPUs; on CPU, where every device shares the host, ``MemAvailable`` from
``/proc/meminfo`` divided among the local devices) and raises a one-line
:class:`ConfigError` before anything is written when it does not fit.

A kernel called through XLA's FFI (the CPU backend's fused attention) keeps its
own scratch out of XLA's plan and trades memory for time: such a step's plan
stays small at any sequence length while the step itself may never finish. So
with the CPU kernels on, the loop also checks the forward pass compiled with
plain XLA ops (:func:`jaxtrain.app.loop.setup`), which counts attention's
``B x N x T x T`` scores.

Example::

    train = jitted.lower(state, batch).compile()
    check_fits(train)                 # ConfigError: "... needs 1.28 TB per device, 120 GB available ..."
    available_text()                  # "; 139.8 GB available per device" for the header
"""

from __future__ import annotations

from typing import Optional

import jax

from jaxtrain.app.config import ConfigError

SHRINK = ("train.batch_size", "model.block_size", "model.n_embd", "model.n_layer")


def needed_bytes(compiled) -> Optional[int]:
    """Bytes one device needs to run ``compiled`` (arguments + temporaries + outputs, donated buffers
    counted once); None where XLA gives no memory analysis."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)


def available_bytes() -> Optional[tuple[int, str]]:
    """``(bytes one local device may use, where the figure comes from)``, or None when unknown."""
    devices = jax.local_devices()
    if devices[0].platform == "cpu":
        avail = _meminfo_available()
        if avail is None:
            return None
        return avail // len(devices), (f"MemAvailable in /proc/meminfo shared by {len(devices)} CPU devices"
                                       if len(devices) > 1 else "MemAvailable in /proc/meminfo")
    limits = []
    for d in devices:
        try:
            stats = d.memory_stats() or {}
        except Exception:  # noqa: BLE001 - unsupported on this platform
            stats = {}
        if "bytes_limit" in stats:
            limits.append(int(stats["bytes_limit"]))
    if not limits:
        return None
    return min(limits), f"bytes_limit of {devices[0].device_kind}"


def _meminfo_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def size(n: float) -> str:
    """Bytes for people: ``"6.7 MB"``, ``"1.28 TB"``."""
    for unit, scale in (("TB", 2**40), ("GB", 2**30), ("MB", 2**20)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n / 2**10:.1f} KB"


def check_fits(*compiled, what: str = "one training step") -> None:
    """Raise :class:`ConfigError` when the largest of the ``compiled`` programs (None entries are
    skipped) needs more memory per device than :func:`available_bytes`; silent when either is unknown.
    ``what`` names the programs in the message."""
    needs = [n for n in (needed_bytes(c) for c in compiled if c is not None) if n is not None]
    have = available_bytes()
    if not needs or have is None:
        return
    need, (avail, where) = max(needs), have
    if need > avail:
        raise ConfigError(f"this config needs {size(need)} of memory per device for {what} but "
                          f"{size(avail)} is available ({where}); shrink {', '.join(SHRINK)}, raise "
                          "train.grad_accum or parallel.fsdp, or set train.memory_check=false to try anyway")


def available_text() -> str:
    """``" of 139.80 GB available"`` for the header's step-memory figure ("" when unknown)."""
    have = available_bytes()
    return "" if have is None else f"; {size(have[0])} available per device"
