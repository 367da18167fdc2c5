"""GPT-2 124M training step on one GPU: tokens/s, MFU against the card's measured bf16 matmul rate, peak memory.

The model is ``jaxtrain.models.GPT`` at GPT-2 small size (12 layers, 12 heads,
width 768, block 1024, vocabulary 50304 = GPT-2's 50257 rounded up to a
multiple of 64), bfloat16 compute with float32 params and AdamW state, cuDNN
attention through ``jax.nn.dot_product_attention(implementation="cudnn")``,
stepped by ``jax.jit(jaxtrain.train_step, donate_argnums=0)`` with clip 1.0 +
AdamW on a fixed batch.

MFU is model FLOP/s (``6 N + 12 L C T`` per token) over the best rate of a
bfloat16 ``--matmul``-sized square matmul measured in the same process, and
also over the card's datasheet dense bf16 peak when ``jaxtrain.metrics`` knows
the card. Peak memory is the device's ``peak_bytes_in_use``.

Usage (``benchmarks/gpu.sh`` installs jax[cuda12] first when needed)::

    python benchmarks/bench_gpu.py                    # GPT-2 124M, batch 32 x 1024
    python benchmarks/bench_gpu.py --batch 16 --steps 30
    python benchmarks/bench_gpu.py --smoke            # tiny sizes on any backend (CI runs it on CPU)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtrain import TrainState, make_optimizer, train_step
from jaxtrain.config import ModelConfig, OptimConfig
from jaxtrain.metrics import device_peak_flops
from jaxtrain.models import GPT

GPT2_124M = dict(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768)
SMOKE = dict(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=64)


def matmul_tflops(n: int, dtype=jnp.bfloat16, reps: int = 20) -> float:
    """Best TFLOP/s of an ``n x n @ n x n`` matmul in ``dtype`` over ``reps`` calls."""
    k1, k2 = jax.random.split(jax.random.key(0))
    a, b = (jax.random.normal(k, (n, n), dtype) for k in (k1, k2))
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def build(model_kw: dict, batch: int, attention: str):
    """``(compiled step, state, batch, flops per token, compile seconds)``."""
    cfg = ModelConfig(**model_kw, dropout=0.0, bias=True, tie_embeddings=True, dtype="bfloat16", attention=attention)
    model = GPT(cfg, rngs=nnx.Rngs(0))
    flops = model.flops_per_token()
    tx = make_optimizer(OptimConfig(lr=6e-4, schedule="constant", warmup_steps=0, weight_decay=0.1, max_grad_norm=1.0))
    state = TrainState.create(model, tx, rng=0)
    x = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, cfg.block_size + 1))
    data = {"inputs": jnp.asarray(x[:, :-1], jnp.int32), "targets": jnp.asarray(x[:, 1:], jnp.int32)}
    t0 = time.perf_counter()
    step = jax.jit(train_step, donate_argnums=0).lower(state, data).compile()
    return step, state, data, flops, time.perf_counter() - t0


def time_steps(step, state, data, steps: int, rounds: int):
    """Seconds per step for each of ``rounds`` runs of ``steps`` steps (one sync per run)."""
    per_step = []
    for _ in range(rounds):
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        for _ in range(steps):
            state, metrics = step(state, data)
        jax.block_until_ready((state, metrics))
        per_step.append((time.perf_counter() - t0) / steps)
    return per_step, state, metrics


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=32, help="sequences per step")
    p.add_argument("--steps", type=int, default=20, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--matmul", type=int, default=8192, help="size of the square bf16 matmul for the peak rate")
    p.add_argument("--smoke", action="store_true", help="tiny model on any backend: checks the script runs")
    args = p.parse_args(argv)
    device = jax.devices()[0]
    on_gpu = device.platform == "gpu"
    model_kw = SMOKE if args.smoke else GPT2_124M
    if args.smoke:
        args.batch, args.steps, args.rounds, args.warmup, args.matmul = 2, 2, 1, 1, 128
    attention = "cudnn" if on_gpu else "xla"

    peak = matmul_tflops(args.matmul)
    step, state, data, flops, compile_s = build(model_kw, args.batch, attention)
    for _ in range(args.warmup):
        state, metrics = step(state, data)
    jax.block_until_ready(metrics)
    per_step, state, metrics = time_steps(step, state, data, args.steps, args.rounds)
    t = statistics.median(per_step)
    tokens_per_s = args.batch * model_kw["block_size"] / t
    tflops = tokens_per_s * flops / 1e12
    datasheet = device_peak_flops(device.device_kind)
    stats = device.memory_stats() or {}
    out = {
        "device": device.device_kind, "backend": device.platform, "jax": jax.__version__,
        "model": model_kw, "batch": args.batch, "compute": "bfloat16", "attention": attention,
        "loss": float(metrics["loss"]), "step_ms": 1e3 * t, "tokens_per_s": tokens_per_s,
        "model_tflops": tflops, "matmul_bf16_tflops": peak, "mfu_vs_measured_matmul": tflops / peak,
        "mfu_vs_datasheet": tflops / (datasheet / 1e12) if datasheet else None,
        "peak_memory_gb": stats.get("peak_bytes_in_use", 0) / 1e9 or None, "compile_s": compile_s,
    }
    print(f"{out['device']} ({out['backend']}, jax {out['jax']}): GPT {model_kw['n_layer']}x{model_kw['n_embd']}, "
          f"block {model_kw['block_size']}, vocab {model_kw['vocab_size']}, batch {args.batch}, bf16, {attention} attention")
    print(f"  step {out['step_ms']:.1f} ms | {tokens_per_s:,.0f} tokens/s | {tflops:.1f} model TFLOP/s | "
          f"bf16 matmul {peak:.1f} TFLOP/s -> MFU {100 * out['mfu_vs_measured_matmul']:.1f}%"
          + (f" ({100 * out['mfu_vs_datasheet']:.1f}% of the {datasheet / 1e12:.0f} TFLOP/s datasheet peak)"
             if datasheet else ""))
    print(f"  peak device memory {out['peak_memory_gb'] or 0:.1f} GB | compile {compile_s:.1f} s | "
          f"loss {out['loss']:.3f}")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
