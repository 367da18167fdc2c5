"""Prototype of ``data.tokenizer=bpe:N``: a byte-level BPE trained on the built-in corpus's training split.

Writes ``<out>/bpe<N>/{train.npy, val.npy, tokenizer.json, meta.json}``: the token ids
(uint16, 1-D) of the training split (the first 95% of the corpus's bytes) and of the
validation split (the last 5%, as ``data.val_fraction`` makes it), each encoded on its
own, and ``meta.json`` with the byte and token counts of both splits, so a run's
``val_loss`` (nats/token) converts to bits per byte::

    bpb = val_loss * val_tokens / val_bytes / ln 2

The run's eval reads a fixed random set of blocks, so this whole-split ratio is an
approximation of the exact per-block bytes metric the real ``bpe:N`` tokenizer reports.

Usage (from the clone's root)::

    PYTHONPATH=$PWD python benchmarks/recipe/bpe.py 4096 [--out /tmp/recipe/data]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from jaxtrain.app import config as app_config
from jaxtrain.app import data

SEP = "# file: "  # data.FILE_HEADER's prefix: the corpus is split into files at it, for batch encoding


def corpus_bytes() -> tuple[bytes, bytes]:
    """(train, val) bytes of the built-in corpus, split as the byte-level run splits it."""
    cfg = app_config.load("default", []).data
    corpus = data.load_corpus(cfg)
    return np.asarray(corpus.train).tobytes(), np.asarray(corpus.val).tobytes()


def documents(text: str) -> list[str]:
    """``text`` cut before each file header (their concatenation is ``text``)."""
    parts = text.split("\n" + SEP)
    return [parts[0]] + ["\n" + SEP + p for p in parts[1:]]


def train_bpe(train_docs: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(train_docs, trainer=trainer, length=len(train_docs))
    return tok


def encode(tok: Tokenizer, docs: list[str]) -> np.ndarray:
    ids = [e.ids for e in tok.encode_batch(docs, add_special_tokens=False)]
    return np.fromiter((i for d in ids for i in d), dtype=np.uint16)


def build(vocab_size: int, out: Path) -> dict:
    t0 = time.perf_counter()
    train_b, val_b = corpus_bytes()
    train_t, val_t = train_b.decode("utf-8"), val_b.decode("utf-8")  # raises if the split cut a character
    train_docs, val_docs = documents(train_t), documents(val_t)
    t1 = time.perf_counter()
    tok = train_bpe(train_docs, vocab_size)
    t2 = time.perf_counter()
    train_ids, val_ids = encode(tok, train_docs), encode(tok, val_docs)
    t3 = time.perf_counter()
    assert tok.decode(val_ids.tolist()).encode("utf-8") == val_b, "BPE round trip lost bytes"
    d = out / f"bpe{vocab_size}"
    d.mkdir(parents=True, exist_ok=True)
    np.save(d / "train.npy", train_ids)
    np.save(d / "val.npy", val_ids)
    tok.save(str(d / "tokenizer.json"))
    meta = {"vocab_size": tok.get_vocab_size(), "train_bytes": len(train_b), "train_tokens": int(train_ids.size),
            "val_bytes": len(val_b), "val_tokens": int(val_ids.size),
            "bytes_per_token_train": len(train_b) / train_ids.size, "bytes_per_token_val": len(val_b) / val_ids.size,
            "seconds_read": round(t1 - t0, 2), "seconds_train": round(t2 - t1, 2), "seconds_encode": round(t3 - t2, 2)}
    (d / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def bpb(val_loss: float, meta: dict) -> float:
    """Bits per byte of a nats-per-token loss, through the whole validation split's tokens/bytes ratio."""
    return val_loss * meta["val_tokens"] / meta["val_bytes"] / math.log(2)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("vocab", type=int, nargs="+")
    p.add_argument("--out", default="/tmp/recipe/data")
    args = p.parse_args()
    for v in args.vocab:
        print(json.dumps(build(v, Path(args.out))))
