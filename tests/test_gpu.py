"""GPU-only checks (run on the GPU machine): mamba-ssm kernels and the CUDA-graph decoder against
the pure-PyTorch path and a float64 reference."""

import copy
import gc
import io

import pytest
import torch
from conftest import randomize, rel_err
from test_pipeline import build_pipeline

from aim_hf import AiMConfig, AiMForImageGeneration
from aim_hf.mamba2 import KERNELS_AVAILABLE
from aim_hf.sampling import sample_inverse_cdf

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

# Tolerances against the float64 pure path, relative L2 over all logits of AiM-B (24 layers):
# float32 runs through tf32 matrix units (~3e-4 per product, growing with depth) -> 1e-2;
# bf16 weights and activations (~4e-3 per rounding, growing with depth) -> 8e-2.
TOLERANCE = {torch.float32: 1e-2, torch.bfloat16: 8e-2}


@pytest.fixture(scope="module")
def aim_b():
    torch.manual_seed(0)
    model = randomize(AiMForImageGeneration(AiMConfig.from_preset("AiM-B")), seed=1)
    return model.cuda().eval()


@pytest.fixture(scope="module")
def reference(aim_b):
    """float64 pure-path logits of AiM-B on a fixed batch of 8."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16384, (8, 256), generator=g).cuda()
    labels = torch.randint(0, 1000, (8,), generator=g).cuda()
    aim_b.config.use_mamba_kernels = False
    with torch.no_grad():
        logits = aim_b.double()(codes, labels).logits
    aim_b.float()
    return codes, labels, logits


@pytest.mark.skipif(not KERNELS_AVAILABLE, reason="mamba-ssm / causal-conv1d not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_match_pure_path(aim_b, reference, dtype):
    codes, labels, ref = reference
    model = aim_b.to(dtype)
    with torch.no_grad():
        model.config.use_mamba_kernels = True
        kernels = model(codes, labels).logits
        model.config.use_mamba_kernels = False
        pure = model(codes, labels).logits
    model.config.use_mamba_kernels = True
    aim_b.float()
    assert rel_err(kernels, ref) < TOLERANCE[dtype]
    assert rel_err(pure, ref) < TOLERANCE[dtype]
    assert rel_err(kernels, pure) < TOLERANCE[dtype]


@pytest.mark.parametrize(
    ("batch", "form", "start"),
    [
        (4, "recurrent", 0),
        (4, "dual", 0),
        (1, "recurrent", 0),
        (1, "recurrent", 1),
        (2, "recurrent", 0),
        (8, "recurrent", 0),
        (16, "recurrent", 0),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_decoder_matches_eager_under_teacher_forcing(aim_b, dtype, batch, form, start):
    """The graph decoder (with the recurrent cache the fused step of ``FusedStep``: 2 rows in
    multiply-adds, 4 with out_proj so and in_proj on the tensor cores, 8-32 on the tensor cores;
    with the dual cache the compiled step) against the eager loop with the recurrent cache
    (mamba-ssm's step kernels where installed), from the start graph (no prefix) or an eager
    prefix pass."""
    model = aim_b.to(dtype)
    g = torch.Generator().manual_seed(1)
    scale = 2.0
    codes = torch.randint(0, 16384, (batch, 256), generator=g).cuda()
    labels = torch.tensor([1, 207, 980, 3] * 4)[:batch].cuda()
    uniforms = torch.rand(batch, 256, dtype=torch.float64, generator=g).cuda()
    eager = []

    def choose(t, logits):
        eager.append(logits)
        return codes[:, t]

    model.config.decode_cache = "recurrent"
    model.decode(labels, codes[:, :0], scale, choose)  # eager teacher-forced logits of codes 0..255
    model.config.decode_cache = form
    decoder = model.graph_decoder(batch, scale, 1.0, 0, 1.0)
    model.config.decode_cache = "auto"
    assert decoder.cache.form == form
    assert (decoder.fused is not None) == (form == "recurrent")
    free = decoder.run(labels, codes[:, :start], uniforms[:, start:])  # compiles and captures
    assert torch.equal(free[:, :start], codes[:, :start])
    decoder.begin(labels, codes[:, :start], uniforms[:, start:])  # samples code start
    graph_logits = [decoder.logits.clone()]
    assert torch.equal(decoder.codes[:, start], sample_inverse_cdf(decoder.logits, uniforms[:, start]))
    agree = (
        (decoder.codes[:, start] == sample_inverse_cdf(eager[start].float(), uniforms[:, start])).sum().item()
    )
    for t in range(start, 255):
        decoder.codes[:, t] = codes[:, t]  # teacher forcing: feed the given code t
        decoder.graph.replay()  # samples code t + 1
        graph_logits.append(decoder.logits.clone())
        eager_code = sample_inverse_cdf(eager[t + 1].float(), uniforms[:, t + 1])
        agree += (decoder.codes[:, t + 1] == eager_code).sum().item()
    aim_b.float()
    assert rel_err(torch.stack(graph_logits, 1), torch.stack(eager[start:], 1)) < TOLERANCE[dtype]
    # a code differs only where a uniform falls within rounding of a CDF boundary. Random weights
    # give near-uniform distributions (about 6e-5 of mass per code), so bf16's ~1e-2 logit noise
    # moves many draws by a code or two: only float32 is expected to agree almost always (all but
    # a few: the fused step sums in another order, and moved 1 draw of 508 at batch 2).
    if dtype == torch.float32:
        draws = batch * (256 - start)
        assert draws - agree <= max(3, draws // 200)


@pytest.mark.parametrize(("top_k", "top_p"), [(0, 1.0), (50, 1.0), (0, 0.9), (100, 0.8)])
def test_graph_decoder_draw_kernel_like_sampling(aim_b, top_k, top_p):
    """The graph decoder's draw kernel (unfiltered: the row split over several programs; top-k /
    top-p: thresholds by bisection, no sort) draws the same codes as its sampling.py draw (sort /
    topk), same model and uniforms, over a whole generation."""
    labels, uniforms = torch.tensor([1, 207]).cuda(), torch.rand(2, 256, dtype=torch.float64).cuda()
    runs = []
    for fused in (True, False):
        aim_b._graph_decoder = None
        decoder = aim_b.graph_decoder(2, 2.0, 1.0, top_k, top_p)
        assert decoder.fused_draw
        decoder.fused_draw = fused
        runs.append(decoder.run(labels, torch.zeros(2, 0, dtype=torch.long).cuda(), uniforms))
    aim_b._graph_decoder = None
    assert torch.equal(runs[0], runs[1])
    assert runs[0].unique().numel() > 1


def test_graph_decoder_is_reused_and_reproducible(aim_b):
    model = aim_b.to(torch.bfloat16)
    gens = lambda: [torch.Generator("cuda").manual_seed(s) for s in range(3)]  # noqa: E731
    first = model.generate([1, 2, 3], guidance_scale=1.5, generator=gens())
    decoder = model._graph_decoder
    graph = decoder.graph
    second = model.generate([1, 2, 3], guidance_scale=1.5, generator=gens())
    reused = model._graph_decoder is decoder and decoder.graph is graph
    aim_b.float()  # a cast frees the decoder
    assert reused
    assert torch.equal(first, second)


def test_sampled_model_copies_without_its_decoder_and_a_move_frees_it(aim_b):
    """deepcopy, pickle and torch.save failed on the CUDA graphs of a model that had sampled, and
    .cpu() (an offload hook) left the decoder's cache and graphs on the GPU."""
    model = aim_b.to(torch.bfloat16)
    gens = lambda: [torch.Generator("cuda").manual_seed(s) for s in range(64)]  # noqa: E731
    codes = model.generate(list(range(64)), guidance_scale=1.5, generator=gens())
    assert model._graph_decoder is not None
    clone = copy.deepcopy(model)
    assert torch.equal(clone.generate(list(range(64)), guidance_scale=1.5, generator=gens()), codes)
    del clone
    torch.save(model, io.BytesIO())
    gc.collect()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    before = torch.cuda.memory_allocated()
    model.cpu()
    gc.collect()
    freed = before - torch.cuda.memory_allocated()
    aim_b.cuda().float()
    torch.cuda.empty_cache()  # what was freed stays reserved otherwise, and tests below count free memory
    assert model._graph_decoder is None and freed > 2 * weights, (freed, weights)


def test_graph_decoder_is_rebuilt_when_the_config_changes(aim_b):
    model = aim_b
    model.generate([1], guidance_scale=1.5, generator=torch.Generator("cuda").manual_seed(0))
    decoder = model._graph_decoder
    model.config.original_decode_positions = True  # changes what the captured step computes
    try:
        model.generate([1], guidance_scale=1.5, generator=torch.Generator("cuda").manual_seed(0))
        assert model._graph_decoder is not decoder
    finally:
        model.config.original_decode_positions = False


def test_large_batch_is_split_to_fit_memory(aim_b):
    """With only ~1.5 GiB free, 64 guided AiM-B images (about 2.5 GiB of cache) run in chunks."""
    model = aim_b
    model._graph_decoder = None
    torch.cuda.empty_cache()  # memory reserved by earlier tests counts as free but may not fit a chunk
    free, _ = torch.cuda.mem_get_info()
    hog = torch.empty(free - int(1.5 * 2**30), dtype=torch.uint8, device="cuda")
    fits = model.max_batch_size_for(guided=True)
    assert 1 <= fits < 64
    gens = [torch.Generator("cuda").manual_seed(i) for i in range(64)]
    codes = model.generate(list(range(64)), guidance_scale=2.0, generator=gens)
    assert codes.shape == (64, 256)
    del hog
    model._graph_decoder = None
    first = model.generate(
        list(range(fits)),
        guidance_scale=2.0,
        generator=[torch.Generator("cuda").manual_seed(i) for i in range(fits)],
    )
    assert torch.equal(codes[:fits], first)  # the first chunk is exactly a batch of that size


def test_memory_cached_by_the_allocator_counts_as_free(aim_b):
    """After a large allocation is freed into PyTorch's cache (as a VQ decode of 256 images leaves
    ~25 GiB), the batch that fits is what it was (``test_generation`` checks the rule on the CPU)."""
    from aim_hf.memory import free_memory

    model = aim_b
    torch.cuda.empty_cache()
    fits = model.max_batch_size_for(guided=True)
    available = free_memory("cuda")
    block = torch.empty(available // 2, dtype=torch.uint8, device="cuda")
    del block  # freed, and kept by the caching allocator
    assert torch.cuda.memory_reserved() - torch.cuda.memory_allocated() >= available // 2
    now = model.max_batch_size_for(guided=True)
    assert abs(now - fits) <= 0.01 * fits, (now, fits)
    torch.cuda.empty_cache()


def test_decode_is_split_to_fit_memory():
    """With 4 GiB free, 64 images of LlamaGen's VQ-f16 in float32 (about 12 GiB at once) decode in
    chunks that fit, and equal the images decoded at once (TF32 off: float32 summed in another
    order through ~30 convolutions of up to 4608 terms each; measured 1.8e-5, allowed 1e-4)."""
    from diffusers import VQModel

    from aim_hf.memory import free_memory
    from aim_hf.tokenizer import decode_batch_size, decode_codes, llamagen_vq_config

    vq = VQModel(**llamagen_vq_config()).cuda().eval()
    codes = torch.randint(0, 16384, (64, 256), generator=torch.Generator().manual_seed(0))
    torch.cuda.empty_cache()
    hog = torch.empty(free_memory("cuda") - 4 * 2**30, dtype=torch.uint8, device="cuda")
    fits = decode_batch_size(vq, 16, torch.device("cuda"))
    assert 4 <= fits < 64
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        chunked = decode_codes(vq, codes)
        assert torch.cuda.max_memory_allocated() - start < 4 * 2**30
        del hog
        whole = decode_codes(vq, codes, batch_size=64)
    assert ((chunked - whole).norm() / whole.norm()).item() < 1e-4
    torch.cuda.empty_cache()


@pytest.mark.parametrize("lookup_from_codebook", [True, False])
def test_model_cpu_offload_samples_on_the_gpu(lookup_from_codebook):
    """enable_model_cpu_offload: the AiM is moved onto the GPU for generate (its hook), the tokenizer
    for decode, and the pipeline gives the codes and images of the pipeline kept on the GPU."""
    pipe = build_pipeline()
    pipe.vqvae.register_to_config(lookup_from_codebook=lookup_from_codebook)
    pipe.set_progress_bar_config(disable=True)
    gens = lambda: [torch.Generator("cuda").manual_seed(s) for s in range(2)]  # noqa: E731
    on_gpu = pipe.to("cuda")([1, 2], generator=gens(), output_type="pt").images
    pipe.to("cpu")
    pipe.enable_model_cpu_offload()
    offloaded = pipe([1, 2], generator=gens(), output_type="pt").images
    assert pipe.aim.device.type == "cpu" and pipe.vqvae.device.type == "cpu"  # moved back out
    assert torch.equal(offloaded, on_gpu)
