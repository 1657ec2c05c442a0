# Shared by create.sh / install.sh / run.sh (sourced, not run). Everything is an env var with a default.
#   TPU_NAME   TPU VM (node) name                      default: agq-jax
#   ZONE       GCP zone of the TPU (required)          e.g. us-east5-a (v5p), us-east5-b (v6e)
#   PROJECT    GCP project                             default: gcloud's configured project
#   SSH_FLAGS  extra flags for `gcloud ... ssh/scp`    e.g. "--tunnel-through-iap" or "--internal-ip"
#   DRY_RUN=1  print the gcloud commands instead of running them
TPU_NAME="${TPU_NAME:-agq-jax}"
ZONE="${ZONE:-}"
PROJECT="${PROJECT:-}"
SSH_FLAGS="${SSH_FLAGS:-}"
DRY_RUN="${DRY_RUN:-0}"
REMOTE_DIR="${REMOTE_DIR:-agq-jax}"   # on every worker, relative to the login user's home

die() { echo "$(basename "$0"): $*" >&2; exit 2; }

want_help() {
  local a
  for a in "$@"; do [[ "$a" == "-h" || "$a" == "--help" ]] && return 0; done
  return 1
}

# Print the leading comment block of the calling script (its usage text).
print_usage() { sed -n '2,/^set -euo/p' "$1" | sed '$d' | sed 's/^# \{0,1\}//'; }

require_zone() { [[ -n "$ZONE" ]] || die "set ZONE (the TPU's GCP zone), e.g. ZONE=us-east5-a $0"; }

# Flags every gcloud TPU command takes.
gcloud_scope() {
  SCOPE=(--zone="$ZONE")
  [[ -n "$PROJECT" ]] && SCOPE+=(--project="$PROJECT")
  return 0
}

# Run (or print, with DRY_RUN=1) a command given as separate words.
run_cmd() {
  if [[ "$DRY_RUN" == "1" ]]; then
    printf '%q ' "$@"; echo
  else
    "$@"
  fi
}

# Run a shell command on every worker of the TPU VM at once.
on_all_workers() {
  local cmd="$1"
  gcloud_scope
  # shellcheck disable=SC2086
  run_cmd gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${SCOPE[@]}" --worker=all $SSH_FLAGS --command="$cmd"
}
