"""Your own model through the command line: a task module that is not a language model.

An NNX MLP with BatchNorm and Dropout learns y = sin(3 x1) * cos(2 x2) + x1 * x2 from
noisy samples. Train it, with checkpoints, exact resume, preemption, metrics.jsonl,
TensorBoard and the plot, by naming this file as the task:

    python -m jaxtrain.run task=examples/regression_task.py run_dir=runs/regression \\
        train.steps=300 train.batch_size=64 optim.lr=3e-3 optim.warmup_steps=20

(or ``task=regression_task`` with this folder on PYTHONPATH). The model, the
loss and the batches are all the run needs; ``model.*`` and ``data.*`` config
keys belong to the built-in language model and are not used here.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

WIDTH = 128


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(2, WIDTH, rngs=rngs)
        self.norm = nnx.BatchNorm(WIDTH, momentum=0.9, rngs=rngs)
        self.drop = nnx.Dropout(0.1)
        self.mid = nnx.Linear(WIDTH, WIDTH, rngs=rngs)
        self.out = nnx.Linear(WIDTH, 1, rngs=rngs)

    def __call__(self, x_B2, *, rngs=None):
        h = jax.nn.gelu(self.norm(self.hidden(x_B2)))
        h = self.drop(h, rngs=rngs)
        return self.out(jax.nn.gelu(self.mid(h)))[:, 0]


def model(rngs: nnx.Rngs) -> nnx.Module:
    return MLP(rngs)


def loss(model, batch, rng):
    """Mean squared error; ``rng`` is the step's key (None in evaluation), for dropout."""
    pred = model(batch["x"], rngs=None if rng is None else nnx.Rngs(dropout=rng))
    err = pred - batch["y"]
    return jnp.mean(err ** 2), {"max_abs_err": jnp.max(jnp.abs(err))}


def _target(x: np.ndarray) -> np.ndarray:
    return np.sin(3 * x[:, 0]) * np.cos(2 * x[:, 1]) + x[:, 0] * x[:, 1]


def _draw(rng: np.random.Generator, n: int) -> dict:
    x = rng.uniform(-1.5, 1.5, size=(n, 2)).astype(np.float32)
    y = (_target(x) + 0.05 * rng.standard_normal(n)).astype(np.float32)
    return {"x": x, "y": y}


def batch(step: int, batch_size: int, seed: int) -> dict:
    """The batch for ``step``: a pure function of (step, batch_size, seed)."""
    return _draw(np.random.default_rng([seed, step]), batch_size)


def eval_batches(batch_size: int, seed: int) -> list:
    """A fixed validation set of 4 batches, the same for every seed and step."""
    rng = np.random.default_rng([2**31 - 1, 0])
    return [_draw(rng, batch_size) for _ in range(4)]


flops_per_example = 6 * (2 * WIDTH + WIDTH * WIDTH + WIDTH)  # 6 x parameters (forward + backward)
