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


def test_dense_tanh_gelu_and_a_backend_written_before_the_keyword():
    x, k, b = _normal((3, 4, 8), 2), _normal((8, 5), 3), _normal((5,), 4)
    y = x @ k + b
    np.testing.assert_allclose(ops.dense(x, k, b, gelu=True, approximate=True), jax.nn.gelu(y, approximate=True),
                               rtol=1e-6, atol=1e-6)
    # GPT-2's gelu_new, written out
    new = 0.5 * y * (1 + jnp.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y ** 3)))
    np.testing.assert_allclose(ops.dense(x, k, b, gelu=True, approximate=True), new, rtol=1e-5, atol=1e-6)
    assert not np.allclose(ops.dense(x, k, b, gelu=True), new, atol=1e-5)  # the default stays exact

    def old_dense(x, kernel, bias, *, gelu):  # an implementation that predates `approximate`
        return NotImplemented

    ops.register("dense", old_dense)
    try:
        assert ops.dense(x, k, b, gelu=True).shape == (3, 4, 5)  # today's calls reach it unchanged
        with pytest.raises(TypeError, match="approximate"):  # never silently the exact GELU instead
            ops.dense(x, k, b, gelu=True, approximate=True)
    finally:
        ops.unregister("dense")


def test_rms_norm_follows_hugging_face_order():
    x, w = _normal((2, 3, 8), 5), _normal((8,), 6)
    x32 = np.asarray(x, np.float64)
    want = x32 / np.sqrt((x32 ** 2).mean(-1, keepdims=True) + 1e-6) * np.asarray(w, np.float64)
    np.testing.assert_allclose(ops.rms_norm(x, w, eps=1e-6), want, rtol=1e-5, atol=1e-6)
    low = ops.rms_norm(x.astype(jnp.bfloat16), w, eps=1e-6)
    assert low.dtype == jnp.bfloat16  # normalised in float32, cast, then scaled: the input's dtype
    xb = x.astype(jnp.bfloat16).astype(jnp.float32)
    normed = (xb * jax.lax.rsqrt(jnp.square(xb).mean(-1, keepdims=True) + 1e-6)).astype(jnp.bfloat16)
    np.testing.assert_array_equal(low, w.astype(jnp.bfloat16) * normed)


def test_rotary_rotates_first_half_against_second_half():
    x = _normal((1, 3, 2, 6), 7)  # [B, T, N, H]
    angles = np.arange(3)[:, None] * np.array([1.0, 0.1, 0.01])  # [T, H/2]
    cos, sin = np.cos(np.concatenate([angles] * 2, -1)), np.sin(np.concatenate([angles] * 2, -1))
    got = np.asarray(ops.rotary(x, jnp.asarray(cos[:, None], jnp.float32), jnp.asarray(sin[:, None], jnp.float32)))
    xn = np.asarray(x)
    for i in range(3):  # feature i pairs with i + 3: a 2-D rotation by angles[t, i]
        c, s = np.cos(angles[:, i])[None, :, None], np.sin(angles[:, i])[None, :, None]
        np.testing.assert_allclose(got[..., i], xn[..., i] * c - xn[..., i + 3] * s, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[..., i + 3], xn[..., i + 3] * c + xn[..., i] * s, rtol=1e-5, atol=1e-6)
    # a rotation: norms per pair unchanged
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.linalg.norm(xn, axis=-1), rtol=1e-5)


def test_swiglu():
    g, u = _normal((4, 6), 8), _normal((4, 6), 9)
    np.testing.assert_allclose(ops.swiglu(g, u), g / (1 + np.exp(-np.asarray(g))) * u, rtol=1e-5, atol=1e-6)
