"""Test setup: without a GPU, Triton kernels run through the interpreter.

TRITON_INTERPRET must be set before triton is first imported, so this runs at
collection time, ahead of any `import kernels`.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from helpers import DEVICE  # noqa: E402

from kernels import _common  # noqa: E402


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every buffer a Triton launcher allocates starts as NaN, so an element no program wrote fails."""
    monkeypatch.setattr(_common, "POISON_OUTPUTS", True)


@pytest.fixture
def device() -> torch.device:
    return DEVICE
