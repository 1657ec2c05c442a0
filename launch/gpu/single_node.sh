#!/usr/bin/env bash
# Train on one GPU node (e.g. 8xH100): one process drives all local GPUs; no jax.distributed needed.
#
#   launch/gpu/single_node.sh                                       # configs/8b.py on layout h100x8
#   CONFIG=configs/0_6b.py LAYOUT=h100x8 launch/gpu/single_node.sh -- --config.rl.steps_per_round=20
#   CUDA_VISIBLE_DEVICES=0,1,2,3 CONFIG=configs/0_6b.py LAYOUT= launch/gpu/single_node.sh   # 4 GPUs, default mesh
#
# Env vars (defaults in brackets):
#   CONFIG [configs/8b.py]  LAYOUT [h100x8] (empty = the config's default)  RUN_DIR []  TEACHER_URL []
#   VENV [REPO/.venv]  MEM_FRACTION [0.92]  EXTRA_XLA_FLAGS [--xla_gpu_enable_latency_hiding_scheduler=true]
#   DRY_RUN [0]
# Arguments after `--` go to `python -m agq_jax.train`. Install first with launch/gpu/install.sh.
# Qwen3-30B-A3B does not fit one 8x80GB node with fp32 master weights: use multi_node.sh (docs/launch.md).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$HERE/common.sh"
if want_help "$@"; then print_usage "$0"; exit 0; fi
if [[ $# -gt 0 ]]; then
  [[ "$1" == "--" ]] || die "unknown argument '$1' (trainer flags go after --)"
  shift
fi
for v in JAX_COORDINATOR_ADDRESS JAX_NUM_PROCESSES JAX_PROCESS_ID; do unset "$v"; done  # one process
build_train_cmd "$@"
echo "single node: $(local_gpu_count) GPUs, ${TRAIN_CMD[*]:1}" >&2
run_train
