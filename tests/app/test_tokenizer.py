"""Tokenizers: the byte tokenizer, byte-level BPE training (cached, deterministic, round-trips any
text, exact bytes per token), tokenizer.json files, spec errors, and a run directory's tokenizer."""

import json
import math

import numpy as np
import pytest

from jaxtrain.app import config, data, lm, tokenizer, writers
from jaxtrain.app.config import DataConfig
from jaxtrain.app.tokenizer import TokenizerError

TEXT = "".join(f"def f{i}(x):\n    return x * {i} + 'héllo wörld ✓ 🐍'\n\n" for i in range(300))
ODD = ["", "\x00\x01\x7f\x80\xff", "é" * 5, "🐍\r\n\t  \u200b\ufeff", "".join(map(chr, range(256))),
       "混合テキスト with ASCII ∑∫ and emoji 🎉🎉", "   \n\n\n   leading and trailing   "]


def _random_text(rng, n) -> str:
    """``n`` random code points from every plane (no surrogates: they are not text)."""
    cps = rng.integers(0, 0x110000 - 0x800, size=n)
    cps = np.where(cps >= 0xD800, cps + 0x800, cps)
    return "".join(map(chr, cps.tolist()))


@pytest.fixture(scope="module")
def bpe():
    return tokenizer.train_bpe([TEXT], 300, progress=False)


def test_bytes_tokenizer_is_utf8():
    tok = tokenizer.load("bytes")
    assert tok is tokenizer.BYTES and tok.vocab_size == 256 and tok.identity == "bytes"
    np.testing.assert_array_equal(tok.encode("hé"), np.frombuffer("hé".encode(), np.uint8))
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert (tok.token_bytes == 1).all() and len(tok.token_bytes) == 256
    np.testing.assert_array_equal(data.encode(TEXT), tok.encode(TEXT))


def test_byte_level_bpe_round_trips_any_text_and_has_every_byte(bpe):
    rng = np.random.default_rng(0)
    for text in ODD + [_random_text(rng, 200) for _ in range(20)]:
        ids = bpe.encode(text)
        assert ids.dtype == np.int32 and bpe.decode(ids) == text
        assert int(bpe.token_bytes[ids].sum()) == len(text.encode("utf-8"))  # exact bits-per-byte accounting
    # every byte value is one token of one byte: any byte sequence is encodable
    singles = [i for i in range(bpe.vocab_size) if bpe.token_bytes[i] == 1]
    assert len(singles) == 256
    assert bpe.vocab_size == 300 and (bpe.token_bytes[256:] >= 2).all()  # merges are longer


def test_bpe_training_is_deterministic(bpe):
    again = tokenizer.train_bpe([TEXT], 300, progress=False)
    assert again.json == bpe.json and again.identity == bpe.identity
    other = tokenizer.train_bpe([TEXT + "more text"], 300, progress=False)
    assert other.identity != bpe.identity


def test_bpe_is_cached_by_corpus_key_and_size(tmp_path, monkeypatch):
    calls = []
    first = tokenizer.cached_bpe(300, "key-a", tmp_path, lambda: calls.append(1) or iter([TEXT]))
    [cached] = tmp_path.glob("bpe300-*.json")
    assert calls == [1]
    again = tokenizer.cached_bpe(300, "key-a", tmp_path, lambda: pytest.fail("retrained a cached BPE"))
    assert again.json == first.json
    tokenizer.cached_bpe(300, "key-b", tmp_path, lambda: iter([TEXT]))  # another corpus: another file
    tokenizer.cached_bpe(280, "key-a", tmp_path, lambda: iter([TEXT]))  # another size: another file
    assert len(list(tmp_path.glob("bpe*.json"))) == 3
    cached.write_text(cached.read_text()[:100])  # damaged: retrained and replaced
    fixed = tokenizer.cached_bpe(300, "key-a", tmp_path, lambda: iter([TEXT]))
    assert fixed.json == first.json and cached.read_text() == first.json
    assert not list(tmp_path.glob("*.tmp"))


def test_tokenizer_json_loads_and_vocab_size_is_read_without_building(bpe, tmp_path):
    path = tmp_path / "tokenizer.json"
    bpe.save(path)
    tok = tokenizer.load(str(path))
    assert tok.identity.endswith(bpe.identity.split("-")[1]) and tok.decode(tok.encode(TEXT)) == TEXT
    assert tokenizer.vocab_size(str(path)) == 300
    assert tokenizer.vocab_size("bytes") == 256 and tokenizer.vocab_size("bpe:4096") == 4096
    j = json.loads(path.read_text())  # an added special token: counted in the size, 0 bytes of text
    j["added_tokens"] = [{"id": 300, "content": "<|endoftext|>", "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}]
    path.write_text(json.dumps(j))
    tok = tokenizer.load(str(path))
    assert tokenizer.vocab_size(str(path)) == tok.vocab_size == 301 and tok.token_bytes[300] == 0
    assert list(tok.encode("a<|endoftext|>b")) == [*bpe.encode("a"), 300, *bpe.encode("b")]


def test_token_bytes_of_other_models_undo_their_conventions():
    j = {"model": {"type": "BPE", "vocab": {"▁hello": 0, "<0x41>": 1, "##ing": 2, "é": 3, "[UNK]": 4},
                   "continuing_subword_prefix": "##"},
         "pre_tokenizer": {"type": "Metaspace", "replacement": "▁"},
         "added_tokens": [{"id": 4, "content": "[UNK]", "special": True}]}
    np.testing.assert_array_equal(tokenizer.token_bytes(j), [6, 1, 3, 2, 0])
    unigram = {"model": {"type": "Unigram", "vocab": [["▁a", -1.0], ["bc", -2.0]]}}
    np.testing.assert_array_equal(tokenizer.token_bytes(unigram), [2, 2])


@pytest.mark.parametrize("spec, match", [
    ("bpe:abc", "data.tokenizer='bpe:abc': N in bpe:N must be a whole number"),
    ("bpe:", "whole number"),
    ("bpe:255", "at least 256 tokens"),
    ("bpe:99999999", "at most 1,048,576"),
    ("gpt2", "data.tokenizer='gpt2': no such file; expected bytes, bpe:N"),
])
def test_bad_specs_fail_in_one_line(spec, match):
    with pytest.raises(TokenizerError, match=match) as e:
        tokenizer.vocab_size(spec)
    assert "\n" not in str(e.value)
    with pytest.raises(config.ConfigError, match=match):  # the config refuses it before anything runs
        config.load(None, [f"data.tokenizer={spec}"])


def test_corrupt_tokenizer_json_is_named(bpe, tmp_path):
    cases = {"trunc.json": bpe.json[:500], "notjson.json": "hello", "other.json": '{"a": 1}'}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(TokenizerError, match=f"'{tmp_path / name}': not a valid Hugging Face tokenizer.json") as e:
            tokenizer.load(str(tmp_path / name))
        assert "\n" not in str(e.value)
        assert tokenizer.vocab_size(str(tmp_path / name)) is None
    with pytest.raises(TokenizerError, match="is a directory"):
        tokenizer.load(str(tmp_path))
    with pytest.raises(TokenizerError, match="trained from data.source"):
        tokenizer.load("bpe:512")


def test_a_run_directory_keeps_its_tokenizer(bpe, tmp_path):
    assert tokenizer.load_run(tmp_path) is None  # a run of an earlier version: nothing saved
    tokenizer.save_run(tokenizer.BYTES, tmp_path)
    assert (tmp_path / "tokenizer.txt").read_text() == "bytes\n" and tokenizer.load_run(tmp_path) is tokenizer.BYTES
    tokenizer.save_run(bpe, tmp_path)
    assert not (tmp_path / "tokenizer.txt").exists()
    assert tokenizer.load_run(tmp_path).json == bpe.json


def test_the_byte_tokenizer_reports_bits_per_byte_as_nats_over_ln2(tmp_path):
    (tmp_path / "t.txt").write_text(TEXT)
    cfg = config.load("tiny", [f"data.source={tmp_path / 't.txt'}", f"data.cache_dir={tmp_path / 'c'}"])
    task = lm.language_model(cfg)
    assert task.val_bytes_per_token == 1.0
    assert writers.bits_per_byte(1.7841, task.val_bytes_per_token) == 1.7841 / math.log(2)
    n = len(TEXT.encode())
    assert task.data_fingerprint.startswith(f"bytes:{n - int(n * 0.05)}+{int(n * 0.05)}:")
    assert f"fingerprint {task.data_fingerprint.rsplit(':', 1)[1][:8]}" in task.describe


def test_a_token_id_corpus_with_a_tokenizer_json_samples_text(bpe, tmp_path):
    path = tmp_path / "tok.json"
    bpe.save(path)
    np.save(tmp_path / "ids.npy", bpe.encode(TEXT).astype(np.uint16))
    cfg = config.load("tiny", [f"data.source={tmp_path / 'ids.npy'}", f"data.tokenizer={path}",
                               "model.vocab_size=300", "train.sample_tokens=8"])
    task = lm.language_model(cfg)
    targets = np.concatenate([b["targets"].ravel() for b in task.local_eval_batches(cfg.train.batch_size, 0)])
    assert task.val_bytes_per_token == bpe.token_bytes[targets].sum() / targets.size  # the evaluated bytes, exactly
    from jaxtrain.app import tasks

    state = tasks.state_factory(task, cfg)()
    text = task.sample(state, 0)
    assert text.startswith("def ") and not text.replace(" ", "").isdigit()
    assert data.load_corpus(cfg.data).tokenizer.json == bpe.json
