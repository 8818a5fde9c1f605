#!/usr/bin/env bash
# Submit launch/slurm.sbatch with the node/GPU counts chosen on the command line.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  cat <<'EOF'
Usage: launch/slurm_submit.sh --nodes N --gpus-per-node G --config PATH --workdir DIR
                              [options] [--config.<field>=<value> ...]

Submits launch/slurm.sbatch: N nodes x G GPUs, one process (SLURM task) per GPU, N*G processes in
all. The job runs in the repository root, so --config is relative to it; --workdir must be on a
file system every node can reach (or gs://...).

Options:
  --nodes N              number of nodes (required).
  --gpus-per-node G      GPUs per node = processes per node (required).
  --config PATH          fnc_jax config file (required).
  --workdir DIR          checkpoints and logs (required). A requeued or resubmitted job with the
                         same --workdir resumes from its last checkpoint.
  --time HH:MM:SS        time limit (default: the script's, 24:00:00).
  --partition NAME       SLURM partition.
  --account NAME         SLURM account.
  --job-name NAME        job name (default: fnc_jax).
  --cpus-per-task N      CPU cores per process, for the input pipeline (default: the script's, 8).
  --explicit-coordinator pass --coordinator_address/--num_processes/--process_id explicitly
                         instead of relying on JAX's SLURM auto-detection.
  --config.FIELD=VALUE   config overrides, passed through to fnc_jax.main.
  --dry-run              print the sbatch command instead of running it.
  -h, --help             this help.
EOF
}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$HERE")

NODES="" GPUS_PER_NODE="" CONFIG="" WORKDIR="" TIME="" PARTITION="" ACCOUNT="" JOB_NAME=""
CPUS_PER_TASK="" EXPLICIT=0

while (($#)); do
  if [[ $1 == --*=* && $1 != --config.* ]]; then
    set -- "${1%%=*}" "${1#*=}" "${@:2}"
  fi
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --explicit-coordinator) EXPLICIT=1 ;;
    --config.*) OVERRIDES+=("$1") ;;
    --nodes) need_value "$@"; NODES=$2; shift ;;
    --gpus-per-node) need_value "$@"; GPUS_PER_NODE=$2; shift ;;
    --config) need_value "$@"; CONFIG=$2; shift ;;
    --workdir) need_value "$@"; WORKDIR=$2; shift ;;
    --time) need_value "$@"; TIME=$2; shift ;;
    --partition) need_value "$@"; PARTITION=$2; shift ;;
    --account) need_value "$@"; ACCOUNT=$2; shift ;;
    --job-name) need_value "$@"; JOB_NAME=$2; shift ;;
    --cpus-per-task) need_value "$@"; CPUS_PER_TASK=$2; shift ;;
    *) die "unknown argument $1" ;;
  esac
  shift
done

require "$NODES" --nodes
require "$GPUS_PER_NODE" --gpus-per-node
require "$CONFIG" --config
require "$WORKDIR" --workdir
[[ $NODES =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$NODES'"
[[ $GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node must be a positive integer, got '$GPUS_PER_NODE'"

sbatch_args=(
  --nodes="$NODES"
  --ntasks-per-node="$GPUS_PER_NODE"  # one process per GPU
  --gpus-per-node="$GPUS_PER_NODE"
  --chdir="$REPO_ROOT"
)
[[ -z $TIME ]] || sbatch_args+=(--time="$TIME")
[[ -z $PARTITION ]] || sbatch_args+=(--partition="$PARTITION")
[[ -z $ACCOUNT ]] || sbatch_args+=(--account="$ACCOUNT")
[[ -z $JOB_NAME ]] || sbatch_args+=(--job-name="$JOB_NAME")
[[ -z $CPUS_PER_TASK ]] || sbatch_args+=(--cpus-per-task="$CPUS_PER_TASK")
if ((EXPLICIT)); then
  sbatch_args+=(--export=ALL,FNC_JAX_EXPLICIT_COORDINATOR=1)
fi

run sbatch "${sbatch_args[@]}" "$HERE/slurm.sbatch" --config="$CONFIG" --workdir="$WORKDIR" "${OVERRIDES[@]}"
