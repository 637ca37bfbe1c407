"""Configuration of AiM's stage-2 model (the Mamba2 stack that predicts VQ codes)."""

from __future__ import annotations

from transformers import PretrainedConfig

from .sampling import MAX_LOGIT_SCALE, is_real

# Sizes of the released and paper models (SPEC §2). AiM-B used plain per-layer adaLN, which is
# the grouped form with one group per layer.
PRESETS: dict[str, dict] = {
    "AiM-B": {"hidden_size": 768, "num_hidden_layers": 24, "adaln_groups": 24, "default_guidance_scale": 2.0},
    "AiM-L": {
        "hidden_size": 1024,
        "num_hidden_layers": 48,
        "adaln_groups": 4,
        "default_guidance_scale": 1.75,
    },
    "AiM-XL": {
        "hidden_size": 1536,
        "num_hidden_layers": 48,
        "adaln_groups": 4,
        "default_guidance_scale": 1.75,
    },
    "AiM-1B": {
        "hidden_size": 2048,
        "num_hidden_layers": 48,
        "adaln_groups": 4,
        "default_guidance_scale": 1.75,
    },
}

STATE_DTYPES = ("float32", "bfloat16", "float16", "float64")
CACHE_FORMS = ("recurrent", "dual")  # modeling_aim.AiMCache
DECODE_CACHES = ("auto", *CACHE_FORMS)


class AiMConfig(PretrainedConfig):
    """Every choice of an AiM model.

    Args:
        vocab_size: codebook size of the VQ tokenizer (codes are in ``[0, vocab_size)``).
        num_classes: number of class labels; index ``num_classes`` is the null class used for
            classifier-free guidance.
        num_tokens: codes per image (a 16x16 grid is 256), the length of a generated sequence.
        hidden_size / num_hidden_layers: width and depth of the Mamba2 stack.
        adaln_groups: G, the number of adaLN parameter groups; layer ``i`` uses group ``i % G``.
            ``G = 1`` is adaLN-single, ``G = num_hidden_layers`` plain per-layer adaLN. When
            ``G < num_hidden_layers`` each layer also has its own learned table added to its group.
        state_size, expand, head_dim, n_groups, conv_kernel, chunk_size: the Mamba2 mixer
            (``d_inner = expand * hidden_size``, ``num_heads = d_inner / head_dim``).
        class_dropout_prob: probability of replacing the label by the null class in training.
        original_decode_positions: reproduce the original's decoding, which feeds code ``k`` with
            position ``k + 1`` although training used ``k``; set for converted original weights.
        use_mamba_kernels: use mamba-ssm / causal-conv1d kernels when installed and on CUDA.
        use_triton_kernels: on CUDA, decode with this package's Triton step kernels (triton_ssm:
            conv, recurrent and dual SSM updates; triton_sampling: the draw, with top-k and top-p
            for up to 16384 codes) in the CUDA-graph decoder and the dual form (the eager loop's
            recurrent steps take mamba-ssm's where installed); without them "auto" keeps the
            recurrent cache.
        use_projection_kernels: on CUDA, decoding steps run in_proj and out_proj as
            ``triton_gemv`` matrix-vector products instead of cuBLAS: the CUDA-graph decoder's
            as ``fast_decode.FusedStep`` (three kernels a layer) up to 32 rows (batch 16 with
            guidance) with the recurrent cache, others up to 2 rows (batch 1).
        use_cuda_graphs: on CUDA, generate with compiled blocks and one CUDA graph per step.
        state_dtype: storage dtype of the recurrent SSM state in generation (the recurrent cache
            only: the dual history is kept in the weights' dtype); None keeps it in the
            weights' dtype, as mamba-ssm does (the update computes in float32, or float64 for a
            float64 state).
            scripts/numerics.py found a bf16 state adds no measurable error to bf16 weights' and
            it halves the bytes that bound large-batch decoding (BENCHMARKS.md).
        decode_cache: the SSM's memory in generation: "recurrent" (the state, read and written
            every step), "dual" (the history of x, B and the decays, written once and read after:
            about half the bytes for 256 tokens, twice the memory) or "auto" (dual for the CUDA-graph
            decoder from 64 rows, where it measured faster: ``AiMForImageGeneration.cache_form``).
        default_guidance_scale: classifier-free guidance used when a call names none (the paper's
            evaluation setting for the presets).
    """

    model_type = "aim"

    def __init__(
        self,
        vocab_size: int = 16384,
        num_classes: int = 1000,
        num_tokens: int = 256,
        hidden_size: int = 768,
        num_hidden_layers: int = 24,
        adaln_groups: int = 24,
        state_size: int = 128,
        expand: int = 2,
        head_dim: int = 64,
        n_groups: int = 1,
        conv_kernel: int = 4,
        chunk_size: int = 256,
        use_conv_bias: bool = True,
        use_bias: bool = False,
        layer_norm_epsilon: float = 1e-5,
        class_dropout_prob: float = 0.1,
        original_decode_positions: bool = False,
        use_mamba_kernels: bool = True,
        use_triton_kernels: bool = True,
        use_projection_kernels: bool = True,
        use_cuda_graphs: bool = True,
        state_dtype: str | None = None,
        decode_cache: str = "auto",
        default_guidance_scale: float = 2.0,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.num_classes = num_classes
        self.num_tokens = num_tokens
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.adaln_groups = adaln_groups
        self.state_size = state_size
        self.expand = expand
        self.head_dim = head_dim
        self.n_groups = n_groups
        self.conv_kernel = conv_kernel
        self.chunk_size = chunk_size
        self.use_conv_bias = use_conv_bias
        self.use_bias = use_bias
        self.layer_norm_epsilon = layer_norm_epsilon
        self.class_dropout_prob = class_dropout_prob
        self.original_decode_positions = original_decode_positions
        self.use_mamba_kernels = use_mamba_kernels
        self.use_triton_kernels = use_triton_kernels
        self.use_projection_kernels = use_projection_kernels
        self.use_cuda_graphs = use_cuda_graphs
        self.state_dtype = state_dtype
        self.decode_cache = decode_cache
        # a NumPy float is taken as the number it is (config.json holds plain numbers)
        self.default_guidance_scale = (
            float(default_guidance_scale) if is_real(default_guidance_scale) else default_guidance_scale
        )
        self.initializer_range = initializer_range
        derived = sorted(set(kwargs) & {"intermediate_size", "num_heads", "null_class"})
        if derived:
            raise ValueError(
                f"AiMConfig: {derived} are derived (intermediate_size = expand * hidden_size, num_heads = "
                "intermediate_size // head_dim, null_class = num_classes); set those instead"
            )
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.validate()

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> AiMConfig | tuple[AiMConfig, dict]:
        """transformers sets ``from_pretrained``'s overrides (``state_dtype="int8"``) after
        ``__init__``: they are checked here, as ``save_pretrained`` checks before it writes."""
        result = super().from_dict(config_dict, **kwargs)
        (result[0] if isinstance(result, tuple) else result).validate()
        return result

    @property
    def intermediate_size(self) -> int:
        return self.expand * self.hidden_size

    @property
    def num_heads(self) -> int:
        return self.intermediate_size // self.head_dim

    @property
    def null_class(self) -> int:
        return self.num_classes

    def validate(self) -> None:
        """A ValueError naming the first bad setting and what is allowed, after transformers' own
        checks of the common settings (its ``validate``, where the installed version has one)."""
        common = getattr(super(), "validate", None)
        if common is not None:
            common()
        positive = (
            "vocab_size", "num_classes", "num_tokens", "hidden_size", "num_hidden_layers",
            "adaln_groups", "state_size", "expand", "head_dim", "n_groups", "conv_kernel", "chunk_size",
        )  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AiMConfig.{name} must be a positive integer, got {value!r}")
        if self.num_hidden_layers % self.adaln_groups:
            raise ValueError(
                f"AiMConfig.adaln_groups={self.adaln_groups} must divide "
                f"num_hidden_layers={self.num_hidden_layers} (allowed: "
                f"{[g for g in range(1, self.num_hidden_layers + 1) if self.num_hidden_layers % g == 0]})"
            )
        if self.intermediate_size % self.head_dim:
            raise ValueError(
                f"AiMConfig: expand*hidden_size={self.intermediate_size} is not divisible by "
                f"head_dim={self.head_dim}"
            )
        if self.num_heads % self.n_groups:
            raise ValueError(
                f"AiMConfig: num_heads={self.num_heads} is not divisible by n_groups={self.n_groups}"
            )
        if not is_real(self.class_dropout_prob) or not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(
                f"AiMConfig.class_dropout_prob must be in [0, 1), got {self.class_dropout_prob!r}"
            )
        guidance = self.default_guidance_scale
        if not is_real(guidance) or not 0 <= guidance <= MAX_LOGIT_SCALE:
            raise ValueError(
                f"AiMConfig.default_guidance_scale must be a finite number >= 0 (at most {MAX_LOGIT_SCALE:g}), "
                f"got {guidance!r}"
            )
        if self.decode_cache not in DECODE_CACHES:
            raise ValueError(
                f"AiMConfig.decode_cache must be one of {DECODE_CACHES}, got {self.decode_cache!r}"
            )
        if self.state_dtype is not None and self.state_dtype not in STATE_DTYPES:
            raise ValueError(
                f"AiMConfig.state_dtype must be None or one of {STATE_DTYPES}, got {self.state_dtype!r}"
            )

    @property
    def has_layer_tables(self) -> bool:
        """Per-layer adaLN tables exist only for shared groups; with one group per layer they
        would be redundant with the group's bias."""
        return self.adaln_groups < self.num_hidden_layers

    @classmethod
    def from_preset(cls, name: str, **overrides) -> AiMConfig:
        """A config of one of the paper's sizes, e.g. ``AiMConfig.from_preset("AiM-XL")``."""
        if name not in PRESETS:
            raise ValueError(f"unknown AiM preset {name!r}; allowed: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})
