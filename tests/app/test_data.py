"""Tests for jaxtrain.data: tokenizer, sources, errors, batch determinism, prefetch."""

import math
import threading
import time

import numpy as np
import pytest

from jaxtrain.app import data
from jaxtrain.app.config import DataConfig
from jaxtrain.app.data import DataError


def cfg(tmp_path, **kw) -> DataConfig:
    return DataConfig(cache_dir=str(tmp_path / "cache"), **kw)


# ---------------------------------------------------------------- tokenizer


def test_encode_decode_round_trip_non_ascii():
    text = "def f(x):\n    return 'héllo wörld ✓ 🐍'\n"
    tokens = data.encode(text)
    assert tokens.dtype == np.uint8 and len(tokens) == len(text.encode("utf-8"))
    assert data.decode(tokens) == text
    assert data.decode(tokens.astype(np.int32)) == text  # model outputs are int32
    assert data.decode(data.encode("é")[:1]) == "\ufffd"  # a cut multi-byte char is replaced


# ---------------------------------------------------------------- stdlib corpus


def test_stdlib_selection_sorted_and_excluded():
    _, rels = data.stdlib_files()
    assert rels == sorted(rels) and len(rels) > 300
    assert all(r.endswith(".py") for r in rels)
    skipped = {"test", "tests", "idlelib", "lib2to3", "__pycache__", "site-packages"}
    assert not [r for r in rels if skipped & set(r.split("/")[:-1])]
    assert "pydoc_data/topics.py" not in rels
    assert "os.py" in rels and "json/decoder.py" in rels
    assert data.stdlib_files()[1] == rels


def test_stdlib_corpus_cached_and_deterministic(tmp_path):
    c1 = data.load_corpus(cfg(tmp_path))
    cached = list((tmp_path / "cache").glob("stdlib-*.npy"))
    assert len(cached) == 1 and not list((tmp_path / "cache").glob("*.tmp"))
    mtime = cached[0].stat().st_mtime_ns
    c2 = data.load_corpus(cfg(tmp_path))
    assert cached[0].stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert isinstance(c2.train, np.memmap) and c2.train.dtype == np.uint8
    np.testing.assert_array_equal(c1.train, c2.train)
    np.testing.assert_array_equal(c1.val, c2.val)
    n = len(c1.train) + len(c1.val)
    assert len(c1.val) == int(n * 0.05)
    head = data.decode(c1.train[:200])
    assert head.startswith("# file: __future__.py\n")
    assert 2.5 < data.unigram_entropy(c1.val) < 4.0
    assert c1.vocab_size <= data.VOCAB_SIZE


# ---------------------------------------------------------------- file sources


def test_text_file_and_unknown_extension(tmp_path):
    for name in ("a.txt", "a.weird"):
        (tmp_path / name).write_text("hello world " * 20)
        c = data.load_corpus(cfg(tmp_path, source=str(tmp_path / name), val_fraction=0.25))
        assert c.name == name
        assert data.decode(np.concatenate([c.train, c.val])) == "hello world " * 20
        assert len(c.val) == 60 and c.vocab_size == ord("w") + 1


def test_folder_with_glob(tmp_path):
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_text("bbb")
    (root / "sub" / "a.txt").write_text("aaa\n")
    (root / "skip.md").write_text("nope")
    c = data.load_corpus(cfg(tmp_path, source=str(root), val_fraction=0.1))
    text = data.decode(np.concatenate([c.train, c.val]))
    assert text == "# file: b.txt\nbbb\n# file: sub/a.txt\naaa\n\n"
    assert "nope" not in text
    assert isinstance(c.train, np.memmap)


def test_concurrent_cache_builders_agree(tmp_path):
    root = tmp_path / "docs"
    root.mkdir()
    for i in range(20):
        (root / f"{i:02d}.txt").write_text(f"file {i}\n" * 200)
    results, errors = [], []

    def load():
        try:
            results.append(np.asarray(data.load_corpus(cfg(tmp_path, source=str(root))).train).copy())
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and len(results) == 4
    assert all(np.array_equal(r, results[0]) for r in results)
    assert len(list((tmp_path / "cache").iterdir())) == 1  # one cache file, no tmp left over


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_bin_tokens(tmp_path, dtype):
    tokens = (np.arange(1000) * 37 % 50021).astype(dtype)
    tokens.tofile(tmp_path / "t.bin")
    c = data.load_corpus(cfg(tmp_path, source=str(tmp_path / "t.bin"), token_dtype=dtype, val_fraction=0.1))
    assert isinstance(c.train, np.memmap) and c.train.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(np.concatenate([c.train, c.val]), tokens)
    assert len(c.val) == 100 and c.vocab_size == int(tokens.max()) + 1


def test_npy_tokens_and_val_source(tmp_path):
    np.save(tmp_path / "train.npy", np.arange(500, dtype=np.int64) % 300)
    np.save(tmp_path / "val.npy", np.full(100, 7, dtype=np.uint32))
    c = data.load_corpus(cfg(tmp_path, source=str(tmp_path / "train.npy"), val_source=str(tmp_path / "val.npy")))
    assert len(c.train) == 500 and len(c.val) == 100  # val_source: no split of train
    assert c.vocab_size == 300
    data.check_corpus(c, block_size=64, vocab_size=300)


# ---------------------------------------------------------------- errors


def _raises(match, fn, *a, **kw):
    with pytest.raises(DataError, match=match) as e:
        fn(*a, **kw)
    assert "\n" not in str(e.value)  # one-line messages


def test_errors_name_path_and_key(tmp_path):
    missing = str(tmp_path / "nope.txt")
    _raises(f"data.source='{missing}'.*does not exist.*stdlib", data.load_corpus, cfg(tmp_path, source=missing))
    (tmp_path / "t.txt").write_text("x" * 100)
    _raises(f"data.val_source='{missing}'", data.load_corpus,
            cfg(tmp_path, source=str(tmp_path / "t.txt"), val_source=missing))
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty_dir" / "a.md").write_text("x")
    _raises("empty_dir.*no files matching data.glob='\\*\\*/\\*.txt'", data.load_corpus,
            cfg(tmp_path, source=str(tmp_path / "empty_dir")))
    (tmp_path / "e.txt").write_bytes(b"")
    _raises("e.txt.*empty", data.load_corpus, cfg(tmp_path, source=str(tmp_path / "e.txt")))
    np.save(tmp_path / "e.npy", np.zeros(0, np.int32))
    _raises("data.val_source=.*e.npy.*empty", data.load_corpus,
            cfg(tmp_path, source=str(tmp_path / "t.txt"), val_source=str(tmp_path / "e.npy")))
    np.save(tmp_path / "m.npy", np.zeros((4, 4), np.int32))
    _raises("m.npy.*1-D integer", data.load_corpus, cfg(tmp_path, source=str(tmp_path / "m.npy")))
    np.save(tmp_path / "f.npy", np.zeros(10, np.float32))
    _raises("f.npy.*float32.*1-D integer", data.load_corpus, cfg(tmp_path, source=str(tmp_path / "f.npy")))
    (tmp_path / "odd.bin").write_bytes(b"abc")
    _raises("odd.bin.*not a multiple.*uint16", data.load_corpus, cfg(tmp_path, source=str(tmp_path / "odd.bin")))

    np.save(tmp_path / "ok.npy", np.arange(5000, dtype=np.int64) % 256)
    (tmp_path / "trunc.npy").write_bytes((tmp_path / "ok.npy").read_bytes()[:3000])
    _raises("trunc.npy': not a readable .npy file", data.load_corpus, cfg(tmp_path, source=str(tmp_path / "trunc.npy")))
    (tmp_path / "fake.npy").write_text("hello\n")
    _raises("fake.npy': not a .npy file \\(it does not start with numpy's header\\)", data.load_corpus,
            cfg(tmp_path, source=str(tmp_path / "fake.npy")))
    np.save(tmp_path / "obj.npy", np.array([1, "a"], dtype=object), allow_pickle=True)
    _raises("obj.npy': not a readable .npy file", data.load_corpus, cfg(tmp_path, source=str(tmp_path / "obj.npy")))


def test_a_source_the_os_cannot_open_is_named_in_one_error(tmp_path):
    long = tmp_path / ("a" * 300)  # a name longer than the file system allows
    _raises(f"data.source='{long}': cannot be read: File name too long", data.load_corpus, cfg(tmp_path, source=str(long)))
    _raises(f"data.val_source='{long}': cannot be read", data.load_corpus,
            cfg(tmp_path, source="stdlib", val_source=str(long)))


def test_cache_dir_that_is_a_file_is_named(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("hello world\n" * 20)
    (tmp_path / "f").write_text("in the way")
    for where in (tmp_path / "f", tmp_path / "f" / "sub"):
        _raises(f"data.cache_dir='{where}': cannot write the corpus cache there", data.load_corpus,
                DataConfig(source=str(tmp_path / "corpus"), cache_dir=str(where)))
    assert (tmp_path / "f").read_text() == "in the way"


def test_a_damaged_corpus_cache_is_rebuilt(tmp_path, caplog):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("hello world\n" * 2000)
    c = cfg(tmp_path, source=str(tmp_path / "corpus"))
    want = np.array(data.load_corpus(c).train)
    [cache] = (tmp_path / "cache").glob("*.npy")
    cache.write_bytes(cache.read_bytes()[:1000])  # truncated, e.g. by a full disk
    np.testing.assert_array_equal(data.load_corpus(c).train, want)
    assert "unreadable" in caplog.text and "rebuilding" in caplog.text


def test_check_corpus(tmp_path):
    c = data.Corpus("tiny", np.arange(100, dtype=np.uint16), np.arange(10, dtype=np.uint16))
    _raises("'tiny'.*val split has 10 tokens.*block_size\\+1=17", data.check_corpus, c, 16, 256)
    data.check_corpus(c, 9, 256)
    _raises("'tiny'.*max token id 99.*model.vocab_size=50", data.check_corpus, c, 8, 50)
    neg = data.Corpus("neg", np.array([1, -1] * 20), np.array([1, 2] * 20))
    _raises("negative", data.check_corpus, neg, 8, 256)


# ---------------------------------------------------------------- batches


def test_get_batch_pure_shifted_and_sharded():
    tokens = np.arange(10_000, dtype=np.uint16)
    kw = dict(seed=3, batch_size=8, block_size=16)
    b = data.get_batch(tokens, step=5, **kw)
    assert b["inputs"].shape == b["targets"].shape == (8, 16) and b["inputs"].dtype == np.int32
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    np.testing.assert_array_equal(b["targets"], b["inputs"] + 1)  # arange: next token is +1
    np.testing.assert_array_equal(data.get_batch(tokens, step=5, **kw)["inputs"], b["inputs"])
    assert not np.array_equal(data.get_batch(tokens, step=6, **kw)["inputs"], b["inputs"])
    assert not np.array_equal(data.get_batch(tokens, step=5, **{**kw, "seed": 4})["inputs"], b["inputs"])
    halves = [data.get_batch(tokens, step=5, process_index=p, process_count=2, **kw) for p in (0, 1)]
    assert halves[0]["inputs"].shape == (4, 16)
    for k in ("inputs", "targets"):
        np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), b[k])


def test_get_batch_bounds_and_errors():
    tokens = np.arange(17, dtype=np.uint8)  # exactly block_size+1: one possible window
    b = data.get_batch(tokens, seed=0, step=0, batch_size=4, block_size=16)
    np.testing.assert_array_equal(b["inputs"], np.tile(np.arange(16), (4, 1)))
    _raises("block_size\\+1=18", data.get_batch, tokens, seed=0, step=0, batch_size=4, block_size=17)
    _raises("batch_size=5.*process_count=2", data.get_batch, tokens, seed=0, step=0, batch_size=5,
            block_size=8, process_count=2)


def test_eval_batch_fixed_and_distinct():
    tokens = np.arange(10_000, dtype=np.uint32)
    kw = dict(batch_size=4, block_size=8)
    e0 = data.eval_batch(tokens, index=0, **kw)
    np.testing.assert_array_equal(data.eval_batch(tokens, index=0, **kw)["inputs"], e0["inputs"])
    assert not np.array_equal(data.eval_batch(tokens, index=1, **kw)["inputs"], e0["inputs"])
    assert not np.array_equal(data.get_batch(tokens, seed=0, step=0, **kw)["inputs"], e0["inputs"])


def test_unigram_entropy():
    assert data.unigram_entropy(np.array([0, 1, 2, 3] * 25, np.uint8)) == pytest.approx(math.log(4))
    assert data.unigram_entropy(np.array([9] * 10, np.uint16)) == pytest.approx(0.0)
    p = np.array([0.5, 0.25, 0.25])
    assert data.unigram_entropy(np.array([5, 5, 6, 7], np.uint32)) == pytest.approx(-(p * np.log(p)).sum())


# ---------------------------------------------------------------- prefetch


def test_prefetcher_in_order_and_places():
    with data.Prefetcher(lambda s: {"x": s}, 3, 8, depth=2, place=lambda b: {"x": b["x"] * 10}) as it:
        assert list(it) == [(s, {"x": s * 10}) for s in range(3, 8)]
    assert list(data.Prefetcher(lambda s: s, 0, 3, depth=0)) == [(0, 0), (1, 1), (2, 2)]


def test_prefetcher_runs_ahead_and_close_stops_thread():
    made = []
    it = data.Prefetcher(lambda s: made.append(s) or s, 0, 1000, depth=3)
    deadline = time.time() + 5
    while len(made) < 4 and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert len(made) == 4  # depth queued + one waiting to be queued; no more
    assert next(it) == (0, 0)
    it.close()
    assert not it._thread.is_alive()
    assert len(made) <= 6
    assert not [t for t in threading.enumerate() if t is it._thread]


def test_prefetcher_propagates_exception():
    def make(step):
        if step == 2:
            raise RuntimeError("bad step 2")
        return step

    for depth in (0, 2):
        it = data.Prefetcher(make, 0, 5, depth=depth)
        assert [next(it), next(it)] == [(0, 0), (1, 1)]
        with pytest.raises(RuntimeError, match="bad step 2"):
            next(it)
        it.close()
