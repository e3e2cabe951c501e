#!/usr/bin/env bash
# Deletes the TPU VM (with --queued: the queued resource and its TPU VM). The gs:// run
# directory stays; delete it with `gcloud storage rm -r gs://...` when done with it.
#   bash scripts/tpu_vm/delete.sh --name=lsm --zone=us-west4-a
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
USAGE="Usage: bash scripts/tpu_vm/delete.sh [options]
Deletes the TPU VM NAME, or with --queued the queued resource NAME and its TPU VM. A TPU is billed
until it is deleted, whether or not it is training."

parse_only_common_options "$@"
delete_tpu
