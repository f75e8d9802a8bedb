"""Compile the sparse prefill kernel for a Hopper GPU without one:
``python -m tests.flash_mla.compile_sparse_prefill_for_gpu`` (without ``TRITON_INTERPRET``).

Prints its shared memory, registers and spill bytes for DeepSeek-V3.2's heads
(576/512) with topk_length and an attention sink, the variant with most code.
"""

from __future__ import annotations

import os
import sys

import triton

from dsinfra.flash_mla import triton_sparse_prefill
from tests.flash_mla.compile_for_gpu import compile_kernel, resources

POINTERS = {"kv_ptr": "*bf16", "topk_length_ptr": "*i32", "sink_ptr": "*fp32", "max_logits_ptr": "*fp32", "sm_scale": "fp32"}


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET first", file=sys.stderr)
        return 2
    constants = dict(
        HAVE_LENGTH=True, HAVE_SINK=True, D_QK=576, D_V=512, DV_PAD=512, BLOCK_H=32,
        BLOCK_N=triton_sparse_prefill.BLOCK_N, BLOCK_D=triton_sparse_prefill.BLOCK_D,
    )
    compiled = compile_kernel(triton_sparse_prefill._sparse_prefill_kernel, constants, POINTERS, num_warps=8, num_stages=1)
    print(f"sparse prefill 576/512 with topk_length and sink: shared {compiled.metadata.shared} {resources(compiled)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
