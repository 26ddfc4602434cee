"""Implementation choice shared by every op: "auto" | "triton" | "reference"."""

from __future__ import annotations

import os

import torch

IMPLS = ("auto", "triton", "reference")


def triton_available_on(device: torch.device) -> bool:
    """Triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_impl(impl: str, device: torch.device, op: str) -> str:
    """Map `impl` to "triton" or "reference" for tensors on `device`.

    "auto" picks Triton on CUDA and the reference elsewhere (the interpreter is
    a test tool, too slow to be chosen automatically).
    """
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" else "reference"
    if impl == "triton" and not triton_available_on(device):
        raise ValueError(
            f"{op}: impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU); "
            f"got tensors on {device}"
        )
    return impl
