"""The diffusers VQModel port of LlamaGen's VQ-f16 against an independent reference of the original.

The reference below is written from the description of LlamaGen's tokenizer
(tokenizer/tokenizer_image/vq_model.py): same module names as the original checkpoint, plain
PyTorch, cosine nearest-code search on an l2-normalised codebook. Small configs keep the exact
block structure (5 levels, 2 resnets per encoder level, 3 per decoder level, attention at the
lowest resolution and in the middle) with fewer channels.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import fake_cuda_memory
from diffusers import VQModel
from safetensors.torch import save_file
from torch import Tensor, nn

from aim_hf.data import load_vq
from aim_hf.tokenizer import (
    convert_llamagen_vq_state_dict,
    decode_batch_size,
    decode_codes,
    encode_images,
    images_to_uint8,
    llamagen_vq_config,
    load_llamagen_vq,
)

# ---------------------------------------------------------------- reference (original layout)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class RefResnet(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _group_norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class RefAttention(nn.Module):
    """Single-head self-attention over pixels with 1x1-conv projections."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = _group_norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b, c, hgt, wid = x.shape
        h = self.norm(x)
        q, k, v = (proj(h).reshape(b, c, hgt * wid) for proj in (self.q, self.k, self.v))
        weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(c), dim=-1)
        out = torch.einsum("bij,bcj->bci", weights, v).reshape(b, c, hgt, wid)
        return x + self.proj_out(out)


class RefDownsample(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class RefUpsample(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(c: int) -> nn.ModuleList:
    return nn.ModuleList([RefResnet(c, c), RefAttention(c), RefResnet(c, c)])


class RefEncoder(nn.Module):
    def __init__(self, ch: int, ch_mult: tuple[int, ...], z_channels: int) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        cin = ch
        for level, mult in enumerate(ch_mult):
            block, cout, last = nn.Module(), ch * mult, level == len(ch_mult) - 1
            block.res = nn.ModuleList([RefResnet(cin, cout), RefResnet(cout, cout)])
            block.attn = nn.ModuleList([RefAttention(cout) for _ in range(2)] if last else [])
            if not last:
                block.downsample = RefDownsample(cout)
            self.conv_blocks.append(block)
            cin = cout
        self.mid = _mid(cin)
        self.norm_out = _group_norm(cin)
        self.conv_out = nn.Conv2d(cin, z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for block in self.conv_blocks:
            for i, res in enumerate(block.res):
                h = res(h)
                if len(block.attn):
                    h = block.attn[i](h)
            if hasattr(block, "downsample"):
                h = block.downsample(h)
        for layer in self.mid:
            h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class RefDecoder(nn.Module):
    def __init__(self, ch: int, ch_mult: tuple[int, ...], z_channels: int) -> None:
        super().__init__()
        cin = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, cin, 3, padding=1)
        self.mid = _mid(cin)
        self.conv_blocks = nn.ModuleList()
        for level, mult in enumerate(reversed(ch_mult)):  # lowest resolution first
            block, cout = nn.Module(), ch * mult
            block.res = nn.ModuleList([RefResnet(cin if j == 0 else cout, cout) for j in range(3)])
            block.attn = nn.ModuleList([RefAttention(cout) for _ in range(3)] if level == 0 else [])
            if level != len(ch_mult) - 1:
                block.upsample = RefUpsample(cout)
            self.conv_blocks.append(block)
            cin = cout
        self.norm_out = _group_norm(cin)
        self.conv_out = nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        for layer in self.mid:
            h = layer(h)
        for block in self.conv_blocks:
            for i, res in enumerate(block.res):
                h = res(h)
                if len(block.attn):
                    h = block.attn[i](h)
            if hasattr(block, "upsample"):
                h = block.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class RefQuantizer(nn.Module):
    def __init__(self, n_codes: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_codes, dim)
        self.register_buffer("codebook_used", torch.zeros(65536))

    def codes(self, z: Tensor) -> Tensor:
        """Nearest code by cosine similarity, (B, C, H, W) -> (B, H, W)."""
        cos = torch.einsum("bchw,nc->bhwn", F.normalize(z, dim=1), F.normalize(self.embedding.weight, dim=1))
        return cos.argmax(dim=-1)

    def lookup(self, codes: Tensor) -> Tensor:
        """(B, H, W) codes -> (B, C, H, W) unit code vectors."""
        return F.normalize(self.embedding.weight, dim=1)[codes].permute(0, 3, 1, 2)


class RefVQ(nn.Module):
    def __init__(
        self,
        ch: int = 128,
        ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
        z_channels: int = 256,
        n_codes: int = 16384,
        dim: int = 8,
    ) -> None:
        super().__init__()
        self.encoder = RefEncoder(ch, ch_mult, z_channels)
        self.decoder = RefDecoder(ch, ch_mult, z_channels)
        self.quantize = RefQuantizer(n_codes, dim)
        self.quant_conv = nn.Conv2d(z_channels, dim, 1)
        self.post_quant_conv = nn.Conv2d(dim, z_channels, 1)

    def encode(self, x: Tensor) -> Tensor:
        return self.quantize.codes(self.quant_conv(self.encoder(x))).flatten(1)

    def decode(self, codes: Tensor) -> Tensor:
        side = math.isqrt(codes.shape[1])
        return self.decoder(self.post_quant_conv(self.quantize.lookup(codes.reshape(-1, side, side))))


# ---------------------------------------------------------------- fixtures

SMALL_CH, SMALL_MULT, SMALL_Z, SMALL_CODES = 32, (1, 1, 2, 2, 4), 64, 64
SMALL_CONFIG = llamagen_vq_config(
    block_out_channels=tuple(SMALL_CH * m for m in SMALL_MULT),
    latent_channels=SMALL_Z,
    num_vq_embeddings=SMALL_CODES,
    sample_size=64,
)


def _randomize(model: nn.Module, seed: int) -> None:
    """Non-trivial weights everywhere: norms off identity, codebook rows of uneven length."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if name.endswith("embedding.weight"):
                p.copy_(noise * (0.5 + torch.rand(p.shape[0], 1, generator=gen)))
            elif ".norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:  # keep the default fan-in scaling, resample the values
                p.copy_(noise * p.std())


def _make_pair(dtype: torch.dtype) -> tuple[RefVQ, VQModel]:
    """A random small reference and its conversion, converted in ``dtype`` itself (the baked
    codebook normalisation must not be rounded to float32 for the float64 comparison)."""
    torch.manual_seed(0)
    ref = RefVQ(SMALL_CH, SMALL_MULT, SMALL_Z, SMALL_CODES).to(dtype).eval()
    _randomize(ref, seed=1)
    vq = load_llamagen_vq(ref.state_dict(), config=SMALL_CONFIG)
    assert vq.dtype == dtype
    return ref, vq


@pytest.fixture(scope="module")
def small_pair() -> tuple[RefVQ, VQModel]:
    return _make_pair(torch.float32)


def _images(batch: int, size: int, seed: int) -> Tensor:
    """Smooth random images in [-1, 1] (upsampled noise), like natural images in spirit."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, 3, size // 8, size // 8, generator=gen)
    return torch.tanh(F.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False))


# ---------------------------------------------------------------- equivalence with the reference


def test_small_model_matches_reference_float64() -> None:
    ref, vq = _make_pair(torch.float64)
    images = _images(2, 64, seed=2).double()
    with torch.no_grad():
        ref_codes = ref.encode(images)
        ref_images = ref.decode(ref_codes)
    codes = encode_images(vq, images)
    assert codes.shape == (2, 16) and codes.dtype == torch.long
    assert len(ref_codes.unique()) > 4  # the comparison is not trivial
    assert torch.equal(codes, ref_codes)
    decoded = decode_codes(vq, codes)
    assert decoded.shape == images.shape
    # Same float64 arithmetic in a different order through ~40 layers: errors stay near
    # 1e-13 relative; 1e-9 would still catch any wrong weight or layer order (O(1) changes).
    scale = ref_images.abs().max()
    assert (decoded - ref_images).abs().max() <= 1e-9 * scale


def test_small_model_matches_reference_float32(small_pair: tuple[RefVQ, VQModel]) -> None:
    ref, vq = small_pair
    images = _images(1, 64, seed=3)
    with torch.no_grad():
        ref_codes = ref.encode(images)
        ref_images = ref.decode(ref_codes)
    assert torch.equal(encode_images(vq, images), ref_codes)
    # float32 rounding (~1e-7) amplified by GroupNorm/attention over the decoder's depth;
    # the full-size model measured 1.7e-5 on outputs of order 1 (SPEC section 6).
    scale = ref_images.abs().max()
    assert (decode_codes(vq, ref_codes) - ref_images).abs().max() <= 1e-4 * scale


def test_full_size_keys_and_shapes_match() -> None:
    with torch.device("meta"):
        ref = RefVQ()
        target = VQModel(**llamagen_vq_config())
    n_ref = sum(p.numel() for p in ref.parameters())
    n_target = sum(p.numel() for p in target.parameters())
    assert n_ref == n_target
    assert 71e6 < n_target < 73e6  # LlamaGen's VQ-f16 has 72M parameters
    converted = convert_llamagen_vq_state_dict(ref.state_dict())
    expected = target.state_dict()
    assert set(converted) == set(expected)
    assert all(converted[k].shape == expected[k].shape for k in expected)


def test_config_values() -> None:
    config = llamagen_vq_config()
    assert config["block_out_channels"] == (128, 128, 256, 256, 512)
    assert config["num_vq_embeddings"] == 16384 and config["vq_embed_dim"] == 8
    assert config["lookup_from_codebook"] is True
    assert llamagen_vq_config(sample_size=128)["sample_size"] == 128
    with pytest.raises(ValueError, match="block_out_channel"):
        llamagen_vq_config(block_out_channel=(1,))


# ---------------------------------------------------------------- conversion details and errors


def _small_ref_state_dict() -> dict[str, Tensor]:
    torch.manual_seed(0)
    return RefVQ(SMALL_CH, SMALL_MULT, SMALL_Z, SMALL_CODES).state_dict()


def test_conversion_normalises_codebook_and_squeezes_attention() -> None:
    sd = _small_ref_state_dict()
    sd["quantize.embedding.weight"] = sd["quantize.embedding.weight"] * 3
    out = convert_llamagen_vq_state_dict(sd, SMALL_CONFIG)
    norms = out["quantize.embedding.weight"].norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    q = out["encoder.mid_block.attentions.0.to_q.weight"]
    assert q.ndim == 2 and torch.equal(q, sd["encoder.mid.1.q.weight"][:, :, 0, 0])
    assert "quantize.codebook_used" not in out
    assert torch.equal(
        out["decoder.up_blocks.0.resnets.0.conv1.weight"], sd["decoder.conv_blocks.0.res.0.conv1.weight"]
    )
    assert torch.equal(
        out["encoder.down_blocks.2.resnets.0.conv_shortcut.weight"],
        sd["encoder.conv_blocks.2.res.0.nin_shortcut.weight"],
    )


def test_conversion_takes_vqvae_prefix_and_ignores_other_prefixes() -> None:
    sd = _small_ref_state_dict()
    plain = convert_llamagen_vq_state_dict(sd, SMALL_CONFIG)
    combined = {f"vqvae.{k}": v for k, v in sd.items()}
    combined["mamba.lm_head.weight"] = torch.zeros(2, 2)
    prefixed = convert_llamagen_vq_state_dict(combined, SMALL_CONFIG)
    assert plain.keys() == prefixed.keys()
    assert all(torch.equal(plain[k], prefixed[k]) for k in plain)


def test_conversion_errors_name_the_key() -> None:
    sd = _small_ref_state_dict()
    with pytest.raises(ValueError, match=r"encoder\.extra\.weight"):
        convert_llamagen_vq_state_dict({**sd, "encoder.extra.weight": torch.zeros(1)}, SMALL_CONFIG)
    missing = {k: v for k, v in sd.items() if k != "decoder.conv_blocks.1.res.2.norm2.bias"}
    with pytest.raises(ValueError, match=r"missing.*decoder\.up_blocks\.1\.resnets\.2\.norm2\.bias"):
        convert_llamagen_vq_state_dict(missing, SMALL_CONFIG)
    with pytest.raises(ValueError, match=r"encoder\.conv_in\.weight.*shape"):
        convert_llamagen_vq_state_dict(
            {**sd, "encoder.conv_in.weight": torch.zeros(32, 4, 3, 3)}, SMALL_CONFIG
        )
    # The small checkpoint does not fit the full-size config (the default reads it from the weights).
    with pytest.raises(ValueError, match="shape"):
        convert_llamagen_vq_state_dict(sd, llamagen_vq_config())


# ---------------------------------------------------------------- loading from files


def test_load_from_torch_pickle_and_safetensors(tmp_path, small_pair: tuple[RefVQ, VQModel]) -> None:
    ref, vq = small_pair
    sd = ref.state_dict()
    torch.save({"model": sd}, tmp_path / "vq_ds16_c2i.pt")
    save_file({f"vqvae.{k}": v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    expected = vq.state_dict()
    for name in ("vq_ds16_c2i.pt", "model.safetensors"):
        loaded = load_llamagen_vq(tmp_path / name, config=SMALL_CONFIG)
        assert isinstance(loaded, VQModel) and not loaded.training
        state = loaded.state_dict()
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_tokenizers_of_other_sizes_load_without_a_config(tmp_path, small_pair: tuple[RefVQ, VQModel]) -> None:
    """The config is read from the weights: ``load_vq`` (prepare_codes.py --tokenizer, sample_fid.py
    --vqvae) took only VQ-f16's full size. Early AiM checkpoints keep the tokenizer under "vq_vae."."""
    ref, vq = small_pair
    sd = ref.state_dict()
    torch.save({"model": sd}, tmp_path / "small.pt")
    legacy = {f"vq_vae.{k}": v.contiguous() for k, v in sd.items()}
    save_file({**legacy, "mamba.lm_head.weight": torch.zeros(2, 2)}, str(tmp_path / "legacy.safetensors"))
    expected = vq.state_dict()
    for loaded in (
        load_llamagen_vq(tmp_path / "small.pt"),
        load_vq(tmp_path / "small.pt"),
        load_vq(tmp_path / "legacy.safetensors"),
    ):
        assert tuple(loaded.config.block_out_channels) == tuple(SMALL_CONFIG["block_out_channels"])
        state = loaded.state_dict()
        assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)


def test_load_errors_name_the_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_llamagen_vq(tmp_path / "nowhere.pt")
    for name in ("garbage.pt", "garbage.safetensors"):
        (tmp_path / name).write_bytes(b"not a checkpoint")
        with pytest.raises(ValueError, match=name):
            load_llamagen_vq(tmp_path / name)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"list\.pt does not hold a state dict"):
        load_llamagen_vq(tmp_path / "list.pt")
    wrong = tmp_path / "wrong.pt"
    torch.save({"model": {"encoder.foo.weight": torch.zeros(1)}}, wrong)
    with pytest.raises(ValueError, match=r"wrong\.pt: missing key .*expected a LlamaGen VQ tokenizer"):
        load_llamagen_vq(wrong)
    with pytest.raises(ValueError, match=r"wrong\.pt.*encoder\.foo\.weight"):
        load_llamagen_vq(wrong, SMALL_CONFIG)


# ---------------------------------------------------------------- encode/decode on tiny VQModels


def _tiny_vq(lookup_from_codebook: bool = True, levels: int = 2) -> VQModel:
    torch.manual_seed(0)
    vq = VQModel(
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=(8,) * levels,
        layers_per_block=1,
        latent_channels=4,
        num_vq_embeddings=32,
        vq_embed_dim=3,
        norm_num_groups=4,
        lookup_from_codebook=lookup_from_codebook,
    )
    with torch.no_grad():
        vq.quantize.embedding.weight.normal_()
    return vq.eval()


def test_encode_is_raster_order_and_decode_matches_vq_roundtrip() -> None:
    vq = _tiny_vq()
    images = _images(2, 16, seed=4)
    codes = encode_images(vq, images)
    assert codes.shape == (2, 64)
    latents = vq.encode(images).latents  # (2, 3, 8, 8)
    codebook = vq.quantize.embedding.weight
    for b, i, j in [(0, 0, 0), (0, 0, 5), (1, 3, 0), (1, 7, 6)]:
        nearest = (codebook - latents[b, :, i, j]).norm(dim=-1).argmin()
        assert codes[b, i * 8 + j] == nearest
    with torch.no_grad():
        expected = vq.decode(latents).sample  # quantises the latents itself
    torch.testing.assert_close(decode_codes(vq, codes), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lookup_from_codebook", [True, False])
@pytest.mark.parametrize("levels,grid", [(2, 4), (3, 8)])
def test_decode_codes_grid_sizes(lookup_from_codebook: bool, levels: int, grid: int) -> None:
    vq = _tiny_vq(lookup_from_codebook, levels)
    codes = torch.randint(0, 32, (2, grid * grid))
    out = decode_codes(vq, codes.int())
    factor = 2 ** (levels - 1)
    assert out.shape == (2, 3, grid * factor, grid * factor)
    # Each image depends only on its own codes.
    torch.testing.assert_close(decode_codes(vq, codes[1:]), out[1:], atol=1e-5, rtol=1e-5)


def test_decode_codes_validation() -> None:
    vq = _tiny_vq()
    with pytest.raises(ValueError, match="integer"):
        decode_codes(vq, torch.zeros(1, 16))
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        decode_codes(vq, torch.zeros(16, dtype=torch.long))
    with pytest.raises(ValueError, match="perfect square"):
        decode_codes(vq, torch.zeros(1, 15, dtype=torch.long))
    with pytest.raises(ValueError, match=r"code 32 .*\[0, 32\)"):
        decode_codes(vq, torch.full((1, 16), 32))
    with pytest.raises(ValueError, match=r"code -1 .*\[0, 32\)"):
        decode_codes(vq, torch.full((1, 16), -1))
    with pytest.raises(ValueError, match=r"no image \(shape \(0, 16\)\)"):
        decode_codes(vq, torch.zeros(0, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        decode_codes(vq, torch.zeros(1, 16, dtype=torch.long), batch_size=0)


@pytest.mark.parametrize("lookup_from_codebook", [True, False])
def test_decode_codes_in_chunks(lookup_from_codebook: bool) -> None:
    """Five images two at a time are the five at once (float32, sums in another order: 1e-6)."""
    vq = _tiny_vq(lookup_from_codebook)
    codes = torch.randint(0, 32, (5, 16), generator=torch.Generator().manual_seed(2))
    whole = decode_codes(vq, codes)
    chunked = decode_codes(vq, codes, batch_size=2)
    assert chunked.shape == whole.shape == (5, 3, 8, 8)
    assert ((chunked - whole).norm() / whole.norm()).item() < 1e-6


def test_decode_batch_size_fits_the_free_memory(monkeypatch) -> None:
    """On a CUDA device the decode takes as many images as fit: about six full-resolution
    activations an image (measured), eight counted, within 80% of what is free, memory held
    unused by PyTorch's allocator included."""
    gib = 2**30
    fake_cuda_memory(monkeypatch, device_free=2 * gib, reserved=7 * gib, allocated=1 * gib)
    llamagen = SimpleNamespace(config=SimpleNamespace(block_out_channels=(128, 128, 256, 256, 512)))
    per_image = 8 * 128 * 256 * 256  # 16x16 codes -> 256x256 pixels, bytes per element below
    for dtype, size in [(torch.bfloat16, 2), (torch.float32, 4)]:
        llamagen.dtype = dtype
        expected = int(0.8 * 8 * gib) // (per_image * size)  # 2 GiB free + 6 GiB cached
        assert decode_batch_size(llamagen, 16, torch.device("cuda")) == expected
    assert expected == 25  # float32: 25 images of LlamaGen's VQ-f16 in 8 GiB


def test_encode_images_validation() -> None:
    vq = _tiny_vq()
    with pytest.raises(ValueError, match="shape"):
        encode_images(vq, torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="floating point"):
        encode_images(vq, torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="multiples of 2"):
        encode_images(vq, torch.zeros(1, 3, 15, 16))


def test_images_to_uint8() -> None:
    x = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0]).reshape(1, 1, 2, 3)
    out = images_to_uint8(x)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert out.flatten().tolist() == [0, 0, 128, 191, 255, 255]
