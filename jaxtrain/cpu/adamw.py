"""``clip_by_global_norm`` + AdamW applied as one CPU kernel pass per parameter.

XLA:CPU runs an optax chain's update as many loop fusions per parameter
(clip, both moments, bias corrections, weight decay, learning rate, the add,
the skip-non-finite selects and the norm metrics), and with a donated state
it first copies each parameter and moment so that it can still read the old
value: ~1.3 GB of memory traffic per step for the 10.8M-parameter benchmark
GPT (``benchmarks/RESULTS.md``). The kernel here reads each gradient,
parameter and moment once and writes the new parameter and moments in place,
~0.3 GB.

It is the same arithmetic as optax, operation by operation, and is used only
for :func:`jaxtrain.make_optimizer`'s own chain (marked :class:`ClipAdamW`)
where the CPU kernels can run (float32 on one CPU device with MKL, as
:mod:`jaxtrain.cpu.kernels`). Optax itself still provides the state layout, the
step counters and the hyper-parameters in force (the learning-rate schedule):
its update is traced too, and XLA removes its unused per-parameter arithmetic.
``tests/cpu/test_adamw.py`` checks the result against the optax path.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtrain.cpu import blas
from jaxtrain.optim import ClipAdamW, optax_update

PyTree = Any

_TARGET = "jaxtrain_adamw"
_HP = ("norm", "max_norm", "b1", "b2", "eps", "eps_root", "weight_decay", "learning_rate", "bc1", "bc2", "apply")


def _is_adam(x) -> bool:
    return isinstance(x, optax.ScaleByAdamState)


def _has_hyperparams(x) -> bool:
    return hasattr(x, "hyperparams") and hasattr(x, "inner_state")


def why_not(tx: optax.GradientTransformation, params: PyTree, grads: PyTree) -> Optional[str]:
    """None if :func:`fused_update` can apply ``tx`` to these arrays, else why not.

    With ``fused=None`` the process must have one device, as for the model's
    kernels (:func:`jaxtrain.cpu.blas.why_not`); ``fused=True`` also runs with several.
    """
    return _plan(tx, params, grads)[0]


def _plan(tx, params: PyTree, grads: PyTree) -> tuple[Optional[str], Optional[PyTree]]:
    """``(why not, None)``, or ``(None, the weight-decay flags)`` when the kernel can run."""
    if not isinstance(tx, ClipAdamW) or tx.fused is False:
        return "the optimizer is not jaxtrain.make_optimizer's clip + AdamW chain with fused=None or True", None
    leaves = jax.tree.leaves(params) + jax.tree.leaves(grads)
    if not leaves:
        return "there are no parameters", None
    flags = _decay_flags(tx.mask, params)
    if flags is None:
        return "the weight-decay mask is not a pytree of Python bools like the params", None
    dtypes = sorted({str(x.dtype) for x in leaves} - {"float32"})
    if dtypes:
        return f"the fused AdamW kernel takes float32 params and gradients, not {', '.join(dtypes)}", None
    from jaxtrain.cpu import ops as cpu_ops

    reason = blas.why_not(*leaves, devices=tx.fused is None and not cpu_ops.all_devices())
    return reason, None if reason else flags


def _adamw_call(grad, param, mu, nu, hp, decayed: bool):
    like = jax.ShapeDtypeStruct(param.shape, jnp.float32)
    call = jax.ffi.ffi_call(_TARGET, (like, like, like, jax.ShapeDtypeStruct((2,), jnp.float32)),
                            input_output_aliases={1: 0, 2: 1, 3: 2}, vmap_method="sequential")
    return call(grad, param, mu, nu, hp, decayed=decayed)


def _decay_flags(mask, params: PyTree) -> Optional[PyTree]:
    """The weight-decay mask as a pytree of Python bools like ``params``; None if it is not static."""
    tree = mask(params) if callable(mask) else mask
    if tree is None:
        return jax.tree.map(lambda _: True, params)
    try:
        flags = jax.tree.map(lambda m, _: m, tree, params)
    except ValueError:  # a prefix mask or another structure: leave it to optax
        return None
    if not all(isinstance(f, (bool, np.bool_)) for f in jax.tree.leaves(flags)):
        return None
    return jax.tree.map(bool, flags)


def _optax_update_and_norms(tx, grads, opt_state, params, grad_norm, apply):
    """:func:`fused_update`'s results through optax (``grad_norm`` unused: optax's clip computes it)."""
    new_params, new_state, updates = optax_update(tx, grads, opt_state, params, apply)
    return new_params, new_state, optax.tree.norm(updates), optax.tree.norm(new_params)


def fused_update(tx: optax.GradientTransformation, grads: PyTree, opt_state: PyTree, params: PyTree,
                 grad_norm: jax.Array, apply: jax.Array | bool = True
                 ) -> Optional[tuple[PyTree, PyTree, jax.Array, jax.Array]]:
    """``tx``'s update applied in one kernel pass per parameter, or None where it cannot be.

    Args:
      tx: a :class:`ClipAdamW` (from :func:`jaxtrain.make_optimizer`).
      grads, opt_state, params: as for ``tx.update``; float32.
      grad_norm: the global norm of ``grads`` (the clip uses it).
      apply: a bool scalar; where False, params and the whole optimizer state
        stay as they were (the skip of a non-finite step).
    Returns:
      ``(params, opt_state, update_norm, param_norm)`` equal to
      ``optax.apply_updates(params, updates)``, the new state, ``optax.tree.norm(updates)``
      and the norm of the returned params; None when :func:`why_not` gives a
      reason, unless ``tx.fused`` is True: then ``RuntimeError`` with the reason.

    Differentiable: under ``jax.jvp`` / ``jax.grad`` (e.g. a meta-gradient through
    :func:`jaxtrain.train_step`) the update is :func:`optax_update`'s, whose
    derivatives JAX knows; plain evaluation runs the kernel.
    """
    def cannot(reason: str) -> None:
        if isinstance(tx, ClipAdamW) and tx.fused:
            raise RuntimeError(f"make_optimizer(fused=True) but the fused update cannot run: {reason}")

    reason, flags = _plan(tx, params, grads)
    if reason is None:
        shapes = jax.eval_shape(tx.update, grads, opt_state, params)[1]
        if len(_nodes(shapes, _is_adam)) != 1 or len(_nodes(shapes, _has_hyperparams)) != 1:
            reason = "the optimizer state does not hold exactly one Adam state with injected hyper-parameters"
    if reason is not None:
        return cannot(reason)
    update = jax.custom_jvp(functools.partial(_kernel_update, tx, flags))
    update.defjvp(lambda primals, tangents: jax.jvp(
        functools.partial(_optax_update_and_norms, tx), primals, tangents))
    return update(grads, opt_state, params, jnp.asarray(grad_norm, jnp.float32), jnp.asarray(apply, bool))


def _nodes(tree: PyTree, is_node) -> list:
    return [n for n in jax.tree.leaves(tree, is_leaf=is_node) if is_node(n)]


def _kernel_update(tx: ClipAdamW, flags: PyTree, grads: PyTree, opt_state: PyTree, params: PyTree,
                   grad_norm: jax.Array, apply: jax.Array) -> tuple[PyTree, PyTree, jax.Array, jax.Array]:
    # Optax's own update: the new counters and the hyper-parameters it used for
    # this step (schedules included). Only scalars of it are kept below, so XLA
    # drops its per-parameter arithmetic.
    _, reference = tx.update(grads, opt_state, params)
    (adam,), (injected,) = _nodes(reference, _is_adam), _nodes(reference, _has_hyperparams)
    hyper = injected.hyperparams
    (old_adam,) = _nodes(opt_state, _is_adam)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    # The bias corrections exactly as optax writes them (1 - decay ** count).
    cfg = tx.config  # the constants of the chain; only the learning rate is optimizer state
    values = dict(norm=grad_norm, max_norm=cfg.max_grad_norm, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                  eps_root=0.0, weight_decay=cfg.weight_decay,
                  learning_rate=hyper["learning_rate"], bc1=1 - cfg.b1 ** adam.count,
                  bc2=1 - cfg.b2 ** adam.count, apply=apply)
    hp = jnp.stack([f32(values[k]) for k in _HP])

    treedef = jax.tree.structure(params)
    columns = [treedef.flatten_up_to(t) for t in (grads, params, old_adam.mu, old_adam.nu, flags)]
    outs = [_adamw_call(g, p, m, v, hp, d) for g, p, m, v, d in zip(*columns)]
    new_params, mu, nu = (treedef.unflatten([o[i] for o in outs]) for i in range(3))
    sums = sum(o[3] for o in outs)

    # Every other leaf of the state (counters, hyper-parameters) from optax, or
    # the old one on a skipped step; then the kernel's moments.
    strip = lambda s: jax.tree.map(  # noqa: E731
        lambda n: n._replace(mu=None, nu=None) if _is_adam(n) else n, s, is_leaf=_is_adam)
    scalars = jax.tree.map(lambda n, o: jnp.where(apply, n, o), strip(reference), strip(opt_state))
    new_state = jax.tree.map(lambda n: n._replace(mu=mu, nu=nu) if _is_adam(n) else n, scalars, is_leaf=_is_adam)
    return new_params, new_state, jnp.sqrt(sums[0]), jnp.sqrt(sums[1])

