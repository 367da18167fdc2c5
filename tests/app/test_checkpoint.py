"""Checkpoints in-process: round trips, refusals, damage, resharding across device counts, stop signals."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrain.app import checkpoint
from jaxtrain.app import config as config_lib
from jaxtrain.app import preempt as signals
from jaxtrain.app.checkpoint import CheckpointError
from jaxtrain.app.config import ConfigError, ParallelConfig
from jaxtrain.parallel import make_mesh
from jaxtrain.step import lm_loss
from jaxtrain import make_optimizer

# After a failed read of a damaged checkpoint, Orbax's reader threads report it once
# more ("Event loop is closed") when they are collected, possibly during a later test.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def tiny_config(run_dir, *overrides: str) -> config_lib.Config:
    return config_lib.load(None, [f"run_dir={run_dir}", "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
                                  "model.block_size=16", "train.steps=10", "checkpoint.async_save=false",
                                  *overrides])


def trained_looking(cfg, seed: int = 1):
    """A state whose params and Adam moments are all distinct random numbers (not init values)."""
    state = checkpoint.build_state(cfg)
    rng = np.random.default_rng(seed)

    def noise(x):
        if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim:
            return jnp.asarray(rng.standard_normal(x.shape, np.float32))
        return x

    return state.replace(step=jnp.int32(7), params=jax.tree.map(noise, state.params),
                         opt_state=jax.tree.map(noise, state.opt_state), rng=jax.random.key(42))


def host_leaves(state) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(checkpoint.leaves(state.replace(rng=jax.random.key_data(state.rng))))]


def assert_same(a, b):
    for x, y in zip(host_leaves(a), host_leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def abstract(cfg, mesh=None):
    return checkpoint.with_shardings(jax.eval_shape(lambda: checkpoint.build_state(cfg)), mesh)


def saved(cfg, *states, data_step=None):
    mngr = checkpoint.manager(cfg.run_dir, cfg.checkpoint)
    for s in states:
        assert checkpoint.save(mngr, s, config=cfg, data_step=int(s.step) if data_step is None else data_step)
    mngr.wait_until_finished()
    return mngr


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def cfg(tmp_path):
    return tiny_config(tmp_path / "run")


# ---------------------------------------------------------------- save and restore


def test_round_trip_is_bit_exact_with_metadata(cfg):
    import jaxtrain

    state = trained_looking(cfg)
    saved(cfg, state, data_step=7).close()
    mngr = checkpoint.manager(cfg.run_dir, cfg.checkpoint)  # a fresh manager, as after a restart
    restored, meta = checkpoint.restore_latest(mngr, abstract(cfg), cfg)
    assert_same(state, restored)
    assert int(restored.step) == 7 and meta["data_step"] == 7
    assert meta["config"] == config_lib.to_dict(cfg) and meta["jaxtrain_version"] == jaxtrain.__version__
    assert jax.random.key_data(restored.rng).tolist() == jax.random.key_data(jax.random.key(42)).tolist()


def test_async_save_round_trips(cfg):
    cfg = config_lib.replace(cfg, checkpoint=dict(async_save=True))
    state = trained_looking(cfg)
    mngr = checkpoint.manager(cfg.run_dir, cfg.checkpoint)
    assert checkpoint.save(mngr, state, config=cfg, data_step=7)
    mngr.wait_until_finished()
    assert_same(state, checkpoint.restore_latest(mngr, abstract(cfg), cfg)[0])


@pytest.mark.parametrize("where", ["params", "opt_state"])
def test_save_refuses_nonfinite_state(cfg, caplog, where):
    state = trained_looking(cfg)
    tree = getattr(state, where)
    leaves, treedef = jax.tree.flatten(tree)
    i = next(i for i, x in enumerate(leaves) if x.ndim)
    leaves[i] = leaves[i].at[(0,) * leaves[i].ndim].set(jnp.inf if where == "opt_state" else jnp.nan)
    bad = state.replace(**{where: jax.tree.unflatten(treedef, leaves)})
    mngr = checkpoint.manager(cfg.run_dir, cfg.checkpoint)
    with caplog.at_level(logging.WARNING, logger="jaxtrain.checkpoint"):
        assert checkpoint.save(mngr, bad, config=cfg, data_step=7) is False
    assert "not saving checkpoint at step 7" in caplog.text and "NaN/Inf" in caplog.text
    assert mngr.all_steps() == [] and not list(checkpoint.checkpoint_dir(cfg.run_dir).iterdir())


def test_save_skips_an_existing_step(cfg):
    state = trained_looking(cfg)
    mngr = saved(cfg, state)
    assert checkpoint.save(mngr, trained_looking(cfg, seed=2), config=cfg, data_step=7) is False
    assert_same(state, checkpoint.restore_latest(mngr, abstract(cfg), cfg)[0])


def test_keep_and_keep_every(cfg):
    cfg = config_lib.replace(cfg, checkpoint=dict(keep=2, keep_every=4))
    state = trained_looking(cfg)
    mngr = saved(cfg, *(state.replace(step=jnp.int32(s)) for s in range(1, 10)))
    assert sorted(mngr.all_steps()) == [4, 8, 9]  # the newest 2, and every 4th


# ---------------------------------------------------------------- the resume rule


def test_no_checkpoint_means_fresh_start(cfg):
    mngr = checkpoint.manager(cfg.run_dir, cfg.checkpoint)
    assert checkpoint.restore_latest(mngr, abstract(cfg), cfg) is None
    checkpoint.check_resume(config_lib.replace(cfg, checkpoint=dict(resume=False)))  # empty: allowed


def test_resume_false_refuses_existing_checkpoints(cfg):
    mngr = saved(cfg, trained_looking(cfg))
    fresh = config_lib.replace(cfg, checkpoint=dict(resume=False))
    before = listing(Path(cfg.run_dir))
    for attempt in (lambda: checkpoint.check_resume(fresh), lambda: checkpoint.restore_latest(mngr, abstract(fresh), fresh)):
        with pytest.raises(ConfigError, match=r"checkpoint.resume=false but '.*checkpoints' already holds checkpoints \(steps 7\)"):
            attempt()
    assert listing(Path(cfg.run_dir)) == before


def test_architecture_change_is_refused_naming_keys_and_values(cfg):
    mngr = saved(cfg, trained_looking(cfg))
    changed = config_lib.replace(cfg, model=dict(n_embd=64, n_head=4))
    for attempt in (lambda: checkpoint.check_resume(changed),
                    lambda: checkpoint.restore_latest(mngr, abstract(changed), changed)):
        with pytest.raises(ConfigError) as e:
            attempt()
        msg = str(e.value)
        assert "model.n_head: saved 2, now 4" in msg and "model.n_embd: saved 32, now 64" in msg
        assert "new run_dir" in msg and "\n" not in msg


def test_other_changes_resume_and_take_the_new_optimizer_constants(cfg):
    state = trained_looking(cfg)
    mngr = saved(cfg, state)
    changed = config_lib.replace(cfg, train=dict(steps=50), optim=dict(lr=1e-4, weight_decay=0.0, b2=0.99),
                                 model=dict(dropout=0.1))
    restored, _ = checkpoint.restore_latest(mngr, abstract(changed), changed)
    # Only the learning rate is optimizer state: the other constants come with the current tx.
    hyper = restored.opt_state[1].hyperparams
    assert set(hyper) == {"learning_rate"}
    assert (restored.tx.config.weight_decay, restored.tx.config.b2) == (0.0, 0.99)
    # Everything else is exactly what was saved (the learning rate comes from the schedule).
    np.testing.assert_array_equal(hyper["learning_rate"], state.opt_state[1].hyperparams["learning_rate"])
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(restored.params)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(state.opt_state[1].inner_state), jax.tree.leaves(restored.opt_state[1].inner_state)):
        np.testing.assert_array_equal(a, b)
    # ... and the next update uses them: no weight decay now, so a zero gradient leaves params as Adam moves them
    grads = jax.tree.map(jnp.zeros_like, restored.params)
    updates, _ = restored.tx.update(grads, restored.opt_state, restored.params)
    expected, _ = make_optimizer(changed.optim, changed.train.steps).update(grads, restored.opt_state, restored.params)
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(a, b)


def test_saved_tree_mismatch_is_named(cfg):
    """A different model under the same config keys (custom code): the first differing array is named."""
    saved(cfg, trained_looking(cfg))
    mngr = checkpoint.manager(cfg.run_dir, cfg.checkpoint)
    other = abstract(config_lib.replace(cfg, model=dict(vocab_size=300)))
    with pytest.raises(ConfigError, match=r"opt_state\..*wte\.embedding saved \(256, 32\), now \(300, 32\)"):
        checkpoint.restore_latest(mngr, other, cfg)


# ---------------------------------------------------------------- damage


def _damage(step_dir: Path, how: str) -> None:
    data = sorted((step_dir / "state").rglob("d/*"))
    match how:
        case "truncate":
            with open(data[0], "r+b") as f:
                f.truncate(f.seek(0, 2) // 2)
        case "delete-data":
            data[0].unlink()
        case "delete-state-metadata":
            (step_dir / "state" / "_METADATA").unlink()
        case "delete-meta":
            shutil.rmtree(step_dir / "meta")
        case "meta-without-data-step":  # valid JSON that is not jaxtrain's metadata
            meta = step_dir / "meta" / "metadata"
            meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "data_step"}))


@pytest.mark.parametrize("how", ["truncate", "delete-data", "delete-state-metadata", "delete-meta",
                                 "meta-without-data-step"])
def test_damaged_newest_step_falls_back_with_a_warning(cfg, caplog, how):
    older, newer = trained_looking(cfg, seed=1), trained_looking(cfg, seed=2).replace(step=jnp.int32(9))
    saved(cfg, older, newer).close()
    root = checkpoint.checkpoint_dir(cfg.run_dir)
    _damage(root / "9", how)
    mngr = checkpoint.manager(cfg.run_dir, cfg.checkpoint)
    with caplog.at_level(logging.WARNING, logger="jaxtrain.checkpoint"):
        restored, meta = checkpoint.restore_latest(mngr, abstract(cfg), cfg)
    assert int(restored.step) == 7 and meta["data_step"] == 7
    assert_same(older, restored)
    assert f"checkpoint step 9 in '{root}' is damaged" in caplog.text
    # Kept, not deleted: moved aside so the resumed run can write step 9 again.
    (moved,) = (Path(cfg.run_dir) / checkpoint.DAMAGED_DIR).iterdir()
    assert moved.name.startswith("9-") and (moved / "state").is_dir()
    assert mngr.all_steps() == [7]
    assert checkpoint.save(mngr, newer, config=cfg, data_step=9)


def test_nothing_readable_raises_and_deletes_nothing(cfg):
    saved(cfg, trained_looking(cfg), trained_looking(cfg).replace(step=jnp.int32(9))).close()
    root = checkpoint.checkpoint_dir(cfg.run_dir)
    _damage(root / "7", "truncate")
    _damage(root / "9", "delete-data")
    before = listing(Path(cfg.run_dir))
    mngr = checkpoint.manager(cfg.run_dir, cfg.checkpoint)
    with pytest.raises(CheckpointError, match=rf"no readable checkpoint in '{root}' \(steps 9, 7 .*nothing was deleted"):
        checkpoint.restore_latest(mngr, abstract(cfg), cfg)
    assert listing(Path(cfg.run_dir)) == before


def test_half_written_tmp_directory_is_ignored(cfg):
    state = trained_looking(cfg)
    saved(cfg, state).close()
    root = checkpoint.checkpoint_dir(cfg.run_dir)
    shutil.copytree(root / "7", root / "12.orbax-checkpoint-tmp-1234")
    _damage(root / "12.orbax-checkpoint-tmp-1234", "truncate")
    mngr = checkpoint.manager(cfg.run_dir, cfg.checkpoint)
    restored, _ = checkpoint.restore_latest(mngr, abstract(cfg), cfg)
    assert int(restored.step) == 7


# ---------------------------------------------------------------- devices and research code


def _spec_axes(x) -> set:
    return {a for a in x.sharding.spec if a is not None} if hasattr(x.sharding, "spec") else set()


def test_restore_across_device_counts(cfg):
    """Saved sharded over 8 devices; restored onto 1 and onto 4; saved from 4, restored onto 8."""
    assert jax.device_count() == 8, "tests/conftest.py fakes 8 CPU devices"
    mesh8 = make_mesh(ParallelConfig(fsdp=8))
    mesh4 = make_mesh(ParallelConfig(data=2, fsdp=2), devices=jax.devices()[:4])
    state = trained_looking(cfg)
    state = state.replace(**jax.device_put(checkpoint.leaves(state),
                                           checkpoint.leaves(jax.tree.map(lambda x: x.sharding, abstract(cfg, mesh8)))))
    assert "fsdp" in _spec_axes(state.params["wte"]["embedding"])  # really sharded over 8
    saved(cfg, state).close()

    mngr = checkpoint.manager(cfg.run_dir, cfg.checkpoint)
    on1, _ = checkpoint.restore_latest(mngr, abstract(cfg), cfg)
    assert {d for x in jax.tree.leaves(on1) for d in x.devices()} == {jax.devices()[0]}
    on4, _ = checkpoint.restore_latest(mngr, abstract(cfg, mesh4), cfg)
    assert {d for x in jax.tree.leaves(on4) for d in x.devices()} == set(jax.devices()[:4])
    assert any("fsdp" in _spec_axes(x) for x in jax.tree.leaves(on4.params))
    assert_same(state, on1)
    assert_same(state, on4)

    cfg4 = tiny_config(Path(cfg.run_dir).parent / "from4")
    saved(cfg4, on4.replace(step=jnp.int32(8))).close()
    on8, _ = checkpoint.load_run(cfg4.run_dir, mesh=mesh8)
    assert {d for x in jax.tree.leaves(on8) for d in x.devices()} == set(jax.devices())
    assert_same(state.replace(step=jnp.int32(8)), on8)


def test_load_run(cfg):
    first, second = trained_looking(cfg, seed=1), trained_looking(cfg, seed=2).replace(step=jnp.int32(9))
    saved(cfg, first, second).close()
    state, loaded_cfg = checkpoint.load_run(cfg.run_dir)
    assert loaded_cfg == cfg and int(state.step) == 9
    assert_same(second, state)
    assert_same(first, checkpoint.load_run(cfg.run_dir, step=7)[0])
    model = state.model()  # a live module, rebuilt from the saved config
    np.testing.assert_array_equal(model.h[0].mlp.c_fc.kernel[...], second.params["h"][0]["mlp"]["c_fc"]["kernel"])
    with pytest.raises(CheckpointError, match="no step 8 in .*available: 7, 9"):
        checkpoint.load_run(cfg.run_dir, step=8)
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load_run(Path(cfg.run_dir).parent / "nowhere")


# ---------------------------------------------------------------- non-finite steps and signals


def test_nonfinite_watch_counts_consecutive_steps():
    watch = signals.NonFiniteWatch(3)
    assert not watch.update_all(1, [0, 1, 1, 0, 1, 1])  # streaks of 2 never reach 3
    assert watch.update_all(7, [1, 0])  # 5, 6, 7 in a row
    assert (watch.first_step, watch.consecutive) == (5, 3)


def test_diagnosis_names_the_parameter_whose_gradient_is_nonfinite(cfg):
    state = checkpoint.build_state(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 17), 0, 256)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}

    def loss_fn(model, batch, rng):
        loss, aux = lm_loss(model, batch, rng)
        # sqrt'(0) is infinite: the loss stays finite, this one gradient becomes NaN.
        return loss + jnp.sqrt(jnp.abs(model.h[0].mlp.c_fc.bias[...][0]) * 0.0), aux

    why = signals.diagnose_nonfinite(state, batch, 3, loss_fn=loss_fn)
    assert why.startswith("loss=5.") and why.endswith("in 1 of 16 parameters, first: h.0.mlp.c_fc.bias"), why


def test_first_signal_requests_a_stop_and_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    with signals.StopSignals() as stop:
        assert stop.requested is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == "SIGTERM"
        os.kill(os.getpid(), signal.SIGTERM)  # a second SIGTERM: still stopping politely
        assert stop.requested == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


def test_second_ctrl_c_exits_at_once():
    code = ("import os, signal, time\n"
            "from jaxtrain.app.preempt import StopSignals\n"
            "with StopSignals() as stop:\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    assert stop.requested == 'SIGINT'\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    time.sleep(30)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == signals.INTERRUPTED_EXIT_CODE, proc.stderr
    assert "second interrupt: exiting now" in proc.stderr


def test_a_failed_background_write_is_one_clear_error(tmp_path):
    """A write that fails (here: a 4 KB file-size limit standing in for a full disk) names the cause."""
    code = ("import resource, signal\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing the process\n"
            "from jaxtrain.app import checkpoint\n"
            "from tests.app.test_checkpoint import tiny_config\n"
            f"cfg = tiny_config({str(tmp_path / 'run')!r}, 'checkpoint.async_save=true')\n"
            "mngr = checkpoint.manager(cfg.run_dir, cfg.checkpoint)\n"
            "state = checkpoint.build_state(cfg)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))\n"
            "try:\n"
            "    checkpoint.save(mngr, state, config=cfg, data_step=0)\n"
            "    mngr.close()\n"
            "except checkpoint.CheckpointError as e:\n"
            "    print('CheckpointError:', e)\n")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2], env=env)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("CheckpointError:")), None)
    assert line is not None, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"writing a checkpoint under '{tmp_path / 'run' / 'checkpoints'}' failed" in line
    assert "File too large" in line and "ignored when the run resumes" in line
