"""Models shipped with jaxtrain: the GPT (nanoGPT's names) and its nanoGPT ``state_dict`` interop.

Imported on first use (PEP 562), so reading a :class:`GPTConfig` needs no JAX.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "GPT": "jaxtrain.models.gpt",
    "GPTConfig": "jaxtrain.models.gpt_config",
    "from_torch_state_dict": "jaxtrain.models.interop",
    "to_torch_state_dict": "jaxtrain.models.interop",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from jaxtrain.models.gpt import GPT
    from jaxtrain.models.gpt_config import GPTConfig
    from jaxtrain.models.interop import from_torch_state_dict, to_torch_state_dict


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'jaxtrain.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
