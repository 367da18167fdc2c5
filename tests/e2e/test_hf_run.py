"""Hugging Face directories through the command line: ``jaxtrain run model.init_from=DIR`` fine-tunes a
GPT-2 or a Llama saved by ``transformers``, and ``jaxtrain export`` writes the run back as a directory
that ``transformers`` loads with the same logits as the run's own model."""

import contextlib
import io
import json
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from jaxtrain.app import checkpoint, cli, config, tokenizer
from jaxtrain.app import writers as metrics

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow  # transformers models, BPE training and whole runs

VOCAB = 320  # the tokenizer's size, which the HF models are built with


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small folder of Python text and a BPE of VOCAB tokens trained on it (saved as tokenizer.json)."""
    tmp = tmp_path_factory.mktemp("hf-corpus")
    folder = tmp / "text"
    folder.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("textwrap.py", "shlex.py", "string.py"):
        shutil.copy(stdlib / name, folder / f"{name}.txt")
    tok = tokenizer.train_bpe([p.read_text() for p in sorted(folder.iterdir())], VOCAB, progress=False)
    tok.save(tmp / "tokenizer.json")
    assert tok.vocab_size == VOCAB
    return folder, tmp / "tokenizer.json"


def _hf_dir(tmp: Path, kind: str, tokenizer_json: Path) -> Path:
    torch.manual_seed(0)
    if kind == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=128, n_embd=48, n_layer=2, n_head=3, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=5000.0,
            tie_word_embeddings=False))
    out = tmp / f"hf-{kind}"
    model.save_pretrained(out)
    shutil.copy(tokenizer_json, out / "tokenizer.json")
    return out


def _run(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(args)
    return code, out.getvalue(), err.getvalue()


def _overrides(tmp: Path, hf_dir: Path, folder: Path, **extra) -> list[str]:
    base = {"run_dir": tmp / "run", "model.init_from": hf_dir, "data.source": folder,
            "data.cache_dir": tmp / "cache", "train.steps": 4, "train.batch_size": 8, "train.eval_every": 4,
            "train.eval_batches": 1, "train.sample_every": 0, "train.sample_tokens": 8, "model.block_size": 32,
            "checkpoint.every": 4, "log.progress": "false", "log.tensorboard": "false", "log.plot": "false"}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _logits_hf(directory: Path, tokens: np.ndarray) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_fine_tune_from_a_hugging_face_directory_and_export_back(kind, corpus, tmp_path):
    folder, tokenizer_json = corpus
    hf_dir = _hf_dir(tmp_path, kind, tokenizer_json)
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=(2, 24))
    before = _logits_hf(hf_dir, tokens)

    # a learning rate too small to move a float32 weight: the run's params are the directory's
    code, out, err = _run(["run", "--config", "tiny", *_overrides(tmp_path, hf_dir, folder, **{"optim.lr": 1e-30})])
    assert code == 0, err
    arch = "Llama" if kind == "llama" else "GPT"
    assert f"{arch} " in out and f"from '{hf_dir}'" in out  # the header names the architecture and the source
    cfg = config.load(tmp_path / "run" / "config.yaml")
    assert cfg.model.arch == ("llama" if kind == "llama" else "gpt") and cfg.model.vocab_size == VOCAB
    assert cfg.data.tokenizer == str(hf_dir / "tokenizer.json")  # the directory brought its tokenizer
    state, _ = checkpoint.load_run(tmp_path / "run")
    mine = np.asarray(state.model()(tokens))
    np.testing.assert_allclose(mine, before, rtol=0, atol=1e-4 * np.abs(before).max())

    code, out, err = _run(["export", "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "export")])
    assert code == 0, err
    assert (tmp_path / "export" / "tokenizer.json").read_text() == tokenizer_json.read_text()
    np.testing.assert_allclose(_logits_hf(tmp_path / "export", tokens), before, rtol=0,
                               atol=1e-4 * np.abs(before).max())

    # a real fine-tune: the weights move, and the export carries the moved weights
    code, out, err = _run(["run", "--config", "tiny", *_overrides(tmp_path, hf_dir, folder, **{
        "run_dir": tmp_path / "tuned", "optim.lr": 1e-2, "optim.warmup_steps": 0})])
    assert code == 0, err
    rows = [r for r in metrics.read_jsonl(tmp_path / "tuned" / metrics.METRICS_FILE) if "val_bpb" in r]
    assert rows and np.isfinite(rows[-1]["val_bpb"])
    state, _ = checkpoint.load_run(tmp_path / "tuned")
    tuned = np.asarray(state.model()(tokens))
    assert np.abs(tuned - before).max() > 1e-2
    assert _run(["export", "--run-dir", str(tmp_path / "tuned"), "--out", str(tmp_path / "tuned-hf")])[0] == 0
    exported = _logits_hf(tmp_path / "tuned-hf", tokens)
    assert np.abs(exported - tuned).max() <= 1e-4 * np.abs(tuned).max()
    saved = json.loads((tmp_path / "tuned-hf" / "config.json").read_text())
    assert saved["model_type"] == kind and saved["vocab_size"] == VOCAB


def test_init_from_mistakes_are_one_line(corpus, tmp_path):
    folder, tokenizer_json = corpus
    hf_dir = _hf_dir(tmp_path, "gpt2", tokenizer_json)
    cases = [
        ({"model.init_from": tmp_path / "nope"}, "model.init_from="),
        ({"model.block_size": 512}, "model.block_size=512 exceeds the checkpoint's 128 positions"),
    ]
    for extra, message in cases:
        code, _, err = _run(["run", "--config", "tiny", *_overrides(tmp_path, hf_dir, folder, **extra)])
        assert code == 2 and message in err, err
        assert len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "run").exists()  # nothing written
    (hf_dir / "model.safetensors").rename(tmp_path / "moved.safetensors")
    code, _, err = _run(["run", "--config", "tiny", *_overrides(tmp_path, hf_dir, folder)])
    assert code == 2 and "model.init_from=" in err and "safetensors" in err, err


def test_export_refuses_to_overwrite_and_other_tasks(tmp_path):
    run_dir = tmp_path / "run"
    code, _, err = _run(["run", "--config", "tiny", f"run_dir={run_dir}", "train.steps=2", "train.eval_every=0",
                         "train.sample_tokens=4", "checkpoint.every=2", "log.progress=false",
                         "log.tensorboard=false", "log.plot=false"])
    assert code == 0, err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep me")
    code, _, err = _run(["export", "--run-dir", str(run_dir), "--out", str(tmp_path / "taken")])
    assert code == 2 and "exists and is not an empty directory" in err
    assert (tmp_path / "taken" / "mine.txt").read_text() == "keep me"
    code, _, err = _run(["export", "--run-dir", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert code == 2 and "missing" in err and len(err.strip().splitlines()) == 1
    # a byte-level GPT exports (no tokenizer.json: bytes have none), and transformers loads it
    assert _run(["export", "--run-dir", str(run_dir), "--out", str(tmp_path / "bytes-hf")])[0] == 0
    assert not (tmp_path / "bytes-hf" / "tokenizer.json").exists()
    tokens = np.arange(16)[None] % 256
    state, _ = checkpoint.load_run(run_dir)
    np.testing.assert_allclose(_logits_hf(tmp_path / "bytes-hf", tokens), np.asarray(state.model()(tokens)),
                               rtol=0, atol=1e-4)
