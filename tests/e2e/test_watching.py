"""Watching a run: W&B (offline) next to metrics.jsonl, the profiler window, the memory figure.

A tiny run logs to an offline W&B run, is stopped at step 6 and resumed to step
12 by the same command: both halves log to one W&B run id, and the W&B history
holds, step for step, the values of metrics.jsonl. The profiler window leaves a
trace where TensorBoard's profile plugin looks for it.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import types
from pathlib import Path

import pytest

pytest.importorskip("wandb")  # the wandb extra; the test extra installs it, so CI runs this

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

ARGS = ["--config", "tiny", "train.log_every=1", "train.eval_every=6", "train.sample_every=6",
        "train.sample_tokens=8", "checkpoint.every=6", "log.progress=false", "log.plot=false",
        "log.wandb=jaxtrain-test", "log.wandb_mode=offline", "log.profile_start=2", "log.profile_steps=3"]


def _wandb_records(path: Path):
    """The protobuf records of a ``.wandb`` file (LevelDB-log framing: 32 KiB blocks, 7-byte headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def _wandb_history(run_dir: Path) -> tuple[set[str], dict[int, dict]]:
    ids, history = set(), {}
    for f in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for record in _wandb_records(f):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
            elif kind == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                history.setdefault(row["_step"], {}).update(row)
    return ids, history


def test_wandb_offline_history_equals_metrics_jsonl_across_a_resume(tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAXTRAIN_COMPILATION_CACHE=str(tmp_path / "cache"), WANDB_SILENT="true")
    outs = []
    for steps in (6, 12):
        r = subprocess.run([sys.executable, "-m", "jaxtrain.run", *ARGS, f"run_dir={run_dir}", f"train.steps={steps}"],
                           capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        outs.append(r.stdout)
    assert "resuming from step 6" in outs[1]
    header = outs[0].splitlines()[0]
    assert "step memory" in header and "per device (arguments" in header, header
    ids, history = _wandb_history(run_dir)
    (run_id,) = ids  # one W&B run, continued by the resumed process
    assert (run_dir / "wandb-id").read_text().strip() == run_id
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2
    rows = {json.loads(line)["step"]: json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()}
    assert sorted(rows) == list(range(1, 13)) and sorted(history) == sorted(rows)
    for step, row in rows.items():
        for key in ("loss", "grad_norm", "lr", "update_norm", "param_norm", "val_loss"):
            assert history[step].get(key) == row.get(key), (step, key, history[step].get(key), row.get(key))
    assert history[6]["sample/_type"] == history[12]["sample/_type"] == "html-file"  # the text samples went too
    # the profiler window (steps 2-4 of the first process) left a trace for TensorBoard's profile tab
    traces = list((run_dir / "tb" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    # ... and the plugin lists it (tensorboard-plugin-profile, in the test extra)
    from xprof import profile_plugin

    context = types.SimpleNamespace(logdir=str(run_dir / "tb"), data_provider=None,
                                    flags=types.SimpleNamespace(master_tpu_unsecure_channel=""))
    assert list(profile_plugin.ProfilePlugin(context).generate_runs()) == [traces[0].parent.name]


def test_without_the_wandb_package_log_wandb_is_one_error_line(tmp_path):
    code = ("import sys; sys.modules['wandb'] = None\n"
            "from jaxtrain.app import cli\n"
            f"sys.exit(cli.run(['--config', 'tiny', 'run_dir={tmp_path / 'run'}', 'log.wandb=p', 'train.steps=2']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600,
                       env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""))
    assert r.returncode == 2, r.stderr[-2000:]
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "log.wandb='p' needs the wandb package" in err[0], err
