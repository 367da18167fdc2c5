"""The Llama model's settings, in a module of their own so that reading a config needs no JAX."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["LlamaConfig", "default_mlp_hidden"]


def default_mlp_hidden(n_embd: int, multiple_of: int = 64) -> int:
    """Llama's SwiGLU width for ``n_embd``: ``8/3 * n_embd`` rounded up to a multiple of ``multiple_of``.

    Three matrices of this width hold about as many parameters as a 4x GELU
    MLP's two (Llama's paper); e.g. 128 -> 384, 768 -> 2048, 4096 -> 11008 with
    ``multiple_of=256`` (Llama 1's 7B).
    """
    return multiple_of * -(-8 * n_embd // (3 * multiple_of))


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 256  # tokens in the vocabulary
    block_size: int = 256  # longest context the model sees (HF: max_position_embeddings)
    n_layer: int = 4  # transformer blocks (HF: num_hidden_layers)
    n_head: int = 4  # query heads per block (HF: num_attention_heads)
    n_kv_head: Optional[int] = None  # key/value heads, dividing n_head (grouped-query attention); None: n_head
    n_embd: int = 128  # residual stream width (HF: hidden_size)
    head_dim: Optional[int] = None  # width of one head, even (rotary pairs); None: n_embd // n_head
    mlp_hidden: Optional[int] = None  # SwiGLU width (HF: intermediate_size); None: 8/3 * n_embd up to a multiple of 64
    norm_eps: float = 1e-5  # RMSNorm epsilon (HF: rms_norm_eps)
    rope_theta: float = 10000.0  # rotary base (HF: rope_parameters.rope_theta)
    tie_embeddings: bool = False  # lm_head shares the token embedding matrix (HF: tie_word_embeddings)
    dropout: float = 0.0  # dropout on attention probabilities (HF: attention_dropout); Llama has no other dropout
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 (params stay float32; no float16: no loss scaling)
    remat: bool = False  # recompute each block in the backward to save memory
    attention: str = "xla"  # attention implementation: xla (written out) | cudnn (NVIDIA GPUs)

    @property
    def kv_heads(self) -> int:
        """Key/value heads: ``n_kv_head``, or ``n_head`` when unset."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def head_size(self) -> int:
        """Width of one head: ``head_dim``, or ``n_embd // n_head`` when unset."""
        return self.n_embd // self.n_head if self.head_dim is None else self.head_dim

    @property
    def mlp_width(self) -> int:
        """SwiGLU hidden width: ``mlp_hidden``, or :func:`default_mlp_hidden` of ``n_embd``."""
        return default_mlp_hidden(self.n_embd) if self.mlp_hidden is None else self.mlp_hidden

    def problems(self) -> list[str]:
        """What is wrong with these settings, one line each (empty when they are usable)."""
        out = []
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                out.append(f"LlamaConfig.{name}={getattr(self, name)!r}: must be a positive integer")
        if self.n_kv_head is not None and (self.n_kv_head < 1 or self.n_head % self.n_kv_head):
            out.append(f"LlamaConfig.n_kv_head={self.n_kv_head!r}: must divide n_head={self.n_head} "
                       "(1 for multi-query attention, n_head or None for plain multi-head)")
        if self.head_dim is None and self.n_head >= 1 and self.n_embd % self.n_head:
            out.append(f"LlamaConfig.n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                       "set head_dim explicitly")
        if self.head_size < 2 or self.head_size % 2:
            out.append(f"LlamaConfig.head_dim={self.head_size}: must be even and >= 2 (rotary embeddings "
                       "rotate pairs of features)")
        if self.mlp_hidden is not None and self.mlp_hidden < 1:
            out.append(f"LlamaConfig.mlp_hidden={self.mlp_hidden!r}: must be a positive width or None "
                       f"(default {default_mlp_hidden(self.n_embd)})")
        if not self.norm_eps > 0:
            out.append(f"LlamaConfig.norm_eps={self.norm_eps!r}: must be positive")
        if not self.rope_theta > 0:
            out.append(f"LlamaConfig.rope_theta={self.rope_theta!r}: must be positive")
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"LlamaConfig.dropout={self.dropout!r}: must be in [0, 1)")
        if self.attention not in ("xla", "cudnn"):
            out.append(f"LlamaConfig.attention={self.attention!r}: must be one of xla, cudnn")
        return out
