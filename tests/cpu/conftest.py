"""The CPU backend's tests: the backend is registered for every test here and removed afterwards.

This process has 8 fake devices, where the backend declines by default (a custom
call would gather sharded operands); :func:`all_devices` turns that off for the
tests that run a model through it here. One-device behaviour is tested in
subprocesses.
"""

import pytest

import jaxtrain.cpu as cpu_backend


@pytest.fixture(autouse=True, scope="module")
def backend_registered():
    cpu_backend.enable()
    yield
    cpu_backend.disable()


@pytest.fixture
def all_devices():
    """The backend's kernels also in this 8-device process, for one test."""
    cpu_backend.enable(all_devices=True)
    yield
    cpu_backend.enable(all_devices=False)
