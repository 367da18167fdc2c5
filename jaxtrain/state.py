"""``TrainState``: everything that changes during training, as one immutable pytree.

Leaves: ``step``, ``params``, ``opt_state``, ``rng`` (a typed PRNG key) and
``model_state`` (a model's non-trainable variables such as batch statistics;
empty for the GPT). The model's static structure (``graphdef``) and the optax
transform (``tx``) ride along as static metadata, not leaves, so the whole
state can be jitted, donated, sharded and checkpointed as it is.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

PyTree = Any

# What TrainState.model_state holds: every non-Param variable (BatchNorm statistics, counters, stored
# PRNG keys) except what a forward pass sows (nnx.Intermediate), which belongs to that call.
MODEL_STATE = nnx.All(nnx.Not(nnx.Param), nnx.Not(nnx.Intermediate))


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: PyTree  # nested dict of trainable arrays (nnx.Param values)
    opt_state: PyTree  # optax state of ``tx``
    rng: jax.Array  # typed key; per-step randomness is fold_in(rng, step)
    model_state: PyTree  # nested dict of non-Param model variables ({} for most models)
    graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)

    @classmethod
    def create(cls, model: nnx.Module, tx: optax.GradientTransformation, rng: jax.Array | int = 0) -> "TrainState":
        """Split an NNX ``model`` into static structure + arrays and initialise ``tx``.

        Args:
          model: any Flax NNX module; its ``nnx.Param`` variables are trained.
          tx: an optax transform, e.g. :func:`jaxtrain.make_optimizer`.
          rng: an int seed or a typed ``jax.random.key`` for dropout and other
            per-step randomness.
        Example::

            state = TrainState.create(MyModel(rngs=nnx.Rngs(0)), optax.adamw(1e-3))
        """
        if nnx.state(model, nnx.Intermediate):  # not MODEL_STATE; removed so the graphdef has none either
            model = nnx.clone(model)
            nnx.pop(model, nnx.Intermediate)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
        if isinstance(rng, (bool, np.bool_)) or not (
                isinstance(rng, (int, np.integer)) or isinstance(rng, jax.Array)):
            raise TypeError(f"TrainState.create: rng must be an int seed or a jax.random.key, got {rng!r}")
        is_key = isinstance(rng, jax.Array) and jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
        if isinstance(rng, jax.Array) and not is_key and (rng.ndim or not jnp.issubdtype(rng.dtype, jnp.integer)):
            raise TypeError(f"TrainState.create: rng must be an int seed or a typed jax.random.key, got an array "
                            f"of {rng.dtype}{list(rng.shape)} (wrap raw key data with jax.random.wrap_key_data)")
        if not is_key:  # a seed: a Python, NumPy or JAX integer scalar
            rng = jax.random.key(rng)
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng,
                   model_state=rest, graphdef=graphdef, tx=tx)

    def model(self, params: PyTree | None = None) -> nnx.Module:
        """A live NNX module built from ``params`` (default: this state's params)."""
        return nnx.merge(self.graphdef, self.params if params is None else params, self.model_state)


def abstract_state(make_state, *args, **kwargs) -> TrainState:
    """The state's shapes and dtypes without allocating it (``jax.eval_shape``).

    ``make_state(*args, **kwargs)`` must return a :class:`TrainState`; the result
    has ``jax.ShapeDtypeStruct`` leaves, ready to carry target shardings for a
    restore.
    """
    return jax.eval_shape(lambda: make_state(*args, **kwargs))


def param_count(state: TrainState) -> int:
    return sum(x.size for x in jax.tree.leaves(state.params))
