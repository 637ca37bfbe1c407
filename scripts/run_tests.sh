#!/usr/bin/env bash
# Sets up a fresh machine (CPU torch from the local wheel only where torch is missing) and runs the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch" 2>/dev/null || python3 -m pip install torch==2.13.0
python3 -m pip install -e ".[test]"
python3 -m ruff check src tests scripts
# one thread per process: the tests' models are tiny, and idle OpenMP threads spinning on a busy
# two-core machine made them ten times slower
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python3 -m pytest -q "$@"
