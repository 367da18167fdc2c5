"""GPT-2 124M training step on one GPU: tokens/s, MFU against the card's measured bf16 matmul rate, peak memory.

The model is ``jaxtrain.models.GPT`` at GPT-2 small size (12 layers, 12 heads,
width 768, block 1024, vocabulary 50304 = GPT-2's 50257 rounded up to a
multiple of 64), bfloat16 compute with float32 params and AdamW state, stepped
by ``jax.jit(jaxtrain.train_step, donate_argnums=0)`` with clip 1.0 + AdamW on
a fixed batch. Attention is cuDNN's fused kernel through
``jax.nn.dot_product_attention(implementation="cudnn")`` or XLA's einsum +
softmax (``--attention xla``).

Several variants (``--batch 16,32 --attention cudnn,xla``) run one after the
other in this process, each compiled once, warmed up and timed over
``--rounds`` runs of ``--steps`` steps (median). A variant that fails (out of
memory, no cuDNN) is reported and the others still run.

MFU is model FLOP/s (``6 N + 12 L C T`` per token) over the best rate of a
bfloat16 ``--matmul``-sized square matmul measured in the same process, and
also over the card's datasheet dense bf16 peak when ``jaxtrain.metrics`` knows
the card. Memory is XLA's compiled estimate for the step (arguments + temporaries)
and the device's ``peak_bytes_in_use`` so far.

Usage (``benchmarks/gpu.sh`` runs it with the variants below)::

    python benchmarks/bench_gpu.py                              # batch 32, cudnn
    python benchmarks/bench_gpu.py --batch 16,32,64 --attention cudnn,xla --json out.json
    python benchmarks/bench_gpu.py --smoke                      # tiny sizes on any backend (CI runs it on CPU)
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtrain import TrainState, make_optimizer, train_step
from jaxtrain.models import GPTConfig as ModelConfig
from jaxtrain.optim import OptimConfig
from jaxtrain.app.writers import device_peak_flops
from jaxtrain.models import GPT

GPT2_124M = dict(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768)
SMOKE = dict(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=64)
ATTENTION = ("cudnn", "xla")


def matmul_tflops(n: int, dtype=jnp.bfloat16, reps: int = 20) -> float:
    """Best TFLOP/s of an ``n x n @ n x n`` matmul in ``dtype`` (random inputs) over ``reps`` calls."""
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
    """``(compiled step, state, batch, flops per token, compile seconds, compiled memory GB)``."""
    cfg = ModelConfig(**model_kw, dropout=0.0, bias=True, tie_embeddings=True, dtype="bfloat16", attention=attention)
    model = GPT(cfg, rngs=nnx.Rngs(0))
    flops = model.flops_per_token()
    tx = make_optimizer(OptimConfig(lr=6e-4, schedule="constant", warmup_steps=0, weight_decay=0.1, max_grad_norm=1.0))
    state = TrainState.create(model, tx, rng=0)
    x = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, cfg.block_size + 1))
    data = {"inputs": jnp.asarray(x[:, :-1], jnp.int32), "targets": jnp.asarray(x[:, 1:], jnp.int32)}
    t0 = time.perf_counter()
    step = jax.jit(train_step, donate_argnums=0).lower(state, data).compile()
    compile_s = time.perf_counter() - t0
    try:
        m = step.memory_analysis()
        mem_gb = (m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
                  - m.alias_size_in_bytes) / 1e9
    except Exception:  # not every backend reports it
        mem_gb = None
    return step, state, data, flops, compile_s, mem_gb


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


def run_variant(model_kw: dict, batch: int, attention: str, args, peak: float, datasheet) -> dict:
    step, state, data, flops, compile_s, mem_gb = build(model_kw, batch, attention)
    for _ in range(args.warmup):
        state, metrics = step(state, data)
    jax.block_until_ready(metrics)
    per_step, state, metrics = time_steps(step, state, data, args.steps, args.rounds)
    t = statistics.median(per_step)
    tokens_per_s = batch * model_kw["block_size"] / t
    tflops = tokens_per_s * flops / 1e12
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "batch": batch, "attention": attention, "loss": float(metrics["loss"]), "step_ms": 1e3 * t,
        "step_ms_rounds": [1e3 * s for s in per_step], "tokens_per_s": tokens_per_s, "model_tflops": tflops,
        "mfu_vs_measured_matmul": tflops / peak,
        "mfu_vs_datasheet": tflops / (datasheet / 1e12) if datasheet else None,
        "compiled_memory_gb": mem_gb, "peak_memory_gb": stats.get("peak_bytes_in_use", 0) / 1e9 or None,
        "compile_s": compile_s,
    }


def _csv(kind, choices=None):
    def parse(text):
        items = [kind(v) for v in text.split(",") if v]
        bad = [v for v in items if choices and v not in choices]
        if not items or bad:
            raise argparse.ArgumentTypeError(f"{text!r}: give a comma-separated list"
                                             + (f" from {','.join(choices)}" if choices else ""))
        return items
    return parse


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=_csv(int), default=[32], help="sequences per step; a list runs each")
    p.add_argument("--attention", type=_csv(str, ATTENTION), default=None,
                   help="cudnn | xla; a list runs each (default: cudnn on GPU, xla elsewhere)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--matmul", type=int, default=8192, help="size of the square bf16 matmul for the peak rate")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--smoke", action="store_true", help="tiny model on any backend: checks the script runs")
    args = p.parse_args(argv)
    device = jax.devices()[0]
    on_gpu = device.platform == "gpu"
    model_kw = SMOKE if args.smoke else GPT2_124M
    if args.smoke:
        args.batch, args.steps, args.rounds, args.warmup, args.matmul = [2], 2, 1, 1, 128
    attentions = args.attention or (["cudnn"] if on_gpu else ["xla"])
    datasheet = device_peak_flops(device.device_kind)

    peak = matmul_tflops(args.matmul)
    print(f"{device.device_kind} ({device.platform}, jax {jax.__version__}): GPT {model_kw['n_layer']}x"
          f"{model_kw['n_embd']}, block {model_kw['block_size']}, vocab {model_kw['vocab_size']}, bf16 compute; "
          f"bf16 {args.matmul}^3 matmul {peak:.1f} TFLOP/s"
          + (f" (datasheet {datasheet / 1e12:.0f})" if datasheet else ""), flush=True)
    variants = []
    for attention in attentions:
        for batch in args.batch:
            try:
                v = run_variant(model_kw, batch, attention, args, peak, datasheet)
            except Exception as e:  # report and go on with the next variant
                traceback.print_exc()
                v = {"batch": batch, "attention": attention, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            variants.append(v)
            gc.collect()
            if "error" in v:
                print(f"  batch {batch:3d} {attention:5s} failed: {v['error']}", flush=True)
                continue
            print(f"  batch {batch:3d} {attention:5s} | step {v['step_ms']:7.1f} ms | {v['tokens_per_s']:>10,.0f} tok/s"
                  f" | {v['model_tflops']:6.1f} TFLOP/s | MFU {100 * v['mfu_vs_measured_matmul']:5.1f}% of measured"
                  + (f", {100 * v['mfu_vs_datasheet']:5.1f}% of datasheet" if datasheet else "")
                  + f" | mem {v['compiled_memory_gb'] or 0:.1f} GB compiled, {v['peak_memory_gb'] or 0:.1f} GB peak"
                  f" | compile {v['compile_s']:.1f} s | loss {v['loss']:.3f}", flush=True)
    ok = [v for v in variants if "error" not in v]
    best = max(ok, key=lambda v: v["tokens_per_s"]) if ok else {}
    out = {"device": device.device_kind, "backend": device.platform, "jax": jax.__version__, "model": model_kw,
           "compute": "bfloat16", "matmul_bf16_tflops": peak, "datasheet_tflops": datasheet and datasheet / 1e12,
           "variants": variants, **best}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    print(json.dumps(out))
    if not ok:
        raise SystemExit("every variant failed")
    return out


if __name__ == "__main__":
    main()
