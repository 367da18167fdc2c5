"""The fused CPU kernels (causal attention, bias + GELU): same values and gradients as plain JAX."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxtrain.cpu as cpu_backend
from flax import nnx

from jaxtrain import TrainState, make_optimizer, train_step
from jaxtrain.cpu import blas
from jaxtrain.cpu import kernels as fused
from jaxtrain import OptimConfig
from jaxtrain.models import GPT, GPTConfig

ON, WHY = blas.status()
needs_kernels = pytest.mark.skipif(not ON, reason=f"native CPU kernels unavailable here: {WHY}")


def _normal(shape, seed=0, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, jnp.float32)


def _value_and_grads(f, *args):
    """f's value and the gradients of a random projection of it, jitted."""
    w = _normal(jax.eval_shape(f, *args).shape, seed=99)
    return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(f(*a) * w), argnums=tuple(range(len(args)))))(*args), \
        jax.jit(f)(*args)


# (B, T, N, H): T below, at and across the kernel's 64-query blocks and its 16-key vectors; head
# sizes that are not multiples of 16 (MKL products) and that are (register tiles, one and two
# 64-wide panels); one head, where the forward splits its query blocks over threads
ATTENTION_SHAPES = [(2, 1, 2, 8), (1, 63, 3, 5), (2, 64, 2, 16), (2, 100, 3, 16), (1, 257, 2, 32), (3, 130, 1, 64),
                    (2, 70, 2, 80), (1, 17, 1, 128), (1, 200, 1, 32)]


@needs_kernels
@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
def test_causal_attention_matches_plain_jax(shape):
    B, T, N, H = shape
    qkv = _normal((B, T, 3, N, H), seed=T, scale=2.0)  # scale 2: peaked softmax rows
    (l1, (g1,)), y1 = _value_and_grads(lambda q: fused.causal_attention(q, use_fused=True), qkv)
    (l0, (g0,)), y0 = _value_and_grads(fused.reference_attention, qkv)
    assert y1.shape == (B, T, N, H)
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(y0))))
    np.testing.assert_allclose(l1, l0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g1, g0, rtol=1e-4, atol=2e-5 * float(jnp.max(jnp.abs(g0))))


@needs_kernels
def test_causal_attention_is_causal_and_one_kernel_each_way():
    qkv = _normal((1, 70, 3, 2, 8))
    y = fused.causal_attention(qkv, use_fused=True)
    # changing the last position's q/k/v leaves every earlier output unchanged
    y2 = fused.causal_attention(qkv.at[:, -1].add(5.0), use_fused=True)
    np.testing.assert_array_equal(y[:, :-1], y2[:, :-1])
    assert not np.allclose(y[:, -1], y2[:, -1])
    f = lambda q: jnp.sum(fused.causal_attention(q, use_fused=True) ** 2)  # noqa: E731
    hlo = jax.jit(jax.grad(f)).lower(qkv).as_text()
    assert hlo.count("jaxtrain_attention_fwd") == 1 and hlo.count("jaxtrain_attention_bwd") == 1
    plain = jax.jit(lambda q: fused.causal_attention(q, use_fused=False))
    assert "jaxtrain_attention" not in plain.lower(qkv).as_text()


@needs_kernels
def test_causal_attention_propagates_nan_and_large_logits():
    qkv = _normal((1, 8, 3, 1, 4), scale=40.0)  # logits in the thousands: the max-subtraction must hold
    y1 = fused.causal_attention(qkv, use_fused=True)
    np.testing.assert_allclose(y1, fused.reference_attention(qkv), rtol=1e-4, atol=1e-3)
    assert np.all(np.isfinite(y1))
    bad = qkv.at[0, 3, 1, 0, 0].set(jnp.nan)  # key 3: every query from position 3 on sees it
    y = np.asarray(fused.causal_attention(bad, use_fused=True))
    assert np.all(np.isfinite(y[0, :3])) and np.all(np.isnan(y[0, 3:]))


@needs_kernels
@pytest.mark.parametrize("shape,bias", [((2048, 1536), True), ((33, 70), True), ((5, 7, 19), False), ((1, 1), True)])
def test_bias_gelu_matches_plain_jax(shape, bias):
    y = _normal(shape, seed=1, scale=3.0)
    b = _normal(shape[-1:], seed=2) if bias else None
    args = (y, b) if bias else (y,)
    (l1, g1), h1 = _value_and_grads(lambda *a: fused.bias_gelu(*a, use_fused=True), *args)
    (l0, g0), h0 = _value_and_grads(fused.reference_bias_gelu if bias else
                                    (lambda y: fused.reference_bias_gelu(y, None)), *args)
    np.testing.assert_allclose(h1, h0, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(l1, l0, rtol=1e-5, atol=1e-4)
    for a, c in zip(g1, g0):  # the bias gradient sums over all rows
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6 * np.sqrt(y.size / y.shape[-1]) * 3)


@needs_kernels
def test_bias_gelu_tails_and_non_finite_values():
    u = jnp.asarray([[-1e4, -30.0, -8.0, -3.0, -1e-3, 0.0, 1e-3, 3.0, 8.0, 30.0, 1e4, jnp.inf, -jnp.inf, jnp.nan]],
                    jnp.float32)
    h = np.asarray(fused.bias_gelu(u, use_fused=True))
    ref = np.asarray(fused.reference_bias_gelu(u, None))
    np.testing.assert_allclose(h[0, :11], ref[0, :11], rtol=1e-5, atol=1e-7)
    assert h[0, 11] == np.inf and np.isnan(h[0, 13])
    g = np.asarray(jax.grad(lambda u: jnp.sum(fused.bias_gelu(u, use_fused=True)))(u))
    g_ref = np.asarray(jax.grad(lambda u: jnp.sum(fused.reference_bias_gelu(u, None)))(u))
    np.testing.assert_allclose(g[0, :11], g_ref[0, :11], rtol=1e-5, atol=1e-7)
    assert np.isnan(g[0, 13])


@needs_kernels
@pytest.mark.parametrize("shape,bias", [((8, 256, 384), True), ((37, 19), False), ((1, 5), True), ((3, 1), True)])
def test_layer_norm_matches_plain_jax(shape, bias):
    x = _normal(shape, seed=3, scale=4.0) + 2.0  # an offset mean: the variance must not cancel
    g, b = _normal(shape[-1:], seed=4), (_normal(shape[-1:], seed=5) if bias else None)
    args = (x, g, b) if bias else (x, g)
    (l1, g1), y1 = _value_and_grads(lambda *a: fused.layer_norm(*a, eps=1e-5, use_fused=True), *args)
    (l0, g0), y0 = _value_and_grads(lambda *a: fused.reference_layer_norm(*a, 1e-5) if bias else
                                    fused.reference_layer_norm(*a, None, 1e-5), *args)
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l1, l0, rtol=1e-5, atol=1e-4)
    for a, c in zip(g1, g0):  # dx, then the scale (and bias) gradients summed over all rows
        np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5 * max(float(jnp.max(jnp.abs(c))), 1.0))
    # agrees with Flax's LayerNorm (which the GPT's parameters belong to)
    ln = nnx.LayerNorm(shape[-1], epsilon=1e-5, use_bias=bias, rngs=nnx.Rngs(0))
    ln.scale[...] = g
    if bias:
        ln.bias[...] = b
    np.testing.assert_allclose(y1, ln(x), rtol=1e-4, atol=1e-4)


@needs_kernels
def test_vmap_over_the_kernels():
    qkv = _normal((3, 2, 20, 3, 2, 4))
    y = jax.vmap(lambda q: fused.causal_attention(q, use_fused=True))(qkv)
    np.testing.assert_allclose(y, jax.vmap(fused.reference_attention)(qkv), rtol=1e-5, atol=2e-6)
    u, b = _normal((4, 6, 9)), _normal((4, 9))
    h = jax.vmap(lambda u, b: fused.bias_gelu(u, b, use_fused=True))(u, b)
    np.testing.assert_allclose(h, jax.vmap(fused.reference_bias_gelu)(u, b), rtol=2e-6, atol=1e-6)


@needs_kernels
def test_independent_kernels_in_one_program_share_the_thread_pool():
    # XLA may run independent custom calls side by side; each splits its work over the same pool
    qkvs = [_normal((2, 70, 3, 2, 8), seed=s) for s in range(4)]
    f = jax.jit(lambda *q: [fused.causal_attention(x, use_fused=True) for x in q]
                + [fused.bias_gelu(x.reshape(140, -1), use_fused=True) for x in q])
    for _ in range(5):
        outs = f(*qkvs)
        for x, y, h in zip(qkvs, outs[:4], outs[4:]):
            np.testing.assert_allclose(y, fused.reference_attention(x), rtol=1e-5, atol=2e-6)
            np.testing.assert_allclose(h, fused.reference_bias_gelu(x.reshape(140, -1), None), rtol=2e-6, atol=1e-6)


@needs_kernels
def test_empty_shapes():
    for shape in [(0, 4, 3, 2, 8), (2, 0, 3, 2, 8), (1, 4, 3, 2, 0)]:
        assert fused.causal_attention(jnp.ones(shape), use_fused=True).shape == shape[:2] + shape[3:]
    assert fused.bias_gelu(jnp.ones((0, 5)), jnp.ones(5), use_fused=True).shape == (0, 5)
    assert fused.layer_norm(jnp.ones((0, 5)), jnp.ones(5), use_fused=True).shape == (0, 5)


def test_errors_and_fallbacks_name_the_problem():
    with pytest.raises(ValueError, match=r"\[B, T, 3, N, H\].*\(2, 5, 4\)"):
        fused.causal_attention(jnp.ones((2, 5, 4)))
    with pytest.raises(ValueError, match=r"bias of shape \(4,\), got \(3,\)"):
        fused.bias_gelu(jnp.ones((2, 4)), jnp.ones(3))
    with pytest.raises(ValueError, match=r"scale of shape \(4,\), got \(4, 1\)"):
        fused.layer_norm(jnp.ones((2, 4)), jnp.ones((4, 1)))
    x16 = jnp.ones((1, 4, 3, 1, 2), jnp.bfloat16)
    assert "jaxtrain_attention" not in jax.jit(fused.causal_attention).lower(x16).as_text()  # auto: plain JAX
    with pytest.raises(RuntimeError, match="use_fused=True.*float32 operands, not bfloat16"):
        fused.causal_attention(x16, use_fused=True)
    assert "bfloat16" in fused.why_not(x16)


def _gpt_targets(backend, dropout=0.0):
    if backend == "off":
        cpu_backend.disable()
    else:
        cpu_backend.enable(all_devices=backend == "all devices")
    model = GPT(GPTConfig(vocab_size=61, block_size=16, n_layer=2, n_head=2, n_embd=32,
                          dropout=dropout), rngs=nnx.Rngs(0))
    state = TrainState.create(model, make_optimizer(OptimConfig(lr=1e-3, schedule="constant", warmup_steps=0)), rng=0)
    batch = {"inputs": jnp.zeros((2, 16), jnp.int32), "targets": jnp.zeros((2, 16), jnp.int32)}
    hlo = jax.jit(train_step).lower(state, batch).as_text()
    return {t: hlo.count(t) for t in ("jaxtrain_attention_fwd", "jaxtrain_attention_bwd", "jaxtrain_gelu_fwd",
                                      "jaxtrain_gelu_bwd", "jaxtrain_layer_norm_fwd", "jaxtrain_layer_norm_bwd")}


@needs_kernels
@pytest.mark.slow
def test_gpt_train_step_uses_the_kernels_where_they_apply():
    try:
        # the tests' process has 8 devices, where the backend declines unless told to take them all
        used = _gpt_targets("all devices")
        assert used == {**dict.fromkeys(used, 2), "jaxtrain_layer_norm_fwd": 5, "jaxtrain_layer_norm_bwd": 5}
        # (one attention and GELU per layer; two LayerNorms per layer and the final one)
        assert set(_gpt_targets("off").values()) == set(_gpt_targets("one device").values()) == {0}
        # attention dropout is not in the kernel: a training step with dropout keeps XLA's attention
        with_dropout = _gpt_targets("all devices", dropout=0.1)
        assert with_dropout["jaxtrain_attention_fwd"] == 0 and with_dropout["jaxtrain_gelu_fwd"] == 2
    finally:
        cpu_backend.enable(all_devices=False)


def _second_order(f, *args):
    """A gradient penalty's gradient (reverse over reverse) and a Hessian-vector product (forward over reverse)."""
    w = _normal(jax.eval_shape(f, *args).shape, seed=98)
    loss = lambda *a: jnp.sum(jnp.tanh(f(*a)) * w)  # noqa: E731  (tanh: a non-zero Hessian for linear ops)
    grads = jax.grad(loss, argnums=tuple(range(len(args))))
    penalty = jax.grad(lambda *a: sum(jnp.sum(g ** 2) for g in grads(*a)), argnums=tuple(range(len(args))))
    v = tuple(_normal(a.shape, seed=97 + i) for i, a in enumerate(args))
    hvp = jax.jit(lambda *a: jax.jvp(grads, a, v)[1])(*args)
    return jax.jit(penalty)(*args), hvp


def _assert_trees_close(a, b, rtol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * float(jnp.max(jnp.abs(y))))


SECOND_ORDER = {
    "attention": (lambda q, **kw: fused.causal_attention(q, **kw), [(2, 20, 3, 2, 16)]),
    "attention_mkl_products": (lambda q, **kw: fused.causal_attention(q, **kw), [(1, 9, 3, 2, 5)]),
    "bias_gelu": (lambda y, b, **kw: fused.bias_gelu(y, b, **kw), [(40, 24), (24,)]),
    "layer_norm": (lambda x, g, b, **kw: fused.layer_norm(x, g, b, eps=1e-5, **kw), [(40, 24), (24,), (24,)]),
    "matmul": (lambda a, b, **kw: blas.matmul(a, b, transpose_b=True, use_blas=kw["use_fused"]), [(30, 20), (25, 20)]),
}


@needs_kernels
@pytest.mark.parametrize("name", SECOND_ORDER)
@pytest.mark.slow
def test_second_order_derivatives_match_plain_jax(name):
    """The kernels' custom VJPs are differentiable again: what a gradient penalty or a Hessian-vector product needs."""
    f, shapes = SECOND_ORDER[name]
    args = tuple(_normal(s, seed=i) for i, s in enumerate(shapes))
    penalty1, hvp1 = _second_order(lambda *a: f(*a, use_fused=True), *args)
    penalty0, hvp0 = _second_order(lambda *a: f(*a, use_fused=False), *args)
    _assert_trees_close(penalty1, penalty0, rtol=2e-4)
    _assert_trees_close(hvp1, hvp0, rtol=2e-4)
    hlo = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a, use_fused=True) ** 2))).lower(*args).as_text()
    assert "jaxtrain_" in hlo  # first-order gradients still run the kernels


@needs_kernels
def test_dense_hands_the_tanh_gelu_back_to_plain_jax(all_devices):
    """The fused kernel is the exact GELU; GPT-2's tanh approximation must not run through it."""
    from jaxtrain import ops

    x, k, b = _normal((4, 8), 1), _normal((8, 6), 2), _normal((6,), 3)
    assert ops.registered()["dense"](x, k, b, gelu=True, approximate=True) is NotImplemented
    hlo = jax.jit(lambda x: ops.dense(x, k, b, gelu=True, approximate=True)).lower(x).as_text()
    assert "jaxtrain_gelu_fwd" not in hlo
    np.testing.assert_allclose(ops.dense(x, k, b, gelu=True, approximate=True),
                               jax.nn.gelu(x @ k + b, approximate=True), rtol=1e-5, atol=1e-6)
    assert "jaxtrain_gelu_fwd" in jax.jit(lambda x: ops.dense(x, k, b, gelu=True)).lower(x).as_text()
