"""Training diagnostics: what the backward did, per module, as scalar metrics.

Everything here is a pure function of arrays, traced inside ``train_step`` only
when it is called with ``diagnostics=True`` (config ``train.diagnostics``); with
diagnostics off nothing of this module enters the compiled step. All ops are
built under ``jax.named_scope("diagnostics")`` so they are easy to find in a
jaxpr, an HLO dump or a profile.

Metric names (``<stat>/<module path>``, one TensorBoard group per stat):

- ``grad_norm/h.0.attn``: L2 norm of the module's gradient (before clipping).
  The squares of all ``grad_norm/*`` add up to the square of ``grad_norm``.
- ``update_ratio/h.0.attn``: ``||update|| / ||param||`` for the module, the
  relative size of the step AdamW took (healthy training is often ~1e-3).
- ``clipped``: 1.0 when ``clip_by_global_norm`` scaled the gradient this step;
  the run loop logs its mean over each log interval as ``clip_frac``.
- ``attn_logit_max/h.0.attn``, ``attn_prob_max/h.0.attn``,
  ``attn_saturated/h.0.attn``: attention-logit statistics a model sows (the
  GPT's attention does when its ``sow_stats`` attribute is True).

Module paths come from the parameter pytree: ``h.0.attn.c_attn.kernel`` belongs
to module ``h.0.attn`` at the default ``depth=3``; ``wte.embedding`` to ``wte``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

PyTree = Any

__all__ = ["module_of", "module_norms", "grad_stats", "clipped", "attention_logit_stats",
           "sown_stats", "with_sown_stats", "interval_stats", "is_diagnostic", "SCOPE", "MAX_STATS"]

SCOPE = "diagnostics"  # the named scope of every diagnostic op
# Statistics that are maxima: over microbatches and devices they combine by max, every other
# metric by mean (see jaxtrain.step.combine_metrics).
MAX_STATS = frozenset({"attn_logit_max"})
_DEPTH = 3  # "h.0.attn": block index and sub-module, the level a per-layer plot wants


def _key_name(k) -> str:
    return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def module_of(path, depth: int = _DEPTH) -> str:
    """The module a leaf belongs to: its key path without the leaf's own name, cut to ``depth`` parts.

    ``("h", 0, "attn", "c_attn", "kernel") -> "h.0.attn"``; a leaf directly at
    the top (``("scale",)``) is its own module (``"scale"``).
    """
    names = [_key_name(k) for k in path]
    parents = names[:-1] or names
    return ".".join(parents[:depth])


def _module_sq_norms(tree: PyTree, depth: int) -> dict[str, jax.Array]:
    """Sum of squares (float32) of the leaves of each module, in first-seen order."""
    out: dict[str, jax.Array] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = module_of(path, depth)
        sq = jnp.sum(jnp.square(leaf.astype(jnp.float32)))
        out[name] = out[name] + sq if name in out else sq
    return out


def module_norms(tree: PyTree, depth: int = _DEPTH) -> dict[str, jax.Array]:
    """L2 norm of each module's leaves: ``{"wte": ||.||, "h.0.attn": ||.||, ...}``.

    The squares of the values add up to ``optax.tree.norm(tree) ** 2``.

    Example::

        module_norms({"h": {0: {"attn": {"c_attn": {"kernel": 3 * jnp.ones(1)}}}}})
        # {"h.0.attn": Array(3.)}
    """
    with jax.named_scope(SCOPE):
        return {name: jnp.sqrt(sq) for name, sq in _module_sq_norms(tree, depth).items()}


def clipped(grad_norm: jax.Array, max_norm: float) -> jax.Array:
    """1.0 when ``optax.clip_by_global_norm(max_norm)`` rescales a gradient of norm ``grad_norm``, else 0.0.

    optax leaves the gradient alone exactly when ``grad_norm < max_norm``, so a
    NaN norm counts as clipped. PyTorch's ``clip_grad_norm_`` scales by
    ``max_norm / (norm + 1e-6)`` when that ratio is below 1: the same decision up
    to the 1e-6.
    """
    with jax.named_scope(SCOPE):
        return (~(grad_norm < max_norm)).astype(jnp.float32)  # a NaN norm is rescaled too


def grad_stats(grads: PyTree, updates: PyTree, params: PyTree, *, grad_norm: Optional[jax.Array] = None,
               max_norm: Optional[float] = None, depth: int = _DEPTH) -> dict[str, jax.Array]:
    """Per-module gradient norms and update-to-parameter ratios of one optimizer step.

    Args:
      grads: the gradient pytree (before clipping), shaped like ``params``.
      updates: what the optimizer added to ``params`` this step.
      params: the parameters before the update.
      grad_norm, max_norm: the global gradient norm and the clipping threshold;
        when both are given, ``clipped`` is reported (``max_norm`` 0 or None:
        no clipping, nothing reported).
      depth: how many key-path parts name a module (see :func:`module_of`).
    Returns:
      float32 scalars ``grad_norm/<module>``, ``update_ratio/<module>`` (0 for
      a module whose parameters are all zero) and optionally ``clipped``.
    """
    with jax.named_scope(SCOPE):
        g2, u2, p2 = (_module_sq_norms(t, depth) for t in (grads, updates, params))
        out = {f"grad_norm/{m}": jnp.sqrt(v) for m, v in g2.items()}
        for m, p in p2.items():
            out[f"update_ratio/{m}"] = jnp.where(p > 0, jnp.sqrt(u2[m] / jnp.where(p > 0, p, 1.0)), 0.0)
    if grad_norm is not None and max_norm:
        out["clipped"] = clipped(grad_norm, max_norm)
    return out


def attention_logit_stats(q_BTNH: jax.Array, k_BTNH: jax.Array, *, scale: Optional[float] = None,
                          saturation: float = 0.99) -> dict[str, jax.Array]:
    """How peaked causal attention is: logit size and softmax saturation.

    Recomputes the logits ``q . k * scale`` (default ``scale = 1/sqrt(H)``) in
    float32 without gradient; rows of the first position (a single key, always
    probability 1) are left out of the probability statistics.

    Args:
      q_BTNH, k_BTNH: queries and keys ``[B, T, N, H]``.
      saturation: a row counts as saturated when its largest probability exceeds this.
    Returns:
      ``attn_logit_max`` (max |logit| over causal positions), ``attn_prob_max``
      (mean over rows of the largest probability), ``attn_saturated`` (fraction
      of rows whose largest probability is above ``saturation``).
    """
    with jax.named_scope(SCOPE):
        q, k = (jax.lax.stop_gradient(x).astype(jnp.float32) for x in (q_BTNH, k_BTNH))
        T, H = q.shape[1], q.shape[-1]
        scale = 1.0 / math.sqrt(H) if scale is None else scale
        logits_BNTT = jnp.einsum("bqnh,bknh->bnqk", q, k) * scale
        causal_TT = jnp.tril(jnp.ones((T, T), dtype=bool))
        logit_max = jnp.max(jnp.where(causal_TT, jnp.abs(logits_BNTT), 0.0))
        masked = jnp.where(causal_TT, logits_BNTT, -jnp.inf)
        p_max_BNT = jnp.exp(masked.max(-1) - jax.nn.logsumexp(masked, axis=-1))
        rows = jnp.broadcast_to(jnp.arange(T) >= min(1, T - 1), p_max_BNT.shape)  # all rows if T == 1
        mean = lambda x: jnp.sum(jnp.where(rows, x, 0.0)) / jnp.sum(rows)  # noqa: E731
        return {"attn_logit_max": logit_max, "attn_prob_max": mean(p_max_BNT),
                "attn_saturated": mean((p_max_BNT > saturation).astype(jnp.float32))}


def sown_stats(sown: PyTree, modules: Optional[set[tuple[str, ...]]] = None) -> dict[str, jax.Array]:
    """Flatten sown intermediates into metrics ``<name>/<module path>``.

    ``sown`` is what ``nnx.capture(f, nnx.Intermediate)`` returns: for each
    module a tuple of the values sown under ``name`` (one per call); calls are
    averaged. ``modules``: keep only what the modules at these paths (tuples of
    key names, e.g. ``("h", "0", "attn")``) sowed; None keeps everything.
    """
    groups: dict[str, list[jax.Array]] = {}
    for path, value in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(sown))[0]:
        names = [_key_name(k) for k in path]
        if isinstance(path[-1], jax.tree_util.SequenceKey):  # the per-call tuple index
            names = names[:-1]
        *module, stat = names
        if modules is not None and tuple(module) not in modules:
            continue
        groups.setdefault(f"{stat}/{'.'.join(module)}", []).append(jnp.asarray(value, jnp.float32))
    with jax.named_scope(SCOPE):
        return {name: vs[0] if len(vs) == 1 else jnp.mean(jnp.stack(vs)) for name, vs in groups.items()}


def with_sown_stats(loss_fn: Callable) -> Callable:
    """Wrap ``loss_fn(model, batch, rng) -> (loss, aux)`` so aux also holds what the model sows.

    Every sub-module with a ``sow_stats`` attribute gets it set to True on the
    (freshly merged, traced) model, and values it sows as ``nnx.Intermediate``
    are captured and added to aux by :func:`sown_stats`; what other modules sow
    (activations a model keeps for its own use) is not. Models without such an
    attribute are called unchanged.
    """

    def wrapped(model: nnx.Module, batch, rng):
        opted = {tuple(str(k) for k in path) for path, m in nnx.iter_graph(model)
                 if isinstance(m, nnx.Module) and hasattr(m, "sow_stats")}
        model.set_attributes(sow_stats=True, raise_if_not_found=False)
        (loss, aux), sown = nnx.capture(loss_fn, nnx.Intermediate)(model, batch, rng)
        return loss, {**aux, **sown_stats(sown, modules=opted)}

    return wrapped


# ---------------------------------------------------------------- host side (the run loop)

_PREFIXES = ("grad_norm/", "update_ratio/", "attn_")


def is_diagnostic(key: str) -> bool:
    """Is ``key`` a metric this module adds (``grad_norm/wte``, ``clip_frac``, ...)?"""
    return key.startswith(_PREFIXES) or key in ("clipped", "clip_frac")


def interval_stats(steps: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Host-side summary of the per-step metrics of one log interval.

    ``clip_frac``: the fraction of the interval's steps whose gradient was
    clipped (the mean of ``clipped``); ``{}`` when the steps carry no ``clipped``.
    """
    flags = [float(m["clipped"]) for m in steps if "clipped" in m]
    return {"clip_frac": sum(flags) / len(flags)} if flags else {}
