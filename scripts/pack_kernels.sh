#!/usr/bin/env bash
# On the GPU machine, after ../shared/kernels/build-on-gpu.sh: pack the installed mamba-ssm and
# causal-conv1d (debug symbols stripped) into parts of at most 15 MB under $1, so that later
# device sessions can carry them instead of building again (unpack with unpack_kernels.sh).
set -euo pipefail
out=$1; mkdir -p "$out"
site=$(python3 -c "import mamba_ssm, os; print(os.path.dirname(os.path.dirname(mamba_ssm.__file__)))")
tmp=$(mktemp -d)
cd "$site"
cp -r mamba_ssm causal_conv1d selective_scan_cuda*.so causal_conv1d_cuda*.so "$tmp"/ 2>/dev/null || true
find "$tmp" -name "*.so" -exec strip --strip-debug {} \;
find "$tmp" -name "__pycache__" -prune -exec rm -rf {} \;
tar -C "$tmp" -cf - . | xz -T0 -6 | split -b 15M - "$out/kernels.tar.xz.part-"
ls -la "$out"
