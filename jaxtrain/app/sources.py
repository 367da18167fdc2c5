"""Corpus sources read in bounded memory: the text stream of ``data.source`` and its token caches.

A text source is one stream of bytes:

- a text file: its bytes, memory-mapped where it lies;
- a folder of text files (``data.glob``) or the built-in ``stdlib`` corpus: the
  files' bytes joined in sorted order, each preceded by ``# file: <relative/path>\\n``
  (a Python comment) and followed by one newline;
- ``.jsonl`` / ``.parquet`` files (one, or a folder of them picked by ``data.glob``):
  the ``data.text_field`` string of every record (JSON lines in order, blank
  lines skipped; Parquet rows in order, read by record batches), in sorted file
  order, with one blank line (``"\\n\\n"``) between consecutive documents and no file headers.

Joined streams are written once (files read piecewise) into a uint8 ``.npy`` in
``data.cache_dir``, named by a hash of the file list (path, size, mtime) and the
format, and memory-mapped afterwards. :func:`encode_cached` turns a byte range of
a stream into a token cache for a tokenizer other than bytes. Every cache is
written to a private temporary file and moved into place with ``os.replace``;
an unreadable one is rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import mmap
import os
import sys
import sysconfig
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

FILE_HEADER = "# file: {}\n"  # precedes every file of a multi-file text source
DOC_SEPARATOR = b"\n\n"  # between the documents of .jsonl / .parquet sources
RECORD_SUFFIXES = (".jsonl", ".parquet")
_CACHE_FORMAT = "v1"  # bump when the concatenation format changes
_RECORDS_FORMAT = "records-v1"  # ... or the way records are joined
_TOKENS_FORMAT = "tokens-v1"  # ... or the way byte ranges are cut and encoded
_PIECE = 1 << 24  # bytes read from a file at a time
TEXT_CHUNK = 1 << 16  # bytes of text per encoded chunk, cut after a newline (part of the token cache format)
_BATCH = 16  # chunks per encode_batch call
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idlelib", "lib2to3"}
_STDLIB_SKIP_FILES = {"pydoc_data/topics.py"}  # 757 KB of prose, 7% of the corpus


class DataError(ValueError):
    """A user-facing data problem; the message names the path or key and what is valid."""


@dataclass(frozen=True)
class TextStream:
    """The bytes of a text source (uint8 ``[n]``, usually a memmap) and a key naming exactly them."""

    data: np.ndarray
    key: str


def _digest(obj) -> str:
    return hashlib.sha256(repr(obj).encode()).hexdigest()[:16]


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


def text_stream(source: str, key: str, cfg) -> TextStream:
    """The :class:`TextStream` of a text source (``stdlib``, a text file, a folder, .jsonl/.parquet).

    ``key`` names the config field in errors; ``cfg`` is the ``DataConfig``.
    """
    if source == "stdlib":
        root, rels = stdlib_files()
        return _concat_cached("stdlib", root, rels, cfg.cache_dir)
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.glob(cfg.glob) if p.is_file())
        if not files:
            raise DataError(f"{key}='{source}': folder has no files matching data.glob='{cfg.glob}'")
        records = [p.suffix in RECORD_SUFFIXES for p in files]
        if any(records) and not all(records):
            raise DataError(f"{key}='{source}': data.glob='{cfg.glob}' matches both record files (.jsonl, "
                            ".parquet) and text files; make data.glob pick one kind, e.g. '**/*.jsonl'")
        if all(records):
            return _records_cached(f"dir-{path.name}", files, key, source, cfg)
        return _concat_cached(f"dir-{path.name}", path.resolve(), [p.relative_to(path).as_posix() for p in files],
                              cfg.cache_dir)
    if path.suffix in RECORD_SUFFIXES:
        return _records_cached(f"records-{path.stem}", [path], key, source, cfg)
    st = path.stat()
    stream_key = _digest(("file", str(path.resolve()), st.st_size, st.st_mtime_ns))
    if st.st_size == 0:
        return TextStream(np.zeros(0, np.uint8), stream_key)  # np.memmap refuses empty files
    return TextStream(np.memmap(path, dtype=np.uint8, mode="r"), stream_key)


def _concat_cached(name: str, root: Path, rels: list[str], cache_dir: str) -> TextStream:
    """Join ``rels`` under ``root`` (FILE_HEADER format) into a cached uint8 .npy; memmap it."""
    stats = [os.stat(root / r) for r in rels]
    files = [(r, st.st_size, st.st_mtime_ns) for r, st in zip(rels, stats)]
    cache_key = repr((_CACHE_FORMAT, sys.version, str(root), files))
    digest = hashlib.sha256(cache_key.encode()).hexdigest()[:16]

    def write(out):
        for r, size, _ in files:
            out.write(FILE_HEADER.format(r).encode())
            if _copy(root / r, out) != size:
                raise DataError(f"'{root / r}' changed while the corpus was being cached; retry")
            out.write(b"\n")

    total = sum(len(FILE_HEADER.format(r).encode()) + size + 1 for r, size, _ in files)
    return TextStream(_cached_npy(Path(cache_dir).expanduser() / f"{name}-{digest}.npy", write, total, cache_dir),
                      digest)


def _copy(path: Path, out) -> int:
    """Append ``path``'s bytes to ``out`` piecewise; returns how many."""
    n = 0
    with open(path, "rb") as f:
        while piece := f.read(_PIECE):
            out.write(piece)
            n += len(piece)
    return n


def _records_cached(name: str, files: list[Path], key: str, source: str, cfg) -> TextStream:
    """The documents of .jsonl / .parquet ``files`` joined by DOC_SEPARATOR, cached as a uint8 .npy."""
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    digest = _digest((_RECORDS_FORMAT, stats, cfg.text_field))

    def write(out):
        first = True
        for path in files:
            for doc in _documents(path, key, source, cfg.text_field):
                out.write(doc if first else DOC_SEPARATOR + doc)
                first = False

    total = sum(s for _, s, _ in stats)
    return TextStream(_cached_npy(Path(cfg.cache_dir).expanduser() / f"{name}-{digest}.npy", write, total,
                                  cfg.cache_dir), digest)


def _documents(path: Path, key: str, source: str, field: str) -> Iterator[bytes]:
    """UTF-8 bytes of each record's ``field`` in a .jsonl or .parquet file, in order."""
    where = f"{key}='{source}': '{path}'"
    if path.suffix == ".parquet":
        yield from _parquet_documents(path, where, field)
        return
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise DataError(f"{where} line {line_no} is not JSON ({str(e).splitlines()[0]})") from None
            if not isinstance(record, dict) or field not in record:
                has = f"its fields: {', '.join(map(str, record))[:200]}" if isinstance(record, dict) else \
                    f"it is a JSON {type(record).__name__}, not an object"
                raise DataError(f"{where} line {line_no} has no field '{field}' (data.text_field); {has}")
            text = record[field]
            if not isinstance(text, str):
                raise DataError(f"{where} line {line_no}: field '{field}' (data.text_field) is "
                                f"{type(text).__name__}, not text")
            yield text.encode("utf-8", errors="replace")


def _parquet_documents(path: Path, where: str, field: str) -> Iterator[bytes]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{where}: reading .parquet files needs pyarrow: pip install pyarrow "
                        "(or pip install 'jaxtrain[parquet]')") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow's errors for a file that is not Parquet
        raise DataError(f"{where} is not a readable Parquet file ({' '.join(str(e).split())[:200]})") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise DataError(f"{where} has no column '{field}' (data.text_field); its columns: {', '.join(names)[:200]}")
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=[field]):
        for text in batch.column(0).to_pylist():
            if not isinstance(text, str):
                raise DataError(f"{where} row {row}: column '{field}' (data.text_field) is "
                                f"{'null' if text is None else type(text).__name__}, not text")
            yield text.encode("utf-8", errors="replace")
            row += 1


# ---------------------------------------------------------------- cache files


def _npy_header(dtype: np.dtype, n: int) -> bytes:
    buf = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (n,)}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


class _NpyOut:
    """A 1-D .npy written piecewise whose length is known only at the end (the header is rewritten)."""

    def __init__(self, f, dtype):
        self.f, self.dtype, self.n = f, np.dtype(dtype), 0
        self._reserved = len(_npy_header(self.dtype, 10**18))  # room for any length's header
        f.write(b"\0" * self._reserved)

    def write(self, data) -> None:
        """Append ``data``: bytes (for uint8) or an array of ids (converted to the dtype)."""
        data = np.frombuffer(data, np.uint8) if isinstance(data, bytes) else np.asarray(data)
        self.f.write(data.astype(self.dtype, copy=False).tobytes())
        self.n += data.size

    def finish(self) -> None:
        header = _npy_header(self.dtype, self.n)
        if len(header) != self._reserved:
            raise RuntimeError(f"npy header of {len(header)} bytes does not fit the reserved {self._reserved}")
        self.f.seek(0)
        self.f.write(header)


@contextlib.contextmanager
def _npy_out(path: Path, dtype) -> Iterator[_NpyOut]:
    """Write a 1-D .npy at ``path`` atomically: a private tmp file moved into place on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A private tmp name + os.replace: concurrent builders never see a half-written file.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            out = _NpyOut(f, dtype)
            yield out
            out.finish()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _load_cached(path: Path) -> Optional[np.ndarray]:
    """The memmapped 1-D cache at ``path``, or None if missing or damaged (a warning says so)."""
    if not path.exists():
        return None
    try:
        arr = np.load(path, mmap_mode="r")
        if arr.ndim == 1:
            return arr
        raise ValueError(f"shape {arr.shape}")
    except (OSError, ValueError, EOFError) as e:  # damaged (e.g. truncated): it is derived data, rebuild it
        log.warning("corpus cache '%s' is unreadable (%s); rebuilding it", path, e)
        return None


def _cached_npy(path: Path, write, total: int, cache_dir: str, dtype=np.uint8) -> np.ndarray:
    """The uint8 cache at ``path``, built first by ``write(out)`` (``total``: bytes expected, for the bar)."""
    cached = _load_cached(path)
    if cached is not None:
        return cached
    try:
        with _npy_out(path, dtype) as out, _bar(total, f"caching {path.name}") as bar:
            write(_Counting(out, bar))
    except OSError as e:
        raise DataError(f"data.cache_dir='{cache_dir}': cannot write the corpus cache there ({type(e).__name__}: "
                        f"{e.strerror or e}); pass a writable directory") from None
    return np.load(path, mmap_mode="r")


class _Counting:
    def __init__(self, out: _NpyOut, bar):
        self.out, self.bar = out, bar

    def write(self, data: bytes) -> None:
        self.out.write(data)
        self.bar.update(len(data))


def _bar(total: int, desc: str):
    """A byte progress bar on a terminal only (``disable=None``: nothing in a log file)."""
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=None, leave=False,
                dynamic_ncols=True)


# ---------------------------------------------------------------- tokens


def text_chunks(data: np.ndarray, lo: int, hi: int, size: int = TEXT_CHUNK) -> Iterator[bytes]:
    """``data[lo:hi]`` in pieces of about ``size`` bytes, each cut after its last newline (in a line
    longer than ``size``, before a character's first byte), so that each decodes on its own.

    The cuts depend on the bytes alone: equal byte ranges give equal pieces. A
    memmapped file is read with plain reads, so what was read does not stay
    mapped in the process (its resident memory does not grow with the corpus).
    """
    with _byte_reader(data) as read:
        pos = lo
        while pos < hi:
            n = min(size, hi - pos)
            buf = read(pos, n + 1 if pos + n < hi else n)  # one byte more: would the cut split a character?
            piece = buf[:n]
            if pos + n < hi:
                cut = piece.rfind(b"\n") + 1
                if cut == 0:  # no newline: cut before the first byte of a character
                    cut = n
                    while cut > 1 and buf[cut] & 0xC0 == 0x80:
                        cut -= 1
                piece = piece[:cut]
            yield piece
            pos += len(piece)


@contextlib.contextmanager
def _byte_reader(data: np.ndarray):
    """``read(pos, n) -> bytes`` of ``data[pos:pos+n]``: file reads for a whole memmapped file, else slicing."""
    if isinstance(data, np.memmap) and data.filename and isinstance(data.base, mmap.mmap):  # not a view
        with open(data.filename, "rb") as f:
            def read(pos: int, n: int) -> bytes:
                f.seek(data.offset + pos)
                return f.read(n)

            yield read
    else:
        yield lambda pos, n: bytes(np.asarray(data[pos : pos + n]))


def encode_cached(stream: TextStream, lo: int, hi: int, tok, cache_dir: str, what: str) -> np.ndarray:
    """Tokens of ``stream.data[lo:hi]`` under ``tok``, from a memmapped cache in ``cache_dir`` or encoded now.

    Encoded in :func:`text_chunks` with ``tok.encode_batch``, written piecewise to
    a uint16 (vocab <= 65536) or uint32 ``.npy`` named by the stream's key, the
    range and ``tok.identity``; ``what`` labels the progress bar (bytes/s and tokens/s).
    """
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    path = Path(cache_dir).expanduser() / f"tok-{_digest((_TOKENS_FORMAT, stream.key, lo, hi, tok.identity))}.npy"
    cached = _load_cached(path)
    if cached is not None:
        return cached
    t0, n_tokens = time.perf_counter(), 0
    try:
        with _npy_out(path, dtype) as out, _bar(hi - lo, f"tokenizing {what}") as bar:
            pieces = text_chunks(stream.data, lo, hi)
            while batch := [p for _, p in zip(range(_BATCH), pieces)]:
                for ids in tok.encode_batch([p.decode("utf-8", errors="replace") for p in batch]):
                    out.write(ids)
                    n_tokens += len(ids)
                bar.update(sum(map(len, batch)))
                bar.set_postfix_str(f"{n_tokens / max(time.perf_counter() - t0, 1e-9) / 1e3:.0f}k tokens/s",
                                    refresh=False)
    except OSError as e:
        raise DataError(f"data.cache_dir='{cache_dir}': cannot write the token cache there ({type(e).__name__}: "
                        f"{e.strerror or e}); pass a writable directory") from None
    return np.load(path, mmap_mode="r")
