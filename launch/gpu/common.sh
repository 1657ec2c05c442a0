# Shared by the GPU launchers (sourced, not run): builds the trainer command from env vars.
#   CONFIG [configs/8b.py]   LAYOUT [h100x8]   RUN_DIR []   TEACHER_URL []   VENV [REPO/.venv]
#   MEM_FRACTION [0.92]      share of each GPU's memory XLA preallocates (XLA_PYTHON_CLIENT_MEM_FRACTION)
#   EXTRA_XLA_FLAGS [--xla_gpu_enable_latency_hiding_scheduler=true]   appended to XLA_FLAGS
#   DRY_RUN [0]              1 = print the environment and command instead of running
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CONFIG="${CONFIG:-configs/8b.py}"
LAYOUT="${LAYOUT:-h100x8}"
RUN_DIR="${RUN_DIR:-}"
TEACHER_URL="${TEACHER_URL:-}"
VENV="${VENV:-$REPO/.venv}"
MEM_FRACTION="${MEM_FRACTION:-0.92}"
EXTRA_XLA_FLAGS="${EXTRA_XLA_FLAGS:---xla_gpu_enable_latency_hiding_scheduler=true}"
DRY_RUN="${DRY_RUN:-0}"

die() { echo "$(basename "$0"): $*" >&2; exit 2; }

want_help() {
  local a
  for a in "$@"; do [[ "$a" == "-h" || "$a" == "--help" ]] && return 0; done
  return 1
}

print_usage() { sed -n '2,/^set -euo/p' "$1" | sed '$d' | grep -v '^#SBATCH' | sed 's/^# \{0,1\}//'; }

# Number of GPUs this process may use: CUDA_VISIBLE_DEVICES if set, else nvidia-smi.
local_gpu_count() {
  if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES"
  elif command -v nvidia-smi >/dev/null; then
    nvidia-smi -L | grep -c '^GPU'
  else
    echo "${GPUS_PER_NODE:-8}"
  fi
}

# TRAIN_CMD=(python -m agq_jax.train --config=CONFIG[:LAYOUT] ... "$@") and the XLA environment.
build_train_cmd() {
  local config_arg="$CONFIG"
  [[ -n "$LAYOUT" ]] && config_arg="$CONFIG:$LAYOUT"
  [[ -f "$REPO/$CONFIG" || -f "$CONFIG" ]] || die "no config file $CONFIG (relative to $REPO)"
  [[ "$DRY_RUN" == "1" || -x "$VENV/bin/python" ]] || die "no venv at $VENV: run launch/gpu/install.sh first"
  TRAIN_CMD=("$VENV/bin/python" -m agq_jax.train --config="$config_arg")
  [[ -n "$RUN_DIR" ]] && TRAIN_CMD+=(--config.run_dir="$RUN_DIR")
  [[ -n "$TEACHER_URL" ]] && TRAIN_CMD+=(--config.teachers.default.base_url="$TEACHER_URL")
  TRAIN_CMD+=("$@")
  export XLA_PYTHON_CLIENT_MEM_FRACTION="$MEM_FRACTION"
  export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }$EXTRA_XLA_FLAGS"
  export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
  return 0
}

run_train() {
  cd "$REPO"
  if [[ "$DRY_RUN" == "1" ]]; then
    env | grep -E '^(JAX_|XLA_|CUDA_VISIBLE|NCCL_)' | sort
    printf '%q ' "${TRAIN_CMD[@]}"; echo
    return 0
  fi
  exec "${TRAIN_CMD[@]}"
}
