"""Training-step throughput of recipe candidates, side by side in one process (alternating rounds).

On a shared 2-core machine only such comparisons mean anything: every candidate is
compiled first, then each round times ``--steps`` steps of every candidate in an
order that rotates from round to round; the figures are medians over rounds. The
step is the CLI's (``jaxtrain.cpu.enable()``, ``train_step`` jitted with the state
donated), on a fixed random batch.

    PYTHONPATH=$PWD python benchmarks/recipe/speed.py "vocab=4096" "vocab=4096,n_embd=192,n_head=6" ...

A candidate is ``key=value`` pairs: GPTConfig fields (LlamaConfig's with ``arch=llama``) plus
``batch`` (default 16), ``precision`` (``jax.default_matmul_precision``, e.g. ``bfloat16``);
``bytes_per_token`` converts tokens/s to bytes/s (default: the BPE prototype's
ratio for the vocabulary: 1 for 256, 2.59/3.05/3.44/3.76 for 1k/2k/4k/8k).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

BYTES_PER_TOKEN = {256: 1.0, 1024: 2.594, 2048: 3.049, 4096: 3.444, 8192: 3.755}


def parse(spec: str) -> tuple[dict, int, float]:
    from jaxtrain.models import GPTConfig, LlamaConfig

    kw = {}
    config_cls = LlamaConfig if "arch=llama" in spec.split(",") else GPTConfig
    types = {f.name: f.type for f in dataclasses.fields(config_cls)}
    for item in filter(None, spec.split(",")):
        k, v = item.split("=")
        kw[k] = v
    kw.pop("arch", None)
    kw.pop("precision", None)
    batch = int(kw.pop("batch", 16))
    bpt = float(kw.pop("bytes_per_token", 0) or 0)
    conv = {"int": int, "float": float, "str": str, "bool": lambda s: s.lower() in ("1", "true"),
            "Optional[int]": int}
    cfg = {k: conv[types[k]](v) for k, v in kw.items()}
    cfg["__cls__"] = config_cls
    return cfg, batch, bpt or BYTES_PER_TOKEN.get(int(cfg.get("vocab_size", 256)), 1.0)


def build(spec: str):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxtrain import OptimConfig, TrainState, make_optimizer, train_step
    from jaxtrain.models import GPT, Llama, LlamaConfig

    kw, batch, bpt = parse(spec)
    config_cls = kw.pop("__cls__")
    cfg = config_cls(**kw)
    model = (Llama if config_cls is LlamaConfig else GPT)(cfg, rngs=nnx.Rngs(0))
    params = model.num_params(non_embedding=False)
    state = TrainState.create(model, make_optimizer(OptimConfig(lr=1e-3), total_steps=1000), rng=0)
    x = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, cfg.block_size + 1))
    b = {"inputs": jnp.asarray(x[:, :-1], jnp.int32), "targets": jnp.asarray(x[:, 1:], jnp.int32)}
    precision = dict(item.split("=") for item in spec.split(",") if item).get("precision")
    with jax.default_matmul_precision(precision):
        step = jax.jit(train_step, donate_argnums=0).lower(state, b).compile()
    holder = [state]

    def run(n: int) -> float:
        s = holder[0]
        t0 = time.perf_counter()
        for _ in range(n):
            s, m = step(s, b)
        jax.block_until_ready((s, m))
        holder[0] = s
        return n * batch * cfg.block_size / (time.perf_counter() - t0)

    return run, params, bpt


def main() -> None:
    from jaxtrain.cpu import process

    process.configure()  # as the command line does, before JAX starts its threads
    import jaxtrain.cpu

    p = argparse.ArgumentParser()
    p.add_argument("specs", nargs="+")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    print("CPU backend:", jaxtrain.cpu.enable(), jaxtrain.cpu.describe())
    sides = {s: build(s) for s in args.specs}
    for run, _, _ in sides.values():
        run(2)  # warm up
    rates = {s: [] for s in sides}
    names = list(sides)
    for r in range(args.rounds):
        for s in names[r % len(names):] + names[: r % len(names)]:
            rates[s].append(sides[s][0](args.steps))
    base = statistics.median(rates[names[0]]) * sides[names[0]][2]
    for s in names:
        tps = statistics.median(rates[s])
        bps = tps * sides[s][2]
        print(json.dumps({"spec": s, "params_M": round(sides[s][1] / 1e6, 3), "ktok_s": round(tps / 1e3, 2),
                          "kbytes_s": round(bps / 1e3, 1), "rel_bytes_s": round(bps / base, 3)}))


if __name__ == "__main__":
    main()
