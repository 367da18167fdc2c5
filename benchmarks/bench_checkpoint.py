"""What checkpointing costs the training loop: blocking time of an async save, save/restore MB/s.

Uses the run loop's own compiled step and state (:func:`jaxtrain.app.loop.setup`) on a
config (default: ``configs/default.yaml``) and measures, in alternating rounds so
a machine that speeds up or slows down affects both alike:

- **training step**: seconds per step (``--steps`` back-to-back steps, one sync).
- **async save call**: how long :func:`jaxtrain.checkpoint.save` on an
  asynchronous manager holds the loop (the non-finite check, the copy off the
  device, starting the background write), as a fraction of one step: the
  number to keep small. The loop has already synced (it fetches its metrics)
  when it saves, so the state is ready before the clock starts here too.
- **save / restore MB/s**: checkpoint bytes on disk over the time of a save
  from the call to the commit, and of :func:`jaxtrain.checkpoint.restore_latest`.

Usage::

    python benchmarks/bench_checkpoint.py                       # configs/default.yaml
    python benchmarks/bench_checkpoint.py --rounds 5 --config configs/tiny.yaml model.n_layer=8
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import jax

from bench_loop import bare_round as steps_round, state_and_batches  # benchmarks/ is on sys.path
from jaxtrain.app import checkpoint
from jaxtrain.app import config as config_lib
from jaxtrain.app import loop

ROOT = Path(__file__).resolve().parent.parent


def timed_save(mngr, state, cfg) -> tuple[float, float]:
    """``(seconds in the save call, seconds until the checkpoint is committed)``."""
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    assert checkpoint.save(mngr, state, config=cfg, data_step=int(state.step))
    t1 = time.perf_counter()
    mngr.wait_until_finished()
    return t1 - t0, time.perf_counter() - t0


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="default")
    p.add_argument("--steps", type=int, default=10, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=3, help="rounds of (steps, save, restore)")
    p.add_argument("overrides", nargs="*", help="config key=value")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_checkpoint-"))
    try:
        cfg = config_lib.load(args.config, [f"run_dir={tmp / 'run'}", *args.overrides])
        run = loop.setup(cfg)
        state, batches = state_and_batches(run)
        mngr = checkpoint.manager(cfg.run_dir, config_lib.replace(cfg, checkpoint=dict(
            async_save=True, keep=2, keep_every=None)).checkpoint)
        _, state = steps_round(run, state, batches, 2)  # warm up: first dispatch, Orbax, the finite check
        timed_save(mngr, state, cfg)

        step_s, call_s, commit_s, restore_s = [], [], [], []
        for _ in range(args.rounds):
            seconds, state = steps_round(run, state, batches, args.steps)
            step_s.append(seconds / args.steps)
            call, commit = timed_save(mngr, state, cfg)
            call_s.append(call)
            commit_s.append(commit)
            t = time.perf_counter()
            restored, _ = checkpoint.restore_latest(mngr, run.abstract_state, cfg)
            jax.block_until_ready(restored)
            restore_s.append(time.perf_counter() - t)
        mb = dir_bytes(checkpoint.checkpoint_dir(cfg.run_dir) / str(int(state.step))) / 1e6
        mngr.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    step, call = statistics.median(step_s), statistics.median(call_s)
    commit, restore = statistics.median(commit_s), statistics.median(restore_s)
    n_params = sum(x.size for x in jax.tree.leaves(run.abstract_state.params))
    print(f"config {args.config} {' '.join(args.overrides)}| {n_params / 1e6:.2f}M params | "
          f"checkpoint {mb:.1f} MB | {jax.device_count()} {jax.devices()[0].platform} device(s) | "
          f"medians of {args.rounds} rounds ({args.steps} steps each)")
    rows = [
        ("training step", f"{step * 1e3:.1f} ms", "1.000 step"),
        ("async save: the call blocks the loop", f"{call * 1e3:.1f} ms", f"{call / step:.3f} step"),
        ("async save: call to commit", f"{commit * 1e3:.1f} ms", f"{mb / commit:.0f} MB/s"),
        ("restore_latest", f"{restore * 1e3:.1f} ms", f"{mb / restore:.0f} MB/s"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'':<{width}}  {'time':>10}  {'relative':>12}")
    for name, t, rel in rows:
        print(f"{name:<{width}}  {t:>10}  {rel:>12}")


if __name__ == "__main__":
    main()
