"""The Triton kernels compile for CUDA, no GPU needed: Triton's interpreter runs
them on the CPU but does not type-check them as the compiler does. Compiled for
sm_90 (FP8 dot, wgmma) and sm_80 (bytes decoded to fp16 in the kernel), in a
fresh process: kernels imported under TRITON_INTERPRET=1 cannot be compiled."""

import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton.backends.nvidia")

ROOT = pathlib.Path(__file__).resolve().parents[2]
TILES = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "SWIZZLE": 8}


def compile_for(kernel, arch: int, pointers: dict[str, str], constants: dict) -> None:
    """Compile ``kernel`` for CUDA sm_``arch``: pointer arguments typed as given,
    the other runtime arguments int32."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {name: "constexpr" if name in constants else pointers.get(name, "i32") for name in kernel.arg_names}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
    triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": 8, "num_stages": 3})


def compile_kernels() -> None:
    """Every kernel mode: contiguous and masked on sm_90, dense with 1x128 RHS
    scales and a float32 accumulation on sm_80, K-grouped on sm_90."""
    from dsinfra.deep_gemm import triton_impl

    for arch, mode, has_c, rows_per_scale in [(90, 1, False, 128), (90, 2, False, 128), (80, 0, True, 1)]:
        operand = "*fp8e4nv" if arch >= 89 else "*u8"
        out = "*fp32" if has_c else "*bf16"
        pointers = dict(a_ptr=operand, b_ptr=operand, sa_ptr="*fp32", sb_ptr="*fp32", d_ptr=out, c_ptr=out, layout_ptr="*i32")
        constants = dict(MODE=mode, HAS_C=has_c, RHS_ROWS_PER_SCALE=rows_per_scale, FP8_DOT=arch >= 89, **TILES)
        compile_for(triton_impl._m_grouped_gemm_kernel, arch, pointers, constants)
    pointers = dict(a_ptr="*fp8e4nv", b_ptr="*fp8e4nv", sa_ptr="*fp32", sb_ptr="*fp32", d_ptr="*fp32", c_ptr="*fp32")
    pointers.update(k_offsets_ptr="*i64", scale_offsets_ptr="*i64")
    compile_for(triton_impl._k_grouped_gemm_kernel, 90, pointers, dict(HAS_C=True, FP8_DOT=True, **TILES))


def test_kernels_compile_for_cuda():
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    command = [sys.executable, "-c", "from tests.deep_gemm.test_cuda_compile import compile_kernels; compile_kernels()"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
