"""Tokens/s of the sharded ``train_step`` on 1, 2, 4, 8 devices for one global batch.

Each device count runs in its own subprocess (``XLA_FLAGS=
--xla_force_host_platform_device_count=N`` must be set before JAX starts), on the
model of a config (default: ``configs/default.yaml``). In each worker: the state
is created into its shardings, the step is jitted with
:func:`jaxtrain.parallel.jit_train_step` and compiled outside the timed region,
then ``--steps`` back-to-back steps on a few batches already on the devices are
timed with one sync at the end; the worker repeats this ``--repeats`` times and
reports the median, with the CPU cores the process kept busy (CPU time / wall
time). ``--rounds 2`` runs the device counts forward then backward
(1 2 4 8 8 4 2 1) and takes the median per count, so a machine that drifts during
the benchmark affects all counts alike.

Fake CPU devices share the machine's physical cores: they show what sharding
costs (collectives, partitioning), not a speed-up, unless the machine has spare
cores. Usage::

    python benchmarks/bench_scaling.py                              # data parallel, 1 2 4 8 CPU devices
    python benchmarks/bench_scaling.py --layout fsdp --devices 1 2 4
    python benchmarks/bench_scaling.py --platform gpu --devices 1   # real accelerators, no faking
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker(args: argparse.Namespace) -> dict:
    """Runs inside the subprocess: measure one device count, return the numbers."""
    import functools

    import jax
    import numpy as np

    from jaxtrain.app import config as config_lib
    from jaxtrain import parallel
    from jaxtrain.app.config import ParallelConfig
    from jaxtrain.app.loop import state_factory
    from jaxtrain.step import train_step

    cfg = config_lib.load(args.config, [f"train.batch_size={args.batch}", *args.overrides])
    n = args.worker
    devices = jax.devices()[:n]
    pcfg = ParallelConfig(fsdp=n) if args.layout == "fsdp" else ParallelConfig(data=n)
    mesh = parallel.make_mesh(pcfg, devices)
    parallel.check_batch(cfg.train.batch_size, cfg.train.grad_accum, mesh)
    state, shardings = parallel.init_state(state_factory(cfg), mesh)
    step = parallel.jit_train_step(functools.partial(train_step, grad_accum=cfg.train.grad_accum), mesh, shardings)
    rng = np.random.default_rng(0)
    T = cfg.model.block_size
    batches = []
    for _ in range(4):
        x = rng.integers(0, cfg.model.vocab_size, (cfg.train.batch_size, T + 1), dtype=np.int32)
        batches.append(parallel.place_batch({"inputs": x[:, :-1], "targets": x[:, 1:]}, mesh))
    t = time.perf_counter()
    state, m = step(state, batches[0])  # compile + first step
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    rates, busy = [], []
    for _ in range(args.repeats):
        jax.block_until_ready(state)
        t, cpu = time.perf_counter(), time.process_time()
        for i in range(args.steps):
            state, m = step(state, batches[i % len(batches)])
        jax.block_until_ready((state, m))
        wall = time.perf_counter() - t
        rates.append(args.steps * cfg.train.batch_size * T / wall)
        busy.append((time.process_time() - cpu) / wall)  # CPU cores this process kept busy
    return dict(devices=n, mesh=dict(mesh.shape), platform=devices[0].platform, tokens_per_s=statistics.median(rates),
                rates=rates, cores_busy=statistics.median(busy), compile_s=compile_s, batch=cfg.train.batch_size,
                block=T, per_device_batch=cfg.train.batch_size // n)


def measure(n: int, args: argparse.Namespace) -> dict:
    """Run :func:`worker` for ``n`` devices in a fresh process and parse its JSON line."""
    env = dict(os.environ)
    if args.platform == "cpu":
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
    cmd = [sys.executable, __file__, "--worker", str(n), "--config", args.config, "--batch", str(args.batch),
           "--layout", args.layout, "--steps", str(args.steps), "--repeats", str(args.repeats), *args.overrides]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
    if out.returncode:
        raise SystemExit(f"{n} devices: worker failed\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(results: dict[int, list[dict]]) -> str:
    base = statistics.median(r["tokens_per_s"] for r in results[min(results)])
    lines = ["| devices | mesh (data x fsdp) | per-device batch | tokens/s | vs 1 device | CPU cores busy |",
             "| ---: | :---: | ---: | ---: | ---: | ---: |"]
    for n in sorted(results):
        rs = results[n]
        tps = statistics.median(r["tokens_per_s"] for r in rs)
        mesh = rs[0]["mesh"]
        busy = statistics.median(r["cores_busy"] for r in rs)
        lines.append(f"| {n} | {mesh['data']} x {mesh['fsdp']} | {rs[0]['per_device_batch']} | "
                     f"{tps:,.0f} | {tps / base:.2f}x | {busy:.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--layout", choices=["data", "fsdp"], default="data", help="which mesh axis gets the devices")
    p.add_argument("--config", default="default")
    p.add_argument("--batch", type=int, default=16, help="global batch (sequences), the same for every count")
    p.add_argument("--steps", type=int, default=10, help="steps per timed window")
    p.add_argument("--repeats", type=int, default=3, help="timed windows per worker (median reported)")
    p.add_argument("--rounds", type=int, default=1, help="passes over the device counts, alternating direction")
    p.add_argument("--platform", choices=["cpu", "gpu"], default="cpu", help="cpu: fake N host devices")
    p.add_argument("--timeout", type=int, default=900, help="seconds per worker")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="config key=value overrides, e.g. model.n_layer=2")
    args = p.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args)), flush=True)
        return
    results: dict[int, list[dict]] = {}
    for r in range(args.rounds):
        for n in (args.devices if r % 2 == 0 else args.devices[::-1]):
            res = measure(n, args)
            results.setdefault(n, []).append(res)
            print(f"round {r + 1}: {n} {res['platform']} device(s): {res['tokens_per_s']:,.0f} tokens/s "
                  f"(windows {', '.join(f'{x:,.0f}' for x in res['rates'])}; {res['cores_busy']:.1f} cores busy; "
                  f"compile {res['compile_s']:.1f}s)",
                  flush=True)
    print(f"\nglobal batch {args.batch} x block {results[args.devices[0]][0]['block']}, layout {args.layout}, "
          f"{args.config}")
    print(table(results))


if __name__ == "__main__":
    main()
