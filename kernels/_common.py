"""The toolkit every op shares: implementation choice, supported shapes, the interpreter check,
argument checks that name the argument, the device guard and the output allocator (with the
test suite's NaN-poison switch).

Every op has the same shape: argument checks in the public wrapper (``kernels/<op>/__init__.py``),
pure math in ``reference.py``, launchers plus autograd in ``fused.py``. This module imports no
triton, so the checks and the reference path work where triton is not installed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

IMPLS = ("auto", "triton", "reference")
HAS_TRITON = importlib.util.find_spec("triton") is not None

# varlen_attention head dims (q.shape[-1]), not only powers of 2: the kernels pad Dh to the next one.
MIN_HEAD_DIM, MAX_HEAD_DIM = 8, 128
# The attention kernels put sequences on CUDA grid dim 2, which holds at most 65535 programs.
MAX_SEQUENCES = 65535
# Dtypes the row-wise Triton kernels (layer_norm, bias_gelu) read and write; bf16 needs CUDA
# (the interpreter has no bfloat16).
TRITON_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Test switch (tests/conftest.py turns it on): new_output fills every buffer with NaN, so an
# element that no program wrote fails the test instead of passing on leftover memory.
POISON_OUTPUTS = False


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1: kernels run on the CPU through Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available_on(device: torch.device) -> bool:
    """Triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def resolve_impl(impl: str, device: torch.device, op: str) -> str:
    """Map `impl` to "triton" or "reference" for tensors on `device`.

    "auto" picks Triton on CUDA and the reference elsewhere (the interpreter is
    a test tool, too slow to be chosen automatically).
    """
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = "triton" if device.type == "cuda" else "reference"
    elif impl == "triton" and not triton_available_on(device):
        raise ValueError(
            f"{op}: impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU); "
            f"got tensors on {device}"
        )
    if impl == "triton" and not HAS_TRITON:
        raise ValueError(f"{op}: impl='triton' needs triton installed")
    return impl


def check_is_tensor(op: str, name: str, t) -> None:
    """ValueError naming the argument unless `t` is a tensor."""
    if not isinstance(t, Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")


def check_same_device(op: str, name: str, t: Tensor, like_name: str, like: Tensor) -> None:
    """ValueError naming the argument unless `t` lives on the device of `like`."""
    if t.device != like.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {like_name} is on {like.device}")


def check_index(op: str, name: str, t, dtype: torch.dtype, shape: str, like_name: str, like: Tensor) -> None:
    """An index tensor (flat rows, cu_seqlens): a 1-D `dtype` tensor on the device of `like`."""
    check_is_tensor(op, name, t)
    if t.dtype != dtype:
        raise ValueError(f"{op}: {name} must be {str(dtype).removeprefix('torch.')}, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{op}: {name} must be 1-D {shape}, got shape {tuple(t.shape)}")
    check_same_device(op, name, t, like_name, like)


def check_triton_float(op: str, name: str, t: Tensor) -> None:
    """ValueError naming the argument unless the Triton path can read `t`: fp16 / bf16 / fp32,
    and bf16 only on CUDA (the interpreter has no bfloat16)."""
    if t.dtype not in TRITON_FLOAT_DTYPES:
        raise ValueError(f"{op}: impl='triton' supports {name} dtypes float16, bfloat16, float32, got {t.dtype}")
    if t.dtype == torch.bfloat16 and t.device.type != "cuda":
        raise ValueError(f"{op}: impl='triton' with bfloat16 {name} needs CUDA "
                         "(the Triton interpreter has no bfloat16)")


_SM_COUNT: dict = {}


def reduction_programs(device: torch.device) -> int:
    """How many programs a row-split reduction (the dweight / dbias partial sums) launches at most:
    four per SM on CUDA, so every SM stays busy and the partial buffer stays small; 5 under the
    interpreter (few programs run faster there, and 5 rarely divides the row tiles evenly, so the
    tests see programs with unequal shares). Fixed per device, so results are deterministic."""
    if device.type != "cuda":
        return 5
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return 4 * _SM_COUNT[index]


def launch_directly(*tensors) -> bool:
    """True where an eager call may launch its kernels directly, skipping the custom op's dispatch
    (host time paid on each of a model's many calls): not under torch.compile, no dispatch mode
    active (fake tensors, make_fx / AOTAutograd tracing, opcheck), and only plain tensors (a
    subclass such as DTensor needs the op's dispatch). Elsewhere the custom op runs, which every
    one of those understands."""
    if torch.compiler.is_compiling() or is_in_torch_dispatch_mode():
        return False
    return all(t is None or type(t) in _PLAIN_TENSORS for t in tensors)


_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for launch grids. (triton.cdiv and triton.next_power_of_2 are ConstexprFunctions
    in Triton 3.8: about 3 us of host time a call, where these cost nanoseconds.)"""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (1 for n <= 1), as triton.next_power_of_2."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def device_guard(device: torch.device):
    """Triton launches on the current CUDA device: make it `device` for the launch."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def new_output(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every buffer a Triton launcher allocates comes from here: uninitialized, or NaN-filled
    while POISON_OUTPUTS is on."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
