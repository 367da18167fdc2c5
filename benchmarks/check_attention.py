"""Do the attention implementations compute the same model? Loss and gradients against a float32 reference.

``model.attention`` picks XLA's einsum + softmax (``xla``) or a fused kernel
through ``jax.nn.dot_product_attention`` (``cudnn``, GPU only, bfloat16). The CPU
tests cover ``xla``; this script checks a fused kernel where one exists: the same
params (one init seed) under each implementation in bfloat16, each compared with
the ``xla`` model in float32 by ``|a - ref| / |ref|`` over the loss and over all
gradients, then a few AdamW steps of each from the same start on one batch.

    python benchmarks/check_attention.py                 # cudnn and xla on the GPU
    python benchmarks/check_attention.py --attention xla  # anywhere (CI-sized with --smoke)
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtrain import TrainState, lm_loss, make_optimizer, train_step
from jaxtrain.models import GPTConfig as ModelConfig
from jaxtrain.optim import OptimConfig
from jaxtrain.models import GPT

SIZE = dict(vocab_size=50304, block_size=1024, n_layer=2, n_head=12, n_embd=768)
SMOKE = dict(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=64)


def loss_and_grads(model_kw: dict, attention: str, dtype: str, batch: dict):
    model = GPT(ModelConfig(**model_kw, dtype=dtype, attention=attention), rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def f(p):
        return lm_loss(nnx.merge(graphdef, p, rest), batch, None)[0]

    loss, grads = jax.jit(jax.value_and_grad(f))(params)
    return float(loss), jax.tree.map(lambda g: np.asarray(g, np.float64), nnx.to_pure_dict(grads))


def rel(a, b) -> float:
    a, b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(a)]), np.concatenate([np.ravel(x) for x in jax.tree.leaves(b)])
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def trajectory(model_kw: dict, attention: str, batch: dict, steps: int) -> list[float]:
    model = GPT(ModelConfig(**model_kw, dtype="bfloat16", attention=attention), rngs=nnx.Rngs(0))
    tx = make_optimizer(OptimConfig(lr=6e-4, schedule="constant", warmup_steps=0))
    state, step, losses = TrainState.create(model, tx, rng=0), jax.jit(train_step), []
    for _ in range(steps):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    return losses


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--attention", default=None, help="comma list (default: cudnn,xla on GPU, xla elsewhere)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10, help="AdamW steps compared")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    kw = SMOKE if args.smoke else SIZE
    names = (args.attention or ("cudnn,xla" if jax.default_backend() == "gpu" else "xla")).split(",")
    x = np.random.default_rng(0).integers(0, kw["vocab_size"], (args.batch, kw["block_size"] + 1))
    batch = {"inputs": jnp.asarray(x[:, :-1], jnp.int32), "targets": jnp.asarray(x[:, 1:], jnp.int32)}
    ref_loss, ref_grads = loss_and_grads(kw, "xla", "float32", batch)
    out = {"device": jax.devices()[0].device_kind, "model": kw, "reference_loss_f32": ref_loss}
    print(f"{out['device']}: GPT {kw['n_layer']}x{kw['n_embd']}, block {kw['block_size']}, batch {args.batch}; "
          f"float32 xla reference loss {ref_loss:.6f}")
    for name in names:
        loss, grads = loss_and_grads(kw, name, "bfloat16", batch)
        losses = trajectory(kw, name, batch, args.steps)
        out[name] = {"loss_rel_err": abs(loss - ref_loss) / abs(ref_loss), "grad_rel_err": rel(grads, ref_grads),
                     "losses": losses}
        print(f"  {name:5s} bf16: loss rel err {out[name]['loss_rel_err']:.2e}, grads rel err "
              f"{out[name]['grad_rel_err']:.2e}; losses over {args.steps} AdamW steps "
              + " ".join(f"{v:.3f}" for v in losses))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
