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
log=.venv/setup.log
: >"$log"
run() {  # quiet on success; on failure, the end of pip's output and a non-zero exit
  "$@" >>"$log" 2>&1 || {
    tail -n 20 "$log" >&2
    echo "error: '$*' failed (full log: $log)" >&2
    exit 1
  }
}
run .venv/bin/python -m pip install --upgrade pip
# torch is pinned in the lock file: an unpinned torch would pull gigabytes of CUDA
# packages on a CPU machine.
run .venv/bin/python -m pip install -r requirements.lock
run .venv/bin/python -m pip install --no-deps -e .
run .venv/bin/python -c "import torch, datasets, transformers, titan"
cp requirements.lock .venv/.installed-lock
echo "set up .venv (torch $(.venv/bin/python -c 'import torch; print(torch.__version__)'))"
