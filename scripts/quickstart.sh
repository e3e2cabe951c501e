#!/usr/bin/env bash
# lsm's main job on this machine: sets up a virtual environment (first run only), trains the
# quickstart model (a small attention LM, passkey retrieval, about two minutes on a 2-core CPU),
# then evaluates it at 1x, 2x and 4x the training length (YaRN RoPE scaling past 1x).
# Extra arguments are config overrides, e.g. `bash scripts/quickstart.sh train.steps=300`.
# Rerunning resumes from the newest checkpoint in runs/quickstart (delete it to start over).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e .
.venv/bin/python -m lsm.train --config configs/quickstart.yaml "$@"
.venv/bin/python -m lsm.evaluate --run runs/quickstart
