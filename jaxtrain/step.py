"""The training step: forward, loss, backward, clip, AdamW — one pure function.

PyTorch                               jaxtrain (inside ``train_step``)
-----------------------------------   -------------------------------------------
``loss = loss_fn(model(x), y)``       ``loss, grads = jax.value_and_grad(f)(params)``
``loss.backward()``                   (the same line: grads is a pytree like params)
``clip_grad_norm_(params, c)``        ``optax.clip_by_global_norm(c)`` in ``state.tx``
``optimizer.step()``                  ``updates, opt = tx.update(grads, opt, params)``
``optimizer.zero_grad()``             nothing: grads are fresh values every step

Nothing here is jitted: the caller chooses shardings and donation::

    step_fn = jax.jit(train_step, donate_argnums=0)
    state, metrics = step_fn(state, batch)

Options (bind them with ``functools.partial`` before jitting): a custom
``loss_fn(model, batch, rng) -> (loss, aux)``, ``grad_accum`` microbatches, an
``axis_name`` for ``jax.pmap`` / ``jax.shard_map``, a ``compute_dtype``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxtrain import diagnostics as diag
from jaxtrain.losses import LossFn, check_tokens, lm_loss  # noqa: F401 - lm_loss and check_tokens re-exported
from jaxtrain.optim import apply_update, current_lr
from jaxtrain.state import MODEL_STATE, TrainState

PyTree = Any
Batch = Any  # a pytree of arrays with a leading batch axis; the GPT uses {"inputs", "targets"}


def _cast_floats(tree: PyTree, dtype) -> PyTree:
    if dtype is None:
        return tree
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _check_compute_dtype(compute_dtype) -> None:
    """Refuse float16: without loss scaling (which jaxtrain does not do) its small gradients underflow to 0."""
    if compute_dtype is not None and jnp.dtype(compute_dtype) == jnp.float16:
        raise ValueError(f"compute_dtype={jnp.dtype(compute_dtype).name}: float16 needs loss scaling, which "
                         "jaxtrain does not do; use compute_dtype=jnp.bfloat16 (float32's range at the same "
                         "memory) or None (float32)")


def _loss_and_grads(state: TrainState, batch: Batch, rng: jax.Array, loss_fn: LossFn,
                    compute_dtype, axis_name: Optional[str]):
    """``((loss, (aux, model_state)), grads)`` for one (micro)batch."""

    def f(params):
        model = nnx.merge(state.graphdef, _cast_floats(params, compute_dtype), state.model_state)
        model.train()  # PyTorch's model.train(): dropout on, BatchNorm normalises with batch statistics
        loss, aux = _call_loss(loss_fn, model, _cast_floats(batch, compute_dtype), rng)
        new_model_state = nnx.to_pure_dict(nnx.state(model, MODEL_STATE))
        return loss.astype(jnp.float32), (aux, new_model_state)

    params = state.params
    if axis_name is not None:
        # Mark params as varying over the axis so each device's grads stay local
        # (under shard_map a replicated input's cotangent would otherwise arrive
        # already summed); the explicit pmean in train_step then averages them.
        params = jax.tree.map(lambda p: jax.lax.pcast(p, axis_name, to="varying"), params)
    return jax.value_and_grad(f, has_aux=True)(params)


def _call_loss(loss_fn: LossFn, model: nnx.Module, batch: Batch, rng: Optional[jax.Array]):
    """``(scalar loss, aux dict)`` from ``loss_fn``, which may also return the loss alone."""
    name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
    try:
        inspect.signature(loss_fn).bind(model, batch, rng)
    except TypeError as e:  # wrong arity: say what train_step / eval_step call it with
        raise TypeError(f"loss_fn {name} must take (model, batch, rng) (rng: a key in train_step, None in "
                        f"eval_step), but {e}") from None
    except ValueError:  # no introspectable signature (some builtins): just call it
        pass
    out = loss_fn(model, batch, rng)
    loss, aux = out if isinstance(out, (tuple, list)) and len(out) == 2 else (out, {})
    if not hasattr(loss, "shape") or loss.shape != ():
        raise ValueError(f"loss_fn {name} must return a scalar loss or (scalar loss, aux dict); got a loss of "
                         f"shape {getattr(loss, 'shape', type(loss).__name__)} (take .mean() over the batch)")
    if not isinstance(aux, Mapping):
        raise ValueError(f"loss_fn {name} returned aux of type {type(aux).__name__}; it must be a dict of "
                         "scalar metrics, e.g. (loss, {'accuracy': acc}), or return the loss alone")
    return loss, aux


def accumulate_grads(state: TrainState, batch: Batch, rng: jax.Array, loss_fn: LossFn, grad_accum: int = 1,
                     compute_dtype=None, axis_name: Optional[str] = None):
    """``(loss, aux, model_state, grads)``: the mean loss and gradient over ``grad_accum`` equal
    microbatches (a ``lax.scan``), exactly as :func:`train_step` computes them before the update.

    ``rng`` is the step's key (``train_step`` uses ``fold_in(state.rng, state.step)``).
    Under ``axis_name`` the values are this device's, not yet averaged. ``compute_dtype``
    as in :func:`train_step` (float16 is a ``ValueError``).
    """
    _check_compute_dtype(compute_dtype)
    if grad_accum == 1:
        (loss, (aux, model_state)), grads = _loss_and_grads(state, batch, rng, loss_fn, compute_dtype, axis_name)
        return loss, aux, model_state, grads
    leaves = jax.tree_util.tree_leaves_with_path(batch)
    scalars = [jax.tree_util.keystr(p) for p, x in leaves if not jnp.ndim(x)]
    if scalars:
        raise ValueError(f"grad_accum={grad_accum} splits every batch leaf along its first axis, but batch leaf "
                         f"{scalars[0]} is a scalar; give it a leading batch axis, or bind it into loss_fn with functools.partial")
    sizes = {x.shape[0] for _, x in leaves}
    if len(sizes) != 1 or next(iter(sizes)) % grad_accum:
        raise ValueError(f"batch size {sorted(sizes)} must be divisible by grad_accum={grad_accum}")
    # Strided microbatches (rows i, i + A, i + 2A, ...): with the batch sharded
    # in contiguous blocks over devices, each device's block then holds an equal
    # share of every microbatch, so no rows move between devices (a contiguous
    # split would put each microbatch on a subset of devices and gather it).
    micro = jax.tree.map(
        lambda x: x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1), batch)

    def body(carry, xs):
        grad_sum, loss_sum, model_state = carry
        mb, i = xs
        sub = state.replace(model_state=model_state)
        (loss, (aux, model_state)), grads = _loss_and_grads(
            sub, mb, jax.random.fold_in(rng, i), loss_fn, compute_dtype, axis_name)
        grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
        return (grad_sum, loss_sum + loss, model_state), aux

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    if axis_name is not None:
        zeros = jax.tree.map(lambda z: jax.lax.pcast(z, axis_name, to="varying"), zeros)
        loss0 = jax.lax.pcast(jnp.zeros((), jnp.float32), axis_name, to="varying")
    else:
        loss0 = jnp.zeros((), jnp.float32)
    model_state0 = state.model_state
    if axis_name is not None:  # the body makes batch statistics per-device: the carry must start that way
        model_state0 = jax.tree.map(
            lambda x: x if _is_key(x) else jax.lax.pcast(x, axis_name, to="varying"), model_state0)
    (grad_sum, loss_sum, model_state), auxs = jax.lax.scan(
        body, (zeros, loss0, model_state0), (micro, jnp.arange(grad_accum)))
    grads = jax.tree.map(lambda g: g / grad_accum, grad_sum)
    return loss_sum / grad_accum, combine_metrics(auxs), model_state, grads


def combine_metrics(metrics: Mapping, axis_name: Optional[str] = None) -> dict:
    """One value per metric from several: the microbatches' (a leading axis) or, with ``axis_name``,
    the devices'. A mean, like the loss, except for extremes: a metric named ``max_...`` (or
    ``max_.../...``; also the diagnostics' ``attn_logit_max/...``) takes the max, ``min_...`` the
    min, so the result is what the whole batch would give."""
    def combine(key, value):
        stat = str(key).split("/", 1)[0]
        how = ("max" if stat.startswith("max_") or stat in diag.MAX_STATS else
               "min" if stat.startswith("min_") else "mean")
        if axis_name is None:
            return jax.tree.map(lambda a: getattr(a, how)(0), value)
        return {"max": jax.lax.pmax, "min": jax.lax.pmin, "mean": jax.lax.pmean}[how](value, axis_name)
    return {k: combine(k, v) for k, v in metrics.items()}


def _sync_model_state(model_state: PyTree, axis_name: str) -> PyTree:
    """Make non-trainable variables agree across ``axis_name``, so replicas stay replicas.

    Float ones (BatchNorm running statistics) are averaged, as a cross-replica
    batch-statistics sync does; integer ones (counters) take the maximum, and
    booleans (flags) are true if any device's is; a module's stored PRNG keys are
    left as they are.
    """
    def sync(x):
        if _is_key(x):
            return x
        if jnp.issubdtype(x.dtype, jnp.inexact):
            return jax.lax.pmean(x, axis_name)
        if x.dtype == jnp.bool_:
            return jax.lax.pmax(x.astype(jnp.int32), axis_name).astype(jnp.bool_)
        return jax.lax.pmax(x, axis_name)
    return jax.tree.map(sync, model_state)


def _is_key(x) -> bool:
    return jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _is_finite(*xs) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs]))


def train_step(state: TrainState, batch: Batch, *, loss_fn: LossFn = lm_loss, grad_accum: int = 1,
               axis_name: Optional[str] = None, compute_dtype=None,
               skip_nonfinite: bool = True, diagnostics: bool = False,
               max_grad_norm: Optional[float] = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step. Pure: jit it, donate ``state``, shard it as you like.

    The model runs in NNX's training mode (``model.train()``: ``nnx.Dropout`` on,
    ``nnx.BatchNorm`` normalising with batch statistics and updating its running
    ones), whatever mode it was in when the state was created; a call-time
    argument such as ``use_running_average=True`` inside ``loss_fn`` still wins.

    Args:
      state: the :class:`TrainState` (step, params, opt_state, rng, model_state).
      batch: a pytree of arrays with a leading batch axis (for the default
        ``lm_loss``: ``{"inputs": int[B, T], "targets": int[B, T]}``).
      loss_fn: ``loss_fn(model, batch, rng) -> (scalar loss, aux dict)``, or the
        scalar loss alone.
      grad_accum: split the batch into this many microbatches and average their
        gradients in a ``lax.scan`` (same gradient as the full batch, less memory).
      axis_name: a mapped axis (``jax.pmap`` / ``jax.shard_map``) over which loss,
        gradients and float ``model_state`` (batch statistics) are averaged;
        None under plain ``jax.jit`` with shardings.
      compute_dtype: cast floating params and floating batch leaves to this
        dtype for the forward and backward (a float32 input would otherwise
        promote every layer back to float32); gradients and the update stay in
        the params' float32. Integer leaves (token ids, labels) are untouched.
        ``jnp.bfloat16`` (or None); float16 is a ``ValueError``: its gradients
        underflow without loss scaling, which jaxtrain does not do.
      skip_nonfinite: when the loss or gradient norm is NaN/Inf, keep params,
        optimizer and model state unchanged (the step counter still advances)
        and report ``nonfinite=1``.
      diagnostics: also report per-module gradient norms, update-to-parameter
        ratios and what the model sows (the GPT: attention-logit statistics);
        see :mod:`jaxtrain.diagnostics`. False traces none of it. (With
        diagnostics the update always takes optax's path, never a backend's
        fused update: the statistics need the update tree itself.)
      max_grad_norm: the clipping threshold inside ``state.tx``; with
        diagnostics, ``clipped`` (1.0 when the gradient was rescaled) is reported.
    Returns:
      ``(new_state, metrics)``; metrics are scalars: ``loss``, ``grad_norm``
      (before clipping, as ``clip_grad_norm_`` returns), ``update_norm``,
      ``param_norm``, ``nonfinite``, ``lr`` (when the optimizer injects it) and
      any ``aux`` entries of the loss. Over the ``grad_accum`` microbatches and
      the devices of ``axis_name`` an ``aux`` entry is averaged, like the loss,
      unless its name starts with ``max_`` (the max is taken) or ``min_`` (the
      min): return per-example means or name extremes so, and the metric is
      what the whole batch gives (a count would come out as the mean count).
    """
    if isinstance(grad_accum, bool) or not isinstance(grad_accum, (int, np.integer)) or grad_accum < 1:
        raise ValueError(f"grad_accum={grad_accum!r}: must be a positive integer (microbatches per step)")
    rng = jax.random.fold_in(state.rng, state.step)
    if diagnostics:  # the wrapper adds to aux: give it (loss, aux) also from a loss_fn returning the loss alone
        loss_fn = diag.with_sown_stats(functools.partial(_call_loss, loss_fn))
    loss, aux, model_state, grads = accumulate_grads(state, batch, rng, loss_fn, grad_accum, compute_dtype, axis_name)
    if axis_name is not None:
        loss, grads = jax.lax.pmean((loss, grads), axis_name)
        aux = combine_metrics(aux, axis_name)
        model_state = _sync_model_state(model_state, axis_name)
    grad_norm = optax.tree.norm(grads)
    finite = _is_finite(loss, grad_norm)
    apply = finite if skip_nonfinite else True
    params, opt_state, update_norm, param_norm, updates = apply_update(
        state.tx, grads, state.opt_state, state.params, grad_norm, apply, need_updates=diagnostics)
    if skip_nonfinite:
        model_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), model_state, state.model_state)
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, model_state=model_state)
    metrics = dict(aux, loss=loss, grad_norm=grad_norm, update_norm=update_norm,
                   param_norm=param_norm, nonfinite=(~finite).astype(jnp.int32))
    lr = current_lr(opt_state)
    if lr is not None:
        metrics["lr"] = lr
    if diagnostics:
        metrics.update(diag.grad_stats(grads, updates, state.params, grad_norm=grad_norm, max_norm=max_grad_norm))
    return new, metrics


def eval_step(state: TrainState, batch: Batch, *, loss_fn: LossFn = lm_loss,
              axis_name: Optional[str] = None, compute_dtype=None) -> dict[str, jax.Array]:
    """Loss of ``batch`` with the model in evaluation mode, no update.

    The model is put in NNX's evaluation mode (``model.eval()``: ``deterministic``
    and ``use_running_average`` set on every submodule that has them, so
    ``nnx.Dropout`` is off and ``nnx.BatchNorm`` uses its running statistics),
    and ``loss_fn`` gets ``rng=None``.

    Pass the same ``compute_dtype`` as to :func:`train_step` to evaluate the
    model the way it is trained (float16 is a ``ValueError``, as there).
    """
    _check_compute_dtype(compute_dtype)
    model = state.model(_cast_floats(state.params, compute_dtype))
    model.eval()  # PyTorch's model.eval(): no dropout, BatchNorm uses its running statistics
    loss, aux = _call_loss(loss_fn, model, _cast_floats(batch, compute_dtype), None)
    metrics = dict(aux, loss=loss.astype(jnp.float32))
    return combine_metrics(metrics, axis_name) if axis_name is not None else metrics
