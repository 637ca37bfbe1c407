"""LlamaGen's VQ image tokenizers (VQ-f16 and other sizes, read from the weights), run as a
diffusers ``VQModel``.

AiM predicts the codes of LlamaGen's VQ tokenizer. Its architecture is exactly a diffusers
``VQModel`` (SPEC section 6), so instead of re-implementing it we convert the original weights
into that class and keep the diffusers save/load machinery. Two details make the conversion
exact: the original l2-normalises its codebook at every lookup, so the normalised codebook is
stored once; and it searches the nearest code by cosine, which for unit codes picks the same
index as diffusers' Euclidean search on the raw latent.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import VQModel
from torch import Tensor

from .conversion import read_state_dict
from .memory import free_memory

__all__ = [
    "convert_llamagen_vq_state_dict",
    "decode_batch_size",
    "decode_codes",
    "downsampling_factor",
    "encode_images",
    "images_to_uint8",
    "llamagen_vq_config",
    "load_llamagen_vq",
    "tokenizer_part",
]

# AiM's combined checkpoints keep the tokenizer under "vqvae." ("vq_vae." in early versions)
TOKENIZER_PREFIXES = ("vqvae.", "vq_vae.")

# Original LlamaGen key -> diffusers VQModel key, one rule per module kind. The groups keep
# the encoder/decoder side, block and layer numbers; the last group is the parameter name.
_BLOCK_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^(encoder|decoder)\.conv_in\.(weight|bias)$"), r"\1.conv_in.\2"),
    (re.compile(r"^(encoder|decoder)\.conv_out\.(weight|bias)$"), r"\1.conv_out.\2"),
    (re.compile(r"^(encoder|decoder)\.norm_out\.(weight|bias)$"), r"\1.conv_norm_out.\2"),
    (
        re.compile(r"^encoder\.conv_blocks\.(\d+)\.downsample\.conv\.(weight|bias)$"),
        r"encoder.down_blocks.\1.downsamplers.0.conv.\2",
    ),
    (
        re.compile(r"^decoder\.conv_blocks\.(\d+)\.upsample\.conv\.(weight|bias)$"),
        r"decoder.up_blocks.\1.upsamplers.0.conv.\2",
    ),
    (re.compile(r"^(quant_conv|post_quant_conv)\.(weight|bias)$"), r"\1.\2"),
]

# Resnet and attention blocks: original container path -> diffusers container path.
_CONTAINER_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^encoder\.conv_blocks\.(\d+)\.res\.(\d+)$"), r"encoder.down_blocks.\1.resnets.\2"),
    (re.compile(r"^encoder\.conv_blocks\.(\d+)\.attn\.(\d+)$"), r"encoder.down_blocks.\1.attentions.\2"),
    (re.compile(r"^decoder\.conv_blocks\.(\d+)\.res\.(\d+)$"), r"decoder.up_blocks.\1.resnets.\2"),
    (re.compile(r"^decoder\.conv_blocks\.(\d+)\.attn\.(\d+)$"), r"decoder.up_blocks.\1.attentions.\2"),
    (re.compile(r"^(encoder|decoder)\.mid\.0$"), r"\1.mid_block.resnets.0"),
    (re.compile(r"^(encoder|decoder)\.mid\.1$"), r"\1.mid_block.attentions.0"),
    (re.compile(r"^(encoder|decoder)\.mid\.2$"), r"\1.mid_block.resnets.1"),
]

_RESNET_LAYERS = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "nin_shortcut": "conv_shortcut",
}
# Attention projections are 1x1 convolutions in the original and Linear layers in diffusers.
_ATTENTION_LAYERS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def llamagen_vq_config(**overrides: Any) -> dict[str, Any]:
    """``VQModel`` keyword arguments of LlamaGen's VQ-f16 (16x16 codes for 256x256 images).

    Overrides replace single entries, e.g. smaller ``block_out_channels`` for tests.
    """
    config: dict[str, Any] = {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4 + ("AttnDownEncoderBlock2D",),
        "up_block_types": ("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (128, 128, 256, 256, 512),
        "layers_per_block": 2,
        "act_fn": "silu",
        "latent_channels": 256,
        "num_vq_embeddings": 16384,
        "vq_embed_dim": 8,
        "norm_num_groups": 32,
        "norm_type": "group",
        "mid_block_add_attention": True,
        "lookup_from_codebook": True,
        "sample_size": 256,
    }
    unknown = set(overrides) - set(config)
    if unknown:
        raise ValueError(f"unknown VQ config keys {sorted(unknown)}; known keys: {sorted(config)}")
    config.update(overrides)
    return config


def _convert_key(key: str) -> tuple[str, bool] | None:
    """The diffusers name of one original key and whether it is a 1x1-conv attention projection
    (a Linear in diffusers); None if the key is not a LlamaGen VQ key."""
    for pattern, replacement in _BLOCK_RULES:
        if pattern.match(key):
            return pattern.sub(replacement, key), False
    container, _, param = key.rpartition(".")
    container, _, layer = container.rpartition(".")
    if param not in ("weight", "bias"):
        return None
    for pattern, replacement in _CONTAINER_RULES:
        if pattern.match(container):
            new_container = pattern.sub(replacement, container)
            is_attention = ".attentions." in new_container
            layers = _ATTENTION_LAYERS if is_attention else _RESNET_LAYERS
            if layer not in layers:
                return None
            return f"{new_container}.{layers[layer]}.{param}", is_attention and layer != "norm"
    return None


def infer_llamagen_vq_config(state_dict: Mapping[str, torch.Tensor], name: str, grid_side: int = 16) -> dict:
    """``VQModel`` kwargs of a LlamaGen VQ state dict (original key names), from its shapes.

    Channel widths, depth, attention placement, latent and codebook sizes are read from the
    weights; the group-norm size is LlamaGen's 32. ``grid_side`` codes per image side set the
    nominal image size (LlamaGen's 16 codes a side: 256x256 images for VQ-f16)."""

    def shape(key: str) -> torch.Size:
        if key not in state_dict:
            raise ValueError(f"{name}: missing key {key!r} (expected a LlamaGen VQ tokenizer state dict)")
        return state_dict[key].shape

    blocks = re.compile(r"encoder\.conv_blocks\.(\d+)\.res\.(\d+)\.")
    found = [tuple(map(int, m.groups())) for key in state_dict if (m := blocks.match(key))]
    levels = max((level for level, _ in found), default=-1) + 1
    if levels == 0:
        raise ValueError(
            f"{name}: missing key 'encoder.conv_blocks.0.res.0.conv1.weight' (expected a LlamaGen VQ tokenizer state dict)"
        )
    widths = tuple(shape(f"encoder.conv_blocks.{i}.res.0.conv1.weight")[0] for i in range(levels))

    def has_attention(side: str, level: int) -> bool:
        return any(key.startswith(f"{side}.conv_blocks.{level}.attn.") for key in state_dict)

    codes, code_dim = shape("quantize.embedding.weight")
    return llamagen_vq_config(
        in_channels=shape("encoder.conv_in.weight")[1],
        out_channels=shape("decoder.conv_out.weight")[0],
        block_out_channels=widths,
        layers_per_block=1 + max(layer for level, layer in found if level == 0),
        down_block_types=tuple(
            "AttnDownEncoderBlock2D" if has_attention("encoder", i) else "DownEncoderBlock2D"
            for i in range(levels)
        ),
        up_block_types=tuple(
            "AttnUpDecoderBlock2D" if has_attention("decoder", i) else "UpDecoderBlock2D"
            for i in range(levels)
        ),
        latent_channels=shape("encoder.conv_out.weight")[0],
        num_vq_embeddings=codes,
        vq_embed_dim=code_dim,
        mid_block_add_attention="encoder.mid.1.q.weight" in state_dict,
        sample_size=grid_side * 2 ** (levels - 1),
    )


def _expected_shapes(config: dict[str, Any]) -> dict[str, torch.Size]:
    """Parameter shapes of a ``VQModel`` with this config, built without allocating memory."""
    with torch.device("meta"):
        model = VQModel(**config)
    return {name: tensor.shape for name, tensor in model.state_dict().items()}


def tokenizer_part(state_dict: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """The tokenizer's keys without their "vqvae." (or "vq_vae.") prefix where any key has one
    (AiM's combined checkpoints), else the state dict as it is."""
    part = {}
    for key, value in state_dict.items():
        prefix = next((p for p in TOKENIZER_PREFIXES if key.startswith(p)), None)
        if prefix is not None:
            part[key[len(prefix) :]] = value
    return part or state_dict


def convert_llamagen_vq_state_dict(
    state_dict: dict[str, Tensor], config: dict[str, Any] | None = None
) -> dict[str, Tensor]:
    """Rename, reshape and normalise an original LlamaGen VQ state dict for diffusers' ``VQModel``.

    Keys may carry a "vqvae." prefix (AiM's combined checkpoints store the tokenizer that way);
    when any key does, only those keys are taken, so a whole AiM state dict can be passed.
    ``config`` (``VQModel`` kwargs, default: read from the weights' shapes) is what the result is
    checked against: every key must map, every expected key must be present, shapes must match.
    """
    state_dict = tokenizer_part(state_dict)
    config = config if config is not None else infer_llamagen_vq_config(state_dict, "LlamaGen VQ state dict")
    expected = _expected_shapes(config)

    converted: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        if key == "quantize.codebook_used":  # training statistics only
            continue
        if key == "quantize.embedding.weight":
            new_key, tensor = key, F.normalize(tensor, p=2, dim=-1)
        else:
            converted_key = _convert_key(key)
            if converted_key is None:
                raise ValueError(f"unexpected key {key!r} in the LlamaGen VQ state dict")
            new_key, is_linear = converted_key
            if is_linear and tensor.ndim == 4:
                if tensor.shape[2:] != (1, 1):
                    raise ValueError(f"{key!r}: expected a 1x1 convolution, got shape {tuple(tensor.shape)}")
                tensor = tensor[:, :, 0, 0]
        if new_key not in expected:
            raise ValueError(f"unexpected key {key!r} (maps to {new_key!r}, which this VQModel config lacks)")
        if tensor.shape != expected[new_key]:
            raise ValueError(
                f"{key!r}: shape {tuple(tensor.shape)} after conversion, "
                f"expected {tuple(expected[new_key])} for {new_key!r}"
            )
        converted[new_key] = tensor.contiguous()

    missing = sorted(set(expected) - set(converted))
    if missing:
        shown = ", ".join(repr(k) for k in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"LlamaGen VQ state dict is missing weights for {shown}{more}")
    return converted


def load_llamagen_vq(
    path_or_state_dict: str | os.PathLike[str] | dict[str, Tensor], config: dict[str, Any] | None = None
) -> VQModel:
    """A ``VQModel`` holding LlamaGen VQ weights (``vq_ds16_c2i.pt``, a .safetensors file, or a dict).

    ``config`` (``VQModel`` kwargs) defaults to the one read from the weights' shapes, so LlamaGen
    tokenizers of other sizes load too. The model is built on the meta device and takes the
    converted tensors as they are, so loading costs no random initialisation; it is returned in
    eval mode.
    """
    name = None if isinstance(path_or_state_dict, dict) else os.fspath(path_or_state_dict)
    state_dict = tokenizer_part(path_or_state_dict if name is None else read_state_dict(name))
    if config is None:
        config = infer_llamagen_vq_config(state_dict, name or "LlamaGen VQ state dict")
    try:
        converted = convert_llamagen_vq_state_dict(dict(state_dict), config)
    except ValueError as err:
        if name is None:
            raise
        raise ValueError(f"{name}: {err}") from err
    with torch.device("meta"):
        model = VQModel(**config)
    model.load_state_dict(converted, strict=True, assign=True)
    return model.eval()


def downsampling_factor(vq: VQModel) -> int:
    """Image pixels per code along a side: each encoder level after the first halves the image."""
    return 2 ** (len(vq.config.block_out_channels) - 1)


@torch.no_grad()
def encode_images(vq: VQModel, images: Tensor) -> Tensor:
    """Codes of images in [-1, 1], shape (B, 3, H, W) -> LongTensor (B, h*w) in raster order."""
    if images.ndim != 4 or images.shape[1] != vq.config.in_channels:
        raise ValueError(
            f"images must have shape (B, {vq.config.in_channels}, H, W), got {tuple(images.shape)}"
        )
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [-1, 1], got dtype {images.dtype}")
    factor = downsampling_factor(vq)
    if images.shape[2] % factor or images.shape[3] % factor:
        raise ValueError(
            f"image height and width must be multiples of {factor}, got {tuple(images.shape[2:])}"
        )
    latents = vq.encode(images.to(device=vq.device, dtype=vq.dtype)).latents
    # diffusers returns the indices flat over (batch, height, width), in that order.
    indices = vq.quantize(latents)[2][2]
    return indices.reshape(images.shape[0], -1).long()


@torch.no_grad()
def decode_codes(
    vq: VQModel, codes: Tensor, device: torch.device | None = None, batch_size: int | None = None
) -> Tensor:
    """Images in about [-1, 1], shape (B, 3, H, W), from codes (B, N) on a sqrt(N) x sqrt(N) grid,
    decoded on ``device`` (default: the tokenizer's), ``batch_size`` images at a time (default: on
    a CUDA device as many as fit its free memory, ``decode_batch_size``; elsewhere all)."""
    if not isinstance(codes, Tensor):
        raise ValueError(
            f"codes must be a tensor of VQ codes (num_images, num_tokens), got {type(codes).__name__}"
        )
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got dtype {codes.dtype}")
    if codes.ndim != 2:
        raise ValueError(f"codes must have shape (B, N), got {tuple(codes.shape)}")
    batch, length = codes.shape
    if batch == 0:
        raise ValueError(f"codes hold no image (shape {tuple(codes.shape)})")
    side = math.isqrt(length)
    if side * side != length or length == 0:
        raise ValueError(f"the number of codes per image must be a positive perfect square, got {length}")
    size = vq.config.num_vq_embeddings
    low, high = int(codes.min()), int(codes.max())
    if low < 0 or high >= size:
        bad = low if low < 0 else high
        raise ValueError(f"code {bad} is outside the codebook range [0, {size})")
    device = torch.device(vq.device if device is None else device)
    if batch_size is None:
        batch_size = decode_batch_size(vq, side, device) if device.type == "cuda" else batch
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    chunks = [_decode(vq, codes[i : i + batch_size], side, device) for i in range(0, batch, batch_size)]
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


def _decode(vq: VQModel, codes: Tensor, side: int, device: torch.device) -> Tensor:
    shape = (codes.shape[0], side, side, vq.config.vq_embed_dim or vq.config.latent_channels)
    indices = codes.to(device=device, dtype=torch.long).reshape(-1)
    if vq.config.lookup_from_codebook:
        return vq.decode(indices, force_not_quantize=True, shape=shape).sample
    # Without lookup_from_codebook, decode() takes the quantised latent itself; the lookup runs
    # where the codebook is (an offloaded tokenizer moves to the device only inside decode).
    codebook = vq.quantize.embedding.weight.device
    latent = vq.quantize.get_codebook_entry(indices.to(codebook), shape).to(device)
    return vq.decode(latent, force_not_quantize=True).sample


def decode_batch_size(vq: VQModel, side: int, device: torch.device) -> int:
    """How many images of side x side codes the tokenizer decodes within 80% of a CUDA device's
    free memory. An image takes about six activations of the decoder's full-resolution width
    (LlamaGen's VQ-f16: 96 MB in bf16, 192 MB in float32, measured on an H100); eight are counted."""
    pixels = (side * downsampling_factor(vq)) ** 2
    per_image = 8 * vq.config.block_out_channels[0] * pixels * vq.dtype.itemsize
    return max(1, int(0.8 * free_memory(device)) // per_image)


def images_to_uint8(images: Tensor) -> Tensor:
    """Pixels in [-1, 1] -> uint8 in [0, 255] as the original saves them (clamped, rounded)."""
    return ((images.float() + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8)
