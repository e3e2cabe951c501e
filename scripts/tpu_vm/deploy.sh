#!/usr/bin/env bash
# Copies this checkout to ~/lsm on every worker of the TPU VM and installs it in ~/lsm/.venv.
#   bash scripts/tpu_vm/deploy.sh --name=lsm --zone=us-west4-a
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
USAGE="Usage: bash scripts/tpu_vm/deploy.sh [options]
Copies the checkout (tracked files, and untracked ones git does not ignore, uncommitted changes
included) to ~/lsm on every worker (--worker=all) and installs it into ~/lsm/.venv: Python
--python via uv, lsm with jax[tpu], gcsfs and google-cloud-storage. Rerun it after changing code;
the virtual environment is kept."

parse_only_common_options "$@"
deploy_code
