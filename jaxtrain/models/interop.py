"""PyTorch interop: nanoGPT-format ``state_dict`` <-> jaxtrain GPT params.

This module is the one place that knows how the two parameter layouts map onto
each other: the tables below list every nanoGPT key, the jaxtrain path it
maps to, and how the array is laid out on each side (a ``Layout``). If the
GPT's parameter layout changes (names, fused or stacked weights), change the
tables, ``Layout``s and ``_table`` here, and keep ``tests/core/test_interop.py`` and
``tests/core/test_parity_torch.py`` green.

Example::

    sd = torch_model.state_dict()                      # nanoGPT key names
    params = from_torch_state_dict(state.params, sd)   # -> a params pytree like state.params
    state = state.replace(params=params)               # on a fresh state: Adam's moments are zeros
    sd_np = to_torch_state_dict(state.params, cfg)     # -> {nanoGPT key: np.ndarray}
    torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in sd_np.items()})
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtrain.models.gpt import GPT, GPTConfig

__all__ = ["from_torch_state_dict", "to_torch_state_dict"]

PyTree = Any
Path = tuple  # keys into the nested params dict, e.g. ("h", 0, "attn", "c_attn", "kernel")


class Layout(NamedTuple):
    """How one array is stored in PyTorch versus jaxtrain."""

    to_jax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


SAME = Layout(lambda a: a, lambda a: a)
# torch.nn.Linear stores weight as (out, in); a Flax kernel is (in, out).
LINEAR = Layout(lambda w: w.T, lambda k: k.T)

# (nanoGPT key, jaxtrain path, layout), in nanoGPT's state_dict order. Rows whose
# jaxtrain path does not exist in the model (no biases, tied lm_head) are dropped.
_EMBEDDINGS = (
    ("transformer.wte.weight", ("wte", "embedding"), SAME),
    ("transformer.wpe.weight", ("wpe", "embedding"), SAME),
)
_BLOCK = (  # under "transformer.h.{i}." / ("h", i)
    ("ln_1.weight", ("ln_1", "scale"), SAME),
    ("ln_1.bias", ("ln_1", "bias"), SAME),
    ("attn.c_attn.weight", ("attn", "c_attn", "kernel"), LINEAR),
    ("attn.c_attn.bias", ("attn", "c_attn", "bias"), SAME),
    ("attn.c_proj.weight", ("attn", "c_proj", "kernel"), LINEAR),
    ("attn.c_proj.bias", ("attn", "c_proj", "bias"), SAME),
    ("ln_2.weight", ("ln_2", "scale"), SAME),
    ("ln_2.bias", ("ln_2", "bias"), SAME),
    ("mlp.c_fc.weight", ("mlp", "c_fc", "kernel"), LINEAR),
    ("mlp.c_fc.bias", ("mlp", "c_fc", "bias"), SAME),
    ("mlp.c_proj.weight", ("mlp", "c_proj", "kernel"), LINEAR),
    ("mlp.c_proj.bias", ("mlp", "c_proj", "bias"), SAME),
)
_HEAD = (
    ("transformer.ln_f.weight", ("ln_f", "scale"), SAME),
    ("transformer.ln_f.bias", ("ln_f", "bias"), SAME),
    ("lm_head.weight", ("lm_head", "kernel"), LINEAR),
)
# With tied embeddings nanoGPT still saves lm_head.weight (the wte tensor again).
_TIED_KEY, _TIED_TO = "lm_head.weight", "transformer.wte.weight"
# Non-parameter buffers nanoGPT (or HF GPT-2) may save: the causal-mask tensors.
_BUFFERS = re.compile(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)")
# torch.compile wraps the module and prefixes every key with this.
_COMPILED_PREFIX = "_orig_mod."

Row = tuple[str, Path, Layout]


def _get(tree: PyTree, path: Path) -> Any:
    for k in path:
        if not isinstance(tree, Mapping) or k not in tree:
            return None
        tree = tree[k]
    return tree


def _set(tree: dict, path: Path, value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _dotted(path: Path) -> str:
    return ".".join(map(str, path))


def _describe(cfg: GPTConfig) -> str:
    return (f"n_layer={cfg.n_layer}, n_embd={cfg.n_embd}, vocab_size={cfg.vocab_size}, "
            f"block_size={cfg.block_size}, bias={cfg.bias}, tie_embeddings={cfg.tie_embeddings}")


def _table(reference: PyTree) -> list[Row]:
    """The rows that apply to a GPT whose params look like ``reference``."""
    blocks = sorted(_get(reference, ("h",)) or {})
    rows = list(_EMBEDDINGS)
    for i in blocks:
        rows += [(f"transformer.h.{i}.{key}", ("h", i, *path), layout) for key, path, layout in _BLOCK]
    rows += _HEAD
    return [row for row in rows if _get(reference, row[1]) is not None]


def _is_tied(reference: PyTree) -> bool:
    return _get(reference, ("lm_head",)) is None


def _reference_params(model: Any) -> PyTree:
    """A nested dict of arrays (or shape structs) for a GPT, its params, or its config."""
    if isinstance(model, GPTConfig):
        cfg = model
        model = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))  # shapes only, nothing allocated
    if isinstance(model, nnx.Module):
        model = nnx.state(model, nnx.Param)
    if isinstance(model, nnx.State):
        model = nnx.to_pure_dict(model)
    if not isinstance(model, Mapping):
        raise TypeError(f"expected a jaxtrain GPT, its config or its params dict, got {type(model).__name__}")
    return model


def _torch_shape(leaf: Any, layout: Layout) -> tuple[int, ...]:
    # A zero-stride view: the layout's transform gives the shape without copying data.
    return layout.to_torch(np.broadcast_to(np.zeros((), np.float32), leaf.shape)).shape


def _to_numpy(x: Any) -> np.ndarray:
    """A torch tensor (any dtype, device) or array-like as a numpy array."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _mismatch_error(what: str, missing: list[str], unexpected: list[str],
                    misshaped: list[str], extra: list[str] = ()) -> ValueError:
    def listed(keys: list[str], limit: int = 8) -> str:
        more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
        return ", ".join(keys[:limit]) + more

    parts = []
    if missing:
        parts.append(f"missing keys: {listed(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {listed(unexpected)}")
    if misshaped:
        parts.append(f"wrong shapes: {listed(misshaped)}")
    parts += extra
    return ValueError(f"{what}: " + "; ".join(parts))


def from_torch_state_dict(model: Any, state_dict: Mapping[str, Any]) -> PyTree:
    """Params for a jaxtrain GPT from a nanoGPT-format PyTorch ``state_dict``.

    Args:
      model: the target GPT: an ``nnx.Module``, its ``GPTConfig``, or a params
        dict such as ``TrainState.params``; it fixes the expected keys, shapes
        and dtypes.
      state_dict: ``{nanoGPT key: torch.Tensor | np.ndarray}``. Linear weights
        are ``(out, in)`` and are transposed to Flax ``(in, out)`` kernels. With
        tied embeddings ``lm_head.weight`` may be present (it must then equal
        ``transformer.wte.weight``) or absent. Causal-mask buffers
        (``attn.bias``, ``attn.masked_bias``) and a ``_orig_mod.`` prefix from
        ``torch.compile`` are ignored.
    Returns:
      A nested dict of ``jax.Array`` shaped like the model's params.
    Raises:
      ValueError: one message listing every missing key, unexpected key and
        misshaped key (with expected and found shape, in PyTorch layout).
    """
    reference = _reference_params(model)
    sd = {k.removeprefix(_COMPILED_PREFIX): v for k, v in state_dict.items()}
    sd = {k: v for k, v in sd.items() if not _BUFFERS.fullmatch(k)}
    rows = _table(reference)
    known = {key for key, _, _ in rows} | ({_TIED_KEY} if _is_tied(reference) else set())
    missing = [key for key, _, _ in rows if key not in sd]
    unexpected = [key for key in sd if key not in known]
    misshaped = []
    for key, path, layout in rows:
        if key in sd and tuple(sd[key].shape) != (want := _torch_shape(_get(reference, path), layout)):
            misshaped.append(f"{key} expected {want}, found {tuple(sd[key].shape)}")
    extra = []
    if _is_tied(reference) and _TIED_KEY in sd and _TIED_TO in sd and not misshaped:
        if not np.array_equal(_to_numpy(sd[_TIED_KEY]), _to_numpy(sd[_TIED_TO])):
            extra.append(f"{_TIED_KEY} differs from {_TIED_TO} but the model ties them "
                         "(build it with tie_embeddings=False)")
    if missing or unexpected or misshaped or extra:
        raise _mismatch_error("state_dict does not fit the GPT", missing, unexpected, misshaped, extra)
    params: dict = {}
    for key, path, layout in rows:
        # Copy: on CPU, jnp.asarray may alias numpy memory, and tensor.numpy() aliases
        # the torch tensor, so later in-place torch updates would leak into the params.
        array = np.array(layout.to_jax(_to_numpy(sd[key])), dtype=_get(reference, path).dtype, order="C")
        _set(params, path, jnp.asarray(array))
    return params


def to_torch_state_dict(params: PyTree, config: GPTConfig) -> dict[str, np.ndarray]:
    """A nanoGPT-format ``state_dict`` (numpy arrays) from jaxtrain GPT params.

    Args:
      params: the GPT's params (e.g. ``TrainState.params`` or ``nnx.state(model, nnx.Param)``).
      config: the GPT's config; the params are checked against it.
    Returns:
      ``{nanoGPT key: np.ndarray}`` with torch layouts (Linear weights ``(out, in)``),
      in nanoGPT's key order. With tied embeddings ``lm_head.weight`` is
      included (a copy of ``transformer.wte.weight``), as nanoGPT saves it, so
      ``TorchGPT.load_state_dict`` accepts the result as it is.
    Raises:
      ValueError: listing params missing, unexpected or misshaped for ``config``.
    """
    reference = _reference_params(config)
    params = _reference_params(params)
    rows = _table(reference)
    expected = {_dotted(path) for _, path, _ in rows}
    found = {_dotted(tuple(getattr(k, "key", k) for k in p))
             for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    missing = sorted(expected - found)
    unexpected = sorted(found - expected)
    misshaped = [f"{_dotted(path)} expected {_get(reference, path).shape}, found {tuple(have.shape)}"
                 for _, path, _ in rows
                 if (have := _get(params, path)) is not None and tuple(have.shape) != _get(reference, path).shape]
    if missing or unexpected or misshaped:
        raise _mismatch_error(f"params do not fit the GPT of {_describe(config)}", missing, unexpected, misshaped)
    sd = {key: np.array(layout.to_torch(np.asarray(_get(params, path))), order="C") for key, path, layout in rows}
    if _is_tied(reference):
        sd[_TIED_KEY] = sd[_TIED_TO].copy()
    return sd
