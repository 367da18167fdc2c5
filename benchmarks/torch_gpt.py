"""A PyTorch GPT with nanoGPT's architecture and ``state_dict`` key names.

The reference side of the parity test (``tests/test_parity_torch.py``) and of
the speed benchmark: the same model and step a PyTorch user would write.

``state_dict()`` keys (torch ``Linear`` weights are ``(out, in)``)::

    transformer.wte.weight                      (V, C)
    transformer.wpe.weight                      (block_size, C)
    transformer.h.{i}.ln_1.weight / .bias       (C,)
    transformer.h.{i}.attn.c_attn.weight / .bias  (3C, C) / (3C,)
    transformer.h.{i}.attn.c_proj.weight / .bias  (C, C) / (C,)
    transformer.h.{i}.ln_2.weight / .bias       (C,)
    transformer.h.{i}.mlp.c_fc.weight / .bias   (4C, C) / (4C,)
    transformer.h.{i}.mlp.c_proj.weight / .bias (C, 4C) / (C,)
    transformer.ln_f.weight / .bias             (C,)
    lm_head.weight                              (V, C), the same tensor as wte when tied

Example::

    model = TorchGPT(TorchGPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=32))
    opt = make_adamw(model, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    loss, grad_norm = torch_train_step(model, opt, x_BT, y_BT, max_norm=1.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["TorchGPTConfig", "TorchGPT", "make_adamw", "torch_train_step"]


@dataclass(frozen=True)
class TorchGPTConfig:
    vocab_size: int = 256
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    tie_embeddings: bool = True


class LayerNorm(nn.Module):
    """LayerNorm (eps 1e-5) whose bias is optional, as in nanoGPT."""

    def __init__(self, dim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: TorchGPTConfig):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        B, T, C = x_BTC.shape
        # [B, T, 3C] -> three [B, N, T, H] tensors (SDPA wants heads before time)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(x_BTC).split(C, dim=2))
        y_BNTH = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y_BTC = y_BNTH.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y_BTC))


class MLP(nn.Module):
    def __init__(self, cfg: TorchGPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU()  # exact (erf) GELU
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x_BTC))))


class Block(nn.Module):
    def __init__(self, cfg: TorchGPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.n_embd, cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = LayerNorm(cfg.n_embd, cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        x_BTC = x_BTC + self.attn(self.ln_1(x_BTC))
        return x_BTC + self.mlp(self.ln_2(x_BTC))


class TorchGPT(nn.Module):
    """nanoGPT-shaped language model: ``forward(idx_BT) -> logits_BTV``."""

    def __init__(self, cfg: TorchGPTConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
            ln_f=LayerNorm(cfg.n_embd, cfg.bias),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx_BT: torch.Tensor) -> torch.Tensor:
        T = idx_BT.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size={self.config.block_size}")
        pos = torch.arange(T, device=idx_BT.device)
        x_BTC = self.transformer.drop(self.transformer.wte(idx_BT) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x_BTC = block(x_BTC)
        return self.lm_head(self.transformer.ln_f(x_BTC))


def make_adamw(model: nn.Module, lr: float, betas: tuple[float, float], eps: float,
               weight_decay: float) -> torch.optim.AdamW:
    """AdamW with nanoGPT's two groups: tensors with dim >= 2 decay, the rest do not.

    Embeddings are matrices, so they decay (jaxtrain: ``decay_embeddings=True``).
    A tied ``lm_head.weight`` is the same tensor as ``wte`` and counted once.
    """
    params = [p for p in model.parameters() if p.requires_grad]  # parameters() deduplicates tied tensors
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def torch_train_step(model: nn.Module, opt: torch.optim.Optimizer, x_BT: torch.Tensor, y_BT: torch.Tensor,
                     max_norm: float) -> tuple[float, float]:
    """The PyTorch step: forward, cross-entropy, backward, clip, AdamW, zero_grad.

    Returns ``(loss, grad_norm)`` as Python floats; ``grad_norm`` is the global
    norm before clipping (what ``clip_grad_norm_`` returns).
    """
    logits_BTV = model(x_BT)
    loss = F.cross_entropy(logits_BTV.reshape(-1, logits_BTV.size(-1)), y_BT.reshape(-1))
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item(), grad_norm.item()
