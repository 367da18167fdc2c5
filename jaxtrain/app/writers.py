"""Metrics out of the loop: throughput and MFU, the summary line, and the log that feeds the
trackers (:mod:`jaxtrain.app.trackers`) and the progress bar.

Everything here runs on the host with plain Python numbers: the loop fetches
the device metrics once per log interval and hands this module dicts of floats.
Only process 0 writes; other processes get writers that do nothing.

Example::

    with MetricsLog(run_dir, start_step=0, total_steps=100, enabled=True) as log:
        log.write({"step": 10, "loss": 3.1, "tokens_per_s": 5e3})
    jaxtrain.app.plot.plot(read_jsonl(run_dir / METRICS_FILE), run_dir / "plot.png")
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
from tqdm.auto import tqdm

from jaxtrain.app.trackers import METRICS_FILE, TB_DIR, read_jsonl  # noqa: F401 - re-exported

# Dense bfloat16 peak FLOP/s of one device, matched as a substring of
# ``jax.Device.device_kind``. More specific names come first ("TPU v5 lite"
# before "TPU v5"). MFU is quoted against these, as is customary, whatever the
# compute dtype.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L4", 121e12),
    ("TPU v6 lite", 918e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
)


def device_peak_flops(device_kind: str) -> Optional[float]:
    """Peak FLOP/s of one device of ``device_kind`` from :data:`PEAK_FLOPS`, or None if unknown."""
    return next((peak for name, peak in PEAK_FLOPS if name in device_kind), None)


def peak_flops(devices: Sequence[jax.Device], override: Optional[float] = None) -> Optional[float]:
    """Total peak FLOP/s of ``devices``: ``override`` per device (``log.peak_flops``), else the table.

    None when the peak is unknown (CPUs, unlisted accelerators): MFU is then not reported.
    """
    per_device = override if override is not None else device_peak_flops(devices[0].device_kind)
    return None if per_device is None else per_device * len(devices)


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.1f} MB"


def step_memory(compiled) -> str:
    """A compiled step's device memory per device, for the run's header: what XLA planned for its
    arguments (the state and the batch), temporaries and outputs; "" where XLA does not say."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports it
        return ""
    if m is None:
        return ""
    total = m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    return (f"step memory {_size(total)} per device (arguments {_size(m.argument_size_in_bytes)}, "
            f"temporaries {_size(m.temp_size_in_bytes)}, outputs {_size(m.output_size_in_bytes)}, "
            f"{_size(m.alias_size_in_bytes)} of them in donated buffers)")


def peak_memory_gb() -> Optional[float]:
    """The most memory any local device has held so far (GB), where the device reports it (GPUs,
    TPUs; None on CPU): the ``peak_mem_gb`` metric."""
    peaks = []
    for d in jax.local_devices():
        try:
            stats = d.memory_stats()
        except Exception:  # noqa: BLE001 - unsupported on this platform
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(stats["peak_bytes_in_use"])
    return max(peaks) / 2**30 if peaks else None


def mfu(tokens_per_s: float, flops_per_tok: float, peak: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation in [0, 1]: achieved model FLOP/s over ``peak``; None if ``peak`` is None."""
    return None if not peak else tokens_per_s * flops_per_tok / peak


class Stopwatch:
    """Accumulates the seconds between :meth:`start` and :meth:`stop` (e.g. training time only)."""

    def __init__(self):
        self.total = 0.0
        self._t0: Optional[float] = None

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        """Seconds since the last :meth:`start` (added to :attr:`total`)."""
        if self._t0 is None:
            return 0.0
        lap, self._t0 = time.perf_counter() - self._t0, None
        self.total += lap
        return lap


# ---------------------------------------------------------------- formatting


def fmt_rate(x: float) -> str:
    """``6712.3 -> '6.71k'``: a compact tokens/s figure."""
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def fmt_duration(seconds: float) -> str:
    """``312.4 -> '5m12s'``."""
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{seconds:.1f}s"


def fmt_mfu(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def bits_per_byte(val_loss: Optional[float], bytes_per_token: Optional[float]) -> Optional[float]:
    """Validation bits per byte from a mean loss in nats per token: ``val_loss / bytes_per_token / ln 2``;
    None when either is None."""
    if val_loss is None or not bytes_per_token:
        return None
    return val_loss / bytes_per_token / math.log(2)


def summary_line(*, steps: int, val_loss: Optional[float], baseline: Optional[float], tokens_per_s: float,
                 mfu_: Optional[float], train_s: float, wall_s: float, unit: str = "token",
                 val_bpb: Optional[float] = None) -> str:
    """The one line printed at the end of a run; ``unit`` is what the rate counts (``token`` or ``example``)."""
    val = "n/a" if val_loss is None else f"{val_loss:.4f}"
    per = " nats/token" if unit == "token" else ""
    base = "" if baseline is None else f" (unigram baseline {baseline:.4f})"
    bpb = "" if val_bpb is None else f", {val_bpb:.4f} bits/byte"
    return (f"done: {steps} steps | final val loss {val}{per}{base}{bpb} | "
            f"{fmt_rate(tokens_per_s)} {unit}s/s | MFU {fmt_mfu(mfu_)} | "
            f"training {fmt_duration(train_s)}, wall {fmt_duration(wall_s)}")


# ---------------------------------------------------------------- the log


class MetricsLog:
    """The run's trackers (:mod:`jaxtrain.app.trackers`: JSONL, TensorBoard, W&B) and its progress
    bar, for one run (process 0 only; with ``enabled=False`` every method is a no-op).

    On resume (``start_step > 0``) each tracker continues the interrupted run's history from
    ``start_step`` (rows after it are dropped from ``metrics.jsonl``, TensorBoard purges them).
    """

    def __init__(self, run_dir: str | Path, *, start_step: int, total_steps: int, enabled: bool,
                 log_cfg: Any = None, tensorboard: bool = True, progress: bool = True):
        from jaxtrain.app import trackers

        self.enabled = enabled
        self._trackers: list[trackers.Tracker] = []
        self._bar = None
        self._val = None  # (step, val_loss, val_bpb or None) of the last evaluation: the bar keeps showing it
        if not enabled:
            return
        if log_cfg is None:  # the defaults with these two switches
            from jaxtrain.app.config import LogConfig

            log_cfg = LogConfig(tensorboard=tensorboard, progress=progress)
        run_dir = Path(run_dir).expanduser()
        self._trackers = trackers.open_trackers(log_cfg, run_dir, start_step=start_step, total_steps=total_steps)
        kept = self._trackers[0].kept  # the JSONL history up to start_step
        self._val = next(((r["step"], r["val_loss"], r.get("val_bpb")) for r in reversed(kept)
                          if isinstance(r.get("val_loss"), (int, float))), None)
        if log_cfg.progress:
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                             smoothing=0.1)

    def config(self, config: dict[str, Any], text: str) -> None:
        """Hand the resolved config to every tracker."""
        for t in self._trackers:
            t.config(config, text)

    def write(self, row: dict[str, Any]) -> None:
        """Send one row (``row["step"]`` required) to every tracker and refresh the bar."""
        if not self.enabled:
            return
        values = {k: v for k, v in row.items() if k != "step"}
        for t in self._trackers:
            t.scalars(row["step"], values)
        if isinstance(row.get("val_loss"), (int, float)):
            self._val = (row["step"], row["val_loss"], row.get("val_bpb"))
        if self._bar is not None:
            self._bar.update(row["step"] - self._bar.n)
            self._bar.set_postfix_str(_postfix(row, self._val), refresh=True)

    def text(self, step: int, name: str, text: str) -> None:
        """A text sample for the trackers that keep text (TensorBoard, W&B)."""
        for t in self._trackers:
            t.text(step, name, text)

    def summary(self, values: dict[str, Any]) -> None:
        """The run's final numbers, for the trackers that keep a summary (W&B)."""
        for t in self._trackers:
            t.summary(values)

    def echo(self, msg: str) -> None:
        """Print a line without breaking the progress bar."""
        if self.enabled:
            (self._bar.write if self._bar is not None else print)(msg)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        for t in self._trackers:
            t.close()
        self._trackers, self._bar = [], None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _postfix(row: dict, val: Optional[tuple] = None) -> str:
    """The bar's text: this row's train loss, rate and MFU, and the last validation loss
    ``(step, loss[, bits per byte or None])``."""
    parts = [f"loss {row['loss']:.4f}"]
    if val is not None:
        bpb = f" ({val[2]:.3f} bpb)" if len(val) > 2 and val[2] is not None else ""
        parts.append(f"val {val[1]:.4f}{bpb}" + ("" if val[0] == row["step"] else f" @{val[0]}"))
    parts.append(f"{fmt_rate(row.get('tokens_per_s', 0.0))} tok/s")
    if row.get("mfu") is not None:
        parts.append(f"MFU {fmt_mfu(row['mfu'])}")
    return " | ".join(parts)


# ---------------------------------------------------------------- plot
