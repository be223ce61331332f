#!/usr/bin/env bash
# README command 1: train the debug recipe (tiny Llama on synthetic spike data) with
# FSDP2 on 2 CPU ranks (gloo), or on every local GPU (NCCL) when there are GPUs.
# Writes ./outputs/debug_model/{metrics.jsonl,config.toml,checkpoint/step-N}.
#   bash scripts/train_debug.sh [--section.key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
gpus=$(.venv/bin/python -c "import torch; print(torch.cuda.device_count())")
nproc=${NPROC:-$([ "$gpus" -gt 0 ] && echo "$gpus" || echo 2)}
# titan.launch is torchrun plus titan's endings: a recipe mistake is one line before any
# worker starts, and the exit status is the run's (see README, "Exit statuses").
exec .venv/bin/python -m titan.launch --standalone --nproc_per_node "$nproc" train.py \
  --job.config_file train_configs/debug_model.toml "$@"
