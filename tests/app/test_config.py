"""Config loading, overrides and errors, and ``jaxtrain run --help`` (no training here)."""

from pathlib import Path

import pytest

from jaxtrain.app import config
from jaxtrain.app import cli as run
from jaxtrain.app.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "jaxtrain" / "configs").glob("*.yaml"))


@pytest.fixture
def gpt2_tokenizer_here(tmp_path, monkeypatch):
    """A stand-in for GPT-2's tokenizer.json where gpt2-124m.yaml looks for it (gpt2/ in the working directory)."""
    from jaxtrain.app import tokenizer

    (tmp_path / "gpt2").mkdir()
    tokenizer.train_bpe(["def f(x):\n    return x\n"] * 20, 300, progress=False).save(tmp_path / "gpt2/tokenizer.json")
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load_and_only_set_known_keys(path, gpt2_tokenizer_here):
    cfg = config.load(path)
    assert isinstance(cfg, config.Config)
    # A file that sets a key to the default is fine; a typo would have raised above.
    assert cfg.run_dir.startswith("runs/")


def test_shipped_configs_have_expected_shapes(gpt2_tokenizer_here):
    tiny = config.load(ROOT / "jaxtrain/configs/tiny.yaml")
    assert (tiny.model.n_layer, tiny.model.n_embd, tiny.model.block_size, tiny.train.batch_size) == (2, 64, 64, 8)
    assert tiny.model.vocab_size == 256  # null: the byte tokenizer's
    gpt2 = config.load(ROOT / "jaxtrain/configs/gpt2-124m.yaml")
    m = gpt2.model
    assert (m.arch, m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size, m.activation, m.dtype, m.attention) == (
        "gpt", 12, 12, 768, 1024, 50304, "gelu_tanh", "bfloat16", "cudnn")
    assert gpt2.train.batch_size % gpt2.train.grad_accum == 0
    llama = config.load("llama-125m")
    core = config.model_config(llama.model)
    assert (type(core).__name__, core.n_layer, core.n_head, core.kv_heads, core.n_embd, core.vocab_size) == (
        "LlamaConfig", 12, 12, 4, 768, 32000)
    from jaxtrain.models import Llama
    from flax import nnx

    n = nnx.eval_shape(lambda: Llama(core, rngs=nnx.Rngs(0))).num_params(non_embedding=False)
    assert 120e6 < n < 130e6, n  # "about 125M parameters", as the file says


def test_gpt2_config_names_the_tokenizer_it_needs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(config.ConfigError, match=r"data.tokenizer='gpt2/tokenizer.json': no such file"):
        config.load("gpt2-124m")


def test_model_keys_of_one_architecture_are_refused_for_the_other():
    with pytest.raises(config.ConfigError, match=r"model.n_kv_head=2: applies to model.arch=llama only"):
        config.load("tiny", ["model.n_kv_head=2"])
    with pytest.raises(config.ConfigError, match=r"model.activation='gelu_tanh': applies to model.arch=gpt only"):
        config.load("tiny", ["model.arch=llama", "model.activation=gelu_tanh"])
    with pytest.raises(config.ConfigError, match=r"model.n_kv_head=3: must divide model.n_head=4"):
        config.load("tiny", ["model.arch=llama", "model.n_kv_head=3"])
    with pytest.raises(config.ConfigError, match=r"model.arch='mamba': must be one of gpt, llama"):
        config.load("tiny", ["model.arch=mamba"])
    llama = config.model_config(config.load("tiny", ["model.arch=llama", "model.n_kv_head=1",
                                                     "model.rope_theta=500000"]).model)
    assert (llama.kv_heads, llama.rope_theta, llama.tie_embeddings) == (1, 500000.0, True)
    gpt = config.model_config(config.load("tiny").model)
    assert (gpt.bias, gpt.activation) == (True, "gelu")  # null: today's nanoGPT GPT


def test_vocab_size_follows_the_tokenizer_unless_given():
    assert config.load("tiny", ["data.tokenizer=bpe:1000"]).model.vocab_size == 1000
    assert config.load("tiny", ["data.tokenizer=bpe:1000", "model.vocab_size=1024"]).model.vocab_size == 1024


def test_no_arguments_use_default_yaml():
    assert run.DEFAULT_CONFIG.is_file()
    assert run.load_config([]) == config.load(run.DEFAULT_CONFIG)


def test_overrides_apply_after_file_with_types():
    cfg = run.load_config(["--config", str(ROOT / "jaxtrain/configs/tiny.yaml"), "train.steps=7", "optim.lr=1e-4",
                           "model.bias=false", "run_dir=/tmp/x", "log.peak_flops=1e12"])
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.optim.lr == pytest.approx(1e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.model.bias is False and cfg.run_dir == "/tmp/x" and cfg.log.peak_flops == 1e12
    assert cfg.model.n_layer == 2  # from the file, untouched


def test_config_is_frozen():
    cfg = config.load(None)
    with pytest.raises(Exception):
        cfg.train.steps = 3  # type: ignore[misc]


@pytest.mark.parametrize("override, needles", [
    ("optim.lrr=1", ["'optim.lrr'", "did you mean 'optim.lr'"]),
    ("lr=0.1", ["'lr'", "did you mean 'optim.lr'"]),
    ("train.stepz=3", ["'train.stepz'", "'train.steps'"]),
    ("train.steps=abc", ["'train.steps'", "'abc'", "Integer"]),
    ("model.bias=maybe", ["'model.bias'", "'maybe'"]),
    ("model.dtype=float64", ["model.dtype='float64'", "float32, bfloat16"]),
    ("model.attention=flash", ["model.attention='flash'", "xla, cudnn"]),
    ("train.steps=0", ["train.steps=0", "positive"]),
    ("model.n_embd=66", ["model.n_embd=66", "model.n_head=4"]),
    ("train.batch_size=10", ["train.batch_size=10", "train.grad_accum"]),
    ("log.peak_flops=-1", ["log.peak_flops=-1", "> 0"]),
    ("train.sample_top_k=-3", ["train.sample_top_k=-3", ">= 0"]),
    ("train.sample_temperature=.inf", ["train.sample_temperature=inf", "finite number >= 0"]),
    ("train.sample_temperature=nan", ["train.sample_temperature=nan", "finite number >= 0"]),
    ("log.peak_flops=nan", ["log.peak_flops=nan", "finite number > 0"]),
    ("train.steps", ["'train.steps'", "key=value"]),
    ("run_dir=", ["run_dir=''", "must not be empty"]),
    ("data.source=", ["data.source=''", "must not be empty"]),
    ("data.val_source=''", ["data.val_source=''", "must not be empty"]),
    # Values that would train on silently (NaN parameters, a schedule that never decays) or crash later
    ("optim.lr=nan", ["optim.lr=nan", "finite number > 0"]),
    ("optim.eps=-1", ["optim.eps=-1", "> 0"]),
    ("optim.eps=0", ["optim.eps=0", "> 0"]),
    ("optim.b2=1.0", ["optim.b2=1.0", "[0, 1)"]),
    ("optim.max_grad_norm=nan", ["optim.max_grad_norm=nan", ">= 0"]),
    ("optim.weight_decay=inf", ["optim.weight_decay=inf", "finite"]),
    ("optim.warmup_init=-2", ["optim.warmup_init=-2", "[0, 1]"]),
    ("optim.wsd_decay_fraction=7", ["optim.wsd_decay_fraction=7", "(0, 1]"]),
    ("optim.warmup_steps=-1", ["optim.warmup_steps=-1", ">= 0"]),
    ("optim.decay_steps=0", ["optim.decay_steps=0", "positive integer or null"]),
    ("train.seed=9223372036854775808", ["train.seed=9223372036854775808", "[0, 2**32)"]),
    ("train.seed=-1", ["train.seed=-1", "[0, 2**32)"]),
])
def test_bad_overrides_raise_one_line_naming_the_key(override, needles):
    args = ["--config", str(ROOT / "jaxtrain/configs/tiny.yaml"), override]
    if override.startswith("train.batch_size"):
        args.insert(-1, "train.grad_accum=4")
    with pytest.raises(ConfigError) as e:
        run.load_config(args)
    msg = str(e.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_bad_yaml_files(tmp_path):
    (tmp_path / "typo.yaml").write_text("model:\n  n_layers: 3\n")
    with pytest.raises(ConfigError, match=r"'model.n_layers'.*typo.yaml.*did you mean 'model.n_layer'"):
        config.load(tmp_path / "typo.yaml")
    (tmp_path / "broken.yaml").write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(tmp_path / "broken.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        run.load_config(["--config", str(tmp_path / "missing.yaml")])


def test_unknown_option_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown option '--stepz'"):
        run.load_config(["--stepz", "3"])


def test_resolved_config_round_trips_through_yaml(tmp_path, gpt2_tokenizer_here):
    cfg = run.load_config(["--config", str(ROOT / "jaxtrain/configs/gpt2-124m.yaml"), "train.steps=3"])
    (tmp_path / "config.yaml").write_text(config.to_yaml(cfg))
    assert config.load(tmp_path / "config.yaml") == cfg


def test_help_lists_every_key_with_its_default(capsys):
    assert run.run(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: jaxtrain run")
    for key in config.all_keys():
        line = next((l for l in out.splitlines() if l.split() and l.split()[0] == key), None)
        assert line is not None, key
    assert "peak FLOP/s" in out  # meanings are shown, not only names


def test_the_bare_command_trains_the_packaged_default_not_the_dataclass_defaults():
    # default.yaml ships inside the package (tests/e2e/test_packaging.py); the dataclass
    # defaults are the base every config builds on (tiny: a byte-level GPT), not the default run.
    bare = run.load_config([])
    assert (bare.model.arch, bare.data.tokenizer, bare.train.steps) == ("llama", "bpe:4096", 2300)
    assert (bare.train.matmul_precision, bare.optim.schedule, bare.optim.wsd_decay_fraction) == ("bfloat16", "wsd", 1.0)
    base = config.load(None)
    assert (base.model.arch, base.data.tokenizer, base.train.matmul_precision) == ("gpt", "bytes", "default")


def test_an_empty_text_override_is_the_empty_string_and_an_optional_one_is_none():
    cfg = config.load(None, ["train.sample_prompt=", "data.val_source=", "data.glob=*.md"])
    assert cfg.train.sample_prompt == "" and cfg.data.val_source is None and cfg.data.glob == "*.md"


def test_text_overrides_are_taken_as_written_and_a_bad_interpolation_names_its_key(tmp_path):
    cfg = config.load("configs/tiny.yaml", ['train.sample_prompt=print(f"${x}")', "run_dir=/tmp/a${b}"])
    assert cfg.train.sample_prompt == 'print(f"${x}")' and cfg.run_dir == "/tmp/a${b}"
    (tmp_path / "c.yaml").write_text("train:\n  sample_prompt: ${nope}\n  steps: ${train.log_every}\n")
    assert config.load(tmp_path / "c.yaml", ["train.sample_prompt=ok"]).train.steps == 10  # YAML interpolates
    with pytest.raises(config.ConfigError, match=r"'train.sample_prompt' in the config .*'nope' not found.*literal"):
        config.load(tmp_path / "c.yaml")


def test_packaged_configs_load_by_name_and_by_path():
    assert "tiny" in config.config_names() and "default" in config.config_names()
    by_name = config.load("tiny")
    assert by_name == config.load(ROOT / "jaxtrain" / "configs" / "tiny.yaml") == config.load("tiny.yaml")
    with pytest.raises(ConfigError, match="'nope' does not exist; give a YAML file or one of the packaged configs: .*tiny"):
        config.load("nope")


def test_the_jaxtrain_command_dispatches_and_names_an_unknown_command(capsys):
    assert run.main(["--help"]) == 0
    assert "run " in capsys.readouterr().out
    assert run.main(["trian"]) == run.EXIT_USER_ERROR
    assert "unknown command 'trian'; the commands are run, generate and export" in capsys.readouterr().err
    assert run.main(["run", "--help"]) == 0 and capsys.readouterr().out.startswith("usage: jaxtrain run")


def test_a_replaced_key_says_what_to_write_instead():
    with pytest.raises(ConfigError, match="'model.matmul' in command-line overrides was replaced: .*backend=xla"):
        config.load("tiny", ["model.matmul=xla"])
    assert config.load("tiny", ["backend=xla"]).backend == "xla"
    with pytest.raises(ConfigError, match="backend='gpu': must be one of auto, cpu, xla"):
        config.load("tiny", ["backend=gpu"])


def test_matmul_precision_takes_jax_names_and_refuses_others_naming_the_choices():
    assert config.load(None, ["train.matmul_precision=bfloat16"]).train.matmul_precision == "bfloat16"
    with pytest.raises(config.ConfigError, match="train.matmul_precision='tf32': must be one of default, float32, "
                                                 "bfloat16"):
        config.load(None, ["train.matmul_precision=tf32"])
