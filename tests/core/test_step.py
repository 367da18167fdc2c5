"""Invariants of ``train_step`` / ``eval_step``, on the GPT and on models that are not the GPT."""

import dataclasses
import functools
import os
import subprocess
import sys
import textwrap
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxtrain import TrainState, check_tokens, eval_step, lm_loss, make_optimizer, train_step
from jaxtrain import OptimConfig
from jaxtrain.models import GPT, GPTConfig

TINY = GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16, bias=False)
ADAMW = OptimConfig(lr=1e-2, schedule="constant", warmup_steps=0, max_grad_norm=1.0)


class Recorded(NamedTuple):
    grads: Any


def record_grads(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` preceded by a stage that keeps the gradient it receives in its state.

    ``optax.tree.get(state.opt_state, "grads")`` after a step is then exactly the
    (averaged, accumulated) gradient ``train_step`` computed, before clipping.
    """
    keep = optax.GradientTransformation(
        init=lambda params: Recorded(jax.tree.map(jnp.zeros_like, params)),
        update=lambda grads, state, params=None: (grads, Recorded(grads)))
    return optax.chain(keep, tx)


def grads_of(state: TrainState):
    return optax.tree.get(state.opt_state, "grads")


# One transform object for all GPT states: tx is static in TrainState, so states
# built with separately made (even identical) transforms would compile separately.
GPT_TX = record_grads(make_optimizer(ADAMW))


@functools.cache
def _initial_gpt_state(cfg: GPTConfig, seed: int) -> TrainState:
    return TrainState.create(GPT(cfg, rngs=nnx.Rngs(seed)), GPT_TX, rng=seed)


def gpt_state(cfg: GPTConfig = TINY, seed: int = 0) -> TrainState:
    """A fresh (copied, so donation cannot delete the cached one) GPT state with AdamW."""
    return jax.tree.map(jnp.copy, _initial_gpt_state(cfg, seed))


@functools.cache
def jitted_step(**options):
    """One jitted ``train_step`` per option set, shared by the tests (compiling is the slow part)."""
    return jax.jit(functools.partial(train_step, **options))


def lm_batch(batch: int = 8, cfg: GPTConfig = TINY, seed: int = 1) -> dict:
    tokens = jax.random.randint(jax.random.key(seed), (batch, cfg.block_size + 1), 0, cfg.vocab_size)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def assert_trees_close(a, b, rtol: float, what: str = ""):
    """Per leaf: ||a - b|| <= rtol * ||b|| (norm-wise, so near-zero entries do not dominate)."""
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        err, ref = np.linalg.norm(x - y), np.linalg.norm(y)
        assert err <= rtol * ref, f"{what}{jax.tree_util.keystr(path)}: ||a-b||={err:.3g}, ||b||={ref:.3g}"


def assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


# --- models that are not the GPT -------------------------------------------------------


class MLP(nnx.Module):
    """A regressor ``[B, 4] -> [B]``."""

    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(4, 32, rngs=rngs)
        self.out = nnx.Linear(32, 1, rngs=rngs)

    def __call__(self, x_BD):
        return self.out(jax.nn.relu(self.hidden(x_BD)))[:, 0]


class BatchNormMLP(nnx.Module):
    """A regressor with BatchNorm: its batch statistics live in ``TrainState.model_state``."""

    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(4, 32, rngs=rngs)
        self.norm = nnx.BatchNorm(32, momentum=0.5, rngs=rngs)
        self.out = nnx.Linear(32, 1, rngs=rngs)

    def __call__(self, x_BD, *, train: bool):
        return self.out(jax.nn.relu(self.norm(self.hidden(x_BD), use_running_average=not train)))[:, 0]


def mse_loss(model, batch, rng):
    pred_B = model(batch["x"])
    return jnp.mean((pred_B - batch["y"]) ** 2), {"mae": jnp.mean(jnp.abs(pred_B - batch["y"]))}


def bn_mse_loss(model, batch, rng):
    # Training (batch statistics) when the step passes an rng, running averages in eval.
    pred_B = model(batch["x"], train=rng is not None)
    return jnp.mean((pred_B - batch["y"]) ** 2), {}


def regression_batch(n: int = 64, seed: int = 0) -> dict:
    x = jax.random.normal(jax.random.key(seed), (n, 4))
    return {"x": x, "y": jnp.sin(x[:, 0]) + x[:, 1] * x[:, 2] + 3.0}


def _train(state, batch, steps, **kw):
    step = jitted_step(**kw)
    history = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        history.append(jax.device_get(metrics))
    return state, history


def test_a_plain_nnx_model_trains_with_its_own_loss_fn():
    state = TrainState.create(MLP(nnx.Rngs(0)), make_optimizer(ADAMW))
    state, history = _train(state, regression_batch(), 60, loss_fn=mse_loss)
    losses = [m["loss"] for m in history]
    assert losses[-1] < 0.2 * losses[0], losses
    assert set(history[0]) >= {"loss", "grad_norm", "lr", "update_norm", "param_norm", "nonfinite", "mae"}
    assert eval_step(state, regression_batch(), loss_fn=mse_loss)["loss"] == pytest.approx(losses[-1], rel=0.5)


def test_a_batchnorm_model_updates_model_state_and_evaluates_with_running_averages():
    state = TrainState.create(BatchNormMLP(nnx.Rngs(0)), make_optimizer(ADAMW))
    stats0 = jax.device_get(state.model_state)  # the state is donated below
    assert jax.tree.leaves(stats0), "BatchNorm statistics should be model_state, not params"
    batch = regression_batch()
    state, history = _train(state, batch, 40, loss_fn=bn_mse_loss)
    assert history[-1]["loss"] < 0.2 * history[0]["loss"]
    mean = state.model_state["norm"]["mean"]
    assert not np.allclose(mean, stats0["norm"]["mean"])  # running statistics moved
    # eval uses the running averages and does not change them
    eval_loss = float(eval_step(state, batch, loss_fn=bn_mse_loss)["loss"])
    want = float(jnp.mean((state.model()(batch["x"], train=False) - batch["y"]) ** 2))
    assert eval_loss == pytest.approx(want, rel=1e-6)
    np.testing.assert_array_equal(state.model_state["norm"]["mean"], mean)


# --- gradient accumulation, remat, pmap: same gradient as the plain full batch ------------


def test_grad_accumulation_equals_the_full_batch_gradient_on_the_gpt():
    batch = lm_batch(8)
    (full, m_full), (accum, m_accum) = (_train(gpt_state(), batch, 1, **kw) for kw in ({}, {"grad_accum": 4}))
    assert_trees_close(grads_of(accum), grads_of(full), rtol=1e-5, what="grad ")
    assert float(m_accum[0]["loss"]) == pytest.approx(float(m_full[0]["loss"]), rel=1e-6)
    assert float(m_accum[0]["grad_norm"]) == pytest.approx(float(m_full[0]["grad_norm"]), rel=1e-5)
    # 1e-4 for params, not 1e-5: AdamW's first steps are ~lr * g / (|g| + eps), which
    # magnifies the summation-order noise of gradient entries close to zero.
    assert_trees_close(accum.params, full.params, rtol=1e-4, what="param ")


def test_grad_accumulation_equals_the_full_batch_gradient_on_an_mlp():
    state, batch = TrainState.create(MLP(nnx.Rngs(0)), record_grads(make_optimizer(ADAMW))), regression_batch(16)
    (full, _), (accum, _) = (_train(state, batch, 1, loss_fn=mse_loss, **kw) for kw in ({}, {"grad_accum": 4}))
    assert_trees_close(grads_of(accum), grads_of(full), rtol=1e-5, what="grad ")


DROPOUT = dataclasses.replace(TINY, dropout=0.1)


@pytest.mark.slow
def test_remat_gives_the_same_gradient_with_the_same_dropout():
    batch = lm_batch(4)
    plain, _ = _train(gpt_state(DROPOUT), batch, 1)
    remat, _ = _train(gpt_state(dataclasses.replace(DROPOUT, remat=True)), batch, 1)
    assert_trees_close(grads_of(remat), grads_of(plain), rtol=1e-6, what="grad ")


def test_pmap_with_axis_name_gives_the_single_device_update():
    n = jax.device_count()
    assert n == 8, "tests/conftest.py fakes 8 CPU devices"
    batch = lm_batch(2 * n)
    replicate = lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), tree)  # noqa: E731
    shard = lambda tree: jax.tree.map(lambda x: x.reshape(n, -1, *x.shape[1:]), tree)  # noqa: E731
    first = lambda tree: jax.tree.map(lambda x: x[0], tree)  # noqa: E731
    pstep = jax.pmap(functools.partial(train_step, axis_name="data"), axis_name="data")

    single, single_m = _train(gpt_state(), batch, 1)
    multi, multi_m = pstep(replicate(gpt_state()), shard(batch))
    # every device reports the global mean loss and the norm of the averaged gradient
    np.testing.assert_allclose(multi_m["loss"], single_m[0]["loss"], rtol=1e-6)
    np.testing.assert_allclose(multi_m["grad_norm"], single_m[0]["grad_norm"], rtol=1e-5)
    assert_trees_close(grads_of(first(multi)), grads_of(single), rtol=1e-5, what="grad ")
    assert_trees_close(first(multi).params, single.params, rtol=1e-4, what="param ")  # 1e-4: see accumulation
    assert_trees_equal(first(multi).params, jax.tree.map(lambda x: x[-1], multi.params))  # replicas agree


# --- determinism and compilation ----------------------------------------------------


def test_two_runs_with_one_seed_are_bit_identical():
    # DROPOUT: per-step randomness in play
    (a, ha), (b, hb) = (_train(gpt_state(DROPOUT, seed=3), lm_batch(4), 3) for _ in range(2))
    assert_trees_equal(a.params, b.params)
    assert_trees_equal(a.opt_state, b.opt_state)
    assert ha == hb
    other, _ = _train(gpt_state(DROPOUT, seed=4), lm_batch(4), 3)
    assert not np.array_equal(other.params["wte"]["embedding"], a.params["wte"]["embedding"])


def test_train_step_compiles_once_over_many_steps():
    traces = []

    def counted_loss(model, batch, rng):
        traces.append(1)  # runs only while tracing
        return mse_loss(model, batch, rng)

    # donated state, a schedule that changes lr every step, fresh batches
    tx = make_optimizer(dataclasses.replace(ADAMW, schedule="cosine", warmup_steps=2), total_steps=10)
    state = TrainState.create(MLP(nnx.Rngs(0)), tx)
    step = jax.jit(functools.partial(train_step, loss_fn=counted_loss), donate_argnums=0)
    for seed in range(6):
        state, _ = step(state, regression_batch(seed=seed))
    assert int(state.step) == 6
    assert len(traces) == 1 and step._cache_size() == 1

    gpt_step = jitted_step()  # the GPT's step, shared with other tests (and their models)
    state, _ = gpt_step(gpt_state(), lm_batch(8))
    entries = gpt_step._cache_size()
    for seed in range(4):
        state, _ = gpt_step(state, lm_batch(8, seed=seed))
    assert gpt_step._cache_size() == entries


# --- non-finite steps ----------------------------------------------------------------


def test_a_non_finite_loss_leaves_the_state_unchanged_except_step():
    state = TrainState.create(MLP(nnx.Rngs(0)), make_optimizer(ADAMW))
    state, _ = _train(state, regression_batch(), 2, loss_fn=mse_loss)
    bad = regression_batch()
    bad["y"] = bad["y"].at[3].set(jnp.nan)
    after, metrics = _train(state, bad, 1, loss_fn=mse_loss)
    assert int(metrics[0]["nonfinite"]) == 1 and int(after.step) == int(state.step) + 1
    assert_trees_equal(after.params, state.params)
    assert_trees_equal(after.opt_state, state.opt_state)
    again, metrics = _train(after, regression_batch(), 1, loss_fn=mse_loss)  # training goes on from there
    assert int(metrics[0]["nonfinite"]) == 0
    assert not np.array_equal(again.params["out"]["kernel"], state.params["out"]["kernel"])


# --- eval_step and compute dtypes ------------------------------------------------------


def test_eval_step_is_the_deterministic_loss():
    cfg = dataclasses.replace(TINY, dropout=0.5)
    state, batch = gpt_state(cfg), lm_batch(4)
    metrics = jax.jit(eval_step)(state, batch)
    model = state.model()
    want, _ = lm_loss(model, batch, None)
    dropped, _ = lm_loss(model, batch, jax.random.key(0))
    assert float(metrics["loss"]) == pytest.approx(float(want), rel=1e-6)
    assert float(dropped) != pytest.approx(float(want), rel=1e-3)  # dropout would change it
    assert float(jax.jit(eval_step)(state, batch)["loss"]) == float(metrics["loss"])


def test_bfloat16_model_keeps_float32_params_and_a_close_loss():
    batch = lm_batch(8)
    _, ref = _train(gpt_state(), batch, 3)
    low, low_h = _train(gpt_state(dataclasses.replace(TINY, dtype="bfloat16")), batch, 3)
    assert {x.dtype for x in jax.tree.leaves(low.params)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(grads_of(low))} == {jnp.dtype(jnp.float32)}
    for r, m in zip(ref, low_h):
        assert m["loss"].dtype == np.float32
        assert float(m["loss"]) == pytest.approx(float(r["loss"]), rel=2e-2)


def test_compute_dtype_casts_the_forward_only():
    batch = regression_batch()
    state = TrainState.create(MLP(nnx.Rngs(0)), record_grads(make_optimizer(ADAMW)))
    seen = []

    def loss_fn(model, batch, rng):
        seen.append(model.hidden.kernel[...].dtype)
        return mse_loss(model, batch, rng)

    low, low_m = _train(state, batch, 1, loss_fn=loss_fn, compute_dtype=jnp.bfloat16)
    _, ref_m = _train(state, batch, 1, loss_fn=mse_loss)
    assert seen == [jnp.bfloat16]
    assert {x.dtype for x in jax.tree.leaves((low.params, grads_of(low)))} == {jnp.dtype(jnp.float32)}
    assert float(low_m[0]["loss"]) == pytest.approx(float(ref_m[0]["loss"]), rel=2e-2)


@pytest.mark.slow
def test_compute_dtype_on_the_gpt_with_its_cpu_kernels():
    # One device, model.matmul=auto: the CPU kernels run where operands are float32. The LayerNorms
    # compute in float32 on float32 activations while their params arrive cast to bfloat16.
    code = """
        import functools, jax, jax.numpy as jnp, numpy as np
        from flax import nnx
        from jaxtrain import TrainState, make_optimizer, train_step
        from jaxtrain import OptimConfig
        from jaxtrain.models import GPT, GPTConfig
        cfg = GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=32)
        tx = make_optimizer(OptimConfig(schedule="constant", warmup_steps=0))
        x = np.random.default_rng(0).integers(0, 256, (4, 33))
        batch = {"inputs": jnp.asarray(x[:, :-1]), "targets": jnp.asarray(x[:, 1:])}
        for dtype in (None, jnp.bfloat16):
            state = TrainState.create(GPT(cfg, rngs=nnx.Rngs(0)), tx)
            _, m = jax.jit(functools.partial(train_step, compute_dtype=dtype))(state, batch)
            print(float(m["loss"]))
    """
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
    assert r.returncode == 0, r.stderr[-2000:]
    ref, low = map(float, r.stdout.split())
    assert low == pytest.approx(ref, rel=2e-2)


# --- bad input: a clear error, not a trace from inside JAX ---------------------------------


def _message(fn, *args, **kw) -> str:
    with pytest.raises(ValueError) as info:
        fn(*args, **kw)
    return str(info.value)


@pytest.mark.parametrize("dtype", [jnp.float16, np.float16, "float16"])
def test_float16_compute_is_refused_for_bfloat16(dtype):
    # no loss scaling: float16 gradients underflow, so train_step and eval_step refuse it by name
    state, batch = gpt_state(), lm_batch(4)
    for fn in (train_step, eval_step):
        message = _message(jax.jit(functools.partial(fn, compute_dtype=dtype)), state, batch)
        assert message.startswith("compute_dtype=float16: ") and "loss scaling" in message
        assert "jnp.bfloat16" in message and len(message.splitlines()) == 1


def test_batch_not_divisible_by_grad_accum():
    message = _message(jax.jit(functools.partial(train_step, grad_accum=3)), gpt_state(), lm_batch(8))
    assert "batch size [8]" in message and "grad_accum=3" in message


def test_lm_batch_shape_and_dtype_errors():
    state, batch = gpt_state(), lm_batch(4)
    step = jitted_step()
    mismatched = _message(step, state, {"inputs": batch["inputs"], "targets": batch["targets"][:, :-1]})
    assert "(4, 8)" in mismatched and "(4, 7)" in mismatched
    floats = _message(step, state, {"inputs": batch["inputs"].astype(jnp.float32), "targets": batch["targets"]})
    assert "integers" in floats and "float32" in floats
    missing = _message(step, state, {"tokens": batch["inputs"]})
    assert "'inputs'" in missing and "tokens" in missing
    too_long = _message(step, state, lm_batch(2, dataclasses.replace(TINY, block_size=12)))
    assert "12" in too_long and "block_size=8" in too_long


def test_check_tokens_names_the_bad_id_and_the_vocabulary():
    batch = jax.tree.map(np.array, lm_batch(4))
    check_tokens(batch, TINY.vocab_size, TINY.block_size)  # fine
    batch["targets"][1, 2] = 40
    message = _message(check_tokens, batch, TINY.vocab_size)
    assert "token id 40" in message and "[0, 32)" in message
    batch["targets"][1, 2] = -1
    assert "token id -1" in _message(check_tokens, batch, TINY.vocab_size)
    assert "block_size=4" in _message(check_tokens, jax.tree.map(np.array, lm_batch(4)), TINY.vocab_size, 4)
