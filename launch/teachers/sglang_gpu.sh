#!/usr/bin/env bash
# Start one stock SGLang teacher on NVIDIA GPUs, serving /v1/chat/completions, from its own venv.
#
#   make sglang-gpu-venv                               # once: .venv-sglang-gpu (Python 3.12, sglang pinned)
#   launch/teachers/sglang_gpu.sh --model-path Qwen/Qwen3-235B-A22B-Instruct-2507 --tp 8 --port 30000 --host 0.0.0.0
#   launch/teachers/sglang_gpu.sh --model-path Qwen/Qwen3-8B --tp 1 --dp 8 --port 30001
#   launch/wait_healthy.py http://127.0.0.1:30000 --timeout 3600
#
# Qwen3 parsers are on by default: --tool-call-parser qwen (Qwen3's <tool_call>{json}</tool_call>;
# called qwen25 before sglang 0.5) and --reasoning-parser qwen3 (use qwen3-thinking for *-Thinking-2507
# checkpoints, qwen3_coder tool parser for Qwen3-Coder). The script `exec`s the server: start it with
# `setsid`, stop it with `kill -TERM -- -PID`. Everything after `--` goes to sglang.launch_server.
# Flags checked against the sglang 0.5.23 sources (no GPU on the machine these scripts were written on).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${SGLANG_GPU_VENV:-$REPO/.venv-sglang-gpu}"
MODEL_PATH="" SERVED_NAME="" HOST="127.0.0.1" PORT="30000" TP="1" DP="" EP="" MEM_FRACTION="" CONTEXT_LENGTH=""
NNODES="" NODE_RANK="" DIST_INIT_ADDR="" API_KEY_ENV="" TOOL_PARSER="qwen" REASONING_PARSER="qwen3" DRY_RUN=0 EXTRA=()

usage() {
  sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  cat <<'EOF'
Options:
  --model-path P          local HF checkpoint dir or hub id (required)
  --served-model-name N   the `model` name clients send (default: the model path)
  --host H / --port P     default 127.0.0.1 / 30000
  --tp N                  tensor parallel GPUs per replica (default 1)
  --dp N                  data parallel replicas (tp*dp GPUs in all)
  --ep N                  expert parallel size for MoE teachers
  --mem-fraction-static F, --context-length N
  --nnodes N --node-rank R --dist-init-addr HOST:PORT   multi-node tensor parallelism (run on every node)
  --api-key-env NAME      require an API key, read from env var NAME (visible in `ps` on this host)
  --tool-call-parser P    default qwen; `none` disables
  --reasoning-parser P    default qwen3; `none` disables
  --dry-run               print the command and exit
EOF
}

die() { echo "sglang_gpu.sh: $*" >&2; exit 2; }
need() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }
int() { [[ "$2" =~ ^[0-9]+$ ]] || die "$1 must be a number, got '$2'"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --model-path) need "$@"; MODEL_PATH="$2"; shift 2 ;;
    --served-model-name) need "$@"; SERVED_NAME="$2"; shift 2 ;;
    --host) need "$@"; HOST="$2"; shift 2 ;;
    --port) need "$@"; int "$1" "$2"; PORT="$2"; shift 2 ;;
    --tp) need "$@"; int "$1" "$2"; TP="$2"; shift 2 ;;
    --dp) need "$@"; int "$1" "$2"; DP="$2"; shift 2 ;;
    --ep) need "$@"; int "$1" "$2"; EP="$2"; shift 2 ;;
    --mem-fraction-static) need "$@"; MEM_FRACTION="$2"; shift 2 ;;
    --context-length) need "$@"; int "$1" "$2"; CONTEXT_LENGTH="$2"; shift 2 ;;
    --nnodes) need "$@"; int "$1" "$2"; NNODES="$2"; shift 2 ;;
    --node-rank) need "$@"; int "$1" "$2"; NODE_RANK="$2"; shift 2 ;;
    --dist-init-addr) need "$@"; DIST_INIT_ADDR="$2"; shift 2 ;;
    --api-key-env) need "$@"; API_KEY_ENV="$2"; shift 2 ;;
    --tool-call-parser) need "$@"; TOOL_PARSER="$2"; shift 2 ;;
    --reasoning-parser) need "$@"; REASONING_PARSER="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown option $1 (see --help; pass sglang flags after --)" ;;
  esac
done

[[ -n "$MODEL_PATH" ]] || die "--model-path is required"
if [[ -n "$NNODES" && "$NNODES" -gt 1 && -z "$DIST_INIT_ADDR" ]]; then
  die "--nnodes $NNODES needs --dist-init-addr HOST:PORT (the rank-0 node) and --node-rank on every node"
fi

CMD=("$VENV/bin/python" -m sglang.launch_server --model-path "$MODEL_PATH" --host "$HOST" --port "$PORT"
     --tp-size "$TP")
[[ -n "$DP" ]] && CMD+=(--dp-size "$DP")
[[ -n "$EP" ]] && CMD+=(--ep-size "$EP")
[[ -n "$SERVED_NAME" ]] && CMD+=(--served-model-name "$SERVED_NAME")
[[ "$TOOL_PARSER" != "none" ]] && CMD+=(--tool-call-parser "$TOOL_PARSER")
[[ "$REASONING_PARSER" != "none" ]] && CMD+=(--reasoning-parser "$REASONING_PARSER")
[[ -n "$MEM_FRACTION" ]] && CMD+=(--mem-fraction-static "$MEM_FRACTION")
[[ -n "$CONTEXT_LENGTH" ]] && CMD+=(--context-length "$CONTEXT_LENGTH")
[[ -n "$NNODES" ]] && CMD+=(--nnodes "$NNODES" --node-rank "${NODE_RANK:-0}")
[[ -n "$DIST_INIT_ADDR" ]] && CMD+=(--dist-init-addr "$DIST_INIT_ADDR")
CMD+=("${EXTRA[@]}")

SHOWN=("${CMD[@]}")
if [[ -n "$API_KEY_ENV" ]]; then
  [[ -n "${!API_KEY_ENV:-}" ]] || die "env var $API_KEY_ENV (the API key) is not set"
  CMD+=(--api-key "${!API_KEY_ENV}")
  SHOWN+=(--api-key "\$$API_KEY_ENV")   # never print the key itself
fi

if [[ "$DRY_RUN" == 1 ]]; then
  echo "${SHOWN[*]}"
  exit 0
fi
[[ -x "$VENV/bin/python" ]] || die "no SGLang venv at $VENV: run \`make sglang-gpu-venv\` first"
command -v nvidia-smi >/dev/null || die "nvidia-smi not found: stock SGLang needs CUDA GPUs (use sglang_jax.sh on TPU/CPU)"
echo "sglang_gpu.sh: ${SHOWN[*]}" >&2
exec "${CMD[@]}"
