#!/usr/bin/env bash
# Copy this checkout to every worker of a TPU VM and install agq-jax there (Python venv + jax[tpu]).
#
#   TPU_NAME=agq-jax ZONE=us-east5-a launch/tpu_vm/install.sh
#   WEIGHTS_SRC=gs://my-bucket/models/Qwen3-30B-A3B WEIGHTS_DST=checkpoints/Qwen3-30B-A3B ZONE=... launch/tpu_vm/install.sh
#   WEIGHTS_SRC=Qwen/Qwen3-8B WEIGHTS_DST=checkpoints/Qwen3-8B ZONE=... launch/tpu_vm/install.sh   # from the HF Hub
#
# Env vars (defaults in brackets):
#   TPU_NAME [agq-jax]  ZONE (required)  PROJECT [gcloud default]  SSH_FLAGS []  DRY_RUN [0]
#   REMOTE_DIR [agq-jax]   where the code goes on each worker (relative to the home directory)
#   PYTHON [python3.11]    interpreter for the venv (installed with apt when missing; agq-jax needs >= 3.11)
#   JAX_EXTRA [tpu]        pip extra of the pinned jax version installed on top of requirements.txt
#   WEIGHTS_SRC []         optional: gs://... directory (copied with `gcloud storage`) or an HF Hub model id
#   WEIGHTS_DST []         where the weights land, relative to REMOTE_DIR (what model.hf_path points at)
# Every worker gets its own copy of code and weights: each host reads the shards its chips hold.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
# shellcheck source=common.sh
source "$HERE/common.sh"
if want_help "$@"; then print_usage "$0"; exit 0; fi
[[ $# -eq 0 ]] || die "takes no arguments (configure with env vars; --help lists them)"

PYTHON="${PYTHON:-python3.11}"
JAX_EXTRA="${JAX_EXTRA:-tpu}"
WEIGHTS_SRC="${WEIGHTS_SRC:-}"
WEIGHTS_DST="${WEIGHTS_DST:-}"
require_zone
gcloud_scope
[[ -z "$WEIGHTS_SRC" || -n "$WEIGHTS_DST" ]] || die "WEIGHTS_SRC needs WEIGHTS_DST (e.g. checkpoints/Qwen3-30B-A3B)"
JAX_VERSION="$(sed -n 's/^jax==\([^ #]*\).*/\1/p' "$REPO/requirements.txt")"
[[ -n "$JAX_VERSION" ]] || die "no 'jax==' pin in $REPO/requirements.txt"

# 1. Pack the checkout: tracked + untracked-but-not-ignored files, minus venvs, runs and checkpoints.
TARBALL="$(mktemp -t agq-jax-XXXXXX)"
trap 'rm -f "$TARBALL"' EXIT
python3 - "$REPO" "$TARBALL" <<'PY'
import os, subprocess, sys, tarfile
repo, out = sys.argv[1], sys.argv[2]
skip = lambda p: p.split("/")[0].startswith(".venv") or p.split("/")[0] in ("runs", "checkpoints", ".git")
try:
    names = subprocess.run(["git", "-C", repo, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           check=True, capture_output=True).stdout.decode().split("\0")
except (OSError, subprocess.CalledProcessError):  # not a git checkout: walk the tree
    names = [os.path.relpath(os.path.join(d, f), repo) for d, ds, fs in os.walk(repo) for f in fs]
names = sorted(n for n in names if n and not skip(n) and "__pycache__" not in n and os.path.isfile(os.path.join(repo, n)))
with tarfile.open(out, "w:gz") as tar:
    for n in names:
        tar.add(os.path.join(repo, n), arcname=n)
PY
echo "packed $(du -h "$TARBALL" | cut -f1) from $REPO"

# 2. Copy it to every worker.
# shellcheck disable=SC2086
run_cmd gcloud compute tpus tpu-vm scp "$TARBALL" "$TPU_NAME:/tmp/agq-jax.tgz" "${SCOPE[@]}" --worker=all $SSH_FLAGS

# 3. Unpack, make the venv, install the pinned requirements + jax[tpu] of the same version, check the chips.
read -r -d '' REMOTE <<SCRIPT || true
set -euo pipefail
mkdir -p ~/$REMOTE_DIR && tar xzf /tmp/agq-jax.tgz -C ~/$REMOTE_DIR && rm -f /tmp/agq-jax.tgz
cd ~/$REMOTE_DIR
if ! command -v $PYTHON >/dev/null; then
  sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $PYTHON $PYTHON-venv
fi
test -x .venv/bin/python || $PYTHON -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q "jax[$JAX_EXTRA]==$JAX_VERSION"
.venv/bin/python -m pip install -q --no-deps -e .
mkdir -p logs
SCRIPT
on_all_workers "$REMOTE"

# 4. Optional: the policy's weights on every worker.
if [[ -n "$WEIGHTS_SRC" ]]; then
  if [[ "$WEIGHTS_SRC" == gs://* ]]; then
    fetch="mkdir -p $WEIGHTS_DST && gcloud storage rsync --recursive $WEIGHTS_SRC $WEIGHTS_DST"
  else
    fetch=".venv/bin/hf download $WEIGHTS_SRC --local-dir $WEIGHTS_DST"
  fi
  on_all_workers "set -euo pipefail; cd ~/$REMOTE_DIR && $fetch && test -f $WEIGHTS_DST/config.json"
fi

# 5. Every worker sees its chips (all workers must run this together: a slice initialises as one).
on_all_workers "cd ~/$REMOTE_DIR && .venv/bin/python -c 'import jax; print(jax.process_index(), \"of\", jax.process_count(), \"hosts:\", jax.local_device_count(), \"local /\", jax.device_count(), \"devices\", jax.devices()[0].device_kind)'"
echo "next: TPU_NAME=$TPU_NAME ZONE=$ZONE CONFIG=configs/30b_a3b.py launch/tpu_vm/run.sh"
