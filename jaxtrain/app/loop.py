"""``train(config)``: the run loop. It wires a task (model, loss, batches), the
optimizer, shardings, checkpoints and writers together, and is the only impure
code in the flow.

What happens, in order:

1. :func:`setup` validates everything and compiles the steps; it writes nothing,
   so a bad config, a bad corpus or a batch that does not split across the
   devices stops the run before the run directory is touched.
2. The state is restored from the newest good checkpoint in ``run_dir`` or
   created under ``jax.jit`` straight into its shardings.
3. :func:`_loop`: one ``for`` over the prefetched batches. The step is
   compiled once, donates the state and never waits for the device; per-step
   metrics stay on the device and are fetched together every ``log_every``
   steps (and at eval / sample / checkpoint steps), which are the only host
   syncs.

Example::

    from jaxtrain.app import config, loop
    summary = loop.train(config.load("tiny", ["run_dir=/tmp/run"]))
    summary.val_loss
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxtrain import diagnostics, parallel
from jaxtrain.app import checkpoint, data, memory, plot, profiler, runlock, tasks
from jaxtrain.app import config as config_lib
from jaxtrain.app import preempt as signals
from jaxtrain.app import writers as metrics
from jaxtrain.app.config import Config, ConfigError, to_yaml
from jaxtrain.app.tasks import Task
from jaxtrain.state import TrainState
from jaxtrain.step import eval_step, train_step

PyTree = Any
CONFIG_FILE = "config.yaml"
SAMPLES_FILE = "samples.txt"


@dataclasses.dataclass(frozen=True)
class Summary:
    """What a finished run reports (also the numbers of the final summary line)."""

    steps: int  # optimizer steps the state has taken
    val_loss: Optional[float]  # mean loss over the fixed validation batches at the end (None: the task has none)
    baseline: Optional[float]  # the task's reference loss (the LM: unigram entropy of the validation split)
    tokens_per_s: float  # training tokens / training seconds of this invocation
    mfu: Optional[float]  # model FLOPs utilisation; None when the device peak is unknown
    train_s: float  # seconds spent in training steps (excludes eval, samples, checkpoints)
    loop_s: float  # seconds of the loop: first step to last checkpoint committed, everything included
    wall_s: float  # seconds of the whole call, setup and compilation included
    sample: str  # the final text sample
    val_bpb: Optional[float] = None  # val_loss in bits per byte of text (None: the task gives no bytes per token)


@dataclasses.dataclass(frozen=True)
class Run:
    """Everything :func:`setup` prepares: immutable, built once per run."""

    cfg: Config
    mesh: Mesh
    task: Task
    abstract_state: TrainState  # ShapeDtypeStruct leaves carrying the target shardings
    make_state: Callable[[], TrainState]
    train_step: Callable  # compiled: (state, batch) -> (state, metrics); donates state
    eval_step: Callable  # compiled: (state, batch) -> scalar loss
    eval_batches: tuple  # the fixed validation set, already on the devices
    tokens_per_step: int  # what tokens_per_s counts per step (examples x the task's tokens per example)
    flops_per_token: Optional[float]  # training FLOPs per counted token; None: no MFU
    peak_flops: Optional[float]  # of all devices together
    is_main: bool  # process 0: the one that writes files
    backend: str  # what runs the matmuls on CPU, for the header ("" elsewhere)
    step_memory: str  # the compiled train step's device memory, for the header ("" if unknown)

    @property
    def baseline(self) -> Optional[float]:
        return self.task.baseline

    def batch(self, step: int) -> PyTree:
        """This process's rows of the training batch for ``step`` (host numpy)."""
        tc = self.cfg.train
        return tasks.local_batch(self.task, step, tc.batch_size, tc.seed)

    def place(self, batch: PyTree) -> PyTree:
        return parallel.place_batch(batch, self.mesh)


# ---------------------------------------------------------------- setup


def state_factory(cfg: Config) -> Callable[[], TrainState]:
    """A function building the initial :class:`TrainState` of ``cfg``'s task (call it under ``jax.jit``)."""
    return tasks.state_factory(tasks.load(cfg, with_data=False), cfg)


def run_path(cfg: Config) -> Path:
    """``run_dir`` as a path, ``~`` expanded (as the checkpoints' directory is)."""
    return Path(cfg.run_dir).expanduser()


def _check_run_dir(run_dir: str) -> None:
    """Raise :class:`ConfigError` when ``run_dir`` cannot become a writable directory (a file is in the way)."""
    path = Path(run_dir).expanduser().absolute()
    try:
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir():
            raise ConfigError(f"run_dir='{run_dir}': '{existing}' is a file, not a directory; pass a directory path")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"run_dir='{run_dir}': '{existing}' is not writable; pass a directory you can write to")
        if existing != path:  # can a directory be made there? (some file systems refuse, e.g. /proc)
            os.rmdir(tempfile.mkdtemp(prefix=".jaxtrain-probe-", dir=existing))
            longest = max(len(os.fsencode(part)) for part in path.relative_to(existing).parts)
            if longest > os.pathconf(existing, "PC_NAME_MAX"):
                raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))
    except OSError as e:
        raise ConfigError(f"run_dir='{run_dir}': cannot create a directory there ({e.strerror or e}); "
                          "pass a directory path you can write to") from None


def configure_backend(cfg: Config) -> str:
    """Turn the CPU kernels (:mod:`jaxtrain.cpu`) on or off as ``cfg.backend`` says; the header's words.

    ``auto``: on where they can run (float32 on one CPU device with MKL); ``cpu``:
    required (a :class:`ConfigError` says why they cannot run); ``xla``: off.
    """
    if jax.devices()[0].platform != "cpu":
        if cfg.backend == "cpu":
            raise ConfigError(f"backend='cpu' needs CPU devices but this run has {jax.devices()[0].platform} "
                              "devices; use backend=auto")
        return ""
    try:
        import jaxtrain.cpu as cpu_backend
    except ImportError as e:  # a distribution without the backend
        if cfg.backend == "cpu":
            raise ConfigError(f"backend='cpu' cannot run here: {e}; use backend=auto or backend=xla") from None
        return f"XLA ({e})"
    if cfg.backend == "xla":
        cpu_backend.disable()
        return "XLA (backend=xla)"
    cpu_backend.enable()
    if cfg.backend == "cpu":
        from jaxtrain.cpu import blas

        if (why := blas.why_not(jnp.zeros((), cfg.model.dtype), devices=True)) is not None:
            raise ConfigError(f"backend='cpu' cannot run here: {why}; use backend=auto (the CPU kernels where they "
                              "can run, else XLA) or backend=xla")
    return cpu_backend.describe(cfg.model.dtype, precision=cfg.train.matmul_precision)


def _abstract(batch: PyTree, mesh: Mesh, rows: int) -> PyTree:
    """Global shapes of a batch whose local block (this process's rows) is ``batch``, with the batch sharding."""
    sharding = parallel.batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct((rows, *np.shape(x)[1:]), np.asarray(x).dtype,
                                                       sharding=sharding), batch)


def _compile_steps(run_cfg: Config, task: Task, mesh: Mesh, abstract_state: TrainState, shardings: PyTree,
                   first_batch: PyTree, eval_batch: Optional[PyTree]):
    """Ahead-of-time compiled ``(train_step, eval_step)``: a shape change would be an error, never a recompile."""
    tc = run_cfg.train
    step_fn = functools.partial(train_step, loss_fn=task.loss_fn, grad_accum=tc.grad_accum,
                                diagnostics=tc.diagnostics, max_grad_norm=run_cfg.optim.max_grad_norm)
    train = parallel.jit_train_step(step_fn, mesh, shardings)
    # traced under the precision: the compiled step keeps it (the evaluation below keeps the default)
    precision = None if tc.matmul_precision == "default" else tc.matmul_precision
    with jax.default_matmul_precision(precision):
        train = train.lower(abstract_state, _abstract(first_batch, mesh, tc.batch_size)).compile()
    if eval_batch is None:
        return train, None
    evaluate = parallel.jit_eval_step(lambda s, b: eval_step(s, b, loss_fn=task.loss_fn)["loss"], mesh, shardings)
    eval_bs = tc.batch_size // tc.grad_accum  # a microbatch: fits wherever training fits
    evaluate = evaluate.lower(abstract_state, _abstract(eval_batch, mesh, eval_bs)).compile()
    return train, evaluate


def _check_memory(cfg: Config, task: Task, mesh: Mesh, abstract_state: TrainState, shardings: PyTree,
                  first_batch: PyTree, train, evaluate) -> None:
    """``ConfigError`` when the compiled steps need more memory than there is (:mod:`.memory`). With the
    CPU kernels on, also the forward pass of a microbatch compiled with plain XLA ops, whose plan counts
    what the kernels keep out of sight (attention's T x T scores)."""
    memory.check_fits(train, evaluate)
    try:
        import jaxtrain.cpu as cpu_backend
    except ImportError:
        return
    if not cpu_backend.is_enabled():
        return
    cpu_backend.disable()
    try:
        forward = parallel.jit_eval_step(lambda s, b: eval_step(s, b, loss_fn=task.loss_fn)["loss"], mesh, shardings)
        rows = cfg.train.batch_size // cfg.train.grad_accum
        forward = forward.lower(abstract_state, _abstract(first_batch, mesh, rows)).compile()
    finally:
        cpu_backend.enable()
    memory.check_fits(forward, what="the forward pass of one microbatch with plain XLA ops (the CPU kernels "
                      "would hide this memory, trading it for a step that may never finish)")


def _eval_parts(cfg: Config, task: Task) -> list[PyTree]:
    """The fixed validation set as host batches: the task's ``eval_batches`` of ``batch_size`` rows,
    each evaluated in ``grad_accum`` equal parts (the microbatch size, which fits wherever training
    fits). The rows do not depend on ``grad_accum``, so neither does the validation loss."""
    accum = cfg.train.grad_accum
    parts = []
    for full in tasks.local_eval_batches(task, cfg.train.batch_size, cfg.train.seed):
        parts += [jax.tree.map(lambda v: v[part::accum], full) for part in range(accum)]
    return parts


def setup(cfg: Config, lock: Optional[runlock.RunLock] = None) -> Run:
    """Validate the corpus, devices and batch split; build shardings; compile the steps; check that
    the compiled step fits in memory (``train.memory_check``).

    Writes nothing. Raises :class:`~jaxtrain.config.ConfigError` or
    :class:`~jaxtrain.data.DataError` (one line naming the problem) for user mistakes.
    In a multi-process run every process raises when any one fails (a data path
    missing on one host, say): the others with a :class:`ConfigError` quoting the
    failed process's error, instead of waiting for it in a collective.
    ``lock``: taken on process 0 first thing if ``run_dir`` already has a lock
    file (:class:`~jaxtrain.app.runlock.RunDirBusy` when another run holds it).
    """
    return parallel.together(_setup, cfg, lock, user_errors=(ConfigError, data.DataError))


def _setup(cfg: Config, lock: Optional[runlock.RunLock] = None) -> Run:
    _check_run_dir(cfg.run_dir)
    if lock is not None and parallel.is_main_process():
        lock.acquire(create=False)  # a live run on this run_dir: refused before compiling anything
    checkpoint.check_resume(cfg)  # an incompatible run_dir fails before any compilation
    task = tasks.load(cfg)  # before the backend: its kernel builds (cli.prepare_backend) run meanwhile
    backend = configure_backend(cfg)
    mesh = parallel.make_mesh(cfg.parallel)
    parallel.check_batch(cfg.train.batch_size, cfg.train.grad_accum, mesh)
    make_state = tasks.state_factory(task, cfg)
    abstract = jax.eval_shape(make_state)
    shardings = parallel.state_shardings(mesh, abstract)
    abstract = checkpoint.with_shardings(abstract, mesh)
    first = tasks.local_batch(task, 0, cfg.train.batch_size, cfg.train.seed)
    eval_parts = _eval_parts(cfg, task)
    train, evaluate = _compile_steps(cfg, task, mesh, abstract, shardings, first,
                                     eval_parts[0] if eval_parts else None)
    if cfg.train.memory_check:
        _check_memory(cfg, task, mesh, abstract, shardings, first, train, evaluate)
    tokens_per_example = max(int(task.tokens_per_example), 1)
    flops = None if task.flops_per_example is None else task.flops_per_example / tokens_per_example
    return Run(
        cfg=cfg, mesh=mesh, task=task, abstract_state=abstract, make_state=make_state, train_step=train,
        eval_step=evaluate, eval_batches=tuple(parallel.place_batch(b, mesh) for b in eval_parts),
        tokens_per_step=cfg.train.batch_size * tokens_per_example, flops_per_token=flops,
        peak_flops=metrics.peak_flops(jax.devices(), cfg.log.peak_flops),
        is_main=parallel.is_main_process(), backend=backend, step_memory=_memory_text(train))


def _memory_text(train) -> str:
    """The header's memory figure: the compiled step's plan and what the device has."""
    text = metrics.step_memory(train)
    return text + memory.available_text() if text else ""


def _initial_state(run: Run, mngr) -> tuple[TrainState, int, Optional[str]]:
    """``(state, first step, resume message)``: the newest good checkpoint, or a fresh state."""
    restored = checkpoint.restore_latest(mngr, run.abstract_state, run.cfg, run.task.data_fingerprint)
    if restored is not None:
        state, meta = restored
        start = int(meta["data_step"])
        return state, start, f"resuming from step {start} in '{mngr.directory}'"
    shardings = jax.tree.map(lambda x: x.sharding, run.abstract_state)
    state = jax.jit(run.make_state, out_shardings=shardings)()
    if run.task.init_params is not None:  # e.g. pretrained weights; the optimizer state starts at zero either way
        params = run.task.init_params(run.abstract_state.params)
        state = state.replace(params=jax.device_put(params, shardings.params))
    return state, 0, None


# ---------------------------------------------------------------- the loop


def train(cfg: Config) -> Summary:
    """Train ``cfg`` to ``train.steps`` (resuming from ``run_dir`` when it holds checkpoints).

    Writes ``run_dir/{config.yaml, metrics.jsonl, tb/, samples.txt, plot.png,
    checkpoints/}`` (files only on process 0; checkpoints by every process) and
    prints a progress bar and one summary line. Every process of a multi-host
    run calls this with the same config.
    """
    t0 = time.perf_counter()
    lock = runlock.RunLock(cfg.run_dir)  # one writer per run_dir; released on every way out
    try:
        run = setup(cfg, lock)
        # Before anything is written; process 0 holds it, the others learn its answer.
        parallel.together(lambda: run.is_main and lock.acquire(), user_errors=(ConfigError,))
        mngr = checkpoint.manager(cfg.run_dir, cfg.checkpoint)
        try:
            state, start, resumed = _initial_state(run, mngr)
            if run.task.warm_up is not None:  # compile the sampler now, not inside the loop
                run.task.warm_up(state)
            if run.is_main and start < cfg.train.steps:  # a finished run's files stay as they are
                run_path(cfg).mkdir(parents=True, exist_ok=True)
                (run_path(cfg) / CONFIG_FILE).write_text(to_yaml(cfg))
                if run.task.save is not None:  # the task's own files, e.g. the language model's tokenizer
                    run.task.save(run_path(cfg))
            return _loop(run, mngr, state, start, resumed, t0)
        finally:
            mngr.close()  # waits for an asynchronous save to commit
    finally:
        lock.release()


def _due(done: int, every: int, total: int) -> bool:
    """At step ``done`` (steps completed), is an every-``every`` event due? Always at the last step."""
    return done == total or (every > 0 and done % every == 0)


def _events_due(cfg: Config, done: int) -> dict[str, bool]:
    """Which of log / eval / sample / checkpoint happen after step ``done``; any of them syncs the host."""
    tc = cfg.train
    return {name: _due(done, every, tc.steps) for name, every in (
        ("log", tc.log_every), ("eval", tc.eval_every), ("sample", tc.sample_every),
        ("checkpoint", cfg.checkpoint.every))}


def _loop(run: Run, mngr, state: TrainState, start: int, resumed: Optional[str], t0: float) -> Summary:
    cfg, tc = run.cfg, run.cfg.train
    if run.is_main:
        _trim_samples(run_path(cfg) / SAMPLES_FILE, start)
    log = metrics.MetricsLog(run_path(cfg), start_step=start, total_steps=tc.steps, enabled=run.is_main,
                             log_cfg=cfg.log)
    with log:
        if start < tc.steps:
            log.config(config_lib.to_dict(cfg), to_yaml(cfg))
        state, val_loss, sample, train_s, t_loop = _train(run, mngr, log, state, start, resumed, t0)
        return _finish(run, log, state, start, val_loss, sample, train_s, time.perf_counter() - t_loop, t0)


def _train(run: Run, mngr, log: metrics.MetricsLog, state: TrainState, start: int, resumed: Optional[str],
           t0: float):
    """The steps from ``start`` to ``train.steps``:
    ``(state, last val_loss, last sample, training seconds, when the loop started)``."""
    cfg, tc = run.cfg, run.cfg.train
    pending: list[dict] = []  # per-step metrics, still on the device
    val_loss, sample = None, ""
    clock = metrics.Stopwatch()  # training time only: eval, samples and checkpoints are excluded
    batches = data.Prefetcher(run.batch, start, tc.steps, depth=cfg.data.prefetch, place=run.place)
    watch = signals.NonFiniteWatch(tc.max_nonfinite)
    window = profiler.Window(cfg.log.profile_start, cfg.log.profile_steps, run_path(cfg) / metrics.TB_DIR,
                             enabled=run.is_main)
    with batches, signals.StopSignals() as stop, window:
        _announce(run, log, resumed)
        jax.block_until_ready(state)
        t_loop = time.perf_counter()
        clock.start()
        for step, batch in batches:
            window.before(step)
            state, step_metrics = run.train_step(state, batch)
            window.after(step, state)
            pending.append(step_metrics)
            done = step + 1
            # -- after-step: nothing above or here may wait for the device.
            events = _events_due(cfg, done)
            preempt = signals.stop_agreed(stop, at_sync_point=any(events.values())) and done < tc.steps
            if preempt:  # save and leave quickly: no eval or sample
                events.update(eval=False, sample=False, checkpoint=True)
            if not any(events.values()):
                continue
            # -- at-log: the interval's one host sync.
            fetched = jax.device_get(pending)
            row = _row(run, fetched, clock.stop(), done, t0)
            pending = []
            if watch.update_all(done - len(fetched) + 1, [m["nonfinite"] for m in fetched]):
                log.write(row)  # the skipped steps stay counted in metrics.jsonl; no checkpoint
                raise _nonfinite_stop(run, state, watch, mngr)
            # -- at-eval
            if events["eval"] and run.eval_batches:
                val_loss = row["val_loss"] = evaluate(run, state)
                if run.task.val_bytes_per_token:
                    row["val_bpb"] = metrics.bits_per_byte(val_loss, run.task.val_bytes_per_token)
            # -- at-sample
            if events["sample"]:
                sample = _sample(run, state, done, log=log)
            # -- at-checkpoint
            # (not inside a streak of skipped steps: resuming there would replay it)
            if events["checkpoint"] and (preempt or watch.consecutive == 0):
                checkpoint.save(mngr, state, config=cfg, data_step=done, force=True,
                                data_fingerprint=run.task.data_fingerprint)
            log.write(row)
            if preempt:
                mngr.wait_until_finished()
                why = stop.requested or "a stop signal to another process"  # several processes stop together
                raise signals.Preempted(f"stopped by {why} after step {done}: checkpoint saved in "
                                        f"'{mngr.directory}'; run the same command again to resume")
            clock.start()
        # -- at-end
        if start >= tc.steps:  # nothing ran (already at train.steps): report where the run stands, write nothing
            val_loss, sample = evaluate(run, state), _sample(run, state, int(state.step), record=False)
        if run.task.sample is not None:
            log.echo(f"sample at step {int(state.step)}:\n{sample}")
        mngr.wait_until_finished()  # the final checkpoint commits while a SIGTERM only sets the flag
    if stop.requested and start < tc.steps:
        raise signals.Terminated(f"{stop.requested} received at the end of training: the final checkpoint "
                                 f"(step {int(state.step)}) was completed in '{mngr.directory}' first; "
                                 "nothing is lost")
    return state, val_loss, sample, clock.total, t_loop


def _nonfinite_stop(run: Run, state: TrainState, watch: signals.NonFiniteWatch, mngr) -> signals.NonFiniteError:
    """The error ending a run after ``train.max_nonfinite`` consecutive skipped steps.

    Skipped steps leave the params as they were, so ``state`` still holds what the
    first skipped step saw: recomputing that step's gradient names the culprit.
    """
    first = watch.first_step  # steps completed after it; its batch index is first - 1
    why = signals.diagnose_nonfinite(state, run.place(run.batch(first - 1)), first - 1,
                                     loss_fn=run.task.loss_fn, grad_accum=run.cfg.train.grad_accum)
    last = mngr.latest_step()
    return signals.NonFiniteError(
        f"stopped after {watch.consecutive} consecutive non-finite steps (train.max_nonfinite="
        f"{watch.limit}), the first at step {first}: {why}; their updates were skipped and not "
        f"checkpointed (last checkpoint: {'none' if last is None else f'step {last}'})")


def _announce(run: Run, log: metrics.MetricsLog, resumed: Optional[str]) -> None:
    cfg = run.cfg
    n_params = sum(x.size for x in jax.tree.leaves(run.abstract_state.params))
    what = run.task.describe or f"task {run.task.name}: {n_params / 1e6:.2f}M params"
    log.echo(f"run_dir {cfg.run_dir} | {what} | "
             f"mesh data={run.mesh.shape[parallel.DATA]} fsdp={run.mesh.shape[parallel.FSDP]} "
             f"on {jax.device_count()} {jax.devices()[0].platform} devices"
             + (f" | matmuls {run.backend}" if run.backend else "")
             + (f" | {run.step_memory}" if run.step_memory else ""))
    if resumed:
        log.echo(resumed)


def _flat_scalars(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat_scalars(v, f"{prefix}{k}/"))
        elif np.ndim(v) == 0:
            out[f"{prefix}{k}"] = v.item() if hasattr(v, "item") else v
    return out


def _row(run: Run, fetched: list[dict], seconds: float, done: int, t0: float) -> dict[str, Any]:
    """One metrics row: the last step's values, ``nonfinite`` summed over the interval, throughput."""
    row = {"step": done, **_flat_scalars(fetched[-1])}
    row["nonfinite"] = int(sum(int(m["nonfinite"]) for m in fetched))
    row.pop("clipped", None)  # one step's flag; the interval's fraction is clip_frac
    row.update(diagnostics.interval_stats(fetched))
    tps = len(fetched) * run.tokens_per_step / max(seconds, 1e-9)
    row["tokens_per_s"] = tps
    mfu = metrics.mfu(tps, run.flops_per_token, run.peak_flops) if run.flops_per_token else None
    if mfu is not None:
        row["mfu"] = mfu
    peak = metrics.peak_memory_gb()
    if peak is not None:
        row["peak_mem_gb"] = peak
    row["elapsed"] = time.perf_counter() - t0
    return row


def evaluate(run: Run, state: TrainState) -> Optional[float]:
    """Mean loss over the fixed validation batches (all dispatched, then one fetch); None without any."""
    if not run.eval_batches:
        return None
    losses = [run.eval_step(state, b) for b in run.eval_batches]
    return float(np.mean(jax.device_get(losses)))


_SAMPLE_HEADER = re.compile(r"^===== step (\d+) =====$", re.M)


def _trim_samples(path: Path, start: int) -> None:
    """Drop the samples after step ``start`` that an interrupted run left, as ``metrics.jsonl`` is cut back."""
    if not path.exists():
        return
    text = path.read_text()
    heads = list(_SAMPLE_HEADER.finditer(text))
    cut = next((h.start() for h in heads if int(h.group(1)) > start), None)
    if cut is None:
        return
    tmp = path.with_name(path.name + ".tmp")  # a kill at this moment keeps the old file
    tmp.write_text(text[:cut])
    os.replace(tmp, path)


def _sample(run: Run, state: TrainState, step: int, record: bool = True, log=None) -> str:
    """Generate the configured sample (every process: params may be sharded); process 0 appends it to
    ``samples.txt`` and hands it to the trackers if ``record``."""
    if run.task.sample is None:
        return ""
    text = run.task.sample(state, step)
    if run.is_main and record:
        with open(run_path(run.cfg) / SAMPLES_FILE, "a") as f:
            f.write(f"===== step {step} =====\n{text}\n\n")
        if log is not None:
            log.text(step, "sample", text)
    return text


def _finish(run: Run, log, state: TrainState, start: int, val_loss: Optional[float], sample: str,
            train_s: float, loop_s: float, t0: float) -> Summary:
    """Plot, hand the summary to the trackers, print the summary line, return the :class:`Summary`."""
    steps = int(state.step)
    tps = (steps - start) * run.tokens_per_step / train_s if train_s > 0 else 0.0
    summary = Summary(steps=steps, val_loss=val_loss, baseline=run.baseline, tokens_per_s=tps,
                      mfu=metrics.mfu(tps, run.flops_per_token, run.peak_flops) if run.flops_per_token else None,
                      train_s=train_s,
                      loop_s=loop_s, wall_s=time.perf_counter() - t0, sample=sample,
                      val_bpb=metrics.bits_per_byte(val_loss, run.task.val_bytes_per_token))
    if run.is_main:
        log.summary({k: v for k, v in dataclasses.asdict(summary).items() if k != "sample" and v is not None})
        if run.cfg.log.plot:
            rows = metrics.read_jsonl(run_path(run.cfg) / metrics.METRICS_FILE)
            plot.plot(rows, run_path(run.cfg) / plot.PLOT_FILE, baseline=run.baseline)
        print(metrics.summary_line(steps=steps, val_loss=summary.val_loss, baseline=summary.baseline,
                                   tokens_per_s=summary.tokens_per_s, mfu_=summary.mfu,
                                   train_s=summary.train_s, wall_s=summary.wall_s, unit=run.task.unit,
                                   val_bpb=summary.val_bpb), flush=True)
    return summary
