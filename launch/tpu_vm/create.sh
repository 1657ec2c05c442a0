#!/usr/bin/env bash
# Create a Cloud TPU VM (single host or a multi-host slice) for agq-jax training.
#
#   ZONE=us-east5-a ACCELERATOR_TYPE=v5p-64 launch/tpu_vm/create.sh
#   ZONE=us-east5-b ACCELERATOR_TYPE=v6e-8 SPOT=1 launch/tpu_vm/create.sh
#   ZONE=us-east5-a ACCELERATOR_TYPE=v5p-64 QUEUED=1 launch/tpu_vm/create.sh   # wait in the capacity queue
#
# Env vars (defaults in brackets):
#   TPU_NAME [agq-jax]  ZONE (required)  PROJECT [gcloud default]
#   ACCELERATOR_TYPE [v6e-8]      v5p-N (N = TensorCores = 2 x chips), v6e-N (N = chips), v5litepod-N
#   RUNTIME_VERSION [by type]     v2-alpha-tpuv5 (v5p), v2-alpha-tpuv6e (v6e), v2-alpha-tpuv5-lite (v5e)
#   SPOT [0]                      1 = spot capacity (cheaper, can be preempted: resume from checkpoints)
#   QUEUED [0]                    1 = queued-resources request, then wait until ACTIVE
#   QR_ID [$TPU_NAME-qr]          queued-resource id;  WAIT_TIMEOUT_S [7200] how long to wait for it
#   NETWORK / SUBNETWORK          optional VPC network / subnetwork
#   DRY_RUN [0]                   1 = print the gcloud commands only
# Then: launch/tpu_vm/install.sh and launch/tpu_vm/run.sh (same TPU_NAME / ZONE). See docs/launch.md.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$HERE/common.sh"
if want_help "$@"; then print_usage "$0"; exit 0; fi
[[ $# -eq 0 ]] || die "takes no arguments (configure with env vars; --help lists them)"

ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v6e-8}"
SPOT="${SPOT:-0}"
QUEUED="${QUEUED:-0}"
QR_ID="${QR_ID:-$TPU_NAME-qr}"
WAIT_TIMEOUT_S="${WAIT_TIMEOUT_S:-7200}"
NETWORK="${NETWORK:-}"
SUBNETWORK="${SUBNETWORK:-}"
case "$ACCELERATOR_TYPE" in
  v5p-*) default_runtime="v2-alpha-tpuv5" ;;
  v6e-*) default_runtime="v2-alpha-tpuv6e" ;;
  v5litepod-*) default_runtime="v2-alpha-tpuv5-lite" ;;
  v4-*) default_runtime="tpu-ubuntu2204-base" ;;
  *) die "unknown ACCELERATOR_TYPE '$ACCELERATOR_TYPE' (v5p-N, v6e-N, v5litepod-N, v4-N)" ;;
esac
RUNTIME_VERSION="${RUNTIME_VERSION:-$default_runtime}"
require_zone
gcloud_scope

extra=()
[[ "$SPOT" == "1" ]] && extra+=(--spot)
[[ -n "$NETWORK" ]] && extra+=(--network="$NETWORK")
[[ -n "$SUBNETWORK" ]] && extra+=(--subnetwork="$SUBNETWORK")

if [[ "$QUEUED" == "1" ]]; then
  run_cmd gcloud compute tpus queued-resources create "$QR_ID" "${SCOPE[@]}" --node-id="$TPU_NAME" \
    --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" ${extra[@]+"${extra[@]}"}
  [[ "$DRY_RUN" == "1" ]] && exit 0
  echo "waiting for queued resource $QR_ID to become ACTIVE (up to ${WAIT_TIMEOUT_S}s)..."
  deadline=$(( $(date +%s) + WAIT_TIMEOUT_S ))
  while :; do
    state="$(gcloud compute tpus queued-resources describe "$QR_ID" "${SCOPE[@]}" --format='value(state.state)')"
    echo "  $(date +%H:%M:%S) $QR_ID: $state"
    case "$state" in
      ACTIVE) break ;;
      FAILED|SUSPENDED) die "queued resource $QR_ID is $state (gcloud compute tpus queued-resources describe $QR_ID)" ;;
    esac
    (( $(date +%s) < deadline )) || die "queued resource $QR_ID not ACTIVE after ${WAIT_TIMEOUT_S}s (still queued)"
    sleep 30
  done
else
  run_cmd gcloud compute tpus tpu-vm create "$TPU_NAME" "${SCOPE[@]}" \
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" ${extra[@]+"${extra[@]}"}
fi
[[ "$DRY_RUN" == "1" ]] && exit 0
gcloud compute tpus tpu-vm describe "$TPU_NAME" "${SCOPE[@]}" \
  --format='table(name.basename(), acceleratorType, state, networkEndpoints.len():label=WORKERS)'
echo "next: TPU_NAME=$TPU_NAME ZONE=$ZONE launch/tpu_vm/install.sh"
