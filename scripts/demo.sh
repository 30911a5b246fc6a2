#!/usr/bin/env bash
# The Gradio chat demo on http://127.0.0.1:7860 (same as `python -m parrot.serve.demo`).
# Without --model it serves runs/quickstart/stage2 when `make quickstart` has produced it, else an untrained tiny
# model. Options: --model DIR --host ADDR --port N --share --concurrency N --max-queue N --threads N (see --help).
# Runs from the caller's directory, so a relative --model path means what it says there.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"
else PY=python3; fi
# this checkout's parrot package, installed or not; not a `parrot` folder that happens to be in the caller's directory
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1
exec "$PY" -m parrot.serve.demo "$@"
