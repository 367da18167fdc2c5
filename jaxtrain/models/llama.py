"""A Llama in Flax NNX with Hugging Face's architecture and parameter names.

Pre-RMSNorm blocks; causal attention with rotary position embeddings (the
"rotate half" convention) and grouped-query attention (``n_kv_head`` key/value
heads shared by ``n_head // n_kv_head`` query heads each); a SwiGLU MLP,
``down(silu(gate(x)) * up(x))``; no biases; a tied or separate head. The
attribute names follow ``transformers``' ``LlamaForCausalLM`` (``embed_tokens``,
``layers[i].self_attn.q_proj``, ``mlp.gate_proj``, ``input_layernorm``,
``norm``, ``lm_head``) so a checkpoint maps onto it key by key (see
:mod:`jaxtrain.models.hf`). The public interface is the GPT's: ``__call__``,
``init_cache`` / ``decode``, ``num_params``, ``flops_per_token``, ``config``.

Shapes: B batch, T time, C = n_embd, N = n_head, K = n_kv_head, R = N // K,
H = head_dim, F = mlp hidden width, V = vocab_size.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtrain import ops
from jaxtrain.errors import ConfigError
from jaxtrain.models.llama_config import LlamaConfig

__all__ = ["Llama", "LlamaConfig", "rope_tables"]

_STD = 0.02  # Hugging Face's initializer_range


def _dtype(cfg: LlamaConfig):
    return jnp.dtype(cfg.dtype)


def _linear(cfg: LlamaConfig, d_in: int, d_out: int, rngs: nnx.Rngs, std: float = _STD) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, use_bias=False, kernel_init=nnx.initializers.normal(std), dtype=_dtype(cfg),
                      rngs=rngs)


def _apply(layer: nnx.Linear, x: jax.Array) -> jax.Array:
    """``x @ layer.kernel`` through :func:`jaxtrain.ops.dense`, in ``x``'s dtype."""
    return ops.dense(x, layer.kernel[...])


def rope_tables(positions: jax.Array, head_dim: int, theta: float, dtype) -> tuple[jax.Array, jax.Array]:
    """``(cos, sin)``, each ``[*positions.shape, head_dim]``, for :func:`jaxtrain.ops.rotary`.

    Angle ``p * theta^(-2i / head_dim)`` for frequency ``i < head_dim / 2``, each
    frequency twice (first half, second half), computed in float32 and then
    cast to ``dtype``, as Hugging Face's ``LlamaRotaryEmbedding`` does.
    """
    inv_freq = 1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
    angles = jnp.asarray(positions, jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


class RMSNorm(nnx.Module):
    """Hugging Face's ``LlamaRMSNorm``: a ``weight`` of ones, through :func:`jaxtrain.ops.rms_norm`."""

    def __init__(self, dim: int, eps: float):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return ops.rms_norm(x, self.weight[...], eps=self.eps)


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        N, K, H, C = cfg.n_head, cfg.kv_heads, cfg.head_size, cfg.n_embd
        self.n_head, self.n_kv_head, self.head_dim, self.theta = N, K, H, cfg.rope_theta
        self.implementation = None if cfg.attention == "xla" else cfg.attention
        self.dropout = cfg.dropout
        self.q_proj = _linear(cfg, C, N * H, rngs)
        self.k_proj = _linear(cfg, C, K * H, rngs)
        self.v_proj = _linear(cfg, C, K * H, rngs)
        self.o_proj = _linear(cfg, N * H, C, rngs, std=_STD / math.sqrt(2 * cfg.n_layer))

    def __call__(self, x_BTC: jax.Array, *, rngs: nnx.Rngs | None, deterministic: bool) -> jax.Array:
        B, T, _ = x_BTC.shape
        N, K, H = self.n_head, self.n_kv_head, self.head_dim
        cos_TH, sin_TH = rope_tables(jnp.arange(T), H, self.theta, x_BTC.dtype)
        if K == N:
            # One product for q, k and v ([C, 3 N H], the three kernels side by side) straight into the
            # attention's [B, T, 3, N, H] layout, and one rotary pass over it whose tables leave v as it
            # is (cos 1, sin 0: v * 1 + rotate_half(v) * 0 is v exactly): no stacking copy.
            kernel_C3NH = jnp.concatenate([self.q_proj.kernel[...], self.k_proj.kernel[...],
                                           self.v_proj.kernel[...]], axis=1)
            qkv_BT3NH = ops.dense(x_BTC, kernel_C3NH).reshape(B, T, 3, N, H)
            one, zero = jnp.ones((T, 1, 1, H), cos_TH.dtype), jnp.zeros((T, 1, 1, H), sin_TH.dtype)
            cos_T31H = jnp.concatenate([cos_TH[:, None, None], cos_TH[:, None, None], one], axis=1)
            sin_T31H = jnp.concatenate([sin_TH[:, None, None], sin_TH[:, None, None], zero], axis=1)
            qkv_BT3NH = ops.rotary(qkv_BT3NH, cos_T31H, sin_T31H)
        else:
            cos_T1H, sin_T1H = cos_TH[:, None], sin_TH[:, None]
            q_BTNH = ops.rotary(_apply(self.q_proj, x_BTC).reshape(B, T, N, H), cos_T1H, sin_T1H)
            k_BTKH = ops.rotary(_apply(self.k_proj, x_BTC).reshape(B, T, K, H), cos_T1H, sin_T1H)
            v_BTKH = _apply(self.v_proj, x_BTC).reshape(B, T, K, H)
            # each key/value head serves R = N // K consecutive query heads (HF's repeat_kv)
            qkv_BT3NH = jnp.stack([q_BTNH, jnp.repeat(k_BTKH, N // K, axis=2), jnp.repeat(v_BTKH, N // K, axis=2)],
                                  axis=2)
        rate = 0.0 if deterministic or self.implementation is not None else self.dropout
        y_BTNH = ops.causal_attention(qkv_BT3NH, dropout_rate=rate, dropout_key=rngs.dropout() if rate else None,
                                      implementation=self.implementation)
        return _apply(self.o_proj, y_BTNH.reshape(B, T, N * H))

    def decode(self, x_BC: jax.Array, pos: jax.Array, k_BKTH: jax.Array, v_BKTH: jax.Array):
        """One position: ``(y_BC, k_BKTH, v_BKTH)`` with this token's rotated key and its value at ``pos``.

        The caches hold the ``K`` key/value heads of positions ``< pos``; the
        ``R`` query heads of a group share one, as in :meth:`__call__`.
        """
        B = x_BC.shape[0]
        N, K, H, T = self.n_head, self.n_kv_head, self.head_dim, k_BKTH.shape[2]
        cos_H, sin_H = rope_tables(pos, H, self.theta, x_BC.dtype)
        q_BKRH = ops.rotary(_apply(self.q_proj, x_BC).reshape(B, N, H), cos_H, sin_H).reshape(B, K, N // K, H)
        k_BKH = ops.rotary(_apply(self.k_proj, x_BC).reshape(B, K, H), cos_H, sin_H)
        v_BKH = _apply(self.v_proj, x_BC).reshape(B, K, H)
        k_BKTH = jax.lax.dynamic_update_index_in_dim(k_BKTH, k_BKH.astype(k_BKTH.dtype), pos, axis=2)
        v_BKTH = jax.lax.dynamic_update_index_in_dim(v_BKTH, v_BKH.astype(v_BKTH.dtype), pos, axis=2)
        logits_BKRT = jnp.einsum("bkrh,bkth->bkrt", q_BKRH, k_BKTH).astype(jnp.float32) / math.sqrt(H)
        probs_BKRT = jax.nn.softmax(jnp.where(jnp.arange(T) <= pos, logits_BKRT, -jnp.inf), axis=-1)
        y_BKRH = jnp.einsum("bkrt,bkth->bkrh", probs_BKRT.astype(v_BKTH.dtype), v_BKTH)
        return _apply(self.o_proj, y_BKRH.reshape(B, N * H)), k_BKTH, v_BKTH


class MLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.gate_proj = _linear(cfg, cfg.n_embd, cfg.mlp_width, rngs)
        self.up_proj = _linear(cfg, cfg.n_embd, cfg.mlp_width, rngs)
        self.down_proj = _linear(cfg, cfg.mlp_width, cfg.n_embd, rngs, std=_STD / math.sqrt(2 * cfg.n_layer))

    def __call__(self, x_BTC: jax.Array) -> jax.Array:
        h_BTF = ops.swiglu(_apply(self.gate_proj, x_BTC), _apply(self.up_proj, x_BTC))
        return _apply(self.down_proj, h_BTF)


class Block(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = Attention(cfg, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x_BTC, *, rngs, deterministic):
        x_BTC = x_BTC + self.self_attn(self.input_layernorm(x_BTC), rngs=rngs, deterministic=deterministic)
        return x_BTC + self.mlp(self.post_attention_layernorm(x_BTC))

    def decode(self, x_BC, pos, cache):
        """:meth:`__call__` for one position; ``cache`` is this block's ``(k_BKTH, v_BKTH)``."""
        y_BC, k_BKTH, v_BKTH = self.self_attn.decode(self.input_layernorm(x_BC), pos, *cache)
        x_BC = x_BC + y_BC
        return x_BC + self.mlp(self.post_attention_layernorm(x_BC)), (k_BKTH, v_BKTH)


class Llama(nnx.Module):
    """Llama-architecture language model (Hugging Face ``LlamaForCausalLM`` without biases or RoPE scaling).

    Example::

        model = Llama(LlamaConfig(n_layer=2, n_embd=64, n_head=4, n_kv_head=2), rngs=nnx.Rngs(0))
        logits_BTV = model(tokens_BT)            # [B, T] int -> [B, T, V] float32
    """

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        """Raises :class:`jaxtrain.errors.ConfigError` (a ``ValueError``) for unusable settings, float16 among
        them: its gradients underflow without loss scaling, which jaxtrain does not do."""
        if _dtype(cfg) == jnp.float16:
            raise ConfigError(f"LlamaConfig.dtype={cfg.dtype!r}: float16 needs loss scaling, which jaxtrain does "
                              "not do; use dtype='bfloat16' (float32's range at the same memory) or 'float32'")
        problems = cfg.problems()
        if problems:
            raise ConfigError(problems[0])
        self.config = cfg
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.n_embd, embedding_init=nnx.initializers.normal(_STD),
                                      rngs=rngs)
        self.layers = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layer)])
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else _linear(cfg, cfg.n_embd, cfg.vocab_size, rngs)

    def __call__(self, idx_BT: jax.Array, *, rngs: nnx.Rngs | None = None, deterministic: bool = True) -> jax.Array:
        """Logits ``[B, T, V]`` in float32 for token ids ``idx_BT`` (``T <= block_size``).

        ``rngs`` must hold a ``dropout`` stream when attention dropout is active
        (``deterministic=False`` and ``dropout > 0``).
        """
        cfg = self.config
        T = idx_BT.shape[-1]
        if T > cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds the model's block_size={cfg.block_size}")
        x_BTC = self.embed_tokens(idx_BT).astype(_dtype(cfg))
        for block in self.layers:
            if cfg.remat:
                # rngs as an argument, not a closure: nnx transforms only let arguments be mutated
                x_BTC = nnx.remat(lambda b, x, r: b(x, rngs=r, deterministic=deterministic))(block, x_BTC, rngs)
            else:
                x_BTC = block(x_BTC, rngs=rngs, deterministic=deterministic)
        return self._logits(x_BTC)

    def _logits(self, x_BTC: jax.Array) -> jax.Array:
        """Final RMSNorm and the (tied or separate) head: float32 logits ``[..., V]``."""
        x_BTC = self.norm(x_BTC)
        if self.lm_head is None:
            x_MC = x_BTC.reshape(-1, self.config.n_embd)  # 2-D, as ops.dense flattens
            logits_MV = ops.matmul(x_MC, self.embed_tokens.embedding[...].astype(x_MC.dtype), transpose_b=True)
            logits_BTV = logits_MV.reshape(*x_BTC.shape[:-1], -1)
        else:
            logits_BTV = _apply(self.lm_head, x_BTC)
        return logits_BTV.astype(jnp.float32)

    def init_cache(self, batch: int) -> list:
        """Zero key/value caches for :meth:`decode`: per block ``(k, v)``, each ``[B, K, block_size, H]``.

        Only the ``K = n_kv_head`` shared heads are cached. NumPy arrays in the
        compute dtype, so the first decode call treats them as replicated host
        values, also in a multi-process run.
        """
        cfg = self.config
        shape = (batch, cfg.kv_heads, cfg.block_size, cfg.head_size)
        return [(np.zeros(shape, _dtype(cfg)), np.zeros(shape, _dtype(cfg))) for _ in range(cfg.n_layer)]

    def decode(self, token_B: jax.Array, pos: jax.Array, cache: list) -> tuple[jax.Array, list]:
        """Incremental decoding: float32 logits ``[B, V]`` after ``token_B`` at position ``pos``, and the cache.

        Equals ``self(tokens)[:, pos]`` for the sequence whose first ``pos``
        tokens filled ``cache`` (from :meth:`init_cache`), one call per position;
        ``pos < block_size``. Deterministic (no dropout).
        """
        x_BC = self.embed_tokens(token_B).astype(_dtype(self.config))
        new_cache = []
        for block, layer_cache in zip(self.layers, cache):
            x_BC, layer_cache = block.decode(x_BC, pos, layer_cache)
            new_cache.append(layer_cache)
        return self._logits(x_BC), new_cache

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count. ``non_embedding`` leaves out the token table when it is not also the head
        (a lookup, no products); a tied table counts, as the head's matrix."""
        cfg = self.config
        n = sum(x.size for x in jax.tree.leaves(nnx.state(self, nnx.Param)))
        untied_table = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.n_embd
        return n - untied_table if non_embedding else n

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward), as in the PaLM appendix: ``6 N`` for the
        matrices plus ``12 L (N H) T`` for attention's two products over a full ``block_size`` context."""
        cfg = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_head * cfg.head_size * cfg.block_size
