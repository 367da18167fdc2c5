"""Hugging Face checkpoints: a ``gpt2`` or ``llama`` model directory <-> a jaxtrain GPT or Llama.

Reads and writes ``config.json`` and ``model.safetensors`` (or a sharded
``model.safetensors.index.json``) through ``safetensors``' NumPy API and
``json`` only: neither ``transformers`` nor PyTorch is imported. The table in
:func:`weight_rows` is the one place that knows how the layouts map: GPT-2's
``Conv1D`` weights are stored ``(in, out)`` like a Flax kernel, Llama's
``nn.Linear`` weights ``(out, in)``; a tied ``lm_head`` is not stored.

Params stay float32 in jaxtrain: float16 and bfloat16 files are upcast on
reading, and files are written in float32.

Example::

    model, info = load_pretrained("path/to/hf_dir", dtype="bfloat16")   # info.tokenizer_json: its tokenizer
    logits_BTV = model(tokens_BT)
    save_pretrained(model, "out_dir", tokenizer_json=info.tokenizer_json)

    # the application's way: build the model from the config, then put the weights in
    cfg = config_from_hf("path/to/hf_dir", remat=True)
    state = TrainState.create(Llama(cfg, rngs=nnx.Rngs(0)), tx)
    params = load_hf_params("path/to/hf_dir", cfg)
    state = state.replace(params=params, opt_state=tx.init(params))
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from jaxtrain.errors import CheckpointFormatError
from jaxtrain.models.gpt import GPT, GPTConfig
from jaxtrain.models.hf_config import ModelConfig, config_from_hf, hf_config_dict, read_config_json
from jaxtrain.models.interop import LINEAR, SAME, Layout
from jaxtrain.models.llama import Llama, LlamaConfig

__all__ = ["HFInfo", "config_from_hf", "load_pretrained", "load_hf_params", "save_pretrained", "weight_rows",
           "read_safetensors"]

WEIGHTS, INDEX, TOKENIZER = "model.safetensors", "model.safetensors.index.json", "tokenizer.json"
Row = tuple[str, tuple, Layout]  # (HF key, path in the params dict, layout)
# Buffers some checkpoints carry that are no parameters: GPT-2's causal masks, old Llama's rotary frequencies.
_BUFFERS = re.compile(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)|model\.layers\.\d+\.self_attn\.rotary_emb\."
                      r"inv_freq")
_PREFIX = {GPTConfig: "transformer.", LlamaConfig: "model."}  # what the LM-head classes put before the base model
_LISTED = 3  # keys named in an error before "... (N in all)"


@dataclass(frozen=True)
class HFInfo:
    """What :func:`load_pretrained` found besides the weights."""

    path: Path  # the model directory
    model_type: str  # "gpt2" or "llama"
    config: ModelConfig  # the jaxtrain config the model was built with
    tokenizer_json: Optional[Path]  # path/tokenizer.json when the directory has one
    hf_config: dict  # config.json as read


def weight_rows(cfg: ModelConfig) -> list[Row]:
    """Every stored tensor of the model ``cfg`` describes: ``(HF key, params path, layout)``."""
    if isinstance(cfg, GPTConfig):
        rows = [("transformer.wte.weight", ("wte", "embedding"), SAME),
                ("transformer.wpe.weight", ("wpe", "embedding"), SAME)]
        for i in range(cfg.n_layer):
            for ln in ("ln_1", "ln_2"):
                rows += [(f"transformer.h.{i}.{ln}.weight", ("h", i, ln, "scale"), SAME),
                         (f"transformer.h.{i}.{ln}.bias", ("h", i, ln, "bias"), SAME)]
            for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):  # Conv1D: (in, out) as Flax
                path = ("h", i, *name.split("."))
                rows += [(f"transformer.h.{i}.{name}.weight", (*path, "kernel"), SAME),
                         (f"transformer.h.{i}.{name}.bias", (*path, "bias"), SAME)]
        rows += [("transformer.ln_f.weight", ("ln_f", "scale"), SAME),
                 ("transformer.ln_f.bias", ("ln_f", "bias"), SAME)]
    elif isinstance(cfg, LlamaConfig):
        rows = [("model.embed_tokens.weight", ("embed_tokens", "embedding"), SAME)]
        for i in range(cfg.n_layer):
            for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):  # nn.Linear: (out, in)
                rows.append((f"model.layers.{i}.{name}.weight", ("layers", i, *name.split("."), "kernel"), LINEAR))
            for norm in ("input_layernorm", "post_attention_layernorm"):
                rows.append((f"model.layers.{i}.{norm}.weight", ("layers", i, norm, "weight"), SAME))
        rows.append(("model.norm.weight", ("norm", "weight"), SAME))
    else:
        raise TypeError(f"weight_rows: expected a GPTConfig or LlamaConfig, got {type(cfg).__name__}")
    if not cfg.tie_embeddings:
        rows.append(("lm_head.weight", ("lm_head", "kernel"), LINEAR))
    return rows


def _embedding_key(cfg: ModelConfig) -> str:
    return weight_rows(cfg)[0][0]


# ---------------------------------------------------------------- reading safetensors


def _require_safetensors() -> None:
    try:
        import safetensors  # noqa: F401
    except ImportError:
        raise ImportError("Hugging Face checkpoints need the safetensors package: pip install safetensors") from None


def _safetensors_files(path: Path) -> list[Path]:
    if (path / WEIGHTS).is_file():
        return [path / WEIGHTS]
    if (path / INDEX).is_file():
        try:
            weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointFormatError(f"{path / INDEX}: not a safetensors index with a weight_map ({e})") from None
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointFormatError(f"{path / INDEX}: names shard(s) that are missing: {', '.join(absent[:3])}")
        return files
    others = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    hint = f" (found {others[0]}: PyTorch pickles are not read; save with safe_serialization)" if others else ""
    raise CheckpointFormatError(f"{path}: no {WEIGHTS} or {INDEX}{hint}")


def _bfloat16(file: Path, keys: list[str]) -> dict[str, np.ndarray]:
    """BF16 tensors read from the raw file (NumPy has no bfloat16), widened exactly to float32.

    The format: an 8-byte little-endian header length, a JSON header of
    ``{key: {dtype, shape, data_offsets}}``, then the data.
    """
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    out = {}
    for key in keys:
        begin, end = header[key]["data_offsets"]
        bits = np.fromfile(file, dtype="<u2", count=(end - begin) // 2, offset=8 + n + begin)
        out[key] = (bits.astype(np.uint32) << 16).view(np.float32).reshape(header[key]["shape"])
    return out


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of the model directory ``path`` (one file or the shards of an index), as NumPy arrays.

    bfloat16 tensors come back as float32; other dtypes as stored.
    """
    _require_safetensors()
    from safetensors import SafetensorError, safe_open

    tensors: dict[str, np.ndarray] = {}
    for file in _safetensors_files(Path(path)):
        try:
            with safe_open(str(file), framework="numpy") as f:
                keys = list(f.keys())
                bf16 = [k for k in keys if f.get_slice(k).get_dtype() == "BF16"]
                tensors.update({k: f.get_tensor(k) for k in keys if k not in bf16})
            tensors.update(_bfloat16(file, bf16))
        except (SafetensorError, OSError, ValueError, TypeError) as e:
            raise CheckpointFormatError(f"{file}: not a readable safetensors file ({e})") from None
    return tensors


# ---------------------------------------------------------------- loading


def _config_of(like: Any) -> ModelConfig:
    cfg = getattr(like, "config", like)
    if not isinstance(cfg, (GPTConfig, LlamaConfig)):
        raise TypeError(f"expected a jaxtrain GPT or Llama or its config, got {type(like).__name__}")
    return cfg


def _abstract_params(cfg: ModelConfig) -> dict:
    """``{params path: jax.ShapeDtypeStruct}`` of the model ``cfg`` describes, nothing allocated."""
    model_cls = GPT if isinstance(cfg, GPTConfig) else Llama
    abstract = nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0)))
    return traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))


def _listed(keys: list[str]) -> str:
    more = f", ... ({len(keys)} in all)" if len(keys) > _LISTED else ""
    return ", ".join(keys[:_LISTED]) + more


def _normalised(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Keys as the LM-head class names them (a base model's lack the prefix), buffers dropped."""
    prefix = _PREFIX[type(cfg)]
    out = {}
    for key, value in tensors.items():
        if not key.startswith((prefix, "lm_head.")):
            key = prefix + key
        if not _BUFFERS.fullmatch(key):
            out[key] = value
    return out


def load_hf_params(path: str | Path, like: Any) -> dict:
    """The params of a jaxtrain model from the Hugging Face directory ``path``'s safetensors.

    Args:
      path: a model directory with ``model.safetensors`` or ``model.safetensors.index.json``.
      like: the target model (GPT or Llama) or its config; it fixes the keys and
        shapes (e.g. from :func:`config_from_hf`, with any overrides). A GPT-2
        position table longer than ``block_size`` is cropped to it.
    Returns:
      A nested dict of float32 ``jax.Array`` shaped like the model's params
      (``nnx.to_pure_dict(nnx.state(model, nnx.Param))``, ``TrainState.params``).
    Raises:
      CheckpointFormatError: one line naming the path and the missing keys, the
        unexpected keys or the first misshaped key (expected and found shape).
    """
    path, cfg = Path(path), _config_of(like)
    tensors = _normalised(read_safetensors(path), cfg)
    rows, reference = weight_rows(cfg), _abstract_params(cfg)
    if cfg.tie_embeddings and "lm_head.weight" in tensors:  # some writers store the tied head anyway
        head, table = tensors.pop("lm_head.weight"), tensors.get(_embedding_key(cfg))
        if table is not None and (head.shape != table.shape or not np.array_equal(head, table)):
            raise CheckpointFormatError(f"{path}: lm_head.weight differs from {_embedding_key(cfg)} but the "
                                        "config ties them (tie_word_embeddings); load with tie_embeddings=False")
    expected = {key for key, _, _ in rows}
    missing = [key for key, _, _ in rows if key not in tensors]
    if missing:
        raise CheckpointFormatError(f"{path}: missing key(s) {_listed(missing)} for {_describe(cfg)}")
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        raise CheckpointFormatError(f"{path}: unexpected key(s) {_listed(unexpected)} for {_describe(cfg)}")
    flat = {}
    for key, jax_path, layout in rows:
        want = _hf_shape(reference[jax_path].shape, layout)
        array = tensors[key]
        if key == "transformer.wpe.weight" and array.ndim == 2 and array.shape[0] > want[0]:
            array = array[:want[0]]  # a shorter block_size than n_positions
        if tuple(array.shape) != want:
            raise CheckpointFormatError(f"{path}: {key} has shape {tuple(array.shape)}, expected {want} for "
                                        f"{_describe(cfg)}")
        # a copy in float32: params are float32, and the arrays must not alias the file's buffers
        flat[jax_path] = jnp.asarray(np.array(layout.to_jax(array), dtype=np.float32, order="C"))
    return traverse_util.unflatten_dict(flat)


def _hf_shape(shape: tuple, layout: Layout) -> tuple:
    return tuple(layout.to_torch(np.broadcast_to(np.zeros((), np.float32), shape)).shape)


def _describe(cfg: ModelConfig) -> str:
    fields = ("vocab_size", "n_layer", "n_embd", "n_head", "n_kv_head", "head_dim", "mlp_hidden", "tie_embeddings")
    return f"{type(cfg).__name__}(" + ", ".join(f"{f}={getattr(cfg, f)}" for f in fields if hasattr(cfg, f)) + ")"


def load_pretrained(path: str | Path, **overrides: Any) -> tuple[nnx.Module, HFInfo]:
    """The jaxtrain model (a :class:`GPT` for ``gpt2``, a :class:`Llama` for ``llama``) of a Hugging Face
    directory, with its weights, and what else the directory holds.

    ``overrides`` go to :func:`config_from_hf` (e.g. ``dtype="bfloat16"``,
    ``block_size=512``, ``remat=True``). Errors are one-line
    :class:`jaxtrain.errors.CheckpointFormatError` s (``ValueError``).
    """
    path = Path(path)
    hf = read_config_json(path)
    cfg = config_from_hf(path, **overrides)
    params = load_hf_params(path, cfg)
    model_cls = GPT if isinstance(cfg, GPTConfig) else Llama
    graphdef, state = nnx.split(nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, params)
    tokenizer = path / TOKENIZER
    info = HFInfo(path=path, model_type=hf["model_type"], config=cfg,
                  tokenizer_json=tokenizer if tokenizer.is_file() else None, hf_config=hf)
    return nnx.merge(graphdef, state), info


# ---------------------------------------------------------------- writing


def save_pretrained(model: nnx.Module, path: str | Path, *, tokenizer_json: str | Path | None = None,
                    extra_config: Optional[dict] = None) -> Path:
    """Write ``model`` (a jaxtrain GPT or Llama) as a Hugging Face directory: ``config.json`` and
    ``model.safetensors`` in float32, and ``tokenizer.json`` when given.

    ``transformers.AutoModelForCausalLM.from_pretrained(path)`` loads the result
    (``GPT2LMHeadModel`` / ``LlamaForCausalLM``). ``extra_config`` adds or
    replaces ``config.json`` keys, e.g. ``{"eos_token_id": 0}`` (the token ids
    are null otherwise). Returns ``path``.

    Raises:
      CheckpointFormatError: for a model Hugging Face cannot represent (a GPT
        without biases) or a ``tokenizer_json`` that is not a file.
    """
    _require_safetensors()
    from safetensors.numpy import save_file

    cfg, path = _config_of(model), Path(path)
    hf = {**hf_config_dict(cfg), **(extra_config or {})}
    if tokenizer_json is not None and not Path(tokenizer_json).is_file():
        raise CheckpointFormatError(f"save_pretrained: tokenizer_json={str(tokenizer_json)!r} is not a file")
    params = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    tensors = {key: np.ascontiguousarray(layout.to_torch(np.asarray(params[jax_path], dtype=np.float32)))
               for key, jax_path, layout in weight_rows(cfg)}
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / WEIGHTS), metadata={"format": "pt"})  # transformers wants the format tag
    (path / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    if tokenizer_json is not None and Path(tokenizer_json).resolve() != (path / TOKENIZER).resolve():
        shutil.copyfile(tokenizer_json, path / TOKENIZER)
    return path
