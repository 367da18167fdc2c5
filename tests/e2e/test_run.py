"""End to end through the real command line: the tiny config trains and writes its run
directory; bad inputs fail with one line and leave an existing run directory untouched."""

import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxtrain.app import checkpoint
from jaxtrain.app import config
from jaxtrain.app import generate
from jaxtrain.app import writers as metrics
from jaxtrain.app import cli as run

pytestmark = pytest.mark.slow  # whole runs in subprocesses: the full suite, not the fast tier

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "jaxtrain" / "configs" / "tiny.yaml"
QUIET = ["log.progress=false"]


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, timeout=600, cwd=ROOT)
    # Decode by hand: text mode would turn a generated "\r" into "\n".
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(), r.stderr.decode())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """``(run_dir, completed process)`` of ``python -m jaxtrain.run --config configs/tiny.yaml`` (40 steps)."""
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    return run_dir, _cli("jaxtrain.run", "--config", str(TINY), f"run_dir={run_dir}", *QUIET)


def _summary(stdout: str) -> str:
    lines = [l for l in stdout.splitlines() if l.startswith("done:")]
    assert len(lines) == 1, stdout
    return lines[0]


def test_tiny_run_learns_and_writes_its_run_dir(tiny_run):
    run_dir, r = tiny_run
    assert r.returncode == 0, r.stderr[-3000:]
    rows = metrics.read_jsonl(run_dir / metrics.METRICS_FILE)
    assert [row["step"] for row in rows] == list(range(5, 41, 5))  # log_every=5
    for row in rows:
        assert {"loss", "grad_norm", "lr", "update_norm", "param_norm", "nonfinite", "tokens_per_s",
                "elapsed"} <= set(row)
        assert row["nonfinite"] == 0 and row["tokens_per_s"] > 0 and "mfu" not in row  # CPU peak unknown
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    val = {row["step"]: row["val_loss"] for row in rows if "val_loss" in row}
    assert sorted(val) == [20, 40]  # eval_every=20; the last step always
    assert val[40] < val[20]

    header = next(line for line in r.stdout.splitlines() if line.startswith("run_dir "))
    assert ("on 8 cpu devices | matmuls XLA (the BLAS path runs each product on one device "
            "and this process has 8) | step memory ") in header, header
    summary = _summary(r.stdout)
    assert summary.startswith("done: 40 steps") and f"final val loss {val[40]:.4f}" in summary
    baseline = float(summary.split("unigram baseline ")[1].split(")")[0])
    assert 3.0 < baseline < 3.4 and val[40] < baseline  # learned more than byte frequencies

    assert (run_dir / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((run_dir / metrics.TB_DIR).glob("events.out.tfevents.*"))
    assert (run_dir / "checkpoints" / "40").is_dir()
    samples = (run_dir / "samples.txt").read_text()
    assert "===== step 20 =====\ndef " in samples and "===== step 40 =====\ndef " in samples
    assert config.load(run_dir / "config.yaml") == config.load(TINY, [f"run_dir={run_dir}", *QUIET])


def test_generate_cli_on_the_trained_run_matches_the_library(tiny_run, capsys):
    run_dir, _ = tiny_run
    # In-process main(): the same code as `python -m jaxtrain.generate` (whose entry point
    # test_generate.py runs as a subprocess), without a second JAX start-up.
    status = generate.main(["--run-dir", str(run_dir), "--prompt", "def ", "--tokens", "24", "--temperature", "0"])
    out = capsys.readouterr().out
    assert status == 0
    state, cfg = checkpoint.load_run(run_dir)
    assert int(state.step) == cfg.train.steps == 40
    want = generate.sample_text(state, "def ", tokens=24, temperature=0.0)[0]
    assert out == want + "\n" and out.startswith("def ")


# ---------------------------------------------------------------- bad inputs


def _write(path: Path, content: bytes | np.ndarray) -> str:
    if isinstance(content, np.ndarray):
        np.save(path, content)
    else:
        path.write_bytes(content)
    return str(path)


# name -> (overrides built from a tmp dir, words the one-line message must contain)
BAD_INPUTS = {
    "missing path": (lambda tmp: [f"data.source={tmp}/no/such/corpus.txt"], ["data.source", "does not exist"]),
    "empty corpus": (lambda tmp: [f"data.source={_write(tmp / 'empty.txt', b'')}"], ["empty.txt", "empty"]),
    "shorter than a block": (lambda tmp: [f"data.source={_write(tmp / 'short.txt', b'x = 1' * 10)}"],
                             ["short.txt", "48 tokens", "model.block_size+1=65"]),
    "validation source shorter than a block": (
        lambda tmp: [f"data.val_source={_write(tmp / 'val.txt', b'x = 1' * 2)}"],
        ["val split has 10 tokens", "a longer data.val_source"]),
    "token id >= vocab": (lambda tmp: [f"data.source={_write(tmp / 'ids.npy', np.arange(4000) % 300)}"],
                          ["ids.npy", "max token id 299", "model.vocab_size=256"]),
    "unknown key": (lambda tmp: ["optim.lrr=0.1"], ["'optim.lrr'", "did you mean 'optim.lr'"]),
    "wrong type": (lambda tmp: ["train.steps=many"], ["'train.steps'", "'many'"]),
    "bad choice": (lambda tmp: ["model.dtype=float8"], ["model.dtype='float8'", "float32, bfloat16"]),
    "batch does not split": (lambda tmp: ["train.batch_size=12"], ["train.batch_size=12", "divisible"]),
    "changed model on resume": (lambda tmp: ["model.n_layer=3"], ["model.n_layer", "saved 2", "now 3"]),
    "CPU backend in bfloat16": (lambda tmp: ["backend=cpu", "model.dtype=bfloat16"],
                                ["backend='cpu'", "not bfloat16", "backend=auto"]),
    "CPU backend on 8 devices": (lambda tmp: ["backend=cpu"],
                                 ["backend='cpu'", "one device and this process has 8", "backend=xla"]),
    "a replaced key": (lambda tmp: ["model.matmul=blas"], ["'model.matmul'", "replaced", "backend=cpu"]),
    "another task on resume": (lambda tmp: ["task=no_such_task_module"],
                               ["task: saved 'lm', now 'no_such_task_module'"]),
    "a task that is not there": (lambda tmp: ["task=no_such_task_module", f"run_dir={tmp}/fresh"],
                                 ["task='no_such_task_module'", "no module named"]),
}


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_in_one_line_and_leaves_the_run_dir_alone(case, tiny_run, tmp_path, capsys):
    run_dir, r = tiny_run
    assert r.returncode == 0
    make_overrides, words = BAD_INPUTS[case]
    before = _snapshot(run_dir)
    status = run.run(["--config", str(TINY), f"run_dir={run_dir}", *QUIET, *make_overrides(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == run.EXIT_USER_ERROR
    assert len(err) == 1 and err[0].startswith("error: "), err
    for word in words:
        assert word in err[0], (word, err[0])
    assert _snapshot(run_dir) == before


def test_rerunning_a_finished_run_reports_it_and_rewrites_nothing(tiny_run, capsys):
    run_dir, r = tiny_run
    assert r.returncode == 0
    kept = ("config.yaml", "samples.txt", "metrics.jsonl")
    before = {name: (run_dir / name).read_bytes() for name in kept}
    events = sorted((run_dir / "tb").iterdir())
    assert run.run(["--config", str(TINY), f"run_dir={run_dir}", *QUIET, "train.sample_tokens=7"]) == 0
    out = capsys.readouterr().out
    assert "resuming from step 40" in out and _summary(out).startswith("done: 40 steps")
    assert {name: (run_dir / name).read_bytes() for name in kept} == before
    assert sorted((run_dir / "tb").iterdir()) == events  # no new, empty TensorBoard event file


def test_resuming_from_an_older_checkpoint_cuts_samples_back_like_metrics(tiny_run, tmp_path, capsys):
    run_dir, r = tiny_run
    assert r.returncode == 0
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "checkpoints" / "40" / "meta" / "metadata").unlink()  # the newest step is unreadable: resume at 20
    assert run.run(["--config", str(TINY), f"run_dir={copy}", *QUIET]) == 0
    assert "resuming from step 20" in capsys.readouterr().out
    samples = (copy / "samples.txt").read_text()
    assert [int(n) for n in re.findall(r"^===== step (\d+) =====$", samples, re.M)] == [20, 40]
    assert samples == (run_dir / "samples.txt").read_text()  # the same history as the uninterrupted run
    steps = [row["step"] for row in metrics.read_jsonl(copy / metrics.METRICS_FILE)]
    assert steps == sorted(set(steps)) == list(range(5, 41, 5))


def test_a_run_dir_under_home_keeps_every_file_in_one_place(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert run.run(["--config", str(TINY), "run_dir=~/runs/t", *QUIET, "train.steps=2", "train.eval_batches=1",
                     "train.sample_tokens=2", "log.tensorboard=false"]) == 0
    assert not (tmp_path / "~").exists()
    assert {p.name for p in (tmp_path / "home" / "runs" / "t").iterdir()} >= {
        "checkpoints", "config.yaml", "metrics.jsonl", "samples.txt", "plot.png"}


def test_failing_run_creates_no_run_dir(tmp_path, capsys):
    for overrides in (["optim.lrr=1"], [f"data.source={tmp_path}/missing.txt"]):
        assert run.run(["--config", str(TINY), f"run_dir={tmp_path}/new", *QUIET, *overrides]) != 0
    assert not (tmp_path / "new").exists()
    assert len(capsys.readouterr().err.strip().splitlines()) == 2


def test_real_process_exits_nonzero_with_one_line(tmp_path):
    r = _cli("jaxtrain.run", "--config", str(TINY), f"run_dir={tmp_path}/run", "train.stepz=3")
    assert r.returncode == run.EXIT_USER_ERROR
    assert r.stderr.strip().splitlines() == [
        "error: unknown config key 'train.stepz' in command-line overrides; did you mean 'train.steps'?"]
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- metrics files


def test_metrics_log_on_resume_keeps_history_up_to_the_resumed_step(tmp_path):
    with metrics.MetricsLog(tmp_path, start_step=0, total_steps=30, enabled=True, progress=False) as log:
        for step in (10, 20, 30):
            log.write({"step": step, "loss": 1.0 / step})
    with open(tmp_path / metrics.METRICS_FILE, "a") as f:
        f.write('{"step": 40, "lo')  # a run killed mid-write
    assert [r["step"] for r in metrics.read_jsonl(tmp_path / metrics.METRICS_FILE)] == [10, 20, 30]
    # Resuming from a checkpoint at step 20: rows 30 (and the torn one) belong to the lost future.
    with metrics.MetricsLog(tmp_path, start_step=20, total_steps=40, enabled=True, progress=False,
                            tensorboard=False) as log:
        log.write({"step": 30, "loss": 0.5, "val_loss": float("nan")})
    rows = metrics.read_jsonl(tmp_path / metrics.METRICS_FILE)
    assert [(r["step"], r["loss"]) for r in rows] == [(10, 0.1), (20, 0.05), (30, 0.5)]
    assert rows[-1]["val_loss"] == "nan"  # strict JSON: non-finite floats are written as strings


def test_disabled_metrics_log_writes_nothing(tmp_path):
    with metrics.MetricsLog(tmp_path, start_step=0, total_steps=5, enabled=False) as log:
        log.write({"step": 1, "loss": 1.0})
        log.echo("not shown")
    assert list(tmp_path.iterdir()) == []


def test_mfu_uses_the_peak_table_or_the_override():
    class Dev:
        def __init__(self, kind):
            self.device_kind = kind

    assert metrics.peak_flops([Dev("NVIDIA H100 80GB HBM3")] * 8) == 8 * 989e12
    assert metrics.peak_flops([Dev("TPU v5 lite")]) == 197e12  # not TPU v5's 459e12
    assert metrics.peak_flops([Dev("cpu")]) is None
    assert metrics.peak_flops([Dev("cpu")] * 2, override=1e11) == 2e11
    fpt = 6 * 900 + 12 * 2 * 8 * 4
    assert metrics.mfu(1e3, fpt, 2 * fpt * 1e3) == 0.5 and metrics.mfu(1e3, fpt, None) is None


def test_the_language_model_task_counts_the_gpts_flops_from_shapes():
    from flax import nnx

    from jaxtrain.app import config as config_lib
    from jaxtrain.app import lm
    from jaxtrain.models import GPT

    cfg = config_lib.load("tiny", ["model.block_size=32", "model.n_layer=2", "model.n_head=2", "model.n_embd=16"])
    model = GPT(config_lib.model_config(cfg.model), rngs=nnx.Rngs(0))
    assert lm.flops_per_token(cfg) == model.flops_per_token()  # from an abstract model, as the loop counts
    assert model.flops_per_token() == 6 * model.num_params() + 12 * 2 * 16 * 32


def test_a_token_id_corpus_samples_token_ids_and_takes_an_id_prompt(tmp_path, capsys):
    ids = (np.arange(20_000) * 7919 % 500).astype(np.uint16)  # a "BPE" corpus: ids up to 499, not bytes
    ids.tofile(tmp_path / "tok.bin")
    base = ["--config", str(TINY), f"data.source={tmp_path / 'tok.bin'}", "model.vocab_size=512", *QUIET,
            "train.steps=2", "train.eval_batches=1", "train.sample_tokens=5", "log.tensorboard=false"]
    # The default prompt is text: refused before anything is written, naming the key and the form it needs
    assert run.run([*base, f"run_dir={tmp_path / 'r0'}"]) == run.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: train.sample_prompt='def ': data.source holds token ids") and "\n" not in err
    assert not (tmp_path / "r0").exists()
    assert run.run([*base, f"run_dir={tmp_path / 'r1'}", "train.sample_prompt=511 3"]) == 0
    sample = (tmp_path / "r1" / "samples.txt").read_text().split("=====\n")[1].strip()
    words = sample.split()
    assert words[:2] == ["511", "3"] and len(words) == 7 and all(0 <= int(w) < 512 for w in words)

    r = _cli("jaxtrain.generate", "--run-dir", str(tmp_path / "r1"), "--prompt", "42", "--tokens", "4")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == "42" and len(r.stdout.split()) == 5
    r = _cli("jaxtrain.generate", "--run-dir", str(tmp_path / "r1"), "--prompt", "600")
    assert r.returncode == 2 and r.stderr.strip() == (
        "error: --prompt='600': token id 600 is outside the model's vocabulary [0, 512)")


def test_the_validation_loss_does_not_depend_on_grad_accum(tmp_path):
    from jaxtrain.app import loop

    losses = []
    for accum in (1, 4):
        cfg = config.load(str(TINY), [f"run_dir={tmp_path}", f"train.grad_accum={accum}", "train.eval_batches=2",
                                      "train.batch_size=32"])  # microbatches of 8: one row per test device
        r = loop.setup(cfg)
        assert len(r.eval_batches) == 2 * accum and r.eval_batches[0]["inputs"].shape[0] == 32 // accum
        losses.append(loop.evaluate(r, jax.jit(r.make_state)()))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_progress_bar_keeps_showing_the_last_validation_loss_also_after_a_resume(tmp_path, capsys):
    def bar_after(start, rows):
        with metrics.MetricsLog(tmp_path, start_step=start, total_steps=40, enabled=True, tensorboard=False) as log:
            for row in rows:
                log.write(row)
                last = log._bar.postfix
        return last

    assert bar_after(0, [{"step": 10, "loss": 3.0, "val_loss": 2.5}]) == "loss 3.0000 | val 2.5000 | 0 tok/s"
    assert bar_after(10, [{"step": 20, "loss": 2.0, "tokens_per_s": 1e3}]) == "loss 2.0000 | val 2.5000 @10 | 1k tok/s"
    assert "val" not in bar_after(0, [{"step": 5, "loss": 4.0}])  # a fresh run: no evaluation yet
