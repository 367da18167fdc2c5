"""Build the notebooks from their sources, and optionally run them.

Each notebook is written as a plain Python file in ``notebooks/src/`` in the
"percent" format: a line ``# %%`` starts a code cell, ``# %% [markdown]`` a
Markdown cell whose lines are comments. Those files are what one edits and
reviews; the ``.ipynb`` next to this script are generated from them (a test
checks that they agree).

    python notebooks/build.py            # regenerate the .ipynb (no outputs)
    python notebooks/build.py --execute  # ... and run them, keeping the outputs
                                         #     and refreshing the README figures in docs/
    python notebooks/build.py --execute 01_pytorch_to_jax   # only this one
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
SRC = HERE / "src"
DOCS = HERE.parent / "docs"
KERNEL = {"name": "python3", "display_name": "Python 3", "language": "python"}


def parse(text: str) -> list[tuple[str, str]]:
    """``[(kind, source), ...]`` with kind ``"code"`` or ``"markdown"`` from a percent-format file."""
    cells: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("# %%"):
            cells.append(("markdown" if "[markdown]" in line else "code", []))
        elif cells:
            cells[-1][1].append(line)
        elif line.strip():
            raise ValueError(f"text before the first '# %%' cell marker: {line!r}")
    out = []
    for kind, lines in cells:
        if kind == "markdown":
            lines = [l[2:] if l.startswith("# ") else l.lstrip("#") for l in lines]
        source = "\n".join(lines).strip("\n")
        if source:
            out.append((kind, source))
    return out


def to_notebook(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = KERNEL
    nb.metadata["language_info"] = {"name": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell(s) if kind == "markdown" else nbformat.v4.new_code_cell(s)
                for kind, s in cells]
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i:02d}"  # stable ids: regenerating gives the same file
    return nb


def execute(nb: nbformat.NotebookNode, timeout: int = 600) -> float:
    """Run ``nb`` in place (working directory ``notebooks/``); returns the seconds it took."""
    from nbclient import NotebookClient

    t0 = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name=KERNEL["name"],
                   resources={"metadata": {"path": str(HERE)}}).execute()
    return time.perf_counter() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--execute", action="store_true", help="run each notebook and keep its outputs")
    ap.add_argument("names", nargs="*", help="notebooks to build (default: all in notebooks/src)")
    args = ap.parse_args(argv)
    sources = [SRC / f"{name}.py" for name in args.names] or sorted(SRC.glob("*.py"))
    missing = [str(s.relative_to(HERE.parent)) for s in sources if not s.is_file()]
    if missing:
        sys.exit(f"no notebook source {', '.join(missing)}; available: "
                 f"{', '.join(s.stem for s in sorted(SRC.glob('*.py')))}")
    if args.execute:
        DOCS.mkdir(exist_ok=True)
        os.environ["JAXTRAIN_DOCS"] = str(DOCS)  # the kernel inherits it: figures for the README
    for src in sources:
        nb = to_notebook(parse(src.read_text()))
        note = ""
        if args.execute:
            note = f" (executed in {execute(nb):.0f} s)"
        target = HERE / f"{src.stem}.ipynb"
        nbformat.write(nb, target)
        print(f"wrote {target.relative_to(HERE.parent)}{note}", file=sys.stderr)


if __name__ == "__main__":
    main()
