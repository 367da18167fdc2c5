"""What the run loop costs: tokens/s of ``jaxtrain.app.loop.train`` against ``train_step`` alone.

Both sides run the same compiled step of the same config in one process, in
alternating rounds (loop, bare, loop, bare, ...), so a machine that speeds up or
slows down during the benchmark affects both alike:

- **bare**: the AOT-compiled step from :func:`jaxtrain.app.loop.setup` called back
  to back on a few batches already on the device; one sync at the end.
- **loop**: a full ``loop.train`` run into a fresh run directory, with the
  config's logging, evaluation, sampling, checkpoints, TensorBoard and plot.
  Two figures: *training* tokens/s (the loop's own clock, which stops during
  evaluation, sampling and checkpointing: what the progress bar and summary
  report) and *end-to-end* tokens/s (every second from the first step to the
  last checkpoint committed).

Setup and compilation are outside every timed region.

On a noisy machine the ratio of two 30-second rounds moves by 10-20%, far more
than the loop costs. ``--host-steps N`` therefore also measures that cost
directly: the same comparison on a near-zero model (1 layer, width 16, the same
batch shape, data pipeline and logging), where a step is a few milliseconds and
whatever the loop adds per step (the prefetch thread's batches, the after-step
checks, the per-log sync and row) shows up in full instead of overlapping the
device work. Its milliseconds per step over the bare step of the real model is
an upper bound on the loop's share. Usage::

    python benchmarks/bench_loop.py                         # configs/default.yaml, 200 steps, 2 rounds
    python benchmarks/bench_loop.py --steps 300 --rounds 3 --config configs/tiny.yaml train.batch_size=16
    python benchmarks/bench_loop.py --steps 40 --rounds 4 --host-steps 400
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import jax

from jaxtrain.app import config as config_lib
from jaxtrain.app import loop
from jaxtrain.cpu import process

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


def compare(cfg: config_lib.Config, steps: int, rounds: int, tmp: Path, tag: str, report=None):
    """Alternating (loop, bare) rounds: per-round ``(loop Summary, bare seconds)``."""
    run = loop.setup(cfg)
    state, batches = state_and_batches(run)
    _, state = bare_round(run, state, batches, 2)  # first dispatches: allocations, thread pools
    out = []
    for r in range(rounds):
        # the order alternates too (loop first in even rounds), so that whatever a round
        # leaves behind (threads winding down, freed memory) falls on both sides alike
        got = {}
        for side in (("loop", "bare") if r % 2 == 0 else ("bare", "loop")):
            if side == "loop":
                got[side] = loop_round(cfg, tmp / f"{tag}{r}")
            else:
                got[side], state = bare_round(run, state, batches, steps)
        out.append((got["loop"], got["bare"]))
        if report:
            report(r, *out[-1])
    return out


def batch_ms(cfg: config_lib.Config, n: int = 200) -> float:
    """Milliseconds to make and place one batch, as the loop's prefetch thread does (timed alone)."""
    run = loop.setup(cfg)
    jax.block_until_ready(run.place(run.batch(0)))
    t0 = time.perf_counter()
    for i in range(n):
        jax.block_until_ready(run.place(run.batch(i)))
    return 1e3 * (time.perf_counter() - t0) / n


def host_config(cfg: config_lib.Config, steps: int) -> config_lib.Config:
    """``cfg`` with a near-zero model: the same batches, data pipeline, logging and events."""
    return config_lib.replace(cfg, model=dict(n_layer=1, n_head=1, n_embd=16), train=dict(steps=steps))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="default")
    p.add_argument("--steps", type=int, default=200, help="steps per round")
    p.add_argument("--rounds", type=int, default=2, help="rounds of (loop, bare)")
    p.add_argument("--host-steps", type=int, default=0,
                   help="also measure the loop's own cost per step on a near-zero model (steps per round)")
    p.add_argument("--host-rounds", type=int, default=6, help="rounds of (loop, bare) for --host-steps")
    p.add_argument("overrides", nargs="*", help="config key=value")
    args = p.parse_args(argv)
    process.keep_freed_memory()  # as `jaxtrain run` does on CPUs (jaxtrain.cpu.process), for both sides
    cfg = config_lib.load(args.config, [f"train.steps={args.steps}", "log.progress=false", *args.overrides])
    tokens = args.steps * cfg.train.batch_size * cfg.model.block_size

    def report(r, summary, seconds):
        print(f"round {r}: loop {summary.tokens_per_s:,.0f} tokens/s training, {tokens / summary.loop_s:,.0f} "
              f"end-to-end | bare train_step {tokens / seconds:,.0f} tokens/s | ratio "
              f"{summary.tokens_per_s * seconds / tokens:.3f}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        rounds = compare(cfg, args.steps, args.rounds, Path(tmp), "round", report)
        host = (compare(host_config(cfg, args.host_steps), args.host_steps, args.host_rounds, Path(tmp), "host")
                if args.host_steps else [])
        prep = batch_ms(host_config(cfg, args.host_steps)) if args.host_steps else 0.0
    train_tps = [s.tokens_per_s for s, _ in rounds]
    e2e_tps = [tokens / s.loop_s for s, _ in rounds]
    bare_tps = [tokens / b for _, b in rounds]

    bare = statistics.median(bare_tps)
    out = {"bare_tps": bare, "loop_tps": statistics.median(train_tps), "e2e_tps": statistics.median(e2e_tps)}
    device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
    name = Path(args.config).name + (" with the overrides above" if args.overrides else "")
    print(f"\n{name}, {args.steps} steps x {args.rounds} rounds on {device} (medians):")
    print(f"  bare train_step      {bare:10,.0f} tokens/s")
    for name, xs in (("loop, training", train_tps), ("loop, end-to-end", e2e_tps)):
        paired = statistics.median(x / b for x, b in zip(xs, bare_tps))
        print(f"  {name:<20} {statistics.median(xs):10,.0f} tokens/s  ratio {statistics.median(xs) / bare:.3f}"
              f"  (median of the per-round ratios {paired:.3f})")

    if host:
        ms_loop = statistics.median(1e3 * s.train_s / args.host_steps for s, _ in host)
        ms_bare = statistics.median(1e3 * b / args.host_steps for _, b in host)
        cost = statistics.median(1e3 * (s.train_s - b) / args.host_steps for s, b in host)
        step_ms = 1e3 * cfg.train.batch_size * cfg.model.block_size / bare
        print(f"  loop's own cost, near-zero model (1 layer, width 16, same batches and logging; "
              f"{args.host_steps} steps x {args.host_rounds} rounds):")
        print(f"    loop {ms_loop:.2f} ms/step, bare {ms_bare:.2f} ms/step: the loop adds {cost:.2f} ms/step "
              f"(median of the per-round differences; rounds {min(1e3 * (s.train_s - b) / args.host_steps for s, b in host):.2f}"
              f" to {max(1e3 * (s.train_s - b) / args.host_steps for s, b in host):.2f})")
        print(f"    making and placing a batch (the prefetch thread's work, on the other core here): {prep:.2f} ms")
        print(f"    together {cost + prep:.2f} ms = {100 * (cost + prep) / step_ms:.2f}% of the bare step above "
              f"({step_ms:.0f} ms)")
        out.update(host_ms_per_step=cost, batch_ms=prep, host_share=(cost + prep) / step_ms)
    return out



if __name__ == "__main__":
    main()
