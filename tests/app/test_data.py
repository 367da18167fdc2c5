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


# ---------------------------------------------------------------- tokenizers and records

DOCS = ["first document\nwith two lines", "second: héllo wörld 🐍", "", "fourth\n\nhas a blank line\n",
        *[f"doc {i}: def f(x):\n    return x + {i}\n" for i in range(150)]]


def _folder(tmp_path, name, files: dict) -> str:
    root = tmp_path / name
    root.mkdir()
    for rel, text in files.items():
        (root / rel).write_text(text, encoding="utf-8")
    return str(root)


def _jsonl(docs, field="text") -> str:
    import json

    return "".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs))


def _same(a: data.Corpus, b: data.Corpus) -> None:
    np.testing.assert_array_equal(a.train, b.train)
    np.testing.assert_array_equal(a.val, b.val)


def test_bytes_tokenizer_gives_todays_tokens(tmp_path):
    files = {"b.txt": "bbb\n", "a.txt": "héllo\n" * 50}
    root = _folder(tmp_path, "docs", files)
    c = data.load_corpus(cfg(tmp_path, source=root, tokenizer="bytes"))
    joined = b"".join(f"# file: {r}\n{files[r]}\n".encode() for r in sorted(files))  # today's format
    split = len(joined) - int(len(joined) * 0.05)
    assert bytes(np.asarray(c.train)) == joined[:split] and bytes(np.asarray(c.val)) == joined[split:]
    assert c.tokenizer is data.tokenizer.BYTES and c.train.dtype == np.uint8
    _same(c, data.load_corpus(cfg(tmp_path, source=root)))  # the default is bytes
    assert c.fingerprint == data.load_corpus(cfg(tmp_path, source=root)).fingerprint
    assert c.fingerprint.startswith(f"bytes:{split}+{len(joined) - split}:")
    other = data.Corpus("x", np.asarray(c.train).copy(), np.asarray(c.val).copy())
    other.train[3] += 1
    assert other.fingerprint.split(":")[1:2] == c.fingerprint.split(":")[1:2]  # same counts
    assert other.fingerprint.rsplit(":", 1)[1] != c.fingerprint.rsplit(":", 1)[1]  # another hash


def test_val_split_is_the_same_text_for_bytes_and_bpe(tmp_path):
    root = _folder(tmp_path, "docs", {f"{i}.txt": f"text {i} é\n" * 40 for i in range(20)})
    by = data.load_corpus(cfg(tmp_path, source=root))
    bpe = data.load_corpus(cfg(tmp_path, source=root, tokenizer="bpe:300"))
    assert bpe.train.dtype == np.uint16 and isinstance(bpe.train, np.memmap) and len(bpe.train) < len(by.train)
    assert bpe.tokenizer.decode(bpe.val) == data.decode(by.val)
    assert bpe.tokenizer.decode(bpe.train) == data.decode(by.train)
    assert int(bpe.tokenizer.token_bytes[np.asarray(bpe.val)].sum()) == len(by.val)
    assert bpe.fingerprint.startswith(f"{bpe.tokenizer.identity}:{len(bpe.train)}+{len(bpe.val)}:")


def test_token_cache_is_reused_and_rebuilt_when_damaged(tmp_path, caplog):
    root = _folder(tmp_path, "docs", {"a.txt": "hello world\n" * 3000})
    c = cfg(tmp_path, source=root, tokenizer="bpe:260")
    loaded = data.load_corpus(c)
    first = data.Corpus("copy", np.array(loaded.train), np.array(loaded.val))  # the files get damaged below
    caches = sorted((tmp_path / "cache").glob("tok-*.npy"))
    assert len(caches) == 2 and not list((tmp_path / "cache").glob("*.tmp"))  # train and val
    mtimes = [p.stat().st_mtime_ns for p in caches]
    _same(first, data.load_corpus(c))
    assert [p.stat().st_mtime_ns for p in caches] == mtimes  # reused
    caches[0].write_bytes(caches[0].read_bytes()[:200])  # truncated, e.g. by a full disk
    _same(first, data.load_corpus(c))
    assert "unreadable" in caplog.text and "rebuilding" in caplog.text


def test_text_chunks_cut_after_newlines_and_between_characters():
    from jaxtrain.app import sources

    text = ("line é\n" * 50 + "🐍" * 400).encode()
    arr = np.frombuffer(text, np.uint8)
    pieces = list(sources.text_chunks(arr, 0, len(arr), size=100))
    assert b"".join(pieces) == text and len(pieces) > 10
    for p in pieces:
        p.decode("utf-8")  # strict: no piece ends inside a character
    assert all(p.endswith(b"\n") for p in pieces[:3])


@pytest.mark.parametrize("tok", ["bytes", "bpe:300"])
def test_jsonl_and_parquet_records_tokenize_like_the_equivalent_text(tmp_path, tok):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    (tmp_path / "joined.txt").write_text("\n\n".join(DOCS), encoding="utf-8")
    want = data.load_corpus(cfg(tmp_path, source=str(tmp_path / "joined.txt"), tokenizer=tok))
    jsonl = _folder(tmp_path, "jsonl", {"a.jsonl": _jsonl(DOCS[:70]), "b.jsonl": "\n" + _jsonl(DOCS[70:])})
    _same(want, data.load_corpus(cfg(tmp_path, source=jsonl, glob="*.jsonl", tokenizer=tok)))
    (tmp_path / "pq").mkdir()
    for name, part in (("0.parquet", DOCS[:3]), ("1.parquet", DOCS[3:])):
        pq.write_table(pa.table({"body": part, "n": list(range(len(part)))}), tmp_path / "pq" / name,
                       row_group_size=7)
    got = data.load_corpus(cfg(tmp_path, source=str(tmp_path / "pq"), glob="*.parquet", text_field="body",
                               tokenizer=tok))
    _same(want, got)
    single = data.load_corpus(cfg(tmp_path, source=str(tmp_path / "jsonl" / "a.jsonl"), tokenizer=tok))
    assert single.tokenizer.decode(np.concatenate([single.train, single.val])) == "\n\n".join(DOCS[:70])


def test_record_errors_name_file_and_line(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    cases = {
        "nofield.jsonl": ('{"text": "a"}\n{"body": "b"}\n', "nofield.jsonl' line 2 has no field 'text' "
                                                           "\\(data.text_field\\); its fields: body"),
        "notjson.jsonl": ('{"text": "a"}\n{oops\n', "notjson.jsonl' line 2 is not JSON"),
        "notstr.jsonl": ('{"text": 5}\n', "notstr.jsonl' line 1: field 'text' \\(data.text_field\\) is int, not text"),
        "list.jsonl": ('["a"]\n', "list.jsonl' line 1 has no field 'text'.*JSON list, not an object"),
    }
    for name, (body, match) in cases.items():
        (tmp_path / name).write_text(body)
        _raises(f"data.source='{tmp_path / name}': '.*{match}", data.load_corpus,
                cfg(tmp_path, source=str(tmp_path / name)))
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "col.parquet")
    _raises("col.parquet' has no column 'text' \\(data.text_field\\); its columns: body", data.load_corpus,
            cfg(tmp_path, source=str(tmp_path / "col.parquet")))
    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "null.parquet")
    _raises("null.parquet' row 1: column 'text' \\(data.text_field\\) is null", data.load_corpus,
            cfg(tmp_path, source=str(tmp_path / "null.parquet")))
    (tmp_path / "bad.parquet").write_text("not parquet")
    _raises("bad.parquet' is not a readable Parquet file", data.load_corpus,
            cfg(tmp_path, source=str(tmp_path / "bad.parquet")))
    mixed = _folder(tmp_path, "mixed", {"a.txt": "x", "b.jsonl": _jsonl(["y"])})
    _raises("matches both record files", data.load_corpus, cfg(tmp_path, source=mixed, glob="*"))
    np.save(tmp_path / "ids.npy", np.arange(100) % 7)
    _raises("data.tokenizer='bpe:300' is trained on text, but data.source=.*ids.npy' holds token ids",
            data.load_corpus, cfg(tmp_path, source=str(tmp_path / "ids.npy"), tokenizer="bpe:300"))


def test_pyarrow_missing_is_one_line(tmp_path, monkeypatch):
    import sys

    (tmp_path / "a.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import fails as if not installed
    _raises("needs pyarrow: pip install pyarrow", data.load_corpus, cfg(tmp_path, source=str(tmp_path / "a.parquet")))


def test_a_vocabulary_over_65536_tokens_is_cached_as_uint32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(70_000)}
    vocab["[UNK]"] = 70_000
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "big.json"))
    (tmp_path / "t.txt").write_text(" ".join(f"w{i * 997 % 70_000}" for i in range(2000)))
    c = data.load_corpus(cfg(tmp_path, source=str(tmp_path / "t.txt"), tokenizer=str(tmp_path / "big.json")))
    assert c.train.dtype == np.uint32 and c.vocab_size > 65536 and len(c.train) + len(c.val) == 2000


def test_bytes_per_token():
    tb = np.array([1, 2, 3, 0])
    assert data.bytes_per_token([np.array([[0, 1], [2, 2]])], tb) == 9 / 4
    assert data.bytes_per_token([np.array([3, 3])], tb) is None  # no bytes: no bits per byte
    assert data.bytes_per_token([np.array([7])], tb) is None  # an id the tokenizer lacks counts 0
