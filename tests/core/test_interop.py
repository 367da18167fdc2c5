"""nanoGPT-format state_dict import/export: exact round trips and clear errors."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxtrain.models import GPT, GPTConfig, from_torch_state_dict, to_torch_state_dict
from benchmark_modules import load_benchmark


torch_gpt = load_benchmark("torch_gpt")

SMALL = dict(vocab_size=64, block_size=8, n_layer=2, n_head=2, n_embd=16)
VARIANTS = [dict(bias=True, tie_embeddings=True), dict(bias=False, tie_embeddings=False)]


def _torch_model(**kw):
    torch.manual_seed(0)
    return torch_gpt.TorchGPT(torch_gpt.TorchGPTConfig(**SMALL, **kw))


@pytest.mark.parametrize("kw", VARIANTS, ids=["bias-tied", "nobias-untied"])
def test_round_trip_is_exact(kw):
    sd = _torch_model(**kw).state_dict()
    back = to_torch_state_dict(from_torch_state_dict(GPTConfig(**SMALL, **kw), sd), GPTConfig(**SMALL, **kw))
    assert list(back) == list(sd)  # same keys, nanoGPT's order
    for k, v in sd.items():
        assert back[k].dtype == np.float32 and back[k].flags.c_contiguous, k
        np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)


@pytest.mark.parametrize("kw", VARIANTS, ids=["bias-tied", "nobias-untied"])
def test_imported_model_gives_torch_logits_and_exports_back_into_torch(kw):
    cfg = GPTConfig(**SMALL, **kw)
    tm = _torch_model(**kw)
    model = GPT(cfg, rngs=nnx.Rngs(1))
    graphdef, params = nnx.split(model, nnx.Param)
    nnx.replace_by_pure_dict(params, from_torch_state_dict(model, tm.state_dict()))
    model = nnx.merge(graphdef, params)
    x = np.random.default_rng(0).integers(0, SMALL["vocab_size"], (2, SMALL["block_size"]))
    with torch.no_grad():
        want = tm(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(x))), want, rtol=1e-5, atol=1e-6)

    fresh = _torch_model(**kw)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    exported = to_torch_state_dict(nnx.to_pure_dict(params), cfg)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()})  # strict
    with torch.no_grad():
        np.testing.assert_array_equal(fresh(torch.from_numpy(x)).numpy(), want)


def test_accepts_numpy_a_params_dict_buffers_and_compile_prefix():
    cfg = GPTConfig(**SMALL)
    sd = {k: v.numpy() for k, v in _torch_model().state_dict().items()}
    with_extras = {"_orig_mod." + k: v for k, v in sd.items()}
    for i in range(SMALL["n_layer"]):  # nanoGPT's causal-mask buffer (not a parameter)
        with_extras[f"_orig_mod.transformer.h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 8, 8), np.float32))
    reference = nnx.to_pure_dict(nnx.state(GPT(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    params = from_torch_state_dict(reference, with_extras)
    assert jax.tree.structure(params) == jax.tree.structure(reference)
    np.testing.assert_array_equal(params["h"][1]["attn"]["c_attn"]["kernel"],
                                  sd["transformer.h.1.attn.c_attn.weight"].T)
    np.testing.assert_array_equal(params["h"][1]["attn"]["c_attn"]["bias"], sd["transformer.h.1.attn.c_attn.bias"])


def test_tied_model_accepts_a_state_dict_without_lm_head():
    cfg = GPTConfig(**SMALL)
    sd = _torch_model().state_dict()
    del sd["lm_head.weight"]
    params = from_torch_state_dict(cfg, sd)
    np.testing.assert_array_equal(params["wte"]["embedding"], sd["transformer.wte.weight"].numpy())


def test_imported_params_do_not_alias_torch_memory():
    # tensor.numpy() shares memory with the tensor; on CPU jnp.asarray may share it
    # with numpy. An in-place torch update must not change imported params.
    tm = _torch_model()
    params = from_torch_state_dict(GPTConfig(**SMALL), tm.state_dict())
    before = np.array(params["wpe"]["embedding"])
    with torch.no_grad():
        tm.transformer.wpe.weight.add_(1.0)
    np.testing.assert_array_equal(params["wpe"]["embedding"], before)


def _error(fn, *args) -> str:
    with pytest.raises(ValueError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_state_dict_errors_name_missing_unexpected_and_misshaped_keys():
    sd = _torch_model().state_dict()
    del sd["transformer.wpe.weight"]
    sd["transformer.h.0.attn.extra.weight"] = torch.zeros(3)
    sd["transformer.h.1.mlp.c_proj.weight"] = torch.zeros(64, 16)  # should be (16, 64): transposed
    message = _error(from_torch_state_dict, GPTConfig(**SMALL), sd)
    assert "missing keys: transformer.wpe.weight" in message
    assert "unexpected keys: transformer.h.0.attn.extra.weight" in message
    assert "transformer.h.1.mlp.c_proj.weight expected (16, 64), found (64, 16)" in message
    assert "c_fc" not in message  # well-formed keys are not listed


def test_state_dict_for_a_different_architecture_is_rejected():
    deeper = _torch_model().state_dict()  # 2 layers, with biases
    message = _error(from_torch_state_dict, GPTConfig(**{**SMALL, "n_layer": 1}, bias=False), deeper)
    assert "unexpected keys: transformer.h.0.ln_1.bias" in message
    assert "transformer.h.1.ln_1.weight" in message
    wider = _error(from_torch_state_dict, GPTConfig(**{**SMALL, "n_embd": 32}), deeper)
    assert "transformer.wte.weight expected (64, 32), found (64, 16)" in wider
    assert re.search(r"\(\d+ more\)", wider)  # long lists are cut, not dumped


def test_untied_checkpoint_into_tied_model_is_rejected():
    sd = _torch_model(tie_embeddings=False).state_dict()
    message = _error(from_torch_state_dict, GPTConfig(**SMALL, tie_embeddings=True), sd)
    assert "lm_head.weight differs from transformer.wte.weight" in message
    assert "tie_embeddings=False" in message


def test_export_rejects_params_that_do_not_fit_the_config():
    cfg = GPTConfig(**SMALL)
    params = nnx.to_pure_dict(nnx.state(GPT(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    params["wpe"]["embedding"] = jnp.zeros((4, 16))
    del params["ln_f"]["bias"]
    message = _error(to_torch_state_dict, params, cfg)
    assert "missing keys: ln_f.bias" in message
    assert "wpe.embedding expected (8, 16), found (4, 16)" in message
    untied = _error(to_torch_state_dict, nnx.to_pure_dict(nnx.state(GPT(cfg, rngs=nnx.Rngs(0)), nnx.Param)),
                    GPTConfig(**SMALL, tie_embeddings=False))
    assert "missing keys: lm_head.kernel" in untied
