"""The optimizer: ``clip_by_global_norm`` then AdamW, with a schedule and a decay mask.

PyTorch's ``clip_grad_norm_(params, c); optimizer.step()`` is one optax chain
here. AdamW's hyper-parameters are wrapped in ``optax.inject_hyperparams`` so
the learning rate in force is read by name (``current_lr``), never by position.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import optax

from jaxtrain import fused_optim
from jaxtrain.config import OptimConfig, validate_optim

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
            raise ValueError(f"optim.schedule={other!r}: must be one of constant, cosine, wsd")
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


def make_optimizer(cfg: OptimConfig, total_steps: Optional[int] = None, *,
                   mask: Optional[Callable[[PyTree], PyTree] | PyTree] = None,
                   fused: Optional[bool] = None) -> optax.GradientTransformation:
    """``optax.chain(clip_by_global_norm(max_grad_norm), adamw(schedule, b1, b2, eps, wd, mask))``.

    Args:
      cfg: the optimizer section of the config.
      total_steps: length of the schedule when ``cfg.decay_steps`` is unset.
      mask: weight-decay mask (pytree of bools or a function of params);
        defaults to :func:`decay_mask` with ``cfg.decay_embeddings``.
      fused: None lets :func:`jaxtrain.train_step` apply the chain as one CPU
        kernel pass per parameter where the CPU kernels can run (float32, one
        CPU device, MKL; :mod:`jaxtrain.fused_optim`: the same arithmetic, ~3x
        faster); True requires it (also with several devices) and raises where
        it cannot run; False returns the plain optax chain. Either way
        ``jax.grad`` / ``jax.jvp`` through ``train_step`` (meta-gradients) give
        optax's derivatives: the fused update defines them by optax's update.

    Out-of-range settings (a NaN or non-positive ``lr``, ``b1``/``b2`` outside
    [0, 1), ``eps <= 0``, ...) raise :class:`jaxtrain.config.ConfigError`, a
    ``ValueError`` naming ``optim.<key>`` and what is valid.

    With the default mask, equal ``(cfg, total_steps)`` return the same
    transform object: ``tx`` is static metadata of :class:`TrainState`, so two
    states built from one config then share a pytree structure (and one
    compiled step) instead of differing by the identity of their functions.
    Example::

        tx = make_optimizer(OptimConfig(lr=1e-3, schedule="constant", warmup_steps=0))
    """
    validate_optim(cfg)
    if fused not in (None, True, False):
        raise ValueError(f"make_optimizer: fused={fused!r}; must be None (where the CPU kernels can run), "
                         "True or False")
    if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)
                                    or total_steps < 1):
        raise ValueError(f"make_optimizer: total_steps={total_steps!r}; must be a positive integer (the "
                         "schedule's length) or None with optim.decay_steps set")
    if total_steps is None and cfg.decay_steps is None and cfg.schedule != "constant":
        raise ValueError("make_optimizer: pass total_steps or set optim.decay_steps for a decaying schedule")
    if mask is None:
        return _default_optimizer(cfg, total_steps, fused)
    return _build(cfg, total_steps, mask, fused)


@functools.lru_cache(maxsize=64)
def _default_optimizer(cfg: OptimConfig, total_steps: Optional[int],
                       fused: Optional[bool]) -> optax.GradientTransformation:
    return _build(cfg, total_steps, lambda p: decay_mask(p, decay_embeddings=cfg.decay_embeddings), fused)


def _build(cfg: OptimConfig, total_steps: Optional[int], mask, fused: Optional[bool]) -> optax.GradientTransformation:
    schedule = make_schedule(cfg, total_steps or cfg.decay_steps or 1)
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
        learning_rate=schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask)
    clip = optax.clip_by_global_norm(cfg.max_grad_norm) if cfg.max_grad_norm > 0 else optax.identity()
    chain = optax.chain(clip, adamw)
    return chain if fused is False else fused_optim.clip_adamw(chain, max(cfg.max_grad_norm, 0.0), mask, fused)


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
