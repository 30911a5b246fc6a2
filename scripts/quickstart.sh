#!/usr/bin/env bash
# The tiny end-to-end quickstart (same as `make quickstart`): synthetic data -> stage 1 -> stage 2 -> MMMB table.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-.venv/bin/python}
exec "$PY" -m parrot.quickstart "$@"
