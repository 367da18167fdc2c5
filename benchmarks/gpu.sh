#!/usr/bin/env bash
# GPT-2 124M on one NVIDIA GPU (H100 / H200): the training step's tokens/s and MFU
# against the card's bf16 matmul rate measured in the same run, memory, and a short
# `python -m jaxtrain.run --config gpt2-124m` through the real command line.
#
#   bash benchmarks/gpu.sh              # about 7 minutes; logs and JSON under $OUT (default runs/gpu)
#
# Uses the jax that is installed if it sees a GPU; otherwise installs jax[cuda12]
# (needs the network). Wheels in .whl/ (omegaconf, tensorboardX, flax, ...) are
# installed into /tmp/jaxtrain-site first, for machines that cannot reach PyPI; the
# pinned flax/optax/orbax among them are used only if the installed ones fail the
# smoke run. Each stage is skipped once GPU_BUDGET_S (default 420) seconds have passed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
BUDGET=${GPU_BUDGET_S:-420}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
log() { echo "== [$SECONDS s] $*"; }
PY=${PYTHON:-$(command -v python3 || command -v python)}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
if compgen -G ".whl/*.whl" > /dev/null; then
  pinned=$(ls .whl/*.whl | grep -E '/(flax|optax|orbax_checkpoint)-' || true)
  extra=$(ls .whl/*.whl | grep -vE '/(flax|optax|orbax_checkpoint)-' || true)
  [ -n "$extra" ] && "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/jaxtrain-site $extra \
    && export PYTHONPATH="$PYTHONPATH:/tmp/jaxtrain-site"
  [ -n "$pinned" ] && "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/jaxtrain-pinned $pinned
fi
if ! "$PY" -c "import jax; assert jax.default_backend() == 'gpu'" 2>/dev/null; then
  jax_version=$("$PY" -c "import jax; print(jax.__version__)" 2>/dev/null || true)
  log "installing jax[cuda12]${jax_version:+==$jax_version}"
  "$PY" -m pip install -q "jax[cuda12]${jax_version:+==$jax_version}" && "$PY" -m pip install -q -e . \
    || { echo "error: no GPU jax and no way to install one" >&2; exit 1; }
fi
versions='import jax, flax, optax, orbax.checkpoint as o; print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, "orbax", o.__version__, jax.devices())'
"$PY" -c "$versions" 2>&1 | tail -1
log "smoke run (tiny model, XLA and cuDNN attention)"
if ! "$PY" benchmarks/bench_gpu.py --smoke --attention xla,cudnn > "$OUT/smoke.log" 2>&1; then
  tail -5 "$OUT/smoke.log"
  log "installed flax/optax/orbax failed the smoke run; retrying with the pinned wheels"
  export PYTHONPATH="/tmp/jaxtrain-pinned:$PYTHONPATH"
  "$PY" -c "$versions" 2>&1 | tail -1
  "$PY" benchmarks/bench_gpu.py --smoke --attention xla,cudnn > "$OUT/smoke.log" 2>&1 \
    || { tail -30 "$OUT/smoke.log"; exit 1; }
fi
grep -E "^  batch" "$OUT/smoke.log"

log "GPT-2 124M step, cuDNN attention, batch 16/32/64"
"$PY" benchmarks/bench_gpu.py --batch 16,32,64 --attention cudnn --json "$OUT/bench_cudnn.json" 2>&1 | grep -v '^{'
if (( SECONDS < BUDGET - 120 )); then
  log "python -m jaxtrain.run --config gpt2-124m, 60 steps"
  run_dir=/tmp/jaxtrain-gpt2
  rm -rf "$run_dir"
  timeout $(( BUDGET - SECONDS + 60 )) "$PY" -m jaxtrain.run --config gpt2-124m run_dir=$run_dir \
    train.steps=60 train.eval_every=30 train.eval_batches=4 train.log_every=10 train.sample_tokens=200 \
    checkpoint.every=60 log.progress=false > "$OUT/run.log" 2>&1
  echo "exit status $?"
  tail -c 3000 "$OUT/run.log"
  cp "$run_dir/metrics.jsonl" "$OUT/run_metrics.jsonl" 2>/dev/null
  cp "$run_dir/plot.png" "$OUT/run_plot.png" 2>/dev/null || true
fi
if (( SECONDS < BUDGET - 70 )); then
  log "GPT-2 124M step, XLA attention, batch 32"
  "$PY" benchmarks/bench_gpu.py --batch 32 --attention xla --json "$OUT/bench_xla.json" 2>&1 | grep -v '^{'
fi
if (( SECONDS < BUDGET - 70 )); then
  log "GPT-2 124M step, cuDNN attention, batch 32, XLA_FLAGS=--xla_gpu_enable_triton_gemm=false"
  XLA_FLAGS="--xla_gpu_enable_triton_gemm=false" "$PY" benchmarks/bench_gpu.py --batch 32 --attention cudnn \
    --json "$OUT/bench_cudnn_no_triton_gemm.json" 2>&1 | grep -v '^{'
fi
log "done"
