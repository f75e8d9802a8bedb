"""Compile the Triton kernels for a Hopper GPU without one: ``python -m tests.flash_mla.compile_for_gpu``.

Run in a process without ``TRITON_INTERPRET`` (the test suite's own process has
it set, which turns the kernels into interpreted functions). Prints one line
per kernel variant with its shared memory, registers and spill (stack) bytes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dsinfra.flash_mla import triton_impl

TARGET = GPUTarget("cuda", 90, 32)
POINTERS = {
    "q_ptr": "*bf16", "scale_ptr": "*fp32", "rope_ptr": "*bf16", "block_table_ptr": "*i32", "cache_seqlens_ptr": "*i32",
    "indices_ptr": "*i32", "plan_ptr": "*i32", "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "num_splits_ptr": "*i32",
    "out_ptr": "*bf16", "lse_ptr": "*fp32", "scale_log2": "fp32",
}


def compile_kernel(kernel, constants: dict, pointers: dict, num_warps: int, num_stages: int):
    signature = {name: "constexpr" if name in constants else pointers.get(name, POINTERS.get(name, "i32")) for name in kernel.arg_names}
    source = ASTSource(kernel, signature, constexprs={(kernel.arg_names.index(name),): value for name, value in constants.items()})
    return triton.compile(source, target=TARGET, options=dict(num_warps=num_warps, num_stages=num_stages))


def resources(compiled) -> str:
    """ptxas' register and stack (spill) use, read from the cubin."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([str(tool), "--dump-resource-usage", cubin.name], capture_output=True, text=True).stdout
    line = next(line for line in usage.splitlines() if "REG:" in line)
    return " ".join(field for field in line.split() if field.startswith(("REG:", "STACK:")))


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET first", file=sys.stderr)
        return 2
    head_dim, head_dim_v = 576, 512
    dv_pad = triton.next_power_of_2(head_dim_v)
    for fp8, sparse, causal in [(False, False, True), (True, True, False)]:
        constants = dict(
            PAGE=64, SPARSE=sparse, CAUSAL=causal, FP8=fp8, GROUP_SIZE=128, HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v,
            DV_PAD=dv_pad, BLOCK_M=32, BLOCK_N=triton_impl.BLOCK_N, BLOCK_D=triton_impl.BLOCK_D,
        )
        nope = {"nope_ptr": "*fp8e4nv" if fp8 else "*bf16"}
        compiled = compile_kernel(triton_impl._split_kernel, constants, nope, num_warps=8, num_stages=1)
        print(f"split fp8={fp8} sparse={sparse} causal={causal}: shared {compiled.metadata.shared} {resources(compiled)}")
    compiled = compile_kernel(triton_impl._combine_kernel, dict(HEAD_DIM_V=head_dim_v, DV_PAD=dv_pad, BLOCK_M=32), {}, 8, 1)
    print(f"combine: shared {compiled.metadata.shared} {resources(compiled)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
