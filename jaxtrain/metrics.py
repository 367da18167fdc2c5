"""Metrics out of the loop: JSONL + TensorBoard, throughput and MFU, a progress bar, the plot.

Everything here runs on the host with plain Python numbers: the loop fetches
the device metrics once per log interval and hands this module dicts of floats.
Only process 0 writes; other processes get writers that do nothing.

Example::

    with MetricsLog(run_dir, start_step=0, total_steps=100, enabled=True) as log:
        log.write({"step": 10, "loss": 3.1, "tokens_per_s": 5e3})
    plot(read_jsonl(run_dir / METRICS_FILE), run_dir / PLOT_FILE)
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import jax
from tqdm.auto import tqdm

from jaxtrain.diagnostics import is_diagnostic

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "plot.png"
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


def flops_per_token(n_params: int, n_embd_params: int, *, n_layer: int, n_embd: int, block_size: int) -> float:
    """Training FLOPs per token of a GPT (forward + backward), as in the PaLM paper's appendix B.

    ``6 * N + 12 * L * C * T`` where N counts parameters without the position
    embedding ``n_embd_params`` (the same formula as ``GPT.flops_per_token``,
    written on counts so it works on an abstract state without allocating one).
    """
    return 6 * (n_params - n_embd_params) + 12 * n_layer * n_embd * block_size


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


def summary_line(*, steps: int, val_loss: Optional[float], baseline: float, tokens_per_s: float,
                 mfu_: Optional[float], train_s: float, wall_s: float) -> str:
    """The one line printed at the end of a run."""
    val = "n/a" if val_loss is None else f"{val_loss:.4f}"
    return (f"done: {steps} steps | final val loss {val} nats/token (unigram baseline {baseline:.4f}) | "
            f"{fmt_rate(tokens_per_s)} tokens/s | MFU {fmt_mfu(mfu_)} | "
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


def _series(rows: Iterable[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot(rows: Sequence[dict], path: str | Path, *, baseline: Optional[float] = None) -> None:
    """A PNG of train/val loss (with the unigram ``baseline``), gradient norm and learning rate.

    When the rows carry diagnostics (``train.diagnostics``), a second row of
    panels shows them: see :func:`_plot_diagnostics`.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot's import
    import matplotlib.pyplot as plt

    diag_keys = sorted({k for r in rows for k in r if is_diagnostic(k)})
    if diag_keys:
        fig, axes = plt.subplots(2, 4, figsize=(20, 8), constrained_layout=True)
        (ax_loss, ax_gn, ax_lr, ax_clip), bottom = axes
    else:
        fig, (ax_loss, ax_gn, ax_lr) = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    ax_loss.plot(*_series(rows, "loss"), label="train")
    ax_loss.plot(*_series(rows, "val_loss"), "o-", label="val")
    if baseline is not None:
        ax_loss.axhline(baseline, color="gray", ls="--", lw=1, label="unigram baseline")
    ax_loss.set(title="loss (nats/token)", xlabel="step")
    ax_loss.legend()
    ax_gn.plot(*_series(rows, "grad_norm"))
    ax_gn.set(title="gradient norm (before clipping)", xlabel="step", yscale="log")
    ax_lr.plot(*_series(rows, "lr"))
    ax_lr.set(title="learning rate", xlabel="step")
    if diag_keys:
        _plot_diagnostics(rows, diag_keys, ax_clip, bottom)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_diagnostics(rows: Sequence[dict], keys: Sequence[str], ax_clip, bottom) -> None:
    """Clip fraction; per-module gradient norms and update ratios; per-layer attention statistics."""
    import matplotlib.pyplot as plt

    ax_clip.plot(*_series(rows, "clip_frac"))
    ax_clip.set(title="fraction of steps clipped", xlabel="step", ylim=(-0.05, 1.05))
    panels = (("grad_norm/", "gradient norm per module", "log"),
              ("update_ratio/", "|update| / |param| per module", "log"),
              ("attn_logit_max/", "attention: max |logit| per layer", "linear"),
              ("attn_saturated/", "attention: rows with max prob > 0.99", "linear"))
    for ax, (prefix, title, yscale) in zip(bottom, panels):
        series = [k for k in keys if k.startswith(prefix)]
        colors = plt.cm.tab20([i % 20 for i in range(len(series))])  # 20 distinguishable colours
        for key, color in zip(series, colors):
            ax.plot(*_series(rows, key), color=color, label=key[len(prefix):])
        ax.set(title=title, xlabel="step", yscale=yscale if series else "linear")
        if series:
            ax.legend(fontsize=6, ncol=2 if len(series) > 8 else 1)
