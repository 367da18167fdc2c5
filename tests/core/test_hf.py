"""Hugging Face checkpoints: import, export and training parity with ``transformers``, offline.

Random-weight ``GPT2LMHeadModel`` / ``LlamaForCausalLM`` models from small
configs (two or more per architecture: head counts, tied and untied heads,
exact and tanh GELU, epsilons, rotary bases, grouped- and multi-query
attention, ``head_dim != n_embd / n_head``) are saved with
``save_pretrained``, imported with :func:`jaxtrain.models.load_pretrained`,
exported again with :func:`jaxtrain.models.save_pretrained` and reloaded with
``AutoModelForCausalLM``.

Tolerances (measured on this CPU in brackets):

- logits after import and after export: max |diff| / max |logit| <= 1e-4      [<= 3e-7]
- 8 training steps, PyTorch AdamW + clip_grad_norm_ on the HF model against
  jaxtrain's train_step + make_optimizer on the imported one, same batches and
  settings: loss <= 2e-5 relative, pre-clip gradient norm <= 1e-4 relative at
  every step                                                                   [<= 3e-7, <= 2e-6]
- final weights: per tensor ||jax - torch|| <= 1e-4 ||torch|| and far below how far they moved

Weight decay mirrors :func:`jaxtrain.decay_mask` in torch's parameter groups:
matrices decay, vectors do not, embedding tables only with ``decay_embeddings``.
Clipping: torch scales by ``max_norm / (norm + 1e-6)``, optax by ``max_norm /
norm``; AdamW's update is nearly invariant to that 1e-6 relative scale, so no
correction is applied (see tests/core/test_parity_torch.py).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxtrain import OptimConfig, TrainState, make_optimizer, train_step
from jaxtrain.errors import CheckpointFormatError
from jaxtrain.models import (GPT, GPTConfig, Llama, LlamaConfig, config_from_hf, load_hf_params, load_pretrained,
                             save_pretrained)
from jaxtrain.models.hf import weight_rows

LOGITS_RTOL = 1e-4
LOSS_RTOL, GRAD_NORM_RTOL = 2e-5, 1e-4
STEPS, BATCH = 8, 4
LR, BETAS, EPS, WD, MAX_NORM = 3e-3, (0.9, 0.95), 1e-8, 0.1, 1.0
NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)

GPT2 = {
    "tied-tanh-3heads": dict(vocab_size=101, n_positions=24, n_embd=48, n_layer=2, n_head=3, **NO_DROPOUT),
    "untied-exact-inner80": dict(vocab_size=67, n_positions=16, n_embd=32, n_layer=3, n_head=4, n_inner=80,
                                 activation_function="gelu", layer_norm_epsilon=1e-6, tie_word_embeddings=False,
                                 **NO_DROPOUT),
}
LLAMA = {
    "gqa-untied-headdim16": dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=24,
                                 rms_norm_eps=1e-6, rope_theta=500.0, tie_word_embeddings=False),
    "mqa-tied": dict(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=16, rms_norm_eps=1e-5,
                     rope_theta=10000.0, tie_word_embeddings=True),
    "gqa-6heads-theta1e6": dict(vocab_size=50, hidden_size=36, intermediate_size=56, num_hidden_layers=1,
                                num_attention_heads=6, num_key_value_heads=3, head_dim=10, max_position_embeddings=20,
                                rms_norm_eps=1e-5, rope_theta=1e6, tie_word_embeddings=False),
}
CASES = [("gpt2", name) for name in GPT2] + [("llama", name) for name in LLAMA]
# the fast tier checks one model of each kind; the slow one all of them
FAST_FIRST = [pytest.param(*case, marks=() if case in (CASES[0], CASES[2]) else pytest.mark.slow) for case in CASES]


def hf_model(kind: str, name: str, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2[name]))
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA[name]))


def tokens(model, batch: int = 2, seed: int = 0) -> np.ndarray:
    cfg = model.config
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, cfg.max_position_embeddings))


def hf_logits(model, x: np.ndarray) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(x)).logits.numpy()


@nnx.jit
def jax_logits(model, x):
    return model(x)


def rel_max(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each case's HF model, saved once: ``{case: (hf_model, directory)}``."""
    out = {}
    for kind, name in CASES:
        model = hf_model(kind, name)
        path = tmp_path_factory.mktemp(f"{kind}-{name}")
        model.save_pretrained(path)
        out[kind, name] = model, path
    return out


@pytest.mark.parametrize("kind,name", FAST_FIRST)
def test_import_and_export_match_transformers(kind, name, saved, tmp_path):
    hf, path = saved[kind, name]
    model, info = load_pretrained(path)
    assert isinstance(model, GPT if kind == "gpt2" else Llama) and info.model_type == kind
    assert info.tokenizer_json is None and info.config == model.config
    x = tokens(hf)
    ours = np.asarray(jax_logits(model, jnp.asarray(x)))
    assert rel_max(ours, hf_logits(hf, x)) <= LOGITS_RTOL

    save_pretrained(model, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(back) is type(hf)
    assert rel_max(ours, hf_logits(back, x)) <= LOGITS_RTOL
    # the same tensors under the same names (a tied head is not stored)
    theirs, mine = load_file(path / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(mine) == sorted(theirs)
    for key in theirs:
        np.testing.assert_array_equal(mine[key], theirs[key])


def test_config_mapping(saved):
    gpt = config_from_hf(saved["gpt2", "untied-exact-inner80"][1])
    assert gpt == GPTConfig(vocab_size=67, block_size=16, n_layer=3, n_head=4, n_embd=32, dropout=0.0, bias=True,
                            tie_embeddings=False, activation="gelu", norm_eps=1e-6, mlp_hidden=80)
    assert config_from_hf(saved["gpt2", "tied-tanh-3heads"][1]).activation == "gelu_tanh"
    llama = config_from_hf(saved["llama", "gqa-untied-headdim16"][1], dtype="bfloat16", block_size=64)
    assert llama == LlamaConfig(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=48,
                                head_dim=16, mlp_hidden=80, norm_eps=1e-6, rope_theta=500.0, tie_embeddings=False,
                                dtype="bfloat16")


def test_gpt2_block_size_crops_the_position_table(saved):
    hf, path = saved["gpt2", "tied-tanh-3heads"]
    model, _ = load_pretrained(path, block_size=10)
    x = tokens(hf)[:, :10]
    assert model.wpe.embedding.shape == (10, 48)
    assert rel_max(np.asarray(jax_logits(model, jnp.asarray(x))), hf_logits(hf, x)) <= LOGITS_RTOL
    with pytest.raises(CheckpointFormatError, match=r"block_size=32 exceeds n_positions=24"):
        config_from_hf(path, block_size=32)


def test_load_hf_params_puts_the_weights_into_a_model_built_elsewhere(saved):
    hf, path = saved["llama", "mqa-tied"]
    cfg = config_from_hf(path, remat=True)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    nnx.update(model, load_hf_params(path, model))
    x = tokens(hf)
    assert rel_max(np.asarray(jax_logits(model, jnp.asarray(x))), hf_logits(hf, x)) <= LOGITS_RTOL


def test_a_base_model_checkpoint_loads_with_a_tied_head(tmp_path):
    torch.manual_seed(0)
    base = transformers.GPT2Model(transformers.GPT2Config(**GPT2["tied-tanh-3heads"]))
    base.save_pretrained(tmp_path)  # keys without "transformer.", no lm_head
    model, _ = load_pretrained(tmp_path)
    np.testing.assert_array_equal(model.wte.embedding[...], base.wte.weight.detach().numpy())


def test_sharded_bfloat16_checkpoint_and_tokenizer(saved, tmp_path):
    hf, _ = saved["llama", "gqa-untied-headdim16"]
    low = hf_model("llama", "gqa-untied-headdim16").to(torch.bfloat16)
    low.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    (tmp_path / "tokenizer.json").write_text("{}")
    model, info = load_pretrained(tmp_path)
    assert info.tokenizer_json == tmp_path / "tokenizer.json"
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert {x.dtype for x in leaves} == {jnp.dtype(jnp.float32)}
    # bfloat16 widens to float32 exactly
    want = low.model.layers[1].mlp.up_proj.weight.detach().float().numpy().T
    np.testing.assert_array_equal(model.layers[1].mlp.up_proj.kernel[...], want)
    save_pretrained(model, tmp_path / "out", tokenizer_json=info.tokenizer_json)
    assert (tmp_path / "out" / "tokenizer.json").read_text() == "{}"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "float32"


def test_transformers_4_config_reads_the_top_level_rope_theta(saved, tmp_path):
    _, path = saved["llama", "gqa-untied-headdim16"]
    hf = json.loads((path / "config.json").read_text())
    hf.pop("rope_parameters")
    hf.update(rope_theta=1234.0, rope_scaling=None)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    assert config_from_hf(tmp_path).rope_theta == 1234.0


# ---------------------------------------------------------------- errors


def _one_line(info, *needles):
    message = str(info.value)
    assert len(message.splitlines()) == 1, message
    for needle in needles:
        assert needle in message, message


@pytest.fixture
def llama_dir(tmp_path):
    cfg = LlamaConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_kv_head=1, n_embd=16, mlp_hidden=24)
    return save_pretrained(Llama(cfg, rngs=nnx.Rngs(0)), tmp_path / "llama")


def _edit_config(path, **changes):
    hf = json.loads((path / "config.json").read_text())
    hf.update(changes)
    (path / "config.json").write_text(json.dumps(hf))


def _edit_weights(path, change):
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_unsupported_model_type_names_the_supported_ones(llama_dir):
    _edit_config(llama_dir, model_type="bert")
    with pytest.raises(CheckpointFormatError) as info:
        load_pretrained(llama_dir)
    _one_line(info, str(llama_dir / "config.json"), "model_type='bert' is not supported; supported: gpt2, llama")


def test_unsupported_architecture(llama_dir):
    _edit_config(llama_dir, architectures=["LlamaForSequenceClassification"])
    with pytest.raises(CheckpointFormatError) as info:
        load_pretrained(llama_dir)
    _one_line(info, "'LlamaForSequenceClassification' is not supported", "LlamaForCausalLM")


def test_missing_key(llama_dir):
    _edit_weights(llama_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointFormatError) as info:
        load_pretrained(llama_dir)
    _one_line(info, str(llama_dir), "missing key(s) model.layers.1.mlp.up_proj.weight")


def test_extra_key(llama_dir):
    _edit_weights(llama_dir, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": np.ones(8, np.float32)}))
    with pytest.raises(CheckpointFormatError) as info:
        load_pretrained(llama_dir)
    _one_line(info, str(llama_dir), "unexpected key(s) model.layers.0.self_attn.q_norm.weight")


def test_shape_mismatch_names_key_expected_and_found(llama_dir):
    _edit_config(llama_dir, intermediate_size=32)
    with pytest.raises(CheckpointFormatError) as info:
        load_pretrained(llama_dir)
    _one_line(info, str(llama_dir), "model.layers.0.mlp.gate_proj.weight has shape (24, 16), expected (32, 16)")


def test_missing_files(llama_dir, tmp_path):
    with pytest.raises(CheckpointFormatError) as info:
        load_pretrained(tmp_path / "nowhere")
    _one_line(info, "nowhere: not a directory")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointFormatError) as info:
        load_pretrained(tmp_path / "empty")
    _one_line(info, "empty: no config.json")
    (llama_dir / "model.safetensors").unlink()
    (llama_dir / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointFormatError) as info:
        load_pretrained(llama_dir)
    _one_line(info, "no model.safetensors or model.safetensors.index.json", "pytorch_model.bin")


@pytest.mark.parametrize("changes,needle", [
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}),
     "rope_parameters.rope_type='llama3' is not supported"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling.rope_type='linear' is not supported"),
    (dict(attention_bias=True), "attention_bias=True is not supported"),
    (dict(mlp_bias=True), "mlp_bias=True is not supported"),
    (dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
    (dict(num_key_value_heads=3, num_attention_heads=4), "n_kv_head=3: must divide n_head=4"),
])
def test_what_the_llama_cannot_compute_is_refused(llama_dir, changes, needle):
    _edit_config(llama_dir, **changes)
    with pytest.raises(CheckpointFormatError) as info:
        config_from_hf(llama_dir)
    _one_line(info, str(llama_dir / "config.json"), needle)


def test_gpt2_settings_that_are_refused(tmp_path):
    path = save_pretrained(GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16),
                               rngs=nnx.Rngs(0)), tmp_path)
    assert config_from_hf(path).activation == "gelu"  # the default GPT exports its exact GELU as "gelu"
    for changes, needle in [(dict(activation_function="relu"), "activation_function='relu' is not supported"),
                            (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx=True")]:
        _edit_config(path, **{"activation_function": "gelu", "scale_attn_by_inverse_layer_idx": False, **changes})
        with pytest.raises(CheckpointFormatError) as info:
            config_from_hf(path)
        _one_line(info, needle)


def test_a_gpt_without_biases_is_not_exported(tmp_path):
    model = GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16, bias=False), rngs=nnx.Rngs(0))
    with pytest.raises(CheckpointFormatError) as info:
        save_pretrained(model, tmp_path)
    _one_line(info, "bias=False has no Hugging Face GPT-2 equivalent")
    assert not (tmp_path / "config.json").exists()


def test_a_tied_head_that_differs_is_refused(llama_dir):
    _edit_config(llama_dir, tie_word_embeddings=True)
    _edit_weights(llama_dir, lambda t: t.update({"lm_head.weight": t["lm_head.weight"] + 1}))
    with pytest.raises(CheckpointFormatError) as info:
        load_pretrained(llama_dir)
    _one_line(info, "lm_head.weight differs from model.embed_tokens.weight")


# ---------------------------------------------------------------- training parity


def torch_adamw(model, decay_embeddings: bool):
    """torch AdamW with jaxtrain's decay_mask as parameter groups (named_parameters counts a tied table once)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        is_table = any(t in name for t in ("wte", "wpe", "embed_tokens"))
        (decay if p.dim() >= 2 and (decay_embeddings or not is_table) else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=LR, betas=BETAS, eps=EPS)


def train_both(kind, name, path, decay_embeddings):
    hf = hf_model(kind, name)  # the same weights as the saved directory
    hf.train()
    opt = torch_adamw(hf, decay_embeddings)
    model, _ = load_pretrained(path)
    tx = make_optimizer(OptimConfig(lr=LR, schedule="constant", warmup_steps=0, b1=BETAS[0], b2=BETAS[1], eps=EPS,
                                    weight_decay=WD, decay_embeddings=decay_embeddings, max_grad_norm=MAX_NORM))
    state = TrainState.create(model, tx, rng=0)
    step = jax.jit(train_step, donate_argnums=0)
    T, V = hf.config.max_position_embeddings, hf.config.vocab_size
    data = np.random.default_rng(1).integers(0, V, (STEPS, BATCH, T + 1))
    out = {k: [] for k in ("torch_loss", "torch_norm", "jax_loss", "jax_norm")}
    for t in range(STEPS):
        x, y = data[t, :, :-1], data[t, :, 1:]
        logits = hf(torch.from_numpy(x)).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), torch.from_numpy(y).reshape(-1))
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(hf.parameters(), MAX_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state, metrics = step(state, {"inputs": jnp.asarray(x), "targets": jnp.asarray(y)})
        out["torch_loss"].append(loss.item())
        out["torch_norm"].append(norm.item())
        out["jax_loss"].append(float(metrics["loss"]))
        out["jax_norm"].append(float(metrics["grad_norm"]))
    return {k: np.array(v) for k, v in out.items()}, hf, state


@pytest.mark.slow
@pytest.mark.parametrize("kind,name", CASES)
def test_eight_training_steps_match_pytorch(kind, name, saved):
    decay_embeddings = name.startswith(("tied", "gqa-untied"))  # both settings of the mask across the cases
    runs, hf, state = train_both(kind, name, saved[kind, name][1], decay_embeddings)
    loss_rel = np.abs(runs["jax_loss"] - runs["torch_loss"]) / np.abs(runs["torch_loss"])
    norm_rel = np.abs(runs["jax_norm"] - runs["torch_norm"]) / np.abs(runs["torch_norm"])
    assert loss_rel.max() <= LOSS_RTOL, f"loss rel diff per step: {loss_rel}"
    assert norm_rel.max() <= GRAD_NORM_RTOL, f"grad norm rel diff per step: {norm_rel}"
    print(f"{kind}-{name}: max rel diff loss {loss_rel.max():.2g}, grad norm {norm_rel.max():.2g}")
    # and the weights moved alike: norm-wise per tensor, as AdamW amplifies rounding in near-zero gradients;
    # GPT-2's key bias has an exactly zero gradient (softmax ignores q . b_k), so both sides move it by
    # amplified rounding noise alone: bounded in absolute terms (see tests/core/test_parity_torch.py)
    start = {k: v.detach().numpy() for k, v in hf_model(kind, name).state_dict().items()}
    theirs = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    flat = {tuple(getattr(p, "key", p) for p in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    for key, jax_path, layout in weight_rows(state.model().config):
        mine, moved = layout.to_torch(np.asarray(flat[jax_path])), theirs[key] - start[key]
        if key.endswith("attn.c_attn.bias"):
            mine_qkv, theirs_qkv, moved_qkv = (np.split(a, 3) for a in (mine, theirs[key], moved))
            assert np.abs(mine_qkv[1] - theirs_qkv[1]).max() <= 1e-4, key
            mine, theirs[key], moved = (np.concatenate([a[0], a[2]]) for a in (mine_qkv, theirs_qkv, moved_qkv))
        assert np.linalg.norm(moved) > 10 * np.linalg.norm(mine - theirs[key]), key
        assert np.linalg.norm(mine - theirs[key]) <= 1e-4 * np.linalg.norm(theirs[key]), key
