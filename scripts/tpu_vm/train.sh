#!/usr/bin/env bash
# Runs `python -m lsm.train` on every worker of the TPU VM (--worker=all) into a gs:// run
# directory, and reruns it until it finishes: lsm.train resumes from the newest checkpoint there.
# A preempted Spot TPU / suspended queued resource is deleted, re-created and deployed first.
#   bash scripts/tpu_vm/train.sh --name=lsm --zone=us-west4-a --workdir=gs://BUCKET/runs/{name}
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
USAGE="Usage: bash scripts/tpu_vm/train.sh --workdir=gs://BUCKET/PATH [options] [key=value ...]
Runs on every worker: cd ~/lsm && .venv/bin/python -m lsm.train --config CONFIG
train.output_dir=WORKDIR [key=value ...] (each process joins the others through
jax.distributed, which lsm initialises itself on a TPU VM, and reads its own shard of the data).
Until every worker's lsm.train exits 0 it reruns the same command, waiting --backoff seconds
(doubling up to 30 minutes) in between, at most --max-restarts times; if the TPU was preempted
(TPU VM PREEMPTED / TERMINATED, queued resource SUSPENDED / FAILED) it is first deleted,
re-created with the same options and deployed. Exit status 2 (config error) or 3 (training
stopped, e.g. non-finite losses) of lsm.train stops at once. Run it where it can stay up for the
whole run (tmux on a small VM): closing it stops the workers' training.

  --workdir=gs://BUCKET/PATH  the run directory (train.output_dir); {name} is the config's name
  --config=FILE               config, relative to the repository [configs/tpu_1b_32k.yaml]
  --max-restarts=N            reruns after the first attempt [20]
  --backoff=SECONDS           wait before the first rerun [60]
  key=value ...               config overrides, e.g. train.steps=20000 'data.files=[gs://...]'
With --dry-run it prints the commands of a first attempt, of one recovery from a preemption and
of the rerun."

CONFIG=configs/tpu_1b_32k.yaml
WORKDIR=
MAX_RESTARTS=20
BACKOFF=60
MAX_BACKOFF=1800
OVERRIDES=()
while [ $# -gt 0 ]; do
  case $1 in
    --config|--config=*) option_value "$@"; CONFIG=$VALUE ;;
    --workdir|--workdir=*) option_value "$@"; WORKDIR=$VALUE ;;
    --max-restarts|--max-restarts=*) option_value "$@"; MAX_RESTARTS=$VALUE ;;
    --backoff|--backoff=*) option_value "$@"; BACKOFF=$VALUE ;;
    -*)
      common_option "$@"
      [ "$SHIFT" -gt 0 ] || die "unknown option '$1' (see --help)" ;;
    *=*) OVERRIDES+=("$1"); SHIFT=1 ;;
    *) die "argument '$1' is neither an option nor a key=value config override (see --help)" ;;
  esac
  shift "$SHIFT"
done
check_common_options
[ -n "$WORKDIR" ] || die "--workdir is required: a gs://BUCKET/PATH run directory"
[[ $WORKDIR == gs://?* ]] \
  || die "--workdir must be a gs:// path (every worker writes there and a re-created TPU VM" \
         "resumes from it), got '$WORKDIR'"
[ -f "$REPO_ROOT/$CONFIG" ] \
  || die "--config: no file '$CONFIG' in $REPO_ROOT (the path is relative to the repository," \
         "which deploy.sh copies to the workers)"
[[ $MAX_RESTARTS =~ ^[0-9]+$ ]] || die "--max-restarts must be an int >= 0, got '$MAX_RESTARTS'"
[[ $BACKOFF =~ ^[0-9]+$ ]] || die "--backoff must be seconds, an int >= 0, got '$BACKOFF'"
for override in ${OVERRIDES[@]+"${OVERRIDES[@]}"}; do
  [[ $override != train.output_dir=* ]] \
    || die "give the run directory with --workdir, not '$override'"
done

TRAIN=(.venv/bin/python -m lsm.train --config "$CONFIG" "train.output_dir=$WORKDIR"
       ${OVERRIDES[@]+"${OVERRIDES[@]}"})
# gcloud's exit status does not say how each worker's command ended: each worker prints it.
MARKER="lsm.train exit status"
REMOTE="cd ~/lsm && $(quote_all "${TRAIN[@]}"); status=\$?; "
REMOTE+="echo \"$MARKER \$status on \$(hostname)\"; exit \$status"

# Deletes (if it still exists), re-creates and deploys the TPU; fails if a step does.
recreate() {
  local state=$1
  if [ -n "$state" ]; then
    bash "$TPU_VM_DIR/delete.sh" "${COMMON_ARGS[@]}" || return 1
  fi
  bash "$TPU_VM_DIR/create.sh" "${COMMON_ARGS[@]}" \
    && bash "$TPU_VM_DIR/deploy.sh" "${COMMON_ARGS[@]}"
}

attempt=0
delay=$BACKOFF
lost=0  # the TPU is gone and re-creating it has not worked yet
while :; do
  attempt=$((attempt + 1))
  log "attempt $attempt of $((MAX_RESTARTS + 1)): lsm.train on every worker of $NAME into $WORKDIR"
  output=$(mktemp)
  { gcloud_tpus tpu-vm ssh "$NAME" --worker=all --command="$REMOTE" || true; } | tee "$output"
  statuses=$(grep -oE "$MARKER [0-9]+" "$output" | awk '{print $NF}' | sort -u | tr '\n' ' ' \
               || true)
  rm -f "$output"
  if [ "$DRY_RUN" = 1 ]; then  # nothing ran: show one recovery from a preemption and the rerun
    [ "$attempt" = 1 ] || { log "dry run: the rerun would resume from $WORKDIR"; exit 0; }
    statuses="1 "
  fi
  if [ "$statuses" = "0 " ]; then
    log "done: lsm.train exited 0 on every worker; the run is in $WORKDIR"
    exit 0
  fi
  for status in $statuses; do
    case $status in
      2|3)
        echo "error: lsm.train exited $status on a worker (2: config error, 3: training stopped," \
             "e.g. non-finite losses; see its message above); rerunning would not help" >&2
        exit "$status" ;;
    esac
  done
  log "lsm.train did not finish on every worker (exit statuses: ${statuses:-none reported})"
  if [ "$attempt" -gt "$MAX_RESTARTS" ]; then
    echo "error: giving up after $attempt attempts (--max-restarts=$MAX_RESTARTS); rerun this" \
         "script to go on from the newest checkpoint in $WORKDIR" >&2
    exit 1
  fi
  state=$(tpu_state)
  if [ "$DRY_RUN" = 1 ]; then
    state=$([ "$QUEUED" = 1 ] && echo SUSPENDED || echo PREEMPTED)
  fi
  case $state in
    PREEMPTED|TERMINATED|SUSPENDING|SUSPENDED|FAILED) lost=1 ;;
  esac
  if [ "$lost" = 1 ]; then
    log "$NAME is ${state:-not found}: deleting, re-creating and deploying it"
    if recreate "$state"; then
      lost=0
    else
      log "re-creating $NAME failed; trying again after the wait"
    fi
  else
    log "$NAME is ${state:-in an unknown state}: rerunning; lsm.train resumes from its checkpoint"
  fi
  log "waiting ${delay}s"
  if [ "$DRY_RUN" != 1 ]; then
    sleep "$delay"
  fi
  delay=$((delay * 2 > MAX_BACKOFF ? MAX_BACKOFF : delay * 2))
done
