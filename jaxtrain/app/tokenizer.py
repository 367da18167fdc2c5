"""Tokenizers of the language-model task: bytes, a Hugging Face ``tokenizer.json``, or a trained BPE.

``data.tokenizer`` picks one (:func:`check_spec` validates the text):

- ``bytes`` (the default): token ids are the UTF-8 bytes of the text, 256 of them.
- a path to a Hugging Face ``tokenizer.json`` (any model the ``tokenizers``
  library reads: BPE, WordPiece, Unigram, ...).
- ``bpe:N``: a byte-level BPE of at most N tokens (256 <= N <= 2**20) trained
  offline on the corpus's training split (:func:`train_bpe`; :mod:`jaxtrain.app.data`
  caches it under ``data.cache_dir``). Its alphabet is the 256 bytes, so every
  text encodes, and it has no special tokens.

Every tokenizer has ``encode(str) -> int32 [n]``, ``decode(ids) -> str``,
``vocab_size`` (largest id + 1), ``token_bytes`` (int64 ``[vocab_size]``: the
UTF-8 bytes each id stands for, which turns nats per token into bits per byte),
``identity`` (a short string naming its exact vocabulary, for cache names and
fingerprints) and ``save(path)``. A run saves its tokenizer in its directory
(:func:`save_run`, :func:`load_run`), so ``jaxtrain generate`` decodes with it.

``token_bytes`` is exact for ``bytes`` and for byte-level BPEs (GPT-2 style: a
ByteLevel pre-tokenizer or decoder, each vocabulary character standing for one
byte). For other models it is the UTF-8 length of the token's text with the
model's conventions undone: ``<0xNN>`` byte-fallback tokens are 1 byte,
SentencePiece's ``▁`` is a space, a WordPiece continuation prefix (``##``)
counts nothing. That is as close as a token can be attributed bytes: a
WordPiece decoder's spaces between words and a normalizer's changes (e.g.
lowercasing, accents) are not seen. Special tokens count 0 bytes.

Example::

    tok = load("path/to/tokenizer.json")
    ids = tok.encode("def f(x):")      # int32 [n]
    tok.decode(ids)                     # -> "def f(x):"
    int(tok.token_bytes[ids].sum())     # -> 9, the text's UTF-8 length
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import uuid
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from jaxtrain.errors import ConfigError

BPE_FORMAT = "bpe-v1"  # bump when the trained BPE's recipe changes: cached BPEs are retrained
BPE_MIN, BPE_MAX = 256, 2**20  # 256 = the byte alphabet alone; a larger vocabulary than 2**20 is no use here
RUN_FILE = "tokenizer.json"  # a run's tokenizer, in its run directory
BYTES_MARKER = "tokenizer.txt"  # ... or this file, holding "bytes", for the byte tokenizer
_SPECS = "bytes, bpe:N (a byte-level BPE of N tokens trained on the corpus, e.g. bpe:4096) or a path to a " \
         "Hugging Face tokenizer.json"


class TokenizerError(ConfigError):
    """A bad ``data.tokenizer`` (or a bad saved tokenizer); one line naming the value and what is valid."""


class Tokenizer:
    """What the language-model task needs of a tokenizer (see the module docstring)."""

    identity: str
    vocab_size: int
    token_bytes: np.ndarray  # int64 [vocab_size]

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text``, int32 (uint8 for bytes) ``[n]``; no special tokens are added."""
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """:meth:`encode` of each text (in parallel where the tokenizer can)."""
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        """The text of ``ids`` (any integer array); an incomplete UTF-8 sequence becomes U+FFFD."""
        raise NotImplementedError

    def save(self, path: str | Path) -> None:
        """Write the tokenizer to ``path`` (a Hugging Face tokenizer.json, or the bytes marker)."""
        raise NotImplementedError

    @staticmethod
    def load(spec: str) -> "Tokenizer":
        """The tokenizer ``spec`` names (``bytes``, or a path :meth:`save` wrote): see :func:`load`."""
        return load(spec)


class ByteTokenizer(Tokenizer):
    """Token ids are the UTF-8 bytes of the text."""

    identity = "bytes"
    vocab_size = 256

    def __init__(self):
        self.token_bytes = np.ones(256, np.int64)

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()

    def decode(self, ids) -> str:
        return bytes(np.asarray(ids, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")

    def save(self, path: str | Path) -> None:
        _write_atomic(Path(path), "bytes\n")


BYTES = ByteTokenizer()


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers.Tokenizer``; ``name`` says where it came from (for identity)."""

    def __init__(self, tok: Any, name: str = "json"):
        self._tok = tok
        self.json = tok.to_str()
        self.identity = f"{name}-{hashlib.sha256(self.json.encode()).hexdigest()[:12]}"
        self.token_bytes = token_bytes(json.loads(self.json))
        self.vocab_size = len(self.token_bytes)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encs = self._tok.encode_batch_fast(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encs]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=False)

    def save(self, path: str | Path) -> None:
        _write_atomic(Path(path), self.json)


# ---------------------------------------------------------------- specs


def check_spec(spec: str, key: str = "data.tokenizer") -> tuple[str, Any]:
    """``("bytes", None)``, ``("bpe", N)`` or ``("json", Path)`` for a ``data.tokenizer`` value.

    Raises :class:`TokenizerError` (one line naming ``key`` and the value) for a
    malformed ``bpe:N``, an N outside ``[256, 2**20]`` or a path that is not a file.
    The file's content is checked by :func:`load`.
    """
    if spec == "bytes":
        return "bytes", None
    if spec.startswith("bpe:"):
        n = spec[4:].strip().replace("_", "")
        if not n.isdigit():
            raise TokenizerError(f"{key}={spec!r}: N in bpe:N must be a whole number of tokens, e.g. bpe:4096")
        if not BPE_MIN <= int(n) <= BPE_MAX:
            raise TokenizerError(f"{key}={spec!r}: a byte-level BPE needs at least {BPE_MIN} tokens (its byte "
                                 f"alphabet) and at most {BPE_MAX:,}; e.g. bpe:4096")
        return "bpe", int(n)
    path = Path(spec).expanduser()
    if not path.is_file():
        why = "is a directory" if path.is_dir() else "no such file"
        raise TokenizerError(f"{key}={spec!r}: {why}; expected {_SPECS}")
    return "json", path


def vocab_size(spec: str, key: str = "data.tokenizer") -> Optional[int]:
    """The vocabulary size ``spec`` stands for, without training or building anything.

    ``bytes`` -> 256; ``bpe:N`` -> N (a small corpus may give fewer tokens);
    a tokenizer.json -> its largest id + 1 (parsed as JSON). None when the file's
    vocabulary cannot be read from the JSON (:func:`load` then says why).
    """
    kind, arg = check_spec(spec, key)
    if kind == "bytes":
        return 256
    if kind == "bpe":
        return arg
    try:
        j = json.loads(arg.read_text(encoding="utf-8"))
        return len(token_bytes(j))
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def load(spec: str, key: str = "data.tokenizer") -> Tokenizer:
    """The tokenizer ``spec`` names: ``bytes``, a tokenizer.json path, or a saved bytes marker.

    ``bpe:N`` is trained from a corpus (:func:`jaxtrain.app.data.load_corpus` does
    it), so it is refused here. Raises :class:`TokenizerError` naming ``key`` and
    the path for a missing or unreadable file.
    """
    kind, path = check_spec(spec, key)
    if kind == "bytes":
        return BYTES
    if kind == "bpe":
        raise TokenizerError(f"{key}={spec!r}: a bpe:N tokenizer is trained from data.source; "
                             "load the corpus (jaxtrain.app.data.load_corpus) to get it")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{key}={spec!r}: cannot be read ({type(e).__name__}: {e})") from None
    if path.name == BYTES_MARKER and text.strip() == "bytes":
        return BYTES
    return from_json(text, f"{key}={spec!r}")


def _hf():
    """The ``tokenizers`` library, or a one-line error saying how to install it."""
    try:
        import tokenizers
    except ImportError:
        raise TokenizerError("data.tokenizer: bpe:N and tokenizer.json files need the Hugging Face tokenizers "
                             "library: pip install tokenizers") from None
    return tokenizers


def from_json(text: str, where: str, name: str = "json") -> HFTokenizer:
    """An :class:`HFTokenizer` from tokenizer.json text; ``where`` starts the error message."""
    HF = _hf().Tokenizer
    try:
        json.loads(text)
        tok = HF.from_str(text)
    except Exception as e:  # noqa: BLE001 - JSON syntax or a schema the tokenizers library refuses
        msg = " ".join(str(e).split())[:200]
        raise TokenizerError(f"{where}: not a valid Hugging Face tokenizer.json ({msg})") from None
    out = HFTokenizer(tok, name)
    if out.vocab_size == 0:
        raise TokenizerError(f"{where}: the tokenizer has an empty vocabulary")
    return out


def save_run(tok: Tokenizer, run_dir: str | Path) -> None:
    """Save ``tok`` in ``run_dir``: ``tokenizer.json``, or for bytes the marker ``tokenizer.txt``."""
    run_dir = Path(run_dir).expanduser()
    stale = run_dir / (RUN_FILE if tok is BYTES else BYTES_MARKER)
    stale.unlink(missing_ok=True)
    tok.save(run_dir / (BYTES_MARKER if tok is BYTES else RUN_FILE))


def load_run(run_dir: str | Path) -> Optional[Tokenizer]:
    """The tokenizer a run saved in ``run_dir`` (:func:`save_run`); None when it saved none
    (runs of earlier versions, or a token-id corpus without a tokenizer)."""
    run_dir = Path(run_dir).expanduser()
    for name in (RUN_FILE, BYTES_MARKER):
        if (run_dir / name).is_file():
            return load(str(run_dir / name), key=f"the run's tokenizer")
    return None


# ---------------------------------------------------------------- bytes per token


def token_bytes(tok_json: dict) -> np.ndarray:
    """UTF-8 bytes each id of a parsed tokenizer.json stands for, int64 ``[max id + 1]`` (see the
    module docstring for how exact that is); ids the file does not use count 0."""
    model = tok_json["model"]
    vocab = model["vocab"]
    pieces = ({p[0]: i for i, p in enumerate(vocab)} if isinstance(vocab, list) else dict(vocab))
    added = {t["id"]: t for t in tok_json.get("added_tokens") or []}
    size = max([*pieces.values(), *added.keys(), -1]) + 1
    out = np.zeros(size, np.int64)
    byte_level = _uses(tok_json.get("pre_tokenizer"), "ByteLevel") or _uses(tok_json.get("decoder"), "ByteLevel")
    alphabet = set(_byte_alphabet()) if byte_level else set()
    metaspace = "▁" if _uses(tok_json.get("pre_tokenizer"), "Metaspace") or _uses(
        tok_json.get("decoder"), "Metaspace") or model.get("type") == "Unigram" else None
    prefix = model.get("continuing_subword_prefix") or ""
    for piece, i in pieces.items():
        out[i] = _piece_bytes(piece, alphabet, metaspace, prefix)
    for i, t in added.items():
        out[i] = 0 if t.get("special") else len(t["content"].encode("utf-8"))
    return out


_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _piece_bytes(piece: str, alphabet: set, metaspace: Optional[str], prefix: str) -> int:
    if alphabet and all(c in alphabet for c in piece):
        return len(piece)  # byte-level: one character per byte
    if _BYTE_FALLBACK.fullmatch(piece):
        return 1
    if prefix and piece.startswith(prefix) and len(piece) > len(prefix):
        piece = piece[len(prefix):]
    if metaspace:
        piece = piece.replace(metaspace, " ")
    return len(piece.encode("utf-8"))


def _uses(node: Any, kind: str) -> bool:
    """Does a pre-tokenizer/decoder JSON node (maybe a Sequence) contain one of type ``kind``?"""
    if not isinstance(node, dict):
        return False
    if node.get("type") == kind:
        return True
    return any(_uses(n, kind) for n in node.get("pretokenizers", node.get("decoders", [])) or [])


def _byte_alphabet() -> list[str]:
    return _hf().pre_tokenizers.ByteLevel.alphabet()


# ---------------------------------------------------------------- training


def train_bpe(texts: Iterable[str], n: int, *, length: Optional[int] = None,
              progress: Optional[bool] = None) -> HFTokenizer:
    """A byte-level BPE of at most ``n`` tokens trained on ``texts`` (deterministic for the same texts).

    The 256 byte characters are the initial alphabet (so every text encodes and
    ids 0-255 are the bytes in the ByteLevel alphabet's order), the pre-tokenizer
    splits GPT-2 style without a prefix space, there are no special tokens.
    ``length`` (the number of texts) sizes the tokenizers library's progress bar;
    ``progress=None`` shows it when stdout and stderr are terminals (off a
    terminal the library would still print empty lines).
    """
    hf = _hf()
    HF, decoders, models, pre_tokenizers, trainers = hf.Tokenizer, hf.decoders, hf.models, hf.pre_tokenizers, hf.trainers
    if progress is None:
        progress = sys.stdout.isatty() and sys.stderr.isatty()
    tok = HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=n, initial_alphabet=_byte_alphabet(), special_tokens=[],
                                  show_progress=progress)
    tok.train_from_iterator(texts, trainer, length=length)
    return HFTokenizer(tok, f"bpe{n}")


def cached_bpe(n: int, corpus_key: str, cache_dir: str | Path, texts, *, length: Optional[int] = None) -> HFTokenizer:
    """The BPE of ``n`` tokens for the training text ``corpus_key`` names, from ``cache_dir`` or trained.

    ``texts`` is a function returning the training texts (called only when
    training). A cached file that does not load is retrained and replaced.
    """
    name = hashlib.sha256(repr((BPE_FORMAT, corpus_key, n)).encode()).hexdigest()[:16]
    path = Path(cache_dir).expanduser() / f"bpe{n}-{name}.json"
    if path.is_file():
        try:
            return from_json(path.read_text(encoding="utf-8"), f"cached BPE '{path}'", f"bpe{n}")
        except (TokenizerError, OSError, UnicodeDecodeError) as e:
            import logging

            logging.getLogger(__name__).warning("%s; retraining it", str(e).split(" (")[0])
    tok = train_bpe(texts(), n, length=length)
    _write_atomic(path, tok.json)
    return tok


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a private temporary file and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
