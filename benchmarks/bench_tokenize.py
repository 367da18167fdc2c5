"""Tokenizing large text corpora in bounded memory: peak RSS and throughput by corpus size.

For each size (default 100 MB, 300 MB, 1 GB) it writes a synthetic folder of
text files (the standard library's .py files repeated, each copy with its
identifiers and numbers varied so the text does not simply repeat) into a
temporary directory, then loads it as ``data.source`` with a byte-level BPE
(``data.tokenizer=path/to/tokenizer.json``, trained once on the standard library
by this script) in a fresh subprocess, which streams the folder into its byte
cache and encodes both splits into the memmapped token cache. The parent reads
each child's peak RSS from ``os.wait4`` (the child's own rusage). Everything
is deleted afterwards. With ``--write`` the table is appended to
``benchmarks/RESULTS.md``.

    nice -n 5 python benchmarks/bench_tokenize.py --write
    python benchmarks/bench_tokenize.py --sizes 20 --vocab 1024     # a quick look
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"

_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from jaxtrain.app import data
from jaxtrain.app.config import DataConfig
t1 = time.perf_counter()
cfg = DataConfig(source=sys.argv[1], tokenizer=sys.argv[2], cache_dir=sys.argv[3])
c = data.load_corpus(cfg)
t2 = time.perf_counter()
print(json.dumps({"train": len(c.train), "val": len(c.val), "dtype": str(c.train.dtype),
                  "import_s": t1 - t0, "load_s": t2 - t1}))
"""


def synthetic_corpus(root: Path, size: int) -> int:
    """Write about ``size`` bytes of varied standard-library text under ``root``; returns the bytes written."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(errors="replace") for p in sorted(stdlib.glob("*.py"))]
    word = re.compile(r"\b([a-z_]{4,})\b")
    written, copy = 0, 0
    while written < size:
        part, n = [], 0
        for text in texts:  # one ~5 MB file per copy
            varied = word.sub(lambda m, k=copy: f"{m.group(1)}{k % 13 or ''}", text) if copy else text
            part.append(varied)
            n += len(varied.encode())
            if written + n >= size:
                break
        body = "\n".join(part)
        (root / f"part{copy:05d}.txt").write_text(body)
        written += len(body.encode())
        copy += 1
    return written


def train_tokenizer(path: Path, vocab: int) -> None:
    sys.path.insert(0, str(ROOT))
    from jaxtrain.app import sources, tokenizer
    from jaxtrain.app.config import DataConfig

    with tempfile.TemporaryDirectory() as cache:
        stream = sources.text_stream("stdlib", "data.source", DataConfig(cache_dir=cache))
        texts = (p.decode("utf-8", errors="replace") for p in sources.text_chunks(stream.data, 0, len(stream.data)))
        tokenizer.train_bpe(texts, vocab, progress=False).save(path)


def measure(corpus: Path, tok: Path, cache: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(corpus), str(tok), str(cache)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"the child failed with exit status {proc.returncode}")
    result = json.loads(out)
    result["peak_rss_mb"] = usage.ru_maxrss / 1024  # KiB on Linux
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="100,300,1000", help="corpus sizes in MB (10^6 bytes), comma-separated")
    p.add_argument("--vocab", type=int, default=4096, help="tokens of the byte-level BPE")
    p.add_argument("--dir", default=None, help="where the temporary corpora go (default: the system's temp dir)")
    p.add_argument("--write", action="store_true", help=f"append the table to {RESULTS.relative_to(ROOT)}")
    args = p.parse_args()
    sizes = [int(float(s) * 1e6) for s in args.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_tokenize-", dir=args.dir) as tmp:
        tmp = Path(tmp)
        tok = tmp / "tokenizer.json"
        train_tokenizer(tok, args.vocab)
        for size in sizes:
            corpus, cache = tmp / f"corpus{size}", tmp / f"cache{size}"
            corpus.mkdir()
            t = time.perf_counter()
            n_bytes = synthetic_corpus(corpus, size)
            gen_s = time.perf_counter() - t
            r = measure(corpus, tok, cache)
            tokens = r["train"] + r["val"]
            rows.append({"mb": n_bytes / 1e6, "tokens": tokens, "load_s": r["load_s"], "rss": r["peak_rss_mb"],
                         "mb_s": n_bytes / 1e6 / r["load_s"], "tok_s": tokens / r["load_s"], "dtype": r["dtype"],
                         "cache_mb": sum(f.stat().st_size for f in cache.iterdir()) / 1e6})
            print(f"{n_bytes / 1e6:,.0f} MB: generated in {gen_s:.0f} s; {_row(rows[-1])}", flush=True)
            shutil.rmtree(corpus)
            shutil.rmtree(cache)
    table = _table(rows, args)
    print(table)
    if args.write:
        with open(RESULTS, "a") as f:
            f.write("\n" + table)
    return 0


def _row(r: dict) -> str:
    return (f"| {r['mb']:,.0f} | {r['tokens']:,} | {r['load_s']:.1f} | {r['mb_s']:.2f} | {r['tok_s'] / 1e6:.2f}M | "
            f"{r['rss']:,.0f} | {r['cache_mb']:,.0f} |")


def _table(rows: list[dict], args) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()[0]
    head = (f"## Tokenizing large corpora\n\n"
            f"Command: `python benchmarks/bench_tokenize.py --sizes {args.sizes} --vocab {args.vocab}"
            f"{' --write' if args.write else ''}`  \n"
            f"Date: {now}  \nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
            f"load average (1 min) at the end {load:.1f}  \n"
            f"Each size in a fresh process: a folder of synthetic text (standard-library files, identifiers "
            f"varied per copy) streamed into the byte cache, then both splits encoded with a byte-level BPE of "
            f"{args.vocab} tokens into the token cache (`data.load_corpus`, `data.tokenizer=tokenizer.json`). "
            f"Seconds are the whole load (byte cache + tokenizing); peak RSS is the child's (`os.wait4`).\n\n"
            "| corpus MB | tokens | load s | MB/s | tokens/s | peak RSS MB | caches MB |\n"
            "|---:|---:|---:|---:|---:|---:|---:|\n")
    return head + "\n".join(_row(r) for r in rows) + "\n"


if __name__ == "__main__":
    sys.exit(main())
