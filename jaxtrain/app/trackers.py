"""Where a run's numbers go: small trackers behind one interface, written to by the loop.

A tracker receives the run's config once, a row of scalars per log interval,
text samples, and the final summary. Three ship here:

- :class:`JsonlTracker`: ``run_dir/metrics.jsonl``, one JSON object per row (cut back to
  the resumed step on resume, so the file holds one history);
- :class:`TensorBoardTracker`: event files in ``run_dir/tb`` (``purge_step`` on resume);
- :class:`WandbTracker`: a Weights & Biases run (``log.wandb=PROJECT``; the ``wandb``
  extra), online or offline, resumed as the same W&B run when the run resumes.

Only process 0 writes; :func:`open_trackers` returns none elsewhere.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path
from typing import Any, Optional

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
WANDB_ID_FILE = "wandb-id"  # under run_dir: the W&B run this run directory logs to


class Tracker:
    """The interface (every method may be left as the no-op it is here)."""

    def config(self, config: dict[str, Any], text: str) -> None:
        """The resolved config, as a nested dict and as YAML text; called once at the start."""

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """One row of metrics at ``step`` (plain Python numbers)."""

    def text(self, step: int, name: str, text: str) -> None:
        """A text sample (``name``: e.g. ``"sample"``) at ``step``."""

    def summary(self, values: dict[str, Any]) -> None:
        """The run's final numbers (steps, val_loss, tokens_per_s, ...)."""

    def close(self) -> None:
        """Flush and release files and connections."""


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


class JsonlTracker(Tracker):
    """``metrics.jsonl``; on resume (``start_step > 0``) the rows after ``start_step`` that an
    interrupted run left are dropped first."""

    def __init__(self, run_dir: Path, start_step: int):
        path = run_dir / METRICS_FILE
        self.kept = [r for r in read_jsonl(path) if r.get("step", 0) <= start_step] if start_step else []
        # Rewrite through a temporary file so a kill at this moment keeps the old history.
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in self.kept))
        os.replace(tmp, path)
        self._file = open(path, "a", buffering=1)  # line-buffered: a row is on disk once logged

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._file.write(json.dumps({"step": step, **{k: _jsonable(v) for k, v in values.items()}}) + "\n")

    def close(self) -> None:
        self._file.close()


class TensorBoardTracker(Tracker):
    """TensorBoard event files under ``run_dir/tb``: scalars, samples and the config as text."""

    def __init__(self, run_dir: Path, start_step: int):
        self._writer = _summary_writer_class()(str(run_dir / TB_DIR), purge_step=start_step or None)

    def config(self, config: dict[str, Any], text: str) -> None:
        self._writer.add_text("config", f"```\n{text}\n```", 0)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            if isinstance(v, (int, float)):
                self._writer.add_scalar(_tb_tag(k), v, step)

    def text(self, step: int, name: str, text: str) -> None:
        self._writer.add_text(name, f"```\n{text}\n```", step)

    def close(self) -> None:
        self._writer.close()


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


class WandbTracker(Tracker):
    """A Weights & Biases run in ``project``, its files under ``run_dir/wandb``.

    The W&B run id is kept in ``run_dir/wandb-id``: a resumed run (the same
    command again) continues the same W&B run. Rows that an interrupted run had
    already sent past its last checkpoint are sent again with the same values
    (resume is exact); W&B keeps one value per step.
    """

    def __init__(self, run_dir: Path, *, project: str, name: Optional[str], mode: str):
        try:
            import wandb
        except ImportError:
            from jaxtrain.app.config import ConfigError

            raise ConfigError(f"log.wandb={project!r} needs the wandb package: pip install -e \".[wandb]\" "
                              "(or pip install wandb), or set log.wandb=null") from None
        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else None
        if not run_id:
            run_id = uuid.uuid4().hex[:8]  # W&B run ids: a few lowercase letters and digits
            id_file.write_text(run_id + "\n")
        self._wandb = wandb
        self.run = wandb.init(project=project, name=name or run_dir.name, id=run_id, resume="allow", mode=mode,
                              dir=str(run_dir), settings=wandb.Settings(silent=True, console="off"))

    def config(self, config: dict[str, Any], text: str) -> None:
        self.run.config.update(config, allow_val_change=True)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=step)

    def text(self, step: int, name: str, text: str) -> None:
        self.run.log({name: self._wandb.Html(f"<pre>{_escape(text)}</pre>")}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        self.run.summary.update({k: v for k, v in values.items() if isinstance(v, (int, float, str))})

    def close(self) -> None:
        self.run.finish()


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def open_trackers(log_cfg, run_dir: Path, *, start_step: int, total_steps: int) -> list[Tracker]:
    """The trackers ``log_cfg`` (the config's ``log`` section) asks for, opened for a run that starts
    at ``start_step``: JSONL always; TensorBoard unless ``log.tensorboard=false`` (and not for a run
    already at ``total_steps``, which would only add an empty event file); W&B when ``log.wandb``
    names a project."""
    trackers: list[Tracker] = [JsonlTracker(run_dir, start_step)]
    try:
        if log_cfg.tensorboard and start_step < total_steps:
            trackers.append(TensorBoardTracker(run_dir, start_step))
        if log_cfg.wandb is not None:
            trackers.append(WandbTracker(run_dir, project=log_cfg.wandb, name=log_cfg.wandb_name,
                                         mode=log_cfg.wandb_mode))
    except BaseException:
        for t in trackers:
            t.close()
        raise
    return trackers
