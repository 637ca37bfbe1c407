#!/usr/bin/env bash
# Everything this repository measures on a GPU machine, in as few calls as device time allows.
# Results and logs go to $OUT. Stages (default: kernel-tests tests generation kernels profile
# training; kernel-tests + tests, and generation, each fill most of a 10-minute device call):
#   kernel-tests the Triton kernels' GPU tests (conv/state/dual updates, GEMVs, the fused step, the draw; ~2 min)
#   tests       the model's GPU tests (mamba-ssm kernels, the CUDA-graph decoder under teacher
#               forcing from the start graph and a prefix, reuse, the memory split; ~6 min)
#   generation  scripts/benchmark.py: AiM-B and AiM-XL, batch 1-256, both cache forms, eager baseline (~6 min)
#   numerics    scripts/numerics.py: bf16 weights, bf16/fp32 state and the dual history vs float64
#   kernels     scripts/benchmark_ssm_kernels.py: the SSM step kernels alone, both cache forms
#   projections scripts/benchmark_projection_kernels.py: the batch-1/2 GEMVs against cuBLAS
#   draw        scripts/benchmark_draw.py: the one-kernel draw against sampling.py's, unfiltered, top-k, top-p
#   profile     scripts/profile_step.py for AiM-B batch 256 and AiM-XL batch 1 (inside the graph),
#               scripts/profile_generate.py (the class-token pass, the replays, the rest)
#   training    scripts/benchmark_training.py: AiM-B/L, pure-PyTorch mixer vs mamba-ssm kernels
#   ddp         tests/test_distributed.py on two GPUs with NCCL: DDP and FSDP (a two-GPU machine)
# carry: .wheels (diffusers, datasets, dill, multiprocess wheels: the GPU image lacks them; here:
# `pip download diffusers datasets dill --no-deps -d .wheels` and `pip download multiprocess
# --no-deps -d .wheels --python-version 3.12 --only-binary=:all:`, the device's Python) and
# .kernel-pack (scripts/pack_kernels.sh; without it mamba-ssm is built, ~6.5 min, from
# ../shared/kernels, which does not travel to the device: carry a copy, `cp -r ../shared/kernels
# .kernels-src`, and the pack lands in $OUT/kernel-pack for the next calls).
# Usage: bash scripts/gpu_session.sh [stage ...]
set -uo pipefail
stages="${*:-kernel-tests tests generation kernels profile training}"
for s in $stages; do  # a misspelt stage, before minutes of setup and the stages before it
  case $s in
    kernel-tests|tests|generation|numerics|kernels|projections|draw|profile|training|ddp) ;;
    *) echo "unknown stage $s" >&2; exit 1 ;;
  esac
done
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONPATH=$PWD/src
python3 -m pip install --no-deps -q .wheels/*.whl
if [ -d .kernel-pack ]; then
  bash scripts/unpack_kernels.sh .kernel-pack
else
  build=../shared/kernels/build-on-gpu.sh
  [ -f "$build" ] || build=.kernels-src/build-on-gpu.sh
  bash "$build" && bash scripts/pack_kernels.sh "$out/kernel-pack"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
pytest=(python3 -m pytest -q -p no:cacheprovider -p no:logging)
for stage in $stages; do
  for s in $stage; do
    echo "== $s ($(date -u +%T))"
    case $s in
      kernel-tests)
        timeout 240 "${pytest[@]}" -m gpu tests/test_triton_ssm.py tests/test_triton_gemv.py tests/test_triton_sampling.py >"$out/kernel-tests.log" 2>&1
        tail -3 "$out/kernel-tests.log" ;;
      tests)
        timeout 480 "${pytest[@]}" -m gpu tests/test_gpu.py >"$out/tests.log" 2>&1
        tail -3 "$out/tests.log" ;;
      generation)
        timeout 480 python3 scripts/benchmark.py --presets AiM-B AiM-XL --batch-sizes 1 16 32 64 256 \
          --caches recurrent dual --baseline-batch-sizes 1 --repeats 3 --vq --json "$out/generation.json" >"$out/generation.log" 2>&1
        tail -20 "$out/generation.log" ;;
      numerics)
        timeout 200 python3 scripts/numerics.py --json "$out/numerics.json" >"$out/numerics.log" 2>&1
        tail -8 "$out/numerics.log" ;;
      kernels)
        timeout 120 python3 scripts/benchmark_ssm_kernels.py --json "$out/ssm_kernels.json" >"$out/ssm_kernels.log" 2>&1
        tail -30 "$out/ssm_kernels.log" ;;
      projections)
        timeout 300 python3 scripts/benchmark_projection_kernels.py --rows 2 --block-n 0 4 --block-k 0 \
          --json "$out/projections.json" >"$out/projections.log" 2>&1
        tail -30 "$out/projections.log" ;;
      draw)
        timeout 200 python3 scripts/benchmark_draw.py --filters 0,1 50,1 0,0.9 --json "$out/draw.json" >"$out/draw.log" 2>&1
        tail -12 "$out/draw.log" ;;
      profile)
        timeout 60 python3 scripts/profile_step.py --preset AiM-B --batch 256 --rows 25 >"$out/profile-b256.log" 2>&1
        timeout 90 python3 scripts/profile_step.py --preset AiM-XL --batch 1 --graph --rows 12 >"$out/profile-xl1.log" 2>&1
        timeout 90 python3 scripts/profile_generate.py --presets AiM-XL AiM-B >"$out/profile-generate.log" 2>&1
        tail -14 "$out/profile-xl1.log"; tail -2 "$out/profile-generate.log" ;;
      training)
        timeout 330 python3 scripts/benchmark_training.py --json "$out/training.json" >"$out/training.log" 2>&1
        tail -8 "$out/training.log" ;;
      ddp)
        OMP_NUM_THREADS=1 timeout 540 "${pytest[@]}" -s -m gpu tests/test_distributed.py >"$out/ddp.log" 2>&1
        tail -5 "$out/ddp.log" ;;
    esac
  done
done
