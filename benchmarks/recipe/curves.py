"""Validation curves of recipe runs in bits per byte: ``python benchmarks/recipe/curves.py RUN [RUN ...]``.

Reads ``/tmp/recipe/runs/<RUN>/metrics.jsonl`` and its ``config.yaml`` (for the vocabulary,
whose BPE meta gives the tokens/bytes ratio of the validation split).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

RUNS, DATA = Path("/tmp/recipe/runs"), Path("/tmp/recipe/data")


def curve(run: str) -> list[tuple[int, float]]:
    d = RUNS / run
    vocab = next((int(line.split(":")[1]) for line in (d / "config.yaml").read_text().splitlines()
                  if line.strip().startswith("vocab_size:")), 256)
    ratio = 1.0
    if vocab != 256:
        meta = json.loads((DATA / f"bpe{vocab}" / "meta.json").read_text())
        ratio = meta["val_tokens"] / meta["val_bytes"]
    rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    return [(r["step"], r["val_loss"] * ratio / math.log(2)) for r in rows]


if __name__ == "__main__":
    for run in sys.argv[1:]:
        print(f"{run:40s}", " ".join(f"{s}:{b:.3f}" for s, b in curve(run)))
