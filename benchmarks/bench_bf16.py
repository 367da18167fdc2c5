"""Bfloat16 products through oneDNN against float32 ones through MKL: the products alone and the default model's step.

    python benchmarks/bench_bf16.py [--rounds 5]

1. Each product of the default model's shapes (batch 8 x context 256 = 2,048 rows, width 128,
   SwiGLU 352, vocab 4,096), forward and the backward's transposed forms, jitted alone:
   ``jaxtrain.cpu.blas.matmul`` (MKL sgemm) and ``jaxtrain.cpu.onednn.matmul`` (operands
   rounded to bfloat16 in XLA, oneDNN's product), GFLOP/s, median of ``--rounds`` 0.3 s windows.
2. The default config's ``train_step`` (the CPU backend on, state donated) compiled twice, with
   the default precision and under ``jax.default_matmul_precision("bfloat16")``, timed in
   alternating windows of 10 steps: ms per step and the ratio.

Both sides run in this one process, alternated, so a busy machine slows both alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

from jaxtrain.cpu import process

process.configure()  # as the command line does, before JAX starts its threads

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxtrain.cpu  # noqa: E402
from jaxtrain.cpu import blas, onednn  # noqa: E402

SHAPES = [  # (m, k, n, transpose_a, transpose_b, what)
    (2048, 128, 128, False, False, "q/k/v/o forward"),
    (2048, 128, 352, False, False, "gate/up forward"),
    (2048, 352, 128, False, False, "down forward"),
    (2048, 128, 4096, False, True, "tied head forward (x @ wte.T)"),
    (2048, 4096, 128, False, False, "head: d x"),
    (4096, 2048, 128, True, False, "head: d wte"),
    (128, 2048, 352, True, False, "gate/up: d kernel"),
]


def _window(f, *args, seconds=0.3) -> float:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        jax.block_until_ready(f(*args))
        n += 1
    return (time.perf_counter() - t0) / n


def products(rounds: int) -> None:
    print("| product | m x k x n | MKL float32 GFLOP/s | oneDNN bfloat16 GFLOP/s | ratio |")
    print("|---|---|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for m, k, n, ta, tb, what in SHAPES:
        a = jnp.asarray(rng.standard_normal((k, m) if ta else (m, k)), jnp.float32)
        b = jnp.asarray(rng.standard_normal((n, k) if tb else (k, n)), jnp.float32)
        f32 = jax.jit(lambda a, b: blas.matmul(a, b, transpose_a=ta, transpose_b=tb, use_blas=True))
        b16 = jax.jit(lambda a, b: onednn.matmul(a, b, transpose_a=ta, transpose_b=tb))
        _window(f32, a, b, seconds=0.05), _window(b16, a, b, seconds=0.05)
        t32, t16 = [], []
        for _ in range(rounds):
            t32.append(_window(f32, a, b))
            t16.append(_window(b16, a, b))
        flops = 2 * m * k * n / 1e9
        g32, g16 = flops / statistics.median(t32), flops / statistics.median(t16)
        print(f"| {what} | {m} x {k} x {n} | {g32:.0f} | {g16:.0f} | {g16 / g32:.2f}x |")


def step(rounds: int) -> None:
    from flax import nnx

    from jaxtrain import TrainState, make_optimizer, train_step
    from jaxtrain.app import config as config_lib
    from jaxtrain.models import Llama

    cfg = config_lib.load("default")
    model_cfg = config_lib.model_config(config_lib.resolve(cfg).model)
    bs, T = cfg.train.batch_size, model_cfg.block_size
    x = np.random.default_rng(0).integers(0, model_cfg.vocab_size, (bs, T + 1))
    batch = {"inputs": jnp.asarray(x[:, :-1], jnp.int32), "targets": jnp.asarray(x[:, 1:], jnp.int32)}
    sides = {}
    for name, precision in (("float32 (MKL)", None), ("bfloat16 (oneDNN)", "bfloat16")):
        state = TrainState.create(Llama(model_cfg, rngs=nnx.Rngs(0)), make_optimizer(cfg.optim, total_steps=1000),
                                  rng=0)
        with jax.default_matmul_precision(precision):
            compiled = jax.jit(train_step, donate_argnums=0).lower(state, batch).compile()
        sides[name] = [state, compiled]

    def run(side, n=10) -> float:
        s, f = side
        t0 = time.perf_counter()
        for _ in range(n):
            s, m = f(s, batch)
        jax.block_until_ready((s, m))
        side[0] = s
        return (time.perf_counter() - t0) / n * 1000

    for side in sides.values():
        run(side, 3)
    times = {name: [] for name in sides}
    for _ in range(rounds):
        for name, side in sides.items():
            times[name].append(run(side))
    (n32, t32), (n16, t16) = ((n, statistics.median(t)) for n, t in times.items())
    print(f"\ndefault config's step ({model_cfg.n_layer} layers, batch {bs} x {T}): {n32} {t32:.1f} ms, "
          f"{n16} {t16:.1f} ms: {t32 / t16:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    jaxtrain.cpu.enable(require=True)
    ok, why = onednn.status()
    if not ok:
        raise SystemExit(f"the oneDNN path cannot run here: {why}")
    print(f"oneDNN: {why}\n")
    products(args.rounds)
    step(args.rounds)


if __name__ == "__main__":
    main()
