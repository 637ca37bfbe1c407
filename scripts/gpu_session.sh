#!/usr/bin/env bash
# Everything this repository measures on a GPU machine, in one call (device time is scarce):
# kernels, the GPU tests, numerics, generation and training benchmarks. Results go to $OUT.
#   carry: .wheels (diffusers wheel, `pip download diffusers==0.42.1 --no-deps -d .wheels`) and
#   .kernel-pack (from scripts/pack_kernels.sh; without it mamba-ssm is built, ~6.5 min).
# Usage: bash scripts/gpu_session.sh [seconds for the generation benchmark]
set -uo pipefail
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONPATH=$PWD/src
python3 -m pip install --no-deps -q .wheels/*.whl
if [ -d .kernel-pack ]; then
  bash scripts/unpack_kernels.sh .kernel-pack
else
  bash ../shared/kernels/build-on-gpu.sh && bash scripts/pack_kernels.sh "$out/kernel-pack"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
timeout 300 python3 -m pytest -q -m gpu tests -p no:cacheprovider -p no:logging >"$out/tests.log" 2>&1
tail -3 "$out/tests.log"
timeout "${1:-300}" python3 scripts/benchmark.py --presets AiM-B AiM-XL --batch-sizes 1 16 64 256 \
  --baseline-batch-sizes 1 --repeats 2 --vq --json "$out/generation.json" >"$out/generation.log" 2>&1
tail -12 "$out/generation.log"
timeout 200 python3 scripts/profile_step.py --preset AiM-B --batch 256 >"$out/profile.log" 2>&1
timeout 200 python3 scripts/benchmark_training.py --json "$out/training.json" >"$out/training.log" 2>&1
tail -6 "$out/training.log"
