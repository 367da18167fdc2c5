#!/usr/bin/env bash
# GPT-2 124M training step on one NVIDIA GPU (H100 / H200): tokens/s, MFU against
# the card's bf16 matmul rate measured in the same run, peak device memory.
#
#   bash benchmarks/gpu.sh                  # installs jax[cuda12] + jaxtrain if missing; < 5 minutes
#   bash benchmarks/gpu.sh --batch 16       # extra arguments go to benchmarks/bench_gpu.py
#
# Prints the card, nvidia-smi's view of it, and bench_gpu.py's report (last line: JSON).
set -euo pipefail
cd "$(dirname "$0")/.."

has_gpu_jax() {
  python - <<'EOF' 2>/dev/null
import jax, flax, optax, orbax.checkpoint, omegaconf  # noqa: F401
assert jax.default_backend() == "gpu", jax.default_backend()
EOF
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
if ! has_gpu_jax; then
  # Pin jax to the version already here (if any) so the CUDA plugin matches it.
  jax_version=$(python -c "import jax; print(jax.__version__)" 2>/dev/null || true)
  echo "installing jax[cuda12]${jax_version:+==$jax_version} and jaxtrain's dependencies"
  python -m pip install -q "jax[cuda12]${jax_version:+==$jax_version}"
  python -m pip install -q -e .
  has_gpu_jax || { echo "error: jax sees no GPU after installing jax[cuda12]" >&2; exit 1; }
fi
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout 270 python benchmarks/bench_gpu.py "$@"
