# %% [markdown]
# # Gradients inside a transformer
#
# What does the backward pass do inside a transformer, and what keeps it healthy? Three experiments on
# tiny byte-level models trained on the built-in corpus (the Python standard library's source), each
# measured with jaxtrain's diagnostics (`train_step(..., diagnostics=True)`: per-module gradient
# norms, update ratios, attention-logit statistics, whether the step was clipped):
#
# 1. **LayerNorm placement**: gradient norms per layer at initialisation and during training for
#    pre-LN (GPT-2, jaxtrain's GPT), post-LN (the original Transformer) and no LayerNorm at all.
# 2. **Softmax saturation**: what happens to attention probabilities and to the gradient through the
#    softmax as logits grow, with and without the `1/sqrt(d)` scale.
# 3. **A learning rate that is too high**, with and without gradient clipping.
#
# Every claim in the text is a number computed here and checked by an `assert`, so the notebook fails
# (and CI with it) if a claim stops being true. Everything runs on a laptop CPU in about a minute or two.

# %%
import functools
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx

from jaxtrain import OptimConfig, TrainState, lm_loss, make_optimizer, train_step
from jaxtrain import diagnostics as diag
from jaxtrain.app import data
from jaxtrain.app.config import DataConfig
from jaxtrain.models import GPT, GPTConfig

DOCS = os.environ.get("JAXTRAIN_DOCS")  # set by notebooks/build.py to refresh the README's figures

L, D, HEADS, T, B = 4, 64, 4, 32, 16  # layers, width, heads, context, batch: 16 x 32 tokens per step
STEPS = 100
corpus = data.load_corpus(DataConfig())  # the built-in corpus: Python's standard library, as bytes
batches = [jax.tree.map(jnp.asarray, data.get_batch(corpus.train, seed=0, step=t, batch_size=B, block_size=T))
           for t in range(STEPS)]
print(f"corpus '{corpus.name}': {len(corpus.train):,} training bytes; {STEPS} batches of {B} x {T}")

# %% [markdown]
# ## 1. LayerNorm: pre-LN, post-LN and none
#
# One small transformer, written out below, whose blocks are wired three ways (GPT-2 initialisation:
# weights ~ N(0, 0.02), residual projections scaled by `1/sqrt(2L)`):
#
# | variant | block |
# | --- | --- |
# | pre-LN (GPT-2, jaxtrain's GPT) | `x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))`, and a final `ln_f` |
# | post-LN (2017 Transformer) | `x = ln_1(x + attn(x)); x = ln_2(x + mlp(x))` |
# | no LN | `x = x + attn(x); x = x + mlp(x)` |
#
# The attention module follows the diagnostics' contract: a module with a `sow_stats` attribute sows
# statistics when `train_step(..., diagnostics=True)` switches it on, so its attention-logit statistics
# appear in the metrics next to the per-module gradient norms.
#
# All three train for 100 steps with AdamW at a constant learning rate of 1e-2 (no warmup, no
# clipping): high for this model, so that differences show within a minute. Training at such a rate is
# chaotic (the last bits of a float change where a run ends up), so each variant runs from three
# initialisations; the per-layer pictures use the first.

# %%
def dense(d_in: int, d_out: int, rngs: nnx.Rngs, std: float = 0.02) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, kernel_init=nnx.initializers.normal(std), rngs=rngs)


class Attention(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.c_attn = dense(D, 3 * D, rngs)
        self.c_proj = dense(D, D, rngs, std=0.02 / math.sqrt(2 * L))
        self.sow_stats = False  # set by train_step(diagnostics=True)

    def __call__(self, x_BTC):
        B_, T_, C = x_BTC.shape
        q, k, v = jnp.split(self.c_attn(x_BTC).reshape(B_, T_, 3 * HEADS, C // HEADS), 3, axis=2)
        if self.sow_stats:
            for name, value in diag.attention_logit_stats(q, k).items():
                self.sow(nnx.Intermediate, name, value)
        y_BTNH = jax.nn.dot_product_attention(q, k, v, is_causal=True)  # softmax(q.k / sqrt(d)) v
        return self.c_proj(y_BTNH.reshape(B_, T_, C))


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.c_fc, self.c_proj = dense(D, 4 * D, rngs), dense(4 * D, D, rngs, std=0.02 / math.sqrt(2 * L))

    def __call__(self, x):
        return self.c_proj(jax.nn.gelu(self.c_fc(x)))


class Block(nnx.Module):
    def __init__(self, norm: str, rngs: nnx.Rngs):
        self.norm = norm
        ln = lambda: nnx.LayerNorm(D, rngs=rngs) if norm != "none" else None  # noqa: E731
        self.ln_1, self.attn, self.ln_2, self.mlp = ln(), Attention(rngs), ln(), MLP(rngs)

    def __call__(self, x):
        if self.norm == "pre":
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))
        if self.norm == "post":
            x = self.ln_1(x + self.attn(x))
            return self.ln_2(x + self.mlp(x))
        x = x + self.attn(x)
        return x + self.mlp(x)


class TinyLM(nnx.Module):
    """A byte-level transformer LM whose blocks are pre-LN, post-LN or without LayerNorm."""

    def __init__(self, norm: str, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.wte = nnx.Embed(256, D, embedding_init=init, rngs=rngs)
        self.wpe = nnx.Embed(T, D, embedding_init=init, rngs=rngs)
        self.h = nnx.List([Block(norm, rngs) for _ in range(L)])
        self.ln_f = nnx.LayerNorm(D, rngs=rngs) if norm == "pre" else None

    def __call__(self, idx_BT, *, rngs=None, deterministic=True):  # the signature lm_loss calls
        x = self.wte(idx_BT) + self.wpe(jnp.arange(idx_BT.shape[1]))
        for block in self.h:
            x = block(x)
        if self.ln_f is not None:
            x = self.ln_f(x)
        return x @ self.wte.embedding[...].T  # tied output embedding


def train(state: TrainState, step, steps: int = STEPS) -> dict:
    """``steps`` steps of a jitted train_step from ``state``; per-step metrics as numpy arrays."""
    history = []
    for batch in batches[:steps]:
        state, metrics = step(state, batch)
        history.append(metrics)  # stays on the device: no sync per step
    history = jax.device_get(history)
    out = {k: np.array([m[k] for m in history]) for k in history[0]}
    # a layer's gradient norm: its modules' norms added in squares (they are disjoint)
    out["layer_grad_norm"] = np.stack([np.sqrt(sum(out[k] ** 2 for k in out if k.startswith(f"grad_norm/h.{i}.")))
                                       for i in range(L)], axis=1)  # [steps, layers]
    if "attn_logit_max/h.0.attn" in out:
        out["attn_logit_max"] = np.stack([out[f"attn_logit_max/h.{i}.attn"] for i in range(L)], axis=1)
    return out


# Compiled once per model structure; different seeds reuse the compiled step.
diag_step = jax.jit(functools.partial(train_step, diagnostics=True), donate_argnums=0)
VARIANTS, SEEDS, LR_LN = ("pre", "post", "none"), (0, 1, 2), 1e-2
LABEL = {"pre": "pre-LN", "post": "post-LN", "none": "no LN"}
adamw = make_optimizer(OptimConfig(lr=LR_LN, schedule="constant", warmup_steps=0, max_grad_norm=0.0))
init_tiny = jax.jit(lambda norm, seed: TrainState.create(TinyLM(norm, nnx.Rngs(jax.random.key(seed))), adamw, rng=0),
                    static_argnums=0)
all_runs = {(norm, seed): train(init_tiny(norm, seed), diag_step) for norm in VARIANTS for seed in SEEDS}
runs = {norm: all_runs[norm, 0] for norm in VARIANTS}  # seed 0: the runs shown layer by layer
for (norm, seed), r in all_runs.items():
    print(f"{LABEL[norm]:>7} seed {seed}: loss {r['loss'][0]:.3f} -> {r['loss'][-10:].mean():7.3f} (mean of the last "
          f"10 steps), largest {r['loss'].max():7.2f}")

# %% [markdown]
# ### At initialisation

# %%
init = {norm: runs[norm]["layer_grad_norm"][0] for norm in VARIANTS}
print("gradient norm per layer at step 0 (layer 0 = nearest the input)")
for norm in VARIANTS:
    print(f"  {LABEL[norm]:>7}: " + "  ".join(f"{g:.4f}" for g in init[norm]))
spread = {norm: init[norm].max() / init[norm].min() for norm in VARIANTS}
print("largest / smallest layer:", {LABEL[k]: round(float(v), 2) for k, v in spread.items()})
print(f"pre-LN / no-LN gradient, layer by layer: {np.round(init['pre'] / init['none'], 1)}")
assert spread["pre"] < 2 and spread["none"] < 1.1        # even across depth
assert init["post"][0] > 5 * init["post"][1:].max()       # post-LN: the first layer stands out
assert (init["pre"] > 10 * init["none"]).all()            # LayerNorm's backward amplifies

# %% [markdown]
# - **No LN**: every layer gets the same, small gradient. With GPT-2's initialisation the residual
#   stream starts as the sum of a token and a position embedding, each of scale 0.02, so at a scale of
#   about `sqrt(2) * 0.02 = 0.028`: every branch sees tiny inputs.
# - **Pre-LN**: the gradients are also even across depth (largest/smallest layer below 2x), but more than
#   ten times larger. LayerNorm divides its input by the input's standard deviation, and its backward
#   multiplies the incoming gradient by the same `1/std`: with a residual stream of scale ~0.028, that is
#   a factor of ~35 on the way into each branch (the ratios printed above).
# - **Post-LN**: the first layer's gradient is more than five times any other layer's. Only the first
#   block sees the raw, tiny embeddings; every later block reads the normalised output of the one before.

# %% [markdown]
# ### During training

# %%
fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharey=True, layout="constrained")
for ax, norm in zip(axes, VARIANTS):
    g = runs[norm]["layer_grad_norm"]
    for i in range(L):
        ax.plot(g[:, i], color=plt.cm.viridis(i / (L - 1)), label=f"layer {i}")
    ax.set(title=LABEL[norm], xlabel="step", yscale="log")
axes[0].set_ylabel("gradient norm of the layer")
axes[0].legend()
fig.suptitle(f"Gradient norm per layer, AdamW lr {LR_LN:g}, no clipping")
if DOCS:
    fig.savefig(Path(DOCS) / "notebook02_layer_grads.png", dpi=100)
plt.show()

# %%
final = {norm: runs[norm]["layer_grad_norm"][-10:].mean(0) for norm in VARIANTS}  # last 10 steps
print("gradient norm per layer, mean of the last 10 steps")
for norm in VARIANTS:
    print(f"  {LABEL[norm]:>7}: " + "  ".join(f"{g:.2e}" for g in final[norm]) +
          f"   first/last layer {final[norm][0] / final[norm][-1]:.1e}")
assert final["post"][0] < 1e-3 * final["post"][-1]        # post-LN: the bottom layers stop learning
assert final["pre"].min() > 1e-2 * final["pre"].max()     # pre-LN: every layer still gets a gradient

print("\nover all seeds:  largest attention logit | largest global gradient norm | largest loss")
for (norm, seed), r in all_runs.items():
    print(f"  {LABEL[norm]:>7} seed {seed}: {r['attn_logit_max'].max():12.3g} | {r['grad_norm'].max():12.3g} | "
          f"{r['loss'].max():9.2f}")
blew_up = {norm: sum(int(all_runs[norm, seed]["attn_logit_max"].max() > 1000) for seed in SEEDS) for norm in VARIANTS}
print("runs whose attention logits passed 1000:", {LABEL[k]: v for k, v in blew_up.items()})
assert blew_up["pre"] == blew_up["post"] == 0 and blew_up["none"] >= 1

# %% [markdown]
# - **Post-LN**: after 100 steps the gradient reaching the first layer is more than a thousand times
#   smaller than the last layer's: each LayerNorm on the residual path divides the gradient by the
#   standard deviation of its input, and these factors multiply from the top of the network down. The
#   lower layers stop learning. This is why post-LN transformers need learning-rate warmup.
# - **Pre-LN**: the residual path from the loss to every layer contains no LayerNorm (they sit on the
#   branches), so every layer keeps a gradient within a factor of 100 of the others.
# - **No LN**: nothing bounds the size of the residual stream, and queries and keys grow with it. In at
#   least one of the three runs the attention logits `q . k / sqrt(d)` passed 1000, with gradient norms
#   and losses blowing up alongside, while no run of either normalised model ever had a logit above
#   1000. Section 2 shows what logits that large do to the softmax and its gradient.

# %% [markdown]
# ## 2. Softmax saturation
#
# Attention is `softmax(q . k * scale)`. With `q` and `k` of dimension `d` and entries of variance 1,
# the dot product has variance `d`; the `1/sqrt(d)` scale brings it back to 1. Here are random queries
# and keys (8 x 64 positions x 4 heads), with and without the scale, measured with the same
# `attention_logit_stats` the GPT's diagnostics use: the mean largest probability of a row, and the
# fraction of rows whose largest probability is above 0.99 ("saturated").

# %%
DIMS = (4, 16, 64, 256, 1024)


@jax.jit
def saturation(q, k):
    """Standard deviation of q.k and the attention statistics with and without the 1/sqrt(d) scale."""
    std = jnp.einsum("bqnh,bknh->bnqk", q, k).std()
    return std, diag.attention_logit_stats(q, k), diag.attention_logit_stats(q, k, scale=1.0)


rng = np.random.default_rng(0)
stats = {}
for d in DIMS:
    q, k = (rng.standard_normal((8, 64, 4, d), dtype=np.float32) for _ in range(2))
    std, scaled, unscaled = jax.device_get(saturation(q, k))
    for is_scaled, s in ((True, scaled), (False, unscaled)):
        stats[d, is_scaled] = dict(std=std / math.sqrt(d) if is_scaled else std,
                                   p_max=float(s["attn_prob_max"]), saturated=float(s["attn_saturated"]))
print(f"{'d':>5} | {'std of logits':>24} | {'mean max prob':>22} | {'rows saturated':>22}")
print(f"{'':>5} | {'q.k/sqrt(d)':>11}  {'q.k':>11} | {'scaled':>10}  {'unscaled':>10} | {'scaled':>10}  {'unscaled':>10}")
for d in DIMS:
    s, u = stats[d, True], stats[d, False]
    print(f"{d:5d} | {s['std']:11.2f}  {u['std']:11.2f} | {s['p_max']:10.3f}  {u['p_max']:10.3f} | "
          f"{s['saturated']:10.3f}  {u['saturated']:10.3f}")
for d in DIMS:
    assert abs(stats[d, False]["std"] / math.sqrt(d) - 1) < 0.1 and abs(stats[d, True]["std"] - 1) < 0.1
    assert stats[d, True]["saturated"] < 0.01
assert stats[1024, False]["saturated"] > 0.5

# %% [markdown]
# With the scale, the logits have a standard deviation of 1 for every `d` and under 1% of the rows are
# saturated (rows near the start, which attend to only a few keys).
# Without it the standard deviation grows as `sqrt(d)`, and at `d = 1024` more than half of the rows put
# over 99% of their probability on a single key.
#
# Why that matters for the backward pass: the gradient with respect to the logits is the upstream gradient
# times the softmax Jacobian `J = diag(p) - p p^T`. When `p` approaches a one-hot vector, every entry of
# `J` approaches zero, so no gradient reaches the queries and keys. Below, rows of 64 logits with standard
# deviation `c` (the logit scale), the mean probability of the top key, and the Frobenius norm of the
# Jacobian as `jax.jacfwd` computes it.

# %%
softmax_jacobian = jax.jit(jax.vmap(jax.jacfwd(jax.nn.softmax)))  # [rows, n] -> [rows, n, n]
z = jax.random.normal(jax.random.key(1), (500, 64))
p0 = jax.nn.softmax(z[0])
assert jnp.allclose(softmax_jacobian(z[:1])[0], jnp.diag(p0) - jnp.outer(p0, p0), atol=1e-6)  # J = diag(p) - pp^T

SCALES = np.geomspace(0.1, 1000, 13)


@jax.jit
def top_prob_and_jacobian_norm(z):
    """Mean over rows of the largest probability and of the Frobenius norm of the softmax Jacobian."""
    return jax.nn.softmax(z).max(-1).mean(), jnp.linalg.norm(softmax_jacobian(z), axis=(1, 2)).mean()


p_top, j_norm = np.array([top_prob_and_jacobian_norm(c * z) for c in SCALES]).T
for c, p, j in zip(SCALES, p_top, j_norm):
    print(f"logit std {c:7.2f}: mean top probability {p:.3f}   mean ||J||_F {j:.2e}")
peak = int(j_norm.argmax())
print(f"||J|| peaks at logit std {SCALES[peak]:.2f}; at {SCALES[-1]:g} it is {j_norm[-1] / j_norm[peak]:.1%} of the peak")
assert 1 < SCALES[peak] < 10
assert j_norm[np.argmin(np.abs(SCALES - 100))] < 0.2 * j_norm[peak] and j_norm[-1] < 0.05 * j_norm[peak]
assert p_top[-1] > 0.99

# %%
fig, (ax_p, ax_j) = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
ax_p.plot(DIMS, [stats[d, True]["saturated"] for d in DIMS], "o-", label="q.k / sqrt(d)")
ax_p.plot(DIMS, [stats[d, False]["saturated"] for d in DIMS], "o-", label="q.k (no scale)")
ax_p.set(xscale="log", xlabel="head dimension d", ylabel="fraction of rows with max prob > 0.99",
         title="Saturated attention rows, random q and k")
ax_p.legend()
ax_j.plot(SCALES, j_norm, "o-", color="tab:red", label="mean ||J||_F of the softmax")
ax_j.plot(SCALES, p_top, "s--", color="gray", label="mean top probability")
ax_j.set(xscale="log", xlabel="standard deviation of the logits", title="The softmax Jacobian vanishes as logits grow")
ax_j.legend()
plt.show()

# %% [markdown]
# The Jacobian is largest when the logits have a standard deviation of a few units; it is below a fifth
# of that peak at 100 and below a twentieth at 1000. A saturated attention head passes almost no
# gradient back to its queries and keys, so it cannot easily un-saturate. In section 1, at least one
# no-LN run had attention logits above 1000.
#
# ## 3. A learning rate that is too high, with and without clipping
#
# Clipping rescales the whole gradient whenever its global norm exceeds `max_norm`, so the optimizer
# never sees a gradient longer than `max_norm`, however steep the loss gets. Its effect is easiest to
# see with the optimizer it was invented for, SGD with momentum: jaxtrain's `train_step` takes any
# optax transformation, so here are two runs of jaxtrain's GPT (pre-LN, 4 layers) with SGD at a
# learning rate of 1.0, one without and one with `clip_by_global_norm(0.25)`.

# %%
LR_SGD, MAX_NORM, SGD_STEPS = 1.0, 0.25, 40
gpt = lambda: GPT(GPTConfig(n_layer=L, n_embd=D, n_head=HEADS, block_size=T), rngs=nnx.Rngs(0))  # noqa: E731
sgd = optax.inject_hyperparams(optax.sgd)(learning_rate=LR_SGD, momentum=0.9)
clip_step = jax.jit(functools.partial(train_step, diagnostics=True, max_grad_norm=MAX_NORM), donate_argnums=0)
init_gpt = lambda tx: jax.jit(lambda: TrainState.create(gpt(), tx, rng=0))()  # noqa: E731
CLIPPED = f"clip {MAX_NORM:g}"
sgd_runs = {
    "no clipping": train(init_gpt(sgd), diag_step, steps=SGD_STEPS),
    CLIPPED: train(init_gpt(optax.chain(optax.clip_by_global_norm(MAX_NORM), sgd)), clip_step, steps=SGD_STEPS),
}
free, clipped = sgd_runs["no clipping"], sgd_runs[CLIPPED]
first_big = int(np.argmax(~(free["loss"] < 1000)))  # the first step whose loss is >= 1000 or not finite
print(f"no clipping: loss {free['loss'][0]:.2f} at step 0, {free['loss'][first_big]:.3g} at step {first_big}; "
      f"largest {np.nanmax(free['loss']):.3g}; {int(free['nonfinite'].sum())} of {SGD_STEPS} steps non-finite")
print(f"{CLIPPED}:    loss {clipped['loss'][0]:.2f} -> {clipped['loss'][-10:].mean():.3f} (last 10 steps); "
      f"largest {clipped['loss'].max():.2f}; {clipped['clipped'].mean():.0%} of steps clipped")
assert first_big <= 20  # diverged, early
assert np.isfinite(clipped["loss"]).all() and clipped["nonfinite"].sum() == 0
assert clipped["loss"].max() < clipped["loss"][0] + 0.5 and clipped["loss"][-10:].mean() < clipped["loss"][0] - 1.5
assert clipped["clipped"].mean() > 0.9

# %%
fig, (ax_l, ax_g, ax_c) = plt.subplots(1, 3, figsize=(15, 3.8), layout="constrained")
for name, r in sgd_runs.items():
    ax_l.plot(r["loss"], label=name)
    ax_g.plot(r["grad_norm"], label=name)
ax_l.set(title=f"loss, SGD with momentum, lr {LR_SGD:g}", xlabel="step", yscale="log")
ax_g.axhline(MAX_NORM, color="gray", ls="--", lw=1, label="max_norm")
ax_g.set(title="gradient norm before clipping", xlabel="step", yscale="log")
window = 10
frac = np.convolve(clipped["clipped"], np.ones(window) / window, mode="valid")
ax_c.plot(np.arange(window - 1, SGD_STEPS), frac, color="tab:orange")
ax_c.set(title=f"{CLIPPED}: fraction of the last {window} steps clipped", xlabel="step", ylim=(-0.05, 1.05))
ax_l.legend()
ax_g.legend()
plt.show()

# %% [markdown]
# Without clipping the loss passes 1000 within the first 20 steps (the gradient norm grows with it):
# each step's gradient is larger than the last, and the steps follow it. Where the numbers overflow,
# jaxtrain's `train_step` skips the update (`nonfinite=1`, parameters unchanged), and the run loop stops
# after `train.max_nonfinite` such steps in a row. With clipping, the same learning rate trains: the loss
# never rises more than 0.5 above where it started and ends more than 1.5 nats lower. Nearly every step
# is clipped, so SGD moves along the gradient's direction with a fixed step length: clipping turned it
# into normalised gradient descent.
#
# With AdamW (jaxtrain's default optimizer) clipping acts differently. Adam divides each update by a
# running root-mean-square of the gradient, so multiplying every gradient by the same factor changes
# almost nothing: below, the GPT's first AdamW step with its gradient `g` and with `g / 4` (what
# clipping a gradient of norm 4 to 1 does). For most entries, those whose gradient is at least 10^4
# times Adam's `eps`, the two updates agree to 1e-3; only entries with a gradient close to `eps` see the
# difference.
# Under AdamW, clipping matters when one step's gradient is far larger than the recent ones, which is
# the spike it is there to absorb.

# %%
adam = optax.adamw(1e-3, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0)


@jax.jit
def first_updates(batch):
    """The GPT's gradient g on ``batch`` and AdamW's first update for g and for g / 4, as flat vectors."""
    graphdef, params = nnx.split(gpt(), nnx.Param)
    g = jax.grad(lambda p: lm_loss(nnx.merge(graphdef, p), batch, None)[0])(params)
    update = lambda grads: adam.update(grads, adam.init(params), params)[0]  # noqa: E731
    flat = lambda tree: jnp.concatenate([x.ravel() for x in jax.tree.leaves(tree)])  # noqa: E731
    return flat(g), flat(update(g)), flat(update(jax.tree.map(lambda x: x / 4, g)))


g, u_full, u_quarter = map(np.asarray, first_updates(batches[0]))
rel = np.abs(u_full - u_quarter) / np.abs(u_full)
# Adam's step is g / (|g| + eps) per entry (on the first step): a relative change of about 3 eps / |g|
# between g and g / 4.
above = np.abs(g) > 1e4 * 1e-8
print(f"{above.mean():.1%} of the {g.size:,} entries have |g| > 1e4 eps: there the two updates differ by "
      f"at most {rel[above].max():.1e} (relative)")
print(f"the other {1 - above.mean():.1%} (smaller gradients): by up to {rel[~above].max():.2f}")
assert above.mean() > 0.5 and rel[above].max() < 1e-3

# %% [markdown]
# ## Summary
#
# - At initialisation, pre-LN and no-LN gradients are even across depth; LayerNorm's backward scales
#   them up by the inverse scale of the residual stream; post-LN singles out the first layer.
# - Trained at a high learning rate, post-LN's lower layers lose their gradient (over 1000x below the top
#   layer), pre-LN keeps every layer learning, and without LayerNorm the attention logits grow unchecked.
# - The `1/sqrt(d)` scale keeps logits at unit size; without it, or when logits grow in training, the
#   softmax saturates and its Jacobian, the only path for gradient to queries and keys, vanishes.
# - Clipping turns a diverging SGD run into a training one; AdamW is nearly invariant to a uniform
#   gradient scale, so with AdamW clipping only bites on outlier steps.
#
# To watch these quantities in a real run: `python -m jaxtrain.run train.diagnostics=true` logs the
# per-module gradient norms (`grad_norm/h.0.attn`, ...), update ratios (`update_ratio/...`), attention
# statistics (`attn_logit_max/...`, `attn_saturated/...`) and `clip_frac` to `metrics.jsonl` and
# TensorBoard, and plots them in the run's `plot.png`.
