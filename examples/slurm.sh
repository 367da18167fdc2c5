#!/usr/bin/env bash
# Multi-host training under SLURM: one process per GPU, every process runs the same command.
#
#   sbatch examples/slurm.sh                                  # gpt2-124m
#   sbatch examples/slurm.sh train.steps=20000 optim.lr=6e-4  # extra key=value overrides
#
# jax.distributed.initialize() reads SLURM's variables itself: the coordinator is the
# first node of the step (port derived from the job id; set JAX_COORDINATOR_PORT to
# choose one), the process count is SLURM_NTASKS, the process id SLURM_PROCID and each
# process takes the GPU numbered SLURM_LOCALID. train.batch_size is the global batch:
# it must divide by (number of GPUs) x train.grad_accum.
#
#SBATCH --job-name=jaxtrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8      # one process per GPU
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --requeue                # a preempted job resumes from its last checkpoint
#SBATCH --output=%x-%j.out
set -euo pipefail

CONFIG=${CONFIG:-gpt2-124m}
RUN_DIR=${RUN_DIR:-runs/gpt2-124m}   # fixed across requeues, so the job resumes

# SIGTERM reaches every task; jaxtrain saves a checkpoint and exits 75.
srun --kill-on-bad-exit=1 python -m jaxtrain.run --config "$CONFIG" run_dir="$RUN_DIR" "$@"
