"""A GPT in Flax NNX with nanoGPT's architecture and parameter names.

Pre-LayerNorm blocks, causal multi-head attention (written out head-major, or a
fused ``jax.nn.dot_product_attention`` kernel such as cuDNN), a GELU MLP (4x wide, exact GELU by
default; width, tanh GELU and LayerNorm eps are options for Hugging Face GPT-2), learned positions, optional
biases, optional weight tying and dropout. Attribute names follow nanoGPT's
``model.py`` (``wte``, ``wpe``, ``h[i].attn.c_attn``, ``ln_f``, ``lm_head``) so a
PyTorch checkpoint maps onto it key by key (see :mod:`jaxtrain.models.interop`).

Shapes: B batch, T time, C = n_embd, N = n_head, H = C // N, V = vocab_size.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtrain import ops
from jaxtrain.models.gpt_config import ACTIVATIONS, GPTConfig
from jaxtrain.diagnostics import attention_logit_stats

__all__ = ["GPT", "GPTConfig"]

_STD = 0.02  # GPT-2 initialisation


def _dense(cfg: GPTConfig, d_in: int, d_out: int, rngs: nnx.Rngs, std: float = _STD) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, use_bias=cfg.bias, kernel_init=nnx.initializers.normal(std),
                      bias_init=nnx.initializers.zeros, dtype=_dtype(cfg), rngs=rngs)


def _dtype(cfg: GPTConfig):
    return jnp.dtype(cfg.dtype)


def _layer_norm(cfg: GPTConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # nanoGPT uses eps 1e-5 (the default); normalisation runs in float32 even under bfloat16 compute.
    return nnx.LayerNorm(cfg.n_embd, epsilon=cfg.norm_eps, use_bias=cfg.bias, dtype=jnp.float32, rngs=rngs)


def _norm(ln: nnx.LayerNorm, x: jax.Array) -> jax.Array:
    """``ln(x)`` through :func:`jaxtrain.ops.layer_norm` (float32 out)."""
    param = lambda p: None if p is None else p[...]  # noqa: E731
    return ops.layer_norm(x, param(ln.scale), param(ln.bias), eps=ln.epsilon)


def _linear(layer: nnx.Linear, x: jax.Array, gelu: bool = False, approximate: bool = False) -> jax.Array:
    """``layer(x)`` (then the exact or tanh GELU) through :func:`jaxtrain.ops.dense`, in the input's dtype."""
    return ops.dense(x, layer.kernel[...], None if layer.bias is None else layer.bias[...], gelu=gelu,
                     approximate=approximate)


class CausalSelfAttention(nnx.Module):
    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        self.n_head = cfg.n_head
        self.implementation = None if cfg.attention == "xla" else cfg.attention
        self.c_attn = _dense(cfg, cfg.n_embd, 3 * cfg.n_embd, rngs)
        self.c_proj = _dense(cfg, cfg.n_embd, cfg.n_embd, rngs, std=_STD / math.sqrt(2 * cfg.n_layer))
        self.resid_dropout = nnx.Dropout(cfg.dropout)
        self.dropout = cfg.dropout
        # True: sow attention-logit statistics (nnx.Intermediate) for diagnostics;
        # a static Python flag, so the default step traces none of it.
        self.sow_stats = False

    def __call__(self, x_BTC: jax.Array, *, rngs: nnx.Rngs | None, deterministic: bool) -> jax.Array:
        B, T, C = x_BTC.shape
        qkv_BT3NH = _linear(self.c_attn, x_BTC).reshape(B, T, 3, self.n_head, C // self.n_head)
        if self.sow_stats:
            for name, value in attention_logit_stats(qkv_BT3NH[:, :, 0], qkv_BT3NH[:, :, 1]).items():
                self.sow(nnx.Intermediate, name, value)
        rate = 0.0 if deterministic or self.implementation is not None else self.dropout
        y_BTNH = ops.causal_attention(qkv_BT3NH, dropout_rate=rate, dropout_key=rngs.dropout() if rate else None,
                                      implementation=self.implementation)
        y_BTC = _linear(self.c_proj, y_BTNH.reshape(B, T, C))
        return self.resid_dropout(y_BTC, deterministic=deterministic, rngs=rngs)

    def decode(self, x_BC: jax.Array, pos: jax.Array, k_BNTH: jax.Array, v_BNTH: jax.Array):
        """One position of incremental decoding: ``(y_BC, k_BNTH, v_BNTH)`` with this token's key/value at ``pos``.

        The caches hold the keys and values of positions ``< pos``; position
        ``pos`` attends to them and to itself, as causal attention does.
        """
        B, C = x_BC.shape
        N, T = self.n_head, k_BNTH.shape[2]
        q_BNH, k_BNH, v_BNH = jnp.unstack(_linear(self.c_attn, x_BC).reshape(B, 3, N, C // N), axis=1)
        k_BNTH = jax.lax.dynamic_update_index_in_dim(k_BNTH, k_BNH.astype(k_BNTH.dtype), pos, axis=2)
        v_BNTH = jax.lax.dynamic_update_index_in_dim(v_BNTH, v_BNH.astype(v_BNTH.dtype), pos, axis=2)
        logits_BNT = jnp.einsum("bnh,bnth->bnt", q_BNH, k_BNTH).astype(jnp.float32) / math.sqrt(C // N)
        probs_BNT = jax.nn.softmax(jnp.where(jnp.arange(T) <= pos, logits_BNT, -jnp.inf), axis=-1)
        y_BNH = jnp.einsum("bnt,bnth->bnh", probs_BNT.astype(v_BNTH.dtype), v_BNTH)
        return _linear(self.c_proj, y_BNH.reshape(B, C)), k_BNTH, v_BNTH


class MLP(nnx.Module):
    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        self.c_fc = _dense(cfg, cfg.n_embd, cfg.mlp_width, rngs)
        self.c_proj = _dense(cfg, cfg.mlp_width, cfg.n_embd, rngs, std=_STD / math.sqrt(2 * cfg.n_layer))
        self.dropout = nnx.Dropout(cfg.dropout)
        self.approximate = cfg.activation == "gelu_tanh"

    def __call__(self, x_BTC, *, rngs, deterministic):
        h_BTF = _linear(self.c_fc, x_BTC, gelu=True, approximate=self.approximate)
        return self.dropout(_linear(self.c_proj, h_BTF), deterministic=deterministic, rngs=rngs)


class Block(nnx.Module):
    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        self.ln_1 = _layer_norm(cfg, rngs)
        self.attn = CausalSelfAttention(cfg, rngs)
        self.ln_2 = _layer_norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x_BTC, *, rngs, deterministic):
        dtype = x_BTC.dtype
        x_BTC = x_BTC + self.attn(_norm(self.ln_1, x_BTC).astype(dtype), rngs=rngs,
                                  deterministic=deterministic)
        return x_BTC + self.mlp(_norm(self.ln_2, x_BTC).astype(dtype), rngs=rngs,
                                deterministic=deterministic)

    def decode(self, x_BC, pos, cache):
        """:meth:`__call__` for one position (no dropout); ``cache`` is this block's ``(k_BNTH, v_BNTH)``."""
        dtype = x_BC.dtype
        y_BC, k_BNTH, v_BNTH = self.attn.decode(_norm(self.ln_1, x_BC).astype(dtype), pos, *cache)
        x_BC = x_BC + y_BC
        return x_BC + self.mlp(_norm(self.ln_2, x_BC).astype(dtype), rngs=None, deterministic=True), (k_BNTH, v_BNTH)


class GPT(nnx.Module):
    """nanoGPT-architecture language model.

    Example::

        model = GPT(GPTConfig(n_layer=2, n_embd=64, n_head=4), rngs=nnx.Rngs(0))
        logits_BTV = model(tokens_BT)            # [B, T] int -> [B, T, V] float32
    """

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        """Raises ``ValueError`` for ``cfg.dtype`` float16: its gradients underflow without loss scaling,
        which jaxtrain does not do."""
        if _dtype(cfg) == jnp.float16:
            raise ValueError(f"GPTConfig.dtype={cfg.dtype!r}: float16 needs loss scaling, which jaxtrain does not "
                             "do; use dtype='bfloat16' (float32's range at the same memory) or 'float32'")
        if cfg.activation not in ACTIVATIONS:
            raise ValueError(f"GPTConfig.activation={cfg.activation!r}: must be one of {', '.join(ACTIVATIONS)}")
        if cfg.mlp_hidden is not None and cfg.mlp_hidden < 1:
            raise ValueError(f"GPTConfig.mlp_hidden={cfg.mlp_hidden!r}: must be a positive width or None (4 * n_embd)")
        self.config = cfg
        self.wte = nnx.Embed(cfg.vocab_size, cfg.n_embd, embedding_init=nnx.initializers.normal(_STD), rngs=rngs)
        self.wpe = nnx.Embed(cfg.block_size, cfg.n_embd, embedding_init=nnx.initializers.normal(_STD), rngs=rngs)
        self.drop = nnx.Dropout(cfg.dropout)
        self.h = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layer)])
        self.ln_f = _layer_norm(cfg, rngs)
        self.lm_head = None if cfg.tie_embeddings else nnx.Linear(
            cfg.n_embd, cfg.vocab_size, use_bias=False, kernel_init=nnx.initializers.normal(_STD),
            dtype=_dtype(cfg), rngs=rngs)

    def __call__(self, idx_BT: jax.Array, *, rngs: nnx.Rngs | None = None, deterministic: bool = True) -> jax.Array:
        """Logits ``[B, T, V]`` in float32 for token ids ``idx_BT`` (``T <= block_size``).

        ``rngs`` must hold a ``dropout`` stream when dropout is active
        (``deterministic=False`` and ``dropout > 0``).
        """
        cfg, dtype = self.config, _dtype(self.config)
        T = idx_BT.shape[-1]
        if T > cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds the model's block_size={cfg.block_size}")
        # positions 0..T-1 as a slice, not a gather: its gradient is a plain sum over the batch
        x_BTC = ops.add_positions(self.wte(idx_BT), self.wpe.embedding[:T]).astype(dtype)
        x_BTC = self.drop(x_BTC, deterministic=deterministic, rngs=rngs)
        for block in self.h:
            if cfg.remat:
                # rngs goes in as an argument, not a closure: dropout advances its
                # counter, and nnx transforms only let arguments be mutated.
                x_BTC = nnx.remat(lambda b, x, r: b(x, rngs=r, deterministic=deterministic))(block, x_BTC, rngs)
            else:
                x_BTC = block(x_BTC, rngs=rngs, deterministic=deterministic)
        return self._logits(x_BTC)

    def _logits(self, x_BTC: jax.Array) -> jax.Array:
        """Final LayerNorm and the (tied or separate) head: float32 logits ``[..., V]``."""
        cfg, dtype = self.config, _dtype(self.config)
        x_BTC = _norm(self.ln_f, x_BTC).astype(dtype)
        if self.lm_head is None:
            x_MC = x_BTC.reshape(-1, cfg.n_embd)  # 2-D for the same reason as ops.dense
            logits_MV = ops.matmul(x_MC, self.wte.embedding[...].astype(dtype), transpose_b=True)
            logits_BTV = logits_MV.reshape(*x_BTC.shape[:-1], -1)
        else:
            logits_BTV = _linear(self.lm_head, x_BTC)
        return logits_BTV.astype(jnp.float32)

    def init_cache(self, batch: int) -> list:
        """Zero key/value caches for :meth:`decode`: per block ``(k, v)``, each ``[B, N, block_size, H]``.

        NumPy arrays (in the compute dtype), so the first decode call treats them
        as replicated host values, also in a multi-process run.
        """
        cfg = self.config
        shape = (batch, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head)
        return [(np.zeros(shape, _dtype(cfg)), np.zeros(shape, _dtype(cfg))) for _ in range(cfg.n_layer)]

    def decode(self, token_B: jax.Array, pos: jax.Array, cache: list) -> tuple[jax.Array, list]:
        """Incremental decoding: float32 logits ``[B, V]`` after ``token_B`` at position ``pos``, and the cache.

        Equals ``self(tokens)[:, pos]`` for the sequence whose first ``pos``
        tokens filled ``cache`` (from :meth:`init_cache`), one call per position;
        ``pos < block_size``. Deterministic (no dropout).
        """
        x_BC = (self.wte(token_B) + self.wpe.embedding[pos]).astype(_dtype(self.config))  # as __call__ reads it
        new_cache = []
        for block, layer_cache in zip(self.h, cache):
            x_BC, layer_cache = block.decode(x_BC, pos, layer_cache)
            new_cache.append(layer_cache)
        return self._logits(x_BC), new_cache

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; like nanoGPT, position embeddings are excluded by default."""
        n = sum(x.size for x in jax.tree.leaves(nnx.state(self, nnx.Param)))
        # the position table is [block_size, n_embd]; read from the config, so shape-only models work too
        return n - self.config.block_size * self.config.n_embd if non_embedding else n

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward), as in the PaLM appendix."""
        cfg = self.config
        n = self.num_params(non_embedding=True)
        return 6 * n + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
