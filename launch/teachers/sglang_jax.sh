#!/usr/bin/env bash
# Start one sglang-jax teacher (TPU or CPU) serving /v1/chat/completions, from its own venv.
#
#   make sglang-venv                                  # once: .venv-sglang (Python 3.12, sglang-jax pinned)
#   launch/teachers/sglang_jax.sh --model-path /ckpt/Qwen3-8B --tp 4 --port 30000 --host 0.0.0.0
#   launch/teachers/sglang_jax.sh --model-path runs/x/export --device cpu --profile cpu-tiny --port 30001
#   launch/wait_healthy.py http://127.0.0.1:30000 --timeout 1800
#
# The script `exec`s the server, so its PID is the server's PID; start it with `setsid` (or as a
# process-group leader) and stop it with `kill -TERM -- -PID`: sglang-jax's scheduler and detokenizer
# children are in the same group. Everything after `--` goes to sgl_jax.launch_server unchanged.
# --dry-run prints the command instead of running it.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${SGLANG_JAX_VENV:-$REPO/.venv-sglang}"
MODEL_PATH="" TOKENIZER_PATH="" SERVED_NAME="" HOST="127.0.0.1" PORT="30000" TP="1" DEVICE="" DTYPE=""
MEM_FRACTION="" MAX_TOTAL_TOKENS="" CONTEXT_LENGTH="" MAX_RUNNING="" PROFILE="" API_KEY_ENV=""
TOOL_PARSER="qwen25" REASONING_PARSER="qwen3" SEED="0" DRY_RUN=0 EXTRA=()

usage() {
  sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  cat <<'EOF'
Options:
  --model-path DIR        HF checkpoint (config.json + safetensors), e.g. one written by `python -m agq_jax.export` (required)
  --tokenizer-path DIR    default: the model path
  --served-model-name N   the `model` name clients send (default: the model path)
  --host H / --port P     default 127.0.0.1 / 30000 (use --host 0.0.0.0 for teachers on other hosts)
  --tp N                  tensor parallel size over the local TPU chips (default 1)
  --device tpu|cpu        default: tpu when /dev/accel* or /dev/vfio exists, else cpu
  --dtype D               default bfloat16 on TPU, float32 on CPU ("auto" would run fp32 checkpoints in fp16)
  --mem-fraction-static F, --max-total-tokens N, --context-length N, --max-running-requests N
  --profile cpu-tiny      small KV pool and one compile bucket: a tiny random model on a laptop/CI CPU
  --api-key-env NAME      require an API key, read from env var NAME (visible in `ps` on this host)
  --tool-call-parser P    default qwen25 (Qwen3's <tool_call>{json}</tool_call>); `none` disables
  --reasoning-parser P    default qwen3 (moves <think> into reasoning_content); `none` disables
  --seed N                server sampling seed (default 0)
  --dry-run               print the command and exit
EOF
}

die() { echo "sglang_jax.sh: $*" >&2; exit 2; }
need() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --model-path) need "$@"; MODEL_PATH="$2"; shift 2 ;;
    --tokenizer-path) need "$@"; TOKENIZER_PATH="$2"; shift 2 ;;
    --served-model-name) need "$@"; SERVED_NAME="$2"; shift 2 ;;
    --host) need "$@"; HOST="$2"; shift 2 ;;
    --port) need "$@"; PORT="$2"; shift 2 ;;
    --tp) need "$@"; TP="$2"; shift 2 ;;
    --device) need "$@"; DEVICE="$2"; shift 2 ;;
    --dtype) need "$@"; DTYPE="$2"; shift 2 ;;
    --mem-fraction-static) need "$@"; MEM_FRACTION="$2"; shift 2 ;;
    --max-total-tokens) need "$@"; MAX_TOTAL_TOKENS="$2"; shift 2 ;;
    --context-length) need "$@"; CONTEXT_LENGTH="$2"; shift 2 ;;
    --max-running-requests) need "$@"; MAX_RUNNING="$2"; shift 2 ;;
    --profile) need "$@"; PROFILE="$2"; shift 2 ;;
    --api-key-env) need "$@"; API_KEY_ENV="$2"; shift 2 ;;
    --tool-call-parser) need "$@"; TOOL_PARSER="$2"; shift 2 ;;
    --reasoning-parser) need "$@"; REASONING_PARSER="$2"; shift 2 ;;
    --seed) need "$@"; SEED="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown option $1 (see --help; pass sglang-jax flags after --)" ;;
  esac
done

[[ -n "$MODEL_PATH" ]] || die "--model-path is required"
[[ "$PORT" =~ ^[0-9]+$ ]] || die "--port must be a number, got '$PORT'"
[[ "$TP" =~ ^[0-9]+$ ]] || die "--tp must be a number, got '$TP'"
if [[ -d "$MODEL_PATH" && ! -f "$MODEL_PATH/config.json" ]]; then
  die "$MODEL_PATH has no config.json (export a checkpoint with: python -m agq_jax.export --checkpoint=... --out=DIR)"
fi
if [[ -z "$DEVICE" ]]; then
  if compgen -G "/dev/accel*" >/dev/null || [[ -d /dev/vfio ]]; then DEVICE="tpu"; else DEVICE="cpu"; fi
fi
[[ "$DEVICE" == "tpu" || "$DEVICE" == "cpu" ]] || die "--device must be tpu or cpu, got '$DEVICE'"
[[ -n "$DTYPE" ]] || { [[ "$DEVICE" == "tpu" ]] && DTYPE="bfloat16" || DTYPE="float32"; }

CMD=("$VENV/bin/python" -m sgl_jax.launch_server
     --model-path "$MODEL_PATH" --tokenizer-path "${TOKENIZER_PATH:-$MODEL_PATH}"
     --host "$HOST" --port "$PORT" --device "$DEVICE" --tp-size "$TP" --dtype "$DTYPE" --random-seed "$SEED")
[[ -n "$SERVED_NAME" ]] && CMD+=(--served-model-name "$SERVED_NAME")
[[ "$TOOL_PARSER" != "none" ]] && CMD+=(--tool-call-parser "$TOOL_PARSER")
[[ "$REASONING_PARSER" != "none" ]] && CMD+=(--reasoning-parser "$REASONING_PARSER")
[[ "$DEVICE" == "cpu" ]] && CMD+=(--attention-backend native)   # the default "fa" is a TPU Pallas kernel

case "$PROFILE" in
  "") ;;
  cpu-tiny)
    # Without these sglang-jax sizes its pools for a TPU host: ~11 GB reserved, and a precompile of
    # bs=4096 x 4096 tokens whose logits alone would need ~1 TB. --max-total-tokens caps the KV pool
    # (8192 tokens = 16 MB here); the fraction is then only a start-up check that fails when the host's
    # free memory drops by more than (1 - F) x free while the weights load, which other jobs on a shared
    # box do to 0.02. One extend and one decode bucket keep start-up to two compiles.
    : "${MEM_FRACTION:=0.2}" "${MAX_TOTAL_TOKENS:=8192}" "${CONTEXT_LENGTH:=2048}" "${MAX_RUNNING:=4}"
    CMD+=(--chunked-prefill-size 512 --max-prefill-tokens 512
          --precompile-token-paddings 512 --precompile-bs-paddings "$MAX_RUNNING") ;;
  *) die "unknown --profile '$PROFILE' (known: cpu-tiny)" ;;
esac
[[ -n "$MEM_FRACTION" ]] && CMD+=(--mem-fraction-static "$MEM_FRACTION")
[[ -n "$MAX_TOTAL_TOKENS" ]] && CMD+=(--max-total-tokens "$MAX_TOTAL_TOKENS")
[[ -n "$CONTEXT_LENGTH" ]] && CMD+=(--context-length "$CONTEXT_LENGTH")
[[ -n "$MAX_RUNNING" ]] && CMD+=(--max-running-requests "$MAX_RUNNING")
CMD+=("${EXTRA[@]}")

SHOWN=("${CMD[@]}")
if [[ -n "$API_KEY_ENV" ]]; then
  [[ -n "${!API_KEY_ENV:-}" ]] || die "env var $API_KEY_ENV (the API key) is not set"
  CMD+=(--api-key "${!API_KEY_ENV}")
  SHOWN+=(--api-key "\$$API_KEY_ENV")   # never print the key itself
fi

if [[ "$DRY_RUN" == 1 ]]; then
  echo "JAX_PLATFORMS=$DEVICE ${SHOWN[*]}"
  exit 0
fi
[[ -x "$VENV/bin/python" ]] || die "no sglang-jax venv at $VENV: run \`make sglang-venv\` first"
echo "sglang_jax.sh: JAX_PLATFORMS=$DEVICE ${SHOWN[*]}" >&2
export JAX_PLATFORMS="$DEVICE"
exec "${CMD[@]}"
