"""Hugging Face ``config.json`` <-> jaxtrain model configs (:class:`GPTConfig` for ``gpt2``,
:class:`LlamaConfig` for ``llama``). JAX-free, like the configs themselves.

What a jaxtrain model cannot compute is refused with one line naming the file
and the setting (biases in Llama, RoPE scaling, GPT-2's per-layer attention
scaling, activations other than GELU/SiLU...), never silently approximated.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Union

from jaxtrain.errors import CheckpointFormatError
from jaxtrain.models.gpt_config import GPTConfig
from jaxtrain.models.llama_config import LlamaConfig

__all__ = ["ARCHITECTURES", "ModelConfig", "read_config_json", "config_from_hf", "hf_config_dict"]

ModelConfig = Union[GPTConfig, LlamaConfig]
# model_type -> the architectures whose weights load into a jaxtrain model (the base models lack lm_head)
ARCHITECTURES = {"gpt2": ("GPT2LMHeadModel", "GPT2Model"), "llama": ("LlamaForCausalLM", "LlamaModel")}
# HF GPT-2 activation_function -> GPTConfig.activation (gelu_fast is the tanh formula written another way)
_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_python_tanh": "gelu_tanh",
                     "gelu_fast": "gelu_tanh", "gelu": "gelu", "gelu_python": "gelu"}
_DTYPE = "float32"  # jaxtrain's params are float32, and so is what it writes


def read_config_json(path: str | Path) -> dict:
    """``path/config.json`` as a dict, with ``model_type`` checked; one-line errors otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointFormatError(f"{path}: not a directory; expected a Hugging Face model directory with "
                                    "config.json and model.safetensors")
    file = path / "config.json"
    if not file.is_file():
        raise CheckpointFormatError(f"{path}: no config.json; a Hugging Face model directory holds config.json "
                                    "and model.safetensors (or model.safetensors.index.json)")
    try:
        hf = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointFormatError(f"{file}: not readable JSON ({e})") from None
    if not isinstance(hf, dict):
        raise CheckpointFormatError(f"{file}: expected a JSON object, found {type(hf).__name__}")
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise CheckpointFormatError(f"{file}: model_type={model_type!r} is not supported; supported: "
                                    f"{', '.join(ARCHITECTURES)}")
    archs = hf.get("architectures") or []
    unknown = [a for a in archs if a not in ARCHITECTURES[model_type]]
    if unknown:
        raise CheckpointFormatError(f"{file}: architecture {unknown[0]!r} is not supported; supported for "
                                    f"{model_type}: {', '.join(ARCHITECTURES[model_type])}")
    return hf


def config_from_hf(path: str | Path, **overrides: Any) -> ModelConfig:
    """The jaxtrain config of the Hugging Face model in directory ``path`` (reads only ``config.json``).

    ``model_type`` ``gpt2`` gives a :class:`GPTConfig` (biases, exact or tanh
    GELU as ``activation_function`` says, ``n_inner`` as ``mlp_hidden``), ``llama``
    a :class:`LlamaConfig`. ``overrides`` replace fields afterwards, e.g.
    ``dtype="bfloat16"``, ``remat=True``, ``dropout=0.0`` or ``block_size``
    (for GPT-2 at most ``n_positions``: the position table is cropped).

    GPT-2's three dropout rates become jaxtrain's one ``dropout``: their common
    value, else ``resid_pdrop`` (pass ``dropout=`` to choose).

    Raises:
      CheckpointFormatError: (a ``ValueError``) one line naming the file and the
        setting jaxtrain cannot represent, or an unknown override.
    """
    hf = read_config_json(path)
    file = Path(path) / "config.json"
    cfg = _gpt2(hf, file) if hf["model_type"] == "gpt2" else _llama(hf, file)
    fields = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise CheckpointFormatError(f"config_from_hf: unknown override(s) {', '.join(unknown)} for "
                                    f"{type(cfg).__name__}; the fields are {', '.join(sorted(fields))}")
    if (isinstance(cfg, GPTConfig) and overrides.get("block_size") is not None
            and overrides["block_size"] > cfg.block_size):
        raise CheckpointFormatError(f"{file}: block_size={overrides['block_size']} exceeds n_positions="
                                    f"{cfg.block_size}, the rows of GPT-2's position table; use at most that")
    return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def _need(hf: dict, file: Path, key: str) -> Any:
    if hf.get(key) is None:
        raise CheckpointFormatError(f"{file}: missing {key!r}, which a {hf['model_type']} config needs")
    return hf[key]


def _refuse(file: Path, what: str, value: Any, allowed: str) -> CheckpointFormatError:
    return CheckpointFormatError(f"{file}: {what}={value!r} is not supported by jaxtrain's model; {allowed}")


def _gpt2(hf: dict, file: Path) -> GPTConfig:
    act = hf.get("activation_function", "gelu_new")
    if act not in _GPT2_ACTIVATIONS:
        raise _refuse(file, "activation_function", act, f"supported: {', '.join(_GPT2_ACTIVATIONS)}")
    if not hf.get("scale_attn_weights", True):
        raise _refuse(file, "scale_attn_weights", False, "only 1/sqrt(head_dim) scaling (true)")
    if hf.get("scale_attn_by_inverse_layer_idx", False):
        raise _refuse(file, "scale_attn_by_inverse_layer_idx", True, "only false")
    if hf.get("add_cross_attention", False):
        raise _refuse(file, "add_cross_attention", True, "only decoder-only models (false)")
    n_embd, n_head = _need(hf, file, "n_embd"), _need(hf, file, "n_head")
    if n_embd % n_head:
        raise _refuse(file, "n_embd", n_embd, f"it must be divisible by n_head={n_head}")
    rates = [hf.get(k, 0.1) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")]
    return GPTConfig(vocab_size=_need(hf, file, "vocab_size"), block_size=_need(hf, file, "n_positions"),
                     n_layer=_need(hf, file, "n_layer"), n_head=n_head, n_embd=n_embd,
                     dropout=float(rates[0]), bias=True, tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
                     activation=_GPT2_ACTIVATIONS[act], norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
                     mlp_hidden=hf.get("n_inner"))


def _rope_theta(hf: dict, file: Path) -> float:
    """transformers 5 writes ``rope_parameters: {rope_theta, rope_type}``; 4.x a top-level ``rope_theta``
    and ``rope_scaling``."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    for source, block in (("rope_parameters", params), ("rope_scaling", scaling or {})):
        kind = block.get("rope_type", block.get("type", "default"))
        if kind != "default":
            raise _refuse(file, f"{source}.rope_type", kind, "only the default rotary embedding (no RoPE scaling)")
    if set(scaling or {}) - {"rope_type", "type"}:
        raise _refuse(file, "rope_scaling", scaling, "only the default rotary embedding (rope_scaling null)")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _llama(hf: dict, file: Path) -> LlamaConfig:
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key, False):
            raise _refuse(file, key, hf[key], "jaxtrain's Llama has no biases (false)")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise _refuse(file, "hidden_act", act, "only silu (SwiGLU)")
    n_embd, n_head = _need(hf, file, "hidden_size"), _need(hf, file, "num_attention_heads")
    n_kv = hf.get("num_key_value_heads") or n_head
    cfg = LlamaConfig(vocab_size=_need(hf, file, "vocab_size"),
                      block_size=int(hf.get("max_position_embeddings", 2048)),
                      n_layer=_need(hf, file, "num_hidden_layers"), n_head=n_head, n_kv_head=n_kv, n_embd=n_embd,
                      head_dim=hf.get("head_dim"), mlp_hidden=_need(hf, file, "intermediate_size"),
                      norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=_rope_theta(hf, file),
                      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                      dropout=float(hf.get("attention_dropout", 0.0)))
    problems = cfg.problems()
    if problems:
        raise CheckpointFormatError(f"{file}: {problems[0]}")
    return cfg


def hf_config_dict(cfg: ModelConfig) -> dict:
    """The ``config.json`` contents for a jaxtrain config (what ``AutoModelForCausalLM.from_pretrained`` reads).

    Raises:
      CheckpointFormatError: for a GPT without biases (Hugging Face's GPT-2 always has them).
    """
    common = {"torch_dtype": _DTYPE, "dtype": _DTYPE, "use_cache": True, "initializer_range": 0.02,
              "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
              "tie_word_embeddings": cfg.tie_embeddings, "vocab_size": cfg.vocab_size}
    if isinstance(cfg, GPTConfig):
        if not cfg.bias:
            raise CheckpointFormatError("save_pretrained: a GPT with bias=False has no Hugging Face GPT-2 "
                                        "equivalent (GPT-2 always has biases); train with model.bias=true to export")
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", **common,
                "n_positions": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
                "n_inner": cfg.mlp_hidden, "activation_function": "gelu_new" if cfg.activation == "gelu_tanh" else "gelu",
                "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
                "attn_pdrop": cfg.dropout, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                "reorder_and_upcast_attn": False, "add_cross_attention": False}
    if isinstance(cfg, LlamaConfig):
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **common,
                "hidden_size": cfg.n_embd, "intermediate_size": cfg.mlp_width, "num_hidden_layers": cfg.n_layer,
                "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_size,
                "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
                "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
                "rope_theta": cfg.rope_theta, "rope_scaling": None, "hidden_act": "silu",
                "attention_bias": False, "mlp_bias": False, "attention_dropout": cfg.dropout, "pretraining_tp": 1}
    raise TypeError(f"hf_config_dict: expected a GPTConfig or LlamaConfig, got {type(cfg).__name__}")
