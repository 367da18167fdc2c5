"""Bfloat16 matmuls through oneDNN: XLA's bfloat16 product exactly, its gradients, where the backend uses them."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtrain import OptimConfig, TrainState, make_optimizer, ops, train_step
from jaxtrain.cpu import onednn
from jaxtrain.models import Llama, LlamaConfig

ON, WHY = onednn.status()
needs_onednn = pytest.mark.skipif(not ON, reason=f"oneDNN bfloat16 path unavailable here: {WHY}")
ROOT = Path(__file__).resolve().parents[2]


def _bf16_cpu() -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "avx512_bf16" in flags or "amx_bf16" in flags


def test_onednn_is_available_where_the_cpu_has_bfloat16():
    # The test install (pip install -e ".[test]") includes oneDNN; on a CPU with bfloat16 dot products a
    # silent fallback would leave the tests below skipped and the default run at float32 speed.
    if not _bf16_cpu():
        assert not ON and "AVX512-BF16" in WHY
    else:
        assert ON, WHY
        assert "libdnnl" in WHY


def _operands(m, k, n, ta, tb, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((k, m) if ta else (m, k)).astype(np.float32)
    b = rng.standard_normal((n, k) if tb else (k, n)).astype(np.float32)
    return jnp.asarray(a), jnp.asarray(b)


def _bf16_product(a, b):  # XLA's product of bfloat16-rounded operands, float32 accumulation
    return jnp.dot(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), preferred_element_type=jnp.float32)


@needs_onednn
@pytest.mark.parametrize("ta,tb", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("m,k,n", [(37, 19, 23), (300, 64, 40), (16, 1000, 600)])
def test_values_and_gradients_are_the_bfloat16_product(m, k, n, ta, tb):
    a, b = _operands(m, k, n, ta, tb)
    op = lambda x, t: x.T if t else x  # noqa: E731
    g = jnp.asarray(np.random.default_rng(1).standard_normal((m, n)), jnp.float32)

    c, vjp = jax.vjp(lambda a, b: onednn.matmul(a, b, transpose_a=ta, transpose_b=tb), a, b)
    da, db = vjp(g)
    assert c.dtype == jnp.float32 and c.shape == (m, n)
    # bfloat16 inputs are exact in float32, so only the summation order differs from XLA's
    np.testing.assert_allclose(c, _bf16_product(op(a, ta), op(b, tb)), rtol=1e-5, atol=1e-5 * np.sqrt(k))
    # the gradients are again one bfloat16 pass: G (rounded) against the rounded operands
    da_ref = _bf16_product(g, op(b, tb).T)
    db_ref = _bf16_product(op(a, ta).T, g)
    np.testing.assert_allclose(da, da_ref.T if ta else da_ref, rtol=1e-5, atol=1e-5 * np.sqrt(n))
    np.testing.assert_allclose(db, db_ref.T if tb else db_ref, rtol=1e-5, atol=1e-5 * np.sqrt(m))
    # and within bfloat16's rounding of the float32 product
    exact = np.asarray(op(a, ta), np.float64) @ np.asarray(op(b, tb), np.float64)
    assert np.abs(np.asarray(c) - exact).max() < 2 ** -7 * np.sqrt(k) * 3


@needs_onednn
def test_second_order_gradients_run_within_bfloat16_rounding():
    a, b = _operands(8, 16, 12, False, False)

    def grad_norm(matmul):
        g = jax.grad(lambda a: jnp.sum(matmul(a, b) ** 2))
        return jax.grad(lambda a: jnp.sum(g(a) ** 2))(a)

    exact = grad_norm(jnp.matmul)
    assert np.abs(grad_norm(onednn.matmul) - exact).max() < 0.02 * np.abs(exact).max()


def test_operands_it_cannot_take_raise_with_the_reason():
    with pytest.raises(RuntimeError, match="2-D float32" if ON else "cannot run"):
        onednn.matmul(jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5)))
    if ON:
        with pytest.raises(ValueError, match="contraction sizes differ"):
            onednn.matmul(jnp.ones((3, 4)), jnp.ones((5, 6)))


def _llama_step(precision):
    cfg = LlamaConfig(vocab_size=128, block_size=32, n_layer=2, n_head=2, n_embd=32, mlp_hidden=64,
                      tie_embeddings=True)
    state = TrainState.create(Llama(cfg, rngs=nnx.Rngs(0)), make_optimizer(OptimConfig(lr=1e-3), total_steps=10),
                              rng=0)
    x = np.random.default_rng(0).integers(0, 128, (4, 33))
    batch = {"inputs": jnp.asarray(x[:, :-1], jnp.int32), "targets": jnp.asarray(x[:, 1:], jnp.int32)}
    with jax.default_matmul_precision(precision):
        lowered = jax.jit(train_step).lower(state, batch)
        hlo = lowered.as_text()
        _, metrics = lowered.compile()(state, batch)
    return hlo, metrics


@needs_onednn
def test_the_backend_takes_the_bfloat16_path_only_when_the_trace_asks_for_it(all_devices):
    assert "dense" in ops.registered()
    hlo16, m16 = _llama_step("bfloat16")
    hlo32, m32 = _llama_step(None)
    # every product, forward and backward (3 each), is a oneDNN call: per layer q/k/v (one product), o, gate,
    # up and down; then the tied head
    assert hlo16.count("jaxtrain_bf16_gemm") == 3 * (2 * (2 + 3) + 1), hlo16.count("jaxtrain_bf16_gemm")
    assert "jaxtrain_bf16_gemm" not in hlo32 and "jaxtrain_blas_gemm" in hlo32
    # the same step to bfloat16's rounding: loss and gradient norm within 1%
    for key in ("loss", "grad_norm"):
        assert abs(float(m16[key]) - float(m32[key])) < 1e-2 * abs(float(m32[key])), key
    assert float(m16["loss"]) != float(m32["loss"])  # it did round


def _python(code, env):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", **env}, cwd=ROOT, timeout=300)


def test_turned_off_it_says_so_and_the_step_stays_float32():
    r = _python("""
        import jax, jax.numpy as jnp
        import jaxtrain.cpu as cpu
        from jaxtrain.cpu import onednn
        print(onednn.status())
        cpu.enable()
        print(cpu.describe("float32", precision="bfloat16"))
        from jaxtrain import ops
        with jax.default_matmul_precision("bfloat16"):
            hlo = jax.jit(lambda x, w: ops.dense(x, w)).lower(jnp.ones((4, 8)), jnp.ones((8, 3))).as_text()
        print("bf16 gemm" if "jaxtrain_bf16_gemm" in hlo else "float32 gemm")
    """, {"JAXTRAIN_ONEDNN": "off"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "(False, 'turned off by JAXTRAIN_ONEDNN')"
    assert lines[1] == "MKL float32 (not bfloat16: turned off by JAXTRAIN_ONEDNN)"
    assert lines[2] == "float32 gemm"


@needs_onednn
@pytest.mark.slow
def test_cli_run_with_bfloat16_matmuls_names_them_and_learns(tmp_path):
    r = subprocess.run([sys.executable, "-m", "jaxtrain.run", "--config", str(ROOT / "jaxtrain" / "configs" / "tiny.yaml"),
                        f"run_dir={tmp_path / 'run'}", "log.progress=false", "train.matmul_precision=bfloat16"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600,
                       env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    header = next(line for line in r.stdout.splitlines() if line.startswith("run_dir "))
    assert "| matmuls oneDNN bfloat16 (float32 accumulation) |" in header, header
    done = next(line for line in r.stdout.splitlines() if line.startswith("done: 40 steps"))
    val, baseline = (float(done.split(key)[1].split()[0].rstrip("),")) for key in ("final val loss ", "baseline "))
    assert val < baseline - 0.3, done  # as the float32 run (tests/cpu/test_blas.py)
