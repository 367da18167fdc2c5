"""Metrics out of the loop: JSONL + TensorBoard, throughput and MFU, a progress bar.

Everything here runs on the host with plain Python numbers: the loop fetches
the device metrics once per log interval and hands this module dicts of floats.
Only process 0 writes; other processes get writers that do nothing.

Example::

    with MetricsLog(run_dir, start_step=0, total_steps=100, enabled=True) as log:
        log.write({"step": 10, "loss": 3.1, "tokens_per_s": 5e3})
    jaxtrain.app.plot.plot(read_jsonl(run_dir / METRICS_FILE), run_dir / "plot.png")
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
from tqdm.auto import tqdm

from jaxtrain.diagnostics import is_diagnostic

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"

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


def summary_line(*, steps: int, val_loss: Optional[float], baseline: Optional[float], tokens_per_s: float,
                 mfu_: Optional[float], train_s: float, wall_s: float, unit: str = "token") -> str:
    """The one line printed at the end of a run; ``unit`` is what the rate counts (``token`` or ``example``)."""
    val = "n/a" if val_loss is None else f"{val_loss:.4f}"
    per = " nats/token" if unit == "token" else ""
    base = "" if baseline is None else f" (unigram baseline {baseline:.4f})"
    return (f"done: {steps} steps | final val loss {val}{per}{base} | "
            f"{fmt_rate(tokens_per_s)} {unit}s/s | MFU {fmt_mfu(mfu_)} | "
            f"training {fmt_duration(train_s)}, wall {fmt_duration(wall_s)}")


# ---------------------------------------------------------------- writers


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)  # "nan" / "inf": strict JSON has no NaN literal
    return v


def read_jsonl(path: str | Path) -> list[dict]:
    """All rows of a metrics file (``[]`` if it does not exist); a torn last line is ignored."""
    p = Path(path)
    if not p.exists():
        return []
    rows = []
    for line in p.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a run killed mid-write leaves at most one partial line, the last
    return rows


class MetricsLog:
    """``metrics.jsonl`` + TensorBoard events + progress bar, for one run (process 0 only).

    On resume (``start_step > 0``) rows past ``start_step`` left by an interrupted
    run are dropped first, so the file holds one history; TensorBoard is told
    the same through ``purge_step``. With ``enabled=False`` every method is a no-op.
    """

    def __init__(self, run_dir: str | Path, *, start_step: int, total_steps: int, enabled: bool,
                 tensorboard: bool = True, progress: bool = True):
        self.enabled = enabled
        self._file = self._tb = self._bar = None
        self._val = None  # (step, val_loss) of the last evaluation: the bar keeps showing it
        if not enabled:
            return
        run_dir = Path(run_dir).expanduser()
        path = run_dir / METRICS_FILE
        kept = [r for r in read_jsonl(path) if r.get("step", 0) <= start_step] if start_step else []
        self._val = next(((r["step"], r["val_loss"]) for r in reversed(kept)
                          if isinstance(r.get("val_loss"), (int, float))), None)
        # Rewrite through a temporary file so a kill at this moment keeps the old history.
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
        os.replace(tmp, path)
        self._file = open(path, "a", buffering=1)  # line-buffered: a row is on disk once logged
        if tensorboard and start_step < total_steps:  # a finished run gets no new, empty event file
            self._tb = _summary_writer_class()(str(run_dir / TB_DIR), purge_step=start_step or None)
        if progress:
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                             smoothing=0.1)

    def write(self, row: dict[str, Any]) -> None:
        """Append one row (``row["step"]`` required) to every sink and refresh the bar."""
        if not self.enabled:
            return
        self._file.write(json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(_tb_tag(k), v, row["step"])
        if isinstance(row.get("val_loss"), (int, float)):
            self._val = (row["step"], row["val_loss"])
        if self._bar is not None:
            self._bar.update(row["step"] - self._bar.n)
            self._bar.set_postfix_str(_postfix(row, self._val), refresh=True)

    def echo(self, msg: str) -> None:
        """Print a line without breaking the progress bar."""
        if self.enabled:
            (self._bar.write if self._bar is not None else print)(msg)

    def close(self) -> None:
        for h in (self._bar, self._tb, self._file):
            if h is not None:
                h.close()
        self._file = self._tb = self._bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _summary_writer_class():
    """``tensorboardX.SummaryWriter``, imported without PyTorch.

    tensorboardX imports torch whenever it is installed, only to accept torch
    tensors, which adds seconds to start-up; hiding it for the import makes the
    writer take NumPy values only, which is all this module passes.
    """
    import sys

    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # makes ``import torch`` raise ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def _tb_tag(key: str) -> str:
    if "/" in key:  # a diagnostic such as "grad_norm/h.0.attn": one TensorBoard group per statistic
        return key
    return {"loss": "loss/train", "val_loss": "loss/val"}.get(key, f"train/{key}")


def _postfix(row: dict, val: Optional[tuple[int, float]] = None) -> str:
    """The bar's text: this row's train loss, rate and MFU, and the last validation loss ``(step, loss)``."""
    parts = [f"loss {row['loss']:.4f}"]
    if val is not None:
        parts.append(f"val {val[1]:.4f}" + ("" if val[0] == row["step"] else f" @{val[0]}"))
    parts.append(f"{fmt_rate(row.get('tokens_per_s', 0.0))} tok/s")
    if row.get("mfu") is not None:
        parts.append(f"MFU {fmt_mfu(row['mfu'])}")
    return " | ".join(parts)


# ---------------------------------------------------------------- plot
