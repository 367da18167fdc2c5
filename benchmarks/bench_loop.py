"""What the run loop costs: tokens/s of ``jaxtrain.loop.train`` against ``train_step`` alone.

Both sides run the same compiled step of the same config in one process, in
alternating rounds (loop, bare, loop, bare, ...), so a machine that speeds up or
slows down during the benchmark affects both alike:

- **bare**: the AOT-compiled step from :func:`jaxtrain.loop.setup` called back
  to back on a few batches already on the device; one sync at the end.
- **loop**: a full ``loop.train`` run into a fresh run directory, with the
  config's logging, evaluation, sampling, checkpoints, TensorBoard and plot.
  Two figures: *training* tokens/s (the loop's own clock, which stops during
  evaluation, sampling and checkpointing: what the progress bar and summary
  report) and *end-to-end* tokens/s (every second from the first step to the
  last checkpoint committed).

Setup and compilation are outside every timed region. Usage::

    python benchmarks/bench_loop.py                         # configs/default.yaml, 200 steps, 2 rounds
    python benchmarks/bench_loop.py --steps 300 --rounds 3 --config configs/tiny.yaml train.batch_size=16
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import jax

from jaxtrain import config as config_lib
from jaxtrain import loop, perf

ROOT = Path(__file__).resolve().parent.parent


def state_and_batches(run: loop.Run, n: int = 4):
    """A fresh state in the run's shardings and ``n`` batches already on the devices."""
    shardings = jax.tree.map(lambda x: x.sharding, run.abstract_state)
    state = jax.jit(run.make_state, out_shardings=shardings)()
    return state, [run.place(run.batch(i)) for i in range(n)]


def bare_round(run: loop.Run, state, batches: list, steps: int):
    """``(seconds, state)`` for ``steps`` back-to-back calls of the compiled step."""
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for i in range(steps):
        state, metrics = run.train_step(state, batches[i % len(batches)])
    jax.block_until_ready((state, metrics))
    return time.perf_counter() - t0, state


def loop_round(cfg: config_lib.Config, run_dir: Path) -> loop.Summary:
    return loop.train(config_lib.replace(cfg, run_dir=str(run_dir)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    p.add_argument("--steps", type=int, default=200, help="steps per round")
    p.add_argument("--rounds", type=int, default=2, help="rounds of (loop, bare)")
    p.add_argument("overrides", nargs="*", help="config key=value")
    args = p.parse_args()
    perf.keep_freed_memory()  # as `python -m jaxtrain.run` does (perf.configure), for both sides
    cfg = config_lib.load(args.config, [f"train.steps={args.steps}", "log.progress=false", *args.overrides])
    tokens = args.steps * cfg.train.batch_size * cfg.model.block_size

    run = loop.setup(cfg)
    state, batches = state_and_batches(run)
    _, state = bare_round(run, state, batches, 2)  # first dispatches: allocations, thread pools

    train_tps, e2e_tps, bare_tps = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            # the order alternates too (loop first in even rounds), so that whatever a round
            # leaves behind (threads winding down, freed memory) falls on both sides alike
            for side in (("loop", "bare") if r % 2 == 0 else ("bare", "loop")):
                if side == "loop":
                    s = loop_round(cfg, Path(tmp) / f"round{r}")
                    train_tps.append(s.tokens_per_s)
                    e2e_tps.append(tokens / s.loop_s)
                else:
                    seconds, state = bare_round(run, state, batches, args.steps)
                    bare_tps.append(tokens / seconds)
            print(f"round {r}: loop {train_tps[-1]:,.0f} tokens/s training, {e2e_tps[-1]:,.0f} end-to-end "
                  f"| bare train_step {bare_tps[-1]:,.0f} tokens/s | ratio {train_tps[-1] / bare_tps[-1]:.3f}",
                  flush=True)

    bare = statistics.median(bare_tps)
    device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
    name = Path(args.config).name + (" with the overrides above" if args.overrides else "")
    print(f"\n{name}, {args.steps} steps x {args.rounds} rounds on {device} (medians):")
    print(f"  bare train_step      {bare:10,.0f} tokens/s")
    for name, xs in (("loop, training", train_tps), ("loop, end-to-end", e2e_tps)):
        paired = statistics.median(x / b for x, b in zip(xs, bare_tps))
        print(f"  {name:<20} {statistics.median(xs):10,.0f} tokens/s  ratio {statistics.median(xs) / bare:.3f}"
              f"  (median of the per-round ratios {paired:.3f})")


if __name__ == "__main__":
    main()
