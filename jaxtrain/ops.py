"""The models' building blocks: one function per operation, plain XLA unless a backend replaces it.

The models call these and nothing lower, so they never know which library
runs a product: by default every op here is plain JAX (attention can ask for
``jax.nn.dot_product_attention``'s cuDNN kernel on NVIDIA GPUs). A backend,
such as the opt-in CPU kernels of :mod:`jaxtrain.cpu`, registers faster
implementations with :func:`register`; a registered implementation receives
the same arguments and returns the result, or ``NotImplemented`` for inputs it
does not take (another dtype, several devices), which then run plain.
Implementations must compute the same function to float rounding: they change
speed, never results.

The choice is made while JAX traces. Registering or unregistering clears
JAX's in-memory compilation caches (``jax.clear_caches``), so the next call of
a jitted function traces again with the implementations now in force.

Shapes: B batch, T time, N heads, H head size, C / K / F feature sizes.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp

__all__ = ["dense", "matmul", "layer_norm", "causal_attention", "add_positions", "rms_norm", "rotary", "swiglu",
           "register", "unregister", "registered", "OPS"]

OPS = ("dense", "matmul", "layer_norm", "causal_attention", "add_positions", "rms_norm", "rotary", "swiglu")
_impls: dict[str, Callable] = {}


def register(op: str, impl: Callable) -> None:
    """Run ``impl`` for ``op`` from now on (returning ``NotImplemented`` hands an input back to plain JAX)."""
    if op not in OPS:
        raise ValueError(f"ops.register: unknown op {op!r}; the ops are {', '.join(OPS)}")
    if _impls.get(op) is not impl:
        _impls[op] = impl
        jax.clear_caches()  # jitted functions would otherwise keep what they traced before


def unregister(op: str) -> None:
    """Back to the plain implementation of ``op``."""
    if _impls.pop(op, None) is not None:
        jax.clear_caches()


def registered() -> dict[str, Callable]:
    """The replaced ops and their implementations."""
    return dict(_impls)


def _dispatch(op: str, *args, **kwargs):
    impl = _impls.get(op)
    return NotImplemented if impl is None else impl(*args, **kwargs)


def dense(x_MK: jax.Array, kernel_KN: jax.Array, bias_N: Optional[jax.Array] = None, *,
          gelu: bool = False, approximate: bool = False) -> jax.Array:
    """``x @ kernel + bias`` over the last axis, then the exact (erf) GELU when ``gelu``.

    ``approximate`` (with ``gelu``) takes GELU's tanh approximation instead,
    ``0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))``: GPT-2's ``gelu_new``.
    A registered implementation sees ``approximate=True`` only when it is set,
    so one written before the keyword existed fails loudly rather than
    computing the exact GELU in its place.

    ``x`` may have any leading axes; they are flattened into one, so every
    forward and backward product is a plain 2-D matmul that reads its operands
    in place (a ``[B, T, K]`` operand would make the weight gradient contract
    over two axes, which XLA:CPU prepares with a transposing copy).
    """
    variant = {"approximate": True} if approximate else {}
    out = _dispatch("dense", x_MK, kernel_KN, bias_N, gelu=gelu, **variant)
    if out is not NotImplemented:
        return out
    x = x_MK.reshape(-1, x_MK.shape[-1])
    y = jnp.dot(x, kernel_KN.astype(x.dtype))
    if bias_N is not None:
        y = y + bias_N.astype(y.dtype)
    if gelu:
        y = jax.nn.gelu(y, approximate=approximate)  # exact by default, as torch's nn.GELU()
    return y.reshape(*x_MK.shape[:-1], -1)


def matmul(a: jax.Array, b: jax.Array, *, transpose_b: bool = False) -> jax.Array:
    """``a @ b`` (``b``'s last two axes swapped when ``transpose_b``) with equal leading axes."""
    out = _dispatch("matmul", a, b, transpose_b=transpose_b)
    if out is not NotImplemented:
        return out
    return a @ (jnp.swapaxes(b, -1, -2) if transpose_b else b)


def layer_norm(x: jax.Array, scale: Optional[jax.Array], bias: Optional[jax.Array], *, eps: float) -> jax.Array:
    """LayerNorm over the last axis, computed in float32 whatever the input and parameter dtypes.

    The same arithmetic as ``nnx.LayerNorm(dtype=float32)``: biased variance as
    ``E[x^2] - E[x]^2`` (clipped at 0), ``(x - mean) * (rsqrt(var + eps) * scale) + bias``.
    Returns float32.
    """
    out = _dispatch("layer_norm", x, scale, bias, eps=eps)
    if out is not NotImplemented:
        return out
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.maximum(jnp.square(x).mean(-1, keepdims=True) - jnp.square(mean), 0.0)
    mul = jax.lax.rsqrt(var + eps)
    if scale is not None:
        mul = mul * scale.astype(jnp.float32)
    y = (x - mean) * mul
    return y if bias is None else y + bias.astype(jnp.float32)


def causal_attention(qkv_BT3NH: jax.Array, *, dropout_rate: float = 0.0, dropout_key: Optional[jax.Array] = None,
                     implementation: Optional[str] = None) -> jax.Array:
    """Causal softmax attention on fused q/k/v ``[B, T, 3, N, H]`` -> ``[B, T, N, H]``.

    Scale ``1 / sqrt(H)``; position ``t`` attends to positions ``<= t``.
    ``dropout_rate > 0`` drops attention probabilities (``dropout_key`` then
    required). ``implementation``: None for the written-out attention (or a
    backend's), or a ``jax.nn.dot_product_attention`` implementation such as
    ``"cudnn"``, which has no dropout.
    """
    if implementation is not None:
        if dropout_rate > 0.0:
            raise ValueError(f"attention implementation {implementation!r} has no dropout; "
                             "use dropout 0 or the default implementation")
        return jax.nn.dot_product_attention(*jnp.unstack(qkv_BT3NH, axis=2), is_causal=True,
                                            implementation=implementation)
    out = _dispatch("causal_attention", qkv_BT3NH, dropout_rate=dropout_rate, dropout_key=dropout_key)
    if out is not NotImplemented:
        return out
    # Heads move in front of time once ([3, B, N, T, H]), so every attention
    # product, forward and backward, is batched over leading (B, N) axes; on
    # [B, T, N, H] operands XLA:CPU wraps each of them in transposing copies.
    q_BNTH, k_BNTH, v_BNTH = qkv_BT3NH.transpose(2, 0, 3, 1, 4)
    T, H = q_BNTH.shape[2], q_BNTH.shape[3]
    logits_BNTS = jnp.einsum("bnth,bnsh->bnts", q_BNTH, k_BNTH).astype(jnp.float32) / math.sqrt(H)
    # An iota comparison, not tril(ones): XLA folds a (T, T) constant at compile time, slowly for a large T.
    causal_TS = jax.lax.broadcasted_iota(jnp.int32, (T, T), 0) >= jax.lax.broadcasted_iota(jnp.int32, (T, T), 1)
    probs_BNTS = jax.nn.softmax(jnp.where(causal_TS, logits_BNTS, -jnp.inf), axis=-1)
    if dropout_rate > 0.0:
        keep = jax.random.bernoulli(dropout_key, 1.0 - dropout_rate, probs_BNTS.shape)
        probs_BNTS = jnp.where(keep, probs_BNTS / (1.0 - dropout_rate), 0.0)
    return jnp.einsum("bnts,bnsh->btnh", probs_BNTS.astype(v_BNTH.dtype), v_BNTH)


def add_positions(tok_BTC: jax.Array, pos_TC: jax.Array) -> jax.Array:
    """``tok_BTC + pos_TC``, broadcast over the batch (the position gradient is the batch sum)."""
    out = _dispatch("add_positions", tok_BTC, pos_TC)
    if out is not NotImplemented:
        return out
    return tok_BTC + pos_TC


def rms_norm(x: jax.Array, scale: Optional[jax.Array], *, eps: float) -> jax.Array:
    """RMSNorm over the last axis, returned in ``x``'s dtype.

    Hugging Face's ``LlamaRMSNorm`` order: normalise in float32
    (``x * rsqrt(mean(x^2) + eps)``), cast back to ``x``'s dtype, then multiply
    by ``scale`` (cast to that dtype).
    """
    out = _dispatch("rms_norm", x, scale, eps=eps)
    if out is not NotImplemented:
        return out
    x32 = x.astype(jnp.float32)
    y = (x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + eps)).astype(x.dtype)
    return y if scale is None else scale.astype(x.dtype) * y


def rotary(x_H: jax.Array, cos_H: jax.Array, sin_H: jax.Array) -> jax.Array:
    """Rotary position embedding with the "rotate half" pairing: ``x * cos + rotate_half(x) * sin``.

    ``rotate_half(x) = concat(-x2, x1)`` for the first and second halves
    ``x1, x2`` of the last axis (Hugging Face's Llama convention: feature ``i``
    pairs with ``i + H/2``, not with its neighbour). ``cos`` / ``sin`` broadcast
    against ``x`` (e.g. ``x [B, T, N, H]`` with ``cos [T, 1, H]``) and hold each
    frequency twice (``concat(angles, angles)``). Returns ``x``'s dtype.
    """
    out = _dispatch("rotary", x_H, cos_H, sin_H)
    if out is not NotImplemented:
        return out
    x1, x2 = jnp.split(x_H, 2, axis=-1)
    return x_H * cos_H.astype(x_H.dtype) + jnp.concatenate([-x2, x1], axis=-1) * sin_H.astype(x_H.dtype)


def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """``silu(gate) * up`` elementwise (``silu(g) = g * sigmoid(g)``): the gated MLP's hidden activation."""
    out = _dispatch("swiglu", gate, up)
    if out is not NotImplemented:
        return out
    return jax.nn.silu(gate) * up
