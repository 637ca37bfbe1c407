#!/usr/bin/env bash
# Sets up a fresh machine (scripts/install.sh: CPU torch only where torch is missing) and runs the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
python3 -m ruff check src tests scripts
python3 -m ruff format --check src tests scripts
# one thread per process: the tests' models are tiny, and idle OpenMP threads spinning on a busy
# two-core machine made them ten times slower
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python3 -m pytest -q "$@"
