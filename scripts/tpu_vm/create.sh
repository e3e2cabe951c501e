#!/usr/bin/env bash
# Creates a Cloud TPU VM, or with --queued a queued resource and waits until it is ACTIVE.
#   bash scripts/tpu_vm/create.sh --name=lsm --zone=us-west4-a --accelerator-type=v5litepod-8 --spot
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
USAGE="Usage: bash scripts/tpu_vm/create.sh [options]
Creates the TPU VM NAME; with --queued, the queued resource NAME (its TPU VM is also called NAME)
and waits until capacity is granted. Next: deploy.sh, then train.sh."

parse_only_common_options "$@"
create_tpu
wait_until_active
log "$NAME is up; next: bash scripts/tpu_vm/deploy.sh $(quote_all "${WHERE_ARGS[@]}")"
