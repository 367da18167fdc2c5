"""What the run loop trains: a :class:`Task` — a model factory, a loss and a batch function.

The loop knows nothing else about the model or the data. The built-in GPT
language model is one task (:func:`jaxtrain.app.lm.language_model`, ``task=lm``); a user's own
module is another (``task=my_module``, ``task=my_module:attr`` or
``task=path/to/file.py``). Such a module defines, at top level::

    def model(rngs: nnx.Rngs) -> nnx.Module: ...
    def loss(model, batch, rng): ...                   # scalar loss, or (loss, {"name": scalar})
    def batch(step: int, batch_size: int, seed: int):  # a dict of NumPy arrays, leading axis batch_size
        ...
    # optional
    def eval_batches(batch_size: int, seed: int): ...  # a list of batches: the fixed validation set
    flops_per_example = 6 * 4_000                      # training FLOPs per example, for MFU

or one attribute that is a :class:`Task` (or a function of the run's config
returning one), named after the colon. ``batch`` must be pure in its
arguments: the batch for step ``t`` is then the same in a resumed run as in an
uninterrupted one, which is what makes resume exact.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from flax import nnx

from jaxtrain.app.config import Config, ConfigError
from jaxtrain.losses import LossFn, lm_loss
from jaxtrain.optim import make_optimizer
from jaxtrain.state import TrainState

PyTree = Any

__all__ = ["Task", "load", "from_module", "state_factory", "host_batch"]


@dataclasses.dataclass(frozen=True)
class Task:
    """A model factory, a loss and a batch function, plus what the run reports about them.

    Fields:
      name: shown in the run's header line.
      model: ``model(rngs) -> nnx.Module``; ``rngs`` holds the run's parameter key
        (``rngs.params()``, also the default stream).
      loss_fn: ``loss_fn(model, batch, rng) -> loss or (loss, aux)``, as for
        :func:`jaxtrain.train_step`.
      batch: ``batch(step, batch_size, seed) -> pytree`` of host arrays with a
        leading axis of ``batch_size`` rows (the global batch of every process);
        pure in its arguments.
      eval_batches: ``eval_batches(batch_size, seed) -> [batch, ...]``: the fixed
        validation set (its mean loss is ``val_loss``); None: no validation.
      local_batch: ``local_batch(step, batch_size, seed, process_index, process_count)``
        -> this process's contiguous block of ``batch``'s rows; None slices ``batch``.
      local_eval_batches: the same for ``eval_batches``.
      sample: ``sample(state, step) -> str``, a text sample from the model; None: none.
      warm_up: ``warm_up(state)`` compiles what ``sample`` will run, before the loop.
      flops_per_example: training FLOPs (forward + backward) per example, for MFU.
      tokens_per_example: what one example counts in ``tokens_per_s`` (a language
        model's block size; 1 for other tasks, whose rate is then examples per second).
      unit: what ``tokens_per_s`` counts, for the summary line: ``"token"`` or ``"example"``.
      baseline: a reference loss drawn in the plot (the unigram entropy of a corpus).
      describe: the header's words about the model and data (default: the name and parameter count).
      init_params: ``init_params(abstract_params) -> params``: host arrays that replace the
        freshly initialised parameters when a run starts (not when it resumes), e.g.
        pretrained weights; ``abstract_params`` is the params tree of ``jax.ShapeDtypeStruct``.
      val_bytes_per_token: mean text bytes per target token of the validation set; with it the run
        reports ``val_bpb = val_loss / val_bytes_per_token / ln 2`` (bits per byte). None: no val_bpb.
      data_fingerprint: identifies the training data (e.g. its size and a hash of the token
        stream); saved with each checkpoint, and a resume on data with another fingerprint is
        refused (``checkpoint.allow_data_change``). None: not checked.
      save: ``save(run_dir)`` writes the task's own files into the run directory before the first
        step (the language model: its tokenizer, which ``jaxtrain generate`` reads back).
    """

    name: str
    model: Callable[[nnx.Rngs], nnx.Module]
    loss_fn: LossFn
    batch: Callable[[int, int, int], PyTree]
    eval_batches: Optional[Callable[[int, int], Sequence[PyTree]]] = None
    local_batch: Optional[Callable[..., PyTree]] = None
    local_eval_batches: Optional[Callable[..., Sequence[PyTree]]] = None
    sample: Optional[Callable[[TrainState, int], str]] = None
    warm_up: Optional[Callable[[TrainState], None]] = None
    flops_per_example: Optional[float] = None
    tokens_per_example: int = 1
    unit: str = "example"
    baseline: Optional[float] = None
    describe: str = ""
    init_params: Optional[Callable[[PyTree], PyTree]] = None
    val_bytes_per_token: Optional[float] = None
    data_fingerprint: Optional[str] = None
    save: Optional[Callable[[Path], None]] = None


def load(cfg: Config, *, with_data: bool = True) -> Task:
    """The task ``cfg.task`` names: ``lm`` (the built-in GPT) or a user's module.

    ``with_data=False`` builds only what restoring and sampling a checkpoint
    needs (the model and the loss), without reading a corpus.
    Raises :class:`ConfigError` naming ``task`` when the module cannot be found
    or lacks what a task needs.
    """
    if cfg.task == "lm":
        from jaxtrain.app import lm  # the language-model task: corpus, tokenizer, sampler

        return lm.language_model(cfg, with_data=with_data)
    return from_module(cfg.task, cfg)


_REQUIRED = ("model", "loss", "batch")


def _import(spec: str) -> ModuleType:
    """The module ``spec`` names: a dotted module on ``sys.path`` (the current directory first) or a .py path."""
    if spec.endswith(".py") or "/" in spec or "\\" in spec:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ConfigError(f"task='{spec}': no such file; give a Python file or a module name on the path")
        name = f"jaxtrain_task_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # dataclasses and pickling look classes up by module name
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 - the user's code: say where, keep the cause
            sys.modules.pop(name, None)
            raise ConfigError(f"task='{spec}': importing it failed: {type(e).__name__}: {e}") from e
        return module
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # `python -m` puts the current directory first; a console script does not
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as e:
        if e.name and spec.startswith(e.name):
            raise ConfigError(f"task='{spec}': no module named '{e.name}' on the Python path (the current "
                              "directory and PYTHONPATH); use task=lm for the built-in GPT, a module name, "
                              "module:attribute, or a path to a .py file") from None
        raise ConfigError(f"task='{spec}': importing it failed: {e}") from e
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"task='{spec}': importing it failed: {type(e).__name__}: {e}") from e


def from_module(spec: str, cfg: Config) -> Task:
    """A :class:`Task` from ``module``, ``module:attr`` or ``file.py`` (see the module docstring)."""
    target, _, attr = spec.partition(":") if not Path(spec).is_file() else (spec, "", "")
    module = _import(target)
    if attr:
        obj = getattr(module, attr, None)
        if obj is None:
            raise ConfigError(f"task='{spec}': module '{target}' has no attribute '{attr}'")
        if callable(obj) and not isinstance(obj, Task):
            obj = obj(cfg) if _takes_argument(obj) else obj()
        if not isinstance(obj, Task):
            raise ConfigError(f"task='{spec}': '{attr}' is a {type(obj).__name__}, not a jaxtrain.app.tasks.Task "
                              "(or a function returning one)")
        return obj
    if isinstance(getattr(module, "task", None), Task):
        return module.task
    missing = [n for n in _REQUIRED if not callable(getattr(module, n, None))]
    if missing:
        raise ConfigError(f"task='{spec}': module '{module.__name__}' must define model(rngs), "
                          f"loss(model, batch, rng) and batch(step, batch_size, seed); missing: {', '.join(missing)}")
    flops = getattr(module, "flops_per_example", None)
    if callable(flops):
        flops = flops()
    return Task(name=Path(target).stem if target.endswith(".py") else target, model=module.model,
                loss_fn=module.loss, batch=module.batch, eval_batches=getattr(module, "eval_batches", None),
                flops_per_example=None if flops is None else float(flops))


def _takes_argument(fn: Callable) -> bool:
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return False
    return len(params) >= 1


def state_factory(task: Task, cfg: Config) -> Callable[[], TrainState]:
    """A function building the run's initial :class:`TrainState` (call it under ``jax.jit``).

    The optimizer is built once, outside, so every state it makes (abstract or
    real) has the same static ``tx`` and thus the same pytree structure. The
    model's parameters come from ``train.seed``'s first key, the state's
    per-step randomness from its second.
    """
    tx = make_optimizer(cfg.optim, cfg.train.steps)

    def make_state() -> TrainState:
        k_params, k_train = jax.random.split(jax.random.key(cfg.train.seed))
        model = task.model(nnx.Rngs(k_params, params=k_params))
        if not isinstance(model, nnx.Module):
            raise ConfigError(f"task '{task.name}': model(rngs) returned a {type(model).__name__}, "
                              "not a flax.nnx.Module")
        return TrainState.create(model, tx, rng=k_train)

    return make_state


def host_batch(batch: PyTree, rows: int, where: str) -> PyTree:
    """``batch`` as NumPy arrays in JAX's dtypes (float64 -> float32 unless x64 is on), checked to
    have ``rows`` rows; ``where`` names the function that made it in the error."""
    def convert(path, x):
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[0] != rows:
            raise ConfigError(f"{where} returned leaf {jax.tree_util.keystr(path) or 'batch'} of shape {x.shape}; "
                              f"every leaf needs a leading batch axis of {rows} rows")
        if x.dtype == object or not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
            raise ConfigError(f"{where} returned leaf {jax.tree_util.keystr(path) or 'batch'} of dtype "
                              f"{x.dtype}; batches hold numeric arrays")
        return x.astype(jax.dtypes.canonicalize_dtype(x.dtype), copy=False)

    try:
        leaves = jax.tree_util.tree_map_with_path(convert, batch)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - not a pytree of arrays
        raise ConfigError(f"{where} returned {type(batch).__name__}, not a pytree of arrays: {e}") from None
    if not jax.tree.leaves(leaves):
        raise ConfigError(f"{where} returned a batch without arrays")
    return leaves


def local_batch(task: Task, step: int, batch_size: int, seed: int) -> PyTree:
    """This process's rows of the training batch for ``step`` (host NumPy)."""
    p, n = jax.process_index(), jax.process_count()
    if task.local_batch is not None:
        return task.local_batch(step, batch_size, seed, p, n)
    full = host_batch(task.batch(step, batch_size, seed), batch_size, f"task '{task.name}' batch({step}, "
                      f"{batch_size}, {seed})")
    rows = batch_size // n
    return jax.tree.map(lambda x: x[p * rows:(p + 1) * rows], full)


def local_eval_batches(task: Task, batch_size: int, seed: int) -> list[PyTree]:
    """This process's rows of each fixed validation batch ([] when the task has none)."""
    p, n = jax.process_index(), jax.process_count()
    if task.local_eval_batches is not None:
        return list(task.local_eval_batches(batch_size, seed, p, n))
    if task.eval_batches is None:
        return []
    batches = list(task.eval_batches(batch_size, seed))
    rows = batch_size // n
    where = f"task '{task.name}' eval_batches({batch_size}, {seed})"
    return [jax.tree.map(lambda x: x[p * rows:(p + 1) * rows], host_batch(b, batch_size, where)) for b in batches]
