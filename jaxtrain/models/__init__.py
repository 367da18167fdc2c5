"""Models shipped with jaxtrain: the GPT (nanoGPT's names), the Llama (Hugging Face's names), nanoGPT
``state_dict`` interop and Hugging Face safetensors checkpoints (import and export).

Imported on first use (PEP 562), so reading a :class:`GPTConfig` or :class:`LlamaConfig` needs no JAX.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "GPT": "jaxtrain.models.gpt",
    "GPTConfig": "jaxtrain.models.gpt_config",
    "from_torch_state_dict": "jaxtrain.models.interop",
    "to_torch_state_dict": "jaxtrain.models.interop",
    "Llama": "jaxtrain.models.llama",
    "LlamaConfig": "jaxtrain.models.llama_config",
    "config_from_hf": "jaxtrain.models.hf",
    "load_hf_params": "jaxtrain.models.hf",
    "load_pretrained": "jaxtrain.models.hf",
    "save_pretrained": "jaxtrain.models.hf",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from jaxtrain.models.gpt import GPT
    from jaxtrain.models.gpt_config import GPTConfig
    from jaxtrain.models.hf import config_from_hf, load_hf_params, load_pretrained, save_pretrained
    from jaxtrain.models.interop import from_torch_state_dict, to_torch_state_dict
    from jaxtrain.models.llama import Llama
    from jaxtrain.models.llama_config import LlamaConfig


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'jaxtrain.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
