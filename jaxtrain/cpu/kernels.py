"""Fused float32 CPU kernels for the GPT: causal attention, bias + GELU, LayerNorm.

XLA:CPU runs a transformer's softmax, GELU and LayerNorm as several loop
fusions over memory (``benchmarks/RESULTS.md``: ~0.7-1.9 ns per element
each). These kernels do the same work in one pass each way, as XLA FFI calls
into ``_cpu_kernels.cc`` (built and loaded with :mod:`jaxtrain.cpu.blas`, under
the same conditions: float32 on one CPU device with MKL; :func:`why_not` says
why not). They are differentiable to any order in reverse mode (first-order
gradients run the backward kernels; higher orders, such as a gradient penalty
or a Hessian-vector product, differentiate the plain JAX definitions) and
match the plain JAX definitions to float rounding; ``tests/cpu/test_kernels.py`` checks values and
gradients against them.

- :func:`causal_attention`: softmax attention with a causal mask, read from
  and written to the fused ``[B, T, 3, N, H]`` q/k/v layout of a ``c_attn``
  projection (no transposes). Keys after each query are skipped, the
  probabilities stay in cache, and the backward recomputes them from the
  saved log-sum-exp (``[B, N, T]``) instead of keeping ``[B, N, T, T]``. The
  products are AVX-512 register tiles when the head size is a multiple of 16
  (and the CPU has AVX-512), single-threaded BLAS calls otherwise.
- :func:`bias_gelu`: ``gelu(y + b)`` (the exact, erf-based GELU), whose
  backward also sums the bias gradient in the same pass.
- :func:`layer_norm`: LayerNorm over the last axis, saving each row's mean
  and ``1 / std``; its backward sums the scale and bias gradients in the same
  pass.

Each falls back to its plain JAX definition (``reference_*``) where the
kernels cannot run, and for empty arrays.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrain.cpu import blas

__all__ = ["causal_attention", "bias_gelu", "layer_norm", "why_not", "reference_attention", "reference_bias_gelu",
           "reference_layer_norm"]


def why_not(*arrays: jax.Array) -> Optional[str]:
    """None if the fused kernels can run on these operands in this process, else why not."""
    return blas.why_not(*arrays, devices=True)


def _use_kernel(use_fused: Optional[bool], x: jax.Array, *operands: jax.Array) -> bool:
    """``use_fused`` resolved as :func:`jaxtrain.cpu.blas.resolve` does; empty or 0-d ``x`` takes plain JAX."""
    return blas.resolve(use_fused, x, *operands, setting="use_fused=True") and x.ndim > 0 and x.size > 0


def _f32(*shape: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def _ffi(target: str, results, reference, *args: jax.Array, **attrs):
    """The kernel ``target`` on ``args``, with the derivatives of ``reference(*args)`` (plain JAX)."""
    call = jax.ffi.ffi_call(target, results, vmap_method="sequential")
    kernel = (lambda *a: tuple(call(*a, **attrs))) if isinstance(results, tuple) else functools.partial(call, **attrs)
    return blas.with_reference_jvp(kernel, reference)(*args)


# --------------------------------------------------------------------------- attention

def _causal_logits(qkv_BT3NH: jax.Array) -> jax.Array:
    """``q k^T / sqrt(H)`` as ``[B, N, T, T]``, -inf above the diagonal."""
    q, k, _ = jnp.unstack(qkv_BT3NH, axis=2)
    T, H = q.shape[1], q.shape[-1]
    logits = jnp.einsum("btnh,bsnh->bnts", q, k) / math.sqrt(H)
    return jnp.where(jnp.tril(jnp.ones((T, T), bool)), logits, -jnp.inf)


def reference_attention(qkv_BT3NH: jax.Array) -> jax.Array:
    """Causal softmax attention in plain JAX: ``[B, T, 3, N, H]`` -> ``[B, T, N, H]``."""
    v = qkv_BT3NH[:, :, 2]
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(_causal_logits(qkv_BT3NH), axis=-1), v)


def _scale(qkv) -> np.float32:
    return np.float32(1.0 / math.sqrt(qkv.shape[-1]))


def _reference_attention_and_lse(qkv_BT3NH):
    """``(reference_attention(qkv), lse)``: the kernel's outputs, the log-sum-exp ``[B, N, T]`` of the scaled logits."""
    return reference_attention(qkv_BT3NH), jax.nn.logsumexp(_causal_logits(qkv_BT3NH), axis=-1)


def _reference_attention_bwd(qkv, y, lse, dy):
    return jax.vjp(reference_attention, qkv)[1](dy)[0]  # y and lse are functions of qkv


def _attention_fwd_call(qkv):
    B, T, _, N, H = qkv.shape
    return _ffi("jaxtrain_attention_fwd", (_f32(B, T, N, H), _f32(B, N, T)), _reference_attention_and_lse, qkv,
                scale=_scale(qkv))


@jax.custom_vjp
def _fused_attention(qkv):
    return _attention_fwd_call(qkv)[0]


def _fused_attention_fwd(qkv):
    y, lse = _attention_fwd_call(qkv)
    return y, (qkv, y, lse)


def _fused_attention_bwd(res, dy):
    qkv, y, lse = res
    return (_ffi("jaxtrain_attention_bwd", _f32(*qkv.shape), _reference_attention_bwd, qkv, y, lse, dy,
                 scale=_scale(qkv)),)


_fused_attention.defvjp(_fused_attention_fwd, _fused_attention_bwd)


def causal_attention(qkv_BT3NH: jax.Array, *, use_fused: Optional[bool] = None) -> jax.Array:
    """Causal softmax attention on fused q/k/v ``[B, T, 3, N, H]`` -> ``[B, T, N, H]``.

    Scale ``1 / sqrt(H)``, position ``t`` attends to positions ``<= t``, no
    dropout. ``use_fused``: None uses the fused kernel when it can run here
    (:func:`why_not`), False the plain JAX definition, True requires the
    kernel (``RuntimeError`` saying why it cannot run).
    """
    if qkv_BT3NH.ndim != 5 or qkv_BT3NH.shape[2] != 3:
        raise ValueError(f"causal_attention needs q/k/v as [B, T, 3, N, H], got shape {qkv_BT3NH.shape}")
    if _use_kernel(use_fused, qkv_BT3NH):
        return _fused_attention(qkv_BT3NH)
    return reference_attention(qkv_BT3NH)


# --------------------------------------------------------------------------- GELU

def reference_bias_gelu(y: jax.Array, bias: Optional[jax.Array]) -> jax.Array:
    """``gelu(y + bias)``, the exact GELU, in plain JAX."""
    return jax.nn.gelu(y if bias is None else y + bias, approximate=False)


def _gelu_fwd_call(y_MF, b_F):
    return _ffi("jaxtrain_gelu_fwd", _f32(*y_MF.shape), reference_bias_gelu, y_MF, b_F)


@jax.custom_vjp
def _fused_bias_gelu(y_MF, b_F):
    return _gelu_fwd_call(y_MF, b_F)


def _fused_bias_gelu_fwd(y_MF, b_F):
    return _gelu_fwd_call(y_MF, b_F), (y_MF, b_F)


def _fused_bias_gelu_bwd(res, dh_MF):
    y_MF, b_F = res
    reference = lambda y, b, dh: jax.vjp(reference_bias_gelu, y, b)[1](dh)  # noqa: E731
    return _ffi("jaxtrain_gelu_bwd", (_f32(*y_MF.shape), _f32(*b_F.shape)), reference, y_MF, b_F, dh_MF)


_fused_bias_gelu.defvjp(_fused_bias_gelu_fwd, _fused_bias_gelu_bwd)


def bias_gelu(y: jax.Array, bias: Optional[jax.Array] = None, *, use_fused: Optional[bool] = None) -> jax.Array:
    """``gelu(y + bias)`` with the exact (erf) GELU, as ``jax.nn.gelu(..., approximate=False)``.

    ``y``: ``[..., F]``; ``bias``: ``[F]`` or None. ``use_fused`` as in
    :func:`causal_attention`.
    """
    if bias is not None and bias.shape != y.shape[-1:]:
        raise ValueError(f"bias_gelu needs a bias of shape {y.shape[-1:]}, got {bias.shape}")
    if not _use_kernel(use_fused, y, *([] if bias is None else [bias])):
        return reference_bias_gelu(y, bias)
    b_F = jnp.zeros(y.shape[-1:], jnp.float32) if bias is None else bias
    return _fused_bias_gelu(y.reshape(-1, y.shape[-1]), b_F).reshape(y.shape)


# --------------------------------------------------------------------------- LayerNorm

def reference_layer_norm(x: jax.Array, scale: jax.Array, bias: Optional[jax.Array], eps: float) -> jax.Array:
    """LayerNorm over the last axis in plain JAX: ``(x - mean) / sqrt(var + eps) * scale + bias``."""
    mean = x.mean(-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(jnp.square(x - mean).mean(-1, keepdims=True) + eps) * scale
    return y if bias is None else y + bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused_layer_norm(x_MC, g_C, b_C, eps):
    return _layer_norm_fwd_call(x_MC, g_C, b_C, eps)[0]


def _reference_layer_norm_and_stats(x_MC, g_C, b_C, eps):
    """The forward kernel's outputs in plain JAX: ``(y, mean [M], 1 / std [M])``."""
    mean = x_MC.mean(-1)
    rstd = jax.lax.rsqrt(jnp.square(x_MC - mean[:, None]).mean(-1) + np.float32(eps))
    return (x_MC - mean[:, None]) * rstd[:, None] * g_C + b_C, mean, rstd


def _layer_norm_fwd_call(x_MC, g_C, b_C, eps):
    M, C = x_MC.shape
    reference = functools.partial(_reference_layer_norm_and_stats, eps=eps)
    return _ffi("jaxtrain_layer_norm_fwd", (_f32(M, C), _f32(M), _f32(M)), reference, x_MC, g_C, b_C,
                eps=np.float32(eps))


def _fused_layer_norm_fwd(x_MC, g_C, b_C, eps):
    y, mean, rstd = _layer_norm_fwd_call(x_MC, g_C, b_C, eps)
    return y, (x_MC, g_C, mean, rstd)


def _fused_layer_norm_bwd(eps, res, dy_MC):
    x_MC, g_C, mean, rstd = res
    results = (_f32(*x_MC.shape), _f32(*g_C.shape), _f32(*g_C.shape))

    def reference(x, g, mean, rstd, dy):  # mean and rstd are functions of x
        return jax.vjp(lambda x, g, b: reference_layer_norm(x, g, b, eps), x, g, jnp.zeros_like(g))[1](dy)
    return _ffi("jaxtrain_layer_norm_bwd", results, reference, x_MC, g_C, mean, rstd, dy_MC)


_fused_layer_norm.defvjp(_fused_layer_norm_fwd, _fused_layer_norm_bwd)


def layer_norm(x: jax.Array, scale: jax.Array, bias: Optional[jax.Array] = None, *, eps: float = 1e-5,
               use_fused: Optional[bool] = None) -> jax.Array:
    """LayerNorm over the last axis of ``x`` (``[..., C]``) with ``scale`` and ``bias`` of shape ``[C]``.

    The variance is the biased one (as ``torch.nn.LayerNorm`` and Flax's);
    ``use_fused`` as in :func:`causal_attention`.
    """
    for name, v in (("scale", scale), ("bias", bias)):
        if v is not None and v.shape != x.shape[-1:]:
            raise ValueError(f"layer_norm needs a {name} of shape {x.shape[-1:]}, got {v.shape}")
    if not _use_kernel(use_fused, x, scale, *([] if bias is None else [bias])):
        return reference_layer_norm(x, scale, bias, eps)
    b_C = jnp.zeros(x.shape[-1:], jnp.float32) if bias is None else bias
    return _fused_layer_norm(x.reshape(-1, x.shape[-1]), scale, b_C, float(eps)).reshape(x.shape)
