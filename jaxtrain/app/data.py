"""Corpora, the deterministic batch for step t, and prefetching.

Tokens are 1-D integer arrays (often ``np.memmap``), never loaded whole when
avoidable. The batch for step ``t`` is a pure function of ``(seed, t,
process_index)``, so a resumed run replays exactly what an uninterrupted one saw,
and N processes together see exactly the global batch one process would.

Example::

    corpus = load_corpus(cfg.data)
    check_corpus(corpus, cfg.model.block_size, cfg.model.vocab_size)
    batch = get_batch(corpus.train, seed=0, step=7, batch_size=16, block_size=256)
    batch["inputs"].shape   # -> (16, 256), int32

A text source (the built-in ``"stdlib"`` corpus, a text file, a folder, .jsonl or
.parquet records: :mod:`jaxtrain.app.sources`) is one stream of bytes. Its
validation split is the last ``data.val_fraction`` of those BYTES whatever the
tokenizer (``data.tokenizer``, :mod:`jaxtrain.app.tokenizer`), so the held-out
text is the same for every tokenizer. With ``bytes`` the tokens are the stream's
bytes (a memmap of the file or of the cached join); with another tokenizer each
split is encoded once into a memmapped token cache in ``data.cache_dir``. A
``.bin``/``.npy`` source holds token ids already and is used as it is.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import queue
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

from jaxtrain.app import sources, tokenizer
from jaxtrain.app.sources import FILE_HEADER, DataError, TextStream, stdlib_files  # noqa: F401 - re-exported

log = logging.getLogger(__name__)

VOCAB_SIZE = 256  # of the byte tokenizer
_CHUNK = 1 << 24  # tokens per chunk when scanning a memmap (bounded memory)
_SOURCES = "'stdlib', a text file, a folder, .jsonl/.parquet records, a .bin token file or a 1-D integer .npy"


def encode(text: str) -> np.ndarray:
    """UTF-8 bytes of ``text`` as uint8 tokens, shape [len(bytes)] (the byte tokenizer)."""
    return tokenizer.BYTES.encode(text)


def decode(tokens) -> str:
    """Inverse of :func:`encode`; invalid UTF-8 (e.g. a cut multi-byte char) becomes U+FFFD."""
    return tokenizer.BYTES.decode(tokens)


def is_byte_level(source: str) -> bool:
    """True when ``data.source`` is text (a file, a folder, the built-in corpus): its token ids are UTF-8 bytes.

    A ``.bin`` or ``.npy`` source holds token ids of some other tokenizer (e.g.
    GPT-2's BPE); prompts and samples of such a run are token ids, not text.
    """
    return Path(source).suffix not in (".bin", ".npy")


def prompt_tokens(prompt: str, *, byte_level: bool = True, vocab_size: int, key: str = "prompt",
                  tokenizer: Optional["tokenizer.Tokenizer"] = None) -> np.ndarray:
    """A prompt's token ids: ``tokenizer``'s encoding of it; without one, its UTF-8 bytes
    (``byte_level``) or, for a token-id corpus, the integers it lists.

    Raises :class:`DataError` naming ``key`` when a token-id prompt is not
    integers separated by spaces or an id is outside ``[0, vocab_size)``.
    """
    if tokenizer is not None:
        ids = tokenizer.encode(prompt)
        bad = ids[ids >= vocab_size]
        if bad.size:
            raise DataError(f"{key}={prompt!r}: encodes to token id {bad[0]}, outside the model's vocabulary "
                            f"[0, {vocab_size}); model.vocab_size must be at least the tokenizer's "
                            f"{tokenizer.vocab_size}")
        return ids
    if byte_level:
        return encode(prompt)
    try:
        ids = np.asarray([int(t) for t in prompt.split()], np.int64)
    except ValueError:
        raise DataError(f"{key}={prompt!r}: data.source holds token ids (a .bin or .npy file), not text, so a "
                        "prompt is token ids separated by spaces, e.g. '50256' (GPT-2's end of text)") from None
    if ids.size == 0:
        raise DataError(f"{key}={prompt!r}: data.source holds token ids (a .bin or .npy file); give at least one "
                        "token id to start from, e.g. '50256' (GPT-2's end of text)")
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
        raise DataError(f"{key}={prompt!r}: token id {bad[0]} is outside the model's vocabulary [0, {vocab_size})")
    return ids


def format_ids(tokens) -> str:
    """Token ids separated by spaces: a token-id corpus's samples, the form :func:`prompt_tokens` reads back."""
    return " ".join(str(int(t)) for t in np.asarray(tokens).reshape(-1))


@dataclass(frozen=True, eq=False)  # eq=False: arrays have no truth value; identity is enough
class Corpus:
    """Train and validation tokens, each 1-D (np.ndarray or np.memmap, uint8/16/32).

    ``tokenizer`` made (and decodes) them; None for token ids of an unknown
    tokenizer (a ``.bin``/``.npy`` source with ``data.tokenizer=bytes``).
    ``vocab_size`` is a property: max token id + 1 over both splits, computed once
    (in chunks, so a large memmap is scanned without loading it) and cached.
    """

    name: str
    train: np.ndarray
    val: np.ndarray
    val_from: str = "data.val_fraction"  # the config key that made the validation split (for error messages)
    tokenizer: Optional[tokenizer.Tokenizer] = None

    @functools.cached_property
    def vocab_size(self) -> int:
        return max(_scan(self.train, np.max, max, -1), _scan(self.val, np.max, max, -1)) + 1

    @functools.cached_property
    def fingerprint(self) -> str:
        """``"<tokenizer>:<train tokens>+<val tokens>:<hash>"``: equal only for the same token streams.

        The hash (BLAKE2b, 16 hex digits) covers both splits' token values,
        read in chunks; the tokenizer part is its identity (``ids`` without one).
        """
        h = hashlib.blake2b(digest_size=8)
        for split in (self.train, self.val):
            for c in _chunks(split):
                h.update(np.ascontiguousarray(c, c.dtype.newbyteorder("<")).view(np.uint8).data)
            h.update(b"|")
        who = self.tokenizer.identity if self.tokenizer is not None else "ids"
        return f"{who}:{len(self.train)}+{len(self.val)}:{h.hexdigest()}"


def _chunks(tokens: np.ndarray) -> Iterator[np.ndarray]:
    for i in range(0, len(tokens), _CHUNK):
        yield np.asarray(tokens[i : i + _CHUNK])


def _scan(tokens: np.ndarray, op, combine, empty: int) -> int:
    """``op`` over chunks combined with ``combine``, e.g. the max of a memmap in bounded memory."""
    return combine((int(op(c)) for c in _chunks(tokens)), default=empty)


# ---------------------------------------------------------------- sources


def _load_source(source: str, key: str, cfg) -> np.ndarray | TextStream:
    """A source's token ids (.bin, .npy) or its :class:`TextStream`, non-empty (``key`` names the config field)."""
    try:
        out = _read_source(source, key, cfg)
    except OSError as e:  # e.g. a name too long, a permission denied, an I/O error
        where = f" ('{e.filename}')" if e.filename and str(e.filename) != source else ""
        raise DataError(f"{key}='{source}': cannot be read{where}: {e.strerror or e}") from None
    if len(out.data if isinstance(out, TextStream) else out) == 0:
        raise DataError(f"{key}='{source}': corpus is empty; a corpus needs at least one token")
    return out


def _read_source(source: str, key: str, cfg) -> np.ndarray | TextStream:
    if source == "stdlib":
        return sources.text_stream(source, key, cfg)
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"{key}='{source}': path does not exist; expected {_SOURCES}")
    if path.is_dir() or path.suffix not in (".bin", ".npy"):
        return sources.text_stream(source, key, cfg)
    if path.suffix == ".npy":
        with open(path, "rb") as f:
            if f.read(6) != b"\x93NUMPY":
                raise DataError(f"{key}='{source}': not a .npy file (it does not start with numpy's "
                                "header); expected a 1-D integer array of token ids saved with numpy.save")
        try:
            tokens = np.load(path, mmap_mode="r")
        except (OSError, ValueError, EOFError) as e:  # a truncated file or pickled objects
            raise DataError(f"{key}='{source}': not a readable .npy file ({' '.join(str(e).split())[:200]}); "
                            "expected a 1-D integer array of token ids saved with numpy.save") from None
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise DataError(f"{key}='{source}': .npy holds {tokens.dtype}{list(tokens.shape)}; "
                            "expected a 1-D integer array of token ids")
        return tokens
    dtype = np.dtype(cfg.token_dtype)
    if path.stat().st_size == 0:
        return np.zeros(0, dtype)  # np.memmap refuses empty files
    if path.stat().st_size % dtype.itemsize:
        raise DataError(f"{key}='{source}': size {path.stat().st_size} bytes is not a multiple of "
                        f"data.token_dtype={cfg.token_dtype} ({dtype.itemsize} bytes)")
    return np.memmap(path, dtype=dtype, mode="r")


def load_corpus(cfg) -> Corpus:
    """Load ``cfg`` (a :class:`jaxtrain.config.DataConfig`) into train/val token arrays.

    Without ``cfg.val_source`` the last ``val_fraction`` of the source is
    validation: of its bytes for a text source (then tokenized), of its ids for
    a ``.bin``/``.npy``. Raises :class:`DataError` for a missing path, an empty
    folder/corpus or a bad .npy, and :class:`~jaxtrain.app.tokenizer.TokenizerError`
    (a ``ConfigError``) for a bad ``data.tokenizer``.
    """
    spec = getattr(cfg, "tokenizer", "bytes")
    kind, arg = tokenizer.check_spec(spec)
    src = _load_source(cfg.source, "data.source", cfg)
    val = None if cfg.val_source is None else _load_source(cfg.val_source, "data.val_source", cfg)
    name = "stdlib" if cfg.source == "stdlib" else Path(cfg.source).name
    val_from = "data.val_fraction" if val is None else "data.val_source"
    n = len(src.data if isinstance(src, TextStream) else src)
    split = n if val is not None else n - int(n * cfg.val_fraction)
    if kind == "bytes":
        tok = tokenizer.BYTES if isinstance(src, TextStream) else None
        tokens = src.data if isinstance(src, TextStream) else src
        if val is None:
            return Corpus(name, tokens[:split], tokens[split:], tokenizer=tok)
        return Corpus(name, tokens, val.data if isinstance(val, TextStream) else val, val_from, tok)
    if kind == "bpe":
        if not isinstance(src, TextStream):
            raise DataError(f"data.tokenizer='{spec}' is trained on text, but data.source='{cfg.source}' holds token "
                            "ids; use data.tokenizer=bytes (ids as they are) or the tokenizer.json that made them")
        tok = _bpe(arg, src, split, cfg)
    else:
        tok = tokenizer.load(spec)

    def tokens_of(stream, lo: int, hi: int, what: str) -> np.ndarray:
        if not isinstance(stream, TextStream):
            return stream[lo:hi]  # token ids already
        return sources.encode_cached(stream, lo, hi, tok, cfg.cache_dir, what)

    if val is None:
        return Corpus(name, tokens_of(src, 0, split, "train split"), tokens_of(src, split, n, "val split"),
                      tokenizer=tok)
    n_val = len(val.data if isinstance(val, TextStream) else val)
    return Corpus(name, tokens_of(src, 0, n, "train split"), tokens_of(val, 0, n_val, "data.val_source"),
                  val_from, tok)


def _bpe(n: int, src: TextStream, split: int, cfg) -> tokenizer.HFTokenizer:
    """The byte-level BPE of ``n`` tokens for the training bytes ``src.data[:split]``, cached by their key."""

    def texts():
        print(f"data.tokenizer=bpe:{n}: training a byte-level BPE on the {split / 2**20:.1f} MiB training split "
              f"(once; cached in data.cache_dir={cfg.cache_dir})", file=sys.stderr, flush=True)
        return (p.decode("utf-8", errors="replace") for p in sources.text_chunks(src.data, 0, split))

    return tokenizer.cached_bpe(n, f"{src.key}:0:{split}", cfg.cache_dir, texts,
                                length=-(-split // sources.TEXT_CHUNK))


def bytes_per_token(targets, token_bytes: np.ndarray) -> Optional[float]:
    """Mean UTF-8 bytes per token of the ``targets`` arrays (e.g. every eval batch's targets):
    ``sum(token_bytes[t]) / count``; None when they hold no bytes (or no tokens)."""
    n_tokens = n_bytes = 0
    for t in targets:
        t = np.asarray(t).reshape(-1)
        n_tokens += t.size
        n_bytes += int(token_bytes[t[(t >= 0) & (t < len(token_bytes))]].sum())  # ids it lacks: 0 bytes
    return n_bytes / n_tokens if n_tokens and n_bytes else None


def check_corpus(corpus: Corpus, block_size: int, vocab_size: int) -> None:
    """Raise :class:`DataError` unless both splits have >= block_size+1 tokens and ids fit the model."""
    for split in ("train", "val"):
        n = len(getattr(corpus, split))
        if n < block_size + 1:
            fix = ("a longer data.val_source" if corpus.val_from == "data.val_source"
                   else "more data or another data.val_fraction")
            raise DataError(f"corpus '{corpus.name}': {split} split has {n} tokens, needs at least "
                            f"model.block_size+1={block_size + 1}; use a smaller model.block_size or "
                            + (fix if split == "val" else "more data in data.source"))
    if corpus.vocab_size > vocab_size:
        raise DataError(f"corpus '{corpus.name}': max token id {corpus.vocab_size - 1} does not fit "
                        f"model.vocab_size={vocab_size}; ids must be < model.vocab_size")
    if min(_scan(corpus.train, np.min, min, 0), _scan(corpus.val, np.min, min, 0)) < 0:
        raise DataError(f"corpus '{corpus.name}': has negative token ids; ids must be >= 0")


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy (nats/token) of the token frequencies: the loss a context-free model reaches."""
    counts = np.zeros(0, dtype=np.int64)
    for c in _chunks(tokens):
        b = np.bincount(c)
        counts = np.pad(counts, (0, max(0, len(b) - len(counts))))
        counts[: len(b)] += b
    if counts.sum() == 0:
        raise DataError("unigram_entropy: no tokens")
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# ---------------------------------------------------------------- batches

_EVAL_TAG = 1 << 63  # high bit of the second key word: eval streams never equal a train (seed, step)


def _sample(tokens, key: tuple[int, int], batch_size, block_size, process_index, process_count) -> dict:
    """Rows [p*B_local, (p+1)*B_local) of the global batch drawn by Philox(key)."""
    if batch_size % process_count:
        raise DataError(f"batch_size={batch_size} must be divisible by process_count={process_count}")
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index} must be in [0, process_count={process_count})")
    n = len(tokens)
    if n < block_size + 1:
        raise DataError(f"{n} tokens cannot make a block of block_size+1={block_size + 1}")
    rng = np.random.Generator(np.random.Philox(key=np.array([k % 2**64 for k in key], dtype=np.uint64)))
    starts_B = rng.integers(0, n - block_size, size=batch_size)  # whole global batch, every process
    b_local = batch_size // process_count
    starts_b = starts_B[process_index * b_local : (process_index + 1) * b_local]
    idx_bT1 = starts_b[:, None] + np.arange(block_size + 1)  # [B_local, T+1]
    chunk = np.asarray(tokens)[idx_bT1].astype(np.int32)  # one gather from the memmap
    return {"inputs": np.ascontiguousarray(chunk[:, :-1]), "targets": np.ascontiguousarray(chunk[:, 1:])}


def get_batch(tokens, *, seed: int, step: int, batch_size: int, block_size: int,
              process_index: int = 0, process_count: int = 1) -> dict:
    """Training batch for ``step``: ``{"inputs", "targets"}``, int32 [batch_size // process_count, T].

    Pure in (seed, step, process_index); targets are inputs shifted left by one token.
    """
    return _sample(tokens, (seed, step), batch_size, block_size, process_index, process_count)


def eval_batch(tokens, *, index: int, batch_size: int, block_size: int,
               process_index: int = 0, process_count: int = 1) -> dict:
    """Fixed validation batch number ``index`` (independent of the training seed); as :func:`get_batch`."""
    return _sample(tokens, (index, _EVAL_TAG), batch_size, block_size, process_index, process_count)


# ---------------------------------------------------------------- prefetch

_DONE = object()


class Prefetcher:
    """Iterate ``(step, place(make_batch(step)))`` for ``step in range(start, end)``.

    A daemon thread works up to ``depth`` batches ahead (plus the one it is making),
    so host sampling and device transfer (``place``, e.g.
    :func:`jaxtrain.parallel.place_batch`) overlap the training step. ``place`` runs
    in the thread, so it must not issue cross-process collectives (in a multi-process
    run ``jax.device_put`` onto a global sharding does; see :mod:`jaxtrain.parallel`).
    An exception in the thread is re-raised in the consumer. ``depth=0`` runs
    synchronously. Use as a context manager or call :meth:`close`.
    """

    def __init__(self, make_batch: Callable[[int], dict], start: int, end: int, *,
                 depth: int = 2, place: Optional[Callable[[dict], Any]] = None):
        self._make = lambda step: (place or (lambda b: b))(make_batch(step))
        self._steps = iter(range(start, end))
        self._stop = threading.Event()
        self._thread = None
        if depth > 0:
            self._queue: queue.Queue = queue.Queue(maxsize=depth)
            self._thread = threading.Thread(target=self._work, name="jaxtrain-prefetch", daemon=True)
            self._thread.start()

    def _work(self) -> None:
        try:
            for step in self._steps:
                item = (step, self._make(step))
                if not self._put(item):
                    return
        except BaseException as e:  # handed to the consumer, which decides
            self._put(e)
            return
        self._put(_DONE)

    def _put(self, item) -> bool:
        while not self._stop.is_set():  # a timeout loop so close() never leaves us blocked
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def __iter__(self):
        return self

    def __next__(self):
        if self._thread is None:
            step = next(self._steps)
            return step, self._make(step)
        if self._stop.is_set():
            raise StopIteration
        item = self._queue.get()
        if item is _DONE or isinstance(item, BaseException):
            self._stop.set()
            if item is _DONE:
                raise StopIteration
            raise item
        return item

    def close(self) -> None:
        """Stop the thread (waits for a batch in progress) and drop prepared batches."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            while not self._queue.empty():
                self._queue.get_nowait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
