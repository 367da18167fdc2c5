# %% [markdown]
# # From the PyTorch step to the jaxtrain step
#
# A PyTorch training step is five lines that each change hidden state:
#
# ```python
# logits = model(x); loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
# loss.backward()                                    # writes p.grad into every parameter
# torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)   # rescales p.grad in place
# optimizer.step()                                   # updates p and the optimizer's buffers in place
# optimizer.zero_grad()                              # forgets p.grad for the next step
# ```
#
# jaxtrain's `train_step(state, batch) -> (state, metrics)` does the same work as one pure function:
# gradients are a return value (a pytree shaped like the parameters), clipping and AdamW are an
# `optax` chain, and the new parameters come back in a new `TrainState`.
#
# This notebook runs both on **one tiny GPT with the same weights** and checks, cell by cell, that the
# numbers agree: `p.grad` against the gradient pytree, `clip_grad_norm_` against `clip_by_global_norm`,
# `AdamW.step()` against `tx.update`, and what `zero_grad()` is for. Every `assert` fails the notebook
# (and CI) if an equality breaks. It ends with the order in which the compiled step runs on the device.

# %%
import importlib.util
import os
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
import torch
import torch.nn.functional as F
from flax import nnx

from jaxtrain import OptimConfig, TrainState, lm_loss, make_optimizer, train_step
from jaxtrain.models import GPT, GPTConfig, from_torch_state_dict, to_torch_state_dict

ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
DOCS = os.environ.get("JAXTRAIN_DOCS")  # set by notebooks/build.py to refresh the README's figures


def load_torch_gpt():
    """benchmarks/torch_gpt.py: nanoGPT's model and step in PyTorch (the parity test's reference)."""
    spec = importlib.util.spec_from_file_location("torch_gpt", ROOT / "benchmarks" / "torch_gpt.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["torch_gpt"] = module
    spec.loader.exec_module(module)
    return module


torch_gpt = load_torch_gpt()
torch.set_num_threads(1)
print("jax", jax.__version__, "| torch", torch.__version__, "| device", jax.devices()[0].device_kind)

# %% [markdown]
# ## 1. One model, two frameworks
#
# The PyTorch GPT is nanoGPT's; jaxtrain's Flax NNX GPT uses the same parameter names, so
# `from_torch_state_dict` copies the weights over (transposing `nn.Linear`'s `(out, in)` weights into
# Flax `(in, out)` kernels). Same weights, same batch, same logits.

# %%
ARCH = dict(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True,
            tie_embeddings=True)
LR, BETAS, EPS, WD, MAX_NORM = 1e-3, (0.9, 0.95), 1e-8, 0.1, 0.5

torch.manual_seed(0)
torch_model = torch_gpt.TorchGPT(torch_gpt.TorchGPTConfig(**ARCH))
initial_sd = {k: v.clone() for k, v in torch_model.state_dict().items()}

cfg = GPTConfig(**ARCH)
tx = make_optimizer(OptimConfig(lr=LR, schedule="constant", warmup_steps=0, b1=BETAS[0], b2=BETAS[1], eps=EPS,
                                weight_decay=WD, max_grad_norm=MAX_NORM))
# Built under jax.jit: one compiled program instead of hundreds of small eager ops (as the run loop does).
state = jax.jit(lambda: TrainState.create(GPT(cfg, rngs=nnx.Rngs(0)), tx, rng=0))()
params = from_torch_state_dict(state.params, torch_model.state_dict())
state = state.replace(params=params, opt_state=jax.jit(tx.init)(params))

tokens = np.random.default_rng(0).integers(0, 256, (4, ARCH["block_size"] + 1))
x, y = tokens[:, :-1], tokens[:, 1:]
batch = {"inputs": jnp.asarray(x), "targets": jnp.asarray(y)}

with torch.no_grad():
    logits_torch = torch_model(torch.from_numpy(x)).numpy()
logits_jax = np.asarray(jax.jit(lambda s, x: s.model()(x))(state, batch["inputs"]))
print(f"logits {logits_jax.shape}: max |jax - torch| = {np.abs(logits_jax - logits_torch).max():.2e}")
assert np.allclose(logits_jax, logits_torch, rtol=1e-5, atol=1e-5)

# %% [markdown]
# ## 2. `loss.backward()` and `p.grad` against `jax.value_and_grad`
#
# `loss.backward()` returns nothing: it stores a gradient in each parameter's `.grad`.
# `jax.value_and_grad(f)` turns the loss function into one that returns `(loss, grads)`, where `grads`
# has exactly the structure of the parameters. Because of that, the same interop function that turns
# parameters into a nanoGPT `state_dict` turns the gradient into "what `p.grad` would hold".

# %%
def tensor_rel(a, b):
    """||a - b|| / ||b|| for one tensor: float32 rounding gives ~1e-7..1e-5."""
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


loss_torch = F.cross_entropy(torch_model(torch.from_numpy(x)).flatten(0, 1), torch.from_numpy(y).flatten())
loss_torch.backward()
torch_grads = {name: p.grad.numpy().copy() for name, p in torch_model.named_parameters()}

def loss_fn(params, batch):
    return lm_loss(state.model(params), batch, None)[0]  # (loss, aux) -> loss


loss_and_grad = jax.jit(jax.value_and_grad(loss_fn))  # (params, batch) -> (loss, d loss / d params)
loss_jax, grads = loss_and_grad(state.params, batch)
print("grads['h'][0]['attn'] =", jax.tree.map(lambda g: g.shape, grads["h"][0]["attn"]))
jax_grads = to_torch_state_dict(grads, cfg)  # the gradient pytree, in PyTorch's names and layouts

print(f"\nloss: torch {loss_torch.item():.6f}  jax {float(loss_jax):.6f}\n")
print(f"{'parameter':34s} {'|p.grad|':>10s} {'|jax grad|':>10s} {'rel diff':>9s}")
rel = {}
for name, g in torch_grads.items():
    rel[name] = tensor_rel(jax_grads[name], g)
    print(f"{name:34s} {np.linalg.norm(g):10.5f} {np.linalg.norm(jax_grads[name]):10.5f} {rel[name]:9.1e}")
assert abs(loss_torch.item() - float(loss_jax)) < 1e-5
assert max(rel.values()) < 1e-4, max(rel.items(), key=lambda kv: kv[1])

# %% [markdown]
# ## 3. `clip_grad_norm_` against `clip_by_global_norm`
#
# Both compute one norm over *all* gradients together and, when it exceeds `max_norm`, scale every
# gradient by `max_norm / norm`. PyTorch returns the norm before clipping and edits `p.grad` in place;
# optax returns new, clipped gradients (jaxtrain reports the pre-clip norm as the `grad_norm` metric).
# The only difference is PyTorch's `+ 1e-6` in the denominator.

# %%
norm_torch = torch.nn.utils.clip_grad_norm_(torch_model.parameters(), MAX_NORM).item()
clipped_torch = {name: p.grad.numpy().copy() for name, p in torch_model.named_parameters()}

norm_jax = float(optax.tree.norm(grads))
clip = optax.clip_by_global_norm(MAX_NORM)
clipped, _ = jax.jit(clip.update)(grads, clip.init(grads))
clipped_jax = to_torch_state_dict(clipped, cfg)

print(f"global norm before clipping: torch {norm_torch:.6f}  jax {norm_jax:.6f}  (max_norm {MAX_NORM})")
print(f"global norm after clipping:  torch {np.sqrt(sum((g ** 2).sum() for g in clipped_torch.values())):.6f}"
      f"  jax {float(optax.tree.norm(clipped)):.6f}")
assert norm_torch > MAX_NORM, "the example should clip"
assert abs(norm_torch - norm_jax) < 1e-5 * norm_torch
assert abs(float(optax.tree.norm(clipped)) - MAX_NORM) < 1e-5
worst = max(tensor_rel(clipped_jax[n], g) for n, g in clipped_torch.items())
print(f"largest per-tensor relative difference of the clipped gradients: {worst:.1e}")
assert worst < 1e-4

# %% [markdown]
# ## 4. `optimizer.step()` against `tx.update` + `apply_updates`
#
# `optimizer.step()` reads `p.grad`, updates AdamW's moment buffers and the parameters in place.
# In optax the optimizer state is a value too: `tx.update(grads, opt_state, params)` returns the
# updates and the new state, and `optax.apply_updates` adds them. jaxtrain's `tx` is
# `chain(clip_by_global_norm, adamw)`, so it is fed the *unclipped* gradient and clips it itself.
# Both sides decay only matrices (nanoGPT's two parameter groups).

# %%
torch_opt = torch_gpt.make_adamw(torch_model, LR, BETAS, EPS, WD)
torch_opt.step()  # uses the clipped p.grad from above
torch_after = {k: v.numpy().copy() for k, v in torch_model.state_dict().items()}

@jax.jit
def optimizer_step(grads, opt_state, params):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


params_after, opt_state = optimizer_step(grads, state.opt_state, state.params)
jax_after = to_torch_state_dict(params_after, cfg)

# How far each tensor moved, and how far apart the two results are, in units of the learning rate
# (AdamW's first step moves each entry by about lr).
print(f"{'parameter':34s} {'moved/lr':>9s} {'|jax - torch|/lr':>17s}")
diff = {}
for name in torch_after:
    moved = np.abs(torch_after[name] - initial_sd[name].numpy()).max() / LR
    diff[name] = np.abs(jax_after[name] - torch_after[name]).max() / LR
    print(f"{name:34s} {moved:9.3f} {diff[name]:17.1e}")
assert max(diff.values()) < 0.05, max(diff.items(), key=lambda kv: kv[1])

# %% [markdown]
# `train_step` is those three sections in one pure function. Jitted, it returns the parameters of the
# hand-written `value_and_grad` / `tx.update` / `apply_updates` above (up to float32 rounding, which
# AdamW's first step can magnify for gradients that are themselves rounding noise: again within 5% of
# one learning-rate step), and its `grad_norm` metric is the number `clip_grad_norm_` returned.

# %%
step = jax.jit(train_step)
new_state, metrics = step(state, batch)
print({k: round(float(v), 6) for k, v in metrics.items()})
step_vs_manual = max(float(jnp.abs(a - b).max()) for a, b in
                     zip(jax.tree.leaves(new_state.params), jax.tree.leaves(params_after)))
print(f"max |train_step params - manual params| / lr = {step_vs_manual / LR:.1e}")
assert step_vs_manual < 0.05 * LR
assert abs(float(metrics["grad_norm"]) - norm_torch) < 1e-5 * norm_torch
assert int(new_state.step) == 1 and int(state.step) == 0  # the old state is untouched: nothing happened in place

# %% [markdown]
# ## 5. Why there is nothing to zero
#
# `p.grad` is a buffer that `backward()` *adds* into. `zero_grad()` empties it; forget it and every
# `backward()` piles its gradient on top of the previous ones. Three backward passes on the same batch
# without `zero_grad()`:

# %%
def torch_grad_norm(model):
    return float(torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters())))


def torch_loss(model, x, y):
    return F.cross_entropy(model(torch.from_numpy(x)).flatten(0, 1), torch.from_numpy(y).flatten())


torch_model.load_state_dict(initial_sd)
torch_model.zero_grad(set_to_none=True)
norms = []
for _ in range(3):
    torch_loss(torch_model, x, y).backward()  # ... and no zero_grad()
    norms.append(torch_grad_norm(torch_model))
print("global norm of p.grad after 1, 2, 3 backward() calls:", [round(n, 5) for n in norms])
print("ratios to the first:", [round(n / norms[0], 6) for n in norms])
assert np.allclose(np.array(norms) / norms[0], [1.0, 2.0, 3.0], rtol=1e-5)
assert abs(norms[0] - norm_jax) < 1e-5 * norm_jax  # the first one is the true gradient

# %% [markdown]
# The optimizer would then step with twice, three times the gradient, mixed from stale batches.
# In JAX the gradient is the *return value* of a function of the parameters and the batch: calling it
# again gives the same numbers, and there is no buffer to forget.

# %%
_, grads_again = loss_and_grad(state.params, batch)
same = all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_again)))
print("second call returns the identical gradient:", same)
assert same

# %% [markdown]
# ### Accumulation, on purpose
#
# The accumulating `p.grad` is also how PyTorch users accumulate gradients *deliberately*: several
# `(loss / k).backward()` calls over microbatches, then one `step()`. In jaxtrain accumulation is an
# explicit option, `train_step(state, batch, grad_accum=k)`: a `lax.scan` over `k` microbatches that
# sums gradients as values and averages them. Both give the full-batch gradient.

# %%
k = 2
torch_model.load_state_dict(initial_sd)
torch_model.zero_grad(set_to_none=True)
for xm, ym in zip(np.split(x, k), np.split(y, k)):
    (torch_loss(torch_model, xm, ym) / k).backward()  # deliberate accumulation
accum_torch = torch_grad_norm(torch_model)

m_full = metrics  # train_step on the full batch, from above
_, m_accum = jax.jit(lambda s, b: train_step(s, b, grad_accum=k))(state, batch)
print(f"grad norm, full batch: jax {float(m_full['grad_norm']):.6f}")
print(f"grad norm, {k} microbatches: jax {float(m_accum['grad_norm']):.6f}  torch {accum_torch:.6f}")
assert abs(float(m_accum["grad_norm"]) - float(m_full["grad_norm"])) < 1e-5 * float(m_full["grad_norm"])
assert abs(accum_torch - float(m_full["grad_norm"])) < 1e-5 * accum_torch
assert abs(float(m_accum["loss"]) - float(m_full["loss"])) < 1e-5

# %% [markdown]
# ## 6. The order of events on the device
#
# In PyTorch each line launches its kernels when Python reaches it. jaxtrain's step is traced once and
# compiled by XLA into a single program; Python is not involved while it runs. To see what that
# program does in which order, label the pieces with `jax.named_scope`: a loss function with a
# `forward` and a `loss` part (what `lm_loss` does), and the optimizer's two links `clip` and `update`.
# Automatic differentiation names the backward pass itself: its ops are the `transpose(jvp(...))` of
# forward ops. Then read the order of the ops in the compiled, scheduled HLO.

# %%
def labelled_lm_loss(model, batch, rng):
    with jax.named_scope("forward"):
        logits = model(batch["inputs"])
    with jax.named_scope("loss"):
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()
    return loss, {}


def named(tx, name):
    """The same optax transform, with its update traced under ``jax.named_scope(name)``."""
    def update(updates, opt_state, params=None):
        with jax.named_scope(name):
            return tx.update(updates, opt_state, params)
    return optax.GradientTransformation(tx.init, update)


labelled_tx = optax.chain(named(optax.clip_by_global_norm(MAX_NORM), "clip"),
                          named(optax.adamw(LR, *BETAS, eps=EPS, weight_decay=WD), "update"))
labelled = TrainState.create(GPT(cfg, rngs=nnx.Rngs(0)), labelled_tx, rng=0)
compiled = jax.jit(lambda s, b: train_step(s, b, loss_fn=labelled_lm_loss)).lower(labelled, batch).compile()

PHASES = ("forward", "loss", "backward", "clip", "update")


def phase_of(op_name: str) -> str:
    if "transpose(" in op_name:
        return "backward"
    return next((p for p in ("forward", "loss", "clip", "update") if re.search(rf"\b{p}\b", op_name)), "other")


hlo = compiled.as_text()
entry = hlo[hlo.index("\nENTRY"):]
entry = entry[:entry.index("\n}")]
op_names = [m.group(1) for line in entry.splitlines()
            if " parameter(" not in line and (m := re.search(r'op_name="([^"]*)"', line))]
schedule = [phase_of(name) for name in op_names]
position = {p: np.array([i for i, q in enumerate(schedule) if q == p]) for p in (*PHASES, "other")}
print(f"{len(schedule)} instructions in the compiled step, in execution order")
for p in (*PHASES, "other"):
    pos = position[p]
    print(f"  {p:9s} {len(pos):4d} ops   first {pos.min():4d}   median {int(np.median(pos)):4d}   last {pos.max():4d}")
medians = [np.median(position[p]) for p in PHASES]
assert medians == sorted(medians), dict(zip(PHASES, medians))
early = [name for name, p in zip(op_names[:position["loss"].min()], schedule) if p == "update"]
print("update ops scheduled before the loss is computed:", early)
assert early and all(name.endswith("/pow") for name in early)

# %% [markdown]
# The medians come out in the PyTorch order: forward, loss, backward, clip, update. The edges overlap,
# and that is the point of compiling the whole step: XLA only has to respect data dependencies. The
# update ops it runs before the loss even exists are `pow`s: AdamW's bias corrections `1 - b1^t` and
# `1 - b2^t`, which depend on the step count alone. (The backward's first ops are constants, such as
# the `1/N` of the mean loss.) "other" is `train_step`'s own bookkeeping: the `grad_norm` and
# `param_norm` metrics, applying the updates, and the guard that keeps the old state when a step is
# not finite.

# %%
colors = dict(forward="tab:blue", loss="tab:purple", backward="tab:orange", clip="tab:red",
              update="tab:green", other="lightgray")
fig, ax = plt.subplots(figsize=(11, 2.4), layout="constrained")
for p in (*PHASES, "other"):
    ax.vlines(position[p], 0, 1, colors=colors[p], lw=1.5, label=p)
ax.set(yticks=[], xlim=(0, len(schedule)), xlabel="position in the compiled step's schedule (HLO instruction)",
       title="One jaxtrain train_step on the device: forward, loss, backward, clip, update")
fig.legend(ncol=6, loc="outside lower center", frameon=False)
if DOCS:
    fig.savefig(Path(DOCS) / "notebook01_step_order.png", dpi=110)
plt.show()

# %% [markdown]
# ## Summary
#
# | PyTorch | jaxtrain | checked above |
# | --- | --- | --- |
# | `loss.backward()` fills `p.grad` | `loss, grads = jax.value_and_grad(f)(params)` | every tensor within 1e-4 (relative) |
# | `clip_grad_norm_(params, c)` | `optax.clip_by_global_norm(c)`; `grad_norm` metric | same norm before and after |
# | `optimizer.step()` (AdamW) | `tx.update` + `optax.apply_updates` | every entry within 5% of one lr step |
# | `optimizer.zero_grad()` | nothing: gradients are return values | forgotten: norms x1, x2, x3 |
# | `(loss / k).backward()` k times | `train_step(..., grad_accum=k)` | same gradient as the full batch |
# | five statements, run as reached | one compiled program | forward < loss < backward < clip < update |
