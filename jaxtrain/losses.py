"""Losses for :func:`jaxtrain.train_step`: ``loss_fn(model, batch, rng) -> (loss, aux)``.

:func:`lm_loss` is the language models' next-token cross-entropy; any function
with the same signature (or returning the scalar loss alone) works in its place.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

Batch = Any  # a pytree of arrays with a leading batch axis; the language models use {"inputs", "targets"}
LossFn = Callable[[nnx.Module, Batch, Optional[jax.Array]], tuple[jax.Array, dict]]

__all__ = ["lm_loss", "check_tokens", "LossFn"]


def lm_loss(model: nnx.Module, batch: Batch, rng: Optional[jax.Array]) -> tuple[jax.Array, dict]:
    """Mean next-token cross-entropy (nats) of a language model.

    Args:
      model: maps ``inputs`` int ``[B, T]`` to logits ``[B, T, V]``; called with
        ``rngs`` and ``deterministic`` keywords (dropout on when ``rng`` is given),
        each only if its ``__call__`` takes it (or takes ``**kwargs``).
      batch: ``{"inputs": int[B, T], "targets": int[B, T]}``.
      rng: a typed key for dropout, or None for evaluation.
    Returns:
      ``(loss, {})``.
    """
    inputs, targets = _lm_arrays(batch)
    rngs = nnx.Rngs(dropout=rng) if rng is not None else None
    logits_BTV = model(inputs, **_accepted(model, rngs=rngs, deterministic=rng is None))
    loss = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), targets)
    return loss.mean(), {}


def _accepted(model: Any, **kwargs) -> dict:
    """The subset of ``kwargs`` that ``model.__call__`` takes (all of them if it takes ``**kwargs``)."""
    try:
        params = inspect.signature(model).parameters
    except (TypeError, ValueError):  # no introspectable signature: pass everything
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def _lm_arrays(batch: Batch) -> tuple[jax.Array, jax.Array]:
    if not isinstance(batch, dict) or not {"inputs", "targets"} <= set(batch):
        raise ValueError("lm_loss expects a batch {'inputs': int[B, T], 'targets': int[B, T]}, "
                         f"got {type(batch).__name__} with keys {sorted(batch) if isinstance(batch, dict) else '-'}")
    inputs, targets = batch["inputs"], batch["targets"]
    if inputs.ndim != 2 or inputs.shape != targets.shape:
        raise ValueError(f"batch 'inputs' {tuple(inputs.shape)} and 'targets' {tuple(targets.shape)} "
                         "must both be [batch, time]")
    if not (jnp.issubdtype(inputs.dtype, jnp.integer) and jnp.issubdtype(targets.dtype, jnp.integer)):
        raise ValueError(f"batch token ids must be integers, got inputs {inputs.dtype}, targets {targets.dtype}")
    return inputs, targets


def check_tokens(batch: Batch, vocab_size: int, block_size: Optional[int] = None) -> None:
    """Host-side check of an LM batch: ids in ``[0, vocab_size)`` and ``T <= block_size``.

    Inside ``jax.jit`` values cannot raise, and an out-of-range id would
    silently read a clamped embedding row; call this on a host batch (the run
    loop checks the whole corpus once).
    """
    inputs, targets = _lm_arrays(jax.tree.map(np.asarray, batch))
    lo, hi = min(inputs.min(), targets.min()), max(inputs.max(), targets.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"token id {hi if hi >= vocab_size else lo} is outside the model's vocabulary "
                         f"[0, {vocab_size}) (model.vocab_size={vocab_size})")
    if block_size is not None and inputs.shape[1] > block_size:
        raise ValueError(f"batch time length {inputs.shape[1]} exceeds model.block_size={block_size}")
