"""Faults a long run meets, through ``python -m jaxtrain.run`` on the tiny config: flipped bits in a
checkpoint, a second run on the same run_dir, an unwritable checkpoint directory, SIGTERM during the
final save, a config that cannot fit, a resume on another corpus."""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxtrain.app.cli import EXIT_USER_ERROR
from jaxtrain.app.preempt import TERMINATED_EXIT_CODE

pytestmark = pytest.mark.slow  # whole runs in subprocesses

ROOT = Path(__file__).resolve().parents[2]
STEPS = 24
# decay_steps fixed: a run of 12 steps extended to 24 follows the same schedule as a run of 24.
ARGS = ["--config", "tiny", "train.log_every=1", "train.eval_every=0", "train.eval_batches=1",
        "train.sample_every=0", "train.sample_tokens=1", "checkpoint.every=3", "checkpoint.keep=2",
        "log.progress=false", "log.plot=false", "log.tensorboard=false", f"optim.decay_steps={STEPS}"]
SEED = int(os.environ.get("JAXTRAIN_TEST_SEED", random.randrange(10**6)))  # printed on failure


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
                JAXTRAIN_COMPILATION_CACHE=str(tmp_path_factory.mktemp("jax-cache")), PYTHONPATH=str(ROOT))


def cmd(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jaxtrain.run", *ARGS, f"run_dir={run_dir}", *extra]


def run(env, run_dir: Path, *extra: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd(run_dir, *extra), env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          **kw)


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.endswith("}")]
    return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    proc = run(env, run_dir, f"train.steps={STEPS}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return losses(run_dir)


def test_flipped_bits_in_the_newest_checkpoint_are_never_trained_on(env, reference, tmp_path):
    """A single-bit flip at a random offset of the newest step's largest file, three trials: the
    resumed run falls back past it (or the byte was never read) and logs the reference's losses."""
    rnd = random.Random(SEED)
    for trial in range(3):
        run_dir = tmp_path / f"t{trial}"
        assert run(env, run_dir, "train.steps=12").returncode == 0
        f = max((p for p in (run_dir / "checkpoints" / "12").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        data = bytearray(f.read_bytes())
        offset, bit = rnd.randrange(len(data)), rnd.randrange(8)
        data[offset] ^= 1 << bit
        f.write_bytes(bytes(data))
        proc = run(env, run_dir, f"train.steps={STEPS}")
        where = f"seed {SEED} trial {trial}: {f.name} byte {offset} bit {bit}\n{proc.stderr[-2000:]}"
        assert proc.returncode == 0, where
        assert losses(run_dir) == reference, where
        if "is damaged" in proc.stderr:
            assert "resuming from step 9" in proc.stdout and "moved damaged checkpoint step 12" in proc.stderr, where
        else:
            assert "resuming from step 12" in proc.stdout, where
        assert "Traceback" not in proc.stderr and "bound method" not in proc.stderr, where


def test_a_second_run_on_a_live_run_dir_is_refused_and_the_first_completes(env, tmp_path):
    run_dir, steps = tmp_path / "run", 60
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(cmd(run_dir, f"train.steps={steps}", f"optim.decay_steps={steps}"), env=env,
                                 cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while first.poll() is None and time.monotonic() < deadline and not (
                (run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").stat().st_size):
            time.sleep(0.05)
        t = time.monotonic()
        second = run(env, run_dir, f"train.steps={steps}", f"optim.decay_steps={steps}")
        second_s = time.monotonic() - t
        assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-3000:]
    assert second.returncode == EXIT_USER_ERROR, second.stderr[-2000:]
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"pid {first.pid} on host" in errors[0], second.stderr[-2000:]
    assert "Traceback" not in second.stderr
    assert second_s < 60, second_s  # a generous bound: the refusal comes before any compilation
    assert sorted(losses(run_dir)) == list(range(1, steps + 1))
    assert not [p for p in (run_dir / "checkpoints").iterdir() if "tmp" in p.name]


def _unshare_works() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-m", "true"], capture_output=True).returncode == 0


def test_an_unwritable_checkpoint_directory_ends_the_run_promptly_in_one_line(env, tmp_path):
    """Read-only checkpoints/: a read-only bind mount in a private mount namespace where that works
    (root in a container, where chmod does not stop root), else a file-size limit, which fails the
    write the same way (EFBIG instead of EROFS)."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    if _unshare_works():
        script = ('mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" || exit 99; shift; exec "$@"')
        argv = ["unshare", "-m", "sh", "-c", script, "sh", str(run_dir / "checkpoints"), *cmd(run_dir, "train.steps=12")]
        pre, reason = None, "Read-only file system"
    else:
        def pre():
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, resource.RLIM_INFINITY))
        argv, reason = cmd(run_dir, "train.steps=12", "data.cache_dir=" + str(tmp_path / "cache")), "File too large"
    t = time.monotonic()
    proc = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300, preexec_fn=pre)
    seconds = time.monotonic() - t
    if proc.returncode == 99:
        pytest.fail("could not mount the checkpoint directory read-only: " + proc.stderr[-500:])
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and reason in errors[0] and "writing a checkpoint" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) <= 3, proc.stderr[-3000:]
    assert seconds < 60, seconds  # the bug this guards against waited 300 s for Orbax's threads


def test_sigterm_during_the_final_save_completes_it(env, reference, tmp_path):
    """SIGTERM the moment the final step's checkpoint starts: it is committed, the run exits 143."""
    from jaxtrain.app import checkpoint

    run_dir = tmp_path / "run"
    final_tmp = lambda: any(p.name.startswith(f"{STEPS}.") for p in (run_dir / "checkpoints").glob("*"))  # noqa: E731
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen(cmd(run_dir, f"train.steps={STEPS}", "checkpoint.every=1000"), env=env, cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline and not (
                (run_dir / "checkpoints").is_dir() and final_tmp()):
            time.sleep(0.001)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    text = (tmp_path / "log").read_text()
    assert code == TERMINATED_EXIT_CODE, text[-2000:]
    assert checkpoint.load_run(run_dir)[0].step == STEPS, text[-2000:]
    assert losses(run_dir) == reference
    again = run(env, run_dir, f"train.steps={STEPS}", "checkpoint.every=1000")
    assert again.returncode == 0 and f"resuming from step {STEPS}" in again.stderr + again.stdout


def test_a_config_that_cannot_fit_is_refused_before_anything_is_written(env, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jaxtrain.run", "--config", "tiny", "model.block_size=100000",
                           f"run_dir={tmp_path / 'run'}"], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == EXIT_USER_ERROR, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and " TB of memory per device" in errors[0] and "available" in errors[0], errors
    assert "model.block_size" in errors[0] and "train.memory_check=false" in errors[0]
    assert not (tmp_path / "run").exists()


TASK = '''
import os
from jaxtrain.app.tasks import Task
from jaxtrain.models import GPT, GPTConfig
from jaxtrain.losses import lm_loss
import numpy as np

def make(cfg):
    def batch(step, batch_size, seed):
        tokens = np.random.default_rng([seed, step]).integers(0, 32, (batch_size, 9), dtype=np.int32)
        return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    model = lambda rngs: GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16), rngs=rngs)
    return Task(name="fp", model=model, loss_fn=lm_loss, batch=batch, data_fingerprint=os.environ["CORPUS"])
'''


def test_a_resume_on_another_corpus_is_refused(env, tmp_path):
    (tmp_path / "fptask.py").write_text(TASK)
    args = [sys.executable, "-m", "jaxtrain.run", f"task={tmp_path / 'fptask.py'}:make", f"run_dir={tmp_path / 'run'}",
            "train.steps=4", "train.batch_size=2", "checkpoint.every=2", "log.progress=false", "log.plot=false",
            "log.tensorboard=false", "train.eval_every=0"]
    first = subprocess.run(args, env=dict(env, CORPUS="corpus-a"), cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    other = subprocess.run([*args, "train.steps=6"], env=dict(env, CORPUS="corpus-b"), cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert other.returncode == EXIT_USER_ERROR, other.stderr[-2000:]
    assert "fingerprint corpus-a, now corpus-b" in other.stderr and "checkpoint.allow_data_change=true" in other.stderr
    allowed = subprocess.run([*args, "train.steps=6", "checkpoint.allow_data_change=true"],
                             env=dict(env, CORPUS="corpus-b"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert allowed.returncode == 0 and "resuming from step 4" in allowed.stderr + allowed.stdout, allowed.stderr[-2000:]
