import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from aim_hf import AiMConfig, AiMForImageGeneration

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors on a shared two-core machine: a second OpenMP thread only waits for the other
    core (measured: 8 training steps took 13 s with two threads under load, 0.2 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_script(name: str) -> ModuleType:
    """A module of scripts/ (not a package), to call its main() in this process."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of ``a`` against the reference ``b``, in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def tiny_config(**overrides) -> AiMConfig:
    """A model small enough for float64 tests in milliseconds, with more than one chunk per sequence."""
    fields = dict(
        vocab_size=37, num_classes=5, num_tokens=16, hidden_size=32, num_hidden_layers=4, adaln_groups=2,
        state_size=8, head_dim=8, chunk_size=4, class_dropout_prob=0.0,
    )  # fmt: skip
    fields.update(overrides)
    return AiMConfig(**fields)


def fake_cuda_memory(monkeypatch, device_free: int, reserved: int, allocated: int) -> None:
    """CUDA's memory queries as a device with ``device_free`` bytes free whose caching allocator
    holds ``reserved`` bytes, ``allocated`` of them in use: the rules that size batches by free
    memory (``aim_hf.memory``) tested without a GPU."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (device_free, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: reserved)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random non-zero values in every parameter, with magnitudes that keep activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if name.endswith("A_log"):
                value = torch.log(torch.rand(p.shape, generator=g, dtype=torch.float64) * 3 + 0.5)
            elif name.endswith("dt_bias"):
                value = torch.rand(p.shape, generator=g, dtype=torch.float64) * 3 - 4
            elif name.endswith(("norm.weight", "norm_f.weight", "final_norm.weight", ".D")):
                value = 1 + 0.2 * noise
            elif p.dim() >= 2 and not name.endswith(
                ("embed_tokens.weight", "embed_positions.weight", "embed_classes.weight", "adaln_table")
            ):
                value = noise / p.shape[-1] ** 0.5
            else:
                value = 0.3 * noise
            p.copy_(value.to(p.dtype))
    return model


@pytest.fixture
def tiny_model() -> AiMForImageGeneration:
    torch.manual_seed(0)
    return randomize(AiMForImageGeneration(tiny_config()).double()).eval()
