#!/bin/bash
# debug: the tiny debug recipe, for checking a site's setup in a minute (CPU: TITAN_NPROC_PER_NODE=2).
# Submit from the repo root (README, "Training on a Slurm cluster"):
#   source slurm/site.env && sbatch slurm/train_debug.sh [--section.key=value ...]
#SBATCH --job-name=debug
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --time=00:30:00
#SBATCH --signal=B:USR1@180
#SBATCH --output=slurm/logs/%x-%j.log
#SBATCH --open-mode=append
exec bash "${TITAN_DIR:-$SLURM_SUBMIT_DIR}/slurm/launch.sh" debug_model "$@"
