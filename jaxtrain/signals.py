"""What stops a run early: preemption signals and runs of non-finite steps.

Preemption. Inside :class:`StopSignals`, the first SIGTERM (what schedulers send
before killing a job) or SIGINT (Ctrl-C) only sets a flag; the loop finishes the
step in flight, saves a checkpoint and raises :class:`Preempted`, and the command
line exits with :data:`PREEMPTED_EXIT_CODE` (75, ``EX_TEMPFAIL`` in sysexits.h:
"temporary failure, run again"). Running the same command again resumes. A second
Ctrl-C exits at once with status 130 and no checkpoint (the half-written one, if
any, is ignored on resume).

Non-finite steps. ``train_step`` already skips an update whose loss or gradient
norm is NaN/Inf and reports ``nonfinite=1``. :class:`NonFiniteWatch` counts
consecutive skips; after ``train.max_nonfinite`` of them the loop calls
:func:`diagnose_nonfinite` (recomputes the first skipped step's gradient once to
name the first non-finite parameter) and raises :class:`NonFiniteError`.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any, Optional

import jax
import numpy as np

from jaxtrain.checkpoint import path_str

PyTree = Any

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped cleanly after a checkpoint; rerun the command to resume
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT: second Ctrl-C, stopped at once without a checkpoint
NONFINITE_EXIT_CODE = 1


class Preempted(Exception):
    """Training stopped on a signal after saving a checkpoint; ``exit_code`` is 75."""

    exit_code = PREEMPTED_EXIT_CODE


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps; the message names the step and a parameter."""

    exit_code = NONFINITE_EXIT_CODE


class StopSignals:
    """Turn SIGTERM / SIGINT into a polite stop request while the block runs.

    Example::

        with StopSignals() as stop:
            for step in ...:
                state, metrics = train_step(state, batch)
                if stop.requested:
                    save(...); raise Preempted(...)

    ``requested`` is the signal's name (``"SIGTERM"`` / ``"SIGINT"``) or None. A
    second SIGINT ends the process immediately (``os._exit(130)``); a second
    SIGTERM is ignored (the stop is already under way). Previous handlers are
    restored on exit. Outside the main thread (where Python cannot install
    handlers) this does nothing.
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
                  f"(exit code {PREEMPTED_EXIT_CODE}); press Ctrl-C again to exit at once", file=sys.stderr, flush=True)
        elif signum == signal.SIGINT:
            print(f"\nsecond interrupt: exiting now without a checkpoint (exit code {INTERRUPTED_EXIT_CODE})",
                  file=sys.stderr, flush=True)
            os._exit(INTERRUPTED_EXIT_CODE)


class NonFiniteWatch:
    """Counts consecutive non-finite (skipped) steps.

    ``update(step, nonfinite)`` returns True once ``limit`` consecutive steps
    were non-finite; ``first_step`` is the first step of that run of skips.
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


def nonfinite_leaves(tree: PyTree) -> tuple[list[str], int]:
    """``(paths of leaves holding NaN/Inf in tree order, number of leaves)``, checked on the host."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    bad = [path_str(p) for p, x in flat if not np.all(np.isfinite(np.asarray(jax.device_get(x))))]
    return bad, len(flat)


def diagnose_nonfinite(state, batch, step: int, *, loss_fn=None, grad_accum: int = 1, compute_dtype=None) -> str:
    """Recompute step ``step``'s loss and gradient once and say what went non-finite.

    ``state`` must hold the params the step saw (a skipped step leaves them
    unchanged, so the state after a run of skips does); ``batch`` is that step's
    batch. Returns e.g. ``"loss=nan; gradient non-finite in 16 of 16 parameters,
    first: h.0.attn.c_attn.bias"``. Slow (unjitted by design: it runs once, at
    the stop).
    """
    from jaxtrain.step import _accumulate, lm_loss  # the gradient train_step computes

    rng = jax.random.fold_in(state.rng, step)
    loss, _, _, grads = _accumulate(state, batch, rng, loss_fn or lm_loss, grad_accum, compute_dtype, None)
    bad, total = nonfinite_leaves(grads)
    text = f"loss={float(loss):.6g}; "
    if not bad:
        return text + "every parameter gradient is finite on recomputation"
    return text + f"gradient non-finite in {len(bad)} of {total} parameters, first: {bad[0]}"
