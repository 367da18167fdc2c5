"""End to end through ``python -m jaxtrain.run``: kills, preemption, damage, config changes, NaNs.

Every subprocess runs configs/tiny.yaml on one CPU device and shares one
persistent compilation cache, so after the first run each one takes seconds.
The reference is an uninterrupted run; a second run directory is interrupted
again and again (SIGKILL at random steps, SIGKILL while a checkpoint is being
written, SIGTERM, a truncated newest checkpoint) and restarted with the same
command each time. Its final metrics and parameters must be bit-identical.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxtrain.app import checkpoint
from jaxtrain.app.preempt import PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.slow  # whole runs in subprocesses: the full suite, not the fast tier

ROOT = Path(__file__).resolve().parents[2]
STEPS = 24
ARGS = ["--config", str(ROOT / "jaxtrain" / "configs" / "tiny.yaml"), f"train.steps={STEPS}", "train.log_every=1",
        "train.eval_every=0", "train.eval_batches=1", "train.sample_every=0", "train.sample_tokens=1",
        "checkpoint.every=3", "checkpoint.keep=3", "log.progress=false", "log.plot=false",
        "log.tensorboard=false"]
SEED = int(os.environ.get("JAXTRAIN_TEST_SEED", random.randrange(10**6)))  # printed on failure


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("jax-cache")
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
                JAXTRAIN_COMPILATION_CACHE=str(cache))


def _cmd(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jaxtrain.run", *ARGS, f"run_dir={run_dir}", *extra]


def run(env, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(run_dir, *extra), env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def run_until(env, run_dir: Path, condition, sig: int, log: Path) -> tuple[int, bool]:
    """Start a run, send ``sig`` once ``condition()`` holds; ``(exit code, whether it was sent)``."""
    with open(log, "w") as out:
        proc = subprocess.Popen(_cmd(run_dir), env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        sent = False
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if condition():
                proc.send_signal(sig)
                sent = True
                break
            time.sleep(0.002)
        return proc.wait(timeout=300), sent


def logged_steps(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line)["step"] for line in lines if line.endswith("}")]
    return max(steps, default=0)


def tmp_dirs(run_dir: Path) -> set[str]:
    """Orbax's uncommitted ``<step>.orbax-checkpoint-tmp*`` directories (a save in progress or killed)."""
    try:
        return {p.name for p in (run_dir / "checkpoints").iterdir() if "orbax-checkpoint-tmp" in p.name}
    except FileNotFoundError:
        return set()


def rows(run_dir: Path) -> dict[int, dict]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[row["step"]] = row
    return out


def leaves(run_dir: Path) -> list[np.ndarray]:
    state, _ = checkpoint.load_run(run_dir)
    return [np.asarray(x) for x in jax.tree.leaves(checkpoint.leaves(state.replace(rng=jax.random.key_data(state.rng))))]


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    proc = run(env, run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_killed_and_restarted_run_is_bit_identical(env, reference, tmp_path):
    """SIGKILL at a random step and during a save, SIGTERM, damage: same losses, same final params."""
    rnd = random.Random(SEED)
    run_dir = tmp_path / "run"
    kill_at, term_at = rnd.randrange(2, STEPS // 2), rnd.randrange(STEPS // 2, STEPS - 2)
    history = []

    def interrupted(condition, sig, what):
        log = tmp_path / f"log{len(history)}.txt"
        rc, sent = run_until(env, run_dir, condition, sig, log)
        history.append((what, rc, logged_steps(run_dir), sorted(p.name for p in (run_dir / "checkpoints").iterdir())))
        return rc, sent, log.read_text()

    ctx = f"(JAXTRAIN_TEST_SEED={SEED}; history {history})"
    rc, sent, _ = interrupted(lambda: logged_steps(run_dir) >= kill_at, signal.SIGKILL, f"kill at {kill_at}")
    assert sent and rc == -signal.SIGKILL, ctx
    # Kill while a checkpoint is being written (a tmp directory this run started): it is left
    # behind, and ignored.
    stale = tmp_dirs(run_dir)
    rc, sent, _ = interrupted(lambda: tmp_dirs(run_dir) - stale, signal.SIGKILL, "kill during a save")
    assert sent and rc == -signal.SIGKILL, f"the run was not killed during a save {ctx}"
    assert tmp_dirs(run_dir) - stale, f"no half-written checkpoint left behind {ctx}"
    # SIGTERM: the step in flight finishes, a checkpoint at that step is written, exit code 75.
    rc, sent, out = interrupted(lambda: logged_steps(run_dir) >= term_at, signal.SIGTERM, f"SIGTERM at {term_at}")
    assert sent and rc == PREEMPTED_EXIT_CODE, f"SIGTERM exit code {rc} {ctx}\n{out[-2000:]}"
    stopped_at = logged_steps(run_dir)
    assert (run_dir / "checkpoints" / str(stopped_at)).is_dir(), f"no checkpoint at the SIGTERM step {ctx}"
    assert f"stopped by SIGTERM after step {stopped_at}" in out and "run the same command again" in out, out[-2000:]
    # Truncate a data file of the newest checkpoint: the restart names it and falls back.
    data_files = sorted((run_dir / "checkpoints" / str(stopped_at) / "state").rglob("d/*"))
    with open(data_files[0], "r+b") as f:
        f.truncate(8)
    final = run(env, run_dir)
    assert final.returncode == 0, f"{final.stderr[-3000:]} {ctx}"
    assert f"checkpoint step {stopped_at} in" in final.stderr and "is damaged" in final.stderr, final.stderr[-3000:]
    assert not (run_dir / "checkpoints" / str(stopped_at)).exists() or stopped_at % 3 == 0  # moved aside, or saved anew
    assert any((run_dir / "checkpoints-damaged").iterdir()), "the damaged step must be kept, not deleted"

    ref, got = rows(reference), rows(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1)), ctx
    for step in range(1, STEPS + 1):
        for key in ("loss", "grad_norm", "param_norm", "lr"):
            assert got[step][key] == ref[step][key], f"step {step} {key}: {got[step][key]} != {ref[step][key]} {ctx}"
    for a, b in zip(leaves(reference), leaves(run_dir), strict=True):
        np.testing.assert_array_equal(a, b, err_msg=ctx)


def test_config_change_on_resume_is_refused_before_compiling(env, reference):
    before = sorted(p.name for p in (reference / "checkpoints").iterdir())
    proc = run(env, reference, "model.n_embd=32", "model.n_layer=3")
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()[-1]
    assert "model.n_embd: saved 64, now 32" in err and "model.n_layer: saved 2, now 3" in err, err
    assert "new run_dir" in err, err
    proc = run(env, reference, "checkpoint.resume=false")
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()[-1]
    assert "checkpoint.resume=false" in err and "nothing is overwritten" in err, err
    assert sorted(p.name for p in (reference / "checkpoints").iterdir()) == before


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(env, reference, tmp_path):
    """Params blown up to ~1e30 at step 18 (what a diverging run leaves): every later loss is NaN."""
    state, cfg = checkpoint.load_run(reference, step=18)
    blown = state.replace(params=jax.tree.map(lambda p: p * 1e30, state.params))
    run_dir = tmp_path / "nan"
    mngr = checkpoint.manager(run_dir, cfg.checkpoint)
    assert checkpoint.save(mngr, blown, config=cfg, data_step=18)
    mngr.close()

    proc = run(env, run_dir, "train.max_nonfinite=4")
    assert proc.returncode == 1, proc.stderr[-3000:]
    err = proc.stderr.strip().splitlines()[-1]
    assert "4 consecutive non-finite steps" in err and "the first at step 19" in err, err
    assert "loss=nan" in err and "first: h.0.attn.c_attn.bias" in err, err  # first in pytree order
    got = rows(run_dir)
    assert {s: got[s]["nonfinite"] for s in got} == {19: 1, 20: 1, 21: 1, 22: 1}
    # Nothing from the streak was checkpointed (step 21 is a checkpoint step).
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir()) == [18]
