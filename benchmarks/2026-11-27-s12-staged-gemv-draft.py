"""Draft for the next session (session 12; compiled for sm_90 on the CPU machine, NOT yet run on a
GPU): a two-row GEMV whose program copies all its weights into shared memory (cp.async) before the
programmatic-dependent-launch wait, then reads the input and sums the products from shared memory.
Gluon (Triton 3.6), since Triton's own pipeline cannot issue the weights' copies before the wait
without the input's (BENCHMARKS.md, session 12). The question it is for: how much of in_proj can
stream behind the kernel before it (out_proj), measured as a chain out_proj-like GEMV (PDL, early
trigger) -> in_proj-like GEMV over copies of the weights that defeat L2, the current
`triton_gemv.linear` against this kernel.

    python benchmarks/2026-11-27-s12-staged-gemv-draft.py --compile-only 8 1   # CPU: PTX order, ptxas
    python benchmarks/2026-11-27-s12-staged-gemv-draft.py                      # GPU: the chain timings

On the CPU (Triton 3.6's ptxas, sm_90a): 8 outputs a program, one warp: 24 KB of shared memory,
107 registers, 48 16-byte copies a thread issued before `griddepcontrol.wait`."""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy


@gluon.jit
def _gdc_wait():
    gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _gdc_launch_dependents():
    gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def staged_gemv_kernel(x_ptr, w_ptr, out_ptr, N, K: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                       EARLY: gl.constexpr):
    layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[1, 32],
                                            warps_per_cta=[gl.num_warps(), 1], order=[1, 0])
    shared: gl.constexpr = gl.SwizzledSharedLayout(vec=8, per_phase=1, max_phase=1, order=[1, 0])
    blocks: gl.constexpr = K // BLOCK_K
    smem = gl.allocate_shared_memory(gl.bfloat16, [blocks, BLOCK_N, BLOCK_K], shared)
    n = gl.program_id(0) * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, layout))
    k = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, layout))
    rows = (n < N)[:, None] & (k < BLOCK_K)[None, :]
    for i in gl.static_range(blocks):  # every weight of the program, before the wait
        async_copy.async_copy_global_to_shared(smem.index(i), w_ptr + n[:, None] * K + (i * BLOCK_K + k)[None, :], mask=rows)
    async_copy.commit_group()
    _gdc_wait()
    if EARLY:
        _gdc_launch_dependents()
    async_copy.wait_group(0)
    acc0 = gl.zeros([BLOCK_N], gl.float32, gl.SliceLayout(1, layout))
    acc1 = gl.zeros([BLOCK_N], gl.float32, gl.SliceLayout(1, layout))
    for i in gl.static_range(blocks):
        w = smem.index(i).load(layout).to(gl.float32)
        x0 = gl.load(x_ptr + i * BLOCK_K + k).to(gl.float32)
        x1 = gl.load(x_ptr + K + i * BLOCK_K + k).to(gl.float32)
        acc0 += gl.sum(w * x0[None, :], axis=1)
        acc1 += gl.sum(w * x1[None, :], axis=1)
    if not EARLY:
        _gdc_launch_dependents()
    gl.store(out_ptr + n, acc0, mask=n < N)
    gl.store(out_ptr + N + n, acc1, mask=n < N)



def compile_only(block_n: int, warps: int) -> None:
    """Compile for sm_90 without a GPU and show the order of the copies and the wait."""
    import triton
    from triton.backends.compiler import GPUTarget

    src = gluon._runtime.GluonASTSource(
        fn=staged_gemv_kernel,
        signature={"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*fp32", "N": "i32", "K": "constexpr",
                   "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "EARLY": "constexpr"},
        constexprs={"K": 1536, "BLOCK_N": block_n, "BLOCK_K": 256, "EARLY": False},
        attrs={(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]], (2,): [["tt.divisibility", 16]]},
    )
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    marks = [line.strip() for line in c.asm["ptx"].splitlines() if "griddepcontrol" in line or "cp.async" in line]
    print("shared bytes", c.metadata.shared)
    print("copies before the wait:", next(i for i, m in enumerate(marks) if "griddepcontrol.wait" in m))


def chain_timings() -> None:
    """AiM-XL's shapes: out_proj-like (1536 x 3072, one block, early trigger) then in_proj-like
    (6448 x 1536), both with PDL, over weight copies filling 512 MiB; us per pair."""
    import sys

    import torch
    import triton
    import triton.testing

    sys.path.insert(0, "src")
    from aim_hf.triton_gemv import linear

    x_out, x_in = torch.randn(2, 3072, device="cuda").bfloat16(), torch.randn(2, 1536, device="cuda").bfloat16()
    pairs = [
        (torch.randn(1536, 3072, device="cuda").bfloat16(), torch.randn(6448, 1536, device="cuda").bfloat16())
        for _ in range(512 * 2**20 // ((1536 * 3072 + 6448 * 1536) * 2))
    ]
    out = torch.empty(2, 6448, device="cuda")

    def staged(w):
        staged_gemv_kernel[(triton.cdiv(6448, 8),)](x_in, w, out, 6448, K=1536, BLOCK_N=8, BLOCK_K=256, EARLY=False,
                                                    num_warps=1, launch_pdl=True)
        return out

    runs = {
        "out_proj only": lambda: [linear(x_out, wo, pdl=True, early=True) for wo, _ in pairs],
        "out_proj -> triton_gemv.linear": lambda: [
            (linear(x_out, wo, pdl=True, early=True), linear(x_in, wi, pdl=True)) for wo, wi in pairs],
        "out_proj -> staged": lambda: [(linear(x_out, wo, pdl=True, early=True), staged(wi)) for wo, wi in pairs],
    }
    ref = linear(x_in, pairs[0][1], out_dtype=torch.float32)
    got = staged(pairs[0][1])
    torch.cuda.synchronize()
    print("staged vs linear, rel", ((got - ref).norm() / ref.norm()).item())
    for name, fn in runs.items():
        fn()
        seconds = triton.testing.do_bench_cudagraph(fn, rep=50) * 1e-3 / len(pairs)
        print(f"{name:32s} {seconds * 1e6:7.2f} us a pair")


if __name__ == "__main__":
    import sys

    if "--compile-only" in sys.argv:
        compile_only(int(sys.argv[2]), int(sys.argv[3]))
    else:
        chain_timings()
