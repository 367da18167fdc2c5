"""The CPU backend's implementations of :mod:`jaxtrain.ops`, registered by :func:`jaxtrain.cpu.enable`.

Each takes float32 operands in a process with one CPU device (where a custom
call does not make XLA gather sharded operands onto every device) and returns
``NotImplemented`` for anything else, which then runs as plain XLA:

- ``dense``: MKL's sgemm on the 2-D product; bias + exact GELU as one fused kernel
  (the tanh-approximate GELU is handed back).
- ``matmul``: MKL's sgemm (the tied head's ``x @ wte.T``).
- Both, traced under ``jax.default_matmul_precision("bfloat16")``: oneDNN's
  bfloat16 product with float32 accumulation (:mod:`jaxtrain.cpu.onednn`) where
  it can run, else the float32 product above.
- ``layer_norm``: one fused kernel each way (float32 statistics, as the plain op).
- ``causal_attention``: the fused attention kernel without dropout; with
  dropout, the written-out attention whose two products are batched sgemm calls.
- ``add_positions``: the position gradient as a product with a vector of ones.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from jaxtrain.cpu import blas, kernels, onednn


# True: the kernels run also in a process with several devices (each custom call then gathers its
# operands onto every device): for tests and for single-device work in a multi-device process.
_all_devices = False


def set_all_devices(on: bool) -> None:
    global _all_devices
    _all_devices = bool(on)


def all_devices() -> bool:
    return _all_devices


def _takes(*arrays) -> bool:
    return blas.why_not(*(a for a in arrays if a is not None), devices=not _all_devices) is None


def _product(a: jax.Array, b: jax.Array, *, transpose_b: bool = False) -> jax.Array:
    """A 2-D float32 product: bfloat16 through oneDNN when the trace asks for that precision and it can run."""
    if onednn.requested() and onednn.why_not(a, b) is None:
        return onednn.matmul(a, b, transpose_b=transpose_b)
    return blas.matmul(a, b, transpose_b=transpose_b, use_blas=True)


def dense(x: jax.Array, kernel: jax.Array, bias: Optional[jax.Array], *, gelu: bool, approximate: bool = False):
    if (gelu and approximate) or not _takes(x, kernel, bias):  # the fused kernel is the exact GELU only
        return NotImplemented
    x_MK = x.reshape(-1, x.shape[-1])
    y_MN = _product(x_MK, kernel)
    if gelu:
        y_MN = kernels.bias_gelu(y_MN, bias, use_fused=True)
    elif bias is not None:
        y_MN = y_MN + bias
    return y_MN.reshape(*x.shape[:-1], -1)


def matmul(a: jax.Array, b: jax.Array, *, transpose_b: bool):
    if not _takes(a, b):
        return NotImplemented
    if a.ndim == 2:
        return _product(a, b, transpose_b=transpose_b)
    return blas.matmul(a, b, transpose_b=transpose_b, use_blas=True)


def layer_norm(x: jax.Array, scale: Optional[jax.Array], bias: Optional[jax.Array], *, eps: float):
    # float32 statistics and output whatever the params' dtype (under train_step's compute_dtype
    # they arrive as bfloat16 next to float32 activations), as the plain op computes.
    f32 = lambda p: None if p is None else p.astype(jnp.float32)  # noqa: E731
    if scale is None or not _takes(x):
        return NotImplemented
    return kernels.layer_norm(x, f32(scale), f32(bias), eps=eps, use_fused=True)


def causal_attention(qkv_BT3NH: jax.Array, *, dropout_rate: float, dropout_key: Optional[jax.Array]):
    if not _takes(qkv_BT3NH):
        return NotImplemented
    if dropout_rate == 0.0:
        return kernels.causal_attention(qkv_BT3NH, use_fused=True)
    q_BNTH, k_BNTH, v_BNTH = qkv_BT3NH.transpose(2, 0, 3, 1, 4)
    T, H = q_BNTH.shape[2], q_BNTH.shape[3]
    logits_BNTS = blas.matmul(q_BNTH, k_BNTH, transpose_b=True, use_blas=True) / math.sqrt(H)
    probs_BNTS = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((T, T), dtype=bool)), logits_BNTS, -jnp.inf), axis=-1)
    keep = jax.random.bernoulli(dropout_key, 1.0 - dropout_rate, probs_BNTS.shape)
    probs_BNTS = jnp.where(keep, probs_BNTS / (1.0 - dropout_rate), 0.0)
    return blas.matmul(probs_BNTS, v_BNTH, use_blas=True).transpose(0, 2, 1, 3)


@jax.custom_vjp
def _add_positions(tok_BTC: jax.Array, pos_TC: jax.Array) -> jax.Array:
    return tok_BTC + pos_TC


def _add_positions_fwd(tok_BTC, pos_TC):
    # Residuals must be arrays: empty ones carry the two input dtypes for the cotangents.
    return tok_BTC + pos_TC, (jnp.zeros((0,), tok_BTC.dtype), jnp.zeros((0,), pos_TC.dtype))


def _add_positions_bwd(dtypes, g_BTC):
    # The position gradient is the sum over the batch. XLA:CPU reduces a [B, T, C]
    # array over its leading axis ~25x slower (4.5 ms at 8 x 256 x 384) than it
    # computes the same sum as a product with a vector of ones (0.16 ms).
    tok_dtype, pos_dtype = (d.dtype for d in dtypes)
    ones_B = jnp.ones(g_BTC.shape[0], g_BTC.dtype)
    g_TC = jnp.einsum("b,btc->tc", ones_B, g_BTC, preferred_element_type=jnp.float32)
    return g_BTC.astype(tok_dtype), g_TC.astype(pos_dtype)


_add_positions.defvjp(_add_positions_fwd, _add_positions_bwd)


def add_positions(tok_BTC: jax.Array, pos_TC: jax.Array):
    if jax.devices()[0].platform != "cpu" or tok_BTC.ndim != 3:
        return NotImplemented
    return _add_positions(tok_BTC, pos_TC)


IMPLEMENTATIONS = {"dense": dense, "matmul": matmul, "layer_norm": layer_norm,
                   "causal_attention": causal_attention, "add_positions": add_positions}
