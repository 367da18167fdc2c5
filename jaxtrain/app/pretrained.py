"""Hugging Face model directories in and out of runs.

- **In**: ``model.init_from=DIR`` starts a run from a Hugging Face GPT-2 or
  Llama directory (``config.json`` plus ``model.safetensors`` or a sharded
  index): :func:`resolve` takes the architecture and sizes from its
  ``config.json`` (and ``data.tokenizer`` from its ``tokenizer.json``), and the
  language-model task loads the weights into the fresh state
  (:func:`load_params`). A resumed run restores its own checkpoint instead.
- **Out**: ``jaxtrain export --run-dir RUN --out DIR`` writes a run's checkpoint
  as such a directory (:func:`export`), with the run's tokenizer, which
  ``transformers.AutoModelForCausalLM.from_pretrained(DIR)`` loads.

The conversions themselves are the core's (:mod:`jaxtrain.models.hf`); this
module maps them onto the run's config and files.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

from jaxtrain.app.config import Config, ConfigError, ModelConfig, model_config, replace

PyTree = Any
log = logging.getLogger(__name__)

# ModelConfig key -> the core config's field of the same meaning
_SHAPE_KEYS = ("arch", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "head_dim", "mlp_hidden", "bias",
               "tie_embeddings", "activation", "norm_eps", "rope_theta")
_DEFAULTS = ModelConfig()


def _hf():
    from jaxtrain.models import hf

    return hf


def _model_keys(core) -> dict[str, Any]:
    """The ``model.*`` values that describe the core config ``core`` (a GPTConfig or LlamaConfig)."""
    from jaxtrain.models.llama_config import LlamaConfig

    if isinstance(core, LlamaConfig):
        keys = dict(arch="llama", n_kv_head=core.n_kv_head, head_dim=core.head_dim, rope_theta=core.rope_theta,
                    bias=None, activation=None)
    else:
        keys = dict(arch="gpt", n_kv_head=None, head_dim=None, rope_theta=_DEFAULTS.rope_theta, bias=core.bias,
                    activation=core.activation)
    keys.update(vocab_size=core.vocab_size, n_layer=core.n_layer, n_head=core.n_head, n_embd=core.n_embd,
                mlp_hidden=core.mlp_hidden, tie_embeddings=core.tie_embeddings, norm_eps=core.norm_eps)
    return keys


def resolve(cfg: Config) -> Config:
    """``cfg`` with the model section of ``model.init_from``'s ``config.json``.

    The shape keys (:data:`_SHAPE_KEYS`) take the directory's values; those the
    config set otherwise (e.g. a packaged config's sizes) are named in a
    warning. ``model.block_size``
    is kept when it fits the checkpoint's positions (GPT-2 can be fine-tuned on
    a shorter context); ``data.tokenizer`` left at ``bytes`` becomes the
    directory's ``tokenizer.json`` when it has one.
    Raises :class:`ConfigError` naming ``model.init_from`` and the problem.
    """
    hf = _hf()
    where = f"model.init_from='{cfg.model.init_from}'"
    path = Path(cfg.model.init_from).expanduser()
    try:
        core = hf.config_from_hf(path)
    except ConfigError as e:  # CheckpointFormatError: one line naming the file and the problem
        raise ConfigError(f"{where}: {e}") from None
    except OSError as e:
        raise ConfigError(f"{where}: cannot be read: {e}") from None
    wanted = _model_keys(core)
    replaced = [f"{key} {getattr(cfg.model, key)!r} -> {wanted[key]!r}" for key in _SHAPE_KEYS
                if getattr(cfg.model, key) not in (wanted[key], getattr(_DEFAULTS, key))]
    if replaced:  # e.g. a packaged config's sizes: the weights decide
        log.warning("%s: the model's shape comes from its config.json, replacing model.%s", where,
                    ", model.".join(replaced))
    limit = core.block_size if wanted["arch"] == "gpt" else None  # GPT-2's learned positions end there
    if limit is not None and cfg.model.block_size > limit:
        raise ConfigError(f"{where}: model.block_size={cfg.model.block_size} exceeds the checkpoint's {limit} "
                          f"positions; use model.block_size <= {limit}")
    new = replace(cfg, model=wanted)
    tokenizer = path / "tokenizer.json"
    if cfg.data.tokenizer == "bytes" and tokenizer.is_file():
        new = replace(new, data=dict(tokenizer=str(tokenizer)))
    return new


def load_params(cfg: Config, abstract_params: PyTree) -> PyTree:
    """The weights of ``model.init_from`` as host arrays shaped like ``abstract_params`` (the run's
    params tree of ``jax.ShapeDtypeStruct``). Raises :class:`ConfigError` naming a key or shape that
    does not fit."""
    import jax

    where = f"model.init_from='{cfg.model.init_from}'"
    try:
        params = _hf().load_hf_params(Path(cfg.model.init_from).expanduser(), model_config(cfg.model))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except OSError as e:
        raise ConfigError(f"{where}: cannot be read: {e}") from None
    got, want = jax.tree.structure(params), jax.tree.structure(abstract_params)
    if got != want:  # the loader follows the same config: a mismatch is a bug, said plainly
        raise ConfigError(f"{where}: the loaded weights do not have the model's structure ({got} vs {want})")
    return jax.tree.map(lambda a, x: a.astype(x.dtype), params, abstract_params)


# ---------------------------------------------------------------- export


def export(run_dir: str | Path, out: str | Path, *, step: Optional[int] = None, overwrite: bool = False) -> Path:
    """Write ``run_dir``'s checkpoint (the newest readable one, or ``step``) to ``out`` as a Hugging Face
    directory: ``config.json``, ``model.safetensors`` and the run's ``tokenizer.json`` when it has one.

    Refuses (:class:`ConfigError`) a run of another task, an existing non-empty
    ``out`` unless ``overwrite``, and a model Hugging Face cannot represent.
    Returns ``out``.
    """
    from jaxtrain.app import checkpoint, tokenizer

    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"--out={out} exists and is not an empty directory; choose a new directory "
                          "(or pass --overwrite to replace its files)")
    state, cfg = checkpoint.load_run(run_dir, step=step)
    if cfg.task != "lm":
        raise ConfigError(f"--run-dir={run_dir} trained task={cfg.task!r}; export writes the built-in language "
                          "models (task=lm)")
    hf = _hf()
    model = state.model()
    saved = Path(run_dir).expanduser() / tokenizer.RUN_FILE
    tokenizer_json = saved if saved.is_file() else None  # bytes, or token ids without a tokenizer: none to write
    staging = out.with_name(f".{out.name}.export-tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        hf.save_pretrained(model, staging, tokenizer_json=tokenizer_json)
    except ConfigError as e:  # a model Hugging Face cannot represent
        shutil.rmtree(staging, ignore_errors=True)
        raise ConfigError(f"--run-dir={run_dir}: {e}") from None
    out.mkdir(parents=True, exist_ok=True)
    for f in staging.iterdir():  # the files land whole: a failed export leaves out as it was
        f.replace(out / f.name)
    staging.rmdir()
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxtrain export", description="Write a run's checkpoint as a Hugging Face "
                                "model directory (config.json, model.safetensors, tokenizer.json).")
    p.add_argument("--run-dir", required=True, help="run directory written by jaxtrain run")
    p.add_argument("--out", required=True, help="directory to write (new or empty)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest readable)")
    p.add_argument("--overwrite", action="store_true", help="replace the files of a non-empty --out")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    """``jaxtrain export``; returns the exit status (2 for a user mistake, printed as one line)."""
    parser = _parser()
    parser.error = lambda message: parser.exit(2, f"error: {message}; see jaxtrain export --help\n")
    args = parser.parse_args(argv)
    from jaxtrain.app import checkpoint

    try:
        out = export(args.run_dir, args.out, step=args.step, overwrite=args.overwrite)
    except (ConfigError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported --run-dir={args.run_dir} to {out} (load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained('{out}'))")
    return 0


__all__ = ["resolve", "load_params", "export", "main"]
