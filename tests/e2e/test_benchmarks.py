"""The benchmark scripts run end to end at tiny sizes (no timing assertions: only that they work).

Also the persistent compilation cache setting (``jaxtrain.perf``) and the
FLOP count the step benchmark reports.
"""

import json
import math
from pathlib import Path

import pytest
from benchmark_modules import load_benchmark

pytestmark = pytest.mark.slow  # whole runs in subprocesses: the full suite, not the fast tier

ROOT = Path(__file__).resolve().parents[2]


bench_step = load_benchmark("bench_step")


def test_bench_step_smoke_measures_every_side_and_writes_results(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text(f"# Results\n\nnotes before\n\n{bench_step.BEGIN}\nold numbers\n{bench_step.END}\n\nnotes after\n")
    summary = bench_step.main(["--smoke", "--write", str(results), "--json", str(tmp_path / "raw.json")])
    rows = summary["rows"]
    assert set(rows) == {"jaxtrain", "jaxtrain-xla", "jax", "torch"}
    info = json.loads((tmp_path / "raw.json").read_text())["raw"]["info"]
    # the workers run on one device, so the default jaxtrain side takes MKL's matmuls
    assert (info["jaxtrain"]["matmuls"], info["jaxtrain-xla"]["matmuls"]) == ("MKL", "XLA")
    for side, r in rows.items():
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"], (side, r)
        assert r["peak_rss_mb"] >= r["rss_delta_mb"] > 0, (side, r)
    assert summary["peak"] == max(summary["peaks"].values()) > 0
    text = results.read_text()
    assert "old numbers" not in text and text.count(bench_step.BEGIN) == 1
    assert text.startswith("# Results\n\nnotes before\n") and text.endswith("\n\nnotes after\n")
    assert "| jaxtrain |" in text and "vs PyTorch eager" in text
    assert json.loads((tmp_path / "raw.json").read_text())["summary"]["rows"].keys() == rows.keys()


def test_write_results_refuses_a_file_without_markers(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# hand-written only\n")
    with pytest.raises(ValueError, match="no '<!-- bench_step: begin -->'"):
        bench_step.write_results("x\n", path)
    assert path.read_text() == "# hand-written only\n"


@pytest.mark.parametrize("size", [bench_step.SMOKE, bench_step.FULL])
def test_reported_flops_per_token_match_the_model(size):
    from flax import nnx

    from jaxtrain.models import GPT, GPTConfig

    cfg = GPTConfig(vocab_size=size.vocab, block_size=size.block, n_layer=size.n_layer, n_head=size.n_head,
                    n_embd=size.n_embd)
    assert bench_step._flops_per_token(size) == GPT(cfg, rngs=nnx.Rngs(0)).flops_per_token()


def test_unknown_side_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit):
        bench_step.parse_args(["--sides", "jaxtrain,tensorflow"])
    assert "--sides tensorflow: choose from jaxtrain,jaxtrain-xla,jax,torch,torch.compile" in capsys.readouterr().err


def test_bench_gpu_smoke_runs_on_cpu():
    out = load_benchmark("bench_gpu").main(["--smoke"])
    assert out["tokens_per_s"] > 0 and out["compute"] == "bfloat16" and out["attention"] == "xla"
    assert 0 < out["mfu_vs_measured_matmul"] and math.isfinite(out["loss"]) and out["loss"] < 6.0  # ln(256) = 5.5


def test_first_step_of_a_cold_start_fills_the_compilation_cache(tmp_path):
    cache = tmp_path / "cache"
    seconds = load_benchmark("bench_startup").time_to_first_step("configs/tiny.yaml", tmp_path / "run", cache)
    assert seconds > 0
    assert any(p.name.startswith("jit_") for p in cache.iterdir()), sorted(p.name for p in cache.iterdir())
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_compilation_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    from jaxtrain.app import compile_cache as perf

    monkeypatch.setenv(perf.CACHE_ENV, str(tmp_path / "c"))
    assert perf.compilation_cache_dir() == tmp_path / "c"
    for off in ("off", "", "0"):
        monkeypatch.setenv(perf.CACHE_ENV, off)
        assert perf.compilation_cache_dir() is None
    monkeypatch.delenv(perf.CACHE_ENV)
    assert perf.compilation_cache_dir() == Path(perf.DEFAULT_CACHE_DIR).expanduser()


def test_check_attention_smoke_compares_with_the_float32_reference():
    out = load_benchmark("check_attention").main(["--smoke", "--steps", "3"])
    xla = out["xla"]
    assert xla["loss_rel_err"] < 1e-3 and 0 < xla["grad_rel_err"] < 5e-2  # bfloat16 against float32
    assert xla["losses"][-1] < xla["losses"][0]


def test_bench_loop_smoke_times_the_loop_the_bare_step_and_the_loops_own_cost(capsys):
    out = load_benchmark("bench_loop").main([
        "--config", "configs/tiny.yaml", "--steps", "4", "--rounds", "1", "--host-steps", "6", "--host-rounds", "1",
        "train.log_every=2", "train.eval_every=0", "train.sample_tokens=4"])
    text = capsys.readouterr().out
    assert "round 0: loop" in text and "the loop adds" in text and "% of the bare step above" in text
    assert out["bare_tps"] > 0 and out["loop_tps"] > 0 and out["e2e_tps"] > 0
    assert out["batch_ms"] > 0 and math.isfinite(out["host_ms_per_step"]) and math.isfinite(out["host_share"])
