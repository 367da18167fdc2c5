"""The optimizer chain: clipping, the weight-decay mask and the schedules."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxtrain import TrainState, decay_mask, make_optimizer, make_schedule, train_step
from jaxtrain import OptimConfig
from jaxtrain.models import GPT, GPTConfig

TINY = GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16, tie_embeddings=False)


@functools.cache
def _initial_gpt_params(cfg: GPTConfig):
    return nnx.to_pure_dict(nnx.state(GPT(cfg, rngs=nnx.Rngs(0)), nnx.Param))


def _gpt_params(cfg: GPTConfig = TINY):
    return jax.tree.map(jnp.copy, _initial_gpt_params(cfg))


def _flat(tree) -> dict[str, jax.Array]:
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


# --- clipping ---------------------------------------------------------------------


def _clipped_grads(cfg: OptimConfig, grads):
    """The gradient as it leaves the clip stage of ``make_optimizer(cfg)``.

    With b1 = 0, Adam's first moment after one step *is* the incoming gradient
    ((1 - b1) * g + b1 * 0 = g exactly), so it shows what the clip stage passed on.
    """
    tx = make_optimizer(dataclasses.replace(cfg, b1=0.0))
    _, opt_state = tx.update(grads, tx.init(grads), grads)
    return optax.tree.get(opt_state, "mu")


def _random_grads(scale: float):
    params = _gpt_params()
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    return jax.tree.unflatten(treedef, [scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def test_clip_scales_the_global_norm_down_to_max_norm():
    cfg = OptimConfig(schedule="constant", warmup_steps=0, max_grad_norm=0.5)
    grads = _random_grads(1.0)
    assert optax.tree.norm(grads) > 10 * cfg.max_grad_norm
    clipped = _clipped_grads(cfg, grads)
    np.testing.assert_allclose(optax.tree.norm(clipped), cfg.max_grad_norm, rtol=1e-6)
    # a pure rescaling: direction unchanged
    factor = cfg.max_grad_norm / optax.tree.norm(grads)
    for (k, g), c in zip(_flat(grads).items(), _flat(clipped).values()):
        np.testing.assert_allclose(c, g * factor, rtol=1e-5, atol=1e-9, err_msg=k)


def test_clip_leaves_small_gradients_untouched():
    cfg = OptimConfig(schedule="constant", warmup_steps=0, max_grad_norm=1.0)
    grads = _random_grads(1e-3)
    assert optax.tree.norm(grads) < cfg.max_grad_norm
    for (k, g), c in zip(_flat(grads).items(), _flat(_clipped_grads(cfg, grads)).values()):
        np.testing.assert_array_equal(c, g, err_msg=k)


def test_max_grad_norm_zero_disables_clipping():
    grads = _random_grads(1.0)
    clipped = _clipped_grads(OptimConfig(schedule="constant", warmup_steps=0, max_grad_norm=0.0), grads)
    jax.tree.map(np.testing.assert_array_equal, clipped, grads)


# --- weight decay mask ---------------------------------------------------------------


def test_default_mask_decays_matrices_only():
    flat = _flat(decay_mask(_gpt_params()))
    decayed = sorted(k for k, v in flat.items() if v)
    assert decayed == sorted([
        "['h'][0]['attn']['c_attn']['kernel']", "['h'][0]['attn']['c_proj']['kernel']",
        "['h'][0]['mlp']['c_fc']['kernel']", "['h'][0]['mlp']['c_proj']['kernel']",
        "['lm_head']['kernel']", "['wpe']['embedding']", "['wte']['embedding']"])
    no_embeddings = _flat(decay_mask(_gpt_params(), decay_embeddings=False))
    assert not no_embeddings["['wte']['embedding']"] and not no_embeddings["['wpe']['embedding']"]
    assert no_embeddings["['lm_head']['kernel']"]  # a projection, not an embedding table


def _decay_step(cfg: OptimConfig, params, **kw):
    """Params after one step with zero gradients: only weight decay moves them."""
    tx = make_optimizer(cfg, **kw)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    return optax.apply_updates(params, updates)


CONST = OptimConfig(lr=0.1, schedule="constant", warmup_steps=0, weight_decay=0.5)


@pytest.mark.parametrize("decay_embeddings", [True, False])
def test_decay_shrinks_masked_in_params_by_lr_wd_and_leaves_the_rest(decay_embeddings):
    params = _gpt_params()
    cfg = dataclasses.replace(CONST, decay_embeddings=decay_embeddings)
    new, mask = _flat(_decay_step(cfg, params)), _flat(decay_mask(params, decay_embeddings=decay_embeddings))
    shrink = 1 - cfg.lr * cfg.weight_decay
    for k, p in _flat(params).items():
        if mask[k]:
            np.testing.assert_allclose(new[k], p * shrink, rtol=1e-6, err_msg=k)
        else:
            np.testing.assert_array_equal(new[k], p, err_msg=k)
    assert mask["['wte']['embedding']"] == decay_embeddings
    assert not mask["['ln_f']['scale']"] and not mask["['h'][0]['attn']['c_attn']['bias']"]


def test_custom_mask_is_used_as_given():
    params = _gpt_params()
    only_fc = lambda p: jax.tree_util.tree_map_with_path(lambda path, _: "c_fc" in jax.tree_util.keystr(path)  # noqa: E731
                                                         and "kernel" in jax.tree_util.keystr(path), p)
    new = _flat(_decay_step(CONST, params, mask=only_fc))
    for k, p in _flat(params).items():
        if k == "['h'][0]['mlp']['c_fc']['kernel']":
            np.testing.assert_allclose(new[k], p * (1 - CONST.lr * CONST.weight_decay), rtol=1e-6)
        else:
            np.testing.assert_array_equal(new[k], p, err_msg=k)


# --- schedules --------------------------------------------------------------------


def _values(cfg: OptimConfig, total: int) -> np.ndarray:
    schedule = make_schedule(cfg, total)
    return np.array([float(schedule(t)) for t in range(total + 1)])


def test_constant_schedule_with_and_without_warmup():
    np.testing.assert_allclose(_values(OptimConfig(lr=1.0, schedule="constant", warmup_steps=0), 10), 1.0)
    warm = _values(OptimConfig(lr=1.0, schedule="constant", warmup_steps=4), 10)
    # nanoGPT's warmup: lr * (t + 1) / (warmup + 1), never a zero first step
    np.testing.assert_allclose(warm[:5], [1 / 5, 2 / 5, 3 / 5, 4 / 5, 1.0], rtol=1e-6)
    np.testing.assert_allclose(warm[5:], 1.0)


def test_cosine_schedule_shape():
    v = _values(OptimConfig(lr=1.0, schedule="cosine", warmup_steps=5, min_lr_ratio=0.1), 25)
    assert v.argmax() == 5 and v[5] == pytest.approx(1.0)
    assert np.all(np.diff(v[:6]) > 0) and np.all(np.diff(v[5:]) < 0)
    assert v[-1] == pytest.approx(0.1, rel=1e-6)
    assert v[15] == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)  # halfway through the decay: the cosine's midpoint


def test_wsd_schedule_shape():
    v = _values(OptimConfig(lr=1.0, schedule="wsd", warmup_steps=2, min_lr_ratio=0.0, wsd_decay_fraction=0.2), 20)
    np.testing.assert_allclose(v[2:16], 1.0)  # stable until the last 20% (4 steps)
    np.testing.assert_allclose(v[16:], [1.0, 0.75, 0.5, 0.25, 0.0], atol=1e-6)


@pytest.mark.parametrize("warmup, fraction", [(2, 1.0), (8, 0.5), (0, 1.0)])
def test_wsd_decay_always_ends_at_the_schedules_length(warmup, fraction):
    """A decay fraction larger than what the warmup leaves is shortened, never run past the end."""
    v = _values(OptimConfig(lr=1.0, schedule="wsd", warmup_steps=warmup, min_lr_ratio=0.0,
                            wsd_decay_fraction=fraction), 10)
    assert v[warmup] == pytest.approx(1.0) and np.all(np.diff(v[warmup:]) < 0)
    assert v[10] == pytest.approx(0.0, abs=1e-6)  # the minimum at step total_steps, as cosine reaches it


def test_decaying_schedule_needs_a_length():
    with pytest.raises(ValueError, match="total_steps"):
        make_optimizer(OptimConfig(schedule="cosine"))
    for bad in (0, -5, True, 2.5):
        with pytest.raises(ValueError, match=f"total_steps={bad!r}; must be a positive integer"):
            make_optimizer(OptimConfig(schedule="cosine"), bad)


@pytest.mark.parametrize("change, needle", [
    (dict(lr=-1e-2), "optim.lr=-0.01: must be a finite number > 0"),  # would train uphill
    (dict(lr=float("nan")), "optim.lr=nan"),                           # NaN params, reported as finite
    (dict(b1=1.0), "optim.b1=1.0: must be in [0, 1)"),                 # bias correction divides by 0
    (dict(b2=1.0), "optim.b2=1.0: must be in [0, 1)"),
    (dict(eps=0.0), "optim.eps=0.0"),                                  # 0 / 0 on a zero gradient
    (dict(max_grad_norm=-1.0), "optim.max_grad_norm=-1.0"),            # would disable clipping
    (dict(min_lr_ratio=3.0), "optim.min_lr_ratio=3.0: must be in [0, 1]"),
    (dict(schedule="linear"), "optim.schedule='linear': must be one of constant, cosine, wsd"),
])
def test_make_optimizer_refuses_out_of_range_settings_naming_them(change, needle):
    cfg = dataclasses.replace(OptimConfig(schedule="constant", warmup_steps=0), **change)
    with pytest.raises(ValueError) as e:
        make_optimizer(cfg, total_steps=10)
    assert needle in str(e.value)


class _Linear(nnx.Module):
    def __init__(self, rngs):
        self.w = nnx.Linear(3, 1, rngs=rngs)

    def __call__(self, x):
        return self.w(x)


def _mse(model, batch, rng):
    return jnp.mean((model(batch["x"])[:, 0] - batch["y"]) ** 2), {}


@pytest.mark.parametrize("schedule", ["constant", "cosine", "wsd"])
def test_lr_metric_is_the_schedule_at_each_step(schedule):
    cfg = OptimConfig(lr=0.1, schedule=schedule, warmup_steps=3, min_lr_ratio=0.2)
    total = 12
    state = TrainState.create(_Linear(nnx.Rngs(0)), make_optimizer(cfg, total_steps=total))
    batch = {"x": jnp.ones((4, 3)), "y": jnp.zeros((4,))}
    step = jax.jit(functools.partial(train_step, loss_fn=_mse), donate_argnums=0)
    lrs = []
    for _ in range(total):
        state, metrics = step(state, batch)
        lrs.append(float(metrics["lr"]))
    np.testing.assert_allclose(lrs, _values(cfg, total)[:total], rtol=1e-6)
