"""A user's own model (not a language model) through the command line: ``task=`` a module of theirs.

``examples/regression_task.py`` (an MLP with BatchNorm and Dropout on noisy 2-D
regression) trains with ``python -m jaxtrain.run``: its loss falls, every run
file is written, and a run killed with SIGKILL, or stopped by SIGTERM, resumes
to the same logged losses, bit for bit, as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "regression_task.py"
STEPS = 40
ARGS = [f"train.steps={STEPS}", "train.batch_size=32", "train.log_every=1", "train.eval_every=20",
        "checkpoint.every=5", "checkpoint.keep=3", "optim.lr=1e-2", "optim.warmup_steps=5", "log.progress=false"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
                JAXTRAIN_COMPILATION_CACHE=str(tmp_path_factory.mktemp("jax-cache")),
                PYTHONPATH=os.pathsep.join([str(ROOT / "examples"), os.environ.get("PYTHONPATH", "")]))


def _cmd(run_dir: Path, task: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jaxtrain.run", f"task={task}", f"run_dir={run_dir}", *ARGS, *extra]


def _run(env, run_dir, task=str(EXAMPLE), *extra) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(run_dir, task, *extra), env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def _rows(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.endswith("}")]
    return {r["step"]: r for r in rows}


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    proc = _run(env, run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc


def test_a_task_module_trains_through_the_command_line(reference):
    run_dir, proc = reference
    header = proc.stdout.splitlines()[0]
    assert "task regression_task" in header and "M params" in header, header
    rows = _rows(run_dir)
    assert sorted(rows) == list(range(1, STEPS + 1))
    first, last = rows[1]["loss"], rows[STEPS]["loss"]
    assert last < first / 2, (first, last)  # deterministic: 0.88 -> 0.34 here
    assert {"val_loss", "max_abs_err", "grad_norm", "lr", "tokens_per_s"} <= set(rows[STEPS])
    assert rows[STEPS]["val_loss"] < rows[20]["val_loss"] * 1.5 and rows[STEPS]["val_loss"] < first
    assert "done: 40 steps" in proc.stdout and "examples/s" in proc.stdout
    assert (run_dir / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert (run_dir / "config.yaml").read_text().count("task:") == 1
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())[-1] == STEPS
    assert not (run_dir / "samples.txt").exists()  # the task has no sampler


def test_killed_and_resumed_the_logged_losses_are_bit_identical(env, reference, tmp_path):
    """SIGKILL mid-run, then SIGTERM, then a clean finish, by module name: the same rows as one run."""
    ref_dir, _ = reference
    run_dir = tmp_path / "run"
    log = open(tmp_path / "log.txt", "w")
    proc = subprocess.Popen(_cmd(run_dir, "regression_task"), env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists() and len((run_dir / "metrics.jsonl").read_text().splitlines()) >= 12:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    assert proc.wait(timeout=60) == -signal.SIGKILL, (tmp_path / "log.txt").read_text()[-2000:]
    killed_at = max(_rows(run_dir))
    assert killed_at < STEPS
    proc = subprocess.Popen(_cmd(run_dir, "regression_task"), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and time.monotonic() < deadline:
        if max(_rows(run_dir)) >= killed_at + 8:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.005)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode in (0, 75), err[-2000:]
    assert "resuming from step" in out
    finish = _run(env, run_dir, "regression_task")
    assert finish.returncode == 0, finish.stderr[-3000:]
    ref, got = _rows(ref_dir), _rows(run_dir)
    assert sorted(got) == sorted(ref)
    for step in ref:
        for key in ("loss", "grad_norm", "update_norm", "param_norm", "max_abs_err", "val_loss"):
            assert got[step].get(key) == ref[step].get(key), (step, key, got[step].get(key), ref[step].get(key))


def test_a_run_directory_of_another_task_is_refused(env, reference):
    run_dir, _ = reference
    proc = _run(env, run_dir, "lm")
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "task: saved" in err[0] and "now 'lm'" in err[0], err


def test_the_task_module_in_the_docs_trains(env, tmp_path):
    text = (ROOT / "docs" / "cli.md").read_text()
    start = text.index("# my_task.py\n")
    (tmp_path / "my_task.py").write_text(text[start:text.index("```", start)])
    proc = _run(env, tmp_path / "run", str(tmp_path / "my_task.py"), "train.steps=30", "train.eval_every=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(tmp_path / "run")
    assert rows[30]["loss"] < rows[1]["loss"] / 2 and "max_err" in rows[30] and "val_loss" in rows[30]
