#!/usr/bin/env bash
# Run fnc_jax training on a Cloud TPU VM slice (single host or pod) with gcloud.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh COMMAND [options] [--config.<field>=<value> ...]

Commands:
  create    Create the TPU VM slice (gcloud compute tpus tpu-vm create).
  install   Fetch --repo at --ref on every worker and pip install it with jax[tpu].
  train     Start `python3 -m fnc_jax.main` on every worker in the background (nohup); all workers
            run the same command and jax.distributed auto-detects the pod. Refuses to start a
            second copy while one is running.
  logs      Follow worker 0's training log.
  delete    Delete the TPU VM slice.
  up        create + install + train.
  watch     Babysit a (Spot) slice until training finishes: poll its state; when it is PREEMPTED or
            TERMINATED, delete + create + install + train again with the same --workdir, so
            training resumes from the last checkpoint there (a missing slice is created, so
            `watch` alone also does `up`). Exits with the training's exit code.

Options:
  --name NAME               TPU VM name (all commands).
  --zone ZONE               e.g. us-central2-b (all commands).
  --project PROJECT         Google Cloud project (default: gcloud's configured project).
  --accelerator-type TYPE   e.g. v4-64, v5p-128 (create, up, watch).
  --version RUNTIME         TPU software version, e.g. tpu-ubuntu2204-base for v4,
                            v2-alpha-tpuv5 for v5p (create, up, watch).
  --spot                    Create a Spot VM: much cheaper, can be preempted at any time.
  --repo URL                git URL of this repository, reachable from the workers (install, ...).
  --ref REF                 branch, tag or commit to install (default: main).
  --config PATH             config file, relative to the repository root (train, up, watch).
  --workdir gs://BUCKET/DIR checkpoints and logs; must be on GCS so that every worker writes to
                            the same place and it survives preemption (train, up, watch).
  --config.FIELD=VALUE      config overrides, passed through to fnc_jax.main (train, up, watch).
  --poll-seconds N          watch: seconds between state checks (default: 300).
  --dry-run                 Print the gcloud commands instead of running them (watch: one round,
                            as if the slice had been preempted).
  -h, --help                This help.

Example:
  launch/tpu_pod.sh up --name fnc-v4 --zone us-central2-b --accelerator-type v4-64 \
      --version tpu-ubuntu2204-base --spot --repo https://github.com/ORG/fnc_jax.git --ref main \
      --config configs/imagenet.py --workdir gs://my-bucket/fnc/run1 --config.num_epochs=100
  launch/tpu_pod.sh watch ...same options...   # keep it running across preemptions
EOF
}

# Files on each worker. Single quotes: $HOME is expanded by the worker's shell, not here.
REMOTE_DIR='$HOME/fnc_jax'
REMOTE_LOG='$HOME/fnc_jax_train.log'
REMOTE_PID='$HOME/fnc_jax_train.pid'
REMOTE_EXIT='$HOME/fnc_jax_train.exitcode'

COMMAND="" NAME="" ZONE="" PROJECT="" ACCELERATOR_TYPE="" VERSION="" SPOT=0
REPO="" REF="main" CONFIG="" WORKDIR="" POLL_SECONDS=300

while (($#)); do
  # Accept both "--flag value" and "--flag=value" (overrides keep their "=").
  if [[ $1 == --*=* && $1 != --config.* ]]; then
    set -- "${1%%=*}" "${1#*=}" "${@:2}"
  fi
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --spot) SPOT=1 ;;
    --config.*) OVERRIDES+=("$1") ;;
    --name) need_value "$@"; NAME=$2; shift ;;
    --zone) need_value "$@"; ZONE=$2; shift ;;
    --project) need_value "$@"; PROJECT=$2; shift ;;
    --accelerator-type) need_value "$@"; ACCELERATOR_TYPE=$2; shift ;;
    --version) need_value "$@"; VERSION=$2; shift ;;
    --repo) need_value "$@"; REPO=$2; shift ;;
    --ref) need_value "$@"; REF=$2; shift ;;
    --config) need_value "$@"; CONFIG=$2; shift ;;
    --workdir) need_value "$@"; WORKDIR=$2; shift ;;
    --poll-seconds) need_value "$@"; POLL_SECONDS=$2; shift ;;
    -*) die "unknown option $1" ;;
    *)
      [[ -z $COMMAND ]] || die "unexpected argument $1"
      COMMAND=$1
      ;;
  esac
  shift
done

require "$COMMAND" "COMMAND (create|install|train|logs|delete|up|watch)"
require "$NAME" --name
require "$ZONE" --zone

tpu_vm() {  # gcloud compute tpus tpu-vm SUBCOMMAND NAME --zone=... [--project=...] ARGS...
  local subcommand=$1
  shift
  run gcloud compute tpus tpu-vm "$subcommand" "$NAME" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} "$@"
}

check_create_args() {
  require "$ACCELERATOR_TYPE" --accelerator-type
  require "$VERSION" --version
}
check_install_args() { require "$REPO" --repo; }
check_train_args() {
  require "$CONFIG" --config
  require "$WORKDIR" --workdir
  # Worker disks are neither shared nor kept across preemption: checkpoints must go to GCS.
  [[ $WORKDIR == gs://* ]] || die "--workdir must be a gs:// path on a TPU pod, got '$WORKDIR'"
}

do_create() {
  local spot=()
  ((SPOT)) && spot=(--spot)
  tpu_vm create --accelerator-type="$ACCELERATOR_TYPE" --version="$VERSION" "${spot[@]}"
}

do_install() {
  # Fetch exactly REF into a fixed directory (idempotent: works for a first install and for a
  # re-install after changing --ref), then install the package with the TPU build of jax.
  local script
  script="mkdir -p $REMOTE_DIR && cd $REMOTE_DIR && git init -q && git fetch -q --depth=1 $(quote "$REPO") $(quote "$REF")"
  script+=" && git checkout -q --detach FETCH_HEAD && python3 -m pip install -q 'jax[tpu]>=0.10.2,<0.11' ."
  tpu_vm ssh --worker=all --command="$script"
}

do_train() {
  # Every worker runs the same command; jax.distributed.initialize() finds the other workers
  # through the TPU metadata server. The wrapper records the exit code so `watch` can tell
  # "finished" from "still running"; the log is appended to so a resumed run keeps its history.
  local train script
  train="$(shell_join python3 -m fnc_jax.main --config="$CONFIG" --workdir="$WORKDIR" "${OVERRIDES[@]}"); echo \$? > $REMOTE_EXIT"
  script="cd $REMOTE_DIR || exit 1; if [ -f $REMOTE_PID ] && kill -0 \"\$(cat $REMOTE_PID)\" 2>/dev/null; then"
  script+=" echo 'fnc_jax training is already running' >&2; exit 1; fi;"
  script+=" rm -f $REMOTE_EXIT; nohup bash -c $(quote "$train") >> $REMOTE_LOG 2>&1 < /dev/null & echo \$! > $REMOTE_PID"
  tpu_vm ssh --worker=all --command="$script"
}

do_logs() { tpu_vm ssh --worker=0 --command="tail -n 200 -F $REMOTE_LOG"; }

do_delete() { tpu_vm delete --quiet; }

# Training status on worker 0: its exit code when finished, "running", or "stopped" (never
# started, or killed without recording an exit code, e.g. by a host maintenance restart).
training_status() {
  tpu_vm ssh --worker=0 --command="if [ -f $REMOTE_EXIT ]; then cat $REMOTE_EXIT; elif [ -f $REMOTE_PID ] && kill -0 \"\$(cat $REMOTE_PID)\" 2>/dev/null; then echo running; else echo stopped; fi" 2>/dev/null || true
}

# (Re)create the slice and resume training: the same --workdir holds the checkpoints, which
# fnc_jax.main restores on start. Returns non-zero when a step fails, e.g. no Spot capacity.
recover() {
  if [[ ${1-} == delete ]]; then
    do_delete || return 1
  fi
  do_create && do_install && do_train
}

do_watch() {
  local state status finished_seen=""
  while true; do
    if ((DRY_RUN)); then
      tpu_vm describe --format='value(state)'
      state=PREEMPTED  # show the recovery commands
    else
      state=$(tpu_vm describe --format='value(state)' 2>/dev/null) || state=MISSING
    fi
    case $state in
      PREEMPTED | TERMINATED)
        log "slice $NAME is $state: re-creating it and resuming from $WORKDIR"
        finished_seen=""
        recover delete || log "re-creating $NAME failed; retrying in ${POLL_SECONDS}s"
        ;;
      MISSING)
        log "slice $NAME not found: creating it"
        finished_seen=""
        recover || log "creating $NAME failed; retrying in ${POLL_SECONDS}s"
        ;;
      READY)
        status=$(training_status | tail -n 1)
        if [[ $status =~ ^[0-9]+$ ]]; then
          # A preempted run also exits (SIGTERM) shortly before the slice turns PREEMPTED, so
          # only trust an exit code that is still there one poll later on a READY slice.
          if [[ -n $finished_seen ]]; then
            log "training finished with exit code $status"
            return "$status"
          fi
          finished_seen=1
        elif [[ $status == stopped ]]; then
          log "slice $NAME is READY but training is not running: starting it"
          do_train || log "starting training failed; retrying in ${POLL_SECONDS}s"
        fi
        ;;
      *) log "slice $NAME state: $state; waiting" ;;
    esac
    if ((DRY_RUN)); then
      return 0
    fi
    sleep "$POLL_SECONDS"
  done
}

case $COMMAND in
  create) check_create_args; do_create ;;
  install) check_install_args; do_install ;;
  train) check_train_args; do_train ;;
  logs) do_logs ;;
  delete) do_delete ;;
  up | watch)
    check_create_args; check_install_args; check_train_args
    if [[ $COMMAND == up ]]; then
      do_create; do_install; do_train
    else
      do_watch
    fi
    ;;
  *) die "unknown command $COMMAND (expected create|install|train|logs|delete|up|watch)" ;;
esac
