"""What ``train.diagnostics`` costs: tokens/s of the train step with diagnostics off and on.

Both steps are compiled up front and timed alternately in one process (the
machine's speed drifts; only side-by-side ratios mean anything). Also checks
that the step with diagnostics off contains no diagnostic op at all, so it runs
exactly as fast as a step without the feature.

    python benchmarks/bench_diagnostics.py                  # configs/default.yaml's model, batch 16
    python benchmarks/bench_diagnostics.py --config configs/tiny.yaml --rounds 10
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxtrain import diagnostics, make_optimizer, train_step
from jaxtrain.app import config, lm
from jaxtrain.state import TrainState

ROOT = Path(__file__).resolve().parent.parent


def _compiled(cfg: config.Config, state: TrainState, batch: dict, on: bool):
    fn = functools.partial(train_step, diagnostics=on, max_grad_norm=cfg.optim.max_grad_norm)
    return jax.jit(fn).lower(state, batch).compile()


def _seconds_per_step(step, state, batch, steps: int) -> float:
    jax.block_until_ready(step(state, batch))  # warm
    t0 = time.perf_counter()
    for _ in range(steps):
        out = step(state, batch)  # no donation: the same state is reused, the timing is the step's
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / steps


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="default")
    ap.add_argument("--rounds", type=int, default=6, help="alternating off/on timing rounds")
    ap.add_argument("--steps", type=int, default=5, help="steps per timing round")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. train.batch_size=8")
    args = ap.parse_args(argv)
    cfg = config.load(args.config, args.overrides)
    mc, B = cfg.model, cfg.train.batch_size
    state = TrainState.create(lm.build_model(cfg, nnx.Rngs(0)), make_optimizer(cfg.optim, cfg.train.steps), rng=0)
    x = np.random.default_rng(0).integers(0, mc.vocab_size, (B, mc.block_size + 1), dtype=np.int32)
    batch = {"inputs": x[:, :-1], "targets": x[:, 1:]}

    steps = {name: _compiled(cfg, state, batch, on) for name, on in (("off", False), ("on", True))}
    scope = f"/{diagnostics.SCOPE}/"
    n_metrics = {k: len(v(state, batch)[1]) for k, v in steps.items()}
    print(f"model: {mc.n_layer} layers, {mc.n_embd} wide, block {mc.block_size}, batch {B}; "
          f"{jax.devices()[0].device_kind}")
    print(f"diagnostic ops in the compiled step: off {steps['off'].as_text().count(scope)}, "
          f"on {steps['on'].as_text().count(scope)}; metrics: off {n_metrics['off']}, on {n_metrics['on']}")

    times = {"off": [], "on": []}
    for r in range(args.rounds):
        order = ("off", "on") if r % 2 == 0 else ("on", "off")
        for name in order:
            times[name].append(_seconds_per_step(steps[name], state, batch, args.steps))
    tokens = B * mc.block_size
    med = {k: statistics.median(v) for k, v in times.items()}
    for name in ("off", "on"):
        print(f"diagnostics {name:>3}: {tokens / med[name]:8.0f} tokens/s  (median {1e3 * med[name]:.1f} ms/step "
              f"over {args.rounds} rounds x {args.steps} steps)")
    print(f"cost of diagnostics: {100 * (med['on'] / med['off'] - 1):+.1f}% step time "
          f"(on/off = {med['on'] / med['off']:.3f})")


if __name__ == "__main__":
    main()
