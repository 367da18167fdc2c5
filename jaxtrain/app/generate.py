"""Sampling text from a trained GPT: temperature, top-k, top-p (nucleus), a prompt.

Two decoders, each one jitted function of fixed shapes that compiles once for
every prompt, number of tokens, temperature, top-k and top-p:

- **KV cache** (models with ``init_cache`` / ``decode`` methods, such as
  :class:`jaxtrain.models.GPT`): one position per call, attending to the cached
  keys and values of the earlier ones, while the sequence fits ``block_size``.
- **Sliding window** (any model mapping ``[B, T]`` tokens to ``[B, T, V]``
  logits, and a GPT once the sequence is longer than ``block_size``, since its
  learned positions shift): the model runs over a ``[B, block_size]`` window of
  the latest tokens (left-aligned, ``length`` of them valid).

Both give the same tokens for the same seed (token ``i`` is drawn with
``fold_in(key(seed), i)``).

Example::

    text = sample_text(state, "def ", tokens=200, temperature=0.8, top_k=40, top_p=0.95, seed=0)

From the command line, on a run directory's latest checkpoint::

    jaxtrain generate --run-dir runs/default --prompt "def " --tokens 200
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtrain.app import data, tokenizer as tokenizers

PyTree = Any
_START = data.encode("\n")  # an empty prompt starts at a line break


@functools.partial(jax.jit, static_argnums=0)
def _decode_step(graphdef: nnx.GraphDef, params: PyTree, model_state: PyTree, window_BT: jax.Array,
                 length: jax.Array, seed: jax.Array, index: jax.Array, temperature: jax.Array,
                 top_k: jax.Array, top_p: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pick the token after ``window_BT[:, :length]`` and append it.

    Args:
      window_BT: int32 ``[B, T]`` with ``T = block_size``; positions ``>= length`` are
        ignored (the model is causal).
      length: int32 scalar in ``[1, T]``: valid tokens in the window.
      seed, index: int32 scalars; this token's key is ``fold_in(key(seed), index)``.
      temperature: float32 scalar; 0 means greedy (argmax).
      top_k: int32 scalar; sample among the ``top_k`` most likely tokens (0 = all).
      top_p: float32 scalar in ``(0, 1]``; nucleus sampling (1 = off), see :func:`pick`.
    Returns:
      ``(window_BT, length, token_B)``: the window with the token appended (shifted left
      by one once full), the new length and the token.
    """
    model = nnx.merge(graphdef, params, model_state)
    T = window_BT.shape[1]
    logits_BTV = model(window_BT)
    logits_BV = jax.lax.dynamic_index_in_dim(logits_BTV, length - 1, axis=1, keepdims=False)
    token_B = pick(logits_BV, jax.random.fold_in(jax.random.key(seed), index), temperature, top_k, top_p)
    appended = jax.lax.dynamic_update_index_in_dim(window_BT, token_B, length % T, axis=1)
    shifted = jnp.roll(window_BT, -1, axis=1).at[:, -1].set(token_B)
    window_BT = jnp.where(length < T, appended, shifted)
    return window_BT, jnp.minimum(length + 1, T), token_B


@functools.partial(jax.jit, static_argnums=0)
def _cached_step(graphdef: nnx.GraphDef, params: PyTree, model_state: PyTree, cache: PyTree, token_B: jax.Array,
                 pos: jax.Array, seed: jax.Array, index: jax.Array, temperature: jax.Array,
                 top_k: jax.Array, top_p: jax.Array) -> tuple[PyTree, jax.Array]:
    """Feed ``token_B`` at position ``pos`` through the model's KV cache; pick the next token.

    Returns ``(cache, next_token_B)``; the next token's key is ``fold_in(key(seed), index)``.
    """
    model = nnx.merge(graphdef, params, model_state)
    logits_BV, cache = model.decode(token_B, pos, cache)
    return cache, pick(logits_BV, jax.random.fold_in(jax.random.key(seed), index), temperature, top_k, top_p)


def pick(logits_BV: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array,
         top_p: jax.Array = 1.0) -> jax.Array:
    """Sample int32 ``[B]`` from logits ``[B, V]`` with temperature, top-k and top-p (traced scalars).

    ``temperature <= 0`` is greedy; ``top_k`` outside ``[1, V]`` keeps all tokens.
    ``top_p < 1`` (nucleus sampling) then keeps, of the tokens top-k left, the
    smallest set of most likely ones whose probabilities (at this temperature)
    sum to at least ``top_p`` (always the most likely one; tokens tied with the
    last one kept stay too), and draws from it renormalised. ``top_p >= 1`` cuts
    nothing: the same tokens as without it, for the same key.
    """
    V = logits_BV.shape[-1]
    k = jnp.where((top_k >= 1) & (top_k <= V), top_k, V)
    sorted_BV = jnp.sort(logits_BV, axis=-1)
    kth_B1 = jax.lax.dynamic_index_in_dim(sorted_BV, V - k, axis=-1)  # k-th largest
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    t = jnp.maximum(temperature, 1e-6)
    scaled_BV = logits_BV / t
    # The nucleus, from the same sort (the top-k cut and the temperature keep the order):
    # the likeliest tokens whose predecessors hold less than top_p of the probability.
    desc_BV = jnp.flip(jnp.where(sorted_BV < kth_B1, -jnp.inf, sorted_BV), axis=-1) / t
    probs_BV = jax.nn.softmax(desc_BV, axis=-1)
    cum_BV = jnp.cumsum(probs_BV, axis=-1)
    before_BV = jnp.concatenate([jnp.zeros_like(cum_BV[..., :1]), cum_BV[..., :-1]], axis=-1)
    n_B1 = jnp.sum(before_BV < top_p, axis=-1, keepdims=True)  # >= 1: nothing comes before the first
    last_B1 = jnp.take_along_axis(desc_BV, n_B1 - 1, axis=-1)  # the least likely token kept
    scaled_BV = jnp.where((scaled_BV < last_B1) & (top_p < 1), -jnp.inf, scaled_BV)  # top_p >= 1: unchanged
    sampled = jax.random.categorical(key, scaled_BV, axis=-1)
    greedy = jnp.argmax(logits_BV, axis=-1)
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


def check_sampling(*, temperature: float, top_k: int, seed: int, top_p: float = 1.0,
                   names: Optional[dict] = None) -> None:
    """Raise ``ValueError`` naming the setting unless temperature, top-k, top-p and seed are usable.

    ``temperature``: a finite number >= 0 (0: greedy); ``top_k``: an integer >= 0
    (0, or more than the vocabulary: every token); ``top_p``: a finite number in
    ``(0, 1]`` (1: off); ``seed``: an integer in ``[0, 2**32)``. ``names`` maps
    these to the caller's names for them (a config key or a command-line flag).
    """
    names = names or {}
    if not (isinstance(temperature, (int, float, np.floating, np.integer)) and math.isfinite(temperature)
            and temperature >= 0):
        raise ValueError(f"{names.get('temperature', 'temperature')}={temperature!r}: must be a finite number "
                         f">= 0 (0: greedy)")
    if not (isinstance(top_k, (int, np.integer)) and not isinstance(top_k, bool) and top_k >= 0):
        raise ValueError(f"{names.get('top_k', 'top_k')}={top_k!r}: must be an integer >= 0 (0: every token)")
    if not (isinstance(top_p, (int, float, np.floating, np.integer)) and not isinstance(top_p, bool)
            and 0 < top_p <= 1):  # NaN and inf fail too
        raise ValueError(f"{names.get('top_p', 'top_p')}={top_p!r}: must be a finite number in (0, 1] (1: off)")
    if not (isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) and 0 <= seed < 2**32):
        raise ValueError(f"{names.get('seed', 'seed')}={seed!r}: must be an integer in [0, 2**32)")


def generate(graphdef: nnx.GraphDef, params: PyTree, model_state: PyTree, prompt: np.ndarray, *,
             tokens: int, block_size: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             seed: int = 0, num_samples: int = 1, kv_cache: Optional[bool] = None) -> np.ndarray:
    """Continue ``prompt`` (1-D token ids) by ``tokens`` tokens, ``num_samples`` times.

    Only the last ``block_size`` prompt tokens are seen; an empty prompt starts
    at ``"\\n"``. Returns the new tokens, int32 ``[num_samples, tokens]``.
    ``temperature``, ``top_k`` and ``top_p`` are as in :func:`pick` (checked
    by :func:`check_sampling`); ``top_p=1`` is off.
    ``kv_cache``: decode through the model's KV cache while the sequence fits
    ``block_size`` (None: when the model has ``init_cache`` and ``decode``;
    False: always the sliding window). Tokens are collected on the device and
    fetched once at the end. The first call of each decoder gets host (numpy)
    inputs only, so under a multi-process mesh every process passes identical
    values and JAX treats them as replicated.
    """
    check_sampling(temperature=temperature, top_k=top_k, seed=seed, top_p=top_p)
    prompt = np.asarray(prompt, dtype=np.int32).reshape(-1)
    if prompt.size == 0:
        prompt = _START.astype(np.int32)
    prompt = prompt[-block_size:]
    # top_k beyond the vocabulary keeps every token, as 0 does (and would overflow int32)
    top_k = 0 if top_k > np.iinfo(np.int32).max else top_k
    seed, temperature, top_k, top_p = np.uint32(seed), np.float32(temperature), np.int32(top_k), np.float32(top_p)
    if tokens <= 0:
        return np.zeros((num_samples, 0), np.int32)
    model = nnx.merge(graphdef, params, model_state)
    if kv_cache is None:
        kv_cache = callable(getattr(model, "init_cache", None)) and callable(getattr(model, "decode", None))
    out: list = []
    if kv_cache:
        # Positions 0 .. block_size-1 through the cache: the prompt (all but its last
        # token only fill the cache), then one generated token per position.
        cache = model.init_cache(num_samples)
        for pos, tok in enumerate(prompt[:-1]):
            cache, _ = _cached_step(graphdef, params, model_state, cache, np.full(num_samples, tok, np.int32),
                                    np.int32(pos), seed, np.int32(0), temperature, top_k, top_p)
        token_B = np.full(num_samples, prompt[-1], np.int32)
        for pos in range(prompt.size - 1, min(block_size, prompt.size - 1 + tokens)):
            cache, token_B = _cached_step(graphdef, params, model_state, cache, token_B, np.int32(pos), seed,
                                          np.int32(len(out)), temperature, top_k, top_p)
            out.append(token_B)
        del cache
    if len(out) < tokens:  # the sliding window: from the start, or once the sequence outgrew block_size
        window = np.zeros((num_samples, block_size), np.int32)
        window[:, : prompt.size] = prompt
        length = np.int32(prompt.size)
        if out:  # continue from the cached decoding: the window is the latest block_size tokens
            seq = np.concatenate([np.repeat(prompt[None], num_samples, 0), np.stack(jax.device_get(out), 1)], 1)
            window, length = seq[:, -block_size:].astype(np.int32), np.int32(block_size)
        for i in range(len(out), tokens):
            window, length, token_B = _decode_step(graphdef, params, model_state, window, length, seed,
                                                   np.int32(i), temperature, top_k, top_p)
            out.append(token_B)
    return np.stack(jax.device_get(out), axis=1)


def sample_text(state, prompt: str, *, tokens: int, temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0, seed: int = 0, num_samples: int = 1, kv_cache: Optional[bool] = None,
                byte_level: bool = True, tokenizer: Optional[tokenizers.Tokenizer] = None) -> list[str]:
    """``prompt`` + generated text from a :class:`~jaxtrain.state.TrainState` of a GPT.

    Returns ``num_samples`` strings (invalid UTF-8 at a cut becomes U+FFFD).
    ``tokenizer`` (:mod:`jaxtrain.app.tokenizer`, e.g. the run's) encodes the
    prompt and decodes the samples; an empty prompt then starts at its encoding
    of ``"\n"``. Without one: bytes, or with ``byte_level=False`` (a model
    trained on token ids of an unknown tokenizer, :func:`jaxtrain.data.is_byte_level`)
    the prompt is token ids separated by spaces and each sample is the prompt's
    ids and the new ones, for that tokenizer to decode.
    """
    config = state.model().config
    ids = data.prompt_tokens(prompt, byte_level=byte_level, vocab_size=config.vocab_size, tokenizer=tokenizer)
    start = ids if ids.size or tokenizer is None else tokenizer.encode("\n")
    new = generate(state.graphdef, state.params, state.model_state, start, tokens=tokens,
                   block_size=config.block_size, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                   num_samples=num_samples, kv_cache=kv_cache)
    if tokenizer is not None and tokenizer is not tokenizers.BYTES:
        # decoded with the prompt: a decoder may join a token to the one before it (spaces, "##")
        return [tokenizer.decode(np.concatenate([ids, row])) for row in new]
    if byte_level or tokenizer is not None:
        return [prompt + data.decode(row) for row in new]
    return [data.format_ids(np.concatenate([ids, row])) for row in new]


# ---------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other user error (argparse prints the usage first)
        self.exit(2, f"error: {message}; see jaxtrain generate --help\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="jaxtrain generate",
                description="Generate text from a run directory's latest checkpoint.")
    p.add_argument("run_dir_arg", nargs="?", metavar="RUN_DIR", help="run directory written by jaxtrain run")
    p.add_argument("--run-dir", help="the same, as an option")
    p.add_argument("--prompt", default="", help="text to continue (default: start of a line); for a run on "
                   "a .bin/.npy corpus of token ids, token ids separated by spaces")
    p.add_argument("--tokens", type=int, default=200, help="tokens to generate (bytes, with the byte tokenizer)")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, default=40, help="sample among the k most likely tokens; 0 = all")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: sample among the fewest most "
                   "likely tokens holding this much probability, in (0, 1]; 1 = off")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--num-samples", type=int, default=1, help="independent samples")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if (args.run_dir is None) == (args.run_dir_arg is None):
        parser.error("give the run directory once: jaxtrain generate RUN_DIR (or --run-dir RUN_DIR)")
    args.run_dir = args.run_dir or args.run_dir_arg
    for flag, value, low in (("--tokens", args.tokens, 0), ("--num-samples", args.num_samples, 1)):
        if value < low:
            print(f"error: {flag}={value} must be >= {low}", file=sys.stderr)
            return 2
    try:
        check_sampling(temperature=args.temperature, top_k=args.top_k, seed=args.seed, top_p=args.top_p,
                       names={"temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p",
                              "seed": "--seed"})
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from jaxtrain.app import checkpoint

    try:
        state, cfg = checkpoint.load_run(args.run_dir)
    except (checkpoint.CheckpointError, ValueError) as e:  # ValueError covers ConfigError
        print(f"error: cannot load a checkpoint from --run-dir={args.run_dir}: {str(e).splitlines()[0]}",
              file=sys.stderr)
        return 2
    if cfg.task != "lm":
        print(f"error: --run-dir={args.run_dir} trained task={cfg.task!r}; generate samples the built-in "
              "language model (task=lm)", file=sys.stderr)
        return 2
    byte_level = data.is_byte_level(cfg.data.source)
    try:
        tok = tokenizers.load_run(args.run_dir)  # None: a run of an earlier version, or token ids
        data.prompt_tokens(args.prompt, byte_level=byte_level, vocab_size=cfg.model.vocab_size, key="--prompt",
                           tokenizer=tok)
    except (data.DataError, tokenizers.TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    texts = sample_text(state, args.prompt, tokens=args.tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, seed=args.seed, num_samples=args.num_samples, byte_level=byte_level,
                        tokenizer=tok)
    print("\n\n-----\n\n".join(texts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
