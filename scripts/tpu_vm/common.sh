# Shared by create.sh, deploy.sh, train.sh and delete.sh (sourced, not run): the options they
# have in common, how every gcloud command is printed (and only printed under --dry-run or
# DRY_RUN=1), and the steps train.sh repeats after a preemption (create, wait, deploy).
# See docs/tpu_vm.md.

TPU_VM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$TPU_VM_DIR/../.." && pwd)

NAME=lsm
ZONE=us-west4-a
PROJECT=  # empty: gcloud's configured project
ACCELERATOR_TYPE=v5litepod-8
RUNTIME_VERSION=  # empty: the one for ACCELERATOR_TYPE (check_common_options)
SPOT=0
QUEUED=0
PYTHON_VERSION=3.12
DATA=  # gs:// folder deploy.sh copies to /data on every worker; empty: none
DRY_RUN=${DRY_RUN:-0}
POLL_SECONDS=${POLL_SECONDS:-60}

COMMON_USAGE="Options shared by the scripts in scripts/tpu_vm/:
  --name=NAME              TPU VM (and queued resource) name [$NAME]
  --zone=ZONE              zone [$ZONE]
  --project=PROJECT        project [gcloud's configured project]
  --accelerator-type=TYPE  e.g. v5litepod-8, v5litepod-32, v4-8, v6e-8 [$ACCELERATOR_TYPE]
  --version=VERSION        TPU software (runtime) version [by accelerator type:
                           v2-alpha-tpuv5-lite for v5e, v2-alpha-tpuv5 for v5p,
                           v2-alpha-tpuv6e for v6e, tpu-ubuntu2204-base for v4 and older]
  --spot                   Spot TPUs (cheaper, can be preempted at any time)
  --queued                 a queued resource (gcloud compute tpus queued-resources) instead of a
                           TPU VM created at once; it waits for capacity
  --python=X.Y             Python of the workers' virtual environment [$PYTHON_VERSION]
  --data=gs://BUCKET/PATH  deploy.sh copies this folder to /data on every worker (training reads
                           local files: data.files, data.tokenizer_path) [none]
  --dry-run                print the commands instead of running them (also: DRY_RUN=1)
  -h, --help               this message"

die() {
  echo "error: $*" >&2
  exit 2
}

log() {
  echo "# $*"
}

# One word as the shell reads it back: as is when it has no special characters, else in single
# quotes (--option='value' for an option's value).
quote() {
  local safe='^[A-Za-z0-9_./:=@%+,-]+$' option_value='^(--[A-Za-z0-9-]+=)(.+)$'
  if [[ $1 =~ $safe ]]; then
    printf '%s' "$1"
  elif [[ $1 =~ $option_value ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    quote_always "${BASH_REMATCH[2]}"
  else
    quote_always "$1"
  fi
}

quote_always() {
  printf "'%s'" "${1//\'/\'\\\'\'}"
}

quote_all() {
  local word out=()
  for word in "$@"; do
    out+=("$(quote "$word")")
  done
  echo "${out[*]}"
}

# Prints a command to stderr as "+ command" (copy-pastable, like `set -x`), then runs it unless
# this is a dry run. Stderr keeps the command out of $(...) captures of its output.
run() {
  echo "+ $(quote_all "$@")" >&2
  if [ "$DRY_RUN" = 1 ]; then
    return 0
  fi
  "$@"
}

# gcloud compute tpus GROUP VERB ARGS... in the zone and project of this run.
gcloud_tpus() {
  local where=(--zone="$ZONE")
  if [ -n "$PROJECT" ]; then
    where+=(--project="$PROJECT")
  fi
  run gcloud compute tpus "$@" "${where[@]}"
}

join_by() {
  local separator=$1 joined=$2
  shift 2
  while [ $# -gt 0 ]; do
    joined+="$separator$1"
    shift
  done
  printf '%s' "$joined"
}

# Parses one shared option. Sets SHIFT to the words it took: 0 when "$1" is not one of them.
common_option() {
  local option=$1 value
  SHIFT=1
  case $option in
    --dry-run) DRY_RUN=1; return ;;
    --spot) SPOT=1; return ;;
    --queued) QUEUED=1; return ;;
    -h|--help) echo "$USAGE"; echo; echo "$COMMON_USAGE"; exit 0 ;;
  esac
  case $option in
    --name|--zone|--project|--accelerator-type|--version|--python|--data)
      [ $# -ge 2 ] || die "$option needs a value"
      value=$2; SHIFT=2 ;;
    --name=*|--zone=*|--project=*|--accelerator-type=*|--version=*|--python=*|--data=*)
      value=${option#*=}; option=${option%%=*} ;;
    *) SHIFT=0; return ;;
  esac
  case $option in
    --name) NAME=$value ;;
    --zone) ZONE=$value ;;
    --project) PROJECT=$value ;;
    --accelerator-type) ACCELERATOR_TYPE=$value ;;
    --version) RUNTIME_VERSION=$value ;;
    --python) PYTHON_VERSION=$value ;;
    --data) DATA=$value ;;
  esac
}

# The value of the script's own option "--key=value" or "--key value" in VALUE, the words it
# took in SHIFT.
# shellcheck disable=SC2034  # VALUE and SHIFT are read by the scripts that source this file
option_value() {
  local option=$1
  if [[ $option == *=* ]]; then
    VALUE=${option#*=}; SHIFT=1
  else
    [ $# -ge 2 ] || die "$option needs a value"
    VALUE=$2; SHIFT=2
  fi
}

check_common_options() {
  [[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] \
    || die "--name must be lowercase letters, digits and hyphens, starting with a letter," \
           "got '$NAME'"
  [[ $ZONE =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] || die "--zone must look like us-west4-a, got '$ZONE'"
  [[ $ACCELERATOR_TYPE =~ ^v[0-9][a-z]*-[0-9]+$ ]] \
    || die "--accelerator-type must look like v5litepod-8 or v4-32, got '$ACCELERATOR_TYPE'"
  [[ $PYTHON_VERSION =~ ^3\.(1[1-9])$ ]] \
    || die "--python must be 3.11 or newer (lsm needs it), got '$PYTHON_VERSION'"
  [[ -z $DATA || $DATA == gs://?* ]] || die "--data must be a gs:// folder, got '$DATA'"
  if [ -z "$RUNTIME_VERSION" ]; then  # https://cloud.google.com/tpu/docs/runtimes
    case $ACCELERATOR_TYPE in
      v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
      v5litepod-*|v5e-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
      v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
      v4-*|v3-*|v2-*) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
      *) die "--accelerator-type=$ACCELERATOR_TYPE has no default --version; give --version" \
             "(TPU software versions: https://cloud.google.com/tpu/docs/runtimes)" ;;
    esac
  fi
  # Which TPU (WHERE_ARGS), and everything another script of this folder needs (COMMON_ARGS).
  WHERE_ARGS=(--name="$NAME" --zone="$ZONE")
  if [ -n "$PROJECT" ]; then
    WHERE_ARGS+=(--project="$PROJECT")
  fi
  COMMON_ARGS=("${WHERE_ARGS[@]}" --accelerator-type="$ACCELERATOR_TYPE"
               --version="$RUNTIME_VERSION" --python="$PYTHON_VERSION")
  if [ -n "$DATA" ]; then
    COMMON_ARGS+=(--data="$DATA")
  fi
  if [ "$SPOT" = 1 ]; then
    COMMON_ARGS+=(--spot)
  fi
  if [ "$QUEUED" = 1 ]; then
    COMMON_ARGS+=(--queued)
  fi
  if [ "$DRY_RUN" = 1 ]; then
    COMMON_ARGS+=(--dry-run)
  fi
}

create_tpu() {
  local spot=()  # "${spot[@]+...}": an empty array under set -u in bash 3 (macOS)
  if [ "$SPOT" = 1 ]; then
    spot=(--spot)
  fi
  if [ "$QUEUED" = 1 ]; then
    gcloud_tpus queued-resources create "$NAME" --node-id="$NAME" \
      --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" \
      ${spot[@]+"${spot[@]}"}
  else
    gcloud_tpus tpu-vm create "$NAME" --accelerator-type="$ACCELERATOR_TYPE" \
      --version="$RUNTIME_VERSION" ${spot[@]+"${spot[@]}"}
  fi
}

delete_tpu() {
  if [ "$QUEUED" = 1 ]; then  # --force: the TPU VM of the queued resource goes too
    gcloud_tpus queued-resources delete "$NAME" --force --quiet
  else
    gcloud_tpus tpu-vm delete "$NAME" --quiet
  fi
}

# The state of the queued resource (ACTIVE, WAITING_FOR_RESOURCES, SUSPENDED, ...) or of the
# TPU VM (READY, PREEMPTED, ...); empty when gcloud cannot say.
tpu_state() {
  if [ "$QUEUED" = 1 ]; then
    gcloud_tpus queued-resources describe "$NAME" --format='value(state.state)' || true
  else
    gcloud_tpus tpu-vm describe "$NAME" --format='value(state)' || true
  fi
}

# A queued resource is granted when capacity frees up: poll until it is ACTIVE. (A TPU VM is
# READY when `tpu-vm create` returns.)
wait_until_active() {
  local state previous=
  if [ "$QUEUED" != 1 ]; then
    return 0
  fi
  while :; do
    state=$(tpu_state)
    if [ "$DRY_RUN" = 1 ] || [ "$state" = ACTIVE ]; then
      return 0
    fi
    case $state in
      FAILED|SUSPENDED) die "queued resource $NAME is $state; see" \
          "gcloud compute tpus queued-resources describe $NAME --zone=$ZONE" ;;
    esac
    if [ "$state" != "$previous" ]; then
      log "queued resource $NAME: ${state:-state unknown}; checking every ${POLL_SECONDS}s"
      previous=$state
    fi
    sleep "$POLL_SECONDS"
  done
}

# Copies this checkout (tracked files and untracked ones git does not ignore) to ~/lsm on every
# worker and installs it into ~/lsm/.venv (Python $PYTHON_VERSION via uv, jax[tpu], and gcsfs +
# google-cloud-storage for gs:// run directories); with --data, copies that folder to /data. A
# rerun replaces the code and keeps the virtual environment.
deploy_code() {
  local staging file steps
  staging=$(mktemp -d)
  while IFS= read -r -d '' file; do
    if [ -e "$REPO_ROOT/$file" ]; then  # not a tracked file deleted in the checkout
      printf '%s\0' "$file"
    fi
  done < <(git -C "$REPO_ROOT" ls-files -z --cached --others --exclude-standard) \
    > "$staging/files"
  run tar -czf "$staging/lsm.tar.gz" -C "$REPO_ROOT" --null -T "$staging/files"
  gcloud_tpus tpu-vm scp "$staging/lsm.tar.gz" "$NAME":lsm.tar.gz --worker=all
  rm -rf "$staging"
  # shellcheck disable=SC2016,SC2088  # ~ and $(...) are for the workers' shell
  steps=(
    'mkdir -p ~/lsm'
    'find ~/lsm -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +'
    'tar -xzf ~/lsm.tar.gz -C ~/lsm'
    'cd ~/lsm'
    '{ [ -x ~/.local/bin/uv ] || curl -LsSf https://astral.sh/uv/install.sh | sh; }'
    "{ [ -x .venv/bin/python ] || ~/.local/bin/uv venv --python $PYTHON_VERSION .venv; }"
    "~/.local/bin/uv pip install --python .venv/bin/python -e '.[tpu]' gcsfs google-cloud-storage"
    ".venv/bin/python -c 'import jax, lsm; print(\"jax\", jax.__version__)'"
  )
  if [ -n "$DATA" ]; then
    # shellcheck disable=SC2016  # $(...) is for the workers' shell
    steps+=('sudo mkdir -p /data' 'sudo chown "$(id -u):$(id -g)" /data'
            "gcloud storage rsync --recursive $(quote "$DATA") /data")
  fi
  gcloud_tpus tpu-vm ssh "$NAME" --worker=all --command="$(join_by ' && ' "${steps[@]}")"
}

# Parses arguments that must all be common options (create, deploy, delete), then checks them.
parse_only_common_options() {
  while [ $# -gt 0 ]; do
    common_option "$@"
    [ "$SHIFT" -gt 0 ] || die "unknown argument '$1' (see --help)"
    shift "$SHIFT"
  done
  check_common_options
}
