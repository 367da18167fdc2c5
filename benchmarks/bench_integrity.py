"""What checkpoint integrity costs: the arrays' checksums against a save and a restore.

On a config's real state (``loop.setup``; default: the packaged default config),
in alternating rounds: the time of :func:`jaxtrain.app.integrity.array_checksums`
(what ``checkpoint.save`` adds to the loop's blocking time, and what the restore
adds to verify), next to the blocking part of an asynchronous save, the save
from call to commit, and ``checkpoint.restore_latest`` (which includes the
verification). The checksums' one-off compilation is reported apart.

Usage::

    python benchmarks/bench_integrity.py                       # default config
    python benchmarks/bench_integrity.py --rounds 5 --config tiny
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import jax

from jaxtrain.app import checkpoint, integrity
from jaxtrain.app import config as config_lib
from jaxtrain.app import loop


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="default")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("overrides", nargs="*", help="config key=value")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-integrity-"))
    cfg = config_lib.load(args.config, [f"run_dir={work / 'run'}", *args.overrides])
    run = loop.setup(cfg)
    state = jax.jit(run.make_state, out_shardings=jax.tree.map(lambda x: x.sharding, run.abstract_state))()
    saved = checkpoint.leaves(state)
    t = time.perf_counter()
    integrity.array_checksums(saved)
    compile_s = time.perf_counter() - t
    sums, blocking, commits, restores = [], [], [], []
    try:
        for r in range(args.rounds):
            t = time.perf_counter()
            integrity.array_checksums(saved)
            sums.append(time.perf_counter() - t)
            shutil.rmtree(work / "run", ignore_errors=True)
            mngr = checkpoint.manager(cfg.run_dir, cfg.checkpoint)
            t = time.perf_counter()
            checkpoint.save(mngr, state.replace(step=state.step + r), config=cfg, data_step=r)
            blocking.append(time.perf_counter() - t)
            mngr.wait_until_finished()
            commits.append(time.perf_counter() - t)
            mngr.close()
            mngr = checkpoint.manager(cfg.run_dir, cfg.checkpoint)
            t = time.perf_counter()
            checkpoint.restore_latest(mngr, run.abstract_state, cfg)
            restores.append(time.perf_counter() - t)
            mngr.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = statistics.median
    n_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(run.abstract_state.params)) * 3
    print(f"config {args.config}: {len(jax.tree.leaves(saved))} arrays, ~{n_bytes / 1e6:.1f} MB of params + Adam moments; "
          f"medians of {args.rounds} rounds")
    print(f"checksums (compiled once: {compile_s * 1e3:.0f} ms): {med(sums) * 1e3:.1f} ms")
    print(f"async save, blocking part (includes the checksums): {med(blocking) * 1e3:.1f} ms "
          f"-> checksums {med(sums) / med(blocking):.1%} of it")
    print(f"save, call to commit: {med(commits) * 1e3:.1f} ms -> checksums {med(sums) / med(commits):.1%} of it")
    print(f"restore_latest (includes the verification): {med(restores) * 1e3:.1f} ms -> verification "
          f"{med(sums) / med(restores):.1%} of it")


if __name__ == "__main__":
    main()
