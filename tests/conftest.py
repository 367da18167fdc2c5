"""Test harness: CPU only, with 8 fake devices for sharding tests.

XLA_FLAGS must be set before jax is imported anywhere in the process. The
folders mirror the package: ``core/`` (what research code imports), ``app/``
(the command line's modules), ``cpu/`` (the opt-in CPU backend) and ``e2e/``
(whole runs in subprocesses). Tests marked ``slow`` are left out of the fast
tier, ``python -m pytest -m "not slow"``.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmark_modules, for every test folder


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _backend_registrations_restored():
    """Whatever a test registers with ``jaxtrain.ops`` / ``jaxtrain.optim`` (a run's ``backend=auto``
    enables the CPU backend process-wide) is undone after it, so no test sees another's backend."""
    from jaxtrain import ops, optim

    before_ops, before_update = ops.registered(), optim.registered_update()
    yield
    if ops.registered() != before_ops:
        for name in set(ops.registered()) - set(before_ops):
            ops.unregister(name)
        for name, impl in before_ops.items():
            ops.register(name, impl)
    if optim.registered_update() is not before_update:
        optim.register_update(before_update)
