"""Session 13: does a GEMV that copies its weights into shared memory before the PDL wait
(Gluon, cp.async issued before griddepcontrol.wait) shorten the out_proj -> in_proj chain of
AiM-XL's batch-1 step? Session 12's draft (`2026-11-27-s12-staged-gemv-draft.py`), generalised
to out_proj's shape, and timed in chains over weight copies filling 512 MiB (past L2), inside
CUDA graphs (triton.testing.do_bench_cudagraph), against `triton_gemv.linear` as shipped.

    python benchmarks/2026-11-27-s13-staged-chain.py --compile-only   # CPU: shared bytes, registers
    python benchmarks/2026-11-27-s13-staged-chain.py [--json F]        # GPU: the chain timings
"""

import json
import sys

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy


@gluon.jit
def _gdc_wait():
    gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _gdc_launch_dependents():
    gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def staged_gemv_kernel(x_ptr, w_ptr, out_ptr, N, K: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                       EARLY: gl.constexpr, PDL: gl.constexpr, PIPELINED: gl.constexpr):
    """out[r, n] = sum_k w[n, k] x[r, k] for two rows r; every weight of the program is copied
    into shared memory before the wait, the input read after it."""
    layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[1, 32],
                                            warps_per_cta=[gl.num_warps(), 1], order=[1, 0])
    shared: gl.constexpr = gl.SwizzledSharedLayout(vec=8, per_phase=1, max_phase=1, order=[1, 0])
    blocks: gl.constexpr = K // BLOCK_K
    smem = gl.allocate_shared_memory(gl.bfloat16, [blocks, BLOCK_N, BLOCK_K], shared)
    n = gl.program_id(0) * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, layout))
    k = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, layout))
    rows = (n < N)[:, None] & (k < BLOCK_K)[None, :]
    for i in gl.static_range(blocks):  # a commit group a block: the sums of block i start once it lands
        async_copy.async_copy_global_to_shared(smem.index(i), w_ptr + n[:, None] * K + (i * BLOCK_K + k)[None, :], mask=rows)
        async_copy.commit_group()
    if PDL:
        _gdc_wait()
        if EARLY:
            _gdc_launch_dependents()
    acc0 = gl.zeros([BLOCK_N, BLOCK_K], gl.float32, layout)
    acc1 = gl.zeros([BLOCK_N, BLOCK_K], gl.float32, layout)
    for i in gl.static_range(blocks):
        x0 = gl.load(x_ptr + i * BLOCK_K + k).to(gl.float32)
        x1 = gl.load(x_ptr + K + i * BLOCK_K + k).to(gl.float32)
        if PIPELINED:
            async_copy.wait_group(blocks - 1 - i)
        else:
            async_copy.wait_group(0)
        w = smem.index(i).load(layout).to(gl.float32)
        acc0 += w * x0[None, :]
        acc1 += w * x1[None, :]
    if PDL and not EARLY:
        _gdc_launch_dependents()
    gl.store(out_ptr + n, gl.sum(acc0, axis=1).to(out_ptr.dtype.element_ty), mask=n < N)
    gl.store(out_ptr + N + n, gl.sum(acc1, axis=1).to(out_ptr.dtype.element_ty), mask=n < N)


SHAPES = {"out_proj": (1536, 3072), "in_proj": (6448, 1536)}  # AiM-XL, (outputs, inputs)
VARIANTS = [(4, 4), (4, 2), (4, 1), (8, 1), (8, 2), (16, 4)]  # (outputs a program, warps)


def compile_only() -> None:
    """Compile for sm_90 without a GPU: shared bytes, registers, copies before the wait."""
    import triton
    from triton.backends.compiler import GPUTarget

    for name, (n, k) in SHAPES.items():
        for block_n, warps in VARIANTS:
            src = gluon._runtime.GluonASTSource(
                fn=staged_gemv_kernel,
                signature={"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "N": "i32", "K": "constexpr",
                           "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "EARLY": "constexpr", "PDL": "constexpr", "PIPELINED": "constexpr"},
                constexprs={"K": k, "BLOCK_N": block_n, "BLOCK_K": 256, "EARLY": False, "PDL": True, "PIPELINED": True},
                attrs={(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]], (2,): [["tt.divisibility", 16]]},
            )
            c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
            marks = [line for line in c.asm["ptx"].splitlines() if "griddepcontrol.wait" in line or "cp.async" in line]
            before = next(i for i, m in enumerate(marks) if "griddepcontrol.wait" in m)
            regs = [line for line in c.asm["ptx"].splitlines() if ".reg .b32" in line]
            print(f"{name} block_n={block_n} warps={warps}: shared {c.metadata.shared} B, "
                  f"{before} copies before the wait, {regs[:1]}")


def chain_timings(path: str | None) -> None:
    import torch
    import triton
    import triton.testing

    sys.path.insert(0, "src")
    from aim_hf.triton_gemv import linear

    print(torch.cuda.get_device_name(), "triton", triton.__version__)
    (n_out, k_out), (n_in, k_in) = SHAPES["out_proj"], SHAPES["in_proj"]
    x_out = torch.randn(2, k_out, device="cuda").bfloat16()
    x_in = torch.randn(2, k_in, device="cuda").bfloat16()
    count = 512 * 2**20 // ((n_out * k_out + n_in * k_in) * 2)
    pairs = [(torch.randn(n_out, k_out, device="cuda").bfloat16(), torch.randn(n_in, k_in, device="cuda").bfloat16())
             for _ in range(count)]
    y_out = torch.empty(2, n_out, device="cuda", dtype=torch.bfloat16)
    y_in = torch.empty(2, n_in, device="cuda", dtype=torch.bfloat16)

    def staged(x, w, y, block_n, warps, early=False, pipelined=True):
        n, k = w.shape
        staged_gemv_kernel[(triton.cdiv(n, block_n),)](x, w, y, n, K=k, BLOCK_N=block_n, BLOCK_K=256, EARLY=early,
                                                        PDL=True, PIPELINED=pipelined, num_warps=warps, launch_pdl=True)
        return y

    for name, (x, w) in {"out_proj": (x_out, pairs[0][0]), "in_proj": (x_in, pairs[0][1])}.items():
        ref = (x.double() @ w.double().T)
        for block_n, warps in VARIANTS:
            got = staged(x, w, torch.empty(2, w.shape[0], device="cuda", dtype=torch.float32), block_n, warps).double()
            err = ((got - ref).norm() / ref.norm()).item()
            print(f"check {name} {block_n}x{warps}: rel err vs float64 {err:.2e}")
            assert err < 1e-5, err  # float32 sums of bf16 products: ~1e-7; a wrong block is O(1)

    s_in = [(8, 1), (8, 2), (4, 1), (16, 4)]
    s_out = [(4, 4), (4, 2)]
    runs = {
        "in_proj alone: linear": lambda: [linear(x_in, wi, pdl=True) for _, wi in pairs],
        "out_proj alone: linear": lambda: [linear(x_out, wo, pdl=True) for wo, _ in pairs],
        "shipped: linear -> linear": lambda: [(linear(x_out, wo, pdl=True), linear(x_in, wi, pdl=True)) for wo, wi in pairs],
        "in_proj alone: staged 8x1, one wait": lambda: [staged(x_in, wi, y_in, 8, 1, pipelined=False) for _, wi in pairs],
    }
    for bn, wp in s_in:
        runs[f"in_proj alone: staged {bn}x{wp}"] = lambda bn=bn, wp=wp: [staged(x_in, wi, y_in, bn, wp) for _, wi in pairs]
        runs[f"linear -> staged {bn}x{wp}"] = lambda bn=bn, wp=wp: [
            (linear(x_out, wo, pdl=True), staged(x_in, wi, y_in, bn, wp)) for wo, wi in pairs]
    for bn, wp in s_out:
        runs[f"out_proj alone: staged {bn}x{wp}"] = lambda bn=bn, wp=wp: [staged(x_out, wo, y_out, bn, wp) for wo, _ in pairs]
        for early in (False, True):
            runs[f"staged {bn}x{wp}{' early' if early else ''} -> staged 8x1"] = lambda bn=bn, wp=wp, e=early: [
                (staged(x_out, wo, y_out, bn, wp, e), staged(x_in, wi, y_in, 8, 1)) for wo, wi in pairs]
            runs[f"staged {bn}x{wp}{' early' if early else ''} -> linear"] = lambda bn=bn, wp=wp, e=early: [
                (staged(x_out, wo, y_out, bn, wp, e), linear(x_in, wi, pdl=True)) for wo, wi in pairs]
    results = {}
    for repeat in range(2):
        for name, fn in runs.items():
            fn()
            us = triton.testing.do_bench_cudagraph(fn, rep=50) * 1e3 / count
            results.setdefault(name, []).append(us)
    bytes_pair = {"in_proj alone": n_in * k_in * 2, "out_proj alone": n_out * k_out * 2}
    print(f"{'chain (AiM-XL shapes, 2 rows, bf16)':44s} {'us a pair':>18s} {'GB/s':>7s}")
    for name, us in results.items():
        b = next((v for key, v in bytes_pair.items() if name.startswith(key)), (n_out * k_out + n_in * k_in) * 2)
        print(f"{name:44s} {us[0]:8.2f} {us[1]:8.2f} {b / min(us) * 1e-3:7.0f}")
    if path:
        with open(path, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "us": results, "pairs": count}, f, indent=1)


if __name__ == "__main__":
    if "--compile-only" in sys.argv:
        compile_only()
    else:
        chain_timings(sys.argv[sys.argv.index("--json") + 1] if "--json" in sys.argv else None)
