"""The optimizer: ``clip_by_global_norm`` then AdamW, with a schedule and a decay mask.

PyTorch's ``clip_grad_norm_(params, c); optimizer.step()`` is one optax chain
here. The learning rate is wrapped in ``optax.inject_hyperparams``, so the
rate in force is read by name (:func:`current_lr`), never by position; the
other hyper-parameters are constants of the transform, not optimizer state.

:func:`apply_update` is how :func:`jaxtrain.train_step` applies an update:
optax's ``update`` + ``apply_updates``, unless a backend registered a faster
update for :func:`make_optimizer`'s own chain (:func:`register_update`; the
CPU backend's fused clip + AdamW kernel is one) with the same arithmetic.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from jaxtrain.errors import ConfigError
from jaxtrain.optim_config import SCHEDULES, OptimConfig, validate_optim

__all__ = ["OptimConfig", "SCHEDULES", "validate_optim", "make_optimizer", "make_schedule", "decay_mask",
           "ClipAdamW", "current_lr", "apply_update", "optax_update", "register_update", "registered_update"]

PyTree = Any


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Learning rate as a function of the step.

    - ``constant``: ``lr`` after a linear warmup.
    - ``cosine``: linear warmup, then cosine decay to ``lr * min_lr_ratio`` at ``total_steps``.
    - ``wsd``: warmup, stable at ``lr``, then linear decay to ``lr * min_lr_ratio`` over the
      last ``wsd_decay_fraction`` of the steps (fewer when the warmup leaves fewer: the decay
      always ends at ``total_steps``).

    The schedule's length is ``cfg.decay_steps`` when set, else ``total_steps``; a
    ``warmup_steps`` longer than that is cut to it (the lr reaches ``lr`` at the
    last step). Past the length the lr stays at its last value.
    """
    total = max(cfg.decay_steps or total_steps, 1)
    warmup = min(cfg.warmup_steps, total)
    peak, end = cfg.lr, cfg.lr * cfg.min_lr_ratio
    # Starting the warmup at exactly 0 would waste step 0 (a zero update), so
    # warmup_init=0 means "lr / (warmup_steps + 1)", as nanoGPT's warmup does.
    init = peak * (cfg.warmup_init if cfg.warmup_init > 0 else 1.0 / (warmup + 1))
    warm = optax.linear_schedule(init, peak, warmup) if warmup else optax.constant_schedule(peak)
    match cfg.schedule:
        case "constant":
            rest = optax.constant_schedule(peak)
        case "cosine":
            rest = optax.cosine_decay_schedule(peak, max(total - warmup, 1), alpha=cfg.min_lr_ratio)
        case "wsd":
            decay = max(min(int(round(total * cfg.wsd_decay_fraction)), total - warmup), 1)
            stable = max(total - warmup - decay, 0)
            rest = optax.join_schedules(
                [optax.constant_schedule(peak), optax.linear_schedule(peak, end, decay)], [stable])
        case other:
            raise ConfigError(f"optim.schedule={other!r}: must be one of constant, cosine, wsd")
    return optax.join_schedules([warm, rest], [warmup]) if warmup else rest


def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def decay_mask(params: PyTree, *, decay_embeddings: bool = True) -> PyTree:
    """True for leaves that get weight decay: weight matrices (ndim >= 2).

    Biases and LayerNorm scales (ndim < 2) never decay, as in nanoGPT's parameter
    groups. Embedding tables (a path component named ``embedding``, Flax's name
    in ``nnx.Embed``) decay only when ``decay_embeddings``.
    """

    def rule(path, leaf) -> bool:
        if getattr(leaf, "ndim", 0) < 2:
            return False
        return decay_embeddings or "embedding" not in _path_names(path)

    return jax.tree_util.tree_map_with_path(rule, params)


def make_optimizer(config: Optional[OptimConfig] = None, total_steps: Optional[int] = None, *,
                   mask: Optional[Callable[[PyTree], PyTree] | PyTree] = None,
                   fused: Optional[bool] = None, **settings: Any) -> "ClipAdamW":
    """``optax.chain(clip_by_global_norm(max_grad_norm), adamw(schedule, b1, b2, eps, wd, mask))``.

    Args:
      config: an :class:`OptimConfig`; None starts from its defaults.
      total_steps: length of the schedule when ``decay_steps`` is unset.
      mask: weight-decay mask (pytree of bools or a function of params);
        defaults to :func:`decay_mask` with ``decay_embeddings``.
      fused: None lets a backend that registered an update for this chain
        (:func:`register_update`; e.g. :func:`jaxtrain.cpu.enable`) apply it
        where it can run; True requires one and raises where none can; False
        always takes optax's own update. Either way ``jax.grad`` / ``jax.jvp``
        through ``train_step`` give optax's derivatives.
      **settings: any :class:`OptimConfig` field, overriding ``config``'s, e.g.
        ``make_optimizer(lr=1e-3, schedule="constant")``.

    Out-of-range settings (a NaN or non-positive ``lr``, ``b1``/``b2`` outside
    [0, 1), ``eps <= 0``, ...) raise :class:`jaxtrain.errors.ConfigError`, a
    ``ValueError`` naming ``optim.<key>`` and what is valid.

    With the default mask, equal settings return the same transform object:
    ``tx`` is static metadata of :class:`TrainState`, so two states built from
    one config then share a pytree structure (and one compiled step) instead
    of differing by the identity of their functions. Example::

        tx = make_optimizer(lr=1e-3, schedule="constant", warmup_steps=0)
    """
    if config is not None and not isinstance(config, OptimConfig):
        raise TypeError(f"make_optimizer: config must be an OptimConfig or None, got {type(config).__name__}")
    config = config or OptimConfig()
    unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(OptimConfig)})
    if unknown:
        raise TypeError(f"make_optimizer got unknown setting(s) {', '.join(unknown)}; the settings are the "
                        f"OptimConfig fields: {', '.join(f.name for f in dataclasses.fields(OptimConfig))}")
    cfg = dataclasses.replace(config, **settings) if settings else config
    validate_optim(cfg)
    if fused not in (None, True, False):
        raise ValueError(f"make_optimizer: fused={fused!r}; must be None (a registered fused update where it "
                         "can run), True or False")
    if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)
                                    or total_steps < 1):
        raise ValueError(f"make_optimizer: total_steps={total_steps!r}; must be a positive integer (the "
                         "schedule's length) or None with optim.decay_steps set")
    if total_steps is None and cfg.decay_steps is None and cfg.schedule != "constant":
        raise ValueError("make_optimizer: pass total_steps or set optim.decay_steps for a decaying schedule")
    if mask is None:
        return _default_optimizer(cfg, total_steps, fused)
    return _build(cfg, total_steps, mask, fused)


class ClipAdamW(optax.GradientTransformationExtraArgs):
    """:func:`make_optimizer`'s chain: an ordinary optax transform (``init`` / ``update``) that also
    carries its settings, for a backend that applies the same update another way.

    Attributes: ``config`` (the :class:`OptimConfig`), ``mask`` (the weight-decay
    mask: a pytree of bools or a function of params) and ``fused`` (None, True or
    False, as passed to :func:`make_optimizer`).
    """

    config: OptimConfig
    mask: Any
    fused: Optional[bool]


@functools.lru_cache(maxsize=64)
def _default_optimizer(cfg: OptimConfig, total_steps: Optional[int], fused: Optional[bool]) -> ClipAdamW:
    return _build(cfg, total_steps, lambda p: decay_mask(p, decay_embeddings=cfg.decay_embeddings), fused)


# Only the learning rate is optimizer state; the other AdamW arguments are constants of the transform.
_STATIC_ADAMW_ARGS = ("b1", "b2", "eps", "eps_root", "weight_decay", "mask", "mu_dtype", "nesterov")


def _build(cfg: OptimConfig, total_steps: Optional[int], mask, fused: Optional[bool]) -> ClipAdamW:
    schedule = make_schedule(cfg, total_steps or cfg.decay_steps or 1)
    adamw = optax.inject_hyperparams(optax.adamw, static_args=_STATIC_ADAMW_ARGS)(
        learning_rate=schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask)
    clip = optax.clip_by_global_norm(cfg.max_grad_norm) if cfg.max_grad_norm > 0 else optax.identity()
    chain = optax.chain(clip, adamw)
    tx = ClipAdamW(chain.init, chain.update)
    tx.config, tx.mask, tx.fused = cfg, mask, fused
    return tx


# ---------------------------------------------------------------- applying an update

# A backend's update for make_optimizer's chain: (tx, grads, opt_state, params, grad_norm, apply) ->
# (params, opt_state, update_norm, param_norm), or None where it cannot run (with the reason in
# fused_unavailable). Set by register_update.
_update_impl: Optional[Callable] = None


def register_update(impl: Optional[Callable]) -> None:
    """Let ``impl`` apply :class:`ClipAdamW` updates (None: back to optax's).

    ``impl(tx, grads, opt_state, params, grad_norm, apply)`` returns
    ``(new_params, new_opt_state, update_norm, param_norm)`` equal to
    :func:`optax_update`'s to float rounding, or ``None`` for inputs it does not
    take. Like :func:`jaxtrain.ops.register`, a change clears JAX's in-memory
    compilation caches, so jitted steps trace again with it.
    """
    global _update_impl
    if impl is not _update_impl:
        _update_impl = impl
        jax.clear_caches()


def registered_update() -> Optional[Callable]:
    """The update registered with :func:`register_update`, or None."""
    return _update_impl


def optax_update(tx: optax.GradientTransformation, grads: PyTree, opt_state: PyTree, params: PyTree,
                 apply: jax.Array | bool = True) -> tuple[PyTree, PyTree, PyTree]:
    """``tx``'s update through optax itself: ``(params, opt_state, updates)``.

    Where ``apply`` is False, params and optimizer state stay as they were
    (``apply=True``, the Python constant, adds no selects).
    """
    updates, new_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    if apply is not True:
        new_params, new_state = jax.tree.map(lambda n, o: jnp.where(apply, n, o), (new_params, new_state),
                                             (params, opt_state))
    return new_params, new_state, updates


def apply_update(tx: optax.GradientTransformation, grads: PyTree, opt_state: PyTree, params: PyTree,
                 grad_norm: jax.Array, apply: jax.Array | bool = True, *, need_updates: bool = False
                 ) -> tuple[PyTree, PyTree, jax.Array, jax.Array, Optional[PyTree]]:
    """One optimizer update: ``(params, opt_state, update_norm, param_norm, updates)``.

    A registered backend update (:func:`register_update`) applies a
    :class:`ClipAdamW` chain unless ``tx.fused`` is False or ``need_updates``
    asks for the update tree itself (then ``updates`` is None on that path);
    everything else goes through :func:`optax_update`. Where ``apply`` is
    False, params and optimizer state stay as they were.
    """
    if isinstance(tx, ClipAdamW) and tx.fused is not False and not need_updates:
        out = None if _update_impl is None else _update_impl(tx, grads, opt_state, params, grad_norm, apply)
        if out is not None:
            return (*out, None)
        if tx.fused:
            raise RuntimeError("make_optimizer(fused=True) but no fused update can run here: enable a backend "
                               "that provides one (jaxtrain.cpu.enable()) or pass fused=None")
    params, opt_state, updates = optax_update(tx, grads, opt_state, params, apply)
    return params, opt_state, optax.tree.norm(updates), optax.tree.norm(params), updates


def current_lr(opt_state: PyTree) -> Optional[jax.Array]:
    """The learning rate used by the last update, found by name in ``opt_state``.

    Works for any transform built with ``optax.inject_hyperparams``; returns None
    when no injected ``learning_rate`` exists.
    """
    injected = jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "hyperparams"))
    for node in injected:
        if "learning_rate" in getattr(node, "hyperparams", {}):
            return node.hyperparams["learning_rate"]
    return None
