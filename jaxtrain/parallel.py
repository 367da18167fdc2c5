"""Many devices and many hosts: the mesh, shardings, ``jax.distributed`` and batch placement.

One 2-D mesh with axes ``("data", "fsdp")`` covers every layout:

- ``data``: pure data parallel. Params are replicated; the global batch is split.
- ``fsdp``: params and optimizer state are sharded along their largest dimension
  divisible by the axis size (ZeRO-3 style); XLA gathers them for the matmuls.

The global batch is always split over both axes together, so every device gets
``train.batch_size / (data * fsdp)`` rows. ``train_step`` is the same pure
function in every layout: under ``jax.jit`` with the shardings below, XLA inserts
the gradient all-reduce (and the FSDP all-gathers / reduce-scatters) itself.

Typical use (what the run loop does)::

    initialize(cfg.parallel)                 # before anything touches devices
    mesh = make_mesh(cfg.parallel)
    check_batch(cfg.train.batch_size, cfg.train.grad_accum, mesh)
    state, state_sh = init_state(lambda: make_state(cfg), mesh)
    step = jit_train_step(functools.partial(train_step, grad_accum=cfg.train.grad_accum), mesh, state_sh)
    batch = place_batch(get_batch(..., process_index=jax.process_index(),
                                  process_count=jax.process_count()), mesh)
    state, metrics = step(state, batch)

Multi-host: every process runs the same program on its own slice of the global
batch (rows ``[p * B / P, (p + 1) * B / P)`` for process ``p`` of ``P``). Every
process must dispatch the same computations that span processes, in the same
order and from one thread: cross-process collectives (gloo on CPU, NCCL on GPU)
are matched by the order in which they are issued, and two orders deadlock. Only
side effects such as writing files are restricted to process 0
(:func:`is_main_process`).

That is why :func:`place_batch` uses ``jax.make_array_from_process_local_data``
(local copies only) and never ``jax.device_put(host_array, global_sharding)``:
in a multi-process run the latter first checks that every process passed the
same data with a cross-process all-gather. Called from a prefetch thread, that
all-gather races with the training step's collectives on the main thread, and
the processes can issue them in opposite orders: with 2 processes x 2 CPU
devices the run hangs after the first step.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import threading
from typing import Any, Callable, Optional

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxtrain.errors import ConfigError

PyTree = Any
# The parallel settings: any object with the fields of the command line's ``parallel`` section
# (``data``, ``fsdp``, ``coordinator_address``, ``num_processes``, ``process_id``,
# ``local_device_count``), e.g. ``jaxtrain.app.config.ParallelConfig``.
ParallelConfig = Any

DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)  # the leading batch axis is split over both mesh axes

# Environment variables read when the config leaves a field unset. JAX itself
# reads JAX_COORDINATOR_ADDRESS (and, via its cluster detection, SLURM / Open MPI
# / Kubernetes variables); the process count and id have no JAX-standard name,
# so these two are jaxtrain's.
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"

# Launchers whose environment JAX's own cluster detection understands, with the
# variable that holds the number of tasks started together: more than one ->
# multi-process. For SLURM this is the srun step's count, not SLURM_NTASKS, which
# an sbatch script also sees when it runs a single python without srun.
_LAUNCHER_WORLD_SIZE = ("SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE")


# ---------------------------------------------------------------- processes


def _env_int(name: str) -> Optional[int]:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} must be an integer") from None


def _launched_multi_process() -> bool:
    """True under a launcher (SLURM, Open MPI) that started more than one task."""
    return any((_env_int(v) or 1) > 1 for v in _LAUNCHER_WORLD_SIZE)


def distributed_args(pcfg: ParallelConfig) -> Optional[dict]:
    """The ``jax.distributed.initialize`` arguments this config and environment ask for.

    Config fields win over ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
    ``JAX_PROCESS_ID``; a field left ``None`` is filled by JAX's cluster
    auto-detection (e.g. SLURM's ``SLURM_NTASKS`` / ``SLURM_PROCID`` under
    ``srun``). Returns None for a single-process run (nothing set, no launcher
    that started several tasks).
    """
    args = dict(
        coordinator_address=pcfg.coordinator_address or os.environ.get(ENV_COORDINATOR) or None,
        num_processes=pcfg.num_processes if pcfg.num_processes is not None else _env_int(ENV_NUM_PROCESSES),
        process_id=pcfg.process_id if pcfg.process_id is not None else _env_int(ENV_PROCESS_ID),
    )
    if all(v is None for v in args.values()) and not _launched_multi_process():
        return None
    if args["num_processes"] == 1 and args["coordinator_address"] is None:
        return None  # explicitly one process, nothing to coordinate
    n, i = args["num_processes"], args["process_id"]
    if n is not None and n < 1:
        raise ConfigError(f"parallel.num_processes={n}: must be a positive integer")
    if i is not None and n is not None and not 0 <= i < n:
        raise ConfigError(f"parallel.process_id={i}: must be in [0, parallel.num_processes={n})")
    return args


def initialize(pcfg: ParallelConfig) -> None:
    """Set up devices and, for a multi-process run, ``jax.distributed``. Call it first.

    - ``pcfg.local_device_count`` (CPU only): this process gets that many CPU
      devices (``jax_num_cpu_devices``); must happen before any JAX operation.
    - Multi-process (see :func:`distributed_args`): ``jax.distributed.initialize``.
      On CPU, cross-process collectives go through gloo.

    A single process without ``local_device_count`` is a no-op. Calling it again
    is a no-op (idempotent). ``jax.distributed.initialize`` replaces the SIGTERM
    handler; the one that was there before comes back (see :func:`_keep_sigterm`).
    Raises:
      ConfigError: bad process numbers, or JAX already running computations
        when a setting that must precede them is requested.
    """
    args = distributed_args(pcfg)
    if args is not None and jax.distributed.is_initialized():
        return
    if pcfg.local_device_count is not None:
        _set_cpu_device_count(pcfg.local_device_count)
    if args is None:
        return
    try:
        with _keep_sigterm():
            jax.distributed.initialize(**args)
    except RuntimeError as e:
        raise ConfigError("jax.distributed.initialize failed (call jaxtrain.parallel.initialize before "
                          f"any JAX operation): {str(e).splitlines()[0]}") from None
    except ValueError as e:  # e.g. a field missing and no launcher detected
        raise ConfigError(f"multi-process setup incomplete ({', '.join(f'{k}={v}' for k, v in args.items())}): "
                          f"{str(e).splitlines()[0]}; set parallel.coordinator_address, parallel.num_processes "
                          f"and parallel.process_id (or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, "
                          f"{ENV_PROCESS_ID})") from None


@contextlib.contextmanager
def _keep_sigterm():
    """Put back the Python SIGTERM handler that was there before the ``with`` block.

    ``jax.distributed.initialize`` installs a C-level SIGTERM handler (its
    preemption notifier) that only records the signal, so a multi-process run
    told to stop while it compiles would keep running until SIGKILL. jaxtrain
    handles SIGTERM itself: before the loop the command line stops at once
    (:func:`jaxtrain.run.main`), inside it :class:`jaxtrain.signals.StopSignals`
    finishes the step, agrees on it across processes, checkpoints and exits.
    """
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _set_cpu_device_count(n: int) -> None:
    if n < 1:
        raise ConfigError(f"parallel.local_device_count={n}: must be a positive integer")
    if jax.config.jax_num_cpu_devices == n:
        return
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
        raise ConfigError(f"parallel.local_device_count={n} must be set before JAX starts; "
                          f"JAX is already running with {jax.local_device_count()} local devices") from None


def is_main_process() -> bool:
    """True on process 0: the one that writes logs, plots and samples."""
    return jax.process_index() == 0


# ---------------------------------------------------------------- mesh


def mesh_shape(pcfg: ParallelConfig, n_devices: int) -> tuple[int, int]:
    """``(data, fsdp)`` for ``n_devices``; ``data=-1`` takes all devices fsdp leaves.

    Raises:
      ConfigError: the mesh does not use exactly ``n_devices``.
    """
    fsdp = pcfg.fsdp
    if fsdp < 1 or n_devices % fsdp:
        raise ConfigError(f"parallel.fsdp={fsdp} must divide the {n_devices} available devices")
    data = n_devices // fsdp if pcfg.data == -1 else pcfg.data
    if data < 1 or data * fsdp != n_devices:
        raise ConfigError(f"parallel.data={pcfg.data} x parallel.fsdp={fsdp} = {data * fsdp} devices, "
                          f"but {n_devices} are available; use parallel.data=-1 to take all devices")
    return data, fsdp


def make_mesh(pcfg: ParallelConfig, devices: Optional[list] = None) -> Mesh:
    """A ``("data", "fsdp")`` mesh over ``devices`` (default: all devices of all processes).

    Axes use ``AxisType.Auto``: shardings are propagated by XLA (jax.make_mesh
    defaults to Explicit, which would make every unplaced array an error).
    Devices are ordered by process, so process ``p`` holds a contiguous block of
    the batch (rows ``[p * B / P, (p + 1) * B / P)``) and ``fsdp`` (the minor
    axis) stays within a host when it divides the host's device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    devices.sort(key=lambda d: (d.process_index, d.id))
    shape = mesh_shape(pcfg, len(devices))
    return jax.make_mesh(shape, BATCH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


# ---------------------------------------------------------------- shardings


def param_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """Shard the largest dimension divisible by ``fsdp`` over the fsdp axis, else replicate.

    Ties go to the earlier dimension. ``fsdp == 1``, scalars and arrays with no
    divisible dimension are replicated.
    """
    if fsdp == 1 or not shape:
        return P()
    candidates = [(size, -axis) for axis, size in enumerate(shape) if size % fsdp == 0]
    if not candidates:
        return P()
    axis = -max(candidates)[1]
    return P(*([None] * axis + [FSDP]))


def state_shardings(mesh: Mesh, abstract_state: PyTree) -> PyTree:
    """A pytree of ``NamedSharding`` matching ``abstract_state`` (e.g. a :class:`TrainState`).

    Every array leaf (params, optimizer moments) follows :func:`param_spec` with
    the mesh's fsdp size; scalars (step, counts, hyper-parameters) and the rng
    key are replicated. Leaves may be arrays or ``jax.ShapeDtypeStruct``.
    """
    fsdp = mesh.shape[FSDP]
    return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(tuple(x.shape), fsdp)), abstract_state)


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device (metrics, scalars)."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``("data", "fsdp")``; other axes whole."""
    return NamedSharding(mesh, P(BATCH_AXES))


# ---------------------------------------------------------------- batches


def check_batch(batch_size: int, grad_accum: int, mesh: Mesh) -> None:
    """Raise :class:`ConfigError` unless the global batch splits evenly.

    ``train.batch_size`` (global: all devices, all hosts) must be divisible by
    ``n_devices * train.grad_accum``, where ``n_devices = data * fsdp``: each of
    the ``grad_accum`` microbatches then gives every device the same whole number
    of rows, ``per_device = batch_size / (n_devices * grad_accum)``. It must also
    divide by the process count (each process loads ``batch_size / P`` rows),
    which follows from the first rule since every process must own the same
    number of devices (also checked here).
    """
    owned = collections.Counter(d.process_index for d in mesh.devices.flat)
    if len(set(owned.values())) > 1:
        raise ConfigError("the processes own different numbers of devices ("
                          + ", ".join(f"process {p}: {c}" for p, c in sorted(owned.items()))
                          + "); every process must bring the same number (parallel.local_device_count on CPU, "
                          "the GPUs visible to each process)")
    b, a, n = batch_size, grad_accum, mesh.size
    k = n * a
    if b % k:
        near = " or ".join(str(x) for x in ((b // k) * k, (b // k + 1) * k) if x > 0)
        raise ConfigError(
            f"train.batch_size={b} must be divisible by devices x grad_accum = {n} x {a} = {k} "
            f"(mesh data={mesh.shape[DATA]} x fsdp={mesh.shape[FSDP]}); e.g. train.batch_size={near}")
    if b % jax.process_count():
        raise ConfigError(f"train.batch_size={b} must be divisible by the {jax.process_count()} processes")


def local_batch_size(global_batch: int) -> int:
    """Rows this process loads: ``global_batch / process_count``."""
    return global_batch // jax.process_count()


def place_batch(local_batch: PyTree, mesh: Mesh) -> PyTree:
    """Global ``jax.Array``s from this process's rows of the batch.

    ``local_batch``: a pytree of host arrays ``[B / P, ...]`` (this process's
    contiguous block of the global batch, as :func:`jaxtrain.data.get_batch`
    returns with ``process_index`` / ``process_count``). Returns arrays of
    shape ``[B, ...]`` sharded by :func:`batch_sharding`; no data moves between
    hosts. Single-process, this is a sharded ``device_put``.
    """
    sharding = batch_sharding(mesh)
    p = jax.process_count()

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(sharding, x, (x.shape[0] * p, *x.shape[1:]))

    return jax.tree.map(put, local_batch)


# ---------------------------------------------------------------- state and step


def init_state(make_state: Callable[[], PyTree], mesh: Mesh) -> tuple[PyTree, PyTree]:
    """``(state, shardings)``: ``make_state()`` run under jit straight into its shardings.

    Each device materialises only its own shard (nothing is built whole on one
    device first); every process must call it with the same seed.
    """
    shardings = state_shardings(mesh, jax.eval_shape(make_state))
    return jax.jit(make_state, out_shardings=shardings)(), shardings


def jit_train_step(step_fn: Callable, mesh: Mesh, state_sharding: PyTree, *, donate: bool = True) -> Callable:
    """``jax.jit(step_fn)`` with the state's and batch's shardings; metrics replicated.

    ``step_fn(state, batch) -> (state, metrics)``, e.g. ``functools.partial(
    train_step, grad_accum=4)`` (no ``axis_name``: under jit XLA inserts the
    collectives). Replicated metrics can be read on every process.
    """
    return jax.jit(step_fn, in_shardings=(state_sharding, batch_sharding(mesh)),
                   out_shardings=(state_sharding, replicated(mesh)),
                   donate_argnums=(0,) if donate else ())


def jit_eval_step(eval_fn: Callable, mesh: Mesh, state_sharding: PyTree) -> Callable:
    """``jax.jit(eval_fn)`` for ``eval_fn(state, batch) -> metrics``; metrics replicated."""
    return jax.jit(eval_fn, in_shardings=(state_sharding, batch_sharding(mesh)), out_shardings=replicated(mesh))


# ---------------------------------------------------------------- agreement between processes


def together(fn: Callable, *args, user_errors: tuple = (ConfigError,)):
    """``fn(*args)`` in every process, or an error in every process when it raised in any of them.

    Each process runs ``fn`` on its own, then all exchange one small array (their
    error, if any) before anything collective follows, so a process that failed
    never leaves the others waiting for it until JAX's coordination timeout. The
    others raise a :class:`ConfigError` quoting the failed process's first line when
    its error was one of ``user_errors``, else a ``RuntimeError``.
    """
    error, out = None, None
    try:
        out = fn(*args)
    except Exception as e:  # noqa: BLE001 - re-raised below, in this process and (quoted) in the others
        error = e
    if jax.process_count() > 1:
        failed = _gather_errors(error, user_errors)
        if error is None and failed:
            p, user, text = failed[0]
            raise (ConfigError if user else RuntimeError)(f"process {p} stopped during setup: {text}")
    if error is not None:
        raise error
    return out


_ERROR_BYTES = 512  # of each process's error message that the others quote


def _gather_errors(error: Optional[BaseException], user_errors: tuple) -> list[tuple[int, bool, str]]:
    """``[(process, is_user_error, message)]`` of every process that failed; collective."""
    from jax.experimental import multihost_utils

    if len(set(collections.Counter(d.process_index for d in jax.devices()).values())) > 1:
        return []  # an all-gather needs equal device counts; every process fails check_batch anyway
    row = np.zeros(2 + _ERROR_BYTES, np.int32)
    if error is not None:
        text = (str(error).splitlines() or [type(error).__name__])[0].encode()[:_ERROR_BYTES]
        row[0], row[1] = 1, isinstance(error, user_errors)
        row[2:2 + len(text)] = np.frombuffer(text, np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(row)).reshape(-1, row.size)
    return [(p, bool(r[1]), bytes(r[2:].astype(np.uint8)).rstrip(b"\0").decode(errors="replace"))
            for p, r in enumerate(rows) if r[0]]

