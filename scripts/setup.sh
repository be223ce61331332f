#!/usr/bin/env bash
# Create ./.venv with the pinned dependencies (requirements.lock) and titan installed in
# editable mode. Idempotent: does nothing when the venv already matches the lock file.
#   bash scripts/setup.sh        (the train and test scripts call it for you)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ -x .venv/bin/python ] && cmp -s requirements.lock .venv/.installed-lock; then
  exit 0
fi
echo "setting up .venv (pinned dependencies from requirements.lock; takes a few minutes once)"
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip 2>&1 | grep -v WARNING || true
# torch is pinned in the lock file: an unpinned torch would pull gigabytes of CUDA
# packages on a CPU machine.
.venv/bin/python -m pip install --quiet -r requirements.lock 2>&1 | grep -v WARNING || true
.venv/bin/python -m pip install --quiet --no-deps -e . 2>&1 | grep -v WARNING || true
.venv/bin/python -c "import torch, datasets, transformers, titan" \
  || { echo "error: .venv set-up failed; see the pip output above" >&2; exit 1; }
cp requirements.lock .venv/.installed-lock
