"""jaxtrain: the PyTorch training step, done the functional way in JAX.

    from jaxtrain import TrainState, train_step, eval_step, make_optimizer
"""

from jaxtrain.optim import decay_mask, make_optimizer, make_schedule
from jaxtrain.state import TrainState
from jaxtrain.step import check_tokens, eval_step, lm_loss, train_step

__version__ = "0.1.0"

__all__ = ["TrainState", "train_step", "eval_step", "make_optimizer", "make_schedule", "decay_mask",
           "lm_loss", "check_tokens", "__version__"]
