#!/bin/bash
# synthetic-8B-131k: Llama-3.1-8B at 131072 tokens from random init on synthetic spike data.
# Submit from the repo root (README, "Training on a Slurm cluster"):
#   source slurm/site.env && sbatch slurm/train_synthetic_8B_131k.sh [--section.key=value ...]
#SBATCH --job-name=synthetic-8B-131k
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --output=slurm/logs/%x-%j.log
#SBATCH --open-mode=append
exec bash "${TITAN_DIR:-$SLURM_SUBMIT_DIR}/slurm/launch.sh" synthetic_8b_131k "$@"
