"""Faults in-process: checksums catch flipped bits, damaged steps fall back, retention keeps the verified
step, the corpus fingerprint, the run-directory lock, the memory check."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrain.app import checkpoint, integrity, memory, runlock
from jaxtrain.app.config import ConfigError, ParallelConfig
from jaxtrain.parallel import make_mesh
from tests.app.test_checkpoint import abstract, assert_same, saved, tiny_config, trained_looking

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
SEED = int(os.environ.get("JAXTRAIN_TEST_SEED", random.randrange(10**6)))  # printed on failure


@pytest.fixture
def cfg(tmp_path):
    return tiny_config(tmp_path / "run")


# ---------------------------------------------------------------- checksums


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int32", "uint8", "bool"])
def test_any_single_bit_flip_changes_the_checksum(dtype):
    rnd = np.random.default_rng(SEED)
    x = rnd.standard_normal((6, 10)).astype(np.float32)
    x = jnp.asarray(x > 0 if dtype == "bool" else (x * 50 if "int" in dtype else x)).astype(dtype)
    base = integrity.array_checksums({"x": x})
    raw = np.asarray(x).reshape(-1).view(np.uint8).copy() if dtype != "bool" else None
    for _ in range(20):
        if dtype == "bool":
            flipped = np.asarray(x).copy()
            i = rnd.integers(flipped.size)
            flipped.flat[i] = not flipped.flat[i]
        else:
            b = raw.copy()
            b[rnd.integers(b.size)] ^= np.uint8(1 << int(rnd.integers(8)))
            flipped = b.view(np.asarray(x).dtype).reshape(x.shape)
        assert integrity.array_checksums({"x": jnp.asarray(flipped)}) != base, f"seed {SEED}"


def test_swapped_elements_change_the_checksum_and_sharding_does_not():
    x = jnp.arange(64, dtype=jnp.float32).reshape(8, 8)
    swapped = x.at[0, 0].set(x[0, 1]).at[0, 1].set(x[0, 0])
    assert integrity.array_checksums([x]) != integrity.array_checksums([swapped])
    mesh = make_mesh(ParallelConfig(data=1, fsdp=8))
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp")))
    assert integrity.array_checksums([sharded]) == integrity.array_checksums([x])
    key = jax.random.key(3)
    assert integrity.array_checksums([key]) != integrity.array_checksums([jax.random.key(4)])


def test_metadata_digest_catches_an_edit():
    meta = checkpoint.metadata(tiny_config("/tmp/x"), 5, {"a": "0" * 16}, "fp")
    assert integrity.check_digest(meta)
    meta["data_step"] = 6
    with pytest.raises(integrity.IntegrityError, match="metadata fails its checksum"):
        integrity.check_digest(meta)
    assert not integrity.check_digest({"config": {}})  # an older checkpoint: nothing to check


# ---------------------------------------------------------------- damage on restore


def _largest_file(step_dir: Path) -> Path:
    return max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_single_bit_flips_in_the_newest_step_never_restore_silently(cfg, caplog):
    """Random offsets in the newest step's largest data file: the restore falls back past the damage
    (warning, step moved aside) or, where the flipped byte is never read, returns the saved values."""
    rnd = random.Random(SEED)
    old, new = trained_looking(cfg, 1), trained_looking(cfg, 2).replace(step=jnp.int32(9))
    root = Path(cfg.run_dir)
    fell_back = 0
    for trial in range(4):
        if root.exists():
            shutil.rmtree(root)
        saved(cfg, old, new).close()
        f = _largest_file(root / "checkpoints" / "9")
        data = bytearray(f.read_bytes())
        offset, bit = rnd.randrange(len(data)), rnd.randrange(8)
        data[offset] ^= 1 << bit
        f.write_bytes(bytes(data))
        caplog.clear()
        mngr = checkpoint.manager(cfg.run_dir, cfg.checkpoint)
        with caplog.at_level(logging.WARNING):
            state, meta = checkpoint.restore_latest(mngr, abstract(cfg), cfg)
        mngr.close()
        where = f"seed {SEED} trial {trial}: {f.name} byte {offset} bit {bit}"
        if int(state.step) == 7:
            fell_back += 1
            assert_same(state, old)
            assert "checkpoint step 9" in caplog.text and "is damaged" in caplog.text, where
            assert "bound method" not in caplog.text, caplog.text
            assert not (root / "checkpoints" / "9").exists(), where
            assert list((root / checkpoint.DAMAGED_DIR).glob("9-*")), where
        else:
            assert_same(state, new)  # the flipped byte was not part of any value read
    assert fell_back >= 1, f"seed {SEED}: no flip landed in the data in 4 trials"


def test_a_flip_in_the_arrays_is_named_by_its_checksum(cfg, caplog, monkeypatch):
    """Bytes that still decode (a changed float) are caught by the checksum, which names the array."""
    saved(cfg, trained_looking(cfg, 1), trained_looking(cfg, 2).replace(step=jnp.int32(9))).close()
    real = checkpoint._restore_step

    def corrupt(mngr, step, abstract_state):  # what a flip inside a stored float does to the value
        state = real(mngr, step, abstract_state)
        if step != 9:
            return state
        leaves, tree = jax.tree.flatten(state.params)
        bits = np.asarray(leaves[0]).view(np.uint32).copy()
        bits.flat[3] ^= np.uint32(1 << 30)
        leaves[0] = jnp.asarray(bits.view(np.float32))
        return state.replace(params=jax.tree.unflatten(tree, leaves))

    monkeypatch.setattr(checkpoint, "_restore_step", corrupt)
    mngr = checkpoint.manager(cfg.run_dir, cfg.checkpoint)
    with caplog.at_level(logging.WARNING):
        state, _ = checkpoint.restore_latest(mngr, abstract(cfg), cfg)
    mngr.close()
    assert int(state.step) == 7
    assert "fails its checksum" in caplog.text and "params." in caplog.text


def test_edited_metadata_is_damage(cfg, caplog):
    saved(cfg, trained_looking(cfg, 1), trained_looking(cfg, 2).replace(step=jnp.int32(9))).close()
    meta_file = Path(cfg.run_dir) / "checkpoints" / "9" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["data_step"] = 3
    meta_file.write_text(json.dumps(meta))
    mngr = checkpoint.manager(cfg.run_dir, cfg.checkpoint)
    with caplog.at_level(logging.WARNING):
        state, meta = checkpoint.restore_latest(mngr, abstract(cfg), cfg)
    mngr.close()
    assert int(state.step) == 7 and "metadata fails its checksum" in caplog.text


def test_the_verified_step_is_kept_until_the_manager_closes(tmp_path):
    cfg = tiny_config(tmp_path / "run", "checkpoint.keep=1")
    s = trained_looking(cfg, 1)
    saved(cfg, s.replace(step=jnp.int32(20))).close()
    mngr = checkpoint.manager(cfg.run_dir, cfg.checkpoint)
    state, _ = checkpoint.restore_latest(mngr, abstract(cfg), cfg)
    for step in (40, 60):
        assert checkpoint.save(mngr, s.replace(step=jnp.int32(step)), config=cfg, data_step=step)
    mngr.wait_until_finished()
    assert sorted(mngr.all_steps()) == [20, 60]  # keep=1, plus the step this run resumed from
    mngr.close()
    mngr = checkpoint.manager(cfg.run_dir, cfg.checkpoint)  # the next run verifies 60 and lets 20 go
    checkpoint.restore_latest(mngr, abstract(cfg), cfg)
    checkpoint.save(mngr, s.replace(step=jnp.int32(80)), config=cfg, data_step=80)
    mngr.wait_until_finished()
    assert sorted(mngr.all_steps()) == [60, 80]
    mngr.close()


# ---------------------------------------------------------------- corpus fingerprint


def _saved_with(cfg, fingerprint):
    mngr = checkpoint.manager(cfg.run_dir, cfg.checkpoint)
    checkpoint.save(mngr, trained_looking(cfg), config=cfg, data_step=7, data_fingerprint=fingerprint)
    mngr.close()


def test_a_resume_on_another_corpus_is_refused_unless_allowed(tmp_path, caplog):
    cfg = tiny_config(tmp_path / "run")
    _saved_with(cfg, "stdlib-9809257-aaaa")
    mngr = checkpoint.manager(cfg.run_dir, cfg.checkpoint)
    with pytest.raises(ConfigError, match=r"fingerprint stdlib-9809257-aaaa, now stdlib-9443049-bbbb.*"
                                          r"checkpoint.allow_data_change=true"):
        checkpoint.restore_latest(mngr, abstract(cfg), cfg, "stdlib-9443049-bbbb")
    state, _ = checkpoint.restore_latest(mngr, abstract(cfg), cfg, "stdlib-9809257-aaaa")  # same corpus
    assert int(state.step) == 7
    mngr.close()
    allowed = tiny_config(tmp_path / "run", "checkpoint.allow_data_change=true")
    mngr = checkpoint.manager(allowed.run_dir, allowed.checkpoint)
    with caplog.at_level(logging.WARNING):
        assert checkpoint.restore_latest(mngr, abstract(allowed), allowed, "other") is not None
    mngr.close()
    assert "continuing (checkpoint.allow_data_change=true)" in caplog.text


def test_a_checkpoint_without_a_fingerprint_resumes_with_a_warning(tmp_path, caplog):
    cfg = tiny_config(tmp_path / "run")
    _saved_with(cfg, None)
    mngr = checkpoint.manager(cfg.run_dir, cfg.checkpoint)
    with caplog.at_level(logging.WARNING):
        assert checkpoint.restore_latest(mngr, abstract(cfg), cfg, "stdlib-1-abc") is not None
    mngr.close()
    assert "records no corpus fingerprint" in caplog.text


# ---------------------------------------------------------------- the run-directory lock


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    first = runlock.RunLock(tmp_path / "run")
    assert first.acquire()
    with pytest.raises(runlock.RunDirBusy, match=rf"in use by another run \(pid {os.getpid()} on host "):
        runlock.RunLock(tmp_path / "run").acquire()
    first.release()
    with runlock.RunLock(tmp_path / "run") as again:  # free after release
        assert again.held
    assert runlock.holder(tmp_path / "run") is None  # emptied on release


def test_the_lock_is_released_when_the_block_raises(tmp_path):
    with pytest.raises(RuntimeError):
        with runlock.RunLock(tmp_path / "run"):
            raise RuntimeError("boom")
    assert runlock.RunLock(tmp_path / "run").acquire()


def test_early_check_writes_nothing(tmp_path):
    assert not runlock.RunLock(tmp_path / "run").acquire(create=False)
    assert not (tmp_path / "run").exists()


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path, caplog):
    code = ("import sys, time\nfrom jaxtrain.app import runlock\n"
            f"runlock.RunLock({str(tmp_path / 'run')!r}).acquire()\nprint('held', flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(runlock.RunDirBusy, match=f"pid {proc.pid} on host"):
            runlock.RunLock(tmp_path / "run").acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    lock = runlock.RunLock(tmp_path / "run")
    with caplog.at_level(logging.WARNING):
        assert lock.acquire()
    assert f"taking over the lock left by pid {proc.pid}" in caplog.text
    assert runlock.holder(tmp_path / "run")["pid"] == os.getpid()
    lock.release()


# ---------------------------------------------------------------- memory


class _Plan:
    def __init__(self, temp):
        self.temp = temp

    def memory_analysis(self):
        from types import SimpleNamespace

        return SimpleNamespace(argument_size_in_bytes=2**20, temp_size_in_bytes=self.temp,
                               output_size_in_bytes=2**20, alias_size_in_bytes=2**20)


def test_a_step_that_needs_more_than_there_is_is_refused_naming_both():
    avail = memory.available_bytes()
    assert avail is not None and avail[0] > 0
    memory.check_fits(_Plan(2**20))
    with pytest.raises(ConfigError, match=r"needs 1\.00 TB of memory per device .* available .*model\.block_size"):
        memory.check_fits(_Plan(2**40 - 2**20), None)
    assert memory.needed_bytes(_Plan(5 * 2**20)) == 6 * 2**20
