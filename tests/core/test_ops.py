"""``jaxtrain.ops``: the plain implementations match Flax's layers, and a registered backend
implementation runs where it takes the input, hands the rest back, and retraces jitted code."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtrain import ops


def _normal(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def test_plain_dense_and_layer_norm_match_flax_layers():
    x = _normal((2, 5, 8), 0)
    linear = nnx.Linear(8, 6, rngs=nnx.Rngs(0), bias_init=nnx.initializers.normal(1.0))
    y = ops.dense(x, linear.kernel[...], linear.bias[...])
    np.testing.assert_allclose(y, linear(x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ops.dense(x, linear.kernel[...], linear.bias[...], gelu=True),
                               jax.nn.gelu(linear(x), approximate=False), rtol=1e-6, atol=1e-6)
    ln = nnx.LayerNorm(8, epsilon=1e-5, dtype=jnp.float32, rngs=nnx.Rngs(0),
                       scale_init=nnx.initializers.normal(1.0), bias_init=nnx.initializers.normal(1.0))
    got = ops.layer_norm(x.astype(jnp.bfloat16), ln.scale[...], ln.bias[...], eps=1e-5)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, ln(x.astype(jnp.bfloat16)), rtol=1e-6, atol=1e-6)


def test_plain_causal_attention_matches_jax_dot_product_attention():
    qkv = _normal((2, 7, 3, 2, 4), 1)
    expected = jax.nn.dot_product_attention(*jnp.unstack(qkv, axis=2), is_causal=True)
    np.testing.assert_allclose(ops.causal_attention(qkv), expected, rtol=1e-5, atol=1e-6)
    # dropout: a kept probability is scaled by 1 / (1 - rate), the same key gives the same result
    key = jax.random.key(0)
    a = ops.causal_attention(qkv, dropout_rate=0.5, dropout_key=key)
    np.testing.assert_array_equal(a, ops.causal_attention(qkv, dropout_rate=0.5, dropout_key=key))
    assert not np.allclose(a, expected)
    with pytest.raises(ValueError, match="implementation 'cudnn' has no dropout"):
        ops.causal_attention(qkv, dropout_rate=0.1, dropout_key=key, implementation="cudnn")


def test_a_registered_implementation_runs_where_it_takes_the_input_and_retraces():
    calls = []

    def doubled_matmul(a, b, *, transpose_b):
        calls.append(a.dtype)
        if a.dtype != jnp.float32:
            return NotImplemented  # handed back: plain JAX runs it
        return 2 * (a @ (b.T if transpose_b else b))

    f = jax.jit(lambda a, b: ops.matmul(a, b))
    a = jnp.ones((2, 3))
    assert float(f(a, a.T)[0, 0]) == 3.0
    ops.register("matmul", doubled_matmul)
    try:
        assert ops.registered()["matmul"] is doubled_matmul
        assert float(f(a, a.T)[0, 0]) == 6.0  # registering cleared the caches: the jitted f traced again
        half = a.astype(jnp.bfloat16)
        assert float(f(half, half.T)[0, 0]) == 3.0 and calls[-1] == jnp.bfloat16
    finally:
        ops.unregister("matmul")
    assert float(f(a, a.T)[0, 0]) == 3.0 and "matmul" not in ops.registered()
    with pytest.raises(ValueError, match="unknown op 'conv'; the ops are dense, matmul"):
        ops.register("conv", doubled_matmul)
