#!/usr/bin/env bash
# On the GPU machine, after ../shared/kernels/build-on-gpu.sh: pack the installed mamba-ssm and
# causal-conv1d (symbols stripped) into parts of at most 15 MB under $1, so that later device
# sessions can carry them instead of building again (unpack with unpack_kernels.sh). Mamba1's
# selective-scan extension (41 MB, unused here) is replaced by an empty module that keeps
# `import mamba_ssm` working, so the pack (22 MB) fits beside the tree in a carry.
set -euo pipefail
out=$1; mkdir -p "$out"
site=$(python3 -c "import mamba_ssm, os; print(os.path.dirname(os.path.dirname(mamba_ssm.__file__)))")
tmp=$(mktemp -d)
cd "$site"
cp -r mamba_ssm causal_conv1d causal_conv1d_cuda*.so "$tmp"/
rm -rf "$tmp"/mamba_ssm/ops/tilelang
echo '"""Stand-in: aim-hf uses no Mamba1 selective scan."""' >"$tmp"/selective_scan_cuda.py
find "$tmp" -name "*.so" -exec strip --strip-unneeded {} \;
find "$tmp" -name "__pycache__" -prune -exec rm -rf {} \;
tar -C "$tmp" -cf - . | xz -T0 -9 | split -b 15M - "$out/kernels.tar.xz.part-"
ls -la "$out"
