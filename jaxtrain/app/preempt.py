"""What stops a run early: preemption signals and runs of non-finite steps.

Preemption. Inside :class:`StopSignals`, the first SIGTERM (what schedulers send
before killing a job) or SIGINT (Ctrl-C) only sets a flag; the loop finishes the
step in flight, saves a checkpoint and raises :class:`Preempted`, and the command
line exits with :data:`PREEMPTED_EXIT_CODE` (75, ``EX_TEMPFAIL`` in sysexits.h:
"temporary failure, run again"). Running the same command again resumes. A second
Ctrl-C exits at once with status 130 and no new checkpoint (a half-written one is
ignored on resume).

Non-finite steps. ``train_step`` already skips an update whose loss or gradient
norm is NaN/Inf (the state stays as it was) and reports ``nonfinite=1``.
:class:`NonFiniteWatch` counts consecutive skips; after ``train.max_nonfinite``
of them the loop calls :func:`diagnose_nonfinite` (recomputes the first skipped
step's gradient once, to name the first non-finite parameter) and raises
:class:`NonFiniteError` (exit code 1).

Only the standard library is imported at module level: the command line catches
these exceptions before it imports JAX.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any, Optional

PyTree = Any

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped cleanly after a checkpoint; run the command again to resume
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT: a second Ctrl-C, stopped at once
TERMINATED_EXIT_CODE = 128 + signal.SIGTERM  # 143: SIGTERM outside the steps; nothing new to save


class RunStopped(Exception):
    """A run ended early on purpose: the message is one line for the user, ``exit_code`` is for the shell."""

    exit_code = 1


class Preempted(RunStopped):
    """Training stopped on SIGTERM / SIGINT after saving a checkpoint (exit code 75)."""

    exit_code = PREEMPTED_EXIT_CODE


class Terminated(RunStopped):
    """SIGTERM / SIGINT arrived while the final checkpoint was being written: it was completed first,
    then the run stops (exit code 143, as for a SIGTERM after training ends: nothing is lost)."""

    exit_code = TERMINATED_EXIT_CODE


class NonFiniteError(RunStopped, ArithmeticError):
    """``train.max_nonfinite`` consecutive non-finite steps; the message names the step and a parameter."""

    exit_code = 1


class StopSignals:
    """Turn SIGTERM / SIGINT into a polite stop request while the ``with`` block runs.

    Example::

        with StopSignals() as stop:
            for step in ...:
                state, metrics = train_step(state, batch)
                if stop.requested:            # "SIGTERM" / "SIGINT" / None
                    save(...)
                    raise Preempted(...)

    A second SIGINT ends the process at once (``os._exit(130)``: no cleanup, no
    checkpoint); a second SIGTERM is ignored (the stop is already under way).
    The previous handlers come back on exit. Outside the main thread, where
    Python cannot install handlers, this does nothing.
    """

    _SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested: Optional[str] = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self._SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is None:
            self.requested = name
            print(f"\n{name} received: finishing the current step, saving a checkpoint, then exiting "
                  f"(exit code {PREEMPTED_EXIT_CODE}); press Ctrl-C again to stop at once",
                  file=sys.stderr, flush=True)
        elif signum == signal.SIGINT:
            print(f"\nsecond interrupt: exiting now without a checkpoint (exit code {INTERRUPTED_EXIT_CODE})",
                  file=sys.stderr, flush=True)
            os._exit(INTERRUPTED_EXIT_CODE)


def stop_agreed(stop: StopSignals, *, at_sync_point: bool) -> bool:
    """Whether to stop now: this process's request, or, with several processes, anyone's.

    A signal reaches each process of a multi-host run at its own moment, but they
    must all save the same step (the save is collective). So with more than one
    process the flags are combined, by one tiny all-gather, only at
    ``at_sync_point`` steps, which every process must pass at the same steps
    (the loop's log / checkpoint steps); elsewhere the answer is False.
    """
    if stop.requested is not None and _process_count() == 1:
        return True
    if _process_count() == 1 or not at_sync_point:
        return False
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.int32(stop.requested is not None))))


def _process_count() -> int:
    import jax

    return jax.process_count()


class NonFiniteWatch:
    """Counts consecutive non-finite (skipped) steps.

    ``update(step, nonfinite)`` returns True once ``limit`` consecutive steps were
    non-finite; ``first_step`` is then the first step of that streak.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.consecutive = 0
        self.first_step: Optional[int] = None

    def update(self, step: int, nonfinite: bool) -> bool:
        if not nonfinite:
            self.consecutive, self.first_step = 0, None
            return False
        if self.consecutive == 0:
            self.first_step = step
        self.consecutive += 1
        return self.consecutive >= self.limit

    def update_all(self, first_step: int, flags) -> bool:
        """:meth:`update` for steps ``first_step, first_step + 1, ...``; stops at the first hit."""
        return any(self.update(first_step + i, bool(f)) for i, f in enumerate(flags))


def path_str(path) -> str:
    """A pytree key path as ``"h.0.attn.c_attn.kernel"``.

    Dict keys, attribute names (namedtuples, dataclasses) and sequence indices all
    print as their bare name, so Orbax's saved tree (where namedtuples become
    dicts) and a live pytree give the same strings.
    """
    return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def nonfinite_leaves(tree: PyTree) -> tuple[list[str], int]:
    """``(paths of the leaves holding NaN/Inf, in tree order; number of leaves)``.

    Each leaf is reduced to one flag where it lives, so only scalars reach the
    host (works for sharded and multi-host arrays).
    """
    import jax

    paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    flags = jax.device_get(jax.tree.leaves(_finite_flags(tree)))
    return [p for p, ok in zip(paths, flags) if not ok], len(paths)


def _finite_flags(tree: PyTree) -> PyTree:
    import jax
    import jax.numpy as jnp

    return jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), tree)


def diagnose_nonfinite(state, batch, step: int, *, loss_fn=None, grad_accum: int = 1, compute_dtype=None) -> str:
    """Recompute one step's loss and gradient and say what is non-finite.

    Args:
      state: a TrainState holding the params that step saw (a skipped step leaves
        them unchanged, so the state after a streak of skips does).
      batch: that step's batch (placed like the training batches).
      step: that step's index, i.e. ``state.step`` when it ran (its dropout key is
        ``fold_in(state.rng, step)``, as in ``train_step``).
    Returns:
      e.g. ``"loss=nan; gradient non-finite in 16 of 16 parameters, first:
      h.0.attn.c_attn.bias"`` ("first" in the params' pytree order). Compiles
      one gradient computation; meant to run once, when the run stops.
    """
    import jax

    from jaxtrain.losses import lm_loss

    loss, flags = jax.device_get(_loss_and_flags(state, batch, step, loss_fn or lm_loss, grad_accum, compute_dtype))
    paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]]
    bad = [p for p, ok in zip(paths, jax.tree.leaves(flags)) if not ok]
    text = f"loss={float(loss):.6g}; "
    if not bad:
        return text + "every parameter gradient is finite on recomputation"
    return text + f"gradient non-finite in {len(bad)} of {len(paths)} parameters, first: {bad[0]}"


def _loss_and_flags(state, batch, step, loss_fn, grad_accum, compute_dtype):
    """``(loss, per-parameter "gradient is finite" flags)``, jitted once per static setting."""
    import jax

    from jaxtrain.step import accumulate_grads  # exactly the gradient train_step computes

    def f(state, batch, step):
        rng = jax.random.fold_in(state.rng, step)
        loss, _, _, grads = accumulate_grads(state, batch, rng, loss_fn, grad_accum, compute_dtype, None)
        return loss, _finite_flags(grads)

    return jax.jit(f)(state, batch, step)
