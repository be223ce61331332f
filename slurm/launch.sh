#!/usr/bin/env bash
# Shared Slurm launcher: one torchrun per node of the job, training one titan recipe.
#
# Every slurm/train_*.sh is an #SBATCH header plus a call of this script, so
#   source slurm/site.env && sbatch slurm/train_primate_8B_131k.sh [--section.key=value ...]
# ends up here as `slurm/launch.sh primate_8b_131k [--section.key=value ...]`. It also works
# by hand inside an allocation (`salloc -N2 ...`, then `slurm/launch.sh debug_model`).
#
# RECIPE is a name under train_configs/ (without .toml) or a path to a .toml file; the other
# arguments pass through to train.py as config overrides. Site settings come from
# slurm/site.env (copy slurm/site.env.example) or the environment; the variables read here:
#   TITAN_SITE_ENV        site file to source (default: <repo>/slurm/site.env, if it exists)
#   TITAN_PYTHON          python to run (default: <repo>/.venv/bin/python, else python3)
#   TITAN_NPROC_PER_NODE  ranks per node (default: the GPUs Slurm gave the job on a node;
#                         required when the job has no GPUs: CPU ranks with gloo)
#   TITAN_MAX_RESTARTS    torchrun restarts of a failed worker group (default: 3)
#   TITAN_RDZV_HOST       rendezvous address (default: the first node's name)
#   TITAN_RDZV_PORT       rendezvous port on the first node (default: a free one)
#   TITAN_NET_IFACE       network interface for NCCL and gloo sockets (default: their choice)
#   TITAN_SRUN_ARGS       extra srun options, e.g. pyxis' --container-image=...
#   TITAN_CMD_PREFIX      command that wraps python, e.g. "apptainer exec --nv img.sif"
#   TITAN_RANK_LOG_DIR    per-rank stdout/stderr files (default: beside the job log)
#   TITAN_REQUEUE         1 (default): after a signal-triggered save, requeue the job
#   TITAN_SHUTDOWN_TIMEOUT_S  seconds workers get to finish that save (default 900)
#
# Stopping: Slurm's warning signal (#SBATCH --signal=B:USR1@N in the recipe scripts) reaches
# this batch shell, which passes it to the job step; torchrun's agents forward it to the
# workers, which finish their step, save a complete checkpoint and exit with status 75.
# The job is then requeued (or, where the site forbids it, the resubmit command is
# printed and the job exits 75). With checkpointing off the run exits 6 instead, and the
# job is not requeued: it would start over. Any other exit status is the run's (see README).
set -euo pipefail

die() {
    echo "launch.sh: error: $*" >&2
    exit 1
}

[[ $# -ge 1 ]] || die "usage: slurm/launch.sh RECIPE [--section.key=value ...]"
[[ -n "${SLURM_JOB_ID:-}" ]] || die "not inside a Slurm job; submit a slurm/train_*.sh with sbatch"
recipe=$1
shift

titan_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$titan_dir"

# Site file: sbatch options already took effect at submission; here it sets the run's
# environment and may define titan_site_setup (module loads, containers, ...).
site_env=${TITAN_SITE_ENV:-$titan_dir/slurm/site.env}
# Module and conda scripts often read unset variables: no `set -u` while they run.
set +u
if [[ -f "$site_env" ]]; then
    # shellcheck source=/dev/null  # checked on its own: slurm/site.env.example
    source "$site_env"
elif [[ -n "${TITAN_SITE_ENV:-}" ]]; then
    die "TITAN_SITE_ENV=$TITAN_SITE_ENV does not exist"
fi
if declare -F titan_site_setup >/dev/null; then
    titan_site_setup
fi
set -u

if [[ "$recipe" == *.toml ]]; then
    config=$recipe
else
    config=train_configs/$recipe.toml
fi
[[ -f "$config" ]] || die "recipe $recipe: no config file $titan_dir/$config"

if [[ -n "${TITAN_PYTHON:-}" ]]; then
    python=$TITAN_PYTHON
elif [[ -x "$titan_dir/.venv/bin/python" ]]; then
    python=$titan_dir/.venv/bin/python
else
    python=python3
fi

# GPUs Slurm gave this job on a node; sites without GRES still show them to nvidia-smi.
count_gpus() {
    if [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
        echo "$SLURM_GPUS_ON_NODE"
    elif [[ -n "${CUDA_VISIBLE_DEVICES:-}" && "$CUDA_VISIBLE_DEVICES" != NoDevFiles ]]; then
        local ids
        IFS=, read -ra ids <<<"$CUDA_VISIBLE_DEVICES"
        echo "${#ids[@]}"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}
gpus=$(count_gpus)
if [[ -n "${TITAN_NPROC_PER_NODE:-}" ]]; then
    ranks=$TITAN_NPROC_PER_NODE
elif [[ "$gpus" -gt 0 ]]; then
    ranks=$gpus
else
    die "the job has no GPUs: request them (SBATCH_GPUS_PER_NODE in slurm/site.env, or" \
        "sbatch --gpus-per-node=N), or set TITAN_NPROC_PER_NODE=N for N CPU ranks per node"
fi
if [[ "$gpus" -gt 0 ]]; then
    device="$gpus GPU(s) per node, nccl"
else
    device="no GPUs: CPU ranks, gloo"
fi

cpus=${SLURM_CPUS_ON_NODE:-$(nproc)}
nnodes=${SLURM_NNODES:-1}
head_node=${TITAN_RDZV_HOST:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
# The batch step runs on the first node: a port nothing listens on here is free on the
# rendezvous host. Below the ephemeral range, spread by job id; no python needed (containers).
free_port() {
    local port=$((20000 + SLURM_JOB_ID % 10000))
    while command -v ss >/dev/null 2>&1 && [[ -n "$(ss -Htln "sport = :$port")" ]]; do
        port=$((port + 1))
    done
    echo "$port"
}
port=${TITAN_RDZV_PORT:-$(free_port)}

# One job log (sbatch --output) with rank-0 output; every rank's own files beside it.
job_log=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *StdOut=//p')
if [[ -n "$job_log" && "$job_log" != /dev/* ]]; then
    rank_logs=${TITAN_RANK_LOG_DIR:-${job_log%.*}.ranks}
else
    rank_logs=${TITAN_RANK_LOG_DIR:-$titan_dir/slurm/logs/$SLURM_JOB_ID.ranks}
fi
mkdir -p "$rank_logs"

# Defaults that are safe on any site; the site file or the environment overrides them.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-$HF_HUB_OFFLINE}
export HF_HOME=${HF_HOME:-$HOME/.cache/huggingface}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cpus / ranks > 0 ? cpus / ranks : 1))}
export PYTHONUNBUFFERED=1
export PYTHONFAULTHANDLER=1
# shellcheck disable=SC2016  # a template torchrun fills in, not a shell expansion
export TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE='[rank${rank}]:'
if [[ -n "${TITAN_NET_IFACE:-}" ]]; then
    export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$TITAN_NET_IFACE}
    export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$TITAN_NET_IFACE}
fi

read -ra srun_args <<<"${TITAN_SRUN_ARGS:-}"
read -ra cmd_prefix <<<"${TITAN_CMD_PREFIX:-}"

echo "titan: job $SLURM_JOB_ID, recipe $config, $nnodes node(s) x $ranks rank(s) ($device)"
echo "titan: rendezvous $head_node:$port, python $python, max restarts" \
    "${TITAN_MAX_RESTARTS:-3}, per-rank logs in $rank_logs"

# The recipe and overrides, checked once here: a mistake is one line and exit status 2,
# before srun starts anything on any node.
# (${a[@]+"${a[@]}"}: an empty array under `set -u` on bash before 4.4)
TITAN_CHECK_ONLY=1 ${cmd_prefix[@]+"${cmd_prefix[@]}"} "$python" -m titan.launch \
    --nnodes="$nnodes" --nproc_per_node="$ranks" train.py --job.config_file "$config" "$@"

signal_seen=""
srun_pid=""
# shellcheck disable=SC2317  # called by the traps below
forward() {  # a trapped signal: ask the job step to save and stop
    signal_seen=$1
    if [[ -n "$srun_pid" ]]; then
        # always as USR1: srun answers TERM by killing its tasks, but forwards USR1
        kill -s USR1 "$srun_pid" 2>/dev/null || true
    fi
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

srun --nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1 --cpus-per-task="$cpus" \
    --kill-on-bad-exit=1 ${srun_args[@]+"${srun_args[@]}"} \
    ${cmd_prefix[@]+"${cmd_prefix[@]}"} "$python" -m titan.launch \
    --nnodes="$nnodes" --nproc_per_node="$ranks" \
    --rdzv_backend=c10d --rdzv_endpoint="$head_node:$port" --rdzv_id="$SLURM_JOB_ID" \
    --max_restarts="${TITAN_MAX_RESTARTS:-3}" \
    --log_dir="$rank_logs" --tee=3 --local_ranks_filter=0 \
    train.py --job.config_file "$config" "$@" &
srun_pid=$!
rc=0
while kill -0 "$srun_pid" 2>/dev/null; do  # `wait` returns early on a trapped signal
    wait "$srun_pid" && rc=0 || rc=$?
done
# srun may have ended just as a signal cut a `wait` short: its status is still kept
# (127: the last `wait` already returned it)
if wait "$srun_pid" 2>/dev/null; then
    rc=0
else
    last=$?
    [[ $last -eq 127 ]] || rc=$last
fi

if [[ $rc -eq 75 ]]; then
    echo "titan: the run stopped on ${signal_seen:-a signal} after saving a checkpoint"
    if [[ "${TITAN_REQUEUE:-1}" == 1 ]] && scontrol requeue "$SLURM_JOB_ID"; then
        echo "titan: job $SLURM_JOB_ID requeued: it resumes from that checkpoint when it runs again"
        exit 0
    fi
    script=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *Command=//p')
    echo "titan: not requeued; resubmit to continue: sbatch ${script:-slurm/<script>.sh} $*"
fi
exit "$rc"
