#!/usr/bin/env bash
# Install agq-jax for NVIDIA GPUs on this machine: the pinned requirements plus jax[cuda] of the same version.
# Run it once per node (or once on a shared filesystem that every node mounts).
#
#   launch/gpu/install.sh
#   JAX_EXTRA=cuda13 launch/gpu/install.sh
#
# Env vars (defaults in brackets):
#   PYTHON [python3]        interpreter for the venv (agq-jax needs >= 3.11)
#   VENV [REPO/.venv]       where the venv goes
#   JAX_EXTRA [cuda12]      pip extra of jax: cuda12 (driver >= 525) or cuda13 (driver >= 580)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$HERE/common.sh"
if want_help "$@"; then print_usage "$0"; exit 0; fi
[[ $# -eq 0 ]] || die "takes no arguments (configure with env vars; --help lists them)"
PYTHON="${PYTHON:-python3}"
JAX_EXTRA="${JAX_EXTRA:-cuda12}"
JAX_VERSION="$(sed -n 's/^jax==\([^ #]*\).*/\1/p' "$REPO/requirements.txt")"
[[ -n "$JAX_VERSION" ]] || die "no 'jax==' pin in $REPO/requirements.txt"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "$PYTHON is older than 3.11 (set PYTHON=python3.11)"
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -r "$REPO/requirements.txt"
"$VENV/bin/python" -m pip install -q "jax[$JAX_EXTRA]==$JAX_VERSION"
"$VENV/bin/python" -m pip install -q --no-deps -e "$REPO"
"$VENV/bin/python" -c 'import jax; print(jax.device_count(), "devices:", jax.devices()[0].device_kind)'
