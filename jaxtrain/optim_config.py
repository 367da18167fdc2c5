"""The optimizer's settings: a frozen dataclass with range checks (no JAX needed to read or check them).

:func:`jaxtrain.make_optimizer` takes them as an :class:`OptimConfig` or as
keywords; the command line's config embeds the same dataclass as ``optim``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Optional

from jaxtrain.errors import ConfigError


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-3  # peak learning rate
    schedule: str = "cosine"  # constant | cosine (warmup + cosine) | wsd (warmup-stable-decay)
    warmup_steps: int = 50  # linear warmup steps (from lr * warmup_init to lr)
    warmup_init: float = 0.0  # warmup starts at lr * warmup_init (0: lr / (warmup_steps + 1))
    decay_steps: Optional[int] = None  # steps of the whole schedule; None = train.steps
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of lr
    wsd_decay_fraction: float = 0.2  # wsd: fraction of steps spent in the final decay
    b1: float = 0.9  # AdamW beta1
    b2: float = 0.95  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.1  # decoupled weight decay on weight matrices
    decay_embeddings: bool = True  # also decay embedding tables (nanoGPT does)
    max_grad_norm: float = 1.0  # clip_by_global_norm threshold; 0 disables clipping


SCHEDULES = ("constant", "cosine", "wsd")
# optim.<key>: (test the value must pass, what is valid). Written so that NaN fails every test.
_RANGES = {
    "lr": (lambda v: 0.0 < v < math.inf, "must be a finite number > 0"),
    "warmup_init": (lambda v: 0.0 <= v <= 1.0, "must be in [0, 1] (a fraction of optim.lr; 0: lr / (warmup_steps + 1))"),
    "min_lr_ratio": (lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]"),
    "wsd_decay_fraction": (lambda v: 0.0 < v <= 1.0, "must be in (0, 1]"),
    "b1": (lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"),
    "b2": (lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"),
    "eps": (lambda v: 0.0 < v < math.inf, "must be a finite number > 0 (AdamW divides by sqrt(v) + eps)"),
    "weight_decay": (lambda v: 0.0 <= v < math.inf, "must be a finite number >= 0"),
    "max_grad_norm": (lambda v: 0.0 <= v < math.inf, "must be a finite number >= 0 (0 disables clipping)"),
}


def _integer_at_least(value: Any, least: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= least


def validate_optim(optim: OptimConfig) -> None:
    """Range checks of an :class:`OptimConfig`; raises :class:`~jaxtrain.errors.ConfigError` naming ``optim.<key>``.

    A NaN learning rate, ``b2=1`` or a negative ``eps`` is an error before it
    can turn into NaN parameters or a silently wrong schedule.
    """
    for key, (ok, why) in _RANGES.items():
        value = getattr(optim, key)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not ok(float(value)):
            raise ConfigError(f"optim.{key}={value!r}: {why}")
    if optim.schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule={optim.schedule!r}: must be one of {', '.join(SCHEDULES)}")
    if not _integer_at_least(optim.warmup_steps, 0):
        raise ConfigError(f"optim.warmup_steps={optim.warmup_steps!r}: must be an integer >= 0")
    if optim.decay_steps is not None and not _integer_at_least(optim.decay_steps, 1):
        raise ConfigError(f"optim.decay_steps={optim.decay_steps!r}: must be a positive integer or null")
