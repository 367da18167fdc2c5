"""jaxtrain's ``train_step`` against the PyTorch step it replaces, on a nanoGPT-shaped GPT.

Both sides start from the same weights (PyTorch's, copied with
``from_torch_state_dict``) and take 20 steps on the same batches in float32:

    PyTorch: logits = model(x); F.cross_entropy; loss.backward();
             clip_grad_norm_(params, 1.0); AdamW.step(); zero_grad()
    jaxtrain: jax.jit(train_step, donate_argnums=0)(state, batch)

Tolerances (measured values on CPU in brackets):

- first-forward logits: rtol 1e-5, atol 1e-6                      [max abs diff ~2e-7]
- per-step loss and pre-clip grad norm: 1e-5 relative             [<= 7e-7]
- final params: per tensor ||jax - torch|| / ||torch|| <= 1e-4    [~2e-5, an LN bias]
  Norm-wise, not element-wise: biases start at 0 and move by ~lr per step, and
  AdamW's m / (sqrt(v) + eps) turns a float32 rounding difference in a tiny
  gradient into a step of up to lr, so single near-zero entries can differ
  by a large *relative* amount while the tensor agrees.
- one exception, the key slice of ``attn.c_attn.bias``: softmax ignores a
  constant added to a query's logits, and q . (k + b) = q . k + q . b is such a
  constant, so this bias's exact gradient is zero. Both sides only see rounding
  noise (~1e-10), which AdamW scales to steps of lr * noise / eps, i.e. ~1e-5
  in total. The two noises are unrelated, so we bound the absolute difference
  (1e-4) instead of a relative one.

Both paths run: plain XLA in this process (8 fake devices), and the one-device
path a CPU user gets from the command line, with the CPU backend's kernels
(``jaxtrain.cpu``: MKL matmuls, fused attention/GELU/LayerNorm, fused AdamW), in
a subprocess; the same tolerances hold for both.

Clipping: torch scales by ``max_norm / (norm + 1e-6)``, optax by
``max_norm / norm``. The clipped gradients therefore differ by a factor
1 + 1e-6 / norm ~ 1 + 1e-6; AdamW's m / sqrt(v) is invariant to a gradient scale
(up to eps), so the updates differ by far less than the tolerances above and no
correction is applied. The run is set up so that clipping triggers on the first
steps (norm > 1) and not on the later ones, exercising both branches.
"""


import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxtrain import TrainState, make_optimizer, train_step
from jaxtrain import OptimConfig
from jaxtrain.models import GPT, GPTConfig, from_torch_state_dict, to_torch_state_dict
from benchmark_modules import load_benchmark


torch_gpt = load_benchmark("torch_gpt")

ARCH = dict(vocab_size=256, block_size=32, n_layer=2, n_head=4, n_embd=64, dropout=0.0, bias=True,
            tie_embeddings=True)
LR, BETAS, EPS, WD, MAX_NORM = 1e-3, (0.9, 0.95), 1e-8, 0.1, 1.0
STEPS, BATCH = 20, 8

LOSS_RTOL = 1e-5
GRAD_NORM_RTOL = 1e-5
PARAM_RTOL = 1e-4  # per tensor, norm-wise
KEY_BIAS_ATOL = 1e-4  # absolute, for the zero-gradient key bias (see module docstring)


def _jax_optimizer():
    # Constant lr, no warmup; weight decay on every matrix incl. embeddings, as
    # make_adamw's groups (dim >= 2) do.
    return make_optimizer(OptimConfig(lr=LR, schedule="constant", warmup_steps=0, b1=BETAS[0], b2=BETAS[1],
                                      eps=EPS, weight_decay=WD, decay_embeddings=True, max_grad_norm=MAX_NORM))


def run_both() -> dict:
    """Run both sides for STEPS steps in this process; return what each reported."""
    torch.manual_seed(0)
    torch_model = torch_gpt.TorchGPT(torch_gpt.TorchGPTConfig(**ARCH))
    torch_opt = torch_gpt.make_adamw(torch_model, LR, BETAS, EPS, WD)

    cfg = GPTConfig(**ARCH)
    tx = _jax_optimizer()
    state = TrainState.create(GPT(cfg, rngs=nnx.Rngs(0)), tx, rng=0)
    params = from_torch_state_dict(state.params, torch_model.state_dict())
    state = state.replace(params=params, opt_state=tx.init(params))

    tokens = np.random.default_rng(0).integers(0, ARCH["vocab_size"], (STEPS, BATCH, ARCH["block_size"] + 1))
    with torch.no_grad():
        torch_logits = torch_model(torch.from_numpy(tokens[0, :, :-1])).numpy()
    jax_logits = np.asarray(state.model()(jnp.asarray(tokens[0, :, :-1])))

    step = jax.jit(train_step, donate_argnums=0)
    hlo = step.lower(state, {"inputs": jnp.asarray(tokens[0, :, :-1]), "targets": jnp.asarray(tokens[0, :, 1:])})
    kernels = sorted({t for t in ("jaxtrain_blas_gemm", "jaxtrain_attention_fwd", "jaxtrain_layer_norm_fwd",
                                  "jaxtrain_gelu_fwd", "jaxtrain_adamw") if t in hlo.as_text()})
    out = {k: [] for k in ("torch_loss", "torch_norm", "jax_loss", "jax_norm", "jax_lr")}
    for t in range(STEPS):
        x, y = tokens[t, :, :-1], tokens[t, :, 1:]
        loss, norm = torch_gpt.torch_train_step(torch_model, torch_opt, torch.from_numpy(x), torch.from_numpy(y),
                                                MAX_NORM)
        state, metrics = step(state, {"inputs": jnp.asarray(x), "targets": jnp.asarray(y)})
        out["torch_loss"].append(loss)
        out["torch_norm"].append(norm)
        out["jax_loss"].append(float(metrics["loss"]))
        out["jax_norm"].append(float(metrics["grad_norm"]))
        out["jax_lr"].append(float(metrics["lr"]))
    out = {k: np.array(v) for k, v in out.items()}
    out.update(torch_logits=torch_logits, jax_logits=jax_logits,
               torch_params={k: v.numpy() for k, v in torch_model.state_dict().items()},
               jax_params=to_torch_state_dict(state.params, cfg), steps=int(state.step), kernels=kernels,
               devices=jax.device_count())
    return out


_ONE_DEVICE = """
import importlib.util, pickle, sys
import jaxtrain.cpu
assert jaxtrain.cpu.enable(), jaxtrain.cpu.status()
spec = importlib.util.spec_from_file_location("parity", sys.argv[1])
parity = importlib.util.module_from_spec(spec)
spec.loader.exec_module(parity)
with open(sys.argv[2], "wb") as f:
    pickle.dump(parity.run_both(), f)
"""


def _one_device_with_the_cpu_backend(tmp_path) -> dict:
    import pickle

    out = tmp_path / "runs.pkl"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", _ONE_DEVICE, __file__, str(out)], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out, "rb") as f:
        return pickle.load(f)


@pytest.fixture(scope="module", params=["xla, 8 devices", "cpu backend, 1 device"])
def runs(request, tmp_path_factory):
    if request.param == "xla, 8 devices":
        out = run_both()
        assert out["devices"] == 8 and out["kernels"] == []
    else:
        out = _one_device_with_the_cpu_backend(tmp_path_factory.mktemp("parity"))
        assert out["devices"] == 1
        assert out["kernels"] == ["jaxtrain_adamw", "jaxtrain_attention_fwd", "jaxtrain_blas_gemm",
                                  "jaxtrain_gelu_fwd", "jaxtrain_layer_norm_fwd"]
    return out


def _rel(a, b):
    return np.abs(a - b) / np.abs(b)


@pytest.mark.slow
def test_first_forward_logits_match(runs):
    np.testing.assert_allclose(runs["jax_logits"], runs["torch_logits"], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_clipping_triggers_on_some_steps_only(runs):
    # Otherwise the parity below would not cover both branches of the clip.
    assert (runs["torch_norm"] > MAX_NORM).any() and (runs["torch_norm"] < MAX_NORM).any(), runs["torch_norm"]


@pytest.mark.slow
def test_loss_and_grad_norm_match_every_step(runs):
    assert runs["steps"] == STEPS
    loss_rel, norm_rel = _rel(runs["jax_loss"], runs["torch_loss"]), _rel(runs["jax_norm"], runs["torch_norm"])
    assert loss_rel.max() <= LOSS_RTOL, f"loss rel diff per step: {loss_rel}"
    assert norm_rel.max() <= GRAD_NORM_RTOL, f"grad_norm rel diff per step: {norm_rel}"
    np.testing.assert_array_equal(runs["jax_lr"], np.float32(LR))


def _split_key_bias(key: str, jax_p: np.ndarray, torch_p: np.ndarray):
    """Yield (name, jax, torch) pieces; c_attn.bias is split into its q, k, v thirds."""
    if not key.endswith("attn.c_attn.bias"):
        yield key, jax_p, torch_p
        return
    for name, j, t in zip("qkv", np.split(jax_p, 3), np.split(torch_p, 3)):
        yield f"{key}[{name}]", j, t


@pytest.mark.slow
def test_final_params_match(runs):
    jax_p, torch_p = runs["jax_params"], runs["torch_params"]
    assert sorted(jax_p) == sorted(torch_p)
    rel = {}
    for key in torch_p:
        for name, a, b in _split_key_bias(key, jax_p[key], torch_p[key]):
            if name.endswith("[k]"):
                assert np.abs(a - b).max() <= KEY_BIAS_ATOL, f"{name}: max abs diff {np.abs(a - b).max()}"
            else:
                rel[name] = float(np.linalg.norm(a - b) / np.linalg.norm(b))
    worst = max(rel, key=rel.get)
    assert rel[worst] <= PARAM_RTOL, f"{worst}: ||jax - torch|| / ||torch|| = {rel[worst]:.3g}"
