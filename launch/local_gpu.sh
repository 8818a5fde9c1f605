#!/usr/bin/env bash
# fnc_jax training on one machine: a single process that drives all (or the chosen) local GPUs.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  cat <<'EOF'
Usage: launch/local_gpu.sh --config PATH --workdir DIR [--gpus 0,1,...] [--dry-run]
                           [--config.<field>=<value> ...]

Runs `python -m fnc_jax.main` once, in the repository root. A single process sees every visible
GPU and splits each global batch across them; no jax.distributed set-up is needed (or done).

Options:
  --config PATH         fnc_jax config file, relative to the repository root (required).
  --workdir DIR         checkpoints and logs (required); rerunning with the same DIR resumes.
  --gpus LIST           GPUs to use, e.g. 0,1 (sets CUDA_VISIBLE_DEVICES; default: all).
  --config.FIELD=VALUE  config overrides, passed through to fnc_jax.main.
  --dry-run             print the command instead of running it.
  -h, --help            this help.
Environment: PYTHON (default: python) is the interpreter with fnc_jax and jax[cuda12] installed.
EOF
}

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CONFIG="" WORKDIR="" GPUS=""

while (($#)); do
  if [[ $1 == --*=* && $1 != --config.* ]]; then
    set -- "${1%%=*}" "${1#*=}" "${@:2}"
  fi
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --config.*) OVERRIDES+=("$1") ;;
    --config) need_value "$@"; CONFIG=$2; shift ;;
    --workdir) need_value "$@"; WORKDIR=$2; shift ;;
    --gpus) need_value "$@"; GPUS=$2; shift ;;
    *) die "unknown argument $1" ;;
  esac
  shift
done

require "$CONFIG" --config
require "$WORKDIR" --workdir

cmd=("${PYTHON:-python}" -m fnc_jax.main --config="$CONFIG" --workdir="$WORKDIR" "${OVERRIDES[@]}")
if [[ -n $GPUS ]]; then
  cmd=(env CUDA_VISIBLE_DEVICES="$GPUS" "${cmd[@]}")
fi
cd "$REPO_ROOT"
run "${cmd[@]}"
