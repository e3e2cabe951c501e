#!/usr/bin/env bash
# Sets up a virtual environment (first run only) and runs lsm's main job: for now the attention
# benchmark. With no arguments it is the one-minute smoke run; `--full` runs the whole grid that
# benchmarks/README.md reports (about half an hour on a 2-core CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e .
if [ "${1:-}" = "--full" ]; then
  shift
  exec .venv/bin/python -m lsm.bench attention "$@"
fi
exec .venv/bin/python -m lsm.bench attention --quick --out "${TMPDIR:-/tmp}/lsm-bench" "$@"
