#!/usr/bin/env bash
# The Gradio chat demo on http://127.0.0.1:7860 (same as `python -m parrot.serve.demo`).
# Without --model it serves runs/quickstart/stage2 when `make quickstart` has produced it, else an untrained tiny
# model. Options: --model DIR --host ADDR --port N --share --concurrency N --max-queue N --threads N (see --help).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-.venv/bin/python}
exec "$PY" -m parrot.serve.demo "$@"
