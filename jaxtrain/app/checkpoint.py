"""Orbax checkpoints of a :class:`TrainState`: save, restore onto today's devices, fall back past damage.

A run directory keeps its checkpoints in ``run_dir/checkpoints/<step>/`` with two
items: ``state`` (the TrainState leaves ``step, params, opt_state, rng,
model_state``, written by ``StandardSave``) and ``meta`` (JSON: the resolved
config, the data position, the jaxtrain version, the corpus fingerprint, a
checksum of every array and a digest of the metadata itself,
:mod:`jaxtrain.app.integrity`). The state's static parts (``graphdef``, ``tx``)
are not saved; they are rebuilt from the config. A restored step is verified
against its checksums; a mismatch is damage (see :func:`restore_latest`).

Saves are asynchronous (training continues while the files are written) and
atomic: Orbax writes ``<step>.orbax-checkpoint-tmp*`` and renames it on commit, so
a run killed mid-save leaves a tmp directory that is never read.

Typical use (what the run loop does)::

    mngr = manager(cfg.run_dir, cfg.checkpoint)
    restored = restore_latest(mngr, abstract_state, cfg)   # None: start fresh
    if restored is not None:
        state, meta = restored                            # meta["data_step"]: next batch
    ...
    save(mngr, state, config=cfg, data_step=int(state.step))
    mngr.wait_until_finished()

Resume rule (``checkpoint.resume``):

- ``true`` (default): continue from the newest readable step in
  ``run_dir/checkpoints``; start fresh when there is none. A saved config whose
  architecture keys (:data:`ARCH_KEYS`) differ from the current one is refused
  with a :class:`ConfigError` naming each key and both values.
- ``false``: start fresh, but only when ``run_dir/checkpoints`` holds no
  committed step; otherwise a :class:`ConfigError` (nothing is overwritten or
  deleted: pick a new ``run_dir`` or remove the old checkpoints yourself).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jaxtrain.app import config as config_lib
from jaxtrain.app import integrity
from jaxtrain.app.config import CheckpointConfig, Config, ConfigError
from jaxtrain.app.preempt import RunStopped, path_str
from jaxtrain.state import TrainState

PyTree = Any
log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"  # under run_dir
DAMAGED_DIR = "checkpoints-damaged"  # under run_dir: unreadable steps moved aside after a fallback
LEAVES = ("step", "params", "opt_state", "rng", "model_state")  # the TrainState fields saved
# Config keys that fix the shapes or the meaning of the saved params and optimizer
# state: a resumed run must agree on them. Other keys (train.steps, optim.lr,
# model.dtype, model.dropout, ...) may change between runs. No optim key changes
# the optax state's structure today; a structural mismatch from anything else
# (e.g. a custom model) is still caught by comparing the saved tree (_check_tree).
ARCH_KEYS = ("task", "model.arch", "model.vocab_size", "model.block_size", "model.n_layer", "model.n_head",
             "model.n_kv_head", "model.n_embd", "model.head_dim", "model.mlp_hidden", "model.bias",
             "model.tie_embeddings")


class CheckpointError(RunStopped):
    """No readable checkpoint where one was expected; the message names the directory."""

    exit_code = 1


# ---------------------------------------------------------------- manager and save


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir).expanduser().absolute() / CHECKPOINT_DIR


class _Manager(ocp.CheckpointManager):
    """Orbax's manager, with a failed background write reported as one :class:`CheckpointError` line.

    An asynchronous save that fails (a full disk, a lost mount) surfaces at the
    next ``save``, ``wait_until_finished`` or ``close``.
    """

    def wait_until_finished(self):
        with _write_errors(self):
            super().wait_until_finished()


@contextlib.contextmanager
def _write_errors(mngr: ocp.CheckpointManager):
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the writer hit, say it in one line
        raise CheckpointError(f"writing a checkpoint under '{mngr.directory}' failed ({_brief(e)}); "
                              "training stopped; the unfinished step is ignored when the run resumes") from e


class _KeepVerified:
    """Orbax preservation policy: the newest ``keep`` steps, every ``keep_every``-th, and the step the
    run resumed from (read back and verified), which stays until the run ends, so a newer step that
    turns out damaged never costs the last good one."""

    def __init__(self, keep: Optional[int], keep_every: Optional[int]):
        self.keep, self.keep_every = keep, keep_every
        self.verified: Optional[int] = None

    def should_preserve(self, checkpoints, *, context=None) -> list[bool]:
        steps = [c.step for c in checkpoints]
        newest = set(sorted(steps)[-self.keep:]) if self.keep else set(steps)
        return [s in newest or s == self.verified or bool(self.keep_every and s % self.keep_every == 0)
                for s in steps]


def manager(run_dir: str | Path, cfg: CheckpointConfig, *, create: bool = True) -> ocp.CheckpointManager:
    """An Orbax ``CheckpointManager`` rooted at ``run_dir/checkpoints``.

    Keeps the newest ``cfg.keep`` steps, plus every step divisible by
    ``cfg.keep_every`` when set, plus the step :func:`restore_latest` verified
    (until the manager closes); saves in the background when ``cfg.async_save``.
    The caller decides when to save (no save interval here) and must call
    ``mngr.wait_until_finished()`` (or ``mngr.close()``) before exiting.
    Creating a manager writes nothing; ``create=False`` leaves a missing
    directory missing (for readers).
    """
    options = ocp.CheckpointManagerOptions(
        preservation_policy=_KeepVerified(cfg.keep, cfg.keep_every),
        enable_async_checkpointing=cfg.async_save,
        create=create,
    )
    # Handlers named up front, so a fresh process can read a step's metadata before any restore.
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    return _Manager(checkpoint_dir(run_dir), item_handlers=handlers, options=options)


def leaves(state: TrainState) -> dict[str, PyTree]:
    """The saved part of ``state``: ``{"step", "params", "opt_state", "rng", "model_state"}``."""
    return {name: getattr(state, name) for name in LEAVES}


@jax.jit
def _all_finite(tree: PyTree) -> jax.Array:
    floats = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in floats])) if floats else jnp.bool_(True)


def metadata(config: Config, data_step: int, checksums: Optional[dict[str, str]] = None,
             data_fingerprint: Optional[str] = None) -> dict[str, Any]:
    """The JSON saved next to the state: resolved config, data position, versions, the corpus
    fingerprint, the arrays' checksums, and a digest of all that (``integrity.digest``)."""
    import jaxtrain

    meta = {"config": config_lib.to_dict(config), "data_step": int(data_step),
            "jaxtrain_version": jaxtrain.__version__, "saved_at": time.time(),
            "data_fingerprint": data_fingerprint, "checksums": checksums}
    meta[integrity.DIGEST_KEY] = integrity.digest(meta)
    return meta


def save(mngr: ocp.CheckpointManager, state: TrainState, *, config: Config, data_step: int,
         force: bool = False, data_fingerprint: Optional[str] = None) -> bool:
    """Start saving ``state`` as step ``int(state.step)``; True when a save was started.

    Blocks only while the arrays are copied off the devices (the files are written
    in the background when the manager is asynchronous), so the caller may donate
    ``state`` to the next step right after. Refuses (warns, returns False) to write
    non-finite params or optimizer state, and skips a step that already exists.

    Args:
      mngr: from :func:`manager`.
      state: the TrainState to save (any sharding; every process calls this).
      config: the run's resolved config, stored as JSON.
      data_step: the step whose batch comes next (the data position).
      force: passed to Orbax (save even when its own policy would skip the step).
      data_fingerprint: the task's corpus fingerprint (``Task.data_fingerprint``),
        checked when the run resumes.
    """
    step = int(state.step)
    if step in mngr.all_steps():
        return False
    if not bool(_all_finite((state.params, state.opt_state))):
        log.warning("not saving checkpoint at step %d: params or optimizer state hold NaN/Inf", step)
        return False
    saved = leaves(state)
    meta = metadata(config, data_step, integrity.array_checksums(saved), data_fingerprint)
    args = ocp.args.Composite(state=ocp.args.StandardSave(saved), meta=ocp.args.JsonSave(meta))
    with _write_errors(mngr):
        return bool(mngr.save(step, args=args, force=force))


# ---------------------------------------------------------------- restore


def _read_meta(mngr: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise ValueError("metadata has no 'config' mapping")
    integrity.check_digest(meta)
    data_step = meta.get("data_step")
    if not isinstance(data_step, int) or isinstance(data_step, bool) or data_step < 0:
        raise ValueError(f"metadata's 'data_step' is {data_step!r}, not a step number")
    return meta


def config_diff(saved: dict, config: Config, keys=ARCH_KEYS) -> list[tuple[str, Any, Any]]:
    """``[(key, saved_value, current_value)]`` for each of ``keys`` that differs."""
    current = config_lib.to_dict(config)
    out = []
    for key in keys:
        a, b = _lookup(saved, key), _lookup(current, key)
        if key == "task" and a == "<missing>":  # saved before tasks existed: the built-in GPT
            a = "lm"
        if key == "model.arch" and a == "<missing>":  # saved before model.arch existed
            a = "gpt"
        if key in _NULL_MEANS and a == "<missing>":  # saved before the key existed: its null default
            a = None
        if key in _NULL_MEANS:
            a, b = _NULL_MEANS[key](saved, a), _NULL_MEANS[key](current, b)
        if a != b:
            out.append((key, a, b))
    return out


# Keys whose null means a value that depends on the architecture: compared by that value, so a
# checkpoint saved with ``model.bias: true`` (before null meant true) resumes under ``null``.
_NULL_MEANS = {
    "model.bias": lambda d, v: (_lookup(d, "model.arch") in ("gpt", "<missing>")) if v is None else v,
    "model.n_kv_head": lambda d, v: _lookup(d, "model.n_head") if v is None and _lookup(d, "model.arch") == "llama"
    else v,
    "model.head_dim": lambda d, v: v,
    "model.mlp_hidden": lambda d, v: v,
}


def _lookup(d: dict, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return "<missing>"
        d = d[part]
    return d


def check_compatible(saved_config: dict, config: Config, where: str) -> None:
    """Raise :class:`ConfigError` when the saved config's architecture differs from ``config``."""
    diff = config_diff(saved_config, config)
    if diff:
        changes = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, a, b in diff)
        raise ConfigError(f"checkpoint {where} was trained with a different model ({changes}); "
                          "pass a new run_dir to start a new run, or set the saved values to resume")


def _check_tree(mngr: ocp.CheckpointManager, step: int, target: dict, where: str) -> None:
    """Raise :class:`ConfigError` when the saved arrays' paths or shapes differ from ``target``."""
    saved = mngr.item_metadata(step)["state"]
    saved = getattr(saved, "tree", saved)
    flat_saved = {path_str(p): tuple(x.shape)
                  for p, x in jax.tree_util.tree_flatten_with_path(saved)[0] if hasattr(x, "shape")}
    if not flat_saved:  # the tree metadata itself is gone: damage, not a different model
        raise FileNotFoundError(f"no array metadata in '{mngr.directory}/{step}/state'")
    flat_target = {path_str(p): tuple(x.shape)
                   for p, x in jax.tree_util.tree_flatten_with_path(_key_data_shapes(target))[0]}
    for path in sorted(set(flat_saved) | set(flat_target)):
        a, b = flat_saved.get(path, "absent"), flat_target.get(path, "absent")
        if a != b:
            raise ConfigError(f"checkpoint {where} does not match the current model/optimizer: "
                              f"{path} saved {a}, now {b}; pass a new run_dir to start a new run")


def _key_data_shapes(tree: PyTree) -> PyTree:
    """Typed PRNG keys are stored as their uint32 key data: compare those shapes."""
    def shape(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.ShapeDtypeStruct(jax.eval_shape(jax.random.key_data, x).shape, jnp.uint32)
        return x
    return jax.tree.map(shape, tree)


def _restore_step(mngr: ocp.CheckpointManager, step: int, abstract_state: TrainState) -> TrainState:
    """The saved state exactly, onto ``abstract_state``'s shardings, with its ``graphdef`` and ``tx``.

    Only the learning rate is optimizer state (:func:`jaxtrain.make_optimizer`);
    the other hyper-parameters come with ``tx``, so a changed ``optim`` section
    takes effect on resume without touching the restored arrays.
    """
    target = leaves(abstract_state)
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state
    return abstract_state.replace(**{name: restored[name] for name in LEAVES})


def _refuse_fresh_start(mngr: ocp.CheckpointManager, steps: list[int]) -> ConfigError:
    return ConfigError(f"checkpoint.resume=false but '{mngr.directory}' already holds checkpoints "
                       f"(steps {', '.join(map(str, sorted(steps)))}); nothing is overwritten: pass a new "
                       "run_dir, or remove that directory to start over, or set checkpoint.resume=true")


def check_resume(config: Config) -> None:
    """Apply the resume rule to ``config.run_dir`` before anything is compiled or written.

    Raises the :class:`ConfigError` that :func:`restore_latest` would raise later
    (``checkpoint.resume=false`` with existing checkpoints; an architecture change
    against the newest checkpoint whose metadata reads), so a mistake costs no
    compilation. Damaged steps are left for :func:`restore_latest` to report.
    """
    if not checkpoint_dir(config.run_dir).is_dir():
        return
    mngr = manager(config.run_dir, config.checkpoint, create=False)
    try:
        steps = sorted(mngr.all_steps(), reverse=True)
        if steps and not config.checkpoint.resume:
            raise _refuse_fresh_start(mngr, steps)
        for step in steps:
            try:
                meta = _read_meta(mngr, step)
            except Exception:  # noqa: BLE001 - damage: restore_latest warns and falls back
                continue
            check_compatible(meta["config"], config, f"step {step} in '{mngr.directory}'")
            return
    finally:
        mngr.close()


def restore_latest(mngr: ocp.CheckpointManager, abstract_state: TrainState, config: Config,
                   data_fingerprint: Optional[str] = None) -> Optional[tuple[TrainState, dict]]:
    """Restore the newest readable checkpoint into ``abstract_state``'s shapes and shardings.

    Args:
      mngr: from :func:`manager`.
      abstract_state: ``jax.eval_shape`` of the state the run would start from,
        its leaves carrying the target shardings (any device count: a run saved
        on 8 devices restores onto 1 or 4). Its ``graphdef`` and ``tx`` are kept.
      config: the current resolved config.
      data_fingerprint: the current corpus's fingerprint (``Task.data_fingerprint``);
        None skips the corpus check.
    Returns:
      ``(state, meta)`` with ``meta`` the saved JSON (``config``, ``data_step``,
      ``jaxtrain_version``), or None when there is no checkpoint (start fresh).
    Raises:
      ConfigError: ``checkpoint.resume=false`` with existing checkpoints, the
        saved run's architecture differs from ``config`` (keys and values named),
        or it was trained on another corpus (unless ``checkpoint.allow_data_change``).
      CheckpointError: checkpoints exist but none can be read (nothing deleted).

    A damaged step (truncated or missing files, or arrays / metadata that fail
    their checksums) is skipped with a warning naming it and the reason, and
    moved to ``run_dir/checkpoints-damaged/`` once an older step restored (so the
    resumed run can save that step again); half-written
    ``*.orbax-checkpoint-tmp*`` directories are never considered. The step that
    restored is kept by the manager's retention until it closes, however many
    newer steps are saved.
    """
    steps = sorted(mngr.all_steps(), reverse=True)
    if not steps:
        return None
    if not config.checkpoint.resume:
        raise _refuse_fresh_start(mngr, steps)
    damaged: list[int] = []
    first_error = None
    for step in steps:
        try:
            state, meta = _restore_checked(mngr, step, abstract_state, config)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - any other failure to read means damage
            first_error = first_error or e
            damaged.append(step)
            _warn_damaged(step, mngr, e)
            continue
        _move_aside(mngr, damaged)
        _check_data(meta, data_fingerprint, config, f"step {step} in '{mngr.directory}'")
        policy = getattr(mngr, "_preservation_policy", None)
        if isinstance(policy, _KeepVerified):
            policy.verified = step
        return state, meta
    raise CheckpointError(f"no readable checkpoint in '{mngr.directory}' (steps {', '.join(map(str, steps))} "
                          f"all failed; newest: {_one_line(first_error)}); nothing was deleted")


def _restore_checked(mngr: ocp.CheckpointManager, step: int, abstract_state: TrainState,
                     config: Config) -> tuple[TrainState, dict]:
    """``(state, meta)`` of one step after the config and tree checks.

    Raises :class:`ConfigError` when the step belongs to a different model; any
    other exception means the step is damaged.
    """
    where = f"step {step} in '{mngr.directory}'"
    meta = _read_meta(mngr, step)
    check_compatible(meta["config"], config, where)
    _check_tree(mngr, step, leaves(abstract_state), where)
    state = _restore_step(mngr, step, abstract_state)
    if isinstance(meta.get("checksums"), dict):
        integrity.verify(leaves(state), meta["checksums"])
    else:
        log.warning("checkpoint %s has no checksums (saved by an older jaxtrain): restored unverified", where)
    return state, meta


def _check_data(meta: dict, fingerprint: Optional[str], config: Config, where: str) -> None:
    """Refuse (``ConfigError``) a resume on another corpus than the one ``meta`` was trained on."""
    saved = meta.get("data_fingerprint")
    if fingerprint is None or saved == fingerprint:
        return
    if saved is None:
        log.warning("checkpoint %s records no corpus fingerprint (saved by an older jaxtrain): the corpus "
                    "cannot be compared", where)
    elif config.checkpoint.allow_data_change:
        log.warning("checkpoint %s was trained on corpus %s, the run now reads %s: continuing "
                    "(checkpoint.allow_data_change=true)", where, saved, fingerprint)
    else:
        raise ConfigError(f"checkpoint {where} was trained on another corpus (fingerprint {saved}, now "
                          f"{fingerprint}); resume on the same data, pass a new run_dir, or set "
                          "checkpoint.allow_data_change=true to continue on this one")


def _one_line(e: Optional[BaseException]) -> str:
    """The exception's type and first line. Orbax wraps TensorStore's read errors in an exception
    whose text ends in a pybind11 repr of the array's spec; the reason is its cause, said instead."""
    if e is None:
        return "-"
    for _ in range(4):
        text = str(e).strip()
        wrapped = not text or text.startswith("<") or "See full TensorStore details" in text
        if not (wrapped and e.__cause__ is not None):
            break
        e = e.__cause__
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:300] if msg else ''}"


# What the operating system said, wherever it sits in a long storage error.
_OS_CAUSES = ("No space left on device", "Disk quota exceeded", "File too large", "Read-only file system",
              "Permission denied", "Input/output error", "Stale file handle")


def _brief(e: BaseException, keep: int = 160) -> str:
    """An exception on one line, its middle elided (storage errors put the cause last), led by the
    operating system's reason when the text names one (TensorStore puts it in the middle)."""
    msg = " ".join(str(e).split())
    cause = next((c for c in _OS_CAUSES if c in msg), None)
    if len(msg) > 2 * keep:
        msg = f"{msg[:keep]} ... {msg[-keep:]}"
    return f"{cause + ': ' if cause else ''}{type(e).__name__}: {msg}"


def _warn_damaged(step: int, mngr: ocp.CheckpointManager, e: BaseException) -> None:
    log.warning("checkpoint step %d in '%s' is damaged (%s); falling back to an older step",
                step, mngr.directory, _one_line(e))


def _move_aside(mngr: ocp.CheckpointManager, steps: list[int]) -> None:
    """Move damaged step directories out of the way (never delete them)."""
    if not steps or jax.process_index() != 0:
        return
    root = Path(mngr.directory)
    dest = root.parent / DAMAGED_DIR
    dest.mkdir(exist_ok=True)
    for step in steps:
        src = root / str(step)
        if src.exists():
            target = dest / f"{step}-{int(time.time())}"
            shutil.move(str(src), str(target))
            log.warning("moved damaged checkpoint step %d to '%s'", step, target)
    mngr.reload()


# ---------------------------------------------------------------- research code


def build_state(config: Config) -> TrainState:
    """A fresh :class:`TrainState` of ``config``'s task (what a run starts from)."""
    from jaxtrain.app import tasks

    return tasks.state_factory(tasks.load(config, with_data=False), config)()


def with_shardings(abstract_state: TrainState, mesh=None) -> TrainState:
    """``abstract_state`` with every leaf's target sharding set.

    With a mesh: :func:`jaxtrain.parallel.state_shardings`; without: the first
    local device.
    """
    if mesh is None:
        device = jax.local_devices()[0]
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(device), abstract_state)
    else:
        from jaxtrain.parallel import state_shardings

        shardings = state_shardings(mesh, abstract_state)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings)


def load_run(run_dir: str | Path, mesh=None, step: Optional[int] = None) -> tuple[TrainState, Config]:
    """Load a run directory's checkpoint into a :class:`TrainState` of its task plus its config.

    Args:
      run_dir: a directory written by ``python -m jaxtrain.run``.
      mesh: restore sharded onto this mesh (:func:`jaxtrain.parallel.make_mesh`);
        None puts everything on the first local device.
      step: a specific step; None = the newest readable one.
    Example::

        state, cfg = load_run("runs/default")
        logits = state.model()(tokens_BT)
    """
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        raise CheckpointError(f"'{root}' does not exist: no checkpoints in run_dir '{run_dir}'")
    mngr = manager(run_dir, CheckpointConfig(async_save=False), create=False)
    try:
        steps = sorted(mngr.all_steps(), reverse=True)
        if step is not None:
            if step not in steps:
                raise CheckpointError(f"no step {step} in '{root}'; available: {', '.join(map(str, sorted(steps)))}")
            steps = [step]
        if not steps:
            raise CheckpointError(f"no checkpoints in '{root}'")
        for s in steps:
            try:
                meta = _read_meta(mngr, s)
                config = config_lib.from_dict(meta["config"])
                abstract = with_shardings(jax.eval_shape(lambda: build_state(config)), mesh)
                return _restore_step(mngr, s, abstract), config
            except ConfigError:
                raise
            except Exception as e:  # noqa: BLE001
                if len(steps) == 1:
                    raise CheckpointError(f"checkpoint step {s} in '{root}' is unreadable ({_one_line(e)})") from None
                _warn_damaged(s, mngr, e)
        raise CheckpointError(f"no readable checkpoint in '{root}' (steps {', '.join(map(str, steps))})")
    finally:
        mngr.close()
