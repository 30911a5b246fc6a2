#!/usr/bin/env bash
# Shared launcher of scripts/train_stage{1,2}.sh (not called directly). Usage: _launch.sh STAGE DEFAULT_DS -- ARGS
set -euo pipefail
STAGE=$1; DEFAULT_DS=$2; shift 2
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CALLER_DIR=$PWD
# OPTION VALUE -> the path to pass after the cd below. A relative path keeps the meaning it has in the caller's
# directory: made absolute when it exists there, or when it exists nowhere under the repository either (an output
# folder to create); one that exists only under the repository (configs/train/tiny_stage1.yaml typed from
# elsewhere) is left to resolve there. Paths typed in the repository itself, absolute paths, values that look like
# options (argparse reports them) and `--deepspeed none` pass unchanged.
abs_path() {
  local opt=$1 value=$2
  if [[ "$CALLER_DIR" == "$ROOT" || -z "$value" || "$value" == /* || "$value" == -* ]] \
      || [[ $opt == --deepspeed && $value == [Nn][Oo][Nn][Ee] ]]; then
    printf '%s' "$value"
  elif [[ -e "$CALLER_DIR/$value" || ! -e "$ROOT/$value" ]]; then
    printf '%s' "$CALLER_DIR/$value"
  else
    printf '%s' "$value"
  fi
}
cd "$ROOT"
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON; elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
BIN="$(dirname "$PY")"

NPROC=""
ARGS=()
HAS_DS=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help)
      cat <<USAGE
usage: scripts/train_stage${STAGE}.sh [--nproc N] [--no-deepspeed] [--config YAML] [TRAINING ARGUMENTS...]

Launcher options:
  --nproc N        processes (default: all visible GPUs; 1 on a CPU-only machine)
  --no-deepspeed   train without DeepSpeed (plain DDP / one process), also where --config sets one
                   (passes --deepspeed none)
Paths (--config --model --output-dir --data-root --data-registry --ceft-ranking --llm --vision --deepspeed) are
relative to your directory; one found only under the repository (configs/...) is taken from there.
Launch: GPUs -> the 'deepspeed' launcher (--deepspeed ${DEFAULT_DS} unless given);
        CPU with --nproc > 1 -> torchrun (gloo); otherwise a single process.
Environment: PYTHON (interpreter; default .venv/bin/python), MASTER_PORT (default 29500).

Training arguments (python -m parrot.train --stage ${STAGE} ...):
USAGE
      "$PY" -m parrot.train --help | sed -n '/^options:/,$p'
      exit 0 ;;
    --nproc) NPROC=$2; shift 2 ;;
    --nproc=*) NPROC=${1#*=}; shift ;;
    --no-deepspeed) HAS_DS=1; ARGS+=(--deepspeed none); shift ;;  # `none` also overrides a YAML's deepspeed:
    --config=*|--model=*|--output-dir=*|--data-root=*|--data-registry=*|--ceft-ranking=*|--llm=*|--vision=*|\
    --deepspeed=*)
      OPT=${1%%=*}; [[ $OPT == --deepspeed ]] && HAS_DS=1
      ARGS+=("$OPT=$(abs_path "$OPT" "${1#*=}")"); shift ;;
    --config|--model|--output-dir|--data-root|--data-registry|--ceft-ranking|--llm|--vision|--deepspeed)
      [[ $1 == --deepspeed ]] && HAS_DS=1
      if [[ $# -lt 2 ]]; then ARGS+=("$1"); shift  # no value: argparse reports it
      else ARGS+=("$1" "$(abs_path "$1" "$2")"); shift 2; fi ;;
    *) ARGS+=("$1"); shift ;;
  esac
done

# The script's stage is passed as --stage and would override a YAML's `stage:`: refuse a config or a --stage flag
# that asks for the other stage instead of silently training the wrong one.
CONFIG=""
for ((i = 0; i < ${#ARGS[@]}; i++)); do
  case "${ARGS[$i]}" in
    --config) CONFIG=${ARGS[$((i + 1))]:-} ;;
    --config=*) CONFIG=${ARGS[$i]#*=} ;;
    --stage|--stage=*)
      echo "scripts/train_stage${STAGE}.sh: do not pass --stage (this script trains stage ${STAGE}; use scripts/train_stage{1,2}.sh)" >&2
      exit 2 ;;
  esac
done
if [[ -n "$CONFIG" && -f "$CONFIG" ]]; then
  # "STAGE HAS_DEEPSPEED" of the YAML; one that does not parse prints nothing here (parrot.train then reports it
  # with the file name). A YAML's own `deepspeed:` must not be replaced by this script's default on GPUs.
  read -r CONFIG_STAGE CONFIG_DS < <("$PY" - "$CONFIG" <<'PYEOF' 2>/dev/null || true
import sys, yaml
data = yaml.safe_load(open(sys.argv[1]))
data = data if isinstance(data, dict) else {}
print(data.get("stage", "") or "-", int(data.get("deepspeed") is not None))
PYEOF
) || true
  [[ "${CONFIG_STAGE:-}" == "-" ]] && CONFIG_STAGE=""
  [[ "${CONFIG_DS:-0}" == 1 ]] && HAS_DS=1
  if [[ -n "$CONFIG_STAGE" && "$CONFIG_STAGE" != "$STAGE" ]]; then
    case "$CONFIG_STAGE" in
      1|2) HINT="run it with scripts/train_stage${CONFIG_STAGE}.sh" ;;
      *) HINT="stage must be 1 or 2" ;;
    esac
    echo "scripts/train_stage${STAGE}.sh: $CONFIG sets stage: ${CONFIG_STAGE}; ${HINT}" >&2
    exit 2
  fi
fi

GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [[ "$GPUS" -gt 0 ]]; then
  NPROC=${NPROC:-$GPUS}
  [[ $HAS_DS -eq 0 ]] && ARGS+=(--deepspeed "$DEFAULT_DS")
  exec "$BIN/deepspeed" --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29500}" --no_local_rank \
    --module parrot.train --stage "$STAGE" "${ARGS[@]}"
fi
NPROC=${NPROC:-1}
if [[ "$NPROC" -gt 1 ]]; then
  exec "$BIN/torchrun" --nproc_per_node "$NPROC" --master_port "${MASTER_PORT:-29500}" \
    -m parrot.train --stage "$STAGE" "${ARGS[@]}"
fi
exec "$PY" -m parrot.train --stage "$STAGE" "${ARGS[@]}"
