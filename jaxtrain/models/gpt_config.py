"""The GPT's settings, in a module of their own so that reading a config needs no JAX."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["GPTConfig", "ACTIVATIONS"]

ACTIVATIONS = ("gelu", "gelu_tanh")


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 256  # tokens in the vocabulary (256 for the byte tokenizer)
    block_size: int = 256  # longest context the model sees
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads per block
    n_embd: int = 128  # residual stream width
    dropout: float = 0.0  # dropout rate on attention and residual paths
    bias: bool = True  # biases in Linear and LayerNorm layers, like GPT-2
    tie_embeddings: bool = True  # lm_head shares the token embedding matrix
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 (params stay float32; no float16: no loss scaling)
    remat: bool = False  # recompute each block in the backward to save memory
    attention: str = "xla"  # attention implementation: xla (written out) | cudnn (NVIDIA GPUs)
    activation: str = "gelu"  # MLP activation: gelu (exact, nanoGPT) | gelu_tanh (tanh approximation, HF GPT-2)
    norm_eps: float = 1e-5  # LayerNorm epsilon (HF GPT-2: layer_norm_epsilon)
    mlp_hidden: Optional[int] = None  # MLP hidden width (HF GPT-2: n_inner); None: 4 * n_embd

    @property
    def mlp_width(self) -> int:
        """The MLP's hidden width: ``mlp_hidden``, or ``4 * n_embd`` when unset."""
        return 4 * self.n_embd if self.mlp_hidden is None else self.mlp_hidden
