#!/usr/bin/env bash
# Try a multi-process run on one machine: N CPU processes x D CPU devices each,
# talking through jax.distributed on 127.0.0.1 (gloo collectives).
#
#   examples/multiprocess_cpu.sh 2 2 --config tiny run_dir=/tmp/mp
#
# Every process gets the same command line plus its process id; process 0 writes
# the logs, every process writes its part of each checkpoint.
set -euo pipefail
N=${1:?number of processes}; D=${2:?CPU devices per process}; shift 2
PORT=${PORT:-$(python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")}

pids=()
# Ctrl-C reaches every process through the terminal; a TERM sent to this script is
# passed on. Either way each process finishes its step and saves a checkpoint.
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
trap ':' INT
for ((i = 0; i < N; i++)); do
  JAX_PLATFORMS=cpu python -m jaxtrain.run "$@" parallel.local_device_count="$D" \
    parallel.coordinator_address=127.0.0.1:"$PORT" parallel.num_processes="$N" parallel.process_id="$i" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
