"""The Llama model: HF names and shapes, causality, KV-cache decoding with grouped-query attention,
remat, bfloat16, dropout, refusals, and FSDP training equal to one device.

Parity of the logits and of training with ``transformers`` is in tests/core/test_hf.py.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtrain import OptimConfig, TrainState, lm_loss, make_optimizer, train_step
from jaxtrain import parallel as par
from jaxtrain.app.config import ParallelConfig
from jaxtrain.errors import ConfigError
from jaxtrain.models import Llama, LlamaConfig
from jaxtrain.models.llama_config import default_mlp_hidden

CFG = LlamaConfig(vocab_size=48, block_size=8, n_layer=2, n_head=4, n_kv_head=2, n_embd=16, head_dim=6,
                  mlp_hidden=40, rope_theta=100.0)


@nnx.jit(static_argnames=("deterministic",))
def forward(model, idx_BT, rngs=None, deterministic=True):
    return model(idx_BT, rngs=rngs, deterministic=deterministic)


def _tokens(batch: int = 2, T: int = CFG.block_size, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, (batch, T)), jnp.int32)


def _params(cfg: LlamaConfig = CFG) -> dict:
    return nnx.to_pure_dict(nnx.state(Llama(cfg, rngs=nnx.Rngs(0)), nnx.Param))


def test_parameter_names_and_shapes_follow_hugging_face():
    params = _params()
    assert set(params) == {"embed_tokens", "layers", "norm", "lm_head"}
    layer = params["layers"][1]
    assert set(layer) == {"input_layernorm", "self_attn", "post_attention_layernorm", "mlp"}
    shapes = {k: v["kernel"].shape for k, v in layer["self_attn"].items()}
    assert shapes == {"q_proj": (16, 24), "k_proj": (16, 12), "v_proj": (16, 12), "o_proj": (24, 16)}  # N*H, K*H
    assert {k: v["kernel"].shape for k, v in layer["mlp"].items()} == {
        "gate_proj": (16, 40), "up_proj": (16, 40), "down_proj": (40, 16)}
    assert layer["input_layernorm"]["weight"].shape == (16,) and params["lm_head"]["kernel"].shape == (16, 48)
    np.testing.assert_array_equal(params["norm"]["weight"], 1.0)
    tied = _params(dataclasses.replace(CFG, tie_embeddings=True))
    assert "lm_head" not in tied
    assert not any("bias" in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0])


def test_defaults():
    cfg = LlamaConfig(n_embd=128, n_head=4)
    assert (cfg.kv_heads, cfg.head_size, cfg.mlp_width) == (4, 32, 384)
    assert [default_mlp_hidden(c) for c in (64, 128, 768)] == [192, 384, 2048]
    assert default_mlp_hidden(4096, multiple_of=256) == 11008  # Llama 1 7B's width


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_count_and_flops(tied):
    cfg = dataclasses.replace(CFG, tie_embeddings=tied)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    C, V, F, L = 16, 48, 40, 2
    per_layer = C * 24 + 2 * C * 12 + 24 * C + 3 * C * F + 2 * C
    total = L * per_layer + C + V * C * (1 if tied else 2)
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - (0 if tied else V * C)  # an untied table is a lookup, no product
    assert model.flops_per_token() == 6 * model.num_params() + 12 * L * 4 * 6 * cfg.block_size


def test_logits_and_causality():
    model = Llama(CFG, rngs=nnx.Rngs(0))
    x = _tokens(1)
    a = forward(model, x)
    assert a.shape == (1, 8, 48) and a.dtype == jnp.float32
    b = forward(model, x.at[0, 5].set((x[0, 5] + 1) % CFG.vocab_size))
    np.testing.assert_array_equal(a[0, :5], b[0, :5])
    assert not np.allclose(a[0, 5:], b[0, 5:])
    np.testing.assert_allclose(forward(model, x[:, :5]), a[:, :5], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"sequence length 9 exceeds the model's block_size=8"):
        model(jnp.zeros((1, 9), jnp.int32))


def test_positions_matter():
    """Rotary embeddings make the logits depend on where a token sits, not only on the set of earlier tokens."""
    model = Llama(CFG, rngs=nnx.Rngs(0))
    x = jnp.asarray([[3, 7, 7, 7, 9]], jnp.int32)
    y = jnp.asarray([[7, 3, 7, 7, 9]], jnp.int32)
    assert not np.allclose(forward(model, x)[0, -1], forward(model, y)[0, -1], atol=1e-5)


@pytest.mark.parametrize("variant", [dict(), dict(n_kv_head=1, tie_embeddings=True, dtype="bfloat16"),
                                     pytest.param(dict(n_kv_head=None, head_dim=None), marks=pytest.mark.slow)])
def test_decode_with_the_kv_cache_equals_the_full_forward(variant):
    cfg = dataclasses.replace(CFG, **variant)
    model = Llama(cfg, rngs=nnx.Rngs(1))
    tokens = _tokens(3, seed=2)
    full = np.asarray(forward(model, tokens))
    cache = model.init_cache(3)
    assert cache[0][0].shape == (3, cfg.kv_heads, 8, cfg.head_size)  # only the shared heads are cached
    step = nnx.jit(lambda m, t, p, c: m.decode(t, p, c))
    logits = []
    for pos in range(8):
        out, cache = step(model, tokens[:, pos], jnp.int32(pos), cache)
        logits.append(np.asarray(out))
    tol = 3e-2 if cfg.dtype == "bfloat16" else 1e-5
    np.testing.assert_allclose(np.stack(logits, axis=1), full, atol=tol, rtol=tol)


def _grads(cfg: LlamaConfig):
    model = Llama(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    x = _tokens(2, seed=3)
    batch = {"inputs": x[:, :-1], "targets": x[:, 1:]}
    return jax.jit(jax.grad(lambda p: lm_loss(nnx.merge(graphdef, p), batch, None)[0]))(params)


@pytest.mark.slow
def test_remat_gives_the_same_gradients():
    ref, got = _grads(CFG), _grads(dataclasses.replace(CFG, remat=True))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, ref)


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params_and_trains():
    cfg = dataclasses.replace(CFG, dtype="bfloat16")
    model = Llama(cfg, rngs=nnx.Rngs(0))
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.float32)}
    low, ref = forward(model, _tokens()), forward(Llama(CFG, rngs=nnx.Rngs(0)), _tokens())
    assert low.dtype == jnp.float32 and not np.array_equal(low, ref)
    np.testing.assert_allclose(low, ref, atol=0.05)
    tx = make_optimizer(lr=1e-2, schedule="constant", warmup_steps=0)
    state = TrainState.create(model, tx, rng=0)
    step = jax.jit(train_step, donate_argnums=0)
    x = _tokens(4, seed=4)
    batch = {"inputs": x[:, :-1], "targets": x[:, 1:]}
    losses = []
    for _ in range(5):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


@pytest.mark.slow
def test_attention_dropout_only_in_training_and_driven_by_the_key():
    model = Llama(dataclasses.replace(CFG, dropout=0.3), rngs=nnx.Rngs(0))
    x = _tokens()
    plain = forward(model, x)
    np.testing.assert_array_equal(forward(model, x, nnx.Rngs(dropout=1)), plain)
    a = forward(model, x, nnx.Rngs(dropout=1), deterministic=False)
    b = forward(model, x, nnx.Rngs(dropout=1), deterministic=False)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, plain)


@pytest.mark.parametrize("change,needle", [
    (dict(dtype="float16"), "LlamaConfig.dtype='float16': float16 needs loss scaling"),
    (dict(n_kv_head=3), "LlamaConfig.n_kv_head=3: must divide n_head=4"),
    (dict(head_dim=5), "LlamaConfig.head_dim=5: must be even"),
    (dict(head_dim=None, n_embd=18), "n_embd=18 is not divisible by n_head=4; set head_dim"),
    (dict(attention="flash"), "LlamaConfig.attention='flash': must be one of xla, cudnn"),
    (dict(dropout=1.0), "LlamaConfig.dropout=1.0: must be in [0, 1)"),
])
def test_bad_settings_are_refused_in_one_line(change, needle):
    with pytest.raises(ConfigError) as info:
        Llama(dataclasses.replace(CFG, **change), rngs=nnx.Rngs(0))
    assert needle in str(info.value) and len(str(info.value).splitlines()) == 1


# ---------------------------------------------------------------- FSDP


FSDP_CFG = LlamaConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, mlp_hidden=64)
TX = make_optimizer(OptimConfig(lr=3e-3, schedule="constant", warmup_steps=0, max_grad_norm=1.0))


@functools.cache
def _initial_state():
    return jax.jit(lambda: TrainState.create(Llama(FSDP_CFG, rngs=nnx.Rngs(0)), TX, rng=0))()


def _train(mesh, steps: int = 5):
    state = jax.tree.map(lambda x: x.copy(), _initial_state())
    shardings = par.state_shardings(mesh, state)
    state = jax.device_put(state, shardings)
    step = par.jit_train_step(train_step, mesh, shardings)
    data = np.random.default_rng(0).integers(0, 64, (steps, 16, 17))
    losses, norms = [], []
    for t in range(steps):
        batch = {"inputs": data[t, :, :-1], "targets": data[t, :, 1:]}
        state, m = step(state, par.place_batch(batch, mesh))
        losses.append(float(m["loss"]))
        norms.append(float(m["grad_norm"]))
    return np.array(losses), np.array(norms), jax.tree.map(np.asarray, jax.device_get(state.params)), state


@pytest.mark.slow
def test_fsdp_training_matches_one_device():
    ref_losses, ref_norms, ref_params, _ = _train(par.make_mesh(ParallelConfig(data=1), jax.devices()[:1]))
    losses, norms, params, state = _train(par.make_mesh(ParallelConfig(data=1, fsdp=8)))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-4, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), params, ref_params)
    k_proj = state.params["layers"][0]["self_attn"]["k_proj"]["kernel"]  # (32, 16): really sharded
    assert k_proj.sharding.spec == jax.sharding.PartitionSpec("fsdp")
    assert k_proj.addressable_shards[0].data.shape == (4, 16)
