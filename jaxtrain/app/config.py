"""Typed, frozen run configuration: YAML files + dotted ``key=value`` overrides.

One frozen dataclass per concern. YAML files and command-line overrides are
merged by OmegaConf against these schemas, so a misspelt key or a wrong type is
reported with the key, the value and what is allowed (:class:`ConfigError`).

Example::

    cfg = load("configs/tiny.yaml", ["train.steps=50", "optim.lr=1e-3"])
    cfg.model.n_layer   # -> int
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf import errors as oc_errors

from jaxtrain.app import tokenizer
from jaxtrain.errors import ConfigError
from jaxtrain.models.gpt_config import GPTConfig
from jaxtrain.optim_config import SCHEDULES, OptimConfig, validate_optim

__all__ = ["Config", "ConfigError", "ModelConfig", "GPTConfig", "OptimConfig", "ParallelConfig", "DataConfig", "TrainConfig",
           "CheckpointConfig", "LogConfig", "load", "from_dict", "to_dict", "to_yaml", "replace", "validate",
           "describe", "all_keys", "config_path", "CONFIG_NAMES", "ARCHS", "model_config"]

ARCHS = ("gpt", "llama")


@dataclass(frozen=True)
class ModelConfig:
    """The built-in language model's section: one architecture (``arch``) and its sizes.

    :func:`model_config` turns it into the core model's own config
    (:class:`~jaxtrain.models.GPTConfig` or :class:`~jaxtrain.models.LlamaConfig`).
    Keys marked with an architecture apply to it alone; null means that
    architecture's default.
    """

    arch: str = "gpt"  # gpt (GPT-2 / nanoGPT blocks) | llama (RMSNorm, rotary positions, SwiGLU, grouped-query attention)
    init_from: Optional[str] = None  # a Hugging Face model directory (config.json + *.safetensors) to start from: its architecture, sizes, weights and tokenizer.json
    vocab_size: Optional[int] = None  # tokens in the vocabulary; null = the tokenizer's (256 for data.tokenizer=bytes)
    block_size: int = 256  # longest context the model sees
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention (query) heads per block
    n_kv_head: Optional[int] = None  # llama: key/value heads (grouped-query attention), dividing n_head; null = n_head
    n_embd: int = 128  # residual stream width
    head_dim: Optional[int] = None  # llama: width of one head; null = n_embd // n_head
    mlp_hidden: Optional[int] = None  # MLP hidden width; null = 4 * n_embd (gpt) or the Llama default (about 8/3 * n_embd)
    dropout: float = 0.0  # dropout rate on attention and residual paths
    bias: Optional[bool] = None  # gpt: biases in Linear and LayerNorm layers; null = true (llama has none)
    tie_embeddings: bool = True  # the output head shares the token embedding matrix
    activation: Optional[str] = None  # gpt: gelu (exact, nanoGPT) | gelu_tanh (GPT-2's gelu_new); null = gelu
    norm_eps: float = 1e-5  # epsilon of LayerNorm (gpt) / RMSNorm (llama)
    rope_theta: float = 10000.0  # llama: base of the rotary position frequencies
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 (params stay float32; no float16: no loss scaling)
    remat: bool = False  # recompute each block in the backward to save memory
    attention: str = "xla"  # attention implementation: xla (written out) | cudnn (NVIDIA GPUs)


# Keys that belong to one architecture, with the value that means "not set".
_ARCH_ONLY = {"model.n_kv_head": ("llama", None), "model.head_dim": ("llama", None),
              "model.activation": ("gpt", None), "model.bias": ("gpt", None),
              "model.rope_theta": ("llama", ModelConfig.rope_theta)}


def model_config(mc: ModelConfig):
    """The core model's config for ``mc``: a :class:`GPTConfig` or a ``LlamaConfig``.

    ``mc.vocab_size`` must be resolved (an int): :func:`load` does that.
    """
    if mc.vocab_size is None:
        raise ConfigError("model.vocab_size is null: load the config with jaxtrain.app.config.load, which sets it "
                          "from data.tokenizer, or give model.vocab_size")
    common = dict(vocab_size=mc.vocab_size, block_size=mc.block_size, n_layer=mc.n_layer, n_head=mc.n_head,
                  n_embd=mc.n_embd, dropout=mc.dropout, tie_embeddings=mc.tie_embeddings, dtype=mc.dtype,
                  remat=mc.remat, attention=mc.attention, mlp_hidden=mc.mlp_hidden, norm_eps=mc.norm_eps)
    if mc.arch == "llama":
        from jaxtrain.models.llama_config import LlamaConfig

        return LlamaConfig(n_kv_head=mc.n_kv_head if mc.n_kv_head is not None else mc.n_head,
                           head_dim=mc.head_dim, rope_theta=mc.rope_theta, **common)
    return GPTConfig(bias=True if mc.bias is None else mc.bias, activation=mc.activation or "gelu", **common)


@dataclass(frozen=True)
class DataConfig:
    source: str = "stdlib"  # "stdlib" (built-in corpus) or a path: text file, folder, .jsonl, .parquet, .bin, .npy
    glob: str = "**/*.txt"  # files to read when source is a folder (text files, or .jsonl / .parquet records)
    tokenizer: str = "bytes"  # bytes | bpe:N (byte-level BPE of N tokens trained on the train split) | path to a tokenizer.json
    text_field: str = "text"  # the field holding a record's text in .jsonl / .parquet sources
    token_dtype: str = "uint16"  # element type of a .bin token file: uint16 | uint32
    val_source: Optional[str] = None  # separate validation source; None splits source
    val_fraction: float = 0.05  # tail fraction of the corpus held out for validation
    cache_dir: str = "~/.cache/jaxtrain"  # where tokenized corpora are cached
    prefetch: int = 2  # batches prepared ahead of the device, in a background thread


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 700  # optimizer steps to train
    batch_size: int = 16  # global batch (sequences per step, all devices and hosts)
    grad_accum: int = 1  # microbatches per step (lax.scan); batch_size must divide by it
    seed: int = 0  # root seed for params, data order and dropout, in [0, 2**32)
    eval_every: int = 100  # steps between validation passes; 0 = only at the end
    eval_batches: int = 8  # batches of batch_size sequences in one validation pass (a fixed set)
    log_every: int = 10  # steps between metric fetches (the only host syncs)
    sample_every: int = 0  # steps between text samples; 0 = only at the end
    sample_tokens: int = 300  # tokens generated per sample
    sample_prompt: str = "def "  # prompt for samples (for a .bin/.npy corpus: token ids separated by spaces)
    sample_temperature: float = 0.8  # softmax temperature of samples; 0 = greedy
    sample_top_k: int = 40  # samples draw from the k most likely tokens; 0 = all
    sample_top_p: float = 1.0  # nucleus sampling: draw from the smallest set of likeliest tokens holding this much probability; 1 = off
    max_nonfinite: int = 5  # consecutive non-finite steps (skipped) before stopping
    diagnostics: bool = False  # per-layer gradient norms, update ratios, attention stats
    memory_check: bool = True  # refuse a run whose compiled step needs more memory than the device has (on CPU: the machine's available memory)
    matmul_precision: str = "default"  # the training step's float32 matmuls (jax.default_matmul_precision): default (the platform's: float32 on CPU) | float32 | bfloat16 (one bfloat16 pass, float32 accumulation; on CPU through oneDNN where it can run); evaluation keeps the default


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 200  # steps between checkpoints (always one at the end)
    keep: int = 2  # most recent checkpoints kept
    keep_every: Optional[int] = None  # also keep every step divisible by this
    async_save: bool = True  # save in the background while training continues
    resume: bool = True  # continue from the latest good checkpoint in run_dir
    allow_data_change: bool = False  # resume even when the corpus differs from the checkpoint's


@dataclass(frozen=True)
class ParallelConfig:
    data: int = -1  # devices on the data axis; -1 = all devices not used by fsdp
    fsdp: int = 1  # devices on the fsdp axis (params and optimizer state sharded)
    coordinator_address: Optional[str] = None  # host:port of process 0 for multi-host
    num_processes: Optional[int] = None  # processes in a multi-host run
    process_id: Optional[int] = None  # this process's index
    local_device_count: Optional[int] = None  # CPU only: devices per process


@dataclass(frozen=True)
class LogConfig:
    progress: bool = True  # progress bar on the terminal
    tensorboard: bool = True  # TensorBoard event files in run_dir/tb
    plot: bool = True  # PNG plot of the curves at the end
    peak_flops: Optional[float] = None  # peak FLOP/s of one device for MFU; null = known GPUs/TPUs only
    wandb: Optional[str] = None  # Weights & Biases project to log to (the wandb extra); null = off
    wandb_name: Optional[str] = None  # W&B run name; null = run_dir's last component
    wandb_mode: str = "online"  # W&B mode: online | offline (written under run_dir/wandb, synced later) | disabled
    profile_start: int = 5  # first step of the profiler window (log.profile_steps > 0)
    profile_steps: int = 0  # steps traced with jax.profiler into run_dir/tb for TensorBoard's profile tab; 0 = off


@dataclass(frozen=True)
class Config:
    run_dir: str = "runs/default"  # where checkpoints, metrics and samples go
    task: str = "lm"  # lm (the built-in GPT on data.source), or your module: name, name:attr or path.py
    backend: str = "auto"  # CPU kernels (jaxtrain.cpu): auto (where they can run) | cpu (required) | xla (off)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    log: LogConfig = field(default_factory=LogConfig)


_CHOICES = {
    "model.arch": ARCHS,
    "model.dtype": ("float32", "bfloat16"),
    "train.matmul_precision": ("default", "float32", "bfloat16"),
    "model.attention": ("xla", "cudnn"),
    "backend": ("auto", "cpu", "xla"),
    "log.wandb_mode": ("online", "offline", "disabled"),
    "data.token_dtype": ("uint16", "uint32"),
    "optim.schedule": SCHEDULES,
}


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key of ``cls``, e.g. ``["run_dir", "model.vocab_size", ...]``."""
    keys = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            keys += all_keys(f.default_factory, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def describe() -> str:
    """One line per key: name, default and meaning (for ``--help``)."""
    import inspect

    lines = []
    for cls, prefix in _sections():
        src = inspect.getsource(cls).splitlines()
        for f in dataclasses.fields(cls):
            if f.default_factory is not dataclasses.MISSING:
                continue
            comment = next((l.split("#", 1)[1].strip() for l in src if l.strip().startswith(f"{f.name}:") and "#" in l), "")
            lines.append(f"  {prefix + f.name:<30} = {f.default!r:<20} {comment}")
    return "\n".join(lines)


def _sections():
    yield Config, ""
    for f in dataclasses.fields(Config):
        if f.default_factory is not dataclasses.MISSING:
            yield f.default_factory, f"{f.name}."


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    if not close:
        # also try the last component alone, e.g. "lr" -> "optim.lr"
        tails = {k.rsplit(".", 1)[-1]: k for k in all_keys()}
        hit = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(tails), n=1, cutoff=0.7)
        close = [tails[hit[0]]] if hit else []
    return f"; did you mean '{close[0]}'?" if close else ""


def _written_key(layer: Any, key: str) -> str:
    """The full dotted key the user wrote under ``key`` (``modle`` -> ``modle.n_layer``), for a better hint."""
    node = layer
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return key
        node = node[part]
    while isinstance(node, DictConfig) and len(node) == 1:
        child = next(iter(node))
        key, node = f"{key}.{child}", node[child]
    return key


def _check_sections(layer: Any, origin: str) -> None:
    """A config layer is a mapping whose section keys (``model``, ``train``, ...) hold mappings."""
    if not isinstance(layer, DictConfig):
        raise ConfigError(f"{origin} must be a mapping of config sections ({', '.join(n for n, _ in _section_names())}),"
                          f" found a {type(layer).__name__.replace('Config', '').lower()}")
    for name, sub in _section_names():
        if name in layer and not isinstance(layer.get(name), DictConfig):
            raise ConfigError(f"'{name}' in {origin} must be a mapping of {name}.* keys (e.g. {sub}), "
                              f"found {OmegaConf.to_container(layer)[name]!r}")


def _section_names() -> list[tuple[str, str]]:
    """``[(section, one of its keys)]``, e.g. ``("model", "model.vocab_size")``."""
    return [(prefix[:-1], prefix + dataclasses.fields(cls)[0].name) for cls, prefix in _sections() if prefix]


# Keys of earlier versions: what to write instead.
_REPLACED = {"model.matmul": "the CPU kernels are chosen by the top-level key backend (model.matmul=auto -> "
                             "backend=auto, blas -> backend=cpu, xla -> backend=xla)"}


def _error_from(e: Exception, origin: str, layer: Any = None) -> ConfigError:
    key = getattr(e, "full_key", None) or "?"
    if isinstance(e, (oc_errors.ConfigAttributeError, oc_errors.ConfigKeyError)):
        key = _written_key(layer, key)
        if key in _REPLACED:
            return ConfigError(f"config key '{key}' in {origin} was replaced: {_REPLACED[key]}")
        return ConfigError(f"unknown config key '{key}' in {origin}{_suggest(key)}")
    if isinstance(e, oc_errors.ValidationError):
        msg = str(e).splitlines()[0]
        return ConfigError(f"bad value for '{key}' in {origin}: {msg}")
    if isinstance(e, oc_errors.InterpolationResolutionError):
        return ConfigError(f"'{key}' in {origin}: {str(e).splitlines()[0]} (a ${{...}} refers to another config "
                           "key, e.g. ${model.n_embd}; write \\${ for a literal ${)")
    return ConfigError(f"invalid config in {origin}: {str(e).splitlines()[0]}")


def _parse_overrides(overrides: Sequence[str]) -> list[str]:
    for o in overrides:
        if "=" not in o or o.startswith("="):
            raise ConfigError(f"override '{o}' is not of the form key=value (e.g. train.steps=100)")
    return list(overrides)


def _overrides_layer(overrides: Sequence[str]) -> DictConfig:
    """The ``key=value`` overrides as one config layer; values are read as YAML, later ones win.

    Values of text fields (paths, globs, prompts) are taken as written, ``${``
    included (no interpolation), so ``data.glob=*.md`` or
    ``train.sample_prompt=def f(x):`` need no YAML quoting
    (YAML would read a leading ``*`` as an alias and ``a:`` as a mapping); an
    empty value is the empty string for a ``str`` field (``train.sample_prompt=``)
    and None for an optional one, as ``null`` is. Other values that are not valid
    YAML are kept as text too, for the type check to name.
    """
    layer = OmegaConf.create()
    for o in _parse_overrides(overrides):
        key, value = o.split("=", 1)
        kind = _text_field_kind(key)
        text = kind == "str" or (kind == "optional" and value not in ("", "null", "~"))
        try:
            parsed = None if text else OmegaConf.from_dotlist([o])
        except yaml.YAMLError:
            parsed = None
        if parsed is None:
            if text and len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]  # quoted for the shell's sake, as YAML would read it
            if text:
                value = value.replace("${", "\\${")  # as written: no ${...} interpolation
            parsed = OmegaConf.create()
            OmegaConf.update(parsed, key, value)
        layer = OmegaConf.merge(layer, parsed)
    return layer


def _text_field_kind(key: str) -> Optional[str]:
    """``"str"`` or ``"optional"`` if ``key`` names a ``str`` / ``Optional[str]`` field (its value is taken as written), else None."""
    cls, parts = Config, key.split(".")
    for i, part in enumerate(parts):
        f = next((f for f in dataclasses.fields(cls) if f.name == part), None)
        if f is None:
            return None
        if i == len(parts) - 1:
            return {"str": "str", "Optional[str]": "optional"}.get(f.type)
        if f.default_factory is dataclasses.MISSING:
            return None
        cls = f.default_factory
    return None


CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"  # the configs shipped with the package


def config_names() -> list[str]:
    """Names of the packaged configs (``default``, ``tiny``, ...), loadable as ``--config NAME``."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def config_path(name_or_path: str | Path) -> Path:
    """The YAML file ``name_or_path`` means: an existing path, else a packaged config's name
    (``tiny`` or ``tiny.yaml``, also ``configs/tiny.yaml`` from a source checkout's old layout)."""
    p = Path(name_or_path).expanduser()
    if p.exists():
        return p
    stem = p.name[:-5] if p.name.endswith(".yaml") else p.name
    if stem in config_names() and (p.parent == Path(".") or p.parent.name == "configs"):
        return CONFIG_DIR / f"{stem}.yaml"
    return p


def load(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> Config:
    """Build a validated :class:`Config` from an optional YAML file and overrides.

    Args:
      path: a YAML file whose nested keys mirror :class:`Config`, or a packaged
        config's name (:func:`config_names`, e.g. ``"tiny"``); None = defaults.
      overrides: dotted ``key=value`` strings applied after the file.
    Raises:
      ConfigError: naming the unknown key (with the closest valid one), or the
        key, value and expected type of a bad value.
    """
    base = OmegaConf.structured(Config)
    layers = []
    if path is not None:
        p = config_path(path)
        if p.is_dir():
            raise ConfigError(f"config file '{p}' is a directory; pass a YAML file or a config name, e.g. "
                              "--config tiny")
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist; give a YAML file or one of the packaged "
                              f"configs: {', '.join(config_names())}")
        try:
            layers.append((OmegaConf.load(p), f"'{p}'"))
        except Exception as e:  # YAML syntax, or a scalar document
            raise ConfigError(f"config file '{p}' is not valid YAML: {' '.join(str(e).split())[:300]}") from None
    if overrides:
        try:
            layers.append((_overrides_layer(overrides), "command-line overrides"))
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError(f"bad override: {str(e).splitlines()[0]}") from None
    for layer, origin in layers:
        _check_sections(layer, origin)
        try:
            base = OmegaConf.merge(base, layer)
        except Exception as e:
            raise _error_from(e, origin, layer) from None
    try:
        cfg: Config = OmegaConf.to_object(base)
    except Exception as e:
        raise _error_from(e, "the config (file and overrides)") from None
    validate(cfg)
    cfg = resolve(cfg)
    validate(cfg)
    return cfg


def resolve(cfg: Config) -> Config:
    """Fill what the config leaves to other sources: the model of ``model.init_from`` (a Hugging
    Face directory: architecture, sizes, tokenizer) and a null ``model.vocab_size`` (the tokenizer's)."""
    if cfg.model.init_from is not None:
        from jaxtrain.app import pretrained  # reads the directory's config.json

        cfg = pretrained.resolve(cfg)
    if cfg.model.vocab_size is None:
        from jaxtrain.app import tokenizer

        n = tokenizer.vocab_size(cfg.data.tokenizer)
        if n is None:  # an unreadable tokenizer.json: load() says why, naming the key
            tokenizer.load(cfg.data.tokenizer)
        cfg = replace(cfg, model=dict(vocab_size=n))
    return cfg


def from_dict(d: dict) -> Config:
    """Rebuild a :class:`Config` from :func:`to_dict` output (e.g. a checkpoint)."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(d)))
    except Exception as e:
        raise _error_from(e, "saved config") from None


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def replace(cfg: Config, **sections: Any) -> Config:
    """``replace(cfg, train=dict(steps=5))`` -> a copy with those fields changed."""
    new = {}
    for name, changes in sections.items():
        cur = getattr(cfg, name)
        new[name] = dataclasses.replace(cur, **changes) if isinstance(changes, dict) else changes
    return dataclasses.replace(cfg, **new)


def _get(cfg: Config, key: str) -> Any:
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: Config) -> None:
    """Checks that span fields; raises :class:`ConfigError` naming key and value."""

    def bad(key: str, why: str):
        raise ConfigError(f"{key}={_get(cfg, key)!r}: {why}")

    if cfg.model.dtype == "float16":  # before the choices: say why, not only what is allowed
        bad("model.dtype", "float16 needs loss scaling, which jaxtrain does not do; use model.dtype=bfloat16 "
                           "(float32's range at the same memory)")
    for key, allowed in _CHOICES.items():
        if _get(cfg, key) not in allowed:
            bad(key, f"must be one of {', '.join(allowed)}")
    positive = ["model.block_size", "model.n_layer", "model.n_head", "model.n_embd",
                "train.steps", "train.batch_size", "train.grad_accum", "train.log_every", "train.eval_batches",
                "checkpoint.every", "checkpoint.keep", "train.max_nonfinite", "parallel.fsdp"]
    for key in positive:
        if _get(cfg, key) <= 0:
            bad(key, "must be a positive integer")
    for key in ["train.eval_every", "train.sample_every", "train.sample_tokens", "data.prefetch",
                "train.sample_top_k", "log.profile_start", "log.profile_steps"]:
        if _get(cfg, key) < 0:
            bad(key, "must be >= 0")
    if not 0.0 <= cfg.train.sample_temperature < math.inf:  # NaN fails too
        bad("train.sample_temperature", "must be a finite number >= 0 (0: greedy)")
    if not 0.0 < cfg.train.sample_top_p <= 1.0:  # NaN fails too; the message is generate.check_sampling's
        bad("train.sample_top_p", "must be a finite number in (0, 1] (1: off)")
    for key in ["run_dir", "task", "data.source", "data.glob", "data.cache_dir", "data.text_field"]:  # "" would mean the current directory
        if not _get(cfg, key).strip():
            bad(key, "must not be empty")
    if cfg.log.wandb is not None and not cfg.log.wandb.strip():
        bad("log.wandb", "must name a W&B project, or be null (no W&B)")
    tokenizer.check_spec(cfg.data.tokenizer)
    if cfg.data.val_source is not None and not cfg.data.val_source.strip():
        bad("data.val_source", "must not be empty (null: hold out data.val_fraction of data.source)")
    _validate_model(cfg, bad)
    if not 0.0 <= cfg.model.dropout < 1.0:
        bad("model.dropout", "must be in [0, 1)")
    if not 0.0 < cfg.data.val_fraction < 1.0:
        bad("data.val_fraction", "must be in (0, 1)")
    if cfg.train.batch_size % cfg.train.grad_accum:
        bad("train.batch_size", f"must be divisible by train.grad_accum={cfg.train.grad_accum}")
    validate_optim(cfg.optim)
    if not 0 <= cfg.train.seed < 2**32:  # jax.random.key keeps 32 bits: 2**32 would be seed 0 again
        bad("train.seed", "must be an integer in [0, 2**32)")
    if cfg.parallel.data == 0 or cfg.parallel.data < -1:
        bad("parallel.data", "must be a positive device count or -1 (all remaining devices)")
    if cfg.checkpoint.keep_every is not None and cfg.checkpoint.keep_every <= 0:
        bad("checkpoint.keep_every", "must be a positive integer or null")
    if cfg.log.peak_flops is not None and not 0.0 < cfg.log.peak_flops < math.inf:
        bad("log.peak_flops", "must be a finite number > 0 (FLOP/s of one device) or null")


def _validate_model(cfg: Config, bad) -> None:
    mc = cfg.model
    for key, (arch, unset) in _ARCH_ONLY.items():
        if _get(cfg, key) != unset and mc.arch != arch:
            bad(key, f"applies to model.arch={arch} only (this run has model.arch={mc.arch}); drop it")
    if mc.vocab_size is not None and mc.vocab_size <= 0:
        bad("model.vocab_size", "must be a positive integer, or null (the tokenizer's size)")
    for key in ("model.n_kv_head", "model.head_dim", "model.mlp_hidden"):
        if _get(cfg, key) is not None and _get(cfg, key) <= 0:
            bad(key, "must be a positive integer, or null (the architecture's default)")
    if mc.n_kv_head is not None and mc.n_head % mc.n_kv_head:
        bad("model.n_kv_head", f"must divide model.n_head={mc.n_head} (each key/value head serves "
                               "n_head / n_kv_head query heads)")
    if mc.head_dim is None and mc.n_embd % mc.n_head:
        bad("model.n_embd", f"must be divisible by model.n_head={mc.n_head}"
            + (" (or give model.head_dim)" if mc.arch == "llama" else ""))
    if mc.activation is not None and mc.activation not in ("gelu", "gelu_tanh"):
        bad("model.activation", "must be gelu (exact), gelu_tanh (GPT-2's approximation) or null")
    if mc.arch == "llama" and mc.head_dim is not None and mc.head_dim % 2:
        bad("model.head_dim", "must be even (rotary positions rotate pairs of features)")
    if mc.arch == "llama" and mc.head_dim is None and (mc.n_embd // mc.n_head) % 2:
        bad("model.n_embd", f"/ model.n_head = {mc.n_embd // mc.n_head} must be even for llama "
                            "(rotary positions rotate pairs of features)")
    for key in ("model.norm_eps", "model.rope_theta"):
        if not 0.0 < _get(cfg, key) < math.inf:
            bad(key, "must be a finite number > 0")
    if mc.init_from is not None and not mc.init_from.strip():
        bad("model.init_from", "must name a Hugging Face model directory, or be null (random initialisation)")
