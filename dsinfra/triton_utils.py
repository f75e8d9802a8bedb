"""What every Triton kernel in dsinfra needs.

Import this only from ``triton_impl.py`` modules: it imports Triton.

Under ``TRITON_INTERPRET=1`` (kernels on CPU tensors, as the tests run them)
Triton's interpreter computes ``tl.dot`` on bfloat16 operands wrongly (seen with
Triton 3.9; fp16, fp32 and fp8 operands are right). Kernels therefore call
:func:`dot` instead of ``tl.dot``: it upcasts bfloat16 operands to float32 when
interpreting and is exactly ``tl.dot`` when compiled for a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsinfra import backend

INTERPRETING = tl.constexpr(backend.interpreting())


@triton.jit
def dot(a, b, acc):
    """``acc + a @ b`` (``tl.dot``), correct under the interpreter for bf16 operands."""
    if INTERPRETING:
        if a.dtype == tl.bfloat16 or b.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    return tl.dot(a, b, acc)


def fp8_dot_supported(device: torch.device | str) -> bool:
    """Whether ``tl.dot`` takes float8 operands on ``device``: NVIDIA sm_89 (Ada)
    or newer, and the interpreter. Older GPUs dequantise in the kernel instead."""
    device = torch.device(device)
    if device.type != "cuda":
        return backend.interpreting()
    if torch.version.hip is not None:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)
