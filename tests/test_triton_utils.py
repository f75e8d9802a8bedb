"""The dot helper gives the right product where plain tl.dot does not (bf16
under the interpreter), and matches it elsewhere."""

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from dsinfra.triton_utils import dot  # noqa: E402


@triton.jit
def _matmul(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    rm = tl.arange(0, M)
    rn = tl.arange(0, N)
    rk = tl.arange(0, K)
    a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])
    acc = dot(a, b, tl.zeros((M, N), dtype=tl.float32))
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2])
def test_dot_is_exact_for_low_precision_operands(kernel_device, dtype):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(16, 32, generator=gen).to(dtype)
    b = torch.randn(32, 16, generator=gen).to(dtype)
    c = torch.empty(16, 16, device=kernel_device)
    _matmul[(1,)](a.to(kernel_device), b.to(kernel_device), c, 16, 16, 32)
    expected = a.float() @ b.float()
    torch.testing.assert_close(c.cpu(), expected, rtol=1e-5, atol=1e-5)
