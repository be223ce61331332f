#!/usr/bin/env bash
# README command 2: run the test suite (CPU, gloo, several ranks per test).
#   bash scripts/test.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
