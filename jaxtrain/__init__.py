"""jaxtrain: the PyTorch training step, done the functional way in JAX.

    from jaxtrain import TrainState, train_step, eval_step, make_optimizer

The names below are imported on first use (PEP 562), so ``import jaxtrain`` and
``python -m jaxtrain.run --help`` do not pay for importing JAX.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "TrainState": "jaxtrain.state",
    "train_step": "jaxtrain.step",
    "eval_step": "jaxtrain.step",
    "lm_loss": "jaxtrain.losses",
    "check_tokens": "jaxtrain.losses",
    "make_optimizer": "jaxtrain.optim",
    "make_schedule": "jaxtrain.optim",
    "decay_mask": "jaxtrain.optim",
    "OptimConfig": "jaxtrain.optim_config",
}

__all__ = ["TrainState", "train_step", "eval_step", "lm_loss", "check_tokens", "make_optimizer",
           "make_schedule", "decay_mask", "OptimConfig", "__version__"]  # == _EXPORTS + __version__ (tested)

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names come from __getattr__
    from jaxtrain.optim import decay_mask, make_optimizer, make_schedule
    from jaxtrain.optim_config import OptimConfig
    from jaxtrain.state import TrainState
    from jaxtrain.losses import check_tokens, lm_loss
    from jaxtrain.step import eval_step, train_step


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'jaxtrain' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
