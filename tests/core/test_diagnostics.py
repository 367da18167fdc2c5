"""Diagnostics: per-module norms, update ratios, clipping and attention statistics."""

import functools
import math
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxtrain import TrainState, make_optimizer, train_step
from jaxtrain.app import config
from jaxtrain.app import loop
from jaxtrain.app import writers as metrics
from jaxtrain import diagnostics as diag
from jaxtrain import OptimConfig
from jaxtrain.models import GPT, GPTConfig

CFG = GPTConfig(n_layer=2, n_embd=16, n_head=2, block_size=8)
OPT = OptimConfig(lr=1e-2, schedule="constant", warmup_steps=0, max_grad_norm=1.0)


def _gpt_state(cfg=CFG, opt=OPT):
    return TrainState.create(GPT(cfg, rngs=nnx.Rngs(0)), make_optimizer(opt), rng=0)


def _batch(b=4, t=8, seed=1):
    x = jax.random.randint(jax.random.key(seed), (b, t + 1), 0, 256)
    return {"inputs": x[:, :-1], "targets": x[:, 1:]}


def _diag_step(**kw):
    return jax.jit(functools.partial(train_step, diagnostics=True, max_grad_norm=OPT.max_grad_norm, **kw))


@pytest.fixture(scope="module")
def gpt_steps():
    """The GPT step compiled with diagnostics off and on (compiled once for this file)."""
    state, batch = _gpt_state(), _batch()
    off = jax.jit(train_step).lower(state, batch).compile()
    on = _diag_step().lower(state, batch).compile()
    return dict(state=state, off=off, on=on, metrics_off=off(state, batch)[1], metrics_on=on(state, batch)[1])


def test_module_of_groups_gpt_paths():
    assert diag.module_of(("h", 0, "attn", "c_attn", "kernel")) == "h.0.attn"
    assert diag.module_of(("h", 1, "ln_2", "scale")) == "h.1.ln_2"
    assert diag.module_of(("wte", "embedding")) == "wte"
    assert diag.module_of(("scale",)) == "scale"
    assert diag.module_of(("h", 0, "attn", "c_attn", "kernel"), depth=4) == "h.0.attn.c_attn"


def test_module_norms_add_up_in_squares_to_the_global_norm():
    shapes = jax.eval_shape(lambda: nnx.to_pure_dict(nnx.state(GPT(CFG, rngs=nnx.Rngs(0)), nnx.Param)))
    rng = np.random.default_rng(0)
    grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), shapes)
    for depth in (1, 3, 9):
        norms = jax.jit(diag.module_norms, static_argnames="depth")(grads, depth=depth)
        total = math.sqrt(sum(float(v) ** 2 for v in norms.values()))
        assert total == pytest.approx(float(optax.tree.norm(grads)), rel=1e-5)
    names = set(diag.module_norms(grads))
    per_block = {f"h.{i}.{m}" for i in range(CFG.n_layer) for m in ("ln_1", "attn", "ln_2", "mlp")}
    assert names == per_block | {"wte", "wpe", "ln_f"}


def test_train_step_grad_norms_per_module_match_the_global_grad_norm(gpt_steps):
    m = gpt_steps["metrics_on"]
    parts = [float(v) for k, v in m.items() if k.startswith("grad_norm/")]
    assert len(parts) == 4 * CFG.n_layer + 3
    assert math.sqrt(sum(p * p for p in parts)) == pytest.approx(float(m["grad_norm"]), rel=1e-5)


class _Linear(nnx.Module):
    """loss = <w, g>: the gradient is exactly the batch's ``g``, whatever ``w`` is."""

    def __init__(self, n: int):
        self.w = nnx.Param(jnp.ones((n,)))


def _linear_loss(model, batch, rng):
    return jnp.dot(model.w[...], batch["g"]), {}


def test_clip_fraction_on_constructed_gradients():
    norms = [0.5, 2.0, 3.0, 0.9, 1.5]  # max_norm 1: clipped, clipped, clipped at steps 1, 2, 4
    direction = jnp.array([0.6, 0.8])  # unit vector
    state = TrainState.create(_Linear(2), make_optimizer(OPT), rng=0)
    step = _diag_step(loss_fn=_linear_loss)
    flags = []
    for n in norms:
        state, m = step(state, {"g": n * direction})
        assert float(m["grad_norm"]) == pytest.approx(n, rel=1e-6)
        flags.append(float(m["clipped"]))
    assert flags == [0.0, 1.0, 1.0, 0.0, 1.0]
    assert np.mean(flags) == pytest.approx(0.6)


def test_clipped_agrees_with_optax_at_and_around_the_threshold():
    clip = optax.clip_by_global_norm(1.0)
    for n in (0.999, 1.0, 1.001):
        g = {"w": jnp.array([n, 0.0])}
        out, _ = clip.update(g, clip.init(g))
        rescaled = bool(jnp.any(out["w"] != g["w"])) or n >= 1.0  # scaling by exactly 1 leaves g as is
        assert bool(diag.clipped(optax.tree.norm(g), 1.0)) == rescaled


def test_a_nan_gradient_norm_counts_as_clipped_as_optax_rescales_it():
    assert float(diag.clipped(jnp.float32(jnp.nan), 1.0)) == 1.0
    assert float(diag.clipped(jnp.float32(0.5), 1.0)) == 0.0


def test_no_clipped_metric_without_a_threshold():
    state = TrainState.create(_Linear(2), make_optimizer(OPT), rng=0)
    _, m = jax.jit(functools.partial(train_step, loss_fn=_linear_loss, diagnostics=True))(state, {"g": jnp.ones(2)})
    assert "clipped" not in m and "grad_norm/w" in m


def test_update_ratio_is_update_norm_over_param_norm():
    lr = 0.1
    state = TrainState.create(_Linear(2), optax.sgd(lr), rng=0)  # w = [1, 1]
    _, m = _diag_step(loss_fn=_linear_loss)(state, {"g": jnp.array([3.0, 4.0])})
    # SGD's update is -lr * g: ||update|| / ||w|| = 0.1 * 5 / sqrt(2)
    assert float(m["update_ratio/w"]) == pytest.approx(lr * 5 / math.sqrt(2), rel=1e-6)


def _reference_attention_stats(q, k, saturation=0.99):
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    T, H = q.shape[1], q.shape[-1]
    logits = np.einsum("bqnh,bknh->bnqk", q, k) / math.sqrt(H)
    causal = np.tril(np.ones((T, T), bool))
    lmax = np.abs(logits[..., causal]).max()
    z = np.where(causal, logits, -np.inf)
    p = np.exp(z - z.max(-1, keepdims=True))
    pmax = (p / p.sum(-1, keepdims=True)).max(-1)[..., 1:]  # the first row (one key) is left out
    return lmax, pmax.mean(), (pmax > saturation).mean()


@pytest.mark.parametrize("scale", [0.1, 1.0, 30.0])
def test_attention_logit_stats_match_a_numpy_reference(scale):
    q = scale * jax.random.normal(jax.random.key(0), (2, 6, 3, 4))
    k = jax.random.normal(jax.random.key(1), (2, 6, 3, 4))
    got = diag.attention_logit_stats(q, k)
    want = _reference_attention_stats(q, k)
    for name, w in zip(("attn_logit_max", "attn_prob_max", "attn_saturated"), want):
        assert float(got[name]) == pytest.approx(w, rel=1e-5, abs=1e-6), name


def test_uniform_attention_is_not_saturated():
    q = k = jnp.zeros((1, 5, 1, 2))  # all logits 0: row t is uniform over t + 1 keys
    got = diag.attention_logit_stats(q, k)
    assert float(got["attn_prob_max"]) == pytest.approx(np.mean([1 / 2, 1 / 3, 1 / 4, 1 / 5]))
    assert float(got["attn_saturated"]) == 0.0 and float(got["attn_logit_max"]) == 0.0


def _check_attention_stats(m, n_layer):
    for i in range(n_layer):
        assert 0.0 < float(m[f"attn_prob_max/h.{i}.attn"]) <= 1.0
        assert 0.0 <= float(m[f"attn_saturated/h.{i}.attn"]) <= 1.0
        assert 0.0 < float(m[f"attn_logit_max/h.{i}.attn"]) < 10.0


def test_gpt_sows_attention_stats_per_layer(gpt_steps):
    _check_attention_stats(gpt_steps["metrics_on"], CFG.n_layer)


def test_gpt_attention_stats_under_remat_and_grad_accum():
    cfg = GPTConfig(n_layer=2, n_embd=16, n_head=2, block_size=8, remat=True)
    state = _gpt_state(cfg)
    new, m = _diag_step(grad_accum=2)(state, _batch())
    _check_attention_stats(m, cfg.n_layer)
    # nothing sown leaks into the model state carried between steps
    assert jax.tree.structure(new.model_state) == jax.tree.structure(state.model_state)


@pytest.mark.slow
def test_attention_logit_max_is_the_max_over_microbatches_and_aux_means_are_means():
    """The largest logit of the batch is the largest of its microbatches' (not their mean); other
    metrics, like the loss, are means, so the full batch and two microbatches report the same."""
    state, batch = _gpt_state(), _batch()
    _, whole = _diag_step()(state, batch)
    _, parts = _diag_step(grad_accum=2)(state, batch)
    halves = [_diag_step()(state, {k: v[i::2] for k, v in batch.items()})[1] for i in (0, 1)]
    for key in (k for k in whole if k.startswith("attn_logit_max/")):
        assert float(parts[key]) == pytest.approx(max(float(h[key]) for h in halves), rel=1e-5)
        assert float(parts[key]) == pytest.approx(float(whole[key]), rel=1e-5)
    for key in (k for k in whole if k.startswith("attn_prob_max/")):  # a mean over rows
        assert float(parts[key]) == pytest.approx(np.mean([float(h[key]) for h in halves]), rel=1e-5)


class _SowsItsOwnActivations(nnx.Module):
    """Keeps its hidden activations as nnx.Intermediate for its own use; no ``sow_stats``."""

    def __init__(self):
        self.lin = nnx.Linear(3, 4, rngs=nnx.Rngs(0))

    def __call__(self, x):
        h = self.lin(x)
        self.sow(nnx.Intermediate, "features", h)
        return h


def test_diagnostics_capture_only_what_sow_stats_modules_sow():
    state = TrainState.create(_SowsItsOwnActivations(), make_optimizer(OPT), rng=0)
    loss = lambda model, batch, rng: jnp.mean(model(batch["x"]) ** 2)  # noqa: E731
    _, m = _diag_step(loss_fn=loss)(state, {"x": jnp.ones((8, 3))})
    assert not any(k.startswith("features") for k in m), sorted(m)
    assert "grad_norm/lin" in m and all(jnp.ndim(v) == 0 for v in m.values())


def test_sown_stats_average_repeated_calls():
    sown = {"h": {0: {"attn": {"s": (jnp.float32(1.0), jnp.float32(3.0))}}}, "top": {"s": (jnp.float32(5.0),)}}
    out = diag.sown_stats(nnx.State(sown))
    assert {k: float(v) for k, v in out.items()} == {"s/h.0.attn": 2.0, "s/top": 5.0}


def test_diagnostics_off_adds_nothing_to_the_compiled_step(gpt_steps):
    off, on = gpt_steps["off"].as_text(), gpt_steps["on"].as_text()
    # every diagnostic op is built under one named scope, which HLO metadata keeps
    assert f"/{diag.SCOPE}/" not in off
    assert f"/{diag.SCOPE}/" in on
    assert on.count(" reduce(") > off.count(" reduce(")
    assert set(gpt_steps["metrics_off"]) == {"loss", "grad_norm", "update_norm", "param_norm", "nonfinite", "lr"}


def test_interval_stats_clip_fraction():
    steps = [{"clipped": 1.0}, {"clipped": 0.0}, {"clipped": 0.0}, {"clipped": 1.0}, {"clipped": 1.0}]
    assert diag.interval_stats(steps) == {"clip_frac": pytest.approx(0.6)}
    assert diag.interval_stats([{"loss": 1.0}]) == {}


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


@pytest.mark.slow
def test_run_logs_and_plots_diagnostics(tmp_path):
    tiny = Path(__file__).resolve().parents[2] / "jaxtrain" / "configs" / "tiny.yaml"
    cfg = config.load(tiny, [
        f"run_dir={tmp_path}", "train.diagnostics=true", "train.steps=6", "train.log_every=3", "train.eval_every=0",
        "train.eval_batches=1", "train.sample_tokens=4", "train.batch_size=8", "model.block_size=32",
        "model.n_embd=32", "checkpoint.every=100", "log.progress=false",
        "optim.max_grad_norm=1e-4",  # far below any real gradient norm: every step clips
    ])
    loop.train(cfg)
    rows = metrics.read_jsonl(tmp_path / metrics.METRICS_FILE)
    assert [r["step"] for r in rows] == [3, 6]
    for r in rows:
        assert r["clip_frac"] == 1.0 and "clipped" not in r
        parts = [v for k, v in r.items() if k.startswith("grad_norm/")]
        assert math.sqrt(sum(v * v for v in parts)) == pytest.approx(r["grad_norm"], rel=1e-4)
        for i in range(cfg.model.n_layer):
            assert {f"attn_logit_max/h.{i}.attn", f"attn_saturated/h.{i}.attn",
                    f"update_ratio/h.{i}.mlp"} <= set(r)
    events = b"".join(f.read_bytes() for f in (tmp_path / metrics.TB_DIR).glob("events.out.tfevents.*"))
    assert b"grad_norm/h.1.attn" in events and b"train/clip_frac" in events
    assert _png_size(tmp_path / "plot.png")[1] == 800  # two rows of panels: the diagnostics are drawn
