"""Two processes on one machine train through the real command line like one process does.

Each run is ``python -m jaxtrain.run --config configs/tiny.yaml`` in fresh
subprocesses; the multi-process ones talk through ``jax.distributed`` on
127.0.0.1 (gloo collectives on CPU) with 2 CPU devices per process, the layout
that once hung when batches were placed with ``jax.device_put`` from the
prefetch thread. Runs (global batch 8 in all of them):

- R: 1 process x 1 device, steps 0 -> 40 (the reference)
- A: 2 processes x 2 devices, 0 -> 20; then 1 process resumes, 20 -> 40
- B: 1 process, 0 -> 20; then 2 processes resume, 20 -> 40

Every logged training loss and validation loss of A and B must equal R's
within float32 tolerance. Every launch has a timeout and is killed on expiry,
so a hang fails the test instead of blocking CI. A compilation cache shared by
the launches keeps the test to two compilations (one per process layout).
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # whole runs in subprocesses: the full suite, not the fast tier

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "jaxtrain" / "configs" / "tiny.yaml"
STEPS, SPLIT = 40, 20
DEVICES_PER_PROCESS = 2  # with 2 processes: 4 devices, the data axis spans both processes
TIMEOUT_S = 360  # per launch; compiling on a loaded 2-core machine takes most of it
# 1 device vs 4 devices (different reduction order), 40 AdamW steps, float32:
# measured relative differences <= 1.5e-6 (train loss) and 3e-7 (val loss); a
# wrong batch split or a lost step is > 1e-2.
RTOL = 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(cache_dir: Path) -> dict:
    # A compilation cache of the test's own (jaxtrain.perf reads this variable):
    # hermetic, yet shared by the launches.
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAXTRAIN_COMPILATION_CACHE=str(cache_dir))
    env.pop("XLA_FLAGS", None)  # devices per process come from parallel.local_device_count
    return env


class Launch:
    """``n_processes`` CLI processes training ``run_dir`` to ``steps``; :meth:`wait` checks them."""

    def __init__(self, run_dir: Path, n_processes: int, steps: int, cache_dir: Path, extra=None):
        self.logs = [run_dir.parent / f"{run_dir.name}.{steps}.p{i}.log" for i in range(n_processes)]
        common = ["--config", str(CONFIG), f"run_dir={run_dir}", f"train.steps={steps}",
                  f"optim.decay_steps={STEPS}",  # one schedule however far each launch goes
                  "log.progress=false", "log.tensorboard=false", "log.plot=false"]
        if n_processes == 1:
            per_process = [["parallel.local_device_count=1"]]
        else:
            port = _free_port()
            per_process = [[f"parallel.local_device_count={DEVICES_PER_PROCESS}",
                            f"parallel.coordinator_address=127.0.0.1:{port}",
                            f"parallel.num_processes={n_processes}", f"parallel.process_id={i}"]
                           for i in range(n_processes)]
        if extra is not None:  # more key=value arguments, one list per process; the later value wins
            per_process = [mine + more for mine, more in zip(per_process, extra)]
        self.procs = []
        for log, extra in zip(self.logs, per_process):
            with open(log, "w") as out:
                # a new session per process, so a hung one is killed with all it started
                self.procs.append(subprocess.Popen([sys.executable, "-m", "jaxtrain.run", *common, *extra],
                                                   cwd=ROOT, env=_env(cache_dir), stdout=out,
                                                   stderr=subprocess.STDOUT, start_new_session=True))

    def output(self, i: int) -> str:
        return self.logs[i].read_text()

    def _tails(self) -> str:
        return "\n".join(f"--- process {i} (last lines):\n" + "\n".join(self.output(i).splitlines()[-15:])
                         for i in range(len(self.procs)))

    def kill(self) -> None:
        # SIGKILL: a process stuck in a collective may never reach a point that handles SIGTERM.
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def wait_codes(self) -> list[int]:
        """The exit codes, once every process ended; fails the test (killing them) after TIMEOUT_S."""
        try:
            for p in self.procs:
                p.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{len(self.procs)}-process run did not finish in {TIMEOUT_S}s (hang?)\n{self._tails()}")
        return [p.returncode for p in self.procs]

    def wait(self) -> "Launch":
        codes = self.wait_codes()
        assert codes == [0] * len(codes), f"exit codes {codes}\n{self._tails()}"
        return self


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _curve(run_dir: Path, key: str) -> dict[int, float]:
    return {row["step"]: row[key] for row in _metrics(run_dir) if key in row}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multihost")
    cache = tmp / "compilation-cache"
    r, a, b = tmp / "R", tmp / "A", tmp / "B"
    # Independent launches run side by side; a resume waits for the launch it continues.
    ref, a1 = Launch(r, 1, STEPS, cache), Launch(a, 2, SPLIT, cache)
    ref.wait(), a1.wait()
    a2, b1 = Launch(a, 1, STEPS, cache), Launch(b, 1, SPLIT, cache)
    a2.wait(), b1.wait()
    b2 = Launch(b, 2, STEPS, cache).wait()
    return dict(R=r, A=a, B=b, a1=a1, a2=a2, b1=b1, b2=b2)


def _assert_close(got: dict[int, float], want: dict[int, float], steps: range, what: str):
    missing = [s for s in steps if s not in got]
    assert not missing, f"{what}: no value logged at steps {missing}"
    for s in steps:
        assert got[s] == pytest.approx(want[s], rel=RTOL), f"{what} at step {s}: {got[s]} vs one process {want[s]}"


def test_two_processes_match_one_process(runs):
    ref_loss, ref_val = _curve(runs["R"], "loss"), _curve(runs["R"], "val_loss")
    assert ref_loss[STEPS] < ref_loss[5] - 0.5  # the reference learned something
    first, second = range(5, SPLIT + 1, 5), range(SPLIT + 5, STEPS + 1, 5)
    # A: two processes for the first half
    _assert_close(_curve(runs["A"], "loss"), ref_loss, first, "A (2 processes) train loss")
    _assert_close(_curve(runs["A"], "val_loss"), ref_val, [SPLIT], "A (2 processes) val loss")
    # B: two processes for the second half, resumed from a one-process checkpoint
    _assert_close(_curve(runs["B"], "loss"), ref_loss, second, "B (2 processes, resumed) train loss")
    _assert_close(_curve(runs["B"], "val_loss"), ref_val, [STEPS], "B (2 processes, resumed) val loss")
    assert "4 cpu devices" in runs["b2"].output(0)


def test_checkpoint_moves_between_process_counts(runs):
    ref_loss = _curve(runs["R"], "loss")
    second = range(SPLIT + 5, STEPS + 1, 5)
    # A: written by 2 processes at step 20, resumed and finished by 1 process
    _assert_close(_curve(runs["A"], "loss"), ref_loss, second, "A (1 process, resumed) train loss")
    for launch in ("a2", "b2"):
        assert f"resuming from step {SPLIT}" in runs[launch].output(0), f"{launch} did not resume"
    for run in ("A", "B"):
        steps = sorted(int(p.name) for p in (runs[run] / "checkpoints").iterdir() if p.name.isdigit())
        assert steps == [SPLIT, STEPS]


def test_only_process_zero_writes(runs):
    for run in ("A", "B"):
        logged = [row["step"] for row in _metrics(runs[run])]
        assert logged == sorted(set(logged)), f"{run}: a step logged twice: {logged}"
    for launch in ("a1", "b2"):
        out1 = runs[launch].output(1)
        assert "done:" in runs[launch].output(0) and "done:" not in out1, "process 1 printed a summary"


@pytest.mark.parametrize("handler, code", [
    ("", -signal.SIGTERM),  # the default action: jax.distributed's notifier must not swallow the signal
    ("signal.signal(signal.SIGTERM, lambda *a: os._exit(7))\n", 7),  # what python -m jaxtrain.run installs
])
def test_sigterm_keeps_its_handler_across_distributed_initialize(tmp_path, handler, code):
    """jax.distributed.initialize installs a SIGTERM notifier that only logs; initialize puts back what was there."""
    script = (
        "import os, signal, sys, time\n"
        + handler
        + "from jaxtrain import parallel\n"
        "from jaxtrain.app.config import ParallelConfig\n"
        f"parallel.initialize(ParallelConfig(coordinator_address='127.0.0.1:{_free_port()}', "
        "num_processes=1, process_id=0))\n"
        "assert parallel.jax.distributed.is_initialized()\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(30)\n"
        "sys.exit(3)  # still alive: the signal was swallowed\n")
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_env(tmp_path), timeout=120,
                       capture_output=True, text=True)
    assert p.returncode == code, p.stderr[-2000:]


def test_sigterm_to_one_process_stops_both_at_one_checkpoint_and_they_resume(tmp_path):
    """A scheduler's SIGTERM may reach one process first: all of them must save the same step and exit 75."""
    cache, run = tmp_path / "compilation-cache", tmp_path / "P"
    launch = Launch(run, 2, 100_000, cache)  # far more steps than it will run
    metrics, deadline = run / "metrics.jsonl", time.monotonic() + TIMEOUT_S
    while not (metrics.exists() and metrics.read_text().strip()):  # training is under way
        if time.monotonic() > deadline or any(p.poll() is not None for p in launch.procs):
            launch.kill()
            pytest.fail(f"the 2-process run did not start training\n{launch._tails()}")
        time.sleep(0.2)
    launch.procs[1].send_signal(signal.SIGTERM)
    codes = launch.wait_codes()
    assert codes == [75, 75], f"exit codes {codes}\n{launch._tails()}"
    stopped = [re.search(r"stopped by (.+) after step (\d+): checkpoint saved", launch.output(i)) for i in (0, 1)]
    assert all(stopped), launch._tails()
    assert stopped[1].group(1) == "SIGTERM" and stopped[0].group(1) == "a stop signal to another process"
    step = int(stopped[0].group(2))
    assert int(stopped[1].group(2)) == step and (run / "checkpoints" / str(step)).is_dir()
    resumed = Launch(run, 2, step + 10, cache).wait()
    assert f"resuming from step {step}" in resumed.output(0)
    assert max(row["step"] for row in _metrics(run)) == step + 10


def test_a_setup_error_in_one_process_ends_every_process_at_once(tmp_path):
    """A data path missing on one host: each process ends with one error line instead of waiting in a collective."""
    missing = tmp_path / "missing.txt"
    for bad in (1, 0):
        extra = [[f"data.source={missing}"] if i == bad else [] for i in range(2)]
        launch = Launch(tmp_path / f"run{bad}", 2, SPLIT, tmp_path / "cache", extra=extra)
        t0 = time.monotonic()
        codes = launch.wait_codes()
        assert codes == [2, 2], f"exit codes {codes}\n{launch._tails()}"
        assert time.monotonic() - t0 < 100, "the processes waited for each other"  # JAX's own timeouts are 2-5 min
        errors = [[line for line in launch.output(i).splitlines() if line.startswith("error:")] for i in (0, 1)]
        assert errors[bad] == [f"error: data.source='{missing}': path does not exist; expected 'stdlib', a text file, "
                               "a folder, .jsonl/.parquet records, a .bin token file or a 1-D integer .npy"], launch._tails()
        assert errors[1 - bad] == [f"error: process {bad} stopped during setup: {errors[bad][0][len('error: '):]}"]
        assert "Traceback" not in launch.output(0) + launch.output(1)
        assert not (tmp_path / f"run{bad}").exists()


def test_processes_with_different_device_counts_are_one_error_line_each(tmp_path):
    launch = Launch(tmp_path / "run", 2, SPLIT, tmp_path / "cache", extra=[[], ["parallel.local_device_count=1"]])
    codes = launch.wait_codes()
    assert codes == [2, 2], f"exit codes {codes}\n{launch._tails()}"
    for i in (0, 1):
        assert "error: the processes own different numbers of devices (process 0: 2, process 1: 1)" in launch.output(i)
        assert "Traceback" not in launch.output(i)
