"""The header's memory figure, the peak-memory metric, and the log's trackers (without a run)."""

import types

import jax
import jax.numpy as jnp
from jaxtrain.app import trackers, writers


def test_step_memory_reads_the_compiled_programs_plan():
    compiled = jax.jit(lambda x: (x @ x).sum()).lower(jnp.ones((256, 256))).compile()
    text = writers.step_memory(compiled)
    assert text.startswith("step memory ") and "per device (arguments 0.2 MB" in text, text
    assert writers.step_memory(types.SimpleNamespace(memory_analysis=lambda: None)) == ""


def test_peak_memory_is_the_largest_local_devices_high_water_mark(monkeypatch):
    assert writers.peak_memory_gb() is None  # CPU devices report no memory statistics
    gpus = [types.SimpleNamespace(memory_stats=lambda: {"peak_bytes_in_use": 3 * 2**30}),
            types.SimpleNamespace(memory_stats=lambda: {"peak_bytes_in_use": 5 * 2**30, "bytes_in_use": 1})]
    monkeypatch.setattr(jax, "local_devices", lambda: gpus)
    assert writers.peak_memory_gb() == 5.0


class _Recorder(trackers.Tracker):
    def __init__(self):
        self.calls = []

    def config(self, config, text):
        self.calls.append(("config", config["a"]))

    def scalars(self, step, values):
        self.calls.append(("scalars", step, values))

    def text(self, step, name, text):
        self.calls.append(("text", step, name, text))

    def summary(self, values):
        self.calls.append(("summary", values))

    def close(self):
        self.calls.append(("close",))


def test_the_log_hands_every_tracker_the_same_calls(tmp_path, monkeypatch):
    recorder = _Recorder()
    real_open = trackers.open_trackers
    monkeypatch.setattr(trackers, "open_trackers", lambda *a, **k: real_open(*a, **k) + [recorder])
    from jaxtrain.app.config import LogConfig

    with writers.MetricsLog(tmp_path, start_step=0, total_steps=10, enabled=True,
                            log_cfg=LogConfig(progress=False, tensorboard=False)) as log:
        log.config({"a": 1}, "a: 1")
        log.write({"step": 5, "loss": 2.0, "val_loss": 2.5})
        log.text(5, "sample", "def f")
        log.summary({"steps": 10})
    assert recorder.calls == [("config", 1), ("scalars", 5, {"loss": 2.0, "val_loss": 2.5}),
                              ("text", 5, "sample", "def f"), ("summary", {"steps": 10}), ("close",)]
    assert trackers.read_jsonl(tmp_path / trackers.METRICS_FILE) == [{"step": 5, "loss": 2.0, "val_loss": 2.5}]


def test_a_resumed_log_keeps_the_history_up_to_the_resumed_step(tmp_path):
    from jaxtrain.app.config import LogConfig

    cfg = LogConfig(progress=False, tensorboard=False)
    with writers.MetricsLog(tmp_path, start_step=0, total_steps=10, enabled=True, log_cfg=cfg) as log:
        for step in (2, 4, 6):
            log.write({"step": step, "loss": float(step)})
    with writers.MetricsLog(tmp_path, start_step=4, total_steps=10, enabled=True, log_cfg=cfg) as log:
        log.write({"step": 6, "loss": 6.5})
    assert [r["loss"] for r in trackers.read_jsonl(tmp_path / trackers.METRICS_FILE)] == [2.0, 4.0, 6.5]
    other = tmp_path / "other"
    other.mkdir()
    with writers.MetricsLog(other, start_step=0, total_steps=1, enabled=False) as log:  # another process
        log.write({"step": 1, "loss": 1.0})
    assert list(other.iterdir()) == []


def test_bits_per_byte_show_in_the_bar_the_summary_line_and_the_plot(tmp_path, capsys):
    import math

    from jaxtrain.app import plot
    from jaxtrain.app.config import LogConfig

    assert writers.bits_per_byte(2.0, 1.0) == 2.0 / math.log(2)
    assert writers.bits_per_byte(2.0, 4.0) == 0.5 / math.log(2)
    assert writers.bits_per_byte(None, 4.0) is None and writers.bits_per_byte(2.0, None) is None
    cfg = LogConfig(progress=True, tensorboard=False)
    with writers.MetricsLog(tmp_path, start_step=0, total_steps=10, enabled=True, log_cfg=cfg) as log:
        log.write({"step": 5, "loss": 2.0, "val_loss": 2.5, "val_bpb": 1.25})
        log.write({"step": 10, "loss": 1.9})
    bar = capsys.readouterr().err
    assert "val 2.5000 (1.250 bpb)" in bar and "val 2.5000 (1.250 bpb) @5" in bar
    line = writers.summary_line(steps=10, val_loss=2.5, baseline=3.0, tokens_per_s=1e3, mfu_=None, train_s=1.0,
                                wall_s=2.0, val_bpb=1.25)
    assert "final val loss 2.5000 nats/token (unigram baseline 3.0000), 1.2500 bits/byte |" in line
    assert "bits/byte" not in writers.summary_line(steps=10, val_loss=2.5, baseline=None, tokens_per_s=1e3,
                                                   mfu_=None, train_s=1.0, wall_s=2.0)
    rows = trackers.read_jsonl(tmp_path / trackers.METRICS_FILE)
    plot.plot(rows, tmp_path / "plot.png", baseline=3.0)
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
