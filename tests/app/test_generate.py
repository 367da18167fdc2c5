"""Sampling: the token picker's statistics (temperature, top-k, top-p), the fixed-shape decode, and the
generate CLI."""

import functools
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtrain.app import config, data
from jaxtrain.app import generate
from jaxtrain.models import GPT
from jaxtrain.models.gpt import GPTConfig

ROOT = Path(__file__).resolve().parents[2]
BLOCK = 16


@pytest.fixture(scope="module")
def model_parts():
    """(graphdef, params, model_state) of a small random GPT with block_size 16."""
    model = GPT(GPTConfig(block_size=BLOCK, n_layer=1, n_head=2, n_embd=32), rngs=nnx.Rngs(3))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


@jax.jit
def _jit_pick(logits, key, temperature, top_k, top_p):
    return generate.pick(logits, key, temperature, top_k, top_p)


def _pick(logits, seed, temperature, top_k, top_p=1.0):
    return np.asarray(_jit_pick(jnp.asarray(logits, jnp.float32), jax.random.key(seed), jnp.float32(temperature),
                                jnp.int32(top_k), jnp.float32(top_p)))


def _pick_before_top_p(logits_BV, key, temperature, top_k):
    """The picker as it was before top-p (temperature and top-k only), to hold top_p=1 to it."""
    V = logits_BV.shape[-1]
    k = jnp.where((top_k >= 1) & (top_k <= V), top_k, V)
    kth_B1 = jax.lax.dynamic_index_in_dim(jnp.sort(logits_BV, axis=-1), V - k, axis=-1)
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    sampled = jax.random.categorical(key, logits_BV / jnp.maximum(temperature, 1e-6), axis=-1)
    return jnp.where(temperature > 0, sampled, jnp.argmax(logits_BV, axis=-1)).astype(jnp.int32)


def test_greedy_and_top1_pick_the_argmax():
    logits = np.random.default_rng(0).normal(size=(64, 50))
    want = logits.argmax(-1)
    np.testing.assert_array_equal(_pick(logits, 0, 0.0, 0), want)
    for seed in range(3):
        np.testing.assert_array_equal(_pick(logits, seed, 1.5, 1), want)


def test_top_k_samples_only_among_the_k_largest():
    rng = np.random.default_rng(1)
    logits = np.repeat(rng.normal(size=(1, 30)), 4000, axis=0)
    picked = _pick(logits, 0, 5.0, 3)  # high temperature: without the cut, all 30 would appear
    assert set(picked) == set(np.argsort(logits[0])[-3:])


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_matches_softmax_of_scaled_logits(temperature):
    logits = np.array([[2.0, 1.0, 0.0, -1.0]] * 20000)
    picked = _pick(logits, 7, temperature, 0)
    freq = np.bincount(picked, minlength=4) / len(picked)
    p = np.exp(logits[0] / temperature)
    np.testing.assert_allclose(freq, p / p.sum(), atol=0.015)


# --- top-p (nucleus) ------------------------------------------------------------------------
# P: a distribution whose nuclei are known: 0.4, 0.7, 0.9, 0.96, 1.0 are the running sums, likeliest first.
P = np.array([0.06, 0.3, 0.04, 0.4, 0.2])
BY_LIKELIHOOD = [3, 1, 4, 0, 2]


@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.7, 0), (1.3, 5), (2.0, 20), (0.0, 0)])
def test_top_p_one_draws_exactly_the_samples_of_before(temperature, top_k):
    logits = np.random.default_rng(2).normal(size=(256, 50)) * 3
    before = jax.jit(_pick_before_top_p)
    for seed in range(3):
        want = np.asarray(before(jnp.asarray(logits, jnp.float32), jax.random.key(seed), jnp.float32(temperature),
                                 jnp.int32(top_k)))
        np.testing.assert_array_equal(_pick(logits, seed, temperature, top_k, 1.0), want)
        np.testing.assert_array_equal(np.asarray(generate.pick(  # and the default is 1
            jnp.asarray(logits, jnp.float32), jax.random.key(seed), jnp.float32(temperature), jnp.int32(top_k))),
            want)


@pytest.mark.parametrize("top_p, kept", [(1e-6, 1), (0.3, 1), (0.35, 1), (0.5, 2), (0.85, 3), (0.93, 4),
                                         (0.97, 5)])
def test_top_p_samples_only_the_smallest_nucleus_renormalised(top_p, kept):
    logits = np.repeat(np.log(P)[None], 20000, axis=0)
    picked = _pick(logits, 11, 1.0, 0, top_p)
    nucleus = BY_LIKELIHOOD[:kept]
    assert set(picked) == set(nucleus)  # never outside it, and every token of it appears
    freq = np.bincount(picked, minlength=len(P)) / len(picked)
    np.testing.assert_allclose(freq[nucleus], P[nucleus] / P[nucleus].sum(), atol=0.015)


def test_top_p_applies_after_temperature_and_top_k():
    logits = np.repeat(np.log(P)[None], 8000, axis=0)
    # at temperature 1 a top_p of 0.8 keeps 3 tokens (0.4 + 0.3 < 0.8); at 0.5 the probabilities are
    # P**2 renormalised (0.54, 0.31, ...), so it keeps 2
    assert set(_pick(logits, 0, 1.0, 0, 0.8)) == set(BY_LIKELIHOOD[:3])
    assert set(_pick(logits, 0, 0.5, 0, 0.8)) == set(BY_LIKELIHOOD[:2])
    # top-k first: of the 2 it keeps (0.4 and 0.3, renormalised 0.57 and 0.43) top_p 0.5 keeps the first
    # only, where on all 5 it would keep 2
    assert set(_pick(logits, 0, 1.0, 2, 0.5)) == set(BY_LIKELIHOOD[:1])
    assert set(_pick(logits, 0, 1.0, 2, 0.6)) == set(BY_LIKELIHOOD[:2])
    assert set(_pick(logits, 0, 0.0, 0, 0.8)) == {BY_LIKELIHOOD[0]}  # greedy stays greedy


@pytest.mark.parametrize("kv_cache", [True, False])
def test_a_tiny_top_p_is_greedy_in_both_decoders(model_parts, kv_cache):
    prompt = data.encode("for i in")
    greedy = generate.generate(*model_parts, prompt, tokens=20, block_size=BLOCK, temperature=0.0)
    for seed in (0, 1):
        nucleus = generate.generate(*model_parts, prompt, tokens=20, block_size=BLOCK, temperature=1.0, top_p=1e-6,
                                    seed=seed, num_samples=2, kv_cache=kv_cache)
        np.testing.assert_array_equal(nucleus, np.repeat(greedy, 2, axis=0))


def test_top_p_changes_the_samples_of_the_model(model_parts):
    prompt = data.encode("x")
    kw = dict(tokens=24, block_size=BLOCK, temperature=1.0, seed=4, num_samples=2)
    every = generate.generate(*model_parts, prompt, **kw)
    np.testing.assert_array_equal(generate.generate(*model_parts, prompt, top_p=1.0, **kw), every)
    half = generate.generate(*model_parts, prompt, top_p=0.5, **kw)
    assert not np.array_equal(half, every)
    np.testing.assert_array_equal(generate.generate(*model_parts, prompt, top_p=0.5, **kw), half)


def test_top_p_passes_through_sample_text():
    class State:  # enough of a TrainState for sample_text
        def __init__(self, model):
            self.graphdef, params, rest = nnx.split(model, nnx.Param, ...)
            self.params, self.model_state = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
            self._model = model

        def model(self):
            return self._model

    state = State(GPT(GPTConfig(block_size=BLOCK, n_layer=1, n_head=2, n_embd=32), rngs=nnx.Rngs(3)))
    kw = dict(tokens=12, temperature=1.0, seed=2)
    greedy = generate.sample_text(state, "ab", tokens=12, temperature=0.0)
    assert generate.sample_text(state, "ab", top_p=1e-6, **kw) == greedy != generate.sample_text(state, "ab", **kw)


def test_the_lm_task_samples_with_train_sample_top_p(monkeypatch):
    from jaxtrain.app import lm

    seen = {}
    monkeypatch.setattr(generate, "sample_text", lambda state, prompt, **kw: [seen.update(kw) or "text"])
    cfg = config.load("tiny", ["train.sample_top_p=0.9", "train.sample_top_k=7"])
    lm.language_model(cfg, with_data=False).sample(None, 3)
    assert seen["top_p"] == 0.9 and seen["top_k"] == 7 and seen["seed"] == 3
    assert config.load("tiny").train.sample_top_p == 1.0  # off unless asked for


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, rest, tokens_BT):
    return nnx.merge(graphdef, params, rest)(tokens_BT)


def _greedy_reference(model_parts, prompt, n):
    """Greedy decoding with a plain list: the model on the last BLOCK tokens, argmax at the last one.

    The window is right-padded to BLOCK so one compiled forward serves every
    length (the model is causal: padding after a position cannot change it,
    which :func:`test_padding_does_not_change_earlier_logits` checks).
    """
    seq = list(prompt)
    for _ in range(n):
        window = seq[-BLOCK:]
        padded = np.zeros((1, BLOCK), np.int32)
        padded[0, : len(window)] = window
        seq.append(int(np.asarray(_forward(*model_parts, padded))[0, len(window) - 1].argmax()))
    return np.asarray(seq[len(prompt):])


def test_padding_does_not_change_earlier_logits(model_parts):
    tokens = np.random.default_rng(0).integers(0, 256, (2, BLOCK)).astype(np.int32)
    padded = tokens.copy()
    padded[:, 5:] = 0
    full, cut = np.asarray(_forward(*model_parts, tokens)), np.asarray(_forward(*model_parts, padded))
    np.testing.assert_allclose(full[:, :5], cut[:, :5], atol=1e-5)
    assert not np.allclose(full[:, 5:], cut[:, 5:])  # the check can fail: later positions do change


@pytest.mark.parametrize("prompt_len, n", [(3, 8), (10, 20), (40, 5)])  # fits, slides past, prompt > block
def test_greedy_decode_equals_reference_through_the_sliding_window(model_parts, prompt_len, n):
    prompt = np.random.default_rng(prompt_len).integers(0, 256, prompt_len)
    out = generate.generate(*model_parts, prompt, tokens=n, block_size=BLOCK, temperature=0.0)
    assert out.shape == (1, n) and out.dtype == np.int32
    np.testing.assert_array_equal(out[0], _greedy_reference(model_parts, prompt, n))


def test_decode_compiles_once_for_any_prompt_length_temperature_top_k_and_top_p(model_parts):
    prompt = data.encode("def f(x):")
    generate.generate(*model_parts, prompt, tokens=2, block_size=BLOCK)  # warm up this model's shapes
    before = generate._decode_step._cache_size(), generate._cached_step._cache_size()
    for p, n, t, k, top_p, seed in [("", 3, 0.0, 0, 1.0, 1), ("x" * 50, 7, 1.3, 5, 0.5, 2),
                                    ("import os\n", 1, 0.7, 1, 0.9, 3), ("y" * 12, 9, 1.0, 0, 0.01, 4)]:
        out = generate.generate(*model_parts, data.encode(p), tokens=n, block_size=BLOCK, temperature=t,
                                top_k=k, top_p=top_p, seed=seed)
        assert out.shape == (1, n)
    assert (generate._decode_step._cache_size(), generate._cached_step._cache_size()) == before


def test_top1_is_deterministic_and_equals_greedy(model_parts):
    prompt = data.encode("class A:\n")
    greedy = generate.generate(*model_parts, prompt, tokens=12, block_size=BLOCK, temperature=0.0)
    for seed in (0, 1):
        top1 = generate.generate(*model_parts, prompt, tokens=12, block_size=BLOCK, temperature=0.9, top_k=1,
                                 seed=seed, num_samples=2)
        np.testing.assert_array_equal(top1, np.repeat(greedy, 2, axis=0))


def test_seeds_and_rows_differ_when_sampling(model_parts):
    prompt = data.encode("x")
    a = generate.generate(*model_parts, prompt, tokens=24, block_size=BLOCK, temperature=1.0, seed=0,
                          num_samples=2)
    b = generate.generate(*model_parts, prompt, tokens=24, block_size=BLOCK, temperature=1.0, seed=1)
    assert not np.array_equal(a[0], a[1]) and not np.array_equal(a[0], b[0])
    again = generate.generate(*model_parts, prompt, tokens=24, block_size=BLOCK, temperature=1.0, seed=0,
                              num_samples=2)
    np.testing.assert_array_equal(a, again)


def test_huge_seed_and_top_k_sample_instead_of_overflowing(model_parts):
    prompt = data.encode("x")
    every = generate.generate(*model_parts, prompt, tokens=8, block_size=BLOCK, temperature=1.0, top_k=0,
                              seed=3_000_000_000)
    beyond = generate.generate(*model_parts, prompt, tokens=8, block_size=BLOCK, temperature=1.0,
                               top_k=3_000_000_000, seed=3_000_000_000)
    np.testing.assert_array_equal(every, beyond)  # top_k beyond the vocabulary keeps every token, as 0 does
    low = generate.generate(*model_parts, prompt, tokens=8, block_size=BLOCK, temperature=1.0, seed=5)
    assert generate.generate(*model_parts, prompt, tokens=8, block_size=BLOCK, temperature=1.0,
                             seed=5 + 2**31).shape == low.shape == (1, 8)


@pytest.mark.parametrize("kw, needle", [
    (dict(temperature=float("inf")), "temperature=inf: must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature=nan: must be a finite number >= 0"),
    (dict(temperature=-0.5), "temperature=-0.5"),
    (dict(top_k=-1), "top_k=-1: must be an integer >= 0"),
    (dict(top_p=0), "top_p=0: must be a finite number in (0, 1] (1: off)"),
    (dict(top_p=0.0), "top_p=0.0: must be a finite number in (0, 1]"),
    (dict(top_p=1.5), "top_p=1.5: must be a finite number in (0, 1]"),
    (dict(top_p=-0.2), "top_p=-0.2"),
    (dict(top_p=float("nan")), "top_p=nan: must be a finite number in (0, 1]"),
    (dict(top_p=float("inf")), "top_p=inf"),
    (dict(seed=2**32), "seed=4294967296: must be an integer in [0, 2**32)"),
    (dict(seed=-1), "seed=-1"),
])
def test_unusable_sampling_settings_are_refused_by_name(model_parts, kw, needle):
    with pytest.raises(ValueError) as e:
        generate.generate(*model_parts, data.encode("x"), tokens=4, block_size=BLOCK, **kw)
    assert needle in str(e.value)


# ---------------------------------------------------------------- CLI
# The CLI on a trained run is tested in test_run.py, which trains one already.


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "jaxtrain.generate", *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def test_cli_without_a_checkpoint_fails_in_one_line(tmp_path):
    r = _cli("--run-dir", str(tmp_path / "nothing"), "--tokens", "5")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "nothing" in lines[0], r.stderr


@pytest.mark.parametrize("prompt_len, n, top_p", [(1, 10, 1.0), (5, 30, 1.0), (16, 3, 1.0), (5, 30, 0.6)])
def test_kv_cache_and_sliding_window_draw_the_same_samples(model_parts, prompt_len, n, top_p):
    prompt = np.random.default_rng(prompt_len).integers(0, 256, prompt_len)
    kw = dict(tokens=n, block_size=BLOCK, temperature=1.0, top_k=0, top_p=top_p, seed=5, num_samples=3)
    cached = generate.generate(*model_parts, prompt, kv_cache=True, **kw)
    window = generate.generate(*model_parts, prompt, kv_cache=False, **kw)
    np.testing.assert_array_equal(cached, window)
    assert not np.array_equal(cached[0], cached[1])  # three different samples, not one repeated


@pytest.mark.parametrize("block", [1, 2])
def test_kv_cache_decodes_the_smallest_contexts(block):
    """block_size 1: a one-row position table (Flax's Embed would broadcast it, not look it up)."""
    graphdef, params, rest = nnx.split(GPT(GPTConfig(block_size=block, n_layer=1, n_head=2, n_embd=16),
                                           rngs=nnx.Rngs(1)), nnx.Param, ...)
    parts = graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    kw = dict(tokens=4, block_size=block, temperature=0.0)
    cached = generate.generate(*parts, data.encode("ab"), kv_cache=True, **kw)
    np.testing.assert_array_equal(cached, generate.generate(*parts, data.encode("ab"), kv_cache=False, **kw))


def test_a_model_without_a_cache_uses_the_sliding_window():
    class Bigram(nnx.Module):  # any tokens -> logits model
        def __init__(self, rngs):
            self.table = nnx.Embed(256, 256, rngs=rngs)

        def __call__(self, tokens_BT):
            return self.table(tokens_BT)

    graphdef, params, rest = nnx.split(Bigram(nnx.Rngs(0)), nnx.Param, ...)
    out = generate.generate(graphdef, params, rest, data.encode("ab"), tokens=5, block_size=8, temperature=0.0)
    table = np.asarray(params["table"]["embedding"][...])
    want, tok = [], data.encode("b")[0]
    for _ in range(5):
        tok = int(table[tok].argmax())
        want.append(tok)
    np.testing.assert_array_equal(out[0], want)


@pytest.mark.parametrize("flag, value, needle", [
    ("--temperature", "inf", "--temperature=inf: must be a finite number >= 0"),
    ("--temperature", "nan", "--temperature=nan"),
    ("--seed", "4294967296", "--seed=4294967296: must be an integer in [0, 2**32)"),
])
def test_cli_refuses_unusable_sampling_flags_in_one_line(tmp_path, flag, value, needle):
    r = _cli("--run-dir", str(tmp_path / "nothing"), flag, value)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr


@pytest.mark.parametrize("value", ["0", "1.5", "nan", "-1"])
def test_top_p_out_of_range_is_refused_alike_by_the_api_the_cli_and_the_config(tmp_path, capsys, value):
    with pytest.raises(ValueError) as api:
        generate.generate(None, None, None, data.encode("x"), tokens=4, block_size=BLOCK, top_p=float(value))
    why = str(api.value).split(": ", 1)[1]
    assert str(api.value).startswith(f"top_p={float(value)!r}: ") and "(0, 1]" in why

    assert generate.main(["--run-dir", str(tmp_path / "nothing"), "--top-p", value]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0] == f"error: --top-p={float(value)!r}: {why}", lines

    with pytest.raises(config.ConfigError) as cfg:
        config.load("tiny", [f"train.sample_top_p={value}"])
    assert str(cfg.value) == f"train.sample_top_p={float(value)!r}: {why}"


def test_top_p_flag_defaults_to_off():
    assert generate._parser().parse_args(["--run-dir", "r"]).top_p == 1.0
    assert generate._parser().parse_args(["--run-dir", "r", "--top-p", "0.9"]).top_p == 0.9
