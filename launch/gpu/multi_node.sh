#!/usr/bin/env bash
# Train on several GPU nodes: one process per node drives that node's GPUs; jax.distributed joins them.
#
# With SLURM (the script re-launches itself with srun, one task per node):
#   sbatch --nodes=2 --gpus-per-node=8 --exclusive launch/gpu/multi_node.sh
#   CONFIG=configs/30b_a3b.py LAYOUT=h100x16 RUN_DIR=/shared/runs/30b sbatch --nodes=2 --gpus-per-node=8 launch/gpu/multi_node.sh
# Without SLURM (run the same command on every node, NODE_RANK 0..NNODES-1; node 0 hosts the coordinator):
#   NNODES=2 NODE_RANK=0 COORDINATOR=10.0.0.1:12355 CONFIG=configs/30b_a3b.py LAYOUT=h100x16 launch/gpu/multi_node.sh
#   NNODES=2 NODE_RANK=1 COORDINATOR=10.0.0.1:12355 CONFIG=configs/30b_a3b.py LAYOUT=h100x16 launch/gpu/multi_node.sh
#
# Env vars (defaults in brackets):
#   CONFIG [configs/8b.py]  LAYOUT [h100x8] (set the multi-node one, e.g. h100x16)  RUN_DIR [] (shared by all nodes)
#   TEACHER_URL []  VENV [REPO/.venv]  MEM_FRACTION [0.92]  EXTRA_XLA_FLAGS [latency hiding scheduler]  DRY_RUN [0]
#   NNODES / NODE_RANK / COORDINATOR (host:port)   only without SLURM
#   COORDINATOR_PORT [12355]                       port on the first node under SLURM
# Each process gets JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID and JAX_LOCAL_DEVICE_IDS;
# the trainer passes them to jax.distributed.initialize. NCCL_* variables pass through unchanged.
# Arguments after `--` go to `python -m agq_jax.train`.
#SBATCH --ntasks-per-node=1
#SBATCH --job-name=agq-jax
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# sbatch runs a copy of this script from the spool directory: find the checkout from the submit dir.
if [[ ! -f "$HERE/common.sh" && -n "${SLURM_SUBMIT_DIR:-}" ]]; then HERE="$SLURM_SUBMIT_DIR/launch/gpu"; fi
[[ -f "$HERE/common.sh" ]] || { echo "multi_node.sh: cannot find launch/gpu/common.sh; submit from the repo root" >&2; exit 2; }
# shellcheck source=common.sh
source "$HERE/common.sh"
if want_help "$@"; then print_usage "$HERE/multi_node.sh"; exit 0; fi
if [[ $# -gt 0 ]]; then
  [[ "$1" == "--" ]] || die "unknown argument '$1' (trainer flags go after --)"
  shift
fi
COORDINATOR_PORT="${COORDINATOR_PORT:-12355}"

if [[ -n "${SLURM_JOB_ID:-}" && -z "${AGQ_SLURM_TASK:-}" ]]; then
  # The batch step: start one task per node running this script again.
  nodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
  launch=(srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1
          env AGQ_SLURM_TASK=1 bash "$HERE/multi_node.sh" -- "$@")
  if [[ "$DRY_RUN" == "1" ]]; then printf '%q ' "${launch[@]}"; echo; exit 0; fi
  exec "${launch[@]}"
fi

if [[ -n "${AGQ_SLURM_TASK:-}" ]]; then
  first="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
  export JAX_COORDINATOR_ADDRESS="$first:$COORDINATOR_PORT"
  export JAX_NUM_PROCESSES="$SLURM_NTASKS"
  export JAX_PROCESS_ID="$SLURM_PROCID"
else
  [[ -n "${NNODES:-}" && -n "${NODE_RANK:-}" && -n "${COORDINATOR:-}" ]] \
    || die "outside SLURM set NNODES, NODE_RANK and COORDINATOR=host:port (node 0's address)"
  [[ "$NNODES" =~ ^[0-9]+$ && "$NODE_RANK" =~ ^[0-9]+$ ]] || die "NNODES and NODE_RANK must be numbers"
  (( NODE_RANK < NNODES )) || die "NODE_RANK=$NODE_RANK must be < NNODES=$NNODES"
  [[ "$COORDINATOR" == *:* ]] || die "COORDINATOR must be host:port, got '$COORDINATOR'"
  export JAX_COORDINATOR_ADDRESS="$COORDINATOR"
  export JAX_NUM_PROCESSES="$NNODES"
  export JAX_PROCESS_ID="$NODE_RANK"
fi
gpus="$(local_gpu_count)"
# All local GPUs belong to this one process (JAX's SLURM detection would otherwise assume one per GPU).
JAX_LOCAL_DEVICE_IDS="$(seq -s, 0 $((gpus - 1)))"
export JAX_LOCAL_DEVICE_IDS
build_train_cmd "$@"
echo "node $JAX_PROCESS_ID/$JAX_NUM_PROCESSES ($(hostname)): $gpus GPUs, coordinator $JAX_COORDINATOR_ADDRESS" >&2
run_train
