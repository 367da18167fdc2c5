"""The profiler window: ``log.profile_steps`` steps from ``log.profile_start`` traced with ``jax.profiler``.

The trace goes to ``run_dir/tb/plugins/profile/<time>/``, where TensorBoard's
profile plugin finds it (``tensorboard --logdir run_dir/tb``, the Profile tab,
with ``pip install tensorboard-plugin-profile``). The window closes after its
last step has finished on the device (one wait, inside the window only); a run
that ends or stops inside the window closes it then. A resumed run past the
window traces nothing. Only process 0 traces.
"""

from __future__ import annotations

from pathlib import Path

import jax


class Window:
    """Start the trace before step ``start`` runs, stop it after step ``start + steps - 1``."""

    def __init__(self, start: int, steps: int, log_dir: Path, *, enabled: bool = True):
        self.first, self.last = start, start + steps - 1
        self.log_dir = Path(log_dir)
        self.enabled = enabled and steps > 0
        self.active = False

    def before(self, step: int) -> None:
        """Call before dispatching step ``step`` (the 0-based index of its batch)."""
        if self.enabled and not self.active and self.first <= step <= self.last:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.log_dir))
            self.active = True

    def after(self, step: int, state) -> None:
        """Call after dispatching step ``step``; closes the window after its last step."""
        if self.active and step >= self.last:
            jax.block_until_ready(state)
            self.close()

    def close(self) -> None:
        if self.active:
            self.active = False
            jax.profiler.stop_trace()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
