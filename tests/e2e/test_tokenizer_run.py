"""End to end with a trained tokenizer: ``data.tokenizer=bpe:512`` on a small folder of Python files
trains, reports validation bits per byte, samples text (not token ids), saves its tokenizer, and
``jaxtrain generate RUN_DIR`` decodes with it."""

import contextlib
import io
import math
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from jaxtrain.app import cli, config, data, generate, tokenizer
from jaxtrain.app import writers as metrics

pytestmark = pytest.mark.slow  # BPE training, tokenizing and a whole run


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bpe")
    corpus = tmp / "corpus"
    corpus.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("argparse.py", "textwrap.py", "string.py", "shlex.py"):
        shutil.copy(stdlib / name, corpus / f"{name}.txt")
    overrides = [f"run_dir={tmp / 'run'}", f"data.source={corpus}", f"data.cache_dir={tmp / 'cache'}",
                 "data.tokenizer=bpe:512", "model.vocab_size=512", "train.steps=20", "train.eval_every=10",
                 "train.sample_every=10", "checkpoint.every=20", "log.progress=false", "log.tensorboard=false"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["run", "--config", "tiny", *overrides]) == 0
    return tmp / "run", config.load("tiny", overrides), out.getvalue()


def test_a_bpe_run_reports_bits_per_byte_and_samples_text(bpe_run, capsys):
    run_dir, cfg, _ = bpe_run
    rows = metrics.read_jsonl(run_dir / metrics.METRICS_FILE)
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [10, 20] and all("val_bpb" in r for r in evals)
    corpus = data.load_corpus(cfg.data)  # cached now: the same tokens the run trained on
    targets = [data.eval_batch(corpus.val, index=i, batch_size=cfg.train.batch_size,
                               block_size=cfg.model.block_size)["targets"] for i in range(cfg.train.eval_batches)]
    n_bytes = sum(int(corpus.tokenizer.token_bytes[t].sum()) for t in targets)
    n_tokens = sum(t.size for t in targets)
    for r in evals:
        assert r["val_bpb"] == pytest.approx(r["val_loss"] * n_tokens / n_bytes / math.log(2), rel=1e-12)
    assert f"{n_bytes / n_tokens:.3f} bytes/token" in bpe_run[2]  # the header reports the same evaluated bytes

    saved = tokenizer.load_run(run_dir)
    assert saved.json == corpus.tokenizer.json and saved.vocab_size <= 512
    samples = (run_dir / "samples.txt").read_text()
    body = samples.split("===== step 20 =====\n")[1]
    assert body.startswith(cfg.train.sample_prompt)
    assert not body.replace(" ", "").strip().isdigit()  # text, not a list of token ids
    assert sum(c.isprintable() or c in "\n\t" for c in body) >= 0.95 * len(body)

    capsys.readouterr()
    assert generate.main([str(run_dir), "--prompt", "def f(x):", "--tokens", "12", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("def f(x):") and len(out) > len("def f(x):") + 5
    assert not out.replace(" ", "").strip().isdigit()


def test_the_header_summary_line_and_plot_carry_the_fingerprint_and_bits_per_byte(bpe_run):
    run_dir, cfg, stdout = bpe_run
    rows = metrics.read_jsonl(run_dir / metrics.METRICS_FILE)
    corpus = data.load_corpus(cfg.data)
    header = next(line for line in stdout.splitlines() if line.startswith("run_dir "))
    assert f"{len(corpus.train):,} train / {len(corpus.val):,} val tokens" in header
    assert f"fingerprint {corpus.fingerprint.rsplit(':', 1)[1][:8]}" in header
    assert f"tokenizer {corpus.tokenizer.identity}" in header
    summary = next(line for line in stdout.splitlines() if line.startswith("done:"))
    assert f"final val loss {rows[-1]['val_loss']:.4f} nats/token" in summary
    assert f"{rows[-1]['val_bpb']:.4f} bits/byte" in summary
    assert (run_dir / "plot.png").read_bytes()[:4] == b"\x89PNG"
