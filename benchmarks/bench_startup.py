"""Start-up time of ``python -m jaxtrain.run``: process start to the first finished training step.

Each repeat trains ``configs/tiny.yaml`` twice in fresh processes sharing one
new compilation-cache directory (``JAXTRAIN_COMPILATION_CACHE``): first with
the cache empty (cold), then with the entries the first run wrote (warm). The
clock starts just before the process is spawned and stops when
``metrics.jsonl`` holds the row of step 1 (the loop logs every step here, and a
row is written only after its step has finished on the device). For
reference it also times ``python -c "import jaxtrain.app.loop"`` (interpreter +
imports alone). Reports medians.

Usage::

    python benchmarks/bench_startup.py                  # 3 repeats
    python benchmarks/bench_startup.py --repeats 1 --config configs/tiny.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Log every step and keep evaluation, sampling and checkpoints out of step 1's
# way; all of them are still compiled at start-up, as in any run.
OVERRIDES = ("train.steps=2", "train.log_every=1", "train.eval_every=0", "train.sample_every=0",
             "checkpoint.every=1000", "log.progress=false")


def time_to_first_step(config: str, run_dir: Path, cache_dir: Path, timeout: float = 600) -> float:
    """Seconds from spawning ``python -m jaxtrain.run`` until step 1 is logged; waits for the run to end."""
    env = dict(os.environ, JAXTRAIN_COMPILATION_CACHE=str(cache_dir))
    cmd = [sys.executable, "-m", "jaxtrain.run", "--config", config, f"run_dir={run_dir}", *OVERRIDES]
    metrics = run_dir / "metrics.jsonl"
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = None
    while first is None and time.perf_counter() - t0 < timeout:
        if metrics.exists() and any(json.loads(line).get("step") == 1
                                    for line in metrics.read_text().splitlines() if line.endswith("}")):
            first = time.perf_counter() - t0
        elif proc.poll() is not None:
            break
        time.sleep(0.01)
    err = proc.communicate(timeout=timeout)[1]
    if first is None or proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (status {proc.returncode}):\n{err[-2000:]}")
    return first


def import_time() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import jaxtrain.app.loop"], cwd=ROOT, check=True)
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    cold, warm, imports = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            cache = Path(tmp) / f"cache{i}"
            cold.append(time_to_first_step(args.config, Path(tmp) / f"cold{i}", cache))
            warm.append(time_to_first_step(args.config, Path(tmp) / f"warm{i}", cache))
            imports.append(import_time())
    out = {"cold_s": statistics.median(cold), "warm_s": statistics.median(warm),
           "import_s": statistics.median(imports), "load": os.getloadavg()[0]}
    print(f"{args.config}, {args.repeats} repeats (medians), load average {out['load']:.1f}:\n"
          f"  time to first step, cold compilation cache  {out['cold_s']:5.1f} s  (all: "
          f"{', '.join(f'{x:.1f}' for x in cold)})\n"
          f"  time to first step, warm compilation cache  {out['warm_s']:5.1f} s  (all: "
          f"{', '.join(f'{x:.1f}' for x in warm)})\n"
          f"  of which interpreter + imports (import jaxtrain.app.loop)  {out['import_s']:.1f} s")
    return out


if __name__ == "__main__":
    main()
