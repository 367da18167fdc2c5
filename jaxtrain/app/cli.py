"""The ``jaxtrain`` command: ``jaxtrain run`` trains a task from a YAML config plus ``key=value``
overrides; ``jaxtrain generate`` samples a run's checkpoint; ``jaxtrain export`` writes one as a
Hugging Face model directory.

Usage::

    jaxtrain run                                     # the packaged default config (python -m jaxtrain.run)
    jaxtrain run --config tiny run_dir=runs/t train.steps=100
    jaxtrain run task=my_module run_dir=runs/mine    # your own model (jaxtrain.app.tasks)
    jaxtrain run --help                              # every key, its default and meaning
    jaxtrain generate --run-dir runs/t --prompt "def " --tokens 200
    jaxtrain run model.init_from=path/to/hf_dir ...   # fine-tune a Hugging Face GPT-2 / Llama
    jaxtrain export --run-dir runs/t --out runs/t-hf  # back to a Hugging Face directory

Exit status: 0 when training finished; 2 for a user mistake (bad config key or
value, unusable data, a batch that does not split across the devices, an
incompatible checkpoint, a run directory another live run holds, a config that
needs more memory than there is, a resume on another corpus), printed as one
``error: ...`` line on stderr with nothing written to the run directory; 75 after SIGTERM or Ctrl-C (the current
step finished and a checkpoint was saved: run the same command again to resume;
a second Ctrl-C exits at once with 130, as does a Ctrl-C before the loop
starts, e.g. while compiling); 143 after SIGTERM outside the training loop (while
loading data or compiling: nothing new to save), or during the final save (which
commits first); 1 when ``train.max_nonfinite``
consecutive steps were non-finite, no checkpoint in the run directory is
readable, or a checkpoint write failed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from jaxtrain.app.preempt import (INTERRUPTED_EXIT_CODE, TERMINATED_EXIT_CODE, Preempted, RunStopped,  # stdlib only
                                  Terminated)

if TYPE_CHECKING:
    from jaxtrain.app.config import Config

# Everything heavier (OmegaConf, NumPy, JAX) is imported inside main(), where a
# Ctrl-C or SIGTERM during the imports ends in one line, not a traceback.

# The config the bare command trains, shipped inside the package.
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"
EXIT_USER_ERROR = 2

_USAGE = """\
usage: jaxtrain run [--config NAME|FILE.yaml] [key.sub=value ...]
       (also: python -m jaxtrain.run ...)

Train a task: the built-in GPT language model (task=lm), or your own module
(task=my_module: it defines model(rngs), loss(model, batch, rng) and
batch(step, batch_size, seed); see docs/cli.md). Without --config, {default} is used.
--config takes a packaged config by name ({names}) or a YAML file.
Overrides are dotted keys applied after the file, e.g. train.steps=100 optim.lr=1e-3.

Config keys (name = built-in default  meaning; the config file, then the overrides, replace them):
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # e.g. "--config" without a file: a ConfigError line, not argparse's usage block
        from jaxtrain.app.config import ConfigError

        raise ConfigError(f"{message}; see jaxtrain run --help")


def _stop_outside_loop(signum: int, frame=None) -> None:
    """SIGINT / SIGTERM outside the training loop (which handles them itself): one line, then exit at once.

    Nothing is left to save here (checkpoints are written only inside the loop),
    so the handler ends the process itself rather than raising: an exception
    raised while Python runs a garbage-collection callback, as JAX registers
    one, would be printed and ignored, and the run would go on. ``os._exit``
    also skips the interpreter shutdown, which crashes (SIGSEGV) when an XLA
    compilation was cut short and left native threads behind.
    """
    name, code = (("SIGTERM", TERMINATED_EXIT_CODE) if signum == signal.SIGTERM
                  else ("interrupted", INTERRUPTED_EXIT_CODE))
    print(f"{name}: stopped outside the training loop; committed checkpoints are kept, "
          "run the same command again to resume", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="jaxtrain run", add_help=False)
    p.add_argument("--config", default=None, help="a packaged config's name or a YAML file")
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    return p


def usage() -> str:
    """The ``--help`` text: how to call it, then every config key with default and meaning."""
    from jaxtrain.app import config as config_lib

    return (_USAGE.format(default=DEFAULT_CONFIG, names=", ".join(config_lib.config_names()))
            + config_lib.describe())


def load_config(argv: Sequence[str]) -> Config:
    """Parse ``argv`` (without the program name) into a validated :class:`Config`."""
    from jaxtrain.app import config as config_lib
    from jaxtrain.app.config import ConfigError

    args, unknown = _parser().parse_known_args(list(argv))
    flags = [a for a in unknown if a.startswith("-")]
    if flags:
        raise ConfigError(f"unknown option '{flags[0]}'; options are --config NAME|FILE and --help, "
                          "config keys are given as key=value")
    if args.config is not None and not args.config.strip():
        raise ConfigError("--config got an empty value; give a config name or a YAML file, e.g. --config tiny")
    path = args.config if args.config is not None else DEFAULT_CONFIG  # package data: always installed
    return config_lib.load(path, args.overrides + unknown)


def prepare_backend(cfg: Config) -> None:
    """Process-wide settings that must precede JAX's first device query (compilation cache, and on
    CPU-only machines the CPU backend's ``malloc`` setting).

    Runs before :func:`jaxtrain.parallel.initialize`; nothing here may create arrays.
    """
    from jaxtrain.app import compile_cache

    if cfg.backend != "xla" and _cpu_only():
        try:
            from jaxtrain.cpu import process
        except ImportError:
            pass
        else:
            process.configure()  # glibc malloc keeps XLA:CPU's scratch memory (JAXTRAIN_MALLOC=off)
            import jaxtrain.cpu

            # a first run's kernel builds (~13 s) overlap the corpus and tokenizer work before compilation
            jaxtrain.cpu.prebuild(bfloat16=cfg.train.matmul_precision == "bfloat16")
    compile_cache.configure()  # persistent compilation cache (JAXTRAIN_COMPILATION_CACHE=off disables it)


def _cpu_only() -> bool:
    """Whether JAX will run on CPUs alone, decided without initialising it: ``JAX_PLATFORMS`` says
    ``cpu``, or no accelerator plugin is installed."""
    import importlib.util

    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms.split(",")[0] == "cpu"
    return not any(importlib.util.find_spec(name) for name in
                   ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin", "libtpu"))


_COMMANDS = """\
usage: jaxtrain COMMAND [options]

commands:
  run        train a task from a config: jaxtrain run [--config NAME|FILE.yaml] [key=value ...]
  generate   sample from a run directory: jaxtrain generate --run-dir DIR [--prompt TEXT] [--tokens N] ...
  export     write a run as a Hugging Face model directory: jaxtrain export --run-dir DIR --out HF_DIR

`jaxtrain run --help` lists every config key; `jaxtrain generate --help` and `jaxtrain export --help` their options.
`python -m jaxtrain.run` is `jaxtrain run`; `jaxtrain key=value ...` (no command) is too.
"""


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``jaxtrain`` command (``run`` / ``generate``); returns the exit status.

    Called without ``argv`` (as the process's entry point), a failed run ends the
    process at once after its error line (:func:`_leave_promptly`).
    """
    entry = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "generate":
        from jaxtrain.app import generate

        return generate.main(argv[1:])
    if argv and argv[0] == "export":
        from jaxtrain.app import pretrained

        return pretrained.main(argv[1:])
    if argv and argv[0] == "run":
        return _leave_promptly(run(argv[1:])) if entry else run(argv[1:])
    if argv and argv[0] in ("-h", "--help", "help"):
        print(_COMMANDS)
        return 0
    if argv and not argv[0].startswith("-") and "=" not in argv[0]:
        print(f"error: unknown command '{argv[0]}'; the commands are run, generate and export (jaxtrain --help)",
              file=sys.stderr)
        return EXIT_USER_ERROR
    return _leave_promptly(run(argv)) if entry else run(argv)


def _leave_promptly(code: int) -> int:
    """After a failed run, end the process now, without the interpreter's shutdown.

    A failed checkpoint write leaves Orbax's writer threads waiting (up to 300 s) for
    a signal from the thread that failed, and the interpreter would wait for them
    before exiting; a failed read leaves TensorStore callbacks that print "Event
    loop is closed" tracebacks while it shuts down. The error line is out and every
    file is closed by then (the run's ``finally`` blocks ran), so ``os._exit``
    loses nothing. Only for the process's entry point: in-process callers (tests,
    notebooks) get the status back.
    """
    if code != 0:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def run(argv: Optional[Sequence[str]] = None) -> int:
    """``jaxtrain run`` (and ``python -m jaxtrain.run``): train; returns the exit status.

    Without ``argv`` (the process's entry point), a failed run ends the process
    at once after its error line (:func:`_leave_promptly`).
    """
    if argv is None:
        return _leave_promptly(run(sys.argv[1:]))
    argv = list(argv)
    if "-h" in argv or "--help" in argv:
        print(usage())
        return 0
    main_thread = _in_main_thread()  # only the main thread can install signal handlers
    stops = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, _stop_outside_loop) for sig in stops} if main_thread else {}
    try:
        return _run(argv)
    except KeyboardInterrupt:  # raised by code rather than by the handler (e.g. a library re-raising it)
        _stop_outside_loop(signal.SIGINT)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class _DropCheckpointWriterEchoes(logging.Filter):
    """Drops what Orbax's background writer logs about a failed save (absl errors, asyncio's
    "exception was never retrieved"): the failure itself reaches the loop, which reports it in
    one line (:func:`jaxtrain.checkpoint.save`, ``manager.close``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        if record.name == "asyncio":
            return "exception was never retrieved" not in record.getMessage()
        return not record.exc_info  # absl (Orbax's logger): an exception with its traceback


@contextlib.contextmanager
def _one_line_errors():
    """While the CLI runs: a failed checkpoint write (a full disk, a lost mount) ends in the loop's
    one ``error:`` line instead of hundreds of lines of tracebacks from Orbax's writer threads."""
    quiet = _DropCheckpointWriterEchoes()
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    hook = sys.unraisablehook

    def unraisable(u):  # TensorStore callbacks reaching Orbax's event loop after it closed
        if not (isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"):
            hook(u)

    for lg in loggers:
        lg.addFilter(quiet)
    sys.unraisablehook = unraisable
    try:
        yield
    finally:
        with warnings.catch_warnings():  # their unfinished coroutines: "... was never awaited"
            warnings.simplefilter("ignore", RuntimeWarning)
            gc.collect()  # failed writer tasks are collected (and would log) now, while the filter is on
        sys.unraisablehook = hook
        for lg in loggers:
            lg.removeFilter(quiet)


def _run(argv: Sequence[str]) -> int:
    with _one_line_errors():
        return _run_quietly(argv)


def _run_quietly(argv: Sequence[str]) -> int:
    from jaxtrain.app.config import ConfigError
    from jaxtrain.app.data import DataError

    try:
        cfg = load_config(argv)
        prepare_backend(cfg)
        from jaxtrain import parallel

        parallel.initialize(cfg.parallel)
        from jaxtrain.app import loop  # imported late: the process settings above come first

        loop.train(cfg)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except (Preempted, Terminated) as e:  # SIGTERM / Ctrl-C in the loop: a checkpoint was saved first
        print(str(e), file=sys.stderr)
        return e.exit_code
    except RunStopped as e:  # non-finite steps, unreadable checkpoints
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
