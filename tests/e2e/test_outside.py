"""Uses of the public API and the CLI beyond the main tests: research-code models and user mistakes."""

import functools
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from jaxtrain import TrainState, eval_step, make_optimizer, train_step
from jaxtrain import OptimConfig

ROOT = Path(__file__).resolve().parents[2]


class _BatchNormNet(nnx.Module):
    """A regressor with BatchNorm statistics and an integer counter in its model_state."""

    def __init__(self, rngs: nnx.Rngs):
        self.lin = nnx.Linear(4, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.out = nnx.Linear(8, 1, rngs=rngs)
        self.calls = nnx.BatchStat(jnp.zeros((), jnp.int32))

    def __call__(self, x, train: bool):
        self.calls[...] += 1
        return self.out(nnx.relu(self.bn(self.lin(x), use_running_average=not train)))[:, 0]


def _bn_loss(model, batch, rng):
    return ((model(batch["x"], rng is not None) - batch["y"]) ** 2).mean(), {}


def _bn_state():
    tx = make_optimizer(OptimConfig(lr=1e-2, schedule="constant", warmup_steps=0))
    return TrainState.create(_BatchNormNet(nnx.Rngs(0)), tx)


@pytest.mark.parametrize("grad_accum", [1, 2])
@pytest.mark.slow
def test_batchnorm_model_under_shard_map_and_pmap_keeps_replicated_statistics(grad_accum):
    n = 4
    rng = np.random.default_rng(0)
    batch = {"x": rng.normal(size=(8, 4)).astype(np.float32), "y": rng.normal(size=8).astype(np.float32)}
    fn = functools.partial(train_step, loss_fn=_bn_loss, axis_name="d", grad_accum=grad_accum)
    mesh = jax.make_mesh((n,), ("d",), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])
    smap = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P(), P("d")), out_specs=(P(), P())))
    s_state, _ = smap(_bn_state(), batch)

    rep = jax.tree.map(lambda x: jnp.stack([x] * n), _bn_state())
    p_state, _ = jax.pmap(fn, axis_name="d", devices=jax.devices()[:n])(
        rep, jax.tree.map(lambda x: x.reshape(n, -1, *x.shape[1:]), batch))
    for leaf in jax.tree.leaves(p_state.model_state):  # every replica holds the same statistics
        np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[0], leaf.shape))
    jax.tree.map(lambda s, p: np.testing.assert_allclose(s, p[0], rtol=1e-6), s_state.model_state, p_state.model_state)
    assert int(s_state.model_state["calls"]) == grad_accum

    # The running mean averages equal-sized per-device (micro)batch means: the one-device mean.
    ref, _ = jax.jit(functools.partial(train_step, loss_fn=_bn_loss, grad_accum=grad_accum))(_bn_state(), batch)
    np.testing.assert_allclose(s_state.model_state["bn"]["mean"], ref.model_state["bn"]["mean"], rtol=1e-5, atol=1e-7)


class _MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(16, 32, rngs=rngs)
        self.l2 = nnx.Linear(32, 4, rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.relu(self.l1(x)))


def _mlp_loss(model, batch, rng):
    logits = model(batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["y"]).mean(), {}


def _dot_dtypes(fn, *args) -> set[str]:
    jaxpr = jax.make_jaxpr(fn)(*args)
    out, todo = set(), [jaxpr.jaxpr]
    while todo:
        j = todo.pop()
        for e in j.eqns:
            if e.primitive.name == "dot_general":
                out.add(str(e.outvars[0].aval.dtype))
            todo += [v.jaxpr if hasattr(v, "jaxpr") else v for v in e.params.values()
                     if hasattr(v, "eqns") or hasattr(getattr(v, "jaxpr", None), "eqns")]
    return out


def test_compute_dtype_bfloat16_computes_in_bfloat16_for_a_float_input_model():
    tx = make_optimizer(OptimConfig(schedule="constant", warmup_steps=0))
    state = TrainState.create(_MLP(nnx.Rngs(0)), tx)
    batch = {"x": jnp.ones((8, 16), jnp.float32), "y": jnp.zeros(8, jnp.int32)}
    step = functools.partial(train_step, loss_fn=_mlp_loss, compute_dtype=jnp.bfloat16)
    assert _dot_dtypes(step, state, batch) == {"bfloat16"}
    assert _dot_dtypes(functools.partial(eval_step, loss_fn=_mlp_loss, compute_dtype=jnp.bfloat16),
                       state, batch) == {"bfloat16"}
    new, metrics = jax.jit(step)(state, batch)
    assert jax.tree.leaves(jax.tree.map(lambda x: x.dtype, new.params)) == [jnp.float32] * 4
    assert np.isfinite(float(metrics["loss"]))


@pytest.mark.parametrize("yaml_text, overrides, expected", [
    ("modle:\n  n_layer: 2\n", [], "unknown config key 'modle.n_layer' in '{path}'; did you mean 'model.n_layer'?"),
    ("model:\n  - 1\n  - 2\n", [], "'model' in '{path}' must be a mapping of model.* keys"),
    ("model: null\n", [], "'model' in '{path}' must be a mapping of model.* keys"),
    ("- a\n- b\n", [], "'{path}' must be a mapping of config sections (model, data,"),
    ("train:\n  steps: 5\n  steps: 6\n", [], "found duplicate key steps"),
    ("", ["modle.n_layer=3"], "unknown config key 'modle.n_layer' in command-line overrides; did you mean 'model.n_layer'?"),
    ("", ["train=3"], "'train' in command-line overrides must be a mapping of train.* keys"),
])
def test_config_mistakes_name_the_key_on_one_line(tmp_path, capsys, yaml_text, overrides, expected):
    from jaxtrain.app import cli as run

    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    assert run.run(["--config", str(path), f"run_dir={tmp_path / 'run'}", *overrides]) == run.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert expected.format(path=path) in err
    assert not (tmp_path / "run").exists()


def test_a_directory_as_config_is_named_as_a_directory(tmp_path, capsys):
    from jaxtrain.app import cli as run

    assert run.run(["--config", str(tmp_path)]) == run.EXIT_USER_ERROR
    assert f"config file '{tmp_path}' is a directory" in capsys.readouterr().err


def test_text_overrides_need_no_yaml_quoting():
    from jaxtrain.app import config

    cfg = config.load("configs/tiny.yaml", ["data.glob=*.md", "train.sample_prompt=def f(x):",
                                            "data.val_source=", "run_dir='runs/a b'", "train.steps=7"])
    assert cfg.data.glob == "*.md"
    assert cfg.train.sample_prompt == "def f(x):"
    assert cfg.data.val_source is None and cfg.run_dir == "runs/a b" and cfg.train.steps == 7
    with pytest.raises(config.ConfigError, match="bad value for 'train.steps'"):
        config.load("configs/tiny.yaml", ["train.steps=*x"])


@pytest.mark.parametrize("name", ["a" * 300, "x/" + "b" * 300])
def test_a_run_dir_the_os_refuses_is_a_one_line_error(tmp_path, capsys, name):
    from jaxtrain.app import cli as run

    before = sorted(tmp_path.iterdir())
    assert run.run(["--config", "configs/tiny.yaml", f"run_dir={tmp_path / name}"]) == run.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot create a directory there (File name too long)" in err, err
    assert sorted(tmp_path.iterdir()) == before  # the probe left nothing behind


@pytest.mark.parametrize("below", ["", "x/y"])
def test_a_file_in_the_run_dir_path_is_a_one_line_error_and_stays_untouched(tmp_path, capsys, below):
    from jaxtrain.app import cli as run

    blocker = tmp_path / "afile"
    blocker.write_text("keep me")
    run_dir = blocker / below if below else blocker
    assert run.run(["--config", "configs/tiny.yaml", f"run_dir={run_dir}"]) == run.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"'{blocker}' is a file, not a directory" in err
    assert blocker.read_text() == "keep me"


@pytest.mark.parametrize("argv, expected", [
    (["--tokens", "-5"], "error: --tokens=-5 must be >= 0"),
    (["--num-samples", "0"], "error: --num-samples=0 must be >= 1"),
    (["--temperature", "-1"], "error: --temperature=-1.0: must be a finite number >= 0"),
    (["--top-k", "-3"], "error: --top-k=-3: must be an integer >= 0"),
    (["--bogus"], "error: unrecognized arguments: --bogus"),
    (["--tokens", "abc"], "error: argument --tokens: invalid int value: 'abc'"),
])
def test_generate_flag_mistakes_are_one_line_naming_the_flag(tmp_path, capsys, argv, expected):
    from jaxtrain.app import generate

    try:
        code = generate.main(["--run-dir", str(tmp_path), *argv])
    except SystemExit as e:  # argparse's own errors exit
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(expected), err


def test_config_flag_without_a_file_is_one_line(capsys):
    from jaxtrain.app import cli as run

    assert run.run(["--config"]) == run.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err == "error: argument --config: expected one argument; see jaxtrain run --help\n"


def test_ctrl_c_before_the_loop_is_one_line_and_exit_130(monkeypatch, capsys, tmp_path):
    from jaxtrain.app import loop
    from jaxtrain.app import cli as run

    def interrupted(cfg):
        raise KeyboardInterrupt

    class Exited(Exception):
        pass

    def fake_exit(code):
        raise Exited(code)

    monkeypatch.setattr(loop, "train", interrupted)
    monkeypatch.setattr(run.os, "_exit", fake_exit)
    with pytest.raises(Exited) as e:
        run.run(["--config", "configs/tiny.yaml", f"run_dir={tmp_path / 'run'}"])
    assert e.value.args == (130,)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("interrupted: stopped outside the training loop")


class _StoredRngsDropout(nnx.Module):
    """The common NNX idiom: Dropout keeps its own Rngs (a typed key and a uint32 count in model_state)."""

    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(16, 32, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.l2 = nnx.Linear(32, 4, rngs=rngs)

    def __call__(self, x, train: bool):
        return self.l2(self.drop(nnx.relu(self.l1(x)), deterministic=not train))


def _dropout_loss(model, batch, rng):
    logits = model(batch["x"], rng is not None)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean(), {}


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_a_model_with_stored_rngs_runs_under_shard_map(grad_accum):
    n = 4
    tx = make_optimizer(OptimConfig(schedule="constant", warmup_steps=0))
    state = TrainState.create(_StoredRngsDropout(nnx.Rngs(0)), tx)
    batch = {"x": jnp.ones((8, 16)), "y": jnp.zeros(8, jnp.int32)}
    mesh = jax.make_mesh((n,), ("d",), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])
    fn = functools.partial(train_step, loss_fn=_dropout_loss, axis_name="d", grad_accum=grad_accum)
    new, metrics = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P(), P("d")), out_specs=(P(), P())))(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    assert int(new.model_state["drop"]["rngs"]["count"]) == grad_accum  # one dropout draw per microbatch


def test_a_numpy_integer_seed_makes_the_same_state_as_an_int():
    tx = make_optimizer(OptimConfig(schedule="constant", warmup_steps=0))
    a = TrainState.create(_MLP(nnx.Rngs(0)), tx, rng=np.int64(3))
    b = TrainState.create(_MLP(nnx.Rngs(0)), tx, rng=3)
    np.testing.assert_array_equal(jax.random.key_data(a.rng), jax.random.key_data(b.rng))


class _PlainLM(nnx.Module):
    """A language model whose __call__ takes only the tokens (no rngs / deterministic keywords)."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(256, 16, rngs=rngs)
        self.out = nnx.Linear(16, 256, rngs=rngs)

    def __call__(self, tokens):
        return self.out(self.embed(tokens))


def test_default_lm_loss_calls_a_model_without_rngs_keywords():
    state = TrainState.create(_PlainLM(nnx.Rngs(0)), make_optimizer(OptimConfig(lr=1e-2, schedule="constant")), rng=0)
    x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 9)), jnp.int32)
    batch = {"inputs": x[:, :-1], "targets": x[:, 1:]}
    step = jax.jit(train_step)
    losses = []
    for _ in range(5):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] and float(eval_step(state, batch)["loss"]) < losses[0]


def test_num_params_works_on_a_shape_only_model():
    from jaxtrain.models import GPT, GPTConfig

    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32)
    real = GPT(cfg, rngs=nnx.Rngs(0))
    abstract = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
    assert abstract.num_params() == real.num_params() and abstract.flops_per_token() == real.flops_per_token()


def test_an_empty_config_flag_value_is_one_line(capsys):
    from jaxtrain.app import cli as run

    assert run.run(["--config="]) == run.EXIT_USER_ERROR
    assert capsys.readouterr().err == ("error: --config got an empty value; give a config name or a YAML file, "
                                       "e.g. --config tiny\n")


class _Regressor(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.lin = nnx.Linear(3, 1, rngs=rngs)

    def __call__(self, x):
        return self.lin(x)[:, 0]


def _mse_only(model, batch, rng):  # research code often returns the loss alone
    x, y = batch
    return jnp.mean((model(x) - y) ** 2)


def _regression():
    x = np.random.default_rng(0).random((8, 3), np.float32)
    tx = make_optimizer(OptimConfig(lr=1e-1, schedule="constant", warmup_steps=0))
    return TrainState.create(_Regressor(nnx.Rngs(0)), tx, rng=0), (x, x.sum(1))


@pytest.mark.parametrize("grad_accum, diagnostics", [(1, False), (2, True)])
def test_a_loss_fn_may_return_the_loss_alone(grad_accum, diagnostics):
    state, batch = _regression()
    step = jax.jit(functools.partial(train_step, loss_fn=_mse_only, grad_accum=grad_accum, diagnostics=diagnostics))
    first = float(eval_step(state, batch, loss_fn=_mse_only)["loss"])
    for _ in range(10):
        state, metrics = step(state, batch)
    assert float(eval_step(state, batch, loss_fn=_mse_only)["loss"]) < first / 2
    assert set(metrics) >= {"loss", "grad_norm", "lr"}


@pytest.mark.parametrize("loss_fn, kwargs, message", [
    (lambda m, b, r: ((m(b[0]) - b[1]) ** 2, {}), {}, "must return a scalar loss .* shape \\(8,\\)"),
    (lambda m, b, r: (_mse_only(m, b, r), 3.0), {}, "returned aux of type float; it must be a dict"),
    (_mse_only, {"grad_accum": 0}, "grad_accum=0: must be a positive integer"),
])
def test_loss_fn_and_grad_accum_mistakes_are_named(loss_fn, kwargs, message):
    state, batch = _regression()
    with pytest.raises(ValueError, match=message):
        train_step(state, batch, loss_fn=loss_fn, **kwargs)


def test_a_loss_fn_with_the_wrong_arguments_is_told_the_signature():
    state, batch = _regression()

    def two_args(model, batch):
        return _mse_only(model, batch, None)

    for fn in (functools.partial(train_step, loss_fn=two_args), functools.partial(eval_step, loss_fn=two_args)):
        with pytest.raises(TypeError, match=r"loss_fn two_args must take \(model, batch, rng\)"):
            fn(state, batch)


def test_trainstate_rng_must_be_a_seed_or_a_key():
    with pytest.raises(TypeError, match="rng must be an int seed or a jax.random.key, got None"):
        TrainState.create(_Regressor(nnx.Rngs(0)), optax.adam(1e-3), rng=None)
    with pytest.raises(TypeError, match=r"got an array of float32\[3\].*jax.random.wrap_key_data"):
        TrainState.create(_Regressor(nnx.Rngs(0)), optax.adam(1e-3), rng=jnp.ones(3))
    # a JAX integer scalar is a seed, as a Python or NumPy int is
    from_jax = TrainState.create(_Regressor(nnx.Rngs(0)), optax.adam(1e-3), rng=jnp.int32(3))
    from_int = TrainState.create(_Regressor(nnx.Rngs(0)), optax.adam(1e-3), rng=3)
    np.testing.assert_array_equal(jax.random.key_data(from_jax.rng), jax.random.key_data(from_int.rng))
    state, batch = _regression()
    state = TrainState.create(_Regressor(nnx.Rngs(0)), state.tx, rng=jnp.uint32(7))
    new, _ = jax.jit(functools.partial(train_step, loss_fn=_mse_only))(state, batch)  # the key works in a step
    assert int(new.step) == 1


def test_a_custom_model_trainstate_round_trips_through_plain_orbax(tmp_path):
    import orbax.checkpoint as ocp

    state = TrainState.create(_BatchNormNet(nnx.Rngs(0)), optax.adamw(1e-2), rng=3)
    x = np.random.default_rng(0).random((8, 4), np.float32)
    batch = {"x": x, "y": x.sum(1)}
    for _ in range(3):
        state, _ = train_step(state, batch, loss_fn=_bn_loss)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "ckpt", state)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "ckpt", jax.eval_shape(lambda: state))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # and training goes on identically from either
    np.testing.assert_array_equal(train_step(state, batch, loss_fn=_bn_loss)[1]["loss"],
                                  train_step(restored, batch, loss_fn=_bn_loss)[1]["loss"])


# ---------------------------------------------------------------- models as NNX writes them


class _DropoutBatchNormNet(nnx.Module):
    """Dropout with its own Rngs and BatchNorm, called with no train/eval flag: the module's mode decides."""

    def __init__(self, rngs: nnx.Rngs):
        self.lin = nnx.Linear(4, 16, rngs=rngs)
        self.bn = nnx.BatchNorm(16, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.out = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x):
        return self.out(self.drop(nnx.relu(self.bn(self.lin(x)))))[:, 0]


def _plain_loss(model, batch, rng):
    return ((model(batch["x"]) - batch["y"]) ** 2).mean()


def _xy_batch(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, 4)).astype(np.float32) * 3 + 1, "y": rng.normal(size=n).astype(np.float32)}


def test_eval_step_is_eval_mode_and_train_step_is_train_mode_whatever_the_model_was_in():
    batch = _xy_batch()
    model = _DropoutBatchNormNet(nnx.Rngs(0))
    model.eval()  # e.g. evaluated before training started: train_step must still train in train mode
    tx = make_optimizer(OptimConfig(lr=1e-2, schedule="constant", warmup_steps=0))
    state = TrainState.create(model, tx)
    step = jax.jit(functools.partial(train_step, loss_fn=_plain_loss))
    state, _ = step(state, batch)
    state, _ = step(state, batch)
    assert int(state.model_state["drop"]["rngs"]["count"]) == 2  # dropout drew a mask each step
    assert not np.allclose(state.model_state["bn"]["mean"], 0.0)  # BatchNorm updated its statistics

    evals = [float(eval_step(state, batch, loss_fn=_plain_loss)["loss"]) for _ in range(2)]
    ref = state.model()
    ref.eval()
    want = float(_plain_loss(ref, batch, None))
    assert evals == [pytest.approx(want, rel=1e-6)] * 2
    # one more step advances the dropout key: evaluation does not depend on it
    later, _ = jax.jit(functools.partial(train_step, loss_fn=_plain_loss, skip_nonfinite=False))(
        state.replace(opt_state=state.tx.init(state.params)), batch)
    ref_later = later.model()
    ref_later.eval()
    assert float(eval_step(later, batch, loss_fn=_plain_loss)["loss"]) == pytest.approx(
        float(_plain_loss(ref_later, batch, None)), rel=1e-6)


class _SowingNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.lin = nnx.Linear(4, 1, rngs=rngs)

    def __call__(self, x):
        y = self.lin(x)[:, 0]
        self.sow(nnx.Intermediate, "pred_mean", y.mean())
        return y


@pytest.mark.filterwarnings("ignore:Using 'Module.sow\\(\\)' outside:DeprecationWarning")
@pytest.mark.parametrize("kw", [{}, {"grad_accum": 2}, {"skip_nonfinite": False}])
def test_a_model_that_sows_intermediates_trains(kw):
    model = _SowingNet(nnx.Rngs(0))
    model(jnp.ones((2, 4)))  # sown before the state is made: not part of it either
    state = TrainState.create(model, optax.adam(1e-2))
    assert state.model_state == {}
    step = jax.jit(functools.partial(train_step, loss_fn=_plain_loss, **kw))
    batch = _xy_batch()
    losses = []
    for _ in range(3):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert state.model_state == {} and losses[-1] < losses[0]


class _FlagNet(nnx.Module):
    """Integer and boolean non-trainable state computed from the batch (a count and an "outlier seen" flag)."""

    def __init__(self, rngs: nnx.Rngs):
        self.lin = nnx.Linear(4, 1, rngs=rngs)
        self.rows = nnx.BatchStat(jnp.zeros((), jnp.int32))
        self.outlier = nnx.BatchStat(jnp.zeros((), jnp.bool_))

    def __call__(self, x):
        self.rows[...] = jnp.maximum(self.rows[...], jnp.sum(x[:, 0] > 0).astype(jnp.int32))
        self.outlier[...] = self.outlier[...] | jnp.any(jnp.abs(x) > 8)
        return self.lin(x)[:, 0]


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_integer_and_boolean_model_state_under_shard_map_and_pmap_stays_replicated(grad_accum):
    n = 4
    batch = _xy_batch(16, seed=1)
    batch["x"][5, 2] = 20.0  # one outlier, on one device only
    fn = functools.partial(train_step, loss_fn=_plain_loss, axis_name="d", grad_accum=grad_accum)
    state = lambda: TrainState.create(_FlagNet(nnx.Rngs(0)), optax.adam(1e-2))  # noqa: E731
    mesh = jax.make_mesh((n,), ("d",), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])
    s_state, _ = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P(), P("d")), out_specs=(P(), P())))(
        state(), batch)
    p_state, _ = jax.pmap(fn, axis_name="d", devices=jax.devices()[:n])(
        jax.tree.map(lambda x: jnp.stack([x] * n), state()),
        jax.tree.map(lambda x: x.reshape(n, -1, *x.shape[1:]), batch))
    for leaf in jax.tree.leaves(p_state.model_state):  # every replica holds the same values
        np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[0], leaf.shape))
    assert bool(s_state.model_state["outlier"]) and bool(p_state.model_state["outlier"][0])
    # integers take the maximum over devices (and microbatches, for this max-counter)
    rows = batch["x"][:, 0] > 0
    per_part = rows.reshape(n, -1)
    if grad_accum == 2:  # strided microbatches within each device's rows
        per_part = per_part.reshape(n, -1, 2).swapaxes(1, 2).reshape(n * 2, -1)
    assert int(s_state.model_state["rows"]) == int(p_state.model_state["rows"][0]) == per_part.sum(1).max()


def test_grad_accum_with_a_scalar_batch_leaf_names_it():
    batch = {**_xy_batch(), "scale": np.float32(2.0)}
    with pytest.raises(ValueError, match=r"batch leaf \['scale'\] is a scalar"):
        jax.jit(functools.partial(train_step, loss_fn=_plain_loss, grad_accum=2))(
            TrainState.create(_SowingNet(nnx.Rngs(0)), optax.adam(1e-2)), batch)


@pytest.mark.slow
def test_a_checkpoint_write_that_fails_in_orbaxs_writer_threads_is_one_error_line(tmp_path):
    """A full disk, seen here as a file-size limit: the loop's one line, not Orbax's thread tracebacks."""
    # bash sets the limit (32 KiB: run files fit, checkpoint data does not) and ignores SIGXFSZ, so
    # writes past it fail with EFBIG; both survive the exec (no preexec_fn in a threaded process)
    command = ["bash", "-c", "ulimit -f 32 && trap '' XFSZ && exec \"$@\"", "bash", sys.executable, "-m",
               "jaxtrain.run", "--config", "configs/tiny.yaml", f"run_dir={tmp_path}", "train.steps=4",
               "train.log_every=2", "log.progress=false", "log.plot=false"]
    r = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env=dict(os.environ, JAXTRAIN_COMPILATION_CACHE="off", XLA_FLAGS=""))
    assert r.returncode == 1, r.stderr[-3000:]
    assert r.stderr.count("\n") == 1, r.stderr[-3000:]
    assert r.stderr.startswith(f"error: writing a checkpoint under '{tmp_path / 'checkpoints'}' failed")
    assert "File too large" in r.stderr
    assert not any(p.name.isdigit() for p in (tmp_path / "checkpoints").iterdir())  # nothing half-written was committed


def test_aux_metrics_combine_over_microbatches_and_devices_as_the_whole_batch_would():
    """Means stay means; ``max_``/``min_`` metrics take the max/min: the same with grad_accum and shard_map."""
    state, (x, y) = _regression()

    def loss_fn(model, batch, rng):
        err = model(batch[0]) - batch[1]
        return jnp.mean(err ** 2), {"mean_abs": jnp.mean(jnp.abs(err)), "max_err": jnp.max(jnp.abs(err)),
                                    "min_err": jnp.min(jnp.abs(err))}

    step = functools.partial(train_step, loss_fn=loss_fn)
    _, whole = jax.jit(step)(state, (x, y))
    _, accum = jax.jit(functools.partial(step, grad_accum=4))(state, (x, y))
    mesh = jax.make_mesh((4,), ("d",), axis_types=(AxisType.Auto,), devices=jax.devices()[:4])
    sharded = jax.jit(jax.shard_map(functools.partial(step, axis_name="d"), mesh=mesh,
                                    in_specs=(P(), P("d")), out_specs=(P(), P())))
    _, devices = sharded(state, (x, y))
    for key in ("loss", "mean_abs", "max_err", "min_err"):
        for got in (accum, devices):
            assert float(got[key]) == pytest.approx(float(whole[key]), rel=1e-5), key
