"""The GPT model: nanoGPT names and sizes, causality, dropout, dtypes, remat."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtrain.models import GPT, GPTConfig
from benchmark_modules import load_benchmark

CFG = GPTConfig(vocab_size=48, block_size=8, n_layer=2, n_head=2, n_embd=16)


@nnx.jit(static_argnames=("deterministic",))
def forward(model: GPT, idx_BT: jax.Array, rngs: nnx.Rngs | None = None, deterministic: bool = True):
    """``model(idx_BT)`` compiled (op-by-op eager dispatch is slow to warm up)."""
    return model(idx_BT, rngs=rngs, deterministic=deterministic)


def _params(cfg: GPTConfig = CFG) -> dict:
    return nnx.to_pure_dict(nnx.state(GPT(cfg, rngs=nnx.Rngs(0)), nnx.Param))


def _tokens(batch: int = 2, T: int = CFG.block_size, seed: int = 0) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (batch, T), 0, CFG.vocab_size)


def test_parameter_names_follow_nanogpt():
    params = _params()
    assert set(params) == {"wte", "wpe", "h", "ln_f"}  # tied: no lm_head
    assert sorted(params["h"]) == [0, 1]
    block = params["h"][0]
    assert set(block) == {"ln_1", "attn", "ln_2", "mlp"}
    assert set(block["attn"]) == {"c_attn", "c_proj"} and set(block["mlp"]) == {"c_fc", "c_proj"}
    assert block["attn"]["c_attn"]["kernel"].shape == (16, 48)  # (in, out): q, k, v side by side
    assert block["mlp"]["c_fc"]["kernel"].shape == (16, 64)  # 4x MLP
    untied = _params(dataclasses.replace(CFG, tie_embeddings=False, bias=False))
    assert untied["lm_head"]["kernel"].shape == (16, 48)
    assert not any("bias" in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(untied)[0])


@pytest.mark.parametrize("kw", [{}, {"tie_embeddings": False, "bias": False}])
def test_parameter_count_matches_the_torch_reference(kw):
    torch_gpt = load_benchmark("torch_gpt")
    cfg = dataclasses.replace(CFG, **kw)
    torch_model = torch_gpt.TorchGPT(torch_gpt.TorchGPTConfig(
        **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(torch_gpt.TorchGPTConfig)}))
    total = sum(p.numel() for p in torch_model.parameters())  # a tied tensor counts once
    model = GPT(cfg, rngs=nnx.Rngs(0))
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - cfg.block_size * cfg.n_embd  # nanoGPT leaves out wpe
    assert model.flops_per_token() == 6 * model.num_params() + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


def test_init_follows_gpt2():
    params = _params(dataclasses.replace(CFG, n_embd=64, n_head=4))
    block = params["h"][1]
    assert np.std(block["mlp"]["c_fc"]["kernel"]) == pytest.approx(0.02, rel=0.1)
    assert np.std(block["mlp"]["c_proj"]["kernel"]) == pytest.approx(0.02 / np.sqrt(2 * CFG.n_layer), rel=0.1)
    np.testing.assert_array_equal(block["ln_1"]["scale"], 1.0)
    np.testing.assert_array_equal(block["attn"]["c_attn"]["bias"], 0.0)


def test_logits_shape_dtype_and_shorter_sequences():
    model = GPT(CFG, rngs=nnx.Rngs(0))
    logits = forward(model, _tokens())
    assert logits.shape == (2, CFG.block_size, CFG.vocab_size) and logits.dtype == jnp.float32
    short = forward(model, _tokens()[:, :5])
    np.testing.assert_allclose(short, logits[:, :5], rtol=1e-5, atol=1e-6)  # causal: a prefix sees the same


def test_attention_is_causal():
    model = GPT(CFG, rngs=nnx.Rngs(0))
    x = _tokens(1)
    y = x.at[0, 5].set((x[0, 5] + 1) % CFG.vocab_size)
    a, b = forward(model, x), forward(model, y)
    np.testing.assert_array_equal(a[0, :5], b[0, :5])
    assert not np.allclose(a[0, 5:], b[0, 5:])


def test_sequence_longer_than_block_size_is_a_clear_error():
    model = GPT(CFG, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"sequence length 9 exceeds the model's block_size=8"):
        model(jnp.zeros((1, 9), jnp.int32))


def test_dropout_only_in_training_and_driven_by_the_key():
    model = GPT(dataclasses.replace(CFG, dropout=0.3), rngs=nnx.Rngs(0))
    x = _tokens()
    plain = forward(model, x)
    np.testing.assert_array_equal(forward(model, x, nnx.Rngs(dropout=1)), plain)  # deterministic by default
    a = forward(model, x, nnx.Rngs(dropout=1), deterministic=False)
    b = forward(model, x, nnx.Rngs(dropout=1), deterministic=False)
    c = forward(model, x, nnx.Rngs(dropout=2), deterministic=False)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, plain) and not np.allclose(a, c)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = GPT(dataclasses.replace(CFG, dtype="bfloat16"), rngs=nnx.Rngs(0))
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.float32)}
    low = forward(model, _tokens())
    ref = forward(GPT(CFG, rngs=nnx.Rngs(0)), _tokens())
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(low, ref, atol=0.05)
    assert not np.array_equal(low, ref)  # it really ran in bfloat16


def test_float16_is_refused_for_bfloat16():
    # no loss scaling in jaxtrain: float16 gradients would underflow
    for dtype in ("float16", "half"):
        with pytest.raises(ValueError) as info:
            GPT(dataclasses.replace(CFG, dtype=dtype), rngs=nnx.Rngs(0))
        message = str(info.value)
        assert f"GPTConfig.dtype={dtype!r}" in message and "loss scaling" in message and "bfloat16" in message
        assert len(message.splitlines()) == 1


def test_float16_in_the_config_is_refused_in_one_line():
    from jaxtrain.app import config

    with pytest.raises(config.ConfigError) as info:
        config.load("tiny", ["model.dtype=float16"])
    message = str(info.value)
    assert message.startswith("model.dtype='float16': ") and "loss scaling" in message
    assert "model.dtype=bfloat16" in message and len(message.splitlines()) == 1
    with pytest.raises(config.ConfigError) as info:  # a bad choice lists what is allowed: float16 is not
        config.load("tiny", ["model.dtype=float64"])
    assert str(info.value).endswith("must be one of float32, bfloat16")
    assert config.load("tiny", ["model.dtype=bfloat16"]).model.dtype == "bfloat16"


def test_remat_does_not_change_the_forward():
    x = _tokens()
    ref = forward(GPT(CFG, rngs=nnx.Rngs(0)), x)
    np.testing.assert_allclose(forward(GPT(dataclasses.replace(CFG, remat=True), rngs=nnx.Rngs(0)), x), ref, rtol=1e-6,
                               atol=1e-6)


@pytest.mark.parametrize("variant", [dict(), dict(bias=False, tie_embeddings=False), dict(dtype="bfloat16")])
def test_decode_with_the_kv_cache_equals_the_full_forward(variant):
    cfg = GPTConfig(vocab_size=48, block_size=8, n_layer=2, n_head=2, n_embd=16, **variant)
    model = GPT(cfg, rngs=nnx.Rngs(1))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 48, (3, 8)), jnp.int32)
    full = np.asarray(forward(model, tokens))
    step = nnx.jit(lambda m, t, p, c: m.decode(t, p, c))
    cache, logits = model.init_cache(3), []
    for pos in range(8):
        out, cache = step(model, tokens[:, pos], jnp.int32(pos), cache)
        logits.append(np.asarray(out))
    tol = 3e-2 if variant.get("dtype") == "bfloat16" else 1e-5
    np.testing.assert_allclose(np.stack(logits, axis=1), full, atol=tol, rtol=tol)


def test_hugging_face_options_default_to_nanogpt():
    cfg = GPTConfig()
    assert (cfg.activation, cfg.norm_eps, cfg.mlp_hidden, cfg.mlp_width) == ("gelu", 1e-5, None, 4 * cfg.n_embd)
    model = GPT(CFG, rngs=nnx.Rngs(0))
    assert model.h[0].mlp.approximate is False and model.h[0].ln_1.epsilon == 1e-5


def test_tanh_gelu_width_and_eps_options():
    x = _tokens()
    ref = forward(GPT(CFG, rngs=nnx.Rngs(0)), x)
    tanh = GPT(dataclasses.replace(CFG, activation="gelu_tanh"), rngs=nnx.Rngs(0))
    got = forward(tanh, x)
    assert not np.array_equal(got, ref)
    np.testing.assert_allclose(got, ref, atol=1e-2)  # the two GELUs differ by < 1e-3 pointwise
    wide = GPT(dataclasses.replace(CFG, mlp_hidden=24, norm_eps=1e-3), rngs=nnx.Rngs(0))
    assert wide.h[0].mlp.c_fc.kernel.shape == (16, 24) and wide.h[0].mlp.c_proj.kernel.shape == (24, 16)
    assert wide.ln_f.epsilon == 1e-3
    assert forward(wide, x).shape == ref.shape
    with pytest.raises(ValueError, match=r"GPTConfig.activation='relu': must be one of gelu, gelu_tanh"):
        GPT(dataclasses.replace(CFG, activation="relu"), rngs=nnx.Rngs(0))
