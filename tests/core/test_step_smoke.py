import jax
from flax import nnx

from jaxtrain import TrainState, make_optimizer, train_step
from jaxtrain import OptimConfig
from jaxtrain.models import GPT, GPTConfig


def test_gpt_loss_falls_on_a_repeated_batch():
    cfg = GPTConfig(n_layer=2, n_embd=32, n_head=2, block_size=16)
    tx = make_optimizer(OptimConfig(lr=1e-2, schedule="constant", warmup_steps=0))
    state = TrainState.create(GPT(cfg, rngs=nnx.Rngs(0)), tx, rng=0)
    x = jax.random.randint(jax.random.key(1), (4, 17), 0, 256)
    batch = {"inputs": x[:, :-1], "targets": x[:, 1:]}
    step = jax.jit(train_step, donate_argnums=0)
    losses = []
    for _ in range(20):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 20
    assert losses[-1] < losses[0] - 1.0
