#!/usr/bin/env bash
# On the GPU machine: put the mamba-ssm / causal-conv1d packed by pack_kernels.sh (folder $1) on
# the Python path by unpacking them into the site-packages of python3.
set -euo pipefail
site=$(python3 -c "import site; print(site.getsitepackages()[0])")
cat "$1"/kernels.tar.xz.part-* | xz -d | tar -C "$site" -xf -
python3 -c "import mamba_ssm, causal_conv1d; print('mamba_ssm', mamba_ssm.__version__, 'unpacked')"
