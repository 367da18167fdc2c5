"""Sharded training equals one-device training: data parallel, FSDP, pmap, shard_map.

Runs on the 8 fake CPU devices of conftest.py. Every layout trains the same tiny
GPT on the same global batches for 20 steps; losses, pre-clip gradient norms and
final params must match a one-device run within float32 tolerance. The gradient
norm is compared on purpose: AdamW after clipping is nearly invariant to a
constant gradient scale, so a wrongly scaled gradient (the shard_map
"replicated input's gradient is already summed" trap) shows up there first.
"""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxtrain import TrainState, make_optimizer, train_step
from jaxtrain import parallel as par
from jaxtrain.app.config import ConfigError, OptimConfig, ParallelConfig
from jaxtrain.app.data import encode, get_batch
from jaxtrain.models import GPT, GPTConfig

STEPS, BATCH, BLOCK = 20, 16, 16
# float32, 20 AdamW steps: the summation order differs across layouts. Measured
# worst absolute differences from the reference: losses 1e-6, gradient norms
# 4e-5 (with accumulation; 8e-6 without), params 4e-5. A gradient scaled by the
# device count would be off by 7x in the norm.
LOSS_TOL = dict(rtol=1e-5, atol=1e-5)
NORM_TOL = dict(rtol=1e-4, atol=1e-5)
PARAM_TOL = dict(rtol=1e-4, atol=1e-4)

MODEL = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=BLOCK)
CORPUS = encode(Path(par.__file__).read_text())  # structured text, so the loss moves


# One optimizer object: the state's static metadata (graphdef, tx) must be the
# same object in every state so their pytree structures compare equal.
TX = make_optimizer(OptimConfig(lr=3e-3, schedule="constant", warmup_steps=0, max_grad_norm=1.0))


def make_state() -> TrainState:
    return TrainState.create(GPT(MODEL, rngs=nnx.Rngs(0)), TX, rng=0)


@functools.cache
def _initial_state() -> TrainState:
    return jax.jit(make_state)()


def initial_state() -> TrainState:
    """A fresh copy (steps donate it) of the state built once: compiling the init per layout is slow."""
    return jax.tree.map(lambda x: x.copy(), _initial_state())


def host_batch(step: int) -> dict:
    return get_batch(CORPUS, seed=0, step=step, batch_size=BATCH, block_size=BLOCK)


def to_host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def train_on_mesh(mesh, grad_accum: int):
    """20 steps of jit(train_step) with the mesh's shardings -> (losses, grad_norms, params)."""
    shardings = par.state_shardings(mesh, initial_state())
    state = jax.device_put(initial_state(), shardings)
    step = par.jit_train_step(functools.partial(train_step, grad_accum=grad_accum), mesh, shardings)
    losses, norms = [], []
    for t in range(STEPS):
        state, m = step(state, par.place_batch(host_batch(t), mesh))
        losses.append(m["loss"])
        norms.append(m["grad_norm"])
    return np.array(losses), np.array(norms), to_host(state.params), state


@functools.cache
def reference():
    """The run every layout is compared with: one device, no accumulation (full-batch gradients)."""
    return train_on_mesh(par.make_mesh(ParallelConfig(data=1), jax.devices()[:1]), grad_accum=1)[:3]


def assert_matches_reference(losses, norms, params):
    ref_losses, ref_norms, ref_params = reference()
    np.testing.assert_allclose(losses, ref_losses, **LOSS_TOL)
    np.testing.assert_allclose(norms, ref_norms, **NORM_TOL)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **PARAM_TOL), params, ref_params)
    assert ref_losses[-1] < ref_losses[0] - 0.5  # it actually trained


# Every layout with and without accumulation would be 6 compiles; these 4 cover
# data parallel and FSDP each with and without accumulation, and the 2-D mesh.
@pytest.mark.parametrize("data,fsdp,grad_accum", [(8, 1, 1), (8, 1, 2), (1, 8, 1), (2, 4, 2)])
@pytest.mark.slow
def test_sharded_training_matches_one_device(data, fsdp, grad_accum):
    mesh = par.make_mesh(ParallelConfig(data=data, fsdp=fsdp))
    assert dict(mesh.shape) == {"data": data, "fsdp": fsdp}
    losses, norms, params, state = train_on_mesh(mesh, grad_accum)
    assert_matches_reference(losses, norms, params)
    # the layout really is what it claims: FSDP shards every large param, DP none
    wte = state.params["wte"]["embedding"]
    assert wte.sharding.spec == (P("fsdp") if fsdp > 1 else P())
    assert len(wte.addressable_shards[0].data) == wte.shape[0] // fsdp
    mu = jax.tree.leaves(state.opt_state)[1:]
    assert any(getattr(x, "sharding", None) is not None and x.sharding.spec == P("fsdp") for x in mu) == (fsdp > 1)


def _stack(tree, n: int):
    """``n`` copies along a new leading axis (the pmap device axis)."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), tree)


# pmap runs through shard_map inside JAX: one without and one with accumulation
# cover the recipe with fewer compiles than both settings for both.
def test_pmap_recipe_matches_one_device():
    n = jax.local_device_count()
    step = jax.pmap(functools.partial(train_step, axis_name="batch"),
                    axis_name="batch", donate_argnums=0)
    state = _stack(initial_state(), n)
    losses, norms = [], []
    for t in range(STEPS):
        batch = jax.tree.map(lambda x: x.reshape(n, -1, *x.shape[1:]), host_batch(t))  # [devices, B/n, T]
        state, m = step(state, batch)
        losses.append(m["loss"][0])
        norms.append(m["grad_norm"][0])
    params = to_host(state.params)
    for leaf in jax.tree.leaves(params):  # every device holds the same params
        np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[0], leaf.shape))
    assert_matches_reference(np.array(losses), np.array(norms), jax.tree.map(lambda x: x[0], params))


def test_shard_map_recipe_with_accumulation_matches_one_device():
    mesh = jax.make_mesh((jax.device_count(),), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
    # State replicated (P()), batch split (P("batch")); train_step marks params as
    # varying before differentiating and pmeans the grads, so this is the mean
    # gradient, not the device-count-times-larger sum.
    step = jax.jit(jax.shard_map(functools.partial(train_step, axis_name="batch", grad_accum=2),
                                 mesh=mesh, in_specs=(P(), P("batch")), out_specs=(P(), P())),
                   donate_argnums=0)
    state = initial_state()
    losses, norms = [], []
    for t in range(STEPS):
        state, m = step(state, host_batch(t))
        losses.append(m["loss"])
        norms.append(m["grad_norm"])
    assert_matches_reference(np.array(losses), np.array(norms), to_host(state.params))


def test_shard_map_without_pcast_would_scale_the_gradient():
    """The trap the recipe avoids: pmean of a replicated input's grad is N x the mean grad."""
    mesh = jax.make_mesh((8,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
    x = jnp.arange(16.0)

    def grad(w, xs, mark_varying):
        w = jax.lax.pcast(w, "batch", to="varying") if mark_varying else w
        g = jax.grad(lambda w: jnp.mean(w * xs))(w)
        return jax.lax.pmean(g, "batch")

    def run(mark):
        f = jax.shard_map(functools.partial(grad, mark_varying=mark), mesh=mesh,
                          in_specs=(P(), P("batch")), out_specs=P())
        return float(jax.jit(f)(jnp.float32(1.0), x))

    assert run(True) == pytest.approx(float(x.mean()))
    assert run(False) == pytest.approx(8 * float(x.mean()))


# ---------------------------------------------------------------- shardings


@pytest.mark.parametrize("shape,fsdp,spec", [
    ((256, 32), 8, P("fsdp")),           # largest dim
    ((32, 96), 8, P(None, "fsdp")),      # largest dim is the second
    ((96,), 8, P("fsdp")),
    ((12, 20), 8, P()),                  # nothing divisible: replicated
    ((20, 24), 4, P(None, "fsdp")),      # 24 > 20, both divisible by 4
    ((32, 32), 8, P("fsdp")),            # tie: the earlier dimension
    ((), 8, P()),                        # scalars
    ((256, 32), 1, P()),                 # no fsdp: replicated
])
def test_param_spec(shape, fsdp, spec):
    assert par.param_spec(shape, fsdp) == spec


def test_state_shardings_replicate_scalars_and_rng():
    mesh = par.make_mesh(ParallelConfig(fsdp=8))
    sh = par.state_shardings(mesh, jax.eval_shape(make_state))
    assert sh.step.spec == P() and sh.rng.spec == P()
    assert sh.params["wte"]["embedding"].spec == P("fsdp")
    assert jax.tree.structure(sh) == jax.tree.structure(jax.eval_shape(make_state))


def test_place_batch_splits_rows_over_all_devices():
    mesh = par.make_mesh(ParallelConfig(data=2, fsdp=4))
    batch = par.place_batch(host_batch(0), mesh)
    x = batch["inputs"]
    assert x.shape == (BATCH, BLOCK) and x.sharding == par.batch_sharding(mesh)
    assert {s.data.shape for s in x.addressable_shards} == {(BATCH // 8, BLOCK)}
    np.testing.assert_array_equal(np.asarray(x), host_batch(0)["inputs"])


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("data,fsdp,needle", [
    (4, 1, "parallel.data=4 x parallel.fsdp=1 = 4 devices, but 8 are available"),
    (2, 8, "parallel.data=2 x parallel.fsdp=8 = 16 devices, but 8 are available"),
    (-1, 3, "parallel.fsdp=3 must divide the 8 available devices"),
])
def test_mesh_that_does_not_fit_names_the_numbers(data, fsdp, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        par.make_mesh(ParallelConfig(data=data, fsdp=fsdp))


@pytest.mark.parametrize("batch,accum,ok", [(16, 1, True), (16, 2, True), (32, 4, True),
                                            (12, 1, False), (16, 4, False), (8, 2, False)])
def test_check_batch(batch, accum, ok):
    mesh = par.make_mesh(ParallelConfig())
    if ok:
        par.check_batch(batch, accum, mesh)
    else:
        with pytest.raises(ConfigError, match=rf"train.batch_size={batch} must be divisible by devices x "
                                              rf"grad_accum = 8 x {accum} = {8 * accum}"):
            par.check_batch(batch, accum, mesh)


# ---------------------------------------------------------------- initialize


@pytest.fixture
def clean_env(monkeypatch):
    for var in (par.ENV_COORDINATOR, par.ENV_NUM_PROCESSES, par.ENV_PROCESS_ID, *par._LAUNCHER_WORLD_SIZE):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_single_process_needs_no_distributed_init(clean_env):
    assert par.distributed_args(ParallelConfig()) is None
    clean_env.setenv("SLURM_STEP_NUM_TASKS", "1")  # a one-task srun step is still one process
    assert par.distributed_args(ParallelConfig()) is None
    par.initialize(ParallelConfig())  # no-op, twice
    par.initialize(ParallelConfig())
    assert not jax.distributed.is_initialized() and jax.process_count() == 1


def test_distributed_args_config_wins_over_env(clean_env):
    clean_env.setenv(par.ENV_COORDINATOR, "10.0.0.1:1234")
    clean_env.setenv(par.ENV_NUM_PROCESSES, "4")
    clean_env.setenv(par.ENV_PROCESS_ID, "3")
    assert par.distributed_args(ParallelConfig()) == dict(
        coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3)
    assert par.distributed_args(ParallelConfig(coordinator_address="h:1", num_processes=2, process_id=0)) == dict(
        coordinator_address="h:1", num_processes=2, process_id=0)


def test_distributed_args_leave_unknowns_to_jax_under_slurm(clean_env):
    clean_env.setenv("SLURM_STEP_NUM_TASKS", "16")
    assert par.distributed_args(ParallelConfig()) == dict(coordinator_address=None, num_processes=None,
                                                          process_id=None)


@pytest.mark.parametrize("pcfg,needle", [
    (ParallelConfig(coordinator_address="h:1", num_processes=2, process_id=2), r"parallel.process_id=2: must be in \[0, parallel.num_processes=2\)"),
    (ParallelConfig(coordinator_address="h:1", num_processes=0, process_id=0), "parallel.num_processes=0"),
])
def test_bad_process_numbers(clean_env, pcfg, needle):
    with pytest.raises(ConfigError, match=needle):
        par.distributed_args(pcfg)


def test_bad_env_value_names_the_variable(clean_env):
    clean_env.setenv(par.ENV_NUM_PROCESSES, "two")
    with pytest.raises(ConfigError, match="JAX_NUM_PROCESSES='two' must be an integer"):
        par.distributed_args(ParallelConfig())


def test_local_device_count_after_start_is_a_clear_error():
    jax.devices()  # the backend is up (8 fake devices)
    with pytest.raises(ConfigError, match="parallel.local_device_count=2 must be set before JAX starts"):
        par.initialize(ParallelConfig(local_device_count=2))
