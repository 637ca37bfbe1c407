"""Session 14: the fused step (three kernels a layer) for 3-32 rows, its projections on the tensor
cores, against the compiled blocks with cuBLAS that ran batches 2-16 before.

At batch 16 (32 rows) the compiled step of AiM-B spent 26.8 us a layer on an H100 against a
floor of about 10.8 us (`python scripts/profile_step.py --preset AiM-B --batch 16 --cache
recurrent --graph`, raw `benchmarks/2026-11-27-h100-s14-AiM-B-b16.log`): in_proj and out_proj
by cuBLAS at 0.96 and 0.5 TB/s, two norm kernels and the conv beside them. The state update
(9.3 us, 25 MB read and written) was near the bandwidth.

Token loop (median of 5 generations, a fresh CUDA-graph decoder each setting) for each preset at
batch 16 over launch settings of the tensor-core projections and the state update, then at
batches 2, 4, 8, 16 the default against cuBLAS (`config.use_projection_kernels = False`).

    python benchmarks/2026-11-27-s14-rows-sweep.py AiM-B
    python benchmarks/2026-11-27-s14-rows-sweep.py --second AiM-XL AiM-B
"""

from __future__ import annotations

import functools
import json
import os
import sys

import torch

sys.path.insert(0, "scripts")
sys.path.insert(0, "src")
from benchmark import random_model, time_call  # noqa: E402

from aim_hf import AiMConfig, fast_decode, triton_gemv  # noqa: E402

SHIPPED_LAUNCH = triton_gemv.default_launch
GATED = fast_decode.triton_ssm.ssm_update_gated

SETTINGS = {  # name: (in_proj's launch, out_proj's, the state update's), over the defaults
    "default": ({}, {}, {}),
    "in 32 outputs": (dict(block_n=32), {}, {}),
    "in k128 x4": (dict(block_k=128, stages=4), {}, {}),
    "in 8 warps": (dict(num_warps=8), {}, {}),
    "in late": (dict(early=False), {}, {}),
    "out k256 x4": ({}, dict(block_k=256, stages=4), {}),
    "out k1024 x2": ({}, dict(block_k=1024, stages=2), {}),
    "out 2 warps": ({}, dict(num_warps=2), {}),
    "ssm 8 rows 1 warp": ({}, {}, dict(block_p=8, num_warps=1)),
    "ssm 32 rows 4 warps": ({}, {}, dict(block_p=32, num_warps=4)),
    "combined": (dict(block_k=128, stages=4), dict(num_warps=2), dict(block_p=8, num_warps=1)),
}
SECOND = ["default", "combined", "in k128 x4", "out 2 warps", "ssm 8 rows 1 warp", "in 32 outputs"]  # the second call


def use(widen: dict, narrow: dict, update: dict) -> None:
    def launch(row_groups: int, outputs: int, inputs: int, rows: int = 2) -> dict:
        settings = SHIPPED_LAUNCH(row_groups, outputs, inputs, rows)
        if rows in triton_gemv.TENSOR_CORE_ROWS:
            settings = settings | (widen if outputs >= inputs else narrow)
        return settings

    triton_gemv.default_launch = launch
    fast_decode.triton_ssm.ssm_update_gated = functools.partial(GATED, **update)


def token_loop(model, batch: int, projection: bool = True, repeats: int = 5) -> float:
    model.config.use_projection_kernels = projection
    model._graph_decoder = None
    labels = list(range(batch))
    time_call(model.generate, labels, guidance_scale=2.0)  # compile and capture
    fused = model._graph_decoder.fused is not None
    assert fused == projection, (batch, projection, fused)
    times = sorted(time_call(model.generate, labels, guidance_scale=2.0)[0] for _ in range(repeats))
    return times[repeats // 2]


def record(results: list, preset: str, batch: int, setting: str, seconds: float) -> None:
    results.append({"preset": preset, "batch": batch, "setting": setting, "seconds": seconds})
    print(f"{preset} batch {batch:2d} {setting:32s} {seconds:.4f} s {batch / seconds:7.1f} img/s", flush=True)


def main(presets: list[str], second: bool) -> None:
    """First call (AiM-B): every setting at batch 16, then the default against cuBLAS at 2-16.
    Second call (``--second``): the settings that won for AiM-B and their combination, each
    preset at batch 16; at batch 2 (4 rows) multiply-adds, 4 rows a program, against the tensor
    cores; then the combination against cuBLAS at 2-16."""
    device = torch.cuda.get_device_name()
    print(device, flush=True)
    results = []
    for preset in presets:
        model = random_model(AiMConfig.from_preset(preset, decode_cache="recurrent"), torch.bfloat16)
        for name in SECOND if second else SETTINGS:
            use(*SETTINGS[name])
            record(results, preset, 16, name, token_loop(model, 16))
        use(*SETTINGS["combined" if second else "default"])
        if second:
            launch = triton_gemv._launch
            for rows in (4, None, 4):
                triton_gemv._launch = functools.partial(launch, rows_per_program=rows)
                name = "4 rows a program, multiply-adds" if rows else "combined (tensor cores)"
                record(results, preset, 2, name, token_loop(model, 2))
            triton_gemv._launch = launch
        for batch in (2, 4, 8, 16):
            for projection in (False, True) if second else (False, True, False):
                seconds = token_loop(model, batch, projection)
                setting = "fused (tensor cores)" if projection else "compiled blocks (cuBLAS)"
                record(results, preset, batch, setting, seconds)
        del model
        torch.cuda.empty_cache()
    with open(os.path.join(os.environ.get("OUT", "."), f"rows-sweep-{'-'.join(presets)}.json"), "w") as f:
        json.dump({"device": device, "results": results}, f, indent=1)


if __name__ == "__main__":
    main([a for a in sys.argv[1:] if a != "--second"], "--second" in sys.argv)
