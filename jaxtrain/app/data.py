"""Byte tokenizer, corpora, the deterministic batch for step t, and prefetching.

Tokens are 1-D integer arrays (often ``np.memmap``), never loaded whole when
avoidable. The batch for step ``t`` is a pure function of ``(seed, t,
process_index)``, so a resumed run replays exactly what an uninterrupted one saw,
and N processes together see exactly the global batch one process would.

Example::

    corpus = load_corpus(cfg.data)
    check_corpus(corpus, cfg.model.block_size, cfg.model.vocab_size)
    batch = get_batch(corpus.train, seed=0, step=7, batch_size=16, block_size=256)
    batch["inputs"].shape   # -> (16, 256), int32

Multi-file sources (the built-in ``"stdlib"`` corpus and folders) are the files'
bytes joined in sorted order, each preceded by the header line
``# file: <relative/path>\\n`` (a Python comment, so samples stay valid code) and
followed by one newline. They are tokenized once and cached as a 1-D uint8 ``.npy``
in ``cache_dir`` named by a hash of the Python version and the (path, size,
mtime) list; later loads memory-map it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import queue
import sys
import sysconfig
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

log = logging.getLogger(__name__)

VOCAB_SIZE = 256
FILE_HEADER = "# file: {}\n"  # precedes every file of a multi-file source
_CACHE_FORMAT = "v1"  # bump when the concatenation format changes
_CHUNK = 1 << 24  # tokens per chunk when scanning a memmap (bounded memory)
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idlelib", "lib2to3"}
_STDLIB_SKIP_FILES = {"pydoc_data/topics.py"}  # 757 KB of prose, 7% of the corpus
_SOURCES = "'stdlib', a text file, a folder, a .bin token file or a 1-D integer .npy"


class DataError(ValueError):
    """A user-facing data problem; the message names the path or key and what is valid."""


def encode(text: str) -> np.ndarray:
    """UTF-8 bytes of ``text`` as uint8 tokens, shape [len(bytes)]."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()


def decode(tokens) -> str:
    """Inverse of :func:`encode`; invalid UTF-8 (e.g. a cut multi-byte char) becomes U+FFFD."""
    return bytes(np.asarray(tokens, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")


def is_byte_level(source: str) -> bool:
    """True when ``data.source`` is text (a file, a folder, the built-in corpus): its token ids are UTF-8 bytes.

    A ``.bin`` or ``.npy`` source holds token ids of some other tokenizer (e.g.
    GPT-2's BPE); prompts and samples of such a run are token ids, not text.
    """
    return Path(source).suffix not in (".bin", ".npy")


def prompt_tokens(prompt: str, *, byte_level: bool, vocab_size: int, key: str = "prompt") -> np.ndarray:
    """A prompt's token ids: its UTF-8 bytes, or for a token-id corpus the integers it lists.

    Raises :class:`DataError` naming ``key`` when a token-id prompt is not
    integers separated by spaces or an id is outside ``[0, vocab_size)``.
    """
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

    ``vocab_size`` is a property: max token id + 1 over both splits, computed once
    (in chunks, so a large memmap is scanned without loading it) and cached.
    """

    name: str
    train: np.ndarray
    val: np.ndarray
    val_from: str = "data.val_fraction"  # the config key that made the validation split (for error messages)

    @functools.cached_property
    def vocab_size(self) -> int:
        return max(_scan(self.train, np.max, max, -1), _scan(self.val, np.max, max, -1)) + 1


def _chunks(tokens: np.ndarray) -> Iterator[np.ndarray]:
    for i in range(0, len(tokens), _CHUNK):
        yield np.asarray(tokens[i : i + _CHUNK])


def _scan(tokens: np.ndarray, op, combine, empty: int) -> int:
    """``op`` over chunks combined with ``combine``, e.g. the max of a memmap in bounded memory."""
    return combine((int(op(c)) for c in _chunks(tokens)), default=empty)


# ---------------------------------------------------------------- sources


def stdlib_files() -> tuple[Path, list[str]]:
    """(root, sorted relative POSIX paths) of the built-in corpus's ``.py`` files."""
    root = Path(sysconfig.get_paths()["stdlib"])
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]  # prune the walk
        for f in filenames:
            rel = Path(dirpath, f).relative_to(root).as_posix()
            if f.endswith(".py") and rel not in _STDLIB_SKIP_FILES:
                rels.append(rel)
    return root, sorted(rels)


def _concat_cached(name: str, root: Path, rels: list[str], cache_dir: str) -> np.ndarray:
    """Join ``rels`` under ``root`` (FILE_HEADER format) into a cached uint8 .npy; memmap it."""
    stats = [os.stat(root / r) for r in rels]
    sizes = [st.st_size for st in stats]
    files = [(r, st.st_size, st.st_mtime_ns) for r, st in zip(rels, stats)]
    key = repr((_CACHE_FORMAT, sys.version, str(root), files))
    cache = Path(cache_dir).expanduser() / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npy"
    if cache.exists():
        try:
            return np.load(cache, mmap_mode="r")
        except (OSError, ValueError, EOFError) as e:  # damaged (e.g. truncated): it is derived data, rebuild it
            log.warning("corpus cache '%s' is unreadable (%s); rebuilding it", cache, e)
    try:
        _write_concat(cache, root, rels, sizes)
    except OSError as e:
        raise DataError(f"data.cache_dir='{cache_dir}': cannot write the corpus cache there ({type(e).__name__}: "
                        f"{e.strerror or e}); pass a writable directory") from None
    return np.load(cache, mmap_mode="r")


def _write_concat(cache: Path, root: Path, rels: list[str], sizes: list[int]) -> None:
    """Stream the files into ``cache`` (one file in memory at a time), atomically."""
    headers = [FILE_HEADER.format(r).encode() for r in rels]
    total = sum(len(h) + s + 1 for h, s in zip(headers, sizes))  # +1: newline after each file
    cache.parent.mkdir(parents=True, exist_ok=True)
    # A private tmp name + os.replace: concurrent builders never see a half-written file.
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as out:
            header = {"descr": "|u1", "fortran_order": False, "shape": (total,)}
            np.lib.format.write_array_header_1_0(out, header)
            for r, h, size in zip(rels, headers, sizes):
                body = (root / r).read_bytes()
                if len(body) != size:
                    raise DataError(f"'{root / r}' changed while the corpus was being cached; retry")
                out.write(h + body + b"\n")
        os.replace(tmp, cache)
    finally:
        tmp.unlink(missing_ok=True)


def _load_tokens(source: str, key: str, cfg) -> np.ndarray:
    """1-D non-empty tokens of one source (``key`` names the config field, for error messages)."""
    try:
        tokens = _read_source(source, key, cfg)
    except OSError as e:  # e.g. a name too long, a permission denied, an I/O error
        where = f" ('{e.filename}')" if e.filename and str(e.filename) != source else ""
        raise DataError(f"{key}='{source}': cannot be read{where}: {e.strerror or e}") from None
    if len(tokens) == 0:
        raise DataError(f"{key}='{source}': corpus is empty; a corpus needs at least one token")
    return tokens


def _read_source(source: str, key: str, cfg) -> np.ndarray:
    if source == "stdlib":
        root, rels = stdlib_files()
        return _concat_cached("stdlib", root, rels, cfg.cache_dir)
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"{key}='{source}': path does not exist; expected {_SOURCES}")
    if path.is_dir():
        rels = sorted(p.relative_to(path).as_posix() for p in path.glob(cfg.glob) if p.is_file())
        if not rels:
            raise DataError(f"{key}='{source}': folder has no files matching data.glob='{cfg.glob}'")
        return _concat_cached(f"dir-{path.name}", path.resolve(), rels, cfg.cache_dir)
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
    dtype = np.dtype(cfg.token_dtype if path.suffix == ".bin" else np.uint8)  # anything else is text
    if path.stat().st_size == 0:
        return np.zeros(0, dtype)  # np.memmap refuses empty files
    if path.stat().st_size % dtype.itemsize:
        raise DataError(f"{key}='{source}': size {path.stat().st_size} bytes is not a multiple of "
                        f"data.token_dtype={cfg.token_dtype} ({dtype.itemsize} bytes)")
    return np.memmap(path, dtype=dtype, mode="r")


def load_corpus(cfg) -> Corpus:
    """Load ``cfg`` (a :class:`jaxtrain.config.DataConfig`) into train/val token arrays.

    Without ``cfg.val_source`` the last ``val_fraction`` of the tokens is validation.
    Raises :class:`DataError` for a missing path, an empty folder/corpus or a bad .npy.
    """
    tokens = _load_tokens(cfg.source, "data.source", cfg)
    name = "stdlib" if cfg.source == "stdlib" else Path(cfg.source).name
    if cfg.val_source is not None:
        val = _load_tokens(cfg.val_source, "data.val_source", cfg)
        return Corpus(name, tokens, val, val_from="data.val_source")
    split = len(tokens) - int(len(tokens) * cfg.val_fraction)
    return Corpus(name, tokens[:split], tokens[split:])


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
