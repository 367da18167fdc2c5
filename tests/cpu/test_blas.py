"""The BLAS (MKL) matmul path: same values and gradients as XLA's dots, used where it applies, clear errors where not."""

import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxtrain.cpu as cpu_backend
from flax import nnx

from jaxtrain import TrainState, make_optimizer, train_step
from jaxtrain.cpu import blas
from jaxtrain import OptimConfig
from jaxtrain.models import GPT, GPTConfig

ON, WHY = blas.status()
needs_blas = pytest.mark.skipif(not ON, reason=f"BLAS path unavailable here: {WHY}")

TRANSPOSES = [(False, False), (False, True), (True, False), (True, True)]


def _operands(batch, m, k, n, ta, tb, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((*batch, *((k, m) if ta else (m, k)))).astype(dtype)
    b = rng.standard_normal((*batch, *((n, k) if tb else (k, n)))).astype(dtype)
    return jnp.asarray(a), jnp.asarray(b)


def test_blas_is_available_where_tests_run():
    # The test install (pip install -e ".[test]") includes MKL; a silent fallback
    # would leave every other test here on the XLA path.
    assert ON, WHY
    assert "mkl" in WHY.lower()


@needs_blas
@pytest.mark.parametrize("batch", [(), (3,), (2, 3)])
@pytest.mark.parametrize("ta,tb", TRANSPOSES)
def test_matmul_matches_xla_values_and_gradients(batch, ta, tb):
    a, b = _operands(batch, 37, 19, 23, ta, tb)

    def loss(use_blas):
        def f(a, b):
            c = blas.matmul(a, b, transpose_a=ta, transpose_b=tb, use_blas=use_blas)
            return jnp.sum(jnp.sin(c)), c
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))

    (l1, c1), g1 = loss(True)(a, b)
    (l2, c2), g2 = loss(False)(a, b)
    assert c1.shape == c2.shape == (*batch, 37, 23)
    np.testing.assert_allclose(c1, c2, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(l1, l2, rtol=1e-5, atol=1e-4)
    for x, y in zip(g1, g2):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4)


@needs_blas
@pytest.mark.parametrize("m,k,n", [(300, 70, 45), (33, 129, 500), (1, 64, 1), (17, 5, 16)])
@pytest.mark.parametrize("ta,tb", TRANSPOSES)
def test_2d_products_split_over_the_thread_pool_match_numpy(m, k, n, ta, tb):
    # 2-D products run as bands of C's rows (m >= n) or columns, one per pool thread
    a, b = _operands((), m, k, n, ta, tb, seed=m + n)
    c = jax.jit(lambda a, b: blas.matmul(a, b, transpose_a=ta, transpose_b=tb, use_blas=True))(a, b)
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    expected = (a64.T if ta else a64) @ (b64.T if tb else b64)
    np.testing.assert_allclose(c, expected, rtol=1e-5, atol=1e-4 * np.sqrt(k))


@needs_blas
def test_matmul_is_a_blas_call_in_the_compiled_program():
    a, b = _operands((), 8, 4, 8, False, False)
    hlo = jax.jit(lambda a, b: blas.matmul(a, b, use_blas=True)).lower(a, b).as_text()
    assert "jaxtrain_blas_gemm" in hlo
    f = jax.value_and_grad(lambda a, b: blas.matmul(a, b, use_blas=True).sum(), (0, 1))
    grad_hlo = jax.jit(f).lower(a, b).as_text()
    assert grad_hlo.count("jaxtrain_blas_gemm") == 3  # forward, and one product per cotangent
    assert "dot_general" not in grad_hlo and "transpose" not in grad_hlo  # transposes are BLAS flags
    assert "jaxtrain_blas_gemm" not in jax.jit(lambda a, b: blas.matmul(a, b, use_blas=False)).lower(a, b).as_text()


@needs_blas
def test_empty_and_degenerate_shapes():
    mm = jax.jit(functools.partial(blas.matmul, use_blas=True))
    np.testing.assert_array_equal(mm(jnp.ones((5, 0)), jnp.ones((0, 3))), np.zeros((5, 3)))
    assert mm(jnp.ones((0, 4)), jnp.ones((4, 3))).shape == (0, 3)
    np.testing.assert_allclose(mm(jnp.full((1, 1), 2.0), jnp.full((1, 1), 3.0)), [[6.0]])


@needs_blas
def test_vmap_adds_a_batch_axis():
    a, b = _operands((4,), 6, 5, 7, False, True)
    f = jax.vmap(lambda x, y: blas.matmul(x, y, transpose_b=True, use_blas=True))
    assert "jaxtrain_blas_gemm" in jax.jit(f).lower(a, b).as_text()
    out = jax.jit(f)(a, b)
    np.testing.assert_allclose(out, jnp.einsum("bmk,bnk->bmn", a, b), rtol=1e-5, atol=1e-5)


def test_other_dtypes_take_the_xla_path_and_use_blas_true_says_why():
    a, b = _operands((), 4, 3, 2, False, False, dtype=np.float32)
    a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
    assert not blas.enabled(a16, b16)
    assert "jaxtrain_blas_gemm" not in jax.jit(blas.matmul).lower(a16, b16).as_text()
    np.testing.assert_allclose(blas.matmul(a16, b16).astype(jnp.float32), (a16 @ b16).astype(jnp.float32))
    with pytest.raises(RuntimeError, match="float32 operands, not bfloat16"):
        blas.matmul(a16, b16, use_blas=True)


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"contraction sizes differ: \(4, 3\)"):
        blas.matmul(jnp.ones((4, 3)), jnp.ones((4, 2)))
    with pytest.raises(ValueError, match="equal batch axes"):
        blas.matmul(jnp.ones((2, 4, 3)), jnp.ones((3, 3, 2)))
    with pytest.raises(ValueError, match="rank >= 2"):
        blas.matmul(jnp.ones((3,)), jnp.ones((3, 2)))


def _model(**kw):
    cfg = GPTConfig(vocab_size=61, block_size=16, n_layer=2, n_head=2, n_embd=32, **kw)
    return GPT(cfg, rngs=nnx.Rngs(0))


@needs_blas
@pytest.mark.parametrize("kw", [{}, {"bias": False, "tie_embeddings": False}, {"dropout": 0.1}])
@pytest.mark.slow
def test_gpt_train_steps_match_the_xla_path(kw):
    """Three AdamW steps of a GPT with MKL matmuls track the same steps with XLA's dots."""
    tx = make_optimizer(OptimConfig(lr=1e-2, schedule="constant", warmup_steps=0))
    x = np.random.default_rng(1).integers(0, 61, (3, 17))
    batch = {"inputs": jnp.asarray(x[:, :-1], jnp.int32), "targets": jnp.asarray(x[:, 1:], jnp.int32)}
    results = {}
    try:
        for matmul in ("blas", "xla"):
            if matmul == "blas":
                cpu_backend.enable(all_devices=True)  # this process has 8 devices
            else:
                cpu_backend.disable()
            state = TrainState.create(_model(**kw), tx, rng=0)
            step = jax.jit(train_step)
            hlo = step.lower(state, batch).as_text()
            assert ("jaxtrain_blas_gemm" in hlo) == (matmul == "blas")
            history = []
            for _ in range(3):
                state, m = step(state, batch)
                history.append((float(m["loss"]), float(m["grad_norm"])))
            results[matmul] = (history, jax.tree.leaves(state.params))
    finally:
        cpu_backend.enable()
    np.testing.assert_allclose(results["blas"][0], results["xla"][0], rtol=1e-5)
    # Adam divides by sqrt(v): a rounding-level gradient difference on a near-zero
    # gradient moves that parameter by up to ~lr, so compare at a tenth of lr.
    for p, q in zip(results["blas"][1], results["xla"][1]):
        np.testing.assert_allclose(p, q, atol=1e-3)


@needs_blas
@pytest.mark.slow
def test_gpt_takes_the_kernels_for_float32_on_one_device_and_xla_for_bfloat16(all_devices):
    tokens = jnp.zeros((1, 8), jnp.int32)
    hlo = nnx.jit(lambda m, t: m(t)).lower(_model(dtype="bfloat16"), tokens).as_text()
    assert "jaxtrain_" not in hlo  # the backend declines bfloat16 op by op
    code = """
        import jax, jax.numpy as jnp
        from flax import nnx
        import jaxtrain.cpu
        from jaxtrain.models import GPT, GPTConfig
        assert jaxtrain.cpu.enable()
        tokens = jnp.zeros((1, 8), jnp.int32)
        for dtype in ("float32", "bfloat16"):
            model = GPT(GPTConfig(vocab_size=61, block_size=16, n_layer=1, n_head=2, n_embd=32, dtype=dtype),
                        rngs=nnx.Rngs(0))
            hlo = nnx.jit(lambda m, t: m(t)).lower(model, tokens).as_text()
            targets = ("jaxtrain_blas_gemm", "jaxtrain_attention_fwd", "jaxtrain_gelu_fwd", "jaxtrain_layer_norm_fwd")
            print(dtype, *(hlo.count(t) for t in targets))
    """
    r = _python(code, {"XLA_FLAGS": ""})
    assert r.returncode == 0, r.stderr
    # float32, one layer: qkv, proj, fc, fc-proj and the tied head; the fused attention, bias + GELU
    # and three LayerNorms
    assert r.stdout.split() == ["float32", "5", "1", "1", "3", "bfloat16", "0", "0", "0", "0"]


def _python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", **env}, timeout=300)


def test_turned_off_or_missing_library_falls_back_with_the_reason():
    code = """
        import jax.numpy as jnp
        from jaxtrain.cpu import blas
        ok, why = blas.status()
        print(ok, why)
        assert not ok
        x = jnp.ones((4, 4))
        assert "jaxtrain_blas_gemm" not in __import__("jax").jit(blas.matmul).lower(x, x).as_text()
        try:
            blas.matmul(x, x, use_blas=True)
        except RuntimeError as e:
            print("error:", e)
    """
    off = _python(code, {"JAXTRAIN_BLAS": "off"})
    assert off.returncode == 0, off.stderr
    assert "turned off by JAXTRAIN_BLAS" in off.stdout and "error: use_blas=True" in off.stdout
    missing = _python(code, {"JAXTRAIN_BLAS": "/no/such/libblas.so"})
    assert missing.returncode == 0, missing.stderr
    assert "'/no/such/libblas.so' is neither 'off', 'mkl' nor an existing shared library" in missing.stdout


def test_auto_takes_the_blas_path_on_one_device_only():
    # The tests run with 8 fake devices: auto stays on XLA here, use_blas=True still runs.
    assert jax.device_count() > 1
    x = jnp.ones((4, 4))
    assert not blas.enabled(x) and "jaxtrain_blas_gemm" not in jax.jit(blas.matmul).lower(x, x).as_text()
    assert "this process has 8" in blas.describe()
    code = """
        import jax, jax.numpy as jnp
        from jaxtrain.cpu import blas
        x = jnp.ones((4, 4))
        assert jax.device_count() == 1 and blas.enabled(x), blas.status()
        assert "jaxtrain_blas_gemm" in jax.jit(blas.matmul).lower(x, x).as_text()
        print(blas.describe(), blas.describe("bfloat16"))
    """
    r = _python(code, {"XLA_FLAGS": ""})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() [0] == "MKL" and "not bfloat16" in r.stdout


@needs_blas
@pytest.mark.slow
def test_handler_is_rebuilt_into_an_empty_cache(tmp_path):
    code = """
        import jax, jax.numpy as jnp, numpy as np
        from jaxtrain.cpu import blas
        assert blas.status()[0], blas.status()
        a = jnp.arange(12.0).reshape(3, 4)
        np.testing.assert_allclose(jax.jit(blas.matmul)(a, a.T), np.asarray(a) @ np.asarray(a).T)
        print("ok")
    """
    r = _python(code, {"JAXTRAIN_EXT_CACHE": str(tmp_path)})
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
    assert [p.suffix for p in tmp_path.iterdir()] == [".so"]  # no temporary file left behind


def test_unwritable_build_directory_falls_back_and_names_it(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code = """
        from jaxtrain.cpu import blas
        print(blas.status())
    """
    r = _python(code, {"JAXTRAIN_EXT_CACHE": str(blocker / "ext")})
    assert r.returncode == 0, r.stderr
    assert "False" in r.stdout and f"cannot write the BLAS handler to {blocker / 'ext'}" in r.stdout
    assert "JAXTRAIN_EXT_CACHE" in r.stdout


@needs_blas
@pytest.mark.slow
def test_cli_run_on_one_device_trains_with_mkl(tmp_path):
    """The real command on one CPU device: the header names MKL and the tiny config learns."""
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-m", "jaxtrain.run", "--config", str(root / "jaxtrain" / "configs" / "tiny.yaml"),
                        f"run_dir={tmp_path / 'run'}", "log.progress=false"], capture_output=True, text=True,
                       cwd=root, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    header = next(line for line in r.stdout.splitlines() if line.startswith("run_dir "))
    assert "on 1 cpu devices | matmuls MKL | step memory" in header, header
    done = next(line for line in r.stdout.splitlines() if line.startswith("done: 40 steps"))
    val, baseline = (float(done.split(key)[1].split()[0].rstrip("),")) for key in ("final val loss ", "baseline "))
    assert val < baseline - 0.3, done
