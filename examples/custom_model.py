"""jaxtrain's step on your own model: an NNX MLP fitting sin(x), with its own loss."""
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtrain import TrainState, eval_step, make_optimizer, train_step


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden, self.out = nnx.Linear(1, 64, rngs=rngs), nnx.Linear(64, 1, rngs=rngs)

    def __call__(self, x_B1):
        return self.out(jax.nn.gelu(self.hidden(x_B1)))


def loss_fn(model, batch, rng):  # -> (scalar loss, dict of extra metrics)
    err = model(batch["x"]) - batch["y"]
    return jnp.mean(err**2), {"max_err": jnp.max(jnp.abs(err))}


x = jnp.linspace(-3, 3, 256)[:, None]
batch = {"x": x, "y": jnp.sin(x)}
tx = make_optimizer(lr=1e-2, schedule="cosine", warmup_steps=20, total_steps=400)
state = TrainState.create(MLP(nnx.Rngs(0)), tx)
step = jax.jit(functools.partial(train_step, loss_fn=loss_fn), donate_argnums=0)
for i in range(400):
    state, metrics = step(state, batch)
    if i % 100 == 0 or i == 399:
        print(f"step {i:3d}  loss {float(metrics['loss']):.5f}  grad_norm {float(metrics['grad_norm']):.3f}")
print(f"eval loss {float(eval_step(state, batch, loss_fn=loss_fn)['loss']):.5f}")
