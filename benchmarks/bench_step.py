"""One GPT training step, side by side: jaxtrain, plain JAX, PyTorch eager, torch.compile.

Every side runs the same model and update — vocab 256, block 256, 6 layers, 6
heads, width 384, batch 8, float32, forward + cross-entropy + backward +
clip_by_global_norm(1.0) + AdamW — on a fixed batch already in memory:

- ``jaxtrain``: ``jax.jit(jaxtrain.train_step, donate_argnums=0)`` on a
  ``TrainState`` of ``jaxtrain.models.GPT`` and ``jaxtrain.make_optimizer``.
- ``jax``: the plain hand-written JAX + optax step of ``benchmarks/minimal_jax.py``.
- ``torch``: ``benchmarks/torch_gpt.py``'s ``torch_train_step`` (the loop of the
  parity test: forward, backward, ``clip_grad_norm_``, ``AdamW.step``, ``zero_grad``).
- ``torch.compile``: the same loop on ``torch.compile(model)``.

Method. Each side lives in its own worker process (the BLAS/OpenMP threads of
one library would otherwise spin on the cores the next one needs). All workers
compile and warm up first, one at a time; then the parent runs rounds, and in
each round every side times ``--steps`` consecutive steps, in an order that
rotates from round to round, while the other workers sleep. Reported figures
are medians over rounds. The fp32 matmul peak (a ``--matmul``-sized square
matmul, best of 10) is measured each round in the JAX, PyTorch and NumPy
workers; MFU is model FLOP/s over the best of those. Model FLOPs per token are
``6 * non-embedding params + 12 * n_layer * n_embd * block`` (PaLM appendix,
:meth:`jaxtrain.models.GPT.flops_per_token`). Peak memory is each worker's peak
resident set size. Unless ``--no-extras``, the script then runs
``benchmarks/bench_loop.py`` (the whole ``jaxtrain.run`` loop against the bare
step, same model) and ``benchmarks/bench_startup.py`` (time to the first step of
``configs/tiny.yaml``, cold and warm compilation cache).

Usage::

    python benchmarks/bench_step.py                    # full run (~10 min), markdown on stdout
    python benchmarks/bench_step.py --write            # ... and refresh benchmarks/RESULTS.md
    python benchmarks/bench_step.py --sides jaxtrain,torch --rounds 9 --no-extras
    python benchmarks/bench_step.py --smoke            # tiny sizes, seconds (what CI runs)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
BEGIN, END = "<!-- bench_step: begin -->", "<!-- bench_step: end -->"
SIDES = ("jaxtrain", "jaxtrain-xla", "jax", "torch", "torch.compile")


@dataclass(frozen=True)
class Size:
    vocab: int = 256
    block: int = 256
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    batch: int = 8
    lr: float = 1e-3

    @property
    def tokens(self) -> int:
        return self.batch * self.block


FULL = Size()
SMOKE = Size(vocab=256, block=16, n_layer=1, n_head=2, n_embd=32, batch=2)


# ------------------------------------------------------------------ worker side


def _rss_mb() -> float:
    """Current resident set size of this process (MB)."""
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 1024


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def _tokens(size: Size):
    import numpy as np

    x = np.random.default_rng(0).integers(0, size.vocab, (size.batch, size.block + 1))
    return x[:, :-1], x[:, 1:]


def _jaxtrain_side(size: Size, matmul: str = "auto"):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import jaxtrain.cpu
    from jaxtrain import OptimConfig, TrainState, make_optimizer, train_step
    from jaxtrain.models import GPT, GPTConfig

    if matmul != "xla":
        jaxtrain.cpu.enable()  # what `jaxtrain run` does with backend=auto
    model = GPT(GPTConfig(vocab_size=size.vocab, block_size=size.block, n_layer=size.n_layer,
                          n_head=size.n_head, n_embd=size.n_embd), rngs=nnx.Rngs(0))
    flops = model.flops_per_token()
    tx = make_optimizer(OptimConfig(lr=size.lr, schedule="constant", warmup_steps=0, b1=0.9, b2=0.95,
                                    eps=1e-8, weight_decay=0.1, max_grad_norm=1.0))
    state = TrainState.create(model, tx, rng=0)
    x, y = _tokens(size)
    batch = {"inputs": jnp.asarray(x, jnp.int32), "targets": jnp.asarray(y, jnp.int32)}
    t0 = time.perf_counter()
    step = jax.jit(train_step, donate_argnums=0).lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    holder = [state]

    def run(n: int) -> None:
        s = holder[0]
        for _ in range(n):
            s, metrics = step(s, batch)
        jax.block_until_ready((s, metrics))
        holder[0] = s

    return run, compile_s, {"flops_per_token": flops, "matmuls": "XLA" if matmul == "xla" else jaxtrain.cpu.describe()}


def _jax_side(size: Size):
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import minimal_jax

    params = minimal_jax.init_params(jax.random.key(0), n_layer=size.n_layer, n_head=size.n_head,
                                     n_embd=size.n_embd, vocab=size.vocab, block=size.block)
    tx = minimal_jax.make_tx(size.lr)
    opt_state = tx.init(params)
    x, y = (jnp.asarray(a, jnp.int32) for a in _tokens(size))
    t0 = time.perf_counter()
    step = minimal_jax.make_step(tx, n_head=size.n_head).lower(params, opt_state, x, y).compile()
    compile_s = time.perf_counter() - t0
    holder = [(params, opt_state)]

    def run(n: int) -> None:
        p, o = holder[0]
        for _ in range(n):
            p, o, loss = step(p, o, x, y)
        jax.block_until_ready((p, o, loss))
        holder[0] = (p, o)

    return run, compile_s, {}


def _torch_side(size: Size, compiled: bool):
    import torch

    sys.path.insert(0, str(ROOT))
    from benchmarks.torch_gpt import TorchGPT, TorchGPTConfig, make_adamw, torch_train_step

    torch.manual_seed(0)
    model = TorchGPT(TorchGPTConfig(vocab_size=size.vocab, block_size=size.block, n_layer=size.n_layer,
                                    n_head=size.n_head, n_embd=size.n_embd))
    opt = make_adamw(model, lr=size.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    x, y = (torch.from_numpy(a) for a in _tokens(size))
    net = torch.compile(model) if compiled else model

    def run(n: int) -> None:
        for _ in range(n):
            torch_train_step(net, opt, x, y, max_norm=1.0)

    compile_s = 0.0
    if compiled:  # the first call compiles; a second call's time is subtracted
        t0 = time.perf_counter()
        run(1)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        run(1)
        compile_s = first - (time.perf_counter() - t0)
    return run, compile_s, {}


def _matmul_peak(lib: str, n: int, reps: int = 10) -> float:
    """Best fp32 GFLOP/s of an ``n x n @ n x n`` matmul in ``lib`` over ``reps`` calls."""
    import numpy as np

    a, b = (np.random.default_rng(i).standard_normal((n, n), dtype=np.float32) for i in (1, 2))
    if lib == "jax":
        import jax

        f, ja, jb = jax.jit(lambda u, v: u @ v), jax.device_put(a), jax.device_put(b)
        call: Callable = lambda: f(ja, jb).block_until_ready()  # noqa: E731
    elif lib == "torch":
        import torch

        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        call = lambda: ta @ tb  # noqa: E731
    else:
        call = lambda: a @ b  # noqa: E731
    call()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def _make_side(side: str, size: Size):
    match side:
        case "jaxtrain":
            return _jaxtrain_side(size)
        case "jaxtrain-xla":  # the same step without the CPU backend (backend=xla)
            return _jaxtrain_side(size, matmul="xla")
        case "jax":
            return _jax_side(size)
        case "torch" | "torch.compile":
            return _torch_side(size, compiled=side == "torch.compile")
        case "numpy":  # hosts only the NumPy (OpenBLAS) matmul peak
            return (lambda n: None), 0.0, {}
    raise ValueError(f"unknown side {side!r}; sides are {', '.join(SIDES)}")


def worker(side: str, size: Size, warmup: int, matmul_n: int) -> None:
    """Serve commands on stdin: ``run N`` (time N steps), ``peak`` (matmul GFLOP/s), ``quit``."""
    if side.startswith("jaxtrain"):
        # the CPU backend's process setting (jaxtrain.cpu.process, applied by `jaxtrain run` on CPUs)
        # that must come before XLA starts its threads; the compilation cache stays off here.
        from jaxtrain.cpu import process

        process.keep_freed_memory()
    import numpy  # noqa: F401  (the framework imports come first, so the RSS baseline includes them)

    if side.startswith("torch"):
        import torch  # noqa: F401
    elif side != "numpy":
        import flax.nnx  # noqa: F401
        import optax  # noqa: F401
    rss0 = _rss_mb()
    run, compile_s, info = _make_side(side, size)
    run(warmup)
    lib = {"jaxtrain": "jax", "jaxtrain-xla": None, "jax": None, "torch": "torch", "torch.compile": None, "numpy": "numpy"}[side]
    reply = lambda **kw: print(json.dumps(kw), flush=True)  # noqa: E731
    reply(ready=True, compile_s=compile_s, rss_after_import_mb=rss0, **info)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "run":
            t0 = time.perf_counter()
            run(int(cmd[1]))
            reply(seconds=time.perf_counter() - t0)
        elif cmd[0] == "peak":
            reply(gflops=_matmul_peak(lib, matmul_n) if lib else None)
        elif cmd[0] == "quit":
            reply(peak_rss_mb=_peak_rss_mb())
            return


# ------------------------------------------------------------------ parent side


class Worker:
    """A side's worker process, driven one JSON reply per command."""

    def __init__(self, side: str, args: argparse.Namespace):
        self.side = side
        cmd = [sys.executable, __file__, "--worker", side, "--size", json.dumps(dataclasses.asdict(args.size)),
               "--warmup", str(args.warmup), "--matmul", str(args.matmul)]
        # One device per worker, as a training run on this machine has: drop any fake-device count
        # (the tests set one), which would also keep jaxtrain's matmuls off MKL.
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
        env = dict(os.environ, XLA_FLAGS=" ".join(flags))
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark worker '{self.side}' exited with status {self.proc.wait()} "
                               "(its error is printed above)")
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> dict:
        out = self.ask("quit")
        self.proc.wait()
        return out


def measure(args: argparse.Namespace) -> dict:
    """Start the workers, run the alternating rounds, return raw results per side."""
    workers = {s: Worker(s, args) for s in args.sides}  # one at a time: compile times stay clean
    workers["numpy"] = Worker("numpy", args)
    step_s = {s: [] for s in args.sides}
    peaks: dict[str, list[float]] = {"jax": [], "torch": [], "numpy": []}
    peak_host = {"jax": "jaxtrain", "torch": "torch", "numpy": "numpy"}
    loads = [os.getloadavg()[0]]
    try:
        for r in range(args.rounds):
            order = args.sides[r % len(args.sides):] + args.sides[:r % len(args.sides)]
            for side in order:
                time.sleep(args.pause)  # let the previous side's threads go to sleep
                step_s[side].append(workers[side].ask(f"run {args.steps}")["seconds"] / args.steps)
            for lib, host in peak_host.items():
                if host in workers:
                    time.sleep(args.pause)
                    peaks[lib].append(workers[host].ask("peak")["gflops"])
            loads.append(os.getloadavg()[0])
            print(f"round {r + 1}/{args.rounds}: " + "  ".join(
                f"{s} {args.size.tokens / step_s[s][-1]:,.0f}" for s in args.sides) + " tokens/s", file=sys.stderr)
    finally:
        closing = {s: w.close() for s, w in workers.items()}
    return {"step_s": step_s, "peaks": {k: v for k, v in peaks.items() if v}, "loads": loads,
            "info": {s: {**workers[s].info, **closing[s]} for s in args.sides}}


def _flops_per_token(size: Size) -> float:
    """The PaLM estimate for the GPT (tied embeddings, biases): 6 N + 12 L C T, N without wpe."""
    C, L = size.n_embd, size.n_layer
    n = size.vocab * C + L * (12 * C * C + 13 * C) + 2 * C
    return 6 * n + 12 * L * C * size.block


def summarize(raw: dict, size: Size) -> dict:
    flops = raw["info"].get("jaxtrain", {}).get("flops_per_token") or _flops_per_token(size)
    peak = max(max(v) for v in raw["peaks"].values())
    round_peaks = [max(v) for v in zip(*raw["peaks"].values())]  # the best library in each round
    rows = {}
    for side, times in raw["step_s"].items():
        t = statistics.median(times)
        info = raw["info"][side]
        rows[side] = {"step_s": t, "tokens_per_s": size.tokens / t, "gflops": size.tokens * flops / t / 1e9,
                      "mfu": size.tokens * flops / t / 1e9 / peak,
                      # each round's step against the peak measured in that round
                      "mfu_by_round": [size.tokens * flops / r / 1e9 / p for r, p in zip(times, round_peaks)],
                      "compile_s": info["compile_s"],
                      "peak_rss_mb": info["peak_rss_mb"],
                      "rss_delta_mb": info["peak_rss_mb"] - info["rss_after_import_mb"],
                      "spread": (min(times), max(times))}
    if "torch" in raw["step_s"]:  # each round's PyTorch eager step over this side's step in that round
        for side, r in rows.items():
            r["vs_torch_by_round"] = [t / x for x, t in zip(raw["step_s"][side], raw["step_s"]["torch"])]
    return {"rows": rows, "flops_per_token": flops, "peak": peak,
            "peaks": {k: max(v) for k, v in raw["peaks"].items()}}


def paired_lines(rows: dict) -> list[str]:
    """The per-round (paired) figures: speed against PyTorch eager and MFU, median and range over rounds."""
    def stat(xs, fmt):
        return f"{fmt(statistics.median(xs))} ({fmt(min(xs))}-{fmt(max(xs))})"

    pct, times = (lambda v: f"{100 * v:.0f}%"), (lambda v: f"{v:.2f}x")
    lines = []
    if any("vs_torch_by_round" in r for r in rows.values()):
        lines += ["", "Speed against PyTorch eager paired by round (each round's PyTorch step time over the side's "
                  "step time in the same round; median, and range, over the rounds): " + "; ".join(
                      f"{side} {stat(r['vs_torch_by_round'], times)}" for side, r in rows.items()
                      if side != "torch" and "vs_torch_by_round" in r)]
    lines += ["", "MFU paired by round (each round's step against the best matmul of that same round, which "
              "the machine's load moves with it; median, and range, over the rounds): " + "; ".join(
                  f"{side} {stat(r['mfu_by_round'], pct)}" for side, r in rows.items())]
    return lines


def _machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = re.search(r"Model name:\s*(.+)", lscpu).group(1).strip()
    except (OSError, AttributeError):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} cores visible, Linux {platform.release()}"


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = [f"Python {platform.python_version()}"]
    for pkg in ("jax", "jaxlib", "flax", "optax", "numpy", "torch"):
        try:
            out.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            pass
    return ", ".join(out)


def markdown(summary: dict, raw: dict, args: argparse.Namespace, extras: dict) -> str:
    s, rows = args.size, summary["rows"]
    torch_tps = rows.get("torch", {}).get("tokens_per_s")
    lines = [
        f"Command: `{args.command}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M %Z')}  ",
        f"Machine: {_machine()}  ",
        f"Versions: {_versions()}  ",
        f"Load average (1 min) during the run: {min(raw['loads']):.1f} to {max(raw['loads']):.1f}  ",
        f"Step: vocab {s.vocab}, block {s.block}, {s.n_layer} layers, {s.n_head} heads, width {s.n_embd}, "
        f"batch {s.batch}, float32, clip 1.0 + AdamW; {args.rounds} rounds x {args.steps} steps per side, "
        f"{args.warmup} warm-up steps; {summary['flops_per_token'] / 1e6:.1f} MFLOP per token  ",
        "fp32 matmul peak, " + f"{args.matmul}^3, best of 10 per round: " + ", ".join(
            f"{k} {v:.0f} GFLOP/s" for k, v in summary["peaks"].items())
        + f"; MFU below is against the best, {summary['peak']:.0f} GFLOP/s  ",
        "Matmuls of the jaxtrain sides: " + ", ".join(
            f"{k} {v['matmuls']}" for k, v in raw["info"].items() if "matmuls" in v),
        "",
        "| side | tokens/s | vs PyTorch eager | model GFLOP/s | MFU | step ms (min-max) | compile s | peak RSS MB (+ over imports) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for side, r in rows.items():
        ratio = f"{r['tokens_per_s'] / torch_tps:.2f}x" if torch_tps else "-"
        lines.append(f"| {side} | {r['tokens_per_s']:,.0f} | {ratio} | {r['gflops']:.0f} | {100 * r['mfu']:.0f}% | "
                     f"{1e3 * r['step_s']:.0f} ({1e3 * r['spread'][0]:.0f}-{1e3 * r['spread'][1]:.0f}) | "
                     f"{r['compile_s']:.1f} | {r['peak_rss_mb']:,.0f} (+{r['rss_delta_mb']:,.0f}) |")
    lines += paired_lines(rows)
    for name, text in extras.items():
        lines += ["", f"**{name}**", "", text]
    return "\n".join(lines) + "\n"


def _run_extra(cmd: list[str], timeout: float) -> str:
    """Run another benchmark script; its stdout (or the failure) as a markdown code block."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
        text = p.stdout.strip() if p.returncode == 0 else f"failed with status {p.returncode}:\n{p.stderr[-2000:]}"
    except subprocess.TimeoutExpired:
        text = f"did not finish within {timeout:.0f} s"
    return f"`{shlex.join(cmd[1:])}`\n\n```\n{text}\n```"


def extras(args: argparse.Namespace) -> dict:
    s = args.size
    model = [f"model.vocab_size={s.vocab}", f"model.block_size={s.block}", f"model.n_layer={s.n_layer}",
             f"model.n_head={s.n_head}", f"model.n_embd={s.n_embd}", f"train.batch_size={s.batch}"]
    return {
        "Whole `jaxtrain.run` loop vs the bare step (same model and batch, alternating rounds)": _run_extra(
            [sys.executable, "benchmarks/bench_loop.py", "--steps", "40", "--rounds", "4", "--host-steps", "300", *model,
             "train.eval_every=0", "checkpoint.every=1000"], timeout=1800),
        "Start-up: process start to the first finished step of configs/tiny.yaml": _run_extra(
            [sys.executable, "benchmarks/bench_startup.py", "--repeats", "3"], timeout=900),
    }


def write_results(text: str, path: Path = RESULTS) -> None:
    """Replace the measured block of ``path`` (between the markers) with ``text``."""
    old = path.read_text() if path.exists() else f"# Benchmark results\n\n{BEGIN}\n{END}\n"
    if BEGIN not in old or END not in old:
        raise ValueError(f"{path} has no '{BEGIN}' ... '{END}' block to replace")
    head, rest = old.split(BEGIN, 1)
    path.write_text(f"{head}{BEGIN}\n{text}{END}{rest.split(END, 1)[1]}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated subset of {','.join(SIDES)}")
    p.add_argument("--rounds", type=int, default=7, help="alternating rounds")
    p.add_argument("--steps", type=int, default=5, help="timed steps per side per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling")
    p.add_argument("--matmul", type=int, default=2048, help="size of the square matmul for the fp32 peak")
    p.add_argument("--pause", type=float, default=0.5, help="seconds between sides (threads settle)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, 1 round, no extras: checks the script runs")
    p.add_argument("--no-extras", action="store_true", help="skip the loop and start-up benchmarks")
    p.add_argument("--write", nargs="?", const=str(RESULTS), default=None, metavar="PATH",
                   help=f"also write the results block into PATH (default {RESULTS.relative_to(ROOT)})")
    p.add_argument("--json", default=None, metavar="PATH", help="also dump raw and summary numbers as JSON")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--size", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.command = shlex.join(["python", "benchmarks/bench_step.py", *(sys.argv[1:] if argv is None else argv)])
    if args.size is not None:
        args.size = Size(**json.loads(args.size))
    elif args.smoke:
        args.size = SMOKE
        args.rounds, args.steps, args.warmup, args.matmul, args.pause = 1, 1, 1, 128, 0.0
        args.no_extras = True
        if "--sides" not in (sys.argv if argv is None else argv):
            args.sides = "jaxtrain,jaxtrain-xla,jax,torch"
    else:
        args.size = FULL
    if args.worker is None:
        args.sides = [s.strip() for s in args.sides.split(",") if s.strip()]
        bad = [s for s in args.sides if s not in SIDES]
        if bad or not args.sides:
            p.error(f"--sides {','.join(bad) or '(empty)'}: choose from {','.join(SIDES)}")
    return args


def main(argv=None) -> Optional[dict]:
    args = parse_args(argv)
    if args.worker is not None:
        worker(args.worker, args.size, args.warmup, args.matmul)
        return None
    raw = measure(args)
    summary = summarize(raw, args.size)
    text = markdown(summary, raw, args, {} if args.no_extras else extras(args))
    print(text)
    if args.write:
        write_results(text, Path(args.write))
    if args.json:
        Path(args.json).write_text(json.dumps({"raw": raw, "summary": summary}, indent=1))
    return summary


if __name__ == "__main__":
    main()
