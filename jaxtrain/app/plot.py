"""The run's PNG plot: loss (train, validation, baseline), gradient norm, learning rate, diagnostics."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Sequence

from jaxtrain.diagnostics import is_diagnostic

PLOT_FILE = "plot.png"


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
    handles, labels = ax_loss.get_legend_handles_labels()
    steps, bpb = _series(rows, "val_bpb")
    if bpb:  # bits per byte share the panel on their own axis (comparable across tokenizers)
        ax_bpb = ax_loss.twinx()
        (line,) = ax_bpb.plot(steps, bpb, "s--", color="tab:green", label="val bits/byte")
        ax_bpb.set_ylabel("validation bits per byte")
        handles, labels = handles + [line], labels + [line.get_label()]
    ax_loss.legend(handles, labels)
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
