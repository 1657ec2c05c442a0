#!/usr/bin/env bash
# Run the agq-jax trainer on every worker of a TPU VM at once (`--worker=all`); each host runs one process
# and jax.distributed finds the others by itself on Cloud TPU.
#
#   ZONE=us-east5-a CONFIG=configs/30b_a3b.py RUN_DIR=gs://my-bucket/agq-jax/30b launch/tpu_vm/run.sh
#   ZONE=... CONFIG=configs/0_6b.py LAYOUT=v6e-8 launch/tpu_vm/run.sh -- --config.rl.steps_per_round=20
#   ZONE=... DETACH=1 launch/tpu_vm/run.sh       # keep training after ssh disconnects; logs under logs/
#   ZONE=... launch/tpu_vm/run.sh --logs         # follow worker 0's log of a detached run
#   ZONE=... launch/tpu_vm/run.sh --stop         # stop a detached run (by the pid each worker recorded)
#
# Env vars (defaults in brackets):
#   TPU_NAME [agq-jax]  ZONE (required)  PROJECT [gcloud default]  SSH_FLAGS []  DRY_RUN [0]  REMOTE_DIR [agq-jax]
#   CONFIG [configs/30b_a3b.py]   config file, relative to REMOTE_DIR
#   LAYOUT []                     a MESH_LAYOUTS name of that config (appended as CONFIG:LAYOUT); [] = its default
#   RUN_DIR []                    checkpoints / exports / logs; a multi-host slice needs a shared gs:// path
#   TEACHER_URL []                OpenAI-compatible teacher endpoint (.../v1); [] = the config's value
#   DETACH [0]                    1 = nohup on each worker, output to REMOTE_DIR/logs/train-<worker>.log
#   TRAIN_ENV []                  extra env for the trainer, e.g. "LIBTPU_INIT_ARGS=--xla_tpu_enable_latency_hiding_scheduler=true"
# Arguments after `--` go to `python -m agq_jax.train` (absl/ml_collections flags such as --config.rl.group_size=8).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$HERE/common.sh"
if want_help "$@"; then print_usage "$0"; exit 0; fi

CONFIG="${CONFIG:-configs/30b_a3b.py}"
LAYOUT="${LAYOUT:-}"
RUN_DIR="${RUN_DIR:-}"
TEACHER_URL="${TEACHER_URL:-}"
DETACH="${DETACH:-0}"
TRAIN_ENV="${TRAIN_ENV:-}"
MODE=train
TRAIN_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --stop) MODE=stop; shift ;;
    --logs) MODE=logs; shift ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) die "unknown argument '$1' (trainer flags go after --; --help lists the options)" ;;
  esac
done
require_zone
PIDFILE="logs/train.pid"

case "$MODE" in
  stop)
    on_all_workers "cd ~/$REMOTE_DIR && if test -f $PIDFILE; then kill -TERM -- -\$(cat $PIDFILE) 2>/dev/null && echo stopped \$(cat $PIDFILE) || echo not running; rm -f $PIDFILE; else echo 'no run recorded'; fi"
    exit 0 ;;
  logs)
    gcloud_scope
    # shellcheck disable=SC2086
    run_cmd gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${SCOPE[@]}" --worker=0 $SSH_FLAGS \
      --command="tail -n 200 -F ~/$REMOTE_DIR/logs/train-0.log"
    exit 0 ;;
esac

config_arg="$CONFIG"
[[ -n "$LAYOUT" ]] && config_arg="$CONFIG:$LAYOUT"
args=(--config="$config_arg")
[[ -n "$RUN_DIR" ]] && args+=(--config.run_dir="$RUN_DIR")
[[ -n "$TEACHER_URL" ]] && args+=(--config.teachers.default.base_url="$TEACHER_URL")
args+=(${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"})
quoted="$(printf '%q ' "${args[@]}")"

# The worker index comes from the TPU metadata server (0 on a single-host VM).
worker='$(curl -sf -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number 2>/dev/null || echo 0)'
train="env $TRAIN_ENV .venv/bin/python -m agq_jax.train $quoted"
if [[ "$DETACH" == "1" ]]; then
  cmd="cd ~/$REMOTE_DIR && mkdir -p logs && w=$worker && setsid nohup $train > logs/train-\$w.log 2>&1 < /dev/null & echo \$! > ~/$REMOTE_DIR/$PIDFILE; echo started pid \$(cat ~/$REMOTE_DIR/$PIDFILE)"
else
  cmd="set -o pipefail; cd ~/$REMOTE_DIR && mkdir -p logs && w=$worker && $train 2>&1 | tee logs/train-\$w.log"
fi
if [[ -z "$RUN_DIR" ]]; then
  echo "note: RUN_DIR unset: the config's run_dir is used; on a multi-host slice checkpoints need a shared gs:// RUN_DIR" >&2
fi
on_all_workers "$cmd"
