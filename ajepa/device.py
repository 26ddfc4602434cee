"""Device choice shared by training, evaluation and the benchmarks."""

from __future__ import annotations

import re

import torch

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def resolve_device(name: str) -> torch.device:
    """auto (CUDA when there is a GPU, else the CPU), cpu, cuda or cuda:N; a ValueError names a bad one."""
    if not DEVICE_PATTERN.match(name):
        raise ValueError(f"device {name!r:.40}: choose auto, cpu, cuda or cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: no CUDA GPU is available")
    return device
