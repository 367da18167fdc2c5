"""jaxtrain.cpu.process.keep_freed_memory: XLA's per-execution scratch memory is reused, not page-faulted in again."""

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow  # whole runs in subprocesses: the full suite, not the fast tier

# A jitted function whose scratch buffer is ~128 MB (32k pages): each call allocates and frees it.
# The products are thin, so a call takes milliseconds. With the setting on, the heap still grows by a
# scratch buffer now and then while it settles (measured: in up to 10 of the first 30 calls, rarely
# later, to 0.5-1.5 GB), so the probe warms up for 30 calls and reports the median of the next 15.
PROBE = """
    import resource, sys
    from jaxtrain.cpu import process as perf
    applied = perf.keep_freed_memory() if sys.argv[1] == "on" else False
    import jax, jax.numpy as jnp
    x, v = jnp.ones((4096, 4096)), jnp.ones((4096, 8))  # 64 MB, 128 kB

    @jax.jit
    def f(x, v):
        y = jnp.sin(x) * 2.0            # 64 MB temporaries, each a matmul operand XLA must write out
        return jnp.sum(jnp.cos(y) @ v) + jnp.sum(jnp.exp(y) @ v)

    for _ in range(30):
        f(x, v).block_until_ready()
    faults = []
    for _ in range(15):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        f(x, v).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(applied, sorted(faults)[len(faults) // 2])  # the median call
"""


def _faults_per_call(mode: str, env: dict | None = None) -> tuple[str, int]:
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(PROBE), mode], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", **(env or {})})
    assert r.returncode == 0, r.stderr
    applied, faults = r.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_scratch_memory_is_reused_instead_of_faulted_in_each_call():
    applied, kept = _faults_per_call("on")
    _, default = _faults_per_call("off")
    assert applied == "True"
    # Default malloc maps the scratch buffer afresh in every call: >= 64 MB of new pages (16k faults).
    assert default > 16_000, default
    assert kept < default / 10, (kept, default)


def test_can_be_turned_off():
    applied, _ = _faults_per_call("on", {"JAXTRAIN_MALLOC": "off"})
    assert applied == "False"
