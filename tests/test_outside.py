"""Uses of the public API and the CLI beyond the main tests: research-code models and user mistakes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from jaxtrain import TrainState, make_optimizer, train_step
from jaxtrain.config import OptimConfig


class _BatchNormNet(nnx.Module):
    """A regressor with BatchNorm statistics and an integer counter in its model_state."""

    def __init__(self, rngs: nnx.Rngs):
        self.lin = nnx.Linear(4, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.out = nnx.Linear(8, 1, rngs=rngs)
        self.calls = nnx.BatchStat(jnp.zeros((), jnp.int32))

    def __call__(self, x, train: bool):
        self.calls[...] += 1
        return self.out(nnx.relu(self.bn(self.lin(x), use_running_average=not train)))[:, 0]


def _bn_loss(model, batch, rng):
    return ((model(batch["x"], rng is not None) - batch["y"]) ** 2).mean(), {}


def _bn_state():
    tx = make_optimizer(OptimConfig(lr=1e-2, schedule="constant", warmup_steps=0))
    return TrainState.create(_BatchNormNet(nnx.Rngs(0)), tx)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_batchnorm_model_under_shard_map_and_pmap_keeps_replicated_statistics(grad_accum):
    n = 4
    rng = np.random.default_rng(0)
    batch = {"x": rng.normal(size=(8, 4)).astype(np.float32), "y": rng.normal(size=8).astype(np.float32)}
    fn = functools.partial(train_step, loss_fn=_bn_loss, axis_name="d", grad_accum=grad_accum)
    mesh = jax.make_mesh((n,), ("d",), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])
    smap = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P(), P("d")), out_specs=(P(), P())))
    s_state, _ = smap(_bn_state(), batch)

    rep = jax.tree.map(lambda x: jnp.stack([x] * n), _bn_state())
    p_state, _ = jax.pmap(fn, axis_name="d", devices=jax.devices()[:n])(
        rep, jax.tree.map(lambda x: x.reshape(n, -1, *x.shape[1:]), batch))
    for leaf in jax.tree.leaves(p_state.model_state):  # every replica holds the same statistics
        np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[0], leaf.shape))
    jax.tree.map(lambda s, p: np.testing.assert_allclose(s, p[0], rtol=1e-6), s_state.model_state, p_state.model_state)
    assert int(s_state.model_state["calls"]) == grad_accum

    # The running mean averages equal-sized per-device (micro)batch means: the one-device mean.
    ref, _ = jax.jit(functools.partial(train_step, loss_fn=_bn_loss, grad_accum=grad_accum))(_bn_state(), batch)
    np.testing.assert_allclose(s_state.model_state["bn"]["mean"], ref.model_state["bn"]["mean"], rtol=1e-5, atol=1e-7)
