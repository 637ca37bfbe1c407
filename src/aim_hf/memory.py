"""How much CUDA memory new tensors can take: generation and VQ decoding split their batches by it."""

from __future__ import annotations

import torch


def free_memory(device: torch.device | str | int) -> int:
    """Bytes a CUDA device has for new tensors: its free memory plus what PyTorch's caching
    allocator holds unused (a VQ decode of 256 images leaves ~25 GiB there), which the allocator
    hands out again or releases when asked for more."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
