"""Run one recipe experiment through the README's command and append its record to ``records.jsonl``.

    PYTHONPATH=$PWD python benchmarks/recipe/run.py NAME [--vocab 4096] [key=value ...]

``--library`` runs the command as it is (the config's own ``data.tokenizer``, e.g. the
default's ``bpe:4096``) and records the exact ``val_bpb`` of its summary line. Otherwise
``--vocab N`` (N > 256) trains on the BPE prototype's token files (``bpe.py`` builds
them under ``--data``, if missing) with ``model.vocab_size=N``; 256 is the byte-level
built-in corpus. The other arguments are ``jaxtrain run`` overrides. The record holds the
command, the summary line's numbers (steps, val_loss, tokens/s, training and wall
seconds), ``val_bpb`` (for BPE through the whole validation split's tokens/bytes ratio, an
approximation; exact for bytes), the peak RSS and the load average before and after
(the machine is shared: a load above ~2 means the times are inflated).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bpe  # noqa: E402

DONE = re.compile(r"done: (\d+) steps \| final val loss ([0-9.]+) .*?\| ([0-9.]+)k tokens/s .*training "
                  r"(?:(\d+)m)?([0-9.]+)s, wall (?:(\d+)m)?([0-9.]+)s")


def seconds(m, s) -> float:
    return 60 * int(m or 0) + float(s)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("name")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--data", default="/tmp/recipe/data")
    p.add_argument("--records", default=str(HERE / "records.jsonl"))
    p.add_argument("--note", default="")
    p.add_argument("--library", action="store_true", help="the library's own tokenizer; exact val_bpb")
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args()
    run_dir = Path("/tmp/recipe/runs") / args.name
    shutil.rmtree(run_dir, ignore_errors=True)
    data_args, meta = [], None
    if args.library:
        pass
    elif args.vocab != 256:
        d = Path(args.data) / f"bpe{args.vocab}"
        if not (d / "meta.json").exists():
            bpe.build(args.vocab, Path(args.data))
        meta = json.loads((d / "meta.json").read_text())
        data_args = [f"data.source={d / 'train.npy'}", f"data.val_source={d / 'val.npy'}",
                     f"model.vocab_size={args.vocab}", "train.sample_prompt=755 225"]
    cmd = [sys.executable, "-m", "jaxtrain.run", f"run_dir={run_dir}", "log.progress=false", *data_args,
           *args.overrides]
    load0 = os.getloadavg()[0]
    t0 = time.time()
    proc = subprocess.run(["/usr/bin/time", "-f", "maxrss_kb %M", *cmd], capture_output=True, text=True)
    wall = time.time() - t0
    out = proc.stdout + proc.stderr
    header = next((line for line in out.splitlines() if line.startswith("run_dir")), "")
    m = DONE.search(out)
    if proc.returncode or not m:
        print(out[-3000:])
        raise SystemExit(f"run {args.name} failed (exit {proc.returncode})")
    val_loss = float(m.group(2))
    exact = re.search(r"([0-9.]+) bits/byte", m.group(0)) if args.library else None
    rec = {"name": args.name, "vocab": args.vocab, "overrides": args.overrides, "note": args.note,
           "steps": int(m.group(1)), "val_loss": val_loss,
           "val_bpb": (float(exact.group(1)) if exact else
                       round(bpe.bpb(val_loss, meta) if meta else val_loss / math.log(2), 4)),
           "bpb_exact": meta is None, "ktok_s": float(m.group(3)),
           "kbytes_s": round(float(m.group(3)) * (meta["bytes_per_token_train"] if meta else 1.0), 1),
           "train_s": seconds(m.group(4), m.group(5)), "wall_s_summary": seconds(m.group(6), m.group(7)),
           "wall_s_outside": round(wall, 1),
           "maxrss_mb": int(re.search(r"maxrss_kb (\d+)", out).group(1)) // 1024,
           "load_before": round(load0, 2), "load_after": round(os.getloadavg()[0], 2),
           "header": header, "time": time.strftime("%Y-%m-%d %H:%M"),
           "command": "PYTHONPATH=$PWD python benchmarks/recipe/run.py " + " ".join(
               [args.name] + (["--library"] if args.library else []) +
               ([f"--vocab {args.vocab}"] if args.vocab != 4096 and not args.library else []) + args.overrides)}
    with open(args.records, "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps({k: rec[k] for k in ("name", "steps", "val_loss", "val_bpb", "ktok_s", "kbytes_s", "train_s",
                                           "wall_s_outside", "maxrss_mb", "load_before", "load_after")}))


if __name__ == "__main__":
    main()
