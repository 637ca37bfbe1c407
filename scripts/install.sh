#!/usr/bin/env bash
# Installs aim-hf (editable) with the extras named as arguments, e.g. `bash scripts/install.sh test`.
# Where torch is missing it first installs torch 2.13.0, which pip takes as a CPU build from local
# disk on the project's machines; a bare `torch` requirement would download a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch" 2>/dev/null || python3 -m pip install torch==2.13.0
extras=$(IFS=,; echo "$*")
python3 -m pip install -e ".${extras:+[$extras]}"
# pyenv only sees new console scripts (aim-generate) after a rehash
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
