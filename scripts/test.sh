#!/usr/bin/env bash
# Sets up a virtual environment (first run only) and runs the test suite on CPU.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k mask -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
exec .venv/bin/python -m pytest -n 2 "$@"
