"""The same GPT step written the plain way in JAX + optax: the baseline jaxtrain must beat.

A params dict, a forward pass on ``[B, T, C]`` activations with
``jax.nn.dot_product_attention``, ``optax.softmax_cross_entropy_with_integer_labels``,
``optax.chain(clip_by_global_norm, adamw)`` and ``jax.jit`` with donation: what a
JAX user writes first, with no attention to layouts. Same architecture, init
scheme and hyper-parameters as :mod:`jaxtrain.models.gpt` and
``benchmarks/torch_gpt.py`` (pre-LN, exact GELU, tied embeddings, biases).

Example::

    params = init_params(jax.random.key(0), n_layer=2, n_head=4, n_embd=64, vocab=256, block=32)
    tx = make_tx(lr=1e-3)
    step = make_step(tx, n_head=4)
    params, opt_state, loss = step(params, tx.init(params), x_BT, y_BT)
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import optax


def init_params(key: jax.Array, *, n_layer: int, n_head: int, n_embd: int, vocab: int, block: int) -> dict:
    """GPT-2 initialisation: normal(0.02) weights, residual projections scaled by 1/sqrt(2 * n_layer)."""
    del n_head  # heads only split the width
    C, std, proj_std = n_embd, 0.02, 0.02 / math.sqrt(2 * n_layer)
    keys = iter(jax.random.split(key, 2 + 4 * n_layer))
    normal = lambda shape, s=std: s * jax.random.normal(next(keys), shape)  # noqa: E731
    ln = lambda: {"scale": jnp.ones(C), "bias": jnp.zeros(C)}  # noqa: E731
    layer = lambda: {  # noqa: E731
        "ln_1": ln(), "ln_2": ln(),
        "attn_w": normal((C, 3 * C)), "attn_b": jnp.zeros(3 * C),
        "proj_w": normal((C, C), proj_std), "proj_b": jnp.zeros(C),
        "fc_w": normal((C, 4 * C)), "fc_b": jnp.zeros(4 * C),
        "fcp_w": normal((4 * C, C), proj_std), "fcp_b": jnp.zeros(C),
    }
    return {"wte": normal((vocab, C)), "wpe": normal((block, C)),
            "h": [layer() for _ in range(n_layer)], "ln_f": ln()}


def _layer_norm(p: dict, x: jax.Array) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]


def forward(params: dict, idx_BT: jax.Array, *, n_head: int) -> jax.Array:
    """Logits ``[B, T, V]`` for token ids ``[B, T]``."""
    B, T = idx_BT.shape
    x = params["wte"][idx_BT] + params["wpe"][:T]
    C = x.shape[-1]
    for p in params["h"]:
        qkv = (_layer_norm(p["ln_1"], x) @ p["attn_w"] + p["attn_b"]).reshape(B, T, 3, n_head, C // n_head)
        y = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], is_causal=True)
        x = x + y.reshape(B, T, C) @ p["proj_w"] + p["proj_b"]
        h = jax.nn.gelu(_layer_norm(p["ln_2"], x) @ p["fc_w"] + p["fc_b"], approximate=False)
        x = x + h @ p["fcp_w"] + p["fcp_b"]
    return _layer_norm(params["ln_f"], x) @ params["wte"].T


def make_tx(lr: float, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8, weight_decay: float = 0.1,
            max_norm: float = 1.0) -> optax.GradientTransformation:
    """``clip_by_global_norm`` then AdamW; matrices (ndim >= 2) decay, as in nanoGPT."""
    mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    return optax.chain(optax.clip_by_global_norm(max_norm),
                       optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask))


def make_step(tx: optax.GradientTransformation, *, n_head: int):
    """Jitted ``step(params, opt_state, x_BT, y_BT) -> (params, opt_state, loss)``; donates params and opt_state."""

    def loss_fn(params, x_BT, y_BT):
        logits = forward(params, x_BT, n_head=n_head)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y_BT).mean()

    @partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, x_BT, y_BT):
        loss, grads = jax.value_and_grad(loss_fn)(params, x_BT, y_BT)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step
